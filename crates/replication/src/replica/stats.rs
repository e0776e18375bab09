//! Replication counters.

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
    /// Conditional local writes refused because a check did not hold.
    pub conditions_failed: u64,
    /// Remote entries dropped because their owner is not the node of their version.
    pub owner_mismatch: u64,
    /// Entries stored by restores by version (`RestoreMode::ByVersion`).
    pub entries_restored: u64,
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
            conditions_failed,
            owner_mismatch,
            entries_restored,
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
            ("conditions_failed", *conditions_failed),
            ("owner_mismatch", *owner_mismatch),
            ("entries_restored", *entries_restored),
        ]
    }
}
