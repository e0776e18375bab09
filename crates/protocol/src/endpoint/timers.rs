//! The timer table: every deadline of the endpoint in one ordered set, read by both
//! [`Endpoint::poll_timeout`](super::Endpoint::poll_timeout) (its first entry: O(log n)) and
//! [`Endpoint::handle_timeout`](super::Endpoint::handle_timeout) (the entries due), so that a
//! deadline set is a deadline served.
//!
//! Per-peer deadlines are set where the peer's state changes (a datagram heard, a NAK timer
//! armed, a goodbye, a removal); the endpoint-wide ones derived from the send window and the
//! probation table are refreshed at the end of every input. Readiness to *transmit* (queued
//! control datagrams, batched or rate-limited data) is not a timer: `poll_transmit` serves it,
//! and `poll_timeout` adds it to the table's first deadline.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use crate::NodeId;

/// One deadline of the endpoint.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub(crate) enum Timer {
    /// The next periodic heartbeat (none once closing).
    Heartbeat,
    /// A member's silence deadline: suspected at `last_heard + suspect_after` while alive,
    /// gone at `last_heard + leave_after` once suspected.
    Liveness(NodeId),
    /// The oldest candidate's probation runs out (`first_heard + suspect_after`).
    Probation,
    /// A member that said goodbye while data of its was missing is settled.
    Leaving(NodeId),
    /// A member's stream sends its next NAK (first attempt or retry).
    Nak(NodeId),
    /// The send window's repair hold-off ends: gathered repairs go out.
    RepairHoldoff,
    /// The oldest transmitted message leaves the send window by age.
    WindowAge,
}

impl Timer {
    /// The node of a per-peer timer.
    pub(crate) fn node(self) -> Option<NodeId> {
        match self {
            Timer::Liveness(n) | Timer::Leaving(n) | Timer::Nak(n) => Some(n),
            Timer::Heartbeat | Timer::Probation | Timer::RepairHoldoff | Timer::WindowAge => None,
        }
    }
}

/// The table: deadlines ordered by time, and indexed by timer so that one can be moved or
/// cancelled in O(log n).
#[derive(Debug, Default)]
pub(crate) struct Timers {
    by_deadline: BTreeSet<(Instant, Timer)>,
    by_timer: HashMap<Timer, Instant>,
    /// Entries [`Timers::next`] looked at (a test measure: poll_timeout must not scan).
    #[cfg(test)]
    pub(crate) looked_at: std::cell::Cell<u64>,
}

impl Timers {
    /// Sets `timer` to fire at `at`, or cancels it (`None`).
    pub(crate) fn set(&mut self, timer: Timer, at: Option<Instant>) {
        let Some(at) = at else {
            self.cancel(timer);
            return;
        };
        if let Some(old) = self.by_timer.insert(timer, at) {
            if old == at {
                return;
            }
            self.by_deadline.remove(&(old, timer));
        }
        self.by_deadline.insert((at, timer));
    }

    pub(crate) fn cancel(&mut self, timer: Timer) {
        if let Some(old) = self.by_timer.remove(&timer) {
            self.by_deadline.remove(&(old, timer));
        }
    }

    /// When `timer` fires, if it is set.
    pub(crate) fn get(&self, timer: Timer) -> Option<Instant> {
        self.by_timer.get(&timer).copied()
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        let first = self.by_deadline.first().map(|(at, _)| *at);
        #[cfg(test)]
        self.looked_at
            .set(self.looked_at.get() + u64::from(first.is_some()));
        first
    }

    /// Takes `timer` out of the table if it is due at `now`; returns whether it was.
    pub(crate) fn take_if_due(&mut self, timer: Timer, now: Instant) -> bool {
        if self.get(timer).is_some_and(|at| at <= now) {
            self.cancel(timer);
            return true;
        }
        false
    }

    /// Takes out every per-peer timer of the kind `kind` picks (e.g. `Timer::Nak`) that is due
    /// at `now`, and returns their nodes in node order. O(due entries × log n).
    pub(crate) fn take_due(&mut self, now: Instant, kind: impl Fn(NodeId) -> Timer) -> Vec<NodeId> {
        let mut nodes: Vec<NodeId> = self
            .by_deadline
            .iter()
            .take_while(|(at, _)| *at <= now)
            .filter_map(|(_, t)| t.node().filter(|n| kind(*n) == *t))
            .collect();
        for node in &nodes {
            self.cancel(kind(*node));
        }
        nodes.sort_unstable();
        nodes
    }

    /// Every entry, earliest first (for tests that check the table against the state).
    #[cfg(test)]
    pub(crate) fn entries(&self) -> impl Iterator<Item = (Instant, Timer)> + '_ {
        self.by_deadline.iter().copied()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        debug_assert_eq!(self.by_deadline.len(), self.by_timer.len());
        self.by_timer.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn set_moves_cancel_removes_and_due_timers_come_out_in_node_order() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut t = Timers::default();
        t.set(Timer::Nak(NodeId(3)), Some(t0 + ms(5)));
        t.set(Timer::Nak(NodeId(1)), Some(t0 + ms(7)));
        t.set(Timer::Liveness(NodeId(2)), Some(t0 + ms(1)));
        t.set(Timer::Heartbeat, Some(t0 + ms(9)));
        assert_eq!(t.next(), Some(t0 + ms(1)));
        t.set(Timer::Liveness(NodeId(2)), Some(t0 + ms(20)));
        assert_eq!((t.next(), t.len()), (Some(t0 + ms(5)), 4));
        assert_eq!(
            t.take_due(t0 + ms(8), Timer::Nak),
            vec![NodeId(1), NodeId(3)]
        );
        assert!(t.take_due(t0 + ms(8), Timer::Nak).is_empty());
        assert!(!t.take_if_due(Timer::Heartbeat, t0 + ms(8)));
        assert!(t.take_if_due(Timer::Heartbeat, t0 + ms(9)));
        t.set(Timer::Liveness(NodeId(2)), None);
        assert_eq!((t.next(), t.len()), (None, 0));
    }
}

/// The table against the endpoint's state, over random schedules: it holds exactly the
/// deadlines the state implies, `poll_timeout` never scans, and no deadline it returns
/// leaves `handle_timeout` with nothing to do (no busy loop).
#[cfg(test)]
mod endpoint_tests {
    use std::net::SocketAddr;
    use std::num::NonZeroU64;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::Timer;
    use crate::endpoint::{Endpoint, Lifecycle};
    use crate::proto::{self, frame::Kind};
    use crate::wire::{self, Header};
    use crate::{ClusterId, Config, Incarnation, MemberState, NodeId};

    const CLUSTER: ClusterId = ClusterId(0xC0FFEE);

    fn config(rate: bool) -> Config {
        let mut c = Config::lan(CLUSTER, NodeId(1), Incarnation(1), 7);
        c.rate_bytes_per_sec = if rate { NonZeroU64::new(200_000) } else { None };
        c
    }

    fn addr(peer: u64) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, peer as u8], 7400))
    }

    fn frame(peer: u64, incarnation: u64, kind: Kind) -> Bytes {
        let header = Header::new(CLUSTER, NodeId(peer), Incarnation(incarnation));
        wire::encode(&header, &proto::Frame { kind: Some(kind) })
    }

    fn heartbeat(peer: u64, incarnation: u64, highest_sent: u64, low: u64) -> Bytes {
        let hb = proto::Heartbeat {
            highest_sent,
            low_retained: low.clamp(1, highest_sent + 1),
            delivered: vec![proto::PeerProgress {
                node: 1,
                incarnation: 1,
                delivered_up_to: highest_sent / 2,
            }],
            wall_ms: 0,
            name: Default::default(),
        };
        frame(peer, incarnation, Kind::Heartbeat(hb))
    }

    /// What `poll_timeout` answered before the timer table: a scan of every peer and
    /// candidate (the heartbeat and goodbye deadlines, which live only in the table, are read
    /// from it).
    fn scan(ep: &Endpoint) -> Option<Instant> {
        if ep.lifecycle == Lifecycle::Closed {
            return None;
        }
        let mut earliest = ep.transmit_deadline();
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                earliest = Some(earliest.map_or(t, |e: Instant| e.min(t)));
            }
        };
        consider(ep.timers.get(Timer::Heartbeat));
        consider(ep.window.repair_deadline);
        consider(ep.window.age_deadline(ep.cfg.window_max_age));
        for peer in ep.peers.values() {
            let silence = match peer.state {
                MemberState::Alive => ep.cfg.suspect_after,
                MemberState::Suspected => ep.cfg.leave_after,
            };
            consider(Some(peer.last_heard + silence));
            consider(peer.stream.nak.map(|n| n.at));
        }
        consider(
            ep.candidates
                .oldest()
                .map(|(_, first)| first + ep.cfg.suspect_after),
        );
        for (at, timer) in ep.timers.entries() {
            if let Timer::Leaving(_) = timer {
                consider(Some(at));
            }
        }
        earliest
    }

    /// Every table entry matches the state, and every deadline of the state is in the table.
    fn assert_table_matches(ep: &Endpoint) {
        for (at, timer) in ep.timers.entries() {
            match timer {
                Timer::Liveness(node) => {
                    let peer = &ep.peers[&node];
                    let silence = match peer.state {
                        MemberState::Alive => ep.cfg.suspect_after,
                        MemberState::Suspected => ep.cfg.leave_after,
                    };
                    assert_eq!(at, peer.last_heard + silence, "{timer:?}");
                }
                Timer::Nak(node) => assert_eq!(Some(at), ep.peers[&node].stream.nak.map(|n| n.at)),
                Timer::Leaving(node) => assert!(ep.peers.contains_key(&node), "{timer:?}"),
                Timer::Heartbeat => assert_eq!(ep.lifecycle, Lifecycle::Open),
                Timer::Probation | Timer::RepairHoldoff | Timer::WindowAge => {}
            }
        }
        for (node, peer) in &ep.peers {
            assert!(ep.timers.get(Timer::Liveness(*node)).is_some());
            assert_eq!(
                ep.timers.get(Timer::Nak(*node)),
                peer.stream.nak.map(|n| n.at)
            );
        }
        assert_eq!(
            ep.timers.get(Timer::RepairHoldoff),
            ep.window.repair_deadline
        );
        assert_eq!(
            ep.timers.get(Timer::WindowAge),
            ep.window.age_deadline(ep.cfg.window_max_age)
        );
        assert_eq!(ep.poll_timeout(), scan(ep));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Wait(u64),
        Heartbeat {
            peer: u64,
            incarnation: u64,
            highest: u64,
            low: u64,
        },
        Data {
            peer: u64,
            incarnation: u64,
            seq: u64,
        },
        Nak {
            peer: u64,
            target: u64,
            first: u64,
            last: u64,
        },
        Goodbye {
            peer: u64,
            highest: u64,
        },
        Send(usize),
        Close,
    }

    fn op() -> impl Strategy<Value = Op> {
        let peer = 2..6u64;
        prop_oneof![
            6 => (1..400u64).prop_map(Op::Wait),
            4 => (peer.clone(), 1..3u64, 0..30u64, 0..30u64).prop_map(
                |(peer, incarnation, highest, low)| Op::Heartbeat { peer, incarnation, highest, low }
            ),
            5 => (peer.clone(), 1..3u64, 1..30u64)
                .prop_map(|(peer, incarnation, seq)| Op::Data { peer, incarnation, seq }),
            2 => (peer.clone(), 1..6u64, 1..30u64, 0..10u64).prop_map(
                |(peer, target, first, len)| Op::Nak { peer, target, first, last: first + len }
            ),
            1 => (peer, 0..30u64).prop_map(|(peer, highest)| Op::Goodbye { peer, highest }),
            3 => (1..4_000usize).prop_map(Op::Send),
            1 => Just(Op::Close),
        ]
    }

    fn drain(ep: &mut Endpoint, now: Instant) {
        while ep.poll_transmit(now).is_some() {}
        while ep.poll_event().is_some() {}
    }

    /// Runs every timer due at `now`; each `handle_timeout` must leave the next deadline in
    /// the future (or none).
    fn serve_timers(ep: &mut Endpoint, now: Instant) {
        if ep.poll_timeout().is_some_and(|t| t <= now) {
            ep.handle_timeout(now);
            drain(ep, now);
            assert_table_matches(ep);
            let next = ep.poll_timeout();
            assert!(
                next.is_none_or(|t| t > now),
                "busy loop: deadline {:?} not after now after handle_timeout",
                next.map(|t| now - t)
            );
        }
    }

    fn run(ops: &[Op], rate: bool) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut ep = Endpoint::new(config(rate), t0);
        drain(&mut ep, now);
        for op in ops {
            match *op {
                Op::Wait(ms) => {
                    // Wake at every deadline on the way, as a driver would.
                    let end = now + Duration::from_millis(ms);
                    while let Some(t) = ep.poll_timeout().filter(|t| *t <= end) {
                        now = now.max(t);
                        serve_timers(&mut ep, now);
                    }
                    now = end;
                }
                Op::Heartbeat {
                    peer,
                    incarnation,
                    highest,
                    low,
                } => {
                    ep.handle_datagram(
                        now,
                        addr(peer),
                        &heartbeat(peer, incarnation, highest, low),
                    );
                }
                Op::Data {
                    peer,
                    incarnation,
                    seq,
                } => {
                    let header = Header::new(CLUSTER, NodeId(peer), Incarnation(incarnation));
                    let payload = Bytes::from(vec![seq as u8; 10]);
                    let d = wire::encode_data(&header, seq, [payload].iter(), None);
                    ep.handle_datagram(now, addr(peer), &d);
                }
                Op::Nak {
                    peer,
                    target,
                    first,
                    last,
                } => {
                    let nak = proto::Nak {
                        target_node: target,
                        target_incarnation: 1,
                        ranges: vec![proto::SeqRange { first, last }],
                        partial: vec![],
                        sender_highest_sent: 3,
                    };
                    ep.handle_datagram(now, addr(peer), &frame(peer, 1, Kind::Nak(nak)));
                }
                Op::Goodbye { peer, highest } => {
                    let bye = Kind::Goodbye(proto::Goodbye {
                        highest_sent: highest,
                    });
                    ep.handle_datagram(now, addr(peer), &frame(peer, 1, bye));
                }
                Op::Send(len) => {
                    let _ = ep.send(now, Bytes::from(vec![1u8; len]));
                }
                Op::Close => ep.close(now),
            }
            drain(&mut ep, now);
            assert_table_matches(&ep);
            serve_timers(&mut ep, now);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn the_timer_table_serves_every_deadline_without_busy_loops(
            ops in proptest::collection::vec(op(), 1..120),
            rate in any::<bool>(),
        ) {
            run(&ops, rate);
        }
    }

    #[test]
    fn poll_timeout_reads_one_entry_with_256_members() {
        let t0 = Instant::now();
        let mut ep = Endpoint::new(config(false), t0);
        let later = t0 + Duration::from_millis(150);
        for at in [t0, later] {
            for peer in 0..256u64 {
                let node = 1_000 + peer;
                ep.handle_datagram(at, addr(peer), &heartbeat(node, 1, 0, 1));
            }
        }
        assert_eq!(ep.members().len(), 256);
        assert!(ep.timers.len() >= 256, "one liveness timer per member");
        assert_table_matches(&ep);
        ep.timers.looked_at.set(0);
        for _ in 0..1_000 {
            assert!(ep.poll_timeout().is_some());
        }
        assert_eq!(ep.timers.looked_at.get(), 1_000, "poll_timeout scanned");
    }
}
