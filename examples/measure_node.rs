//! Measures the `Node` API over real loopback multicast (127.0.0.1, TTL 0): puts per second,
//! watch latency from a put on one node to the change event on another, and how long a late
//! joiner takes to catch up 10 000 and 100 000 keys. Prints a markdown table.
//!
//! Run with `cargo run --release --example measure_node`. Bounded: every phase has a
//! deadline, and the whole run takes well under a minute.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chorus::{Node, NodeId, Op};
use futures_util::StreamExt;

async fn start(port: u16, id: u64) -> Result<Node, chorus::Error> {
    let group = SocketAddr::from(([239, 255, 93, 1], port));
    Node::builder()
        .cluster("measure-node")
        .group(group)
        .interface("127.0.0.1")
        .ttl(0)
        .node_id(NodeId(id))
        .start()
        .await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn wait_for(deadline: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if done() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

#[tokio::main]
async fn main() -> Result<(), chorus::Error> {
    let mut rows: Vec<(String, String)> = Vec::new();

    // Puts per second: one writer, two peers applying every write.
    let a = start(17_801, 1).await?;
    let b = start(17_801, 2).await?;
    let c = start(17_801, 3).await?;
    wait_for(Duration::from_secs(5), || a.members().len() == 3).await;
    let n = 20_000;
    let t = Instant::now();
    for i in 0..n {
        a.put(format!("p/{i:06}"), vec![b'x'; 100]).await?;
    }
    let local = t.elapsed();
    let replicated = wait_for(Duration::from_secs(30), || {
        b.scan("p/").len() == n && c.scan("p/").len() == n
    })
    .await;
    rows.push((
        "puts/s, one writer, 100 B values (acknowledged locally)".into(),
        format!("{:.0}", n as f64 / local.as_secs_f64()),
    ));
    match replicated {
        Some(_) => rows.push((
            "puts/s until both peers applied all 20 000".into(),
            format!("{:.0}", n as f64 / t.elapsed().as_secs_f64()),
        )),
        None => rows.push((
            "puts/s until both peers applied all 20 000".into(),
            "did not finish in 30 s".into(),
        )),
    }

    // Watch latency: put on a, change event on b, one at a time.
    let mut watch = b.watch("lat/");
    let mut samples = Vec::new();
    for i in 0..500 {
        let t = Instant::now();
        a.put(format!("lat/{i}"), "v").await?;
        match tokio::time::timeout(Duration::from_secs(2), watch.next()).await {
            Ok(Some(Ok(_))) => samples.push(t.elapsed()),
            _ => break,
        }
    }
    samples.sort();
    rows.push((
        format!(
            "watch latency p50 / p99 ({} samples, put on A → event on B)",
            samples.len()
        ),
        format!(
            "{:?} / {:?}",
            percentile(&samples, 0.5),
            percentile(&samples, 0.99)
        ),
    ));
    for node in [&a, &b, &c] {
        node.shutdown().await?;
    }

    // Late joiner catch-up.
    for (keys, port) in [(10_000usize, 17_802u16), (100_000, 17_803)] {
        let a = start(port, 1).await?;
        let ops: Vec<Op> = (0..keys)
            .map(|i| Op::put(format!("k/{i:06}"), vec![b'y'; 100]))
            .collect();
        for chunk in ops.chunks(256) {
            a.batch(chunk.to_vec()).await?;
        }
        let t = Instant::now();
        let joiner = start(port, 9).await?;
        let caught_up = wait_for(Duration::from_secs(60), || joiner.scan("k/").len() == keys).await;
        let in_sync = joiner
            .wait_in_sync(Duration::from_secs(10))
            .await
            .map(|()| t.elapsed());
        rows.push((
            format!(
                "late joiner catches up {keys} keys of 100 B (all keys present / reports in sync)"
            ),
            format!(
                "{} / {}",
                caught_up.map_or("not within 60 s".into(), |d| format!("{d:?}")),
                in_sync.map_or("not within 10 s more".into(), |d| format!("{d:?}")),
            ),
        ));
        joiner.shutdown().await?;
        a.shutdown().await?;
    }

    println!("| measurement | figure |\n|---|---:|");
    for (what, figure) in rows {
        println!("| {what} | {figure} |");
    }
    Ok(())
}
