//! Memory per key, measured: two loopback agents (127.0.0.1, TTL 0, a group of their own),
//! 200 000 keys of ~25 B with 100 B values written through the HTTP API of one of them, then
//! the resident set size (`VmRSS` of `/proc/PID/status`) of both divided by the key count.
//!
//! Ignored by default (it writes 200 000 keys and wants the release profile):
//! `cargo test --release -p chorus-cli --test rss_per_key -- --ignored --nocapture`.
//! Figures go in `docs/performance.md`.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod common;

use chorus_testkit::Agent;
use chorus_testkit::http::{Connection, request as http};
use common::Net;

/// Keys written.
const KEYS: usize = 200_000;
/// Bytes of every value.
const VALUE_LEN: usize = 100;
/// Concurrent keep-alive connections writing.
const WRITERS: usize = 8;
/// Most resident bytes per key allowed on either node.
const MAX_RSS_PER_KEY: u64 = 400;
/// Written after the others; the receiver holding it holds them all.
const SENTINEL: &str = "rss/sentinel";
/// The whole test (writing and waiting for the receiver) must finish within this.
const DEADLINE: Duration = Duration::from_secs(600);

/// A 25-byte key.
fn key(i: usize) -> String {
    format!("rss/{i:08}/abcdefghijkl")
}

/// Resident set size of `pid` in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// One counter of `/v1/stats`.
fn counter(agent: &Agent, name: &str) -> u64 {
    let (status, body) = http(agent.http, "GET", "/v1/stats", &[], b"");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["counters"][name].as_u64().unwrap_or(0)
}

fn members(agent: &Agent) -> usize {
    let (status, body) = http(agent.http, "GET", "/v1/members", &[], b"");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["members"].as_array().map_or(0, Vec::len)
}

/// PUT `body` at `/v1/kv/{key}` on a keep-alive connection; returns the status.
fn put(conn: &mut Connection, key: &str, body: &[u8]) -> u16 {
    conn.request("PUT", &format!("/v1/kv/{key}"), &[], body)
        .unwrap()
        .0
}

#[test]
#[ignore = "writes 200 000 keys; run with --release -- --ignored --nocapture"]
fn rss_per_key_on_writer_and_receiver() {
    let start = Instant::now();
    let net = Net::new("rss");
    let agent = |node: u64| net.agent(node, &[]);
    let writer = agent(1);
    let receiver = agent(2);
    while members(&writer) < 2 || members(&receiver) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "agents never met"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (w_pid, r_pid) = (writer.child.id(), receiver.child.id());
    let (w_base, r_base) = (rss(w_pid), rss(r_pid));

    let next = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..WRITERS)
        .map(|t| {
            let next = next.clone();
            let addr = writer.http;
            std::thread::spawn(move || {
                let mut conn = Connection::open(addr).unwrap();
                let mut value = vec![b'v'; VALUE_LEN];
                value[0] = b'0' + t as u8;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= KEYS || start.elapsed() > DEADLINE {
                        return;
                    }
                    let status = put(&mut conn, &key(i), &value);
                    assert_eq!(status, 200, "PUT {}", key(i));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let written = start.elapsed();
    assert!(written < DEADLINE, "writing took longer than {DEADLINE:?}");
    // One stream, delivered in order: once the receiver holds this last write it holds the
    // others (or resyncs them). Waiting with GET, not /v1/stats, whose key count copies the
    // whole store and would leave its footprint in the figures.
    assert_eq!(
        put(
            &mut Connection::open(writer.http).unwrap(),
            SENTINEL,
            b"last"
        ),
        200
    );
    while http(
        receiver.http,
        "GET",
        &format!("/v1/kv/{SENTINEL}"),
        &[],
        b"",
    )
    .0 != 200
    {
        assert!(
            start.elapsed() < DEADLINE,
            "the receiver lacks the last write after {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Let both drivers go idle (send windows trimmed, repairs done) before measuring.
    std::thread::sleep(Duration::from_secs(3));
    let (w_rss, r_rss) = (rss(w_pid), rss(r_pid));
    for a in [&writer, &receiver] {
        // The sentinel and every key.
        assert_eq!(counter(a, "store_keys"), KEYS as u64 + 1);
    }
    let per_key = |rss: u64| rss / KEYS as u64;
    let growth = |rss: u64, base: u64| rss.saturating_sub(base) / KEYS as u64;
    println!(
        "{KEYS} keys of {} B + {VALUE_LEN} B written in {:.1} s",
        key(0).len(),
        written.as_secs_f64()
    );
    println!(
        "writer:   RSS {:>6.1} MB before, {:>6.1} MB after: {} B per key ({} B per key of growth)",
        w_base as f64 / 1e6,
        w_rss as f64 / 1e6,
        per_key(w_rss),
        growth(w_rss, w_base)
    );
    println!(
        "receiver: RSS {:>6.1} MB before, {:>6.1} MB after: {} B per key ({} B per key of growth)",
        r_base as f64 / 1e6,
        r_rss as f64 / 1e6,
        per_key(r_rss),
        growth(r_rss, r_base)
    );
    assert!(
        per_key(w_rss) <= MAX_RSS_PER_KEY,
        "writer holds {} B per key",
        per_key(w_rss)
    );
    assert!(
        per_key(r_rss) <= MAX_RSS_PER_KEY,
        "receiver holds {} B per key",
        per_key(r_rss)
    );
}
