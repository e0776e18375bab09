//! chorus-protocol: sans-IO reliable multicast.
//!
//! # What it does
//!
//! [`Endpoint`] is the whole protocol state machine of one node: it assigns per-(sender,
//! incarnation) sequence numbers to application messages, batches small ones and fragments
//! large ones (up to [`Config::max_message_size`]) against the MTU, delivers every sender's
//! stream in order and exactly once, detects gaps from data and heartbeats, repairs them with
//! multicast NAKs (random delay, suppression, backoff, sender-side hold-off), reports
//! unrecoverable loss explicitly ([`Event::Lost`]), tracks membership (join after probation,
//! suspect, alive, leave, restart) with heartbeats, trims its retransmission window by
//! stability, and applies flow control (a bounded send window with backpressure and a
//! token-bucket rate shared by data and repairs).
//!
//! Nothing a peer sends can make it grow without bound: everything held for other senders is
//! charged to one receive budget ([`Config::receive_budget_bytes`]) in which less established
//! senders give way first; new senders are on probation (not members, no events) until two of
//! their heartbeats half an interval apart, in a bounded table ([`Config::max_candidates`]);
//! members are capped ([`Config::max_members`]); departed members and replay windows are
//! forgotten ([`Config::forget_after`]); and the repairs a NAK can obtain are bounded per NAK,
//! per message and per requester (three times its bytes for a non-member,
//! [`Config::repair_bytes_per_member`] per heartbeat interval for a member). See
//! `docs/protocol.md` §3.2.1, §3.3.1 and §3.4. Every datagram is framed by [`wire`]: a fixed header, a protobuf body
//! (`proto/chorus.proto`) and a CRC32; anything malformed is dropped and counted in [`Stats`].
//! With a [`Keyring`] in [`Config::keyring`], every datagram is sealed with
//! XChaCha20-Poly1305 ([`auth`]): the header is authenticated, the body encrypted, and each
//! sender's datagram counter is checked against a replay window, all before any state changes;
//! datagrams without a valid tag are dropped and counted.
//!
//! # What it does not do
//!
//! No sockets, no tokio, no clock reads, no unseeded randomness (keys come in through
//! [`Config::keyring`]; generating them is the caller's job): time comes in as `now`,
//! randomness from [`Config::rng_seed`], datagrams in through [`Endpoint::handle_datagram`] and
//! out through [`Endpoint::poll_transmit`] (quinn-proto style). It does not order messages
//! *across* senders, and does not resynchronise state after a loss — that is the replication
//! layer's job, triggered by [`Event::Lost`] and membership events.
//!
//! # Driving an endpoint
//!
//! After any input (`handle_datagram`, `handle_timeout`, `send`, `close`), drain
//! [`Endpoint::poll_transmit`] until it returns `None` and [`Endpoint::poll_event`] until it
//! returns `None`, then sleep until [`Endpoint::poll_timeout`] and call
//! [`Endpoint::handle_timeout`].

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod auth;
mod config;
mod endpoint;
mod name;
mod probation;
mod rate;
mod recv;
mod send;
mod stats;
pub mod util;
mod wall;
pub mod wire;

pub use auth::{Key, KeyId, Keyring, KeyringError};
pub use config::{Config, ConfigError};
pub use endpoint::{Endpoint, REPAIR_START_CREDIT};
pub use name::{MAX_NODE_NAME, NodeName, NodeNameError};
pub use recv::SENDER_OVERHEAD;
pub use stats::Stats;
pub use wall::WallClock;

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;

use bytes::Bytes;

/// Generated protobuf types of `proto/chorus.proto` (the datagram body).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/chorus.v1.rs"));
}

/// Identifier of a node, unique within a cluster and stable across restarts.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One life of a node: changes on every start, so a restarted node is a new stream.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Incarnation(pub u64);

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Identifier of a cluster; datagrams of another cluster are dropped.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ClusterId(pub u64);

impl ClusterId {
    /// Derives a cluster id from a human-readable name with FNV-1a 64 ([`util::fnv1a_64`]: stable across builds,
    /// platforms and languages).
    ///
    /// # Examples
    ///
    /// ```
    /// use chorus_protocol::ClusterId;
    /// assert_eq!(ClusterId::from_name("prod"), ClusterId::from_name("prod"));
    /// assert_ne!(ClusterId::from_name("prod"), ClusterId::from_name("test"));
    /// ```
    pub fn from_name(name: &str) -> ClusterId {
        ClusterId(util::fnv1a_64(name.as_bytes()))
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Where a [`Transmit`] goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Destination {
    /// Every member of the group (multicast).
    Group,
    /// One peer (unicast).
    Addr(SocketAddr),
}

/// One datagram to put on the wire.
#[must_use]
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Transmit {
    /// Where to send it.
    pub destination: Destination,
    /// The complete datagram (header, body, CRC).
    pub payload: Bytes,
}

/// Why a member left.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum LeaveReason {
    /// It said goodbye ([`Endpoint::close`]).
    Goodbye,
    /// Nothing was heard from it for [`Config::leave_after`].
    Timeout,
}

/// Liveness of a member as seen by this endpoint.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MemberState {
    /// Heard from within [`Config::suspect_after`].
    Alive,
    /// Silent for longer than [`Config::suspect_after`] but not yet [`Config::leave_after`].
    Suspected,
}

/// A peer known to this endpoint (never includes the endpoint itself).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Member {
    /// Its node id.
    pub node: NodeId,
    /// Its current incarnation.
    pub incarnation: Incarnation,
    /// The source address of its most recent datagram.
    pub addr: SocketAddr,
    /// The name its latest heartbeat gave (`None` until one with a valid name arrived, or
    /// when it has none).
    pub name: Option<NodeName>,
    /// Alive or suspected.
    pub state: MemberState,
    /// Highest sequence number of its stream this endpoint has delivered in order (or
    /// reported lost); everything at or below it is settled.
    pub delivered_up_to: u64,
    /// Its wall clock minus ours, in milliseconds, measured on its latest heartbeat (its
    /// wall time when sent against ours when received, so one-way delay makes it slightly
    /// low). `None` until a heartbeat carrying wall time arrived, or when this endpoint has
    /// no [`Config::wall_clock`].
    pub clock_offset_ms: Option<i64>,
}

/// Something the application (or the replication layer) must know.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Event {
    /// One application message, in order and exactly once per `(sender, incarnation)`.
    Delivered {
        /// Who sent it.
        sender: NodeId,
        /// Which life of the sender.
        incarnation: Incarnation,
        /// Its sequence number in that stream.
        seq: u64,
        /// The message.
        payload: Bytes,
    },
    /// These messages of a stream can never be delivered (they fell out of the sender's
    /// retransmission window, or the sender left or restarted before repairing them). Delivery
    /// continues after the range.
    Lost {
        /// Whose messages.
        sender: NodeId,
        /// Which life of the sender.
        incarnation: Incarnation,
        /// The lost sequence numbers.
        range: RangeInclusive<u64>,
    },
    /// A node passed probation (two of its heartbeats, half a heartbeat interval apart) and is
    /// a member; or a member that timed out is heard again with the same incarnation.
    MemberJoined {
        /// The node.
        node: NodeId,
        /// Its incarnation.
        incarnation: Incarnation,
        /// Its source address.
        addr: SocketAddr,
    },
    /// A member has been silent for [`Config::suspect_after`].
    MemberSuspected {
        /// The node.
        node: NodeId,
        /// Its incarnation.
        incarnation: Incarnation,
    },
    /// A suspected member was heard from again.
    MemberAlive {
        /// The node.
        node: NodeId,
        /// Its incarnation.
        incarnation: Incarnation,
    },
    /// A member left the group.
    MemberLeft {
        /// The node.
        node: NodeId,
        /// The incarnation that left.
        incarnation: Incarnation,
        /// Goodbye or timeout.
        reason: LeaveReason,
    },
    /// A newer incarnation of a member passed probation: its old stream is finished (anything
    /// missing from it was reported [`Event::Lost`] just before) and a new one begins.
    MemberRestarted {
        /// The node.
        node: NodeId,
        /// The previous incarnation.
        old: Incarnation,
        /// The new incarnation.
        new: Incarnation,
        /// Its source address.
        addr: SocketAddr,
    },
    /// The send window has room again after [`SendError::WindowFull`].
    Writable,
}

/// Why [`Endpoint::send`] refused a message. In every case no state changed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum SendError {
    /// The send window (messages or bytes) is full; wait for [`Event::Writable`].
    #[error("send window full")]
    WindowFull,
    /// The message is larger than [`Config::max_message_size`].
    #[error("message of {size} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The message size.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// [`Endpoint::close`] was called.
    #[error("endpoint closed")]
    Closed,
}
