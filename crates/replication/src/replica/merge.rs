//! Remote writes and sync entries, and the one `apply` every change goes through.

use std::collections::HashSet;
use std::time::Instant;

use super::write::check_key;
use super::{Item, Logged, Replica};
use crate::durable::Origin;
use crate::hash::{bucket_of, entry_hash};
use crate::hlc::{Hlc, Version};
use crate::store::{Attrs, EntryMeta, Key, Stored, Value};
use crate::wire;

impl Replica {
    pub(super) fn on_write(&mut self, now: Instant, wall_ms: u64, from: u64, w: wire::Write) {
        let limits = self.cfg.limits;
        if w.ops.is_empty() || w.ops.len() > limits.max_batch_ops {
            self.stats.limit_violations += 1;
            return;
        }
        let mut seen = HashSet::with_capacity(w.ops.len());
        for op in &w.ops {
            if check_key(&limits, &op.key).is_err()
                || op
                    .value
                    .as_ref()
                    .is_some_and(|v| v.len() > limits.max_value_len)
            {
                self.stats.limit_violations += 1;
                return;
            }
            if !seen.insert(op.key.as_str()) {
                self.stats.malformed += 1;
                return;
            }
        }
        let hlc = Hlc(w.hlc);
        if let Err(error) = self.clock.observe(hlc, wall_ms) {
            tracing::debug!(%error, "write from the future dropped");
            self.stats.drift_rejected += 1;
            self.dropped_from(now, from);
            return;
        }
        if w.ops
            .iter()
            .any(|op| op.owner.as_ref().is_some_and(|o| o.node != from))
        {
            // An entry owned by another node than its writer: forged or broken, all or
            // nothing as the batch is.
            self.stats.owner_mismatch += 1;
            return;
        }
        let version = Version { hlc, node: from };
        let items = w
            .ops
            .into_iter()
            .map(|op| Item {
                meta: EntryMeta::from_wire(op.flags, op.owner.as_ref()),
                key: op.key,
                value: op.value,
                version,
            })
            .collect();
        self.stats.remote_writes += 1;
        self.apply(items, wall_ms, Origin::Remote);
    }

    pub(super) fn on_entries(&mut self, now: Instant, wall_ms: u64, from: u64, e: wire::Entries) {
        let limits = self.cfg.limits;
        let mut items: Vec<Item> = Vec::with_capacity(e.entries.len());
        let mut rejected = false;
        self.stats.entries_received += e.entries.len() as u64;
        for entry in e.entries {
            if check_key(&limits, &entry.key).is_err()
                || entry
                    .value
                    .as_ref()
                    .is_some_and(|v| v.len() > limits.max_value_len)
            {
                self.stats.limit_violations += 1;
                continue;
            }
            if entry.owner.as_ref().is_some_and(|o| o.node != entry.node) {
                self.stats.owner_mismatch += 1;
                continue;
            }
            let hlc = Hlc(entry.hlc);
            if self.clock.observe(hlc, wall_ms).is_err() {
                self.stats.drift_rejected += 1;
                rejected = true;
                continue;
            }
            items.push(Item {
                meta: EntryMeta::from_wire(entry.flags, entry.owner.as_ref()),
                key: entry.key,
                value: entry.value,
                version: Version {
                    hlc,
                    node: entry.node,
                },
            });
        }
        let duplicated = {
            let mut seen = HashSet::with_capacity(items.len());
            !items.iter().all(|i| seen.insert(i.key.as_str()))
        };
        if duplicated {
            // No node sends a key twice in one message, and `apply` needs them distinct: keep
            // the newest of each.
            self.stats.malformed += 1;
            items.sort_unstable_by(|a, b| a.key.cmp(&b.key).then(b.version.cmp(&a.version)));
            items.dedup_by(|later, first| later.key == first.key);
        }
        let applied = self.apply(items, wall_ms, Origin::Remote);
        if rejected {
            self.dropped_from(now, from);
        }
        if applied > 0 && !self.is_in_sync() {
            // Let the answers settle, then show the peers where this node stands.
            self.trigger_digest(now);
        }
    }

    /// Merges entries: each wins only over an older version. Applied as one change set, so
    /// multi-key readers see all or none of it, after it was handed to the durable backend
    /// (`origin`: this node's own write or not). Returns how many entries were stored. The keys of
    /// `items` must be distinct (the store is read for the old versions and written at the
    /// end).
    ///
    /// Every stored key and value holds exactly its own bytes: a new key gets an allocation
    /// of its length (an overwrite reuses the stored one), and every value is copied out of
    /// whatever buffer it came in (an HTTP request body, a datagram, a decoded message), so
    /// that a 100-byte value never pins a kilobytes-long buffer.
    pub(super) fn apply(&mut self, items: Vec<Item>, wall_ms: u64, origin: Origin) -> usize {
        let horizon = self.horizon_ms(wall_ms);
        // A scratch vector kept between calls: no allocation per applied write.
        let mut commit = std::mem::take(&mut self.commit_scratch);
        commit.clear();
        for Item {
            key,
            value,
            version,
            meta,
        } in items
        {
            let b = bucket_of(&key, self.cfg.buckets.get()) as usize;
            let found = self.store.lookup(&key);
            let old = found.as_ref().map(|(_, m)| *m);
            if old.is_some_and(|m| m.version >= version) {
                self.stats.stale_ignored += 1;
                continue;
            }
            let tombstone = value.is_none();
            if tombstone && old.is_none() && version.hlc.physical_ms() < horizon {
                // Past its grace period: collected everywhere else, and nothing to delete here.
                self.stats.expired_tombstones_dropped += 1;
                continue;
            }
            // Overwriting a known key (the common case) needs no new copy of the key.
            let key: Key = match found {
                Some((k, _)) => k,
                None => {
                    let k = Key::from(key);
                    self.buckets.insert_key(b, &k);
                    k
                }
            };
            if let Some(m) = old {
                self.buckets
                    .subtract(b, entry_hash(&key, m.version, m.is_tombstone()));
                if m.is_tombstone() {
                    self.tombstones.remove(&(m.version, key.clone()));
                }
            }
            self.buckets.add(b, entry_hash(&key, version, tombstone));
            if tombstone {
                self.tombstones.insert((version, key.clone()));
            }
            let value = value.as_deref().map(Value::from);
            // A tombstone carries no metadata, whatever a peer sent.
            let attrs = if tombstone {
                Attrs::default()
            } else {
                Attrs::new(meta)
            };
            let revision = self.record(Logged {
                key: key.clone(),
                value: value.clone(),
                version,
                attrs: attrs.clone(),
            });
            commit.push((
                key,
                Stored {
                    value,
                    version,
                    revision,
                    attrs,
                },
            ));
        }
        let n = commit.len();
        self.stats.changes_applied += n as u64;
        if n > 0 {
            self.persist_commit(&commit, wall_ms, origin);
        }
        if n > 0 {
            self.store.commit(commit.drain(..));
        }
        self.commit_scratch = commit;
        n
    }
}
