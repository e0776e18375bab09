//! Acknowledgement of writes after persistence: a write command carries a ticket from the
//! owner, and [`NodeEvent::Acked`] answers it once the write's record is as durable as the
//! fsync policy requires (at once without a durable store; with an error once the store
//! failed).

use std::collections::VecDeque;

use super::{CoreError, NodeCore, NodeEvent};
use crate::durable::{DurableError, DurableStats, Persist};
use crate::hlc::Version;

/// A durable node's acknowledgement state.
#[derive(Debug, Default)]
pub(super) struct Acks {
    /// Accepted writes waiting for their record: (`seq`, ticket, version), `seq` ascending.
    waiting: VecDeque<(u64, u64, Version)>,
    /// Highest `seq` the store reported durable.
    through: u64,
    /// Set once the store failed: every later write is answered with it.
    failed: Option<String>,
    /// The store's latest counters.
    stats: DurableStats,
}

impl NodeCore {
    /// The next thing the durable store must do, in order: append a record (already applied
    /// to the store, so readers may see it before it is durable), or sync everything (once,
    /// when the node has closed). Drain it after every input, like
    /// [`poll_transmit`](NodeCore::poll_transmit). Always `None` without a durable store.
    pub fn poll_persist(&mut self) -> Option<Persist> {
        if let Some(item) = self.replica.poll_persist() {
            return Some(item);
        }
        if self.sync_all_due {
            self.sync_all_due = false;
            return Some(Persist::SyncAll);
        }
        None
    }

    /// The durable store reports that every record with `seq <= through` is as durable as its
    /// fsync policy requires (under `Fsync::Always`: fsynced; otherwise written to the
    /// operating system). Acknowledges the writes it covers.
    pub fn handle_persisted(&mut self, through: u64) {
        let Some(acks) = self.acks.as_mut() else {
            return;
        };
        acks.through = acks.through.max(through);
        while let Some(&(seq, ticket, version)) = acks.waiting.front() {
            if seq > acks.through {
                break;
            }
            acks.waiting.pop_front();
            self.events.push_back(NodeEvent::Acked {
                ticket,
                result: Ok(version),
            });
        }
    }

    /// The durable store failed (a write or fsync error): nothing is persisted from now on.
    /// Every write waiting for its record is answered with `error`, every later one with
    /// [`DurableError::Failed`]. The writes stay applied and replicated.
    pub fn handle_persist_failed(&mut self, error: DurableError) {
        let Some(acks) = self.acks.as_mut() else {
            return;
        };
        if acks.failed.is_none() {
            acks.failed = Some(error.to_string());
        }
        for (_, ticket, _) in acks.waiting.drain(..) {
            self.events.push_back(NodeEvent::Acked {
                ticket,
                result: Err(CoreError::Durability(error.clone())),
            });
        }
    }

    /// The durable store's latest counters (shown in [`stats`](NodeCore::stats)).
    pub fn handle_durable_stats(&mut self, stats: DurableStats) {
        if let Some(acks) = self.acks.as_mut() {
            acks.stats = stats;
        }
    }

    /// Whether this node persists (it was built by [`restore`](NodeCore::restore)).
    #[must_use]
    pub fn is_durable(&self) -> bool {
        self.acks.is_some()
    }

    /// Writes accepted and not yet acknowledged (their record is not durable yet).
    #[must_use]
    pub fn unacknowledged(&self) -> usize {
        self.acks.as_ref().map_or(0, |a| a.waiting.len())
    }

    pub(super) fn durable_stats(&self) -> Option<DurableStats> {
        self.acks.as_ref().map(|a| a.stats.clone())
    }

    /// Answers the write command `ticket` (its record, if any, was emitted with `seq`
    /// `after`; `before` was the last `seq` before it).
    pub(super) fn track(
        &mut self,
        ticket: u64,
        result: Result<Version, CoreError>,
        before: u64,
        after: u64,
    ) {
        let result = match (result, self.acks.as_mut()) {
            (Err(e), _) => Err(e),
            (Ok(v), None) => Ok(v),
            (Ok(_), Some(acks)) if acks.failed.is_some() => Err(CoreError::Durability(
                DurableError::Failed(acks.failed.clone().unwrap_or_default()),
            )),
            (Ok(v), Some(acks)) if after == before || after <= acks.through => Ok(v),
            (Ok(v), Some(acks)) => {
                acks.waiting.push_back((after, ticket, v));
                return;
            }
        };
        self.events.push_back(NodeEvent::Acked { ticket, result });
    }
}
