//! Durable state: a write-ahead log plus snapshots in a data directory, behind the
//! [`Durability`] seam.
//!
//! The [`Replica`](crate::Replica) is given an `Option<Box<dyn Durability>>` at construction
//! (`None`, the default, keeps everything in memory: the simulator and the sans-IO tests touch
//! no file). It hands every change set it commits to [`Durability::append`] *before* the store
//! shows it, and the owner of the node (the driver) calls
//! [`NodeCore::flush_durable`](crate::NodeCore::flush_durable) before it acknowledges writes.
//! Time comes in as `now`; [`DiskLog`] is the only code of this crate that does I/O, and only
//! through `std::fs`.
//!
//! # On-disk format
//! A data directory holds `snapshot-<gen>` (the whole store at one point, written once) and
//! `wal-<gen>` (every change after that snapshot, appended). Both are a file header followed
//! by frames, each frame ended by a zero byte:
//!
//! ```text
//! file:  "CHLOG2\r\n" 0x00  frame 0x00  frame 0x00 ...
//! frame: COBS( crc32 LE of ("CHLOG2" ++ payload) ++ payload: LogRecord )
//! ```
//!
//! COBS (consistent overhead byte stuffing) rewrites a frame so that it holds no zero byte,
//! for at most one byte in 254 of overhead. A zero byte therefore only ever ends a frame: no
//! byte sequence inside a value (however it was made, whatever it copies) can be taken for the
//! start of a record, and after damage the loader resumes exactly at the next frame. There is
//! no length field and no size limit on a frame: the loader accepts every frame the writer
//! can make.
//!
//! `LogRecord` (in `proto/replication.proto`) holds upserted entries and removed
//! `(key, version)` pairs. Replay merges entries by last writer wins and removes a key only
//! if it still holds the removed version, so replay is idempotent and replaying an old log
//! over a newer snapshot cannot go backwards. One committed change set is one record (a batch
//! is all or nothing across a crash); removals, which are independent of each other, are
//! split into records of about 64 KiB, and a snapshot is written in records of about 64 KiB
//! (plus one entry).
//!
//! Files of the previous format (`CHL1`: `[magic][len][crc][payload]` records) are read
//! record by record and, at the first bad record, not trusted any further (that format cannot
//! tell a record from bytes inside a value); the directory is then rewritten in this format.
//!
//! On open, a record that fails its checks is handled by where it is:
//! - followed by no valid record: a **torn tail** (a write cut short by a crash); the log is
//!   truncated back to the end of the last valid record;
//! - followed by a valid record: **corruption**; the damaged frames are skipped, counted and
//!   reported with `tracing::warn!` naming the file and offset. The directory is then
//!   **repaired**: what was intact is written as a new snapshot with an empty log (fsynced,
//!   directory fsynced), and only then are the damaged files renamed to `<name>.corrupt`. A
//!   repair that fails part way is undone, so the directory is exactly as it was, and
//!   [`DurableError::Repair`] says what failed. The replica marks itself as not knowing what
//!   it lacks, so its peers fill the gap by anti-entropy.
//!
//! # Compaction
//! Once the log exceeds `compact_factor` × the last snapshot's size (and at least
//! `compact_min_bytes`), the replica hands the whole store to [`Durability::compact`]:
//! `snapshot-<gen+1>.tmp` is written, fsynced, renamed and the directory fsynced; then an
//! empty `wal-<gen+1>` is created and fsynced, and the old files are deleted. A crash at any
//! point leaves either the old pair or the new snapshot (with no or an empty log), both
//! complete; a failure is undone and the old log stays in use.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write as _};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;

use crate::hlc::{Hlc, Version};
use crate::store::Entry;
use crate::wire;

/// The store being rebuilt while loading: key → (value or tombstone, version).
type State = HashMap<String, (Option<Bytes>, Version)>;

/// First bytes of every file of the current format: a magic and the first frame delimiter.
const FILE_HEADER: &[u8; 9] = b"CHLOG2\r\n\0";
/// Mixed into every frame's checksum, so frames of another format never check.
const CRC_TAG: &[u8] = b"CHLOG2";
/// Checksum bytes at the start of a decoded frame.
const CRC_LEN: usize = 4;
/// Under [`Fsync::Always`], changes that came from peers (they can be fetched again) are
/// fsynced with the next local write or at the latest this long after they were written.
const RELAXED_SYNC: Duration = Duration::from_secs(1);
/// Target payload size of one snapshot record and of one record of removals: damage to one
/// loses at most this much.
const SNAPSHOT_CHUNK: usize = 64 * 1024;
/// Bytes a removal or an entry costs in a record beyond its key and value (tags, lengths,
/// version), for sizing chunks.
const ENTRY_OVERHEAD: usize = 24;

/// Magic of every record of the previous format (`CHL1`).
const LEGACY_MAGIC: [u8; 4] = *b"CHL1";
/// Magic, length and checksum of a `CHL1` record.
const LEGACY_HEADER: usize = 12;
/// Largest `CHL1` record payload (what its loader accepted).
const LEGACY_MAX_RECORD: usize = 64 << 20;
/// When the log is forced to stable storage (fsync).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fsync {
    /// A local write is fsynced before it is acknowledged: an acknowledged write survives
    /// `kill -9` and power loss. Writes handled in one driver iteration share one fsync
    /// (group commit). Changes from peers are fsynced with the next local write or within
    /// one second.
    #[default]
    Always,
    /// Records reach the operating system at once (they survive `kill -9` of the process)
    /// and are fsynced at most this long after they were written (a power loss can lose
    /// that window).
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

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DurableError + 'a {
    move |e| DurableError::Io {
        op,
        path: path.to_owned(),
        source: Arc::new(e),
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

/// Where a replica's committed changes are kept beyond the process. Object-safe; the replica
/// owns one as `Box<dyn Durability>`.
///
/// Call order (by the replica): `append` for every change set before the store shows it;
/// `flush` when the owner asks (before acknowledging writes) and on the backend's
/// `poll_timeout`; `compact` when `wants_compaction` says so, right after a `flush`.
pub trait Durability: Send + fmt::Debug {
    /// Queues one record. `local` is true for this node's own writes (which the owner will
    /// acknowledge after the next `flush`), false for changes from peers and tombstone
    /// collection (which can be fetched or redone again). Never blocks on the disk.
    fn append(&mut self, record: &wire::LogRecord, local: bool);

    /// Writes queued records to the log and fsyncs as the policy says (always when `force`).
    ///
    /// # Errors
    /// The write or fsync failed; the backend is then failed for good.
    fn flush(&mut self, now: Instant, force: bool) -> Result<(), DurableError>;

    /// When `flush` should be called next to honour the fsync policy, if anything waits.
    fn poll_timeout(&self) -> Option<Instant>;

    /// Whether the log has grown enough to be replaced by a snapshot.
    fn wants_compaction(&self) -> bool;

    /// Replaces the log by a snapshot of `entries` (the whole store, tombstones included).
    ///
    /// # Errors
    /// The snapshot could not be written; the old log stays in use and complete.
    fn compact(
        &mut self,
        entries: &BTreeMap<String, Entry>,
        wall_ms: u64,
    ) -> Result<(), DurableError>;

    /// Counters.
    fn stats(&self) -> DurableStats;
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

/// A store as loaded from disk, to build a replica from
/// ([`Replica::restore`](crate::Replica::restore)).
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Every entry, tombstones included (`None` value), sorted by key.
    pub entries: Vec<(String, Option<Bytes>, Version)>,
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

/// Options of a [`DiskLog`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskOptions {
    /// The fsync policy.
    pub fsync: Fsync,
    /// Compact once the log is larger than this many times the last snapshot.
    pub compact_factor: NonZeroU32,
    /// ... and larger than this many bytes.
    pub compact_min_bytes: u64,
}

impl DiskOptions {
    /// Defaults (compact at 4 × the snapshot and at least 8 MiB) with the given fsync policy.
    #[must_use]
    pub fn new(fsync: Fsync) -> DiskOptions {
        DiskOptions {
            fsync,
            compact_factor: NonZeroU32::new(4).unwrap_or(NonZeroU32::MIN),
            compact_min_bytes: 8 << 20,
        }
    }
}

impl Default for DiskOptions {
    fn default() -> DiskOptions {
        DiskOptions::new(Fsync::Always)
    }
}

/// The file backend: a write-ahead log plus snapshots in one directory (see the module doc).
pub struct DiskLog {
    dir: PathBuf,
    options: DiskOptions,
    generation: u64,
    /// Generation of the next snapshot: above every generation found in the directory, so
    /// no file there is ever overwritten. `None` once `u64::MAX` is in use.
    next_generation: Option<u64>,
    wal: File,
    wal_path: PathBuf,
    /// Framed records not yet written to the file.
    buf: Vec<u8>,
    /// One record being encoded, before it is framed (reused).
    scratch: Vec<u8>,
    /// A local write waits in the buffer or in unsynced file data.
    local_pending: bool,
    /// Since when written data has waited for an fsync.
    unsynced_since: Option<Instant>,
    /// Set after a write or fsync error: nothing is written again.
    failed: Option<String>,
    /// No compaction attempt before the log reaches this size (after a failed attempt).
    retry_compaction_at: u64,
    stats: DurableStats,
    /// Holds the directory's lock for as long as the log is open.
    _lock: File,
}

impl fmt::Debug for DiskLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskLog")
            .field("dir", &self.dir)
            .field("generation", &self.generation)
            .field("fsync", &self.options.fsync)
            .field("wal_bytes", &self.stats.wal_bytes)
            .finish()
    }
}

impl DiskLog {
    /// Opens (creating if needed) the data directory `dir`, loads what it holds, truncates a
    /// torn tail, repairs damage (or rewrites files of the previous format) and returns the
    /// log ready for appends with the loaded store.
    ///
    /// # Errors
    /// The directory cannot be created, locked, read or written; another process holds it
    /// ([`DurableError::Locked`]); it needed a repair that failed ([`DurableError::Repair`],
    /// which says whether the directory was left as it was).
    pub fn open(dir: &Path, options: DiskOptions) -> Result<(DiskLog, Loaded), DurableError> {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(DurableError::Locked {
                    path: dir.to_owned(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
        }

        let found = Listing::read(dir)?;
        let generation = found.snapshots.iter().copied().max().unwrap_or(0);
        let highest = found
            .snapshots
            .iter()
            .chain(&found.wals)
            .copied()
            .max()
            .unwrap_or(0);
        let next_generation = highest.checked_add(1);
        let mut loader = Loader {
            state: HashMap::new(),
            last_wall_ms: 0,
            report: LoadReport {
                generation,
                ..LoadReport::default()
            },
        };
        let mut damaged_files = Vec::new();
        let mut legacy = false;

        let snap_path = dir.join(snapshot_name(generation));
        let mut snapshot_bytes = 0;
        if found.snapshots.contains(&generation) {
            let bytes = read_file(&snap_path)?;
            snapshot_bytes = bytes.len() as u64;
            let scan = replay(&bytes, &snap_path, &mut loader);
            legacy |= scan.legacy;
            if scan.torn_tail > 0 {
                // A snapshot is fsynced before it is renamed: a short one is damage too.
                let report = &mut loader.report;
                report.corrupt_records = report.corrupt_records.saturating_add(1);
                report.corrupt_bytes = report.corrupt_bytes.saturating_add(scan.torn_tail as u64);
                tracing::warn!(
                    file = %snap_path.display(),
                    offset = scan.valid_end,
                    bytes = scan.torn_tail,
                    "snapshot ends in a damaged record; the rest is recovered from peers"
                );
            }
            if scan.damaged || scan.torn_tail > 0 {
                damaged_files.push(snap_path.clone());
            }
        }

        let wal_path = dir.join(wal_name(generation));
        let mut truncate_wal_to = None;
        if found.wals.contains(&generation) {
            let bytes = read_file(&wal_path)?;
            let scan = replay(&bytes, &wal_path, &mut loader);
            legacy |= scan.legacy;
            if scan.torn_tail > 0 {
                loader.report.torn_tail_bytes = scan.torn_tail as u64;
                tracing::warn!(
                    file = %wal_path.display(),
                    offset = scan.valid_end,
                    bytes = scan.torn_tail,
                    "log ends in a torn record (a write cut short); truncated"
                );
                truncate_wal_to = Some(scan.valid_end as u64);
            }
            if scan.damaged {
                damaged_files.push(wal_path.clone());
            }
        }

        let Loader {
            state,
            last_wall_ms,
            report,
        } = loader;
        let mut entries: Vec<(String, Option<Bytes>, Version)> =
            state.into_iter().map(|(k, (v, ver))| (k, v, ver)).collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));

        let why = if !damaged_files.is_empty() {
            Some("is damaged")
        } else if legacy {
            Some("is in the previous format (CHL1)")
        } else {
            None
        };
        let mut snapshots_written = 0;
        let (in_use, wal, wal_path, wal_len) = match why {
            Some(why) => {
                if damaged_files.is_empty() {
                    tracing::info!(dir = %dir.display(), "rewriting the data directory in the current format");
                } else {
                    tracing::warn!(
                        dir = %dir.display(),
                        damaged_regions = report.corrupt_records,
                        damaged_bytes = report.corrupt_bytes,
                        kept_entries = entries.len(),
                        "data directory damaged: intact records kept and written as a new snapshot, damaged files then set aside as *.corrupt; the rest will be recovered from peers"
                    );
                }
                let Some(next) = next_generation else {
                    return Err(DurableError::Repair {
                        dir: dir.to_owned(),
                        why,
                        cause: Box::new(generations_exhausted(dir)),
                        undo_error: None,
                    });
                };
                let installed = repair(dir, why, next, &entries, last_wall_ms, &damaged_files)?;
                snapshots_written = 1;
                snapshot_bytes = installed.snapshot_bytes;
                (
                    next,
                    installed.wal,
                    installed.wal_path,
                    FILE_HEADER.len() as u64,
                )
            }
            None => {
                if let Some(len) = truncate_wal_to {
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&wal_path)
                        .map_err(io_err("open", &wal_path))?;
                    f.set_len(len).map_err(io_err("truncate", &wal_path))?;
                    f.sync_all().map_err(io_err("fsync", &wal_path))?;
                }
                let (wal, len) = open_log(dir, &wal_path)?;
                (generation, wal, wal_path, len)
            }
        };
        found.remove_leftovers(dir, generation, in_use);

        let log = DiskLog {
            dir: dir.to_owned(),
            options,
            generation: in_use,
            next_generation: if in_use == generation {
                next_generation
            } else {
                in_use.checked_add(1)
            },
            wal,
            wal_path,
            buf: Vec::new(),
            scratch: Vec::new(),
            local_pending: false,
            unsynced_since: None,
            failed: None,
            retry_compaction_at: 0,
            stats: DurableStats {
                wal_bytes: wal_len,
                snapshot_bytes,
                snapshots: snapshots_written,
                loaded_entries: entries.len() as u64,
                corrupt_records: report.corrupt_records,
                corrupt_bytes: report.corrupt_bytes,
                torn_tail_bytes: report.torn_tail_bytes,
                ..DurableStats::default()
            },
            _lock: lock,
        };
        Ok((
            log,
            Loaded {
                entries,
                last_wall_ms,
                report,
            },
        ))
    }

    /// The data directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn fail(&mut self, e: DurableError) -> DurableError {
        tracing::error!(error = %e, "durable storage failed; writes are no longer persisted");
        self.failed = Some(e.to_string());
        self.stats.failed = 1;
        self.buf = Vec::new();
        e
    }

    /// Frames one record into the write buffer.
    fn push_record(&mut self, record: &wire::LogRecord) {
        encode_frame(record, &mut self.scratch, &mut self.buf);
        self.stats.records_written = self.stats.records_written.saturating_add(1);
    }

    /// Writes `entries` as the next generation's snapshot, starts its empty log and deletes
    /// the old pair. A failure is undone (the old pair stays in use); if undoing fails too,
    /// the backend fails (the new snapshot could win over later appends at the next start).
    fn write_snapshot(
        &mut self,
        entries: &BTreeMap<String, Entry>,
        wall_ms: u64,
    ) -> Result<(), DurableError> {
        let Some(next) = self.next_generation else {
            return Err(generations_exhausted(&self.dir));
        };
        let items = entries
            .iter()
            .map(|(k, e)| (k.as_str(), e.value.as_ref(), e.version));
        let installed = match install(&self.dir, next, items, wall_ms) {
            Ok(installed) => installed,
            Err((cause, Ok(()))) => return Err(cause),
            Err((cause, Err(undo))) => {
                tracing::error!(error = %undo, "undoing a failed snapshot failed");
                return Err(self.fail(cause));
            }
        };
        let old_wal = std::mem::replace(&mut self.wal_path, installed.wal_path);
        self.wal = installed.wal;
        let _ = fs::remove_file(&old_wal);
        let _ = fs::remove_file(self.dir.join(snapshot_name(self.generation)));
        self.generation = next;
        self.next_generation = next.checked_add(1);
        self.buf.clear();
        self.local_pending = false;
        self.unsynced_since = None;
        self.stats.snapshots = self.stats.snapshots.saturating_add(1);
        self.stats.snapshot_bytes = installed.snapshot_bytes;
        self.stats.wal_bytes = FILE_HEADER.len() as u64;
        Ok(())
    }
}

impl Durability for DiskLog {
    fn append(&mut self, record: &wire::LogRecord, local: bool) {
        if self.failed.is_some() {
            return;
        }
        let removal_bytes = record
            .removed
            .iter()
            .fold(0usize, |n, r| n.saturating_add(removal_size(r)));
        if removal_bytes <= SNAPSHOT_CHUNK {
            self.push_record(record);
        } else {
            // Removals (collected tombstones, forgotten keys) are independent of each other:
            // split, so that no record grows with how many were collected at once and damage
            // to one record loses at most one chunk of them. A change set stays one record.
            if !record.entries.is_empty() {
                self.push_record(&wire::LogRecord {
                    wall_ms: record.wall_ms,
                    entries: record.entries.clone(),
                    removed: Vec::new(),
                });
            }
            for chunk in split_by_size(&record.removed, removal_size, SNAPSHOT_CHUNK) {
                self.push_record(&wire::LogRecord {
                    wall_ms: record.wall_ms,
                    entries: Vec::new(),
                    removed: chunk.to_vec(),
                });
            }
        }
        self.local_pending |= local;
    }

    fn flush(&mut self, now: Instant, force: bool) -> Result<(), DurableError> {
        if let Some(reason) = &self.failed {
            return Err(DurableError::Failed(reason.clone()));
        }
        if !self.buf.is_empty() {
            if let Err(e) = self.wal.write_all(&self.buf) {
                let e = io_err("write", &self.wal_path)(e);
                return Err(self.fail(e));
            }
            let n = self.buf.len() as u64;
            self.stats.bytes_written = self.stats.bytes_written.saturating_add(n);
            self.stats.wal_bytes = self.stats.wal_bytes.saturating_add(n);
            self.buf.clear();
            self.unsynced_since.get_or_insert(now);
        }
        let Some(since) = self.unsynced_since else {
            return Ok(());
        };
        let due = force
            || match self.options.fsync {
                Fsync::Always => self.local_pending || now >= since + RELAXED_SYNC,
                Fsync::Interval(d) => now >= since + d,
                Fsync::Never => false,
            };
        if due {
            if let Err(e) = self.wal.sync_data() {
                let e = io_err("fsync", &self.wal_path)(e);
                return Err(self.fail(e));
            }
            self.stats.fsyncs = self.stats.fsyncs.saturating_add(1);
            self.unsynced_since = None;
            self.local_pending = false;
        }
        Ok(())
    }

    fn poll_timeout(&self) -> Option<Instant> {
        if self.failed.is_some() {
            return None;
        }
        let since = self.unsynced_since?;
        match self.options.fsync {
            Fsync::Always => Some(since + RELAXED_SYNC),
            Fsync::Interval(d) => Some(since + d),
            Fsync::Never => None,
        }
    }

    fn wants_compaction(&self) -> bool {
        let threshold = self
            .stats
            .snapshot_bytes
            .saturating_mul(u64::from(self.options.compact_factor.get()))
            .max(self.options.compact_min_bytes)
            .max(self.retry_compaction_at);
        self.failed.is_none() && self.stats.wal_bytes > threshold
    }

    fn compact(
        &mut self,
        entries: &BTreeMap<String, Entry>,
        wall_ms: u64,
    ) -> Result<(), DurableError> {
        if let Some(reason) = &self.failed {
            return Err(DurableError::Failed(reason.clone()));
        }
        // Records still queued are in `entries` already (appended before the store showed
        // them); the snapshot makes them durable.
        let result = self.write_snapshot(entries, wall_ms);
        if result.is_err() {
            self.stats.compaction_errors = self.stats.compaction_errors.saturating_add(1);
            self.retry_compaction_at = self.stats.wal_bytes.saturating_mul(2);
        }
        result
    }

    fn stats(&self) -> DurableStats {
        self.stats.clone()
    }
}

fn snapshot_name(generation: u64) -> String {
    format!("snapshot-{generation:020}")
}

fn wal_name(generation: u64) -> String {
    format!("wal-{generation:020}")
}

fn parse_gen(name: &str, prefix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn generations_exhausted(dir: &Path) -> DurableError {
    DurableError::Io {
        op: "number the next snapshot",
        path: dir.to_owned(),
        source: Arc::new(io::Error::other(
            "generation 18446744073709551615 (u64::MAX) is in use and there is none above it; \
             rename snapshot-<gen> and wal-<gen> to a lower generation",
        )),
    }
}

/// What a data directory holds, as found at open.
struct Listing {
    snapshots: Vec<u64>,
    wals: Vec<u64>,
    /// Interrupted snapshots: never renamed, so never part of the state.
    tmps: Vec<PathBuf>,
}

impl Listing {
    fn read(dir: &Path) -> Result<Listing, DurableError> {
        let mut found = Listing {
            snapshots: Vec::new(),
            wals: Vec::new(),
            tmps: Vec::new(),
        };
        for item in fs::read_dir(dir).map_err(io_err("read", dir))? {
            let item = item.map_err(io_err("read", dir))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                found.tmps.push(item.path());
            } else if let Some(g) = parse_gen(name, "snapshot-") {
                found.snapshots.push(g);
            } else if let Some(g) = parse_gen(name, "wal-") {
                found.wals.push(g);
            }
        }
        Ok(found)
    }

    /// After a successful open: deletes interrupted snapshots and the files of generations
    /// up to `loaded` other than `in_use` (leftovers of an interrupted compaction, or the pair
    /// a repair replaced). Logs of a generation above `loaded` have no snapshot: kept, ignored.
    fn remove_leftovers(&self, dir: &Path, loaded: u64, in_use: u64) {
        for t in &self.tmps {
            let _ = fs::remove_file(t);
        }
        for g in self
            .snapshots
            .iter()
            .filter(|g| **g <= loaded && **g != in_use)
        {
            let _ = fs::remove_file(dir.join(snapshot_name(*g)));
        }
        for g in self.wals.iter().filter(|g| **g <= loaded && **g != in_use) {
            let _ = fs::remove_file(dir.join(wal_name(*g)));
        }
        for g in self.wals.iter().filter(|g| **g > loaded) {
            tracing::warn!(
                file = %dir.join(wal_name(*g)).display(),
                "log of a generation with no snapshot ignored"
            );
        }
    }
}

/// Reads a data file whole. Only a regular file is read, and never more than the size it
/// had when opened: a FIFO, a device or a symbolic link to one (`/dev/zero`) in place of a
/// data file is an error, not an endless read; a size that cannot be held is an error, not
/// an abort.
fn read_file(path: &Path) -> Result<Vec<u8>, DurableError> {
    let not_regular = || DurableError::Io {
        op: "read",
        path: path.to_owned(),
        source: Arc::new(io::Error::other(
            "not a regular file (a data file must be one); move it away",
        )),
    };
    // Checked before opening: opening a FIFO would wait for a writer.
    if !fs::metadata(path).map_err(io_err("stat", path))?.is_file() {
        return Err(not_regular());
    }
    let file = File::open(path).map_err(io_err("open", path))?;
    let meta = file.metadata().map_err(io_err("stat", path))?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    let mut bytes = Vec::new();
    usize::try_from(meta.len())
        .ok()
        .and_then(|len| bytes.try_reserve_exact(len).ok())
        .ok_or_else(|| DurableError::Io {
            op: "read",
            path: path.to_owned(),
            source: Arc::new(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("{} bytes do not fit in memory", meta.len()),
            )),
        })?;
    io::Read::read_to_end(&mut io::Read::take(file, meta.len()), &mut bytes)
        .map_err(io_err("read", path))?;
    Ok(bytes)
}

fn open_append(path: &Path) -> Result<File, DurableError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err("open", path))
}

/// Opens the log for appending; an empty (or new) one gets its file header first.
/// Returns the file and its length.
fn open_log(dir: &Path, path: &Path) -> Result<(File, u64), DurableError> {
    let mut wal = open_append(path)?;
    let mut len = wal.metadata().map_err(io_err("stat", path))?.len();
    if len == 0 {
        wal.write_all(FILE_HEADER).map_err(io_err("write", path))?;
        wal.sync_data().map_err(io_err("fsync", path))?;
        len = FILE_HEADER.len() as u64;
    }
    sync_dir(dir)?;
    Ok((wal, len))
}

fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

// Failure injection for the unit tests of this file: a named step of a repair or a snapshot
// fails once `FAULTS` names it (after skipping the given number of occurrences). Nothing
// outside `cfg(test)` of this crate can set it.
#[cfg(test)]
thread_local! {
    static FAULTS: std::cell::RefCell<Vec<(&'static str, usize)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A named step of a repair or a snapshot (an injected failure in this file's unit tests).
fn step(name: &'static str) -> io::Result<()> {
    #[cfg(test)]
    {
        let hit = FAULTS.with(|faults| {
            let mut faults = faults.borrow_mut();
            let i = faults.iter().position(|(n, _)| *n == name)?;
            if faults[i].1 == 0 {
                faults.remove(i);
                Some(())
            } else {
                faults[i].1 -= 1;
                None
            }
        });
        if hit.is_some() {
            return Err(io::Error::other(format!("injected fault at {name:?}")));
        }
    }
    let _ = name;
    Ok(())
}

fn sync_dir_step(dir: &Path, name: &'static str) -> Result<(), DurableError> {
    step(name).map_err(io_err("fsync", dir))?;
    sync_dir(dir)
}

fn create_file(path: &Path, fresh: bool, name: &'static str) -> Result<File, DurableError> {
    step(name)
        .and_then(|()| {
            let mut o = OpenOptions::new();
            o.write(true);
            if fresh {
                o.create_new(true);
            } else {
                o.create(true).truncate(true);
            }
            o.open(path)
        })
        .map_err(io_err("create", path))
}

/// A snapshot entry: key, value (`None`: tombstone), version.
type SnapEntry<'a> = (&'a str, Option<&'a Bytes>, Version);

/// A new generation, complete and durable: its snapshot and its empty, open log.
struct Installed {
    wal: File,
    wal_path: PathBuf,
    snapshot_path: PathBuf,
    snapshot_bytes: u64,
}

/// Removes `paths` (created by a step that then failed) and fsyncs `dir`. Tries every one;
/// reports the first failure.
fn undo_create(dir: &Path, paths: &[PathBuf]) -> Result<(), DurableError> {
    if paths.is_empty() {
        return Ok(());
    }
    let mut first = None;
    for p in paths.iter().rev() {
        if let Err(e) = step("undo remove").and_then(|()| fs::remove_file(p))
            && e.kind() != io::ErrorKind::NotFound
        {
            first.get_or_insert(io_err("remove", p)(e));
        }
    }
    if let Err(e) = sync_dir_step(dir, "undo fsync") {
        first.get_or_insert(e);
    }
    first.map_or(Ok(()), Err)
}

/// Writes generation `next`: `snapshot-<next>.tmp` (fsynced), renamed to `snapshot-<next>`,
/// directory fsynced, an empty `wal-<next>` (fsynced), directory fsynced. On failure, what it
/// created is removed again; the error comes with the outcome of that undo.
fn install<'a>(
    dir: &Path,
    next: u64,
    entries: impl Iterator<Item = SnapEntry<'a>>,
    wall_ms: u64,
) -> Result<Installed, (DurableError, Result<(), DurableError>)> {
    let tmp = dir.join(format!("{}.tmp", snapshot_name(next)));
    let snapshot_path = dir.join(snapshot_name(next));
    let wal_path = dir.join(wal_name(next));
    // What this call made (and an undo must remove).
    let mut created: Vec<PathBuf> = Vec::new();
    let build = || {
        let file = create_file(&tmp, false, "create snapshot")?;
        created.push(tmp.clone());
        let size = write_snapshot_file(file, &tmp, entries, wall_ms)?;
        step("rename snapshot")
            .and_then(|()| fs::rename(&tmp, &snapshot_path))
            .map_err(io_err("rename", &tmp))?;
        created.pop();
        created.push(snapshot_path.clone());
        sync_dir_step(dir, "fsync directory")?;
        let mut wal = create_file(&wal_path, true, "create log")?;
        created.push(wal_path.clone());
        step("write log")
            .and_then(|()| wal.write_all(FILE_HEADER))
            .map_err(io_err("write", &wal_path))?;
        step("fsync log")
            .and_then(|()| wal.sync_all())
            .map_err(io_err("fsync", &wal_path))?;
        sync_dir_step(dir, "fsync directory again")?;
        Ok::<_, DurableError>((wal, size))
    };
    let built = build();
    match built {
        Ok((wal, snapshot_bytes)) => Ok(Installed {
            wal,
            wal_path,
            snapshot_path,
            snapshot_bytes,
        }),
        Err(cause) => Err((cause, undo_create(dir, &created))),
    }
}

/// Rewrites a data directory at open: `entries` (what was intact) become generation `next`,
/// written and made durable first; only then are the `damaged` files renamed to
/// `<name>.corrupt`. Any failure undoes every step, so the directory is as it was; the error
/// says what failed and whether the undo worked.
fn repair(
    dir: &Path,
    why: &'static str,
    next: u64,
    entries: &[(String, Option<Bytes>, Version)],
    wall_ms: u64,
    damaged: &[PathBuf],
) -> Result<Installed, DurableError> {
    let failed = |cause: DurableError, undo: Result<(), DurableError>| DurableError::Repair {
        dir: dir.to_owned(),
        why,
        cause: Box::new(cause),
        undo_error: undo.err().map(Box::new),
    };
    let items = entries
        .iter()
        .map(|(k, v, ver)| (k.as_str(), v.as_ref(), *ver));
    let installed = install(dir, next, items, wall_ms).map_err(|(c, u)| failed(c, u))?;
    let mut moved: Vec<(&PathBuf, PathBuf)> = Vec::new();
    let mut set_aside = || {
        for path in damaged {
            let aside = aside_name(path);
            step("set aside")
                .and_then(|()| fs::rename(path, &aside))
                .map_err(io_err("rename", path))?;
            moved.push((path, aside));
        }
        if damaged.is_empty() {
            return Ok(());
        }
        sync_dir_step(dir, "fsync directory after setting aside")
    };
    let Err(cause) = set_aside() else {
        return Ok(installed);
    };
    let mut undo = Ok(());
    for (path, aside) in moved.iter().rev() {
        if let Err(e) = step("undo rename").and_then(|()| fs::rename(aside, path)) {
            undo = undo.and(Err(io_err("rename", aside)(e)));
        }
    }
    let Installed {
        wal,
        wal_path,
        snapshot_path,
        ..
    } = installed;
    drop(wal);
    // With a damaged file still set aside, the new generation (complete) is what the next
    // start must find: it stays.
    if undo.is_ok() {
        undo = undo_create(dir, &[snapshot_path, wal_path]);
    }
    Err(failed(cause, undo))
}

/// `<path>.corrupt`, or `<path>.corrupt.<n>` if that exists already (an earlier repair's).
fn aside_name(path: &Path) -> PathBuf {
    let mut base = path.as_os_str().to_owned();
    base.push(".corrupt");
    let base = PathBuf::from(base);
    if fs::symlink_metadata(&base).is_err() {
        return base;
    }
    for n in 1..1000u32 {
        let mut p = base.clone().into_os_string();
        p.push(format!(".{n}"));
        let p = PathBuf::from(p);
        if fs::symlink_metadata(&p).is_err() {
            return p;
        }
    }
    base
}

/// Writes a snapshot of `entries` into `file` (records of about [`SNAPSHOT_CHUNK`]) and
/// fsyncs it. Returns its size.
fn write_snapshot_file<'a>(
    file: File,
    path: &Path,
    entries: impl Iterator<Item = SnapEntry<'a>>,
    wall_ms: u64,
) -> Result<u64, DurableError> {
    let mut out = BufWriter::with_capacity(1 << 20, file);
    step("write snapshot")
        .and_then(|()| out.write_all(FILE_HEADER))
        .map_err(io_err("write", path))?;
    let mut size = FILE_HEADER.len() as u64;
    let mut scratch = Vec::with_capacity(SNAPSHOT_CHUNK + 1024);
    let mut framed = Vec::with_capacity(SNAPSHOT_CHUNK + 1024);
    let mut record = wire::LogRecord {
        wall_ms,
        entries: Vec::new(),
        removed: Vec::new(),
    };
    let mut chunk = 0usize;
    let mut any = false;
    let mut emit = |record: &mut wire::LogRecord, out: &mut BufWriter<File>| {
        framed.clear();
        encode_frame(record, &mut scratch, &mut framed);
        record.entries.clear();
        size += framed.len() as u64;
        out.write_all(&framed).map_err(io_err("write", path))
    };
    for (key, value, version) in entries {
        any = true;
        chunk += key.len() + value.map_or(0, Bytes::len) + ENTRY_OVERHEAD;
        record.entries.push(wire::Entry {
            key: key.to_owned(),
            hlc: version.hlc.0,
            node: version.node,
            value: value.cloned(),
        });
        if chunk >= SNAPSHOT_CHUNK {
            emit(&mut record, &mut out)?;
            chunk = 0;
        }
    }
    if !record.entries.is_empty() || !any {
        emit(&mut record, &mut out)?;
    }
    let file = out
        .into_inner()
        .map_err(|e| io_err("write", path)(e.into_error()))?;
    step("fsync snapshot")
        .and_then(|()| file.sync_all())
        .map_err(io_err("fsync", path))?;
    Ok(size)
}

fn removal_size(r: &wire::KeyVersion) -> usize {
    r.key.len() + ENTRY_OVERHEAD
}

/// `items` cut into runs of at least `limit` bytes by `size` (the last run may be smaller;
/// a run is at most `limit` plus one item).
fn split_by_size<T>(
    items: &[T],
    size: impl Fn(&T) -> usize,
    limit: usize,
) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut total = 0usize;
        let mut n = 0;
        while n < rest.len() && (n == 0 || total < limit) {
            total = total.saturating_add(size(&rest[n]));
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        rest = tail;
        Some(run)
    })
}

/// Checksum of a frame's payload.
fn checksum(payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(CRC_TAG);
    crc.update(payload);
    crc.finalize()
}

/// Appends `record` as one frame: COBS of (checksum, payload), then the zero delimiter.
fn encode_frame(record: &wire::LogRecord, scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
    scratch.clear();
    scratch.extend_from_slice(&[0; CRC_LEN]);
    scratch.reserve(record.encoded_len());
    // Encoding into a Vec cannot run out of room (it grows): the Result has nothing to say.
    let _ = record.encode(scratch);
    let crc = checksum(&scratch[CRC_LEN..]);
    scratch[..CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    cobs_encode(scratch, out);
    out.push(0);
}

/// Appends `data` COBS-encoded to `out` (the `cobs` crate): no zero byte in the output, at
/// most one byte of overhead per 254 (plus one).
fn cobs_encode(data: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + cobs::max_encoding_length(data.len()), 0);
    // The room is the crate's own worst case for this length, so encoding cannot run short.
    let used = cobs::encode(data, &mut out[start..]);
    out.truncate(start + used);
}

/// Decodes one COBS frame (without its delimiter) into `out`; `None` if it is malformed.
/// `out` never grows beyond the frame's own length.
fn cobs_decode(encoded: &[u8], out: &mut Vec<u8>) -> Option<()> {
    out.clear();
    out.resize(encoded.len(), 0);
    let report = cobs::decode(encoded, out).ok()?;
    out.truncate(report.frame_size());
    Some(())
}

/// The payload of a valid frame (`encoded` without its delimiter), decoded into `buf`.
fn decode_frame<'a>(encoded: &[u8], buf: &'a mut Vec<u8>) -> Option<&'a [u8]> {
    cobs_decode(encoded, buf)?;
    let buf: &'a [u8] = buf;
    let (crc, payload) = buf.split_at_checked(CRC_LEN)?;
    let want = u32::from_le_bytes(crc.try_into().ok()?);
    (checksum(payload) == want).then_some(payload)
}

/// The payload of a valid `CHL1` record starting at `pos`, if there is one.
fn legacy_record_at(bytes: &[u8], pos: usize) -> Option<&[u8]> {
    let start = pos.checked_add(LEGACY_HEADER)?;
    let header = bytes.get(pos..start)?;
    if header[..4] != LEGACY_MAGIC {
        return None;
    }
    let len_bytes: [u8; 4] = header[4..8].try_into().ok()?;
    let crc_bytes: [u8; 4] = header[8..12].try_into().ok()?;
    let len = usize::try_from(u32::from_le_bytes(len_bytes)).ok()?;
    if len > LEGACY_MAX_RECORD {
        return None;
    }
    let payload = bytes.get(start..start.checked_add(len)?)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len_bytes);
    crc.update(payload);
    (crc.finalize() == u32::from_le_bytes(crc_bytes)).then_some(payload)
}

/// Whether a valid-looking `CHL1` record starts at or after `from` (it may lie inside a
/// value: only ever used to tell damage from a torn tail, never to adopt a record).
fn legacy_record_after(bytes: &[u8], from: usize) -> bool {
    let mut pos = from;
    while let Some(found) = bytes
        .get(pos..)
        .and_then(|rest| rest.windows(4).position(|w| w == LEGACY_MAGIC))
    {
        pos += found;
        if legacy_record_at(bytes, pos).is_some() {
            return true;
        }
        pos += 1;
    }
    false
}

/// Result of scanning one file.
#[derive(Debug, Default)]
struct Scan {
    /// End of the last valid record.
    valid_end: usize,
    /// Bytes after the last valid record that are not a record.
    torn_tail: usize,
    /// Whether a damaged region was followed by a valid record.
    damaged: bool,
    /// Whether the file is in the previous format.
    legacy: bool,
}

/// Rebuilds the store from records, one at a time.
struct Loader {
    state: State,
    last_wall_ms: u64,
    report: LoadReport,
}

impl Loader {
    /// Counts the damaged region `from..to` of `path`, followed by a valid record at `to`.
    fn damage(&mut self, path: &Path, from: usize, to: usize) {
        self.report.corrupt_records = self.report.corrupt_records.saturating_add(1);
        self.report.corrupt_bytes = self.report.corrupt_bytes.saturating_add((to - from) as u64);
        tracing::warn!(
            file = %path.display(),
            offset = from,
            bytes = to - from,
            resumed_at = to,
            "damaged record skipped (bad frame or checksum)"
        );
    }

    /// Merges one record's payload (a `LogRecord`), entry by entry: memory follows the
    /// entries kept, never a count or length in the record. A record that turns out not to
    /// decode may have merged some of its entries (they carry a good checksum, so they were
    /// written as they are; merging is idempotent).
    fn apply(&mut self, payload: &[u8]) -> Result<(), Cow<'static, str>> {
        let mut rest = payload;
        while !rest.is_empty() {
            let key = read_varint(&mut rest)?;
            match (key >> 3, key & 7) {
                (0, _) => return Err("field number 0".into()),
                (1, 0) => {
                    let wall_ms = read_varint(&mut rest)?;
                    self.last_wall_ms = self.last_wall_ms.max(wall_ms);
                }
                (2, 2) => {
                    let body = read_len(&mut rest)?;
                    let e = wire::Entry::decode(body).map_err(|e| e.to_string())?;
                    self.merge_entry(e);
                }
                (3, 2) => {
                    let body = read_len(&mut rest)?;
                    let r = wire::KeyVersion::decode(body).map_err(|e| e.to_string())?;
                    self.merge_removed(&r);
                }
                (_, 0) => {
                    read_varint(&mut rest)?;
                }
                (_, 1) => skip(&mut rest, 8)?,
                (_, 2) => {
                    read_len(&mut rest)?;
                }
                (_, 5) => skip(&mut rest, 4)?,
                (_, wire_type) => return Err(format!("unsupported wire type {wire_type}").into()),
            }
        }
        self.report.records = self.report.records.saturating_add(1);
        Ok(())
    }

    fn merge_entry(&mut self, e: wire::Entry) {
        if e.key.is_empty() {
            return;
        }
        let version = Version {
            hlc: Hlc(e.hlc),
            node: e.node,
        };
        self.last_wall_ms = self.last_wall_ms.max(version.hlc.physical_ms());
        match self.state.get_mut(&e.key) {
            Some(cur) if cur.1 >= version => {}
            Some(cur) => *cur = (e.value, version),
            None => {
                self.state.insert(e.key, (e.value, version));
            }
        }
    }

    fn merge_removed(&mut self, r: &wire::KeyVersion) {
        let version = Version {
            hlc: Hlc(r.hlc),
            node: r.node,
        };
        if self.state.get(&r.key).is_some_and(|cur| cur.1 == version) {
            self.state.remove(&r.key);
        }
    }
}

fn read_varint(buf: &mut &[u8]) -> Result<u64, Cow<'static, str>> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().ok_or("truncated varint")?;
        *buf = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(value);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// A length-delimited field's bytes: a slice of the record, whatever the length claims.
fn read_len<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], Cow<'static, str>> {
    let len = read_varint(buf)?;
    let len = usize::try_from(len)
        .ok()
        .filter(|n| *n <= buf.len())
        .ok_or("length beyond the end of the record")?;
    let (field, rest) = buf.split_at(len);
    *buf = rest;
    Ok(field)
}

fn skip(buf: &mut &[u8], n: usize) -> Result<(), Cow<'static, str>> {
    *buf = buf.get(n..).ok_or("truncated fixed-size field")?;
    Ok(())
}

/// Scans one file, merging each valid record into `loader`.
fn replay(bytes: &[u8], path: &Path, loader: &mut Loader) -> Scan {
    if bytes.starts_with(&LEGACY_MAGIC) {
        return replay_legacy(bytes, path, loader);
    }
    let scan = replay_frames(bytes, path, loader);
    if scan.valid_end == 0 && legacy_record_after(bytes, 0) {
        // Not one frame, but a `CHL1` record: a file of the previous format whose first
        // record is damaged (nothing was merged from it yet).
        return replay_legacy(bytes, path, loader);
    }
    scan
}

/// Scans a file of the current format frame by frame.
fn replay_frames(bytes: &[u8], path: &Path, loader: &mut Loader) -> Scan {
    let mut scan = Scan::default();
    let mut pos = 0;
    if bytes.starts_with(FILE_HEADER) {
        pos = FILE_HEADER.len();
        scan.valid_end = pos;
    }
    // Start of the damaged region being crossed (bad frames since the last valid one).
    let mut bad_from = None;
    let mut frame = Vec::new();
    // A frame ends at the next zero byte; bytes after the last one are an unfinished frame.
    while let Some(n) = bytes
        .get(pos..)
        .and_then(|rest| rest.iter().position(|&b| b == 0))
    {
        let end = pos + n;
        let next = end + 1;
        match decode_frame(&bytes[pos..end], &mut frame) {
            Some(payload) => {
                if let Some(from) = bad_from.take() {
                    loader.damage(path, from, pos);
                    scan.damaged = true;
                }
                if let Err(error) = loader.apply(payload) {
                    // A good checksum over a bad payload: written by a different version.
                    let report = &mut loader.report;
                    report.corrupt_records = report.corrupt_records.saturating_add(1);
                    report.corrupt_bytes = report.corrupt_bytes.saturating_add((next - pos) as u64);
                    scan.damaged = true;
                    tracing::warn!(file = %path.display(), offset = pos, %error, "undecodable record skipped");
                }
                scan.valid_end = next;
            }
            None => {
                bad_from.get_or_insert(pos);
            }
        }
        pos = next;
    }
    scan.torn_tail = bytes.len() - scan.valid_end;
    scan
}

/// Scans a file of the previous format (`CHL1`) record by record, up to the first bad one.
/// What follows a bad record is not adopted: that format has no way to tell a record from
/// bytes inside a value. A record found after it only makes the file count as damaged.
fn replay_legacy(bytes: &[u8], path: &Path, loader: &mut Loader) -> Scan {
    let mut scan = Scan {
        legacy: true,
        ..Scan::default()
    };
    let mut pos = 0;
    while pos < bytes.len() {
        let Some(payload) = legacy_record_at(bytes, pos) else {
            if legacy_record_after(bytes, pos + 1) {
                let report = &mut loader.report;
                report.corrupt_records = report.corrupt_records.saturating_add(1);
                report.corrupt_bytes = report
                    .corrupt_bytes
                    .saturating_add((bytes.len() - pos) as u64);
                scan.damaged = true;
                scan.valid_end = bytes.len();
                tracing::warn!(
                    file = %path.display(),
                    offset = pos,
                    bytes = bytes.len() - pos,
                    "damaged record in a CHL1 file: the rest of the file is not trusted"
                );
            } else {
                scan.torn_tail = bytes.len() - pos;
            }
            return scan;
        };
        let next = pos + LEGACY_HEADER + payload.len();
        if let Err(error) = loader.apply(payload) {
            let report = &mut loader.report;
            report.corrupt_records = report.corrupt_records.saturating_add(1);
            report.corrupt_bytes = report.corrupt_bytes.saturating_add((next - pos) as u64);
            scan.damaged = true;
            tracing::warn!(file = %path.display(), offset = pos, %error, "undecodable record skipped");
        }
        pos = next;
        scan.valid_end = pos;
    }
    scan
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WALL: u64 = 1_700_000_000_000;

    fn entry(key: &str, t: u64, value: &[u8]) -> wire::Entry {
        wire::Entry {
            key: key.into(),
            hlc: Hlc::new(t, 0).0,
            node: 1,
            value: Some(Bytes::copy_from_slice(value)),
        }
    }

    fn record(entries: Vec<wire::Entry>) -> wire::LogRecord {
        wire::LogRecord {
            wall_ms: WALL,
            entries,
            removed: vec![],
        }
    }

    fn frame(r: &wire::LogRecord) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(r, &mut Vec::new(), &mut out);
        out
    }

    fn rec(key: &str, t: u64) -> Vec<u8> {
        frame(&record(vec![entry(key, t, b"v")]))
    }

    /// A record of the previous format (`CHL1`).
    fn legacy(r: &wire::LogRecord) -> Vec<u8> {
        let payload = r.encode_to_vec();
        let len = u32::try_from(payload.len()).unwrap().to_le_bytes();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&len);
        crc.update(&payload);
        [
            &LEGACY_MAGIC[..],
            &len,
            &crc.finalize().to_le_bytes(),
            &payload,
        ]
        .concat()
    }

    fn file(frames: &[Vec<u8>]) -> Vec<u8> {
        [&[FILE_HEADER.to_vec()], frames].concat().concat()
    }

    fn load(bytes: &[u8]) -> (State, LoadReport, Scan) {
        let mut loader = Loader {
            state: HashMap::new(),
            last_wall_ms: 0,
            report: LoadReport::default(),
        };
        let scan = replay(bytes, Path::new("t"), &mut loader);
        (loader.state, loader.report, scan)
    }

    #[test]
    fn scan_skips_a_damaged_middle_record_and_stops_at_a_torn_tail() {
        let (a, b, c) = (rec("a", 1), rec("b", 2), rec("c", 3));
        let mut bytes = file(&[a.clone(), b.clone(), c.clone()]);
        bytes[FILE_HEADER.len() + a.len() + 2] ^= 0x40;
        let (state, report, scan) = load(&bytes);
        assert!(state.contains_key("a") && state.contains_key("c") && !state.contains_key("b"));
        assert_eq!(report.corrupt_records, 1);
        assert_eq!(report.corrupt_bytes, b.len() as u64);
        assert!(scan.damaged);
        assert_eq!(scan.torn_tail, 0);

        let whole = file(&[a.clone(), b.clone(), c]);
        let cut = &whole[..whole.len() - 3];
        let (state, report, scan) = load(cut);
        assert_eq!(state.len(), 2);
        assert_eq!(report.corrupt_records, 0);
        assert_eq!(scan.valid_end, FILE_HEADER.len() + a.len() + b.len());
        assert_eq!(scan.torn_tail, cut.len() - scan.valid_end);
    }

    #[test]
    fn a_frame_that_lost_only_its_delimiter_is_torn() {
        let (a, b) = (rec("a", 1), rec("b", 2));
        let whole = file(&[a, b]);
        let (state, report, scan) = load(&whole[..whole.len() - 1]);
        assert_eq!(state.len(), 1, "b is not adopted without its delimiter");
        assert_eq!(report.corrupt_records, 0);
        assert!(scan.torn_tail > 0);
    }

    #[test]
    fn records_of_the_previous_format_load_up_to_the_first_bad_one() {
        let (a, b, c) = (
            legacy(&record(vec![entry("a", 1, b"1")])),
            legacy(&record(vec![entry("b", 2, b"2")])),
            legacy(&record(vec![entry("c", 3, b"3")])),
        );
        let (state, report, scan) = load(&[a.clone(), b.clone(), c.clone()].concat());
        assert_eq!(state.len(), 3);
        assert!(scan.legacy && !scan.damaged && scan.torn_tail == 0);
        assert_eq!(report.records, 3);

        let mut bytes = [a.clone(), b.clone(), c.clone()].concat();
        bytes[a.len() + LEGACY_HEADER + 1] ^= 0x10;
        let (state, report, scan) = load(&bytes);
        assert!(state.contains_key("a") && !state.contains_key("b"));
        assert!(
            !state.contains_key("c"),
            "nothing after a bad CHL1 record is adopted"
        );
        assert!(scan.damaged && report.corrupt_records == 1);

        let whole = [a, b].concat();
        let (state, _, scan) = load(&whole[..whole.len() - 2]);
        assert_eq!(state.len(), 1);
        assert!(!scan.damaged && scan.torn_tail > 0);
    }

    /// A value holding what would be a valid record in either format, at every alignment.
    fn forged_value() -> Vec<u8> {
        let evil = record(vec![entry("evil", 9, b"adopted")]);
        let mut value = Vec::new();
        for pad in 0..8 {
            value.extend(std::iter::repeat_n(0xAB, pad));
            value.extend(legacy(&evil));
            value.push(0);
            value.extend(frame(&evil));
            value.extend(FILE_HEADER);
            value.extend(frame(&evil));
        }
        value
    }

    #[test]
    fn resync_never_takes_bytes_inside_a_value_for_a_record() {
        let host = frame(&record(vec![entry("host", 5, &forged_value())]));
        let (a, c, d) = (rec("a", 1), rec("c", 3), rec("d", 4));
        let clean = file(&[a.clone(), host.clone(), c, d]);
        let (state, _, _) = load(&clean);
        assert_eq!(state.len(), 4);
        let delimiter = FILE_HEADER.len() + a.len() + host.len() - 1;
        let start = FILE_HEADER.len() + a.len();
        // Damage every byte of the record that holds the value, one at a time.
        for at in start..start + host.len() {
            for flip in [0x01, 0x80, 0xFF] {
                let mut bytes = clean.clone();
                bytes[at] ^= flip;
                let (state, report, scan) = load(&bytes);
                assert!(
                    !state.contains_key("evil"),
                    "adopted a record inside a value (byte {at} ^ {flip:#x})"
                );
                assert!(
                    state.contains_key("a") && state.contains_key("d"),
                    "byte {at}"
                );
                // A damaged delimiter joins the next frame to the damaged one.
                assert_eq!(state.contains_key("c"), at != delimiter, "byte {at}");
                assert!(scan.damaged && report.corrupt_records >= 1, "byte {at}");
            }
        }
    }

    #[test]
    fn a_previous_format_file_never_adopts_a_record_inside_a_value() {
        let host = legacy(&record(vec![entry("host", 5, &forged_value())]));
        let a = legacy(&record(vec![entry("a", 1, b"1")]));
        let clean = [a.clone(), host.clone()].concat();
        for at in [a.len(), a.len() + 5, a.len() + LEGACY_HEADER + 3] {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x55;
            let (state, _, scan) = load(&bytes);
            assert!(!state.contains_key("evil"), "byte {at}");
            assert!(state.contains_key("a"));
            assert!(
                scan.damaged,
                "a later valid-looking record marks the file damaged"
            );
        }
    }

    proptest! {
        #[test]
        fn cobs_round_trips_and_holds_no_zero(
            data in prop::collection::vec(prop_oneof![Just(0u8), Just(0xFFu8), any::<u8>()], 0..1200)
        ) {
            let mut enc = Vec::new();
            cobs_encode(&data, &mut enc);
            prop_assert!(!enc.contains(&0));
            prop_assert!(enc.len() <= data.len() + data.len() / 254 + 1);
            let mut dec = Vec::new();
            prop_assert!(cobs_decode(&enc, &mut dec).is_some());
            prop_assert_eq!(dec, data);
        }

        #[test]
        fn any_bytes_load_without_panic_and_within_their_size(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
            header in any::<bool>(),
        ) {
            let bytes = if header { [&FILE_HEADER[..], &bytes].concat() } else { bytes };
            let (state, report, scan) = load(&bytes);
            prop_assert!(scan.valid_end + scan.torn_tail <= bytes.len());
            prop_assert!(report.corrupt_bytes <= bytes.len() as u64);
            prop_assert!(state.keys().map(String::len).sum::<usize>() <= bytes.len());
        }

        #[test]
        fn damage_to_a_log_never_adopts_a_foreign_record(
            values in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..6),
            at in any::<prop::sample::Index>(),
            flip in 1u8..,
        ) {
            let mut frames = Vec::new();
            for (i, v) in values.iter().enumerate() {
                let mut v = v.clone();
                v.extend(forged_value());
                frames.push(frame(&record(vec![entry(&format!("k{i}"), i as u64 + 1, &v)])));
            }
            let mut bytes = file(&frames);
            let at = at.index(bytes.len());
            bytes[at] ^= flip;
            let (state, _, _) = load(&bytes);
            prop_assert!(!state.contains_key("evil"));
            for (k, (v, _)) in &state {
                let i: usize = k[1..].parse().unwrap();
                prop_assert_eq!(&v.as_ref().unwrap()[..values[i].len()], &values[i][..]);
            }
        }
    }

    #[test]
    fn a_record_claiming_many_entries_costs_only_what_it_holds() {
        // 200 000 empty entries (2 bytes each on disk) are skipped one by one: none is
        // kept, and no vector of 200 000 decoded entries is built first.
        let mut payload = Vec::new();
        for _ in 0..200_000 {
            payload.extend_from_slice(&[0x12, 0x00]);
        }
        let mut loader = Loader {
            state: HashMap::new(),
            last_wall_ms: 0,
            report: LoadReport::default(),
        };
        loader.apply(&payload).unwrap();
        assert!(loader.state.is_empty());
        // A length beyond the record is an error, not an allocation.
        assert!(loader.apply(&[0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]).is_err());
        assert!(loader.apply(&[0x08]).is_err());
    }

    #[test]
    fn the_apply_walker_reads_what_prost_writes() {
        let r = wire::LogRecord {
            wall_ms: WALL + 5,
            entries: vec![
                entry("a", 1, b"x"),
                entry("b", 2, b""),
                wire::Entry {
                    key: "t".into(),
                    hlc: Hlc::new(3, 0).0,
                    node: 7,
                    value: None,
                },
            ],
            removed: vec![wire::KeyVersion {
                key: "a".into(),
                hlc: Hlc::new(1, 0).0,
                node: 1,
            }],
        };
        let mut loader = Loader {
            state: HashMap::new(),
            last_wall_ms: 0,
            report: LoadReport::default(),
        };
        loader.apply(&r.encode_to_vec()).unwrap();
        assert_eq!(loader.last_wall_ms, WALL + 5);
        assert!(!loader.state.contains_key("a"), "removed at its version");
        assert_eq!(loader.state["b"].0.as_deref(), Some(&b""[..]));
        assert_eq!(loader.state["t"].0, None);
        assert_eq!(loader.state["t"].1.node, 7);
        assert_eq!(loader.report.records, 1);
    }

    #[test]
    fn many_removals_at_once_are_split_into_bounded_records() {
        let dir = TempDir::new("split");
        let (mut log, _) = DiskLog::open(&dir.0, DiskOptions::new(Fsync::Never)).unwrap();
        let removed: Vec<wire::KeyVersion> = (0..5000)
            .map(|i| wire::KeyVersion {
                key: format!("{i:0>200}"),
                hlc: Hlc::new(1, 0).0,
                node: 1,
            })
            .collect();
        log.append(
            &wire::LogRecord {
                wall_ms: WALL,
                entries: vec![],
                removed,
            },
            false,
        );
        let frames: Vec<&[u8]> = log
            .buf
            .split(|b| *b == 0)
            .filter(|f| !f.is_empty())
            .collect();
        assert!(frames.len() >= 15, "{} frames", frames.len());
        assert!(frames.iter().all(|f| f.len() <= SNAPSHOT_CHUNK + 1024));
        assert_eq!(log.stats.records_written, frames.len() as u64);
    }

    #[test]
    fn fsync_policy_parses_and_prints() {
        for s in ["always", "never", "interval:250"] {
            assert_eq!(s.parse::<Fsync>().unwrap().to_string(), s);
        }
        assert!("interval:0".parse::<Fsync>().is_err());
        assert!("sometimes".parse::<Fsync>().is_err());
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!(
                "chorus-durable-unit-{name}-{}-{n}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Every file of `dir` (name → bytes; directories as empty).
    fn snapshot_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                let bytes = if e.file_type().unwrap().is_file() {
                    fs::read(e.path()).unwrap()
                } else {
                    Vec::new()
                };
                (name, bytes)
            })
            .collect()
    }

    /// A data directory whose log and snapshot are both damaged (so a repair sets two files
    /// aside), with `k0..k9` intact besides.
    fn damaged_dir(name: &str) -> TempDir {
        let dir = TempDir::new(name);
        let opts = DiskOptions::new(Fsync::Never);
        let (mut log, _) = DiskLog::open(&dir.0, opts).unwrap();
        let mut store = BTreeMap::new();
        for i in 0..10u64 {
            store.insert(
                format!("k{i}"),
                Entry {
                    value: Some(Bytes::from(vec![b'v'; 40_000])),
                    version: Version {
                        hlc: Hlc::new(WALL + i, 0),
                        node: 1,
                    },
                    revision: 0,
                },
            );
        }
        log.compact(&store, WALL).unwrap();
        for i in 0..5u64 {
            log.append(
                &record(vec![entry(&format!("w{i}"), WALL + 100 + i, b"x")]),
                false,
            );
            log.flush(Instant::now(), true).unwrap();
        }
        drop(log);
        for prefix in ["snapshot-", "wal-"] {
            let path = fs::read_dir(&dir.0)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with(prefix))
                .unwrap();
            let mut bytes = fs::read(&path).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x5A;
            fs::write(&path, &bytes).unwrap();
        }
        dir
    }

    const REPAIR_STEPS: &[(&str, usize)] = &[
        ("create snapshot", 0),
        ("write snapshot", 0),
        ("fsync snapshot", 0),
        ("rename snapshot", 0),
        ("fsync directory", 0),
        ("create log", 0),
        ("write log", 0),
        ("fsync log", 0),
        ("fsync directory again", 0),
        ("set aside", 0),
        ("set aside", 1),
        ("fsync directory after setting aside", 0),
    ];

    #[test]
    fn a_repair_that_fails_at_any_step_leaves_the_directory_as_it_was() {
        for &(step_name, skip) in REPAIR_STEPS {
            let dir = damaged_dir("fault");
            let before = snapshot_of(&dir.0);
            FAULTS.with(|f| *f.borrow_mut() = vec![(step_name, skip)]);
            let err = DiskLog::open(&dir.0, DiskOptions::new(Fsync::Never)).unwrap_err();
            FAULTS.with(|f| f.borrow_mut().clear());
            match &err {
                DurableError::Repair {
                    why, undo_error, ..
                } => {
                    assert_eq!(*why, "is damaged");
                    assert!(undo_error.is_none(), "{step_name}: {err}");
                }
                other => panic!("{step_name}: expected Repair, got {other:?}"),
            }
            let text = err.to_string();
            assert!(text.contains(step_name), "{text}");
            assert!(text.contains("left exactly as it was"), "{text}");
            assert_eq!(
                snapshot_of(&dir.0),
                before,
                "{step_name} #{skip}: directory changed"
            );

            // Once the cause is gone the repair goes through.
            let (log, loaded) = DiskLog::open(&dir.0, DiskOptions::new(Fsync::Never)).unwrap();
            assert!(loaded.damaged());
            drop(log);
            let names: Vec<String> = snapshot_of(&dir.0).into_keys().collect();
            assert_eq!(
                names.iter().filter(|n| n.ends_with(".corrupt")).count(),
                2,
                "{names:?}"
            );
            let (_, again) = DiskLog::open(&dir.0, DiskOptions::new(Fsync::Never)).unwrap();
            assert!(!again.damaged());
            assert_eq!(again.entries, loaded.entries);
        }
    }

    #[test]
    fn a_failed_undo_is_reported_as_such() {
        let dir = damaged_dir("undo");
        FAULTS.with(|f| *f.borrow_mut() = vec![("set aside", 1), ("undo rename", 0)]);
        let err = DiskLog::open(&dir.0, DiskOptions::new(Fsync::Never)).unwrap_err();
        FAULTS.with(|f| f.borrow_mut().clear());
        let DurableError::Repair { undo_error, .. } = &err else {
            panic!("expected Repair, got {err:?}");
        };
        assert!(undo_error.is_some());
        let text = err.to_string();
        assert!(
            text.contains("undoing the partial repair failed too"),
            "{text}"
        );
        // Whatever was left, the next start finds every intact entry.
        let (_, loaded) = DiskLog::open(&dir.0, DiskOptions::new(Fsync::Never)).unwrap();
        assert!(loaded.entries.len() >= 10, "{}", loaded.entries.len());
    }

    #[test]
    fn a_compaction_that_fails_is_undone_and_the_old_log_stays_in_use() {
        for &(step_name, _) in &REPAIR_STEPS[..9] {
            let dir = TempDir::new("compact-fault");
            let opts = DiskOptions::new(Fsync::Never);
            let (mut log, _) = DiskLog::open(&dir.0, opts).unwrap();
            log.append(&record(vec![entry("a", WALL, b"1")]), true);
            log.flush(Instant::now(), true).unwrap();
            let before = snapshot_of(&dir.0);
            FAULTS.with(|f| *f.borrow_mut() = vec![(step_name, 0)]);
            let store = BTreeMap::new();
            assert!(log.compact(&store, WALL).is_err(), "{step_name}");
            FAULTS.with(|f| f.borrow_mut().clear());
            assert_eq!(snapshot_of(&dir.0), before, "{step_name}");
            assert_eq!(log.stats.failed, 0, "{step_name}: undone, not failed");
            log.append(&record(vec![entry("b", WALL, b"2")]), true);
            log.flush(Instant::now(), true).unwrap();
            drop(log);
            let (_, loaded) = DiskLog::open(&dir.0, opts).unwrap();
            let keys: Vec<&str> = loaded.entries.iter().map(|e| e.0.as_str()).collect();
            assert_eq!(keys, ["a", "b"], "{step_name}");
        }
    }
}
