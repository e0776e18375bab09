//! Publish and subscribe through the agent's HTTP API: two agents on loopback multicast
//! (127.0.0.1, TTL 0, a random group per test), one subscribed by server-sent events, the
//! other publishing, with injected receive loss on the subscriber. Every wait is bounded.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use chorus_testkit::http::request as http;
use chorus_testkit::wait_until;
use serde_json::Value;

mod common;

use common::{Api, Net};

/// Reads server-sent events from `stream` until `want` `data:` lines arrived; returns the
/// (event, data) pairs.
fn read_events(stream: &mut TcpStream, want: usize) -> Vec<(String, Value)> {
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.matches("\ndata:").count() < want {
        assert!(Instant::now() < deadline, "events incomplete: {got}");
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "stream closed: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let mut events = Vec::new();
    let mut kind = String::new();
    for line in got.lines() {
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k.to_owned();
        } else if let Some(d) = line.strip_prefix("data: ") {
            events.push((kind.clone(), serde_json::from_str(d).unwrap()));
        }
    }
    events
}

#[test]
fn messages_published_on_one_agent_stream_to_a_subscriber_of_another() {
    let net = Net::new("pubsub");
    let a = net.agent(1, &[]);
    let b = net.agent(2, &["--loss", "0.2", "--loss-seed", "5"]);
    wait_until(
        "the agents know each other",
        Duration::from_secs(20),
        || a.member_ids() == [2] && b.member_ids() == [1],
    );

    let mut sse = TcpStream::connect(b.http).unwrap();
    sse.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        sse,
        "GET /v1/subscribe/chat/* HTTP/1.1\r\nHost: {}\r\n\r\n",
        b.http
    )
    .unwrap();
    // The subscription exists once the answer's head arrived.
    let mut head = [0u8; 512];
    let n = sse.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(
        head.starts_with("HTTP/1.1 200") && head.contains("text/event-stream"),
        "{head}"
    );
    wait_until("b's subscription", Duration::from_secs(10), || {
        b.counter("pubsub_subscriptions") == 1
    });

    let publish =
        |topic: &str, body: &[u8]| http(a.http, "POST", &format!("/v1/publish/{topic}"), &[], body);
    let mut sent = Vec::new();
    for i in 0..20 {
        let body = format!("hello {i}");
        let (status, answer) = publish("chat/lobby", body.as_bytes());
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        sent.push(body);
        // Not for chat/*: dropped on b, counted.
        assert_eq!(publish("news", b"elsewhere").0, 200);
    }
    assert_eq!(publish("chat/bin", &[0xff, 0x00, 0xfe]).0, 200);

    let events = read_events(&mut sse, 21);
    let messages: Vec<&Value> = events
        .iter()
        .filter(|(kind, _)| kind == "message")
        .map(|(_, data)| data)
        .collect();
    assert_eq!(
        messages.len(),
        21,
        "every message, exactly once: {events:?}"
    );
    for (m, body) in messages.iter().zip(&sent) {
        assert_eq!(m["from"], 1);
        assert_eq!(m["topic"], "chat/lobby");
        assert_eq!(m["payload"], body.as_str(), "in order");
    }
    assert_eq!(messages[20]["topic"], "chat/bin");
    assert_eq!(messages[20]["payload_base64"], "/wD+");

    // Bad input: a clear 4xx with a JSON error.
    for (method, path, body, status) in [
        ("POST", "/v1/publish/a%20b", vec![], 400),
        ("POST", "/v1/publish/chat/*", vec![], 400),
        ("POST", "/v1/publish/big", vec![0u8; 600 * 1024], 413),
        ("GET", "/v1/subscribe/chat/*/x", vec![], 400),
        ("GET", "/v1/publish/chat", vec![], 405),
    ] {
        let (got, answer) = http(a.http, method, path, &[], &body);
        assert_eq!(
            got,
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&answer)
        );
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        assert!(answer["error"].is_string(), "{answer}");
    }

    // The counters, nothing stored.
    wait_until("the counters", Duration::from_secs(10), || {
        a.counter("pubsub_published") == 41
            && b.counter("pubsub_delivered") == 21
            && b.counter("pubsub_dropped_no_subscriber") == 20
    });
    assert_eq!(b.counter("pubsub_dropped_invalid"), 0);
    assert_eq!(b.json("/v1/kv")["count"], 0);
    assert!(
        String::from_utf8_lossy(&b.get("/metrics").1).contains("chorus_pubsub_delivered 21"),
        "metrics"
    );
    drop(sse);
    wait_until("the subscription is gone", Duration::from_secs(10), || {
        // The driver notices a dropped reader when it next fans a message out.
        let _ = publish("chat/x", b"nobody");
        b.counter("pubsub_subscriptions") == 0
    });
}
