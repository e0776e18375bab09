//! Several `Node`s in one process over real loopback multicast (127.0.0.1, TTL 0).
//!
//! Each test uses a loopback group of its own (`chorus_testkit::net::random_group`) so tests
//! can run in parallel. Every wait is bounded.

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use chorus::{Node, NodeId, Op};
use chorus_testkit::net::random_group;
use futures_util::StreamExt;

async fn start(cluster: &str, group: SocketAddrV4, id: u64) -> Node {
    Node::builder()
        .cluster(cluster)
        .group(group.into())
        .interface("127.0.0.1")
        .ttl(0)
        .node_id(NodeId(id))
        .start()
        .await
        .expect("node starts on loopback multicast")
}

fn dump(node: &Node) -> Vec<(String, Vec<u8>)> {
    node.scan("")
        .into_iter()
        .map(|(k, e)| (k, e.value.to_vec()))
        .collect()
}

/// Wait until every node holds the same store and that store satisfies `done`.
async fn converge(nodes: &[&Node], within: Duration, done: impl Fn(&[(String, Vec<u8>)]) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let first = dump(nodes[0]);
        if done(&first) && nodes.iter().all(|n| dump(n) == first) {
            return;
        }
        if Instant::now() > deadline {
            let sizes: Vec<usize> = nodes.iter().map(|n| n.scan("").len()).collect();
            panic!("stores did not converge within {within:?}; sizes {sizes:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_converge() {
    let (_, group) = random_group();
    let mut nodes = Vec::new();
    for id in 1..=5 {
        nodes.push(start("t-five", group, id).await);
    }
    for (i, node) in nodes.iter().enumerate() {
        for k in 0..40 {
            node.put(format!("cfg/{i}/{k}"), format!("v{k}"))
                .await
                .expect("put");
        }
    }
    nodes[0].delete("cfg/1/3").await.expect("delete");
    nodes[2]
        .batch(vec![
            Op::put("cfg/batch/a", "1"),
            Op::put("cfg/batch/b", "2"),
            Op::delete("cfg/4/0"),
        ])
        .await
        .expect("batch");
    let refs: Vec<&Node> = nodes.iter().collect();
    converge(&refs, Duration::from_secs(20), |d| {
        d.len() == 5 * 40 - 2 + 2
    })
    .await;
    assert!(
        nodes[4].get("cfg/1/3").is_none(),
        "deleted key stays deleted"
    );
    assert_eq!(
        nodes[3].get("cfg/batch/b").map(|e| e.value),
        Some("2".into())
    );
    // Membership follows heartbeats (a new sender is a member from its second one), data
    // also travels by anti-entropy through any member: the stores can agree a moment before
    // the last member is admitted everywhere. Every node sees all five soon after.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while nodes.iter().any(|n| n.members().len() != 5) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in &nodes {
        assert_eq!(
            n.members().len(),
            5,
            "every node sees all five members: {:?}",
            n.members()
        );
    }
    // A goodbye removes a member well before the silence timeouts (suspect 1.5 s, leave 5 s).
    nodes[0].shutdown().await.expect("shutdown");
    let deadline = Instant::now() + Duration::from_millis(1000);
    while nodes[1].members().len() != 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        nodes[1].members().len(),
        4,
        "node 1 left by goodbye: {:?}",
        nodes[1].members()
    );
    for n in &nodes[1..] {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_catches_up_ten_thousand_keys() {
    let (_, group) = random_group();
    let a = start("t-late", group, 1).await;
    let b = start("t-late", group, 2).await;
    let ops: Vec<Op> = (0..10_000)
        .map(|i| Op::put(format!("k/{i:05}"), vec![b'x'; 32]))
        .collect();
    for chunk in ops.chunks(100) {
        a.batch(chunk.to_vec()).await.expect("batch");
    }
    converge(&[&a, &b], Duration::from_secs(30), |d| d.len() == 10_000).await;
    let started = Instant::now();
    let c = start("t-late", group, 3).await;
    c.wait_in_sync(Duration::from_secs(60))
        .await
        .expect("late joiner gets in sync");
    converge(&[&a, &b, &c], Duration::from_secs(30), |d| {
        d.len() == 10_000
    })
    .await;
    eprintln!(
        "late joiner caught up 10000 keys in {:?}",
        started.elapsed()
    );
    for n in [a, b, c] {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_resyncs() {
    let (_, group) = random_group();
    let a = start("t-restart", group, 1).await;
    let b = start("t-restart", group, 2).await;
    let c = start("t-restart", group, 3).await;
    for k in 0..200 {
        a.put(format!("r/{k}"), "before").await.expect("put");
    }
    converge(&[&a, &b, &c], Duration::from_secs(20), |d| d.len() == 200).await;
    // Crash c: no goodbye.
    c.abort();
    for k in 0..200 {
        b.put(format!("r/{k}"), "while-away").await.expect("put");
    }
    b.delete("r/7").await.expect("delete");
    let c = start("t-restart", group, 3).await;
    c.wait_in_sync(Duration::from_secs(30))
        .await
        .expect("restarted node resyncs");
    converge(&[&a, &b, &c], Duration::from_secs(20), |d| d.len() == 199).await;
    assert_eq!(c.get("r/9").map(|e| e.value), Some("while-away".into()));
    assert!(c.get("r/7").is_none());
    for n in [a, b, c] {
        n.shutdown().await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_every_change_of_its_prefix() {
    let (_, group) = random_group();
    let a = start("t-watch", group, 1).await;
    let b = start("t-watch", group, 2).await;
    let mut w = b.watch("app/");
    for k in 0..50 {
        a.put(format!("app/{k}"), format!("{k}"))
            .await
            .expect("put");
        a.put(format!("other/{k}"), "x").await.expect("put");
    }
    a.delete("app/0").await.expect("delete");
    let mut seen = 0;
    let deadline = Duration::from_secs(20);
    let got = tokio::time::timeout(deadline, async {
        while let Some(change) = w.next().await.transpose().expect("the watch keeps up") {
            assert!(
                change.key.starts_with("app/"),
                "only its prefix: {}",
                change.key
            );
            seen += 1;
            if seen == 51 {
                break;
            }
        }
        seen
    })
    .await
    .expect("watch delivers within the deadline");
    assert_eq!(got, 51);
    // Resume from a revision: replays what came after it.
    let from = w.revision().saturating_sub(10);
    let mut resumed = b
        .watch_from("app/", from)
        .await
        .expect("revision still in the log");
    let first = tokio::time::timeout(deadline, resumed.next())
        .await
        .expect("in time")
        .expect("a change")
        .expect("no error");
    assert!(first.revision > from);
    a.shutdown().await.expect("shutdown");
    b.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_no_acknowledged_write() {
    let (_, group) = random_group();
    let receiver = Node::builder()
        .cluster("t-drain")
        .group(group.into())
        .interface("127.0.0.1")
        .node_id(NodeId(2))
        .inject_receive_loss(0.2, 7)
        .start()
        .await
        .expect("receiver starts");
    let writer = start("t-drain", group, 1).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while writer.members().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for k in 0..500 {
        writer
            .put(format!("d/{k:03}"), vec![b'v'; 200])
            .await
            .expect("put");
    }
    // Shut down at once: the writer must stay until the receiver has everything, repairing
    // what the 20 % injected loss took, before it says goodbye.
    writer.shutdown().await.expect("shutdown");
    let deadline = Instant::now() + Duration::from_secs(2);
    while receiver.scan("d/").len() < 500 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        receiver.scan("d/").len(),
        500,
        "every acknowledged write reached the receiver"
    );
    assert!(
        receiver.counters().driver.injected_drops > 0,
        "loss was injected"
    );
    receiver.shutdown().await.expect("shutdown");
}
