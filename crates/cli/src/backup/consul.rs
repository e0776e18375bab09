//! The `consul kv export` / `consul kv import` format: a JSON array of
//! `{"key": "...", "flags": 0, "value": "<base64>"}`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::format::RecordLimits;

/// One key of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPair {
    /// The key.
    pub key: String,
    /// Consul's `Flags`.
    pub flags: u64,
    /// The value.
    pub value: Bytes,
}

#[derive(Serialize, Deserialize)]
struct ExportEntry {
    key: String,
    #[serde(default)]
    flags: u64,
    /// Consul writes `""` for an empty value; `null` is read as empty too.
    #[serde(default)]
    value: Option<String>,
}

/// Why an import file was refused. Nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// Not a JSON array of entries.
    #[error("not a consul kv export (a JSON array of {{\"key\", \"flags\", \"value\"}}): {0}")]
    NotAnExport(String),
    /// An entry is malformed or breaks a limit.
    #[error("entry {index} (key {key:?}): {reason}")]
    BadEntry {
        /// 0-based position in the array.
        index: usize,
        /// Its key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// The JSON of an export, Consul's layout (pretty, as `consul kv export` prints it).
pub fn export_json(pairs: &[KvPair]) -> Vec<u8> {
    let entries: Vec<ExportEntry> = pairs
        .iter()
        .map(|p| ExportEntry {
            key: p.key.clone(),
            flags: p.flags,
            value: Some(STANDARD.encode(&p.value)),
        })
        .collect();
    // A Vec of plain structs always serialises.
    let mut out = serde_json::to_vec_pretty(&entries).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Reads and checks a whole export.
///
/// # Errors
/// [`ImportError`] for the first thing wrong (JSON, base64, a key too long, a value too large,
/// a key twice); nothing is returned then.
pub fn parse_export(bytes: &[u8], limits: RecordLimits) -> Result<Vec<KvPair>, ImportError> {
    let entries: Vec<ExportEntry> =
        serde_json::from_slice(bytes).map_err(|e| ImportError::NotAnExport(e.to_string()))?;
    let mut seen = std::collections::HashSet::new();
    let mut pairs = Vec::with_capacity(entries.len());
    for (index, e) in entries.into_iter().enumerate() {
        let bad = |reason: String| ImportError::BadEntry {
            index,
            key: e.key.chars().take(80).collect(),
            reason,
        };
        let value = match &e.value {
            None => Bytes::new(),
            Some(b64) => Bytes::from(
                STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|err| bad(format!("value is not base64: {err}")))?,
            ),
        };
        limits.check(&e.key, value.len()).map_err(bad)?;
        if !seen.insert(e.key.clone()) {
            return Err(bad("the key appears twice".into()));
        }
        pairs.push(KvPair {
            key: e.key,
            flags: e.flags,
            value,
        });
    }
    Ok(pairs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_consul_writes_and_round_trips() {
        // As `consul kv export` prints it.
        let consul = br#"[
	{
		"key": "app/db/url",
		"flags": 0,
		"value": "cG9zdGdyZXM6Ly9kYjEvYXBw"
	},
	{
		"key": "app/empty",
		"flags": 42,
		"value": ""
	}
]"#;
        let pairs = parse_export(consul, RecordLimits::default()).unwrap();
        assert_eq!(pairs[0].value, "postgres://db1/app");
        assert_eq!((pairs[1].flags, pairs[1].value.len()), (42, 0));
        let again = parse_export(&export_json(&pairs), RecordLimits::default()).unwrap();
        assert_eq!(again, pairs);
    }

    #[test]
    fn bad_exports_are_refused() {
        let limits = RecordLimits::default();
        for bad in [
            &b"not json"[..],
            b"{\"key\": \"a\"}",
            b"[{\"flags\": 1}]",
            b"[{\"key\": \"a\", \"value\": \"%%%\"}]",
            b"[{\"key\": \"\", \"value\": \"\"}]",
            b"[{\"key\": \"a\", \"value\": \"\"}, {\"key\": \"a\", \"value\": \"\"}]",
            b"[{\"key\": \"a\", \"flags\": -1, \"value\": \"\"}]",
        ] {
            assert!(
                parse_export(bad, limits).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("[{{\"key\": \"{}\", \"value\": \"\"}}]", "k".repeat(1025));
        let err = parse_export(long.as_bytes(), limits).unwrap_err();
        assert!(err.to_string().contains("above the limit"), "{err}");
    }
}
