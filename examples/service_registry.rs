//! A service registry on owned keys: each service instance registers itself under
//! `services/` with [`Node::put_owned`]; the key lives as long as the instance's node does.
//! A watcher lists the registry and follows it. One instance stops gracefully (its key goes
//! at once), another crashes (its key goes when the cluster declares it gone, the preset's
//! `leave_after`: 5 s on the LAN preset).
//!
//! All nodes run in this process over loopback multicast (127.0.0.1, TTL 0): nothing leaves
//! this machine. Every wait is bounded.
//!
//! Run with `cargo run --example service_registry`.

use std::time::{Duration, Instant};

use chorus::{Node, NodeId};
use futures_util::StreamExt;

/// The longest any step of the example waits.
const STEP: Duration = Duration::from_secs(20);

async fn start(id: u64, name: &str) -> Result<Node, chorus::Error> {
    let group = "239.255.77.10:7410"
        .parse()
        .map_err(|e| chorus::Error::Config(format!("{e}")))?;
    Node::builder()
        .cluster("example-service-registry")
        .group(group)
        .interface("127.0.0.1")
        .ttl(0)
        .node_id(NodeId(id))
        .node_name(name)
        .start()
        .await
}

/// Every registered instance, as `service/instance = address`.
fn registry(node: &Node) -> Vec<String> {
    node.scan("services/")
        .into_iter()
        .map(|(key, entry)| format!("{key} = {}", String::from_utf8_lossy(&entry.value)))
        .collect()
}

/// Waits (at most [`STEP`]) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) -> Result<(), chorus::Error> {
    let deadline = Instant::now() + STEP;
    while !done() {
        if Instant::now() > deadline {
            return Err(chorus::Error::Config(format!("gave up waiting for {what}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), chorus::Error> {
    let watcher = start(1, "registry-viewer").await?;
    let api1 = start(2, "api-1").await?;
    let api2 = start(3, "api-2").await?;
    until("the three nodes to meet", || {
        [&watcher, &api1, &api2]
            .iter()
            .all(|n| n.members().len() == 3)
    })
    .await?;

    // The watcher follows the registry from now on.
    let mut changes = watcher.watch("services/");
    let follower = tokio::spawn(async move {
        let started = Instant::now();
        while let Some(Ok(change)) = changes.next().await {
            let at = started.elapsed().as_secs_f64();
            match change.value {
                Some(addr) => println!(
                    "[{at:5.2}s] registered   {} at {}",
                    change.key,
                    String::from_utf8_lossy(&addr)
                ),
                None => println!("[{at:5.2}s] deregistered {}", change.key),
            }
        }
    });

    // Each instance registers itself: its key lives as long as its node.
    api1.put_owned("services/api/1", "127.0.0.1:8081").await?;
    api2.put_owned("services/api/2", "127.0.0.1:8082").await?;
    until("both registrations on the watcher", || {
        registry(&watcher).len() == 2
    })
    .await?;
    println!("registry: {:?}", registry(&watcher));

    // A graceful stop deregisters at once (the node deletes its owned keys before its
    // goodbye).
    let stopped = Instant::now();
    api2.shutdown().await?;
    until("api-2's key to go", || registry(&watcher).len() == 1).await?;
    println!(
        "api-2 stopped: deregistered after {:.2}s",
        stopped.elapsed().as_secs_f64()
    );

    // A crash: nobody says goodbye; the key goes when the cluster declares the node gone.
    let crashed = Instant::now();
    api1.abort();
    until("api-1's key to go", || registry(&watcher).is_empty()).await?;
    println!(
        "api-1 crashed: deregistered after {:.2}s",
        crashed.elapsed().as_secs_f64()
    );

    watcher.shutdown().await?;
    let _ = follower.await;
    println!("registry: {:?}", registry(&watcher));
    Ok(())
}
