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
