//! Crash tests of the durable store through the `chorus` binary: one agent with `--data-dir`
//! (default `--fsync always`) and no peers, so whatever it holds after a restart came from its
//! own disk. A writer streams PUTs over HTTP, the agent is SIGKILLed mid-stream, restarted on
//! the same directory, and every write the HTTP API acknowledged must be there.
//!
//! Loopback only (127.0.0.1, TTL 0, a random 239.255.x.y group per test); every wait is bounded;
//! agents are killed when their guard drops and the data directory is removed at the end.
//! The kill delays come from a seed printed at the start (`CHORUS_KILL_SEED=N` replays one).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use chorus_testkit::http::{request as http, try_request as try_http};
use chorus_testkit::{Agent, TempDir, temp_dir};
use common::{Net, local_http, spawn_agent};

/// One single-node "cluster" on a loopback group no other test uses, with its data directory.
struct Node {
    net: Net,
    data: TempDir,
}

impl Node {
    fn new(tag: &str) -> Self {
        Self {
            net: Net::new("kill"),
            data: temp_dir(tag),
        }
    }

    /// Starts (or restarts) the agent on the data directory, on a fresh HTTP port (so a restart
    /// never races the previous process's sockets), and waits until its HTTP API answers.
    fn start(&self) -> Agent {
        let http = local_http();
        let data = self.data.path().display().to_string();
        let extra = ["--data-dir", &data, "--fsync", "always"];
        spawn_agent(&self.net.args(1, http, &extra), http)
    }
}

/// Every live key under `prefix` with its value, from `GET /v1/kv?prefix=`.
fn list(agent: &Agent, prefix: &str) -> HashMap<String, String> {
    let (status, body) = http(
        agent.http,
        "GET",
        &format!("/v1/kv?prefix={prefix}"),
        &[],
        b"",
    );
    assert_eq!(status, 200, "list: {}", String::from_utf8_lossy(&body));
    let json: Value = serde_json::from_slice(&body).unwrap();
    let entries = json["entries"].as_array().unwrap();
    assert_eq!(json["count"].as_u64(), Some(entries.len() as u64), "{json}");
    entries
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// SplitMix64: a tiny seeded generator, so a failing run's kill delays can be replayed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn seed() -> u64 {
    std::env::var("CHORUS_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

fn value_of(key: &str) -> String {
    format!("value-of-{key}-{}", "x".repeat(40))
}

/// PUTs `k/<round>/<i>` as fast as one connection at a time allows until `stop` is set or the
/// agent stops answering; returns the keys whose PUT was answered 2xx.
fn write_until_killed(http: SocketAddr, round: usize, stop: &AtomicBool) -> Vec<String> {
    let mut acked = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("k/{round}/{i}");
        match try_http(
            http,
            "PUT",
            &format!("/v1/kv/{key}"),
            &[],
            value_of(&key).as_bytes(),
        ) {
            Ok((status, _)) if (200..300).contains(&status) => acked.push(key),
            Ok((status, body)) => panic!(
                "PUT {key} answered {status} while the agent was alive: {}",
                String::from_utf8_lossy(&body)
            ),
            // The agent died under this request: not acknowledged, and nothing more will be.
            Err(_) => break,
        }
        i += 1;
    }
    acked
}

#[test]
fn acknowledged_writes_survive_kill_9_with_fsync_always() {
    const ROUNDS: usize = 5;
    let seed = seed();
    println!("CHORUS_KILL_SEED={seed}");
    let mut rng = SplitMix(seed);
    let node = Node::new("kill");
    let mut acked_all: Vec<String> = Vec::new();
    let started = Instant::now();

    let mut agent = node.start();
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let stop = Arc::clone(&stop);
            let http = agent.http;
            std::thread::spawn(move || write_until_killed(http, round, &stop))
        };
        let delay = Duration::from_millis(100 + rng.next() % 301);
        std::thread::sleep(delay);
        assert!(
            !writer.is_finished(),
            "writer stopped before the kill:\n{}",
            agent.log_text()
        );
        agent.kill9();
        stop.store(true, Ordering::Relaxed);
        let acked = writer.join().unwrap();
        assert!(
            !acked.is_empty(),
            "round {round}: no write acknowledged in {delay:?}, the check would prove nothing:\n{}",
            agent.log_text()
        );
        acked_all.extend(acked.iter().cloned());
        drop(agent);

        // The restarted agent is checked, then written to and killed in the next round.
        agent = node.start();
        let present = assert_all_present(&agent, &acked_all, round, "after kill -9");
        let round_present = list(&agent, &format!("k/{round}/")).len();
        println!(
            "round {round}: killed after {delay:?}: acknowledged {} (total {}), present {present} \
             of them; keys of this round on disk {round_present}",
            acked.len(),
            acked_all.len(),
        );
        // A round's keys on disk may include at most the one PUT in flight at the kill.
        assert!(
            round_present <= acked.len() + 1,
            "round {round}: {round_present} keys but only {} PUTs were sent",
            acked.len() + 1
        );
    }
    println!(
        "{ROUNDS} kill -9 rounds, {} acknowledged writes, all present, in {:?}",
        acked_all.len(),
        started.elapsed()
    );
}

/// Asserts every key in `acked` is listed with its value; returns how many are.
fn assert_all_present(agent: &Agent, acked: &[String], round: usize, when: &str) -> usize {
    let stored = list(agent, "k/");
    let missing: Vec<&String> = acked
        .iter()
        .filter(|k| stored.get(*k) != Some(&value_of(k)))
        .collect();
    assert!(
        missing.is_empty(),
        "round {round} {when}: {} of {} acknowledged writes missing or wrong, e.g. {:?}\n{}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)],
        agent.log_text()
    );
    acked.len()
}

#[test]
fn acknowledged_delete_survives_kill_9() {
    let node = Node::new("kill-del");
    let mut agent = node.start();
    for (method, path, body) in [
        ("PUT", "/v1/kv/gone", &b"soon deleted"[..]),
        ("PUT", "/v1/kv/kept", &b"stays"[..]),
        ("DELETE", "/v1/kv/gone", &b""[..]),
    ] {
        let (status, resp) = http(agent.http, method, path, &[], body);
        assert_eq!(
            status,
            200,
            "{method} {path}: {}",
            String::from_utf8_lossy(&resp)
        );
    }
    assert_eq!(http(agent.http, "GET", "/v1/kv/gone", &[], b"").0, 404);
    agent.kill9();
    drop(agent);

    let agent = node.start();
    // The control key proves the restart read the directory; the deleted key stays deleted.
    let (status, body) = http(agent.http, "GET", "/v1/kv/kept", &[], b"");
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"stays"[..]),
        "{}",
        agent.log_text()
    );
    let (status, _) = http(agent.http, "GET", "/v1/kv/gone", &[], b"");
    assert_eq!(status, 404, "deleted key came back:\n{}", agent.log_text());
    let keys: Vec<String> = list(&agent, "").into_keys().collect();
    assert_eq!(keys, ["kept"]);
    assert_data_dir_not_empty(node.data.path());
}

fn assert_data_dir_not_empty(dir: &Path) {
    let n = std::fs::read_dir(dir).unwrap().count();
    assert!(n > 0, "--data-dir {} is empty", dir.display());
}
