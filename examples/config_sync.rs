//! Keep a small application config in sync between three nodes.
//!
//! All three run in this process over loopback multicast (127.0.0.1, TTL 0): nothing leaves
//! this machine. One node writes the config, another changes one setting, the third watches
//! and prints every change; at the end all three hold the same config.
//!
//! Run with `cargo run --example config_sync`.

use std::time::Duration;

use chorus::{Node, NodeId, Op};
use futures_util::StreamExt;

#[tokio::main]
async fn main() -> Result<(), chorus::Error> {
    let group = "239.255.77.9:7409"
        .parse()
        .map_err(|e| chorus::Error::Config(format!("{e}")))?;
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let node = Node::builder()
            .cluster("example-config")
            .group(group)
            .interface("127.0.0.1")
            .ttl(0)
            .node_id(NodeId(id))
            .start()
            .await?;
        nodes.push(node);
    }

    // The third node follows everything under "app/".
    let mut watch = nodes[2].watch("app/");
    let printer = tokio::spawn(async move {
        let mut seen = 0;
        while let Some(Ok(change)) = watch.next().await {
            let value = change
                .value
                .as_ref()
                .map(|v| String::from_utf8_lossy(v).into_owned());
            println!(
                "node 3 saw {} = {:?} (version {:?})",
                change.key, value, change.version
            );
            seen += 1;
            if seen == 4 {
                break;
            }
        }
    });

    // Node 1 writes the whole config atomically; node 2 then changes one setting.
    nodes[0]
        .batch(vec![
            Op::put("app/db/url", "postgres://db1/app"),
            Op::put("app/db/pool", "16"),
            Op::put("app/feature/search", "on"),
        ])
        .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    nodes[1].put("app/db/pool", "32").await?;

    let _ = tokio::time::timeout(Duration::from_secs(10), printer).await;
    for (i, node) in nodes.iter().enumerate() {
        let config: Vec<String> = node
            .scan("app/")
            .into_iter()
            .map(|(k, e)| format!("{k}={}", String::from_utf8_lossy(&e.value)))
            .collect();
        println!("node {} holds {}", i + 1, config.join(" "));
    }
    for node in &nodes {
        node.shutdown().await?;
    }
    Ok(())
}
