//! The agent's endpoints: `GET`/`PUT /v1/snapshot`, `GET /v1/export`, `PUT /v1/import`.

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use chorus::{Node, Op, PutMeta};

use super::consul::{KvPair, export_json, parse_export};
use super::format::{Encoder, FileOwner, Record, RecordLimits, decode};
use crate::http::{ApiError, parse_query};

/// Records serialised per chunk of a streamed snapshot.
const RECORDS_PER_CHUNK: usize = 1024;
/// Bytes an operation costs in a write message beyond its key and value (a generous bound on
/// the encoding's tags, lengths, version and metadata), for cutting imports into batches.
const OP_OVERHEAD: usize = 64;

/// `GET /v1/snapshot`: every entry and tombstone, consistent at one revision, streamed in the
/// snapshot file format (docs/operations.md).
pub async fn get_snapshot(State(node): State<Node>) -> Result<Response, ApiError> {
    let snapshot = node.snapshot().await?;
    let revision = snapshot.revision;
    let mut encoder = Encoder::default();
    let header = encoder.header(revision, node.node_id().0);
    let mut entries = snapshot.entries.into_iter();
    let chunks =
        futures_util::stream::unfold((Some(encoder), Some(header)), move |(encoder, first)| {
            let mut out = first.unwrap_or_default();
            let next = encoder.and_then(|mut encoder| {
                for (key, entry) in entries.by_ref().take(RECORDS_PER_CHUNK) {
                    out.extend(encoder.record(&record_of(key, entry)));
                }
                if entries.len() == 0 {
                    out.extend(encoder.trailer());
                    None
                } else {
                    Some(encoder)
                }
            });
            let done = out.is_empty();
            std::future::ready((!done).then(|| {
                (
                    Ok::<_, std::convert::Infallible>(Bytes::from(out)),
                    (next, None),
                )
            }))
        });
    let mut response = Body::from_stream(chunks).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert("x-chorus-revision", HeaderValue::from(revision));
    Ok(response)
}

fn record_of(key: String, entry: chorus::StoredEntry) -> Record {
    Record {
        key,
        value: entry.value,
        version: entry.version,
        flags: entry.flags,
        owner: entry.owner.map(|o| FileOwner {
            node: o.node.0,
            incarnation: o.incarnation,
        }),
    }
}

fn entry_of(record: Record) -> (String, chorus::StoredEntry) {
    let Record {
        key,
        value,
        version,
        flags,
        owner,
    } = record;
    let entry = chorus::StoredEntry {
        value,
        version,
        revision: 0,
        flags,
        owner: owner.map(|o| chorus::Owner {
            node: chorus::NodeId(o.node),
            incarnation: o.incarnation,
        }),
    };
    (key, entry)
}

/// `PUT /v1/snapshot[?force-newer]`: checks the whole file, then merges it by version (or
/// re-stamps every entry with `force-newer`).
pub async fn put_snapshot(
    State(node): State<Node>,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let params = parse_query(q.as_deref(), &["force-newer"])?;
    let mode = match params.first().map(|(_, v)| v.as_str()) {
        None | Some("false") => chorus::RestoreMode::ByVersion,
        Some("" | "true") => chorus::RestoreMode::ForceNewer,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "bad force-newer {other:?}: give it without a value (?force-newer) or as true/false"
            )));
        }
    };
    let body = body?;
    let (header, records) =
        tokio::task::spawn_blocking(move || decode(&body, RecordLimits::default()))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let entries = records.len();
    let report = node
        .restore(records.into_iter().map(entry_of).collect(), mode)
        .await?;
    Ok(axum::Json(json!({
        "entries": entries,
        "applied": report.applied,
        "skipped_older": report.skipped_older,
        "snapshot_revision": header.revision,
        "snapshot_node_id": header.node_id,
        "force_newer": matches!(mode, chorus::RestoreMode::ForceNewer),
    }))
    .into_response())
}

/// `GET /v1/export[?prefix=P]`: the live keys under `P` in `consul kv export`'s format.
pub async fn export(State(node): State<Node>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let params = parse_query(q.as_deref(), &["prefix"])?;
    let prefix = params.first().map_or("", |(_, v)| v.as_str());
    let pairs: Vec<KvPair> = node
        .scan(prefix)
        .into_iter()
        .map(|(key, entry)| KvPair {
            key,
            flags: entry.flags,
            value: entry.value,
        })
        .collect();
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        export_json(&pairs),
    )
        .into_response())
}

/// Cuts `pairs` into batches within the node's limits on operations and bytes per write.
pub fn batches(pairs: Vec<KvPair>, limits: chorus_replication::Limits) -> Vec<Vec<Op>> {
    let mut out = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    for p in pairs {
        let cost = p.key.len() + p.value.len() + OP_OVERHEAD;
        if !batch.is_empty()
            && (batch.len() == limits.max_batch_ops || bytes + cost > limits.max_write_bytes)
        {
            out.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += cost;
        batch.push(Op::put_with(
            p.key,
            p.value,
            PutMeta {
                flags: p.flags,
                owned: false,
            },
        ));
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

/// `PUT /v1/import`: checks the whole `consul kv export` file, then writes it as batches.
pub async fn import(
    State(node): State<Node>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body?;
    let pairs = parse_export(&body, RecordLimits::default())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let keys = pairs.len();
    let batches = batches(pairs, chorus_replication::Limits::default());
    let total = batches.len();
    let mut keys_applied = 0;
    for (done, ops) in batches.into_iter().enumerate() {
        let len = ops.len();
        if let Err(e) = node.batch(ops).await {
            // The file was valid: a batch the node refused now (its clock, a shutdown) leaves
            // the earlier ones applied; the answer says how far it got.
            return Err(ApiError::from(e).with_detail(json!({
                "batches_applied": done,
                "batches": total,
                "keys_applied": keys_applied,
            })));
        }
        keys_applied += len;
    }
    Ok(axum::Json(json!({ "imported": keys, "batches": total })).into_response())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn imports_are_cut_within_the_limits() {
        let limits = chorus_replication::Limits::default();
        let pair = |i: usize, len: usize| KvPair {
            key: format!("k{i}"),
            flags: 0,
            value: Bytes::from(vec![b'v'; len]),
        };
        let small: Vec<KvPair> = (0..2500).map(|i| pair(i, 10)).collect();
        let sizes: Vec<usize> = batches(small, limits).iter().map(Vec::len).collect();
        assert_eq!(sizes, [1024, 1024, 452]);
        let large: Vec<KvPair> = (0..5).map(|i| pair(i, 400 * 1024)).collect();
        let sizes: Vec<usize> = batches(large, limits).iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 2, 1]);
        assert!(batches(Vec::new(), limits).is_empty());
    }
}
