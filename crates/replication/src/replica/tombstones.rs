//! Tombstone collection after the grace period, and forgetting entries after a long absence.

use super::{Logged, Replica};
use crate::hash::{bucket_of, entry_hash};
use crate::store::{Attrs, Key};
use crate::wire;

impl Replica {
    pub(super) fn horizon_ms(&self, wall_ms: u64) -> u64 {
        let grace = u64::try_from(self.cfg.tombstone_grace.as_millis()).unwrap_or(u64::MAX);
        wall_ms.saturating_sub(grace)
    }

    /// Removes tombstones older than the grace period from the store and the digest.
    pub(super) fn collect_tombstones(&mut self, wall_ms: u64) {
        let horizon = self.horizon_ms(wall_ms);
        let mut removed = Vec::new();
        while let Some((version, key)) = self.tombstones.first().cloned() {
            if version.hlc.physical_ms() >= horizon {
                break;
            }
            self.tombstones.pop_first();
            let b = bucket_of(&key, self.cfg.buckets.get()) as usize;
            if self
                .store
                .meta(&key)
                .is_some_and(|m| m.is_tombstone() && m.version == version)
            {
                self.buckets.remove_key(b, &key);
                self.buckets.subtract(b, entry_hash(&key, version, true));
                self.store.remove_tombstone(&key, version);
                self.stats.tombstones_collected += 1;
                removed.push(wire::KeyVersion {
                    key: key.to_string(),
                    hlc: version.hlc.0,
                    node: version.node,
                });
            }
        }
        self.persist_removed(removed);
    }

    /// Keys of bucket `b` whose version is older than the grace period.
    pub(super) fn old_keys(&mut self, b: usize) -> Vec<Key> {
        let horizon = self.horizon_ms(self.last_wall_ms);
        let store = &self.store;
        self.buckets
            .keys(store, b)
            .iter()
            .filter(|k| {
                store
                    .meta(k)
                    .is_some_and(|m| m.version.hlc.physical_ms() < horizon)
            })
            .cloned()
            .collect()
    }

    /// Whether `key` is stored with a version older than `horizon_ms`.
    pub(super) fn is_old(&self, key: &str, horizon_ms: u64) -> bool {
        self.store
            .meta(key)
            .is_some_and(|m| m.version.hlc.physical_ms() < horizon_ms)
    }

    /// Drops `key` from this node (recovery after a long isolation). A forgotten value is
    /// reported as a change to `None` carrying the forgotten version.
    pub(super) fn forget(&mut self, key: &str) {
        let b = bucket_of(key, self.cfg.buckets.get()) as usize;
        let Some((key, m)) = self.store.lookup(key) else {
            return;
        };
        self.buckets.remove_key(b, &key);
        self.buckets
            .subtract(b, entry_hash(&key, m.version, m.is_tombstone()));
        if m.is_tombstone() {
            self.tombstones.remove(&(m.version, key.clone()));
        }
        self.store.remove(&key);
        self.stats.entries_forgotten += 1;
        self.persist_removed(vec![wire::KeyVersion {
            key: key.to_string(),
            hlc: m.version.hlc.0,
            node: m.version.node,
        }]);
        if !m.is_tombstone() {
            self.record(Logged {
                key,
                value: None,
                version: m.version,
                attrs: Attrs::default(),
            });
        }
    }
}
