//! The HTTP server under the agent's API: connections, their limits, and the `Host` check of
//! a tokenless API.
//!
//! - At most [`ServeLimits::max_connections`] connections are served at once; while that many
//!   are open the server stops accepting, so further clients wait in the kernel's listen
//!   backlog until one closes (a warning is logged when the limit is reached).
//! - A client must send a complete request head within [`ServeLimits::header_timeout`] of
//!   connecting, and of the end of the previous response on a kept-alive connection; otherwise
//!   the connection is closed (slowloris). Bodies and responses, watch streams included, are
//!   not limited by it.
//! - [`check_host`] answers 403 to a request whose `Host` is not a name of this agent, which is
//!   what a page on `evil.example` sends after its name was rebound to 127.0.0.1.
//!
//! It does not route or authenticate: `crate::http` is the API and `crate::keys` the token.

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// How long a client may take to send a request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits of the HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Most connections served at once.
    pub max_connections: NonZeroUsize,
    /// Longest wait for a complete request head.
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` completes, then lets the open connections
/// finish their current response (graceful shutdown) and returns once all are closed.
///
/// # Errors
/// None today: failed accepts are logged and retried; the `Result` is for the caller's `?`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.get()));
    // Every connection task holds a receiver; `closed()` resolves once all are gone.
    let (done_tx, done_rx) = watch::channel(());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    let mut at_limit = false;
    loop {
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => {
                at_limit = false;
                permit
            }
            Err(_) => {
                if !at_limit {
                    at_limit = true;
                    tracing::warn!(
                        limit = limits.max_connections.get(),
                        "HTTP connection limit reached: new connections wait until one closes \
                         (raise it with --http-max-connections)"
                    );
                }
                tokio::select! {
                    permit = Arc::clone(&permits).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        // The semaphore is never closed; stop serving if it ever were.
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let mut stop = stop_rx.clone();
        let done = done_rx.clone();
        tokio::spawn(async move {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
            let mut stopping = false;
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(%peer, error = %e, "HTTP connection ended");
                        }
                        break;
                    }
                    _ = stop.wait_for(|stop| *stop), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(permit);
            drop(done);
        });
    }
    stop_tx.send_replace(true);
    drop(done_rx);
    drop(listener);
    done_tx.closed().await;
    Ok(())
}

/// What to do after `accept` failed: a connection that went away is nothing; running out of
/// file descriptors (or another error of the listener) is logged and waited out a little, so
/// the loop does not spin.
async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::ConnectionAborted | K::ConnectionReset | K::ConnectionRefused | K::Interrupted
    ) {
        return;
    }
    tracing::warn!(error = %e, "HTTP accept failed; retrying in 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The host names a tokenless API answers to, and its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHosts {
    /// Lower case; IPv6 addresses in brackets, as they appear in a `Host` header.
    names: Vec<String>,
    port: u16,
}

impl AllowedHosts {
    /// `localhost`, `127.0.0.1`, `[::1]`, the address of `bind`, and `extra` (lower case
    /// names), on the port of `bind`.
    pub fn new(bind: SocketAddr, extra: &[String]) -> Self {
        let own = match bind {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "[::1]"]
            .into_iter()
            .map(str::to_owned)
            .chain([own])
            .chain(extra.iter().cloned())
            .collect();
        names.sort();
        names.dedup();
        Self {
            names,
            port: bind.port(),
        }
    }

    /// Whether a `Host` header (or the authority of an absolute request URI) names this
    /// agent: one of the names, with no port or the agent's port.
    pub fn allows(&self, host: &str) -> bool {
        if host.contains('@') {
            return false;
        }
        let Ok(authority) = host.parse::<axum::http::uri::Authority>() else {
            return false;
        };
        let name = authority.host().to_ascii_lowercase();
        let name = name.strip_suffix('.').unwrap_or(&name);
        self.names.iter().any(|n| n == name) && authority.port_u16().is_none_or(|p| p == self.port)
    }

    fn describe(&self) -> String {
        format!("{} on port {}", self.names.join(", "), self.port)
    }
}

/// Wraps `router` so that a request naming another host (in `Host`, or in an absolute request
/// URI) gets 403 before any handler runs. A request without any host passes: browsers always
/// send one, and the check is a defence against browsers (DNS rebinding).
pub fn check_host(router: Router, allowed: AllowedHosts) -> Router {
    let allowed = Arc::new(allowed);
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let allowed = Arc::clone(&allowed);
            async move {
                let named = req
                    .headers()
                    .get_all(header::HOST)
                    .iter()
                    .map(|v| v.to_str().ok().map(str::to_owned))
                    .chain(req.uri().authority().map(|a| Some(a.as_str().to_owned())));
                for host in named {
                    match host {
                        Some(host) if allowed.allows(&host) => {}
                        other => return wrong_host(other.as_deref(), &allowed),
                    }
                }
                next.run(req).await
            }
        },
    ))
}

fn wrong_host(host: Option<&str>, allowed: &AllowedHosts) -> Response {
    let shown = host.unwrap_or("(not text)");
    (
        StatusCode::FORBIDDEN,
        axum::Json(serde_json::json!({
            "error": format!(
                "Host {shown:?} is not a name of this agent (allowed: {}); a page in a \
                 browser whose name points at this host is refused here. Add a name with \
                 --http-allow-host NAME",
                allowed.describe()
            )
        })),
    )
        .into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use axum::routing::get;

    use super::*;

    /// A server for `app` on a free loopback port, in a runtime of its own (dropped with it).
    fn start(app: Router, limits: ServeLimits) -> (SocketAddr, tokio::runtime::Runtime) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(serve(listener, app, limits, std::future::pending()));
        (addr, rt)
    }

    fn app() -> Router {
        Router::new().route("/", get(|| async { "hello" }))
    }

    fn limits(max_connections: usize, header_timeout: Duration) -> ServeLimits {
        ServeLimits {
            max_connections: NonZeroUsize::new(max_connections).unwrap(),
            header_timeout,
        }
    }

    fn connect(addr: SocketAddr, read_timeout: Duration) -> TcpStream {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(read_timeout)).unwrap();
        s
    }

    /// Sends a keep-alive `GET /` and reads its whole answer (the body is 5 bytes).
    fn fetch(s: &mut TcpStream, host: &str) -> String {
        write!(s, "GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") || !response_complete(&got) {
            let n = s.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "connection closed after {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    fn response_complete(got: &[u8]) -> bool {
        let text = String::from_utf8_lossy(got);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let len = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_owned)
            })
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        body.len() >= len
    }

    #[test]
    fn a_client_that_never_finishes_its_head_is_disconnected() {
        let (addr, _rt) = start(app(), limits(16, Duration::from_millis(300)));
        let mut slow = connect(addr, Duration::from_secs(5));
        slow.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .unwrap();
        let mut buf = [0u8; 256];
        // Without the timeout the server waits for the rest for ever and this read times out.
        match slow.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => {
                let answer = String::from_utf8_lossy(&buf[..n]);
                assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
            }
            Err(e) => panic!("still connected after the header timeout: {e}"),
        }
        // A kept-alive connection left idle is closed the same way.
        let mut idle = connect(addr, Duration::from_secs(5));
        assert!(fetch(&mut idle, "localhost").ends_with("hello"));
        assert_eq!(idle.read(&mut buf).unwrap_or(0), 0, "idle connection kept");
    }

    #[test]
    fn a_response_may_last_longer_than_the_header_timeout() {
        let slow_body = Router::new().route(
            "/",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(900)).await;
                "late"
            }),
        );
        let (addr, _rt) = start(slow_body, limits(16, Duration::from_millis(300)));
        let mut s = connect(addr, Duration::from_secs(20));
        assert!(fetch(&mut s, "localhost").ends_with("late"));
    }

    #[test]
    fn connections_beyond_the_limit_wait_for_a_free_one() {
        let (addr, _rt) = start(app(), limits(1, Duration::from_secs(60)));
        // The first connection is served and stays open (keep-alive).
        let mut first = connect(addr, Duration::from_secs(20));
        assert!(fetch(&mut first, "localhost").ends_with("hello"));
        // The second is not accepted while the first is open...
        let mut second = connect(addr, Duration::from_millis(700));
        write!(second, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut buf = [0u8; 256];
        match second.read(&mut buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!("served beyond the limit: {other:?}"),
        }
        // ...and is served as soon as the first closes.
        drop(first);
        second
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut got = Vec::new();
        while !response_complete(&got) {
            let n = second.read(&mut buf).unwrap();
            assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&got).ends_with("hello"));
    }

    #[test]
    fn a_tokenless_api_answers_only_to_its_own_names() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let bind = listener.local_addr().unwrap();
        drop(listener);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind(bind)).unwrap();
        let app = check_host(app(), AllowedHosts::new(bind, &["chorus.internal".into()]));
        rt.spawn(serve(
            listener,
            app,
            limits(16, HEADER_TIMEOUT),
            std::future::pending(),
        ));
        let mut s = connect(bind, Duration::from_secs(20));
        let port = bind.port();
        for host in [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("chorus.internal:{port}"),
        ] {
            assert!(fetch(&mut s, &host).starts_with("HTTP/1.1 200"), "{host}");
        }
        // A page on evil.example whose name was rebound to 127.0.0.1 sends its own name.
        let answer = fetch(&mut s, &format!("evil.example:{port}"));
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
        assert!(answer.contains("--http-allow-host"), "{answer}");
        // The same through an absolute request URI.
        write!(
            s,
            "GET http://evil.example:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
        )
        .unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 403"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
    }

    #[test]
    fn allowed_hosts() {
        let bind: SocketAddr = "127.0.0.1:7480".parse().unwrap();
        let hosts = AllowedHosts::new(bind, &["chorus.internal".into()]);
        for ok in [
            "localhost",
            "localhost:7480",
            "LOCALHOST:7480",
            "localhost.:7480",
            "127.0.0.1:7480",
            "127.0.0.1",
            "[::1]:7480",
            "chorus.internal:7480",
        ] {
            assert!(hosts.allows(ok), "{ok} refused");
        }
        for bad in [
            "evil.example:7480",
            "evil.example",
            "localhost:7481",
            "127.0.0.2:7480",
            "localhost.evil.example:7480",
            "user@localhost:7480",
            "",
            "[::1",
            "chorus.internal.evil:7480",
        ] {
            assert!(!hosts.allows(bad), "{bad} allowed");
        }
        let v6 = AllowedHosts::new("[::1]:9000".parse().unwrap(), &[]);
        assert!(v6.allows("[::1]:9000") && !v6.allows("[::1]:7480"));
        let other = AllowedHosts::new("127.0.0.5:80".parse().unwrap(), &[]);
        assert!(other.allows("127.0.0.5") && other.allows("127.0.0.5:80"));
    }
}
