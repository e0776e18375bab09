//! Compaction off the driver: the next generation's snapshot is written from a
//! [`SnapshotSource`] (the live store) in chunks, while records keep being appended to the
//! old log *and* to the next generation's log; then the new pair is installed.
//!
//! Steps (each named for the unit tests' failure injection):
//! 1. `start`: create the next generation's empty log `wal-<g+1>` ("create log", "write
//!    log") and `snapshot-<g+1>.tmp` ("create snapshot", "write snapshot"). The cut: every
//!    record appended before is in the store already, and every record after goes to both
//!    logs.
//! 2. `continue`: one chunk of entries after the last key written, in key order, read from
//!    the store without any store-wide lock (a *fuzzy* snapshot: each key at some state at
//!    or after the cut).
//! 3. `install`: fsync the snapshot ("fsync snapshot") and the new log ("fsync log"), fsync
//!    the directory ("fsync directory again": the new log's name is durable before the
//!    snapshot that needs it), rename the snapshot into place ("rename snapshot"), fsync the
//!    directory ("fsync directory"); then delete the old pair.
//!
//! The state the next start loads is exact: replay merges by last writer wins with removals
//! conditional on the version, so replaying every record after the cut over a fuzzy snapshot
//! gives the state those records lead to (tested by a proptest below). A crash at any point
//! leaves a complete pair: before the rename the old pair (its log has every record; the
//! `.tmp` is deleted and the new log, having no snapshot, is ignored at the next start);
//! after it the new pair (the new log was fsynced before the rename and holds every record
//! after the cut). A failure is undone (the new files are removed) and the old log stays in
//! use; if even the undo fails after the rename, the log fails (the new snapshot could win
//! over later appends at the next start).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write as _};
use std::path::PathBuf;

use bytes::Bytes;
use chorus_replication::{DurableError, Entry, Store, wire};

use crate::disk::DiskLog;
use crate::files::{
    create_file, generations_exhausted, io_err, snapshot_name, step, sync_dir_step, wal_name,
};
use crate::install::undo_create;
use crate::record::{ENTRY_OVERHEAD, FILE_HEADER, SNAPSHOT_CHUNK, encode_frame};

/// Entries per read of the source: how much one step writes before the storage thread looks
/// at its queue again (appends wait at most for one step). A read is a range of the store's
/// ordered index, O(log n + step), holding one entry at a time.
pub const ENTRIES_PER_STEP: usize = 4096;

/// Where a snapshot's entries come from: walked in key order, a chunk at a time.
pub trait SnapshotSource {
    /// Up to `limit` entries (tombstones included) with keys after `after`, in key order
    /// (see [`Store::entries_after`]).
    fn entries_after(&self, after: Option<&str>, limit: usize) -> Vec<(String, Entry)>;
}

impl SnapshotSource for Store {
    fn entries_after(&self, after: Option<&str>, limit: usize) -> Vec<(String, Entry)> {
        Store::entries_after(self, after, limit)
    }
}

impl SnapshotSource for BTreeMap<String, Entry> {
    fn entries_after(&self, after: Option<&str>, limit: usize) -> Vec<(String, Entry)> {
        use std::ops::Bound;
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.range::<str, _>((lower, Bound::Unbounded))
            .take(limit)
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }
}

/// Whether a compaction step finished it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compacting {
    /// More entries to write: call [`DiskLog::continue_compaction`] again.
    More,
    /// The new generation is installed and in use.
    Done,
}

/// A compaction in progress.
pub(crate) struct Compaction {
    generation: u64,
    tmp: PathBuf,
    /// The snapshot being written (taken when it is fsynced).
    out: Option<BufWriter<File>>,
    wal: File,
    wal_path: PathBuf,
    /// Bytes of the new log.
    wal_bytes: u64,
    /// Last key written to the snapshot.
    cursor: Option<String>,
    /// Entries per read of the source (set at the first read).
    step: usize,
    /// The snapshot record being filled, and its size so far.
    record: wire::LogRecord,
    chunk: usize,
    snapshot_bytes: u64,
    scratch: Vec<u8>,
    framed: Vec<u8>,
}

impl DiskLog {
    /// Replaces the log by a snapshot of `source` in one go (start, every chunk, install):
    /// what the storage thread does step by step.
    ///
    /// # Errors
    /// The snapshot could not be written; the old log stays in use and complete.
    pub fn compact(
        &mut self,
        source: &dyn SnapshotSource,
        wall_ms: u64,
    ) -> Result<(), DurableError> {
        self.start_compaction(wall_ms)?;
        while self.continue_compaction(source)? == Compacting::More {}
        Ok(())
    }

    /// Whether a compaction is in progress.
    #[must_use]
    pub fn is_compacting(&self) -> bool {
        self.compaction.is_some()
    }

    /// Starts a compaction: writes what is queued, creates the next generation's log and
    /// snapshot file. From now on [`flush`](DiskLog::flush) writes to both logs.
    ///
    /// # Errors
    /// A file could not be created or written (undone; the old log stays in use).
    pub fn start_compaction(&mut self, wall_ms: u64) -> Result<(), DurableError> {
        if let Some(e) = self.failed_error() {
            return Err(e);
        }
        if self.compaction.is_some() {
            return Ok(());
        }
        let Some(next) = self.next_generation else {
            return Err(self.compaction_failed(generations_exhausted(&self.dir)));
        };
        // The cut: everything queued so far is in the store already.
        if !self.buf.is_empty() {
            self.flush(std::time::Instant::now(), crate::FlushMode::Policy)?;
        }
        let wal_path = self.dir.join(wal_name(next));
        let tmp = self.dir.join(format!("{}.tmp", snapshot_name(next)));
        let mut created = Vec::new();
        let started = (|| {
            let mut wal = create_file(&wal_path, true, "create log")?;
            created.push(wal_path.clone());
            step("write log")
                .and_then(|()| wal.write_all(FILE_HEADER))
                .map_err(io_err("write", &wal_path))?;
            let file = create_file(&tmp, false, "create snapshot")?;
            created.push(tmp.clone());
            let mut out = BufWriter::with_capacity(1 << 20, file);
            step("write snapshot")
                .and_then(|()| out.write_all(FILE_HEADER))
                .map_err(io_err("write", &tmp))?;
            Ok::<_, DurableError>((wal, out))
        })();
        match started {
            Ok((wal, out)) => {
                self.compaction = Some(Compaction {
                    generation: next,
                    tmp,
                    out: Some(out),
                    wal,
                    wal_path,
                    wal_bytes: FILE_HEADER.len() as u64,
                    cursor: None,
                    step: 0,
                    record: wire::LogRecord {
                        wall_ms,
                        entries: Vec::new(),
                        removed: Vec::new(),
                    },
                    chunk: 0,
                    snapshot_bytes: FILE_HEADER.len() as u64,
                    scratch: Vec::with_capacity(SNAPSHOT_CHUNK + 1024),
                    framed: Vec::with_capacity(SNAPSHOT_CHUNK + 1024),
                });
                Ok(())
            }
            Err(cause) => {
                if let Err(undo) = undo_create(&self.dir, &created) {
                    tracing::warn!(error = %undo, "removing a failed compaction's files failed");
                }
                Err(self.compaction_failed(cause))
            }
        }
    }

    /// Writes the next chunk of the snapshot ([`ENTRIES_PER_STEP`] entries of `source`); once
    /// `source` has no more, installs the new generation.
    ///
    /// # Errors
    /// A write, fsync or rename failed: undone, the old log stays in use (or, if the undo
    /// failed after the rename, the log is failed).
    pub fn continue_compaction(
        &mut self,
        source: &dyn SnapshotSource,
    ) -> Result<Compacting, DurableError> {
        if let Some(e) = self.failed_error() {
            // The log failed meanwhile (a write or fsync error): nothing is installed.
            self.abandon_compaction();
            return Err(e);
        }
        let Some(c) = self.compaction.as_mut() else {
            return Ok(Compacting::Done);
        };
        if c.step == 0 {
            c.step = ENTRIES_PER_STEP;
        }
        let chunk = source.entries_after(c.cursor.as_deref(), c.step);
        let last = chunk.is_empty();
        if let Err(cause) = c.write_entries(chunk) {
            self.abandon_compaction();
            return Err(self.compaction_failed(cause));
        }
        if !last {
            return Ok(Compacting::More);
        }
        self.install_compaction()?;
        Ok(Compacting::Done)
    }

    /// Gives up a compaction in progress (the process is stopping): its files are removed.
    pub fn abandon_compaction(&mut self) {
        if let Some(c) = self.compaction.take()
            && let Err(e) = undo_create(&self.dir, &[c.tmp, c.wal_path])
        {
            tracing::warn!(error = %e, "removing an abandoned compaction's files failed");
        }
    }

    /// During a compaction, appends what `flush` just wrote to the old log to the new one
    /// too. A failure there abandons the compaction (the old log is unaffected).
    pub(crate) fn copy_to_next_generation(&mut self) {
        let Some(c) = self.compaction.as_mut() else {
            return;
        };
        match c.wal.write_all(&self.buf) {
            Ok(()) => c.wal_bytes = c.wal_bytes.saturating_add(self.buf.len() as u64),
            Err(e) => {
                let e = io_err("write", &c.wal_path)(e);
                self.abandon_compaction();
                let _ = self.compaction_failed(e);
            }
        }
    }

    /// Counts a failed compaction and defers the next attempt.
    fn compaction_failed(&mut self, cause: DurableError) -> DurableError {
        tracing::warn!(error = %cause, "snapshot failed; the log keeps growing until the next attempt");
        self.stats.compaction_errors = self.stats.compaction_errors.saturating_add(1);
        self.retry_compaction_at = self.stats.wal_bytes.saturating_mul(2);
        cause
    }

    /// The last steps: fsyncs, rename, then the switch to the new pair.
    fn install_compaction(&mut self) -> Result<(), DurableError> {
        let Some(mut c) = self.compaction.take() else {
            return Ok(());
        };
        let snapshot_path = self.dir.join(snapshot_name(c.generation));
        let dir = self.dir.clone();
        let mut renamed = false;
        let installed = c.flush_record().and_then(|()| {
            let Compaction {
                tmp,
                out,
                wal,
                wal_path,
                ..
            } = &mut c;
            let file = out
                .take()
                .map(BufWriter::into_inner)
                .transpose()
                .map_err(|e| io_err("write", tmp)(e.into_error()))?;
            let file = file.ok_or_else(|| {
                io_err("write", tmp)(std::io::Error::other("snapshot already closed"))
            })?;
            step("fsync snapshot")
                .and_then(|()| file.sync_all())
                .map_err(io_err("fsync", tmp))?;
            step("fsync log")
                .and_then(|()| wal.sync_all())
                .map_err(io_err("fsync", wal_path))?;
            sync_dir_step(&dir, "fsync directory again")?;
            step("rename snapshot")
                .and_then(|()| fs::rename(&*tmp, &snapshot_path))
                .map_err(io_err("rename", tmp))?;
            renamed = true;
            sync_dir_step(&dir, "fsync directory")
        });
        if let Err(cause) = installed {
            let made = if renamed {
                snapshot_path.clone()
            } else {
                c.tmp.clone()
            };
            if let Err(undo) = undo_create(&dir, &[made, c.wal_path.clone()]) {
                tracing::error!(error = %undo, "undoing a failed snapshot failed");
                if renamed {
                    let _ = self.compaction_failed(cause.clone());
                    return Err(self.fail(cause));
                }
            }
            return Err(self.compaction_failed(cause));
        }
        let old_wal = std::mem::replace(&mut self.wal_path, c.wal_path);
        self.wal = c.wal;
        if let Err(e) = step("remove old").and_then(|()| fs::remove_file(&old_wal)) {
            tracing::debug!(error = %e, "old log not removed (the next start removes it)");
        }
        let _ = fs::remove_file(self.dir.join(snapshot_name(self.generation)));
        self.generation = c.generation;
        self.next_generation = c.generation.checked_add(1);
        // Everything written is in the fsynced new log (or the snapshot).
        self.unsynced_since = None;
        self.local_pending = false;
        self.synced_through = self.written_through;
        self.stats.snapshots = self.stats.snapshots.saturating_add(1);
        self.stats.snapshot_bytes = c.snapshot_bytes;
        self.stats.wal_bytes = c.wal_bytes;
        Ok(())
    }
}

impl Compaction {
    /// Adds entries to the snapshot, a record of about [`SNAPSHOT_CHUNK`] at a time.
    fn write_entries(&mut self, entries: Vec<(String, Entry)>) -> Result<(), DurableError> {
        for (key, entry) in entries {
            self.chunk += key.len() + entry.value.as_ref().map_or(0, Bytes::len) + ENTRY_OVERHEAD;
            self.record.entries.push(entry.to_wire(&key));
            self.cursor = Some(key);
            if self.chunk >= SNAPSHOT_CHUNK {
                self.flush_record()?;
            }
        }
        Ok(())
    }

    /// Writes the record being filled (an empty snapshot still gets one record).
    fn flush_record(&mut self) -> Result<(), DurableError> {
        if self.record.entries.is_empty() && self.snapshot_bytes > FILE_HEADER.len() as u64 {
            return Ok(());
        }
        self.framed.clear();
        encode_frame(&self.record, &mut self.scratch, &mut self.framed);
        self.record.entries.clear();
        self.chunk = 0;
        self.snapshot_bytes += self.framed.len() as u64;
        match self.out.as_mut() {
            Some(out) => out.write_all(&self.framed),
            None => Err(std::io::Error::other("snapshot already closed")),
        }
        .map_err(io_err("write", &self.tmp))
    }
}
