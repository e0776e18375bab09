//! Shared harness: `NodeCore` as a `chorus_sim::Machine`.
#![allow(dead_code, clippy::unwrap_used)]

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_replication::chorus_protocol::{ClusterId, Config, Incarnation, NodeId, Transmit};
use chorus_replication::{
    Change, CoreError, MemoryDisk, NodeConfig, NodeCore, NodeEvent, Version, WallClock,
};
use chorus_sim::{Machine, Sim, SimConfig, Spawn};

/// A node's in-memory disk, shared between the machine of each life and the harness (which
/// keeps it across a crash, or drops it to lose the disk with the node).
pub type Disk = Rc<RefCell<MemoryDisk>>;

/// The disks of a simulation by node index (see [`sim_durable`]).
pub type Disks = Rc<RefCell<BTreeMap<usize, Disk>>>;

/// One simulated node: the real `NodeCore`, plus what the test observed of its events.
pub struct SimNode {
    pub core: NodeCore,
    /// Latest version reported per key by change events of this machine's life.
    pub last_version: HashMap<String, Version>,
    /// Change events that went backwards in version order.
    pub order_violations: Vec<String>,
    pub changes: u64,
    /// Every change event of this machine's life, in the order it was reported: what a
    /// watcher subscribed from the start would have received.
    pub events: Vec<Change>,
    pub in_sync: bool,
    pub in_sync_events: u64,
    /// The node's durable store, if it has one: fed from `poll_persist` after every input,
    /// synced (as an fsync would) on every timer, which then acknowledges the writes it
    /// covers.
    pub disk: Option<Disk>,
    /// Every `Acked` of this life: (ticket, result), in the order reported.
    pub acked: Vec<(u64, Result<Version, CoreError>)>,
    /// The store this life started with (loaded from its disk; empty otherwise) and its
    /// revision: a watch from the start of this life reads it, then follows the events.
    pub initial: BTreeMap<String, (Version, Option<Bytes>)>,
    pub initial_revision: u64,
    /// Every `Message` and `MessagesLost` of this life, in the order reported: what a
    /// subscription to every topic from the start of the life would have received.
    pub messages: Vec<NodeEvent>,
}

impl SimNode {
    /// Drains the core's events (the simulator does it after every input; call it after a
    /// command issued through `Sim::act` to see that command's events at once).
    pub fn drain(&mut self) {
        if let Some(disk) = &self.disk {
            while let Some(item) = self.core.poll_persist() {
                disk.borrow_mut().accept(item);
            }
        }
        while let Some(e) = self.core.poll_event() {
            match e {
                NodeEvent::Change(c) => {
                    self.changes += 1;
                    if let Some(prev) = self.last_version.get(&c.key)
                        && *prev >= c.version
                    {
                        self.order_violations
                            .push(format!("{}: {} after {}", c.key, c.version, prev));
                    }
                    self.last_version.insert(c.key.clone(), c.version);
                    self.events.push(c);
                }
                NodeEvent::InSync => {
                    self.in_sync = true;
                    self.in_sync_events += 1;
                }
                NodeEvent::OutOfSync => self.in_sync = false,
                NodeEvent::Member(_) => {}
                NodeEvent::Acked { ticket, result } => self.acked.push((ticket, result)),
                NodeEvent::Message(_) | NodeEvent::MessagesLost { .. } => self.messages.push(e),
            }
        }
    }

    /// Syncs the disk (an fsync) and tells the node how far it is durable.
    pub fn sync_disk(&mut self) {
        let Some(disk) = &self.disk else {
            return;
        };
        let through = disk.borrow_mut().sync();
        self.core.handle_persisted(through);
        self.drain();
    }

    /// Store contents without node-local revisions.
    pub fn contents(&self) -> BTreeMap<String, (Version, Option<Bytes>)> {
        self.core
            .store()
            .entries()
            .into_iter()
            .map(|(k, e)| (k, (e.version, e.value)))
            .collect()
    }
}

impl Machine for SimNode {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.core.handle_datagram(now, from, datagram);
        self.drain();
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.core.handle_timeout(now);
        self.drain();
        self.sync_disk();
    }
    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.core.poll_transmit(now)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.core.poll_timeout()
    }
}

/// Builds a simulator whose nodes run `NodeCore` with the lossy protocol preset.
/// `tune` adjusts each node's configuration.
pub fn sim(config: SimConfig, tune: impl Fn(&mut NodeConfig) + 'static) -> Sim<SimNode> {
    sim_with(config, tune, |spawn, nc| NodeCore::new(nc, spawn.now))
}

/// Like [`sim`], with each node's `NodeCore` built by `make` from its tuned configuration
/// (e.g. restored from a store "found on disk").
pub fn sim_with(
    config: SimConfig,
    tune: impl Fn(&mut NodeConfig) + 'static,
    make: impl Fn(&Spawn, NodeConfig) -> NodeCore + 'static,
) -> Sim<SimNode> {
    build(config, tune, move |spawn, nc| (make(spawn, nc), None))
}

/// Like [`sim`], with durable nodes: each has a [`MemoryDisk`] in `disks`. A node that
/// (re)starts with a disk there restarts from what that disk kept (what was synced); one
/// without gets a new, empty disk. Remove a node's disk from `disks` before crashing it to
/// lose the disk with it.
pub fn sim_durable(
    config: SimConfig,
    tune: impl Fn(&mut NodeConfig) + 'static,
    disks: Disks,
) -> Sim<SimNode> {
    build(config, tune, move |spawn, nc| {
        let mut table = disks.borrow_mut();
        let disk = table
            .entry(spawn.index)
            .or_insert_with(|| Rc::new(RefCell::new(MemoryDisk::new())))
            .clone();
        let loaded = disk.borrow_mut().crash();
        (NodeCore::restore(nc, spawn.now, loaded), Some(disk))
    })
}

fn build(
    config: SimConfig,
    tune: impl Fn(&mut NodeConfig) + 'static,
    make: impl Fn(&Spawn, NodeConfig) -> (NodeCore, Option<Disk>) + 'static,
) -> Sim<SimNode> {
    let epoch: Rc<Cell<Option<Instant>>> = Rc::new(Cell::new(None));
    Sim::new(config, move |spawn: &Spawn| {
        // Every node shares the wall-clock mapping of the first spawn (the sim epoch).
        let e = epoch.get().unwrap_or(spawn.now);
        epoch.set(Some(e));
        let proto = Config::lossy(
            ClusterId::from_name("replication-tests"),
            NodeId(spawn.index as u64 + 1),
            Incarnation(u64::from(spawn.restarts) + 1),
            spawn.seed,
        );
        let mut nc = NodeConfig::new(proto, WallClock::simulated(e));
        nc.replica.buckets = NonZeroU32::new(64).unwrap();
        nc.replica.sync_interval = Duration::from_secs(1);
        nc.replica.solo_in_sync_after = Duration::from_secs(2);
        tune(&mut nc);
        let (core, disk) = make(spawn, nc);
        let initial = core
            .store()
            .entries()
            .into_iter()
            .map(|(k, e)| (k, (e.version, e.value)))
            .collect();
        let initial_revision = core.store().revision();
        SimNode {
            initial,
            initial_revision,
            core,
            last_version: HashMap::new(),
            order_violations: Vec::new(),
            changes: 0,
            events: Vec::new(),
            in_sync: false,
            in_sync_events: 0,
            disk,
            acked: Vec::new(),
            messages: Vec::new(),
        }
    })
}

/// Whether every live node holds the same contents, has no backlog and reports in sync.
pub fn settled(sim: &Sim<SimNode>) -> bool {
    let live = sim.live_nodes();
    let Some(first) = live.first().and_then(|i| sim.node(*i).machine()) else {
        return true;
    };
    let reference = first.contents();
    live.iter().all(|i| {
        sim.node(*i)
            .machine()
            .is_some_and(|m| m.in_sync && !m.core.has_backlog() && m.contents() == reference)
    })
}

/// Runs in steps of `step` until [`settled`] or `timeout`; returns whether it settled.
pub fn run_until_settled(sim: &mut Sim<SimNode>, step: Duration, timeout: Duration) -> bool {
    let start = sim.elapsed();
    while sim.elapsed() - start < timeout {
        sim.run_for(step);
        if settled(sim) {
            return true;
        }
    }
    settled(sim)
}
