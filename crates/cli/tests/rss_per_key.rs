//! Memory per key, measured: two loopback agents (127.0.0.1, TTL 0, a group of their own),
//! 200 000 keys of ~25 B with 100 B values written through the HTTP API of one of them, then
//! the resident set size (`VmRSS` of `/proc/PID/status`) of both divided by the key count.
//!
//! Ignored by default (it writes 200 000 keys and wants the release profile):
//! `cargo test --release -p chorus-cli --test rss_per_key -- --ignored --nocapture`.
//! Figures go in `docs/performance.md`.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{Agent, free_port, http, loopback_agent_args, random_group, spawn_agent};

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

/// A minimal HTTP/1.1 keep-alive client: one PUT at a time on one connection.
struct Conn {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Conn {
            addr,
            reader: BufReader::new(s),
        }
    }

    /// PUT `body` at `/v1/kv/{key}`; returns the status.
    fn put(&mut self, key: &str, body: &[u8]) -> u16 {
        let mut req = format!(
            "PUT /v1/kv/{key} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.reader.get_mut().write_all(&req).unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut len = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((name, value)) = l.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                len = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).unwrap();
        status
    }
}

#[test]
#[ignore = "writes 200 000 keys; run with --release -- --ignored --nocapture"]
fn rss_per_key_on_writer_and_receiver() {
    let start = Instant::now();
    let (r, group) = random_group();
    let cluster = format!("rss-{r:016x}");
    let agent = |node: u64| {
        let http = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        spawn_agent(&loopback_agent_args(&cluster, group, node, http), http)
    };
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
                let mut conn = Conn::new(addr);
                let mut value = vec![b'v'; VALUE_LEN];
                value[0] = b'0' + t as u8;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= KEYS || start.elapsed() > DEADLINE {
                        return;
                    }
                    let status = conn.put(&key(i), &value);
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
    assert_eq!(Conn::new(writer.http).put(SENTINEL, b"last"), 200);
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
