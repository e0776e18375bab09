//! Stepping: what one event does (a delivery or a timer handed to a machine), starting a
//! machine, and draining a machine's transmits and timer after every input.

use std::time::{Duration, Instant};

use super::queue::Item;
use super::trace::{DropReason, TraceEvent};
use super::{STREAM_NODE, Sim, Spawn};
use crate::Machine;
use crate::seed::derive_seed;

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

impl<M: Machine> Sim<M> {
    pub(super) fn spawn(&mut self, index: usize) {
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
    pub(super) fn after_input(&mut self, index: usize) {
        let now = self.now;
        if let (Some(observer), Some(machine)) =
            (self.observer.as_mut(), self.nodes[index].machine.as_mut())
        {
            observer(now, index, machine);
        }
        self.flush(index);
    }

    /// Drains the transmits of node `index` onto the network and re-arms its timer.
    pub(super) fn flush(&mut self, index: usize) {
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
                self.queue.push(
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

    /// Pops and processes the next live event at or before `limit`.
    pub(super) fn next_event(&mut self, limit: Option<Instant>) -> Option<Step> {
        self.flush_dirty();
        loop {
            if self.events >= self.config.max_events {
                self.budget_exhausted = true;
                return None;
            }
            let (at, item) = self.queue.pop_due(limit)?;
            if let Item::Timer { node, generation } = item {
                let n = &self.nodes[node];
                if n.generation != generation || n.armed != Some(at) {
                    continue; // superseded timer
                }
            }
            self.now = self.now.max(at);
            self.events += 1;
            return Some(self.process(item));
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
}
