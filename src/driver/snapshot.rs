//! What the driver publishes for readers: events turned into watch changes, sync state and
//! member snapshots; counters under flat names.

use std::collections::BTreeMap;
use std::sync::PoisonError;

use chorus_protocol::{Event, MemberState};
use chorus_replication::{NodeEvent, NodeStats};
use chorus_transport::DatagramTransport;

use super::Driver;
use crate::node::MemberInfo;

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
            }
        }
        if members_changed {
            self.publish_members();
        }
    }

    pub(super) fn publish_members(&self) {
        let mut members = vec![MemberInfo {
            node_id: self.shared.node_id,
            incarnation: self.shared.incarnation,
            addr: self
                .transport
                .local_addr()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
            state: "self".to_owned(),
            clock_offset_ms: Some(0),
        }];
        members.extend(self.core.members().into_iter().map(|m| {
            MemberInfo {
                node_id: m.node.0,
                incarnation: m.incarnation.0,
                addr: m.addr,
                state: match m.state {
                    MemberState::Alive => "alive",
                    MemberState::Suspected => "suspected",
                }
                .to_owned(),
                clock_offset_ms: m.clock_offset_ms,
            }
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
        let mut counters = counters(&self.core.stats());
        counters.insert("driver_injected_drops".into(), self.dropped_by_injection);
        counters.insert("driver_send_errors".into(), self.send_errors);
        counters.insert("driver_recv_errors".into(), self.recv_errors);
        counters.insert("store_keys".into(), self.core.store().len() as u64);
        counters.insert("store_revision".into(), self.core.store().revision());
        *self
            .shared
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = counters.into_iter().collect();
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

/// Every counter of both layers under one flat, stable snake_case name.
fn counters(stats: &NodeStats) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (name, value) in stats.protocol.counters() {
        out.insert(format!("protocol_{name}"), value);
    }
    for (name, value) in stats.replication.counters() {
        out.insert(format!("replication_{name}"), value);
    }
    out.insert("core_write_backlog".into(), stats.write_backlog as u64);
    out.insert("core_sync_backlog".into(), stats.sync_backlog as u64);
    out.insert("core_sync_dropped".into(), stats.sync_dropped);
    out.insert("core_too_large".into(), stats.too_large);
    out.insert(
        "core_clock_ahead_ms".into(),
        u64::try_from(stats.clock_ahead_ms).unwrap_or(0),
    );
    out.insert(
        "core_clock_refusing".into(),
        u64::from(stats.clock_refusing),
    );
    if let Some(durable) = &stats.durable {
        for (name, value) in durable.counters() {
            out.insert(format!("durable_{name}"), value);
        }
    }
    out
}
