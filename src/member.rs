//! [`MemberInfo`] and [`MemberState`]: the cluster's members as one node sees them.

use std::fmt;
use std::net::SocketAddr;

use chorus_protocol::NodeId;

/// One member of the cluster as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// The member's node id.
    pub node_id: NodeId,
    /// Its current incarnation (changes on every restart).
    pub incarnation: u64,
    /// The address its datagrams come from (for this node itself: the address it sends
    /// from, not the wildcard it may be bound to).
    pub addr: SocketAddr,
    /// Its node name ([`NodeBuilder::node_name`](crate::NodeBuilder::node_name); by default
    /// its host name), as its latest heartbeat gave it; `None` until a heartbeat with a valid
    /// name arrived (or for a peer that sends none).
    pub name: Option<String>,
    /// This node itself, or a peer's liveness.
    pub state: MemberState,
    /// Its wall clock minus this node's, in milliseconds, measured from its heartbeats
    /// (`Some(0)` for this node itself; `None` until a heartbeat with wall time arrived, e.g.
    /// from an older version). Writes are refused while this node is further ahead of every
    /// peer than the drift bound allows ([`Error::ClockAhead`](crate::Error::ClockAhead)).
    pub clock_offset_ms: Option<i64>,
}

/// What a member is to the node that lists it.
///
/// [`as_str`](MemberState::as_str) and `Display` give the names the agent's HTTP API and the
/// CLI print: `"self"`, `"alive"`, `"suspected"`.
///
/// # Examples
///
/// ```
/// use chorus::MemberState;
/// assert_eq!(MemberState::Local.to_string(), "self");
/// assert_eq!(MemberState::Suspected.as_str(), "suspected");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// The node that was asked: every node lists itself.
    Local,
    /// A peer heard from recently (within the preset's `suspect_after`).
    Alive,
    /// A peer silent for longer than `suspect_after` but not yet declared gone
    /// (`leave_after`); its entry disappears when it is.
    Suspected,
}

impl MemberState {
    /// `"self"`, `"alive"` or `"suspected"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Local => "self",
            MemberState::Alive => "alive",
            MemberState::Suspected => "suspected",
        }
    }
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<chorus_protocol::MemberState> for MemberState {
    fn from(state: chorus_protocol::MemberState) -> MemberState {
        match state {
            chorus_protocol::MemberState::Alive => MemberState::Alive,
            chorus_protocol::MemberState::Suspected => MemberState::Suspected,
        }
    }
}
