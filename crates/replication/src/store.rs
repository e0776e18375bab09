//! The replicated map as readers see it: a cheap-clone handle over one ordered, lock-free
//! index of keys.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use bytes::Bytes;
use crossbeam_skiplist::SkipMap;

use chorus_protocol::NodeId;

use crate::hlc::Version;
use crate::wire;

/// A stored key: one exact-size allocation, shared by the index, the tombstone index, the
/// change log and (while anti-entropy lists them) the digest buckets' key lists.
pub(crate) type Key = Arc<str>;

/// A stored value: one allocation of exactly its bytes (plus the reference counts), shared
/// by the map and the change log. Readers get it as `Bytes` ([`bytes_of`]).
pub(crate) type Value = Arc<[u8]>;

/// `value` as `Bytes`, sharing its allocation.
pub(crate) fn bytes_of(value: &Value) -> Bytes {
    Bytes::from_owner(value.clone())
}

/// The node that owns an entry written as *owned* (see [`PutMeta::owned`](crate::PutMeta)):
/// the writer and the incarnation (life) it wrote in.
///
/// Chorus records it and replicates it with the entry; what an owner's departure does to
/// its entries is decided by the layer above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner {
    /// The writer's node id (always the node of the entry's version).
    pub node: NodeId,
    /// The writer's incarnation when it wrote the entry.
    pub incarnation: u64,
}

/// An entry's metadata beyond its value and version: opaque flags and an owner. Both are
/// written with the value (the same version), replicated and persisted with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct EntryMeta {
    /// Opaque to Chorus (Consul's `Flags`); 0 by default.
    pub flags: u64,
    /// The owner of an entry written as owned; `None` by default.
    pub owner: Option<Owner>,
}

impl EntryMeta {
    /// Whether this is the default (no flags, no owner).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.flags == 0 && self.owner.is_none()
    }

    /// The metadata as the wire and the log carry it: `(flags, owner)`.
    pub(crate) fn to_wire(self) -> (u64, Option<wire::Owner>) {
        (
            self.flags,
            self.owner.map(|o| wire::Owner {
                node: o.node.0,
                incarnation: o.incarnation,
            }),
        )
    }

    /// The metadata of a wire entry or op.
    pub(crate) fn from_wire(flags: u64, owner: Option<&wire::Owner>) -> EntryMeta {
        EntryMeta {
            flags,
            owner: owner.map(|o| Owner {
                node: NodeId(o.node),
                incarnation: o.incarnation,
            }),
        }
    }
}

/// [`EntryMeta`] as the store keeps it: nothing but a null pointer for the common entry
/// without flags or owner (8 bytes per key), one small allocation otherwise, shared by the
/// store and the change log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Attrs(Option<Arc<EntryMeta>>);

impl Attrs {
    pub(crate) fn new(meta: EntryMeta) -> Attrs {
        Attrs((!meta.is_empty()).then(|| Arc::new(meta)))
    }

    pub(crate) fn get(&self) -> EntryMeta {
        self.0.as_deref().copied().unwrap_or_default()
    }
}

/// An entry as the store keeps it (see [`Entry`], which readers get).
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) value: Option<Value>,
    pub(crate) version: Version,
    pub(crate) revision: u64,
    pub(crate) attrs: Attrs,
}

impl Stored {
    pub(crate) fn entry(&self) -> Entry {
        let meta = self.attrs.get();
        Entry {
            value: self.value.as_ref().map(bytes_of),
            version: self.version,
            revision: self.revision,
            flags: meta.flags,
            owner: meta.owner,
        }
    }

    fn meta(&self) -> Meta {
        Meta {
            version: self.version,
            value_len: self.value.as_ref().map(|v| v.len()),
        }
    }
}

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
    /// Opaque flags written with the value (Consul's `Flags`); 0 unless set.
    pub flags: u64,
    /// The writer and its incarnation, for an entry written as owned; `None` otherwise.
    pub owner: Option<Owner>,
}

impl Entry {
    /// Whether this entry is a tombstone.
    #[must_use]
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// The entry's flags and owner.
    #[must_use]
    pub fn meta(&self) -> EntryMeta {
        EntryMeta {
            flags: self.flags,
            owner: self.owner,
        }
    }

    /// The entry under `key` as the wire and the durable log carry it (its revision is
    /// local and not carried).
    #[must_use]
    pub fn to_wire(&self, key: &str) -> wire::Entry {
        let (flags, owner) = self.meta().to_wire();
        wire::Entry {
            key: key.to_owned(),
            hlc: self.version.hlc.0,
            node: self.version.node,
            value: self.value.clone(),
            flags,
            owner,
        }
    }
}

/// A read handle on a node's replicated store. Clone it freely and read from any thread.
///
/// The store is one ordered index of keys, a lock-free skip list: a lookup costs
/// O(log n), a prefix scan O(log n + k) with no sort, and no reader, however long it walks
/// the index, blocks the writer's single-key changes. Writes come only from the owning
/// [`Replica`](crate::Replica).
///
/// # Consistency for readers
/// - A single-key read ([`get`](Store::get), [`get_entry`](Store::get_entry)) returns either
///   the entry before or after any write, never a mix and never "absent" for a key that is
///   overwritten: an entry is replaced in place, in a slot locked only to copy or swap it.
/// - Multi-key reads ([`scan_prefix`](Store::scan_prefix), [`get_many`](Store::get_many),
///   [`entries`](Store::entries)) never observe part of a batch. They read optimistically:
///   a multi-entry change set bumps a counter to odd before and to even after it is
///   applied, and a read that saw the counter move is done again. After two such tries a
///   read takes a small gate for reading, which the writer takes for writing around a
///   multi-entry change set; so the writer can wait for a reader only when batches kept
///   landing during that reader's walk, and then for one walk at most.
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

/// An entry in the index. The skip list's own replace unlinks the old node before it links
/// the new one (a reader could find the key missing in between), so an entry is overwritten
/// in place instead, under this lock, held only to clone or swap the entry.
type Slot = Mutex<Stored>;

/// How many times a multi-key read runs without the gate before it takes it.
const OPTIMISTIC_READS: usize = 2;

#[derive(Default)]
struct Inner {
    /// The one index of keys, in key order.
    map: SkipMap<Key, Slot>,
    /// Highest revision whose change is fully visible.
    revision: AtomicU64,
    /// Number of entries that hold a value (tombstones excluded).
    live: AtomicUsize,
    /// Odd while a multi-entry change set is being applied: incremented before and after.
    batches: AtomicU64,
    /// Held for writing while a multi-entry change set is applied, for reading by multi-key
    /// reads that failed their optimistic tries. Guards no data, so poisoning carries no
    /// meaning and is ignored.
    gate: RwLock<()>,
}

/// The entry in `slot`. No code panics while holding a slot (it only clones or swaps), so a
/// poisoned slot still holds a whole entry.
fn lock(slot: &Slot) -> MutexGuard<'_, Stored> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
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
        let e = self.inner.map.get(key)?;
        lock(e.value()).value.as_ref().map(bytes_of)
    }

    /// The entry under `key`, tombstones included.
    #[must_use]
    pub fn get_entry(&self, key: &str) -> Option<Entry> {
        self.inner.map.get(key).map(|e| lock(e.value()).entry())
    }

    /// The values of several keys, read at one point with respect to batches.
    #[must_use]
    pub fn get_many(&self, keys: &[&str]) -> Vec<Option<Bytes>> {
        self.consistent(|| keys.iter().map(|k| self.get(k)).collect())
    }

    /// Every live `(key, value)` whose key starts with `prefix`, sorted by key.
    ///
    /// A range of the index: O(log n + k) for k keys under the prefix (tombstones among
    /// them included); never observes half a batch.
    #[must_use]
    pub fn scan_prefix(&self, prefix: &str) -> Vec<(String, Bytes)> {
        self.consistent(|| {
            self.prefix_range(prefix)
                .filter_map(|e| {
                    let value = lock(e.value()).value.as_ref().map(bytes_of)?;
                    Some((e.key().to_string(), value))
                })
                .collect()
        })
    }

    /// Every live entry (with its version and revision) whose key starts with `prefix`,
    /// sorted by key. Tombstones are left out.
    ///
    /// A range of the index: O(log n + k); never observes half a batch.
    #[must_use]
    pub fn scan_entries(&self, prefix: &str) -> Vec<(String, Entry)> {
        self.consistent(|| {
            self.prefix_range(prefix)
                .filter_map(|e| {
                    let entry = lock(e.value()).entry();
                    (!entry.is_tombstone()).then(|| (e.key().to_string(), entry))
                })
                .collect()
        })
    }

    /// Every entry, tombstones included, sorted by key (a consistent copy).
    #[must_use]
    pub fn entries(&self) -> BTreeMap<String, Entry> {
        self.consistent(|| {
            self.inner
                .map
                .iter()
                .map(|e| (e.key().to_string(), lock(e.value()).entry()))
                .collect()
        })
    }

    /// The index entries whose key starts with `prefix`, in key order.
    fn prefix_range<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = crossbeam_skiplist::map::Entry<'a, Key, Slot>> + 'a {
        self.inner
            .map
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |e| e.key().starts_with(prefix))
    }

    /// Runs the multi-key read `read` so that it observes no part of a batch: optimistically
    /// (again if a batch was applied meanwhile), then behind the gate.
    fn consistent<T>(&self, mut read: impl FnMut() -> T) -> T {
        for _ in 0..OPTIMISTIC_READS {
            let before = self.inner.batches.load(Ordering::Acquire);
            if before % 2 == 1 {
                // A batch is being applied: wait for it at the gate.
                break;
            }
            let out = read();
            // Every entry read above is ordered before this load: had one come from a batch,
            // the counter would have moved.
            fence(Ordering::Acquire);
            if self.inner.batches.load(Ordering::Relaxed) == before {
                return out;
            }
        }
        let _gate = self
            .inner
            .gate
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        read()
    }

    /// The version of `key` and its value's length, without touching the value.
    pub(crate) fn meta(&self, key: &str) -> Option<Meta> {
        self.inner.map.get(key).map(|e| lock(e.value()).meta())
    }

    /// The stored key equal to `key` (the shared allocation) and its [`Meta`].
    pub(crate) fn lookup(&self, key: &str) -> Option<(Key, Meta)> {
        self.inner
            .map
            .get(key)
            .map(|e| (e.key().clone(), lock(e.value()).meta()))
    }

    /// Calls `f` with every stored key, in key order (the digest buckets' key lists are
    /// built from this).
    pub(crate) fn for_each_key(&self, mut f: impl FnMut(&Key)) {
        for e in self.inner.map.iter() {
            f(e.key());
        }
    }

    /// Calls `f` with every stored key and its [`Meta`], in key order (summaries of many
    /// buckets are built from this, in one walk).
    pub(crate) fn for_each_meta(&self, mut f: impl FnMut(&Key, Meta)) {
        for e in self.inner.map.iter() {
            let meta = lock(e.value()).meta();
            f(e.key(), meta);
        }
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

    /// Stores already-decided winners. Multi-entry change sets are applied between two
    /// increments of the batch counter, behind the gate, so multi-key readers see all of
    /// them or none. The published revision moves to the highest revision in the set once
    /// every entry is visible.
    pub(crate) fn commit(&self, changes: impl ExactSizeIterator<Item = (Key, Stored)>) {
        let batch = changes.len() > 1;
        let _gate = batch.then(|| {
            self.inner
                .gate
                .write()
                .unwrap_or_else(PoisonError::into_inner)
        });
        if batch {
            self.inner.batches.fetch_add(1, Ordering::Relaxed);
            // The odd count is ordered before every entry written below.
            fence(Ordering::Release);
        }
        let mut top = 0;
        for (key, entry) in changes {
            top = top.max(entry.revision);
            let is_value = entry.value.is_some();
            let was_value = match self.inner.map.get(&*key) {
                Some(e) => {
                    let old = std::mem::replace(&mut *lock(e.value()), entry);
                    old.value.is_some()
                }
                None => {
                    self.inner.map.insert(key, Mutex::new(entry));
                    false
                }
            };
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
        if batch {
            self.inner.batches.fetch_add(1, Ordering::Release);
        }
        self.inner.revision.fetch_max(top, Ordering::AcqRel);
    }

    /// Removes `key` if it is still the tombstone of `version` (tombstone collection).
    pub(crate) fn remove_tombstone(&self, key: &str, version: Version) -> bool {
        let Some(e) = self.inner.map.get(key) else {
            return false;
        };
        let collectable = {
            let s = lock(e.value());
            s.value.is_none() && s.version == version
        };
        // Only the owning replica writes, so the entry cannot change in between.
        collectable && e.remove()
    }

    /// Removes `key` whatever it holds (used when a long-isolated node forgets old entries).
    pub(crate) fn remove(&self, key: &str) {
        if let Some(e) = self.inner.map.remove(key)
            && lock(e.value()).value.is_some()
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
    /// A range of the ordered index: O(log n + limit), and no lock beyond one entry's at a
    /// time, so a writer never waits for the walk.
    #[must_use]
    pub fn entries_after(&self, after: Option<&str>, limit: usize) -> Vec<(String, Entry)> {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.inner
            .map
            .range::<str, _>((lower, Bound::Unbounded))
            .take(limit)
            .map(|e| (e.key().to_string(), lock(e.value()).entry()))
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
            attrs: Attrs::default(),
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
    fn readers_on_other_threads_never_see_half_a_batch() {
        let s = Store::new();
        let batch = |n: u64| {
            let v: &'static str = if n.is_multiple_of(2) { "even" } else { "odd" };
            vec![
                (Key::from("k/a"), entry(Some(v), n, 2 * n)),
                (Key::from("k/b"), entry(Some(v), n, 2 * n + 1)),
            ]
        };
        s.commit(batch(1).into_iter());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (s, stop) = (s.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let many = s.get_many(&["k/a", "k/b"]);
                        assert_eq!(many[0], many[1], "get_many saw half a batch");
                        let scan = s.scan_prefix("k/");
                        assert_eq!(scan.len(), 2);
                        assert_eq!(scan[0].1, scan[1].1, "scan_prefix saw half a batch");
                        // A key being overwritten is never missing.
                        assert!(s.get("k/a").is_some());
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for n in 2..20_000 {
            s.commit(batch(n).into_iter());
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
        assert_eq!(s.len(), 2);
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
