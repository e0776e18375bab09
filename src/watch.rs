//! [`Watch`]: a resumable stream of the changes under a key prefix.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{broadcast, watch};

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
    /// Turns true when the node stops: the stream then ends after what is already buffered
    /// (the broadcast channel itself never closes while a watch holds the node's state).
    stopped: watch::Receiver<bool>,
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
        let stopped = shared.stopped_signal();
        Watch {
            stopped,
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
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let transport = hub.endpoint("10.0.0.1:7400".parse()?)?;
    /// let node = chorus::Node::builder().start_with_transport(transport).await?;
    /// let mut watch = node.watch("cfg/");
    /// node.put("cfg/a", "1").await?;
    /// node.put("cfg/b", "2").await?;
    /// let a = watch.next().await.expect("running");
    /// let b = watch.next().await.expect("running");
    /// assert_eq!((a.key.as_str(), b.key.as_str()), ("cfg/a", "cfg/b"));
    /// assert!(b.revision > a.revision);
    /// node.shutdown().await?;
    /// // The stream ends when the node stops.
    /// assert!(watch.next().await.is_none());
    /// # Ok(())
    /// # }
    /// ```
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
            let received = tokio::select! {
                biased;
                received = self.live.recv() => received,
                _ = self.stopped.wait_for(|stopped| *stopped) => match self.live.try_recv() {
                    // The node stopped: hand out what was published before it did, then end.
                    Ok(change) => Ok(change),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        Err(broadcast::error::RecvError::Lagged(n))
                    }
                    Err(_) => return None,
                },
            };
            match received {
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
    ///
    /// # Examples
    ///
    /// ```
    /// use futures_util::StreamExt;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let transport = hub.endpoint("10.0.0.1:7400".parse()?)?;
    /// let node = chorus::Node::builder().start_with_transport(transport).await?;
    /// let stream = node.watch("").into_stream();
    /// for i in 0..3 {
    ///     node.put(format!("k{i}"), "v").await?;
    /// }
    /// let keys: Vec<String> = stream.take(3).map(|c| c.key).collect().await;
    /// assert_eq!(keys, ["k0", "k1", "k2"]);
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn into_stream(self) -> impl futures_util::Stream<Item = Change> + Send + Unpin {
        Box::pin(futures_util::stream::unfold(self, |mut w| async move {
            let change = w.next().await?;
            Some((change, w))
        }))
    }
}
