//! Restoring entries from a backup: merged by version and pushed to the group with their
//! original versions ([`RestoreMode::ByVersion`]), or re-stamped as an ordinary batch
//! ([`RestoreMode::ForceNewer`]).

use std::collections::HashSet;

use prost::Message as _;

use super::write::check_key;
use super::{Item, Op, Outgoing, OutgoingKind, PutMeta, Replica, envelope};
use crate::durable::Origin;
use crate::error::Error;
use crate::hlc::Version;
use crate::store::Entry;
use crate::wire;

/// How [`Replica::restore_entries`] treats the entries it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RestoreMode {
    /// Each entry keeps its version and is merged as if a peer had sent it: it is stored only
    /// where it is newer than what the store holds (an older one is skipped, so restoring an
    /// old backup never overwrites newer writes), and what was stored is sent to the group
    /// with its original version so that every node converges on it.
    #[default]
    ByVersion,
    /// Every entry is written again under a new version of this node, as an ordinary batch:
    /// it wins over everything the cluster holds now. Tombstones become deletes. Flags are
    /// kept; an owned entry stays owned only if this node was its owner.
    ForceNewer,
}

/// What a restore did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RestoreReport {
    /// Entries stored (and sent to the group).
    pub applied: usize,
    /// Entries left out because the store already held the same or a newer version of the
    /// key (or, for a tombstone, because it was past the tombstone grace period and the key
    /// absent).
    pub skipped_older: usize,
}

impl RestoreReport {
    /// Adds `other`'s counts to this one.
    pub fn add(&mut self, other: RestoreReport) {
        self.applied += other.applied;
        self.skipped_older += other.skipped_older;
    }
}

impl Replica {
    /// Restores `entries` (a backup: values and tombstones with their versions, e.g. a
    /// snapshot of some node's store) as `mode` says. At most `Limits::max_batch_ops`
    /// entries per call, each key once; restore larger backups in several calls.
    ///
    /// [`RestoreMode::ByVersion`] merges the entries that are newer than the store's as one
    /// change set (persisted and reported like any change), advances the clock past their
    /// versions, and queues `Entries` messages (at most `max_sync_message` bytes each, a
    /// larger entry alone) as *write* traffic, never dropped under pressure: every node merges
    /// them by version as it merges anti-entropy entries. Nodes the messages miss converge
    /// through anti-entropy. Returns the report and no version.
    ///
    /// [`RestoreMode::ForceNewer`] is one [`batch`](Replica::batch) of the entries (puts with
    /// their flags, deletes for tombstones) under one new version, which it returns.
    ///
    /// # Errors
    /// Nothing is applied or sent when: the batch is too large or names a key twice, a key or
    /// value breaks a limit, an entry's owner is not the node of its version, or (ByVersion)
    /// an entry's version is more than `max_drift_ms` ahead of `wall_ms` (peers would drop
    /// it): [`Error::InvalidEntry`] for the last two. ForceNewer: also as
    /// [`batch`](Replica::batch).
    pub fn restore_entries(
        &mut self,
        wall_ms: u64,
        entries: Vec<(String, Entry)>,
        mode: RestoreMode,
    ) -> Result<(RestoreReport, Option<Version>), Error> {
        self.validate_restore(wall_ms, &entries)?;
        self.last_wall_ms = self.last_wall_ms.max(wall_ms);
        match mode {
            RestoreMode::ForceNewer => {
                let n = entries.len();
                let me = self.cfg.node;
                let ops = entries
                    .into_iter()
                    .map(|(key, e)| match e.value {
                        Some(value) => Op::put_with(
                            key,
                            value,
                            PutMeta {
                                flags: e.flags,
                                owned: e.owner.is_some_and(|o| o.node.0 == me),
                            },
                        ),
                        None => Op::delete(key),
                    })
                    .collect();
                let version = self.batch(wall_ms, ops)?;
                Ok((
                    RestoreReport {
                        applied: n,
                        skipped_older: 0,
                    },
                    Some(version),
                ))
            }
            RestoreMode::ByVersion => Ok((self.merge_restored(wall_ms, entries), None)),
        }
    }

    fn validate_restore(&self, wall_ms: u64, entries: &[(String, Entry)]) -> Result<(), Error> {
        let limits = &self.cfg.limits;
        if entries.len() > limits.max_batch_ops {
            return Err(Error::BatchTooLarge {
                ops: entries.len(),
                max: limits.max_batch_ops,
            });
        }
        let mut seen = HashSet::with_capacity(entries.len());
        for (key, e) in entries {
            check_key(limits, key)?;
            if let Some(v) = &e.value
                && v.len() > limits.max_value_len
            {
                return Err(Error::ValueTooLarge {
                    key: key.clone(),
                    len: v.len(),
                    max: limits.max_value_len,
                });
            }
            if !seen.insert(key.as_str()) {
                return Err(Error::DuplicateKey { key: key.clone() });
            }
            if let Some(owner) = e.owner
                && owner.node.0 != e.version.node
            {
                return Err(Error::InvalidEntry {
                    key: key.clone(),
                    reason: format!(
                        "owned by node {} but written by node {}",
                        owner.node.0, e.version.node
                    ),
                });
            }
            let ahead = e.version.hlc.physical_ms().saturating_sub(wall_ms);
            if ahead > self.cfg.max_drift_ms {
                return Err(Error::InvalidEntry {
                    key: key.clone(),
                    reason: format!(
                        "its version {} is {ahead} ms ahead of this node's clock, beyond the \
                         {} ms peers accept",
                        e.version, self.cfg.max_drift_ms
                    ),
                });
            }
        }
        Ok(())
    }

    /// Merges validated entries by version and queues what was stored for the group.
    fn merge_restored(&mut self, wall_ms: u64, entries: Vec<(String, Entry)>) -> RestoreReport {
        let total = entries.len();
        let mut items = Vec::with_capacity(total);
        let mut newer: Vec<(String, Version)> = Vec::with_capacity(total);
        for (key, e) in entries {
            // Within the drift bound (validated), so the clock takes it.
            let _ = self.clock.observe(e.version.hlc, wall_ms);
            if self.store.meta(&key).is_none_or(|m| m.version < e.version) {
                newer.push((key.clone(), e.version));
            }
            items.push(Item {
                meta: e.meta(),
                key,
                value: e.value,
                version: e.version,
            });
        }
        let applied = self.apply(items, wall_ms, Origin::Local);
        self.stats.entries_restored += applied as u64;
        // Send what was stored, as the store now holds it (with its metadata).
        let max = self.cfg.max_sync_message;
        let mut batch: Vec<wire::Entry> = Vec::new();
        let mut size = 8;
        for (key, version) in newer {
            let Some(stored) = self.store.get_entry(&key) else {
                continue;
            };
            if stored.version != version {
                continue;
            }
            let item = stored.to_wire(&key);
            let len = item.encoded_len() + 6;
            if !batch.is_empty() && size + len > max {
                self.push_restored(std::mem::take(&mut batch));
                size = 8;
            }
            size += len;
            batch.push(item);
        }
        if !batch.is_empty() {
            self.push_restored(batch);
        }
        RestoreReport {
            applied,
            skipped_older: total - applied,
        }
    }

    fn push_restored(&mut self, entries: Vec<wire::Entry>) {
        let e = envelope(wire::envelope::Body::Entries(wire::Entries { entries }));
        self.outgoing.push_back(Outgoing {
            kind: OutgoingKind::Write,
            payload: e.encode_to_vec().into(),
        });
    }
}
