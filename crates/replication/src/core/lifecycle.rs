//! The life of a node: running, draining on shutdown (until every member has what this node
//! sent), lingering after the goodbye (so that it gets out), closed.

use std::time::{Duration, Instant};

use super::NodeCore;

/// Longest a shutting-down node waits for every member to confirm (through heartbeats) that
/// it delivered everything this node sent, answering NAKs meanwhile.
pub const DRAIN_MAX: Duration = Duration::from_secs(3);
/// How long the node keeps running after its goodbye so that the goodbye gets out.
pub const GOODBYE_LINGER: Duration = Duration::from_millis(50);

/// Where a node is in its life ([`NodeCore::lifecycle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Taking writes.
    Running,
    /// [`NodeCore::shutdown`] was called: no more writes; waiting until every member has
    /// what this node sent (its send window is empty and nothing is queued), or until
    /// `deadline`, then it says goodbye.
    Draining {
        /// When the node stops waiting ([`DRAIN_MAX`] after the shutdown).
        deadline: Instant,
    },
    /// The goodbye was sent; the node keeps answering until `deadline` so that it gets out.
    Lingering {
        /// When the node is closed ([`GOODBYE_LINGER`] after the goodbye).
        deadline: Instant,
    },
    /// Done: the owner stops driving the node (after draining
    /// [`poll_persist`](NodeCore::poll_persist), which ends with a final sync).
    Closed,
}

impl NodeCore {
    /// Starts a graceful shutdown: writes are refused from now on; the node drains (see
    /// [`Lifecycle::Draining`]), says goodbye, lingers and closes, driven by its inputs and
    /// timers. Does nothing unless running.
    pub fn shutdown(&mut self, now: Instant) {
        if self.lifecycle == Lifecycle::Running {
            // Owned keys die with this life: deleted now, so the drain carries the deletes.
            self.delete_own_keys(now);
            self.lifecycle = Lifecycle::Draining {
                deadline: now + DRAIN_MAX,
            };
            self.process(now);
        }
    }

    /// Hands every queued write over, then says goodbye at once (no drain); later commands
    /// fail with `Closed`. Writes the send window could not take before the goodbye are
    /// dropped. The node then lingers and closes like after [`shutdown`](NodeCore::shutdown).
    pub fn close(&mut self, now: Instant) {
        if matches!(
            self.lifecycle,
            Lifecycle::Running | Lifecycle::Draining { .. }
        ) {
            self.say_goodbye(now);
            self.advance_lifecycle(now);
        }
    }

    /// Where the node is in its life.
    #[must_use]
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }

    /// Whether the owner should take more write commands now: the node is running and its
    /// write backlog (writes waiting for room in the send window) is below
    /// [`NodeConfig::max_write_backlog_bytes`](super::NodeConfig::max_write_backlog_bytes).
    /// While it is not, a writer faster than the slowest member waits instead of queueing
    /// without bound (back-pressure).
    #[must_use]
    pub fn accepts_writes(&self) -> bool {
        self.lifecycle == Lifecycle::Running && self.write_bytes < self.max_write_backlog
    }

    /// The lifecycle's own deadline, if any.
    pub(super) fn lifecycle_timeout(&self) -> Option<Instant> {
        match self.lifecycle {
            Lifecycle::Draining { deadline } | Lifecycle::Lingering { deadline } => Some(deadline),
            Lifecycle::Running | Lifecycle::Closed => None,
        }
    }

    /// Moves on through the lifecycle as far as `now` and the drain condition allow.
    pub(super) fn advance_lifecycle(&mut self, now: Instant) {
        loop {
            match self.lifecycle {
                Lifecycle::Draining { deadline }
                    if now >= deadline
                        || (self.endpoint.window_len() == 0 && !self.has_backlog()) =>
                {
                    // Everything sent is stable at every member (or we gave up waiting).
                    self.say_goodbye(now);
                }
                Lifecycle::Lingering { deadline } if now >= deadline => {
                    self.lifecycle = Lifecycle::Closed;
                    self.sync_all_due = self.acks.is_some();
                }
                _ => return,
            }
        }
    }

    fn say_goodbye(&mut self, now: Instant) {
        self.pump(now);
        self.endpoint.close(now);
        self.lifecycle = Lifecycle::Lingering {
            deadline: now + GOODBYE_LINGER,
        };
        self.pump(now);
    }
}
