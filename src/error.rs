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
    /// The write was refused because its version would lie further ahead of the peers'
    /// clocks than they accept (they would drop it): this node's clock is ahead of every
    /// live peer's, or the history it loaded from disk is ahead of the clock. Nothing
    /// changed. A state of the node rather than of the request (an HTTP server answers
    /// 503): it lasts until the clock is fixed and the node restarted
    /// ([`ClockCause::WallClock`](crate::ClockCause::WallClock)) or until the clock catches
    /// up ([`ClockCause::History`](crate::ClockCause::History)). See `docs/replication.md`,
    /// Clock safety.
    #[error("{}", chorus_replication::Error::ClockAhead { offset_ms: *offset_ms, bound_ms: *bound_ms, cause: *cause })]
    ClockAhead {
        /// How far (ms) the write's version would be ahead of the most advanced live peer's
        /// clock, or of this node's own clock when no peer reported one.
        offset_ms: u64,
        /// The most that is accepted: the drift bound less the safety margin.
        bound_ms: u64,
        /// What is ahead: the wall clock, or the local history.
        cause: chorus_replication::ClockCause,
    },
    /// A topic or topic filter breaks the topic syntax ([`Node::publish`](crate::Node::publish),
    /// [`Node::subscribe`](crate::Node::subscribe)); nothing was sent or subscribed.
    #[error(transparent)]
    Topic(#[from] chorus_replication::TopicError),
    /// A message for [`Node::publish`](crate::Node::publish) is larger than the node's message
    /// limit; nothing was sent.
    #[error("message of {len} bytes is larger than the limit of {max} bytes")]
    MessageTooLarge {
        /// The payload's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A stream's reader fell behind: this many items meant for it were skipped here (a
    /// [`Subscription`](crate::Subscription)'s messages or loss reports, a
    /// [`MemberEvents`](crate::MemberEvents) stream's events). Not the end: the stream goes
    /// on with the next item (for member events, re-read [`Node::members`](crate::Node::members)
    /// for the current state).
    #[error("the stream fell behind: {skipped} items skipped")]
    Lagged {
        /// How many were skipped.
        skipped: u64,
    },
    /// The node holds [`MAX_SUBSCRIPTIONS`](crate::MAX_SUBSCRIPTIONS) subscriptions already.
    #[error("too many subscriptions on this node (at most {max})")]
    TooManySubscriptions {
        /// The limit.
        max: usize,
    },
}

impl From<chorus_replication::CoreError> for Error {
    fn from(e: chorus_replication::CoreError) -> Error {
        use chorus_replication::{CoreError, Error as R, PublishError};
        match e {
            CoreError::Replica(R::ClockAhead {
                offset_ms,
                bound_ms,
                cause,
            }) => Error::ClockAhead {
                offset_ms,
                bound_ms,
                cause,
            },
            CoreError::Replica(e) => Error::Replication(e),
            CoreError::Closed => Error::Closed,
            CoreError::Durability(e) => Error::Durability(e),
            CoreError::Publish(PublishError::Topic(e)) => Error::Topic(e),
            CoreError::Publish(PublishError::TooLarge { len, max }) => {
                Error::MessageTooLarge { len, max }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_replication::{ClockCause, CoreError};

    #[test]
    fn a_clock_refusal_becomes_its_own_variant_with_the_offset_and_the_bound() {
        let e = Error::from(CoreError::Replica(chorus_replication::Error::ClockAhead {
            offset_ms: 300_000,
            bound_ms: 59_000,
            cause: ClockCause::WallClock,
        }));
        assert!(matches!(
            e,
            Error::ClockAhead {
                offset_ms: 300_000,
                bound_ms: 59_000,
                cause: ClockCause::WallClock
            }
        ));
        let text = e.to_string();
        assert!(
            text.contains("300000 ms ahead") && text.contains("59000 ms"),
            "{text}"
        );
        assert!(matches!(
            Error::from(CoreError::Replica(chorus_replication::Error::EmptyKey)),
            Error::Replication(_)
        ));
        assert!(matches!(Error::from(CoreError::Closed), Error::Closed));
    }
}
