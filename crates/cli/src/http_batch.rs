//! `POST /v1/batch` (or `PUT`): many keys written by one request and applied as ONE batch of
//! the node ([`Node::batch_checked`]): one version, one replication message, all or nothing.
//! See `docs/http-api.md`, Batches.
//!
//! The body is JSON, `Content-Type: application/json` (a type browsers may not send to
//! another origin without a preflight the agent never grants, so a web page cannot post a
//! batch), at most [`crate::http::MAX_BODY`] bytes:
//!
//! ```json
//! {"ops": [{"put": "app/a", "value": "text"},
//!          {"put": "app/b", "value_base64": "AAEC", "if_absent": true, "owned": true},
//!          {"delete": "app/old", "if_version": "1767225600000.3@42"},
//!          {"check": "app/schema", "if_version": "1767225600000.1@42"}]}
//! ```
//!
//! At most [`MAX_OPS`] operations (413 beyond). Keys, values and the encoded message are
//! checked by the node exactly as for a single `PUT` (its errors become statuses in
//! `crate::http::status_of`); conditions are parsed by [`crate::http::condition`], as the
//! single `PUT`'s `?if-absent` / `?if-version=`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;

use chorus::{Check, Node, Op, PutMeta};

use crate::http::{ApiError, condition, parse_query};

/// Most operations (puts, deletes and checks together) in one batch: the node's
/// `max_batch_ops` (`chorus_replication::Limits::default()`), so that every batch this
/// endpoint takes is one the node takes and one replication `Write` carries.
pub const MAX_OPS: usize = 1024;

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    ops: Vec<RawOp>,
}

/// One operation as sent: exactly one of `put`, `delete`, `check` names its key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOp {
    put: Option<String>,
    delete: Option<String>,
    check: Option<String>,
    value: Option<String>,
    value_base64: Option<String>,
    #[serde(default)]
    owned: bool,
    #[serde(default)]
    if_absent: bool,
    if_version: Option<String>,
}

/// A parsed batch: what goes to the node, and which operation made each check.
#[derive(Debug)]
struct Batch {
    checks: Vec<Check>,
    ops: Vec<Op>,
    /// The key of each check and the index of the operation that made it (for a 409's `op`).
    checked: Vec<(String, usize)>,
    deletes: usize,
}

/// Parses and checks the body (the node checks keys, values and sizes).
///
/// # Errors
/// 400 for a body that is not the JSON above, an operation that names no key or two, a put
/// without a value or with two, a field its kind does not take, a bad condition, or no put
/// or delete at all; 413 beyond [`MAX_OPS`] operations.
fn parse(body: &[u8]) -> Result<Batch, ApiError> {
    let body: Body = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "bad batch body: {e} (expected {{\"ops\": [{{\"put\": KEY, \"value\": TEXT}}, \
             {{\"delete\": KEY}}, ...]}})"
        ))
    })?;
    if body.ops.len() > MAX_OPS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "batch of {} operations exceeds the limit of {MAX_OPS}",
                body.ops.len()
            ),
        )
        .with_detail(json!({ "ops": body.ops.len(), "max_ops": MAX_OPS })));
    }
    let mut batch = Batch {
        checks: Vec::new(),
        ops: Vec::with_capacity(body.ops.len()),
        checked: Vec::new(),
        deletes: 0,
    };
    for (i, raw) in body.ops.into_iter().enumerate() {
        let bad = |what: &str| ApiError::bad_request(format!("op {i}: {what}"));
        let has_value = raw.value.is_some() || raw.value_base64.is_some();
        let (key, op) = match (raw.put, raw.delete, raw.check) {
            (Some(key), None, None) => {
                let value = match (raw.value, raw.value_base64) {
                    (Some(text), None) => Bytes::from(text),
                    (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map(Bytes::from)
                        .map_err(|e| bad(&format!("value_base64 is not base64: {e}")))?,
                    (None, None) => return Err(bad("a put needs value or value_base64")),
                    (Some(_), Some(_)) => {
                        return Err(bad("give value or value_base64, not both"));
                    }
                };
                let meta = PutMeta {
                    owned: raw.owned,
                    ..PutMeta::default()
                };
                let op = Op::put_with(key.clone(), value, meta);
                (key, Some(op))
            }
            (None, Some(key), None) => {
                if has_value || raw.owned || raw.if_absent {
                    return Err(bad(
                        "a delete takes no value, owned or if_absent (only if_version)",
                    ));
                }
                batch.deletes += 1;
                (key.clone(), Some(Op::delete(key)))
            }
            (None, None, Some(key)) => {
                if has_value || raw.owned {
                    return Err(bad("a check writes nothing: no value or owned"));
                }
                if !raw.if_absent && raw.if_version.is_none() {
                    return Err(bad("a check needs if_absent or if_version"));
                }
                (key, None)
            }
            _ => return Err(bad("give exactly one of put, delete or check (the key)")),
        };
        if let Some(check) =
            condition(&key, raw.if_absent, raw.if_version.as_deref()).map_err(|e| bad(&e))?
        {
            batch.checks.push(check);
            batch.checked.push((key, i));
        }
        batch.ops.extend(op);
    }
    if batch.ops.is_empty() {
        return Err(ApiError::bad_request(
            "a batch needs at least one put or delete",
        ));
    }
    Ok(batch)
}

/// Whether `headers` name a JSON body (`application/json`, parameters allowed).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// `POST /v1/batch` and `PUT /v1/batch`: 200 with `{"version", "revision", "puts",
/// "deletes", "checks"}` once the batch is applied on this node and queued for multicast.
pub async fn batch(
    State(node): State<Node>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    parse_query(q.as_deref(), &[])?;
    if !is_json(&headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a batch is JSON: send it with Content-Type: application/json",
        ));
    }
    let Batch {
        checks,
        ops,
        checked,
        deletes,
    } = parse(&body?)?;
    let (puts, n_checks) = (ops.len() - deletes, checks.len());
    let version = node.batch_checked(checks, ops).await.map_err(|e| {
        // A failed condition also names the operation whose check failed.
        let op = match &e {
            chorus::Error::Replication(chorus::ReplicationError::ConditionFailed {
                key, ..
            }) => checked.iter().find(|(k, _)| k == key).map(|(_, i)| *i),
            _ => None,
        };
        let error = ApiError::from(e);
        match op {
            Some(i) => error.with_detail(json!({ "op": i })),
            None => error,
        }
    })?;
    Ok(axum::Json(json!({
        "version": version.to_string(),
        "revision": node.revision(),
        "puts": puts,
        "deletes": deletes,
        "checks": n_checks,
    }))
    .into_response())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn status(body: &str) -> StatusCode {
        parse(body.as_bytes()).unwrap_err().into_response().status()
    }

    #[test]
    fn the_op_limit_is_the_nodes() {
        assert_eq!(MAX_OPS, chorus_replication::Limits::default().max_batch_ops);
    }

    #[test]
    fn operations_become_one_batch_with_its_checks() {
        let batch = parse(
            br#"{"ops": [
                {"put": "a", "value": "text"},
                {"put": "b", "value_base64": "AAEC", "if_absent": true, "owned": true},
                {"delete": "c", "if_version": "1767225600000.3@42"},
                {"check": "d", "if_version": "1767225600000.1@42"},
                {"put": "e", "value": "", "if_absent": false, "owned": false}
            ]}"#,
        )
        .unwrap();
        assert_eq!(batch.ops.len(), 4);
        assert_eq!(batch.deletes, 1);
        assert_eq!(
            batch.ops[1],
            Op::put_with(
                "b",
                Bytes::from_static(&[0, 1, 2]),
                PutMeta {
                    owned: true,
                    ..PutMeta::default()
                }
            )
        );
        assert_eq!(batch.ops[2], Op::delete("c"));
        let keys: Vec<_> = batch
            .checked
            .iter()
            .map(|(k, i)| (k.as_str(), *i))
            .collect();
        assert_eq!(keys, [("b", 1), ("c", 2), ("d", 3)]);
        assert_eq!(batch.checks.len(), 3);
    }

    #[test]
    fn bad_bodies_are_400_and_too_many_ops_413() {
        for bad in [
            "",
            "not json",
            "[]",
            "{}",
            r#"{"ops": {}}"#,
            r#"{"ops": []}"#,
            r#"{"ops": [{}]}"#,
            r#"{"ops": [{"put": "a"}]}"#,
            r#"{"ops": [{"put": "a", "value": "x", "value_base64": "eA=="}]}"#,
            r#"{"ops": [{"put": "a", "value_base64": "%%%"}]}"#,
            r#"{"ops": [{"put": "a", "delete": "b", "value": "x"}]}"#,
            r#"{"ops": [{"put": "a", "value": "x", "bogus": 1}]}"#,
            r#"{"ops": [{"put": "a", "value": "x"}], "extra": 1}"#,
            r#"{"ops": [{"put": "a", "value": 7}]}"#,
            r#"{"ops": [{"put": "a", "value": "x", "if_version": "12"}]}"#,
            r#"{"ops": [{"put": "a", "value": "x", "if_absent": true, "if_version": "1.0@1"}]}"#,
            r#"{"ops": [{"delete": "a", "if_absent": true}]}"#,
            r#"{"ops": [{"delete": "a", "value": "x"}]}"#,
            r#"{"ops": [{"check": "a"}]}"#,
            r#"{"ops": [{"check": "a", "if_absent": true}]}"#,
        ] {
            assert_eq!(status(bad), StatusCode::BAD_REQUEST, "{bad}");
        }
        let op = r#"{"delete": "k"}"#;
        let body = |n: usize| format!(r#"{{"ops": [{}]}}"#, vec![op; n].join(","));
        assert!(parse(body(MAX_OPS).as_bytes()).is_ok());
        assert_eq!(status(&body(MAX_OPS + 1)), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn only_json_bodies_are_taken() {
        let with = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, t.parse().unwrap());
            is_json(&h)
        };
        assert!(with("application/json"));
        assert!(with("Application/JSON; charset=utf-8"));
        assert!(!with("text/plain"));
        assert!(!with("application/x-www-form-urlencoded"));
        assert!(!is_json(&HeaderMap::new()));
    }
}
