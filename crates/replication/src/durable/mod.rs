//! What durable storage and the replica share: the fsync policy, the items the replica emits
//! to be made durable ([`Persist`]), errors, counters and what a store loads at start.
//!
//! The replica does no file I/O. A replica built by [`Replica::restore`](crate::Replica::restore)
//! emits every change set it commits, and every removal, as a [`Persist::Append`] (in commit
//! order, numbered by `seq`); [`NodeCore`](crate::NodeCore) hands them out through
//! [`poll_persist`](crate::NodeCore::poll_persist) and is told by the owner how far they are
//! durable ([`handle_persisted`](crate::NodeCore::handle_persisted)); it acknowledges local
//! writes from that. The durable store is either the data directory of the `chorus-storage`
//! crate (a write-ahead log plus snapshots, written by a thread of its own) or
//! [`MemoryDisk`] (in memory, for the simulator and the tests).
//!
//! - `mod.rs`: the shared types;
//! - `merge.rs`: [`MergedState`], the pure merge of records into a store (last writer wins,
//!   conditional removals) that disk replay and [`MemoryDisk`] both use;
//! - `memory.rs`: [`MemoryDisk`].

mod memory;
mod merge;

pub use memory::MemoryDisk;
pub use merge::MergedState;

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::hlc::Version;
use crate::store::EntryMeta;
use crate::wire;

/// When the log is forced to stable storage (fsync).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fsync {
    /// A local write is fsynced before it is acknowledged: an acknowledged write survives
    /// `kill -9` and power loss. Writes queued when the storage thread wakes share one fsync
    /// (group commit). Changes from peers are fsynced with the next local write or within
    /// one second.
    #[default]
    Always,
    /// Records reach the operating system before the write is acknowledged (they survive
    /// `kill -9` of the process) and are fsynced at most this long after they were written
    /// (a power loss can lose that window).
    Interval(Duration),
    /// Records reach the operating system at once, never fsynced by Chorus (only on
    /// shutdown and snapshots); the kernel writes them back when it likes.
    Never,
}

impl fmt::Display for Fsync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fsync::Always => f.write_str("always"),
            Fsync::Interval(d) => write!(f, "interval:{}", d.as_millis()),
            Fsync::Never => f.write_str("never"),
        }
    }
}

/// The text of an [`Fsync`] policy was not `always`, `never` or `interval:<milliseconds>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fsync policy {0:?}: expected always, never or interval:<milliseconds>")]
pub struct ParseFsyncError(String);

impl FromStr for Fsync {
    type Err = ParseFsyncError;

    fn from_str(s: &str) -> Result<Fsync, ParseFsyncError> {
        match s.trim() {
            "always" => Ok(Fsync::Always),
            "never" => Ok(Fsync::Never),
            other => other
                .strip_prefix("interval:")
                .and_then(|ms| ms.trim().trim_end_matches("ms").parse::<u64>().ok())
                .filter(|ms| *ms > 0)
                .map(|ms| Fsync::Interval(Duration::from_millis(ms)))
                .ok_or_else(|| ParseFsyncError(s.to_owned())),
        }
    }
}

/// Why durable storage failed. Clone: one failed group commit is reported to every writer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DurableError {
    /// A file operation failed. Nothing already durable was lost; if it happened while
    /// writing or syncing the log, the backend is now failed (see [`DurableError::Failed`]).
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done (`open`, `write`, `fsync`, `rename`, ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },
    /// Another process holds the data directory's lock.
    #[error("data directory {} is in use by another process (LOCK is held)", path.display())]
    Locked {
        /// The data directory.
        path: PathBuf,
    },
    /// An earlier write or fsync failed; after a failed fsync the kernel may have dropped the
    /// dirty pages, so the log is not trusted again. The node keeps running in memory and
    /// every later write is acknowledged with this error. Restart to recover (the log on disk
    /// is intact up to the failure; peers supply the rest).
    #[error("durable storage failed earlier ({0}); writes are no longer persisted")]
    Failed(String),
    /// The data directory had to be rewritten at open (damaged records were found, or its
    /// files are in the previous format) and that failed part way. What the repair had done
    /// was undone: unless `undo_error` is set, the directory is exactly as it was (nothing
    /// written, renamed or removed stays), and starting again retries the repair.
    #[error(
        "data directory {} {why} and could not be repaired: {cause}; {}",
        dir.display(),
        repair_outcome(.undo_error.as_deref())
    )]
    Repair {
        /// The data directory.
        dir: PathBuf,
        /// Why it needed a repair (`"is damaged"`, `"is in the previous format (CHL1)"`).
        why: &'static str,
        /// The step that failed.
        cause: Box<DurableError>,
        /// Set when undoing the partial repair failed too: the directory may then hold a new
        /// complete `snapshot-<gen>` (every intact entry; the next start uses it) or a
        /// leftover `.tmp` (ignored), and damaged files may already carry `.corrupt`.
        undo_error: Option<Box<DurableError>>,
    },
}

fn repair_outcome(undo_error: Option<&DurableError>) -> Cow<'static, str> {
    match undo_error {
        None => Cow::Borrowed(
            "the directory was left exactly as it was (nothing written, renamed or removed); \
             fix the cause (permissions, free space, a file or directory in the way) and start \
             again, or move the directory away to start empty and let the peers refill this node",
        ),
        Some(e) => Cow::Owned(format!(
            "undoing the partial repair failed too ({e}): the directory may hold a new complete \
             snapshot (every intact entry, used by the next start) or a leftover .tmp file \
             (ignored), and damaged files may already be renamed to *.corrupt; check it before \
             starting again"
        )),
    }
}

/// Counters of a durable backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DurableStats {
    /// Records appended to the log.
    pub records_written: u64,
    /// Bytes appended to the log.
    pub bytes_written: u64,
    /// fsyncs of the log.
    pub fsyncs: u64,
    /// Snapshots written (compactions).
    pub snapshots: u64,
    /// Snapshots that failed to be written (the old log stays in use).
    pub compaction_errors: u64,
    /// Current size of the log, in bytes.
    pub wal_bytes: u64,
    /// Size of the current snapshot, in bytes.
    pub snapshot_bytes: u64,
    /// Entries loaded at start.
    pub loaded_entries: u64,
    /// Damaged regions skipped at start (each contiguous region counts once).
    pub corrupt_records: u64,
    /// Bytes in those damaged regions.
    pub corrupt_bytes: u64,
    /// Bytes of a torn tail truncated at start.
    pub torn_tail_bytes: u64,
    /// 1 once the backend failed (see [`DurableError::Failed`]).
    pub failed: u64,
}

impl DurableStats {
    /// Every counter with its field name, for exporters. Exhaustive destructuring, so a new
    /// field cannot be forgotten here.
    #[must_use]
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let DurableStats {
            records_written,
            bytes_written,
            fsyncs,
            snapshots,
            compaction_errors,
            wal_bytes,
            snapshot_bytes,
            loaded_entries,
            corrupt_records,
            corrupt_bytes,
            torn_tail_bytes,
            failed,
        } = self;
        vec![
            ("records_written", *records_written),
            ("bytes_written", *bytes_written),
            ("fsyncs", *fsyncs),
            ("snapshots", *snapshots),
            ("compaction_errors", *compaction_errors),
            ("wal_bytes", *wal_bytes),
            ("snapshot_bytes", *snapshot_bytes),
            ("loaded_entries", *loaded_entries),
            ("corrupt_records", *corrupt_records),
            ("corrupt_bytes", *corrupt_bytes),
            ("torn_tail_bytes", *torn_tail_bytes),
            ("failed", *failed),
        ]
    }
}

/// What was found in a data directory at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Generation of the snapshot/log pair loaded (0: no snapshot yet).
    pub generation: u64,
    /// Valid records read (snapshot and log).
    pub records: u64,
    /// Damaged regions skipped (each contiguous region counts once).
    pub corrupt_records: u64,
    /// Bytes in those regions.
    pub corrupt_bytes: u64,
    /// Bytes of a torn tail truncated from the log.
    pub torn_tail_bytes: u64,
}

impl LoadReport {
    /// Whether damage was found in the middle of a file (records may be missing: the node
    /// must let its peers fill in, see [`Loaded::damaged`]). A torn tail alone is not damage:
    /// it only held writes that were never acknowledged under [`Fsync::Always`].
    #[must_use]
    pub fn is_damaged(&self) -> bool {
        self.corrupt_records > 0
    }
}

/// One loaded entry: key, value (`None`: tombstone), version, flags and owner.
pub type LoadedEntry = (String, Option<Bytes>, Version, EntryMeta);

/// A store as loaded from disk, to build a replica from
/// ([`Replica::restore`](crate::Replica::restore)).
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Every entry, tombstones included (`None` value), sorted by key, with its version and
    /// its flags and owner (default for tombstones and for records written before entries
    /// had metadata).
    pub entries: Vec<LoadedEntry>,
    /// Latest wall time found in the records (unix ms): when the node was last known to run.
    pub last_wall_ms: u64,
    /// What the load found.
    pub report: LoadReport,
}

impl Loaded {
    /// Whether some records were lost to damage: the store may lack entries or hold old
    /// versions, so its absences are not evidence of deletes.
    #[must_use]
    pub fn damaged(&self) -> bool {
        self.report.is_damaged()
    }
}

/// Where a record to persist comes from, which says how soon it must be durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This node's own write: its acknowledgement waits for it (under [`Fsync::Always`],
    /// for an fsync).
    Local,
    /// A change from a peer, or a removal (tombstone collection, a forgotten key): it can be
    /// fetched or redone again, so under [`Fsync::Always`] it may wait up to a second for its
    /// fsync (or ride along with the next local write's).
    Remote,
}

/// What a node wants its durable store to do, in order ([`NodeCore::poll_persist`](crate::NodeCore::poll_persist)).
#[derive(Debug, Clone, PartialEq)]
pub enum Persist {
    /// Append one record: a committed change set (one record, so a batch is all or nothing
    /// across a crash) or a group of removals. The store already shows it.
    Append {
        /// Position in this life's sequence of records: 1, 2, 3, ... The store reports
        /// progress as the highest `seq` that is durable as the policy requires.
        seq: u64,
        /// The record.
        record: wire::LogRecord,
        /// Local write or not.
        origin: Origin,
    },
    /// Make everything appended so far durable, whatever the policy (the node shuts down).
    SyncAll,
}
