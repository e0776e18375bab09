//! `GET`, `PUT` and `DELETE /v1/kv/{key}` in Consul's shapes.
//!
//! - `GET`: `[{"LockIndex":0,"Key","Flags","Value":base64,"CreateIndex","ModifyIndex"}]`, or
//!   the bare value with `?raw`, every entry under the key with `?recurse`, the key names
//!   with `?keys` (cut after `?separator`); 404 (empty body) when there is nothing. Blocking
//!   with `?index=&wait=` (see [`super::blocking`]).
//! - `PUT`: the raw body is the value; `?flags=` is stored with it; `?cas=0` writes only if
//!   the key is absent, `?cas=N` only if its `ModifyIndex` is `N`. Answers `true` or `false`.
//! - `DELETE`: `?recurse` deletes every key under the prefix; `?cas=N` only if the
//!   `ModifyIndex` is `N`. Answers `true` (or `false` for a failed `cas`).
//!
//! `?acquire` and `?release` (sessions) answer 501.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use chorus::{Check, Entry, Expect, Op, PutMeta};
use serde_json::{Value, json};

use super::blocking::{self, Scope, Wait};
use super::index::{self, Indexes};
use super::{Consul, Query, body_error, condition_failed, not_supported_sessions};
use crate::http::ApiError;

/// Most deletes in one batch of a `DELETE ?recurse` (keys are at most 1 KiB: a batch stays
/// well under the node's write size limit).
const DELETES_PER_BATCH: usize = 512;

/// `/v1/kv/{key}`, `GET`.
pub async fn get(
    State(consul): State<Arc<Consul>>,
    key: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let Path(key) = key.map_err(bad_key)?;
    read(&consul, &key, q.as_deref()).await
}

/// `/v1/kv/` (the empty key: only with `?recurse` or `?keys`), `GET`.
pub async fn get_root(
    State(consul): State<Arc<Consul>>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    read(&consul, "", q.as_deref()).await
}

/// `/v1/kv/{key}`, `PUT`.
pub async fn put(
    State(consul): State<Arc<Consul>>,
    key: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(key) = key.map_err(bad_key)?;
    write(&consul, &key, q.as_deref(), body.map_err(body_error)?).await
}

/// `/v1/kv/`, `PUT`: Consul's "missing key name".
pub async fn put_root(
    State(consul): State<Arc<Consul>>,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    write(&consul, "", q.as_deref(), body.map_err(body_error)?).await
}

/// `/v1/kv/{key}`, `DELETE`.
pub async fn delete(
    State(consul): State<Arc<Consul>>,
    key: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let Path(key) = key.map_err(bad_key)?;
    remove(&consul, &key, q.as_deref()).await
}

/// `/v1/kv/`, `DELETE`: only with `?recurse` (every key).
pub async fn delete_root(
    State(consul): State<Arc<Consul>>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    remove(&consul, "", q.as_deref()).await
}

fn bad_key(e: PathRejection) -> ApiError {
    ApiError::bad_request(format!("bad key in path: {}", e.body_text()))
}

fn missing_key() -> ApiError {
    ApiError::bad_request("missing key name: use /v1/kv/{key}")
}

/// An entry as Consul shows it; `with_value` false leaves `Value` null (as in a
/// transaction's write results).
pub fn dir_entry(key: &str, entry: &Entry, with_value: bool) -> Value {
    dir_json(
        key,
        entry.flags,
        entry.revision,
        with_value.then_some(&entry.value[..]),
    )
}

/// An entry as Consul shows it, from its parts: `revision` is the local one.
pub fn dir_json(key: &str, flags: u64, revision: u64, value: Option<&[u8]>) -> Value {
    let modify = index::of_revision(revision);
    json!({
        "LockIndex": 0,
        "Key": key,
        "Flags": flags,
        "Value": value.map_or(Value::Null, value_json),
        // Chorus keeps no creation index: it is the index of the write that holds the value.
        "CreateIndex": modify,
        "ModifyIndex": modify,
    })
}

/// A value as Consul encodes it: base64, `null` when empty.
fn value_json(value: &[u8]) -> Value {
    if value.is_empty() {
        Value::Null
    } else {
        Value::from(base64::engine::general_purpose::STANDARD.encode(value))
    }
}

/// An answer with its `X-Consul-Index`.
pub fn answer(
    status: StatusCode,
    consul_index: u64,
    content_type: &'static str,
    body: Body,
) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(super::INDEX_HEADER, HeaderValue::from(consul_index));
    if status != StatusCode::NOT_FOUND {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    response
}

fn json_answer(consul_index: u64, body: &Value) -> Response {
    answer(
        StatusCode::OK,
        consul_index,
        "application/json",
        Body::from(body.to_string()),
    )
}

fn not_found(consul_index: u64) -> Response {
    answer(StatusCode::NOT_FOUND, consul_index, "", Body::empty())
}

/// What a `GET` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read<'a> {
    /// The entry of one key (bare value with `raw`).
    Key { raw: bool },
    /// Every entry under the prefix.
    Recurse,
    /// The key names under the prefix, cut after the separator.
    Keys { separator: Option<&'a str> },
}

async fn read(consul: &Consul, key: &str, q: Option<&str>) -> Result<Response, ApiError> {
    let q = Query::parse(q, &["recurse", "keys", "separator", "raw", "index", "wait"])?;
    if q.has("acquire") || q.has("release") {
        return Err(not_supported_sessions());
    }
    let wait = Wait::parse(q.get("index"), q.get("wait"))?;
    let separator = q.get("separator").filter(|s| !s.is_empty());
    let (keys, recurse, raw) = (q.has("keys"), q.has("recurse"), q.has("raw"));
    if raw && (keys || recurse) {
        return Err(ApiError::bad_request(
            "raw answers one key: it cannot be combined with recurse or keys",
        ));
    }
    let what = if keys {
        Read::Keys { separator }
    } else if recurse {
        Read::Recurse
    } else {
        Read::Key { raw }
    };
    if separator.is_some() && !matches!(what, Read::Keys { .. }) {
        return Err(ApiError::bad_request("separator is only used with keys"));
    }
    if key.is_empty() && matches!(what, Read::Key { .. }) {
        return Err(missing_key());
    }
    let (node, indexes) = (&consul.node, &*consul.indexes);
    match what {
        Read::Key { raw } => {
            blocking::run(
                node,
                &consul.blocking,
                Scope::Key(key),
                wait,
                move || async move {
                    let before = node.revision();
                    let entry = node.get(key);
                    let consul_index = Indexes::of_key(before, entry.as_ref());
                    let response = match entry {
                        None => not_found(consul_index),
                        Some(e) if raw => {
                            let mut r = answer(
                                StatusCode::OK,
                                consul_index,
                                "application/octet-stream",
                                Body::from(e.value),
                            );
                            r.headers_mut().insert(
                                header::X_CONTENT_TYPE_OPTIONS,
                                HeaderValue::from_static("nosniff"),
                            );
                            r
                        }
                        Some(e) => json_answer(consul_index, &json!([dir_entry(key, &e, true)])),
                    };
                    Ok((response, consul_index))
                },
            )
            .await
        }
        Read::Recurse => {
            blocking::run(
                node,
                &consul.blocking,
                Scope::Prefix(key),
                wait,
                move || async move {
                    let (entries, consul_index) = indexes.read_prefix(node, key).await;
                    if entries.is_empty() {
                        return Ok((not_found(consul_index), consul_index));
                    }
                    let list: Vec<Value> =
                        entries.iter().map(|(k, e)| dir_entry(k, e, true)).collect();
                    Ok((json_answer(consul_index, &Value::from(list)), consul_index))
                },
            )
            .await
        }
        Read::Keys { separator } => {
            blocking::run(
                node,
                &consul.blocking,
                Scope::Prefix(key),
                wait,
                move || async move {
                    let (entries, consul_index) = indexes.read_prefix(node, key).await;
                    let names = key_names(key, separator, entries.iter().map(|(k, _)| k.as_str()));
                    if names.is_empty() {
                        return Ok((not_found(consul_index), consul_index));
                    }
                    Ok((json_answer(consul_index, &json!(names)), consul_index))
                },
            )
            .await
        }
    }
}

/// The names `?keys` lists: every key under `prefix`, or with a separator the part up to
/// and including the first separator after the prefix (each such "folder" once). `keys`
/// are sorted.
fn key_names<'a>(
    prefix: &str,
    separator: Option<&str>,
    keys: impl Iterator<Item = &'a str>,
) -> Vec<&'a str> {
    let mut names: Vec<&str> = Vec::new();
    for key in keys {
        let name = match separator {
            Some(sep) => match key.get(prefix.len()..).and_then(|rest| rest.find(sep)) {
                Some(at) => &key[..prefix.len() + at + sep.len()],
                None => key,
            },
            None => key,
        };
        // Sorted keys put every key of one folder next to each other.
        if names.last() != Some(&name) {
            names.push(name);
        }
    }
    names
}

/// A Consul index parameter (`cas`, `flags`).
fn number(q: &Query, name: &str) -> Result<Option<u64>, ApiError> {
    q.get(name)
        .map(|text| {
            text.trim().parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("invalid {name} {text:?}: expected a number"))
            })
        })
        .transpose()
}

fn boolean(ok: bool) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        if ok { "true" } else { "false" },
    )
        .into_response()
}

/// The check a Consul `cas` index stands for: 0 is "absent", `N` is "`ModifyIndex` is `N`".
pub fn cas_check(key: &str, cas: u64) -> Check {
    let expect = match index::to_revision(cas) {
        None => Expect::Absent,
        Some(revision) => Expect::Revision(revision),
    };
    Check {
        key: key.to_owned(),
        expect,
    }
}

async fn write(
    consul: &Consul,
    key: &str,
    q: Option<&str>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let q = Query::parse(q, &["flags", "cas", "acquire", "release"])?;
    if q.has("acquire") || q.has("release") {
        return Err(not_supported_sessions());
    }
    if key.is_empty() {
        return Err(missing_key());
    }
    let flags = number(&q, "flags")?.unwrap_or(0);
    let cas = number(&q, "cas")?;
    let op = Op::put_with(
        key.to_owned(),
        body,
        PutMeta {
            flags,
            owned: false,
        },
    );
    let written = match cas {
        None => consul.node.batch(vec![op]).await,
        Some(cas) => {
            consul
                .node
                .batch_checked(vec![cas_check(key, cas)], vec![op])
                .await
        }
    };
    match written {
        Ok(_) => Ok(boolean(true)),
        Err(e) if condition_failed(&e).is_some() => Ok(boolean(false)),
        Err(e) => Err(e.into()),
    }
}

async fn remove(consul: &Consul, key: &str, q: Option<&str>) -> Result<Response, ApiError> {
    let q = Query::parse(q, &["recurse", "cas"])?;
    let cas = number(&q, "cas")?;
    let node = &consul.node;
    if q.has("recurse") {
        if cas.is_some() {
            return Err(ApiError::bad_request(
                "cas deletes one key: it cannot be combined with recurse",
            ));
        }
        let keys: Vec<String> = node.scan(key).into_iter().map(|(k, _)| k).collect();
        for chunk in keys.chunks(DELETES_PER_BATCH) {
            let ops = chunk.iter().map(|k| Op::delete(k.clone())).collect();
            node.batch(ops).await?;
        }
        return Ok(boolean(true));
    }
    if key.is_empty() {
        return Err(missing_key());
    }
    // Deleting an absent key is a success that writes nothing (as in Consul, also with cas).
    if node.get(key).is_none() {
        return Ok(boolean(true));
    }
    let deleted = match cas {
        None => node.batch(vec![Op::delete(key.to_owned())]).await,
        // `cas=0` never deletes a key that exists.
        Some(0) => return Ok(boolean(false)),
        Some(cas) => {
            node.batch_checked(vec![cas_check(key, cas)], vec![Op::delete(key.to_owned())])
                .await
        }
    };
    match deleted {
        Ok(_) => Ok(boolean(true)),
        Err(e) if condition_failed(&e).is_some() => Ok(boolean(false)),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_a_separator_list_each_folder_once() {
        let keys = ["a/b", "a/c/d", "a/c/e", "a/d", "a/e/", "a/e/f"];
        assert_eq!(
            key_names("a/", Some("/"), keys.into_iter()),
            ["a/b", "a/c/", "a/d", "a/e/"]
        );
        assert_eq!(key_names("a/", None, keys.into_iter()), keys);
        assert_eq!(
            key_names("", Some("/"), ["a/b", "b", "c/d"].into_iter()),
            ["a/", "b", "c/"]
        );
        // A separator of several characters.
        assert_eq!(
            key_names("x", Some("::"), ["x::1::2", "x::1::3", "xy"].into_iter()),
            ["x::", "xy"]
        );
    }

    #[test]
    fn values_are_base64_and_empty_is_null() {
        assert_eq!(value_json(b"hello"), Value::from("aGVsbG8="));
        assert_eq!(value_json(b""), Value::Null);
    }
}
