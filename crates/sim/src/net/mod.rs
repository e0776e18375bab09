//! The simulated network: the [`Sim`] that owns the nodes, the virtual clock, the seeded RNG
//! and the event queue.
//!
//! Rooms: `config` (the run's [`SimConfig`]), `node` (a [`Node`] and what its factory is told),
//! `links` (what a link does to a datagram; overrides and partitions), `queue` (the event
//! queue), `wire` (a transmit becoming copies on links), `step` (what one event does to a
//! machine), `stats` (counters), `trace` (trace events and the digest). This module holds the
//! [`Sim`] itself: its state, its public controls and the run functions.

mod config;
mod links;
mod node;
mod queue;
mod stats;
mod step;
mod trace;
mod wire;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::Machine;
use crate::seed::{SEED_ENV, derive_seed};

pub use config::SimConfig;
pub use links::LinkConfig;
pub use node::{Node, Spawn, node_addr};
pub use stats::{NetStats, NodeNetStats};
pub use step::{Step, StepKind};
pub use trace::{DropReason, TraceEvent};

use links::Links;
use queue::EventQueue;
use trace::{Keep, Recorder};

/// Sub-seed stream for the network's own RNG.
const STREAM_NET: u64 = 1;
/// Sub-seed stream for the per-node seeds handed to the factory.
const STREAM_NODE: u64 = 2;

type Factory<M> = Box<dyn FnMut(&Spawn) -> M>;
type Observer<M> = Box<dyn FnMut(Instant, usize, &mut M)>;

/// The simulator: N nodes of machine type `M` on a virtual clock and a seeded network.
///
/// # Examples
///
/// ```
/// use std::{collections::VecDeque, net::SocketAddr, time::{Duration, Instant}};
/// use bytes::Bytes;
/// use chorus_protocol::{Destination, Transmit};
/// use chorus_sim::{LinkConfig, Machine, Sim, SimConfig, Spawn};
///
/// /// Multicasts what it is told, counts what it hears.
/// #[derive(Default)]
/// struct Echo { out: VecDeque<Transmit>, heard: usize }
/// impl Machine for Echo {
///     fn handle_datagram(&mut self, _: Instant, _: SocketAddr, _: &[u8]) { self.heard += 1 }
///     fn handle_timeout(&mut self, _: Instant) {}
///     fn poll_transmit(&mut self, _: Instant) -> Option<Transmit> { self.out.pop_front() }
///     fn poll_timeout(&self) -> Option<Instant> { None }
/// }
///
/// let config = SimConfig::new(7, 3).with_link(LinkConfig::lan().with_loss(0.5));
/// let mut sim = Sim::new(config, |_: &Spawn| Echo::default());
/// for _ in 0..100 {
///     sim.act(0, |m, _now| m.out.push_back(Transmit {
///         destination: Destination::Group,
///         payload: Bytes::from_static(b"hi"),
///     }));
/// }
/// let heard = |sim: &mut Sim<Echo>| sim.node(1).machine().map_or(0, |m| m.heard);
/// let converged = sim.run_until(|sim| heard(sim) >= 20, Duration::from_secs(1));
/// assert!(converged);
/// assert_eq!(sim.node(0).machine().map(|m| m.heard), Some(0)); // the group excludes the sender
/// ```
pub struct Sim<M> {
    config: SimConfig,
    epoch: Instant,
    now: Instant,
    rng: ChaCha8Rng,
    nodes: Vec<Node<M>>,
    addrs: HashMap<SocketAddr, usize>,
    factory: Factory<M>,
    observer: Option<Observer<M>>,
    queue: EventQueue,
    links: Links,
    stats: NetStats,
    recorder: Recorder,
    events: u64,
    budget_exhausted: bool,
}

impl<M: Machine> Sim<M> {
    /// Builds the simulation and starts nodes `0..config.nodes` at virtual time zero, each with
    /// a machine from `factory`. The factory is kept to build machines for restarts and late
    /// joins.
    ///
    /// This is the only place the wall clock is read: `Instant::now()` once, as the virtual
    /// epoch (an `Instant` cannot be built any other way). Nothing depends on its value.
    pub fn new(config: SimConfig, factory: impl FnMut(&Spawn) -> M + 'static) -> Sim<M> {
        let epoch = Instant::now();
        let rng = ChaCha8Rng::seed_from_u64(derive_seed(config.seed, STREAM_NET, 0));
        let initial = config.nodes;
        let keep = if config.record_trace {
            Keep::Trace
        } else {
            Keep::Digest
        };
        let mut sim = Sim {
            config,
            epoch,
            now: epoch,
            rng,
            nodes: Vec::new(),
            addrs: HashMap::new(),
            factory: Box::new(factory),
            observer: None,
            queue: EventQueue::default(),
            links: Links::default(),
            stats: NetStats::default(),
            recorder: Recorder::new(keep),
            events: 0,
            budget_exhausted: false,
        };
        for _ in 0..initial {
            sim.add_node();
        }
        sim
    }

    /// Installs the observer: called with `(now, node index, machine)` right after every
    /// input the simulator hands to a machine (datagram, timeout, [`Sim::act`]) and after a
    /// machine is started. Drain `poll_event` here to record every event with its time.
    /// Transmits the observer causes are drained like any other.
    ///
    /// Machines already running (the initial nodes) are observed once right away, so whatever
    /// they queued at creation is seen too.
    pub fn set_observer(&mut self, observer: impl FnMut(Instant, usize, &mut M) + 'static) {
        self.observer = Some(Box::new(observer));
        for index in 0..self.nodes.len() {
            if self.nodes[index].is_up() {
                self.after_input(index);
            }
        }
    }

    /// The seed of this run.
    #[must_use]
    pub fn seed(&self) -> u64 {
        self.config.seed
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Current virtual time.
    #[must_use]
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The virtual epoch (time zero).
    #[must_use]
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Virtual time elapsed since the epoch.
    #[must_use]
    pub fn elapsed(&self) -> Duration {
        self.now - self.epoch
    }

    /// Number of nodes (up or down).
    #[must_use]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `index`.
    ///
    /// # Panics
    /// If `index` is not a node of this simulation.
    #[must_use]
    pub fn node(&self, index: usize) -> &Node<M> {
        &self.nodes[index]
    }

    /// Node `index`, mutably; the simulator drains the transmits of its machine before the next
    /// step, so commands issued through it behave like [`Sim::act`] (minus the observer call).
    ///
    /// # Panics
    /// If `index` is not a node of this simulation.
    #[must_use]
    pub fn node_mut(&mut self, index: usize) -> &mut Node<M> {
        let node = &mut self.nodes[index];
        node.dirty = true;
        node
    }

    /// Indices of the nodes that are up.
    #[must_use]
    pub fn live_nodes(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .filter(|n| n.is_up())
            .map(|n| n.index)
            .collect()
    }

    /// The node with virtual address `addr`.
    #[must_use]
    pub fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        self.addrs.get(&addr).copied()
    }

    /// Network counters.
    #[must_use]
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// The full trace, empty unless [`SimConfig::record_trace`].
    #[must_use]
    pub fn trace(&self) -> &[TraceEvent] {
        self.recorder.events()
    }

    /// A running hash of every trace event (kept even without a recorded trace): two runs
    /// behaved identically on the wire exactly when (barring hash collisions) their digests
    /// match.
    #[must_use]
    pub fn digest(&self) -> u64 {
        self.recorder.digest()
    }

    /// Events processed so far.
    #[must_use]
    pub fn events_processed(&self) -> u64 {
        self.events
    }

    /// Whether [`SimConfig::max_events`] stopped the run.
    #[must_use]
    pub fn budget_exhausted(&self) -> bool {
        self.budget_exhausted
    }

    /// Runs `f` on node `index`'s machine at the current virtual time, then calls the observer
    /// and drains the machine's transmits. Returns `None` (without calling `f`) if the node is
    /// down.
    ///
    /// # Panics
    /// If `index` is not a node of this simulation.
    pub fn act<R>(&mut self, index: usize, f: impl FnOnce(&mut M, Instant) -> R) -> Option<R> {
        let now = self.now;
        let machine = self.nodes[index].machine.as_mut()?;
        let result = f(machine, now);
        self.after_input(index);
        Some(result)
    }

    /// Replaces the behaviour of the directed link `from → to`.
    pub fn set_link(&mut self, from: usize, to: usize, link: LinkConfig) {
        self.links.set(from, to, link);
    }

    /// Replaces the default link behaviour (links with an override keep it).
    pub fn set_default_link(&mut self, link: LinkConfig) {
        self.config.link = link;
    }

    /// Removes every per-link override.
    pub fn clear_link_overrides(&mut self) {
        self.links.clear_overrides();
    }

    /// The behaviour of the directed link `from → to`.
    #[must_use]
    pub fn link(&self, from: usize, to: usize) -> &LinkConfig {
        self.links.get(from, to, &self.config.link)
    }

    /// Cuts every link between a node of `a` and a node of `b`, both directions. Datagrams
    /// already in flight still arrive; new ones are dropped until [`Sim::heal`].
    pub fn partition(&mut self, a: &[usize], b: &[usize]) {
        self.links.partition(a, b);
    }

    /// Cuts node `index` off from every other node (present and future ones are not affected
    /// by a later [`Sim::add_node`]).
    pub fn isolate(&mut self, index: usize) {
        let others: Vec<usize> = (0..self.nodes.len()).filter(|&i| i != index).collect();
        self.partition(&[index], &others);
    }

    /// Removes every partition.
    pub fn heal(&mut self) {
        self.links.heal();
    }

    /// Whether datagrams from `from` to `to` are currently blocked by a partition.
    #[must_use]
    pub fn is_blocked(&self, from: usize, to: usize) -> bool {
        self.links.is_blocked(from, to)
    }

    /// Whether any partition is in force.
    #[must_use]
    pub fn is_partitioned(&self) -> bool {
        self.links.is_partitioned()
    }

    /// Adds a node and starts it now (late join). Returns its index.
    pub fn add_node(&mut self) -> usize {
        let index = self.nodes.len();
        let addr = node_addr(index);
        self.nodes.push(Node {
            index,
            addr,
            machine: None,
            restarts: 0,
            generation: 0,
            armed: None,
            started_at: None,
            dirty: false,
            net: NodeNetStats::default(),
        });
        self.addrs.insert(addr, index);
        self.spawn(index);
        index
    }

    /// Crashes node `index`: its machine is dropped without any goodbye, its timer and every
    /// datagram in flight to it are discarded. No effect if it is already down.
    ///
    /// # Panics
    /// If `index` is not a node of this simulation.
    pub fn crash(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        if node.machine.take().is_none() {
            return;
        }
        node.generation += 1;
        node.armed = None;
        node.started_at = None;
        node.dirty = false;
        self.stats.crashes += 1;
        let at = self.elapsed();
        self.record(TraceEvent::Crashed { at, node: index });
    }

    /// Restarts node `index` with a fresh machine from the factory (its restart count, and so
    /// its incarnation, goes up). A node that is up is crashed first.
    ///
    /// # Panics
    /// If `index` is not a node of this simulation.
    pub fn restart(&mut self, index: usize) {
        self.crash(index);
        self.nodes[index].restarts += 1;
        self.spawn(index);
    }

    /// Processes the next event, whatever its time. `None` when nothing is scheduled or the
    /// event budget is exhausted.
    pub fn step(&mut self) -> Option<Step> {
        self.next_event(None)
    }

    /// Runs until `pred` holds or `timeout` of virtual time has passed (or the event budget is
    /// exhausted). `pred` is checked before the first event and after every event. Returns
    /// whether `pred` held. On timeout the clock is left exactly at the deadline.
    pub fn run_until(
        &mut self,
        mut pred: impl FnMut(&mut Sim<M>) -> bool,
        timeout: Duration,
    ) -> bool {
        let deadline = self.now + timeout;
        loop {
            if pred(self) {
                return true;
            }
            if self.budget_exhausted {
                return false;
            }
            if self.next_event(Some(deadline)).is_none() {
                if self.budget_exhausted {
                    return false;
                }
                self.now = self.now.max(deadline);
                return pred(self);
            }
        }
    }

    /// Runs every event scheduled within the next `duration` of virtual time; the clock ends at
    /// now + `duration` (unless the event budget runs out first).
    pub fn run_for(&mut self, duration: Duration) {
        let deadline = self.now + duration;
        while self.next_event(Some(deadline)).is_some() {}
        if !self.budget_exhausted {
            self.now = self.now.max(deadline);
        }
    }

    /// Runs until virtual time `at` (since the epoch); no effect if it has passed.
    pub fn run_to(&mut self, at: Duration) {
        let target = self.epoch + at;
        if target > self.now {
            self.run_for(target - self.now);
        }
    }

    pub(super) fn record(&mut self, event: TraceEvent) {
        self.recorder.record(event);
    }
}

impl<M> fmt::Debug for Sim<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.config.seed)
            .field("elapsed", &(self.now - self.epoch))
            .field("nodes", &self.nodes.len())
            .field("events", &self.events)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<M> Drop for Sim<M> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "chorus-sim: failing run seed={seed} (virtual time {t:?}, {events} events); \
                 replay with {SEED_ENV}={seed} in tests that read it (chorus_sim::seed_from_env)",
                seed = self.config.seed,
                t = self.now - self.epoch,
                events = self.events,
            );
        }
    }
}
