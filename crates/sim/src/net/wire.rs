//! The wire: how one transmit becomes per-receiver copies on the links, each lost, blocked,
//! duplicated, delayed or corrupted, and queued for delivery.

use bytes::Bytes;
use chorus_protocol::{Destination, Transmit};

use super::Sim;
use super::links::Carry;
use super::queue::Item;
use super::trace::{self, DropReason, TraceEvent};
use crate::Machine;

impl<M: Machine> Sim<M> {
    pub(super) fn route(&mut self, from: usize, transmit: Transmit) {
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
            hash: trace::payload_hash(&payload),
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
        let reason = if self.links.is_blocked(from, to) {
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
        let link = self.links.get(from, to, &self.config.link);
        let (first, duplicate) = match link.carry(&mut self.rng, payload) {
            Carry::Lost => {
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
            Carry::Delivered { first, duplicate } => (first, duplicate),
        };
        if duplicate.is_some() {
            self.stats.duplicated += 1;
        }
        let generation = self.nodes[to].generation;
        for copy in std::iter::once(first).chain(duplicate) {
            self.stats.reordered += u64::from(copy.reordered);
            self.stats.corrupted += u64::from(copy.corrupted);
            self.queue.push(
                self.now + copy.delay,
                Item::Deliver {
                    to,
                    generation,
                    from,
                    payload: copy.payload,
                    corrupted: copy.corrupted,
                },
            );
        }
    }
}
