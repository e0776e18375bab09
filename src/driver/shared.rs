//! What the driver shares with the [`Node`](crate::Node) handles: the command channel and
//! the published state (the store itself, read directly, and snapshots of members, counters
//! and sync state).

use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use chorus_replication::{Change, Check, RestoreMode, RestoreReport, Store, Version};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::pubsub::Subscriptions;
use crate::{Counters, Entry, Error, MemberEvent, MemberInfo, Op};

/// A request from a [`Node`](crate::Node) handle to its driver.
#[derive(Debug)]
pub(crate) enum Command {
    /// A put, a delete or a batch: applied atomically under one version, only if every
    /// check holds (none for an unconditional write).
    Write {
        checks: Vec<Check>,
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<Version, Error>>,
    },
    /// Entries from a backup (at most the batch limit), merged by version or re-stamped.
    Restore {
        entries: Vec<(String, chorus_replication::Entry)>,
        mode: RestoreMode,
        reply: oneshot::Sender<Result<RestoreReport, Error>>,
    },
    ChangesSince {
        revision: u64,
        prefix: String,
        reply: oneshot::Sender<Result<Vec<Change>, Error>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    /// A message for the subscribers of `topic` (never stored).
    Publish {
        topic: String,
        payload: Bytes,
        reply: oneshot::Sender<Result<(), Error>>,
    },
}

/// What the driver publishes for the handles: the store itself (read directly), and
/// snapshots of members, counters and sync state.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) node_id: u64,
    pub(crate) incarnation: u64,
    /// This node's name, if it has one.
    pub(crate) name: Option<String>,
    pub(super) store: Store,
    /// Writes: not read while the write backlog is full (back-pressure).
    pub(super) write_tx: mpsc::Sender<Command>,
    /// Everything else (watch backfill, shutdown): always read.
    pub(super) control_tx: mpsc::Sender<Command>,
    pub(crate) in_sync: watch::Sender<bool>,
    pub(crate) changes: broadcast::Sender<Change>,
    /// Membership changes for `Node::member_events`.
    pub(crate) member_events: broadcast::Sender<MemberEvent>,
    pub(super) members: Mutex<Vec<MemberInfo>>,
    pub(super) counters: Mutex<Counters>,
    pub(super) stopped: watch::Sender<bool>,
    /// The subscriptions published messages are fanned out to.
    pub(crate) subscriptions: Mutex<Subscriptions>,
    pub(super) task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Shared {
    pub(crate) fn get(&self, key: &str) -> Option<Entry> {
        Entry::live(self.store.get_entry(key)?)
    }

    pub(crate) fn scan(&self, prefix: &str) -> Vec<(String, Entry)> {
        self.store
            .scan_entries(prefix)
            .into_iter()
            .filter_map(|(k, e)| Some((k, Entry::live(e)?)))
            .collect()
    }

    /// The store itself (read directly, e.g. walked by a snapshot).
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub(crate) fn revision(&self) -> u64 {
        self.store.revision()
    }

    pub(crate) fn members(&self) -> Vec<MemberInfo> {
        self.members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn subscriptions(&self) -> std::sync::MutexGuard<'_, Subscriptions> {
        self.subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn counters(&self) -> Counters {
        self.counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) async fn changes_since(
        &self,
        revision: u64,
        prefix: &str,
    ) -> Result<Vec<Change>, Error> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::ChangesSince {
            revision,
            prefix: prefix.to_owned(),
            reply,
        };
        self.send(cmd).await?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// A receiver that turns true once the driver has stopped.
    pub(crate) fn stopped_signal(&self) -> watch::Receiver<bool> {
        self.stopped.subscribe()
    }

    /// Hands `cmd` to the driver: writes on the write channel, the rest on the control one.
    pub(crate) async fn send(&self, cmd: Command) -> Result<(), Error> {
        let channel = match cmd {
            // A publication takes the writes' channel: their back-pressure.
            Command::Write { .. } | Command::Restore { .. } | Command::Publish { .. } => {
                &self.write_tx
            }
            Command::ChangesSince { .. } | Command::Shutdown { .. } => &self.control_tx,
        };
        channel.send(cmd).await.map_err(|_| Error::Closed)
    }

    pub(crate) async fn wait_stopped(&self) {
        let mut rx = self.stopped.subscribe();
        // An error means the sender is gone, which only happens once the driver is done.
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Stops the driver task at once (the `testing` feature's `Node::abort`).
    #[cfg(feature = "testing")]
    pub(crate) fn abort(&self) {
        if let Some(handle) = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            handle.abort();
        }
        self.in_sync.send_replace(false);
        self.subscriptions().close();
        self.stopped.send_replace(true);
    }
}
