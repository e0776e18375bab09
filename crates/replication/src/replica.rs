//! The replica state machine: local commands, remote writes, watch log and anti-entropy.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{Limits, ReplicaConfig};
use crate::durable::{Durability, DurableError, Loaded};
use crate::error::{ClockCause, Compacted, Error};
use crate::hash::{bucket_of, entry_hash, rendezvous};
use crate::hlc::{Hlc, HlcClock, Version};
use crate::store::{Key, Store, Stored, Value, bytes_of};
use crate::wire;

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: Bytes,
    },
    /// Delete `key` (store a tombstone).
    Delete {
        /// The key.
        key: String,
    },
}

impl Op {
    /// The key this operation writes.
    #[must_use]
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
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
}

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

/// Replication counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// Local puts, deletes and batches accepted.
    pub local_writes: u64,
    /// Remote write messages applied (even if every op lost to a newer version).
    pub remote_writes: u64,
    /// Entries stored (local, remote or sync) because they won.
    pub changes_applied: u64,
    /// Incoming entries ignored because the store already held an equal or newer version.
    pub stale_ignored: u64,
    /// Messages that did not decode or were inconsistent (dropped).
    pub malformed: u64,
    /// Messages dropped because they broke a key, value or batch limit.
    pub limit_violations: u64,
    /// Write messages or sync entries dropped because their HLC was too far in the future.
    pub drift_rejected: u64,
    /// Digests with a different bucket count (dropped).
    pub bucket_mismatch: u64,
    /// Messages from this node itself (ignored).
    pub own_messages: u64,
    /// Digests sent.
    pub digests_sent: u64,
    /// Digests received.
    pub digests_received: u64,
    /// Buckets this node answered as the chosen responder.
    pub buckets_answered: u64,
    /// Summary messages sent.
    pub summaries_sent: u64,
    /// Request messages sent.
    pub requests_sent: u64,
    /// Entries messages sent.
    pub entries_messages_sent: u64,
    /// Entries sent in entries messages.
    pub entries_sent: u64,
    /// Entries received in entries messages.
    pub entries_received: u64,
    /// Tombstones collected after the grace period.
    pub tombstones_collected: u64,
    /// Incoming tombstones dropped because they were past the grace period and the key was
    /// absent.
    pub expired_tombstones_dropped: u64,
    /// Entries forgotten while recovering from a long isolation (see `tombstone_grace`).
    pub entries_forgotten: u64,
    /// Times this node came back from an isolation longer than `tombstone_grace`.
    pub recoveries: u64,
    /// Loss reports received from the protocol.
    pub losses: u64,
    /// Local writes refused because this node's clock or history was too far ahead of its
    /// peers' clocks ([`Error::ClockAhead`]).
    pub clock_refused: u64,
    /// Keys named more than once in one `Request` (answered once).
    pub request_duplicates: u64,
    /// Keys of a `Request` beyond the most one request can name (ignored).
    pub request_keys_ignored: u64,
    /// Answers that stopped at the requester's byte bound (the rest is not sent).
    pub answers_capped: u64,
    /// Answers that stopped because the sync backlog was full (anti-entropy asks again).
    pub answers_deferred: u64,
}

impl ReplicaStats {
    /// Every counter with its field name, for exporters (JSON, Prometheus).
    ///
    /// The destructuring is exhaustive, so a new field cannot be forgotten here.
    #[must_use]
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let ReplicaStats {
            local_writes,
            remote_writes,
            changes_applied,
            stale_ignored,
            malformed,
            limit_violations,
            drift_rejected,
            bucket_mismatch,
            own_messages,
            digests_sent,
            digests_received,
            buckets_answered,
            summaries_sent,
            requests_sent,
            entries_messages_sent,
            entries_sent,
            entries_received,
            tombstones_collected,
            expired_tombstones_dropped,
            entries_forgotten,
            recoveries,
            losses,
            clock_refused,
            request_duplicates,
            request_keys_ignored,
            answers_capped,
            answers_deferred,
        } = self;
        vec![
            ("local_writes", *local_writes),
            ("remote_writes", *remote_writes),
            ("changes_applied", *changes_applied),
            ("stale_ignored", *stale_ignored),
            ("malformed", *malformed),
            ("limit_violations", *limit_violations),
            ("drift_rejected", *drift_rejected),
            ("bucket_mismatch", *bucket_mismatch),
            ("own_messages", *own_messages),
            ("digests_sent", *digests_sent),
            ("digests_received", *digests_received),
            ("buckets_answered", *buckets_answered),
            ("summaries_sent", *summaries_sent),
            ("requests_sent", *requests_sent),
            ("entries_messages_sent", *entries_messages_sent),
            ("entries_sent", *entries_sent),
            ("entries_received", *entries_received),
            ("tombstones_collected", *tombstones_collected),
            ("expired_tombstones_dropped", *expired_tombstones_dropped),
            ("entries_forgotten", *entries_forgotten),
            ("recoveries", *recoveries),
            ("losses", *losses),
            ("clock_refused", *clock_refused),
            ("request_duplicates", *request_duplicates),
            ("request_keys_ignored", *request_keys_ignored),
            ("answers_capped", *answers_capped),
            ("answers_deferred", *answers_deferred),
        ]
    }
}

/// One digest bucket: the wrapping sum of its entries' hashes and its keys, sorted (the
/// keys are shared with the store; versions are read from there).
#[derive(Debug, Default)]
struct Bucket {
    sum: u64,
    keys: BTreeSet<Key>,
}

/// One change as the change log keeps it: the key shared with the store, the value shared
/// with the stored entry. Its revision is implicit: every revision is logged, in order, so
/// the log holds revisions `next_revision − len .. next_revision`.
#[derive(Debug, Clone)]
struct Logged {
    key: Key,
    value: Option<Value>,
    version: Version,
}

impl Logged {
    fn change(&self, revision: u64) -> Change {
        Change {
            revision,
            key: self.key.to_string(),
            value: self.value.as_ref().map(bytes_of),
            version: self.version,
        }
    }

    /// Key and value bytes, charged against `change_log_max_bytes`.
    fn cost(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, |v| v.len())
    }
}

/// What this node offered one requester in its summaries: the bytes of entries the
/// requester may then ask for (see `docs/replication.md`, bounded answers).
#[derive(Debug, Clone, Copy)]
struct Offer {
    bytes: usize,
    at: Instant,
}

/// A `Request` is answered with at most this many times its own size in entries, beyond
/// what this node offered the requester in its summaries (quinn's anti-amplification
/// factor).
const ANSWER_FACTOR: usize = 3;

#[derive(Debug, Default)]
struct Peer {
    live: bool,
    /// Latest digest received from the peer.
    digest: Option<Vec<u64>>,
    /// The peer's latest digest said it is fresh (never in sync yet, no stale data).
    fresh: bool,
    /// The latest digest matched ours when it arrived (with one mismatch of hysteresis).
    matched: bool,
    mismatch_streak: u32,
    /// Its wall clock minus ours (ms), as the protocol measured it from its heartbeats.
    clock_offset_ms: Option<i64>,
}

/// An entry to merge: key, value (`None` = tombstone), version.
type Item = (String, Option<Bytes>, Version);

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
    buckets: Vec<Bucket>,
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
    in_sync: bool,
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
    /// Created empty and not yet in sync: holds nothing that peers could have deleted.
    fresh: bool,
    /// Back from an isolation longer than the grace period, not yet in sync: entries older
    /// than the grace period that a peer turns out to lack are forgotten, not offered.
    recovering: bool,
    last_wall_ms: u64,
    stats: ReplicaStats,
    /// Where committed changes are persisted; `None` keeps the store in memory only.
    durability: Option<Box<dyn Durability>>,
    /// Loaded from disk after an absence longer than the grace period: enter recovery when
    /// the first peer comes up, as after a long isolation.
    absent_too_long: bool,
}

impl Replica {
    /// A replica with an empty store, created at `now`.
    #[must_use]
    pub fn new(cfg: ReplicaConfig, now: Instant) -> Replica {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.rng_seed);
        let first = jittered(&mut rng, cfg.sync_interval);
        let buckets = (0..cfg.buckets.get()).map(|_| Bucket::default()).collect();
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
            in_sync: false,
            created: now,
            round: 0,
            next_digest: now + first,
            triggered_digest: None,
            answered: HashMap::new(),
            offers: HashMap::new(),
            confirm_wanted: false,
            sync_room: usize::MAX,
            isolated_since: Some(now),
            fresh: true,
            recovering: false,
            last_wall_ms: 0,
            stats: ReplicaStats::default(),
            durability: None,
            absent_too_long: false,
            cfg,
        }
    }

    /// A replica that persists every change to `durability` and starts from `loaded`, the
    /// store as it was found on disk (see `docs/replication.md`, Durability).
    ///
    /// Loaded entries keep their versions, tombstones included (so a deleted key does not
    /// come back), and get fresh local revisions `1..=n` in key order; the change log starts
    /// empty (watchers resuming from an older life get `Compacted`). The clock is moved past
    /// every loaded version, so new writes win over everything this node wrote before.
    ///
    /// A replica that loaded entries is not *fresh*: its store is evidence. It is fresh again
    /// when `loaded` is empty or was damaged (records lost: its absences prove nothing), and
    /// it enters recovery at the first peer if `loaded.last_wall_ms` is more than
    /// `tombstone_grace` before `wall_ms` (it may hold keys deleted and collected meanwhile).
    ///
    /// A loaded version more than `max_drift_ms − clock_margin_ms` ahead of `wall_ms` (written
    /// while the clock was wrong) is kept, and so is the clock position it implies, but local
    /// writes are then refused with [`Error::ClockAhead`] (cause
    /// [`ClockCause::History`]) until the clock catches up: a write stamped from it would be
    /// dropped by every peer. Peers take such entries by anti-entropy once their own clocks
    /// reach them.
    #[must_use]
    pub fn restore(
        cfg: ReplicaConfig,
        now: Instant,
        wall_ms: u64,
        durability: Box<dyn Durability>,
        loaded: Loaded,
    ) -> Replica {
        let mut r = Replica::new(cfg, now);
        r.last_wall_ms = wall_ms;
        let damaged = loaded.damaged();
        let absent_ms = wall_ms.saturating_sub(loaded.last_wall_ms);
        let grace = u64::try_from(r.cfg.tombstone_grace.as_millis()).unwrap_or(u64::MAX);
        let mut commit = Vec::with_capacity(loaded.entries.len());
        for (key, value, version) in loaded.entries {
            let b = bucket_of(&key, r.cfg.buckets.get()) as usize;
            let tombstone = value.is_none();
            let key: Key = Key::from(key);
            let bucket = &mut r.buckets[b];
            if !bucket.keys.insert(key.clone()) {
                // Keys come from a map, so this is unreachable; keep the first (as the sums do).
                continue;
            }
            bucket.sum = bucket
                .sum
                .wrapping_add(entry_hash(&key, version, tombstone));
            if tombstone {
                r.tombstones.insert((version, key.clone()));
            }
            if version.hlc > r.clock.last() {
                // Adopted even from the future, so that a new write never loses to an older
                // one held here; `check_clock` then refuses writes until the clock catches up.
                let _ = r.clock.observe(version.hlc, version.hlc.physical_ms());
            }
            let revision = r.next_revision;
            r.next_revision += 1;
            commit.push((
                key,
                Stored {
                    // A value decoded from a data file may be a slice of a larger buffer.
                    value: value.as_deref().map(Value::from),
                    version,
                    revision,
                },
            ));
        }
        let had_data = !commit.is_empty();
        if had_data {
            r.store.commit(commit.into_iter());
        }
        r.fresh = !had_data || damaged;
        r.absent_too_long = had_data && loaded.last_wall_ms > 0 && absent_ms > grace;
        r.durability = Some(durability);
        if let Err(error) = r.check_clock(wall_ms) {
            tracing::warn!(
                %error,
                newest = %r.clock.last(),
                wall_ms,
                "the data directory holds versions from the future; its entries are kept and \
                 offered to peers, local writes are refused until the clock catches up"
            );
        }
        r
    }

    /// Writes persisted changes out and fsyncs them as the backend's policy says; with
    /// `force`, fsyncs whatever is written. Compacts the log when it has grown enough (a
    /// failed compaction is logged and counted by the backend, and the old log stays in use).
    /// Call before acknowledging local writes. Without a backend, does nothing.
    ///
    /// # Errors
    /// The backend failed to write or fsync; the changes are applied in memory but may not
    /// survive a crash of this node.
    pub fn flush_durable(&mut self, now: Instant, force: bool) -> Result<(), DurableError> {
        let Some(d) = self.durability.as_mut() else {
            return Ok(());
        };
        d.flush(now, force)?;
        if d.wants_compaction() {
            let entries = self.store.entries();
            if let Err(error) = d.compact(&entries, self.last_wall_ms) {
                tracing::warn!(%error, "snapshot failed; the log keeps growing until the next attempt");
            }
        }
        Ok(())
    }

    /// Counters of the durable backend, if there is one.
    #[must_use]
    pub fn durable_stats(&self) -> Option<crate::durable::DurableStats> {
        self.durability.as_ref().map(|d| d.stats())
    }

    /// Whether this replica has a durable backend.
    #[must_use]
    pub fn is_durable(&self) -> bool {
        self.durability.is_some()
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
        self.in_sync
    }

    /// The current digest: one order-independent hash per bucket.
    #[must_use]
    pub fn digest(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.sum).collect()
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
            .filter(|p| p.live)
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

    /// The clock offset of live peer `node` (its wall clock minus ours, in milliseconds, as
    /// `chorus_protocol::Member::clock_offset_ms` reports it; `None` when unknown). Unknown
    /// or departed nodes are ignored.
    pub fn handle_peer_clock(
        &mut self,
        now: Instant,
        wall_ms: u64,
        node: u64,
        offset_ms: Option<i64>,
    ) {
        self.last_wall_ms = self.last_wall_ms.max(wall_ms);
        match self.peers.get_mut(&node) {
            Some(p) if p.live && p.clock_offset_ms != offset_ms => p.clock_offset_ms = offset_ms,
            _ => return,
        }
        self.evaluate_sync(now);
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

    /// Sets `key` to `value`. See [`batch`](Replica::batch).
    ///
    /// # Errors
    /// As [`batch`](Replica::batch).
    pub fn put(
        &mut self,
        wall_ms: u64,
        key: impl Into<String>,
        value: impl Into<Bytes>,
    ) -> Result<Version, Error> {
        self.batch(
            wall_ms,
            vec![Op::Put {
                key: key.into(),
                value: value.into(),
            }],
        )
    }

    /// Deletes `key` (stores a tombstone). See [`batch`](Replica::batch).
    ///
    /// # Errors
    /// As [`batch`](Replica::batch).
    pub fn delete(&mut self, wall_ms: u64, key: impl Into<String>) -> Result<Version, Error> {
        self.batch(wall_ms, vec![Op::Delete { key: key.into() }])
    }

    /// Applies `ops` atomically under one fresh version and queues one write message.
    ///
    /// Atomic means: every op carries the same version; on this node and on every node that
    /// receives the write message, all ops become visible at once to multi-key reads
    /// (`scan_prefix`, `get_many`, `entries`), with consecutive revisions and consecutive
    /// change events. Each key still obeys last-writer-wins on its own: an op whose key
    /// already holds a newer version (possible on remote nodes) is skipped.
    ///
    /// # Errors
    /// A limit or shape error, or [`Error::ClockAhead`] when the write's version would be
    /// further ahead of the peers' clocks than they accept (see
    /// [`check_clock`](Replica::check_clock)); nothing is applied or sent and the clock does
    /// not move.
    pub fn batch(&mut self, wall_ms: u64, ops: Vec<Op>) -> Result<Version, Error> {
        validate_ops(&self.cfg.limits, &ops)?;
        self.last_wall_ms = self.last_wall_ms.max(wall_ms);
        if let Err(e) = self.check_clock(wall_ms) {
            self.stats.clock_refused += 1;
            return Err(e);
        }
        let wire_ops: Vec<wire::Op> = ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => wire::Op {
                    key: key.clone(),
                    value: Some(value.clone()),
                },
                Op::Delete { key } => wire::Op {
                    key: key.clone(),
                    value: None,
                },
            })
            .collect();
        // The HLC is fixed64, so the size does not depend on its value as long as it is not
        // zero (proto3 omits zero fields); measure with a non-zero placeholder.
        let mut envelope = envelope(wire::envelope::Body::Write(wire::Write {
            hlc: u64::MAX,
            ops: wire_ops,
        }));
        let size = envelope.encoded_len();
        if size > self.cfg.limits.max_write_bytes {
            return Err(Error::WriteTooLarge {
                size,
                max: self.cfg.limits.max_write_bytes,
            });
        }
        let version = Version {
            hlc: self.clock.now(wall_ms),
            node: self.cfg.node,
        };
        if let Some(wire::envelope::Body::Write(w)) = envelope.body.as_mut() {
            w.hlc = version.hlc.0;
        }
        let items = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => (key, Some(value), version),
                Op::Delete { key } => (key, None, version),
            })
            .collect();
        self.apply(items, wall_ms, true);
        self.stats.local_writes += 1;
        self.outgoing.push_back(Outgoing {
            kind: OutgoingKind::Write,
            payload: envelope.encode_to_vec().into(),
        });
        Ok(version)
    }

    /// Changes with a revision greater than `revision` whose key starts with `prefix`, oldest
    /// first, from the bounded change log.
    ///
    /// # Errors
    /// [`Compacted`] when changes after `revision` are no longer all in the log.
    pub fn changes_since(&self, revision: u64, prefix: &str) -> Result<Vec<Change>, Compacted> {
        let oldest = self.next_revision - self.log.len() as u64;
        if revision.saturating_add(1) < oldest {
            return Err(Compacted {
                requested: revision,
                oldest_available: oldest,
            });
        }
        Ok((oldest..)
            .zip(&self.log)
            .filter(|(rev, c)| *rev > revision && c.key.starts_with(prefix))
            .map(|(rev, c)| c.change(rev))
            .collect())
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
        if let Some(d) = self.durability.as_ref().and_then(|d| d.poll_timeout()) {
            t = t.min(d);
        }
        if !self.in_sync && !self.has_live_peer() {
            t = t.min(self.created + self.cfg.solo_in_sync_after);
        }
        Some(t)
    }

    /// Timers: periodic and triggered digests, tombstone collection, the solo in-sync rule,
    /// the durable backend's fsync interval.
    pub fn handle_timeout(&mut self, now: Instant, wall_ms: u64) {
        self.last_wall_ms = self.last_wall_ms.max(wall_ms);
        if self
            .durability
            .as_ref()
            .and_then(|d| d.poll_timeout())
            .is_some_and(|t| t <= now)
        {
            // An fsync the policy owes. A failure is logged by the backend and reported to the
            // writers by the owner's next `flush_durable`.
            let _ = self.flush_durable(now, false);
        }
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

    /// A peer became live (joined, restarted, or came back after a partition).
    pub fn handle_peer_up(&mut self, now: Instant, node: u64) {
        if node == self.cfg.node {
            return;
        }
        let long_isolation = self
            .isolated_since
            .take()
            .is_some_and(|since| now.saturating_duration_since(since) > self.cfg.tombstone_grace);
        let long_absence = std::mem::take(&mut self.absent_too_long);
        if (long_isolation || long_absence) && !self.fresh {
            self.recovering = true;
            self.stats.recoveries += 1;
        }
        let peer = self.peers.entry(node).or_default();
        *peer = Peer {
            live: true,
            ..Peer::default()
        };
        self.trigger_digest(now);
        self.evaluate_sync(now);
    }

    /// A peer left (goodbye or timeout).
    pub fn handle_peer_down(&mut self, now: Instant, node: u64) {
        self.peers.remove(&node);
        self.offers.remove(&node);
        if !self.has_live_peer() && self.isolated_since.is_none() {
            self.isolated_since = Some(now);
        }
        self.evaluate_sync(now);
    }

    /// The protocol reported unrecoverable loss of messages from `node`: resync.
    pub fn handle_lost(&mut self, now: Instant, node: u64) {
        self.stats.losses += 1;
        if let Some(p) = self.peers.get_mut(&node) {
            p.matched = false;
        }
        // Every peer may hold the lost writes (they were multicast), so ask everyone.
        for p in self.peers.values_mut() {
            p.matched = false;
        }
        self.evaluate_sync(now);
        self.trigger_digest(now);
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
    }

    fn on_write(&mut self, now: Instant, wall_ms: u64, from: u64, w: wire::Write) {
        let limits = self.cfg.limits;
        if w.ops.is_empty() || w.ops.len() > limits.max_batch_ops {
            self.stats.limit_violations += 1;
            return;
        }
        let mut seen = HashSet::with_capacity(w.ops.len());
        for op in &w.ops {
            if check_key(&limits, &op.key).is_err()
                || op
                    .value
                    .as_ref()
                    .is_some_and(|v| v.len() > limits.max_value_len)
            {
                self.stats.limit_violations += 1;
                return;
            }
            if !seen.insert(op.key.as_str()) {
                self.stats.malformed += 1;
                return;
            }
        }
        let hlc = Hlc(w.hlc);
        if let Err(error) = self.clock.observe(hlc, wall_ms) {
            tracing::debug!(%error, "write from the future dropped");
            self.stats.drift_rejected += 1;
            self.dropped_from(now, from);
            return;
        }
        let version = Version { hlc, node: from };
        let items = w
            .ops
            .into_iter()
            .map(|op| (op.key, op.value, version))
            .collect();
        self.stats.remote_writes += 1;
        self.apply(items, wall_ms, false);
    }

    fn on_digest(&mut self, now: Instant, from: u64, d: wire::Digest) {
        self.stats.digests_received += 1;
        if d.buckets.len() != self.buckets.len() {
            self.stats.bucket_mismatch += 1;
            return;
        }
        if self.recovering && !d.fresh {
            // An empty bucket at a peer that is not fresh: the peer lacks every key of ours
            // there, so our old keys in it were deleted (and collected) while we were away.
            for b in 0..self.buckets.len() {
                if d.buckets[b] == 0 && self.buckets[b].sum != 0 {
                    let keys = self.old_keys(b);
                    keys.into_iter().for_each(|k| self.forget(&k));
                }
            }
        }
        let ours = self.digest();
        let equal = ours == d.buckets;
        let mut confirm = false;
        {
            let peer = self.peers.entry(from).or_default();
            if equal {
                peer.matched = true;
                peer.mismatch_streak = 0;
            } else {
                peer.mismatch_streak = peer.mismatch_streak.saturating_add(1);
                if peer.mismatch_streak >= 2 {
                    peer.matched = false;
                } else if peer.matched {
                    // The hysteresis holds for one digest (the difference may be writes in
                    // flight); ask for the peer's next digest now, so that a lasting
                    // difference ends "in sync" within a round trip, not a sync interval.
                    self.confirm_wanted = true;
                    confirm = true;
                }
            }
        }
        if confirm {
            self.trigger_digest(now);
        }
        if !equal {
            for (b, (mine, theirs)) in ours.iter().zip(&d.buckets).enumerate() {
                // Bucket indices fit in u32: the count is a NonZeroU32.
                let bucket = b as u32;
                if mine == theirs || self.buckets[b].keys.is_empty() {
                    continue;
                }
                if !self.is_responder(from, d.round, bucket, *theirs) {
                    continue;
                }
                if self
                    .answered
                    .get(&(from, bucket))
                    .is_some_and(|t| now.saturating_duration_since(*t) < self.cfg.resend_holdoff)
                {
                    continue;
                }
                self.answered.insert((from, bucket), now);
                self.stats.buckets_answered += 1;
                if *theirs == 0 {
                    // The requester holds nothing here: send everything, skip the summary.
                    let keys = self.buckets[b].keys.iter().cloned().collect();
                    self.send_entries(keys, usize::MAX);
                } else {
                    self.send_summaries(now, from, bucket);
                }
            }
        }
        // Remember the digest after answering, so responder selection used the older view.
        if let Some(p) = self.peers.get_mut(&from) {
            p.digest = Some(d.buckets);
            p.fresh = d.fresh;
        }
        if d.reply_wanted {
            self.trigger_digest(now);
        }
        self.evaluate_sync(now);
    }

    fn on_summary(&mut self, from: u64, s: wire::Summary) {
        if s.target != self.cfg.node {
            return;
        }
        let Some(bucket) = usize::try_from(s.bucket)
            .ok()
            .filter(|b| *b < self.buckets.len())
        else {
            self.stats.malformed += 1;
            return;
        };
        let lower = s.after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let upper = s.upto.as_deref().map_or(Bound::Unbounded, Bound::Included);
        if let (Bound::Excluded(a), Bound::Included(u)) = (lower, upper)
            && a >= u
        {
            self.stats.malformed += 1;
            return;
        }
        let theirs: HashMap<String, Version> = s
            .keys
            .into_iter()
            .map(|kv| {
                (
                    kv.key,
                    Version {
                        hlc: Hlc(kv.hlc),
                        node: kv.node,
                    },
                )
            })
            .collect();
        let horizon = self.horizon_ms(self.last_wall_ms);
        let mut to_send = Vec::new();
        let mut to_forget = Vec::new();
        for key in self.buckets[bucket].keys.range::<str, _>((lower, upper)) {
            let Some(meta) = self.store.meta(key) else {
                continue;
            };
            match theirs.get(&**key) {
                None if self.recovering && meta.version.hlc.physical_ms() < horizon => {
                    to_forget.push(key.clone());
                }
                None => to_send.push(key.clone()),
                Some(v) if *v < meta.version => to_send.push(key.clone()),
                Some(_) => {}
            }
        }
        to_forget.iter().for_each(|k| self.forget(k));
        let mut to_request: Vec<String> = theirs
            .into_iter()
            .filter(|(key, v)| self.store.meta(key).is_none_or(|m| m.version < *v))
            .map(|(key, _)| key)
            .collect();
        to_request.sort_unstable();
        self.send_entries(to_send, usize::MAX);
        self.send_requests(from, to_request);
    }

    /// Answers a `Request` naming this node: each distinct key it holds once, within the
    /// bound of `docs/replication.md` (bounded answers): at most `ANSWER_FACTOR` times the
    /// request's size, plus what this node offered the requester in its recent summaries.
    fn on_request(&mut self, now: Instant, from: u64, r: wire::Request) {
        if r.target != self.cfg.node {
            return;
        }
        let asked = r.encoded_len();
        // A Request built by `send_requests` fits one sync message: keys of at least one
        // byte take at least three, so more keys than that are not from a Chorus node.
        let max_keys = self.cfg.max_sync_message / 3 + 1;
        if r.keys.len() > max_keys {
            self.stats.request_keys_ignored += (r.keys.len() - max_keys) as u64;
        }
        let buckets = self.cfg.buckets.get();
        let mut seen = HashSet::with_capacity(r.keys.len().min(max_keys));
        let mut held: Vec<Key> = Vec::new();
        for k in r.keys.iter().take(max_keys) {
            if !seen.insert(k.as_str()) {
                self.stats.request_duplicates += 1;
                continue;
            }
            if let Some(key) = self.buckets[bucket_of(k, buckets) as usize]
                .keys
                .get(k.as_str())
            {
                held.push(key.clone());
            }
        }
        drop(seen);
        if self.recovering {
            // The requester lacks (or holds an older copy of) these keys; old ones may have
            // been deleted while we were away, so forget them rather than spread them.
            let horizon = self.horizon_ms(self.last_wall_ms);
            let (old, keep): (Vec<Key>, Vec<Key>) =
                held.into_iter().partition(|k| self.is_old(k, horizon));
            old.iter().for_each(|k| self.forget(k));
            held = keep;
        }
        let ttl = self.cfg.sync_interval * 2;
        let offered = self
            .offers
            .get(&from)
            .filter(|o| now.saturating_duration_since(o.at) < ttl)
            .map_or(0, |o| o.bytes);
        let allowance = asked.saturating_mul(ANSWER_FACTOR);
        let used = self.send_entries(held, allowance.saturating_add(offered));
        if let Some(o) = self.offers.get_mut(&from) {
            o.bytes = o.bytes.saturating_sub(used.saturating_sub(allowance));
        }
    }

    fn on_entries(&mut self, now: Instant, wall_ms: u64, from: u64, e: wire::Entries) {
        let limits = self.cfg.limits;
        let mut items: Vec<Item> = Vec::with_capacity(e.entries.len());
        let mut rejected = false;
        self.stats.entries_received += e.entries.len() as u64;
        for entry in e.entries {
            if check_key(&limits, &entry.key).is_err()
                || entry
                    .value
                    .as_ref()
                    .is_some_and(|v| v.len() > limits.max_value_len)
            {
                self.stats.limit_violations += 1;
                continue;
            }
            let hlc = Hlc(entry.hlc);
            if self.clock.observe(hlc, wall_ms).is_err() {
                self.stats.drift_rejected += 1;
                rejected = true;
                continue;
            }
            items.push((
                entry.key,
                entry.value,
                Version {
                    hlc,
                    node: entry.node,
                },
            ));
        }
        let duplicated = {
            let mut seen = HashSet::with_capacity(items.len());
            !items.iter().all(|(k, _, _)| seen.insert(k.as_str()))
        };
        if duplicated {
            // No node sends a key twice in one message, and `apply` needs them distinct: keep
            // the newest of each.
            self.stats.malformed += 1;
            items.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.2.cmp(&a.2)));
            items.dedup_by(|later, first| later.0 == first.0);
        }
        let applied = self.apply(items, wall_ms, false);
        if rejected {
            self.dropped_from(now, from);
        }
        if applied > 0 && !self.in_sync {
            // Let the answers settle, then show the peers where this node stands.
            self.trigger_digest(now);
        }
    }

    /// This node dropped an entry `from` holds (too far in the future): their stores differ
    /// for as long as that lasts, so this node is not in sync with `from`, and says so in a
    /// digest soon (which wants a reply: `from` then sees the difference too).
    fn dropped_from(&mut self, now: Instant, from: u64) {
        if let Some(p) = self.peers.get_mut(&from) {
            p.matched = false;
        }
        self.evaluate_sync(now);
        self.trigger_digest(now);
    }

    /// Merges entries: each wins only over an older version. Applied as one change set, so
    /// multi-key readers see all or none of it, after it was handed to the durable backend
    /// (`local`: this node's own write). Returns how many entries were stored. The keys of
    /// `items` must be distinct (the store is read for the old versions and written at the
    /// end).
    ///
    /// Every stored key and value holds exactly its own bytes: a new key gets an allocation
    /// of its length (an overwrite reuses the stored one), and every value is copied out of
    /// whatever buffer it came in (an HTTP request body, a datagram, a decoded message), so
    /// that a 100-byte value never pins a kilobytes-long buffer.
    fn apply(&mut self, items: Vec<Item>, wall_ms: u64, local: bool) -> usize {
        let horizon = self.horizon_ms(wall_ms);
        // A scratch vector kept between calls: no allocation per applied write.
        let mut commit = std::mem::take(&mut self.commit_scratch);
        commit.clear();
        for (key, value, version) in items {
            let b = bucket_of(&key, self.cfg.buckets.get()) as usize;
            let old = self.store.meta(&key);
            if old.is_some_and(|m| m.version >= version) {
                self.stats.stale_ignored += 1;
                continue;
            }
            let tombstone = value.is_none();
            if tombstone && old.is_none() && version.hlc.physical_ms() < horizon {
                // Past its grace period: collected everywhere else, and nothing to delete here.
                self.stats.expired_tombstones_dropped += 1;
                continue;
            }
            let bucket = &mut self.buckets[b];
            // Overwriting a known key (the common case) needs no new copy of the key.
            let key: Key = match bucket.keys.get(key.as_str()) {
                Some(k) => k.clone(),
                None => {
                    let k = Key::from(key);
                    bucket.keys.insert(k.clone());
                    k
                }
            };
            if let Some(m) = old {
                bucket.sum = bucket
                    .sum
                    .wrapping_sub(entry_hash(&key, m.version, m.is_tombstone()));
                if m.is_tombstone() {
                    self.tombstones.remove(&(m.version, key.clone()));
                }
            }
            bucket.sum = bucket
                .sum
                .wrapping_add(entry_hash(&key, version, tombstone));
            if tombstone {
                self.tombstones.insert((version, key.clone()));
            }
            let value = value.as_deref().map(Value::from);
            let revision = self.record(Logged {
                key: key.clone(),
                value: value.clone(),
                version,
            });
            commit.push((
                key,
                Stored {
                    value,
                    version,
                    revision,
                },
            ));
        }
        let n = commit.len();
        self.stats.changes_applied += n as u64;
        if n > 0
            && let Some(d) = self.durability.as_mut()
        {
            let record = wire::LogRecord {
                wall_ms: self.last_wall_ms.max(wall_ms),
                entries: commit
                    .iter()
                    .map(|(key, e)| wire::Entry {
                        key: key.to_string(),
                        hlc: e.version.hlc.0,
                        node: e.version.node,
                        value: e.value.as_ref().map(bytes_of),
                    })
                    .collect(),
                removed: Vec::new(),
            };
            d.append(&record, local);
        }
        if n > 0 {
            self.store.commit(commit.drain(..));
        }
        self.commit_scratch = commit;
        n
    }

    /// Gives `change` the next revision, reports it and logs it; returns the revision.
    fn record(&mut self, change: Logged) -> u64 {
        let revision = self.next_revision;
        self.next_revision += 1;
        self.events
            .push_back(ReplicaEvent::Change(change.change(revision)));
        let cap = self.cfg.change_log_capacity;
        if cap == 0 {
            return revision;
        }
        self.log_bytes += change.cost();
        // Room is made before the push, so the log never grows past its capacity.
        while self.log.len() >= cap
            || (self.log_bytes > self.cfg.change_log_max_bytes && !self.log.is_empty())
        {
            match self.log.pop_front() {
                Some(old) => self.log_bytes -= old.cost(),
                None => break,
            }
        }
        let len = self.log.len();
        if len == self.log.capacity() {
            // Doubling, but never past the capacity the log is bounded by.
            self.log.reserve_exact(len.max(16).min(cap - len));
        }
        self.log.push_back(change);
        revision
    }

    fn horizon_ms(&self, wall_ms: u64) -> u64 {
        let grace = u64::try_from(self.cfg.tombstone_grace.as_millis()).unwrap_or(u64::MAX);
        wall_ms.saturating_sub(grace)
    }

    /// Removes tombstones older than the grace period from the store and the digest.
    fn collect_tombstones(&mut self, wall_ms: u64) {
        let horizon = self.horizon_ms(wall_ms);
        let mut removed = Vec::new();
        while let Some((version, key)) = self.tombstones.first().cloned() {
            if version.hlc.physical_ms() >= horizon {
                break;
            }
            self.tombstones.pop_first();
            let b = bucket_of(&key, self.cfg.buckets.get()) as usize;
            if self
                .store
                .meta(&key)
                .is_some_and(|m| m.is_tombstone() && m.version == version)
            {
                let bucket = &mut self.buckets[b];
                bucket.keys.remove(&*key);
                bucket.sum = bucket.sum.wrapping_sub(entry_hash(&key, version, true));
                self.store.remove_tombstone(&key, version);
                self.stats.tombstones_collected += 1;
                removed.push(wire::KeyVersion {
                    key: key.to_string(),
                    hlc: version.hlc.0,
                    node: version.node,
                });
            }
        }
        self.persist_removed(removed);
    }

    /// Hands removals (collected tombstones, forgotten entries) to the durable backend.
    fn persist_removed(&mut self, removed: Vec<wire::KeyVersion>) {
        if removed.is_empty() {
            return;
        }
        if let Some(d) = self.durability.as_mut() {
            let record = wire::LogRecord {
                wall_ms: self.last_wall_ms,
                entries: Vec::new(),
                removed,
            };
            d.append(&record, false);
        }
    }

    /// Keys of bucket `b` whose version is older than the grace period.
    fn old_keys(&self, b: usize) -> Vec<Key> {
        let horizon = self.horizon_ms(self.last_wall_ms);
        self.buckets[b]
            .keys
            .iter()
            .filter(|k| self.is_old(k, horizon))
            .cloned()
            .collect()
    }

    /// Whether `key` is stored with a version older than `horizon_ms`.
    fn is_old(&self, key: &str, horizon_ms: u64) -> bool {
        self.store
            .meta(key)
            .is_some_and(|m| m.version.hlc.physical_ms() < horizon_ms)
    }

    /// Drops `key` from this node (recovery after a long isolation). A forgotten value is
    /// reported as a change to `None` carrying the forgotten version.
    fn forget(&mut self, key: &str) {
        let b = bucket_of(key, self.cfg.buckets.get()) as usize;
        let (Some(m), Some(key)) = (self.store.meta(key), self.buckets[b].keys.take(key)) else {
            return;
        };
        let bucket = &mut self.buckets[b];
        bucket.sum = bucket
            .sum
            .wrapping_sub(entry_hash(&key, m.version, m.is_tombstone()));
        if m.is_tombstone() {
            self.tombstones.remove(&(m.version, key.clone()));
        }
        self.store.remove(&key);
        self.stats.entries_forgotten += 1;
        self.persist_removed(vec![wire::KeyVersion {
            key: key.to_string(),
            hlc: m.version.hlc.0,
            node: m.version.node,
        }]);
        if !m.is_tombstone() {
            self.record(Logged {
                key,
                value: None,
                version: m.version,
            });
        }
    }

    fn has_live_peer(&self) -> bool {
        self.peers.values().any(|p| p.live)
    }

    fn entry_item(&self, key: &str) -> Option<wire::Entry> {
        let e = self.store.get_entry(key)?;
        Some(wire::Entry {
            key: key.to_owned(),
            hlc: e.version.hlc.0,
            node: e.version.node,
            value: e.value,
        })
    }

    /// Rendezvous choice among live members (this node included, the requester excluded)
    /// whose bucket differs from the requester's, as far as this node knows.
    fn is_responder(&self, requester: u64, round: u64, bucket: u32, theirs: u64) -> bool {
        let me = self.cfg.node;
        let mine = rendezvous(requester, round, bucket, me);
        !self.peers.iter().any(|(&node, p)| {
            node != requester
                && p.live
                && p.digest.as_ref().is_none_or(|d| {
                    let h = d.get(bucket as usize).copied().unwrap_or(0);
                    h != theirs && h != 0
                })
                && {
                    let score = rendezvous(requester, round, bucket, node);
                    (score, node) > (mine, me)
                }
        })
    }

    fn trigger_digest(&mut self, now: Instant) {
        let base = self.cfg.trigger_delay;
        let extra = random_below(&mut self.rng, base);
        let at = now + base + extra;
        self.triggered_digest = Some(self.triggered_digest.map_or(at, |t| t.min(at)));
    }

    fn send_digest(&mut self) {
        self.round += 1;
        let d = wire::Digest {
            round: self.round,
            buckets: self.digest(),
            reply_wanted: !self.in_sync || std::mem::take(&mut self.confirm_wanted),
            fresh: self.fresh,
        };
        self.push_sync(envelope(wire::envelope::Body::Digest(d)));
        self.stats.digests_sent += 1;
    }

    /// Sends `target` this node's keys of `bucket` with their versions, and records what it
    /// thereby offers: `target` may then ask for any of these entries once.
    fn send_summaries(&mut self, now: Instant, target: u64, bucket: u32) {
        let max = self.cfg.max_sync_message;
        let mut offered = 0usize;
        let mut chunks: Vec<wire::Summary> = Vec::new();
        let mut cur = wire::Summary {
            target,
            bucket,
            after: None,
            upto: None,
            keys: Vec::new(),
        };
        let mut size = cur.encoded_len() + 16;
        for key in &self.buckets[bucket as usize].keys {
            let Some(meta) = self.store.meta(key) else {
                continue;
            };
            offered = offered.saturating_add(entry_size(key, meta.value_len));
            let kv = wire::KeyVersion {
                key: key.to_string(),
                hlc: meta.version.hlc.0,
                node: meta.version.node,
            };
            let len = kv.encoded_len() + 4;
            if !cur.keys.is_empty() && size + len * 2 > max {
                let last = cur.keys.last().map(|k| k.key.clone());
                let next = wire::Summary {
                    target,
                    bucket,
                    after: last.clone(),
                    upto: None,
                    keys: Vec::new(),
                };
                let mut done = std::mem::replace(&mut cur, next);
                done.upto = last;
                chunks.push(done);
                size = cur.encoded_len() + 16 + key.len();
            }
            size += len;
            cur.keys.push(kv);
        }
        chunks.push(cur);
        for s in chunks {
            self.push_sync(envelope(wire::envelope::Body::Summary(s)));
            self.stats.summaries_sent += 1;
        }
        let offer = self
            .offers
            .entry(target)
            .or_insert(Offer { bytes: 0, at: now });
        offer.bytes = offer.bytes.saturating_add(offered);
        offer.at = now;
    }

    fn send_requests(&mut self, target: u64, keys: Vec<String>) {
        let max = self.cfg.max_sync_message;
        let mut cur = Vec::new();
        let mut size = 16;
        for key in keys {
            let len = key.len() + 4;
            if !cur.is_empty() && size + len > max {
                let r = wire::Request {
                    target,
                    keys: std::mem::take(&mut cur),
                };
                self.push_sync(envelope(wire::envelope::Body::Request(r)));
                self.stats.requests_sent += 1;
                size = 16;
            }
            size += len;
            cur.push(key);
        }
        if !cur.is_empty() {
            let r = wire::Request { target, keys: cur };
            self.push_sync(envelope(wire::envelope::Body::Request(r)));
            self.stats.requests_sent += 1;
        }
    }

    /// Sends the entries of `keys` in `Entries` messages of at most `max_sync_message`
    /// bytes, building each entry only if it fits both `budget` (bytes this answer may
    /// take) and the sync room; stops at the first that does not (counted). Returns the
    /// bytes sent.
    fn send_entries(&mut self, keys: Vec<Key>, mut budget: usize) -> usize {
        let max = self.cfg.max_sync_message;
        let mut cur = Vec::new();
        let mut size = 8;
        let mut used = 0;
        for key in keys {
            let Some(item) = self.entry_item(&key) else {
                continue;
            };
            let len = item.encoded_len() + 6;
            if len > budget {
                self.stats.answers_capped += 1;
                break;
            }
            // What is gathered (sent before this entry or with it) plus this entry must fit.
            if size + len > self.sync_room {
                self.stats.answers_deferred += 1;
                break;
            }
            if !cur.is_empty() && size + len > max {
                self.flush_entries(std::mem::take(&mut cur));
                size = 8;
            }
            budget -= len;
            used += len;
            size += len;
            cur.push(item);
        }
        if !cur.is_empty() {
            self.flush_entries(cur);
        }
        used
    }

    fn flush_entries(&mut self, entries: Vec<wire::Entry>) {
        self.stats.entries_sent += entries.len() as u64;
        self.stats.entries_messages_sent += 1;
        self.push_sync(envelope(wire::envelope::Body::Entries(wire::Entries {
            entries,
        })));
    }

    fn push_sync(&mut self, e: wire::Envelope) {
        let payload: Bytes = e.encode_to_vec().into();
        self.sync_room = self.sync_room.saturating_sub(payload.len());
        self.outgoing.push_back(Outgoing {
            kind: OutgoingKind::Sync,
            payload,
        });
    }

    /// In sync: every live peer's latest digest matched ours when it arrived (one mismatch
    /// of hysteresis once matched); with no live peer, once `solo_in_sync_after` has passed
    /// since creation; and in both cases local writes are not refused by the clock check.
    fn evaluate_sync(&mut self, now: Instant) {
        let live: Vec<&Peer> = self.peers.values().filter(|p| p.live).collect();
        let with_peers = !live.is_empty();
        let agreed = if live.is_empty() {
            now.saturating_duration_since(self.created) >= self.cfg.solo_in_sync_after
        } else {
            live.iter().all(|p| p.matched)
        };
        // A node whose writes its peers would drop is not in sync, whatever the digests say.
        let target = agreed && self.check_clock(self.last_wall_ms).is_ok();
        if target != self.in_sync {
            self.in_sync = target;
            if target && with_peers {
                // Only agreement with a peer ends these: a node alone (say its first peer
                // after a long isolation left mid-sync) has learnt nothing from anyone.
                self.fresh = false;
                self.recovering = false;
            }
            self.events.push_back(if target {
                ReplicaEvent::InSync
            } else {
                ReplicaEvent::OutOfSync
            });
        }
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

/// About the encoded size of an `Entry` of `key` with a value of `value_len` bytes (`None`:
/// a tombstone), framing included.
fn entry_size(key: &str, value_len: Option<usize>) -> usize {
    key.len() + value_len.map_or(0, |n| n + 4) + 32
}

fn envelope(body: wire::envelope::Body) -> wire::Envelope {
    wire::Envelope { body: Some(body) }
}

/// `interval` jittered uniformly by ±25 %.
fn jittered(rng: &mut ChaCha8Rng, interval: Duration) -> Duration {
    let quarter = interval / 4;
    interval - quarter + random_below(rng, quarter * 2)
}

/// Uniform in `[0, max)` (zero when `max` is zero).
fn random_below(rng: &mut ChaCha8Rng, max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rng.random_range(0..nanos))
}

fn check_key(limits: &Limits, key: &str) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if key.len() > limits.max_key_len {
        return Err(Error::KeyTooLong {
            len: key.len(),
            max: limits.max_key_len,
        });
    }
    Ok(())
}

fn validate_ops(limits: &Limits, ops: &[Op]) -> Result<(), Error> {
    if ops.is_empty() {
        return Err(Error::EmptyBatch);
    }
    if ops.len() > limits.max_batch_ops {
        return Err(Error::BatchTooLarge {
            ops: ops.len(),
            max: limits.max_batch_ops,
        });
    }
    let mut seen = HashSet::with_capacity(ops.len());
    for op in ops {
        check_key(limits, op.key())?;
        if let Op::Put { key, value } = op
            && value.len() > limits.max_value_len
        {
            return Err(Error::ValueTooLarge {
                key: key.clone(),
                len: value.len(),
                max: limits.max_value_len,
            });
        }
        if !seen.insert(op.key()) {
            return Err(Error::DuplicateKey {
                key: op.key().to_owned(),
            });
        }
    }
    Ok(())
}
