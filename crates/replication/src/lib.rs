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
//! - emits, when durable, every committed change as a [`Persist`] item for a durable store
//!   (the `chorus-storage` crate's data directory, or the in-memory [`MemoryDisk`]), is told
//!   how far they are durable, acknowledges writes from that, and restores a replica from
//!   what the store loaded; [`MergedState`] is the one merge of records that both stores
//!   replay with;
//! - [`NodeCore`] wires a `chorus_protocol::Endpoint` and a [`Replica`] into one sans-IO
//!   node that the tokio driver and the simulator both drive, with its lifecycle (drain,
//!   goodbye, linger), write back-pressure and write acknowledgement;
//! - carries published messages on topics ([`NodeCore::publish`], [`NodeEvent::Message`],
//!   [`NodeEvent::MessagesLost`]) over the same stream: checked on receipt, never stored.
//!
//! What it does not do: it opens no socket, touches no file, reads no clock, spawns no task
//! and draws no unseeded randomness. Reliable multicast, membership and loss detection belong to
//! `chorus-protocol`; the driver (production or simulator) feeds their outputs in. No
//! cross-node transactions, no read quorum. Without a durable store (the default) the store
//! lives in memory only.
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

pub use crate::core::{
    CoreError, DEPUTY_STEP, DRAIN_MAX, GOODBYE_LINGER, Lifecycle, MAX_ROUNDS, MAX_TOPIC_LEN,
    NodeConfig, NodeCore, NodeEvent, NodeStats, OwnedStats, Publication, PublishError, PubsubStats,
    TopicError, TopicFilter, check_topic,
};
pub use chorus_protocol;
pub use chorus_protocol::WallClock;
pub use config::{Limits, ReplicaConfig};
pub use durable::{
    DurableError, DurableStats, Fsync, LoadReport, Loaded, LoadedEntry, MemoryDisk, MergedState,
    Origin, ParseFsyncError, Persist,
};
pub use error::{ClockCause, Compacted, Error};
pub use hlc::{DriftError, Hlc, HlcClock, MAX_PHYSICAL_MS, ParseVersionError, Version};
pub use replica::{
    Change, Check, Expect, Op, Outgoing, OutgoingKind, PutMeta, Replica, ReplicaEvent,
    ReplicaStats, RestoreMode, RestoreReport,
};
pub use store::{Entry, EntryMeta, Owner, Store};
