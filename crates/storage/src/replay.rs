//! Reading data-dir files back: every valid record merged into the state a node loads, damage
//! told from a torn tail, files of the previous format (`CHL1`) read up to their first bad
//! record.

use std::borrow::Cow;
use std::path::Path;

use chorus_replication::{LoadReport, MergedState, wire};
use prost::Message as _;

use crate::record::{
    FILE_HEADER, LEGACY_HEADER, LEGACY_MAGIC, decode_frame, legacy_record_after, legacy_record_at,
};

/// Result of scanning one file.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// End of the last valid record.
    pub(crate) valid_end: usize,
    /// Bytes after the last valid record that are not a record.
    pub(crate) torn_tail: usize,
    /// Whether a damaged region was followed by a valid record.
    pub(crate) damaged: bool,
    /// Whether the file is in the previous format.
    pub(crate) legacy: bool,
}

/// Rebuilds the store from records, one at a time (the merge itself is
/// [`MergedState`]'s, shared with the in-memory store).
pub(crate) struct Loader {
    pub(crate) state: MergedState,
    pub(crate) report: LoadReport,
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
    pub(crate) fn apply(&mut self, payload: &[u8]) -> Result<(), Cow<'static, str>> {
        let mut rest = payload;
        while !rest.is_empty() {
            let key = read_varint(&mut rest)?;
            match (key >> 3, key & 7) {
                (0, _) => return Err("field number 0".into()),
                (1, 0) => {
                    let wall_ms = read_varint(&mut rest)?;
                    self.state.observe_wall_ms(wall_ms);
                }
                (2, 2) => {
                    let body = read_len(&mut rest)?;
                    let e = wire::Entry::decode(body).map_err(|e| e.to_string())?;
                    self.state.merge_entry(e);
                }
                (3, 2) => {
                    let body = read_len(&mut rest)?;
                    let r = wire::KeyVersion::decode(body).map_err(|e| e.to_string())?;
                    self.state.merge_removed(&r);
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
pub(crate) fn replay(bytes: &[u8], path: &Path, loader: &mut Loader) -> Scan {
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
