//! Persistence as an output: restoring from what a durable store loaded, and emitting every
//! committed change set and every removal as a [`Persist`] item, in commit order.

use std::collections::VecDeque;
use std::time::Instant;

use super::lifecycle::Standing;
use super::{Replica, pop_front_shrinking};
use crate::config::ReplicaConfig;
use crate::durable::{Loaded, Origin, Persist};
use crate::hash::{bucket_of, entry_hash};
use crate::store::{Attrs, Key, Stored, Value, bytes_of};
use crate::wire;

impl Replica {
    /// A durable replica that starts from `loaded`, the store as its durable store found it
    /// (see `docs/replication.md`, Durability), and emits every change it commits from now on
    /// through [`poll_persist`](Replica::poll_persist).
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
    pub fn restore(cfg: ReplicaConfig, now: Instant, wall_ms: u64, loaded: Loaded) -> Replica {
        let mut r = Replica::new(cfg, now);
        r.last_wall_ms = wall_ms;
        let damaged = loaded.damaged();
        let absent_ms = wall_ms.saturating_sub(loaded.last_wall_ms);
        let grace = u64::try_from(r.cfg.tombstone_grace.as_millis()).unwrap_or(u64::MAX);
        let mut commit: Vec<(Key, Stored)> = Vec::with_capacity(loaded.entries.len());
        for (key, value, version, meta) in loaded.entries {
            let b = bucket_of(&key, r.cfg.buckets.get()) as usize;
            let tombstone = value.is_none();
            if commit.last().is_some_and(|(last, _)| **last == *key) {
                // Sorted keys from a map, so this is unreachable; keep the first (as the sums do).
                continue;
            }
            let key: Key = Key::from(key);
            r.buckets.insert_key(b, &key);
            r.buckets.add(b, entry_hash(&key, version, tombstone));
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
                    attrs: if tombstone {
                        Attrs::default()
                    } else {
                        Attrs::new(meta)
                    },
                },
            ));
        }
        let had_data = !commit.is_empty();
        if had_data {
            r.store.commit(commit.into_iter());
        }
        r.standing = if !had_data || damaged {
            Standing::Fresh
        } else if loaded.last_wall_ms > 0 && absent_ms > grace {
            Standing::AbsentTooLong
        } else {
            Standing::Settled
        };
        r.durability = Some(PersistQueue::default());
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

    /// The next record to make durable, in commit order (only a replica built by
    /// [`restore`](Replica::restore) emits any). The store already shows it.
    pub fn poll_persist(&mut self) -> Option<Persist> {
        pop_front_shrinking(&mut self.durability.as_mut()?.queue)
    }

    /// The `seq` of the last record emitted so far (0: none yet).
    #[must_use]
    pub fn persist_seq(&self) -> u64 {
        self.durability.as_ref().map_or(0, |q| q.last_seq)
    }

    /// Whether this replica emits what it commits (it was built by [`restore`](Replica::restore)).
    #[must_use]
    pub fn is_durable(&self) -> bool {
        self.durability.is_some()
    }

    /// Emits removals (collected tombstones, forgotten entries).
    pub(super) fn persist_removed(&mut self, removed: Vec<wire::KeyVersion>) {
        if removed.is_empty() {
            return;
        }
        let wall_ms = self.last_wall_ms;
        if let Some(q) = self.durability.as_mut() {
            q.push(
                wire::LogRecord {
                    wall_ms,
                    entries: Vec::new(),
                    removed,
                },
                Origin::Remote,
            );
        }
    }

    /// Emits a change set about to be committed (`origin`: this node's own write or not).
    pub(super) fn persist_commit(
        &mut self,
        commit: &[(Key, Stored)],
        wall_ms: u64,
        origin: Origin,
    ) {
        let wall_ms = self.last_wall_ms.max(wall_ms);
        if let Some(q) = self.durability.as_mut() {
            let record = wire::LogRecord {
                wall_ms,
                entries: commit
                    .iter()
                    .map(|(key, e)| {
                        let (flags, owner) = e.attrs.get().to_wire();
                        wire::Entry {
                            key: key.to_string(),
                            hlc: e.version.hlc.0,
                            node: e.version.node,
                            value: e.value.as_ref().map(bytes_of),
                            flags,
                            owner,
                        }
                    })
                    .collect(),
                removed: Vec::new(),
            };
            q.push(record, origin);
        }
    }
}

/// What a durable replica has committed and not yet handed out, numbered in commit order.
#[derive(Debug, Default)]
pub(super) struct PersistQueue {
    queue: VecDeque<Persist>,
    /// `seq` of the last record pushed.
    last_seq: u64,
}

impl PersistQueue {
    fn push(&mut self, record: wire::LogRecord, origin: Origin) {
        self.last_seq += 1;
        self.queue.push_back(Persist::Append {
            seq: self.last_seq,
            record,
            origin,
        });
    }
}
