//! `Node::snapshot` and `Node::restore` over the in-memory transport (`MemoryHub`): a snapshot
//! is a state the store really had even under concurrent batches; restoring an older snapshot
//! by version changes nothing newer; `ForceNewer` overwrites; a restore by version reaches the
//! other nodes with the original versions (pushed, not left to anti-entropy), flags and owners
//! included.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chorus::transport::{HubConfig, MemoryHub};
use chorus::{Node, NodeId, Op, PutMeta, RestoreMode, StoredEntry};

fn addr(net: u8, i: u8) -> SocketAddr {
    SocketAddr::from(([10, 11, net, i], 7400))
}

async fn start(hub: &MemoryHub, net: u8, i: u8) -> Node {
    let transport = hub.endpoint(addr(net, i)).expect("endpoint");
    Node::builder()
        .cluster("backup")
        .node_id(NodeId(u64::from(i)))
        .start_with_transport(transport)
        .await
        .expect("node starts")
}

async fn wait_members(nodes: &[&Node]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes.iter().any(|n| n.members().len() < nodes.len()) {
        assert!(Instant::now() < deadline, "members never met");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_a_state_the_store_had_under_concurrent_batches() {
    let hub = MemoryHub::new(HubConfig::default()).expect("hub");
    let node = start(&hub, 1, 1).await;
    // Enough keys that the walk takes several steps, with the two keys every batch writes
    // at the two ends of the key order.
    for chunk in 0..10 {
        let ops = (0..1000)
            .map(|i| Op::put(format!("m/{chunk:02}/{i:04}"), "filler"))
            .collect();
        node.batch(ops).await.expect("filler");
    }
    node.batch(vec![Op::put("a/first", "0"), Op::put("z/last", "0")])
        .await
        .expect("batch");
    // The writer runs until five snapshots were taken during its writes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (node, stop) = (node.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                node.batch(vec![
                    Op::put("a/first", n.to_string()),
                    Op::put("m/05/0500", n.to_string()),
                    Op::put("z/last", n.to_string()),
                ])
                .await
                .expect("batch");
            }
            n
        })
    };
    let mut last_revision = 0;
    let mut values = std::collections::BTreeSet::new();
    for _ in 0..5 {
        let s = node.snapshot().await.expect("snapshot");
        assert!(s.revision >= last_revision);
        last_revision = s.revision;
        let get = |k: &str| {
            s.entries
                .binary_search_by(|(key, _)| key.as_str().cmp(k))
                .map(|i| s.entries[i].1.clone())
                .expect("key in the snapshot")
        };
        let (first, middle, last) = (get("a/first"), get("m/05/0500"), get("z/last"));
        assert_eq!(
            first.value, last.value,
            "half a batch at revision {}",
            s.revision
        );
        assert_eq!(
            first.value, middle.value,
            "half a batch at revision {}",
            s.revision
        );
        assert_eq!(first.version, last.version);
        assert!(s.entries.iter().all(|(_, e)| e.revision <= s.revision));
        assert!(
            s.entries.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted by key"
        );
        assert_eq!(s.entries.len(), 10_002);
        values.insert(first.value);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let batches = writer.await.expect("writer");
    // The final snapshot is the store exactly.
    let s = node.snapshot().await.expect("snapshot");
    assert_eq!(s.revision, node.revision());
    let live: Vec<(String, bytes::Bytes)> = node
        .scan("")
        .into_iter()
        .map(|(k, e)| (k, e.value))
        .collect();
    let snap: Vec<(String, bytes::Bytes)> = s
        .entries
        .into_iter()
        .filter_map(|(k, e)| Some((k, e.value?)))
        .collect();
    assert_eq!(snap, live);
    assert!(
        values.len() >= 2,
        "the snapshots saw the writes progress ({batches} batches): {values:?}"
    );
    node.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_an_older_snapshot_changes_nothing_newer_and_force_newer_overwrites() {
    let hub = MemoryHub::new(HubConfig::default()).expect("hub");
    let node = start(&hub, 2, 1).await;
    node.put("k/x", "1").await.expect("put");
    node.put("k/y", "1").await.expect("put");
    node.put("k/z", "1").await.expect("put");
    node.delete("k/z").await.expect("delete");
    let backup = node.snapshot().await.expect("snapshot");
    assert_eq!(backup.entries.len(), 3);
    let x2 = node.put("k/x", "2").await.expect("put");
    node.delete("k/y").await.expect("delete");
    let revision = node.revision();

    let report = node
        .restore(backup.entries.clone(), RestoreMode::ByVersion)
        .await
        .expect("restore");
    assert_eq!((report.applied, report.skipped_older), (0, 3));
    assert_eq!(node.revision(), revision, "nothing changed");
    assert_eq!(
        node.get("k/x").map(|e| (e.value, e.version)),
        Some(("2".into(), x2))
    );
    assert!(node.get("k/y").is_none(), "a newer delete is not undone");

    let report = node
        .restore(backup.entries, RestoreMode::ForceNewer)
        .await
        .expect("restore");
    assert_eq!((report.applied, report.skipped_older), (3, 0));
    let x = node.get("k/x").expect("restored");
    assert_eq!(x.value, "1");
    assert!(x.version > x2);
    assert_eq!(node.get("k/y").map(|e| e.value), Some("1".into()));
    assert!(
        node.get("k/z").is_none(),
        "a tombstone restores as a delete"
    );

    // Bad input is refused and changes nothing.
    let revision = node.revision();
    let mut bad = node.snapshot().await.expect("snapshot").entries;
    bad[0].1.owner = Some(chorus::Owner {
        node: NodeId(77),
        incarnation: 1,
    });
    let err = node
        .restore(bad, RestoreMode::ByVersion)
        .await
        .expect_err("an owner that is not the writer");
    assert!(matches!(err, chorus::Error::Replication(_)), "{err}");
    assert_eq!(node.revision(), revision);
    node.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_by_version_reaches_the_other_nodes_with_the_original_versions() {
    // The backup comes from a cluster of its own (node 9, on another hub).
    let other = MemoryHub::new(HubConfig::default()).expect("hub");
    let source = start(&other, 3, 9).await;
    let mut ops: Vec<Op> = (0..600)
        .map(|i| Op::put(format!("cfg/{i:04}"), vec![b'v'; 200]))
        .collect();
    ops.push(Op::put_with(
        "svc/owned",
        "addr",
        PutMeta {
            flags: 42,
            owned: true,
        },
    ));
    node_batches(&source, ops).await;
    source.delete("cfg/0000").await.expect("delete");
    let backup = source.snapshot().await.expect("snapshot");
    source.shutdown().await.expect("shutdown");
    let originals: Vec<(String, StoredEntry)> = backup.entries.clone();

    let hub = MemoryHub::new(HubConfig::default()).expect("hub");
    let (a, b) = (start(&hub, 4, 1).await, start(&hub, 4, 2).await);
    wait_members(&[&a, &b]).await;
    a.wait_in_sync(Duration::from_secs(10))
        .await
        .expect("a in sync");
    b.wait_in_sync(Duration::from_secs(10))
        .await
        .expect("b in sync");

    let started = Instant::now();
    let report = a
        .restore(backup.entries, RestoreMode::ByVersion)
        .await
        .expect("restore");
    assert_eq!((report.applied, report.skipped_older), (originals.len(), 0));
    // b holds every entry with its original version, metadata and tombstone, in less time
    // than a sync round (5 s, jittered) takes. That the restore pushes them (rather than
    // leaving them to anti-entropy) is tested on the replica (`crates/replication/tests/
    // restore.rs`).
    let held = |n: &Node, k: &str, e: &StoredEntry| match &e.value {
        Some(v) => n.get(k).is_some_and(|got| {
            got.value == *v
                && got.version == e.version
                && got.flags == e.flags
                && got.owner == e.owner
        }),
        None => n.get(k).is_none(),
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while !originals.iter().all(|(k, e)| held(&b, k, e)) {
        assert!(
            Instant::now() < deadline,
            "b did not get the restored entries within 3 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    assert!(originals.iter().all(|(k, e)| held(&a, k, e)));
    let owned = b.get("svc/owned").expect("restored");
    assert_eq!(owned.version.node, 9);
    assert_eq!(owned.owner.map(|o| o.node), Some(NodeId(9)));
    let b_snapshot = b.snapshot().await.expect("snapshot");
    let tomb = b_snapshot
        .entries
        .iter()
        .find(|(k, _)| k == "cfg/0000")
        .expect("the tombstone reached b");
    assert!(tomb.1.is_tombstone());
    assert_eq!(
        tomb.1.version,
        originals
            .iter()
            .find(|(k, _)| k == "cfg/0000")
            .expect("in the backup")
            .1
            .version
    );
    eprintln!("b held every restored entry {took:?} after the restore started");
    a.shutdown().await.expect("shutdown");
    b.shutdown().await.expect("shutdown");
}

async fn node_batches(node: &Node, ops: Vec<Op>) {
    let mut ops = ops.into_iter().peekable();
    while ops.peek().is_some() {
        let chunk: Vec<Op> = ops.by_ref().take(100).collect();
        node.batch(chunk).await.expect("batch");
    }
}
