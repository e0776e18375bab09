//! Shared harness: `NodeCore` as a `chorus_sim::Machine`.
#![allow(dead_code, clippy::unwrap_used)]

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_replication::chorus_protocol::{ClusterId, Config, Incarnation, NodeId, Transmit};
use chorus_replication::{
    Change, Durability, DurableError, DurableStats, Entry, NodeConfig, NodeCore, NodeEvent,
    Version, WallClock, wire,
};
use chorus_sim::{Machine, Sim, SimConfig, Spawn};

/// A durable backend that keeps nothing: for tests of what `Replica::restore` and
/// `NodeCore::with_durability` do with a store "found on disk".
#[derive(Debug, Default)]
pub struct Forgetful;

impl Durability for Forgetful {
    fn append(&mut self, _record: &wire::LogRecord, _local: bool) {}
    fn flush(&mut self, _now: Instant, _force: bool) -> Result<(), DurableError> {
        Ok(())
    }
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
    fn wants_compaction(&self) -> bool {
        false
    }
    fn compact(
        &mut self,
        _entries: &BTreeMap<String, Entry>,
        _wall_ms: u64,
    ) -> Result<(), DurableError> {
        Ok(())
    }
    fn stats(&self) -> DurableStats {
        DurableStats::default()
    }
}

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
}

impl SimNode {
    /// Drains the core's events (the simulator does it after every input; call it after a
    /// command issued through `Sim::act` to see that command's events at once).
    pub fn drain(&mut self) {
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
            }
        }
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
        SimNode {
            core: make(spawn, nc),
            last_version: HashMap::new(),
            order_violations: Vec::new(),
            changes: 0,
            events: Vec::new(),
            in_sync: false,
            in_sync_events: 0,
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
