//! The Chorus runs: nodes on the loopback group, a pipelined writer, watching receivers, and
//! the late-joiner measurement.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};

use super::Figures;
use super::clock::{HEADER, nanos, now_ns, slot, stamp, tokio_at};
use super::tally::{Bounds, Tally};

/// How long a Chorus sender waits for its receivers to show up as members.
pub(super) const MEMBER_WAIT: Duration = Duration::from_secs(10);

/// Puts `messages` stamped values of `size` bytes under `bench/` (1024 keys, overwritten in
/// turn), paced at `rate` if given, until `deadline` ([`now_ns`]). Returns the puts done.
pub(super) async fn send(
    sender: &chorus::Node,
    size: usize,
    messages: usize,
    deadline: u64,
    rate: Option<u64>,
) -> anyhow::Result<u64> {
    // The writer is a task on the runtime, as an application's would be (and as the
    // receivers are): from `block_on`'s thread every put and every reply would cross
    // threads (a futex wake each).
    let sender = sender.clone();
    tokio::spawn(async move { write(&sender, size, messages, deadline, rate).await }).await?
}

/// The write loop of [`send`].
async fn write(
    sender: &chorus::Node,
    size: usize,
    messages: usize,
    deadline: u64,
    rate: Option<u64>,
) -> anyhow::Result<u64> {
    let deadline = tokio_at(deadline);
    let t0 = tokio::time::Instant::now();
    // Up to 32 writes in flight: a put returns once applied locally and queued, so a
    // pipelined sender measures the protocol rather than one round trip per message.
    let sent = futures_util::stream::iter(0..messages as u64)
        .take_while(|_| std::future::ready(tokio::time::Instant::now() < deadline))
        .map(|seq| async move {
            if let Some(at) = slot(t0, seq, rate) {
                tokio::time::sleep_until(at).await;
            }
            let mut payload = vec![0x5Au8; size.max(HEADER)];
            stamp(&mut payload, seq);
            sender
                .put(format!("bench/{}", seq % 1024), bytes::Bytes::from(payload))
                .await
        })
        .buffer_unordered(32)
        .try_fold(0u64, |n, _| std::future::ready(Ok(n + 1)))
        .await?;
    Ok(sent)
}

/// Counts the stamped values `watch` (on `node`, prefix `bench/`) yields until `bounds` say
/// stop or the node stops.
///
/// A watch that falls behind the node's change log ends with an error. The changes it missed
/// were applied all the same: the receiver then counts them from the node's revision (as
/// `unobserved`, without latency), says so on stderr and watches on from the current revision.
pub(super) async fn receive(node: chorus::Node, mut watch: chorus::Watch, bounds: Bounds) -> Tally {
    let mut tally = Tally::new();
    let started = now_ns();
    while !bounds.done(&tally, started) {
        let until = tokio_at(bounds.wake(&tally, started));
        match tokio::time::timeout_at(until, watch.next()).await {
            Ok(Some(Ok(change))) => {
                if let Some(value) = change.value.as_deref() {
                    tally.record(value);
                }
            }
            Ok(None) => {
                tally.stop = "node-stopped";
                return tally;
            }
            Ok(Some(Err(e))) => {
                let from = watch.revision();
                eprintln!(
                    "bench: the watch ended after {} changes ({e}); counting the changes \
                     it missed from the node's revision and watching on",
                    tally.count
                );
                watch = node.watch("bench/");
                let missed = watch.revision().saturating_sub(from);
                tally.count += missed;
                tally.unobserved += missed;
                tally.last_at = now_ns();
            }
            Err(_) => {}
        }
    }
    tally.stop = bounds.reason(&tally);
    tally
}

/// The NAK and repair counters of `node` as `RESULT` fields.
pub(super) fn repair_fields(node: &chorus::Node) -> [(&'static str, String); 2] {
    let protocol = node.counters().protocol;
    [
        ("naks_sent", protocol.naks_sent.to_string()),
        ("repairs_sent", protocol.repairs_sent.to_string()),
    ]
}

/// Chorus: one sender node and `receivers` receiver nodes in this process, all on the loopback
/// group; each receiver watches the keys and measures latency from the stamped values.
///
/// # Errors
/// When a node cannot start or the members do not find each other within ten seconds.
pub async fn measure(
    group: SocketAddrV4,
    size: usize,
    receivers: usize,
    messages: usize,
    loss: f64,
    max: Duration,
    rate: Option<u64>,
) -> anyhow::Result<Figures> {
    let cluster = format!("bench-{:016x}", rand::random::<u64>());
    let start_node = |id: u64, lossy: bool| {
        let mut b = chorus::Node::builder()
            .cluster(&cluster)
            .group(SocketAddr::V4(group))
            .interface("127.0.0.1")
            .ttl(0)
            .node_id(chorus::NodeId(id));
        if lossy && loss > 0.0 {
            b = b.inject_receive_loss(loss, id);
        }
        b.start()
    };
    let mut nodes = Vec::new();
    for i in 0..receivers {
        nodes.push(start_node(i as u64 + 2, true).await?);
    }
    let sender = start_node(1, false).await?;
    let all_nodes: Vec<chorus::Node> = nodes.iter().cloned().chain([sender.clone()]).collect();
    let result = async {
        let members_deadline = Instant::now() + MEMBER_WAIT;
        while all_nodes.iter().any(|n| n.members().len() < receivers + 1) {
            if Instant::now() > members_deadline {
                anyhow::bail!("the bench nodes did not see each other within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deadline = now_ns().saturating_add(nanos(max));
        let bounds = Bounds {
            expect: messages as u64,
            deadline,
            idle: None,
            idle_before_first: false,
        };
        let tasks: Vec<_> = nodes
            .iter()
            .map(|node| tokio::spawn(receive(node.clone(), node.watch("bench/"), bounds)))
            .collect();
        let start = now_ns();
        let sent = send(&sender, size, messages, deadline, rate).await?;
        let mut tallies = Vec::new();
        for t in tasks {
            tallies.push(t.await?);
        }
        let unobserved: u64 = tallies.iter().map(|t| t.unobserved).sum();
        if unobserved > 0 {
            eprintln!(
                "  note: {unobserved} of the changes delivered were applied but not seen by the \
                 receivers' watches (they fell behind the change log); they count as delivered \
                 but have no latency"
            );
        }
        let mut figures = Figures::from_tallies(sent, start, &tallies);
        // Counter snapshots are refreshed every 100 ms.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let sum = |field: fn(&chorus::Counters) -> u64| {
            all_nodes.iter().map(|n| field(&n.counters())).sum::<u64>()
        };
        // Delivered = the writes each receiver's replication layer got from the protocol
        // (exactly once each). A watch can see fewer: when anti-entropy brings a key's newer
        // value first, the older in-flight writes of that key arrive stale and are not changes
        // of the store (last writer wins), so no watch reports them.
        let protocol_delivered: u64 = nodes
            .iter()
            .map(|n| n.counters().replication.remote_writes.min(sent))
            .sum();
        let watched = figures.delivered;
        if protocol_delivered > watched {
            figures.delivered = protocol_delivered;
            eprintln!(
                "  note: every receiver's replication layer got {protocol_delivered} of {} \
                 writes from the protocol; the watches saw {watched} of them as changes (the \
                 rest were superseded by a newer value of the same key that anti-entropy \
                 brought first: {} entries); latency is measured on what the watches saw",
                sent * nodes.len() as u64,
                sum(|c| c.replication.entries_received),
            );
        }
        if figures.delivered < sent * nodes.len() as u64 {
            let stops: Vec<&str> = tallies.iter().map(|t| t.stop).collect();
            eprintln!(
                "  note: not every receiver got every message (stopped by: {stops:?}); \
                 messages the protocol gave up as lost: {}",
                sum(|c| c.protocol.lost_messages),
            );
            if std::env::var_os("CHORUS_BENCH_DEBUG").is_some() {
                for n in &all_nodes {
                    let c: Vec<_> = n.counters().iter().filter(|(_, v)| *v > 0).collect();
                    eprintln!("  node {}: {c:?}", n.node_id().0);
                }
            }
        }
        figures.repairs = Some(sum(|c| c.protocol.repairs_sent));
        figures.naks = Some(sum(|c| c.protocol.naks_sent));
        Ok(figures)
    }
    .await;
    for n in &all_nodes {
        let _ = n.shutdown().await;
    }
    result
}

/// Late joiner: one node writes `keys` keys of `size` bytes, then a second node starts.
/// Returns (seconds the writes took, seconds from the joiner's start until it holds every key,
/// keys it holds at the end).
///
/// # Errors
/// When a node cannot start or a write fails.
pub async fn late_join(
    group: SocketAddrV4,
    keys: usize,
    size: usize,
    max: Duration,
) -> anyhow::Result<(f64, f64, u64)> {
    let cluster = format!("bench-join-{:016x}", rand::random::<u64>());
    let start_node = |id: u64| {
        chorus::Node::builder()
            .cluster(&cluster)
            .group(SocketAddr::V4(group))
            .interface("127.0.0.1")
            .ttl(0)
            .node_id(chorus::NodeId(id))
            .start()
    };
    let writer = start_node(1).await?;
    let value = bytes::Bytes::from(vec![0x3Cu8; size]);
    let t = Instant::now();
    // Batches of 64 puts, 8 batches in flight: the load phase is not what is measured.
    futures_util::stream::iter(
        (0..keys)
            .collect::<Vec<_>>()
            .chunks(64)
            .map(<[usize]>::to_vec),
    )
    .map(|chunk| {
        let ops = chunk
            .iter()
            .map(|i| chorus::Op::put(format!("join/{i:08}"), value.clone()))
            .collect();
        writer.batch(ops)
    })
    .buffer_unordered(8)
    .try_for_each(|_| std::future::ready(Ok(())))
    .await?;
    let write_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let joiner = start_node(2).await?;
    let deadline = t + max;
    let mut held = 0u64;
    while Instant::now() < deadline {
        held = joiner.revision();
        if held >= keys as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let join_secs = t.elapsed().as_secs_f64();
    let held_keys = joiner.scan("join/").len() as u64;
    if held < keys as u64 {
        eprintln!("late joiner: {held} of {keys} after {join_secs:.1} s (bound)");
    }
    let _ = joiner.shutdown().await;
    let _ = writer.shutdown().await;
    Ok((write_secs, join_secs, held_keys))
}
