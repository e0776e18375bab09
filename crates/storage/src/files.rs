//! The files of a data directory: names, listing, reading, creating, fsyncing, and the named
//! steps that the unit tests can make fail.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chorus_replication::DurableError;

use crate::record::FILE_HEADER;

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> DurableError + 'a {
    move |e| DurableError::Io {
        op,
        path: path.to_owned(),
        source: Arc::new(e),
    }
}

pub(crate) fn snapshot_name(generation: u64) -> String {
    format!("snapshot-{generation:020}")
}

pub(crate) fn wal_name(generation: u64) -> String {
    format!("wal-{generation:020}")
}

pub(crate) fn parse_gen(name: &str, prefix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

pub(crate) fn generations_exhausted(dir: &Path) -> DurableError {
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
pub(crate) struct Listing {
    pub(crate) snapshots: Vec<u64>,
    pub(crate) wals: Vec<u64>,
    /// Interrupted snapshots: never renamed, so never part of the state.
    pub(crate) tmps: Vec<PathBuf>,
}

impl Listing {
    pub(crate) fn read(dir: &Path) -> Result<Listing, DurableError> {
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
    pub(crate) fn remove_leftovers(&self, dir: &Path, loaded: u64, in_use: u64) {
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
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, DurableError> {
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

pub(crate) fn open_append(path: &Path) -> Result<File, DurableError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err("open", path))
}

/// Opens the log for appending; an empty (or new) one gets its file header first.
/// Returns the file and its length.
pub(crate) fn open_log(dir: &Path, path: &Path) -> Result<(File, u64), DurableError> {
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

pub(crate) fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

// Failure injection for the unit tests of this crate: a named step of a repair or a snapshot
// fails once `FAULTS` names it (after skipping the given number of occurrences). Nothing
// outside `cfg(test)` of this crate can set it.
#[cfg(test)]
thread_local! {
    pub(crate) static FAULTS: std::cell::RefCell<Vec<(&'static str, usize)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A named step of a repair or a snapshot (an injected failure in this file's unit tests).
pub(crate) fn step(name: &'static str) -> io::Result<()> {
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

pub(crate) fn sync_dir_step(dir: &Path, name: &'static str) -> Result<(), DurableError> {
    step(name).map_err(io_err("fsync", dir))?;
    sync_dir(dir)
}

pub(crate) fn create_file(
    path: &Path,
    fresh: bool,
    name: &'static str,
) -> Result<File, DurableError> {
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

/// `<path>.corrupt`, or `<path>.corrupt.<n>` if that exists already (an earlier repair's).
pub(crate) fn aside_name(path: &Path) -> PathBuf {
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
