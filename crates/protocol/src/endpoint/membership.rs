//! Members: the peers that passed probation, their liveness (alive, suspected, gone), the
//! departed ones remembered for a while, and how a member's stream ends.

use std::net::SocketAddr;
use std::time::Instant;

use crate::recv::{Out, RecvStream, SENDER_OVERHEAD, Standing};
use crate::{Event, Incarnation, LeaveReason, Member, MemberState, NodeId, NodeName};

use super::Endpoint;
use super::receive::InLine;
use super::timers::Timer;

#[derive(Debug)]
pub(super) struct Peer {
    pub(super) incarnation: Incarnation,
    pub(super) addr: SocketAddr,
    /// The name of its latest heartbeat that carried a valid one.
    pub(super) name: Option<NodeName>,
    pub(super) state: MemberState,
    pub(super) last_heard: Instant,
    /// What this peer has delivered of our current stream (from its heartbeats, or our
    /// highest sent when we first heard of it: it starts from what it sees next).
    pub(super) acked: u64,
    /// Its wall clock minus ours, from its latest heartbeat that carried wall time.
    pub(super) clock_offset_ms: Option<i64>,
    pub(super) stream: RecvStream,
}

impl Peer {
    pub(super) fn new(
        node: NodeId,
        incarnation: Incarnation,
        addr: SocketAddr,
        now: Instant,
        acked: u64,
    ) -> Peer {
        Peer {
            incarnation,
            addr,
            name: None,
            state: MemberState::Alive,
            last_heard: now,
            acked,
            clock_offset_ms: None,
            stream: RecvStream::new(node, incarnation),
        }
    }
}

/// How [`Endpoint::end_stream`] ends a stream.
#[derive(Debug, Clone, Copy)]
pub(super) enum StreamEnd {
    /// A member's stream: deliver what is complete, report the rest lost.
    Settle,
    /// A candidate's stream: nothing of it was delivered, so nothing is reported.
    Discard,
}

#[derive(Debug)]
pub(super) struct Departed {
    pub(super) incarnation: Incarnation,
    pub(super) reason: LeaveReason,
    /// Next sequence number its stream expected when it left (if the stream had started).
    pub(super) resume: Option<u64>,
    pub(super) left_at: Instant,
    /// Its name when it left: a member back from a timeout shows it before its next heartbeat.
    pub(super) name: Option<NodeName>,
}

impl Endpoint {
    /// The known peers (never this endpoint itself), sorted by node id.
    pub fn members(&self) -> Vec<Member> {
        let mut members: Vec<Member> = self
            .peers
            .iter()
            .map(|(node, p)| Member {
                node: *node,
                incarnation: p.incarnation,
                addr: p.addr,
                name: p.name.clone(),
                state: p.state,
                delivered_up_to: p.stream.delivered_up_to(),
                clock_offset_ms: p.clock_offset_ms,
            })
            .collect();
        members.sort_by_key(|m| m.node);
        members
    }

    /// The member `node`, if it is one (O(1); [`Endpoint::members`] lists them all).
    pub fn member(&self, node: NodeId) -> Option<Member> {
        let p = self.peers.get(&node)?;
        Some(Member {
            node,
            incarnation: p.incarnation,
            addr: p.addr,
            name: p.name.clone(),
            state: p.state,
            delivered_up_to: p.stream.delivered_up_to(),
            clock_offset_ms: p.clock_offset_ms,
        })
    }

    /// Departed members and replay windows remembered (for tests of their bounds).
    #[cfg(test)]
    pub(crate) fn remembered(&self) -> (usize, usize) {
        (self.departed.len(), self.replay.len())
    }

    pub(super) fn check_liveness(&mut self, now: Instant) {
        let mut gone = Vec::new();
        for node in self.timers.take_due(now, Timer::Liveness) {
            let Some(peer) = self.peers.get_mut(&node) else {
                continue;
            };
            let silent = now.saturating_duration_since(peer.last_heard);
            if silent >= self.cfg.leave_after {
                gone.push(node);
            } else if silent >= self.cfg.suspect_after && peer.state == MemberState::Alive {
                peer.state = MemberState::Suspected;
                self.stats.members_suspected += 1;
                self.events.push_back(Event::MemberSuspected {
                    node,
                    incarnation: peer.incarnation,
                });
            }
            self.sync_peer_timers(node);
        }
        for node in gone {
            self.remove_peer(node, LeaveReason::Timeout);
        }
    }

    /// Sets the liveness and NAK timers of member `node` from its state (cancels them if it
    /// is no member).
    pub(super) fn sync_peer_timers(&mut self, node: NodeId) {
        let (liveness, nak) = match self.peers.get(&node) {
            Some(peer) => {
                let silence = match peer.state {
                    MemberState::Alive => self.cfg.suspect_after,
                    MemberState::Suspected => self.cfg.leave_after,
                };
                (
                    Some(peer.last_heard + silence),
                    peer.stream.nak.map(|n| n.at),
                )
            }
            None => (None, None),
        };
        self.timers.set(Timer::Liveness(node), liveness);
        self.timers.set(Timer::Nak(node), nak);
    }

    pub(super) fn remove_peer(&mut self, node: NodeId, reason: LeaveReason) {
        self.timers.cancel(Timer::Leaving(node));
        let Some(mut peer) = self.peers.remove(&node) else {
            return;
        };
        self.sync_peer_timers(node);
        self.end_stream(&mut peer.stream, StreamEnd::Settle);
        self.repair_credit.remove(&node);
        tracing::debug!(node = %self.cfg.node, peer = %node, ?reason, "member left");
        self.stats.members_left += 1;
        self.events.push_back(Event::MemberLeft {
            node,
            incarnation: peer.incarnation,
            reason,
        });
        let resume = peer.stream.started().then_some(peer.stream.next_expected);
        if self.departed.len() >= self.cfg.max_members.get()
            && !self.departed.contains_key(&node)
            && let Some(oldest) = self
                .departed
                .iter()
                .min_by_key(|(n, d)| (d.left_at, **n))
                .map(|(n, _)| *n)
        {
            self.departed.remove(&oldest);
            self.stats.departed_forgotten += 1;
        }
        self.departed.insert(
            node,
            Departed {
                incarnation: peer.incarnation,
                reason,
                resume,
                left_at: self.now,
                name: peer.name,
            },
        );
    }

    /// A member that timed out is heard again with the same incarnation: it joins again at
    /// once, its stream resuming where it stood (`resume`).
    pub(super) fn rejoin(
        &mut self,
        node: NodeId,
        incarnation: Incarnation,
        from: SocketAddr,
        resume: Option<u64>,
    ) -> bool {
        if self.peers.len() >= self.cfg.max_members.get() {
            self.stats.members_full += 1;
            return false;
        }
        let rank = self.next_rank(Standing::Member);
        self.make_room(rank, None, InLine::Later, SENDER_OVERHEAD);
        if !self.budget.try_charge(SENDER_OVERHEAD) {
            self.stats.senders_over_budget += 1;
            return false;
        }
        let name = self.departed.remove(&node).and_then(|d| d.name);
        let mut peer = Peer::new(
            node,
            incarnation,
            from,
            self.now,
            self.window.highest_sent(),
        );
        peer.stream.rank = rank;
        peer.name = name;
        if let Some(next) = resume {
            // Continue where the stream stood, so that what was sent meanwhile is repaired or
            // reported lost.
            peer.stream.start_at(next);
        }
        self.join(node, peer);
        true
    }

    /// Makes `peer` a member: its timers, the count and `MemberJoined`.
    pub(super) fn join(&mut self, node: NodeId, peer: Peer) {
        let (incarnation, addr) = (peer.incarnation, peer.addr);
        self.peers.insert(node, peer);
        self.sync_peer_timers(node);
        tracing::debug!(node = %self.cfg.node, peer = %node, %incarnation, "member joined");
        self.stats.members_joined += 1;
        self.events.push_back(Event::MemberJoined {
            node,
            incarnation,
            addr,
        });
    }

    /// Ends a stream already taken out of the member or candidate table: settles it
    /// (delivers or reports lost what is known) or discards what it holds, and releases its
    /// share of the receive budget.
    pub(super) fn end_stream(&mut self, stream: &mut RecvStream, end: StreamEnd) {
        let mut out = Out {
            events: &mut self.events,
            stats: &mut self.stats,
            budget: &mut self.budget,
            delivered: (0, 0),
            shared: 0,
        };
        match end {
            StreamEnd::Settle => stream.finish(&mut out),
            StreamEnd::Discard => stream.discard(&mut out),
        }
        self.budget.release(SENDER_OVERHEAD);
        self.holders.remove(&stream.rank);
    }

    /// Forgets departed members and replay windows older than `forget_after` (called once
    /// per heartbeat interval).
    pub(super) fn forget(&mut self, now: Instant) {
        let keep = self.cfg.forget_after;
        let before = self.departed.len();
        self.departed.retain(|_, d| now < d.left_at + keep);
        self.stats.departed_forgotten += (before - self.departed.len()) as u64;
        let before = self.replay.len();
        let (peers, candidates) = (&self.peers, &self.candidates);
        self.replay.retain(|node, r| {
            now < r.last_heard + keep || peers.contains_key(node) || candidates.get(node).is_some()
        });
        self.stats.replay_forgotten += (before - self.replay.len()) as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::endpoint::tests::*;
    use crate::proto::{self, frame::Kind};
    use crate::wire::{self, Header};
    use crate::*;

    #[test]
    fn departed_and_replay_tables_stay_bounded_over_join_leave_cycles() {
        let k = ring(1, 0x11);
        let t0 = Instant::now();
        let mut ep = Endpoint::new(keyed(0, 1, &k), t0);
        let max_members = ep.config().max_members.get();
        let replay_capacity = 2 * max_members + ep.config().max_candidates.get();
        let mut now = t0;
        let goodbye = |node: NodeId| {
            wire::encode(
                &Header::new(CLUSTER, node, Incarnation(1)),
                &proto::Frame {
                    kind: Some(Kind::Goodbye(proto::Goodbye { highest_sent: 0 })),
                },
            )
        };
        for batch in 0..50u64 {
            let nodes: Vec<NodeId> = (0..100).map(|i| NodeId(1_000 + batch * 100 + i)).collect();
            for (counter, at) in [(1, now), (2, now + Duration::from_millis(150))] {
                for &node in &nodes {
                    let hb = seal_with(&k, &heartbeat(node, Incarnation(1), 0), counter);
                    ep.handle_datagram(at, addr(7), &hb);
                }
            }
            assert_eq!(ep.members().len(), 100);
            now += Duration::from_millis(150);
            for &node in &nodes {
                ep.handle_datagram(now, addr(7), &seal_with(&k, &goodbye(node), 3));
            }
            assert!(ep.members().is_empty());
            ep.handle_timeout(now);
            let (departed, replay) = ep.remembered();
            assert!(departed <= max_members, "{departed}");
            assert!(replay <= replay_capacity, "{replay}");
        }
        assert_eq!(ep.stats().members_joined, 5_000);
        assert_eq!(ep.stats().departed_forgotten, 5_000 - max_members as u64);
        assert_eq!(ep.stats().replay_forgotten, 5_000 - replay_capacity as u64);
        // Past `forget_after`, nothing of them is left.
        let much_later = now + ep.config().forget_after + Duration::from_secs(1);
        ep.handle_timeout(much_later);
        assert_eq!(ep.remembered(), (0, 0));
    }

    /// A heartbeat of `node` (incarnation 1) carrying `name` as raw bytes.
    fn named_heartbeat(node: NodeId, name: &[u8]) -> bytes::Bytes {
        wire::encode(
            &Header::new(CLUSTER, node, Incarnation(1)),
            &proto::Frame {
                kind: Some(Kind::Heartbeat(proto::Heartbeat {
                    highest_sent: 0,
                    low_retained: 1,
                    name: bytes::Bytes::copy_from_slice(name),
                    ..Default::default()
                })),
            },
        )
    }

    #[test]
    fn names_come_with_heartbeats_and_a_bad_one_is_a_counted_drop_of_the_field() {
        let t0 = Instant::now();
        let mut cfg = config(0, 1);
        cfg.name = Some(NodeName::new("me").unwrap());
        let mut ep = Endpoint::new(cfg, t0);
        // Our own heartbeat carries our name.
        ep.handle_timeout(t0);
        let ours = std::iter::from_fn(|| ep.poll_transmit(t0))
            .find_map(|t| match frame_of(&t.payload) {
                Kind::Heartbeat(hb) => Some(hb),
                _ => None,
            })
            .expect("a heartbeat");
        assert_eq!(&ours.name[..], b"me");

        let b = NodeId(2);
        let half = ep.config().heartbeat_interval / 2 + Duration::from_millis(1);
        ep.handle_datagram(t0, addr(1), &named_heartbeat(b, b"\xff\xfe"));
        ep.handle_datagram(t0 + half, addr(1), &named_heartbeat(b, b"bad\nname"));
        // Taken as heartbeats (it joined), the member's bad name ignored and counted (a
        // candidate's name is not looked at: it is no member yet).
        assert_eq!(ep.members().len(), 1);
        assert_eq!(ep.members()[0].name, None);
        assert_eq!(ep.stats().names_invalid, 1);
        let mut now = t0 + half;
        for (name, shown) in [
            (&b"web-1"[..], Some("web-1")),
            (&[b'x'; 65][..], Some("web-1")),
            (&b"web-2"[..], Some("web-2")),
            (&b""[..], Some("web-2")),
        ] {
            now += Duration::from_millis(10);
            ep.handle_datagram(now, addr(1), &named_heartbeat(b, name));
            assert_eq!(
                ep.member(b)
                    .and_then(|m| m.name)
                    .as_ref()
                    .map(NodeName::as_str),
                shown
            );
        }
        assert_eq!(ep.stats().names_invalid, 2);
        // A member back from a timeout shows its name before its next heartbeat.
        now += ep.config().leave_after + Duration::from_millis(1);
        ep.handle_timeout(now);
        assert!(ep.members().is_empty());
        let data = wire::encode(
            &Header::new(CLUSTER, b, Incarnation(1)),
            &proto::Frame {
                kind: Some(Kind::Data(proto::Data {
                    first_seq: 1,
                    messages: vec![bytes::Bytes::from_static(b"m")],
                })),
            },
        );
        ep.handle_datagram(now, addr(1), &data);
        assert_eq!(
            ep.member(b)
                .and_then(|m| m.name)
                .as_ref()
                .map(NodeName::as_str),
            Some("web-2")
        );
    }

    #[test]
    fn the_source_of_our_own_looped_back_datagrams_is_our_address() {
        let t0 = Instant::now();
        let mut ep = Endpoint::new(config(0, 1), t0);
        assert_eq!(ep.own_addr(), None);
        ep.handle_timeout(t0);
        let hb = std::iter::from_fn(|| ep.poll_transmit(t0))
            .next()
            .expect("a heartbeat");
        ep.handle_datagram(t0, addr(0), &hb.payload);
        assert_eq!(ep.own_addr(), Some(addr(0)));
    }

    #[test]
    fn a_restart_cancels_the_old_incarnations_pending_goodbye() {
        let t0 = Instant::now();
        // A wait for a leaving member's last data longer than probation (a valid config, as
        // with slow links), so the restart is admitted while the old goodbye is pending.
        let mut cfg = config(0, 1);
        cfg.nak_delay_max = cfg.heartbeat_interval * 2;
        let mut ep = Endpoint::new(cfg, t0);
        let b = NodeId(2);
        let half = ep.config().heartbeat_interval / 2 + Duration::from_millis(1);
        ep.handle_datagram(t0, addr(1), &heartbeat(b, Incarnation(1), 0));
        ep.handle_datagram(t0 + half, addr(1), &heartbeat(b, Incarnation(1), 0));
        assert_eq!(ep.members().len(), 1);
        // It says goodbye with data still missing here: the endpoint waits a little for it.
        let mut now = t0 + half;
        let goodbye = wire::encode(
            &Header::new(CLUSTER, b, Incarnation(1)),
            &proto::Frame {
                kind: Some(Kind::Goodbye(proto::Goodbye { highest_sent: 3 })),
            },
        );
        ep.handle_datagram(now, addr(1), &goodbye);
        assert_eq!(ep.members().len(), 1, "waits for the missing data");
        // Before that wait is over, it is back with a new incarnation.
        ep.handle_datagram(now, addr(1), &heartbeat(b, Incarnation(2), 0));
        now += half;
        ep.handle_datagram(now, addr(1), &heartbeat(b, Incarnation(2), 0));
        ep.handle_timeout(now);
        assert_eq!(ep.members().len(), 1);
        assert_eq!(ep.members()[0].incarnation, Incarnation(2));
        // The old incarnation's wait ends: the new incarnation stays.
        now = t0 + half + ep.config().nak_delay_max;
        ep.handle_timeout(now);
        let members = ep.members();
        assert_eq!(members.len(), 1, "the restarted member was removed");
        assert_eq!(members[0].incarnation, Incarnation(2));
        assert_eq!(ep.stats().members_left, 0);
    }
}
