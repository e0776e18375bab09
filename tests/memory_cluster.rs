//! `Node`s over the in-memory transport seam (`chorus::transport::MemoryHub`): the same driver
//! as production, with seeded loss and partitions instead of sockets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chorus::transport::{HubConfig, MemoryHub};
use chorus::{Bytes, Error, Node, NodeId, Op};
use futures_util::StreamExt;

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 9, 0, i], 7400))
}

async fn converged(nodes: &[Node], keys: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let first: Vec<_> = nodes[0]
            .scan("")
            .into_iter()
            .map(|(k, e)| (k, e.value, e.version))
            .collect();
        if first.len() == keys
            && nodes[1..].iter().all(|n| {
                let dump: Vec<_> = n
                    .scan("")
                    .into_iter()
                    .map(|(k, e)| (k, e.value, e.version))
                    .collect();
                dump == first
            })
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_converge_over_a_lossy_partitioned_memory_hub() {
    let seed = 0x5eed_cafe;
    let hub = MemoryHub::new(HubConfig {
        loss: 0.2,
        seed,
        ..HubConfig::default()
    })
    .expect("hub");
    let mut nodes = Vec::new();
    for i in 1..=3u8 {
        let transport = hub.endpoint(addr(i)).expect("endpoint");
        let node = Node::builder()
            .cluster("memory")
            .node_id(NodeId(u64::from(i)))
            .start_with_transport(transport)
            .await
            .expect("node starts");
        nodes.push(node);
    }
    for k in 0..200 {
        nodes[k % 3]
            .put(format!("m/{k:03}"), format!("{k}"))
            .await
            .expect("put");
    }
    assert!(
        converged(&nodes, 200, Duration::from_secs(20)).await,
        "three nodes converge at 20 % loss (hub seed {seed:#x}, stats {:?})",
        hub.stats()
    );
    // Cut node 3 off, write on both sides (conflicting on one key), heal.
    hub.partition(addr(1), addr(3));
    hub.partition(addr(2), addr(3));
    let left = nodes[0].put("m/conflict", "left").await.expect("put");
    let right = nodes[2].put("m/conflict", "right").await.expect("put");
    nodes[2].put("m/only-right", "x").await.expect("put");
    nodes[1].delete("m/000").await.expect("delete");
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.heal(addr(1), addr(3));
    hub.heal(addr(2), addr(3));
    assert!(
        converged(&nodes, 201, Duration::from_secs(30)).await,
        "stores agree after the partition heals (hub seed {seed:#x})"
    );
    // Last writer wins by version (HLC, then node id), the same answer on every node.
    let winner = if right > left { "right" } else { "left" };
    for n in &nodes {
        assert_eq!(n.get("m/conflict").map(|e| e.value), Some(winner.into()));
    }
    assert!(
        nodes[2].get("m/000").is_none(),
        "the delete crossed the healed partition"
    );
    assert!(hub.stats().dropped_loss > 0 && hub.stats().dropped_partition > 0);
    for n in &nodes {
        n.shutdown().await.expect("shutdown");
    }
}

/// Nodes started together in one process without an explicit id draw distinct ids (they
/// used to be derived from the clock's milliseconds and the pid, so nodes started in the same
/// millisecond collided and never saw each other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_at_once_get_distinct_ids() {
    let hub = MemoryHub::new(HubConfig::default()).expect("hub");
    let starts = (1..=40u8).map(|i| {
        let transport = hub.endpoint(addr(i)).expect("endpoint");
        Node::builder()
            .cluster("ids")
            .start_with_transport(transport)
    });
    let nodes: Vec<Node> = futures_util::future::try_join_all(starts)
        .await
        .expect("nodes start");
    let ids: std::collections::BTreeSet<NodeId> = nodes.iter().map(Node::node_id).collect();
    assert_eq!(ids.len(), nodes.len(), "duplicate node ids: {ids:?}");
    for node in &nodes {
        node.abort();
    }
}

/// Back-pressure: while a member cannot acknowledge (partitioned, not yet declared gone), a
/// writer fills the send window (64 MiB on this transport) plus the driver's 1 MiB write
/// backlog, and then `put` waits instead of queueing without bound; after the heal it goes on
/// and the member catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_waits_while_a_silent_member_holds_the_window() {
    let hub = MemoryHub::new(HubConfig::default()).expect("hub");
    let start = |i: u8| {
        let transport = hub.endpoint(addr(i)).expect("endpoint");
        Node::builder()
            .cluster("backpressure")
            .node_id(NodeId(u64::from(i)))
            // 15 s before a silent member is declared gone: the window stays held meanwhile.
            .preset(chorus::Preset::Lossy)
            .start_with_transport(transport)
    };
    let (a, b) = (start(1).await.expect("a"), start(2).await.expect("b"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.members().len() < 2 || b.members().len() < 2 {
        assert!(Instant::now() < deadline, "the two nodes never met");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hub.partition(addr(1), addr(2));
    let value = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    let mut accepted = 0u32;
    let blocked = loop {
        let put = a.put(format!("big/{accepted:05}"), value.clone());
        match tokio::time::timeout(Duration::from_millis(700), put).await {
            Ok(result) => {
                result.expect("put");
                accepted += 1;
                if accepted > 3000 {
                    break false;
                }
            }
            Err(_) => break true,
        }
    };
    // 64 MiB of window = 1024 messages of 64 KiB, then up to 1 MiB (16 more) waiting.
    assert!(
        blocked,
        "put never waited: {accepted} writes of 64 KiB accepted"
    );
    assert!(
        (1000..=1100).contains(&accepted),
        "put waited after {accepted} writes of 64 KiB (expected the window plus 1 MiB)"
    );
    hub.heal(addr(1), addr(2));
    tokio::time::timeout(Duration::from_secs(30), a.put("after-heal", "ok"))
        .await
        .expect("put goes on once the member acknowledges again")
        .expect("put");
    let deadline = Instant::now() + Duration::from_secs(60);
    while b.get("after-heal").is_none() {
        assert!(
            Instant::now() < deadline,
            "b never caught up after the heal"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in [&a, &b] {
        node.abort();
    }
}

/// A watch whose reader stops reading while more changes than the change log keeps (100 000
/// by default) are applied ends with `Compacted` in the stream, then `None`; resuming from
/// its revision is refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_falls_out_of_the_change_log_ends_with_compacted_in_the_stream() {
    let hub = MemoryHub::new(HubConfig::default()).expect("hub");
    let node = Node::builder()
        .cluster("compacted")
        .node_id(NodeId(1))
        .start_with_transport(hub.endpoint(addr(1)).expect("endpoint"))
        .await
        .expect("node starts");
    let mut watch = node.watch("k/");
    let start = watch.revision();
    for chunk in 0..110 {
        let ops = (0..1000)
            .map(|i| Op::put(format!("k/{chunk:03}/{i:04}"), Bytes::from_static(b"v")))
            .collect();
        node.batch(ops).await.expect("batch");
    }
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        let first = watch.next().await;
        let after = watch.next().await;
        (first, after)
    })
    .await
    .expect("the watch answers within the deadline");
    match ended {
        (Some(Err(Error::Compacted { requested, oldest })), None) => {
            assert_eq!(requested, start);
            assert!(oldest > start + 1, "oldest {oldest}");
        }
        other => panic!("expected Compacted and then the end, got {other:?}"),
    }
    assert!(matches!(
        node.watch_from("k/", start).await,
        Err(Error::Compacted { .. })
    ));
    node.shutdown().await.expect("shutdown");
}
