//! Config-file sync: mirrors the keys under a prefix as files in a directory.
//!
//! A key `P + "a/b.conf"` becomes the file `DIR/a/b.conf`. Files are replaced atomically (see
//! [`rootdir`]), deleted keys remove their file, and a manifest (`DIR/.chorus-sync-manifest`)
//! lists the files this mirror owns, so that it only ever removes files it wrote. A command can
//! run (`sh -c CMD`) once changes have been quiet for a debounce delay.
//!
//! Rules (docs/cli.md says the same to users):
//! - **Files and directories.** When one key is a path prefix of another (`a` and `a/b`), the
//!   deeper key wins: `a/b` is the file `DIR/a/b`, and `a` is not mirrored while any key under
//!   `a/` exists (counted in `sync_dir_shadowed_keys`). When the last key under `a/` goes,
//!   `DIR/a` becomes the file of key `a`. The files on disk depend only on which keys exist,
//!   never on the order in which they arrived.
//! - **Start.** The mirror writes what the node holds at once, but removes an owned file whose
//!   key is absent only once the node is in sync with a live peer: a node that heard no peer,
//!   or whose wait for sync timed out, may simply not have received the key yet. Files kept for
//!   that reason are removed (if still absent) as soon as it is in sync with a peer.
//! - **Never silently stopped.** A watch that falls behind the node's change log resumes from a
//!   fresh read of the prefix; the hook has a timeout after which its process group is killed;
//!   every failure is logged and counted ([`SyncStats`], in `/v1/stats` and `/metrics`).
//!
//! It does not watch the directory: edits made to the files by hand are overwritten by the
//! next change of their key and are not sent to the cluster.
//!
//! Rooms: [`paths`] (which keys can be files, and where), [`dir`] (the files and the manifest of
//! one directory: [`SyncDir`]), [`rootdir`] (file operations confined to it), [`hook`] (the
//! on-change command), [`feed`] (the inputs, from the node's watch), [`stats`]; this module
//! holds the inputs ([`SyncInput`]) and runs the pieces together ([`run`], [`mirror`]).

mod dir;
mod feed;
mod hook;
mod paths;
mod rootdir;
mod stats;
#[cfg(test)]
mod test_support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chorus::Node;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub use self::dir::{Absent, SyncDir};
pub use self::hook::{CommandEnd, Hook, run_command};
pub use self::stats::{Kind, Labelled, SyncSet, SyncStats};

use self::feed::feed;
use self::hook::run_hook;

/// Why a key could not be mirrored.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The key does not map to a safe relative path; nothing was written.
    #[error("key {key:?} cannot be a file name: {reason}")]
    BadPath {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file operation failed; the file is left as it was before.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// One input of the mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncInput {
    /// A key changed: a value, or `None` for a deletion, at a local revision of the node.
    Change {
        /// The full key (with the prefix).
        key: String,
        /// The new value, `None` when deleted.
        value: Option<Bytes>,
        /// The node's local revision of the change.
        revision: u64,
    },
    /// Every live key under the prefix, read when the node's revision was at least
    /// `revision`: changes at or below it are already in it and are skipped.
    Snapshot {
        /// `(full key, value)` pairs.
        entries: Vec<(String, Bytes)>,
        /// The node's revision read just before the entries.
        revision: u64,
        /// What to do with owned files absent from `entries`.
        absent: Absent,
    },
}

/// Applies inputs as they come and runs the hook once they have been quiet for its debounce.
/// Returns when the channel closes (after a last pending hook run).
pub async fn run(mut dir: SyncDir, mut inputs: mpsc::Receiver<SyncInput>, hook: Hook) {
    let mut pending = false;
    let mut deadline = Instant::now() + hook.debounce;
    let mut floor = 0;
    loop {
        tokio::select! {
            input = inputs.recv() => {
                let changed = match input {
                    None => break,
                    Some(SyncInput::Change { revision, .. }) if revision <= floor => continue,
                    Some(SyncInput::Change { key, value, .. }) => {
                        match dir.apply(&key, value.as_ref()) {
                            Ok(changed) => changed,
                            Err(e) => {
                                tracing::warn!(error = %e, "sync-dir: change not mirrored");
                                false
                            }
                        }
                    }
                    Some(SyncInput::Snapshot { entries, revision, absent }) => {
                        floor = revision;
                        match dir.reconcile(entries, absent) {
                            Ok(changed) => {
                                tracing::info!(dir = %dir.root.path().display(), changed, ?absent, "sync-dir: state written");
                                changed > 0
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "sync-dir: state not fully written");
                                true
                            }
                        }
                    }
                };
                if changed {
                    pending = true;
                    deadline = Instant::now() + hook.debounce;
                }
            }
            () = tokio::time::sleep_until(deadline), if pending => {
                pending = false;
                if let Some(cmd) = &hook.command {
                    run_hook(cmd, hook.timeout, dir.root.path(), &dir.prefix, &dir.stats).await;
                }
            }
        }
    }
    if pending && let Some(cmd) = &hook.command {
        run_hook(cmd, hook.timeout, dir.root.path(), &dir.prefix, &dir.stats).await;
    }
}

/// Mirrors the prefix of `dir` from `node` until the node stops (then runs a pending hook).
/// Failures are logged and counted in the directory's [`SyncStats`]; the mirror goes on.
pub async fn mirror(node: Node, dir: SyncDir, hook: Hook, sync_wait: Duration) {
    let prefix = dir.prefix.clone();
    let stats = Arc::clone(&dir.stats);
    let (tx, rx) = mpsc::channel(1024);
    let applying = tokio::spawn(run(dir, rx, hook));
    feed(&node, &prefix, sync_wait, &tx, &stats).await;
    drop(tx);
    if let Err(e) = applying.await {
        tracing::error!(error = %e, "sync-dir: mirror task failed");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::test_support::{event, figure, read, spawn_run, wait_for};
    use super::*;

    #[tokio::test]
    async fn hook_runs_once_after_changes_settle() {
        let tmp = chorus_testkit::temp_dir("sync-test");
        let marker = tmp.path().join("hook-count");
        let mirror = tmp.path().join("mirror");
        let hook = Hook {
            command: Some(format!("echo \"$CHORUS_PREFIX\" >> '{}'", marker.display())),
            debounce: Duration::from_millis(300),
            timeout: Duration::from_secs(60),
        };
        let (stats, tx, task) = spawn_run(&mirror, hook);
        // A burst of changes closer together than the debounce delay.
        for i in 0..5 {
            tx.send(event(&format!("app/k{i}"), Some(&format!("v{i}")), i + 1))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(!marker.exists(), "hook ran before the changes settled");
        assert_eq!(
            read(&mirror, "k4").as_deref(),
            Some("v4"),
            "files are written at once"
        );
        wait_for("the hook ran", || marker.exists()).await;
        // An event that changes nothing does not run the hook again.
        tx.send(event("app/k0", Some("v0"), 6)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(std::fs::read_to_string(&marker).unwrap().lines().count(), 1);
        // A change at or below the revision of the last snapshot is already in it.
        tx.send(SyncInput::Snapshot {
            entries: vec![("app/k1".into(), Bytes::from("v1"))],
            revision: 10,
            absent: Absent::Keep,
        })
        .await
        .unwrap();
        tx.send(event("app/k1", Some("stale"), 9)).await.unwrap();
        // A deletion, then the stream ends: the pending hook still runs.
        tx.send(event("app/k2", None, 11)).await.unwrap();
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        let runs = std::fs::read_to_string(&marker).unwrap();
        assert_eq!(
            runs, "app/\napp/\n",
            "one run per settled burst, with the prefix in env"
        );
        assert!(read(&mirror, "k2").is_none());
        assert_eq!(read(&mirror, "k1").as_deref(), Some("v1"));
        assert_eq!(figure(&stats, "hook_runs"), 2);
    }
}
