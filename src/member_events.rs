//! [`MemberEvents`]: the membership changes one node sees, as a stream.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use chorus_protocol::{LeaveReason, NodeId};
use futures_util::Stream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, WatchStream};

use crate::Error;
use crate::driver::Shared;

/// One change of the membership as this node saw it ([`Node::member_events`](crate::Node::member_events)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberEvent {
    /// What happened.
    pub kind: MemberEventKind,
    /// The member.
    pub node_id: NodeId,
    /// Its incarnation: the new one for [`MemberEventKind::Restarted`], the one that left for
    /// [`MemberEventKind::Left`].
    pub incarnation: u64,
    /// Its node name as last heard (`None` when no heartbeat with a name arrived yet).
    pub name: Option<String>,
    /// The address its datagrams came from, as last heard.
    pub addr: SocketAddr,
}

/// What happened to a member.
///
/// [`as_str`](MemberEventKind::as_str) gives the names the agent's `/v1/members/watch`
/// uses as server-sent event types: `joined`, `suspected`, `alive`, `left`, `restarted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MemberEventKind {
    /// A new member passed probation, or one that had timed out is heard again with the same
    /// incarnation (a healed partition).
    Joined,
    /// A member has been silent for the preset's `suspect_after`.
    Suspected,
    /// A suspected member was heard from again.
    Alive,
    /// A member left: it said goodbye, or was silent for `leave_after`.
    Left(LeaveReason),
    /// A member came back with a new incarnation (it restarted): its earlier life is over.
    Restarted {
        /// The incarnation that ended.
        previous: u64,
    },
}

impl MemberEventKind {
    /// `"joined"`, `"suspected"`, `"alive"`, `"left"` or `"restarted"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberEventKind::Joined => "joined",
            MemberEventKind::Suspected => "suspected",
            MemberEventKind::Alive => "alive",
            MemberEventKind::Left(_) => "left",
            MemberEventKind::Restarted { .. } => "restarted",
        }
    }
}

/// The membership changes this node sees from the moment it was made, in the order it saw
/// them. Made by [`Node::member_events`](crate::Node::member_events).
///
/// A [`Stream`] of `Result<MemberEvent, Error>`, read with
/// [`StreamExt::next`](futures_util::StreamExt::next) (cancel safe). It ends (`None`) when
/// the node stops. A subscriber that falls more than 1024 events behind gets one
/// `Err(`[`Error::Lagged`]`)` saying how many it missed, then the stream goes on with the
/// next event: nothing is lost silently, and [`Node::members`](crate::Node::members) gives
/// the current state to start again from.
///
/// # Examples
///
/// ```
/// use futures_util::StreamExt;
/// use chorus::{MemberEventKind, Node, NodeId};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
/// let a = Node::builder()
///     .node_id(NodeId(1))
///     .node_name("a")
///     .start_with_transport(hub.endpoint("10.0.0.1:7400".parse()?)?)
///     .await?;
/// let mut events = a.member_events();
/// let b = Node::builder()
///     .node_id(NodeId(2))
///     .node_name("b")
///     .start_with_transport(hub.endpoint("10.0.0.2:7400".parse()?)?)
///     .await?;
/// let joined = events.next().await.expect("running")?;
/// assert_eq!((joined.kind, joined.node_id), (MemberEventKind::Joined, NodeId(2)));
/// assert_eq!(joined.name.as_deref(), Some("b"));
/// b.shutdown().await?;
/// let left = events.next().await.expect("running")?;
/// assert_eq!(left.kind.as_str(), "left");
/// a.shutdown().await?;
/// assert!(events.next().await.is_none());
/// # Ok(())
/// # }
/// ```
pub struct MemberEvents {
    live: BroadcastStream<MemberEvent>,
    stop_signal: WatchStream<bool>,
    stopped: bool,
    /// Holds the node's shared state, so that the channel outlives the driver.
    _shared: Arc<Shared>,
}

impl std::fmt::Debug for MemberEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberEvents")
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl MemberEvents {
    pub(crate) fn new(shared: Arc<Shared>) -> MemberEvents {
        MemberEvents {
            live: BroadcastStream::new(shared.member_events.subscribe()),
            stop_signal: WatchStream::new(shared.stopped_signal()),
            stopped: false,
            _shared: shared,
        }
    }

    /// Whether the node has stopped (registers for the wake-up when it has not).
    fn poll_stopped(&mut self, cx: &mut Context<'_>) -> bool {
        while !self.stopped {
            match Pin::new(&mut self.stop_signal).poll_next(cx) {
                Poll::Ready(Some(stopped)) => self.stopped = stopped,
                Poll::Ready(None) => self.stopped = true,
                Poll::Pending => break,
            }
        }
        self.stopped
    }
}

impl Stream for MemberEvents {
    type Item = Result<MemberEvent, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let received = match Pin::new(&mut this.live).poll_next(cx) {
            Poll::Ready(received) => received,
            Poll::Pending if this.poll_stopped(cx) => {
                // Stopped: hand out what was published before (it may have come in since the
                // poll above), then end.
                match Pin::new(&mut this.live).poll_next(cx) {
                    Poll::Ready(received) => received,
                    Poll::Pending => None,
                }
            }
            Poll::Pending => return Poll::Pending,
        };
        Poll::Ready(received.map(|r| {
            r.map_err(|BroadcastStreamRecvError::Lagged(missed)| Error::Lagged { skipped: missed })
        }))
    }
}
