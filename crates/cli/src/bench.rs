//! `chorus bench`: one sender and N receivers over loopback multicast, Chorus against raw UDP.
//!
//! Every payload carries its sequence number and send time; receivers measure one-way latency
//! against the same process clock. Raw UDP is plain `send_to`/`recv_from` on a multicast socket,
//! no protocol: what it loses stays lost, so its delivered share is reported next to the rate.
//! All traffic is on 127.0.0.1 with TTL 0, bounded in count and time.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

/// Bytes at the start of every payload: sequence number then send time (ns since the run start).
pub const HEADER: usize = 16;

/// What one measurement found.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Messages sent.
    pub sent: u64,
    /// Messages delivered, summed over receivers.
    pub delivered: u64,
    /// Receivers.
    pub receivers: u64,
    /// Seconds from the first send to the last delivery.
    pub secs: f64,
    /// Latency percentiles in microseconds (p50, p99).
    pub p50_us: f64,
    /// 99th percentile latency in microseconds.
    pub p99_us: f64,
    /// Repairs sent (Chorus only).
    pub repairs: Option<u64>,
    /// NAKs sent (Chorus only).
    pub naks: Option<u64>,
}

impl Figures {
    /// Delivered messages per second per receiver.
    pub fn msgs_per_sec(&self) -> f64 {
        if self.secs <= 0.0 || self.receivers == 0 {
            return 0.0;
        }
        self.delivered as f64 / self.receivers as f64 / self.secs
    }

    /// Share of the sent messages that each receiver got, on average.
    pub fn delivered_share(&self) -> f64 {
        if self.sent == 0 || self.receivers == 0 {
            return 0.0;
        }
        self.delivered as f64 / (self.sent * self.receivers) as f64
    }
}

/// Writes the sequence number and send time into the payload header.
pub fn stamp(buf: &mut [u8], seq: u64, base: Instant) {
    let nanos = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    buf[8..HEADER].copy_from_slice(&nanos.to_le_bytes());
}

/// Reads the header back: (sequence, latency). `None` for a payload too short.
pub fn unstamp(buf: &[u8], base: Instant) -> Option<(u64, Duration)> {
    let seq = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(buf.get(8..HEADER)?.try_into().ok()?);
    let now = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
    Some((seq, Duration::from_nanos(now.saturating_sub(sent))))
}

/// p50 and p99 of latencies, in microseconds.
pub fn percentiles(lat: &mut [Duration]) -> (f64, f64) {
    if lat.is_empty() {
        return (0.0, 0.0);
    }
    lat.sort_unstable();
    let at = |q: f64| {
        let i = ((lat.len() as f64 - 1.0) * q).round() as usize;
        lat[i.min(lat.len() - 1)].as_secs_f64() * 1e6
    };
    (at(0.50), at(0.99))
}

/// One receiver socket joined to `group` on the loopback.
fn raw_receiver(group: SocketAddrV4) -> std::io::Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    // Ask for a large buffer; the kernel caps it at rmem_max.
    let _ = sock.set_recv_buffer_size(8 * 1024 * 1024);
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port())).into())?;
    sock.join_multicast_v4(group.ip(), &Ipv4Addr::LOCALHOST)?;
    sock.set_nonblocking(true)?;
    UdpSocket::from_std(sock.into())
}

/// The sender socket: loopback interface, TTL 0, loop on.
fn raw_sender() -> std::io::Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_multicast_if_v4(&Ipv4Addr::LOCALHOST)?;
    sock.set_multicast_ttl_v4(0)?;
    sock.set_multicast_loop_v4(true)?;
    let _ = sock.set_send_buffer_size(8 * 1024 * 1024);
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).into())?;
    sock.set_nonblocking(true)?;
    UdpSocket::from_std(sock.into())
}

/// Raw UDP multicast: `messages` datagrams of `size` bytes to `receivers` sockets.
///
/// # Errors
/// When a socket cannot be made or joined.
pub async fn raw(
    group: SocketAddrV4,
    size: usize,
    receivers: usize,
    messages: usize,
    max: Duration,
    rate: Option<u64>,
) -> anyhow::Result<Figures> {
    let size = size.max(HEADER);
    let base = Instant::now();
    let deadline = tokio::time::Instant::now() + max;
    let mut tasks = Vec::new();
    for _ in 0..receivers {
        let sock = raw_receiver(group)?;
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; size.max(2048) + 64];
            let mut lat = Vec::with_capacity(messages);
            let mut last = base.elapsed();
            // Stop when everything arrived, when the run's time is up, or after 500 ms of silence.
            while lat.len() < messages {
                let idle = tokio::time::Instant::now() + Duration::from_millis(500);
                let until = idle.min(deadline);
                match tokio::time::timeout_at(until, sock.recv_from(&mut buf)).await {
                    Ok(Ok((n, _))) => {
                        if let Some((_, l)) = unstamp(&buf[..n], base) {
                            lat.push(l);
                            last = base.elapsed();
                        }
                    }
                    Ok(Err(_)) | Err(_) => break,
                }
            }
            (lat, last)
        }));
    }
    let sender = raw_sender()?;
    let target = SocketAddr::V4(group);
    let mut payload = vec![0xA5u8; size];
    let start = base.elapsed();
    let t0 = tokio::time::Instant::now();
    for seq in 0..messages as u64 {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        if let Some(at) = slot(t0, seq, rate) {
            tokio::time::sleep_until(at).await;
        }
        stamp(&mut payload, seq, base);
        sender.send_to(&payload, target).await?;
        if seq % 16 == 15 {
            // Two cores: let the receivers run, as a real sender would be paced by its work.
            tokio::task::yield_now().await;
        }
    }
    let mut all = Vec::new();
    let mut end = start;
    for t in tasks {
        let (lat, last) = t.await?;
        end = end.max(last);
        all.extend(lat);
    }
    let (p50, p99) = percentiles(&mut all);
    Ok(Figures {
        sent: messages as u64,
        delivered: all.len() as u64,
        receivers: receivers as u64,
        secs: (end - start).as_secs_f64(),
        p50_us: p50,
        p99_us: p99,
        repairs: None,
        naks: None,
    })
}

/// When message `seq` is due at a paced `rate` (messages per second) from `t0`.
fn slot(t0: tokio::time::Instant, seq: u64, rate: Option<u64>) -> Option<tokio::time::Instant> {
    let rate = rate.filter(|r| *r > 0)?;
    Some(t0 + Duration::from_nanos(seq.saturating_mul(1_000_000_000) / rate))
}

/// A random administratively-scoped group and port for one run.
pub fn pick_group(seed: u64, salt: u64) -> SocketAddrV4 {
    let x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(salt.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    let bytes = x.to_le_bytes();
    SocketAddrV4::new(
        Ipv4Addr::new(239, 255, bytes[0], bytes[1].max(1)),
        20_000 + (u16::from_le_bytes([bytes[2], bytes[3]]) % 30_000),
    )
}

/// Formats a table row.
pub fn row(name: &str, size: usize, f: &Figures) -> String {
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    format!(
        "| {name} | {size} | {:.0} | {:.2} | {:.1} % | {:.0} | {:.0} | {} | {} |",
        f.msgs_per_sec(),
        f.msgs_per_sec() * size as f64 / 1e6,
        f.delivered_share() * 100.0,
        f.p50_us,
        f.p99_us,
        opt(f.naks),
        opt(f.repairs),
    )
}

/// Chorus: one sender node and `receivers` receiver nodes in this process, all on the loopback
/// group; each receiver watches the keys and measures latency from the stamped values.
///
/// # Errors
/// When a node cannot start or the members do not find each other within ten seconds.
pub async fn chorus(
    group: SocketAddrV4,
    size: usize,
    receivers: usize,
    messages: usize,
    loss: f64,
    max: Duration,
    rate: Option<u64>,
) -> anyhow::Result<Figures> {
    let size = size.max(HEADER);
    let base = Instant::now();
    let cluster = format!("bench-{:016x}", rand::random::<u64>());
    let start_node = |id: u64, lossy: bool| {
        let mut b = chorus::Node::builder()
            .cluster(&cluster)
            .group(SocketAddr::V4(group))
            .interface("127.0.0.1")
            .ttl(0)
            .node_id(id);
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
        let members_deadline = Instant::now() + Duration::from_secs(10);
        while all_nodes.iter().any(|n| n.members().len() < receivers + 1) {
            if Instant::now() > members_deadline {
                anyhow::bail!("the bench nodes did not see each other within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deadline = tokio::time::Instant::now() + max;
        let mut tasks = Vec::new();
        for node in &nodes {
            let mut w = node.watch("bench/");
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(messages);
                let mut last = base.elapsed();
                while lat.len() < messages {
                    match tokio::time::timeout_at(deadline, w.next()).await {
                        Ok(Some(change)) => {
                            if let Some((_, l)) =
                                change.value.as_deref().and_then(|v| unstamp(v, base))
                            {
                                lat.push(l);
                                last = base.elapsed();
                            }
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                (lat, last)
            }));
        }
        let start = base.elapsed();
        let t0 = tokio::time::Instant::now();
        // Up to 32 writes in flight: a put returns once applied locally and queued, so a
        // pipelined sender measures the protocol rather than one round trip per message.
        let sent = futures_util::stream::iter(0..messages as u64)
            .take_while(|_| std::future::ready(tokio::time::Instant::now() < deadline))
            .map(|seq| {
                let sender = &sender;
                async move {
                    if let Some(at) = slot(t0, seq, rate) {
                        tokio::time::sleep_until(at).await;
                    }
                    let mut payload = vec![0x5Au8; size];
                    stamp(&mut payload, seq, base);
                    sender
                        .put(format!("bench/{}", seq % 1024), bytes::Bytes::from(payload))
                        .await
                }
            })
            .buffer_unordered(32)
            .try_fold(0u64, |n, _| std::future::ready(Ok(n + 1)))
            .await?;
        let mut all = Vec::new();
        let mut end = start;
        for t in tasks {
            let (lat, last) = t.await?;
            end = end.max(last);
            all.extend(lat);
        }
        let (p50, p99) = percentiles(&mut all);
        let counters: Vec<_> = all_nodes
            .iter()
            .map(|n| n.counters().into_iter().collect())
            .collect();
        let sum = |name: &str| {
            counters
                .iter()
                .map(|c| crate::demo::counter(c, name))
                .sum::<u64>()
        };
        Ok(Figures {
            sent,
            delivered: all.len() as u64,
            receivers: receivers as u64,
            secs: (end - start).as_secs_f64(),
            p50_us: p50,
            p99_us: p99,
            repairs: Some(sum("repairs_sent")),
            naks: Some(sum("naks_sent")),
        })
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
            .node_id(id)
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
            .map(|i| chorus::Op::Put {
                key: format!("join/{i:08}"),
                value: value.clone(),
            })
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

/// `chorus bench`: prints a markdown table.
pub fn run(args: &crate::cli::BenchArgs) -> anyhow::Result<()> {
    if args.receivers == 0 || args.messages == 0 {
        anyhow::bail!("--receivers and --messages must be at least 1");
    }
    if !(0.0..0.9).contains(&args.loss) {
        anyhow::bail!("--loss must be in 0.0..0.9");
    }
    if args.sizes.iter().any(|&s| s > 60_000) {
        anyhow::bail!("payload sizes above 60000 bytes do not fit one raw UDP datagram");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let max = Duration::from_secs(args.max_secs.max(1));
    if let Some(keys) = args.late_join {
        let size = args.sizes.first().copied().unwrap_or(100);
        let (write, join, held) =
            runtime.block_on(late_join(pick_group(seed, 99), keys, size, max))?;
        println!(
            "late joiner: {keys} keys of {size} B written in {write:.2} s; the joiner held \
             {held} of them {join:.2} s after it started (loopback)"
        );
        return Ok(());
    }
    eprintln!(
        "bench: 1 sender, {} receivers, {} messages per size, loopback multicast TTL 0{}",
        args.receivers,
        args.messages,
        if args.loss > 0.0 {
            format!(
                ", {:.0} % receive loss on Chorus receivers",
                args.loss * 100.0
            )
        } else {
            String::new()
        }
    );
    let mut lines = vec![
        "| transport | payload B | msgs/s per receiver | MB/s per receiver | delivered | p50 µs | p99 µs | NAKs | repairs |".to_string(),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|".to_string(),
    ];
    let mut ratios = Vec::new();
    for (i, &size) in args.sizes.iter().enumerate() {
        let salt = i as u64 * 2;
        eprintln!("  {size} B: raw UDP ...");
        let raw = runtime.block_on(raw(
            pick_group(seed, salt),
            size,
            args.receivers,
            args.messages,
            max,
            args.rate,
        ))?;
        lines.push(row("raw UDP", size, &raw));
        if !args.raw_only {
            eprintln!("  {size} B: chorus ...");
            let ch = runtime.block_on(chorus(
                pick_group(seed, salt + 1),
                size,
                args.receivers,
                args.messages,
                args.loss,
                max,
                args.rate,
            ))?;
            lines.push(row("chorus", size, &ch));
            let ratio = if raw.msgs_per_sec() > 0.0 {
                ch.msgs_per_sec() / raw.msgs_per_sec()
            } else {
                0.0
            };
            ratios.push(format!("{size} B: chorus/raw = {ratio:.2}"));
        }
    }
    println!("{}", lines.join("\n"));
    if !ratios.is_empty() {
        println!(
            "\nthroughput ratio (delivered msgs/s per receiver): {}",
            ratios.join(", ")
        );
        println!("raw UDP has no repair: its 'delivered' column is what the kernel did not drop.");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stamp_roundtrip_and_percentiles() {
        let base = Instant::now();
        let mut buf = [0u8; 32];
        stamp(&mut buf, 42, base);
        let (seq, lat) = unstamp(&buf, base).unwrap();
        assert_eq!(seq, 42);
        assert!(lat < Duration::from_secs(1));
        assert!(unstamp(&buf[..10], base).is_none());
        let mut l: Vec<_> = (1..=100).map(Duration::from_micros).collect();
        let (p50, p99) = percentiles(&mut l);
        assert!((p50 - 50.5).abs() <= 1.0, "{p50}");
        assert!((p99 - 99.0).abs() <= 1.0, "{p99}");
    }

    #[tokio::test]
    async fn raw_loopback_delivers() {
        let group = pick_group(rand::random(), 1);
        let f = raw(group, 64, 2, 200, Duration::from_secs(5), None)
            .await
            .unwrap();
        assert_eq!(f.sent, 200);
        assert!(f.delivered > 0, "{f:?}");
        assert!(f.delivered <= 400);
    }
}
