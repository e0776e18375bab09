//! `NodeCore`: one node's protocol endpoint and replica, wired together, sans IO.
//!
//! - `mod.rs`: configuration, events, commands and the routing between the layers;
//! - `lifecycle.rs`: shutdown (drain, goodbye, linger, closed) and write back-pressure;
//! - `acks.rs`: persistence as an output and the acknowledgement of writes after it;
//! - `pubsub.rs`: messages that are not stored (publish, check, report, losses).
//! - `owned.rs`: owned (ephemeral) keys: who deletes a gone owner's keys, and when.

mod acks;
mod lifecycle;
mod owned;
mod pubsub;

pub use lifecycle::{DRAIN_MAX, GOODBYE_LINGER, Lifecycle};
pub use owned::{DEPUTY_STEP, MAX_ROUNDS, OwnedStats};
pub use pubsub::{
    MAX_TOPIC_LEN, Publication, PublishError, PubsubStats, TopicError, TopicFilter, check_topic,
};

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use chorus_protocol::{Endpoint, Event, Member, SendError, Transmit, WallClock};

use crate::config::ReplicaConfig;
use crate::durable::{DurableError, DurableStats, Loaded};
use crate::error::{Compacted, Error};
use crate::hlc::Version;
use crate::replica::{
    Change, Check, Op, OutgoingKind, Replica, ReplicaEvent, ReplicaStats, pop_front_shrinking,
};
use crate::replica::{RestoreMode, RestoreReport};
use crate::store::{Entry, Store};

/// Configuration of a [`NodeCore`].
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The protocol endpoint's configuration (node id, incarnation, cluster, seed, timers).
    pub protocol: chorus_protocol::Config,
    /// The replica's configuration. Its `node` and `incarnation` are overwritten with the
    /// protocol's, and its `limits.max_write_bytes` is capped at the protocol's
    /// `max_message_size`.
    pub replica: ReplicaConfig,
    /// How `now` maps to unix milliseconds: stamps versions, checks remote versions against
    /// the drift bound, and is carried in heartbeats (it overrides `protocol.wall_clock`) so
    /// that peers measure this node's clock offset. Skew only decides which of two
    /// *concurrent* writes wins; writes more than `max_drift_ms` ahead of a receiver's clock
    /// are rejected by that receiver, so this node refuses them first (see
    /// [`Error::ClockAhead`]).
    pub wall_clock: WallClock,
    /// Most bytes of sync messages waiting for room in the send window; beyond it new sync
    /// messages are dropped and counted (anti-entropy sends them again). Writes are never
    /// dropped.
    pub max_sync_backlog_bytes: usize,
    /// Bytes of local writes waiting for room in the send window beyond which the node stops
    /// taking writes ([`NodeCore::accepts_writes`]): back-pressure from the slowest member to
    /// the writer.
    pub max_write_backlog_bytes: usize,
}

impl NodeConfig {
    /// A configuration with the replica defaults, its seed derived from the protocol's.
    #[must_use]
    pub fn new(protocol: chorus_protocol::Config, wall_clock: WallClock) -> NodeConfig {
        let replica =
            ReplicaConfig::new(protocol.node.0, protocol.rng_seed ^ 0x5eed_0f7e_911c_a5e1);
        NodeConfig {
            protocol,
            replica,
            wall_clock,
            max_sync_backlog_bytes: 8 << 20,
            max_write_backlog_bytes: 1 << 20,
        }
    }
}

/// What a node reports through [`NodeCore::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// A change was applied to the store (local or remote).
    Change(Change),
    /// The replica is in sync with every live peer (see `docs/replication.md`).
    InSync,
    /// The replica is no longer known to be in sync.
    OutOfSync,
    /// A membership event of the protocol: one of `MemberJoined`, `MemberSuspected`,
    /// `MemberAlive`, `MemberLeft`, `MemberRestarted`.
    Member(Event),
    /// The answer to the write command `ticket` ([`NodeCore::batch`]): exactly one per
    /// command. `Ok` once the write is as durable as the fsync policy requires (at once
    /// without a durable store); `Err` when it was refused, or when the durable store failed
    /// (the write is then applied and replicated, but may not survive a crash of this node).
    Acked {
        /// The owner's ticket, as given to the command.
        ticket: u64,
        /// The write's version, or why it is not (or not durably) done.
        result: Result<Version, CoreError>,
    },
    /// A published message ([`NodeCore::publish`] here, or a valid one from a peer): per
    /// sender in order and exactly once; never stored.
    Message(Publication),
    /// The protocol could not recover `count` messages of `from` (of every kind: writes,
    /// anti-entropy and publications on any topic), so publications of `from` may be
    /// missing at this point of its stream.
    MessagesLost {
        /// The sender's node id.
        from: u64,
        /// How many of its messages were lost: at least as many as its lost publications.
        count: u64,
    },
}

/// Why a write on [`NodeCore`] was refused (nothing changed), or is not durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoreError {
    /// The replica refused the write (limits, shape).
    #[error(transparent)]
    Replica(#[from] Error),
    /// [`NodeCore::shutdown`] or [`NodeCore::close`] was called.
    #[error("node closed")]
    Closed,
    /// The write was applied and replicated, but the durable store failed before it was
    /// durable (only in [`NodeEvent::Acked`]).
    #[error(transparent)]
    Durability(DurableError),
    /// [`NodeCore::publish`] refused the message (bad topic, too large); nothing was sent.
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// Equality for tests and event comparison: durability errors compare by their text (an
/// `io::Error` has no equality of its own).
impl PartialEq for CoreError {
    fn eq(&self, other: &CoreError) -> bool {
        match (self, other) {
            (CoreError::Replica(a), CoreError::Replica(b)) => a == b,
            (CoreError::Closed, CoreError::Closed) => true,
            (CoreError::Durability(a), CoreError::Durability(b)) => a.to_string() == b.to_string(),
            (CoreError::Publish(a), CoreError::Publish(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for CoreError {}

/// Counters of a node: protocol, replication and the glue between them.
#[derive(Debug, Clone, Default)]
pub struct NodeStats {
    /// The protocol endpoint's counters.
    pub protocol: chorus_protocol::Stats,
    /// The replica's counters.
    pub replication: ReplicaStats,
    /// Write messages waiting for room in the send window.
    pub write_backlog: usize,
    /// Sync messages waiting for room in the send window.
    pub sync_backlog: usize,
    /// Sync messages dropped because the sync backlog was full.
    pub sync_dropped: u64,
    /// Messages the endpoint refused as too large (a configuration error; dropped).
    pub too_large: u64,
    /// The durable backend's counters, when the node has one.
    pub durable: Option<DurableStats>,
    /// How far (ms) a write stamped now would be ahead of the most advanced live peer's
    /// clock, or of this node's own when no peer reported one; negative when behind (see
    /// [`Replica::clock_ahead_ms`]).
    pub clock_ahead_ms: i64,
    /// Whether local writes are refused because of it ([`Error::ClockAhead`]).
    pub clock_refusing: bool,
    /// Publications sent, received, dropped as invalid, and losses reported.
    pub pubsub: PubsubStats,
    /// Owned keys deleted for gone owners, re-asserted, given up on.
    pub owned: OwnedStats,
}

/// One node of a Chorus cluster as a sans-IO state machine: a `chorus_protocol::Endpoint`
/// plus a [`Replica`], with protocol events routed to the replica and replica messages
/// handed to the endpoint. Production (the tokio driver) and the simulator drive the same
/// code.
///
/// Call order, after every input (`handle_datagram`, `handle_timeout`, a command, `close`):
/// drain [`poll_transmit`](NodeCore::poll_transmit) and [`poll_event`](NodeCore::poll_event),
/// then sleep until [`poll_timeout`](NodeCore::poll_timeout) and call
/// [`handle_timeout`](NodeCore::handle_timeout).
///
/// A write accepted by [`put`](NodeCore::put), [`delete`](NodeCore::delete) or
/// [`batch`](NodeCore::batch) is applied locally at once and queued; while the protocol's
/// send window is full it stays queued (in order) and is handed over on `Writable`. It is
/// never dropped, except by `close` or by the process ending.
///
/// A durable node ([`restore`](NodeCore::restore)) also emits every committed change through
/// [`poll_persist`](NodeCore::poll_persist); the owner hands it to its durable store and
/// reports back with [`handle_persisted`](NodeCore::handle_persisted). Shutdown
/// ([`shutdown`](NodeCore::shutdown)) and back-pressure
/// ([`accepts_writes`](NodeCore::accepts_writes)) are decided here too; see [`Lifecycle`].
#[derive(Debug)]
pub struct NodeCore {
    endpoint: Endpoint,
    replica: Replica,
    wall: WallClock,
    writes: VecDeque<Bytes>,
    /// Bytes of `writes`.
    write_bytes: usize,
    sync: VecDeque<Bytes>,
    sync_bytes: usize,
    max_sync_backlog: usize,
    /// Bytes of `writes` beyond which no write is taken ([`NodeCore::accepts_writes`]).
    max_write_backlog: usize,
    events: VecDeque<NodeEvent>,
    lifecycle: Lifecycle,
    /// Acknowledgement after persistence; `None` for a node kept in memory only.
    acks: Option<acks::Acks>,
    /// The final [`Persist::SyncAll`](crate::Persist::SyncAll) is owed (closed, durable).
    sync_all_due: bool,
    sync_dropped: u64,
    too_large: u64,
    pubsub: PubsubStats,
    /// The endpoint's heartbeat count when the peers' clock offsets were last handed to the
    /// replica, and whether membership changed since.
    heartbeats_seen: u64,
    clocks_dirty: bool,
    /// Owned keys: the gone owners, this life's own keys, the deputy's turn.
    owned: owned::Owned,
}

impl NodeCore {
    /// A node created at `now`, with an empty store kept in memory only.
    #[must_use]
    pub fn new(config: NodeConfig, now: Instant) -> NodeCore {
        NodeCore::build(config, now, None)
    }

    /// A durable node created at `now` whose store starts as `loaded` (what its durable store
    /// found, see [`Replica::restore`]). It emits every change through
    /// [`poll_persist`](NodeCore::poll_persist) and acknowledges a write
    /// ([`NodeEvent::Acked`]) once [`handle_persisted`](NodeCore::handle_persisted) covers it.
    #[must_use]
    pub fn restore(config: NodeConfig, now: Instant, loaded: Loaded) -> NodeCore {
        NodeCore::build(config, now, Some(loaded))
    }

    fn build(config: NodeConfig, now: Instant, loaded: Option<Loaded>) -> NodeCore {
        let mut protocol = config.protocol;
        protocol.wall_clock = Some(config.wall_clock);
        let endpoint = Endpoint::new(protocol, now);
        let mut rcfg = config.replica;
        rcfg.node = endpoint.node_id().0;
        rcfg.incarnation = endpoint.config().incarnation.0;
        rcfg.limits.max_write_bytes = rcfg
            .limits
            .max_write_bytes
            .min(endpoint.config().max_message_size);
        let durable = loaded.is_some();
        let replica = match loaded {
            None => Replica::new(rcfg, now),
            Some(loaded) => Replica::restore(rcfg, now, config.wall_clock.wall_ms(now), loaded),
        };
        let owned = owned::Owned::new(
            endpoint.node_id(),
            endpoint.incarnation().0,
            endpoint.config().leave_after,
            replica.store(),
            now,
        );
        NodeCore {
            replica,
            endpoint,
            wall: config.wall_clock,
            writes: VecDeque::new(),
            write_bytes: 0,
            sync: VecDeque::new(),
            sync_bytes: 0,
            max_sync_backlog: config.max_sync_backlog_bytes,
            max_write_backlog: config.max_write_backlog_bytes,
            events: VecDeque::new(),
            lifecycle: Lifecycle::Running,
            acks: durable.then(acks::Acks::default),
            sync_all_due: false,
            sync_dropped: 0,
            too_large: 0,
            pubsub: PubsubStats::default(),
            heartbeats_seen: 0,
            clocks_dirty: false,
            owned,
        }
    }

    /// One datagram from the network.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.endpoint.handle_datagram(now, from, datagram);
        self.process(now);
    }

    /// Timers of both layers (safe to call early).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.endpoint.handle_timeout(now);
        self.refresh_clocks(now);
        let wall = self.wall.wall_ms(now);
        self.replica.handle_timeout(now, wall);
        self.process(now);
    }

    /// Next datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.endpoint.poll_transmit(now)
    }

    /// Next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        pop_front_shrinking(&mut self.events)
    }

    /// When [`handle_timeout`](NodeCore::handle_timeout) should next be called (`None` once
    /// closed).
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.lifecycle == Lifecycle::Closed {
            return None;
        }
        let owned = match self.lifecycle {
            Lifecycle::Running => self.owned.poll_timeout(),
            _ => None,
        };
        [
            self.endpoint.poll_timeout(),
            self.replica.poll_timeout(),
            self.lifecycle_timeout(),
            owned,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Sets `key` to `value`: stamped, applied locally, queued for the group. Not
    /// acknowledged (no [`NodeEvent::Acked`]): for writers that wait for nothing; see
    /// [`batch`](NodeCore::batch) for the acknowledged write.
    ///
    /// # Errors
    /// [`CoreError::Closed`] after `shutdown` or `close`; [`CoreError::Replica`] for limit and shape errors,
    /// and with [`Error::ClockAhead`] when this node's clock (or the history it loaded) is
    /// further ahead of every live peer's clock than they accept: they would drop the write.
    pub fn put(
        &mut self,
        now: Instant,
        key: impl Into<String>,
        value: impl Into<Bytes>,
    ) -> Result<Version, CoreError> {
        self.apply_write(now, Vec::new(), vec![Op::put(key, value)])
    }

    /// Deletes `key`. Not acknowledged, as [`put`](NodeCore::put).
    ///
    /// # Errors
    /// As [`put`](NodeCore::put).
    pub fn delete(&mut self, now: Instant, key: impl Into<String>) -> Result<Version, CoreError> {
        self.apply_write(now, Vec::new(), vec![Op::delete(key)])
    }

    /// Applies `ops` atomically under one version (see [`Replica::batch`]) and answers the
    /// command with exactly one [`NodeEvent::Acked`] carrying `ticket` (an opaque number of
    /// the owner's): at once when refused or when the node keeps no durable store, else
    /// when [`handle_persisted`](NodeCore::handle_persisted) covers the write's record (or
    /// [`handle_persist_failed`](NodeCore::handle_persist_failed) says it never will).
    ///
    /// # Errors
    /// As [`put`](NodeCore::put) (the same error is in the `Acked`).
    pub fn batch(&mut self, now: Instant, ops: Vec<Op>, ticket: u64) -> Result<Version, CoreError> {
        self.batch_checked(now, Vec::new(), ops, ticket)
    }

    /// [`batch`](NodeCore::batch) under conditions: applied only if every check of `checks`
    /// holds against this node's store at the moment the batch is applied (see
    /// [`Replica::batch_checked`]); answered by one [`NodeEvent::Acked`] as `batch` is.
    ///
    /// # Errors
    /// [`CoreError::Replica`] with [`Error::ConditionFailed`] when a check fails (nothing
    /// changed); otherwise as [`put`](NodeCore::put).
    pub fn batch_checked(
        &mut self,
        now: Instant,
        checks: Vec<Check>,
        ops: Vec<Op>,
        ticket: u64,
    ) -> Result<Version, CoreError> {
        let before = self.replica.persist_seq();
        let result = self.apply_write(now, checks, ops);
        let after = self.replica.persist_seq();
        self.track(ticket, result.clone(), before, after);
        result
    }

    /// Restores `entries` from a backup as `mode` says (see [`Replica::restore_entries`]) and
    /// answers with one [`NodeEvent::Acked`] carrying `ticket` once what it stored is as
    /// durable as a write would be (its version is meaningless for
    /// [`RestoreMode::ByVersion`](crate::RestoreMode::ByVersion)).
    ///
    /// # Errors
    /// As [`Replica::restore_entries`] (nothing changed); [`CoreError::Closed`] after
    /// `shutdown` or `close`.
    pub fn restore_entries(
        &mut self,
        now: Instant,
        entries: Vec<(String, Entry)>,
        mode: RestoreMode,
        ticket: u64,
    ) -> Result<RestoreReport, CoreError> {
        let before = self.replica.persist_seq();
        let result = if self.lifecycle == Lifecycle::Running {
            self.refresh_clocks(now);
            self.replica
                .restore_entries(self.wall.wall_ms(now), entries, mode)
                .map_err(CoreError::from)
        } else {
            Err(CoreError::Closed)
        };
        if result.is_ok() {
            self.process(now);
        }
        let after = self.replica.persist_seq();
        let acked = result
            .as_ref()
            .map(|(_, v)| v.unwrap_or_default())
            .map_err(Clone::clone);
        self.track(ticket, acked, before, after);
        result.map(|(report, _)| report)
    }

    fn apply_write(
        &mut self,
        now: Instant,
        checks: Vec<Check>,
        ops: Vec<Op>,
    ) -> Result<Version, CoreError> {
        if self.lifecycle != Lifecycle::Running {
            return Err(CoreError::Closed);
        }
        self.refresh_clocks(now);
        let version = self
            .replica
            .batch_checked(self.wall.wall_ms(now), checks, ops)?;
        self.process(now);
        Ok(version)
    }

    /// The read handle on the store.
    #[must_use]
    pub fn store(&self) -> &Store {
        self.replica.store()
    }

    /// The replica (read-only).
    #[must_use]
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The protocol endpoint (read-only).
    #[must_use]
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Current members, as the protocol sees them.
    #[must_use]
    pub fn members(&self) -> Vec<Member> {
        self.endpoint.members()
    }

    /// Whether the replica is in sync with every live peer.
    #[must_use]
    pub fn is_in_sync(&self) -> bool {
        self.replica.is_in_sync()
    }

    /// Changes after `revision` under `prefix` (see [`Replica::changes_since`]).
    ///
    /// # Errors
    /// [`Compacted`] when the log no longer reaches back to `revision`.
    pub fn changes_since(&self, revision: u64, prefix: &str) -> Result<Vec<Change>, Compacted> {
        self.replica.changes_since(revision, prefix)
    }

    /// Whether writes are waiting for room in the send window.
    #[must_use]
    pub fn has_backlog(&self) -> bool {
        !self.writes.is_empty() || !self.sync.is_empty()
    }

    /// Bytes of local writes applied but waiting for room in the send window (see
    /// [`accepts_writes`](NodeCore::accepts_writes)).
    #[must_use]
    pub fn write_backlog_bytes(&self) -> usize {
        self.write_bytes
    }

    /// Counters of both layers.
    #[must_use]
    pub fn stats(&self) -> NodeStats {
        NodeStats {
            protocol: self.endpoint.stats().clone(),
            replication: self.replica.stats().clone(),
            write_backlog: self.writes.len(),
            sync_backlog: self.sync.len(),
            sync_dropped: self.sync_dropped,
            too_large: self.too_large,
            durable: self.durable_stats(),
            clock_ahead_ms: self.replica.clock_ahead_ms(self.replica.last_wall_ms()),
            clock_refusing: self
                .replica
                .check_clock(self.replica.last_wall_ms())
                .is_err(),
            pubsub: self.pubsub,
            owned: self.owned.stats(),
        }
    }

    /// Hands the peers' clock offsets (measured by the endpoint from their heartbeats) to the
    /// replica when a heartbeat arrived or membership changed since the last time. Done
    /// before every write and timer rather than per datagram, so a flood of heartbeats costs
    /// one pass over the members per write or timer, not one per datagram.
    fn refresh_clocks(&mut self, now: Instant) {
        let heard = self.endpoint.stats().heartbeats_received;
        if heard == self.heartbeats_seen && !self.clocks_dirty {
            return;
        }
        self.heartbeats_seen = heard;
        self.clocks_dirty = false;
        let wall = self.wall.wall_ms(now);
        for m in self.endpoint.members() {
            self.replica
                .handle_peer_clock(now, wall, m.node.0, m.clock_offset_ms);
        }
    }

    /// Moves messages and events between the layers until nothing moves, then moves on
    /// through the lifecycle.
    fn process(&mut self, now: Instant) {
        self.pump(now);
        self.step_owned(now);
        self.advance_lifecycle(now);
    }

    /// Applies the owned-key writes due now (re-assertions of this node's keys, deletes of
    /// gone owners' keys when it is this node's turn; see `owned.rs`), while running.
    fn step_owned(&mut self, now: Instant) {
        if self.lifecycle != Lifecycle::Running || !self.owned.wants_step(now) {
            return;
        }
        let batches = self.owned.step(now, &self.endpoint, self.replica.store());
        if batches.is_empty() {
            return;
        }
        self.refresh_clocks(now);
        let wall = self.wall.wall_ms(now);
        for ops in batches {
            if let Err(e) = self.replica.batch(wall, ops.clone()) {
                tracing::warn!(node = %self.endpoint.node_id(), error = %e, "owned-key writes refused; retrying later");
                self.owned.retry_later(now, &ops);
            }
        }
        self.pump(now);
    }

    /// Deletes this node's own owned keys (a graceful stop: before the goodbye).
    pub(super) fn delete_own_keys(&mut self, now: Instant) {
        let batches = self.owned.own_deletes();
        if batches.is_empty() {
            return;
        }
        self.refresh_clocks(now);
        let wall = self.wall.wall_ms(now);
        for ops in batches {
            if let Err(e) = self.replica.batch(wall, ops) {
                // The peers' deputies remove them when they see the goodbye.
                tracing::warn!(node = %self.endpoint.node_id(), error = %e, "could not delete own owned keys at shutdown");
            }
        }
        self.pump(now);
    }

    /// Moves messages and events between the layers until nothing moves.
    fn pump(&mut self, now: Instant) {
        loop {
            let mut moved = self.take_outgoing();
            self.flush(now);
            while let Some(event) = self.endpoint.poll_event() {
                moved = true;
                self.route(now, event);
            }
            while let Some(event) = self.replica.poll_event() {
                self.events.push_back(match event {
                    ReplicaEvent::Change(c) => {
                        self.owned.on_change(now, &c, &self.endpoint);
                        NodeEvent::Change(c)
                    }
                    ReplicaEvent::InSync => NodeEvent::InSync,
                    ReplicaEvent::OutOfSync => NodeEvent::OutOfSync,
                });
            }
            if !moved {
                break;
            }
        }
    }

    /// Moves the replica's messages into the write and sync queues (dropping sync messages
    /// beyond the backlog bound, counted); returns whether there were any.
    fn take_outgoing(&mut self) -> bool {
        let mut moved = false;
        while let Some(out) = self.replica.poll_outgoing() {
            moved = true;
            match out.kind {
                OutgoingKind::Write => {
                    self.write_bytes += out.payload.len();
                    self.writes.push_back(out.payload);
                }
                OutgoingKind::Sync
                    if self.sync_bytes + out.payload.len() > self.max_sync_backlog =>
                {
                    self.sync_dropped += 1;
                }
                OutgoingKind::Sync => {
                    self.sync_bytes += out.payload.len();
                    self.sync.push_back(out.payload);
                }
            }
        }
        moved
    }

    fn route(&mut self, now: Instant, event: Event) {
        let wall = self.wall.wall_ms(now);
        match event {
            Event::Delivered {
                sender, payload, ..
            } => {
                if self.take_publication(sender.0, &payload) {
                    return;
                }
                // The replica builds no answer the sync backlog could not take.
                self.replica
                    .set_sync_room(self.max_sync_backlog.saturating_sub(self.sync_bytes));
                self.replica.handle_message(now, wall, sender.0, &payload);
                self.take_outgoing();
            }
            Event::Lost { sender, range, .. } => {
                self.replica.handle_lost(now, sender.0);
                self.report_lost(
                    sender.0,
                    range.end().saturating_sub(*range.start()).saturating_add(1),
                );
            }
            Event::Writable => {}
            Event::MemberJoined { node, .. } | Event::MemberRestarted { node, .. } => {
                self.replica.handle_peer_up(now, node.0);
                self.clocks_dirty = true;
                self.owned.on_member(now, &event);
                self.events.push_back(NodeEvent::Member(event));
            }
            Event::MemberLeft { node, .. } => {
                self.replica.handle_peer_down(now, node.0);
                self.owned.on_member(now, &event);
                self.events.push_back(NodeEvent::Member(event));
            }
            Event::MemberSuspected { .. } | Event::MemberAlive { .. } => {
                self.owned.on_member(now, &event);
                self.events.push_back(NodeEvent::Member(event));
            }
        }
    }

    /// Hands queued messages to the endpoint, writes first, until the window is full.
    fn flush(&mut self, now: Instant) {
        while let Some(payload) = self.writes.front() {
            match self.endpoint.send(now, payload.clone()) {
                Ok(_) => {}
                Err(SendError::WindowFull | SendError::Closed) => return,
                Err(SendError::TooLarge { size, max }) => {
                    // Cannot happen: max_write_bytes is capped at the protocol's maximum.
                    tracing::error!(
                        size,
                        max,
                        "write message larger than the protocol allows; dropped"
                    );
                    self.too_large += 1;
                }
            }
            if let Some(sent) = pop_front_shrinking(&mut self.writes) {
                self.write_bytes -= sent.len();
            }
        }
        while let Some(payload) = self.sync.front() {
            match self.endpoint.send(now, payload.clone()) {
                Ok(_) => {}
                Err(SendError::WindowFull | SendError::Closed) => return,
                Err(SendError::TooLarge { size, max }) => {
                    tracing::warn!(
                        size,
                        max,
                        "sync message larger than the protocol allows; dropped"
                    );
                    self.too_large += 1;
                }
            }
            self.sync_bytes -= payload.len();
            pop_front_shrinking(&mut self.sync);
        }
    }
}
