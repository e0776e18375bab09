//! Installing a new generation whole (a repair at open): its snapshot and empty log written,
//! fsynced and renamed into place, every step undone on failure.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write as _};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use chorus_replication::{DurableError, EntryMeta, Version, wire};

use crate::files::{aside_name, create_file, io_err, snapshot_name, step, sync_dir_step, wal_name};
use crate::record::{ENTRY_OVERHEAD, FILE_HEADER, SNAPSHOT_CHUNK, encode_frame};

/// A snapshot entry: key, value (`None`: tombstone), version.
pub(crate) type SnapEntry<'a> = (&'a str, Option<&'a Bytes>, Version, EntryMeta);

/// A new generation, complete and durable: its snapshot and its empty, open log.
pub(crate) struct Installed {
    pub(crate) wal: File,
    pub(crate) wal_path: PathBuf,
    pub(crate) snapshot_path: PathBuf,
    pub(crate) snapshot_bytes: u64,
}

/// Removes `paths` (created by a step that then failed) and fsyncs `dir`. Tries every one;
/// reports the first failure.
pub(crate) fn undo_create(dir: &Path, paths: &[PathBuf]) -> Result<(), DurableError> {
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
pub(crate) fn install<'a>(
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
pub(crate) fn repair(
    dir: &Path,
    why: &'static str,
    next: u64,
    entries: &[(String, Option<Bytes>, Version, EntryMeta)],
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
        .map(|(k, v, ver, meta)| (k.as_str(), v.as_ref(), *ver, *meta));
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

/// Writes a snapshot of `entries` into `file` (records of about [`SNAPSHOT_CHUNK`]) and
/// fsyncs it. Returns its size.
pub(crate) fn write_snapshot_file<'a>(
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
    for (key, value, version, meta) in entries {
        any = true;
        chunk += key.len() + value.map_or(0, Bytes::len) + ENTRY_OVERHEAD;
        let (flags, owner) = if value.is_some() {
            (meta.flags, meta.owner)
        } else {
            (0, None)
        };
        record.entries.push(wire::Entry {
            key: key.to_owned(),
            hlc: version.hlc.0,
            node: version.node,
            value: value.cloned(),
            flags,
            owner: owner.map(|o| wire::Owner {
                node: o.node.0,
                incarnation: o.incarnation,
            }),
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
