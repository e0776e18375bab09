//! What the lab reads back from an agent: versions, store dumps and how two of them differ,
//! members, and counters.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::Value;

/// A version as the API reports it: `(hlc physical ms, hlc logical, node id)`, ordered like the
/// replication layer orders versions (the larger wins).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Version(u64, u64, u64);

impl Version {
    /// Accepts `"PHYS.LOGICAL@NODE"` or `{"hlc": u64 | "PHYS.LOGICAL", "node": u64}`.
    pub(crate) fn from_json(value: &Value) -> Result<Version, String> {
        match value {
            Value::String(text) => {
                let (hlc, node) = text
                    .split_once('@')
                    .ok_or_else(|| format!("version {text:?} has no '@'"))?;
                let node = node.parse().map_err(|e| format!("version {text:?}: {e}"))?;
                let (phys, logical) = split_hlc(hlc)?;
                Ok(Version(phys, logical, node))
            }
            Value::Object(map) => {
                let node = map
                    .get("node")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| format!("version {value} has no node"))?;
                match map.get("hlc") {
                    Some(Value::Number(n)) => {
                        let hlc = n.as_u64().ok_or_else(|| format!("bad hlc in {value}"))?;
                        Ok(Version(hlc >> 16, hlc & 0xffff, node))
                    }
                    Some(Value::String(s)) => {
                        let (phys, logical) = split_hlc(s)?;
                        Ok(Version(phys, logical, node))
                    }
                    _ => Err(format!("version {value} has no hlc")),
                }
            }
            other => Err(format!("unknown version format {other}")),
        }
    }

    /// The version in the body of a PUT response (JSON with a `version` field, or a version).
    pub(crate) fn from_put_response(body: &[u8]) -> Result<Version, String> {
        let json: Value = serde_json::from_slice(body).map_err(|e| {
            format!(
                "PUT response is not JSON ({e}): {}",
                String::from_utf8_lossy(body)
            )
        })?;
        Version::from_json(json.get("version").unwrap_or(&json))
    }
}

pub(crate) fn split_hlc(text: &str) -> Result<(u64, u64), String> {
    let (phys, logical) = text.split_once('.').unwrap_or((text, "0"));
    Ok((
        phys.parse().map_err(|e| format!("hlc {text:?}: {e}"))?,
        logical.parse().map_err(|e| format!("hlc {text:?}: {e}"))?,
    ))
}

/// One node's store: key → (value, version).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Store {
    pub(crate) entries: BTreeMap<String, (String, Version)>,
}

impl Store {
    /// Parses the `GET /v1/kv?prefix=` listing: an array (or `{"entries": [...]}`) of objects
    /// with `key`, `value` and `version`.
    pub(crate) fn from_json(json: &Value) -> Result<Store, String> {
        let list = json
            .as_array()
            .or_else(|| json.get("entries").and_then(Value::as_array))
            .ok_or_else(|| format!("listing is not an array: {}", truncate(json)))?;
        let mut entries = BTreeMap::new();
        for item in list {
            let key = item
                .get("key")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("entry without key: {item}"))?;
            let value = item
                .get("value")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("entry without string value: {item}"))?;
            let version = Version::from_json(
                item.get("version")
                    .ok_or_else(|| format!("entry without version: {item}"))?,
            )?;
            entries.insert(key.to_owned(), (value.to_owned(), version));
        }
        Ok(Store { entries })
    }

    pub(crate) fn values(&self) -> BTreeMap<String, String> {
        self.entries
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    }
}

pub(crate) fn truncate(json: &Value) -> String {
    let text = json.to_string();
    text.chars().take(300).collect()
}

/// What differs between the dumps and `expected` (empty when all agree); a few lines at most.
pub(crate) fn store_problems(dumps: &[(u8, Store)], expected: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (node, store) in dumps {
        let values = store.values();
        let missing: Vec<&String> = expected
            .keys()
            .filter(|k| !values.contains_key(*k))
            .collect();
        let extra: Vec<&String> = values
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .collect();
        let wrong: Vec<&String> = expected
            .iter()
            .filter(|(k, v)| values.get(*k).is_some_and(|got| got != *v))
            .map(|(k, _)| k)
            .collect();
        if !missing.is_empty() || !extra.is_empty() || !wrong.is_empty() {
            let _ = writeln!(
                out,
                "node {node}: {} keys, {} missing (first {:?}), {} unexpected (first {:?}), \
                 {} wrong values (first {:?})",
                values.len(),
                missing.len(),
                missing.first(),
                extra.len(),
                extra.first(),
                wrong.len(),
                wrong.first().map(|k| (k, &values[*k], &expected[*k]))
            );
        }
    }
    if out.is_empty()
        && let Some((first_node, first)) = dumps.first()
    {
        for (node, store) in &dumps[1..] {
            if store != first {
                let differing = first
                    .entries
                    .iter()
                    .find(|(k, e)| store.entries.get(*k) != Some(e))
                    .map(|(k, e)| (k.clone(), e.clone(), store.entries.get(k).cloned()));
                let _ = writeln!(
                    out,
                    "node {node} and node {first_node} hold the same values but different \
                     versions, e.g. {differing:?}"
                );
            }
        }
    }
    out
}

/// Node ids listed by `GET /v1/members` (an array, or `{"members": [...]}`, of objects with
/// `node_id`).
pub(crate) fn member_ids(json: &Value) -> BTreeSet<u64> {
    json.as_array()
        .or_else(|| json.get("members").and_then(Value::as_array))
        .map(|list| {
            list.iter()
                .filter(|m| m.get("state").and_then(Value::as_str) != Some("left"))
                .filter_map(|m| m.get("node_id").and_then(Value::as_u64))
                .collect()
        })
        .unwrap_or_default()
}

/// Flattens nested JSON counters into `a.b.c → n`.
pub(crate) fn flatten_counters(prefix: &str, json: &Value, out: &mut BTreeMap<String, u64>) {
    match json {
        Value::Object(map) => {
            for (k, v) in map {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_counters(&name, v, out);
            }
        }
        Value::Array(list) => {
            // `[{"name": .., "value": ..}]` or `[[name, value]]`.
            for item in list {
                let pair = match item {
                    Value::Object(m) => m
                        .get("name")
                        .and_then(Value::as_str)
                        .zip(m.get("value").and_then(Value::as_u64)),
                    Value::Array(p) if p.len() == 2 => p[0].as_str().zip(p[1].as_u64()),
                    _ => None,
                };
                if let Some((name, value)) = pair {
                    out.insert(name.to_owned(), value);
                }
            }
        }
        Value::Number(n) => {
            if let Some(v) = n.as_u64() {
                out.insert(prefix.to_owned(), v);
            }
        }
        _ => {}
    }
}

/// Sum over `stats` of the counters whose name contains every one of `words`.
pub(crate) fn counter_sum(stats: &BTreeMap<String, u64>, words: &[&str]) -> u64 {
    stats
        .iter()
        .filter(|(name, _)| words.iter().all(|w| name.contains(w)))
        .map(|(_, v)| v)
        .sum()
}

/// Counter `name` (as listed under `counters` by `/v1/stats`); absent counts as 0.
pub(crate) fn counter(stats: &BTreeMap<String, u64>, name: &str) -> u64 {
    stats
        .get(&format!("counters.{name}"))
        .or_else(|| stats.get(name))
        .copied()
        .unwrap_or(0)
}

/// Every reason the protocol layer drops a datagram for, as counter names.
pub(crate) const DROP_COUNTERS: [&str; 14] = [
    "protocol_truncated",
    "protocol_oversized",
    "protocol_bad_magic",
    "protocol_wrong_version",
    "protocol_bad_checksum",
    "protocol_wrong_cluster",
    "protocol_unauthenticated",
    "protocol_malformed",
    "protocol_unknown_frame",
    "protocol_own_datagrams",
    "protocol_node_id_conflict",
    "protocol_stale_incarnation",
    "protocol_buffer_full",
    "protocol_after_close",
];
