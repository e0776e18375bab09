//! Senders on probation: heard from, not members yet.
//!
//! A new (node, incarnation) is a *candidate* until a heartbeat of it arrives at least half a
//! heartbeat interval after its first heartbeat: a spoofed one-shot datagram, or a stream of
//! NAKs or data, never gets further.
//! A candidate's stream holds what it sends without delivering it; it emits no event. The
//! table is bounded: when it is full the oldest candidate makes room, so that a flood of
//! fresh ids cannot keep a real newcomer out for longer than the table takes to turn over.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Instant;

use crate::recv::RecvStream;
use crate::{Incarnation, NodeId};

#[derive(Debug)]
pub(crate) struct Candidate {
    pub(crate) incarnation: Incarnation,
    pub(crate) addr: SocketAddr,
    pub(crate) first_heard: Instant,
    /// When its first heartbeat came.
    pub(crate) first_heartbeat: Option<Instant>,
    pub(crate) stream: RecvStream,
    /// Datagram bytes received from it: what its NAKs may cost is at most three times this.
    pub(crate) received: u64,
    /// Repair bytes its NAKs have cost so far.
    pub(crate) answered: u64,
    /// Our highest sequence number sent when it was first heard: once a member, it counts as
    /// having delivered only up to there, so what we sent since stays repairable for it as
    /// long as the window holds it.
    pub(crate) acked: u64,
}

impl Candidate {
    /// Repair bytes it may still have: `3 * received - answered` (quinn's anti-amplification
    /// rule for unvalidated addresses).
    pub(crate) fn allowance(&self) -> u64 {
        self.received
            .saturating_mul(3)
            .saturating_sub(self.answered)
    }
}

/// The probation table, by node id and by age.
#[derive(Debug, Default)]
pub(crate) struct Candidates {
    by_node: HashMap<NodeId, Candidate>,
    /// Rank order (arrival order) to node: the oldest first.
    by_order: BTreeMap<u64, NodeId>,
}

impl Candidates {
    pub(crate) fn len(&self) -> usize {
        self.by_node.len()
    }

    pub(crate) fn get(&self, node: &NodeId) -> Option<&Candidate> {
        self.by_node.get(node)
    }

    pub(crate) fn get_mut(&mut self, node: &NodeId) -> Option<&mut Candidate> {
        self.by_node.get_mut(node)
    }

    /// Adds a candidate; its stream's rank order must be newer than every other's.
    pub(crate) fn insert(&mut self, node: NodeId, candidate: Candidate) {
        self.by_order.insert(candidate.stream.rank.order, node);
        if let Some(old) = self.by_node.insert(node, candidate) {
            self.by_order.remove(&old.stream.rank.order);
        }
    }

    pub(crate) fn remove(&mut self, node: &NodeId) -> Option<Candidate> {
        let candidate = self.by_node.remove(node)?;
        self.by_order.remove(&candidate.stream.rank.order);
        Some(candidate)
    }

    /// The candidate heard first, and when.
    pub(crate) fn oldest(&self) -> Option<(NodeId, Instant)> {
        let (_, node) = self.by_order.first_key_value()?;
        self.by_node.get(node).map(|c| (*node, c.first_heard))
    }
}
