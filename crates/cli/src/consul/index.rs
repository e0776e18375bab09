//! Consul's indexes on this agent: `ModifyIndex` of an entry and `X-Consul-Index` of an
//! answer, both derived from the node's local revision.
//!
//! # The mapping
//!
//! A Consul index is a local revision plus one: the empty store (revision 0) is index 1 and
//! an entry applied at revision `r` has `ModifyIndex` `r + 1`. Consul clients treat index 0
//! as "no index" (a query with `?index=0` does not block), so the state before the first
//! change must have an index of its own above 0, and the first change must move it: with
//! `max(revision, 1)` the empty store and the store after its first write would both be 1,
//! and a client that read the empty store would sleep through that write.
//!
//! # What an index promises
//!
//! An answer with index `i` reflects every change under its key or prefix up to revision
//! `i - 1`; a blocking query with `?index=i` returns once the index of the same read is
//! above `i`. The index of a read never goes backwards on this agent (as long as the process
//! runs: it starts again from the store's revision after a restart):
//! - a single key: the store's revision (read before the key), or the entry's own revision
//!   when it is newer;
//! - a prefix (`?recurse`, `?keys`): the highest `ModifyIndex` under the prefix, raised to
//!   the agent's *delete floor* (the revision of the latest delete this agent applied, under
//!   any prefix: a delete is the only change that lowers a prefix's highest entry, and the
//!   store keeps no per-prefix record of it for readers). A prefix scan that raced a write
//!   (the store's revision moved during the walk) is retried; if it keeps racing, the index
//!   is the revision read before the walk, and the floor is raised to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chorus::{Entry, Node};
use futures_util::StreamExt;
use tokio::sync::watch;

/// How many times a prefix read is retried when a write lands during its walk.
const STABLE_TRIES: usize = 3;
/// How long a prefix read waits for the change feed to reach the revision it read.
const FEED_WAIT: Duration = Duration::from_millis(250);

/// A Consul index for local revision `revision`.
pub fn of_revision(revision: u64) -> u64 {
    revision.saturating_add(1)
}

/// The local revision a Consul index stands for (`None` for index 0, "no index").
pub fn to_revision(index: u64) -> Option<u64> {
    index.checked_sub(1)
}

/// The agent-wide state behind prefix indexes: the delete floor and how far the change feed
/// has been read.
#[derive(Debug)]
pub struct Indexes {
    /// A revision no prefix index falls below once the store has reached it: the latest
    /// delete applied (or the revision at start, or a racing read's revision).
    floor: AtomicU64,
    /// The revision of the last change the feed task has read.
    seen: watch::Sender<u64>,
}

impl Indexes {
    /// The state for `node`, and the task that follows its change feed (spawn it on the
    /// runtime that serves the API; it ends when the node stops).
    pub fn new(node: &Node) -> (Arc<Indexes>, impl Future<Output = ()> + Send + 'static) {
        let start = node.revision();
        let indexes = Arc::new(Indexes {
            floor: AtomicU64::new(start),
            seen: watch::Sender::new(start),
        });
        let feed = follow(node.clone(), Arc::clone(&indexes));
        (indexes, feed)
    }

    /// The index of a single-key read: `revision_before` is the store's revision read just
    /// before the key.
    pub fn of_key(revision_before: u64, entry: Option<&Entry>) -> u64 {
        of_revision(revision_before.max(entry.map_or(0, |e| e.revision)))
    }

    /// Reads every live entry under `prefix` and the Consul index of that read.
    pub async fn read_prefix(&self, node: &Node, prefix: &str) -> (Vec<(String, Entry)>, u64) {
        let mut last = None;
        for _ in 0..STABLE_TRIES {
            let before = node.revision();
            let entries = node.scan(prefix);
            if node.revision() != before {
                last = Some((entries, before));
                continue;
            }
            // Every delete up to `before` must be in the floor before it is used.
            if !self.feed_reached(before).await {
                last = Some((entries, before));
                break;
            }
            let highest = entries.iter().map(|(_, e)| e.revision).max().unwrap_or(0);
            let floor = self.floor.load(Ordering::Acquire).min(before);
            return (entries, of_revision(highest.max(floor)));
        }
        // The walk raced writes, or the feed is behind: the revision before the walk is an
        // index every change not in the answer is above; later answers must not fall below.
        let (entries, before) = match last {
            Some(read) => read,
            None => {
                let before = node.revision();
                (node.scan(prefix), before)
            }
        };
        self.floor.fetch_max(before, Ordering::AcqRel);
        (entries, of_revision(before))
    }

    /// Whether the feed task has read the change at `revision` (waits a little for it).
    async fn feed_reached(&self, revision: u64) -> bool {
        let mut seen = self.seen.subscribe();
        matches!(
            tokio::time::timeout(FEED_WAIT, seen.wait_for(|s| *s >= revision)).await,
            Ok(Ok(_))
        )
    }

    fn saw(&self, revision: u64, deleted: bool) {
        if deleted {
            self.floor.fetch_max(revision, Ordering::AcqRel);
        }
        self.seen.send_if_modified(|s| {
            let newer = revision > *s;
            *s = (*s).max(revision);
            newer
        });
    }
}

/// Reads the node's change feed until the node stops: every delete raises the floor.
async fn follow(node: Node, indexes: Arc<Indexes>) {
    loop {
        let mut changes = node.watch("");
        // A feed that starts over (after it fell behind the change log) cannot tell which
        // deletes it missed: the floor rises to where it starts.
        indexes.saw(changes.revision(), true);
        loop {
            match changes.next().await {
                Some(Ok(change)) => indexes.saw(change.revision, change.value.is_none()),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "Consul API: change feed starts over");
                    break;
                }
                None => return,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn node() -> Node {
        let hub = chorus::transport::MemoryHub::new(Default::default()).unwrap();
        let transport = hub.endpoint("10.0.0.1:7400".parse().unwrap()).unwrap();
        Node::builder()
            .cluster("consul-index")
            .node_id(chorus::NodeId(1))
            .start_with_transport(transport)
            .await
            .unwrap()
    }

    #[test]
    fn index_is_revision_plus_one() {
        assert_eq!(of_revision(0), 1);
        assert_eq!(of_revision(41), 42);
        assert_eq!(of_revision(u64::MAX), u64::MAX);
        assert_eq!(to_revision(0), None);
        assert_eq!(to_revision(42), Some(41));
    }

    #[tokio::test]
    async fn a_prefix_index_is_its_highest_entry_and_never_goes_back() {
        let node = node().await;
        let (indexes, feed) = Indexes::new(&node);
        tokio::spawn(feed);
        // The empty store: index 1, above 0.
        let (entries, empty) = indexes.read_prefix(&node, "app/").await;
        assert!(entries.is_empty());
        assert_eq!(empty, 1);
        node.put("app/a", "1").await.unwrap();
        node.put("app/b", "2").await.unwrap();
        let (entries, two) = indexes.read_prefix(&node, "app/").await;
        assert_eq!(entries.len(), 2);
        assert_eq!(two, of_revision(node.get("app/b").unwrap().revision));
        // A write elsewhere does not move the prefix's index.
        node.put("other", "x").await.unwrap();
        assert_eq!(indexes.read_prefix(&node, "app/").await.1, two);
        // A delete under the prefix lowers its highest entry, but not its index.
        node.delete("app/b").await.unwrap();
        let deleted_at = node.revision();
        let mut after = 0;
        for _ in 0..100 {
            after = indexes.read_prefix(&node, "app/").await.1;
            if after > two {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(after, of_revision(deleted_at));
        node.shutdown().await.unwrap();
    }

    #[test]
    fn a_key_index_is_the_store_revision_or_the_entry() {
        assert_eq!(Indexes::of_key(0, None), 1);
        assert_eq!(Indexes::of_key(9, None), 10);
    }
}
