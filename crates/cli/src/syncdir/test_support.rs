//! What the tests of the mirror share: reading its files, a mirror of `app/`, its figures,
//! a mirror run on a task, a change, and an async bounded wait.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Hook, SyncDir, SyncInput, SyncStats, run};

pub(super) fn read(root: &Path, rel: &str) -> Option<String> {
    std::fs::read_to_string(root.join(rel)).ok()
}

pub(super) fn open(root: &Path) -> SyncDir {
    SyncDir::open(root, "app/", Arc::default()).unwrap()
}

pub(super) fn put(dir: &mut SyncDir, key: &str, value: &str) -> bool {
    dir.apply(key, Some(&Bytes::from(value.to_owned())))
        .unwrap()
}

pub(super) fn figure(stats: &SyncStats, name: &str) -> u64 {
    stats
        .figures()
        .into_iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, v)| v)
        .unwrap()
}

/// A mirror of `app/` into `root`, run by [`run`] with `hook` on a task of its own: its
/// figures, its input (room for 16) and the task.
pub(super) fn spawn_run(
    root: &Path,
    hook: Hook,
) -> (Arc<SyncStats>, mpsc::Sender<SyncInput>, JoinHandle<()>) {
    let stats = Arc::new(SyncStats::default());
    let dir = SyncDir::open(root, "app/", Arc::clone(&stats)).unwrap();
    let (tx, rx) = mpsc::channel(16);
    (stats, tx, tokio::spawn(run(dir, rx, hook)))
}

pub(super) fn event(key: &str, value: Option<&str>, revision: u64) -> SyncInput {
    SyncInput::Change {
        key: key.to_owned(),
        value: value.map(|v| Bytes::from(v.to_owned())),
        revision,
    }
}

pub(super) async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
