//! Chorus: a key-value store kept identical on every node of a cluster by reliable multicast.
//!
//! This crate is the glue and the public API. It owns one tokio task per [`Node`] that drives
//! the sans-IO state machines of `chorus-protocol` (sequence numbers, NAK repair, heartbeats,
//! membership) and `chorus-replication` (the store, versions, anti-entropy) over the sockets
//! of `chorus-transport`. Reads ([`Node::get`], [`Node::scan`]) go straight to the shared
//! store; writes and everything that touches protocol state go through the driver task.
//!
//! Besides the store, nodes can send each other messages that are not stored:
//! [`Node::publish`] on a topic, [`Node::subscribe`] to a [`TopicFilter`] (per sender in order
//! and exactly once, or an explicit [`Delivery::Lost`]; see `docs/replication.md`, Messages).
//!
//! With [`NodeBuilder::data_dir`] the store is also kept on disk (write-ahead log plus
//! snapshots) and a restarted node starts from it; without, it lives in memory.
//!
//! With [`NodeBuilder::keyring`] every datagram is authenticated and encrypted
//! (XChaCha20-Poly1305); without, run it only on a trusted network segment.
//!
//! What it does not do: cross-node transactions or strong (linearizable) reads; see
//! `docs/replication.md` for what is and is not guaranteed, and `docs/api.md` for a tour of
//! this API.
//!
//! Every type a public signature uses is exported from this crate (the transport's, for
//! implementing or choosing a transport, under [`transport`]); an application needs no other
//! Chorus crate.
//!
//! # Cargo features
//!
//! - `testing` (off by default): test hooks that break a node on purpose,
//!   `NodeBuilder::inject_receive_loss` and `Node::abort`. Tests enable it through their
//!   dev-dependencies; a production build should not.
//!
//! # Examples
//!
//! ```no_run
//! use futures_util::StreamExt;
//! # async fn demo() -> Result<(), chorus::Error> {
//! let node = chorus::Node::builder()
//!     .cluster("prod-config")
//!     .group("239.255.77.1:7400".parse().expect("valid address"))
//!     .interface("lo")
//!     .start()
//!     .await?;
//! node.put("app/db/url", "postgres://db1/app").await?;
//! assert!(node.get("app/db/url").is_some());
//! let mut changes = node.watch("app/");
//! while let Some(change) = changes.next().await {
//!     let change = change?;
//!     println!("{} = {:?} at revision {}", change.key, change.value, change.revision);
//! #   break;
//! }
//! node.shutdown().await?;
//! # Ok(()) }
//! ```

mod backup;
mod builder;
mod conditional;
mod counters;
mod driver;
mod error;
mod member;
mod member_events;
mod node;
mod pubsub;
mod watch;

pub use backup::Snapshot;
pub use builder::{DEFAULT_GROUP, NodeBuilder, Preset};
pub use bytes::Bytes;
pub use chorus_protocol::auth::KEY_LEN;
pub use chorus_protocol::{
    Key, KeyId, Keyring, KeyringError, LeaveReason, MAX_NODE_NAME, NodeId, NodeName, NodeNameError,
    Stats as ProtocolStats,
};
/// An entry as the store keeps it, tombstones included (`value: None`): what a
/// [`Snapshot`] holds and [`Node::restore`] takes. Reads ([`Node::get`]) return the live
/// [`Entry`] instead.
pub use chorus_replication::Entry as StoredEntry;
pub use chorus_replication::{
    Change, Check, ClockCause, DurableError, DurableStats, Error as ReplicationError, Expect,
    Fsync, Hlc, MAX_TOPIC_LEN, Op, Owner, ParseFsyncError, ParseVersionError, PutMeta,
    ReplicaStats, RestoreMode, RestoreReport, TopicError, TopicFilter, Version,
};
pub use chorus_transport::{Interface, Mode, TransportError};
pub use counters::{CoreCounters, Counters, DriverCounters, PubsubCounters, StoreCounters};
pub use error::Error;
pub use member::{MemberInfo, MemberState};
pub use member_events::{MemberEvent, MemberEventKind, MemberEvents};
pub use node::{Entry, Node};
pub use pubsub::{
    Delivery, MAX_SUBSCRIPTIONS, Message, SUBSCRIPTION_QUEUE, SUBSCRIPTION_QUEUE_BYTES,
    Subscription,
};
pub use watch::Watch;

/// The datagram transports a node runs over, for [`NodeBuilder::start_with_transport`]: the
/// [`DatagramTransport`](transport::DatagramTransport) trait, UDP sockets
/// ([`UdpTransport`](transport::UdpTransport)) and an in-memory network for tests
/// ([`MemoryHub`](transport::MemoryHub)). The `chorus-transport` crate, re-exported.
pub use chorus_transport as transport;
