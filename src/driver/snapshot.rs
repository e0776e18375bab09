//! What the driver publishes for readers: events turned into watch changes, sync state and
//! member snapshots; the counter snapshot.

use std::net::SocketAddr;
use std::sync::PoisonError;

use chorus_protocol::{Event, NodeId};
use chorus_replication::NodeEvent;
use chorus_transport::DatagramTransport;

use super::Driver;
use crate::{
    Counters, DriverCounters, MemberEvent, MemberEventKind, MemberInfo, MemberState, StoreCounters,
};

/// What the driver remembers of a member for its events: its last name and address.
#[derive(Debug, Clone)]
pub(super) struct Known {
    name: Option<String>,
    addr: SocketAddr,
}

impl<T: DatagramTransport> Driver<T> {
    pub(super) fn drain_events(&mut self) {
        let mut members_changed = false;
        while let Some(event) = self.core.poll_event() {
            match event {
                NodeEvent::Change(change) => {
                    // No receivers is fine: nobody watches.
                    let _ = self.shared.changes.send(change);
                }
                NodeEvent::InSync => {
                    self.shared.in_sync.send_replace(true);
                }
                NodeEvent::OutOfSync => {
                    self.shared.in_sync.send_replace(false);
                }
                NodeEvent::Member(event) => {
                    if let Some(event) = self.member_event(&event) {
                        log_member(&event);
                        // No receivers is fine: nobody follows membership.
                        let _ = self.shared.member_events.send(event);
                    }
                    members_changed = true;
                }
                NodeEvent::Acked { ticket, result } => self.acknowledge(ticket, result),
                NodeEvent::Message(publication) => {
                    let own = publication.from == self.shared.node_id;
                    self.shared.subscriptions().deliver(publication, own);
                }
                NodeEvent::MessagesLost { from, count } => {
                    self.shared.subscriptions().lost(from, count);
                }
            }
        }
        self.shared.subscriptions().report_lags();
        if members_changed {
            self.publish_members();
        }
    }

    /// A protocol membership event as the public [`MemberEvent`], with the member's name and
    /// address (as the endpoint knows them now, or as last known for one that left).
    fn member_event(&mut self, event: &Event) -> Option<MemberEvent> {
        let (node, incarnation, kind) = match *event {
            Event::MemberJoined {
                node, incarnation, ..
            } => (node, incarnation, MemberEventKind::Joined),
            Event::MemberSuspected { node, incarnation } => {
                (node, incarnation, MemberEventKind::Suspected)
            }
            Event::MemberAlive { node, incarnation } => (node, incarnation, MemberEventKind::Alive),
            Event::MemberLeft {
                node,
                incarnation,
                reason,
            } => (node, incarnation, MemberEventKind::Left(reason)),
            Event::MemberRestarted { node, old, new, .. } => {
                (node, new, MemberEventKind::Restarted { previous: old.0 })
            }
            _ => return None,
        };
        let event_addr = match *event {
            Event::MemberJoined { addr, .. } | Event::MemberRestarted { addr, .. } => Some(addr),
            _ => None,
        };
        // The endpoint's view is the latest; a member that left is only in `known`.
        let current = self.core.endpoint().member(node).map(|m| Known {
            name: m.name.map(|n| n.as_str().to_owned()),
            addr: m.addr,
        });
        let known = match kind {
            MemberEventKind::Left(_) => self.known.remove(&node),
            _ => {
                let known = current
                    .or_else(|| self.known.get(&node).cloned())
                    .or(event_addr.map(|addr| Known { name: None, addr }));
                if let Some(k) = &known {
                    self.known.insert(node, k.clone());
                }
                known
            }
        };
        // Every member joined (with its address, remembered in `known`) before anything else
        // happened to it, so the wildcard below is never shown.
        let addr = known
            .as_ref()
            .map(|k| k.addr)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        Some(MemberEvent {
            kind,
            node_id: node,
            incarnation: incarnation.0,
            name: known.and_then(|k| k.name),
            addr,
        })
    }

    /// The address this node sends from: the transport's address, or when that is a
    /// wildcard (`0.0.0.0`) and the transport knows no better, the source address of its own
    /// datagrams as the network looped them back.
    fn self_addr(&self) -> SocketAddr {
        let advertised = self
            .transport
            .advertised_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        match self.core.endpoint().own_addr() {
            Some(seen) if advertised.ip().is_unspecified() => seen,
            _ => advertised,
        }
    }

    pub(super) fn publish_members(&mut self) {
        let mut members = vec![MemberInfo {
            node_id: NodeId(self.shared.node_id),
            incarnation: self.shared.incarnation,
            addr: self.self_addr(),
            name: self.shared.name.clone(),
            state: MemberState::Local,
            clock_offset_ms: Some(0),
        }];
        for m in self.core.members() {
            let name = m.name.map(|n| n.as_str().to_owned());
            if let Some(known) = self.known.get_mut(&m.node) {
                known.name.clone_from(&name);
                known.addr = m.addr;
            }
            members.push(MemberInfo {
                node_id: m.node,
                incarnation: m.incarnation.0,
                addr: m.addr,
                name,
                state: m.state.into(),
                clock_offset_ms: m.clock_offset_ms,
            });
        }
        members.sort_by_key(|m| m.node_id);
        *self
            .shared
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = members;
    }

    pub(super) fn publish_snapshots(&mut self) {
        self.publish_members();
        let counters = Counters::new(
            self.core.stats(),
            DriverCounters {
                injected_drops: self.dropped_by_injection,
                send_errors: self.send_errors,
                recv_errors: self.recv_errors,
            },
            StoreCounters {
                keys: self.core.store().len() as u64,
                revision: self.core.store().revision(),
            },
            self.shared.subscriptions().stats(),
        );
        *self
            .shared
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = counters;
    }
}

fn log_member(event: &MemberEvent) {
    let MemberEvent {
        kind,
        node_id: node,
        incarnation,
        name,
        addr,
    } = event;
    let name = name.as_deref().unwrap_or("");
    match kind {
        MemberEventKind::Joined => {
            tracing::info!(%node, member = name, incarnation, %addr, "member joined");
        }
        MemberEventKind::Suspected => tracing::warn!(%node, member = name, "member suspected"),
        MemberEventKind::Alive => tracing::info!(%node, member = name, "member alive again"),
        MemberEventKind::Left(reason) => {
            tracing::info!(%node, member = name, ?reason, "member left");
        }
        MemberEventKind::Restarted { previous } => {
            tracing::info!(%node, member = name, incarnation, previous, %addr, "member restarted");
        }
    }
}
