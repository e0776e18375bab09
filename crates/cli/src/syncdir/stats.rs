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

/// One mirror's figures with what tells it apart: its directory and prefix.
#[derive(Debug)]
pub struct Labelled {
    /// The directory, as configured.
    pub dir: std::path::PathBuf,
    /// The key prefix.
    pub prefix: String,
    /// Its figures.
    pub stats: std::sync::Arc<SyncStats>,
}

/// The figures of every mirror of an agent (`--sync-dir`, repeatable), in `/v1/stats` and
/// `/metrics`.
#[derive(Debug, Default)]
pub struct SyncSet {
    /// One entry per mirror, in configuration order.
    pub dirs: Vec<Labelled>,
}

impl SyncSet {
    /// Every figure summed over the mirrors (gauges too: e.g. all the shadowed keys), by
    /// name, in the order of [`SyncStats::figures`].
    pub fn totals(&self) -> Vec<(&'static str, Kind, u64)> {
        let mut totals = SyncStats::default().figures();
        for labelled in &self.dirs {
            for (total, (_, _, v)) in totals.iter_mut().zip(labelled.stats.figures()) {
                total.2 = total.2.saturating_add(v);
            }
        }
        totals
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn totals_add_every_mirror() {
        let (a, b) = (
            Arc::new(SyncStats::default()),
            Arc::new(SyncStats::default()),
        );
        bump(&a.files_written);
        bump(&b.files_written);
        bump(&b.errors);
        let set = SyncSet {
            dirs: vec![
                Labelled {
                    dir: "/a".into(),
                    prefix: "a/".into(),
                    stats: a,
                },
                Labelled {
                    dir: "/b".into(),
                    prefix: "b/".into(),
                    stats: b,
                },
            ],
        };
        let totals = set.totals();
        let get = |name: &str| totals.iter().find(|f| f.0 == name).map(|f| f.2);
        assert_eq!(get("files_written"), Some(2));
        assert_eq!(get("errors"), Some(1));
        assert_eq!(get("hook_runs"), Some(0));
        assert_eq!(totals.len(), SyncStats::default().figures().len());
    }
}
