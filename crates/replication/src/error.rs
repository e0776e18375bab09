//! Errors of local commands.

/// Why a local put, delete or batch was refused. A refused command changes nothing: no
/// version is applied and nothing is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Keys must not be empty.
    #[error("empty key")]
    EmptyKey,
    /// The key is longer than `Limits::max_key_len`.
    #[error("key of {len} bytes exceeds the limit of {max}")]
    KeyTooLong {
        /// Key length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value is larger than `Limits::max_value_len`.
    #[error("value of {len} bytes for key {key:?} exceeds the limit of {max}")]
    ValueTooLarge {
        /// The key.
        key: String,
        /// Value length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A batch must hold at least one operation.
    #[error("empty batch")]
    EmptyBatch,
    /// The batch has more than `Limits::max_batch_ops` operations.
    #[error("batch of {ops} operations exceeds the limit of {max}")]
    BatchTooLarge {
        /// Number of operations.
        ops: usize,
        /// The limit.
        max: usize,
    },
    /// The same key appears twice in one batch.
    #[error("key {key:?} appears more than once in the batch")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
    /// The encoded write message is larger than `Limits::max_write_bytes`.
    #[error("write message of {size} bytes exceeds the limit of {max}")]
    WriteTooLarge {
        /// Encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The write's version would lie further ahead of the peers' clocks than they accept, so
    /// they would drop it (see `docs/replication.md`, Clock safety). Nothing was applied; the
    /// condition is a state of the node, not of the write: it lasts until the clock is fixed
    /// (`cause` [`ClockCause::WallClock`]) or until the clock reaches the local history
    /// ([`ClockCause::History`]).
    #[error("{}", clock_message(*offset_ms, *bound_ms, *cause))]
    ClockAhead {
        /// How far, in milliseconds, the write's version would be ahead of the clock it is
        /// checked against: the most advanced live peer's clock, or this node's own when no
        /// peer reported one.
        offset_ms: u64,
        /// The most that is accepted: the drift bound (`max_drift_ms`) less the safety margin
        /// (`clock_margin_ms`).
        bound_ms: u64,
        /// What is ahead.
        cause: ClockCause,
    },
    /// A check of a conditional write ([`Check`](crate::Check)) did not hold against this
    /// node's store when the write was about to be applied: no state changed, nothing was
    /// stamped or sent. `current` and `revision` describe the key's live entry as it is
    /// (both `None` when the key is absent or deleted).
    #[error("condition failed for key {key:?}: {}", condition_current(*current, *revision))]
    ConditionFailed {
        /// The key of the first check that failed.
        key: String,
        /// The version of the key's live entry, `None` when absent (or a tombstone).
        current: Option<crate::hlc::Version>,
        /// The local revision of the key's live entry, `None` when absent.
        revision: Option<u64>,
    },
    /// An entry given to a restore cannot be taken as it is: nothing was applied.
    #[error("entry {key:?} refused: {reason}")]
    InvalidEntry {
        /// The entry's key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The write has more checks than `Limits::max_batch_ops`.
    #[error("{checks} checks exceed the limit of {max}")]
    TooManyChecks {
        /// Number of checks.
        checks: usize,
        /// The limit.
        max: usize,
    },
}

fn condition_current(current: Option<crate::hlc::Version>, revision: Option<u64>) -> String {
    match (current, revision) {
        (Some(v), Some(r)) => format!("it holds version {v} at revision {r}"),
        (Some(v), None) => format!("it holds version {v}"),
        _ => "it is absent".to_owned(),
    }
}

impl Error {
    /// Whether this is a failed condition ([`Error::ConditionFailed`]).
    #[must_use]
    pub fn is_condition_failed(&self) -> bool {
        matches!(self, Error::ConditionFailed { .. })
    }
}

/// What is ahead when a write is refused with [`Error::ClockAhead`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockCause {
    /// This node's wall clock is ahead of every live peer's. The wall-clock mapping is fixed
    /// when a node starts, so the node must be restarted once its system clock is fixed.
    WallClock,
    /// The newest version this node holds (loaded from disk, or stamped while its clock was
    /// wrong) is ahead of the clock; writes resume by themselves when the clock reaches it.
    History,
}

fn clock_message(offset_ms: u64, bound_ms: u64, cause: ClockCause) -> String {
    match cause {
        ClockCause::WallClock => format!(
            "write refused: this node's clock is {offset_ms} ms ahead of every live peer's, \
             beyond the {bound_ms} ms they accept; fix the system clock (NTP) and restart the node"
        ),
        ClockCause::History => format!(
            "write refused: the local history (the newest version held, e.g. loaded from disk) \
             is {offset_ms} ms ahead of the clock, beyond the {bound_ms} ms peers accept; writes \
             resume in about {} s, when the clock catches up",
            offset_ms.saturating_sub(bound_ms).div_ceil(1000)
        ),
    }
}

/// The change log no longer holds the requested revision: the watcher must re-read the
/// store (e.g. with a prefix scan) and resume from [`Store::revision`](crate::Store::revision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "changes after revision {requested} were compacted; oldest available is {oldest_available}"
)]
pub struct Compacted {
    /// The revision asked for.
    pub requested: u64,
    /// The oldest revision still in the log.
    pub oldest_available: u64,
}
