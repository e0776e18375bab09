//! The record of what happened: trace events, the running digest over them, and the FNV-1a
//! hash both use (never std's randomly keyed hasher, so a digest replays from its seed).

use std::hash::{Hash, Hasher};
use std::time::Duration;

use chorus_protocol::util::{FNV1A_64_OFFSET, Fnv1a, fnv1a_64};

/// One entry of the optional trace ([`SimConfig::record_trace`](crate::SimConfig::record_trace)).
/// Times are virtual time since the epoch, so traces of two runs compare equal exactly when the
/// runs behaved the same.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TraceEvent {
    /// A machine produced a transmit.
    Sent {
        /// When.
        at: Duration,
        /// Sending node.
        from: usize,
        /// Destination node, `None` for the group.
        to: Option<usize>,
        /// Payload length.
        len: usize,
        /// FNV-1a hash of the payload.
        hash: u64,
    },
    /// A copy reached a machine.
    Delivered {
        /// When.
        at: Duration,
        /// Sending node.
        from: usize,
        /// Receiving node.
        to: usize,
        /// Length as delivered (after corruption).
        len: usize,
        /// Whether it was corrupted on the way.
        corrupted: bool,
    },
    /// A copy was dropped (loss, partition, receiver down, unknown address).
    Dropped {
        /// When.
        at: Duration,
        /// Sending node.
        from: usize,
        /// Intended receiver (`None` for an unknown address).
        to: Option<usize>,
        /// Why.
        reason: DropReason,
    },
    /// A machine's timer fired.
    Timeout {
        /// When.
        at: Duration,
        /// Node.
        node: usize,
    },
    /// A node crashed.
    Crashed {
        /// When.
        at: Duration,
        /// Node.
        node: usize,
    },
    /// A node's machine was (re)started.
    Started {
        /// When.
        at: Duration,
        /// Node.
        node: usize,
        /// Restart count (0 on first start).
        restarts: u32,
    },
}

/// Why a copy was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Random loss.
    Lost,
    /// A partition separates sender and receiver.
    Partitioned,
    /// The receiver was down (or restarted) when the copy was sent or arrived.
    ReceiverDown,
    /// No node has the destination address.
    UnknownDestination,
}

/// Whether a [`Recorder`] keeps every event or only the digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Keep {
    /// Only the running digest.
    Digest,
    /// The digest and the full list of events.
    Trace,
}

/// The running digest of every event, plus the events themselves when asked.
pub(super) struct Recorder {
    keep: Keep,
    digest: u64,
    events: Vec<TraceEvent>,
}

impl Recorder {
    pub(super) fn new(keep: Keep) -> Recorder {
        Recorder {
            keep,
            digest: FNV1A_64_OFFSET,
            events: Vec::new(),
        }
    }

    pub(super) fn record(&mut self, event: TraceEvent) {
        // FNV-1a as a `Hasher`, so the digest never depends on std's randomly keyed hasher.
        let mut hasher = Fnv1a::with_state(self.digest);
        event.hash(&mut hasher);
        self.digest = hasher.finish();
        if self.keep == Keep::Trace {
            self.events.push(event);
        }
    }

    pub(super) fn digest(&self) -> u64 {
        self.digest
    }

    pub(super) fn events(&self) -> &[TraceEvent] {
        &self.events
    }
}

/// The FNV-1a hash of `bytes` (as in [`TraceEvent::Sent`]).
pub(super) fn payload_hash(bytes: &[u8]) -> u64 {
    fnv1a_64(bytes)
}
