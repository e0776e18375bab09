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
//!
//! Rooms: `clock` (the shared clock, the payload stamp, pacing), `hist` (the latency
//! histogram), `tally` (what a receiver counts and when it stops), `raw` (the raw UDP
//! baseline), `chorus` (the Chorus runs and the late joiner), `ddsperf` (the Cyclone DDS peer's
//! row), `side` (one side per process); this module holds the command, its figures and the
//! table.

mod chorus;
mod clock;
mod ddsperf;
mod hist;
mod raw;
mod side;
mod tally;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use tally::Tally;

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
        return side::run_side(args, role, receivers);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let max = Duration::from_secs(args.max_secs.max(1));
    if let Some(keys) = args.late_join {
        let size = args.sizes.first().copied().unwrap_or(100);
        let (write, join, held) =
            runtime.block_on(chorus::late_join(pick_group(seed, 99), keys, size, max))?;
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
    let mut peer = ddsperf::Peer::default();
    for (i, &size) in args.sizes.iter().enumerate() {
        let salt = i as u64 * 2;
        eprintln!("  {size} B: raw UDP ...");
        let raw = raw::measure(
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
            let ch = runtime.block_on(chorus::measure(
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
            peer.measure(
                size,
                receivers,
                Duration::from_secs(args.peer_secs.max(2)),
                raw.msgs_per_sec(),
                &mut lines,
                &mut ratios,
            );
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
        peer.print_notes();
    }
    Ok(())
}
