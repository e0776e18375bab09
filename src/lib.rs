//! Chorus: a key-value store kept identical on every node of a cluster by reliable multicast.
//!
//! This crate is the glue and the public API. It owns one tokio task per [`Node`] that drives
//! the sans-IO state machines of `chorus-protocol` (sequence numbers, NAK repair, heartbeats,
//! membership) and `chorus-replication` (the store, versions, anti-entropy) over the sockets
//! of `chorus-transport`. Reads ([`Node::get`], [`Node::scan`]) go straight to the shared
//! store; writes and everything that touches protocol state go through the driver task.
//!
//! With [`NodeBuilder::data_dir`] the store is also kept on disk (write-ahead log plus
//! snapshots) and a restarted node starts from it; without, it lives in memory.
//!
//! With [`NodeBuilder::keyring`] every datagram is authenticated and encrypted
//! (XChaCha20-Poly1305); without, run it only on a trusted network segment.
//!
//! What it does not do: cross-node transactions or strong (linearizable) reads; see
//! `docs/replication.md` for what is and is not guaranteed.
//!
//! # Examples
//!
//! ```no_run
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
//! # let _ = &mut changes;
//! node.shutdown().await?;
//! # Ok(()) }
//! ```

mod driver;
mod error;
mod node;
mod watch;

pub use chorus_protocol::{Key, KeyId, Keyring, KeyringError};
pub use chorus_replication::{Change, ClockCause, DurableError, Fsync, Version};
pub use chorus_transport::{Interface, Mode};
pub use error::Error;
pub use node::{DEFAULT_GROUP, Entry, MemberInfo, Node, NodeBuilder, Op, Preset};
pub use watch::Watch;
