//! The endpoint: one node's protocol state machine.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::auth::{Ciphers, ReplayWindow, SEAL_OVERHEAD};
use crate::probation::{Candidate, Candidates};
use crate::proto::{self, frame::Kind};
use crate::rate::{Credit, TokenBucket};
use crate::recv::{
    Budget, NakTimer, Out, REASSEMBLY_OVERHEAD, Rank, RecvStream, SENDER_OVERHEAD, keep_charge,
};
use crate::send::{SendWindow, Sent};
use crate::stats::Stats;
use crate::util::random_between;
use crate::wire::{self, DropReason, Header};
use crate::{
    Config, Destination, Event, Incarnation, Keyring, KeyringError, LeaveReason, Member,
    MemberState, NodeId, SendError, Transmit,
};

/// Least time between two log warnings about refused (unauthenticated) datagrams.
const AUTH_WARN_EVERY: Duration = Duration::from_secs(10);

/// Repair credit a new member starts with, before it has acknowledged anything of our stream
/// (a few hundred full datagrams: enough for the losses of a first burst).
pub(crate) const REPAIR_START_CREDIT: u64 = 256 << 10;

/// Repair credit a member earns per byte it sends us. Two, not quinn's three: with the start
/// credit on top, what a member that never acknowledges anything gets stays under three times
/// what it sent once it has sent more than the start credit. Real receivers earn their
/// repairs mostly by acknowledging our stream.
const MEMBER_CREDIT_PER_BYTE: u64 = 2;

/// Bytes one `PeerProgress` entry can take in a heartbeat (3 tagged varints + framing).
const PROGRESS_ENTRY_MAX: usize = 36;

#[derive(Debug)]
struct Peer {
    incarnation: Incarnation,
    addr: SocketAddr,
    state: MemberState,
    last_heard: Instant,
    /// What this peer has delivered of our current stream (from its heartbeats, or our
    /// highest sent when we first heard of it: it starts from what it sees next).
    acked: u64,
    /// Its wall clock minus ours, from its latest heartbeat that carried wall time.
    clock_offset_ms: Option<i64>,
    stream: RecvStream,
}

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
    /// Members that said goodbye while data of theirs was still missing: removed when it
    /// arrives or at the deadline (a goodbye can overtake the last data datagram).
    leaving: HashMap<NodeId, Instant>,
    /// Senders on probation (not members yet).
    candidates: Candidates,
    /// Whether the datagram being handled comes from a candidate (rather than a member).
    from_candidate: bool,
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
    next_heartbeat: Instant,
    /// When the last periodic heartbeat went out.
    last_heartbeat: Instant,
    heartbeat_rotation: usize,
    last_beyond_reply: Option<Instant>,
    /// Delivered since the last heartbeat (messages, bytes): triggers early heartbeats so that
    /// senders learn stability before their window fills.
    delivered_since_heartbeat: (u64, u64),
    blocked: bool,
    closing: bool,
    closed: bool,
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
}

impl Endpoint {
    /// Creates an endpoint. Contradictory configuration values are repaired as documented on
    /// [`Config`]. The first heartbeat is due at `now`, announcing the node at once.
    pub fn new(config: Config, now: Instant) -> Endpoint {
        let cfg = config.sanitized();
        let header = Header::new(cfg.cluster, cfg.node, cfg.incarnation);
        let ciphers = cfg.keyring.as_ref().map(Ciphers::new);
        let payload_mtu = payload_mtu(&cfg);
        Endpoint {
            ciphers,
            next_counter: 1,
            replay: HashMap::new(),
            last_auth_warning: [None; 3],
            rng: ChaCha8Rng::seed_from_u64(cfg.rng_seed),
            stats: Stats::default(),
            events: VecDeque::new(),
            control: VecDeque::new(),
            window: SendWindow::new(header, payload_mtu),
            bucket: TokenBucket::new(cfg.rate_bytes_per_sec, cfg.rate_burst_bytes, now),
            peers: HashMap::new(),
            departed: HashMap::new(),
            leaving: HashMap::new(),
            candidates: Candidates::default(),
            from_candidate: false,
            shared: 0,
            holders: BTreeMap::new(),
            next_order: 0,
            repair_credit: HashMap::new(),
            budget: Budget::new(cfg.receive_budget_bytes),
            now,
            next_heartbeat: now,
            last_heartbeat: now,
            heartbeat_rotation: 0,
            last_beyond_reply: None,
            delivered_since_heartbeat: (0, 0),
            blocked: false,
            closing: false,
            closed: false,
            header,
            cfg,
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.cfg.node
    }

    /// This node's incarnation.
    pub fn incarnation(&self) -> Incarnation {
        self.cfg.incarnation
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

    /// The known peers (never this endpoint itself), sorted by node id.
    pub fn members(&self) -> Vec<Member> {
        let mut members: Vec<Member> = self
            .peers
            .iter()
            .map(|(node, p)| Member {
                node: *node,
                incarnation: p.incarnation,
                addr: p.addr,
                state: p.state,
                delivered_up_to: p.stream.delivered_up_to(),
                clock_offset_ms: p.clock_offset_ms,
            })
            .collect();
        members.sort_by_key(|m| m.node);
        members
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

    /// Departed members and replay windows remembered (for tests of their bounds).
    #[cfg(test)]
    pub(crate) fn remembered(&self) -> (usize, usize) {
        (self.departed.len(), self.replay.len())
    }

    /// Whether the send window has room for another message.
    pub fn is_writable(&self) -> bool {
        !self.closing
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
        if self.closing {
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
            self.blocked = true;
            self.stats.window_full += 1;
            return Err(SendError::WindowFull);
        }
        self.stats.messages_sent += 1;
        Ok(self.window.push(payload, self.now))
    }

    /// Graceful shutdown: queued data is flushed (ignoring the batch delay), then a goodbye is
    /// multicast; afterwards `send` returns [`SendError::Closed`] and the endpoint is inert.
    pub fn close(&mut self, now: Instant) {
        self.tick(now);
        self.closing = true;
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
        if self.closed {
            return None;
        }
        if let Some(t) = self.control.pop_front() {
            return self.emit(t);
        }
        let now = self.now;
        let data_due = self
            .window
            .data_due(now, self.cfg.batch_delay, self.closing);
        if self.window.has_repairs() || data_due {
            if !self.bucket.ready(now) {
                self.stats.rate_limited += 1;
                return None;
            }
            if let Some(datagram) = self.window.build_repair(now) {
                self.stats.repairs_sent += 1;
                self.bucket.consume(datagram.len());
                return self.emit(Transmit {
                    destination: Destination::Group,
                    payload: datagram,
                });
            }
            if data_due && let Some((datagram, sent)) = self.window.build_data(now) {
                self.stats.data_datagrams_sent += 1;
                match sent {
                    Sent::Batch { messages } if messages > 1 => self.stats.batches_sent += 1,
                    Sent::Batch { .. } => {}
                    Sent::Fragment => self.stats.fragments_sent += 1,
                }
                self.bucket.consume(datagram.len());
                return self.emit(Transmit {
                    destination: Destination::Group,
                    payload: datagram,
                });
            }
        }
        if self.closing && self.window.highest_sent() + 1 == self.window.next_seq() {
            self.closed = true;
            self.window.clear_repairs();
            self.stats.goodbyes_sent += 1;
            let frame = Kind::Goodbye(proto::Goodbye {
                highest_sent: self.window.highest_sent(),
            });
            let payload = wire::encode(&self.header, &proto::Frame { kind: Some(frame) });
            return self.emit(Transmit {
                destination: Destination::Group,
                payload,
            });
        }
        None
    }

    /// Every datagram leaves through here: sealed when keyed, then counted.
    fn emit(&mut self, mut t: Transmit) -> Option<Transmit> {
        if let Some(ciphers) = &self.ciphers {
            let sealed = match self.next_counter.checked_add(1) {
                Some(next) => ciphers
                    .seal(&t.payload, self.next_counter)
                    .map(|d| (d, next)),
                None => None,
            };
            let Some((payload, next)) = sealed else {
                self.stats.seal_failed += 1;
                return None;
            };
            self.next_counter = next;
            t.payload = payload;
        }
        self.stats.datagrams_sent += 1;
        self.stats.bytes_sent += t.payload.len() as u64;
        Some(t)
    }

    /// When [`Endpoint::handle_timeout`] (or, for rate-limited or batched data,
    /// [`Endpoint::poll_transmit`]) next has work. `None` once closed.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        let mut earliest = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                earliest = Some(earliest.map_or(t, |e: Instant| e.min(t)));
            }
        };
        if !self.control.is_empty() {
            consider(Some(self.now));
        }
        if self.closing {
            // Flushing for the goodbye: due as soon as the rate allows.
            consider(Some(self.bucket.ready_at().unwrap_or(self.now)));
        } else {
            consider(Some(self.next_heartbeat));
        }
        let data = self
            .window
            .data_deadline(self.cfg.batch_delay, self.closing);
        let paced = if self.window.has_repairs() {
            Some(self.now)
        } else {
            data
        };
        if let Some(at) = paced {
            consider(Some(self.bucket.ready_at().map_or(at, |r| r.max(at))));
        }
        consider(self.window.repair_deadline);
        consider(self.window.age_deadline(self.cfg.window_max_age));
        for peer in self.peers.values() {
            let silence = match peer.state {
                MemberState::Alive => self.cfg.suspect_after,
                MemberState::Suspected => self.cfg.leave_after,
            };
            consider(Some(peer.last_heard + silence));
            consider(peer.stream.nak.map(|n| n.at));
        }
        consider(
            self.candidates
                .oldest()
                .map(|(_, first)| first + self.cfg.suspect_after),
        );
        consider(self.leaving.values().min().copied());
        earliest
    }

    /// Runs every timer due at `now`: heartbeats, NAKs, repair hold-offs, liveness, window age.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.tick(now);
        if self.closed {
            return;
        }
        let now = self.now;
        if now >= self.next_heartbeat && !self.closing {
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
            self.next_heartbeat = now + period;
            self.forget(now);
        }
        self.check_liveness(now);
        self.expire_candidates(now);
        let mut gone: Vec<NodeId> = self
            .leaving
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(n, _)| *n)
            .collect();
        gone.sort_unstable();
        for node in gone {
            self.remove_peer(node, LeaveReason::Goodbye);
        }
        self.fire_naks(now);
        if self.window.repair_deadline.is_some_and(|t| t <= now) {
            self.window.release_repairs();
        }
        self.stats.window_trimmed_age += self.window.trim_age(now, self.cfg.window_max_age);
        self.trim_stable();
    }

    fn check_liveness(&mut self, now: Instant) {
        let mut gone = Vec::new();
        for (node, peer) in &mut self.peers {
            let silent = now.saturating_duration_since(peer.last_heard);
            if silent >= self.cfg.leave_after {
                gone.push(*node);
            } else if silent >= self.cfg.suspect_after && peer.state == MemberState::Alive {
                peer.state = MemberState::Suspected;
                self.stats.members_suspected += 1;
                self.events.push_back(Event::MemberSuspected {
                    node: *node,
                    incarnation: peer.incarnation,
                });
            }
        }
        gone.sort_unstable();
        for node in gone {
            self.remove_peer(node, LeaveReason::Timeout);
        }
    }

    fn remove_peer(&mut self, node: NodeId, reason: LeaveReason) {
        self.leaving.remove(&node);
        let Some(mut peer) = self.peers.remove(&node) else {
            return;
        };
        self.end_stream(&mut peer.stream, StreamEnd::Settle);
        self.repair_credit.remove(&node);
        tracing::debug!(node = %self.cfg.node, peer = %node, ?reason, "member left");
        self.stats.members_left += 1;
        self.events.push_back(Event::MemberLeft {
            node,
            incarnation: peer.incarnation,
            reason,
        });
        let resume = peer.stream.started().then_some(peer.stream.next_expected);
        if self.departed.len() >= self.cfg.max_members.get()
            && !self.departed.contains_key(&node)
            && let Some(oldest) = self
                .departed
                .iter()
                .min_by_key(|(n, d)| (d.left_at, **n))
                .map(|(n, _)| *n)
        {
            self.departed.remove(&oldest);
            self.stats.departed_forgotten += 1;
        }
        self.departed.insert(
            node,
            Departed {
                incarnation: peer.incarnation,
                reason,
                resume,
                left_at: self.now,
            },
        );
    }

    /// Forgets departed members and replay windows older than `forget_after` (called once
    /// per heartbeat interval).
    fn forget(&mut self, now: Instant) {
        let keep = self.cfg.forget_after;
        let before = self.departed.len();
        self.departed.retain(|_, d| now < d.left_at + keep);
        self.stats.departed_forgotten += (before - self.departed.len()) as u64;
        let before = self.replay.len();
        let (peers, candidates) = (&self.peers, &self.candidates);
        self.replay.retain(|node, r| {
            now < r.last_heard + keep || peers.contains_key(node) || candidates.get(node).is_some()
        });
        self.stats.replay_forgotten += (before - self.replay.len()) as u64;
    }

    /// Most replay windows remembered: members, candidates and departed members.
    fn replay_capacity(&self) -> usize {
        2 * self.cfg.max_members.get() + self.cfg.max_candidates.get()
    }

    /// Drops candidates that did not pass probation within `suspect_after` of their first
    /// datagram.
    fn expire_candidates(&mut self, now: Instant) {
        while let Some((node, first)) = self.candidates.oldest() {
            if now < first + self.cfg.suspect_after {
                break;
            }
            self.drop_candidate(node);
            self.stats.candidates_expired += 1;
        }
    }

    /// Forgets a candidate and everything its stream holds.
    fn drop_candidate(&mut self, node: NodeId) {
        let Some(mut candidate) = self.candidates.remove(&node) else {
            return;
        };
        self.end_stream(&mut candidate.stream, StreamEnd::Discard);
    }

    /// Ends a stream already taken out of the member or candidate table: settles it
    /// (delivers or reports lost what is known) or discards what it holds, and releases its
    /// share of the receive budget.
    fn end_stream(&mut self, stream: &mut RecvStream, end: StreamEnd) {
        let mut out = Out {
            events: &mut self.events,
            stats: &mut self.stats,
            budget: &mut self.budget,
            delivered: (0, 0),
            shared: 0,
        };
        match end {
            StreamEnd::Settle => stream.finish(&mut out),
            StreamEnd::Discard => stream.discard(&mut out),
        }
        self.budget.release(SENDER_OVERHEAD);
        self.holders.remove(&stream.rank);
    }

    fn next_rank(&mut self, candidate: bool) -> Rank {
        self.next_order += 1;
        Rank {
            candidate,
            order: self.next_order,
        }
    }

    /// Makes room for `need` more bytes for a stream of rank `rank`, at sequence number
    /// `seq` of its own (`None`: new state, no data yet). Held data gives way from the least
    /// established stream down: every stream of a higher rank loses what it holds above its
    /// delivery point (a candidate: everything), then the stream's own data farther than
    /// `seq`; a member's next message in line (`head`) may also push out any member's data
    /// held ahead of its delivery point. Nothing else is ever evicted, and nothing is
    /// evicted if `need` already fits.
    fn make_room(&mut self, rank: Rank, seq: Option<u64>, head: bool, need: usize) {
        let mut cursor: Option<Rank> = None;
        while !self.budget.fits(need) {
            let next = match cursor {
                None => self.holders.last_key_value(),
                Some(c) => self.holders.range(..c).next_back(),
            };
            let Some((&victim, &node)) = next else {
                break;
            };
            cursor = Some(victim);
            if victim < rank && !head {
                break;
            }
            let stream = if victim.candidate {
                self.candidates.get_mut(&node).map(|c| &mut c.stream)
            } else {
                self.peers.get_mut(&node).map(|p| &mut p.stream)
            };
            let Some(stream) = stream else {
                self.holders.remove(&victim);
                continue;
            };
            let above = if victim == rank {
                match seq {
                    Some(seq) => seq,
                    None => continue,
                }
            } else if stream.holding() {
                0
            } else {
                stream.next_expected
            };
            let mut out = Out {
                events: &mut self.events,
                stats: &mut self.stats,
                budget: &mut self.budget,
                delivered: (0, 0),
                shared: 0,
            };
            stream.evict_above(above, need, &mut out);
            if stream.held_bytes() == 0 {
                self.holders.remove(&victim);
            }
        }
    }

    fn fire_naks(&mut self, now: Instant) {
        let mut nodes: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(n, p)| {
                p.stream.nak.is_some_and(|t| t.at <= now) && !self.leaving.contains_key(n)
            })
            .map(|(n, _)| *n)
            .collect();
        nodes.sort_unstable();
        // Room for ranges in one NAK: the datagram less the header and the NAK's other fields.
        let budget = payload_mtu(&self.cfg).saturating_sub(wire::OVERHEAD + 48);
        for node in nodes {
            let Some(peer) = self.peers.get_mut(&node) else {
                continue;
            };
            // Before the retry of the last NAK is due, ask only for gaps found since (new
            // losses are not held back by the retry backoff; repairs in flight are not asked
            // for twice).
            let retry_at = peer.stream.retry_at.filter(|r| now < *r);
            let from = retry_at.map_or(0, |_| peer.stream.naked_upto.saturating_add(1));
            let missing = peer.stream.missing(from, budget);
            let Some(timer) = peer.stream.nak else {
                continue;
            };
            if let Some(retry) = retry_at {
                if !missing.is_empty() {
                    peer.stream.naked_upto = peer.stream.naked_upto.max(missing.upto);
                }
                peer.stream.nak = Some(NakTimer {
                    at: retry,
                    attempts: timer.attempts,
                });
                if missing.is_empty() {
                    continue;
                }
            } else if missing.is_empty() {
                // Only a message still being transmitted is incomplete: look again later.
                peer.stream.nak = if peer.stream.has_gap() {
                    let at = now
                        + random_between(
                            &mut self.rng,
                            self.cfg.nak_delay_min,
                            self.cfg.nak_delay_max,
                        );
                    Some(NakTimer {
                        at,
                        attempts: timer.attempts,
                    })
                } else {
                    None
                };
                continue;
            }
            let attempts = if retry_at.is_some() {
                timer.attempts
            } else {
                let attempts = if std::mem::take(&mut peer.stream.filled) {
                    1
                } else {
                    timer.attempts + 1
                };
                let at = now + retry_delay(&self.cfg, &mut self.rng, attempts);
                peer.stream.nak = Some(NakTimer { at, attempts });
                peer.stream.retry_at = Some(at);
                peer.stream.naked_upto = peer.stream.naked_upto.max(missing.upto);
                attempts
            };
            if peer.stream.has_new_gap() {
                // The NAK was full: ask for the rest soon rather than at the retry.
                let soon = now + self.cfg.nak_delay_min;
                if let Some(t) = &mut peer.stream.nak {
                    t.at = t.at.min(soon);
                }
            }
            let nak = proto::Nak {
                target_node: node.0,
                target_incarnation: peer.incarnation.0,
                ranges: missing.ranges,
                partial: missing.partial,
                sender_highest_sent: self.window.highest_sent(),
            };
            tracing::trace!(node = %self.cfg.node, target = %node, attempts, "NAK");
            self.stats.naks_sent += 1;
            let payload = wire::encode(
                &self.header,
                &proto::Frame {
                    kind: Some(Kind::Nak(nak)),
                },
            );
            self.control.push_back(Transmit {
                destination: Destination::Group,
                payload,
            });
        }
    }

    fn queue_heartbeat(&mut self) {
        let room = payload_mtu(&self.cfg).saturating_sub(wire::OVERHEAD + 40) / PROGRESS_ENTRY_MAX;
        let mut streams: Vec<(&NodeId, &Peer)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.stream.started())
            .collect();
        streams.sort_unstable_by_key(|(n, _)| **n);
        let take = streams.len().min(room.max(1));
        let skip = if streams.is_empty() {
            0
        } else {
            self.heartbeat_rotation % streams.len()
        };
        let delivered = streams
            .iter()
            .cycle()
            .skip(skip)
            .take(take)
            .map(|(node, p)| proto::PeerProgress {
                node: node.0,
                incarnation: p.incarnation.0,
                delivered_up_to: p.stream.delivered_up_to(),
            })
            .collect();
        self.heartbeat_rotation = self.heartbeat_rotation.wrapping_add(take);
        let hb = proto::Heartbeat {
            highest_sent: self.window.highest_sent(),
            low_retained: self.window.low(),
            delivered,
            wall_ms: self.cfg.wall_clock.map_or(0, |w| w.wall_ms(self.now)),
        };
        self.stats.heartbeats_sent += 1;
        self.delivered_since_heartbeat = (0, 0);
        let payload = wire::encode(
            &self.header,
            &proto::Frame {
                kind: Some(Kind::Heartbeat(hb)),
            },
        );
        self.control.push_back(Transmit {
            destination: Destination::Group,
            payload,
        });
    }

    /// Releases messages every live member (alive or merely suspected) has delivered; emits
    /// `Writable` if room appeared. A member that stays silent is bounded by
    /// `window_max_age` and, eventually, by its removal after `leave_after`.
    fn trim_stable(&mut self) {
        let stable = self
            .peers
            .values()
            .map(|p| p.acked)
            .min()
            .unwrap_or(u64::MAX)
            .min(self.window.highest_sent());
        self.stats.window_trimmed_stable += self.window.trim_stable(stable);
        if self.blocked && self.is_writable() {
            self.blocked = false;
            self.events.push_back(Event::Writable);
        }
    }

    /// One datagram arrived from `from`. Invalid datagrams are dropped and counted in
    /// [`Stats`]; nothing a peer sends can make this panic.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.tick(now);
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += datagram.len() as u64;
        if self.closed {
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
        let heartbeat = matches!(kind, Kind::Heartbeat(_));
        if !self.admit(header, from, datagram.len(), heartbeat) {
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
                    self.leaving.entry(node).or_insert(deadline);
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

    /// Replay protection of an authenticated datagram: refuses (and counts) a counter already
    /// seen from this (sender, incarnation), at or below the first one heard from it, or below
    /// its window, and any datagram of an incarnation older than the newest authenticated one;
    /// otherwise records the counter.
    fn check_replay(&mut self, header: &Header) -> bool {
        let now = self.now;
        let first = Replay {
            incarnation: header.incarnation,
            window: ReplayWindow::starting_at(header.counter),
            last_heard: now,
        };
        if !self.replay.contains_key(&header.node) && self.replay.len() >= self.replay_capacity() {
            // Full: forget the sender heard from least recently that is neither a member nor
            // a candidate (one always exists: the capacity exceeds both tables together).
            let (peers, candidates) = (&self.peers, &self.candidates);
            let oldest = self
                .replay
                .iter()
                .filter(|(n, _)| !peers.contains_key(n) && candidates.get(n).is_none())
                .min_by_key(|(n, r)| (r.last_heard, **n))
                .map(|(n, _)| *n);
            if let Some(oldest) = oldest {
                self.replay.remove(&oldest);
                self.stats.replay_forgotten += 1;
            }
        }
        let entry = match self.replay.entry(header.node) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(first);
                return true;
            }
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        };
        if header.incarnation < entry.incarnation {
            self.stats.stale_incarnation += 1;
            return false;
        }
        if header.incarnation > entry.incarnation {
            *entry = first;
            return true;
        }
        if entry.window.is_fresh(header.counter) {
            entry.window.accept(header.counter);
            entry.last_heard = now;
            return true;
        }
        self.drop_datagram(DropReason::Replayed);
        false
    }

    /// Drops a datagram that failed authentication, and says why in the log (each kind of
    /// refusal at most once per [`AUTH_WARN_EVERY`]: a flood must not flood the log too).
    fn refuse(&mut self, reason: DropReason, from: SocketAddr, key_id: u16) {
        self.drop_datagram(reason);
        let kind = match reason {
            DropReason::UnknownKey => 0,
            DropReason::AuthFailed => 1,
            _ => 2,
        };
        if self.last_auth_warning[kind].is_some_and(|t| self.now < t + AUTH_WARN_EVERY) {
            return;
        }
        self.last_auth_warning[kind] = Some(self.now);
        let why = match (reason, self.cfg.keyring.as_ref()) {
            (DropReason::UnknownKey, _) => {
                "it is sealed with a key id this node does not have (another cluster key?)"
            }
            (DropReason::AuthFailed, _) => {
                "its authentication tag does not verify: the sender has a different key under \
                 the same key id, or the datagram was forged or altered"
            }
            (_, Some(_)) => "it is not sealed, but this node requires a cluster key",
            (_, None) => "it is sealed with a cluster key, but this node has none",
        };
        tracing::warn!(
            node = %self.cfg.node,
            %from,
            key_id,
            %reason,
            "refused a datagram: {why} (further refusals are only counted for {AUTH_WARN_EVERY:?})"
        );
    }

    fn drop_datagram(&mut self, reason: DropReason) {
        tracing::trace!(node = %self.cfg.node, %reason, "dropped datagram");
        self.stats.count_drop(reason);
    }

    /// Membership bookkeeping for a valid datagram of `len` bytes (a heartbeat or not).
    /// Returns `false` if it must be ignored; otherwise `from_candidate` says whose stream it
    /// feeds.
    fn admit(&mut self, header: Header, from: SocketAddr, len: usize, heartbeat: bool) -> bool {
        let (node, incarnation) = (header.node, header.incarnation);
        self.from_candidate = false;
        let mut resume = None;
        let mut rejoin = false;
        if let Some(gone) = self.departed.get(&node) {
            let stale = match gone.reason {
                LeaveReason::Goodbye => incarnation <= gone.incarnation,
                LeaveReason::Timeout => incarnation < gone.incarnation,
            };
            if stale {
                self.stats.stale_incarnation += 1;
                return false;
            }
            if incarnation == gone.incarnation {
                resume = gone.resume;
                rejoin = true;
            }
        }
        let now = self.now;
        match self.peers.get_mut(&node) {
            Some(peer) if peer.incarnation == incarnation => {
                peer.last_heard = now;
                peer.addr = from;
                let cap = self.cfg.repair_bytes_per_member.get() as u64;
                self.repair_credit
                    .entry(node)
                    .or_insert_with(|| Credit::new(REPAIR_START_CREDIT, cap))
                    .earn(MEMBER_CREDIT_PER_BYTE * len as u64, cap);
                if peer.state == MemberState::Suspected {
                    peer.state = MemberState::Alive;
                    self.events
                        .push_back(Event::MemberAlive { node, incarnation });
                }
                return true;
            }
            Some(peer) if peer.incarnation > incarnation => {
                self.stats.stale_incarnation += 1;
                return false;
            }
            // A newer incarnation of a member: a restart, which goes through probation.
            Some(_) => {}
            // Back from a timeout (e.g. a healed partition), same incarnation: it proved
            // itself before, so it rejoins at once.
            None if rejoin => return self.rejoin(node, incarnation, from, resume),
            None => {}
        }
        self.on_probation(node, incarnation, from, len, heartbeat)
    }

    /// A datagram of a (node, incarnation) that is not a member. Returns whether to handle it
    /// (with `from_candidate` set when it feeds a candidate's stream). The sender becomes a
    /// member with a heartbeat at least half a heartbeat interval after its first one.
    fn on_probation(
        &mut self,
        node: NodeId,
        incarnation: Incarnation,
        from: SocketAddr,
        len: usize,
        heartbeat: bool,
    ) -> bool {
        let now = self.now;
        let proof = self.cfg.heartbeat_interval / 2;
        match self.candidates.get_mut(&node) {
            Some(c) if c.incarnation == incarnation => {
                c.addr = from;
                c.received += len as u64;
                if heartbeat {
                    match c.first_heartbeat {
                        Some(first) if now >= first + proof => return self.promote(node),
                        Some(_) => {}
                        None => c.first_heartbeat = Some(now),
                    }
                }
                self.from_candidate = true;
                return true;
            }
            Some(c) if c.incarnation > incarnation => {
                self.stats.stale_incarnation += 1;
                return false;
            }
            // A newer incarnation replaces it.
            Some(_) => self.drop_candidate(node),
            None => {}
        }
        let restart = self.peers.contains_key(&node);
        if !restart && self.peers.len() >= self.cfg.max_members.get() {
            self.stats.members_full += 1;
            return false;
        }
        if self.candidates.len() >= self.cfg.max_candidates.get()
            && let Some((oldest, _)) = self.candidates.oldest()
        {
            self.drop_candidate(oldest);
            self.stats.candidates_evicted += 1;
        }
        // Newcomers never take room from anyone but older candidates (whose slots turn over
        // like the table's).
        while !self.budget.fits(SENDER_OVERHEAD) {
            let Some((oldest, _)) = self.candidates.oldest() else {
                break;
            };
            self.drop_candidate(oldest);
            self.stats.candidates_evicted += 1;
        }
        if !self.budget.try_charge(SENDER_OVERHEAD) {
            self.stats.senders_over_budget += 1;
            return false;
        }
        let half = self.cfg.heartbeat_interval / 2;
        self.next_heartbeat = self.next_heartbeat.min(self.last_heartbeat + half);
        let rank = self.next_rank(true);
        self.candidates.insert(
            node,
            Candidate {
                incarnation,
                addr: from,
                first_heard: now,
                first_heartbeat: heartbeat.then_some(now),
                stream: RecvStream::held(node, incarnation, rank),
                received: len as u64,
                answered: 0,
                acked: self.window.highest_sent(),
            },
        );
        self.from_candidate = true;
        true
    }

    /// A candidate passed probation: it becomes a member (or replaces its node's older
    /// incarnation), and what its stream held is delivered. Returns `false` (dropping it) if
    /// the member table filled up meanwhile.
    fn promote(&mut self, node: NodeId) -> bool {
        let Some(mut candidate) = self.candidates.remove(&node) else {
            return false;
        };
        self.holders.remove(&candidate.stream.rank);
        let restart = self.peers.get(&node).map(|p| p.incarnation);
        if restart.is_none() && self.peers.len() >= self.cfg.max_members.get() {
            let mut out = Out {
                events: &mut self.events,
                stats: &mut self.stats,
                budget: &mut self.budget,
                delivered: (0, 0),
                shared: 0,
            };
            candidate.stream.discard(&mut out);
            self.budget.release(SENDER_OVERHEAD);
            self.stats.members_full += 1;
            return false;
        }
        let (now, acked) = (self.now, candidate.acked);
        let incarnation = candidate.incarnation;
        let addr = candidate.addr;
        let mut peer = Peer::new(node, incarnation, addr, now, acked);
        candidate.stream.rank = self.next_rank(false);
        peer.stream = candidate.stream;
        match restart {
            Some(old) => {
                if let Some(mut previous) = self.peers.insert(node, peer) {
                    self.end_stream(&mut previous.stream, StreamEnd::Settle);
                }
                self.repair_credit.remove(&node);
                tracing::debug!(node = %self.cfg.node, peer = %node, %old, new = %incarnation, "member restarted");
                self.stats.members_restarted += 1;
                self.events.push_back(Event::MemberRestarted {
                    node,
                    old,
                    new: incarnation,
                    addr,
                });
            }
            None => {
                self.departed.remove(&node);
                self.peers.insert(node, peer);
                tracing::debug!(node = %self.cfg.node, peer = %node, %incarnation, "member joined");
                self.stats.members_joined += 1;
                self.events.push_back(Event::MemberJoined {
                    node,
                    incarnation,
                    addr,
                });
            }
        }
        self.with_stream(node, |stream, out| stream.release(out));
        true
    }

    /// A member that timed out is heard again with the same incarnation: it joins again at
    /// once, its stream resuming where it stood (`resume`).
    fn rejoin(
        &mut self,
        node: NodeId,
        incarnation: Incarnation,
        from: SocketAddr,
        resume: Option<u64>,
    ) -> bool {
        if self.peers.len() >= self.cfg.max_members.get() {
            self.stats.members_full += 1;
            return false;
        }
        let rank = self.next_rank(false);
        self.make_room(rank, None, false, SENDER_OVERHEAD);
        if !self.budget.try_charge(SENDER_OVERHEAD) {
            self.stats.senders_over_budget += 1;
            return false;
        }
        self.departed.remove(&node);
        let mut peer = Peer::new(
            node,
            incarnation,
            from,
            self.now,
            self.window.highest_sent(),
        );
        peer.stream.rank = rank;
        if let Some(next) = resume {
            // Continue where the stream stood, so that what was sent meanwhile is repaired or
            // reported lost.
            peer.stream.start_at(next);
        }
        self.peers.insert(node, peer);
        tracing::debug!(node = %self.cfg.node, peer = %node, %incarnation, "member joined");
        self.stats.members_joined += 1;
        self.events.push_back(Event::MemberJoined {
            node,
            incarnation,
            addr: from,
        });
        true
    }

    /// Runs `f` on the stream the datagram being handled feeds (a member's, or a
    /// candidate's when `from_candidate`), keeping the holders index up to date.
    fn with_stream<T>(
        &mut self,
        node: NodeId,
        f: impl FnOnce(&mut RecvStream, &mut Out<'_>) -> T,
    ) -> Option<T> {
        let stream = if self.from_candidate {
            &mut self.candidates.get_mut(&node)?.stream
        } else {
            &mut self.peers.get_mut(&node)?.stream
        };
        let mut out = Out {
            events: &mut self.events,
            stats: &mut self.stats,
            budget: &mut self.budget,
            delivered: (0, 0),
            shared: self.shared,
        };
        let result = f(stream, &mut out);
        let (messages, bytes) = out.delivered;
        self.delivered_since_heartbeat.0 += messages;
        self.delivered_since_heartbeat.1 += bytes;
        if stream.held_bytes() > 0 {
            self.holders.insert(stream.rank, node);
        } else {
            self.holders.remove(&stream.rank);
        }
        Some(result)
    }

    /// The stream the datagram being handled feeds (see [`Endpoint::with_stream`]).
    fn current_stream(&self, node: NodeId) -> Option<&RecvStream> {
        if self.from_candidate {
            self.candidates.get(&node).map(|c| &c.stream)
        } else {
            self.peers.get(&node).map(|p| &p.stream)
        }
    }

    fn on_data(&mut self, node: NodeId, data: proto::Data) -> Result<(), DropReason> {
        let count = data.messages.len() as u64;
        if data.first_seq == 0 || count == 0 || data.first_seq.checked_add(count).is_none() {
            return Err(DropReason::Malformed);
        }
        let last = data.first_seq + (count - 1);
        let room = self.current_stream(node).and_then(|s| {
            // Messages from the delivery point on are delivered at once, not held.
            let delivered_now = !s.holding() && (!s.started() || data.first_seq <= s.next_expected);
            (!delivered_now).then_some(s.rank)
        });
        if let Some(rank) = room {
            let shared = self.shared;
            let need = data
                .messages
                .iter()
                .map(|m| keep_charge(m.len(), shared))
                .sum();
            self.make_room(rank, Some(last), false, need);
        }
        self.with_stream(node, |stream, out| {
            // first_seq + count does not overflow (checked above): neither does any seq.
            for (i, payload) in (0..count).zip(data.messages) {
                stream.on_message(data.first_seq + i, payload, out);
            }
        });
        Ok(())
    }

    fn on_fragment(&mut self, node: NodeId, frag: &proto::Fragment) -> Result<(), DropReason> {
        if frag.total_len as usize > self.cfg.max_message_size {
            return Err(DropReason::Oversized);
        }
        if let Some(s) = self.current_stream(node) {
            let head = !s.holding() && (!s.started() || s.next_expected == frag.seq);
            let need = REASSEMBLY_OVERHEAD + keep_charge(frag.chunk.len(), self.shared);
            self.make_room(s.rank, Some(frag.seq), head, need);
        }
        self.with_stream(node, |stream, out| stream.on_fragment(frag, out))
            .unwrap_or(Ok(()))
    }

    fn on_repair(&mut self, node: NodeId, repair: proto::Repair) -> Result<(), DropReason> {
        self.stats.repairs_received += 1;
        let result = match repair.payload {
            Some(proto::repair::Payload::Data(data)) => self.on_data(node, data),
            Some(proto::repair::Payload::Fragment(frag)) => self.on_fragment(node, &frag),
            None => Err(DropReason::Malformed),
        };
        if result.is_ok() {
            self.with_stream(node, |stream, out| {
                stream.advance_to(repair.low_retained, out)
            });
        }
        result
    }

    fn on_heartbeat(&mut self, node: NodeId, hb: proto::Heartbeat) -> Result<(), DropReason> {
        if hb.low_retained == 0 || hb.low_retained > hb.highest_sent.saturating_add(1) {
            return Err(DropReason::Malformed);
        }
        self.stats.heartbeats_received += 1;
        let (me, mine) = (self.cfg.node.0, self.cfg.incarnation.0);
        if let Some(peer) = self.peers.get_mut(&node) {
            if let Some(wall) = self.cfg.wall_clock.filter(|_| hb.wall_ms != 0) {
                peer.clock_offset_ms = Some(clock_offset(hb.wall_ms, wall.wall_ms(self.now)));
            }
            let before = peer.acked;
            for progress in &hb.delivered {
                if progress.node == me && progress.incarnation == mine {
                    peer.acked = peer.acked.max(progress.delivered_up_to);
                }
            }
            if peer.acked > before {
                // What it says it now holds of our stream earns it repair credit (counted
                // before the stability trim below releases those messages).
                let cap = self.cfg.repair_bytes_per_member.get() as u64;
                let earned = self.window.sent_bytes_between(before + 1, peer.acked);
                self.repair_credit
                    .entry(node)
                    .or_insert_with(|| Credit::new(REPAIR_START_CREDIT, cap))
                    .earn(earned, cap);
            }
        }
        self.with_stream(node, |stream, out| {
            stream.start_at(hb.highest_sent.saturating_add(1));
            stream.on_highest_sent(hb.highest_sent);
            stream.advance_to(hb.low_retained, out);
        });
        self.trim_stable();
        Ok(())
    }

    fn on_nak(&mut self, node: NodeId, nak: &proto::Nak) {
        let now = self.now;
        // Like a heartbeat, a NAK tells how far its sender's own stream has gone.
        self.with_stream(node, |stream, _| {
            stream.start_at(nak.sender_highest_sent.saturating_add(1));
            stream.on_highest_sent(nak.sender_highest_sent);
        });
        if nak.target_node == self.cfg.node.0 {
            if nak.target_incarnation != self.cfg.incarnation.0 {
                return;
            }
            self.stats.naks_received += 1;
            let allowance = self.repair_allowance(node);
            let answer = self
                .window
                .on_nak(nak, now, self.cfg.repair_holdoff, allowance);
            self.stats.nak_entries_ignored += answer.ignored;
            self.stats.repairs_refused += answer.refused;
            if self.from_candidate {
                if let Some(c) = self.candidates.get_mut(&node) {
                    c.answered += answer.charged;
                }
            } else if let Some(credit) = self.repair_credit.get_mut(&node) {
                credit.spend(answer.charged);
            }
            if answer.beyond {
                self.stats.naks_beyond_window += 1;
                let recent = self
                    .last_beyond_reply
                    .is_some_and(|t| now < t + self.cfg.repair_holdoff);
                if self.from_candidate {
                    // Not a member yet: its own heartbeats will tell it soon enough.
                    self.stats.repairs_refused += 1;
                } else if !recent && !self.closing {
                    self.last_beyond_reply = Some(now);
                    self.queue_heartbeat();
                }
            }
            return;
        }
        self.stats.naks_overheard += 1;
        let target = NodeId(nak.target_node);
        let Some(peer) = self.peers.get_mut(&target) else {
            return;
        };
        if target == node || peer.incarnation.0 != nak.target_incarnation {
            return;
        }
        if let Some(timer) = peer.stream.nak
            && peer.stream.covered_by(nak)
        {
            let at = now + retry_delay(&self.cfg, &mut self.rng, timer.attempts.max(1));
            peer.stream.nak = Some(NakTimer {
                at: timer.at.max(at),
                attempts: timer.attempts,
            });
            self.stats.naks_suppressed += 1;
        }
    }

    /// Repair bytes the sender of the NAK being handled may still have queued: three times
    /// what it sent us minus what it cost already for a candidate, its earned credit for a
    /// member (see [`Credit`]).
    fn repair_allowance(&mut self, node: NodeId) -> u64 {
        if self.from_candidate {
            return self.candidates.get(&node).map_or(0, Candidate::allowance);
        }
        let cap = self.cfg.repair_bytes_per_member.get() as u64;
        self.repair_credit
            .entry(node)
            .or_insert_with(|| Credit::new(REPAIR_START_CREDIT, cap))
            .available()
    }

    /// After a data-bearing datagram: arm or disarm the stream's NAK timer; send an early
    /// heartbeat if much was delivered since the last one.
    fn after_receive(&mut self, node: NodeId) {
        let now = self.now;
        let member = !self.from_candidate;
        if member
            && self.leaving.contains_key(&node)
            && self.peers.get(&node).is_none_or(|p| !p.stream.has_gap())
        {
            self.remove_peer(node, LeaveReason::Goodbye);
            self.trim_stable();
            return;
        }
        if let Some(peer) = self.peers.get_mut(&node).filter(|_| member) {
            let stream = &mut peer.stream;
            if !stream.has_gap() {
                stream.nak = None;
                stream.retry_at = None;
            } else if stream.nak.is_none() {
                let at = now
                    + random_between(
                        &mut self.rng,
                        self.cfg.nak_delay_min,
                        self.cfg.nak_delay_max,
                    );
                stream.nak = Some(NakTimer { at, attempts: 0 });
            } else if let Some(timer) = stream.nak
                && stream.has_new_gap()
                && timer.at > now + self.cfg.nak_delay_max
            {
                // A new loss while an older NAK waits for its retry: NAK it after the usual
                // short random delay, not after the backoff.
                let at = now
                    + random_between(
                        &mut self.rng,
                        self.cfg.nak_delay_min,
                        self.cfg.nak_delay_max,
                    );
                stream.nak = Some(NakTimer {
                    at,
                    attempts: timer.attempts,
                });
            }
        }
        let (messages, bytes) = self.delivered_since_heartbeat;
        let many = messages as usize >= self.cfg.window_max_messages.get() / 4
            || bytes as usize >= self.cfg.window_max_bytes.get() / 4;
        if many && !self.closing {
            self.queue_heartbeat();
        }
    }
}

/// How [`Endpoint::end_stream`] ends a stream.
#[derive(Debug, Clone, Copy)]
enum StreamEnd {
    /// A member's stream: deliver what is complete, report the rest lost.
    Settle,
    /// A candidate's stream: nothing of it was delivered, so nothing is reported.
    Discard,
}

#[derive(Debug)]
struct Departed {
    incarnation: Incarnation,
    reason: LeaveReason,
    /// Next sequence number its stream expected when it left (if the stream had started).
    resume: Option<u64>,
    left_at: Instant,
}

/// Replay protection state of one authenticated sender.
#[derive(Debug)]
struct Replay {
    /// Its newest authenticated incarnation.
    incarnation: Incarnation,
    window: ReplayWindow,
    last_heard: Instant,
}

impl Peer {
    fn new(
        node: NodeId,
        incarnation: Incarnation,
        addr: SocketAddr,
        now: Instant,
        acked: u64,
    ) -> Peer {
        Peer {
            incarnation,
            addr,
            state: MemberState::Alive,
            last_heard: now,
            acked,
            clock_offset_ms: None,
            stream: RecvStream::new(node, incarnation),
        }
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

/// Wait before NAK attempt `attempts + 1`: exponential backoff plus jitter.
fn retry_delay(cfg: &Config, rng: &mut ChaCha8Rng, attempts: u32) -> Duration {
    let shift = attempts.saturating_sub(1).min(16);
    let backoff = cfg
        .nak_retry_base
        .saturating_mul(1 << shift)
        .min(cfg.nak_retry_max);
    backoff + random_between(rng, Duration::ZERO, cfg.nak_delay_max)
}
