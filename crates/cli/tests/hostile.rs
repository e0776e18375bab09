//! Hostile peers: `chorus hostile` plays each attack of issue 13 against a real `chorus agent`
//! without a cluster key (the target) that has one established peer, on loopback multicast
//! (127.0.0.1, TTL 0, a random group and port per test), at 10 000 datagrams/s (30 000 of
//! them; one request test also at 20/s, where a flood's drops cannot hide what one request
//! costs), bounded in count and time. While the attack runs, the test samples the target's (and the peer's) RSS
//! from `/proc/PID/status`, times `GET /v1/kv/...` on the target in a loop, and writes on the
//! peer; afterwards it checks writes still travel both ways. It asserts what
//! `docs/security.md` ("Hostile peers") promises:
//!
//! - RSS growth of either agent ≤ the receive budget it runs with + 64 MiB;
//! - `GET` p99 on the target ≤ 50 ms during the attack (a failed GET counts as infinitely slow);
//! - bytes the target multicast in answer ≤ 3 × the bytes the attacker sent (answers counted
//!   by the tool, which listens to the target during the attack, above its normal traffic; a
//!   flood is partly dropped by the kernel before the target reads it, so the slow request
//!   test is the strict one);
//! - the target and its peer still converge.
//!
//! An agent whose RSS passes that bound by 256 MiB is SIGKILLed at once (the test then fails):
//! the machine is shared. Agents and the tool are killed when their guards drop, also when an
//! assertion fails. Tests run one at a time (a process-wide lock; the machine has two cores).
//!
//! For the figures in docs/security.md, run against a release build with
//! `CHORUS_HOSTILE_BIN=target/release/chorus` and `--nocapture`; `CHORUS_HOSTILE_RSS_CAP_MIB`
//! raises the RSS at which an agent is killed.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_replication::chorus_protocol::{ClusterId, Config, Incarnation, NodeId};
use serde_json::Value;

mod common;

use chorus_testkit::http::try_request as try_http;
use chorus_testkit::net::random_group;
use chorus_testkit::{Agent, poll_until};
use common::{BIN, Net};

const TARGET: u64 = 1;
const PEER: u64 = 2;
const MIB: u64 = 1 << 20;
/// Every flood: 30 000 datagrams at 10 000/s (3 s) ...
const FLOOD: Plan = Plan {
    rate: 10_000,
    count: 30_000,
};
/// ... or until this long, whichever comes first.
const MAX_ATTACK_SECS: u64 = 6;

/// How many datagrams at what rate.
#[derive(Debug, Clone, Copy)]
struct Plan {
    rate: u64,
    count: u64,
}
/// What the assertions allow.
const RSS_SLACK: u64 = 64 * MIB;
const GET_P99: Duration = Duration::from_millis(50);
const MAX_AMPLIFICATION: f64 = 3.0;
/// An agent this far above the allowed RSS is killed (see the module docs).
const KILL_MARGIN: u64 = 256 * MIB;
/// The one big key of the request attack: as large as a value may be (512 KiB).
const BIG_KEY: &str = "hostile/big";
const BIG_VALUE: usize = 512 * 1024;

static SERIAL: Mutex<()> = Mutex::new(());

/// The receive memory budget the agents run with: the LAN preset's (the agent's default)
/// reassembly budget plus its out-of-order buffer budget (`crates/protocol/src/config.rs`).
/// Read in this one place, so that the test follows when they become one budget.
fn receive_budget() -> u64 {
    let c = Config::lan(ClusterId(0), NodeId(0), Incarnation(0), 0);
    c.receive_budget_bytes as u64
}

/// The `chorus` binary the agents and the tool run: this build's, or `CHORUS_HOSTILE_BIN`.
fn bin() -> String {
    std::env::var("CHORUS_HOSTILE_BIN").unwrap_or_else(|_| BIN.to_string())
}

fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn put(http: SocketAddr, key: &str, value: &[u8]) -> bool {
    matches!(
        try_http(http, "PUT", &format!("/v1/kv/{key}"), &[], value),
        Ok((200, _))
    )
}

fn get(http: SocketAddr, key: &str) -> Option<Vec<u8>> {
    match try_http(http, "GET", &format!("/v1/kv/{key}"), &[], b"") {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

fn json(http: SocketAddr, path: &str) -> Option<Value> {
    match try_http(http, "GET", path, &[], b"") {
        Ok((200, body)) => serde_json::from_slice(&body).ok(),
        _ => None,
    }
}

/// Waits (at most `secs`) until `f` holds.
fn wait_until(secs: u64, f: impl FnMut() -> bool) -> bool {
    poll_until(Duration::from_secs(secs), Duration::from_millis(50), f)
}

/// A target agent and its established peer on a group of their own.
struct Lab {
    net: Net,
    target: Agent,
    peer: Agent,
}

impl Lab {
    fn start() -> Lab {
        let started = Instant::now();
        let net = Net::new("hostile");
        let lab = Lab {
            target: net.agent_of(&bin(), TARGET, &[]),
            peer: net.agent_of(&bin(), PEER, &[]),
            net,
        };
        let sees = |a: &Agent, other: u64| {
            json(a.http, "/v1/members").is_some_and(|m| {
                m["members"].as_array().is_some_and(|l| {
                    l.iter()
                        .any(|x| x["node_id"] == other && x["state"] == "alive")
                })
            })
        };
        assert!(
            wait_until(20, || sees(&lab.target, PEER) && sees(&lab.peer, TARGET)),
            "the agents never saw each other:\n{}\n{}",
            lab.target.log_text(),
            lab.peer.log_text()
        );
        for i in 0..10 {
            assert!(put(lab.target.http, &format!("hostile/k{i}"), b"v"));
        }
        assert!(
            wait_until(20, || get(lab.peer.http, "hostile/k9").is_some()),
            "the peer never got the target's writes"
        );
        println!("lab ready in {:.1} s", started.elapsed().as_secs_f64());
        lab
    }

    fn pids(&self) -> [u32; 2] {
        [self.target.child.id(), self.peer.child.id()]
    }
}

/// Threads that run until stopped (at the latest after `MAX_BACKGROUND`), stopped on drop.
struct Background {
    stop: Arc<AtomicBool>,
}

const MAX_BACKGROUND: Duration = Duration::from_secs(90);

impl Background {
    fn new() -> Background {
        Background {
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Runs `step` in a loop on a thread of its own until stopped.
    fn spawn(&mut self, mut step: impl FnMut() + Send + 'static) {
        let stop = self.stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + MAX_BACKGROUND;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                step();
            }
        });
    }

    /// Stops the threads without waiting for them: one may be stuck in an HTTP call to a
    /// stalled agent (for at most the client's 10 s timeout), and will stop after it.
    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How long the agents' memory is watched after the tool exits, at least.
const AFTERMATH: Duration = Duration::from_secs(3);

/// Samples the agents' RSS every 10 ms on a thread of its own, keeps the peaks, and SIGKILLs
/// an agent above its cap (by pid: the agent is a child of this process, not reaped before
/// its guard drops, so the pid cannot have been reused).
struct Watchdog {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<([u64; 2], [bool; 2])>>,
}

impl Watchdog {
    fn start(attack: &'static str, pids: [u32; 2], kill_at: [u64; 2]) -> Watchdog {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new((pids.map(|p| rss(p).unwrap_or(0)), [false; 2])));
        let (stop2, state2) = (stop.clone(), state.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + MAX_BACKGROUND;
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                let mut guard = state2.lock().unwrap();
                let (peak, killed) = &mut *guard;
                for i in 0..2 {
                    if killed[i] {
                        continue;
                    }
                    let now = rss(pids[i]).unwrap_or(0);
                    peak[i] = peak[i].max(now);
                    if now > kill_at[i] {
                        let pid = nix::unistd::Pid::from_raw(pids[i] as i32);
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                        killed[i] = true;
                        println!(
                            "{attack}: agent {} killed at {} MiB of RSS",
                            i + 1,
                            now / MIB
                        );
                    }
                }
                drop(guard);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Watchdog { stop, state }
    }

    fn killed(&self) -> bool {
        self.state.lock().unwrap().1.contains(&true)
    }

    /// Stops sampling; the peaks and which agents were killed.
    fn finish(self) -> ([u64; 2], [bool; 2]) {
        self.stop.store(true, Ordering::Relaxed);
        *self.state.lock().unwrap()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The tool's process, killed on drop.
struct Tool(Child);

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One GET's start and latency (`None`: it failed).
type Sample = (Instant, Option<Duration>);

/// What one attack did.
#[derive(Debug)]
struct Figures {
    attack: &'static str,
    budget: u64,
    rss_before: [u64; 2],
    rss_peak: [u64; 2],
    kill_at: [u64; 2],
    killed: [bool; 2],
    gets: usize,
    get_failures: usize,
    get_p50: Option<Duration>,
    get_p99: Option<Duration>,
    get_max: Option<Duration>,
    tool_ok: bool,
    tool_output: String,
    /// The growth of the target's `protocol_bytes_received` meanwhile, when its counters
    /// could be read: every source, its own multicast looped back included, and only what it
    /// got to (the kernel drops what it cannot take of a flood; a stalled driver counts
    /// late). Printed for information: the bound is checked against what the attacker sent.
    received: Option<u64>,
    result: HashMap<String, String>,
    members_after: Option<u64>,
    converged: bool,
}

impl Figures {
    fn num(&self, key: &str) -> Option<f64> {
        self.result.get(key)?.parse().ok()
    }

    fn growth(&self, i: usize) -> u64 {
        self.rss_peak[i].saturating_sub(self.rss_before[i])
    }

    fn print(&self) {
        let ms = |d: Option<Duration>| {
            d.map_or("inf".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e3))
        };
        println!(
            "FIGURES attack={} rss_before_mib={:.0} rss_peak_mib={:.0} rss_growth_mib={:.0} \
             peer_rss_growth_mib={:.0} allowed_growth_mib={:.0} killed_target={} killed_peer={} \
             gets={} get_failures={} get_p50_ms={} get_p99_ms={} get_max_ms={} sent_datagrams={} \
             sent_bytes={} target_received_bytes={} rate={} ids={} answer_bytes={} ratio={} \
             target_members_after={} converged={}",
            self.attack,
            self.rss_before[0] as f64 / MIB as f64,
            self.rss_peak[0] as f64 / MIB as f64,
            self.growth(0) as f64 / MIB as f64,
            self.growth(1) as f64 / MIB as f64,
            (self.budget + RSS_SLACK) as f64 / MIB as f64,
            self.killed[0],
            self.killed[1],
            self.gets,
            self.get_failures,
            ms(self.get_p50),
            ms(self.get_p99),
            ms(self.get_max),
            self.result.get("datagrams").map_or("?", String::as_str),
            self.result.get("bytes").map_or("?", String::as_str),
            self.received.map_or("?".into(), |r| r.to_string()),
            self.result.get("rate").map_or("?", String::as_str),
            self.result.get("ids").map_or("?", String::as_str),
            self.result.get("answer_bytes").map_or("?", String::as_str),
            self.result.get("ratio").map_or("?", String::as_str),
            self.members_after.map_or("?".into(), |m| m.to_string()),
            self.converged,
        );
    }

    /// Every broken promise, in words (empty: the agent withstood the attack).
    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.tool_ok || self.result.is_empty() {
            out.push(format!("the tool failed:\n{}", self.tool_output));
        }
        let allowed = self.budget + RSS_SLACK;
        for (i, who) in ["target", "peer"].iter().enumerate() {
            if self.killed[i] {
                out.push(format!(
                    "the {who}'s RSS passed {} MiB: killed",
                    self.kill_at[i] / MIB
                ));
            } else if self.growth(i) > allowed {
                out.push(format!(
                    "the {who}'s RSS grew by {} MiB (allowed {} MiB)",
                    self.growth(i) / MIB,
                    allowed / MIB
                ));
            }
        }
        match self.get_p99 {
            Some(p99) if p99 <= GET_P99 => {}
            p99 => out.push(format!(
                "GET p99 on the target {p99:?} (allowed {GET_P99:?}; {} of {} failed)",
                self.get_failures, self.gets
            )),
        }
        if let (Some(answer), Some(sent)) = (self.num("answer_bytes"), self.num("bytes"))
            && answer > MAX_AMPLIFICATION * sent
        {
            out.push(format!(
                "the target answered {answer} bytes to {sent} bytes of the attacker ({:.1} x, \
                 allowed {MAX_AMPLIFICATION} x)",
                answer / sent.max(1.0)
            ));
        }
        if !self.converged {
            out.push("the target and its peer did not converge".into());
        }
        out
    }
}

/// p-th percentile of `samples`, a failed GET counting as infinitely slow (`None`).
fn percentile(samples: &[Option<Duration>], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted: Vec<Option<Duration>> = samples.to_vec();
    // `None` (failed) sorts after every latency.
    sorted.sort_by_key(|s| s.map_or((1, Duration::ZERO), |d| (0, d)));
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Plays `attack` (with the tool's `extra` flags) against the lab's target while measuring;
/// `load` runs on a thread during the whole attack (the NAK attack writes to the target).
fn play(
    lab: &Lab,
    attack: &'static str,
    plan: Plan,
    extra: &[&str],
    load: Option<Box<dyn FnMut() + Send>>,
) -> Figures {
    let budget = receive_budget();
    let allowed = budget + RSS_SLACK;
    let pids = lab.pids();
    let rss_before = pids.map(|p| rss(p).unwrap_or(0));
    let kill_at: [u64; 2] = match std::env::var("CHORUS_HOSTILE_RSS_CAP_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(cap) => [cap * MIB; 2],
        None => rss_before.map(|b| b + allowed + KILL_MARGIN),
    };

    let mut bg = Background::new();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    // The start of the GET in flight, if any: one still stuck when the attack is over counts
    // as failed.
    let in_flight: Arc<Mutex<Option<Instant>>> = Arc::default();
    {
        let (samples, in_flight, http) = (samples.clone(), in_flight.clone(), lab.target.http);
        bg.spawn(move || {
            let t = Instant::now();
            *in_flight.lock().unwrap() = Some(t);
            let ok = get(http, "hostile/k0").is_some();
            *in_flight.lock().unwrap() = None;
            samples.lock().unwrap().push((t, ok.then(|| t.elapsed())));
            std::thread::sleep(Duration::from_millis(5));
        });
    }
    let written: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let (written, http) = (written.clone(), lab.peer.http);
        let mut i = 0u64;
        bg.spawn(move || {
            i += 1;
            let key = format!("hostile/during/{attack}/{i}");
            if put(http, &key, b"during") {
                written.lock().unwrap().push(key);
            }
            std::thread::sleep(Duration::from_millis(100));
        });
    }
    if let Some(load) = load {
        bg.spawn(load);
    }

    let mut args: Vec<String> = [
        "hostile",
        "--group",
        &lab.net.group.to_string(),
        "--interface",
        "127.0.0.1",
        "--cluster",
        &lab.net.cluster,
        "--target",
        &TARGET.to_string(),
        "--attack",
        attack,
        "--rate",
        &plan.rate.to_string(),
        "--count",
        &plan.count.to_string(),
        "--duration",
        &MAX_ATTACK_SECS.to_string(),
        "--warmup",
        "1",
        "--settle",
        "1",
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_string()));
    let received_before = received(lab.target.http);
    let watchdog = Watchdog::start(attack, pids, kill_at);
    let spawned = Instant::now();
    let mut tool = Tool(
        Command::new(bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let attack_from = spawned + Duration::from_secs(1);
    let deadline = spawned + Duration::from_secs(MAX_ATTACK_SECS + 15);
    let status = loop {
        if let Ok(Some(status)) = tool.0.try_wait() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let tool_done = Instant::now();
    let mut tool_output = String::new();
    if let Some(out) = tool.0.stdout.as_mut() {
        let _ = out.read_to_string(&mut tool_output);
    }
    if let Some(err) = tool.0.stderr.as_mut() {
        let _ = err.read_to_string(&mut tool_output);
    }
    if status.is_none() {
        tool_output.push_str("\n(the tool overran its time and was killed)");
    }
    drop(tool);
    bg.finish();
    print!("{tool_output}");
    if let Some(t) = *in_flight.lock().unwrap()
        && t.elapsed() > GET_P99
    {
        samples.lock().unwrap().push((t, None));
    }

    let during: Vec<Option<Duration>> = samples
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| *t >= attack_from)
        .map(|(_, l)| *l)
        .collect();
    let result: HashMap<String, String> = tool_output
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let stats_after = json(lab.target.http, "/v1/stats");
    let members_after = stats_after.as_ref().and_then(|s| s["members"].as_u64());
    let received_after = stats_after
        .as_ref()
        .and_then(|s| s["counters"]["protocol_bytes_received"].as_u64());
    let settled = Instant::now();
    let converged = !watchdog.killed() && converge(lab, &written.lock().unwrap());
    println!(
        "{attack}: attack and settle took {:.1} s, convergence check {:.1} s",
        settled.duration_since(spawned).as_secs_f64(),
        settled.elapsed().as_secs_f64()
    );
    // What a flood left queued in the agents' sockets is still being taken in after the
    // attack: watch the memory a little longer when convergence was quick.
    let watch_until = tool_done + AFTERMATH;
    std::thread::sleep(watch_until.saturating_duration_since(Instant::now()));
    let (rss_peak, killed) = watchdog.finish();
    let figures = Figures {
        attack,
        budget,
        rss_before,
        rss_peak,
        kill_at,
        killed,
        gets: during.len(),
        get_failures: during.iter().filter(|l| l.is_none()).count(),
        get_p50: percentile(&during, 50.0),
        get_p99: percentile(&during, 99.0),
        get_max: percentile(&during, 100.0),
        tool_ok: status.is_some_and(|s| s.success()),
        tool_output,
        received: received_before
            .zip(received_after)
            .map(|(b, a)| a.saturating_sub(b)),
        result,
        members_after,
        converged,
    };
    figures.print();
    figures
}

/// The target's count of bytes received.
fn received(http: SocketAddr) -> Option<u64> {
    json(http, "/v1/stats")?["counters"]["protocol_bytes_received"].as_u64()
}

/// Whether writes still travel both ways (bounded wait): everything the peer wrote during
/// the attack reaches the target, and a new write on each side reaches the other.
fn converge(lab: &Lab, during: &[String]) -> bool {
    let (t, p) = (lab.target.http, lab.peer.http);
    let (mut on_target, mut on_peer) = (false, false);
    wait_until(15, || {
        // A stalled agent may refuse or time out a write: try again until the deadline.
        on_target = on_target || put(t, "hostile/after/target", b"after");
        on_peer = on_peer || put(p, "hostile/after/peer", b"after");
        on_target
            && on_peer
            && get(p, "hostile/after/target").is_some()
            && get(t, "hostile/after/peer").is_some()
            && during.iter().all(|k| get(t, k).is_some())
    })
}

fn check(figures: &Figures) {
    let failures = figures.failures();
    assert!(
        failures.is_empty(),
        "attack {}: {}",
        figures.attack,
        failures.join("; ")
    );
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// What runs on the lab before and during an attack.
enum Setup {
    /// Nothing beyond the lab's own traffic.
    Idle,
    /// Writes on the target during the attack: the NAK attacks need a window full of them
    /// (the attacker, a member that acknowledges nothing, keeps it from being trimmed).
    FillWindow,
    /// The big key, written on the target and held by the peer before the attack.
    BigKey,
}

/// Plays `attack` with the tool's `extra` flags against a fresh lab set up as `setup`, one
/// test at a time.
fn attack(attack: &'static str, plan: Plan, extra: &[&str], setup: Setup) -> Figures {
    let _one = serial();
    let lab = Lab::start();
    let load = match setup {
        Setup::Idle => None,
        Setup::FillWindow => Some(window_filler(lab.target.http)),
        Setup::BigKey => {
            write_big_key(&lab);
            None
        }
    };
    play(&lab, attack, plan, extra, load)
}

#[test]
fn hostile_fragments_with_large_declared_lengths_from_fresh_ids() {
    let figures = attack(
        "fragments",
        FLOOD,
        &["--datagram-bytes", "1300"],
        Setup::Idle,
    );
    assert!(figures.num("ids").unwrap_or(0.0) >= 20_000.0, "{figures:?}");
    check(&figures);
}

#[test]
fn hostile_heartbeats_from_many_fresh_ids() {
    let figures = attack("heartbeats", FLOOD, &[], Setup::Idle);
    assert!(figures.num("ids").unwrap_or(0.0) >= 20_000.0, "{figures:?}");
    check(&figures);
}

/// Writes 2 KiB values on the target in a loop ([`Setup::FillWindow`]).
fn window_filler(http: SocketAddr) -> Box<dyn FnMut() + Send> {
    let value = vec![b'w'; 2048];
    let mut i = 0u64;
    Box::new(move || {
        i += 1;
        let _ = put(http, &format!("hostile/load/{}", i % 500), &value);
        std::thread::sleep(Duration::from_millis(2));
    })
}

#[test]
fn hostile_naks_of_thousands_of_ranges_and_partial_parts() {
    let extra = ["--ranges", "2000", "--partials", "8"];
    check(&attack("naks", FLOOD, &extra, Setup::FillWindow));
}

#[test]
fn hostile_small_naks_against_a_full_window() {
    let extra = ["--ranges", "1", "--partials", "0"];
    check(&attack("naks", FLOOD, &extra, Setup::FillWindow));
}

/// Writes the big key on the target and waits until the peer holds it.
fn write_big_key(lab: &Lab) {
    assert!(put(lab.target.http, BIG_KEY, &vec![b'b'; BIG_VALUE]));
    assert!(
        wait_until(20, || get(lab.peer.http, BIG_KEY).is_some()),
        "the big key never reached the peer"
    );
}

/// Requests of 16 000 bytes (about 1 100 copies of the key each) at 10 000/s: 160 MB/s at the
/// target. (65 000-byte datagrams at that rate are 650 MB/s, which saturates the loopback's
/// packet processing on a 2-core machine so that the kernel itself drops the HTTP client's
/// TCP handshake: a limit of this lab, not of the node; docs/security.md.)
#[test]
fn hostile_requests_naming_one_big_key_many_times() {
    let extra = ["--key", BIG_KEY, "--datagram-bytes", "16000"];
    check(&attack("requests", FLOOD, &extra, Setup::BigKey));
}

/// The same requests at 20/s: a flood mostly overwhelms or is dropped before it is answered,
/// where a slow trickle shows what one request costs in answers.
#[test]
fn hostile_requests_at_a_low_rate_are_not_amplified() {
    let trickle = Plan {
        rate: 20,
        count: 40,
    };
    check(&attack(
        "requests",
        trickle,
        &["--key", BIG_KEY],
        Setup::BigKey,
    ));
}

#[test]
fn hostile_junk_and_mutated_frames() {
    check(&attack("junk", FLOOD, &[], Setup::Idle));
}

#[test]
fn hostile_tool_stays_on_the_loopback_and_says_what_it_misses() {
    let (_, group) = random_group();
    let run = |extra: &[&str]| {
        let mut args = vec!["hostile", "--group"];
        let group = group.to_string();
        args.push(&group);
        args.extend_from_slice(extra);
        let out = Command::new(bin()).args(&args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--attack", "junk", "--interface", "10.1.2.3"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a loopback address"), "{err}");
    let (code, err) = run(&["--attack", "requests", "--warmup", "0.2"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("needs --key"), "{err}");
    // Nobody on this group: nothing to learn the cluster from, nothing is sent.
    let (code, err) = run(&["--attack", "junk", "--warmup", "0.3", "--duration", "0.1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no valid Chorus datagram heard"), "{err}");
}

#[test]
fn percentile_counts_failures_as_slowest() {
    let ms = |n| Some(Duration::from_millis(n));
    let samples = [ms(3), ms(1), None, ms(2)];
    assert_eq!(percentile(&samples, 50.0), ms(2));
    assert_eq!(percentile(&samples, 75.0), ms(3));
    assert_eq!(percentile(&samples, 99.0), None);
    assert_eq!(percentile(&[], 99.0), None);
}
