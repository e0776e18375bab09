//! [`MemoryDisk`]: a durable store kept in memory, for the simulator and the tests.

use super::{DurableStats, Loaded, MergedState, Persist};
use crate::wire;

/// A durable store in memory that honours the persist protocol of
/// [`NodeCore`](crate::NodeCore) like the data directory does: records handed to it
/// ([`accept`](MemoryDisk::accept)) are *written* but not durable until
/// [`sync`](MemoryDisk::sync) (an fsync), which returns the `through` to report with
/// [`NodeCore::handle_persisted`](crate::NodeCore::handle_persisted). A
/// [`crash`](MemoryDisk::crash) keeps exactly what was synced, and gives it back as the
/// [`Loaded`] the node restarts from.
///
/// Sans IO: no file, no clock. The owner decides when to sync (at once, or at moments a
/// test chooses), as the storage thread's fsync policy does.
#[derive(Debug, Clone, Default)]
pub struct MemoryDisk {
    durable: MergedState,
    /// Written, not yet synced: lost by a crash.
    pending: Vec<(u64, wire::LogRecord)>,
    /// Highest `seq` of this life that is durable.
    through: u64,
    stats: DurableStats,
}

impl MemoryDisk {
    /// An empty store.
    #[must_use]
    pub fn new() -> MemoryDisk {
        MemoryDisk::default()
    }

    /// Takes one item from [`NodeCore::poll_persist`](crate::NodeCore::poll_persist).
    /// [`Persist::SyncAll`] syncs at once.
    pub fn accept(&mut self, item: Persist) {
        match item {
            Persist::Append { seq, record, .. } => {
                self.stats.records_written = self.stats.records_written.saturating_add(1);
                self.pending.push((seq, record));
            }
            Persist::SyncAll => {
                self.sync();
            }
        }
    }

    /// Makes everything accepted durable (one fsync); returns the highest durable `seq` of
    /// this life.
    pub fn sync(&mut self) -> u64 {
        if self.pending.is_empty() {
            return self.through;
        }
        for (seq, record) in self.pending.drain(..) {
            self.durable.merge_record(&record);
            self.through = self.through.max(seq);
        }
        self.stats.fsyncs = self.stats.fsyncs.saturating_add(1);
        self.through
    }

    /// Highest `seq` of this life that is durable.
    #[must_use]
    pub fn through(&self) -> u64 {
        self.through
    }

    /// Records accepted and not yet synced.
    #[must_use]
    pub fn unsynced(&self) -> usize {
        self.pending.len()
    }

    /// The process dies: what was not synced is lost. Returns what a restart loads; the
    /// next life numbers its records from 1 again.
    pub fn crash(&mut self) -> Loaded {
        self.pending.clear();
        self.through = 0;
        let loaded = self.durable.to_loaded();
        self.stats.loaded_entries = loaded.entries.len() as u64;
        loaded
    }

    /// What is durable now, as a restart would load it.
    #[must_use]
    pub fn durable_state(&self) -> &MergedState {
        &self.durable
    }

    /// Counters (records written, fsyncs, entries loaded at the last restart).
    #[must_use]
    pub fn stats(&self) -> DurableStats {
        self.stats.clone()
    }
}
