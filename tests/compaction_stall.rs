//! Measurement for `docs/performance.md` (compaction and heartbeats): two `Node`s on the
//! loopback (127.0.0.1, TTL 0, a group of their own), one with a data directory; 1 M keys
//! are written to it and overwritten until its log is just short of the compaction threshold
//! with all of them in the store. After the peer caught up, a trickle of writes (a batch of
//! 1000 every 20 ms) crosses the threshold, so a snapshot of 1 M keys is written, and the
//! heartbeats are timed from then until 2 s after it is installed. A passive socket on
//! the group decodes every datagram and timestamps the durable node's heartbeats (both nodes
//! send from the same address: the sender is told by the node id in the header): the longest
//! gap between two, against the 200 ms heartbeat interval, is the longest heartbeat delay;
//! the peer's `protocol_members_suspected` says whether it ever suspected the node.
//!
//! Not a timed assertion; run in release:
//! `cargo test --release -p chorus --test compaction_stall -- --ignored --nocapture`
//! (`CHORUS_BENCH_DIR` picks the file system; default the system temp dir).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chorus::{Node, Op};
use chorus_protocol::proto::frame::Kind;
use chorus_protocol::{ClusterId, NodeId};
use chorus_transport::{DatagramTransport, Received, TransportConfig, UdpTransport};

const KEYS: u64 = 1_000_000;
const BATCH: u64 = 1000;

fn counter(node: &Node, name: &str) -> u64 {
    node.counters().get(name).unwrap_or(0)
}

/// Timestamps every heartbeat of node `from` on `group` until `stop`; returns the five
/// longest gaps between two of them with when each ended (since `t0`), longest first, and
/// how many heartbeats it saw.
fn observe(
    group: SocketAddr,
    from: NodeId,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> std::thread::JoinHandle<(Vec<(Duration, Duration)>, u64)> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut config = TransportConfig::loopback_multicast(group);
            config.recv_buffer = Some(64 << 20);
            let t = UdpTransport::bind(config).unwrap();
            let mut buf: Vec<Received> = Vec::with_capacity(64);
            let (mut last, mut gaps, mut n) = (None, Vec::<(Duration, Duration)>::new(), 0);
            while !stop.load(Ordering::Relaxed) {
                let got =
                    tokio::time::timeout(Duration::from_millis(50), t.recv_batch(&mut buf, 64))
                        .await;
                let now = Instant::now();
                if let Ok(Ok(_)) = got {
                    for d in buf.drain(..) {
                        let cluster = ClusterId::from_name("compaction-stall");
                        let Ok((header, frame)) =
                            chorus_protocol::wire::decode(&d.payload, 1 << 21, cluster)
                        else {
                            continue;
                        };
                        if header.node != from || !matches!(frame.kind, Some(Kind::Heartbeat(_))) {
                            continue;
                        }
                        n += 1;
                        if let Some(prev) = last {
                            gaps.push((now - prev, now - t0));
                            if gaps.len() > 64 {
                                gaps.sort_by_key(|g| std::cmp::Reverse(g.0));
                                gaps.truncate(5);
                            }
                        }
                        last = Some(now);
                    }
                }
            }
            gaps.sort_by_key(|g| std::cmp::Reverse(g.0));
            gaps.truncate(5);
            (gaps, n)
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement: run explicitly in release"]
async fn compaction_of_a_million_keys_and_heartbeats() {
    let base = std::env::var_os("CHORUS_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = base.join(format!("chorus-compaction-stall-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let group = SocketAddr::from(([239, 255, 93, 7], 17_893));
    let start = |id: u64, data: Option<&PathBuf>| {
        let mut b = Node::builder()
            .cluster("compaction-stall")
            .group(group)
            .interface("127.0.0.1")
            .ttl(0)
            .node_id(NodeId(id));
        if let Some(d) = data {
            b = b.data_dir(d);
        }
        b.start()
    };
    let durable = start(1, Some(&dir)).await.expect("durable node");
    let peer = start(2, None).await.expect("peer");
    let met = Instant::now();
    while peer.members().len() < 2 || durable.members().len() < 2 {
        assert!(
            met.elapsed() < Duration::from_secs(10),
            "the nodes never met"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let from = NodeId(1);
    let value = bytes::Bytes::from(vec![b'v'; 100]);
    let batch = |from: u64| -> Vec<Op> {
        (0..BATCH)
            .map(|i| Op::put(format!("key/{:07}", (from + i) % KEYS), value.clone()))
            .collect()
    };
    // Fill: 1 M keys, then overwrites, until the log is one batch-second short of the
    // compaction threshold (4 × the snapshot, at least 8 MiB) with every key in the store.
    let mut written = 0u64;
    loop {
        durable.batch(batch(written)).await.expect("batch");
        written += BATCH;
        if written < KEYS {
            continue;
        }
        let wal = counter(&durable, "durable_wal_bytes");
        let threshold = (4 * counter(&durable, "durable_snapshot_bytes")).max(8 << 20);
        if wal + (4 << 20) >= threshold {
            break;
        }
        assert!(written < 6 * KEYS, "the log never neared its threshold");
    }
    let snapshots = counter(&durable, "durable_snapshots");
    // Settle (the peer catches up), then watch: a trickle of one batch every 20 ms crosses
    // the threshold, the compaction runs, and the heartbeats are timed meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t0 = Instant::now();
    let suspected_before = counter(&peer, "protocol_members_suspected");
    let stop = Arc::new(AtomicBool::new(false));
    let observer = observe(group, from, stop.clone(), t0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut slowest_batch = Duration::ZERO;
    let mut installed_at = None;
    while t0.elapsed() < Duration::from_secs(60) {
        let b = Instant::now();
        durable.batch(batch(written)).await.expect("batch");
        slowest_batch = slowest_batch.max(b.elapsed());
        written += BATCH;
        if counter(&durable, "durable_snapshots") > snapshots {
            installed_at = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (gaps, heartbeats) = observer.join().unwrap();
    let suspected = counter(&peer, "protocol_members_suspected") - suspected_before;
    println!(
        "{written} writes of 100 B ({KEYS} keys), batches of {BATCH}, fsync always; the \
         snapshot of {} bytes installed {:?} after the watch began",
        counter(&durable, "durable_snapshot_bytes"),
        installed_at
    );
    println!(
        "while it compacted: longest gaps between heartbeats of the durable node (ms, ending \
         at s): {:?} (heartbeat every 200 ms, suspicion after 1500 ms) over {heartbeats} \
         heartbeats; slowest acknowledged batch {:.0} ms; the peer suspected it {suspected} \
         times",
        gaps.iter()
            .map(|(g, at)| (g.as_millis(), (at.as_secs_f64() * 10.0).round() / 10.0))
            .collect::<Vec<_>>(),
        slowest_batch.as_secs_f64() * 1e3,
    );
    durable.shutdown().await.expect("shutdown");
    peer.shutdown().await.expect("shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}
