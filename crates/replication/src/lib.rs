//! chorus-replication: the sans-IO replicated key-value store of Chorus.
//!
//! What it does:
//! - keeps a map `key → value | tombstone`, each entry versioned by a hybrid logical clock
//!   timestamp plus the writer's node id; the larger version wins (last writer wins), so
//!   every node reaches the same map whatever the arrival order or duplication;
//! - turns local puts, deletes and atomic batches into encoded messages for the driver to
//!   multicast, and merges the messages other nodes sent;
//! - numbers every applied change with a local revision, keeps a bounded change log for
//!   resumable watches, and reports changes as events;
//! - runs anti-entropy: bucketed digests, summaries, requests and entries, so nodes that
//!   lost messages, were partitioned or joined late converge, and reports `InSync`;
//! - collects tombstones after a grace period;
//! - persists, when given a [`Durability`] backend ([`DiskLog`]: a write-ahead log plus
//!   snapshots, the only file I/O of this crate, behind that explicit seam), every committed
//!   change, and restores a replica from what was found on disk;
//! - [`NodeCore`] wires a `chorus_protocol::Endpoint` and a [`Replica`] into one sans-IO
//!   node that the tokio driver and the simulator both drive.
//!
//! What it does not do: it opens no socket, reads no clock, spawns no task and draws no
//! unseeded randomness. Reliable multicast, membership and loss detection belong to
//! `chorus-protocol`; the driver (production or simulator) feeds their outputs in. No
//! cross-node transactions, no read quorum. Without a backend (the default, and always in
//! the simulator) the store lives in memory and no file is touched.
//!
//! See `docs/replication.md` for the guarantees and the sync protocol.

mod config;
mod core;
mod durable;
mod error;
mod hash;
mod hlc;
mod replica;
mod store;

/// Generated protobuf types of `proto/replication.proto`.
#[allow(missing_docs, clippy::all)]
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/chorus.replication.v1.rs"));
}

pub use crate::core::{CoreError, NodeConfig, NodeCore, NodeEvent, NodeStats};
pub use chorus_protocol;
pub use chorus_protocol::WallClock;
pub use config::{Limits, ReplicaConfig};
pub use durable::{
    DiskLog, DiskOptions, Durability, DurableError, DurableStats, Fsync, LoadReport, Loaded,
    ParseFsyncError,
};
pub use error::{ClockCause, Compacted, Error};
pub use hlc::{DriftError, Hlc, HlcClock, MAX_PHYSICAL_MS, Version};
pub use replica::{Change, Op, Outgoing, OutgoingKind, Replica, ReplicaEvent, ReplicaStats};
pub use store::{Entry, Store};
