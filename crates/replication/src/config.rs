//! Replica configuration and limits.

use std::num::NonZeroU32;
use std::time::Duration;

/// Size limits, enforced on local commands (as errors) and on remote messages (as counted
/// drops).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest key, in UTF-8 bytes. Keys are never empty.
    pub max_key_len: usize,
    /// Longest value, in bytes.
    pub max_value_len: usize,
    /// Most operations in one batch.
    pub max_batch_ops: usize,
    /// Largest encoded write message (a put, delete or whole batch), in bytes. Must not exceed
    /// the protocol's largest application message.
    pub max_write_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_key_len: 1024,
            max_value_len: 512 * 1024,
            max_batch_ops: 1024,
            max_write_bytes: 1024 * 1024,
        }
    }
}

/// Configuration of a [`Replica`](crate::Replica). Build with [`ReplicaConfig::new`] and
/// adjust the public fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// This node's id: the tie-break of every version it stamps. Must equal the node id the
    /// protocol layer reports for this node.
    pub node: u64,
    /// This node's incarnation (its current life), recorded as the owner of the entries it
    /// writes as owned. [`NodeCore`](crate::NodeCore) sets it from the protocol's; 0 by
    /// default.
    pub incarnation: u64,
    /// Seed of every random choice (digest jitter).
    pub rng_seed: u64,
    /// Key, value and batch limits.
    pub limits: Limits,
    /// Remote versions whose physical time is more than this many milliseconds ahead of the
    /// local wall clock are dropped and counted.
    pub max_drift_ms: u64,
    /// Local writes are refused ([`Error::ClockAhead`](crate::Error::ClockAhead)) when their
    /// version would be more than `max_drift_ms − clock_margin_ms` ahead of the most advanced
    /// live peer's clock (or of this node's own clock when no peer reported one): the margin
    /// covers measurement error of the peers' clock offsets.
    pub clock_margin_ms: u64,
    /// Number of digest buckets. Every node of a cluster must use the same number.
    pub buckets: NonZeroU32,
    /// Mean interval between periodic digests (each is jittered by ±25 %).
    pub sync_interval: Duration,
    /// Base delay before a triggered digest (peer up, loss, reply wanted, settling after a
    /// sync); the actual delay is uniform in `[delay, 2 × delay)` so triggers coalesce.
    pub trigger_delay: Duration,
    /// A node does not answer the same (requester, bucket) twice within this time, so
    /// answers still in flight are not duplicated.
    pub resend_holdoff: Duration,
    /// Largest sync message (summary, request, entries) in bytes; a single entry larger than
    /// this travels alone.
    pub max_sync_message: usize,
    /// Number of changes kept for [`Replica::changes_since`](crate::Replica::changes_since)
    /// (a watcher that falls further behind than the log reaches gets `Compacted`).
    pub change_log_capacity: usize,
    /// Bytes of keys and values the change log may hold; the oldest changes go first when
    /// either this or [`change_log_capacity`](Self::change_log_capacity) is exceeded.
    pub change_log_max_bytes: usize,
    /// Tombstones older than this (by their HLC against the local wall clock) are collected,
    /// and a node that had no live peer for longer than this forgets its entries older than
    /// this before syncing again. See `docs/replication.md`.
    pub tombstone_grace: Duration,
    /// A node with no live peer reports `InSync` only once this long after it was created
    /// (it may simply not have discovered its peers yet).
    pub solo_in_sync_after: Duration,
}

impl ReplicaConfig {
    /// Defaults for a LAN cluster.
    #[must_use]
    pub fn new(node: u64, rng_seed: u64) -> ReplicaConfig {
        ReplicaConfig {
            node,
            incarnation: 0,
            rng_seed,
            limits: Limits::default(),
            max_drift_ms: 60_000,
            clock_margin_ms: 1_000,
            buckets: NonZeroU32::new(256).unwrap_or(NonZeroU32::MIN),
            sync_interval: Duration::from_secs(5),
            trigger_delay: Duration::from_millis(50),
            resend_holdoff: Duration::from_secs(1),
            max_sync_message: 60 * 1024,
            change_log_capacity: 100_000,
            change_log_max_bytes: 64 << 20,
            tombstone_grace: Duration::from_secs(24 * 3600),
            solo_in_sync_after: Duration::from_secs(3),
        }
    }
}
