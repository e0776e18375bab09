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
//! `wal-<gen>` (every change after that snapshot, appended). Both are sequences of records:
//!
//! ```text
//! [magic "CHL1" 4 B][len u32 LE][crc32 u32 LE of (len bytes ++ payload)][payload: LogRecord]
//! ```
//!
//! `LogRecord` (in `proto/replication.proto`) holds upserted entries and removed
//! `(key, version)` pairs. Replay merges entries by last writer wins and removes a key only
//! if it still holds the removed version, so replay is idempotent and replaying an old log
//! over a newer snapshot cannot go backwards.
//!
//! On open, a record that fails its checks is handled by where it is:
//! - followed by no valid record: a **torn tail** (a write cut short by a crash); the file is
//!   truncated back to the end of the last valid record;
//! - followed by a valid record: **corruption**; the damaged bytes are skipped, counted and
//!   reported with `tracing::warn!` naming the file and offset, and scanning resumes at the
//!   next record (found by its magic and a good checksum). The damaged file is kept as
//!   `<name>.corrupt` and a fresh snapshot of what was intact is written, and the replica
//!   marks itself as not knowing what it lacks, so its peers fill the gap by anti-entropy.
//!
//! # Compaction
//! Once the log exceeds `compact_factor` × the last snapshot's size (and at least
//! `compact_min_bytes`), the replica hands the whole store to [`Durability::compact`]:
//! `snapshot-<gen+1>.tmp` is written, fsynced, renamed and the directory fsynced; then an
//! empty `wal-<gen+1>` replaces the old log and the old files are deleted. A crash at any
//! point leaves either the old pair or the new snapshot (with no or an empty log), both
//! complete.

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

/// First bytes of every record.
const MAGIC: [u8; 4] = *b"CHL1";
/// Magic, length and checksum.
const HEADER: usize = 12;
/// Largest record payload accepted on load; a larger length field is damage.
const MAX_RECORD: usize = 64 << 20;
/// Under [`Fsync::Always`], changes that came from peers (they can be fetched again) are
/// fsynced with the next local write or at the latest this long after they were written.
const RELAXED_SYNC: Duration = Duration::from_secs(1);
/// Target payload size of one snapshot record: damage to one loses at most this much.
const SNAPSHOT_CHUNK: usize = 64 * 1024;

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
    wal: File,
    wal_path: PathBuf,
    /// Framed records not yet written to the file.
    buf: Vec<u8>,
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
    /// Opens (creating if needed) the data directory `dir`, loads what it holds, repairs a
    /// torn tail, sets damaged files aside and returns the log ready for appends with the
    /// loaded store.
    ///
    /// # Errors
    /// The directory cannot be created, locked, read or written; another process holds it.
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

        let mut snapshots = Vec::new();
        let mut wals = Vec::new();
        for item in fs::read_dir(dir).map_err(io_err("read", dir))? {
            let item = item.map_err(io_err("read", dir))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                // An interrupted snapshot: never renamed, so never part of the state.
                let _ = fs::remove_file(item.path());
            } else if let Some(g) = parse_gen(name, "snapshot-") {
                snapshots.push(g);
            } else if let Some(g) = parse_gen(name, "wal-") {
                wals.push(g);
            }
        }
        let generation = snapshots.iter().copied().max().unwrap_or(0);
        let mut state: State = HashMap::new();
        let mut report = LoadReport {
            generation,
            ..LoadReport::default()
        };
        let mut last_wall_ms = 0;
        let mut damaged_files = Vec::new();

        let snap_path = dir.join(snapshot_name(generation));
        let mut snapshot_bytes = 0;
        if snapshots.contains(&generation) {
            let bytes = fs::read(&snap_path).map_err(io_err("read", &snap_path))?;
            snapshot_bytes = bytes.len() as u64;
            let scan = replay(
                &bytes,
                &snap_path,
                &mut state,
                &mut last_wall_ms,
                &mut report,
            );
            if scan.torn_tail > 0 {
                // A snapshot is fsynced before it is renamed: a short one is damage too.
                report.corrupt_records += 1;
                report.corrupt_bytes += scan.torn_tail as u64;
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
        let mut wal_len = 0;
        if wals.contains(&generation) {
            let bytes = fs::read(&wal_path).map_err(io_err("read", &wal_path))?;
            let scan = replay(
                &bytes,
                &wal_path,
                &mut state,
                &mut last_wall_ms,
                &mut report,
            );
            wal_len = scan.valid_end as u64;
            if scan.torn_tail > 0 {
                report.torn_tail_bytes = scan.torn_tail as u64;
                tracing::warn!(
                    file = %wal_path.display(),
                    offset = scan.valid_end,
                    bytes = scan.torn_tail,
                    "log ends in a torn record (a write cut short); truncated"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(&wal_path)
                    .map_err(io_err("open", &wal_path))?;
                f.set_len(wal_len).map_err(io_err("truncate", &wal_path))?;
                f.sync_all().map_err(io_err("fsync", &wal_path))?;
            }
            if scan.damaged {
                damaged_files.push(wal_path.clone());
                wal_len = bytes.len() as u64;
            }
        }
        // Older generations are leftovers of a compaction interrupted after its rename.
        for g in snapshots.iter().filter(|g| **g < generation) {
            let _ = fs::remove_file(dir.join(snapshot_name(*g)));
        }
        for g in wals.iter().filter(|g| **g < generation) {
            let _ = fs::remove_file(dir.join(wal_name(*g)));
        }
        for g in wals.iter().filter(|g| **g > generation) {
            tracing::warn!(
                file = %dir.join(wal_name(*g)).display(),
                "log of a generation with no snapshot ignored"
            );
        }

        let wal = open_append(&wal_path)?;
        sync_dir(dir)?;
        let mut entries: Vec<(String, Option<Bytes>, Version)> =
            state.into_iter().map(|(k, (v, ver))| (k, v, ver)).collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut log = DiskLog {
            dir: dir.to_owned(),
            options,
            generation,
            wal,
            wal_path,
            buf: Vec::new(),
            local_pending: false,
            unsynced_since: None,
            failed: None,
            retry_compaction_at: 0,
            stats: DurableStats {
                wal_bytes: wal_len,
                snapshot_bytes,
                loaded_entries: entries.len() as u64,
                corrupt_records: report.corrupt_records,
                corrupt_bytes: report.corrupt_bytes,
                torn_tail_bytes: report.torn_tail_bytes,
                ..DurableStats::default()
            },
            _lock: lock,
        };
        if !damaged_files.is_empty() {
            tracing::warn!(
                dir = %dir.display(),
                damaged_regions = report.corrupt_records,
                damaged_bytes = report.corrupt_bytes,
                kept_entries = entries.len(),
                "data directory damaged: intact records kept, damaged files set aside as *.corrupt, the rest will be recovered from peers"
            );
            for path in &damaged_files {
                let mut aside = path.clone().into_os_string();
                aside.push(".corrupt");
                fs::rename(path, &aside).map_err(io_err("rename", path))?;
            }
            // Rewrite what was intact as a fresh snapshot, so the damage is not met again.
            let map: BTreeMap<String, Entry> = entries
                .iter()
                .map(|(k, v, ver)| {
                    (
                        k.clone(),
                        Entry {
                            value: v.clone(),
                            version: *ver,
                            revision: 0,
                        },
                    )
                })
                .collect();
            log.write_snapshot(&map, last_wall_ms)?;
        }
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

    /// Writes `entries` as snapshot `generation + 1`, starts its empty log and deletes the
    /// old pair. Errors before the rename leave the old pair in use.
    fn write_snapshot(
        &mut self,
        entries: &BTreeMap<String, Entry>,
        wall_ms: u64,
    ) -> Result<(), DurableError> {
        let next = self.generation + 1;
        let final_path = self.dir.join(snapshot_name(next));
        let tmp_path = self.dir.join(format!("{}.tmp", snapshot_name(next)));
        let written = write_snapshot_file(&tmp_path, entries, wall_ms);
        let size = match written {
            Ok(size) => size,
            Err(e) => {
                let _ = fs::remove_file(&tmp_path);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&tmp_path, &final_path) {
            let _ = fs::remove_file(&tmp_path);
            return Err(io_err("rename", &tmp_path)(e));
        }
        // From here on the new snapshot is the state: failures are fatal for the log.
        let switched = (|| {
            sync_dir(&self.dir)?;
            let wal_path = self.dir.join(wal_name(next));
            let wal = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&wal_path)
                .map_err(io_err("open", &wal_path))?;
            sync_dir(&self.dir)?;
            Ok::<_, DurableError>((wal, wal_path))
        })();
        let (wal, wal_path) = match switched {
            Ok(w) => w,
            Err(e) => return Err(self.fail(e)),
        };
        let old_wal = std::mem::replace(&mut self.wal_path, wal_path);
        self.wal = wal;
        let _ = fs::remove_file(&old_wal);
        let _ = fs::remove_file(self.dir.join(snapshot_name(self.generation)));
        self.generation = next;
        self.buf.clear();
        self.local_pending = false;
        self.unsynced_since = None;
        self.stats.snapshots += 1;
        self.stats.snapshot_bytes = size;
        self.stats.wal_bytes = 0;
        Ok(())
    }
}

impl Durability for DiskLog {
    fn append(&mut self, record: &wire::LogRecord, local: bool) {
        if self.failed.is_some() {
            return;
        }
        frame(&record.encode_to_vec(), &mut self.buf);
        self.stats.records_written += 1;
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
            self.stats.bytes_written += n;
            self.stats.wal_bytes += n;
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
            self.stats.fsyncs += 1;
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
            self.stats.compaction_errors += 1;
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

fn open_append(path: &Path) -> Result<File, DurableError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err("open", path))
}

fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

fn write_snapshot_file(
    path: &Path,
    entries: &BTreeMap<String, Entry>,
    wall_ms: u64,
) -> Result<u64, DurableError> {
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(io_err("create", path))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut size = 0u64;
    let mut framed = Vec::with_capacity(SNAPSHOT_CHUNK + 1024);
    let mut record = wire::LogRecord {
        wall_ms,
        entries: Vec::new(),
        removed: Vec::new(),
    };
    let mut chunk = 0usize;
    let mut emit = |record: &mut wire::LogRecord, out: &mut BufWriter<File>| {
        framed.clear();
        frame(&record.encode_to_vec(), &mut framed);
        record.entries.clear();
        size += framed.len() as u64;
        out.write_all(&framed).map_err(io_err("write", path))
    };
    for (key, e) in entries {
        chunk += key.len() + e.value.as_ref().map_or(0, Bytes::len) + 24;
        record.entries.push(wire::Entry {
            key: key.clone(),
            hlc: e.version.hlc.0,
            node: e.version.node,
            value: e.value.clone(),
        });
        if chunk >= SNAPSHOT_CHUNK {
            emit(&mut record, &mut out)?;
            chunk = 0;
        }
    }
    if !record.entries.is_empty() || entries.is_empty() {
        emit(&mut record, &mut out)?;
    }
    let file = out
        .into_inner()
        .map_err(|e| io_err("write", path)(e.into_error()))?;
    file.sync_all().map_err(io_err("fsync", path))?;
    Ok(size)
}

/// Appends one framed record: magic, length, checksum, payload.
fn frame(payload: &[u8], out: &mut Vec<u8>) {
    // Payloads are bounded by the replica's limits (a write message, a 64 KiB snapshot chunk
    // plus one entry), far below 4 GiB.
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(payload);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// The payload of a valid record starting at `pos`, if there is one.
fn record_at(bytes: &[u8], pos: usize) -> Option<&[u8]> {
    let header = bytes.get(pos..pos.checked_add(HEADER)?)?;
    if header[..4] != MAGIC {
        return None;
    }
    let len_bytes: [u8; 4] = header[4..8].try_into().ok()?;
    let crc_bytes: [u8; 4] = header[8..12].try_into().ok()?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > MAX_RECORD {
        return None;
    }
    let payload = bytes.get(pos + HEADER..pos + HEADER + len)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len_bytes);
    crc.update(payload);
    (crc.finalize() == u32::from_le_bytes(crc_bytes)).then_some(payload)
}

/// The next offset at or after `from` where a valid record starts.
fn next_record(bytes: &[u8], from: usize) -> Option<usize> {
    let mut pos = from;
    while pos + HEADER <= bytes.len() {
        let found = bytes[pos..].windows(4).position(|w| w == MAGIC)?;
        pos += found;
        if record_at(bytes, pos).is_some() {
            return Some(pos);
        }
        pos += 1;
    }
    None
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
}

/// Scans `bytes` record by record, merging each valid record into `state`.
fn replay(
    bytes: &[u8],
    path: &Path,
    state: &mut State,
    last_wall_ms: &mut u64,
    report: &mut LoadReport,
) -> Scan {
    let mut scan = Scan::default();
    let mut pos = 0;
    while pos < bytes.len() {
        if let Some(payload) = record_at(bytes, pos) {
            let next = pos + HEADER + payload.len();
            match wire::LogRecord::decode(payload) {
                Ok(record) => {
                    report.records += 1;
                    merge(record, state, last_wall_ms);
                }
                Err(error) => {
                    // A good checksum over a bad payload: written by a different version.
                    report.corrupt_records += 1;
                    report.corrupt_bytes += (next - pos) as u64;
                    scan.damaged = true;
                    tracing::warn!(file = %path.display(), offset = pos, %error, "undecodable record skipped");
                }
            }
            pos = next;
            scan.valid_end = pos;
            continue;
        }
        match next_record(bytes, pos + 1) {
            Some(next) => {
                report.corrupt_records += 1;
                report.corrupt_bytes += (next - pos) as u64;
                scan.damaged = true;
                tracing::warn!(
                    file = %path.display(),
                    offset = pos,
                    bytes = next - pos,
                    resumed_at = next,
                    "damaged record skipped (bad magic, length or checksum)"
                );
                pos = next;
            }
            None => {
                scan.torn_tail = bytes.len() - pos;
                break;
            }
        }
    }
    scan
}

fn merge(record: wire::LogRecord, state: &mut State, last_wall_ms: &mut u64) {
    *last_wall_ms = (*last_wall_ms).max(record.wall_ms);
    for e in record.entries {
        if e.key.is_empty() {
            continue;
        }
        let version = Version {
            hlc: Hlc(e.hlc),
            node: e.node,
        };
        *last_wall_ms = (*last_wall_ms).max(version.hlc.physical_ms());
        match state.get_mut(&e.key) {
            Some(cur) if cur.1 >= version => {}
            Some(cur) => *cur = (e.value, version),
            None => {
                state.insert(e.key, (e.value, version));
            }
        }
    }
    for r in record.removed {
        let version = Version {
            hlc: Hlc(r.hlc),
            node: r.node,
        };
        if state.get(&r.key).is_some_and(|cur| cur.1 == version) {
            state.remove(&r.key);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rec(key: &str, t: u64) -> Vec<u8> {
        let r = wire::LogRecord {
            wall_ms: t,
            entries: vec![wire::Entry {
                key: key.into(),
                hlc: Hlc::new(t, 0).0,
                node: 1,
                value: Some(Bytes::from_static(b"v")),
            }],
            removed: vec![],
        };
        let mut out = Vec::new();
        frame(&r.encode_to_vec(), &mut out);
        out
    }

    fn load(bytes: &[u8]) -> (State, LoadReport, Scan) {
        let mut state = HashMap::new();
        let mut report = LoadReport::default();
        let mut wall = 0;
        let scan = replay(bytes, Path::new("t"), &mut state, &mut wall, &mut report);
        (state, report, scan)
    }

    #[test]
    fn scan_skips_a_damaged_middle_record_and_stops_at_a_torn_tail() {
        let (a, b, c) = (rec("a", 1), rec("b", 2), rec("c", 3));
        let mut bytes = [a.clone(), b.clone(), c.clone()].concat();
        bytes[a.len() + HEADER + 2] ^= 0x40;
        let (state, report, scan) = load(&bytes);
        assert!(state.contains_key("a") && state.contains_key("c") && !state.contains_key("b"));
        assert_eq!(report.corrupt_records, 1);
        assert_eq!(report.corrupt_bytes, b.len() as u64);
        assert!(scan.damaged);
        assert_eq!(scan.torn_tail, 0);

        let whole = [a.clone(), b.clone(), c].concat();
        let cut = &whole[..whole.len() - 3];
        let (state, report, scan) = load(cut);
        assert_eq!(state.len(), 2);
        assert_eq!(report.corrupt_records, 0);
        assert_eq!(scan.valid_end, a.len() + b.len());
        assert_eq!(scan.torn_tail, cut.len() - scan.valid_end);
    }

    #[test]
    fn fsync_policy_parses_and_prints() {
        for s in ["always", "never", "interval:250"] {
            assert_eq!(s.parse::<Fsync>().unwrap().to_string(), s);
        }
        assert!("interval:0".parse::<Fsync>().is_err());
        assert!("sometimes".parse::<Fsync>().is_err());
    }
}
