//! What the driver publishes for readers: events turned into watch changes, sync state and
//! member snapshots; the counter snapshot.

use std::sync::PoisonError;

use chorus_protocol::{Event, NodeId};
use chorus_replication::NodeEvent;
use chorus_transport::DatagramTransport;

use super::Driver;
use crate::{Counters, DriverCounters, MemberInfo, MemberState, StoreCounters};

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
                    log_member(&event);
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

    pub(super) fn publish_members(&self) {
        let mut members = vec![MemberInfo {
            node_id: NodeId(self.shared.node_id),
            incarnation: self.shared.incarnation,
            addr: self
                .transport
                .local_addr()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
            state: MemberState::Local,
            clock_offset_ms: Some(0),
        }];
        members.extend(self.core.members().into_iter().map(|m| MemberInfo {
            node_id: m.node,
            incarnation: m.incarnation.0,
            addr: m.addr,
            state: m.state.into(),
            clock_offset_ms: m.clock_offset_ms,
        }));
        members.sort_by_key(|m| m.node_id);
        *self
            .shared
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = members;
    }

    pub(super) fn publish_snapshots(&self) {
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

fn log_member(event: &Event) {
    match event {
        Event::MemberJoined {
            node,
            incarnation,
            addr,
        } => {
            tracing::info!(%node, %incarnation, %addr, "member joined");
        }
        Event::MemberSuspected { node, .. } => tracing::warn!(%node, "member suspected"),
        Event::MemberAlive { node, .. } => tracing::info!(%node, "member alive again"),
        Event::MemberLeft { node, reason, .. } => tracing::info!(%node, ?reason, "member left"),
        Event::MemberRestarted { node, new, .. } => {
            tracing::info!(%node, incarnation = %new, "member restarted");
        }
        _ => {}
    }
}
