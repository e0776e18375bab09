//! [`Watch`]: a resumable stream of the changes under a key prefix.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, WatchStream};

use crate::driver::Shared;
use crate::{Change, Error};

/// The changes under one key prefix, in the order this node applied them (local revision
/// order; per key that is version order). Made by [`Node::watch`](crate::Node::watch) or
/// [`Node::watch_from`](crate::Node::watch_from).
///
/// A [`Stream`] of `Result<Change, Error>`: read it with
/// [`StreamExt::next`](futures_util::StreamExt::next) (cancel safe: a change is consumed only
/// when it is returned) or any other stream combinator. A watch that falls behind the live
/// feed catches up from the node's change log by itself. The stream ends (`None`) when the
/// node stops, after the changes it applied before stopping; it ends with one `Err` when it
/// cannot go on, [`Error::Compacted`] when the change log no longer reaches back to the last
/// change it returned (re-read with [`Node::scan`](crate::Node::scan) and watch again from
/// [`Node::revision`](crate::Node::revision)).
///
/// # Examples
///
/// ```
/// use futures_util::{StreamExt, TryStreamExt};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
/// # let transport = hub.endpoint("10.0.0.1:7400".parse()?)?;
/// let node = chorus::Node::builder().start_with_transport(transport).await?;
/// let mut watch = node.watch("cfg/");
/// node.put("cfg/a", "1").await?;
/// node.put("other", "x").await?;
/// node.put("cfg/b", "2").await?;
/// let a = watch.next().await.expect("running")?;
/// let b = watch.next().await.expect("running")?;
/// assert_eq!((a.key.as_str(), b.key.as_str()), ("cfg/a", "cfg/b"));
/// assert!(b.revision > a.revision);
/// assert_eq!(watch.revision(), b.revision);
///
/// // Any stream combinator works.
/// for i in 0..3 {
///     node.put(format!("cfg/{i}"), "v").await?;
/// }
/// let keys: Vec<String> = (&mut watch).take(3).map_ok(|c| c.key).try_collect().await?;
/// assert_eq!(keys, ["cfg/0", "cfg/1", "cfg/2"]);
///
/// node.shutdown().await?;
/// // The stream ends when the node stops.
/// assert!(watch.next().await.is_none());
/// # Ok(())
/// # }
/// ```
pub struct Watch {
    shared: Arc<Shared>,
    prefix: String,
    /// The revision of the last change returned (or the starting revision).
    last: u64,
    live: BroadcastStream<Change>,
    /// Turns true when the node stops: the stream then ends after what is already buffered
    /// (the broadcast channel itself never closes while a watch holds the node's state).
    stop_signal: WatchStream<bool>,
    stopped: bool,
    /// Changes read from the change log, handed out before the live feed.
    backlog: VecDeque<Change>,
    phase: Phase,
}

/// Where a watch is in its life.
enum Phase {
    /// Following the live feed (after the backlog).
    Live,
    /// Fell behind the live feed: must read the change log from the last revision returned.
    Behind,
    /// Reading the change log.
    CatchingUp(Pin<Box<dyn Future<Output = Result<Vec<Change>, Error>> + Send + Sync>>),
    /// Ended: nothing more comes.
    Ended,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phase = match self.phase {
            Phase::Live => "live",
            Phase::Behind => "behind",
            Phase::CatchingUp(_) => "catching up",
            Phase::Ended => "ended",
        };
        f.debug_struct("Watch")
            .field("prefix", &self.prefix)
            .field("revision", &self.last)
            .field("backlog", &self.backlog.len())
            .field("stopped", &self.stopped)
            .field("phase", &phase)
            .finish_non_exhaustive()
    }
}

impl Watch {
    pub(crate) fn new(shared: Arc<Shared>, prefix: &str, after: u64) -> Watch {
        // Subscribe before reading the log, so nothing falls between the two. A watch from
        // "now" needs no catching up: the subscription starts after `after` was read.
        let live = BroadcastStream::new(shared.changes.subscribe());
        let phase = if after < shared.revision() {
            Phase::Behind
        } else {
            Phase::Live
        };
        Watch {
            stop_signal: WatchStream::new(shared.stopped_signal()),
            stopped: false,
            shared,
            prefix: prefix.to_owned(),
            last: after,
            live,
            backlog: VecDeque::new(),
            phase,
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

    /// Reads what the change log holds after the last revision returned, now.
    pub(crate) async fn catch_up(&mut self) -> Result<(), Error> {
        let changes = self.shared.changes_since(self.last, &self.prefix).await?;
        self.backlog = changes.into();
        self.phase = Phase::Live;
        Ok(())
    }

    /// Hands out `change` if it is new and under the prefix.
    fn accept(&mut self, change: Change) -> Option<Change> {
        if change.revision <= self.last || !change.key.starts_with(&self.prefix) {
            return None;
        }
        self.last = change.revision;
        Some(change)
    }

    /// Whether the node has stopped (registers for the wake-up when it has not).
    fn poll_stopped(&mut self, cx: &mut Context<'_>) -> bool {
        while !self.stopped {
            match Pin::new(&mut self.stop_signal).poll_next(cx) {
                Poll::Ready(Some(stopped)) => self.stopped = stopped,
                // The sender lives in the node's shared state, which this watch holds; gone
                // means stopped all the same.
                Poll::Ready(None) => self.stopped = true,
                Poll::Pending => break,
            }
        }
        self.stopped
    }
}

impl Stream for Watch {
    type Item = Result<Change, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match &mut this.phase {
                Phase::Ended => return Poll::Ready(None),
                Phase::Behind => {
                    let shared = this.shared.clone();
                    let (after, prefix) = (this.last, this.prefix.clone());
                    this.phase = Phase::CatchingUp(Box::pin(async move {
                        shared.changes_since(after, &prefix).await
                    }));
                }
                Phase::CatchingUp(reading) => match reading.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(changes)) => {
                        this.backlog = changes.into();
                        this.phase = Phase::Live;
                    }
                    // Closed means the node stopped: a plain end of stream, not an error.
                    Poll::Ready(Err(Error::Closed)) => this.phase = Phase::Ended,
                    Poll::Ready(Err(e)) => {
                        this.phase = Phase::Ended;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                Phase::Live => {
                    if let Some(change) = this.backlog.pop_front() {
                        if let Some(change) = this.accept(change) {
                            return Poll::Ready(Some(Ok(change)));
                        }
                        continue;
                    }
                    let received = match Pin::new(&mut this.live).poll_next(cx) {
                        Poll::Ready(received) => received,
                        Poll::Pending if this.poll_stopped(cx) => {
                            // The node stopped: hand out what it published before it did (a
                            // change may have come in since the poll above), then end.
                            match Pin::new(&mut this.live).poll_next(cx) {
                                Poll::Ready(received) => received,
                                Poll::Pending => None,
                            }
                        }
                        Poll::Pending => return Poll::Pending,
                    };
                    match received {
                        Some(Ok(change)) => {
                            if let Some(change) = this.accept(change) {
                                return Poll::Ready(Some(Ok(change)));
                            }
                        }
                        Some(Err(BroadcastStreamRecvError::Lagged(_))) => {
                            this.phase = Phase::Behind;
                        }
                        None => this.phase = Phase::Ended,
                    }
                }
            }
        }
    }
}
