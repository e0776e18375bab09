//! The pure merge of persisted records into a store: what replaying a data directory and
//! loading a [`MemoryDisk`](super::MemoryDisk) both do.
//!
//! An entry wins only over an older version (last writer wins); a removal removes a key only
//! while it still holds exactly the removed version. Merging is therefore idempotent, and
//! merging a record again over a state that already reflects it (or a later state of the same
//! key) changes nothing: an old log replayed over a newer snapshot cannot go backwards, and a
//! *fuzzy* snapshot (each key read at some moment after the cut) followed by every record
//! after the cut gives the exact state.

use std::collections::HashMap;

use bytes::Bytes;

use super::{Loaded, LoadedEntry};
use crate::hlc::{Hlc, Version};
use crate::store::EntryMeta;
use crate::wire;

/// One merged entry: value (`None`: tombstone), version, flags and owner.
type Merged = (Option<Bytes>, Version, EntryMeta);

/// A store being rebuilt from records: key → (value or tombstone, version, metadata), plus
/// the latest wall time seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergedState {
    state: HashMap<String, Merged>,
    last_wall_ms: u64,
}

impl MergedState {
    /// An empty state.
    #[must_use]
    pub fn new() -> MergedState {
        MergedState::default()
    }

    /// Merges every entry and removal of `record`, in order.
    pub fn merge_record(&mut self, record: &wire::LogRecord) {
        self.observe_wall_ms(record.wall_ms);
        for e in &record.entries {
            self.merge_entry(e.clone());
        }
        for r in &record.removed {
            self.merge_removed(r);
        }
    }

    /// Notes a record's wall time (unix ms).
    pub fn observe_wall_ms(&mut self, wall_ms: u64) {
        self.last_wall_ms = self.last_wall_ms.max(wall_ms);
    }

    /// Merges one entry: it wins only over an older version. An empty key is ignored.
    pub fn merge_entry(&mut self, e: wire::Entry) {
        if e.key.is_empty() {
            return;
        }
        let version = Version {
            hlc: Hlc(e.hlc),
            node: e.node,
        };
        self.observe_wall_ms(version.hlc.physical_ms());
        let meta = if e.value.is_some() {
            EntryMeta::from_wire(e.flags, e.owner.as_ref())
        } else {
            EntryMeta::default()
        };
        match self.state.get_mut(&e.key) {
            Some(cur) if cur.1 >= version => {}
            Some(cur) => *cur = (e.value, version, meta),
            None => {
                self.state.insert(e.key, (e.value, version, meta));
            }
        }
    }

    /// Removes the key of `r` if it holds exactly `r`'s version.
    pub fn merge_removed(&mut self, r: &wire::KeyVersion) {
        let version = Version {
            hlc: Hlc(r.hlc),
            node: r.node,
        };
        if self.state.get(&r.key).is_some_and(|cur| cur.1 == version) {
            self.state.remove(&r.key);
        }
    }

    /// Keys held (tombstones included).
    #[must_use]
    pub fn len(&self) -> usize {
        self.state.len()
    }

    /// Whether no key is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.state.is_empty()
    }

    /// Whether `key` is held (tombstones included).
    #[must_use]
    pub fn contains_key(&self, key: &str) -> bool {
        self.state.contains_key(key)
    }

    /// The value (`None`: tombstone), version and metadata held under `key`.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&(Option<Bytes>, Version, EntryMeta)> {
        self.state.get(key)
    }

    /// Latest wall time seen in the records (unix ms).
    #[must_use]
    pub fn last_wall_ms(&self) -> u64 {
        self.last_wall_ms
    }

    /// Every entry, sorted by key, and the latest wall time.
    #[must_use]
    pub fn into_sorted(self) -> (Vec<LoadedEntry>, u64) {
        let mut entries: Vec<LoadedEntry> = self
            .state
            .into_iter()
            .map(|(k, (v, ver, meta))| (k, v, ver, meta))
            .collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        (entries, self.last_wall_ms)
    }

    /// The state as a [`Loaded`] with an empty report.
    #[must_use]
    pub fn to_loaded(&self) -> Loaded {
        let (entries, last_wall_ms) = self.clone().into_sorted();
        Loaded {
            entries,
            last_wall_ms,
            report: super::LoadReport::default(),
        }
    }
}
