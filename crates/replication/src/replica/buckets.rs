//! The digest buckets: per bucket what must be kept incrementally (the wrapping sum of its
//! entries' hashes, its key count), and the bucket's keys in key order, derived from the
//! store's ordered index when anti-entropy needs to list them.

use std::time::{Duration, Instant};

use crate::hash::bucket_of;
use crate::store::{Key, Store};

/// Every digest bucket of a replica.
///
/// Listing one bucket's keys from the store's index alone means walking the whole index
/// (keys fall into buckets by hash), so the lists are built together, in one walk, the
/// first time anti-entropy needs any of them, kept up to date by every change while they
/// live, and dropped once unread for a while (the replica's `resend_holdoff`, checked at its
/// timer calls; see `docs/replication.md`, Anti-entropy). A node at rest holds none.
#[derive(Debug)]
pub(super) struct Buckets {
    sums: Vec<u64>,
    counts: Vec<usize>,
    /// Every bucket's keys, sorted (shared with the store), while anti-entropy uses them.
    /// Sorted vectors: 16 bytes a key, built at their exact size.
    keys: Option<Vec<Vec<Key>>>,
    /// `keys` was read since the last [`settle`](Buckets::settle).
    used: bool,
    /// When `keys` was last read, as of the last `settle`.
    last_read: Option<Instant>,
}

impl Buckets {
    /// `n` empty buckets.
    pub(super) fn new(n: u32) -> Buckets {
        let n = n as usize;
        Buckets {
            sums: vec![0; n],
            counts: vec![0; n],
            keys: None,
            used: false,
            last_read: None,
        }
    }

    /// How many buckets there are.
    pub(super) fn len(&self) -> usize {
        self.sums.len()
    }

    /// The digest: every bucket's sum.
    pub(super) fn digest(&self) -> Vec<u64> {
        self.sums.clone()
    }

    /// Bucket `b`'s sum.
    pub(super) fn sum(&self, b: usize) -> u64 {
        self.sums[b]
    }

    /// Whether bucket `b` holds no key.
    pub(super) fn is_empty(&self, b: usize) -> bool {
        self.counts[b] == 0
    }

    /// Adds an entry's hash to bucket `b`.
    pub(super) fn add(&mut self, b: usize, hash: u64) {
        self.sums[b] = self.sums[b].wrapping_add(hash);
    }

    /// Takes an entry's hash out of bucket `b`.
    pub(super) fn subtract(&mut self, b: usize, hash: u64) {
        self.sums[b] = self.sums[b].wrapping_sub(hash);
    }

    /// `key`, not stored until now, joins bucket `b`.
    pub(super) fn insert_key(&mut self, b: usize, key: &Key) {
        self.counts[b] += 1;
        if let Some(lists) = self.keys.as_mut() {
            let list = &mut lists[b];
            if let Err(at) = list.binary_search(key) {
                if list.len() == list.capacity() {
                    // Grow by an eighth, not double: the lists are sized exactly when built.
                    list.reserve_exact(list.len() / 8 + 1);
                }
                list.insert(at, key.clone());
            }
        }
    }

    /// `key` leaves bucket `b` (and the store).
    pub(super) fn remove_key(&mut self, b: usize, key: &str) {
        self.counts[b] = self.counts[b].saturating_sub(1);
        if let Some(lists) = self.keys.as_mut() {
            let list = &mut lists[b];
            if let Ok(at) = list.binary_search_by(|k| (**k).cmp(key)) {
                list.remove(at);
            }
        }
    }

    /// Bucket `b`'s keys in key order, building every bucket's list from `store` in one walk
    /// of its index if they are not there.
    pub(super) fn keys(&mut self, store: &Store, b: usize) -> &[Key] {
        self.used = true;
        let n = self.bucket_count();
        let lists = self.keys.get_or_insert_with(|| {
            let mut lists: Vec<Vec<Key>> =
                self.counts.iter().map(|&c| Vec::with_capacity(c)).collect();
            // Sorted as they come: the index is walked in key order.
            store.for_each_key(|k| lists[bucket_of(k, n) as usize].push(k.clone()));
            lists
        });
        &lists[b]
    }

    /// How many keys buckets `bs` hold together.
    pub(super) fn count_of(&self, bs: impl Iterator<Item = usize>) -> usize {
        bs.map(|b| self.counts[b]).sum()
    }

    /// The bucket count as the hash takes it (it fits: `ReplicaConfig::buckets` is a u32).
    pub(super) fn bucket_count(&self) -> u32 {
        u32::try_from(self.sums.len()).unwrap_or(u32::MAX)
    }

    /// Notes that whatever read the key lists since the last call did so at `now` (called
    /// after every handled message).
    pub(super) fn settle(&mut self, now: Instant) {
        if std::mem::take(&mut self.used) {
            self.last_read = Some(now);
        }
    }

    /// When the key lists, unread since, are to be dropped: `idle` after their last read.
    pub(super) fn expiry(&self, idle: Duration) -> Option<Instant> {
        self.keys.as_ref()?;
        self.last_read.map(|t| t + idle)
    }

    /// Drops the key lists if they went unread for `idle` (a node at rest holds none).
    pub(super) fn expire(&mut self, now: Instant, idle: Duration) {
        self.settle(now);
        if self.expiry(idle).is_some_and(|t| t <= now) {
            self.keys = None;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::hlc::{Hlc, Version};
    use crate::store::Stored;

    fn stored(rev: u64) -> Stored {
        Stored {
            value: None,
            version: Version {
                hlc: Hlc::new(1, 0),
                node: 1,
            },
            revision: rev,
            attrs: crate::store::Attrs::default(),
        }
    }

    fn listed(b: &mut Buckets, store: &Store) -> Vec<Vec<String>> {
        (0..b.len())
            .map(|i| b.keys(store, i).iter().map(|k| k.to_string()).collect())
            .collect()
    }

    #[test]
    fn key_lists_follow_the_index_and_go_when_unread_for_a_while() {
        let store = Store::new();
        let mut b = Buckets::new(4);
        let mut commit = Vec::new();
        for (i, k) in ["c", "a", "e", "b"].into_iter().enumerate() {
            let key = Key::from(k);
            b.insert_key(bucket_of(k, 4) as usize, &key);
            commit.push((key, stored(i as u64 + 1)));
        }
        store.commit(commit.into_iter());
        let mut expected: Vec<Vec<String>> = vec![Vec::new(); 4];
        for k in ["a", "b", "c", "e"] {
            expected[bucket_of(k, 4) as usize].push(k.to_owned());
        }
        assert_eq!(listed(&mut b, &store), expected);
        assert_eq!(
            (0..4).filter(|&i| !b.is_empty(i)).count(),
            expected.iter().filter(|l| !l.is_empty()).count()
        );
        // Changes while the lists live keep them right.
        let d = Key::from("d");
        b.insert_key(bucket_of("d", 4) as usize, &d);
        store.commit(std::iter::once((d, stored(5))));
        b.remove_key(bucket_of("a", 4) as usize, "a");
        store.remove("a");
        expected[bucket_of("d", 4) as usize].push("d".to_owned());
        expected[bucket_of("d", 4) as usize].sort();
        expected[bucket_of("a", 4) as usize].retain(|k| k != "a");
        assert_eq!(listed(&mut b, &store), expected);
        // Kept while read within `idle`, dropped once unread for that long.
        let (t0, idle) = (Instant::now(), Duration::from_secs(1));
        b.settle(t0);
        assert_eq!(b.expiry(idle), Some(t0 + idle));
        b.expire(t0 + idle / 2, idle);
        assert!(b.keys.is_some());
        b.expire(t0 + idle, idle);
        assert_eq!(b.expiry(idle), None);
        assert!(b.keys.is_none());
        assert_eq!(listed(&mut b, &store), expected);
    }
}
