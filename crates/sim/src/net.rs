//! The simulated network: nodes, links, the event queue and the virtual clock.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_protocol::{Destination, Transmit};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Machine;
use crate::seed::{SEED_ENV, derive_seed};

/// The UDP port every virtual node listens on.
const NODE_PORT: u16 = 7400;
/// Sub-seed stream for the network's own RNG.
const STREAM_NET: u64 = 1;
/// Sub-seed stream for the per-node seeds handed to the factory.
const STREAM_NODE: u64 = 2;

/// The virtual address of node `index`: `10.0.{index / 250}.{index % 250 + 1}:7400`.
#[must_use]
pub fn node_addr(index: usize) -> SocketAddr {
    let hi = u8::try_from(index / 250).unwrap_or(u8::MAX);
    // `index % 250 + 1` is at most 250, so it always fits a u8.
    let lo = u8::try_from(index % 250 + 1).unwrap_or(u8::MAX);
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, hi, lo)), NODE_PORT)
}

/// Behaviour of one directed link. Probabilities are in `[0, 1]`; values outside are clamped
/// and NaN counts as 0.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkConfig {
    /// Probability that a datagram is lost on this link (independently per datagram and link).
    pub loss: f64,
    /// Probability that a datagram is delivered twice (each copy with its own delay).
    pub duplicate: f64,
    /// Probability that a datagram gets an extra delay of up to [`LinkConfig::reorder_delay`],
    /// so that later datagrams overtake it.
    pub reorder: f64,
    /// The largest extra delay a reordered datagram gets.
    pub reorder_delay: Duration,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Uniform random extra delay in `[0, jitter]` added to every datagram.
    pub jitter: Duration,
    /// Probability that a delivered datagram is corrupted: 1–3 random bits flipped, or
    /// truncated to a random shorter length (half of the cases each).
    pub corrupt: f64,
}

impl LinkConfig {
    /// A link that never loses, duplicates, reorders or corrupts; 100 µs delay, no jitter.
    #[must_use]
    pub fn perfect() -> LinkConfig {
        LinkConfig {
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
            delay: Duration::from_micros(100),
            jitter: Duration::ZERO,
            corrupt: 0.0,
        }
    }

    /// A LAN-like link: 200 µs ± 100 µs, otherwise perfect.
    #[must_use]
    pub fn lan() -> LinkConfig {
        LinkConfig {
            delay: Duration::from_micros(200),
            jitter: Duration::from_micros(100),
            ..LinkConfig::perfect()
        }
    }

    /// This link with loss probability `loss`.
    #[must_use]
    pub fn with_loss(mut self, loss: f64) -> LinkConfig {
        self.loss = loss;
        self
    }

    /// This link with duplication probability `duplicate`.
    #[must_use]
    pub fn with_duplicate(mut self, duplicate: f64) -> LinkConfig {
        self.duplicate = duplicate;
        self
    }

    /// This link reordering with probability `reorder` by up to `max_extra_delay`.
    #[must_use]
    pub fn with_reorder(mut self, reorder: f64, max_extra_delay: Duration) -> LinkConfig {
        self.reorder = reorder;
        self.reorder_delay = max_extra_delay;
        self
    }

    /// This link with base delay `delay` and jitter `jitter`.
    #[must_use]
    pub fn with_delay(mut self, delay: Duration, jitter: Duration) -> LinkConfig {
        self.delay = delay;
        self.jitter = jitter;
        self
    }

    /// This link with corruption probability `corrupt`.
    #[must_use]
    pub fn with_corrupt(mut self, corrupt: f64) -> LinkConfig {
        self.corrupt = corrupt;
        self
    }
}

impl Default for LinkConfig {
    fn default() -> LinkConfig {
        LinkConfig::lan()
    }
}

/// Configuration of a [`Sim`]. Built with [`SimConfig::new`] and the `with_*` methods.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The one seed every random choice of the run flows from.
    pub seed: u64,
    /// Nodes started at virtual time zero (indices `0..nodes`).
    pub nodes: usize,
    /// The link behaviour of every directed link without an override ([`Sim::set_link`]).
    pub link: LinkConfig,
    /// Hard bound on the number of events processed over the whole run; once reached every
    /// run function stops and [`Sim::budget_exhausted`] is true.
    pub max_events: u64,
    /// Bound on transmits drained from one machine after one input; protects the run from a
    /// machine that never stops transmitting (the rest is drained after its next input).
    pub max_transmits_per_poll: usize,
    /// Whether to keep a full [`TraceEvent`] log (the [`Sim::digest`] is always kept).
    pub record_trace: bool,
}

impl SimConfig {
    /// `nodes` nodes on LAN links, seeded with `seed`, at most 10 million events, no trace.
    #[must_use]
    pub fn new(seed: u64, nodes: usize) -> SimConfig {
        SimConfig {
            seed,
            nodes,
            link: LinkConfig::lan(),
            max_events: 10_000_000,
            max_transmits_per_poll: 10_000,
            record_trace: false,
        }
    }

    /// This config with default link behaviour `link`.
    #[must_use]
    pub fn with_link(mut self, link: LinkConfig) -> SimConfig {
        self.link = link;
        self
    }

    /// This config with event budget `max_events`.
    #[must_use]
    pub fn with_max_events(mut self, max_events: u64) -> SimConfig {
        self.max_events = max_events;
        self
    }

    /// This config recording (or not) a full trace.
    #[must_use]
    pub fn with_trace(mut self, record_trace: bool) -> SimConfig {
        self.record_trace = record_trace;
        self
    }
}

/// What the factory is told when it builds a machine for a node.
#[derive(Clone, Debug)]
pub struct Spawn {
    /// Node index in the simulation.
    pub index: usize,
    /// The node's virtual address.
    pub addr: SocketAddr,
    /// How many times this node has been restarted before (0 on first start); a machine
    /// should use it to pick a fresh incarnation.
    pub restarts: u32,
    /// Current virtual time (the machine's creation time).
    pub now: Instant,
    /// A seed for the machine's own RNG, derived from the simulation seed, the index and the
    /// restart count.
    pub seed: u64,
}

/// One simulated node: its address, its machine (`None` while crashed) and its history.
pub struct Node<M> {
    index: usize,
    addr: SocketAddr,
    machine: Option<M>,
    restarts: u32,
    /// Bumped on every crash and start; datagrams and timers of an older generation are dropped.
    generation: u64,
    /// The timer currently queued for this node.
    armed: Option<Instant>,
    started_at: Option<Duration>,
    /// Set by [`Sim::node_mut`]; the simulator drains this node's transmits before its next step.
    dirty: bool,
    net: NodeNetStats,
}

/// Network counters of one node (over all its lives).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeNetStats {
    /// Transmits this node put on the network.
    pub datagrams_sent: u64,
    /// Per-receiver copies of those transmits.
    pub copies_sent: u64,
    /// Copies of this node's transmits lost at random on the wire.
    pub copies_lost: u64,
    /// This node's transmits of which at least one copy was lost at random.
    pub datagrams_with_loss: u64,
    /// Datagrams handed to this node's machine.
    pub datagrams_received: u64,
}

impl<M> Node<M> {
    /// Node index.
    #[must_use]
    pub fn index(&self) -> usize {
        self.index
    }

    /// Virtual address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The running machine, `None` while the node is crashed.
    #[must_use]
    pub fn machine(&self) -> Option<&M> {
        self.machine.as_ref()
    }

    /// The running machine, mutably. Transmits it queues are drained before the next step.
    #[must_use]
    pub fn machine_mut(&mut self) -> Option<&mut M> {
        self.machine.as_mut()
    }

    /// Whether the node currently runs a machine.
    #[must_use]
    pub fn is_up(&self) -> bool {
        self.machine.is_some()
    }

    /// How many times the node has been restarted.
    #[must_use]
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// This node's network counters.
    #[must_use]
    pub fn net_stats(&self) -> &NodeNetStats {
        &self.net
    }

    /// Virtual time (since the epoch) at which the current machine was started, if up.
    #[must_use]
    pub fn started_at(&self) -> Option<Duration> {
        self.started_at
    }
}

/// Counters of everything the network did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Transmits taken from machines.
    pub datagrams_sent: u64,
    /// Payload bytes of those transmits.
    pub bytes_sent: u64,
    /// Per-receiver copies attempted (a group transmit to N-1 peers counts N-1).
    pub copies: u64,
    /// Copies handed to a machine (duplicates included).
    pub delivered: u64,
    /// Copies lost at random on the wire ([`LinkConfig::loss`]).
    pub lost: u64,
    /// Transmits of which at least one copy was lost at random (a datagram "lost on the wire"
    /// from the sender's point of view, however many receivers missed it).
    pub datagrams_with_loss: u64,
    /// Copies dropped by a partition.
    pub blocked: u64,
    /// Copies dropped because the receiver was down at send or arrival time.
    pub to_down_node: u64,
    /// Transmits to an address no node has.
    pub unknown_destination: u64,
    /// Extra copies created by duplication.
    pub duplicated: u64,
    /// Copies given an extra reordering delay.
    pub reordered: u64,
    /// Copies corrupted (bit flips or truncation).
    pub corrupted: u64,
    /// `handle_timeout` calls.
    pub timeouts: u64,
    /// Crashes.
    pub crashes: u64,
    /// Machine starts (first starts, restarts and late joins).
    pub starts: u64,
}

/// One entry of the optional trace ([`SimConfig::record_trace`]). Times are virtual time since
/// the epoch, so traces of two runs compare equal exactly when the runs behaved the same.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TraceEvent {
    /// A machine produced a transmit.
    Sent {
        /// When.
        at: Duration,
        /// Sending node.
        from: usize,
        /// Destination node, `None` for the group.
        to: Option<usize>,
        /// Payload length.
        len: usize,
        /// FNV-1a hash of the payload.
        hash: u64,
    },
    /// A copy reached a machine.
    Delivered {
        /// When.
        at: Duration,
        /// Sending node.
        from: usize,
        /// Receiving node.
        to: usize,
        /// Length as delivered (after corruption).
        len: usize,
        /// Whether it was corrupted on the way.
        corrupted: bool,
    },
    /// A copy was dropped (loss, partition, receiver down, unknown address).
    Dropped {
        /// When.
        at: Duration,
        /// Sending node.
        from: usize,
        /// Intended receiver (`None` for an unknown address).
        to: Option<usize>,
        /// Why.
        reason: DropReason,
    },
    /// A machine's timer fired.
    Timeout {
        /// When.
        at: Duration,
        /// Node.
        node: usize,
    },
    /// A node crashed.
    Crashed {
        /// When.
        at: Duration,
        /// Node.
        node: usize,
    },
    /// A node's machine was (re)started.
    Started {
        /// When.
        at: Duration,
        /// Node.
        node: usize,
        /// Restart count (0 on first start).
        restarts: u32,
    },
}

/// Why a copy was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Random loss.
    Lost,
    /// A partition separates sender and receiver.
    Partitioned,
    /// The receiver was down (or restarted) when the copy was sent or arrived.
    ReceiverDown,
    /// No node has the destination address.
    UnknownDestination,
}

/// What one [`Sim::step`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Virtual time since the epoch.
    pub at: Duration,
    /// The node the step concerned.
    pub node: usize,
    /// What happened.
    pub kind: StepKind,
}

/// The kind of a [`Step`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// A datagram from node `from` was handed to the machine.
    Datagram {
        /// Sending node.
        from: usize,
        /// Length as delivered.
        len: usize,
        /// Whether it was corrupted on the way.
        corrupted: bool,
    },
    /// The machine's timer fired.
    Timeout,
    /// A datagram arrived for a node that was down or had restarted since; it was dropped.
    Dropped {
        /// Sending node.
        from: usize,
    },
}

enum Item {
    Deliver {
        to: usize,
        generation: u64,
        from: usize,
        payload: Bytes,
        corrupted: bool,
    },
    Timer {
        node: usize,
        generation: u64,
    },
}

struct Scheduled {
    at: Instant,
    order: u64,
    item: Item,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

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
    queue: BinaryHeap<Reverse<Scheduled>>,
    counter: u64,
    links: HashMap<(usize, usize), LinkConfig>,
    blocked: HashSet<(usize, usize)>,
    stats: NetStats,
    trace: Vec<TraceEvent>,
    digest: u64,
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
        let mut sim = Sim {
            config,
            epoch,
            now: epoch,
            rng,
            nodes: Vec::new(),
            addrs: HashMap::new(),
            factory: Box::new(factory),
            observer: None,
            queue: BinaryHeap::new(),
            counter: 0,
            links: HashMap::new(),
            blocked: HashSet::new(),
            stats: NetStats::default(),
            trace: Vec::new(),
            digest: FNV_OFFSET,
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
        &self.trace
    }

    /// A running hash of every trace event (kept even without a recorded trace): two runs
    /// behaved identically on the wire exactly when (barring hash collisions) their digests
    /// match.
    #[must_use]
    pub fn digest(&self) -> u64 {
        self.digest
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
        self.links.insert((from, to), link);
    }

    /// Replaces the default link behaviour (links with an override keep it).
    pub fn set_default_link(&mut self, link: LinkConfig) {
        self.config.link = link;
    }

    /// Removes every per-link override.
    pub fn clear_link_overrides(&mut self) {
        self.links.clear();
    }

    /// The behaviour of the directed link `from → to`.
    #[must_use]
    pub fn link(&self, from: usize, to: usize) -> &LinkConfig {
        self.links.get(&(from, to)).unwrap_or(&self.config.link)
    }

    /// Cuts every link between a node of `a` and a node of `b`, both directions. Datagrams
    /// already in flight still arrive; new ones are dropped until [`Sim::heal`].
    pub fn partition(&mut self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                if x != y {
                    self.blocked.insert((x, y));
                    self.blocked.insert((y, x));
                }
            }
        }
    }

    /// Cuts node `index` off from every other node (present and future ones are not affected
    /// by a later [`Sim::add_node`]).
    pub fn isolate(&mut self, index: usize) {
        let others: Vec<usize> = (0..self.nodes.len()).filter(|&i| i != index).collect();
        self.partition(&[index], &others);
    }

    /// Removes every partition.
    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    /// Whether datagrams from `from` to `to` are currently blocked by a partition.
    #[must_use]
    pub fn is_blocked(&self, from: usize, to: usize) -> bool {
        self.blocked.contains(&(from, to))
    }

    /// Whether any partition is in force.
    #[must_use]
    pub fn is_partitioned(&self) -> bool {
        !self.blocked.is_empty()
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

    fn spawn(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        node.generation += 1;
        node.armed = None;
        let spawn = Spawn {
            index,
            addr: node.addr,
            restarts: node.restarts,
            now: self.now,
            seed: derive_seed(
                self.config.seed,
                STREAM_NODE,
                (index as u64) << 32 | u64::from(node.restarts),
            ),
        };
        let machine = (self.factory)(&spawn);
        let at = self.now - self.epoch;
        let node = &mut self.nodes[index];
        node.machine = Some(machine);
        node.started_at = Some(at);
        self.stats.starts += 1;
        let restarts = node.restarts;
        self.record(TraceEvent::Started {
            at,
            node: index,
            restarts,
        });
        self.after_input(index);
    }

    /// Observer, then drain transmits, then re-arm the timer of node `index`.
    fn after_input(&mut self, index: usize) {
        let now = self.now;
        if let (Some(observer), Some(machine)) =
            (self.observer.as_mut(), self.nodes[index].machine.as_mut())
        {
            observer(now, index, machine);
        }
        self.flush(index);
    }

    /// Drains the transmits of node `index` onto the network and re-arms its timer.
    fn flush(&mut self, index: usize) {
        self.nodes[index].dirty = false;
        let now = self.now;
        for _ in 0..self.config.max_transmits_per_poll {
            let Some(machine) = self.nodes[index].machine.as_mut() else {
                return;
            };
            let Some(transmit) = machine.poll_transmit(now) else {
                break;
            };
            self.route(index, transmit);
        }
        let node = &mut self.nodes[index];
        let Some(machine) = node.machine.as_ref() else {
            return;
        };
        let wanted = machine.poll_timeout().map(|t| t.max(now));
        if wanted != node.armed {
            node.armed = wanted;
            if let Some(at) = wanted {
                let generation = node.generation;
                self.schedule(
                    at,
                    Item::Timer {
                        node: index,
                        generation,
                    },
                );
            }
        }
    }

    fn flush_dirty(&mut self) {
        for index in 0..self.nodes.len() {
            if self.nodes[index].dirty {
                self.flush(index);
            }
        }
    }

    fn schedule(&mut self, at: Instant, item: Item) {
        let order = self.counter;
        self.counter += 1;
        self.queue.push(Reverse(Scheduled { at, order, item }));
    }

    fn route(&mut self, from: usize, transmit: Transmit) {
        let Transmit {
            destination,
            payload,
        } = transmit;
        self.stats.datagrams_sent += 1;
        self.stats.bytes_sent += payload.len() as u64;
        self.nodes[from].net.datagrams_sent += 1;
        let at = self.elapsed();
        let to = match destination {
            Destination::Group => None,
            Destination::Addr(addr) => match self.addrs.get(&addr) {
                Some(&index) => Some(index),
                None => {
                    self.stats.unknown_destination += 1;
                    self.record(TraceEvent::Dropped {
                        at,
                        from,
                        to: None,
                        reason: DropReason::UnknownDestination,
                    });
                    return;
                }
            },
        };
        self.record(TraceEvent::Sent {
            at,
            from,
            to,
            len: payload.len(),
            hash: fnv1a(FNV_OFFSET, &payload),
        });
        let lost_before = self.stats.lost;
        match to {
            Some(index) => self.send_copy(from, index, &payload),
            None => {
                for index in 0..self.nodes.len() {
                    if index != from {
                        self.send_copy(from, index, &payload);
                    }
                }
            }
        }
        if self.stats.lost > lost_before {
            self.stats.datagrams_with_loss += 1;
            self.nodes[from].net.datagrams_with_loss += 1;
        }
    }

    fn send_copy(&mut self, from: usize, to: usize, payload: &Bytes) {
        self.stats.copies += 1;
        self.nodes[from].net.copies_sent += 1;
        let at = self.elapsed();
        let reason = if self.blocked.contains(&(from, to)) {
            self.stats.blocked += 1;
            Some(DropReason::Partitioned)
        } else if !self.nodes[to].is_up() {
            self.stats.to_down_node += 1;
            Some(DropReason::ReceiverDown)
        } else {
            None
        };
        if let Some(reason) = reason {
            self.record(TraceEvent::Dropped {
                at,
                from,
                to: Some(to),
                reason,
            });
            return;
        }
        let link = self.link(from, to).clone();
        if chance(&mut self.rng, link.loss) {
            self.stats.lost += 1;
            self.nodes[from].net.copies_lost += 1;
            self.record(TraceEvent::Dropped {
                at,
                from,
                to: Some(to),
                reason: DropReason::Lost,
            });
            return;
        }
        let copies = if chance(&mut self.rng, link.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        let generation = self.nodes[to].generation;
        for _ in 0..copies {
            let mut delay = link.delay + random_duration(&mut self.rng, link.jitter);
            if chance(&mut self.rng, link.reorder) {
                self.stats.reordered += 1;
                delay += random_duration(&mut self.rng, link.reorder_delay);
            }
            let corrupted = !payload.is_empty() && chance(&mut self.rng, link.corrupt);
            let bytes = if corrupted {
                self.stats.corrupted += 1;
                corrupt(&mut self.rng, payload)
            } else {
                payload.clone()
            };
            self.schedule(
                self.now + delay,
                Item::Deliver {
                    to,
                    generation,
                    from,
                    payload: bytes,
                    corrupted,
                },
            );
        }
    }

    /// Pops and processes the next live event at or before `limit`.
    fn next_event(&mut self, limit: Option<Instant>) -> Option<Step> {
        self.flush_dirty();
        loop {
            if self.events >= self.config.max_events {
                self.budget_exhausted = true;
                return None;
            }
            let Reverse(next) = self.queue.pop()?;
            if limit.is_some_and(|limit| next.at > limit) {
                self.queue.push(Reverse(next));
                return None;
            }
            if let Item::Timer { node, generation } = next.item {
                let n = &self.nodes[node];
                if n.generation != generation || n.armed != Some(next.at) {
                    continue; // superseded timer
                }
            }
            self.now = self.now.max(next.at);
            self.events += 1;
            return Some(self.process(next.item));
        }
    }

    fn process(&mut self, item: Item) -> Step {
        let now = self.now;
        let at = self.elapsed();
        match item {
            Item::Timer { node, .. } => {
                self.nodes[node].armed = None;
                if let Some(machine) = self.nodes[node].machine.as_mut()
                    && machine.poll_timeout().is_some_and(|t| t <= now)
                {
                    machine.handle_timeout(now);
                    self.stats.timeouts += 1;
                    self.record(TraceEvent::Timeout { at, node });
                }
                self.after_input(node);
                Step {
                    at,
                    node,
                    kind: StepKind::Timeout,
                }
            }
            Item::Deliver {
                to,
                generation,
                from,
                payload,
                corrupted,
            } => {
                let from_addr = self.nodes[from].addr;
                let node = &mut self.nodes[to];
                let machine = match node.machine.as_mut() {
                    Some(machine) if node.generation == generation => machine,
                    _ => {
                        self.stats.to_down_node += 1;
                        self.record(TraceEvent::Dropped {
                            at,
                            from,
                            to: Some(to),
                            reason: DropReason::ReceiverDown,
                        });
                        return Step {
                            at,
                            node: to,
                            kind: StepKind::Dropped { from },
                        };
                    }
                };
                machine.handle_datagram(now, from_addr, &payload);
                node.net.datagrams_received += 1;
                self.stats.delivered += 1;
                let len = payload.len();
                self.record(TraceEvent::Delivered {
                    at,
                    from,
                    to,
                    len,
                    corrupted,
                });
                self.after_input(to);
                Step {
                    at,
                    node: to,
                    kind: StepKind::Datagram {
                        from,
                        len,
                        corrupted,
                    },
                }
            }
        }
    }

    fn record(&mut self, event: TraceEvent) {
        let mut hasher = Fnv(self.digest);
        event.hash(&mut hasher);
        self.digest = hasher.finish();
        if self.config.record_trace {
            self.trace.push(event);
        }
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

/// Bernoulli draw; probabilities are clamped to `[0, 1]` and NaN is 0. Draws nothing for
/// p <= 0, so a perfect link consumes no randomness.
fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    if p.is_nan() || p <= 0.0 {
        return false;
    }
    rng.random::<f64>() < p.min(1.0)
}

fn random_duration(rng: &mut ChaCha8Rng, max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=nanos))
}

/// Flips 1–3 random bits, or truncates to a random shorter length. `payload` is non-empty.
fn corrupt(rng: &mut ChaCha8Rng, payload: &Bytes) -> Bytes {
    if rng.random::<bool>() {
        let len = rng.random_range(0..payload.len());
        return payload.slice(..len);
    }
    let mut bytes = payload.to_vec();
    let flips = rng.random_range(1..=3);
    for _ in 0..flips {
        let bit = rng.random_range(0..bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
    }
    Bytes::from(bytes)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a as a `Hasher`, so the digest never depends on std's randomly keyed hasher.
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = fnv1a(self.0, bytes);
    }
}

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_and_stable() {
        let addrs: HashSet<SocketAddr> = (0..600).map(node_addr).collect();
        assert_eq!(addrs.len(), 600);
        assert_eq!(node_addr(0).to_string(), "10.0.0.1:7400");
        assert_eq!(node_addr(250).to_string(), "10.0.1.1:7400");
    }

    #[test]
    fn corruption_changes_or_shortens_payload() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let payload = Bytes::from_static(b"hello, chorus");
        for _ in 0..200 {
            let out = corrupt(&mut rng, &payload);
            assert!(out.len() < payload.len() || out != payload);
        }
    }

    #[test]
    fn chance_respects_bounds() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        assert!(!chance(&mut rng, 0.0));
        assert!(!chance(&mut rng, f64::NAN));
        assert!(chance(&mut rng, 1.0));
        assert!(chance(&mut rng, 7.0));
    }
}
