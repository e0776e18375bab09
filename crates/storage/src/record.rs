//! Framing of the data-dir files (`CHLOG2`): COBS-stuffed frames with a crc32, each ended by
//! a zero byte; and the reading of single records of the previous format (`CHL1`).

use chorus_replication::wire;
use prost::Message as _;

/// First bytes of every file of the current format: a magic and the first frame delimiter.
pub(crate) const FILE_HEADER: &[u8; 9] = b"CHLOG2\r\n\0";
/// Mixed into every frame's checksum, so frames of another format never check.
pub(crate) const CRC_TAG: &[u8] = b"CHLOG2";
/// Checksum bytes at the start of a decoded frame.
pub(crate) const CRC_LEN: usize = 4;
/// Target payload size of one snapshot record and of one record of removals: damage to one
/// loses at most this much.
pub(crate) const SNAPSHOT_CHUNK: usize = 64 * 1024;
/// Bytes a removal or an entry costs in a record beyond its key and value (tags, lengths,
/// version), for sizing chunks.
pub(crate) const ENTRY_OVERHEAD: usize = 24;

/// Magic of every record of the previous format (`CHL1`).
pub(crate) const LEGACY_MAGIC: [u8; 4] = *b"CHL1";
/// Magic, length and checksum of a `CHL1` record.
pub(crate) const LEGACY_HEADER: usize = 12;
/// Largest `CHL1` record payload (what its loader accepted).
pub(crate) const LEGACY_MAX_RECORD: usize = 64 << 20;
pub(crate) fn removal_size(r: &wire::KeyVersion) -> usize {
    r.key.len() + ENTRY_OVERHEAD
}

/// `items` cut into runs of at least `limit` bytes by `size` (the last run may be smaller;
/// a run is at most `limit` plus one item).
pub(crate) fn split_by_size<T>(
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
pub(crate) fn checksum(payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(CRC_TAG);
    crc.update(payload);
    crc.finalize()
}

/// Appends `record` as one frame: COBS of (checksum, payload), then the zero delimiter.
pub(crate) fn encode_frame(record: &wire::LogRecord, scratch: &mut Vec<u8>, out: &mut Vec<u8>) {
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
pub(crate) fn cobs_encode(data: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + cobs::max_encoding_length(data.len()), 0);
    // The room is the crate's own worst case for this length, so encoding cannot run short.
    let used = cobs::encode(data, &mut out[start..]);
    out.truncate(start + used);
}

/// Decodes one COBS frame (without its delimiter) into `out`; `None` if it is malformed.
/// `out` never grows beyond the frame's own length.
pub(crate) fn cobs_decode(encoded: &[u8], out: &mut Vec<u8>) -> Option<()> {
    out.clear();
    out.resize(encoded.len(), 0);
    let report = cobs::decode(encoded, out).ok()?;
    out.truncate(report.frame_size());
    Some(())
}

/// The payload of a valid frame (`encoded` without its delimiter), decoded into `buf`.
pub(crate) fn decode_frame<'a>(encoded: &[u8], buf: &'a mut Vec<u8>) -> Option<&'a [u8]> {
    cobs_decode(encoded, buf)?;
    let buf: &'a [u8] = buf;
    let (crc, payload) = buf.split_at_checked(CRC_LEN)?;
    let want = u32::from_le_bytes(crc.try_into().ok()?);
    (checksum(payload) == want).then_some(payload)
}

/// The payload of a valid `CHL1` record starting at `pos`, if there is one.
pub(crate) fn legacy_record_at(bytes: &[u8], pos: usize) -> Option<&[u8]> {
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
pub(crate) fn legacy_record_after(bytes: &[u8], from: usize) -> bool {
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
