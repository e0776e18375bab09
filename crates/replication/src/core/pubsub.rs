//! Messages that are not stored: publications on topics, carried by the same reliable
//! multicast stream as writes (see `docs/replication.md`, Messages).
//!
//! A publication is one replication envelope (`Publish`) holding a topic and a payload. The
//! node hands it to the endpoint through the write queue (so it is ordered with the node's
//! writes and shares their back-pressure, [`NodeCore::accepts_writes`]) and reports it to its
//! own owner at once ([`NodeEvent::Message`]); a receiver checks it and reports it the same
//! way. Nothing keeps it after that: it is never applied to the store, logged, persisted or
//! part of anti-entropy. What the protocol could not recover of a sender's stream is reported
//! as [`NodeEvent::MessagesLost`]; which subscriber wants what is the owner's business (the
//! root crate's driver filters by [`TopicFilter`]).
//!
//! Topic syntax: 1 to [`MAX_TOPIC_LEN`] bytes of `A-Z a-z 0-9 . _ / -`. A [`TopicFilter`] is
//! a topic (that topic only), a prefix ending in `/*` (every topic that starts with the part
//! before the `*`, e.g. `chat/*` matches `chat/room1` and `chat/a/b`, not `chat`), or `*`
//! alone (every topic).

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use bytes::Bytes;
use prost::Message as _;

use super::{CoreError, Lifecycle, NodeCore, NodeEvent};
use crate::wire;

/// Longest topic, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;

/// Bytes an encoded publication needs beyond its topic and payload (field tags and lengths).
const ENVELOPE_OVERHEAD: usize = 16;

/// The first byte of an envelope whose body is a `Publish` (field 6, length-delimited), as
/// prost (and every canonical protobuf encoder) writes a one-field message.
const PUBLISH_TAG: u8 = (6 << 3) | 2;

/// A topic or topic filter that breaks the syntax (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Empty, or longer than [`MAX_TOPIC_LEN`].
    #[error("a topic is 1 to {max} bytes long, this one is {len}")]
    Length {
        /// Its length in bytes.
        len: usize,
        /// [`MAX_TOPIC_LEN`].
        max: usize,
    },
    /// A character outside `A-Z a-z 0-9 . _ / -` (or a `*` that is not a filter's last
    /// segment).
    #[error(
        "a topic may contain only A-Z a-z 0-9 . _ / - (a filter may end in /* or be *), found {found:?} at byte {at}"
    )]
    Character {
        /// The character.
        found: char,
        /// Its byte offset.
        at: usize,
    },
}

/// Why [`NodeCore::publish`] refused a message (nothing was sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The topic breaks the topic syntax.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The payload is larger than [`NodeCore::max_message_len`].
    #[error("message of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        /// The payload's length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Checks `topic` against the topic syntax (see the [module docs](self)).
///
/// # Errors
/// [`TopicError`] naming what is wrong.
pub fn check_topic(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        return Err(TopicError::Length {
            len: topic.len(),
            max: MAX_TOPIC_LEN,
        });
    }
    match topic
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-')))
    {
        Some((at, found)) => Err(TopicError::Character { found, at }),
        None => Ok(()),
    }
}

/// Which topics a subscription wants: one topic, every topic under a prefix (`chat/*`), or
/// every topic (`*`). Parse with [`TopicFilter::parse`] (or `str::parse`).
///
/// # Examples
///
/// ```
/// use chorus_replication::TopicFilter;
/// let room = TopicFilter::parse("chat/room1")?;
/// assert!(room.matches("chat/room1") && !room.matches("chat/room10"));
/// let chat = TopicFilter::parse("chat/*")?;
/// assert!(chat.matches("chat/room1") && chat.matches("chat/a/b") && !chat.matches("chat"));
/// assert!(TopicFilter::parse("*")?.matches("anything"));
/// assert!(TopicFilter::parse("chat/*/x").is_err());
/// # Ok::<(), chorus_replication::TopicError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter {
    /// The filter as given.
    text: String,
    /// How many bytes of `text` a topic must start with; `None`: equal to `text`.
    prefix: Option<usize>,
}

impl TopicFilter {
    /// Parses a filter: a topic, `prefix/*` or `*`.
    ///
    /// # Errors
    /// [`TopicError`] when the topic (or the prefix before `/*`) breaks the syntax.
    pub fn parse(filter: &str) -> Result<TopicFilter, TopicError> {
        let prefix = if filter == "*" {
            Some(0)
        } else if let Some(head) = filter.strip_suffix("/*") {
            // The prefix keeps its '/': `chat/*` matches `chat/x`, not `chatroom`.
            check_topic(&filter[..=head.len()])?;
            Some(head.len() + 1)
        } else {
            check_topic(filter)?;
            None
        };
        Ok(TopicFilter {
            text: filter.to_owned(),
            prefix,
        })
    }

    /// Whether a publication on `topic` is for this filter.
    #[must_use]
    pub fn matches(&self, topic: &str) -> bool {
        match self.prefix {
            None => topic == self.text,
            Some(n) => topic.len() > n && topic.starts_with(&self.text[..n]),
        }
    }

    /// The filter as given.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for TopicFilter {
    type Err = TopicError;

    fn from_str(s: &str) -> Result<TopicFilter, TopicError> {
        TopicFilter::parse(s)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One published message, as [`NodeEvent::Message`] reports it (a local publication at once,
/// a remote one when the protocol delivers it: per sender in order and exactly once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The sender's node id (this node's own for a local publication).
    pub from: u64,
    /// Its topic (valid by the topic syntax).
    pub topic: String,
    /// Its payload (at most the receiver's message limit).
    pub payload: Bytes,
}

/// Counters of publications (the `pubsub` part of [`NodeStats`](super::NodeStats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PubsubStats {
    /// Local publications accepted by [`NodeCore::publish`].
    pub published: u64,
    /// Remote publications received and reported.
    pub received: u64,
    /// Remote publications dropped: bad topic, payload over the limit, or undecodable.
    pub invalid: u64,
    /// Losses of a sender's messages reported ([`NodeEvent::MessagesLost`]).
    pub lost_events: u64,
    /// Messages those losses covered.
    pub lost_messages: u64,
}

impl NodeCore {
    /// Publishes `payload` on `topic` to every node of the group (this one included: a
    /// [`NodeEvent::Message`] from this node is queued at once). The message is queued behind
    /// this node's writes and sent in order with them; while the queue is over its bound
    /// ([`accepts_writes`](NodeCore::accepts_writes) is false) the owner should wait, as for
    /// writes. It is never stored.
    ///
    /// # Errors
    /// [`CoreError::Closed`] after `shutdown` or `close`; [`CoreError::Publish`] for a topic
    /// that breaks the syntax or a payload over [`max_message_len`](NodeCore::max_message_len).
    /// Nothing is sent then.
    pub fn publish(&mut self, now: Instant, topic: &str, payload: Bytes) -> Result<(), CoreError> {
        if self.lifecycle != Lifecycle::Running {
            return Err(CoreError::Closed);
        }
        check_topic(topic).map_err(PublishError::from)?;
        let max = self.max_message_len();
        if payload.len() > max {
            return Err(PublishError::TooLarge {
                len: payload.len(),
                max,
            }
            .into());
        }
        let envelope = wire::Envelope {
            body: Some(wire::envelope::Body::Publish(wire::Publish {
                topic: topic.to_owned(),
                payload: payload.clone(),
            })),
        };
        let encoded = Bytes::from(envelope.encode_to_vec());
        self.write_bytes += encoded.len();
        self.writes.push_back(encoded);
        self.pubsub.published += 1;
        self.events.push_back(NodeEvent::Message(Publication {
            from: self.endpoint.node_id().0,
            topic: topic.to_owned(),
            payload,
        }));
        self.process(now);
        Ok(())
    }

    /// The largest payload [`publish`](NodeCore::publish) takes, and a receiver accepts: the
    /// replica's value limit, or less when the protocol's largest message is smaller.
    #[must_use]
    pub fn max_message_len(&self) -> usize {
        let limits = &self.replica.config().limits;
        limits.max_value_len.min(
            limits
                .max_write_bytes
                .saturating_sub(MAX_TOPIC_LEN + ENVELOPE_OVERHEAD),
        )
    }

    /// Takes a delivered message of `from` if it is a publication (reported, or dropped and
    /// counted when invalid); returns `false` when it is for the replica.
    pub(super) fn take_publication(&mut self, from: u64, payload: &[u8]) -> bool {
        if payload.first() != Some(&PUBLISH_TAG) {
            return false;
        }
        let publish = match wire::Envelope::decode(payload) {
            Ok(wire::Envelope {
                body: Some(wire::envelope::Body::Publish(p)),
            }) => p,
            // Another body after all (its encoding merely starts with the same byte).
            Ok(_) => return false,
            Err(error) => {
                tracing::debug!(%error, from, "undecodable publication dropped");
                self.pubsub.invalid += 1;
                return true;
            }
        };
        if let Err(error) = check_topic(&publish.topic) {
            tracing::debug!(%error, from, "publication with a bad topic dropped");
            self.pubsub.invalid += 1;
            return true;
        }
        let max = self.max_message_len();
        if publish.payload.len() > max {
            tracing::debug!(
                from,
                len = publish.payload.len(),
                max,
                "publication over the message limit dropped"
            );
            self.pubsub.invalid += 1;
            return true;
        }
        self.pubsub.received += 1;
        self.events.push_back(NodeEvent::Message(Publication {
            from,
            topic: publish.topic,
            payload: publish.payload,
        }));
        true
    }

    /// The protocol could not recover `count` messages of `from`: some may have been
    /// publications.
    pub(super) fn report_lost(&mut self, from: u64, count: u64) {
        self.pubsub.lost_events += 1;
        self.pubsub.lost_messages += count;
        self.events
            .push_back(NodeEvent::MessagesLost { from, count });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn topic_syntax() {
        for ok in [
            "a",
            "chat/room-1",
            "A.b_c/d-e/0",
            &"x".repeat(MAX_TOPIC_LEN),
        ] {
            assert_eq!(check_topic(ok), Ok(()), "{ok}");
        }
        assert_eq!(
            check_topic(""),
            Err(TopicError::Length { len: 0, max: 256 })
        );
        assert!(matches!(
            check_topic(&"x".repeat(MAX_TOPIC_LEN + 1)),
            Err(TopicError::Length { len: 257, .. })
        ));
        assert_eq!(
            check_topic("chat room"),
            Err(TopicError::Character { found: ' ', at: 4 })
        );
        assert!(check_topic("chat/*").is_err());
        assert!(check_topic("é").is_err());
    }

    #[test]
    fn filters() {
        let exact = TopicFilter::parse("chat/room1").unwrap();
        assert!(exact.matches("chat/room1"));
        assert!(!exact.matches("chat/room10") && !exact.matches("chat"));
        let prefix: TopicFilter = "chat/*".parse().unwrap();
        assert!(prefix.matches("chat/room1") && prefix.matches("chat/a/b"));
        assert!(!prefix.matches("chat/") && !prefix.matches("chat") && !prefix.matches("chatx"));
        let nested = TopicFilter::parse("a/b/*").unwrap();
        assert!(nested.matches("a/b/c") && !nested.matches("a/bc"));
        let all = TopicFilter::parse("*").unwrap();
        assert!(all.matches("x") && all.matches("chat/room1"));
        assert_eq!(all.to_string(), "*");
        for bad in ["", "/*x", "chat/*/x", "chat*", "**", "a b/*", "*/"] {
            assert!(TopicFilter::parse(bad).is_err(), "{bad}");
        }
        // The prefix itself must be a valid topic, and `/*` alone means the prefix "/".
        assert!(TopicFilter::parse("/*").unwrap().matches("/x"));
    }
}
