//! The handlers through the router: shapes, headers, statuses.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use super::*;

struct Api {
    node: Node,
    app: Router,
}

async fn api(max_connections: usize) -> Api {
    let hub = chorus::transport::MemoryHub::new(Default::default()).unwrap();
    let transport = hub.endpoint("10.0.0.1:7400".parse().unwrap()).unwrap();
    let node = Node::builder()
        .cluster("consul-api")
        .node_id(chorus::NodeId(1))
        .start_with_transport(transport)
        .await
        .unwrap();
    let (indexes, feed) = Indexes::new(&node);
    tokio::spawn(feed);
    let hosts = AllowedHosts::new("127.0.0.1:8500".parse().unwrap(), &[]);
    let app = router(node.clone(), indexes, max_connections, Access::Hosts(hosts));
    Api { node, app }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn index(&self) -> u64 {
        self.headers[INDEX_HEADER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Api {
    async fn call(&self, method: &str, uri: &str, body: &[u8]) -> Answer {
        self.call_with(method, uri, &[], body).await
    }

    async fn call_with(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Answer {
        call(&self.app, method, uri, headers, body).await
    }
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Body::from(body.to_vec())).unwrap();
    let response = app.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

fn consul_headers(a: &Answer) {
    assert!(a.index() > 0, "index {}", a.index());
    assert_eq!(a.headers["x-consul-knownleader"], "true");
    assert_eq!(a.headers["x-consul-lastcontact"], "0");
}

#[tokio::test]
async fn a_missing_key_is_404_with_the_consul_headers() {
    let api = api(16).await;
    let a = api.call("GET", "/v1/kv/nope", b"").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    consul_headers(&a);
    assert_eq!(a.index(), 1, "the empty store is index 1");
    assert!(a.body.is_empty());
    for uri in ["/v1/kv/nope?recurse", "/v1/kv/nope?keys", "/v1/kv/?keys"] {
        let a = api.call("GET", uri, b"").await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{uri}");
        consul_headers(&a);
    }
    api.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn put_and_get_in_consuls_shapes() {
    let api = api(16).await;
    let a = api
        .call("PUT", "/v1/kv/app/db/url?flags=42", b"postgres://db1")
        .await;
    assert_eq!((a.status, a.text().as_str()), (StatusCode::OK, "true"));
    consul_headers(&a);
    let a = api.call("GET", "/v1/kv/app/db/url", b"").await;
    assert_eq!(a.status, StatusCode::OK);
    consul_headers(&a);
    let entry = &a.json()[0];
    let revision = api.node.get("app/db/url").unwrap().revision;
    assert_eq!(entry["Key"], "app/db/url");
    assert_eq!(entry["Flags"], 42);
    assert_eq!(entry["LockIndex"], 0);
    assert_eq!(entry["Value"], "cG9zdGdyZXM6Ly9kYjE=");
    assert_eq!(entry["ModifyIndex"], revision + 1);
    assert_eq!(entry["CreateIndex"], revision + 1);
    assert_eq!(a.index(), revision + 1);
    // ?raw: the bare value.
    let a = api.call("GET", "/v1/kv/app/db/url?raw", b"").await;
    assert_eq!(
        (a.status, a.text().as_str()),
        (StatusCode::OK, "postgres://db1")
    );
    consul_headers(&a);
    // An empty value is null; keys may end in a slash ("folders").
    assert_eq!(
        api.call("PUT", "/v1/kv/app/empty/", b"").await.status,
        StatusCode::OK
    );
    let a = api.call("GET", "/v1/kv/app/empty/", b"").await;
    assert_eq!(a.json()[0]["Value"], Value::Null);
    assert_eq!(a.json()[0]["Key"], "app/empty/");
    // Binary values round-trip.
    let binary = [0u8, 255, 10, 13];
    api.call("PUT", "/v1/kv/bin", &binary).await;
    assert_eq!(api.call("GET", "/v1/kv/bin?raw", b"").await.body, binary);
    // The single-key index is the store's: a write elsewhere moves it.
    let before = api.call("GET", "/v1/kv/app/db/url", b"").await.index();
    api.call("PUT", "/v1/kv/other", b"x").await;
    assert!(api.call("GET", "/v1/kv/app/db/url", b"").await.index() > before);
    api.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn recurse_and_keys_with_a_separator() {
    let api = api(16).await;
    for key in ["svc/a", "svc/b/1", "svc/b/2", "svc/c", "svd"] {
        assert_eq!(
            api.call("PUT", &format!("/v1/kv/{key}"), key.as_bytes())
                .await
                .status,
            StatusCode::OK
        );
    }
    let a = api.call("GET", "/v1/kv/svc/?recurse", b"").await;
    let list = a.json();
    let keys: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["svc/a", "svc/b/1", "svc/b/2", "svc/c"]);
    // The prefix's index is its highest ModifyIndex, and writes elsewhere do not move it.
    let highest = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ModifyIndex"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(a.index(), highest);
    api.call("PUT", "/v1/kv/elsewhere", b"x").await;
    assert_eq!(
        api.call("GET", "/v1/kv/svc/?recurse", b"").await.index(),
        highest
    );
    let a = api.call("GET", "/v1/kv/svc/?keys&separator=/", b"").await;
    assert_eq!(a.json(), serde_json::json!(["svc/a", "svc/b/", "svc/c"]));
    consul_headers(&a);
    let a = api.call("GET", "/v1/kv/sv?keys", b"").await;
    assert_eq!(
        a.json(),
        serde_json::json!(["svc/a", "svc/b/1", "svc/b/2", "svc/c", "svd"])
    );
    let a = api.call("GET", "/v1/kv/?keys&separator=/", b"").await;
    assert_eq!(a.json(), serde_json::json!(["elsewhere", "svc/", "svd"]));
    // DELETE ?recurse; the index does not go back although the highest entry went.
    let before = api.call("GET", "/v1/kv/svc/?keys", b"").await.index();
    let a = api.call("DELETE", "/v1/kv/svc/b/?recurse", b"").await;
    assert_eq!((a.status, a.text().as_str()), (StatusCode::OK, "true"));
    let mut after = 0;
    for _ in 0..50 {
        let a = api.call("GET", "/v1/kv/svc/?keys", b"").await;
        assert_eq!(a.json(), serde_json::json!(["svc/a", "svc/c"]));
        after = a.index();
        if after > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(after > before, "{after} after {before}");
    api.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn cas_and_delete() {
    let api = api(16).await;
    let put = |uri: &'static str, body: &'static [u8]| {
        let api = &api;
        async move { api.call("PUT", uri, body).await.text() }
    };
    assert_eq!(put("/v1/kv/lock?cas=0", b"one").await, "true");
    assert_eq!(
        put("/v1/kv/lock?cas=0", b"two").await,
        "false",
        "create-only"
    );
    let index = api.call("GET", "/v1/kv/lock", b"").await.json()[0]["ModifyIndex"]
        .as_u64()
        .unwrap();
    let stale = index - 1;
    assert_eq!(
        api.call("PUT", &format!("/v1/kv/lock?cas={stale}"), b"x")
            .await
            .text(),
        "false"
    );
    assert_eq!(
        api.call("PUT", &format!("/v1/kv/lock?cas={index}"), b"three")
            .await
            .text(),
        "true"
    );
    assert_eq!(
        api.call("GET", "/v1/kv/lock?raw", b"").await.text(),
        "three"
    );
    // The old index is gone: neither put nor delete applies with it.
    assert_eq!(
        api.call("PUT", &format!("/v1/kv/lock?cas={index}"), b"x")
            .await
            .text(),
        "false"
    );
    assert_eq!(
        api.call("DELETE", &format!("/v1/kv/lock?cas={index}"), b"")
            .await
            .text(),
        "false"
    );
    assert_eq!(
        api.call("DELETE", "/v1/kv/lock?cas=0", b"").await.text(),
        "false"
    );
    let index = api.call("GET", "/v1/kv/lock", b"").await.json()[0]["ModifyIndex"]
        .as_u64()
        .unwrap();
    assert_eq!(
        api.call("DELETE", &format!("/v1/kv/lock?cas={index}"), b"")
            .await
            .text(),
        "true"
    );
    assert_eq!(
        api.call("GET", "/v1/kv/lock", b"").await.status,
        StatusCode::NOT_FOUND
    );
    // Deleting what is not there succeeds, as in Consul.
    assert_eq!(api.call("DELETE", "/v1/kv/lock", b"").await.text(), "true");
    assert_eq!(
        api.call("DELETE", "/v1/kv/lock?cas=9", b"").await.text(),
        "true"
    );
    api.call("PUT", "/v1/kv/gone", b"x").await;
    assert_eq!(api.call("DELETE", "/v1/kv/gone", b"").await.text(), "true");
    assert!(api.node.get("gone").is_none());
    api.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_a_clear_4xx() {
    let api = api(16).await;
    let cases: &[(&str, &str, StatusCode)] = &[
        ("GET", "/v1/kv/a?index=abc", StatusCode::BAD_REQUEST),
        (
            "GET",
            "/v1/kv/a?index=3&wait=forever",
            StatusCode::BAD_REQUEST,
        ),
        ("GET", "/v1/kv/a?index=3&wait=-1s", StatusCode::BAD_REQUEST),
        ("GET", "/v1/kv/a?bogus=1", StatusCode::BAD_REQUEST),
        ("GET", "/v1/kv/a?raw&recurse", StatusCode::BAD_REQUEST),
        ("GET", "/v1/kv/a?separator=/", StatusCode::BAD_REQUEST),
        ("GET", "/v1/kv/a?recurse&recurse", StatusCode::BAD_REQUEST),
        ("GET", "/v1/kv/a?ns=team", StatusCode::BAD_REQUEST),
        ("GET", "/v1/kv/a?%zz", StatusCode::BAD_REQUEST),
        ("GET", "/v1/kv/", StatusCode::BAD_REQUEST),
        ("PUT", "/v1/kv/", StatusCode::BAD_REQUEST),
        ("DELETE", "/v1/kv/", StatusCode::BAD_REQUEST),
        ("PUT", "/v1/kv/a?flags=x", StatusCode::BAD_REQUEST),
        ("PUT", "/v1/kv/a?cas=-1", StatusCode::BAD_REQUEST),
        ("DELETE", "/v1/kv/a?recurse&cas=3", StatusCode::BAD_REQUEST),
        ("PUT", "/v1/kv/a?acquire=abc", StatusCode::NOT_IMPLEMENTED),
        ("PUT", "/v1/kv/a?release=abc", StatusCode::NOT_IMPLEMENTED),
        ("PUT", "/v1/session/create", StatusCode::NOT_IMPLEMENTED),
        ("GET", "/v1/session/list", StatusCode::NOT_IMPLEMENTED),
        ("GET", "/v1/agent/self", StatusCode::NOT_FOUND),
        ("GET", "/v1/catalog/services", StatusCode::NOT_FOUND),
        ("GET", "/", StatusCode::NOT_FOUND),
        ("GET", "/v1/txn", StatusCode::METHOD_NOT_ALLOWED),
        ("POST", "/v1/kv/a", StatusCode::METHOD_NOT_ALLOWED),
        ("PUT", "/v1/txn", StatusCode::BAD_REQUEST),
    ];
    for (method, uri, want) in cases {
        let a = api.call(method, uri, b"").await;
        assert_eq!(a.status, *want, "{method} {uri}: {}", a.text());
        consul_headers(&a);
        let error = a.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(!error.is_empty(), "{method} {uri}: {}", a.text());
        if *want == StatusCode::NOT_IMPLEMENTED {
            assert!(error.contains("not supported"), "{error}");
        }
    }
    // A key too long for the node, a value too large for Consul's limit.
    let long = format!("/v1/kv/{}", "k".repeat(2000));
    assert_eq!(
        api.call("PUT", &long, b"v").await.status,
        StatusCode::BAD_REQUEST
    );
    let big = vec![b'v'; MAX_BODY + 1];
    assert_eq!(
        api.call("PUT", "/v1/kv/big", &big).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert!(api.node.get("big").is_none());
    api.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_blocking_query_waits_for_a_change_of_its_key() {
    let api = api(16).await;
    api.call("PUT", "/v1/kv/cfg/level", b"info").await;
    let index = api.call("GET", "/v1/kv/cfg/level", b"").await.index();
    // Nothing changes: the wait ends (with up to 1/16 of jitter) and the index is the same.
    let started = Instant::now();
    let a = api
        .call(
            "GET",
            &format!("/v1/kv/cfg/level?index={index}&wait=300ms"),
            b"",
        )
        .await;
    let took = started.elapsed();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.index(), index);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // An index that is behind answers at once.
    let started = Instant::now();
    let a = api
        .call(
            "GET",
            &format!("/v1/kv/cfg/level?index={}&wait=10s", index - 1),
            b"",
        )
        .await;
    assert_eq!(a.index(), index);
    assert!(started.elapsed() < Duration::from_secs(5));
    // A write to the key wakes it; a write to another key (even one it is a prefix of) does not.
    let app = api.app.clone();
    let uri = format!("/v1/kv/cfg/level?index={index}&wait=20s");
    let blocked = tokio::spawn(async move { call(&app, "GET", &uri, &[], b"").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.call("PUT", "/v1/kv/cfg/level2", b"x").await;
    api.call("PUT", "/v1/kv/cfg/other", b"x").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!blocked.is_finished(), "woken by another key");
    let started = Instant::now();
    api.call("PUT", "/v1/kv/cfg/level", b"debug").await;
    let a = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(a.index() > index);
    assert_eq!(a.json()[0]["Value"], "ZGVidWc=");
    api.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_blocking_prefix_query_wakes_on_a_delete_and_an_ahead_index_answers_at_once() {
    let api = api(16).await;
    api.call("PUT", "/v1/kv/jobs/1", b"queued").await;
    api.call("PUT", "/v1/kv/jobs/2", b"queued").await;
    let index = api.call("GET", "/v1/kv/jobs/?recurse", b"").await.index();
    let app = api.app.clone();
    let uri = format!("/v1/kv/jobs/?recurse&index={index}&wait=20s");
    let blocked = tokio::spawn(async move { call(&app, "GET", &uri, &[], b"").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.call("PUT", "/v1/kv/unrelated", b"x").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!blocked.is_finished(), "woken by a key outside the prefix");
    api.call("DELETE", "/v1/kv/jobs/2", b"").await;
    let a = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .unwrap()
        .unwrap();
    assert!(a.index() > index, "{} after {index}", a.index());
    assert_eq!(a.json().as_array().unwrap().len(), 1);
    // An index from the future (another agent, a restart): at once.
    let started = Instant::now();
    let a = api
        .call("GET", "/v1/kv/jobs/?recurse&index=999999&wait=10s", b"")
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(5));
    api.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn blocked_queries_are_bounded() {
    // One connection: one blocked request at most.
    let api = api(1).await;
    let index = api.call("GET", "/v1/kv/x", b"").await.index();
    let app = api.app.clone();
    let uri = format!("/v1/kv/x?index={index}&wait=20s");
    let blocked = tokio::spawn(async move { call(&app, "GET", &uri, &[], b"").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = api
        .call("GET", &format!("/v1/kv/y?index={index}&wait=20s"), b"")
        .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text());
    // Non-blocking reads still work.
    assert_eq!(
        api.call("GET", "/v1/kv/y", b"").await.status,
        StatusCode::NOT_FOUND
    );
    api.call("PUT", "/v1/kv/x", b"1").await;
    let a = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.status, StatusCode::OK);
    // The place is free again.
    let a = api
        .call(
            "GET",
            &format!("/v1/kv/x?index={}&wait=100ms", a.index()),
            b"",
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    api.node.shutdown().await.unwrap();
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

use base64::Engine as _;

#[tokio::test]
async fn txn_applies_all_or_nothing() {
    let api = api(16).await;
    api.call("PUT", "/v1/kv/t/old", b"o").await;
    let old = api.call("GET", "/v1/kv/t/old", b"").await.json()[0]["ModifyIndex"]
        .as_u64()
        .unwrap();
    let body = serde_json::json!([
        {"KV": {"Verb": "set", "Key": "t/a", "Value": b64("1"), "Flags": 7}},
        {"KV": {"Verb": "cas", "Key": "t/b", "Value": b64("2"), "Index": 0}},
        {"KV": {"Verb": "check-index", "Key": "t/old", "Index": old}},
        {"KV": {"Verb": "get", "Key": "t/old"}},
        {"KV": {"Verb": "check-not-exists", "Key": "t/none"}},
        {"KV": {"Verb": "get-tree", "Key": "t/"}},
        {"KV": {"Verb": "delete-cas", "Key": "t/old", "Index": old}},
    ]);
    let a = api
        .call("PUT", "/v1/txn", body.to_string().as_bytes())
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    consul_headers(&a);
    let answer = a.json();
    assert_eq!(answer["Errors"], Value::Null);
    let results = answer["Results"].as_array().unwrap();
    // set, cas, check-index, get, then get-tree's three entries.
    assert_eq!(results.len(), 7, "{answer}");
    let a_index = api.node.get("t/a").unwrap().revision + 1;
    assert_eq!(results[0]["KV"]["Key"], "t/a");
    assert_eq!(results[0]["KV"]["Flags"], 7);
    assert_eq!(results[0]["KV"]["ModifyIndex"], a_index);
    assert_eq!(results[0]["KV"]["Value"], Value::Null);
    assert_eq!(results[3]["KV"]["Value"], b64("o"));
    let tree: Vec<&str> = results[4..]
        .iter()
        .map(|r| r["KV"]["Key"].as_str().unwrap())
        .collect();
    assert_eq!(tree, ["t/a", "t/b", "t/old"]);
    assert_eq!(api.node.get("t/a").unwrap().flags, 7);
    assert!(api.node.get("t/b").is_some());
    assert!(api.node.get("t/old").is_none(), "delete-cas applied");
    // A failed check: 409, Errors names the operation, nothing written.
    let body = serde_json::json!([
        {"KV": {"Verb": "set", "Key": "t/c", "Value": b64("3")}},
        {"KV": {"Verb": "check-index", "Key": "t/a", "Index": a_index + 100}},
    ]);
    let a = api
        .call("PUT", "/v1/txn", body.to_string().as_bytes())
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.text());
    consul_headers(&a);
    let answer = a.json();
    assert_eq!(answer["Results"], Value::Null);
    assert_eq!(answer["Errors"][0]["OpIndex"], 1);
    assert!(
        answer["Errors"][0]["What"]
            .as_str()
            .unwrap()
            .contains("t/a")
    );
    assert!(api.node.get("t/c").is_none());
    for body in [
        serde_json::json!([{"KV": {"Verb": "cas", "Key": "t/a", "Value": "", "Index": 0}}]),
        serde_json::json!([{"KV": {"Verb": "check-not-exists", "Key": "t/a"}}]),
        serde_json::json!([{"KV": {"Verb": "get", "Key": "t/none"}}]),
        serde_json::json!([{"KV": {"Verb": "delete-cas", "Key": "t/a", "Index": 1}}]),
    ] {
        let a = api
            .call("PUT", "/v1/txn", body.to_string().as_bytes())
            .await;
        assert_eq!(a.status, StatusCode::CONFLICT, "{body}: {}", a.text());
    }
    // delete-tree, and a read after a write in the same transaction.
    let body = serde_json::json!([
        {"KV": {"Verb": "set", "Key": "t/new", "Value": b64("n")}},
        {"KV": {"Verb": "get", "Key": "t/new"}},
        {"KV": {"Verb": "delete-tree", "Key": "t/"}},
        {"KV": {"Verb": "check-not-exists", "Key": "t/a"}},
    ]);
    let a = api
        .call("PUT", "/v1/txn", body.to_string().as_bytes())
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.json()["Results"][1]["KV"]["Value"], b64("n"));
    assert!(api.node.scan("t/").is_empty());
    api.node.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_token_is_required_in_any_of_consuls_forms() {
    let api = api(16).await;
    let (indexes, feed) = Indexes::new(&api.node);
    tokio::spawn(feed);
    let app = router(
        api.node.clone(),
        indexes,
        16,
        Access::Token("s3cret".into()),
    );
    let a = call(&app, "GET", "/v1/kv/a", &[], b"").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.text().contains("Permission denied"));
    consul_headers(&a);
    let a = call(&app, "GET", "/v1/kv/a", &[("X-Consul-Token", "wrong")], b"").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    for (uri, headers) in [
        ("/v1/kv/a", vec![("X-Consul-Token", "s3cret")]),
        ("/v1/kv/a", vec![("Authorization", "Bearer s3cret")]),
        ("/v1/kv/a?token=s3cret", vec![]),
        ("/v1/kv/a?recurse&token=s3cr%65t", vec![]),
    ] {
        let a = call(&app, "GET", uri, &headers, b"").await;
        assert_eq!(
            a.status,
            StatusCode::NOT_FOUND,
            "{uri} {headers:?}: {}",
            a.text()
        );
    }
    let a = call(&app, "GET", "/v1/kv/a?token=nope", &[], b"").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    api.node.shutdown().await.unwrap();
}

#[test]
fn exposure_needs_a_token() {
    let lo: SocketAddr = "127.0.0.1:8500".parse().unwrap();
    let any: SocketAddr = "0.0.0.0:8500".parse().unwrap();
    assert!(check_exposure(lo, None).is_ok());
    let err = check_exposure(any, None).unwrap_err().to_string();
    assert!(
        err.contains("--http-token") && err.contains("--consul-api"),
        "{err}"
    );
    assert!(check_exposure(any, Some("t")).is_ok());
    assert!(check_exposure(lo, Some("")).is_err());
}
