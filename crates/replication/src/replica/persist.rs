//! Every call into the durable backend: restoring from disk, appending committed changes and
//! removals, flushing and compacting, the backend's timer.

use std::time::Instant;

use super::Replica;
use crate::config::ReplicaConfig;
use crate::durable::{Durability, DurableError, Loaded};
use crate::hash::{bucket_of, entry_hash};
use crate::store::{Key, Stored, Value, bytes_of};
use crate::wire;

impl Replica {
    /// A replica that persists every change to `durability` and starts from `loaded`, the
    /// store as it was found on disk (see `docs/replication.md`, Durability).
    ///
    /// Loaded entries keep their versions, tombstones included (so a deleted key does not
    /// come back), and get fresh local revisions `1..=n` in key order; the change log starts
    /// empty (watchers resuming from an older life get `Compacted`). The clock is moved past
    /// every loaded version, so new writes win over everything this node wrote before.
    ///
    /// A replica that loaded entries is not *fresh*: its store is evidence. It is fresh again
    /// when `loaded` is empty or was damaged (records lost: its absences prove nothing), and
    /// it enters recovery at the first peer if `loaded.last_wall_ms` is more than
    /// `tombstone_grace` before `wall_ms` (it may hold keys deleted and collected meanwhile).
    ///
    /// A loaded version more than `max_drift_ms − clock_margin_ms` ahead of `wall_ms` (written
    /// while the clock was wrong) is kept, and so is the clock position it implies, but local
    /// writes are then refused with [`Error::ClockAhead`] (cause
    /// [`ClockCause::History`]) until the clock catches up: a write stamped from it would be
    /// dropped by every peer. Peers take such entries by anti-entropy once their own clocks
    /// reach them.
    #[must_use]
    pub fn restore(
        cfg: ReplicaConfig,
        now: Instant,
        wall_ms: u64,
        durability: Box<dyn Durability>,
        loaded: Loaded,
    ) -> Replica {
        let mut r = Replica::new(cfg, now);
        r.last_wall_ms = wall_ms;
        let damaged = loaded.damaged();
        let absent_ms = wall_ms.saturating_sub(loaded.last_wall_ms);
        let grace = u64::try_from(r.cfg.tombstone_grace.as_millis()).unwrap_or(u64::MAX);
        let mut commit = Vec::with_capacity(loaded.entries.len());
        for (key, value, version) in loaded.entries {
            let b = bucket_of(&key, r.cfg.buckets.get()) as usize;
            let tombstone = value.is_none();
            let key: Key = Key::from(key);
            let bucket = &mut r.buckets[b];
            if !bucket.keys.insert(key.clone()) {
                // Keys come from a map, so this is unreachable; keep the first (as the sums do).
                continue;
            }
            bucket.sum = bucket
                .sum
                .wrapping_add(entry_hash(&key, version, tombstone));
            if tombstone {
                r.tombstones.insert((version, key.clone()));
            }
            if version.hlc > r.clock.last() {
                // Adopted even from the future, so that a new write never loses to an older
                // one held here; `check_clock` then refuses writes until the clock catches up.
                let _ = r.clock.observe(version.hlc, version.hlc.physical_ms());
            }
            let revision = r.next_revision;
            r.next_revision += 1;
            commit.push((
                key,
                Stored {
                    // A value decoded from a data file may be a slice of a larger buffer.
                    value: value.as_deref().map(Value::from),
                    version,
                    revision,
                },
            ));
        }
        let had_data = !commit.is_empty();
        if had_data {
            r.store.commit(commit.into_iter());
        }
        r.fresh = !had_data || damaged;
        r.absent_too_long = had_data && loaded.last_wall_ms > 0 && absent_ms > grace;
        r.durability = Some(durability);
        if let Err(error) = r.check_clock(wall_ms) {
            tracing::warn!(
                %error,
                newest = %r.clock.last(),
                wall_ms,
                "the data directory holds versions from the future; its entries are kept and \
                 offered to peers, local writes are refused until the clock catches up"
            );
        }
        r
    }

    /// Writes persisted changes out and fsyncs them as the backend's policy says; with
    /// `force`, fsyncs whatever is written. Compacts the log when it has grown enough (a
    /// failed compaction is logged and counted by the backend, and the old log stays in use).
    /// Call before acknowledging local writes. Without a backend, does nothing.
    ///
    /// # Errors
    /// The backend failed to write or fsync; the changes are applied in memory but may not
    /// survive a crash of this node.
    pub fn flush_durable(&mut self, now: Instant, force: bool) -> Result<(), DurableError> {
        let Some(d) = self.durability.as_mut() else {
            return Ok(());
        };
        d.flush(now, force)?;
        if d.wants_compaction() {
            let entries = self.store.entries();
            if let Err(error) = d.compact(&entries, self.last_wall_ms) {
                tracing::warn!(%error, "snapshot failed; the log keeps growing until the next attempt");
            }
        }
        Ok(())
    }

    /// Counters of the durable backend, if there is one.
    #[must_use]
    pub fn durable_stats(&self) -> Option<crate::durable::DurableStats> {
        self.durability.as_ref().map(|d| d.stats())
    }

    /// Whether this replica has a durable backend.
    #[must_use]
    pub fn is_durable(&self) -> bool {
        self.durability.is_some()
    }

    /// Hands removals (collected tombstones, forgotten entries) to the durable backend.
    pub(super) fn persist_removed(&mut self, removed: Vec<wire::KeyVersion>) {
        if removed.is_empty() {
            return;
        }
        if let Some(d) = self.durability.as_mut() {
            let record = wire::LogRecord {
                wall_ms: self.last_wall_ms,
                entries: Vec::new(),
                removed,
            };
            d.append(&record, false);
        }
    }

    /// Hands a change set about to be committed to the durable backend (`local`: this node's
    /// own write).
    pub(super) fn persist_commit(&mut self, commit: &[(Key, Stored)], wall_ms: u64, local: bool) {
        if let Some(d) = self.durability.as_mut() {
            let record = wire::LogRecord {
                wall_ms: self.last_wall_ms.max(wall_ms),
                entries: commit
                    .iter()
                    .map(|(key, e)| wire::Entry {
                        key: key.to_string(),
                        hlc: e.version.hlc.0,
                        node: e.version.node,
                        value: e.value.as_ref().map(bytes_of),
                    })
                    .collect(),
                removed: Vec::new(),
            };
            d.append(&record, local);
        }
    }

    /// When the durable backend next wants its timer (an fsync the policy owes).
    pub(super) fn durable_timeout(&self) -> Option<Instant> {
        self.durability.as_ref().and_then(|d| d.poll_timeout())
    }

    /// The durable backend's timer: an fsync the policy owes, if due at `now`.
    pub(super) fn handle_durable_timeout(&mut self, now: Instant) {
        if self.durable_timeout().is_some_and(|t| t <= now) {
            // An fsync the policy owes. A failure is logged by the backend and reported to the
            // writers by the owner's next `flush_durable`.
            let _ = self.flush_durable(now, false);
        }
    }
}
