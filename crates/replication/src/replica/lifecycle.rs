//! The replica's lifecycle states: what its store is evidence of, and what it last reported.

/// What this node's store is evidence of, for anti-entropy: whether its absences prove
/// anything to its peers and whether its old entries may have been deleted meanwhile.
///
/// `Fresh → Settled` and `Recovering → Settled` when this node is in sync with a live peer;
/// `AbsentTooLong → Recovering` at the first peer; `Settled → Recovering` (and
/// `Recovering → Recovering`, counted again) at the first peer after an isolation longer than
/// the grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Standing {
    /// Created empty (or restored from damaged records) and never in sync with a peer: holds
    /// nothing that peers could have deleted. Its digests say `fresh`.
    Fresh,
    /// Restored from disk after an absence longer than the grace period: enters recovery when
    /// the first peer comes up, as after a long isolation.
    AbsentTooLong,
    /// Back from an isolation (or absence) longer than the grace period, not yet in sync with
    /// a peer: entries older than the grace period that a peer turns out to lack are
    /// forgotten, not offered.
    Recovering,
    /// Its store is evidence: it was in sync with a peer, or was restored after a short
    /// absence.
    Settled,
}

/// What this node last reported through [`ReplicaEvent`](super::ReplicaEvent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SyncState {
    /// Not known to be in sync (the state at creation; `ReplicaEvent::OutOfSync`).
    OutOfSync,
    /// `ReplicaEvent::InSync` (see `docs/replication.md` for the rule).
    InSync,
}
