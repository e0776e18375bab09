//! A simulated node: its address, its machine (or none while crashed), its generation and its
//! network counters; and what the factory is told when it builds a machine.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::stats::NodeNetStats;

/// The UDP port every virtual node listens on.
const NODE_PORT: u16 = 7400;

/// The virtual address of node `index`: `10.0.{index / 250}.{index % 250 + 1}:7400`.
#[must_use]
pub fn node_addr(index: usize) -> SocketAddr {
    let hi = u8::try_from(index / 250).unwrap_or(u8::MAX);
    // `index % 250 + 1` is at most 250, so it always fits a u8.
    let lo = u8::try_from(index % 250 + 1).unwrap_or(u8::MAX);
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, hi, lo)), NODE_PORT)
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
    pub(super) index: usize,
    pub(super) addr: SocketAddr,
    pub(super) machine: Option<M>,
    pub(super) restarts: u32,
    /// Bumped on every crash and start; datagrams and timers of an older generation are dropped.
    pub(super) generation: u64,
    /// The timer currently queued for this node.
    pub(super) armed: Option<Instant>,
    pub(super) started_at: Option<Duration>,
    /// Set by [`Sim::node_mut`]; the simulator drains this node's transmits before its next step.
    pub(super) dirty: bool,
    pub(super) net: NodeNetStats,
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn addresses_are_distinct_and_stable() {
        let addrs: HashSet<SocketAddr> = (0..600).map(node_addr).collect();
        assert_eq!(addrs.len(), 600);
        assert_eq!(node_addr(0).to_string(), "10.0.0.1:7400");
        assert_eq!(node_addr(250).to_string(), "10.0.1.1:7400");
    }
}
