//! [`Watch`]: a resumable stream of the changes under a key prefix.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::driver::Shared;
use crate::{Change, Error};

/// The changes under one key prefix, in the order this node applied them (local revision
/// order; per key that is version order). Made by [`Node::watch`](crate::Node::watch) or
/// [`Node::watch_from`](crate::Node::watch_from).
///
/// A watch that falls behind the live feed catches up from the node's change log; if the log
/// no longer reaches back far enough the stream ends and [`Watch::error`] says so.
#[derive(Debug)]
pub struct Watch {
    shared: Arc<Shared>,
    prefix: String,
    last: u64,
    live: broadcast::Receiver<Change>,
    backlog: VecDeque<Change>,
    needs_backfill: bool,
    error: Option<Error>,
}

impl Watch {
    pub(crate) fn new(shared: Arc<Shared>, prefix: &str, after: u64) -> Watch {
        // Subscribe before reading the log, so nothing falls between the two. A watch from
        // "now" needs no backfill: the subscription starts after `after` was read.
        let live = shared.changes.subscribe();
        let needs_backfill = after < shared.revision();
        Watch {
            shared,
            prefix: prefix.to_owned(),
            last: after,
            live,
            backlog: VecDeque::new(),
            needs_backfill,
            error: None,
        }
    }

    /// The prefix this watch follows.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The revision of the last change returned (or the starting revision).
    pub fn revision(&self) -> u64 {
        self.last
    }

    /// Why the stream ended, if it ended for a reason other than the node stopping.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// Reads what the change log holds after the last revision returned.
    pub(crate) async fn backfill(&mut self) -> Result<(), Error> {
        let changes = self.shared.changes_since(self.last, &self.prefix).await?;
        self.backlog.clear();
        self.backlog.extend(changes);
        self.needs_backfill = false;
        Ok(())
    }

    /// The next change, or `None` when the node has stopped or the watch could not catch up.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a change is only consumed when it is returned.
    pub async fn next(&mut self) -> Option<Change> {
        loop {
            if self.error.is_some() {
                return None;
            }
            if self.needs_backfill
                && let Err(e) = self.backfill().await
            {
                // Closed means the node stopped: a plain end of stream, not an error.
                if !matches!(e, Error::Closed) {
                    self.error = Some(e);
                }
                return None;
            }
            if let Some(change) = self.backlog.pop_front() {
                if change.revision > self.last {
                    self.last = change.revision;
                    return Some(change);
                }
                continue;
            }
            match self.live.recv().await {
                Ok(change) => {
                    if change.revision <= self.last || !change.key.starts_with(&self.prefix) {
                        continue;
                    }
                    self.last = change.revision;
                    return Some(change);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.needs_backfill = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// This watch as a [`futures_util::Stream`].
    pub fn into_stream(self) -> impl futures_util::Stream<Item = Change> + Send + Unpin {
        Box::pin(futures_util::stream::unfold(self, |mut w| async move {
            let change = w.next().await?;
            Some((change, w))
        }))
    }
}
