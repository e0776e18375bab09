//! The agent's HTTP API (axum): key-value access, watch as server-sent events, publish and
//! subscribe (server-sent events) for messages that are not stored, members, counters,
//! Prometheus metrics and health. See `docs/http-api.md`.
//!
//! Every request is untrusted: bad keys, bad queries, bad UTF-8 and oversized bodies get a
//! 4xx answer with a JSON body `{"error": "..."}`, never a panic.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde_json::{Value, json};

use chorus::{Change, Check, Delivery, Entry, Expect, Node, Op};

use crate::syncdir::{Kind, SyncSet, SyncStats};

/// Largest request body accepted (the node's own value limit may be lower).
pub const MAX_BODY: usize = 1024 * 1024;

/// A JSON error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// Fields beside `error` in the JSON answer (e.g. the clock offset of a refused write).
    detail: Option<Value>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            detail: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// Adds the fields of `detail` (a JSON object) beside `error` in the answer.
    pub(crate) fn with_detail(mut self, detail: Value) -> Self {
        match (&mut self.detail, detail) {
            (Some(Value::Object(have)), Value::Object(more)) => have.extend(more),
            (slot, detail) => *slot = Some(detail),
        }
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let (Some(Value::Object(detail)), Some(map)) = (self.detail, body.as_object_mut()) {
            map.extend(detail);
        }
        (self.status, axum::Json(body)).into_response()
    }
}

/// The HTTP status of every error a node call can return: the one place where node errors
/// become statuses (every handler goes through `From<chorus::Error> for ApiError`).
///
/// The replication layer's refusals are listed one by one, so a new one does not compile
/// until it is given a status here; `chorus::Error` is `#[non_exhaustive]`, so its new
/// variants fall to 500 until they get an arm of their own.
fn status_of(e: &chorus::Error) -> StatusCode {
    use chorus::ReplicationError as R;
    match e {
        chorus::Error::Replication(refused) => match refused {
            R::ValueTooLarge { .. } | R::WriteTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            R::EmptyKey
            | R::KeyTooLong { .. }
            | R::EmptyBatch
            | R::BatchTooLarge { .. }
            | R::DuplicateKey { .. }
            | R::TooManyChecks { .. }
            | R::InvalidEntry { .. } => StatusCode::BAD_REQUEST,
            R::ClockAhead { .. } => StatusCode::SERVICE_UNAVAILABLE,
            // A conditional write whose condition did not hold: nothing changed.
            R::ConditionFailed { .. } => StatusCode::CONFLICT,
        },
        // A state of the node, not of the request: it lasts until the clock is fixed (or
        // catches up with the node's history), so 503 like any other unavailability.
        chorus::Error::ClockAhead { .. } => StatusCode::SERVICE_UNAVAILABLE,
        chorus::Error::Compacted { .. } => StatusCode::GONE,
        chorus::Error::Closed => StatusCode::SERVICE_UNAVAILABLE,
        chorus::Error::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
        chorus::Error::Topic(_) => StatusCode::BAD_REQUEST,
        chorus::Error::MessageTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        chorus::Error::TooManySubscriptions { .. } => StatusCode::SERVICE_UNAVAILABLE,
        chorus::Error::Transport(_) | chorus::Error::Durability(_) | chorus::Error::Config(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<chorus::Error> for ApiError {
    fn from(e: chorus::Error) -> Self {
        let status = status_of(&e);
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %e, "HTTP API: node error");
        }
        let detail = match &e {
            chorus::Error::ClockAhead {
                offset_ms,
                bound_ms,
                cause,
            } => Some(json!({
                "offset_ms": offset_ms,
                "bound_ms": bound_ms,
                "cause": match cause {
                    chorus::ClockCause::WallClock => "wall_clock",
                    chorus::ClockCause::History => "history",
                },
            })),
            chorus::Error::Replication(chorus::ReplicationError::ConditionFailed {
                key,
                current,
                revision,
            }) => Some(json!({
                "key": key,
                "current_version": current.map(|v| v.to_string()),
                "current_revision": revision,
            })),
            _ => None,
        };
        Self {
            detail,
            ..Self::new(status, e.to_string())
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        Self::bad_request(format!("bad key in path: {}", e.body_text()))
    }
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("request body larger than {MAX_BODY} bytes")
        } else {
            e.body_text()
        };
        Self::new(status, message)
    }
}

/// The router of the agent's API over `node`.
pub fn router(node: Node) -> Router {
    Router::new()
        .route("/v1/kv", get(list))
        .route("/v1/kv/", get(empty_key).put(empty_key).delete(empty_key))
        .route(
            "/v1/kv/{*key}",
            get(get_key).put(put_key).delete(delete_key),
        )
        .route(
            "/v1/batch",
            post(crate::http_batch::batch).put(crate::http_batch::batch),
        )
        .route("/v1/watch", get(watch))
        .route("/v1/publish/{*topic}", post(publish))
        .route("/v1/subscribe/{*topic}", get(subscribe))
        .route("/v1/members", get(members))
        .route("/v1/members/watch", get(crate::http_members::watch_members))
        .route("/v1/stats", get(stats))
        .route("/v1/health", get(health))
        .route(
            "/v1/snapshot",
            get(crate::backup::get_snapshot)
                .put(crate::backup::put_snapshot)
                .layer(DefaultBodyLimit::max(crate::backup::MAX_FILE)),
        )
        .route("/v1/export", get(crate::backup::export))
        .route(
            "/v1/import",
            axum::routing::put(crate::backup::import)
                .layer(DefaultBodyLimit::max(crate::backup::MAX_FILE)),
        )
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(node)
}

/// Parses an `application/x-www-form-urlencoded` query strictly: bad escapes, bad UTF-8 and
/// unknown or repeated parameters are errors.
pub fn parse_query(raw: Option<&str>, allowed: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let Some(raw) = raw else { return Ok(out) };
    for part in raw.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        let name = decode_component(name)?;
        let value = decode_component(value)?;
        if !allowed.contains(&name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {name:?} (allowed: {})",
                allowed.join(", ")
            )));
        }
        if out.iter().any(|(n, _)| *n == name) {
            return Err(ApiError::bad_request(format!(
                "query parameter {name:?} given twice"
            )));
        }
        out.push((name, value));
    }
    Ok(out)
}

fn decode_component(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| ApiError::bad_request("bad percent-escape in query"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::bad_request("query is not valid UTF-8"))
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// A value as JSON fields: `value` when UTF-8, `value_base64` otherwise.
fn value_fields(obj: &mut serde_json::Map<String, Value>, value: &[u8]) {
    bytes_fields(obj, "value", value);
}

/// Bytes as JSON fields: `{name}` when UTF-8, `{name}_base64` otherwise.
fn bytes_fields(obj: &mut serde_json::Map<String, Value>, name: &str, value: &[u8]) {
    match std::str::from_utf8(value) {
        Ok(text) => obj.insert(name.into(), Value::from(text)),
        Err(_) => obj.insert(
            format!("{name}_base64"),
            Value::from(base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                value,
            )),
        ),
    };
}

fn entry_json(key: &str, entry: &Entry) -> Value {
    let mut obj = serde_json::Map::new();
    obj.insert("key".into(), Value::from(key));
    value_fields(&mut obj, &entry.value);
    obj.insert("version".into(), Value::from(entry.version.to_string()));
    obj.insert("revision".into(), Value::from(entry.revision));
    if let Some(owner) = entry.owner {
        obj.insert(
            "owner".into(),
            json!({ "node_id": owner.node.0, "incarnation": owner.incarnation }),
        );
    }
    Value::Object(obj)
}

/// The JSON of one change, as sent in watch events.
pub fn change_json(change: &Change) -> Value {
    let mut obj = serde_json::Map::new();
    obj.insert("revision".into(), Value::from(change.revision));
    obj.insert("key".into(), Value::from(change.key.as_str()));
    match &change.value {
        Some(v) => {
            obj.insert("deleted".into(), Value::from(false));
            value_fields(&mut obj, v);
        }
        None => {
            obj.insert("deleted".into(), Value::from(true));
        }
    }
    obj.insert("version".into(), Value::from(change.version.to_string()));
    Value::Object(obj)
}

async fn empty_key() -> ApiError {
    ApiError::bad_request("empty key: use /v1/kv/{key}")
}

async fn list(State(node): State<Node>, RawQuery(q): RawQuery) -> Result<Response, ApiError> {
    let params = parse_query(q.as_deref(), &["prefix"])?;
    let prefix = param(&params, "prefix").unwrap_or("");
    let revision = node.revision();
    let entries: Vec<Value> = node
        .scan(prefix)
        .iter()
        .map(|(k, e)| entry_json(k, e))
        .collect();
    Ok(axum::Json(json!({
        "prefix": prefix,
        "revision": revision,
        "count": entries.len(),
        "entries": entries,
    }))
    .into_response())
}

async fn get_key(
    State(node): State<Node>,
    key: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(key) = key?;
    let entry = node
        .get(&key)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("key {key:?} not found")))?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert("x-chorus-revision", HeaderValue::from(entry.revision));
    if let Ok(v) = HeaderValue::from_str(&entry.version.to_string()) {
        headers.insert("x-chorus-version", v);
    }
    Ok((headers, entry.value).into_response())
}

/// The condition of a conditional `PUT`/`DELETE` (`?if-absent`, `?if-version=V`), if any.
fn write_condition(params: &[(String, String)], key: &str) -> Result<Vec<Check>, ApiError> {
    let absent = match param(params, "if-absent") {
        None | Some("false") => false,
        Some("" | "true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "bad if-absent {other:?}: give it without a value (?if-absent) or as true/false"
            )));
        }
    };
    let check =
        condition(key, absent, param(params, "if-version")).map_err(ApiError::bad_request)?;
    Ok(check.into_iter().collect())
}

/// The check of a conditional write of `key`: `absent` for if-absent, `version` for
/// if-version (a version as the API prints it). Shared by `PUT`/`DELETE /v1/kv/{key}` and
/// the operations of `POST /v1/batch` (`crate::http_batch`).
///
/// # Errors
/// What is wrong (a 400): a version that does not parse, or both conditions at once.
pub(crate) fn condition(
    key: &str,
    absent: bool,
    version: Option<&str>,
) -> Result<Option<Check>, String> {
    let version = version
        .map(|v| {
            v.parse::<chorus::Version>()
                .map_err(|e| format!("bad if-version: {e}"))
        })
        .transpose()?;
    match (absent, version) {
        (true, Some(_)) => Err("if-absent and if-version exclude each other".into()),
        (true, None) => Ok(Some(Check::new(key, Expect::Absent))),
        (false, Some(v)) => Ok(Some(Check::new(key, Expect::Version(v)))),
        (false, None) => Ok(None),
    }
}

async fn put_key(
    State(node): State<Node>,
    key: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(key) = key?;
    let params = parse_query(q.as_deref(), &["if-absent", "if-version", "owned"])?;
    let checks = write_condition(&params, &key)?;
    let owned = match param(&params, "owned") {
        None | Some("false") => false,
        Some("" | "true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "owned must be true or false, got {other:?}"
            )));
        }
    };
    let body = body?;
    let meta = chorus::PutMeta {
        owned,
        ..chorus::PutMeta::default()
    };
    let version = node
        .batch_checked(checks, vec![Op::put_with(key.clone(), body, meta)])
        .await?;
    Ok(axum::Json(json!({ "key": key, "version": version.to_string() })).into_response())
}

async fn delete_key(
    State(node): State<Node>,
    key: Result<Path<String>, PathRejection>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let Path(key) = key?;
    let params = parse_query(q.as_deref(), &["if-version"])?;
    let checks = write_condition(&params, &key)?;
    // A conditional delete of an absent key fails its condition (409 with no current
    // version) rather than answering 404.
    if checks.is_empty() && node.get(&key).is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("key {key:?} not found"),
        ));
    }
    let version = node
        .batch_checked(checks, vec![Op::delete(key.clone())])
        .await?;
    Ok(
        axum::Json(json!({ "key": key, "version": version.to_string(), "deleted": true }))
            .into_response(),
    )
}

async fn watch(
    State(node): State<Node>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let params = parse_query(q.as_deref(), &["prefix", "from"])?;
    let prefix = param(&params, "prefix").unwrap_or("").to_string();
    let parse_rev = |s: &str, what: &str| {
        s.trim().parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("{what} must be a revision number, got {s:?}"))
        })
    };
    // A reconnecting EventSource sends Last-Event-ID; it wins over `from`.
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => Some(parse_rev(
            v.to_str()
                .map_err(|_| ApiError::bad_request("Last-Event-ID is not text"))?,
            "Last-Event-ID",
        )?),
        None => None,
    };
    let from = match (last_event_id, param(&params, "from")) {
        (Some(rev), _) => Some(rev),
        (None, Some(s)) => Some(parse_rev(s, "from")?),
        (None, None) => None,
    };
    let start = from.unwrap_or_else(|| node.revision());
    let w = match from {
        Some(rev) => node.watch_from(&prefix, rev).await?,
        None => node.watch(&prefix),
    };
    let opening = futures_util::stream::once(async move {
        Ok::<_, Infallible>(
            Event::default().comment(format!("watching {prefix:?} after revision {start}")),
        )
    });
    // A watch that cannot go on (it fell behind the change log) yields its error and ends:
    // the event stream ends with it, and a client reconnecting with Last-Event-ID gets 410
    // Gone if that revision is too old.
    let changes = w
        .filter_map(|change| futures_util::future::ready(change.ok()))
        .map(|change| {
            let kind = if change.value.is_some() {
                "put"
            } else {
                "delete"
            };
            Ok(Event::default()
                .id(change.revision.to_string())
                .event(kind)
                .data(change_json(&change).to_string()))
        });
    Ok(Sse::new(opening.chain(changes))
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn publish(
    State(node): State<Node>,
    topic: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(topic) = topic?;
    let body = body?;
    let bytes = body.len();
    node.publish(&topic, body).await?;
    Ok(axum::Json(json!({ "topic": topic, "bytes": bytes })).into_response())
}

/// The server-sent event of one delivery of a subscription (see [`delivery_json`]).
fn delivery_event(delivery: Result<Delivery, chorus::Error>) -> Option<Event> {
    let (kind, data) = delivery_json(delivery)?;
    Some(Event::default().event(kind).data(data.to_string()))
}

/// The event name and JSON of one delivery of a subscription: `message` (`from`, `topic` and
/// the payload as `payload` or `payload_base64`), `lost` (`from`, `count`) or `lagged`
/// (`skipped`).
pub fn delivery_json(delivery: Result<Delivery, chorus::Error>) -> Option<(&'static str, Value)> {
    Some(match delivery {
        Ok(Delivery::Message(m)) => {
            let mut obj = serde_json::Map::new();
            obj.insert("from".into(), Value::from(m.from.0));
            obj.insert("topic".into(), Value::from(m.topic));
            bytes_fields(&mut obj, "payload", &m.payload);
            ("message", Value::Object(obj))
        }
        Ok(Delivery::Lost { from, count }) => ("lost", json!({ "from": from.0, "count": count })),
        Err(chorus::Error::Lagged { skipped }) => ("lagged", json!({ "skipped": skipped })),
        // `Delivery` may grow variants, and a subscription yields no other error today.
        Ok(_) | Err(_) => return None,
    })
}

async fn subscribe(
    State(node): State<Node>,
    topic: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(filter) = topic?;
    let subscription = node.subscribe(&filter)?;
    let opening = futures_util::stream::once(async move {
        Ok::<_, Infallible>(Event::default().comment(format!("subscribed to {filter:?}")))
    });
    let deliveries =
        subscription.filter_map(|d| futures_util::future::ready(delivery_event(d).map(Ok)));
    Ok(Sse::new(opening.chain(deliveries))
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn members(State(node): State<Node>) -> Response {
    let list: Vec<Value> = node
        .members()
        .iter()
        .map(crate::http_members::member_json)
        .collect();
    axum::Json(json!({
        "node_id": node.node_id().0,
        "node_name": node.node_name(),
        "members": list,
    }))
    .into_response()
}

/// The mirrors' figures, when the agent runs `--sync-dir`.
type SyncFigures = Option<Extension<Arc<SyncSet>>>;
/// The templates' figures, when the agent runs `--template`.
type TemplateFigures = Option<Extension<Arc<crate::template::TemplateStats>>>;

async fn stats(
    State(node): State<Node>,
    sync: SyncFigures,
    templates: TemplateFigures,
) -> Response {
    // Live keys from the node's counter snapshot (refreshed every 100 ms): a scrape costs the
    // same for ten keys or ten million, where `scan("")` copied every key to count them.
    let snapshot = node.counters();
    let keys = snapshot.store.keys;
    let counters: serde_json::Map<String, Value> = snapshot
        .iter()
        .map(|(name, v)| (name, Value::from(v)))
        .collect();
    let mut answer = json!({
        "node_id": node.node_id().0,
        "revision": node.revision(),
        "in_sync": node.is_in_sync(),
        "keys": keys,
        "members": node.members().len(),
        "counters": counters,
    });
    if let Some(Extension(sync)) = sync {
        let object = |figures: Vec<(&str, Kind, u64)>| -> serde_json::Map<String, Value> {
            figures
                .into_iter()
                .map(|(name, _, v)| (name.to_owned(), Value::from(v)))
                .collect()
        };
        // `sync_dir`: the sums over every mirror; `sync_dirs`: each one with its labels.
        answer["sync_dir"] = Value::Object(object(sync.totals()));
        let each: Vec<Value> = sync
            .dirs
            .iter()
            .map(|d| {
                let mut figures = object(d.stats.figures());
                figures.insert("dir".into(), Value::from(d.dir.display().to_string()));
                figures.insert("prefix".into(), Value::from(d.prefix.as_str()));
                Value::Object(figures)
            })
            .collect();
        answer["sync_dirs"] = Value::from(each);
    }
    if let Some(Extension(templates)) = templates {
        answer["templates"] = templates.json();
    }
    axum::Json(answer).into_response()
}

/// `text` as a Prometheus label value: backslash, double quote and newline escaped.
pub fn label_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A metric name made of `[a-zA-Z0-9_]` only, prefixed `chorus_`.
pub fn metric_name(name: &str) -> String {
    let mut out = String::from("chorus_");
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        }
    }));
    out
}

async fn metrics(
    State(node): State<Node>,
    sync: SyncFigures,
    templates: TemplateFigures,
) -> Response {
    let counters = node.counters();
    let members = node.members();
    let mut text = String::new();
    let mut gauge = |name: &str, help: &str, v: u64| {
        let _ = writeln!(
            text,
            "# HELP chorus_{name} {help}\n# TYPE chorus_{name} gauge\nchorus_{name} {v}"
        );
    };
    gauge(
        "revision",
        "Local revision (changes applied by this node).",
        node.revision(),
    );
    gauge("keys", "Live keys in the local store.", counters.store.keys);
    gauge(
        "members",
        "Members known, this node included.",
        members.len() as u64,
    );
    gauge(
        "in_sync",
        "1 when the store matched every live peer at the last digest exchange.",
        u64::from(node.is_in_sync()),
    );
    let _ = writeln!(
        text,
        "# HELP chorus_member_clock_offset_ms A member's wall clock minus this node's (ms), from its last heartbeat.\n# TYPE chorus_member_clock_offset_ms gauge"
    );
    for m in members.iter().filter(|m| m.node_id != node.node_id()) {
        if let Some(offset) = m.clock_offset_ms {
            let _ = writeln!(
                text,
                "chorus_member_clock_offset_ms{{node=\"{}\",name=\"{}\"}} {offset}",
                m.node_id.0,
                crate::http_members::label_value(m.name.as_deref().unwrap_or("")),
            );
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for (name, v) in counters.iter() {
        let metric = metric_name(&name);
        if !seen.insert(metric.clone()) {
            continue;
        }
        let _ = writeln!(text, "# TYPE {metric} counter\n{metric} {v}");
    }
    if let Some(Extension(sync)) = sync {
        // One series per mirror, labelled with its directory and prefix.
        let each: Vec<_> = sync.dirs.iter().map(|d| (d, d.stats.figures())).collect();
        for (index, (name, kind, _)) in SyncStats::default().figures().into_iter().enumerate() {
            let kind = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let _ = writeln!(text, "# TYPE chorus_sync_dir_{name} {kind}");
            for (d, figures) in &each {
                let v = figures.get(index).map_or(0, |f| f.2);
                let _ = writeln!(
                    text,
                    "chorus_sync_dir_{name}{{dir=\"{}\",prefix=\"{}\"}} {v}",
                    label_value(&d.dir.display().to_string()),
                    label_value(&d.prefix)
                );
            }
        }
    }
    if let Some(Extension(templates)) = templates {
        for (name, v) in templates.figures() {
            let _ = writeln!(
                text,
                "# TYPE chorus_template_{name} counter\nchorus_template_{name} {v}"
            );
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn health(State(node): State<Node>) -> Response {
    if node.is_in_sync() {
        (StatusCode::OK, axum::Json(json!({ "status": "in_sync" }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "syncing" })),
        )
            .into_response()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_as_server_sent_events() {
        let message = |payload: &'static [u8]| {
            Ok(Delivery::Message(chorus::Message {
                from: chorus::NodeId(7),
                topic: "chat/a".into(),
                payload: chorus::Bytes::from_static(payload),
            }))
        };
        assert_eq!(
            delivery_json(message(b"hi")),
            Some((
                "message",
                json!({"from": 7, "topic": "chat/a", "payload": "hi"})
            ))
        );
        assert_eq!(
            delivery_json(message(&[0xff])),
            Some((
                "message",
                json!({"from": 7, "topic": "chat/a", "payload_base64": "/w=="})
            ))
        );
        let lost = Ok(Delivery::Lost {
            from: chorus::NodeId(3),
            count: 4,
        });
        assert_eq!(
            delivery_json(lost),
            Some(("lost", json!({"from": 3, "count": 4})))
        );
        assert_eq!(
            delivery_json(Err(chorus::Error::Lagged { skipped: 9 })),
            Some(("lagged", json!({"skipped": 9})))
        );
        assert_eq!(delivery_json(Err(chorus::Error::Closed)), None);
    }

    #[tokio::test]
    async fn a_write_refused_for_clock_skew_is_503_naming_offset_and_bound() {
        let e = chorus::Error::ClockAhead {
            offset_ms: 300_000,
            bound_ms: 59_000,
            cause: chorus::ClockCause::WallClock,
        };
        let response = ApiError::from(e).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["offset_ms"], 300_000);
        assert_eq!(body["bound_ms"], 59_000);
        assert_eq!(body["cause"], "wall_clock");
        let message = body["error"].as_str().unwrap();
        assert!(
            message.contains("300000") && message.contains("59000"),
            "{message}"
        );
    }

    #[test]
    fn query_parsing_is_strict() {
        let p = parse_query(Some("prefix=a%2Fb+c&from=3"), &["prefix", "from"]).unwrap();
        assert_eq!(param(&p, "prefix"), Some("a/b c"));
        assert_eq!(param(&p, "from"), Some("3"));
        assert!(parse_query(Some("prefix=%ff"), &["prefix"]).is_err());
        assert!(parse_query(Some("prefix=%zz"), &["prefix"]).is_err());
        assert!(parse_query(Some("prefix=%4"), &["prefix"]).is_err());
        assert!(parse_query(Some("nope=1"), &["prefix"]).is_err());
        assert!(parse_query(Some("prefix=a&prefix=b"), &["prefix"]).is_err());
        assert!(parse_query(None, &["prefix"]).unwrap().is_empty());
    }

    /// A scrape of `/v1/stats` or `/metrics` allocates about the same for 10 000 keys as for
    /// none: counting the keys with `scan("")` copied every key (more than 800 KB here).
    #[tokio::test]
    async fn a_scrape_does_not_copy_the_store() {
        let hub = chorus::transport::MemoryHub::new(Default::default()).unwrap();
        let transport = hub.endpoint("10.0.0.1:7400".parse().unwrap()).unwrap();
        let node = Node::builder()
            .cluster("scrape")
            .node_id(chorus::NodeId(1))
            .start_with_transport(transport)
            .await
            .unwrap();
        for chunk in 0..10 {
            let ops = (0..1000)
                .map(|i| {
                    chorus::Op::put(
                        format!("app/key-{chunk:02}-{i:04}"),
                        bytes::Bytes::from_static(b"v"),
                    )
                })
                .collect();
            node.batch(ops).await.unwrap();
        }
        // The counter snapshot the answers read is refreshed every 100 ms.
        while node.counters().store.keys < 10_000 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Neither handler awaits anything: polled once, it runs on this thread alone.
        let before = chorus_testkit::alloc::thread_allocated_bytes();
        let answer = stats(State(node.clone()), None, None).await;
        let stats_cost = chorus_testkit::alloc::thread_allocated_bytes() - before;
        let body = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap();
        let json: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["keys"], 10_000);

        let before = chorus_testkit::alloc::thread_allocated_bytes();
        let answer = metrics(State(node.clone()), None, None).await;
        let metrics_cost = chorus_testkit::alloc::thread_allocated_bytes() - before;
        let body = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&body).contains("\nchorus_keys 10000\n"));

        for (what, cost) in [("/v1/stats", stats_cost), ("/metrics", metrics_cost)] {
            eprintln!("{what}: {cost} bytes allocated for one scrape of 10 000 keys");
            assert!(
                cost < 128 * 1024,
                "{what} allocated {cost} bytes for one scrape"
            );
        }
        node.shutdown().await.unwrap();
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("/srv/a"), "/srv/a");
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn metric_names_are_sanitised() {
        assert_eq!(metric_name("naks_sent"), "chorus_naks_sent");
        assert_eq!(metric_name("a.b-c"), "chorus_a_b_c");
    }
}
