//! The live dashboard at `/ui`: static files compiled into the binary (plain HTML, CSS and
//! JavaScript modules; no build step, nothing fetched from elsewhere), which read the agent's
//! own API from the browser. See `docs/ui.md`.
//!
//! - Every file is answered with its content type, `X-Content-Type-Options: nosniff` and a
//!   Content-Security-Policy that lets the page load scripts, styles and images from the agent
//!   only and connect to the agent only ([`CSP`]); it cannot be framed.
//! - The files themselves hold no secret, so they are served without the bearer token; the
//!   page asks for the token and sends it with every API call (`Authorization: Bearer`), as
//!   every other client does. [`guard`] puts the dashboard beside the API so that it passes the
//!   same `Host` check as the API when the agent has no token.
//!
//! It does not add any API: the page only calls `/v1/members`, `/v1/kv`, `/v1/watch` and
//! `/v1/stats`.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::server::AllowedHosts;

/// The Content-Security-Policy of every dashboard file: only the agent's own scripts, styles,
/// images and API; no inline script, no plugin, no form target, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; base-uri 'none'; form-action 'none'; \
                       frame-ancestors 'none'";

/// One embedded file: its name under `/ui/`, content type and bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// Every file of the dashboard. `index.html` is also `/ui` and `/ui/`.
const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: HTML,
        body: include_str!("assets/index.html"),
    },
    Asset {
        name: "style.css",
        content_type: CSS,
        body: include_str!("assets/style.css"),
    },
    Asset {
        name: "app.js",
        content_type: JS,
        body: include_str!("assets/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: JS,
        body: include_str!("assets/api.js"),
    },
    Asset {
        name: "charts.js",
        content_type: JS,
        body: include_str!("assets/charts.js"),
    },
    Asset {
        name: "icon.svg",
        content_type: SVG,
        body: include_str!("assets/icon.svg"),
    },
];

/// The dashboard's routes: `/ui`, `/ui/` and `/ui/{file}`.
pub fn router() -> Router {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/{file}", get(file))
}

/// The agent's whole HTTP surface: `api` behind the bearer token when there is one, the
/// dashboard beside it (without the token: its files hold no secret and the page sends the
/// token itself), and, without a token, the `Host` check of `allowed` in front of both.
pub fn guard(api: Router, token: Option<&str>, allowed: AllowedHosts) -> Router {
    match token {
        Some(token) => crate::keys::require_token(api, token).merge(router()),
        // Without a token the API is on the loopback (checked at start); a browser on this
        // host must not reach it, nor the dashboard, under another site's name.
        None => crate::server::check_host(api.merge(router()), allowed),
    }
}

async fn index() -> Response {
    serve(&ASSETS[0])
}

async fn file(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(asset) => serve(asset),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({
                "error": format!("no dashboard file {name:?}")
            })),
        )
            .into_response(),
    }
}

fn serve(asset: &Asset) -> Response {
    let mut response = asset.body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The files change with the binary: a browser revalidates instead of keeping an old page.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;
    use crate::server::{HEADER_TIMEOUT, ServeLimits};

    /// An agent's HTTP surface (API of a node on an in-memory transport, dashboard, `token`)
    /// served on a free loopback port, in a runtime of its own.
    fn start(token: Option<&str>) -> (SocketAddr, tokio::runtime::Runtime) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (addr, app) = rt.block_on(async {
            let hub = chorus::transport::MemoryHub::new(Default::default()).unwrap();
            let transport = hub.endpoint("10.0.0.1:7400".parse().unwrap()).unwrap();
            let node = chorus::Node::builder()
                .cluster("ui")
                .node_id(chorus::NodeId(1))
                .start_with_transport(transport)
                .await
                .unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let app = guard(
                crate::http::router(node),
                token,
                AllowedHosts::new(addr, &[]),
            );
            (addr, (listener, app))
        });
        let (listener, app) = app;
        let limits = ServeLimits {
            max_connections: std::num::NonZeroUsize::new(16).unwrap(),
            header_timeout: HEADER_TIMEOUT,
        };
        rt.spawn(crate::server::serve(
            listener,
            app,
            limits,
            std::future::pending(),
        ));
        (addr, rt)
    }

    /// `GET path` with `headers`: status, head (lower case) and body.
    fn fetch(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut head = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: {addr}\r\n"));
        }
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        std::io::Write::write_all(&mut stream, head.as_bytes()).unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut stream, &mut got).unwrap();
        let text = String::from_utf8(got).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head[9..12].parse().unwrap();
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(str::trim)
    }

    #[test]
    fn every_file_is_served_with_its_type_and_the_policy() {
        let (addr, _rt) = start(None);
        let expected = [
            ("/ui", "text/html"),
            ("/ui/", "text/html"),
            ("/ui/index.html", "text/html"),
            ("/ui/style.css", "text/css"),
            ("/ui/app.js", "text/javascript"),
            ("/ui/api.js", "text/javascript"),
            ("/ui/charts.js", "text/javascript"),
            ("/ui/icon.svg", "image/svg+xml"),
        ];
        assert_eq!(expected.len(), ASSETS.len() + 2, "a file without a test");
        for (path, content_type) in expected {
            let (status, head, body) = fetch(addr, path, &[]);
            assert_eq!(status, 200, "{path}: {body}");
            assert!(
                header(&head, "content-type").is_some_and(|t| t.starts_with(content_type)),
                "{path}: {head}"
            );
            assert_eq!(
                header(&head, "content-security-policy"),
                Some(CSP.to_ascii_lowercase().as_str()),
                "{path}"
            );
            assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
            assert_eq!(header(&head, "x-frame-options"), Some("deny"));
            assert!(!body.is_empty(), "{path}");
        }
        let (_, _, index) = fetch(addr, "/ui", &[]);
        assert!(index.contains("<script type=\"module\" src=\"/ui/app.js\">"));
        let (status, _, body) = fetch(addr, "/ui/nope.js", &[]);
        assert_eq!(status, 404);
        assert!(body.contains("\"error\""), "{body}");
        let (status, _, _) = fetch(addr, "/ui/../v1/stats", &[]);
        assert_ne!(status, 200);
    }

    #[test]
    fn the_policy_allows_nothing_but_the_agent() {
        for directive in CSP.split(';').map(str::trim) {
            let mut words = directive.split_whitespace();
            let name = words.next().unwrap();
            let sources: Vec<&str> = words.collect();
            assert!(
                sources == ["'self'"] || sources == ["'none'"],
                "{name} allows {sources:?}"
            );
        }
        assert!(CSP.contains("default-src 'none'") && CSP.contains("frame-ancestors 'none'"));
        // Nothing in the page names another origin (no CDN, no font service).
        for asset in ASSETS {
            // The SVG namespace is a name, not an address anything is fetched from.
            let body = asset.body.replace("http://www.w3.org/2000/svg", "");
            for scheme in ["http://", "https://", "//fonts", "@import", "url("] {
                assert!(!body.contains(scheme), "{} refers to {scheme}", asset.name);
            }
        }
    }

    #[test]
    fn without_a_token_the_dashboard_answers_only_to_the_agents_names() {
        let (addr, _rt) = start(None);
        let (status, _, _) = fetch(
            addr,
            "/ui",
            &[("Host", &format!("localhost:{}", addr.port()))],
        );
        assert_eq!(status, 200);
        for path in ["/ui", "/ui/app.js", "/v1/stats"] {
            let (status, _, body) = fetch(
                addr,
                path,
                &[("Host", &format!("evil.example:{}", addr.port()))],
            );
            assert_eq!(status, 403, "{path}: {body}");
        }
    }

    #[test]
    fn with_a_token_the_page_loads_and_the_api_wants_the_token() {
        let (addr, _rt) = start(Some("s3cret"));
        let (status, head, _) = fetch(addr, "/ui", &[]);
        assert_eq!(status, 200);
        assert!(header(&head, "content-security-policy").is_some());
        let (status, _, _) = fetch(addr, "/v1/members", &[]);
        assert_eq!(status, 401);
        let (status, _, body) = fetch(addr, "/v1/members", &[("Authorization", "Bearer s3cret")]);
        assert_eq!(status, 200, "{body}");
        // The page sends the token the way the API expects it.
        let api = ASSETS.iter().find(|a| a.name == "api.js").unwrap();
        assert!(
            api.body.contains("'Bearer '"),
            "api.js sends no bearer token"
        );
    }
}
