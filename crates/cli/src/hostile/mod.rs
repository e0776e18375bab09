//! `chorus hostile`: a hostile peer on the loopback, for testing what an agent without a
//! cluster key withstands (see `docs/security.md`, "Hostile peers").
//!
//! It listens on the group first (the warm-up: it learns the cluster id, the target's node id
//! and incarnation from its heartbeats, and the target's normal traffic), then plays one attack
//! at a bounded rate, for a bounded count and time, and goes on listening for a short settle
//! time. It prints what it sent and what the target multicast meanwhile, above its normal
//! traffic: the bytes the target sent in answer. Every datagram it sends is built with the
//! public wire API, goes out of a loopback address with multicast TTL 0 (it never leaves the
//! host; inside a private network namespace, never leaves the namespace), and it refuses any
//! other interface.

mod attacks;
mod listen;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chorus_replication::chorus_protocol::wire;
use chorus_replication::chorus_protocol::{ClusterId, Config, Incarnation, NodeId};
use clap::{Args, ValueEnum};
use socket2::{Domain, Protocol, Socket, Type};

use attacks::{Attacker, Shape, TargetView};
use listen::{Observed, TargetWatch, Traffic};

/// Most datagrams one run sends, whatever `--count`, `--rate` and `--duration` say.
const MAX_DATAGRAMS: u64 = 100_000_000;
/// Longest attack.
const MAX_DURATION: Duration = Duration::from_secs(600);
/// How often the member-like attacks send their own heartbeat (as an agent does).
const KEEPALIVE: Duration = Duration::from_millis(200);
/// The pacing sleeps only when the loop is this far ahead of its schedule.
const PACE_SLACK: Duration = Duration::from_millis(1);
/// Send buffer asked for (the kernel caps it at `wmem_max`).
const SEND_BUFFER: usize = 8 << 20;
/// Byte ranges per `PartialNak` in the NAK attack.
const PARTS_PER_PARTIAL: usize = 32;

/// `println!` that cannot panic: a closed stdout (`chorus hostile ... | head -1`) loses the
/// line, not the run.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}
pub(crate) use say;

/// The attacks `chorus hostile` plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Attack {
    /// First fragments of messages declaring `max_message_size` bytes, each from a fresh node id.
    Fragments,
    /// Valid heartbeats, each from a fresh node id.
    Heartbeats,
    /// NAKs of thousands of `[1, u64::MAX]` ranges plus `PartialNak` parts, at the target's
    /// node id and incarnation, from one node posing as a member that acknowledges nothing.
    Naks,
    /// Replication `Request`s naming one key many times, from one node posing as a member.
    Requests,
    /// Random bytes, mutated captured frames, and well-formed frames with random contents.
    Junk,
}

impl Attack {
    fn name(self) -> &'static str {
        match self {
            Attack::Fragments => "fragments",
            Attack::Heartbeats => "heartbeats",
            Attack::Naks => "naks",
            Attack::Requests => "requests",
            Attack::Junk => "junk",
        }
    }
}

/// `chorus hostile`.
#[derive(Debug, Args)]
pub struct HostileArgs {
    /// The cluster's IPv4 multicast group and port.
    #[arg(long)]
    pub group: SocketAddrV4,
    /// Loopback address to send from (127.0.0.0/8); nothing else is accepted.
    #[arg(long, default_value = "127.0.0.1")]
    pub interface: Ipv4Addr,
    /// The attack to play.
    #[arg(long, value_enum)]
    pub attack: Attack,
    /// Cluster name (default: the cluster id of the first valid datagram heard on the group).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Node id of the agent under attack (default: the first node heard on the group).
    #[arg(long)]
    pub target: Option<u64>,
    /// Datagrams per second.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rate: u64,
    /// Longest attack, in seconds (at most 600).
    #[arg(long, default_value = "5", value_parser = attack_secs)]
    pub duration: Duration,
    /// Most datagrams sent (default: rate × duration).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub count: Option<u64>,
    /// Seconds of listening before the attack (learning the target and its normal traffic).
    #[arg(long, default_value = "1", value_parser = listen_secs)]
    pub warmup: Duration,
    /// Seconds of listening after the attack (answers come late: repairs, entries).
    #[arg(long, default_value = "1", value_parser = listen_secs)]
    pub settle: Duration,
    /// Largest datagram of the fragment, request and junk attacks.
    #[arg(long, default_value_t = 1400, value_parser = clap::value_parser!(u64).range(64..=65_507))]
    pub datagram_bytes: u64,
    /// `[1, u64::MAX]` ranges per NAK (naks).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=4000))]
    pub ranges: u64,
    /// `PartialNak` parts per NAK, 32 byte ranges each (naks).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(0..=8))]
    pub partials: u64,
    /// The key the requests name (requests; the target should hold it, large).
    #[arg(long)]
    pub key: Option<String>,
    /// Seed of every random choice (default: random; printed, so a run replays).
    #[arg(long)]
    pub seed: Option<u64>,
}

fn secs_between(s: &str, min: f64, max: f64) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(secs.is_finite() && secs >= min && secs <= max) {
        return Err(format!("{s} is outside {min}..={max} seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn attack_secs(s: &str) -> Result<Duration, String> {
    let d = secs_between(s, 0.0, MAX_DURATION.as_secs_f64())?;
    if d.is_zero() {
        return Err("the duration must be above 0".into());
    }
    Ok(d)
}

fn listen_secs(s: &str) -> Result<Duration, String> {
    secs_between(s, 0.0, 60.0)
}

/// Refuses to send anywhere but the loopback.
fn check_loopback(args: &HostileArgs) -> anyhow::Result<()> {
    if !args.interface.is_loopback() {
        bail!(
            "--interface {} is not a loopback address: chorus hostile only sends on the loopback \
             (127.0.0.1, TTL 0), so that nothing it sends can leave this host; run the agents on \
             127.0.0.1 too, or inside a network namespace of their own (unshare --net \
             --map-root-user) where the loopback is private",
            args.interface
        );
    }
    if !args.group.ip().is_multicast() {
        bail!("--group {} is not an IPv4 multicast group", args.group);
    }
    Ok(())
}

/// The sending socket: multicast out of the loopback address, TTL 0, loop on (the agents are
/// on this host).
fn sender(iface: Ipv4Addr) -> std::io::Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_multicast_if_v4(&iface)?;
    sock.set_multicast_ttl_v4(0)?;
    sock.set_multicast_loop_v4(true)?;
    let _ = sock.set_send_buffer_size(SEND_BUFFER);
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(iface, 0)).into())?;
    Ok(sock.into())
}

/// What was sent.
#[derive(Debug, Default)]
struct Sent {
    datagrams: u64,
    bytes: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Sent {
    fn send(&mut self, sock: &UdpSocket, group: SocketAddrV4, datagram: &[u8]) {
        match sock.send_to(datagram, group) {
            Ok(n) => {
                self.datagrams += 1;
                self.bytes += n as u64;
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// Runs one attack (see the module docs).
///
/// # Errors
/// A non-loopback interface or a non-multicast group; sockets that cannot be made; no valid
/// datagram heard to learn the cluster from (without `--cluster`); for the NAK and request
/// attacks, a target not heard during the warm-up or (requests) no `--key`; every send failing.
pub fn run(args: &HostileArgs) -> anyhow::Result<()> {
    check_loopback(args)?;
    if args.attack == Attack::Requests && args.key.is_none() {
        bail!("--attack requests needs --key KEY (a key the target holds, the larger the better)");
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let sock = sender(args.interface).context("cannot make the sending socket")?;
    let own = sock
        .local_addr()
        .context("the sending socket has no address")?;
    let listener = listen::group_listener(args.group, args.interface)
        .with_context(|| format!("cannot listen on {} via {}", args.group, args.interface))?;
    say!(
        "hostile: {} against {} via {} (TTL 0), seed {seed}; listening {:.1} s first",
        args.attack.name(),
        args.group,
        args.interface,
        args.warmup.as_secs_f64()
    );

    let mut seen = Observed::new(args.cluster.as_deref().map(ClusterId::from_name));
    let mut sent = Sent::default();
    let mut attacker: Option<Attacker> = None;
    let warm_start = Instant::now();
    let warm_end = warm_start + args.warmup;
    let mut next_keepalive = warm_start;
    let mut buf = vec![0u8; wire::MAX_UDP_PAYLOAD + 1];
    while Instant::now() < warm_end {
        if let (None, Some(cluster), true) = (&attacker, seen.cluster, is_member(args.attack)) {
            attacker = Some(new_attacker(args, cluster, seed, &seen));
        }
        // A member-like attacker joins during the warm-up, as a real node would.
        if let Some(a) = &attacker
            && Instant::now() >= next_keepalive
            && let Some(hb) = a.keepalive()
        {
            sent.send(&sock, args.group, &hb);
            next_keepalive += KEEPALIVE;
        }
        match listener.recv_from(&mut buf) {
            Ok((n, from)) if from != own => seen.take(&buf[..n], from),
            Ok(_) => {}
            Err(e) if listen::is_idle(&e) => {}
            Err(e) => bail!("listening on {} failed: {e}", args.group),
        }
    }
    let warm_secs = warm_start.elapsed().as_secs_f64();
    let Some(cluster) = seen.cluster else {
        bail!(
            "no valid Chorus datagram heard on {} in {:.1} s: is an agent running on this group \
             (and interface)? Or give --cluster NAME",
            args.group,
            warm_secs
        );
    };
    // The others are built now, with every node heard (not to forge) and every frame captured.
    let mut attacker = match attacker {
        Some(a) => a,
        None => new_attacker(args, cluster, seed, &seen),
    };
    let target = args.target.or_else(|| seen.order.first().copied());
    let target_seen = target.and_then(|t| seen.nodes.get(&t).map(|s| (t, s.clone())));
    let heard: Vec<String> = seen.order.iter().map(|n| n.to_string()).collect();
    say!(
        "hostile: cluster {cluster}, heard node(s) [{}] in {warm_secs:.1} s",
        heard.join(", ")
    );
    if target_seen.as_ref().is_some_and(|(_, s)| s.sealed) {
        say!(
            "hostile: the target seals its datagrams (it has a cluster key): every datagram of \
             this attack will be refused by it"
        );
    }
    if let (Some(t), None) = (target, &target_seen)
        && is_member(args.attack)
    {
        bail!(
            "node {t} was not heard on {} during the warm-up: its incarnation is needed (is it \
             running? a longer --warmup?)",
            args.group
        );
    }
    if target.is_none() && is_member(args.attack) {
        bail!("no node heard on {} to attack", args.group);
    }
    drop(listener);

    // The plan: at most `budget` datagrams, at most `duration`, paced at `rate`.
    let budget = args
        .count
        .unwrap_or(u64::MAX)
        .min(planned(args.rate, args.duration))
        .min(MAX_DATAGRAMS);
    let start = Instant::now();
    let end = start + args.duration;
    let watch = match &target_seen {
        Some((node, s)) => Some(
            TargetWatch::start(
                args.group,
                args.interface,
                s.addr,
                cluster,
                s.view(*node),
                end + args.settle + Duration::from_secs(1),
            )
            .context("cannot listen for the target's traffic")?,
        ),
        None => None,
    };
    let view = |w: &Option<TargetWatch>| match w {
        Some(w) => w.view.get(),
        None => TargetView::default(),
    };
    let mut attack = Sent::default();
    let mut next_keepalive = start;
    for i in 0..budget {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if let Some(due) = start.checked_add(offset(i, args.rate))
            && due > now + PACE_SLACK
        {
            std::thread::sleep(due.min(end).saturating_duration_since(now));
            if Instant::now() >= end {
                break;
            }
        }
        if now >= next_keepalive {
            next_keepalive = now + KEEPALIVE;
            if let Some(hb) = attacker.keepalive() {
                sent.send(&sock, args.group, &hb);
            }
        }
        let datagram = attacker.next_datagram(view(&watch));
        attack.send(&sock, args.group, &datagram);
        if attack.datagrams == 0 && attack.errors >= 1000 {
            bail!(
                "every send to {} failed: {}",
                args.group,
                attack.first_error.unwrap_or_default()
            );
        }
    }
    let attack_secs = start.elapsed().as_secs_f64();
    if let Some(bye) = attacker.goodbye() {
        sent.send(&sock, args.group, &bye);
    }
    std::thread::sleep(args.settle);
    let window_secs = start.elapsed().as_secs_f64();
    let heard = watch.and_then(TargetWatch::finish);

    let total_datagrams = attack.datagrams + sent.datagrams;
    let total_bytes = attack.bytes + sent.bytes;
    let errors = attack.errors + sent.errors;
    say!(
        "hostile: sent {total_datagrams} datagrams, {total_bytes} bytes in {attack_secs:.2} s \
         ({:.0}/s) from {}{}",
        rate(total_datagrams, attack_secs),
        if attacker.is_member() {
            format!("node {} posing as a member", attacker.node())
        } else {
            format!("{} fresh node ids", attacker.ids())
        },
        match &attack.first_error {
            Some(e) => format!("; {errors} sends failed (first: {e})"),
            None => String::new(),
        }
    );
    let mut result = format!(
        "RESULT attack={} seed={seed} datagrams={total_datagrams} bytes={total_bytes} \
         secs={attack_secs:.3} rate={:.0} ids={} send_errors={errors}",
        args.attack.name(),
        rate(total_datagrams, attack_secs),
        attacker.ids()
    );
    match (target_seen, heard) {
        (Some((node, before)), Some(during)) => {
            let answer = answer_bytes(
                args.attack,
                &before.traffic,
                warm_secs,
                &during,
                window_secs,
            );
            let baseline =
                (before.traffic.total_bytes() as f64 * window_secs / warm_secs.max(1e-3)) as u64;
            let ratio = answer as f64 / total_bytes.max(1) as f64;
            say!(
                "hostile: target {node} multicast {} datagrams, {} bytes in {window_secs:.2} s \
                 ({}); its normal traffic would have been {baseline} bytes; answer {answer} \
                 bytes = {ratio:.3} x what was sent",
                during.total_datagrams(),
                during.total_bytes(),
                during.by_kind(),
            );
            result.push_str(&format!(
                " target={node} target_datagrams={} target_bytes={} baseline_bytes={baseline} \
                 answer_bytes={answer} ratio={ratio:.4} window_secs={window_secs:.3} kinds={}",
                during.total_datagrams(),
                during.total_bytes(),
                during.by_kind()
            ));
        }
        _ => {
            say!("hostile: no target heard, so no answer counted");
            result.push_str(" target=none");
        }
    }
    say!("{result}");
    Ok(())
}

/// Whether the attack poses as a member (joins with heartbeats before it starts).
fn is_member(attack: Attack) -> bool {
    matches!(attack, Attack::Naks | Attack::Requests)
}

fn new_attacker(args: &HostileArgs, cluster: ClusterId, seed: u64, seen: &Observed) -> Attacker {
    // The largest message an agent accepts, from the preset every agent starts from.
    let max_message = Config::lan(cluster, NodeId(0), Incarnation(0), 0).max_message_size;
    let shape = Shape {
        datagram_bytes: usize::try_from(args.datagram_bytes).unwrap_or(wire::MAX_UDP_PAYLOAD),
        total_len: u32::try_from(max_message).unwrap_or(u32::MAX),
        ranges: usize::try_from(args.ranges).unwrap_or(0),
        partials: usize::try_from(args.partials).unwrap_or(0),
        parts_per_partial: PARTS_PER_PARTIAL,
        key: args.key.clone().unwrap_or_default(),
    };
    Attacker::new(
        args.attack,
        cluster,
        shape,
        seed,
        seen.nodes.keys().copied().collect(),
        seen.captured.clone(),
    )
}

/// Datagrams `rate` per second make in `d` (rounded up, saturating).
fn planned(rate: u64, d: Duration) -> u64 {
    let n = u128::from(rate) * d.as_nanos();
    u64::try_from(n.div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
}

/// When datagram `i` is due after the start at `rate` per second.
fn offset(i: u64, rate: u64) -> Duration {
    let ns = u128::from(i) * 1_000_000_000 / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// What the target multicast in answer: above its normal traffic (the warm-up's rate over the
/// same time), class by class. For the NAK attack, whose target is being written to, data and
/// fragments are its writes, not answers: only repairs, NAKs and heartbeats count there.
fn answer_bytes(
    attack: Attack,
    before: &Traffic,
    before_secs: f64,
    during: &Traffic,
    during_secs: f64,
) -> u64 {
    let scale = during_secs / before_secs.max(1e-3);
    (0..listen::KINDS.len())
        .filter(|&k| {
            attack != Attack::Naks || matches!(k, listen::REPAIR | listen::NAK | listen::HEARTBEAT)
        })
        .map(|k| {
            let normal = (before.bytes[k] as f64 * scale) as u64;
            during.bytes[k].saturating_sub(normal)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: HostileArgs,
    }

    fn parse(extra: &[&str]) -> Result<HostileArgs, clap::Error> {
        let mut argv = vec!["hostile", "--group", "239.255.9.9:7400", "--attack", "junk"];
        argv.extend_from_slice(extra);
        Wrapper::try_parse_from(argv).map(|w| w.args)
    }

    #[test]
    fn only_the_loopback_and_bounded_runs_are_accepted() {
        let ok = parse(&[]).expect("defaults parse");
        assert!(check_loopback(&ok).is_ok());
        assert_eq!((ok.rate, ok.duration), (10_000, Duration::from_secs(5)));
        let lan = parse(&["--interface", "192.168.1.10"]).expect("parses");
        let err = check_loopback(&lan)
            .expect_err("not the loopback")
            .to_string();
        assert!(err.contains("not a loopback address"), "{err}");
        let unicast =
            Wrapper::try_parse_from(["hostile", "--group", "127.0.0.1:7400", "--attack", "junk"])
                .expect("parses")
                .args;
        assert!(check_loopback(&unicast).is_err());
        for bad in [
            &["--duration", "601"][..],
            &["--duration", "0"],
            &["--duration", "NaN"],
            &["--duration", "-1"],
            &["--rate", "0"],
            &["--rate", "2000000"],
            &["--count", "0"],
            &["--ranges", "4001"],
            &["--datagram-bytes", "65508"],
            &["--warmup", "61"],
            &["--attack", "nope"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_plan_is_bounded_and_paced() {
        assert_eq!(planned(10_000, Duration::from_secs(3)), 30_000);
        assert_eq!(planned(3, Duration::from_millis(500)), 2);
        assert_eq!(planned(1_000_000, MAX_DURATION), 600_000_000);
        assert_eq!(offset(0, 10_000), Duration::ZERO);
        assert_eq!(offset(10_000, 10_000), Duration::from_secs(1));
        assert_eq!(offset(u64::MAX, 1), Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn answers_are_what_exceeds_the_normal_traffic() {
        let mut before = Traffic::default();
        before.bytes[listen::HEARTBEAT] = 1000; // 1000 B/s over 1 s
        before.bytes[0] = 500;
        let mut during = Traffic::default();
        during.bytes[listen::HEARTBEAT] = 2500; // over 2 s: 500 above normal
        during.bytes[0] = 10_000; // data: 9000 above normal
        during.bytes[listen::REPAIR] = 7000;
        assert_eq!(
            answer_bytes(Attack::Junk, &before, 1.0, &during, 2.0),
            500 + 9000 + 7000
        );
        // Under the NAK attack the target's data are the test's writes.
        assert_eq!(
            answer_bytes(Attack::Naks, &before, 1.0, &during, 2.0),
            500 + 7000
        );
        assert_eq!(
            answer_bytes(Attack::Junk, &before, 0.0, &Traffic::default(), 0.0),
            0
        );
    }
}
