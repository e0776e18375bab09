//! The snapshot file: JSON lines, a versioned header, one record per key (live or tombstone)
//! and a trailer with the record count and a CRC-32 of everything before it.
//!
//! ```text
//! {"format":"chorus-snapshot","version":1,"revision":42,"node_id":7}
//! {"key":"app/db/url","version":"1767225600000.3@7","value":"cG9zdGdyZXM6Ly8=","flags":0}
//! {"key":"app/old","version":"1767225600100.0@9","deleted":true}
//! {"end":"chorus-snapshot","entries":2,"crc32":"1c291ca3"}
//! ```
//!
//! [`decode`] checks the whole file (header, every record against the limits, no key twice, the
//! count, the checksum, nothing after the trailer) before returning anything, so a caller that
//! applies only what it returned applies all or nothing.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use chorus::Version;

/// The `format` field of the header.
pub const FORMAT: &str = "chorus-snapshot";
/// The version of the format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The owner of an owned entry, as the file holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOwner {
    /// The writer's node id.
    pub node: u64,
    /// Its incarnation when it wrote.
    pub incarnation: u64,
}

/// One key of a snapshot: a live value or a tombstone, with its version and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The key.
    pub key: String,
    /// The value, `None` for a tombstone (a deleted key that remembers its delete's version).
    pub value: Option<Bytes>,
    /// The version of the write or delete.
    pub version: Version,
    /// Opaque flags (Consul's `Flags`).
    pub flags: u64,
    /// The owner, for an entry written as owned.
    pub owner: Option<FileOwner>,
}

/// The first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] when written by this build.
    pub version: u32,
    /// The local revision of the agent the snapshot is consistent at.
    pub revision: u64,
    /// The agent that wrote it.
    pub node_id: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    key: String,
    version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    deleted: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    flags: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<FileOwner>,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Trailer {
    end: String,
    entries: u64,
    crc32: String,
}

/// Why a snapshot file was refused. Nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The first line is not a Chorus snapshot header.
    #[error("not a Chorus snapshot (the first line is not a chorus-snapshot header): {0}")]
    NotASnapshot(String),
    /// Written by a newer format version.
    #[error(
        "snapshot format version {0} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u32),
    /// The file ends before its trailer.
    #[error("truncated snapshot: {0}")]
    Truncated(String),
    /// The checksum of the trailer does not match the content.
    #[error(
        "snapshot checksum mismatch: the trailer says {expected}, the content is {actual} (the file is damaged)"
    )]
    Checksum {
        /// From the trailer.
        expected: String,
        /// Of the bytes read.
        actual: String,
    },
    /// A record is malformed or breaks a limit.
    #[error("snapshot line {line}: {reason}")]
    BadRecord {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// The largest key and value a record may hold (the node's write limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLimits {
    /// Longest key, in bytes.
    pub max_key_len: usize,
    /// Longest value, in bytes.
    pub max_value_len: usize,
}

impl Default for RecordLimits {
    fn default() -> RecordLimits {
        let limits = chorus_replication::Limits::default();
        RecordLimits {
            max_key_len: limits.max_key_len,
            max_value_len: limits.max_value_len,
        }
    }
}

impl RecordLimits {
    /// Checks a key and a value length against the limits.
    ///
    /// # Errors
    /// A message naming the key and the limit.
    pub fn check(&self, key: &str, value_len: usize) -> Result<(), String> {
        if key.is_empty() {
            return Err("empty key".into());
        }
        if key.len() > self.max_key_len {
            return Err(format!(
                "key {:?}... is {} bytes long, above the limit of {}",
                key.chars().take(40).collect::<String>(),
                key.len(),
                self.max_key_len
            ));
        }
        if value_len > self.max_value_len {
            return Err(format!(
                "the value of {key:?} is {value_len} bytes, above the limit of {}",
                self.max_value_len
            ));
        }
        Ok(())
    }
}

/// Writes a snapshot piece by piece, keeping the checksum.
#[derive(Debug, Default)]
pub struct Encoder {
    crc: crc32fast::Hasher,
    entries: u64,
}

impl Encoder {
    fn line(&mut self, value: &impl Serialize) -> Vec<u8> {
        // Serialising these plain structs cannot fail (string keys, no maps of other keys).
        let mut out = serde_json::to_vec(value).unwrap_or_default();
        out.push(b'\n');
        self.crc.update(&out);
        out
    }

    /// The header line.
    pub fn header(&mut self, revision: u64, node_id: u64) -> Vec<u8> {
        self.line(&Header {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            revision,
            node_id,
        })
    }

    /// One record's line.
    pub fn record(&mut self, record: &Record) -> Vec<u8> {
        self.entries += 1;
        self.line(&Line {
            key: record.key.clone(),
            version: record.version.to_string(),
            value: record.value.as_ref().map(|v| STANDARD.encode(v)),
            deleted: record.value.is_none(),
            flags: record.flags,
            owner: record.owner,
        })
    }

    /// The trailer line (not part of the checksum).
    pub fn trailer(self) -> Vec<u8> {
        let trailer = Trailer {
            end: FORMAT.into(),
            entries: self.entries,
            crc32: format!("{:08x}", self.crc.finalize()),
        };
        let mut out = serde_json::to_vec(&trailer).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

/// A whole snapshot in one buffer (the agent streams instead).
#[cfg(test)]
pub fn encode(revision: u64, node_id: u64, records: &[Record]) -> Vec<u8> {
    let mut enc = Encoder::default();
    let mut out = enc.header(revision, node_id);
    for r in records {
        out.extend(enc.record(r));
    }
    out.extend(enc.trailer());
    out
}

/// Reads and checks a whole snapshot file.
///
/// # Errors
/// [`FormatError`] for the first thing wrong; nothing is returned then.
pub fn decode(bytes: &[u8], limits: RecordLimits) -> Result<(Header, Vec<Record>), FormatError> {
    let first_end =
        bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| match bytes.is_empty() {
                true => FormatError::NotASnapshot("the file is empty".into()),
                false => FormatError::NotASnapshot("no complete first line".into()),
            })?;
    let header: Header = serde_json::from_slice(&bytes[..first_end])
        .map_err(|e| FormatError::NotASnapshot(e.to_string()))?;
    if header.format != FORMAT {
        return Err(FormatError::NotASnapshot(format!(
            "format is {:?}",
            header.format
        )));
    }
    if header.version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion(header.version));
    }
    // The trailer is the last line; the file ends with its newline.
    let Some(body) = bytes.strip_suffix(b"\n") else {
        return Err(FormatError::Truncated("the last line is incomplete".into()));
    };
    let trailer_start = body.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    if trailer_start <= first_end {
        return Err(FormatError::Truncated("no trailer after the header".into()));
    }
    let trailer: Trailer = serde_json::from_slice(&body[trailer_start..]).map_err(|_| {
        FormatError::Truncated("the last line is not the trailer (the file was cut short)".into())
    })?;
    if trailer.end != FORMAT {
        return Err(FormatError::Truncated(
            "the trailer is not a chorus-snapshot end".into(),
        ));
    }
    let actual = format!("{:08x}", crc32fast::hash(&bytes[..trailer_start]));
    if !trailer.crc32.eq_ignore_ascii_case(&actual) {
        return Err(FormatError::Checksum {
            expected: trailer.crc32,
            actual,
        });
    }
    let mut records = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let lines = bytes[first_end + 1..trailer_start]
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty());
    for (i, raw) in lines.enumerate() {
        let line = i + 2;
        let bad = |reason: String| FormatError::BadRecord { line, reason };
        let parsed: Line = serde_json::from_slice(raw).map_err(|e| bad(e.to_string()))?;
        let version: Version = parsed.version.parse().map_err(|e| bad(format!("{e}")))?;
        let value = match (parsed.value, parsed.deleted) {
            (Some(_), true) => return Err(bad("a deleted record with a value".into())),
            (None, false) => return Err(bad("a record with neither a value nor deleted".into())),
            (None, true) => None,
            (Some(b64), false) => Some(Bytes::from(
                STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|e| bad(format!("value is not base64: {e}")))?,
            )),
        };
        limits
            .check(&parsed.key, value.as_ref().map_or(0, Bytes::len))
            .map_err(bad)?;
        if !seen.insert(parsed.key.clone()) {
            return Err(bad(format!("key {:?} appears twice", parsed.key)));
        }
        records.push(Record {
            key: parsed.key,
            value,
            version,
            flags: parsed.flags,
            owner: parsed.owner,
        });
    }
    if records.len() as u64 != trailer.entries {
        return Err(FormatError::Truncated(format!(
            "the trailer counts {} entries, the file holds {}",
            trailer.entries,
            records.len()
        )));
    }
    Ok((header, records))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record {
                key: "app/a".into(),
                value: Some(Bytes::from_static(b"1")),
                version: "1767225600000.3@7".parse().unwrap(),
                flags: 42,
                owner: Some(FileOwner {
                    node: 7,
                    incarnation: 9,
                }),
            },
            Record {
                key: "app/gone".into(),
                value: None,
                version: "1767225600100.0@9".parse().unwrap(),
                flags: 0,
                owner: None,
            },
            Record {
                key: "bin".into(),
                value: Some(Bytes::from_static(&[0, 0xff])),
                version: "1767225600200.1@7".parse().unwrap(),
                flags: 0,
                owner: None,
            },
        ]
    }

    #[test]
    fn round_trips() {
        let file = encode(42, 7, &sample());
        let (header, records) = decode(&file, RecordLimits::default()).unwrap();
        assert_eq!((header.revision, header.node_id), (42, 7));
        assert_eq!(records, sample());
        let empty = encode(0, 1, &[]);
        assert!(
            decode(&empty, RecordLimits::default())
                .unwrap()
                .1
                .is_empty()
        );
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let file = encode(42, 7, &sample());
        let limits = RecordLimits::default();
        // Truncated anywhere.
        for cut in [1, 20, file.len() / 2, file.len() - 1] {
            let err = decode(&file[..cut], limits).unwrap_err();
            assert!(
                matches!(
                    err,
                    FormatError::Truncated(_) | FormatError::NotASnapshot(_)
                ),
                "cut at {cut}: {err}"
            );
        }
        // A line dropped whole (the checksum then differs).
        let text = String::from_utf8(file.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let dropped = format!("{}\n{}\n{}\n", lines[0], lines[1], lines[4]);
        assert!(decode(dropped.as_bytes(), limits).is_err());
        // One byte changed.
        let mut flipped = file.clone();
        let at = text.find("\"1767225600000").unwrap() + 3;
        flipped[at] = b'9';
        assert!(matches!(
            decode(&flipped, limits).unwrap_err(),
            FormatError::Checksum { .. }
        ));
        // Not JSON at all, and another format.
        assert!(matches!(
            decode(b"hello\nworld\n", limits).unwrap_err(),
            FormatError::NotASnapshot(_)
        ));
        let mut newer = text
            .replacen("\"version\":1", "\"version\":2", 1)
            .into_bytes();
        assert_eq!(
            decode(&newer, limits).unwrap_err(),
            FormatError::UnsupportedVersion(2)
        );
        newer.clear();
        // A key above the limit (the checksum is right: a file made by someone else).
        let long = Record {
            key: "k".repeat(2000),
            ..sample()[0].clone()
        };
        let err = decode(&encode(1, 1, &[long]), limits).unwrap_err();
        assert!(err.to_string().contains("above the limit"), "{err}");
        let big = Record {
            value: Some(Bytes::from(vec![b'x'; limits.max_value_len + 1])),
            ..sample()[0].clone()
        };
        assert!(decode(&encode(1, 1, &[big]), limits).is_err());
        let twice = [sample()[0].clone(), sample()[0].clone()];
        assert!(decode(&encode(1, 1, &twice), limits).is_err());
        // Something after the trailer.
        let mut extra = file.clone();
        extra.extend_from_slice(b"{}\n");
        assert!(decode(&extra, limits).is_err());
    }
}
