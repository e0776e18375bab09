//! The replica state machine: local commands, remote writes, watch log and anti-entropy.
//!
//! Rooms: `write` (local puts, deletes, batches and their validation), `merge` (remote
//! writes and entries, the one `apply`), `changelog` (revisions and the bounded change log),
//! `tombstones` (collection, the grace horizon, forgetting after a long absence), `sync`
//! (digests, summaries, requests, entries, peers and the in-sync rule), `persist` (every
//! call into the durable backend), `restore` (entries from a backup), `stats` (counters).

mod buckets;
mod changelog;
mod lifecycle;
mod merge;
mod persist;
mod restore;
mod stats;
mod sync;
mod tombstones;
mod write;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use chorus_protocol::util::jittered;
use prost::Message as _;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::ReplicaConfig;
use crate::error::{ClockCause, Error};
use crate::hlc::{Hlc, HlcClock, Version};
use crate::store::{EntryMeta, Key, Owner, Store, Stored};
use crate::wire;

use buckets::Buckets;
use changelog::Logged;
use lifecycle::{Standing, SyncState};
pub use restore::{RestoreMode, RestoreReport};
pub use stats::ReplicaStats;
use sync::{Offer, Peer};
pub use write::{Check, Expect, Op, PutMeta};

/// What a replica reports through [`Replica::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaEvent {
    /// A change was applied to the store.
    Change(Change),
    /// This node's digest matched the latest digest of every live peer (see
    /// `docs/replication.md` for the exact rule).
    InSync,
    /// This node is no longer known to be in sync.
    OutOfSync,
}

/// One applied change, local or remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Local revision: increases by one for every applied change on this node.
    pub revision: u64,
    /// The key.
    pub key: String,
    /// The new value; `None` for a delete.
    pub value: Option<Bytes>,
    /// The version that won.
    pub version: Version,
    /// The flags stored with the value (0 for a delete).
    pub flags: u64,
    /// The owner of an owned entry (`None` for a delete).
    pub owner: Option<Owner>,
}

/// Why an outgoing message exists; the driver must never drop a `Write`, and may drop a
/// `Sync` message under pressure (anti-entropy sends it again later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutgoingKind {
    /// A local put, delete or batch.
    Write,
    /// A digest, summary, request or entries message.
    Sync,
}

/// An encoded message to multicast reliably to the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Write or sync.
    pub kind: OutgoingKind,
    /// The encoded `Envelope` (see `proto/replication.proto`).
    pub payload: Bytes,
}

/// An entry to merge.
#[derive(Debug)]
struct Item {
    key: String,
    /// `None`: a tombstone.
    value: Option<Bytes>,
    version: Version,
    meta: EntryMeta,
}

/// A replicated key-value store's state machine, sans IO.
///
/// Commands ([`put`](Replica::put), [`delete`](Replica::delete), [`batch`](Replica::batch))
/// stamp and apply locally, then queue the write for the group; inputs from the layer below
/// arrive through `handle_*`; outputs leave through `poll_*`. After any command or `handle_*`
/// call, drain [`poll_outgoing`](Replica::poll_outgoing) and [`poll_event`](Replica::poll_event)
/// and re-arm the timer from [`poll_timeout`](Replica::poll_timeout).
///
/// The replica never sends, never reads a clock and never draws unseeded randomness.
#[derive(Debug)]
pub struct Replica {
    cfg: ReplicaConfig,
    store: Store,
    clock: HlcClock,
    rng: ChaCha8Rng,
    /// The digest buckets (sums, counts, and key lists while anti-entropy needs them).
    buckets: Buckets,
    /// Tombstones by version, oldest first, for collection.
    tombstones: BTreeSet<(Version, Key)>,
    next_revision: u64,
    log: VecDeque<Logged>,
    /// Reused by `apply` for the entries handed to the store.
    commit_scratch: Vec<(Key, Stored)>,
    /// Key and value bytes held by `log`.
    log_bytes: usize,
    events: VecDeque<ReplicaEvent>,
    outgoing: VecDeque<Outgoing>,
    peers: BTreeMap<u64, Peer>,
    /// What this node last reported (`InSync` / `OutOfSync`).
    sync: SyncState,
    created: Instant,
    round: u64,
    next_digest: Instant,
    triggered_digest: Option<Instant>,
    /// (requester, bucket) → when this node last answered it.
    answered: HashMap<(u64, u32), Instant>,
    /// Requester → entries offered to it in summaries, not yet asked for.
    offers: HashMap<u64, Offer>,
    /// Bytes of sync messages the owner can still queue (see
    /// [`set_sync_room`](Replica::set_sync_room)); answers beyond it are not built.
    sync_room: usize,
    /// The next digest wants a reply although this node is in sync: a peer's digest differed
    /// once, and the hysteresis waits for its next one.
    confirm_wanted: bool,
    /// Since when this node has had no live peer (None while it has one). A node starts
    /// isolated: one that runs alone for longer than the grace period before it meets a peer
    /// recovers like one cut off for that long.
    isolated_since: Option<Instant>,
    /// What this node's store is evidence of: fresh, recovering after a long isolation or
    /// absence, or settled.
    standing: Standing,
    last_wall_ms: u64,
    stats: ReplicaStats,
    /// Committed changes waiting to be handed out for persistence; `None` keeps the store in
    /// memory only.
    durability: Option<persist::PersistQueue>,
}

impl Replica {
    /// A replica with an empty store, created at `now`.
    #[must_use]
    pub fn new(cfg: ReplicaConfig, now: Instant) -> Replica {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.rng_seed);
        let first = jittered(&mut rng, cfg.sync_interval);
        let buckets = Buckets::new(cfg.buckets.get());
        Replica {
            clock: HlcClock::new(cfg.max_drift_ms),
            store: Store::new(),
            rng,
            buckets,
            tombstones: BTreeSet::new(),
            next_revision: 1,
            log: VecDeque::new(),
            commit_scratch: Vec::new(),
            log_bytes: 0,
            events: VecDeque::new(),
            outgoing: VecDeque::new(),
            peers: BTreeMap::new(),
            sync: SyncState::OutOfSync,
            created: now,
            round: 0,
            next_digest: now + first,
            triggered_digest: None,
            answered: HashMap::new(),
            offers: HashMap::new(),
            confirm_wanted: false,
            sync_room: usize::MAX,
            isolated_since: Some(now),
            standing: Standing::Fresh,
            last_wall_ms: 0,
            stats: ReplicaStats::default(),
            durability: None,
            cfg,
        }
    }

    /// This node's id.
    #[must_use]
    pub fn node(&self) -> u64 {
        self.cfg.node
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &ReplicaConfig {
        &self.cfg
    }

    /// The read handle on the store (clone it to read from other threads).
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> &ReplicaStats {
        &self.stats
    }

    /// Whether the replica currently considers itself in sync (last event sent).
    #[must_use]
    pub fn is_in_sync(&self) -> bool {
        self.sync == SyncState::InSync
    }

    /// How many bytes of sync messages (digests, summaries, requests, entries) the owner can
    /// still take before it would drop them (its sync backlog's free room). Answers to peers
    /// are built only while they fit, so a flood of requests costs no work beyond that room:
    /// the rest is left for a later round of anti-entropy. Unlimited until set.
    pub fn set_sync_room(&mut self, bytes: usize) {
        self.sync_room = bytes;
    }

    /// The latest wall-clock time (unix ms) this replica was given.
    #[must_use]
    pub fn last_wall_ms(&self) -> u64 {
        self.last_wall_ms
    }

    /// The latest HLC timestamp issued or observed.
    #[must_use]
    pub fn clock(&self) -> Hlc {
        self.clock.last()
    }

    /// How far, in milliseconds, a version stamped at `wall_ms` would be ahead of the clock
    /// that judges it: the most advanced live peer's clock (by the offsets given to
    /// [`handle_peer_clock`](Replica::handle_peer_clock)), or this node's own `wall_ms` when
    /// no live peer reported one. Negative when behind.
    ///
    /// Only the most advanced peer counts: a node is refused writes only when it is ahead of
    /// *every* live peer, so one peer with a wrong (or forged) slow clock cannot stop the
    /// others' writes; that peer drops their writes until its clock reaches them and takes
    /// them through anti-entropy then.
    #[must_use]
    pub fn clock_ahead_ms(&self, wall_ms: u64) -> i64 {
        let next = self.clock.last().physical_ms().max(wall_ms);
        let peer = self
            .peers
            .values()
            .filter(|p| p.is_live())
            .filter_map(|p| p.clock_offset_ms)
            .max();
        let reference = i128::from(wall_ms) + i128::from(peer.unwrap_or(0));
        let ahead = i128::from(next) - reference;
        i64::try_from(ahead).unwrap_or(if ahead < 0 { i64::MIN } else { i64::MAX })
    }

    /// Whether a local write at `wall_ms` would be accepted by the peers' drift check.
    ///
    /// # Errors
    /// [`Error::ClockAhead`] when [`clock_ahead_ms`](Replica::clock_ahead_ms) exceeds
    /// `max_drift_ms − clock_margin_ms`.
    pub fn check_clock(&self, wall_ms: u64) -> Result<(), Error> {
        let bound_ms = self
            .cfg
            .max_drift_ms
            .saturating_sub(self.cfg.clock_margin_ms);
        let ahead = self.clock_ahead_ms(wall_ms);
        match u64::try_from(ahead) {
            Ok(offset_ms) if offset_ms > bound_ms => Err(Error::ClockAhead {
                offset_ms,
                bound_ms,
                cause: if self.clock.last().physical_ms() > wall_ms {
                    ClockCause::History
                } else {
                    ClockCause::WallClock
                },
            }),
            _ => Ok(()),
        }
    }

    /// The value under `key` (reads the store).
    #[must_use]
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.store.get(key)
    }

    /// Live `(key, value)` pairs under `prefix`, sorted (reads the store).
    #[must_use]
    pub fn scan(&self, prefix: &str) -> Vec<(String, Bytes)> {
        self.store.scan_prefix(prefix)
    }

    /// Next event, if any.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ReplicaEvent> {
        pop_front_shrinking(&mut self.events)
    }

    /// Next message to multicast reliably to the group, if any.
    #[must_use]
    pub fn poll_outgoing(&mut self) -> Option<Outgoing> {
        pop_front_shrinking(&mut self.outgoing)
    }

    /// When [`handle_timeout`](Replica::handle_timeout) should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.next_digest;
        if let Some(tr) = self.triggered_digest {
            t = t.min(tr);
        }
        if !self.is_in_sync() && !self.has_live_peer() {
            t = t.min(self.created + self.cfg.solo_in_sync_after);
        }
        Some(t)
    }

    /// Timers: periodic and triggered digests, tombstone collection, the solo in-sync rule,
    /// and dropping the digest buckets' key lists once unread for `resend_holdoff` (checked at
    /// every call: no timer of its own, so that the schedule of wake-ups stays as it was;
    /// `NodeCore` calls this at every protocol timer).
    pub fn handle_timeout(&mut self, now: Instant, wall_ms: u64) {
        self.last_wall_ms = self.last_wall_ms.max(wall_ms);
        self.buckets.expire(now, self.cfg.resend_holdoff);
        let due = self.next_digest <= now || self.triggered_digest.is_some_and(|t| t <= now);
        if due {
            self.collect_tombstones(wall_ms);
            if self.has_live_peer() {
                self.send_digest();
            }
            self.triggered_digest = None;
            self.next_digest = now + jittered(&mut self.rng, self.cfg.sync_interval);
            let holdoff = self.cfg.resend_holdoff;
            self.answered
                .retain(|_, t| now.saturating_duration_since(*t) < holdoff);
            let ttl = self.cfg.sync_interval * 2;
            self.offers
                .retain(|_, o| now.saturating_duration_since(o.at) < ttl);
        }
        self.evaluate_sync(now);
    }

    /// A message the protocol delivered from `from`. Untrusted: anything malformed is counted
    /// and dropped.
    pub fn handle_message(&mut self, now: Instant, wall_ms: u64, from: u64, payload: &[u8]) {
        self.last_wall_ms = self.last_wall_ms.max(wall_ms);
        if from == self.cfg.node {
            self.stats.own_messages += 1;
            return;
        }
        let _span = tracing::trace_span!("replica", node = self.cfg.node, from).entered();
        let envelope = match wire::Envelope::decode(payload) {
            Ok(e) => e,
            Err(error) => {
                tracing::debug!(%error, len = payload.len(), "undecodable replication message dropped");
                self.stats.malformed += 1;
                return;
            }
        };
        match envelope.body {
            Some(wire::envelope::Body::Write(w)) => self.on_write(now, wall_ms, from, w),
            Some(wire::envelope::Body::Digest(d)) => self.on_digest(now, from, d),
            Some(wire::envelope::Body::Summary(s)) => self.on_summary(from, s),
            Some(wire::envelope::Body::Request(r)) => self.on_request(now, from, r),
            Some(wire::envelope::Body::Entries(e)) => self.on_entries(now, wall_ms, from, e),
            None => self.stats.malformed += 1,
        }
        self.buckets.settle(now);
    }
}

/// `queue.pop_front()`, and once the queue is empty, its memory back if a burst (say the
/// change events of a whole sync) made it large: a queue keeps its capacity otherwise.
pub(crate) fn pop_front_shrinking<T>(queue: &mut VecDeque<T>) -> Option<T> {
    let item = queue.pop_front();
    if queue.is_empty() && queue.capacity() > 1024 {
        queue.shrink_to(64);
    }
    item
}

fn envelope(body: wire::envelope::Body) -> wire::Envelope {
    wire::Envelope { body: Some(body) }
}
