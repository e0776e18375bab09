//! Shared harness for the protocol tests: a cluster of real `chorus_protocol::Endpoint`s in the
//! simulator, an observer that checks every delivered stream as its events happen, a ledger of
//! what was sent, and seeded scenario generation.
//!
//! Invariants checked (see `Ledger::observe` and `Cluster::coverage_gaps`):
//! (a) per (receiver life, sender life) delivery is in order and exactly once, and every payload
//!     is the one sent with that seq;
//! (c) nothing is silently skipped: Delivered and Lost events of a stream are contiguous from
//!     the first seq the receiver reported;
//! (b) after healing and quiescence every live receiver's stream of every live sender it knows
//!     reaches the sender's last seq (delivered or Lost).

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use chorus_protocol::{ClusterId, Config, Endpoint, Event, Incarnation, NodeId, SendError};
use chorus_sim::{LinkConfig, SEED_ENV, Sim, SimConfig, Spawn, seed_from_env};
use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One life of one node: the identity of a stream.
pub type Life = (NodeId, Incarnation);

/// The node id the harness gives node index `i`.
pub fn node_id(index: usize) -> NodeId {
    NodeId(index as u64 + 1)
}

/// Which protocol preset a scenario runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// `Config::lan`.
    Lan,
    /// `Config::lossy`.
    Lossy,
}

impl Preset {
    pub fn config(self, node: NodeId, incarnation: Incarnation, seed: u64) -> Config {
        let cluster = ClusterId::from_name("chorus-sim-tests");
        match self {
            Preset::Lan => Config::lan(cluster, node, incarnation, seed),
            Preset::Lossy => Config::lossy(cluster, node, incarnation, seed),
        }
    }
}

/// A message accepted by `Endpoint::send`.
#[derive(Clone, Debug)]
pub struct Sent {
    pub at: Duration,
    pub payload: Bytes,
}

/// The state of one (receiver life, sender life) stream as seen through events.
#[derive(Clone, Debug, Default)]
pub struct Track {
    /// First seq the receiver reported (delivered or lost).
    pub first: u64,
    /// Next seq expected.
    pub next: u64,
    pub delivered: u64,
    pub lost: u64,
}

/// Everything observed and sent, shared between the test and the simulator's observer.
#[derive(Default)]
pub struct Ledger {
    pub sent: HashMap<Life, Vec<Sent>>,
    pub tracks: BTreeMap<(Life, Life), Track>,
    /// When a receiver life first learned of a sender life (MemberJoined / MemberRestarted).
    pub known_since: HashMap<(Life, Life), Duration>,
    /// Each receiver life's membership view: node -> incarnation.
    pub views: HashMap<Life, BTreeMap<NodeId, Incarnation>>,
    pub violations: Vec<String>,
    /// Every event: (virtual time, node index, receiver life, event).
    pub events: Vec<(Duration, usize, Life, Event)>,
    pub keep_events: bool,
    pub delivered: u64,
    pub lost_messages: u64,
}

impl Ledger {
    fn violation(&mut self, at: Duration, node: usize, me: Life, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(format!(
                "t={at:?} node#{node} ({}/{}): {what}",
                me.0.0, me.1.0
            ));
        }
    }

    /// Checks one event of receiver life `me` (node index `node`) at virtual time `at`.
    pub fn observe(&mut self, at: Duration, node: usize, me: Life, event: Event) {
        match &event {
            Event::Delivered {
                sender,
                incarnation,
                seq,
                payload,
            } => {
                let from = (*sender, *incarnation);
                self.delivered += 1;
                if *sender == me.0 {
                    self.violation(at, node, me, format!("delivered its own message seq {seq}"));
                }
                let expected = seq
                    .checked_sub(1)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| self.sent.get(&from).and_then(|s| s.get(i)))
                    .map(|s| s.payload.clone());
                match expected {
                    None => self.violation(
                        at,
                        node,
                        me,
                        format!("delivered {sender}/{incarnation} seq {seq} that was never sent"),
                    ),
                    Some(p) if p != *payload => self.violation(
                        at,
                        node,
                        me,
                        format!(
                            "payload of {sender}/{incarnation} seq {seq} differs from what was sent \
                             ({} vs {} bytes)",
                            payload.len(),
                            p.len()
                        ),
                    ),
                    Some(_) => {}
                }
                self.advance(at, node, me, from, *seq, *seq, false);
            }
            Event::Lost {
                sender,
                incarnation,
                range,
            } => {
                let from = (*sender, *incarnation);
                let (start, end) = (*range.start(), *range.end());
                self.lost_messages += end.saturating_sub(start) + 1;
                if start == 0 || start > end {
                    self.violation(at, node, me, format!("malformed Lost range {range:?}"));
                }
                let sent = self.sent.get(&from).map_or(0, Vec::len) as u64;
                if end > sent {
                    self.violation(
                        at,
                        node,
                        me,
                        format!(
                            "Lost {sender}/{incarnation} {range:?} beyond the {sent} messages sent"
                        ),
                    );
                }
                self.advance(at, node, me, from, start, end, true);
            }
            Event::MemberJoined {
                node: n,
                incarnation,
                ..
            } => {
                self.known_since
                    .entry((me, (*n, *incarnation)))
                    .or_insert(at);
                self.views.entry(me).or_default().insert(*n, *incarnation);
            }
            Event::MemberRestarted { node: n, new, .. } => {
                self.known_since.entry((me, (*n, *new))).or_insert(at);
                self.views.entry(me).or_default().insert(*n, *new);
            }
            Event::MemberLeft {
                node: n,
                incarnation,
                ..
            } => {
                let view = self.views.entry(me).or_default();
                if view.get(n) == Some(incarnation) {
                    view.remove(n);
                }
            }
            Event::MemberSuspected { .. } | Event::MemberAlive { .. } | Event::Writable => {}
        }
        if self.keep_events {
            self.events.push((at, node, me, event));
        }
    }

    /// Moves the (me, from) stream over `start..=end`, which must start exactly where the stream
    /// stands (no duplicate, no reordering, no silent skip).
    #[allow(clippy::too_many_arguments)]
    fn advance(
        &mut self,
        at: Duration,
        node: usize,
        me: Life,
        from: Life,
        start: u64,
        end: u64,
        lost: bool,
    ) {
        let kind = if lost { "Lost" } else { "Delivered" };
        let track = self.tracks.entry((me, from)).or_insert(Track {
            first: start,
            next: start,
            ..Track::default()
        });
        let expected = track.next;
        let count = end.saturating_sub(start) + 1;
        if lost {
            track.lost += count;
        } else {
            track.delivered += count;
        }
        track.next = track.next.max(end + 1);
        if start != expected {
            let what = if start < expected {
                "duplicate or out of order"
            } else {
                "silently skipped"
            };
            self.violation(
                at,
                node,
                me,
                format!(
                    "{what}: {kind} {}/{} {start}..={end} but the stream expected {expected}",
                    from.0, from.1
                ),
            );
        }
    }
}

/// A simulated cluster of real endpoints with a ledger.
pub struct Cluster {
    pub sim: Sim<Endpoint>,
    pub ledger: Rc<RefCell<Ledger>>,
    pub preset: Preset,
}

impl Cluster {
    pub fn new(config: SimConfig, preset: Preset, keep_events: bool) -> Cluster {
        let mut sim = Sim::new(config, move |s: &Spawn| {
            let incarnation = Incarnation(u64::from(s.restarts) + 1);
            Endpoint::new(preset.config(node_id(s.index), incarnation, s.seed), s.now)
        });
        let ledger = Rc::new(RefCell::new(Ledger {
            keep_events,
            ..Ledger::default()
        }));
        let sink = Rc::clone(&ledger);
        let epoch = sim.epoch();
        sim.set_observer(move |now, node, ep: &mut Endpoint| {
            let me = (ep.node_id(), ep.incarnation());
            let mut ledger = sink.borrow_mut();
            while let Some(event) = ep.poll_event() {
                ledger.observe(now - epoch, node, me, event);
            }
        });
        Cluster {
            sim,
            ledger,
            preset,
        }
    }

    /// The current life of node `index`, if it is up.
    pub fn life(&self, index: usize) -> Option<Life> {
        self.sim
            .node(index)
            .machine()
            .map(|ep| (ep.node_id(), ep.incarnation()))
    }

    /// Sends `payload` from node `index`; `None` if the node is down.
    pub fn send(&mut self, index: usize, payload: Bytes) -> Option<Result<u64, SendError>> {
        let life = self.life(index)?;
        let at = self.sim.elapsed();
        let result = self
            .sim
            .act(index, |ep, now| ep.send(now, payload.clone()))?;
        if let Ok(seq) = result {
            let mut ledger = self.ledger.borrow_mut();
            let sent = ledger.sent.entry(life).or_default();
            sent.push(Sent { at, payload });
            assert_eq!(
                seq,
                sent.len() as u64,
                "seqs of {life:?} must count messages from 1"
            );
        }
        Some(result)
    }

    /// Invariant (b): every live receiver's stream of every live sender it knows (and that
    /// sent after it learned of it) ends at the sender's last seq. Returns what is missing.
    pub fn coverage_gaps(&self) -> Vec<String> {
        let ledger = self.ledger.borrow();
        let lives: Vec<(usize, Life)> = (0..self.sim.len())
            .filter_map(|i| self.life(i).map(|l| (i, l)))
            .collect();
        let mut gaps = Vec::new();
        for &(r, receiver) in &lives {
            for &(s, sender) in &lives {
                if r == s {
                    continue;
                }
                let Some(sent) = ledger.sent.get(&sender) else {
                    continue;
                };
                let Some(last) = sent.last() else { continue };
                let track = ledger.tracks.get(&(receiver, sender));
                let known = ledger.known_since.get(&(receiver, sender));
                let required = track.is_some() || known.is_some_and(|&k| last.at > k);
                let reached = track.map_or(0, |t| t.next - 1);
                if required && reached != sent.len() as u64 {
                    gaps.push(format!(
                        "node#{r} has node#{s}'s stream up to {reached} of {}",
                        sent.len()
                    ));
                }
            }
        }
        gaps
    }

    /// Membership convergence: every live node's view is exactly the other live nodes' current
    /// lives, both by its events and by `Endpoint::members()`.
    pub fn membership_gaps(&self) -> Vec<String> {
        let ledger = self.ledger.borrow();
        let lives: Vec<(usize, Life)> = (0..self.sim.len())
            .filter_map(|i| self.life(i).map(|l| (i, l)))
            .collect();
        let mut gaps = Vec::new();
        for &(r, receiver) in &lives {
            let expected: BTreeMap<NodeId, Incarnation> = lives
                .iter()
                .filter(|&&(i, _)| i != r)
                .map(|&(_, l)| l)
                .collect();
            let by_events = ledger.views.get(&receiver).cloned().unwrap_or_default();
            if by_events != expected {
                gaps.push(format!(
                    "node#{r} view by events {by_events:?} != live {expected:?}"
                ));
            }
            if let Some(ep) = self.sim.node(r).machine() {
                let by_members: BTreeMap<NodeId, Incarnation> = ep
                    .members()
                    .into_iter()
                    .map(|m| (m.node, m.incarnation))
                    .collect();
                if by_members != expected {
                    gaps.push(format!(
                        "node#{r} members() {by_members:?} != live {expected:?}"
                    ));
                }
            }
        }
        gaps
    }

    /// Runs until `done` reports nothing missing, checking every `slice` of virtual time, for at
    /// most `timeout`. Returns what is still missing.
    pub fn run_until_empty(
        &mut self,
        mut done: impl FnMut(&Cluster) -> Vec<String>,
        slice: Duration,
        timeout: Duration,
    ) -> Vec<String> {
        let deadline = self.sim.elapsed() + timeout;
        loop {
            let missing = done(self);
            if missing.is_empty() || self.sim.elapsed() >= deadline || self.sim.budget_exhausted() {
                return missing;
            }
            self.sim.run_for(slice);
        }
    }

    pub fn violations(&self) -> Vec<String> {
        self.ledger.borrow().violations.clone()
    }

    /// The last `n` events involving node `index` or its streams, for failure reports.
    pub fn recent_events(&self, n: usize) -> String {
        let ledger = self.ledger.borrow();
        let mut out = String::new();
        let start = ledger.events.len().saturating_sub(n);
        for (at, node, me, ev) in &ledger.events[start..] {
            let _ = match ev {
                Event::Delivered {
                    sender,
                    incarnation,
                    seq,
                    payload,
                } => writeln!(
                    out,
                    "  {at:?} node#{node} ({}/{}): Delivered {}/{} seq {seq} ({} B)",
                    me.0.0,
                    me.1.0,
                    sender.0,
                    incarnation.0,
                    payload.len()
                ),
                _ => writeln!(out, "  {at:?} node#{node} ({}/{}): {ev:?}", me.0.0, me.1.0),
            };
        }
        out
    }
}

/// The proptest configuration: `PROPTEST_CASES` if set, else `default_cases`; a single case
/// when [`SEED_ENV`] pins the seed.
/// Failures persist in `crates/sim/proptest-regressions/<file>` (cargo runs tests from the
/// package root).
pub fn proptest_config(default_cases: u32, file: &'static str) -> ProptestConfig {
    let cases = if seed_from_env().is_some() {
        1
    } else {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_cases)
    };
    ProptestConfig {
        cases,
        max_shrink_iters: 8,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(file))),
        ..ProptestConfig::default()
    }
}

/// The seed to run: the one pinned in the environment, else proptest's.
pub fn pick_seed(generated: u64) -> u64 {
    seed_from_env().unwrap_or(generated)
}

/// How to replay a failing seed.
pub fn replay_hint(seed: u64, test: &str) -> String {
    format!("seed={seed} (replay: {SEED_ENV}={seed} cargo test -p chorus-sim --test {test})")
}

/// One scheduled step of a scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send { node: usize, len: usize },
    Partition { a: Vec<usize>, b: Vec<usize> },
    Heal,
    Crash(usize),
    Restart(usize),
    AddNode,
}

/// A whole schedule derived from one seed.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub seed: u64,
    pub nodes: usize,
    pub preset: Preset,
    pub link: LinkConfig,
    pub actions: Vec<(Duration, Action)>,
}

fn ms(rng: &mut ChaCha8Rng, range: std::ops::RangeInclusive<u64>) -> Duration {
    Duration::from_millis(rng.random_range(range))
}

fn message_len(rng: &mut ChaCha8Rng) -> usize {
    match rng.random_range(0..100) {
        0..=1 => rng.random_range(4_000..=20_000), // many fragments
        2..=11 => rng.random_range(1_300..=4_000), // a few fragments
        _ => rng.random_range(1..=300),            // batched
    }
}

/// Adds a random number (in `count`) of sends, each at a random time (ms in `window`) from
/// a random node of `0..nodes`, of a random length.
fn random_sends(
    rng: &mut ChaCha8Rng,
    count: std::ops::RangeInclusive<usize>,
    window: std::ops::RangeInclusive<u64>,
    nodes: usize,
    actions: &mut Vec<(Duration, Action)>,
) {
    for _ in 0..rng.random_range(count) {
        let at = ms(rng, window.clone());
        let node = rng.random_range(0..nodes);
        actions.push((
            at,
            Action::Send {
                node,
                len: message_len(rng),
            },
        ));
    }
}

fn random_link(rng: &mut ChaCha8Rng, max_loss: f64) -> LinkConfig {
    let loss = if rng.random_bool(0.2) {
        0.0
    } else {
        rng.random_range(0.0..=max_loss)
    };
    LinkConfig::lan()
        .with_loss(loss)
        .with_duplicate(rng.random_range(0.0..=0.1))
        .with_reorder(rng.random_range(0.0..=0.3), ms(rng, 1..=20))
        .with_corrupt(rng.random_range(0.0..=0.05))
        .with_delay(
            Duration::from_micros(rng.random_range(100..=2_000)),
            Duration::from_micros(rng.random_range(0..=2_000)),
        )
}

fn random_split(rng: &mut ChaCha8Rng, nodes: usize) -> (Vec<usize>, Vec<usize>) {
    loop {
        let (a, b): (Vec<usize>, Vec<usize>) = (0..nodes).partition(|_| rng.random_bool(0.5));
        if !a.is_empty() && !b.is_empty() {
            return (a, b);
        }
    }
}

impl Scenario {
    /// Loss 0–50 %, duplication, reordering, corruption, up to two partitions (≤ 3 s, healed),
    /// 5–60 sends of 1 B–20 KB from random nodes at random times over 0.2–5 s. No crashes.
    pub fn chaos(seed: u64) -> Scenario {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xC4A0_5000);
        let nodes = rng.random_range(2..=6);
        let link = random_link(&mut rng, 0.5);
        let preset = if link.loss > 0.25 {
            Preset::Lossy
        } else {
            Preset::Lan
        };
        let mut actions = Vec::new();
        random_sends(&mut rng, 5..=60, 200..=5_000, nodes, &mut actions);
        for _ in 0..rng.random_range(0..=2) {
            let at = ms(&mut rng, 200..=5_000);
            let (a, b) = random_split(&mut rng, nodes);
            actions.push((at, Action::Partition { a, b }));
            actions.push((at + ms(&mut rng, 100..=3_000), Action::Heal));
        }
        actions.sort_by_key(|(at, _)| *at);
        Scenario {
            seed,
            nodes,
            preset,
            link,
            actions,
        }
    }

    /// 3–6 nodes, loss 0–20 % with the other link faults, sends over 0.2–6 s, one or two
    /// crashes (restarted after 0.2–3 s, or never), up to two late joiners, maybe a partition.
    pub fn churn(seed: u64) -> Scenario {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xC4A0_C4A0);
        let nodes = rng.random_range(3..=6);
        let link = random_link(&mut rng, 0.2);
        let mut actions = Vec::new();
        let joiners = rng.random_range(0..=2);
        let total = nodes + joiners;
        for _ in 0..joiners {
            actions.push((ms(&mut rng, 200..=5_000), Action::AddNode));
        }
        for _ in 0..rng.random_range(1..=2) {
            // Only initial nodes crash, so the index always exists when the crash happens.
            let node = rng.random_range(0..nodes);
            let at = ms(&mut rng, 300..=5_000);
            actions.push((at, Action::Crash(node)));
            if rng.random_bool(0.7) {
                actions.push((at + ms(&mut rng, 200..=3_000), Action::Restart(node)));
            }
        }
        if rng.random_bool(0.3) {
            let at = ms(&mut rng, 200..=5_000);
            let (a, b) = random_split(&mut rng, nodes);
            actions.push((at, Action::Partition { a, b }));
            actions.push((at + ms(&mut rng, 100..=2_000), Action::Heal));
        }
        random_sends(&mut rng, 10..=50, 200..=6_000, total, &mut actions);
        actions.sort_by_key(|(at, _)| *at);
        Scenario {
            seed,
            nodes,
            preset: Preset::Lan,
            link,
            actions,
        }
    }

    pub fn sim_config(&self) -> SimConfig {
        SimConfig::new(self.seed, self.nodes)
            .with_link(self.link.clone())
            .with_max_events(5_000_000)
    }

    /// Applies every action at its time. Sends from nodes that are down (or not yet added) are
    /// skipped; returns how many sends the window refused.
    pub fn play(&self, cluster: &mut Cluster) -> usize {
        let mut refused = 0;
        let mut counter = 0u64;
        for (at, action) in &self.actions {
            cluster.sim.run_to(*at);
            match action {
                Action::Send { node, len } => {
                    if *node >= cluster.sim.len() {
                        continue;
                    }
                    counter += 1;
                    let payload = payload(self.seed, *node, counter, *len);
                    if let Some(Err(_)) = cluster.send(*node, payload) {
                        refused += 1;
                    }
                }
                Action::Partition { a, b } => cluster.sim.partition(a, b),
                Action::Heal => cluster.sim.heal(),
                Action::Crash(node) => cluster.sim.crash(*node),
                Action::Restart(node) => cluster.sim.restart(*node),
                Action::AddNode => {
                    cluster.sim.add_node();
                }
            }
        }
        cluster.sim.heal();
        refused
    }
}

/// A recognisable payload: header text then filler derived from the seed.
pub fn payload(seed: u64, node: usize, counter: u64, len: usize) -> Bytes {
    let mut bytes = format!("seed {seed} node {node} msg {counter}|").into_bytes();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ counter);
    while bytes.len() < len {
        bytes.push(rng.random());
    }
    bytes.truncate(len.max(1));
    Bytes::from(bytes)
}
