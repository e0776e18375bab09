//! A chat over published messages: three nodes in chat rooms, nothing stored.
//!
//! All three run in this process over loopback multicast (127.0.0.1, TTL 0): nothing leaves
//! this machine. Each node subscribes to every room (`chat/*`) and says a few lines; each
//! prints what it hears. Per sender the lines come in the order they were said, exactly once
//! (or as an explicit "lost" line); lines of different senders may interleave differently on
//! each node. A node also hears itself. The store stays empty: messages are not stored, and a
//! node that joins later hears only what is said after it joined.
//!
//! Run with `cargo run --example chat`.

use std::time::Duration;

use chorus::{Delivery, Error, Node, NodeId};
use futures_util::StreamExt;

/// Lines each node says.
const LINES: [&str; 3] = ["hello", "anyone on the new build?", "bye"];

#[tokio::main]
async fn main() -> Result<(), Error> {
    let group = "239.255.77.10:7410"
        .parse()
        .map_err(|e| Error::Config(format!("{e}")))?;
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let node = Node::builder()
            .cluster("example-chat")
            .group(group)
            .interface("127.0.0.1")
            .ttl(0)
            .node_id(NodeId(id))
            .start()
            .await?;
        nodes.push(node);
    }
    // Messages are not stored: wait until every node knows the others before talking.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while nodes.iter().any(|n| n.members().len() < 3) {
        if tokio::time::Instant::now() > deadline {
            return Err(Error::Timeout(Duration::from_secs(10)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Everyone listens to every room, until it heard every line (its own included).
    let expected = nodes.len() * LINES.len();
    let mut listeners = Vec::new();
    for node in &nodes {
        let me = node.node_id();
        let mut rooms = node.subscribe("chat/*")?;
        listeners.push(tokio::spawn(async move {
            let mut heard = 0;
            while heard < expected {
                match rooms.next().await {
                    Some(Ok(Delivery::Message(m))) => {
                        heard += 1;
                        println!(
                            "node {me} hears [{}] node {}: {}",
                            m.topic,
                            m.from,
                            String::from_utf8_lossy(&m.payload)
                        );
                    }
                    Some(Ok(Delivery::Lost { from, count })) => {
                        println!("node {me}: up to {count} messages of node {from} were lost");
                    }
                    Some(Ok(other)) => println!("node {me}: {other:?}"),
                    Some(Err(e)) => println!("node {me}: {e}"),
                    None => break,
                }
            }
        }));
    }

    for line in LINES {
        for (i, node) in nodes.iter().enumerate() {
            let room = if i == 2 { "chat/dev" } else { "chat/lobby" };
            node.publish(room, line).await?;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for listener in listeners {
        let _ = tokio::time::timeout(Duration::from_secs(10), listener).await;
    }
    // Counters are a snapshot refreshed every 100 ms.
    tokio::time::sleep(Duration::from_millis(150)).await;
    for node in &nodes {
        println!(
            "node {} stores {} keys; published {}, delivered {}",
            node.node_id(),
            node.scan("").len(),
            node.counters().pubsub.published,
            node.counters().pubsub.delivered
        );
        node.shutdown().await?;
    }
    Ok(())
}
