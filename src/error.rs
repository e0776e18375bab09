//! The error type of the public API.

use std::time::Duration;

/// What went wrong in a [`Node`](crate::Node) call.
///
/// Variants that describe local misuse (a key too long, a value too large) leave the store
/// unchanged; the transport variant means the node could not be started or has stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The sockets could not be set up; the message names the remedy.
    #[error(transparent)]
    Transport(#[from] chorus_transport::TransportError),
    /// The write was refused by the replication layer (limits, invalid key); nothing changed.
    #[error(transparent)]
    Replication(#[from] chorus_replication::Error),
    /// A watch asked to resume from a revision older than the retained change log.
    #[error(
        "revision {requested} is no longer in the change log (oldest kept is {oldest}); re-read with scan() and watch from revision()"
    )]
    Compacted {
        /// The revision asked for.
        requested: u64,
        /// The oldest revision still retained.
        oldest: u64,
    },
    /// The node did not get in sync within the time given.
    #[error("not in sync after {0:?}")]
    Timeout(Duration),
    /// The node has been shut down (or its driver stopped); the call had no effect.
    #[error("the node is shut down")]
    Closed,
    /// The data directory could not be opened, read, locked or written.
    #[error(transparent)]
    Durability(#[from] chorus_replication::DurableError),
    /// The builder was given an invalid combination of settings.
    #[error("invalid configuration: {0}")]
    Config(String),
}
