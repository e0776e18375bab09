//! Admission: what a valid datagram counts for. A member's refreshes its liveness; one of an
//! unknown (node, incarnation) puts its sender on probation; a candidate with a second
//! heartbeat half an interval after its first is promoted to member.

use std::net::SocketAddr;

use crate::probation::Candidate;
use crate::rate::Credit;
use crate::recv::{Out, RecvStream, SENDER_OVERHEAD, Standing};
use crate::wire::Header;
use crate::{Event, Incarnation, LeaveReason, MemberState, NodeId};
use std::time::Instant;

use super::membership::{Peer, StreamEnd};
use super::repair::{MEMBER_CREDIT_PER_BYTE, REPAIR_START_CREDIT};
use super::timers::Timer;
use super::{Endpoint, Feeds};

/// What a datagram carries, as far as probation is concerned: only heartbeats prove a sender.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum FrameClass {
    /// A heartbeat.
    Heartbeat,
    /// Any other frame.
    Other,
}

impl Endpoint {
    /// Membership bookkeeping for a valid datagram of `len` bytes (a heartbeat or not).
    /// Returns `false` if it must be ignored; otherwise `feeding` says whose stream it feeds.
    pub(super) fn admit(
        &mut self,
        header: Header,
        from: SocketAddr,
        len: usize,
        class: FrameClass,
    ) -> bool {
        let (node, incarnation) = (header.node, header.incarnation);
        self.feeding = Feeds::Member;
        let mut resume = None;
        let mut rejoin = false;
        if let Some(gone) = self.departed.get(&node) {
            let stale = match gone.reason {
                LeaveReason::Goodbye => incarnation <= gone.incarnation,
                LeaveReason::Timeout => incarnation < gone.incarnation,
            };
            if stale {
                self.stats.stale_incarnation += 1;
                return false;
            }
            if incarnation == gone.incarnation {
                resume = gone.resume;
                rejoin = true;
            }
        }
        let now = self.now;
        match self.peers.get_mut(&node) {
            Some(peer) if peer.incarnation == incarnation => {
                peer.last_heard = now;
                peer.addr = from;
                let cap = self.cfg.repair_bytes_per_member.get() as u64;
                self.repair_credit
                    .entry(node)
                    .or_insert_with(|| Credit::new(REPAIR_START_CREDIT, cap))
                    .earn(MEMBER_CREDIT_PER_BYTE * len as u64, cap);
                if peer.state == MemberState::Suspected {
                    peer.state = MemberState::Alive;
                    self.events
                        .push_back(Event::MemberAlive { node, incarnation });
                }
                self.sync_peer_timers(node);
                return true;
            }
            Some(peer) if peer.incarnation > incarnation => {
                self.stats.stale_incarnation += 1;
                return false;
            }
            // A newer incarnation of a member: a restart, which goes through probation.
            Some(_) => {}
            // Back from a timeout (e.g. a healed partition), same incarnation: it proved
            // itself before, so it rejoins at once.
            None if rejoin => return self.rejoin(node, incarnation, from, resume),
            None => {}
        }
        self.on_probation(node, incarnation, from, len, class)
    }

    /// A datagram of a (node, incarnation) that is not a member. Returns whether to handle it
    /// (with `feeding` set to [`Feeds::Candidate`] when it feeds a candidate's stream). The sender becomes a
    /// member with a heartbeat at least half a heartbeat interval after its first one.
    pub(super) fn on_probation(
        &mut self,
        node: NodeId,
        incarnation: Incarnation,
        from: SocketAddr,
        len: usize,
        class: FrameClass,
    ) -> bool {
        let now = self.now;
        let proof = self.cfg.heartbeat_interval / 2;
        match self.candidates.get_mut(&node) {
            Some(c) if c.incarnation == incarnation => {
                c.addr = from;
                c.received += len as u64;
                if class == FrameClass::Heartbeat {
                    match c.first_heartbeat {
                        Some(first) if now >= first + proof => return self.promote(node),
                        Some(_) => {}
                        None => c.first_heartbeat = Some(now),
                    }
                }
                self.feeding = Feeds::Candidate;
                return true;
            }
            Some(c) if c.incarnation > incarnation => {
                self.stats.stale_incarnation += 1;
                return false;
            }
            // A newer incarnation replaces it.
            Some(_) => self.drop_candidate(node),
            None => {}
        }
        let restart = self.peers.contains_key(&node);
        if !restart && self.peers.len() >= self.cfg.max_members.get() {
            self.stats.members_full += 1;
            return false;
        }
        if self.candidates.len() >= self.cfg.max_candidates.get()
            && let Some((oldest, _)) = self.candidates.oldest()
        {
            self.drop_candidate(oldest);
            self.stats.candidates_evicted += 1;
        }
        // Newcomers never take room from anyone but older candidates (whose slots turn over
        // like the table's).
        while !self.budget.fits(SENDER_OVERHEAD) {
            let Some((oldest, _)) = self.candidates.oldest() else {
                break;
            };
            self.drop_candidate(oldest);
            self.stats.candidates_evicted += 1;
        }
        if !self.budget.try_charge(SENDER_OVERHEAD) {
            self.stats.senders_over_budget += 1;
            return false;
        }
        let half = self.cfg.heartbeat_interval / 2;
        if let Some(next) = self.timers.get(Timer::Heartbeat) {
            let sooner = next.min(self.last_heartbeat + half);
            self.timers.set(Timer::Heartbeat, Some(sooner));
        }
        let rank = self.next_rank(Standing::Candidate);
        self.candidates.insert(
            node,
            Candidate {
                incarnation,
                addr: from,
                first_heard: now,
                first_heartbeat: (class == FrameClass::Heartbeat).then_some(now),
                stream: RecvStream::held(node, incarnation, rank),
                received: len as u64,
                answered: 0,
                acked: self.window.highest_sent(),
            },
        );
        self.feeding = Feeds::Candidate;
        true
    }

    /// A candidate passed probation: it becomes a member (or replaces its node's older
    /// incarnation), and what its stream held is delivered. Returns `false` (dropping it) if
    /// the member table filled up meanwhile.
    pub(super) fn promote(&mut self, node: NodeId) -> bool {
        let Some(mut candidate) = self.candidates.remove(&node) else {
            return false;
        };
        self.holders.remove(&candidate.stream.rank);
        let restart = self.peers.get(&node).map(|p| p.incarnation);
        if restart.is_none() && self.peers.len() >= self.cfg.max_members.get() {
            let mut out = Out {
                events: &mut self.events,
                stats: &mut self.stats,
                budget: &mut self.budget,
                delivered: (0, 0),
                shared: 0,
            };
            candidate.stream.discard(&mut out);
            self.budget.release(SENDER_OVERHEAD);
            self.stats.members_full += 1;
            return false;
        }
        let (now, acked) = (self.now, candidate.acked);
        let incarnation = candidate.incarnation;
        let addr = candidate.addr;
        let mut peer = Peer::new(node, incarnation, addr, now, acked);
        candidate.stream.rank = self.next_rank(Standing::Member);
        peer.stream = candidate.stream;
        match restart {
            Some(old) => {
                // A goodbye of the old incarnation still waiting for its last data is over:
                // that stream ends here, and its deadline must not remove the new one.
                self.timers.cancel(Timer::Leaving(node));
                if let Some(mut previous) = self.peers.insert(node, peer) {
                    self.end_stream(&mut previous.stream, StreamEnd::Settle);
                }
                self.sync_peer_timers(node);
                self.repair_credit.remove(&node);
                tracing::debug!(node = %self.cfg.node, peer = %node, %old, new = %incarnation, "member restarted");
                self.stats.members_restarted += 1;
                self.events.push_back(Event::MemberRestarted {
                    node,
                    old,
                    new: incarnation,
                    addr,
                });
            }
            None => {
                self.departed.remove(&node);
                self.join(node, peer);
            }
        }
        self.with_stream(node, |stream, out| stream.release(out));
        true
    }

    /// Drops candidates that did not pass probation within `suspect_after` of their first
    /// datagram.
    pub(super) fn expire_candidates(&mut self, now: Instant) {
        while let Some((node, first)) = self.candidates.oldest() {
            if now < first + self.cfg.suspect_after {
                break;
            }
            self.drop_candidate(node);
            self.stats.candidates_expired += 1;
        }
    }

    /// Forgets a candidate and everything its stream holds.
    pub(super) fn drop_candidate(&mut self, node: NodeId) {
        let Some(mut candidate) = self.candidates.remove(&node) else {
            return;
        };
        self.end_stream(&mut candidate.stream, StreamEnd::Discard);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::endpoint::tests::*;
    use crate::wire::{self, Header};
    use crate::*;

    #[test]
    fn a_new_sender_joins_only_after_probation_and_its_early_messages_are_held() {
        let t0 = Instant::now();
        let mut ep = Endpoint::new(config(0, 1), t0);
        let (node, h) = (NodeId(7), Header::new(CLUSTER, NodeId(7), Incarnation(1)));
        ep.handle_datagram(t0, addr(6), &heartbeat(node, Incarnation(1), 0));
        for seq in 1..=3 {
            ep.handle_datagram(
                t0,
                addr(6),
                &wire::encode_data(&h, seq, [msg(seq)].iter(), None),
            );
        }
        // Too soon for a second heartbeat to count, and other frames never do.
        let early = t0 + Duration::from_millis(50);
        ep.handle_datagram(early, addr(6), &heartbeat(node, Incarnation(1), 3));
        let t1 = t0 + Duration::from_millis(150);
        ep.handle_datagram(
            t1,
            addr(6),
            &wire::encode_data(&h, 4, [msg(4)].iter(), None),
        );
        assert!(ep.poll_event().is_none(), "a candidate emits nothing");
        assert!(ep.members().is_empty());
        assert_eq!(ep.candidates(), 1);
        let later = t0 + Duration::from_millis(160);
        ep.handle_datagram(later, addr(6), &heartbeat(node, Incarnation(1), 4));
        let events: Vec<Event> = std::iter::from_fn(|| ep.poll_event()).collect();
        assert!(matches!(
            events[0],
            Event::MemberJoined {
                node: NodeId(7),
                ..
            }
        ));
        let seqs: Vec<u64> = events[1..]
            .iter()
            .map(|e| match e {
                Event::Delivered { seq, payload, .. } => {
                    assert_eq!(payload, &msg(*seq));
                    *seq
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        assert_eq!((ep.candidates(), ep.members().len()), (0, 1));
        assert_eq!(ep.receive_memory(), SENDER_OVERHEAD);
        // One-shot senders never join, and are forgotten after `suspect_after`.
        for i in 0..100 {
            ep.handle_datagram(
                later,
                addr(5),
                &heartbeat(NodeId(100 + i), Incarnation(1), 0),
            );
        }
        assert_eq!((ep.candidates(), ep.members().len()), (100, 1));
        ep.handle_timeout(later + ep.config().suspect_after);
        assert_eq!(ep.candidates(), 0);
        assert_eq!(ep.stats().candidates_expired, 100);
        assert!(
            std::iter::from_fn(|| ep.poll_event())
                .all(|e| matches!(e, Event::MemberSuspected { .. }))
        );
    }
}
