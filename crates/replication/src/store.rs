//! The replicated map as readers see it: a cheap-clone handle over a concurrent map.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

/// A stored key: one exact-size allocation, shared by the map, the digest buckets, the
/// tombstone index and the change log.
pub(crate) type Key = Arc<str>;

/// A stored value: one allocation of exactly its bytes (plus the reference counts), shared
/// by the map and the change log. Readers get it as `Bytes` ([`bytes_of`]).
pub(crate) type Value = Arc<[u8]>;

/// `value` as `Bytes`, sharing its allocation.
pub(crate) fn bytes_of(value: &Value) -> Bytes {
    Bytes::from_owner(value.clone())
}

/// An entry as the store keeps it (see [`Entry`], which readers get).
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) value: Option<Value>,
    pub(crate) version: Version,
    pub(crate) revision: u64,
}

impl Stored {
    pub(crate) fn entry(&self) -> Entry {
        Entry {
            value: self.value.as_ref().map(bytes_of),
            version: self.version,
            revision: self.revision,
        }
    }
}

use bytes::Bytes;
use dashmap::DashMap;

use crate::hlc::Version;

/// What the replica needs to know of a stored key for sync: its version and its value's
/// length (`None`: a tombstone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) version: Version,
    pub(crate) value_len: Option<usize>,
}

impl Meta {
    pub(crate) fn is_tombstone(&self) -> bool {
        self.value_len.is_none()
    }
}

/// One stored entry: a value or a tombstone, with the version that wrote it and the local
/// revision at which this node applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `None` is a tombstone: the key was deleted at `version`.
    pub value: Option<Bytes>,
    /// The winning version (last writer wins).
    pub version: Version,
    /// Local revision of the change that stored this entry (see [`Store::revision`]).
    pub revision: u64,
}

impl Entry {
    /// Whether this entry is a tombstone.
    #[must_use]
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }
}

/// A read handle on a node's replicated store. Clone it freely and read from any thread.
///
/// Every read goes straight to the map; no read holds a map reference across another map
/// call. Writes come only from the owning [`Replica`](crate::Replica).
///
/// # Consistency for readers
/// - A single-key read ([`get`](Store::get), [`get_entry`](Store::get_entry)) returns either
///   the entry before or after any write, never a mix.
/// - Multi-key reads ([`scan_prefix`](Store::scan_prefix), [`get_many`](Store::get_many),
///   [`entries`](Store::entries)) never observe part of a batch: batches are applied under
///   the write side of a small gate that multi-key reads take for reading.
///
/// # Durability seam
/// Every mutation goes through [`Store::commit`] (and the tombstone collector's
/// `Store::remove_tombstone`), called only by the owning replica after it decided the
/// winner. The replica hands the same change set (and every removal) to its durable backend
/// just before (see `durable.rs` and [`Replica::restore`](crate::Replica::restore), which
/// loads a store from disk); the read API does not change.
#[derive(Clone, Default)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    map: DashMap<Key, Stored>,
    /// Highest revision whose change is fully visible.
    revision: AtomicU64,
    /// Number of entries that hold a value (tombstones excluded).
    live: AtomicUsize,
    /// Held for writing while a multi-key change is applied, for reading by multi-key reads.
    /// Guards no data, so poisoning carries no meaning and is ignored.
    gate: RwLock<()>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("len", &self.len())
            .field("revision", &self.revision())
            .finish()
    }
}

impl Store {
    /// An empty store.
    #[must_use]
    pub fn new() -> Store {
        Store::default()
    }

    /// The value stored under `key`, `None` when absent or deleted.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.inner
            .map
            .get(key)
            .and_then(|e| e.value.as_ref().map(bytes_of))
    }

    /// The entry under `key`, tombstones included.
    #[must_use]
    pub fn get_entry(&self, key: &str) -> Option<Entry> {
        self.inner.map.get(key).map(|e| e.entry())
    }

    /// The values of several keys, read at one point with respect to batches.
    #[must_use]
    pub fn get_many(&self, keys: &[&str]) -> Vec<Option<Bytes>> {
        let _gate = self
            .inner
            .gate
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        keys.iter().map(|k| self.get(k)).collect()
    }

    /// Every live `(key, value)` whose key starts with `prefix`, sorted by key.
    ///
    /// Walks the whole map (O(n)); never observes half a batch.
    #[must_use]
    pub fn scan_prefix(&self, prefix: &str) -> Vec<(String, Bytes)> {
        self.scan_entries(prefix)
            .into_iter()
            .filter_map(|(k, e)| e.value.map(|v| (k, v)))
            .collect()
    }

    /// Every live entry (with its version and revision) whose key starts with `prefix`,
    /// sorted by key. Tombstones are left out.
    ///
    /// Walks the whole map (O(n)); never observes half a batch.
    #[must_use]
    pub fn scan_entries(&self, prefix: &str) -> Vec<(String, Entry)> {
        let mut out: Vec<(String, Entry)> = {
            let _gate = self
                .inner
                .gate
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            self.inner
                .map
                .iter()
                .filter(|r| r.key().starts_with(prefix) && r.value().value.is_some())
                .map(|r| (r.key().to_string(), r.value().entry()))
                .collect()
        };
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every entry, tombstones included, sorted by key (a consistent copy).
    #[must_use]
    pub fn entries(&self) -> BTreeMap<String, Entry> {
        let _gate = self
            .inner
            .gate
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        self.inner
            .map
            .iter()
            .map(|r| (r.key().to_string(), r.value().entry()))
            .collect()
    }

    /// The version of `key` and its value's length, without touching the value.
    pub(crate) fn meta(&self, key: &str) -> Option<Meta> {
        self.inner.map.get(key).map(|e| Meta {
            version: e.version,
            value_len: e.value.as_ref().map(|v| v.len()),
        })
    }

    /// Number of keys holding a value (tombstones excluded).
    #[must_use]
    pub fn len(&self) -> usize {
        self.inner.live.load(Ordering::Acquire)
    }

    /// Whether no key holds a value.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of entries, tombstones included.
    #[must_use]
    pub fn entry_count(&self) -> usize {
        self.inner.map.len()
    }

    /// The local revision of the latest fully applied change (0 before any change).
    #[must_use]
    pub fn revision(&self) -> u64 {
        self.inner.revision.load(Ordering::Acquire)
    }

    /// Stores already-decided winners. Multi-entry change sets are applied behind the gate,
    /// so multi-key readers see all of them or none. The published revision moves to the
    /// highest revision in the set once every entry is visible.
    pub(crate) fn commit(&self, changes: impl ExactSizeIterator<Item = (Key, Stored)>) {
        let _gate = (changes.len() > 1).then(|| {
            self.inner
                .gate
                .write()
                .unwrap_or_else(PoisonError::into_inner)
        });
        let mut top = 0;
        for (key, entry) in changes {
            top = top.max(entry.revision);
            let is_value = entry.value.is_some();
            let was_value = self
                .inner
                .map
                .insert(key, entry)
                .is_some_and(|old| old.value.is_some());
            match (was_value, is_value) {
                (false, true) => {
                    self.inner.live.fetch_add(1, Ordering::AcqRel);
                }
                (true, false) => {
                    self.inner.live.fetch_sub(1, Ordering::AcqRel);
                }
                _ => {}
            }
        }
        self.inner.revision.fetch_max(top, Ordering::AcqRel);
    }

    /// Removes `key` if it is still the tombstone of `version` (tombstone collection).
    pub(crate) fn remove_tombstone(&self, key: &str, version: Version) -> bool {
        self.inner
            .map
            .remove_if(key, |_, e| e.value.is_none() && e.version == version)
            .is_some()
    }

    /// Removes `key` whatever it holds (used when a long-isolated node forgets old entries).
    pub(crate) fn remove(&self, key: &str) {
        if let Some((_, old)) = self.inner.map.remove(key)
            && old.value.is_some()
        {
            self.inner.live.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Store {
    /// Up to `limit` entries (tombstones included) with keys after `after` (from the first
    /// key when `None`), in key order: for walking the whole store in chunks (a snapshot
    /// written off the driver task) without holding anything store-wide between chunks.
    ///
    /// Takes no gate: **not a consistent snapshot**. Each entry is as it was at some moment
    /// of the call; a batch applied meanwhile may be seen in part, and keys written between
    /// two calls may or may not be seen. A snapshot built this way is exact once every record
    /// committed after the walk started is replayed over it (see `durable/merge.rs`).
    ///
    /// Costs one pass over the map per call (the map is not ordered): only the keys after
    /// `after` are taken while a shard of the map is held (a reference count each), the
    /// `limit` smallest are picked and looked up afterwards, so a writer waits at most for one
    /// shard's pass.
    #[must_use]
    pub fn entries_after(&self, after: Option<&str>, limit: usize) -> Vec<(String, Entry)> {
        if limit == 0 {
            return Vec::new();
        }
        let mut keys: Vec<Key> = self
            .inner
            .map
            .iter()
            .map(|r| r.key().clone())
            .filter(|k| after.is_none_or(|a| &**k > a))
            .collect();
        if keys.len() > limit {
            keys.select_nth_unstable(limit);
            keys.truncate(limit);
        }
        keys.sort_unstable();
        // A key removed since (a collected tombstone) is skipped: it is not in the store.
        keys.into_iter()
            .filter_map(|k| {
                let entry = self.inner.map.get(&k)?.entry();
                Some((k.to_string(), entry))
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;

    fn entry(v: Option<&'static str>, t: u64, rev: u64) -> Stored {
        Stored {
            value: v.map(|s| Value::from(s.as_bytes())),
            version: Version {
                hlc: Hlc::new(t, 0),
                node: 1,
            },
            revision: rev,
        }
    }

    #[test]
    fn commit_counts_live_values_and_publishes_revision() {
        let s = Store::new();
        s.commit(
            vec![
                ("a".into(), entry(Some("1"), 1, 1)),
                ("b".into(), entry(None, 1, 2)),
            ]
            .into_iter(),
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s.entry_count(), 2);
        assert_eq!(s.revision(), 2);
        assert_eq!(s.get("a"), Some(Bytes::from_static(b"1")));
        assert_eq!(s.get("b"), None);
        assert!(s.get_entry("b").is_some_and(|e| e.is_tombstone()));
        s.commit(vec![("a".into(), entry(None, 2, 3))].into_iter());
        assert!(s.is_empty());
        assert!(s.remove_tombstone(
            "a",
            Version {
                hlc: Hlc::new(2, 0),
                node: 1
            }
        ));
        assert!(!s.remove_tombstone(
            "b",
            Version {
                hlc: Hlc::new(9, 0),
                node: 1
            }
        ));
        assert_eq!(s.entry_count(), 1);
    }

    #[test]
    fn scan_prefix_is_sorted_and_skips_tombstones() {
        let s = Store::new();
        s.commit(
            vec![
                ("app/z".into(), entry(Some("z"), 1, 1)),
                ("app/a".into(), entry(Some("a"), 1, 2)),
                ("app/d".into(), entry(None, 1, 3)),
                ("other".into(), entry(Some("o"), 1, 4)),
            ]
            .into_iter(),
        );
        let keys: Vec<String> = s.scan_prefix("app/").into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["app/a", "app/z"]);
        assert_eq!(s.scan_prefix("").len(), 3);
    }
}
