//! Authenticated senders: replay windows per sender (kept after it leaves, so captured
//! datagrams cannot bring it back) and the rate-limited log of refused datagrams.

use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::Incarnation;
use crate::auth::ReplayWindow;
use crate::wire::{DropReason, Header};

use super::Endpoint;

/// Least time between two log warnings about refused (unauthenticated) datagrams.
const AUTH_WARN_EVERY: Duration = Duration::from_secs(10);

/// Replay protection state of one authenticated sender.
#[derive(Debug)]
pub(super) struct Replay {
    /// Its newest authenticated incarnation.
    pub(super) incarnation: Incarnation,
    pub(super) window: ReplayWindow,
    pub(super) last_heard: Instant,
}

impl Endpoint {
    /// Most replay windows remembered: members, candidates and departed members.
    pub(super) fn replay_capacity(&self) -> usize {
        2 * self.cfg.max_members.get() + self.cfg.max_candidates.get()
    }

    /// Replay protection of an authenticated datagram: refuses (and counts) a counter already
    /// seen from this (sender, incarnation), at or below the first one heard from it, or below
    /// its window, and any datagram of an incarnation older than the newest authenticated one;
    /// otherwise records the counter.
    pub(super) fn check_replay(&mut self, header: &Header) -> bool {
        let now = self.now;
        let first = Replay {
            incarnation: header.incarnation,
            window: ReplayWindow::starting_at(header.counter),
            last_heard: now,
        };
        if !self.replay.contains_key(&header.node) && self.replay.len() >= self.replay_capacity() {
            // Full: forget the sender heard from least recently that is neither a member nor
            // a candidate (one always exists: the capacity exceeds both tables together).
            let (peers, candidates) = (&self.peers, &self.candidates);
            let oldest = self
                .replay
                .iter()
                .filter(|(n, _)| !peers.contains_key(n) && candidates.get(n).is_none())
                .min_by_key(|(n, r)| (r.last_heard, **n))
                .map(|(n, _)| *n);
            if let Some(oldest) = oldest {
                self.replay.remove(&oldest);
                self.stats.replay_forgotten += 1;
            }
        }
        let entry = match self.replay.entry(header.node) {
            Entry::Vacant(v) => {
                v.insert(first);
                return true;
            }
            Entry::Occupied(o) => o.into_mut(),
        };
        if header.incarnation < entry.incarnation {
            self.stats.stale_incarnation += 1;
            return false;
        }
        if header.incarnation > entry.incarnation {
            *entry = first;
            return true;
        }
        if entry.window.is_fresh(header.counter) {
            entry.window.accept(header.counter);
            entry.last_heard = now;
            return true;
        }
        self.drop_datagram(DropReason::Replayed);
        false
    }

    /// Drops a datagram that failed authentication, and says why in the log (each kind of
    /// refusal at most once per [`AUTH_WARN_EVERY`]: a flood must not flood the log too).
    pub(super) fn refuse(&mut self, reason: DropReason, from: SocketAddr, key_id: u16) {
        self.drop_datagram(reason);
        let kind = match reason {
            DropReason::UnknownKey => 0,
            DropReason::AuthFailed => 1,
            _ => 2,
        };
        if self.last_auth_warning[kind].is_some_and(|t| self.now < t + AUTH_WARN_EVERY) {
            return;
        }
        self.last_auth_warning[kind] = Some(self.now);
        let why = match (reason, self.cfg.keyring.as_ref()) {
            (DropReason::UnknownKey, _) => {
                "it is sealed with a key id this node does not have (another cluster key?)"
            }
            (DropReason::AuthFailed, _) => {
                "its authentication tag does not verify: the sender has a different key under \
                 the same key id, or the datagram was forged or altered"
            }
            (_, Some(_)) => "it is not sealed, but this node requires a cluster key",
            (_, None) => "it is sealed with a cluster key, but this node has none",
        };
        tracing::warn!(
            node = %self.cfg.node,
            %from,
            key_id,
            %reason,
            "refused a datagram: {why} (further refusals are only counted for {AUTH_WARN_EVERY:?})"
        );
    }
}
