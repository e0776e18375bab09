//! [`DiskLog`]: the data directory of one node, opened, loaded, appended to and fsynced as
//! the policy says. Compaction is in `compact.rs`, a whole-generation install (repair) in
//! `install.rs`.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chorus_replication::{
    DurableError, DurableStats, Fsync, LoadReport, Loaded, MergedState, Origin, wire,
};

use crate::compact::Compaction;
use crate::files::{
    Listing, generations_exhausted, io_err, open_log, read_file, snapshot_name, wal_name,
};
use crate::install::repair;
use crate::record::{FILE_HEADER, SNAPSHOT_CHUNK, encode_frame, removal_size, split_by_size};
use crate::replay::{Loader, replay};

/// Under [`Fsync::Always`], changes that came from peers (they can be fetched again) are
/// fsynced with the next local write or at the latest this long after they were written.
pub(crate) const RELAXED_SYNC: Duration = Duration::from_secs(1);

/// How a [`DiskLog::flush`] syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushMode {
    /// As the fsync policy says.
    Policy,
    /// Fsync whatever was written, whatever the policy (shutdown).
    SyncAll,
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

/// The file backend: a write-ahead log plus snapshots in one directory (see the crate doc).
///
/// Synchronous: the storage thread ([`Storage`](crate::Storage)) drives one; tests drive
/// one directly. Records come in as [`append`](DiskLog::append) with the `seq` the node gave
/// them; [`through`](DiskLog::through) says how far they are durable as the policy requires.
pub struct DiskLog {
    pub(crate) dir: PathBuf,
    pub(crate) options: DiskOptions,
    pub(crate) generation: u64,
    /// Generation of the next snapshot: above every generation found in the directory, so
    /// no file there is ever overwritten. `None` once `u64::MAX` is in use.
    pub(crate) next_generation: Option<u64>,
    pub(crate) wal: File,
    pub(crate) wal_path: PathBuf,
    /// Framed records not yet written to the file.
    pub(crate) buf: Vec<u8>,
    /// One record being encoded, before it is framed (reused).
    scratch: Vec<u8>,
    /// Highest `seq` framed into `buf`, written to the operating system, fsynced.
    buffered_through: u64,
    pub(crate) written_through: u64,
    pub(crate) synced_through: u64,
    /// A local write waits in the buffer or in unsynced file data.
    pub(crate) local_pending: bool,
    /// Since when written data has waited for an fsync.
    pub(crate) unsynced_since: Option<Instant>,
    /// Set after a write or fsync error: nothing is written again.
    pub(crate) failed: Option<String>,
    /// No compaction attempt before the log reaches this size (after a failed attempt).
    pub(crate) retry_compaction_at: u64,
    /// A compaction in progress (see `compact.rs`).
    pub(crate) compaction: Option<Compaction>,
    pub(crate) stats: DurableStats,
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
            state: MergedState::new(),
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

        let Loader { state, report } = loader;
        let (entries, last_wall_ms) = state.into_sorted();

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
            buffered_through: 0,
            written_through: 0,
            synced_through: 0,
            local_pending: false,
            unsynced_since: None,
            failed: None,
            retry_compaction_at: 0,
            compaction: None,
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

    /// The options it was opened with.
    #[must_use]
    pub fn options(&self) -> DiskOptions {
        self.options
    }

    pub(crate) fn fail(&mut self, e: DurableError) -> DurableError {
        tracing::error!(error = %e, "durable storage failed; writes are no longer persisted");
        self.failed = Some(e.to_string());
        self.stats.failed = 1;
        self.buf = Vec::new();
        e
    }

    /// The error every call returns once the log failed.
    pub(crate) fn failed_error(&self) -> Option<DurableError> {
        self.failed.clone().map(DurableError::Failed)
    }

    /// Frames one record into the write buffer.
    fn push_record(&mut self, record: &wire::LogRecord) {
        encode_frame(record, &mut self.scratch, &mut self.buf);
        self.stats.records_written = self.stats.records_written.saturating_add(1);
    }

    /// Queues record `seq` (`origin`: a local write, which the node acknowledges once it is
    /// durable, or not). Never blocks on the disk: [`flush`](DiskLog::flush) writes.
    pub fn append(&mut self, seq: u64, record: &wire::LogRecord, origin: Origin) {
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
        self.buffered_through = self.buffered_through.max(seq);
        self.local_pending |= origin == Origin::Local;
    }

    /// Writes queued records to the log (and, during a compaction, to the next generation's
    /// log too) and fsyncs as `mode` says.
    ///
    /// # Errors
    /// The write or fsync failed; the log is then failed for good.
    pub fn flush(&mut self, now: Instant, mode: FlushMode) -> Result<(), DurableError> {
        if let Some(e) = self.failed_error() {
            return Err(e);
        }
        if !self.buf.is_empty() {
            if let Err(e) = self.wal.write_all(&self.buf) {
                let e = io_err("write", &self.wal_path)(e);
                return Err(self.fail(e));
            }
            let n = self.buf.len() as u64;
            self.stats.bytes_written = self.stats.bytes_written.saturating_add(n);
            self.stats.wal_bytes = self.stats.wal_bytes.saturating_add(n);
            self.copy_to_next_generation();
            self.buf.clear();
            self.unsynced_since.get_or_insert(now);
        }
        self.written_through = self.buffered_through;
        let Some(since) = self.unsynced_since else {
            return Ok(());
        };
        let due = mode == FlushMode::SyncAll
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
            self.synced_through = self.written_through;
        }
        Ok(())
    }

    /// Highest `seq` durable as the policy requires before a local write is acknowledged:
    /// fsynced under [`Fsync::Always`]; written to the operating system (it survives
    /// `kill -9`) under the other policies.
    #[must_use]
    pub fn through(&self) -> u64 {
        match self.options.fsync {
            Fsync::Always => self.synced_through,
            Fsync::Interval(_) | Fsync::Never => self.written_through,
        }
    }

    /// When `flush` should be called next to honour the fsync policy, if anything waits.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
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

    /// Whether the log has grown enough to be replaced by a snapshot (and no compaction is
    /// running).
    #[must_use]
    pub fn wants_compaction(&self) -> bool {
        let threshold = self
            .stats
            .snapshot_bytes
            .saturating_mul(u64::from(self.options.compact_factor.get()))
            .max(self.options.compact_min_bytes)
            .max(self.retry_compaction_at);
        self.failed.is_none() && self.compaction.is_none() && self.stats.wal_bytes > threshold
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> DurableStats {
        self.stats.clone()
    }
}
