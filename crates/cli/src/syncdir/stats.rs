//! [`SyncStats`]: the counters and gauges of one mirror.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of a mirror; [`SyncStats::figures`] names them.
#[derive(Debug, Default)]
pub struct SyncStats {
    pub(super) files_written: AtomicU64,
    pub(super) files_removed: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) bad_keys: AtomicU64,
    pub(super) shadowed_keys: AtomicU64,
    pub(super) kept_unconfirmed: AtomicU64,
    pub(super) resyncs: AtomicU64,
    pub(super) hook_runs: AtomicU64,
    pub(super) hook_failures: AtomicU64,
    pub(super) hook_timeouts: AtomicU64,
}

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Whether a figure of [`SyncStats`] only grows or goes up and down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Counts events since the agent started.
    Counter,
    /// The current number of something.
    Gauge,
}

impl SyncStats {
    /// Every figure by its name in `/v1/stats` (under `sync_dir`) and `/metrics`
    /// (`chorus_sync_dir_NAME`).
    pub fn figures(&self) -> Vec<(&'static str, Kind, u64)> {
        let Self {
            files_written,
            files_removed,
            errors,
            bad_keys,
            shadowed_keys,
            kept_unconfirmed,
            resyncs,
            hook_runs,
            hook_failures,
            hook_timeouts,
        } = self;
        use Kind::{Counter, Gauge};
        [
            ("files_written", Counter, files_written),
            ("files_removed", Counter, files_removed),
            ("errors", Counter, errors),
            ("bad_keys", Counter, bad_keys),
            ("shadowed_keys", Gauge, shadowed_keys),
            ("kept_unconfirmed", Gauge, kept_unconfirmed),
            ("resyncs", Counter, resyncs),
            ("hook_runs", Counter, hook_runs),
            ("hook_failures", Counter, hook_failures),
            ("hook_timeouts", Counter, hook_timeouts),
        ]
        .into_iter()
        .map(|(name, kind, v)| (name, kind, v.load(Ordering::Relaxed)))
        .collect()
    }
}
