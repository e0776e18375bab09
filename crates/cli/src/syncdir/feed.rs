//! Feeding the mirror from the node: the first snapshot once the node is in sync, then its
//! watch, fresh reads when the watch fell behind, and the removing snapshot once a peer
//! confirms the state.

use std::time::Duration;

use chorus::{MemberState, Node};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::stats::{SyncStats, bump};
use super::{Absent, SyncInput};

/// How often a mirror that kept files waiting for sync checks again.
const SYNC_POLL: Duration = Duration::from_millis(250);

/// Whether the node's store matched a live peer's: only then is a key it lacks really gone.
fn in_sync_with_a_peer(node: &Node) -> bool {
    node.is_in_sync() && node.members().iter().any(|m| m.state == MemberState::Alive)
}

/// A fresh read of the prefix.
fn snapshot(node: &Node, prefix: &str, absent: Absent) -> SyncInput {
    let revision = node.revision();
    let entries = node
        .scan(prefix)
        .into_iter()
        .map(|(key, entry)| (key, entry.value))
        .collect();
    SyncInput::Snapshot {
        entries,
        revision,
        absent,
    }
}

/// Feeds the mirror from the node until the node stops or the mirror is gone: a snapshot
/// once the node is in sync (with a peer, or alone after its solo delay) or `sync_wait`
/// passed, the changes after it, a new snapshot whenever the watch fell behind, and a removing
/// snapshot once a node that started without a peer's confirmation gets in sync with one.
pub(super) async fn feed(
    node: &Node,
    prefix: &str,
    sync_wait: Duration,
    tx: &mpsc::Sender<SyncInput>,
    stats: &SyncStats,
) {
    // Subscribe before reading the state so that no change falls between the two.
    let mut watch = node.watch(prefix);
    let give_up = Instant::now() + sync_wait;
    let mut confirmed = in_sync_with_a_peer(node);
    while !confirmed && !node.is_in_sync() && Instant::now() < give_up {
        tokio::time::sleep(SYNC_POLL.min(give_up - Instant::now())).await;
        confirmed = in_sync_with_a_peer(node);
    }
    if !confirmed {
        tracing::warn!(
            ?sync_wait,
            "sync-dir: not in sync with a peer yet; writing the local state, and removing the \
             files of keys it lacks only once in sync with one"
        );
    }
    let absent = |confirmed: bool| {
        if confirmed {
            Absent::Remove
        } else {
            Absent::Keep
        }
    };
    if tx
        .send(snapshot(node, prefix, absent(confirmed)))
        .await
        .is_err()
    {
        return;
    }
    // An interval, not a sleep in the loop: changes arriving faster than the period would
    // restart a sleep for ever.
    let mut poll = tokio::time::interval(SYNC_POLL);
    loop {
        tokio::select! {
            change = watch.next() => match change {
                Some(Ok(change)) => {
                    let input = SyncInput::Change {
                        key: change.key,
                        value: change.value,
                        revision: change.revision,
                    };
                    if tx.send(input).await.is_err() {
                        return;
                    }
                }
                // The node stopped.
                None => return,
                Some(Err(e)) => {
                    // The watch fell behind the change log; a new one and a fresh read carry
                    // on from now.
                    bump(&stats.resyncs);
                    tracing::warn!(error = %e, "sync-dir: the watch fell behind; re-reading the prefix");
                    watch = node.watch(prefix);
                    if tx.send(snapshot(node, prefix, absent(confirmed))).await.is_err() {
                        return;
                    }
                }
            },
            _ = poll.tick(), if !confirmed => {
                if in_sync_with_a_peer(node) {
                    confirmed = true;
                    tracing::info!("sync-dir: in sync with a peer; removing the files of absent keys");
                    if tx.send(snapshot(node, prefix, Absent::Remove)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::super::test_support::{figure, open, put, read, wait_for};
    use super::super::{Hook, SyncDir, mirror, run};
    use super::*;

    async fn node_on(hub: &chorus::transport::MemoryHub, id: u8) -> Node {
        let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).unwrap();
        Node::builder()
            .cluster("sync-dir")
            .node_id(chorus::NodeId(u64::from(id)))
            .start_with_transport(transport)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn at_start_files_of_absent_keys_stay_until_the_node_is_in_sync_with_a_peer() {
        let tmp = chorus_testkit::temp_dir("sync-test");
        {
            let mut dir = open(tmp.path());
            put(&mut dir, "app/stale.conf", "from the last run");
        }
        let hub = chorus::transport::MemoryHub::new(Default::default()).unwrap();
        let a = node_on(&hub, 1).await;
        a.put("app/new.conf", "new").await.unwrap();
        let stats = Arc::new(SyncStats::default());
        let hook = Hook {
            command: None,
            debounce: Duration::from_millis(10),
            timeout: Duration::from_secs(60),
        };
        let dir = SyncDir::open(tmp.path(), "app/", Arc::clone(&stats)).unwrap();
        // Alone, the node calls itself in sync after 3 s; the wait for a peer gives up first.
        let mirror = tokio::spawn(mirror(a.clone(), dir, hook, Duration::from_millis(300)));
        wait_for("the local state written", || {
            read(tmp.path(), "new.conf").is_some()
        })
        .await;
        assert_eq!(
            read(tmp.path(), "stale.conf").as_deref(),
            Some("from the last run")
        );
        assert_eq!(figure(&stats, "kept_unconfirmed"), 1);
        // Past the solo in-sync delay it is still kept: no peer has confirmed the state.
        a.wait_in_sync(Duration::from_secs(10)).await.unwrap();
        tokio::time::sleep(2 * SYNC_POLL).await;
        assert_eq!(
            read(tmp.path(), "stale.conf").as_deref(),
            Some("from the last run")
        );
        // A peer arrives; once in sync with it, the absent key's file goes.
        let b = node_on(&hub, 2).await;
        wait_for("the stale file removed", || {
            read(tmp.path(), "stale.conf").is_none()
        })
        .await;
        assert_eq!(read(tmp.path(), "new.conf").as_deref(), Some("new"));
        assert_eq!(figure(&stats, "kept_unconfirmed"), 0);
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), mirror)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_that_fell_behind_the_change_log_resumes_from_a_fresh_read() {
        let tmp = chorus_testkit::temp_dir("sync-test");
        let mirror = tmp.path().join("mirror");
        let started = tmp.path().join("hook-started");
        let flag = tmp.path().join("hold");
        std::fs::write(&flag, "").unwrap();
        let hub = chorus::transport::MemoryHub::new(Default::default()).unwrap();
        let node = node_on(&hub, 1).await;
        node.put("app/first", "1").await.unwrap();
        let stats = Arc::new(SyncStats::default());
        let dir = SyncDir::open(&mirror, "app/", Arc::clone(&stats)).unwrap();
        // A hook that holds the mirror until the test lets it go.
        let hook = Hook {
            command: Some(format!(
                "touch '{}'; while [ -e '{}' ]; do sleep 0.02; done",
                started.display(),
                flag.display()
            )),
            debounce: Duration::from_millis(10),
            timeout: Duration::from_secs(120),
        };
        let (tx, rx) = mpsc::channel(4);
        let applying = tokio::spawn(run(dir, rx, hook));
        let feeding = {
            let (node, stats) = (node.clone(), Arc::clone(&stats));
            tokio::spawn(async move { feed(&node, "app/", Duration::ZERO, &tx, &stats).await })
        };
        wait_for("the hook holds the mirror", || started.exists()).await;
        // Enough changes under the prefix to fill the mirror's queue, so the watch is not
        // read; then more changes than the node's change log keeps (100 000).
        let ops = |prefix: &str, n: usize| -> Vec<chorus::Op> {
            (0..n)
                .map(|i| chorus::Op::put(format!("{prefix}{i:04}"), Bytes::from_static(b"x")))
                .collect()
        };
        node.batch(ops("app/queued-", 16)).await.unwrap();
        for _ in 0..101 {
            node.batch(ops("other/", 1000)).await.unwrap();
        }
        node.put("app/last", "after the burst").await.unwrap();
        std::fs::remove_file(&flag).unwrap();
        // Without the fresh read the watch's end would stop the mirror here.
        wait_for("the state after the burst mirrored", || {
            read(&mirror, "last").as_deref() == Some("after the burst")
                && read(&mirror, "queued-0015").as_deref() == Some("x")
        })
        .await;
        assert_eq!(figure(&stats, "resyncs"), 1);
        node.put("app/later", "still mirrored").await.unwrap();
        wait_for("a later change mirrored", || {
            read(&mirror, "later").is_some()
        })
        .await;
        node.shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), feeding)
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(20), applying)
            .await
            .unwrap()
            .unwrap();
    }
}
