//! The Consul-compatible KV API of the agent (`chorus agent --consul-api ADDR:PORT`): the part
//! of Consul's HTTP API that KV clients use (py-consul, consul-template, envconsul, confd,
//! `consul kv`), in Consul's shapes, over the agent's node. See `docs/consul.md`.
//!
//! - [`kv`]: `GET`, `PUT` and `DELETE /v1/kv/{key}`.
//! - [`txn`]: `PUT /v1/txn`.
//! - [`blocking`]: blocking queries (`?index=&wait=`) on the node's change feed.
//! - [`index`]: `X-Consul-Index` and `ModifyIndex` on this agent.
//!
//! Every answer carries `X-Consul-Index`, `X-Consul-KnownLeader: true` and
//! `X-Consul-LastContact: 0` (every agent takes writes; there is no leader to lose). Errors
//! are the agent's `{"error": ...}` JSON with Consul's statuses. Sessions and locks answer
//! 501; the rest of Consul's API (catalog, health, agent, ACL) 404.
//!
//! It is served like the native API (`crate::server`: connection limit, header timeout):
//! off by default; on the loopback without a token (with the `Host` check of
//! `crate::server::check_host`), anywhere with `--http-token`, which clients then send as
//! `X-Consul-Token`, `?token=` or `Authorization: Bearer`.

pub mod blocking;
pub mod index;
pub mod kv;
pub mod txn;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, put};
use chorus::Node;
use tokio::task::JoinHandle;

use crate::http::{ApiError, parse_query};
use crate::server::{AllowedHosts, HEADER_TIMEOUT, ServeLimits};
use blocking::Blocking;
use index::Indexes;

/// The header of a read's Consul index.
pub const INDEX_HEADER: &str = "x-consul-index";
/// Largest request body: Consul's default `kv_max_value_size` and `txn_max_req_len`.
pub const MAX_BODY: usize = 512 * 1024;

/// Query parameters every endpoint accepts: the token, and Consul's options that mean
/// nothing here (one datacenter, every read is the agent's own view).
const COMMON: &[&str] = &[
    "dc",
    "token",
    "stale",
    "consistent",
    "cached",
    "ns",
    "partition",
];

/// What the handlers share.
#[derive(Debug)]
pub struct Consul {
    node: Node,
    indexes: Arc<Indexes>,
    blocking: Blocking,
}

/// How the Consul API is served.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The agent's `--http-token`, required from every client when set.
    pub token: Option<String>,
    /// Further names a tokenless API answers to (`--http-allow-host`).
    pub allow_hosts: Vec<String>,
    /// Most connections at once (`--http-max-connections`).
    pub max_connections: NonZeroUsize,
}

/// Refuses a Consul API reachable from the network without a token.
///
/// # Errors
/// A message saying how to fix it.
pub fn check_exposure(addr: SocketAddr, token: Option<&str>) -> anyhow::Result<()> {
    if token.is_some_and(str::is_empty) {
        bail!("the HTTP token is empty");
    }
    if !addr.ip().is_loopback() && token.is_none() {
        bail!(
            "the Consul API on {addr} would be reachable from the network without \
             authentication; set a token with --http-token or CHORUS_HTTP_TOKEN (Consul \
             clients send it as X-Consul-Token, e.g. CONSUL_HTTP_TOKEN), or keep \
             --consul-api on 127.0.0.1"
        );
    }
    Ok(())
}

/// Binds `opts.addr` and serves the Consul API over `node` on the runtime `rt` until `stop`
/// turns true (the node's change feed is followed on `rt` too).
///
/// # Errors
/// The address cannot be bound.
pub async fn start(
    node: Node,
    opts: Options,
    rt: &tokio::runtime::Handle,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<std::io::Result<()>>> {
    let addr = opts.addr;
    let listener = rt
        .spawn(async move { tokio::net::TcpListener::bind(addr).await })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .with_context(|| {
            format!("cannot listen on {addr} for the Consul API (choose --consul-api ADDR:PORT)")
        })?;
    let (indexes, feed) = Indexes::new(&node);
    rt.spawn(feed);
    let access = match opts.token {
        Some(token) => Access::Token(token),
        None => Access::Hosts(AllowedHosts::new(addr, &opts.allow_hosts)),
    };
    let app = router(node, indexes, opts.max_connections.get(), access);
    if !addr.ip().is_loopback() {
        tracing::warn!(consul_api = %addr, "Consul API is reachable from the network (token required)");
    }
    tracing::info!(consul_api = %addr, "Consul KV API listening");
    let limits = ServeLimits {
        max_connections: opts.max_connections,
        header_timeout: HEADER_TIMEOUT,
    };
    Ok(rt.spawn(async move {
        crate::server::serve(listener, app, limits, async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })
        .await
    }))
}

/// Who may use the API.
#[derive(Debug, Clone)]
pub enum Access {
    /// Every request must carry this token (see [`require_token`]).
    Token(String),
    /// No token: only requests naming one of these hosts (or none), as
    /// [`crate::server::check_host`].
    Hosts(AllowedHosts),
}

/// The router of the Consul API over `node`; blocked reads are limited to a share of
/// `max_connections`. Refusals of `access` carry the Consul headers too.
pub fn router(node: Node, indexes: Arc<Indexes>, max_connections: usize, access: Access) -> Router {
    let consul = Arc::new(Consul {
        node,
        indexes,
        blocking: Blocking::new(max_connections),
    });
    let app = routes(Arc::clone(&consul));
    let app = match access {
        Access::Token(token) => require_token(app, &token),
        Access::Hosts(hosts) => crate::server::check_host(app, hosts),
    };
    app.layer(axum::middleware::from_fn_with_state(consul, headers))
}

fn routes(consul: Arc<Consul>) -> Router {
    Router::new()
        .route(
            "/v1/kv",
            get(kv::get_root).put(kv::put_root).delete(kv::delete_root),
        )
        .route(
            "/v1/kv/",
            get(kv::get_root).put(kv::put_root).delete(kv::delete_root),
        )
        .route(
            "/v1/kv/{*key}",
            get(kv::get).put(kv::put).delete(kv::delete),
        )
        .route("/v1/txn", put(txn::handle))
        .route(
            "/v1/session/{*rest}",
            any(|| async { not_supported_sessions() }),
        )
        .fallback(|req: Request| async move {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "{} is not served by Chorus's Consul API: it serves the KV store only \
                     (/v1/kv/, /v1/txn); see docs/consul.md",
                    req.uri().path()
                ),
            )
        })
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "method {} not allowed on {}",
                    req.method(),
                    req.uri().path()
                ),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(consul)
}

/// Adds `X-Consul-KnownLeader` and `X-Consul-LastContact` to every answer, and an
/// `X-Consul-Index` (the store's) to those without one.
async fn headers(State(consul): State<Arc<Consul>>, req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    if !h.contains_key(INDEX_HEADER) {
        h.insert(
            INDEX_HEADER,
            HeaderValue::from(index::of_revision(consul.node.revision())),
        );
    }
    h.insert("x-consul-knownleader", HeaderValue::from_static("true"));
    h.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
    response
}

/// Wraps `router` so that every request must carry `token`: as `X-Consul-Token`, as
/// `?token=`, or as `Authorization: Bearer`. Anything else gets 403, as Consul's ACLs.
pub fn require_token(router: Router, token: &str) -> Router {
    let expected: Arc<[u8]> = Arc::from(token.as_bytes());
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let expected = Arc::clone(&expected);
            async move {
                if given_token(&req).is_some_and(|t| crate::keys::constant_time_eq(&t, &expected)) {
                    next.run(req).await
                } else {
                    ApiError::new(
                        StatusCode::FORBIDDEN,
                        "Permission denied: missing or wrong token (send the agent's --http-token \
                     as X-Consul-Token, ?token= or Authorization: Bearer)",
                    )
                    .into_response()
                }
            }
        },
    ))
}

/// The token a request carries, if any (a `?token=` that is not well-formed is none).
fn given_token(req: &Request) -> Option<Vec<u8>> {
    let headers = req.headers();
    if let Some(v) = headers.get("x-consul-token") {
        return Some(v.as_bytes().to_vec());
    }
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        return v.as_bytes().strip_prefix(b"Bearer ").map(<[u8]>::to_vec);
    }
    let query = req.uri().query()?;
    query.split('&').find_map(|part| {
        let (name, value) = part.split_once('=')?;
        if name != "token" {
            return None;
        }
        parse_query(Some(&format!("token={value}")), &["token"])
            .ok()?
            .pop()
            .map(|(_, v)| v.into_bytes())
    })
}

/// A request's query parameters: Consul's own for the endpoint, plus [`COMMON`].
#[derive(Debug)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses strictly (see [`parse_query`]): `own` and [`COMMON`] are allowed, and only
    /// the default namespace and partition.
    ///
    /// # Errors
    /// 400 for a parameter not allowed, given twice, badly escaped, or another namespace.
    pub fn parse(raw: Option<&str>, own: &[&str]) -> Result<Query, ApiError> {
        let allowed: Vec<&str> = own.iter().chain(COMMON).copied().collect();
        let params = parse_query(raw, &allowed)?;
        let q = Query(params);
        for name in ["ns", "partition"] {
            if let Some(v) = q.get(name)
                && !v.is_empty()
                && v != "default"
            {
                return Err(ApiError::bad_request(format!(
                    "{name}={v:?}: namespaces and partitions are not supported (only \"default\")"
                )));
            }
        }
        Ok(q)
    }

    /// The value of `name` (empty for a bare `?name`).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether `name` was given (with or without a value).
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

/// The key of a failed check, if `e` is one.
pub fn condition_failed(e: &chorus::Error) -> Option<&str> {
    match e {
        chorus::Error::Replication(chorus::ReplicationError::ConditionFailed { key, .. }) => {
            Some(key)
        }
        _ => None,
    }
}

/// The answer to sessions and locks.
pub fn not_supported_sessions() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "sessions and locks are not supported by Chorus: it has no leader to hold them (writes \
         on every node win by last writer); use cas (?cas=) for conditional writes",
    )
}

/// A body that could not be read: 413 names Consul's limit.
pub fn body_error(e: BytesRejection) -> ApiError {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            format!("request body larger than {MAX_BODY} bytes (Consul's limit)"),
        )
    } else {
        ApiError::new(status, e.body_text())
    }
}

#[cfg(test)]
mod tests;
