//! `POST /v1/batch` against live agents on loopback multicast (127.0.0.1, TTL 0, a random
//! group per test): many keys applied as one batch, replicated to a second agent; a failed
//! condition applies nothing; bad bodies are refused. Every wait is bounded; agents are killed
//! when their guard drops.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use chorus_testkit::Agent;
use chorus_testkit::http::request;
use chorus_testkit::wait_until;
use serde_json::{Value, json};

mod common;

use common::{Api, Net};

const WAIT: Duration = Duration::from_secs(20);
const JSON: &[(&str, &str)] = &[("Content-Type", "application/json")];

fn batch(agent: &Agent, body: &Value) -> (u16, Value) {
    let (status, body) = request(
        agent.http,
        "POST",
        "/v1/batch",
        JSON,
        body.to_string().as_bytes(),
    );
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, value)
}

fn text(agent: &Agent, key: &str) -> Option<String> {
    agent.value(key).map(|v| String::from_utf8(v).unwrap())
}

#[test]
fn a_batch_lands_whole_on_another_agent() {
    let net = Net::new("batch");
    let a = net.agent(1, &[]);
    let b = net.agent(2, &[]);
    a.put("app/old", "gone soon");
    wait_until("b has app/old", WAIT, || text(&b, "app/old").is_some());

    let mut ops: Vec<Value> = (0..200)
        .map(|i| json!({"put": format!("app/k{i:03}"), "value": format!("v{i}")}))
        .collect();
    ops.push(json!({"put": "app/bin", "value_base64": "AAEC"}));
    ops.push(json!({"delete": "app/old"}));
    let (status, answer) = batch(&a, &json!({ "ops": ops }));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["puts"], 201, "{answer}");
    assert_eq!(answer["deletes"], 1, "{answer}");
    assert!(answer["version"].is_string(), "{answer}");

    wait_until("b has every key of the batch", WAIT, || {
        text(&b, "app/k199").is_some()
    });
    for i in 0..200 {
        assert_eq!(text(&b, &format!("app/k{i:03}")), Some(format!("v{i}")));
    }
    assert_eq!(b.value("app/bin"), Some(vec![0, 1, 2]));
    assert_eq!(text(&b, "app/old"), None);
}

#[test]
fn a_failed_condition_applies_nothing() {
    let net = Net::new("batchcond");
    let a = net.agent(1, &[]);
    a.put("app/taken", "first");
    let (status, answer) = batch(
        &a,
        &json!({"ops": [
            {"put": "app/new", "value": "x"},
            {"put": "app/taken", "value": "second", "if_absent": true},
        ]}),
    );
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["key"], "app/taken", "{answer}");
    assert_eq!(answer["op"], 1, "{answer}");
    assert_eq!(text(&a, "app/new"), None);
    assert_eq!(text(&a, "app/taken").as_deref(), Some("first"));

    // A condition that holds: the batch applies.
    let (status, answer) = batch(
        &a,
        &json!({"ops": [
            {"put": "app/new", "value": "x", "if_absent": true},
            {"check": "app/taken", "if_version": a.json("/v1/kv?prefix=app/taken")["entries"][0]["version"]},
        ]}),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(text(&a, "app/new").as_deref(), Some("x"));
}

#[test]
fn bad_batches_are_refused() {
    let net = Net::new("batchbad");
    let a = net.agent(1, &[]);
    let (status, _) = request(a.http, "POST", "/v1/batch", JSON, b"{not json");
    assert_eq!(status, 400);
    let (status, _) = request(
        a.http,
        "POST",
        "/v1/batch",
        &[("Content-Type", "text/plain")],
        br#"{"ops":[{"put":"k","value":"v"}]}"#,
    );
    assert_eq!(status, 415);
    let (status, _) = batch(&a, &json!({"ops": []}));
    assert_eq!(status, 400);
    let (status, _) = batch(
        &a,
        &json!({"ops": [{"put": "k", "value": "v", "value_base64": "AA=="}]}),
    );
    assert_eq!(status, 400);
    let ops: Vec<Value> = (0..1025)
        .map(|i| json!({"put": format!("k{i}"), "value": "v"}))
        .collect();
    let (status, _) = batch(&a, &json!({ "ops": ops }));
    assert_eq!(status, 413);
    // Nothing of the refused batches was applied.
    assert_eq!(text(&a, "k"), None);
    assert_eq!(text(&a, "k0"), None);
}
