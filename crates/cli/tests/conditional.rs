//! Conditional writes over the native HTTP API (`?if-absent`, `?if-version=V`): a real agent
//! process on loopback multicast (127.0.0.1, TTL 0, a random group), driven through raw HTTP.
//! A failed condition is 409 with the current version and changes nothing.

#![allow(clippy::unwrap_used)]

use chorus_testkit::http::request as http;
use serde_json::Value;

mod common;

use common::{Api, Net};

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

#[test]
fn conditional_puts_and_deletes_answer_409_with_the_current_version() {
    let net = Net::new("cond");
    let a = net.agent(1, &[]);

    // if-absent on a new key succeeds, then fails with the version that is there.
    let (status, body) = http(a.http, "PUT", "/v1/kv/lock/job?if-absent", &[], b"a");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v1 = json(&body)["version"].as_str().unwrap().to_owned();
    let revision = a.json("/v1/kv?prefix=lock/")["revision"].as_u64().unwrap();
    let (status, body) = http(a.http, "PUT", "/v1/kv/lock/job?if-absent", &[], b"b");
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    let conflict = json(&body);
    assert_eq!(conflict["current_version"], v1.as_str(), "{conflict}");
    assert_eq!(conflict["key"], "lock/job", "{conflict}");
    assert!(conflict["error"].as_str().is_some_and(|e| !e.is_empty()));
    // Nothing changed: same value, same revision.
    let (_, value) = http(a.http, "GET", "/v1/kv/lock/job", &[], b"");
    assert_eq!(value, b"a");
    assert_eq!(
        a.json("/v1/kv?prefix=lock/")["revision"].as_u64(),
        Some(revision)
    );

    // if-version with the version entry_json prints: compare and set.
    let path = format!("/v1/kv/lock/job?if-version={v1}");
    let (status, body) = http(a.http, "PUT", &path, &[], b"c");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v2 = json(&body)["version"].as_str().unwrap().to_owned();
    assert_eq!(
        a.json("/v1/kv?prefix=lock/")["entries"][0]["version"],
        v2.as_str()
    );
    // The old version is stale now.
    let (status, body) = http(a.http, "PUT", &path, &[], b"d");
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["current_version"], v2.as_str());
    let (status, body) = http(a.http, "DELETE", &path, &[], b"");
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    // The current one deletes; then the key is absent for if-version (409, no version)
    // and for if-absent (a tombstone counts as absent).
    let (status, _) = http(
        a.http,
        "DELETE",
        &format!("/v1/kv/lock/job?if-version={v2}"),
        &[],
        b"",
    );
    assert_eq!(status, 200);
    let (status, body) = http(
        a.http,
        "DELETE",
        &format!("/v1/kv/lock/job?if-version={v2}"),
        &[],
        b"",
    );
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert_eq!(json(&body)["current_version"], Value::Null);
    let (status, _) = http(a.http, "PUT", "/v1/kv/lock/job?if-absent=true", &[], b"e");
    assert_eq!(status, 200);

    // Bad conditions are 400 with a JSON error, and change nothing.
    for path in [
        "/v1/kv/lock/job?if-version=12",
        "/v1/kv/lock/job?if-version=1.2",
        "/v1/kv/lock/job?if-version=x.1@2",
        "/v1/kv/lock/job?if-version=1.99999@2",
        "/v1/kv/lock/job?if-version=",
        "/v1/kv/lock/job?if-absent=maybe",
        "/v1/kv/lock/job?if-absent&if-version=1.0@1",
    ] {
        let (status, body) = http(a.http, "PUT", path, &[], b"f");
        assert_eq!(status, 400, "{path}: {}", String::from_utf8_lossy(&body));
        assert!(json(&body)["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let (status, _) = http(a.http, "DELETE", "/v1/kv/lock/job?if-absent", &[], b"");
    assert_eq!(status, 400, "if-absent is not a condition of DELETE");
    let (_, value) = http(a.http, "GET", "/v1/kv/lock/job", &[], b"");
    assert_eq!(value, b"e");
}
