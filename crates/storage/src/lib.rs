//! chorus-storage: the data directory of a durable Chorus node, and the thread that writes it.
//!
//! The replication crate does no file I/O: a durable node emits what must be made durable
//! (`chorus_replication::Persist`) and is told how far it is. This crate is the other side:
//!
//! - `disk.rs`: [`DiskLog`], one data directory: open (lock, load, truncate a torn tail,
//!   repair damage), append, write and fsync per policy;
//! - `record.rs`: the framing of the files (`CHLOG2`: COBS frames with a crc32) and the
//!   records of the previous format (`CHL1`);
//! - `replay.rs`: reading files back into the state a node loads;
//! - `files.rs`: names, listing, reading and creating files, the named steps the unit tests
//!   can make fail;
//! - `install.rs`: installing a whole generation (the repair at open);
//! - `compact.rs`: compaction in chunks from the live store while appends continue;
//! - `writer.rs`: [`Storage`], the OS thread that owns a [`DiskLog`]: group commit, fsync
//!   timers, compaction, progress reports.
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
//! if it still holds the removed version (`chorus_replication::MergedState`), so replay is
//! idempotent and replaying an old log over a newer snapshot cannot go backwards. One
//! committed change set is one record (a batch is all or nothing across a crash); removals,
//! which are independent of each other, are split into records of about 64 KiB, and a
//! snapshot is written in records of about 64 KiB (plus one entry).
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
//!   `DurableError::Repair` says what failed. The replica marks itself as not knowing what
//!   it lacks, so its peers fill the gap by anti-entropy.
//!
//! # Compaction
//! Once the log exceeds `compact_factor` × the last snapshot's size (and at least
//! `compact_min_bytes`), the storage thread writes the next generation from the live store in
//! chunks while appends continue (see `compact.rs`). A crash at any point leaves either the
//! old pair or the new one, both complete; a failure is undone and the old log stays in use.

mod compact;
mod disk;
mod files;
mod install;
mod record;
mod replay;
mod writer;

#[cfg(test)]
mod tests;

pub use compact::{Compacting, ENTRIES_PER_STEP, SnapshotSource};
pub use disk::{DiskLog, DiskOptions, FlushMode};
pub use writer::{Progress, Storage};
