//! Durable nodes (`NodeBuilder::data_dir`) over real loopback multicast (127.0.0.1, TTL 0):
//! a node restarts with its data and syncs only what changed; the whole cluster restarts
//! with nothing lost and no deleted key back; damaged files are detected and what they lost
//! comes back from the peers.
//!
//! Each test uses its own group port (17_7xx). Every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chorus::{Error, Fsync, Node, Op};
use chorus_testkit::{TempDir, temp_dir};

fn group(port: u16) -> SocketAddr {
    SocketAddr::from(([239, 255, 92, (port % 200) as u8 + 1], port))
}

/// The data directory of node `id` under `tmp`.
fn node_dir(tmp: &TempDir, id: u64) -> PathBuf {
    tmp.path().join(format!("node-{id}"))
}

/// Starts a node; with a data dir, retries while a crashed predecessor's task still holds the
/// directory lock (an aborted task is dropped asynchronously).
async fn start(cluster: &str, port: u16, id: u64, dir: Option<&Path>) -> Node {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut b = Node::builder()
            .cluster(cluster)
            .group(group(port))
            .interface("127.0.0.1")
            .ttl(0)
            .node_id(chorus::NodeId(id));
        if let Some(dir) = dir {
            b = b.data_dir(dir).fsync(Fsync::Always);
        }
        match b.start().await {
            Ok(node) => return node,
            Err(Error::Durability(e)) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("node {id} does not start: {e}"),
        }
    }
}

fn dump(node: &Node) -> Vec<(String, Vec<u8>, String)> {
    node.scan("")
        .into_iter()
        .map(|(k, e)| (k, e.value.to_vec(), e.version.to_string()))
        .collect()
}

async fn converge(nodes: &[&Node], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let first = dump(nodes[0]);
        if nodes.iter().all(|n| dump(n) == first) && nodes.iter().all(|n| n.is_in_sync()) {
            return;
        }
        if Instant::now() > deadline {
            let sizes: Vec<usize> = nodes.iter().map(|n| n.scan("").len()).collect();
            panic!("stores did not converge within {within:?}; sizes {sizes:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn counter(node: &Node, name: &str) -> u64 {
    node.counters().get(name).unwrap_or(0)
}

/// Waits for the driver's next counter snapshot (published every 100 ms).
async fn counter_eventually(node: &Node, name: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let v = counter(node, name);
        if ok(v) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_comes_back_with_its_data_and_syncs_only_the_difference() {
    let port = 17_701;
    let tmp = temp_dir("node-durable-restart");
    let a = start("t-d-restart", port, 1, Some(&node_dir(&tmp, 1))).await;
    let b = start("t-d-restart", port, 2, Some(&node_dir(&tmp, 2))).await;
    for i in 0..300 {
        a.put(format!("cfg/{i}"), format!("v{i}")).await.unwrap();
    }
    a.delete("cfg/7").await.unwrap();
    converge(&[&a, &b], Duration::from_secs(20)).await;
    let before = dump(&a);
    a.shutdown().await.unwrap();

    // While a is away: an update, a delete of one of a's keys, a new key.
    b.put("cfg/1", "changed").await.unwrap();
    b.delete("cfg/2").await.unwrap();
    b.put("cfg/new", "n").await.unwrap();

    let a = start("t-d-restart", port, 1, Some(&node_dir(&tmp, 1))).await;
    // Straight from disk (sync may already be running, so count what was loaded): 299 values
    // and the tombstone of cfg/7.
    assert_eq!(
        counter_eventually(&a, "durable_loaded_entries", |v| v > 0).await,
        300
    );
    assert!(a.get("cfg/7").is_none());
    assert_eq!(a.get("cfg/250").unwrap().value, "v250");
    let unchanged = |d: Vec<(String, Vec<u8>, String)>| {
        d.into_iter()
            .filter(|(k, _, _)| !["cfg/1", "cfg/2", "cfg/new"].contains(&k.as_str()))
            .collect::<Vec<_>>()
    };
    converge(&[&a, &b], Duration::from_secs(20)).await;
    assert_eq!(a.get("cfg/1").unwrap().value, "changed");
    assert!(a.get("cfg/2").is_none());
    assert!(a.get("cfg/7").is_none(), "a deleted key does not come back");
    assert_eq!(a.get("cfg/new").unwrap().value, "n");
    assert_eq!(unchanged(dump(&a)), unchanged(before), "versions preserved");
    // Only the differing buckets travelled, not the 300 keys.
    let received = counter_eventually(&a, "replication_entries_received", |_| true).await;
    assert!(
        received < 100,
        "a restarted node with data fetches only what changed; got {received} entries"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cluster_restarts_with_the_same_data_everywhere() {
    let port = 17_702;
    let tmp = temp_dir("node-durable-cluster");
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start("t-d-cluster", port, id, Some(&node_dir(&tmp, id))).await);
    }
    for (i, n) in nodes.iter().enumerate() {
        for k in 0..60 {
            n.put(format!("k/{i}/{k}"), format!("v{k}")).await.unwrap();
        }
    }
    nodes[0].delete("k/1/5").await.unwrap();
    nodes[1].delete("k/2/6").await.unwrap();
    nodes[2]
        .batch(vec![Op::put("k/batch", "b"), Op::delete("k/0/0")])
        .await
        .unwrap();
    let refs: Vec<&Node> = nodes.iter().collect();
    converge(&refs, Duration::from_secs(20)).await;
    let before = dump(&nodes[0]);
    assert_eq!(before.len(), 3 * 60 - 3 + 1);
    // Two stop gracefully, one crashes (no goodbye, no final fsync: only what
    // `Fsync::Always` made durable before acknowledging).
    nodes[0].shutdown().await.unwrap();
    nodes[1].shutdown().await.unwrap();
    nodes[2].abort();
    drop(nodes);

    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start("t-d-cluster", port, id, Some(&node_dir(&tmp, id))).await);
    }
    for n in &nodes {
        assert_eq!(dump(n), before, "node {} reloaded everything", n.node_id());
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    converge(&refs, Duration::from_secs(20)).await;
    for n in &nodes {
        assert_eq!(dump(n), before);
        for gone in ["k/1/5", "k/2/6", "k/0/0"] {
            assert!(n.get(gone).is_none(), "{gone} came back on {}", n.node_id());
        }
    }
    for n in &nodes {
        n.shutdown().await.unwrap();
    }
}

fn wal_file(dir: &Path) -> PathBuf {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("wal-") && !n.ends_with(".corrupt"))
        })
        .expect("a log file")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_files_are_detected_and_the_loss_is_recovered_from_peers() {
    let port = 17_703;
    let tmp = temp_dir("node-durable-corrupt");
    let a = start("t-d-corrupt", port, 1, Some(&node_dir(&tmp, 1))).await;
    let b = start("t-d-corrupt", port, 2, Some(&node_dir(&tmp, 2))).await;
    let c = start("t-d-corrupt", port, 3, None).await;
    for i in 0..80 {
        a.put(format!("x/{i:03}"), format!("value-{i}"))
            .await
            .unwrap();
    }
    converge(&[&a, &b, &c], Duration::from_secs(20)).await;
    let before = dump(&a);
    a.shutdown().await.unwrap();

    // Flip a byte in the middle of a's log and cut its last record short.
    let path = wal_file(&node_dir(&tmp, 1));
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    bytes.truncate(bytes.len() - 7);
    fs::write(&path, &bytes).unwrap();

    let a = start("t-d-corrupt", port, 1, Some(&node_dir(&tmp, 1))).await;
    // It says what it found, and kept what was intact.
    assert!(counter_eventually(&a, "durable_corrupt_records", |v| v > 0).await >= 1);
    assert!(counter(&a, "durable_torn_tail_bytes") > 0);
    let kept = counter(&a, "durable_loaded_entries");
    assert!(
        (60..80).contains(&kept),
        "intact records kept, damaged ones dropped: {kept}"
    );
    // The rest comes back from the peers.
    converge(&[&a, &b, &c], Duration::from_secs(20)).await;
    assert_eq!(dump(&a), before);
    a.shutdown().await.unwrap();
    // The next start finds a clean directory with everything.
    let a = start("t-d-corrupt", port, 1, Some(&node_dir(&tmp, 1))).await;
    assert_eq!(dump(&a), before);
    assert_eq!(
        counter_eventually(&a, "durable_loaded_entries", |v| v > 0).await,
        80
    );
    assert_eq!(counter(&a, "durable_corrupt_records"), 0);
    for n in [&a, &b, &c] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_data_dir_a_restarted_node_starts_empty() {
    let port = 17_704;
    let a = start("t-d-mem", port, 1, None).await;
    a.put("k", "v").await.unwrap();
    a.shutdown().await.unwrap();
    let a = start("t-d-mem", port, 1, None).await;
    assert!(a.get("k").is_none(), "in memory only: nothing survives");
    assert_eq!(counter_eventually(&a, "store_keys", |_| true).await, 0);
    assert!(a.counters().iter().all(|(n, _)| !n.starts_with("durable_")));
    a.shutdown().await.unwrap();
}
