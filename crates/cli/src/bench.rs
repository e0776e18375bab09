//! `chorus bench`: one sender and N receivers over loopback multicast, Chorus against raw UDP.
//!
//! Every payload carries its sequence number and send time; receivers measure one-way latency
//! against the same clock. Raw UDP is the plain socket API with no protocol and no runtime:
//! one OS thread doing blocking `sendto` in a loop and one OS thread per receiver doing blocking
//! `recv`. What the kernel drops stays lost (nothing holds the sender back but the socket
//! itself), so its delivered share is reported next to the rate. In the default mode all
//! traffic is on 127.0.0.1 with TTL 0, bounded in count and time.
//!
//! With `--role send|receive` each process runs one side only, so that the two sides can sit in
//! different network namespaces (see `tests/netns/bench-bridge.sh`); the receiving side prints
//! one `RESULT key=value ...` line. Both processes must run on one machine: latency compares
//! the sender's stamp with the receiver's clock.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{StreamExt, TryStreamExt};
use socket2::{Domain, Protocol, Socket, Type};

/// Bytes at the start of every payload: sequence number then send time ([`now_ns`]).
pub const HEADER: usize = 16;

/// A raw receiver of the in-process run stops after this long without a datagram.
const RAW_IDLE: Duration = Duration::from_millis(500);

/// How long a blocking `recv` waits before the receiver looks at its idle and time bounds.
const RECV_POLL: Duration = Duration::from_millis(50);

/// Socket buffers asked for (the kernel caps them at `rmem_max` / `wmem_max`).
const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Clock, latency histogram, receive tally
// ---------------------------------------------------------------------------------------------

/// Nanoseconds on a clock that two processes of one machine share: the wall clock read once
/// at the first call, advanced by the monotonic clock since. Within a process it never goes
/// back; between processes it agrees as long as nobody steps the wall clock in between.
pub fn now_ns() -> u64 {
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    let (at, wall) = ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        (Instant::now(), wall)
    });
    wall.saturating_add(u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX))
}

/// Writes the sequence number and send time into the payload header.
pub fn stamp(buf: &mut [u8], seq: u64) {
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    buf[8..HEADER].copy_from_slice(&now_ns().to_le_bytes());
}

/// Reads the header back: (sequence, send time in [`now_ns`]). `None` for a payload too short.
pub fn unstamp(buf: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(buf.get(8..HEADER)?.try_into().ok()?);
    Some((seq, sent))
}

/// Sub-buckets per power of two (2^7): a recorded value is off by at most 1/128 of itself.
const SUB_BITS: u32 = 7;
const SUB: usize = 1 << SUB_BITS;
const HALF: usize = SUB / 2;
const BUCKETS: usize = SUB + (64 - SUB_BITS as usize) * HALF;

/// Latencies in nanoseconds, log-linear buckets: fixed memory (30 KiB) however many messages.
#[derive(Debug, Clone)]
pub struct Hist {
    counts: Box<[u64]>,
    total: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
        }
    }
}

impl Hist {
    fn bucket(v: u64) -> usize {
        if v < SUB as u64 {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - (SUB_BITS - 1);
        let mantissa = (v >> shift) as usize; // in HALF..SUB
        SUB + (shift as usize - 1) * HALF + (mantissa - HALF)
    }

    /// The middle of bucket `i`, in nanoseconds.
    fn value(i: usize) -> f64 {
        if i < SUB {
            return i as f64;
        }
        let k = i - SUB;
        let shift = k / HALF + 1;
        let low = ((k % HALF + HALF) as u64) << shift;
        low as f64 + (1u64 << shift) as f64 / 2.0
    }

    /// Counts one latency.
    pub fn record(&mut self, ns: u64) {
        self.counts[Self::bucket(ns)] += 1;
        self.total += 1;
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
    }

    /// The `q` quantile (0.0..=1.0) in microseconds; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((self.total - 1) as f64 * q.clamp(0.0, 1.0)).round() as u64;
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen > rank {
                return Self::value(i) / 1e3;
            }
        }
        0.0
    }
}

/// What one receiver got.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// One-way latencies.
    pub hist: Hist,
    /// Stamped payloads received.
    pub count: u64,
    /// Earliest send time among them ([`now_ns`]; `u64::MAX` before the first).
    pub first_sent: u64,
    /// When the last one arrived ([`now_ns`]; 0 before the first).
    pub last_at: u64,
    /// Why the receiver stopped: `all`, `idle`, `deadline`, `error` or `node-stopped`.
    pub stop: &'static str,
    /// Chorus: changes counted in `count` that the node applied but its watch did not
    /// yield, because the watch fell behind the change log and was restarted (no latency).
    pub unobserved: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            first_sent: u64::MAX,
            ..Tally::default()
        }
    }

    /// Counts a stamped payload received now; `false` (nothing counted) when it is too short.
    pub fn record(&mut self, payload: &[u8]) -> bool {
        let Some((_, sent)) = unstamp(payload) else {
            return false;
        };
        let now = now_ns();
        self.hist.record(now.saturating_sub(sent));
        self.count += 1;
        self.first_sent = self.first_sent.min(sent);
        self.last_at = now;
        true
    }

    fn merge(&mut self, other: &Tally) {
        self.hist.merge(&other.hist);
        self.count += other.count;
        self.unobserved += other.unobserved;
        self.first_sent = self.first_sent.min(other.first_sent);
        self.last_at = self.last_at.max(other.last_at);
    }

    /// Seconds from the earliest send to the last arrival (0 when nothing arrived).
    fn span_secs(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.last_at.saturating_sub(self.first_sent) as f64 / 1e9
    }
}

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
    /// Median latency in microseconds.
    pub p50_us: f64,
    /// 99th percentile latency in microseconds.
    pub p99_us: f64,
    /// Repairs sent (Chorus only).
    pub repairs: Option<u64>,
    /// NAKs sent (Chorus only).
    pub naks: Option<u64>,
}

impl Figures {
    /// Figures of a run whose sending started at `start` ([`now_ns`]), from every
    /// receiver's tally.
    fn from_tallies(sent: u64, start: u64, tallies: &[Tally]) -> Figures {
        let mut all = Tally::new();
        for t in tallies {
            all.merge(t);
        }
        Figures {
            sent,
            delivered: all.count,
            receivers: tallies.len() as u64,
            secs: all.last_at.saturating_sub(start) as f64 / 1e9,
            p50_us: all.hist.quantile_us(0.50),
            p99_us: all.hist.quantile_us(0.99),
            repairs: None,
            naks: None,
        }
    }

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

/// When message `seq` is due at a paced `rate` (messages per second), after the first.
fn offset(seq: u64, rate: Option<u64>) -> Option<Duration> {
    let rate = rate.filter(|r| *r > 0)?;
    Some(Duration::from_nanos(
        (u128::from(seq) * 1_000_000_000 / u128::from(rate))
            .try_into()
            .unwrap_or(u64::MAX),
    ))
}

/// [`offset`] from a tokio instant.
fn slot(t0: tokio::time::Instant, seq: u64, rate: Option<u64>) -> Option<tokio::time::Instant> {
    offset(seq, rate).map(|d| t0 + d)
}

/// The tokio instant of a [`now_ns`] time.
fn tokio_at(ns: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_nanos(ns.saturating_sub(now_ns()))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Raw UDP: blocking sockets, one thread per side
// ---------------------------------------------------------------------------------------------

/// One blocking receiver socket joined to `group` on the interface with address `iface`.
fn raw_receiver(group: SocketAddrV4, iface: Ipv4Addr) -> std::io::Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port())).into())?;
    sock.join_multicast_v4(group.ip(), &iface)?;
    sock.set_read_timeout(Some(RECV_POLL))?;
    Ok(sock.into())
}

/// The blocking sender socket: multicast out of `iface` with `ttl`, loop on or off.
fn raw_sender(iface: Ipv4Addr, ttl: u32, multicast_loop: bool) -> std::io::Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_multicast_if_v4(&iface)?;
    sock.set_multicast_ttl_v4(ttl)?;
    sock.set_multicast_loop_v4(multicast_loop)?;
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(iface, 0)).into())?;
    Ok(sock.into())
}

/// When a receiver stops: after `expect` payloads, at `deadline` ([`now_ns`]), or after `idle`
/// without one (counted from the receiver's start, or only once the first one arrived).
#[derive(Debug, Clone, Copy)]
struct Bounds {
    expect: u64,
    deadline: u64,
    idle: Option<Duration>,
    idle_before_first: bool,
}

impl Bounds {
    /// Since when a receiver that started at `started` and holds `t` has been idle, if the
    /// idle bound applies to it.
    fn idle_since(&self, t: &Tally, started: u64) -> Option<u64> {
        self.idle?;
        if t.count > 0 {
            Some(t.last_at)
        } else if self.idle_before_first {
            Some(started)
        } else {
            None
        }
    }

    /// When the receiver must stop at the latest if nothing more arrives ([`now_ns`]).
    fn wake(&self, t: &Tally, started: u64) -> u64 {
        match (self.idle_since(t, started), self.idle) {
            (Some(since), Some(idle)) => self.deadline.min(since.saturating_add(nanos(idle))),
            _ => self.deadline,
        }
    }

    /// Whether the receiver should stop now.
    fn done(&self, t: &Tally, started: u64) -> bool {
        t.count >= self.expect || now_ns() >= self.wake(t, started)
    }

    /// Which bound stopped a receiver that is done.
    fn reason(&self, t: &Tally) -> &'static str {
        if t.count >= self.expect {
            "all"
        } else if now_ns() >= self.deadline {
            "deadline"
        } else {
            "idle"
        }
    }
}

/// Blocking `recv` in a loop until `bounds` say stop.
fn raw_receive(sock: &UdpSocket, size: usize, bounds: Bounds) -> Tally {
    let mut buf = vec![0u8; size.max(2048) + 64];
    let mut tally = Tally::new();
    let started = now_ns();
    while !bounds.done(&tally, started) {
        match sock.recv(&mut buf) {
            Ok(n) => {
                tally.record(&buf[..n]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                eprintln!("bench: raw receive failed: {e}");
                tally.stop = "error";
                return tally;
            }
        }
    }
    tally.stop = bounds.reason(&tally);
    tally
}

/// Blocking `sendto` of `messages` stamped datagrams in a loop, paced at `rate` if given, until
/// `deadline` ([`now_ns`]). Returns how many were sent.
fn raw_send(
    sock: &UdpSocket,
    group: SocketAddrV4,
    size: usize,
    messages: u64,
    deadline: u64,
    rate: Option<u64>,
) -> std::io::Result<u64> {
    let mut payload = vec![0xA5u8; size.max(HEADER)];
    let t0 = now_ns();
    let mut sent = 0;
    for seq in 0..messages {
        let now = now_ns();
        if now >= deadline {
            break;
        }
        if let Some(due) = offset(seq, rate).map(|d| t0.saturating_add(nanos(d)))
            && due > now
        {
            std::thread::sleep(Duration::from_nanos(due - now));
        }
        stamp(&mut payload, seq);
        sock.send_to(&payload, group)?;
        sent += 1;
    }
    Ok(sent)
}

/// Raw UDP multicast on the loopback: `messages` datagrams of `size` bytes to `receivers`
/// sockets, each read by its own thread; the calling thread sends.
///
/// # Errors
/// When a socket cannot be made or joined, or sending fails.
pub fn raw(
    group: SocketAddrV4,
    size: usize,
    receivers: usize,
    messages: usize,
    max: Duration,
    rate: Option<u64>,
) -> anyhow::Result<Figures> {
    let size = size.max(HEADER);
    let socks = (0..receivers)
        .map(|_| raw_receiver(group, Ipv4Addr::LOCALHOST))
        .collect::<std::io::Result<Vec<_>>>()?;
    let sender = raw_sender(Ipv4Addr::LOCALHOST, 0, true)?;
    let deadline = now_ns().saturating_add(nanos(max));
    let bounds = Bounds {
        expect: messages as u64,
        deadline,
        idle: Some(RAW_IDLE),
        idle_before_first: true,
    };
    let (start, sent, tallies) = std::thread::scope(|s| {
        let threads: Vec<_> = socks
            .iter()
            .map(|sock| s.spawn(move || raw_receive(sock, size, bounds)))
            .collect();
        let start = now_ns();
        let sent = raw_send(&sender, group, size, messages as u64, deadline, rate);
        let tallies = threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| anyhow::anyhow!("a raw receiver thread panicked"))
            })
            .collect::<anyhow::Result<Vec<Tally>>>();
        (start, sent, tallies)
    });
    Ok(Figures::from_tallies(sent?, start, &tallies?))
}

// ---------------------------------------------------------------------------------------------
// Chorus
// ---------------------------------------------------------------------------------------------

/// How long a Chorus sender waits for its receivers to show up as members.
const MEMBER_WAIT: Duration = Duration::from_secs(10);

/// Puts `messages` stamped values of `size` bytes under `bench/` (1024 keys, overwritten in
/// turn), paced at `rate` if given, until `deadline` ([`now_ns`]). Returns the puts done.
async fn chorus_send(
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
    tokio::spawn(async move { chorus_write(&sender, size, messages, deadline, rate).await }).await?
}

/// The write loop of [`chorus_send`].
async fn chorus_write(
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
async fn chorus_receive(node: chorus::Node, mut watch: chorus::Watch, bounds: Bounds) -> Tally {
    let mut tally = Tally::new();
    let started = now_ns();
    while !bounds.done(&tally, started) {
        let until = tokio_at(bounds.wake(&tally, started));
        match tokio::time::timeout_at(until, watch.next()).await {
            Ok(Some(change)) => {
                if let Some(value) = change.value.as_deref() {
                    tally.record(value);
                }
            }
            Ok(None) => {
                let Some(e) = watch.error() else {
                    tally.stop = "node-stopped";
                    return tally;
                };
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

/// `name`'s value summed over a node's counters (`protocol_naks_sent`, ...).
fn counter(node: &chorus::Node, name: &str) -> u64 {
    crate::demo::counter(&node.counters().into_iter().collect(), name)
}

/// The NAK and repair counters of `node` as `RESULT` fields.
fn repair_fields(node: &chorus::Node) -> [(&'static str, String); 2] {
    [
        ("naks_sent", counter(node, "naks_sent").to_string()),
        ("repairs_sent", counter(node, "repairs_sent").to_string()),
    ]
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
            .map(|node| tokio::spawn(chorus_receive(node.clone(), node.watch("bench/"), bounds)))
            .collect();
        let start = now_ns();
        let sent = chorus_send(&sender, size, messages, deadline, rate).await?;
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
        let sum = |name: &str| all_nodes.iter().map(|n| counter(n, name)).sum::<u64>();
        // Delivered = the writes each receiver's replication layer got from the protocol
        // (exactly once each). A watch can see fewer: when anti-entropy brings a key's newer
        // value first, the older in-flight writes of that key arrive stale and are not changes
        // of the store (last writer wins), so no watch reports them.
        let protocol_delivered: u64 = nodes
            .iter()
            .map(|n| counter(n, "remote_writes").min(sent))
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
                sum("entries_received"),
            );
        }
        if figures.delivered < sent * nodes.len() as u64 {
            let stops: Vec<&str> = tallies.iter().map(|t| t.stop).collect();
            eprintln!(
                "  note: not every receiver got every message (stopped by: {stops:?}); \
                 messages the protocol gave up as lost: {}",
                sum("lost_messages"),
            );
            if std::env::var_os("CHORUS_BENCH_DEBUG").is_some() {
                for n in &all_nodes {
                    let c: Vec<_> = n.counters().into_iter().filter(|(_, v)| *v > 0).collect();
                    eprintln!("  node {}: {c:?}", n.node_id());
                }
            }
        }
        figures.repairs = Some(sum("repairs_sent"));
        figures.naks = Some(sum("naks_sent"));
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

// ---------------------------------------------------------------------------------------------
// One side per process (--role)
// ---------------------------------------------------------------------------------------------

/// Everything one side of a two-process measurement needs.
#[derive(Debug, Clone)]
struct Side {
    group: SocketAddrV4,
    iface: Ipv4Addr,
    ttl: u32,
    size: usize,
    messages: u64,
    max: Duration,
    rate: Option<u64>,
    /// Receivers: stop after this long without a message, once the first one arrived.
    idle: Duration,
    /// Chorus sender: receivers to wait for.
    receivers: usize,
    cluster: String,
    /// Chorus receiver: injected receive loss and its seed.
    loss: f64,
    seed: u64,
}

/// The `key=value` fields of a `RESULT` line.
type Fields = Vec<(&'static str, String)>;

/// `RESULT key=value ...`: what the two-process scripts parse.
fn result_line(fields: &Fields) -> String {
    let mut line = "RESULT".to_owned();
    for (k, v) in fields {
        line.push(' ');
        line.push_str(k);
        line.push('=');
        line.push_str(v);
    }
    line
}

/// What a receiver reports. Its rate is counted from the earliest send stamp it received to
/// the last arrival.
fn receive_fields(transport: &str, side: &Side, t: &Tally) -> Fields {
    let secs = t.span_secs();
    let rate = if secs > 0.0 {
        t.count as f64 / secs
    } else {
        0.0
    };
    vec![
        ("role", "receive".to_owned()),
        ("transport", transport.to_owned()),
        ("size", side.size.to_string()),
        ("expected", side.messages.to_string()),
        ("received", t.count.to_string()),
        (
            "delivered",
            format!("{:.4}", t.count as f64 / side.messages.max(1) as f64),
        ),
        ("secs", format!("{secs:.3}")),
        ("msgs_per_sec", format!("{rate:.0}")),
        ("p50_us", format!("{:.0}", t.hist.quantile_us(0.50))),
        ("p99_us", format!("{:.0}", t.hist.quantile_us(0.99))),
        ("stop", t.stop.to_owned()),
    ]
}

/// What a sender reports: how many it sent and how fast it got them out.
fn send_fields(transport: &str, side: &Side, sent: u64, start: u64) -> Fields {
    let secs = now_ns().saturating_sub(start) as f64 / 1e9;
    let rate = if secs > 0.0 { sent as f64 / secs } else { 0.0 };
    vec![
        ("role", "send".to_owned()),
        ("transport", transport.to_owned()),
        ("size", side.size.to_string()),
        ("sent", sent.to_string()),
        ("secs", format!("{secs:.3}")),
        ("msgs_per_sec", format!("{rate:.0}")),
    ]
}

/// Raw receiver: joins the group, says READY on stderr, counts until N, idle or the bound
/// (`--max-secs` plus the time a sender may take to show up).
fn raw_receive_side(side: &Side) -> anyhow::Result<Fields> {
    let sock = raw_receiver(side.group, side.iface)?;
    eprintln!(
        "bench: READY raw receiver on {} via {}",
        side.group, side.iface
    );
    let started = now_ns();
    let bounds = Bounds {
        expect: side.messages,
        deadline: started.saturating_add(nanos(side.max + MEMBER_WAIT)),
        idle: Some(side.idle),
        idle_before_first: false,
    };
    let tally = raw_receive(&sock, side.size, bounds);
    Ok(receive_fields("raw", side, &tally))
}

/// Raw sender: blocking `sendto` in a loop out of the given interface.
fn raw_send_side(side: &Side) -> anyhow::Result<Fields> {
    let sock = raw_sender(side.iface, side.ttl, false)?;
    let start = now_ns();
    let deadline = start.saturating_add(nanos(side.max));
    let sent = raw_send(
        &sock,
        side.group,
        side.size,
        side.messages,
        deadline,
        side.rate,
    )?;
    Ok(send_fields("raw", side, sent, start))
}

/// A node of the two-process run.
async fn side_node(side: &Side, lossy: bool) -> anyhow::Result<chorus::Node> {
    let mut b = chorus::Node::builder()
        .cluster(&side.cluster)
        .group(SocketAddr::V4(side.group))
        .interface(&side.iface.to_string())
        .ttl(side.ttl)
        // An id from the OS-seeded generator: the builder's default derives it from the
        // clock's milliseconds and the pid, so two nodes started in the same millisecond by
        // one process (the unit test below) would get the same id.
        .node_id(rand::random::<u64>() >> 1);
    if lossy && side.loss > 0.0 {
        b = b.inject_receive_loss(side.loss, side.seed);
    }
    Ok(b.start().await?)
}

/// Members a node counts as up (itself included).
fn up_members(node: &chorus::Node) -> usize {
    node.members()
        .iter()
        .filter(|m| m.state != "suspected")
        .count()
}

/// Chorus receiver: a node watching `bench/`; once done it writes what it got under
/// `bench-done/<node id>` and stays until the sender leaves (at most 10 s), so that the
/// sender can see that key.
async fn chorus_receive_side(side: &Side) -> anyhow::Result<Fields> {
    let node = side_node(side, true).await?;
    let result = async {
        let watch = node.watch("bench/");
        eprintln!(
            "bench: READY chorus receiver node {} on {} via {}",
            node.node_id(),
            side.group,
            side.iface
        );
        let started = now_ns();
        let bounds = Bounds {
            expect: side.messages,
            deadline: started.saturating_add(nanos(side.max + MEMBER_WAIT)),
            idle: Some(side.idle),
            idle_before_first: false,
        };
        let tally = chorus_receive(node.clone(), watch, bounds).await;
        node.put(
            format!("bench-done/{}", node.node_id()),
            bytes::Bytes::from(tally.count.to_string()),
        )
        .await?;
        let members = up_members(&node);
        let until = Instant::now() + MEMBER_WAIT;
        while up_members(&node) >= members && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut fields = receive_fields("chorus", side, &tally);
        fields.push(("unobserved", tally.unobserved.to_string()));
        fields.extend(repair_fields(&node));
        Ok(fields)
    }
    .await;
    let _ = node.shutdown().await;
    result
}

/// Chorus sender: waits until it sees `receivers` other members, puts as the in-process
/// bench does, then waits for every receiver's `bench-done/` key (bounded) before leaving.
async fn chorus_send_side(side: &Side) -> anyhow::Result<Fields> {
    let node = side_node(side, false).await?;
    let result = async {
        let until = Instant::now() + MEMBER_WAIT;
        while node.members().len() < side.receivers + 1 {
            if Instant::now() > until {
                anyhow::bail!(
                    "saw {} of {} receivers within {} s (is the receiver running on the same \
                     group and cluster?)",
                    node.members().len() - 1,
                    side.receivers,
                    MEMBER_WAIT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let start = now_ns();
        let deadline = start.saturating_add(nanos(side.max));
        let messages = usize::try_from(side.messages).unwrap_or(usize::MAX);
        let sent = chorus_send(&node, side.size, messages, deadline, side.rate).await?;
        let mut fields = send_fields("chorus", side, sent, start);
        // The receivers stop at their own bound at the latest: --max-secs after the first
        // message, plus their idle time.
        let until = Instant::now() + side.max + side.idle + MEMBER_WAIT;
        let mut done = 0;
        while Instant::now() < until {
            done = node.scan("bench-done/").len();
            if done >= side.receivers {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        fields.push(("receivers_done", done.to_string()));
        fields.extend(repair_fields(&node));
        Ok(fields)
    }
    .await;
    let _ = node.shutdown().await;
    result
}

/// `chorus bench --role ...`: one side, one `RESULT` line on stdout.
fn run_side(args: &crate::cli::BenchArgs, role: &str, receivers: usize) -> anyhow::Result<()> {
    let (Some(transport), Some(group), Some(iface)) =
        (args.transport.as_deref(), args.group, args.interface)
    else {
        anyhow::bail!("--role needs --transport, --group and --interface");
    };
    let [size] = args.sizes[..] else {
        anyhow::bail!("--role takes exactly one payload size (--sizes N)");
    };
    if !group.ip().is_multicast() {
        anyhow::bail!(
            "--group must be an IPv4 multicast address, got {}",
            group.ip()
        );
    }
    if args.raw_only || args.late_join.is_some() {
        anyhow::bail!("--raw-only and --late-join do not go with --role (use --transport)");
    }
    if args.loss > 0.0 && (role, transport) != ("receive", "chorus") {
        anyhow::bail!("--loss with --role only applies to a chorus receiver");
    }
    let side = Side {
        group,
        iface,
        ttl: args.ttl.unwrap_or(1),
        size: size.max(HEADER),
        messages: args.messages as u64,
        max: Duration::from_secs(args.max_secs.max(1)),
        rate: args.rate,
        idle: Duration::from_millis(args.idle_ms.unwrap_or(if transport == "raw" {
            500
        } else {
            3000
        })),
        receivers,
        cluster: args.cluster.clone().unwrap_or_else(|| "bench".to_owned()),
        loss: args.loss,
        seed: args.seed.unwrap_or_else(rand::random),
    };
    let fields = match (role, transport) {
        ("receive", "raw") => raw_receive_side(&side)?,
        ("send", "raw") => raw_send_side(&side)?,
        _ => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            if role == "receive" {
                runtime.block_on(chorus_receive_side(&side))?
            } else {
                runtime.block_on(chorus_send_side(&side))?
            }
        }
    };
    println!("{}", result_line(&fields));
    Ok(())
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

/// `chorus bench`: prints a markdown table (or, with `--role`, runs one side).
pub fn run(args: &crate::cli::BenchArgs) -> anyhow::Result<()> {
    let receivers = args
        .receivers
        .unwrap_or(if args.role.is_some() { 1 } else { 3 });
    if receivers == 0 || args.messages == 0 {
        anyhow::bail!("--receivers and --messages must be at least 1");
    }
    if !(0.0..0.9).contains(&args.loss) {
        anyhow::bail!("--loss must be in 0.0..0.9");
    }
    if args.sizes.iter().any(|&s| s > 60_000) {
        anyhow::bail!("payload sizes above 60000 bytes do not fit one raw UDP datagram");
    }
    if let Some(role) = args.role.as_deref() {
        return run_side(args, role, receivers);
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
        "bench: 1 sender, {receivers} receivers, {} messages per size, loopback multicast TTL 0{}",
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
    let mut peer_notes: Vec<String> = Vec::new();
    for (i, &size) in args.sizes.iter().enumerate() {
        let salt = i as u64 * 2;
        eprintln!("  {size} B: raw UDP ...");
        let raw = raw(
            pick_group(seed, salt),
            size,
            receivers,
            args.messages,
            max,
            args.rate,
        )?;
        lines.push(row("raw UDP", size, &raw));
        if !args.raw_only {
            eprintln!("  {size} B: chorus ...");
            let ch = runtime.block_on(chorus(
                pick_group(seed, salt + 1),
                size,
                receivers,
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
        if args.peer.is_some() {
            match crate::peer::unavailable() {
                Some(why) => {
                    if !peer_notes.contains(&why) {
                        peer_notes.push(why);
                    }
                }
                None => {
                    eprintln!("  {size} B: ddsperf (Cyclone DDS) ...");
                    match crate::peer::ddsperf(
                        size,
                        receivers,
                        Duration::from_secs(args.peer_secs.max(2)),
                    ) {
                        Ok(p) => {
                            lines.push(format!(
                                "| ddsperf (Cyclone DDS, reliable) | {size} | {:.0} | {:.2} | {} | - | - | - | - |",
                                p.msgs_per_sec,
                                p.msgs_per_sec * size as f64 / 1e6,
                                if p.lost == 0 {
                                    "0 lost".to_owned()
                                } else {
                                    format!("{} lost", p.lost)
                                },
                            ));
                            if raw.msgs_per_sec() > 0.0 {
                                ratios.push(format!(
                                    "{size} B: ddsperf/raw = {:.2}",
                                    p.msgs_per_sec / raw.msgs_per_sec()
                                ));
                            }
                        }
                        Err(e) => peer_notes.push(format!("ddsperf at {size} B failed: {e}")),
                    }
                }
            }
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
    if args.peer.is_some() {
        if peer_notes.is_empty() {
            println!(
                "ddsperf ran with its own defaults (reliable; its own history and batching) in a \
                 private network namespace holding only lo; its 'delivered' column is the \
                 samples its subscribers reported lost; no latency is taken from it."
            );
        }
        for note in &peer_notes {
            println!("peer not measured: {note}");
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stamp_roundtrip_and_percentiles() {
        let mut buf = [0u8; 32];
        let before = now_ns();
        stamp(&mut buf, 42);
        let (seq, sent) = unstamp(&buf).unwrap();
        assert_eq!(seq, 42);
        assert!(sent >= before && sent <= now_ns());
        assert!(unstamp(&buf[..10]).is_none());
        let mut t = Tally::new();
        assert!(t.record(&buf));
        assert!(!t.record(&buf[..10]));
        assert_eq!(t.count, 1);
        assert_eq!(t.first_sent, sent);
        let mut h = Hist::default();
        for us in 1..=100u64 {
            h.record(us * 1000);
        }
        let (p50, p99) = (h.quantile_us(0.5), h.quantile_us(0.99));
        assert!((p50 - 50.5).abs() <= 1.0, "{p50}");
        assert!((p99 - 99.0).abs() <= 1.0, "{p99}");
        assert_eq!(Hist::default().quantile_us(0.5), 0.0);
    }

    #[test]
    fn histogram_buckets_are_within_one_percent() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut values = vec![0, 1, 127, 128, 129, 255, 256, u64::MAX / 2, u64::MAX];
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x >> (x % 64));
        }
        let mut prev = 0;
        values.sort_unstable();
        for v in values {
            let b = Hist::bucket(v);
            assert!(b < BUCKETS, "{v} -> {b}");
            assert!(b >= prev, "buckets not monotonic at {v}");
            prev = b;
            let mid = Hist::value(b);
            assert!(
                (mid - v as f64).abs() <= v as f64 / 128.0 + 0.5,
                "{v} -> bucket {b} = {mid}"
            );
        }
        let mut a = Hist::default();
        let mut b = Hist::default();
        a.record(1_000);
        b.record(3_000_000);
        b.record(3_000_000);
        a.merge(&b);
        assert_eq!(a.total, 3);
        assert!((a.quantile_us(1.0) - 3000.0).abs() < 30.0);
        assert!((a.quantile_us(0.0) - 1.0).abs() < 0.01);
    }

    #[test]
    fn pacing_and_bounds() {
        assert_eq!(offset(5, None), None);
        assert_eq!(offset(5, Some(0)), None);
        assert_eq!(offset(0, Some(1000)), Some(Duration::ZERO));
        assert_eq!(offset(1500, Some(1000)), Some(Duration::from_millis(1500)));
        let now = now_ns();
        let t = Tally::new();
        let far = Bounds {
            expect: 10,
            deadline: now + 60_000_000_000,
            idle: Some(Duration::from_millis(1)),
            idle_before_first: false,
        };
        // Before the first message only the deadline counts, unless told otherwise.
        assert!(!far.done(&t, now - 1_000_000_000));
        let eager = Bounds {
            idle_before_first: true,
            ..far
        };
        assert!(eager.done(&t, now - 1_000_000_000));
        let mut got = Tally::new();
        got.count = 3;
        got.last_at = now - 1_000_000_000;
        assert!(far.done(&got, now));
        assert_eq!(far.reason(&got), "idle");
        got.count = 10;
        got.last_at = now_ns();
        assert!(far.done(&got, now), "all expected arrived");
        assert_eq!(far.reason(&got), "all");
        let past = Bounds {
            deadline: now,
            idle: None,
            ..far
        };
        assert!(past.done(&Tally::new(), now));
        assert_eq!(past.reason(&Tally::new()), "deadline");
    }

    #[test]
    fn raw_loopback_delivers() {
        let group = pick_group(rand::random(), 1);
        let f = raw(group, 64, 2, 200, Duration::from_secs(5), None).unwrap();
        assert_eq!(f.sent, 200);
        assert_eq!(f.receivers, 2);
        assert!(f.delivered > 0, "{f:?}");
        assert!(f.delivered <= 400);
        assert!(f.secs > 0.0 && f.secs < 5.0, "{f:?}");
    }

    /// The two sides of `--role` in one process over the loopback (TTL 0): the receiver
    /// counts what the sender put, the sender hears back from it under `bench-done/`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chorus_sides_meet_on_the_loopback() {
        let side = Side {
            group: pick_group(rand::random(), 3),
            iface: Ipv4Addr::LOCALHOST,
            ttl: 0,
            size: 100,
            messages: 300,
            max: Duration::from_secs(20),
            rate: None,
            idle: Duration::from_secs(3),
            receivers: 1,
            cluster: format!("bench-test-{:016x}", rand::random::<u64>()),
            loss: 0.0,
            seed: 1,
        };
        let rx_side = side.clone();
        let receiver = tokio::spawn(async move { chorus_receive_side(&rx_side).await });
        let sent = chorus_send_side(&side).await.unwrap();
        let received = receiver.await.unwrap().unwrap();
        let field = |f: &Fields, k: &str| f.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        assert_eq!(field(&sent, "sent"), "300", "{sent:?}");
        assert_eq!(field(&sent, "receivers_done"), "1", "{sent:?}");
        assert_eq!(field(&received, "received"), "300", "{received:?}");
        assert_eq!(field(&received, "stop"), "all", "{received:?}");
        assert!(result_line(&received).starts_with("RESULT role=receive transport=chorus "));
    }
}
