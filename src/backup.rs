//! Backup and restore on [`Node`]: [`Node::snapshot`], a consistent copy of the local store
//! (tombstones included), and [`Node::restore`], which merges entries back by version (and
//! makes the cluster converge on them) or re-stamps them.

use std::collections::BTreeMap;

use crate::driver::Command;
use crate::{Error, Node, RestoreMode, RestoreReport, StoredEntry};

/// Entries walked per step of a snapshot, between which the task yields.
const SNAPSHOT_STEP: usize = 4096;
/// How many times a snapshot walks the store again when the change log no longer reaches
/// back to where the walk started (writes faster than the log keeps).
const SNAPSHOT_TRIES: usize = 3;
/// Most entries handed to the driver in one restore command.
const RESTORE_CHUNK: usize = 256;
/// Most key and value bytes in one restore command (a larger entry goes alone).
const RESTORE_CHUNK_BYTES: usize = 256 * 1024;

/// A consistent copy of a node's store ([`Node::snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The local revision the copy is exactly the store at: every change up to it is in,
    /// none after it.
    pub revision: u64,
    /// Every entry, live values and tombstones (`value: None`), sorted by key, each with its
    /// version, flags, owner and the local revision it was stored at.
    pub entries: Vec<(String, StoredEntry)>,
}

impl Node {
    /// A consistent copy of this node's store: every live entry and tombstone with its
    /// version and metadata, exactly as the store was at local revision
    /// [`Snapshot::revision`] (a state the store really had: a batch is in whole or not at
    /// all).
    ///
    /// The store is walked in steps without holding anything across them, so the driver
    /// keeps serving writes meanwhile; the changes applied during the walk are then taken
    /// from the change log and replayed over it. If writes outran the change log during the
    /// walk (`Compacted`), it walks again, up to three times. Tombstones collected during the
    /// walk (after their grace period) may or may not appear.
    ///
    /// # Errors
    ///
    /// [`Error::Compacted`] when the change log did not reach back to the start of the walk
    /// three times in a row; [`Error::Closed`] after shutdown.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
    /// # };
    /// let node = node(1).await?;
    /// node.put("app/a", "1").await?;
    /// node.put("app/b", "2").await?;
    /// node.delete("app/b").await?;
    /// let snapshot = node.snapshot().await?;
    /// assert_eq!(snapshot.revision, node.revision());
    /// let keys: Vec<(&str, bool)> =
    ///     snapshot.entries.iter().map(|(k, e)| (k.as_str(), e.is_tombstone())).collect();
    /// assert_eq!(keys, [("app/a", false), ("app/b", true)]);
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn snapshot(&self) -> Result<Snapshot, Error> {
        let store = self.shared.store().clone();
        let mut last_error = None;
        for _ in 0..SNAPSHOT_TRIES {
            let from = store.revision();
            let mut copy: BTreeMap<String, StoredEntry> = BTreeMap::new();
            let mut after: Option<String> = None;
            loop {
                let step = store.entries_after(after.as_deref(), SNAPSHOT_STEP);
                let done = step.len() < SNAPSHOT_STEP;
                after = step.last().map(|(k, _)| k.clone());
                copy.extend(step);
                if done {
                    break;
                }
                tokio::task::yield_now().await;
            }
            // Every change after `from`, up to what the driver has applied when it answers:
            // the walk saw each key at some point after `from`, so replaying these in order
            // gives each key as it is at the last of them.
            match self.shared.changes_since(from, "").await {
                Ok(changes) => {
                    let mut revision = from;
                    for c in changes {
                        revision = revision.max(c.revision);
                        copy.insert(
                            c.key,
                            StoredEntry {
                                value: c.value,
                                version: c.version,
                                revision: c.revision,
                                flags: c.flags,
                                owner: c.owner,
                            },
                        );
                    }
                    return Ok(Snapshot {
                        revision,
                        entries: copy.into_iter().collect(),
                    });
                }
                Err(e @ Error::Compacted { .. }) => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or(Error::Closed))
    }

    /// Restore `entries` (a [`Snapshot`]'s, or any backup's) into the cluster as `mode` says.
    ///
    /// - [`RestoreMode::ByVersion`]: each entry keeps its version and is merged as if a peer
    ///   had sent it: stored where it is newer than what this node holds, skipped where the
    ///   store holds the same or a newer version (restoring an old backup never overwrites
    ///   newer writes). What was stored is pushed to the other nodes at once with its
    ///   original version (in bounded messages, as writes), so the cluster converges on it
    ///   without waiting for anti-entropy, which covers the nodes the push misses.
    /// - [`RestoreMode::ForceNewer`]: every entry is written again under a new version of
    ///   this node (puts with their flags; tombstones become deletes), winning over what the
    ///   cluster holds now. An owned entry stays owned only if this node was its owner.
    ///
    /// Entries are handed to the node in chunks (at most 256 entries or 256 KiB each), each
    /// applied atomically and acknowledged like a write (durable as the fsync policy says);
    /// the restore as a whole is not atomic: if a chunk is refused, the chunks before it stay
    /// applied and the error says which key was refused.
    ///
    /// # Errors
    ///
    /// [`Error::Replication`] for an entry that breaks a limit (key, value), a key given
    /// twice in one chunk, an owner that is not the entry's writer, or (ByVersion) a version
    /// too far ahead of this node's clock
    /// ([`ReplicationError::InvalidEntry`](crate::ReplicationError::InvalidEntry)); nothing of
    /// that chunk changed. Otherwise as [`Node::put`].
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
    /// # };
    /// use chorus::RestoreMode;
    /// let node = node(1).await?;
    /// node.put("app/mode", "blue").await?;
    /// let backup = node.snapshot().await?;
    /// node.put("app/mode", "green").await?;
    /// // By version, the older backup changes nothing newer.
    /// let report = node.restore(backup.entries.clone(), RestoreMode::ByVersion).await?;
    /// assert_eq!((report.applied, report.skipped_older), (0, 1));
    /// assert_eq!(node.get("app/mode").map(|e| e.value), Some("green".into()));
    /// // Forced, it wins.
    /// node.restore(backup.entries, RestoreMode::ForceNewer).await?;
    /// assert_eq!(node.get("app/mode").map(|e| e.value), Some("blue".into()));
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn restore(
        &self,
        entries: Vec<(String, StoredEntry)>,
        mode: RestoreMode,
    ) -> Result<RestoreReport, Error> {
        let mut report = RestoreReport::default();
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let mut chunk = Vec::new();
            let mut bytes = 0usize;
            while let Some((key, entry)) = entries.peek() {
                let size = key.len() + entry.value.as_ref().map_or(0, |v| v.len());
                if !chunk.is_empty()
                    && (chunk.len() >= RESTORE_CHUNK || bytes + size > RESTORE_CHUNK_BYTES)
                {
                    break;
                }
                bytes += size;
                chunk.extend(entries.next());
            }
            let done = self
                .command(|reply| Command::Restore {
                    entries: chunk,
                    mode,
                    reply,
                })
                .await??;
            report.add(done);
        }
        Ok(report)
    }
}
