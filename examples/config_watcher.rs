//! Update a shared config value safely with conditional writes, and follow it with a watch.
//!
//! Three nodes run in this process over loopback multicast (127.0.0.1, TTL 0): nothing leaves
//! this machine. Node 3 watches `config/` and prints every change. Node 1 creates the setting
//! once (`put_if_absent`); two workers on node 1 then raise it concurrently, each with a
//! read-modify-write loop: read the entry, compute the new value, write it only if the version
//! is still the one read (`put_if_version`), and on a failed condition read again and retry.
//! No increment is lost. Finally node 2, holding a version that is no longer current, is
//! refused and told the current version.
//!
//! What is guaranteed (docs/replication.md): a condition is checked atomically against the
//! writing node's own view. Writers on one node never overwrite each other's update unseen;
//! writers on two nodes that both saw the same version can both succeed before they hear of
//! each other, and the cluster then keeps the later write (last writer wins). Route
//! read-modify-write of one key through one node when every update must count.
//!
//! Run with `cargo run --example config_watcher`.

use std::time::Duration;

use chorus::{Node, NodeId, ReplicationError};
use futures_util::StreamExt;

const KEY: &str = "config/max_connections";
const START: u64 = 100;
const WORKERS: u64 = 2;
const RAISES_PER_WORKER: u64 = 5;

/// The setting's value as a number.
fn number(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// Raises the setting by one on `node` with compare-and-set; returns how many attempts lost
/// to another writer first.
async fn raise(node: &Node) -> Result<u32, chorus::Error> {
    let mut conflicts = 0;
    loop {
        let entry = node
            .get(KEY)
            .ok_or_else(|| chorus::Error::Config(format!("{KEY} is missing")))?;
        let current = number(&entry.value)
            .ok_or_else(|| chorus::Error::Config(format!("{KEY} is not a number")))?;
        let next = (current + 1).to_string();
        // Time spent deciding (a real updater validates, renders a file, ...): the other
        // worker may write meanwhile.
        tokio::time::sleep(Duration::from_millis(2)).await;
        match node.put_if_version(KEY, next, entry.version).await {
            Ok(_) => return Ok(conflicts),
            // Someone else changed it since we read it: read again and retry.
            Err(chorus::Error::Replication(ReplicationError::ConditionFailed { .. })) => {
                conflicts += 1;
                tokio::task::yield_now().await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), chorus::Error> {
    let group = "239.255.77.10:7410"
        .parse()
        .map_err(|e| chorus::Error::Config(format!("{e}")))?;
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let node = Node::builder()
            .cluster("example-config-watcher")
            .group(group)
            .interface("127.0.0.1")
            .ttl(0)
            .node_id(NodeId(id))
            .start()
            .await?;
        nodes.push(node);
    }
    let expected = START + WORKERS * RAISES_PER_WORKER;

    // Node 3 follows the config and stops once it has seen the final value.
    let mut watch = nodes[2].watch("config/");
    let follower = tokio::spawn(async move {
        while let Some(Ok(change)) = watch.next().await {
            let value = change.value.as_deref().and_then(number);
            println!(
                "node 3 saw {} = {} (version {}, revision {})",
                change.key,
                value.map_or_else(|| "(deleted)".to_owned(), |v| v.to_string()),
                change.version,
                change.revision
            );
            if value == Some(expected) {
                return true;
            }
        }
        false
    });

    // Created once: a second creator is refused instead of resetting it.
    let created = nodes[0].put_if_absent(KEY, START.to_string()).await?;
    println!("node 1 created {KEY} = {START} (version {created})");
    match nodes[0].put_if_absent(KEY, "0").await {
        Err(chorus::Error::Replication(ReplicationError::ConditionFailed { current, .. })) => {
            let current = current.map_or_else(|| "none".to_owned(), |v| v.to_string());
            println!("a second put_if_absent is refused: it exists at version {current}");
        }
        other => println!("unexpected: {other:?}"),
    }

    // Two workers on node 1 raise it concurrently; every raise counts.
    let mut workers = Vec::new();
    for w in 1..=WORKERS {
        let node = nodes[0].clone();
        workers.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..RAISES_PER_WORKER {
                conflicts += raise(&node).await?;
            }
            println!(
                "worker {w}: {RAISES_PER_WORKER} raises, {conflicts} retried after a conflict"
            );
            Ok::<_, chorus::Error>(())
        }));
    }
    for worker in workers {
        worker
            .await
            .map_err(|e| chorus::Error::Config(format!("worker failed: {e}")))??;
    }
    let last = nodes[0]
        .get(KEY)
        .ok_or_else(|| chorus::Error::Config(format!("{KEY} is missing")))?;
    println!(
        "node 1 holds {KEY} = {} (expected {expected})",
        String::from_utf8_lossy(&last.value)
    );

    // Node 2, once it holds the latest version, tries to write with the version of the first
    // write: refused, with the current version to read again from.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while nodes[1].get(KEY).map(|e| e.version) != Some(last.version)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match nodes[1].put_if_version(KEY, "1", created).await {
        Err(chorus::Error::Replication(ReplicationError::ConditionFailed { current, .. })) => {
            let current = current.map_or_else(|| "none".to_owned(), |v| v.to_string());
            println!("node 2 with a stale version is refused: current is {current}");
        }
        other => println!("node 2's stale write: {other:?} (it had not heard of the raises yet)"),
    }

    let seen = tokio::time::timeout(Duration::from_secs(10), follower).await;
    match seen {
        Ok(Ok(true)) => println!("node 3 followed every change up to {expected}"),
        _ => println!("node 3 did not see {expected} within 10 s"),
    }
    for node in &nodes {
        node.shutdown().await?;
    }
    Ok(())
}
