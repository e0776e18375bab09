//! The endpoint: one node's protocol state machine. This module holds [`Endpoint`], its
//! public methods and the dispatch of each datagram to the room that handles its frame:
//!
//! - [`membership`]: members (`Peer`), liveness, departures and rejoins;
//! - [`admission`]: who a datagram counts for: member, candidate on probation, or nobody;
//! - [`replay`]: authenticated senders' replay windows and refusal logging;
//! - [`receive`]: data, fragments and repairs into receive streams, and the receive budget;
//! - [`heartbeat`]: our heartbeats, theirs, and stability (trimming the send window);
//! - [`repair`]: NAK scheduling, suppression and answering NAKs with repair credit;
//! - [`transmit`]: what leaves when: control, repairs and data within the rate, the goodbye;
//! - [`timers`]: the one timer table `poll_timeout` and `handle_timeout` both read.

mod admission;
mod heartbeat;
mod membership;
mod receive;
mod repair;
mod replay;
mod timers;
mod transmit;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::auth::{Ciphers, SEAL_OVERHEAD};
use crate::probation::Candidates;
use crate::proto::frame::Kind;
use crate::rate::{Credit, TokenBucket};
use crate::recv::{Budget, Rank};
use crate::send::SendWindow;
use crate::stats::Stats;
use crate::wire::{self, DropReason, Header};
use crate::{
    Config, Event, Incarnation, Keyring, KeyringError, LeaveReason, NodeId, SendError, Transmit,
};

use admission::FrameClass;
use membership::{Departed, Peer};
use replay::Replay;
use timers::{Timer, Timers};

pub use repair::REPAIR_START_CREDIT;

/// One node's reliable-multicast protocol state machine (sans-IO).
///
/// Call order: give it input with [`Endpoint::handle_datagram`], [`Endpoint::handle_timeout`],
/// [`Endpoint::send`] or [`Endpoint::close`]; then drain [`Endpoint::poll_transmit`] and
/// [`Endpoint::poll_event`] until both return `None`; then wait until
/// [`Endpoint::poll_timeout`] and call [`Endpoint::handle_timeout`]. `now` must never go
/// backwards (an earlier `now` is treated as the latest one seen).
#[derive(Debug)]
pub struct Endpoint {
    cfg: Config,
    header: Header,
    rng: ChaCha8Rng,
    stats: Stats,
    events: VecDeque<Event>,
    /// Heartbeats, NAKs and goodbye: small, not held back by the rate limiter.
    control: VecDeque<Transmit>,
    window: SendWindow,
    bucket: TokenBucket,
    peers: HashMap<NodeId, Peer>,
    /// Members that left: late datagrams of an incarnation that said goodbye are ignored; one
    /// that timed out and is heard again resumes its stream where it stood. At most
    /// `max_members` entries, none older than `forget_after`.
    departed: HashMap<NodeId, Departed>,
    /// Senders on probation (not members yet).
    candidates: Candidates,
    /// Whose stream the datagram being handled feeds: a member's or a candidate's.
    feeding: Feeds,
    /// Size of the body of the datagram being handled (what its zero-copy slices pin).
    shared: usize,
    /// Every stream that holds data, by rank: who gives way when the budget is full.
    holders: BTreeMap<Rank, NodeId>,
    /// Source of rank orders (larger = newer).
    next_order: u64,
    /// Repair allowance of each member that has NAKed (entries leave with the member).
    repair_credit: HashMap<NodeId, Credit>,
    budget: Budget,
    now: Instant,
    /// Every deadline: heartbeat, liveness, probation, goodbyes, NAKs, repairs, window age.
    /// Members that said goodbye while data of theirs was still missing are in it as
    /// [`Timer::Leaving`]: removed when the data arrives or at the deadline (a goodbye can
    /// overtake the last data datagram).
    timers: Timers,
    /// When the last periodic heartbeat went out.
    last_heartbeat: Instant,
    heartbeat_rotation: usize,
    last_beyond_reply: Option<Instant>,
    /// Delivered since the last heartbeat (messages, bytes): triggers early heartbeats so that
    /// senders learn stability before their window fills.
    delivered_since_heartbeat: (u64, u64),
    backpressure: Backpressure,
    lifecycle: Lifecycle,
    /// Sealing and opening keys when [`Config::keyring`] is set.
    ciphers: Option<Ciphers>,
    /// Counter of the next sealed datagram (part of its nonce): starts at 1, never repeats.
    next_counter: u64,
    /// Per sender: the newest authenticated incarnation and its replay window. Kept when a
    /// member leaves, so that its captured datagrams cannot bring it back, for
    /// `forget_after` (and at most [`Endpoint::replay_capacity`] entries).
    replay: HashMap<NodeId, Replay>,
    /// When the last authentication refusal was logged, per kind (unknown key, bad tag,
    /// unsealed or unexpectedly sealed).
    last_auth_warning: [Option<Instant>; 3],
    /// The source address of this endpoint's own datagrams as they came back (multicast
    /// loopback): the address peers see it send from.
    own_addr: Option<SocketAddr>,
}

/// Where the endpoint is in its life.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lifecycle {
    /// Sending and receiving.
    Open,
    /// [`Endpoint::close`] was called: queued data is flushed (ignoring the batch delay), no
    /// more heartbeats; the goodbye goes out once everything was transmitted.
    Closing,
    /// The goodbye went out: inert (no transmits, no timers, datagrams ignored).
    Closed,
}

/// Whether [`Event::Writable`] is owed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backpressure {
    /// No `send` was refused since the last [`Event::Writable`].
    Clear,
    /// A `send` was refused with [`SendError::WindowFull`]: [`Event::Writable`] follows as
    /// soon as the window has room.
    WritableOwed,
}

/// Whose stream the datagram being handled feeds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Feeds {
    /// A member's.
    Member,
    /// A candidate's (its sender is on probation).
    Candidate,
}

impl Endpoint {
    /// Creates an endpoint. Contradictory configuration values are repaired as documented on
    /// [`Config`]. The first heartbeat is due at `now`, announcing the node at once.
    pub fn new(config: Config, now: Instant) -> Endpoint {
        let cfg = config.sanitized();
        let header = Header::new(cfg.cluster, cfg.node, cfg.incarnation);
        let ciphers = cfg.keyring.as_ref().map(Ciphers::new);
        let payload_mtu = payload_mtu(&cfg);
        let mut endpoint = Endpoint {
            ciphers,
            next_counter: 1,
            replay: HashMap::new(),
            last_auth_warning: [None; 3],
            own_addr: None,
            rng: ChaCha8Rng::seed_from_u64(cfg.rng_seed),
            stats: Stats::default(),
            events: VecDeque::new(),
            control: VecDeque::new(),
            window: SendWindow::new(header, payload_mtu),
            bucket: TokenBucket::new(cfg.rate_bytes_per_sec, cfg.rate_burst_bytes, now),
            peers: HashMap::new(),
            departed: HashMap::new(),
            candidates: Candidates::default(),
            feeding: Feeds::Member,
            shared: 0,
            holders: BTreeMap::new(),
            next_order: 0,
            repair_credit: HashMap::new(),
            budget: Budget::new(cfg.receive_budget_bytes),
            now,
            timers: Timers::default(),
            last_heartbeat: now,
            heartbeat_rotation: 0,
            last_beyond_reply: None,
            delivered_since_heartbeat: (0, 0),
            backpressure: Backpressure::Clear,
            lifecycle: Lifecycle::Open,
            header,
            cfg,
        };
        endpoint.timers.set(Timer::Heartbeat, Some(now));
        endpoint
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.cfg.node
    }

    /// This node's incarnation.
    pub fn incarnation(&self) -> Incarnation {
        self.cfg.incarnation
    }

    /// The address this endpoint's datagrams come from as peers see it, learnt from its own
    /// datagrams when the network loops them back (multicast and broadcast with loopback on);
    /// `None` until one came back. Drivers bound to a wildcard address show it as their own.
    pub fn own_addr(&self) -> Option<SocketAddr> {
        self.own_addr
    }

    /// The configuration in force (after repairs by [`Endpoint::new`]).
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Replaces the cluster keys (a key rotation step) without a restart: datagrams are sealed
    /// with the new sending key from now on, and only the new keyring's keys are accepted.
    /// Replay windows are kept.
    ///
    /// # Errors
    ///
    /// [`KeyringError::NotKeyed`] if the endpoint was created without a keyring (turning
    /// encryption on changes the datagram budget); nothing changes then.
    pub fn set_keyring(&mut self, keyring: Keyring) -> Result<(), KeyringError> {
        if self.ciphers.is_none() {
            return Err(KeyringError::NotKeyed);
        }
        self.ciphers = Some(Ciphers::new(&keyring));
        tracing::info!(node = %self.cfg.node, send = %keyring.send_id(), "keyring replaced");
        self.cfg.keyring = Some(keyring);
        Ok(())
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Bytes of the receive budget in use ([`Config::receive_budget_bytes`]): held and
    /// partially reassembled messages of every sender, and per-sender state.
    pub fn receive_memory(&self) -> usize {
        self.budget.used()
    }

    /// Senders on probation: heard from, not members yet ([`Config::max_candidates`]).
    pub fn candidates(&self) -> usize {
        self.candidates.len()
    }

    /// Whether the send window has room for another message.
    pub fn is_writable(&self) -> bool {
        self.lifecycle == Lifecycle::Open
            && self.window.len() < self.cfg.window_max_messages.get()
            && self.window.bytes() < self.cfg.window_max_bytes.get()
    }

    /// Highest sequence number of this endpoint's stream that was completely transmitted.
    pub fn highest_sent(&self) -> u64 {
        self.window.highest_sent()
    }

    /// Messages in the send window (queued or awaiting stability).
    pub fn window_len(&self) -> usize {
        self.window.len()
    }

    fn tick(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    /// Queues one application message; returns its sequence number.
    ///
    /// # Errors
    ///
    /// [`SendError::Closed`] after [`Endpoint::close`]; [`SendError::TooLarge`] above
    /// [`Config::max_message_size`]; [`SendError::WindowFull`] when the send window is full
    /// ([`Event::Writable`] follows when it has room). Nothing changes on error.
    pub fn send(&mut self, now: Instant, payload: Bytes) -> Result<u64, SendError> {
        self.tick(now);
        if self.lifecycle != Lifecycle::Open {
            return Err(SendError::Closed);
        }
        if payload.len() > self.cfg.max_message_size {
            return Err(SendError::TooLarge {
                size: payload.len(),
                max: self.cfg.max_message_size,
            });
        }
        let full = self.window.len() >= self.cfg.window_max_messages.get()
            || (self.window.len() > 0
                && self.window.bytes() + payload.len() > self.cfg.window_max_bytes.get());
        if full {
            self.backpressure = Backpressure::WritableOwed;
            self.stats.window_full += 1;
            return Err(SendError::WindowFull);
        }
        self.stats.messages_sent += 1;
        let seq = self.window.push(payload, self.now);
        self.sync_timers();
        Ok(seq)
    }

    /// Graceful shutdown: queued data is flushed (ignoring the batch delay), then a goodbye is
    /// multicast; afterwards `send` returns [`SendError::Closed`] and the endpoint is inert.
    pub fn close(&mut self, now: Instant) {
        self.tick(now);
        if self.lifecycle == Lifecycle::Open {
            self.lifecycle = Lifecycle::Closing;
            self.timers.cancel(Timer::Heartbeat);
        }
    }

    /// The next event, if any.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next datagram to send, if any is due at `now`.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.tick(now);
        let transmit = self.next_transmit();
        self.sync_timers();
        transmit
    }

    /// When [`Endpoint::handle_timeout`] (or, for rate-limited or batched data,
    /// [`Endpoint::poll_transmit`]) next has work. `None` once closed. O(log n): the first
    /// entry of the timer table, or sooner if something waits to be transmitted.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.lifecycle == Lifecycle::Closed {
            return None;
        }
        match (self.timers.next(), self.transmit_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs every timer of the table due at `now`, in this order: heartbeat, liveness,
    /// probation, goodbyes, NAKs, repair hold-off, window age; then trims the send window by
    /// stability.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.tick(now);
        if self.lifecycle == Lifecycle::Closed {
            return;
        }
        let now = self.now;
        if self.timers.take_if_due(Timer::Heartbeat, now) {
            self.queue_heartbeat();
            // While senders are on probation, heartbeat twice as often: they (typically
            // starting nodes, which hold us on probation too) then see our second heartbeat
            // half an interval after the first, and joins take half an interval, not two.
            let period = if self.candidates.len() > 0 {
                self.cfg.heartbeat_interval / 2
            } else {
                self.cfg.heartbeat_interval
            };
            self.last_heartbeat = now;
            self.timers.set(Timer::Heartbeat, Some(now + period));
            self.forget(now);
        }
        self.check_liveness(now);
        if self.timers.take_if_due(Timer::Probation, now) {
            self.expire_candidates(now);
        }
        for node in self.timers.take_due(now, Timer::Leaving) {
            self.remove_peer(node, LeaveReason::Goodbye);
        }
        self.fire_naks(now);
        if self.timers.take_if_due(Timer::RepairHoldoff, now) {
            self.window.release_repairs();
        }
        if self.timers.take_if_due(Timer::WindowAge, now) {
            self.stats.window_trimmed_age += self.window.trim_age(now, self.cfg.window_max_age);
        }
        self.trim_stable();
        self.sync_timers();
    }

    /// Refreshes the endpoint-wide timers derived from the send window and the probation
    /// table (called at the end of every input; per-peer timers are set where they change).
    fn sync_timers(&mut self) {
        self.timers
            .set(Timer::RepairHoldoff, self.window.repair_deadline);
        self.timers.set(
            Timer::WindowAge,
            self.window.age_deadline(self.cfg.window_max_age),
        );
        let probation = self
            .candidates
            .oldest()
            .map(|(_, first)| first + self.cfg.suspect_after);
        self.timers.set(Timer::Probation, probation);
    }

    /// One datagram arrived from `from`. Invalid datagrams are dropped and counted in
    /// [`Stats`]; nothing a peer sends can make this panic.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.tick(now);
        self.receive(from, datagram);
        self.sync_timers();
    }

    fn receive(&mut self, from: SocketAddr, datagram: &[u8]) {
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += datagram.len() as u64;
        if self.lifecycle == Lifecycle::Closed {
            self.stats.after_close += 1;
            return;
        }
        let header = match wire::check(datagram, self.cfg.max_datagram_size, self.cfg.cluster) {
            Ok(h) => h,
            Err(reason) => return self.drop_datagram(reason),
        };
        // Authenticate (and decrypt) before anything else looks at the sender or the body.
        let body: Bytes = match (&self.ciphers, header.key_id) {
            (None, 0) => {
                let body_len = datagram.len() - wire::OVERHEAD;
                Bytes::copy_from_slice(&datagram[wire::HEADER_LEN..wire::HEADER_LEN + body_len])
            }
            (Some(ciphers), key_id) if key_id != 0 => {
                if header.node == self.cfg.node && header.incarnation == self.cfg.incarnation {
                    // Our own multicast looped back: not worth decrypting.
                    self.stats.own_datagrams += 1;
                    self.own_addr = Some(from);
                    return;
                }
                match ciphers.open(datagram, key_id, header.counter) {
                    Ok(body) => body,
                    Err(reason) => return self.refuse(reason, from, key_id),
                }
            }
            (_, key_id) => return self.refuse(DropReason::Unauthenticated, from, key_id),
        };
        if header.node == self.cfg.node {
            if header.incarnation == self.cfg.incarnation {
                self.stats.own_datagrams += 1;
                self.own_addr = Some(from);
            } else {
                self.stats.node_id_conflict += 1;
            }
            return;
        }
        if self.ciphers.is_some() && !self.check_replay(&header) {
            return;
        }
        let body_len = body.len();
        let frame = match wire::decode_body(body) {
            Ok(frame) => frame,
            Err(reason) => return self.drop_datagram(reason),
        };
        let Some(kind) = frame.kind else {
            return self.drop_datagram(DropReason::UnknownFrame);
        };
        if let Kind::Goodbye(_) = kind
            && self
                .peers
                .get(&header.node)
                .is_none_or(|p| p.incarnation != header.incarnation)
        {
            // A goodbye from a node never heard of, already gone, or still on probation
            // (forgotten here): nothing to settle.
            self.stats.goodbyes_received += 1;
            if self
                .candidates
                .get(&header.node)
                .is_some_and(|c| c.incarnation == header.incarnation)
            {
                self.drop_candidate(header.node);
            }
            return;
        }
        self.shared = body_len;
        let class = match kind {
            Kind::Heartbeat(_) => FrameClass::Heartbeat,
            _ => FrameClass::Other,
        };
        if !self.admit(header, from, datagram.len(), class) {
            return;
        }
        let node = header.node;
        let result = match kind {
            Kind::Data(data) => self.on_data(node, data),
            Kind::Fragment(frag) => self.on_fragment(node, &frag),
            Kind::Repair(repair) => self.on_repair(node, repair),
            Kind::Heartbeat(hb) => self.on_heartbeat(node, hb),
            Kind::Nak(nak) => {
                self.on_nak(node, &nak);
                Ok(())
            }
            Kind::Goodbye(bye) => {
                self.stats.goodbyes_received += 1;
                let missing = self.peers.get_mut(&node).is_some_and(|peer| {
                    peer.stream.on_highest_sent(bye.highest_sent);
                    peer.stream.has_gap()
                });
                if missing {
                    // Its last data may still be in flight (reordered behind the goodbye):
                    // wait a little for it before settling the stream.
                    let deadline = self.now + self.cfg.nak_delay_max;
                    let leaving = Timer::Leaving(node);
                    if self.timers.get(leaving).is_none() {
                        self.timers.set(leaving, Some(deadline));
                    }
                    return;
                }
                self.remove_peer(node, LeaveReason::Goodbye);
                self.trim_stable();
                return;
            }
        };
        if let Err(reason) = result {
            self.drop_datagram(reason);
        }
        self.after_receive(node);
    }

    fn drop_datagram(&mut self, reason: DropReason) {
        tracing::trace!(node = %self.cfg.node, %reason, "dropped datagram");
        self.stats.count_drop(reason);
    }
}

/// `theirs − ours` in milliseconds, saturating at the ends of `i64`.
fn clock_offset(theirs: u64, ours: u64) -> i64 {
    let diff = i128::from(theirs) - i128::from(ours);
    i64::try_from(diff).unwrap_or(if diff < 0 { i64::MIN } else { i64::MAX })
}

/// The datagram size the encoders may fill: the MTU less the sealing overhead when keyed.
fn payload_mtu(cfg: &Config) -> usize {
    if cfg.keyring.is_some() {
        cfg.mtu - SEAL_OVERHEAD
    } else {
        cfg.mtu
    }
}
