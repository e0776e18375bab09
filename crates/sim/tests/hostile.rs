//! A hostile sender floods four honest endpoints on lossy links with 10 000 datagrams per
//! virtual second for two seconds: fragments declaring 1 MiB messages and heartbeats from
//! fresh node ids, NAKs of `[1, u64::MAX]` from fresh ids and from one id that keeps itself a
//! member, and junk. Meanwhile the honest nodes, members of each other before the flood
//! starts, send to each other. Invariants, checked after
//! every input the simulator hands a node (receive memory) and at the end (delivery):
//!
//! - every honest node delivers every honest stream completely, in order, exactly once, with
//!   no `Lost`;
//! - no fresh id ever becomes a member (only the one that heartbeats like a member does);
//! - every honest node's receive memory stays within its budget, its probation table within
//!   its bound.
//!
//! `CHORUS_SIM_SEED` pins the seed; `PROPTEST_CASES` sets the number of seeds.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_protocol::proto::{self, frame::Kind};
use chorus_protocol::wire::{self, Header};
use chorus_protocol::{Destination, Endpoint, Event, Incarnation, NodeId, Transmit};
use chorus_sim::{LinkConfig, Machine, Sim, SimConfig, Spawn, forge};
use common::{Preset, node_id, pick_seed, proptest_config, replay_hint};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const HONEST: usize = 4;
const HOSTILE: usize = HONEST;
const MESSAGES: usize = 100;
/// The hostile node's member-like id (fresh ids count up from `FRESH`).
const SQUATTER: NodeId = NodeId(0xBAD);
const FRESH: u64 = 1 << 40;
/// Honest membership forms first (messages sent to a node still on probation are not
/// retained for it, see docs/protocol.md).
const FORM: Duration = Duration::from_secs(1);
const FLOOD_FROM: Duration = Duration::from_millis(900);
const FLOOD_FOR: Duration = Duration::from_secs(2);
/// Datagrams per millisecond of the flood (10 000 per second).
const PER_MS: usize = 10;

/// A node of the simulation: a real endpoint, or the flooder.
enum Peer {
    Honest(Box<Endpoint>),
    Hostile(Box<Flooder>),
}

impl Machine for Peer {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        if let Peer::Honest(ep) = self {
            ep.handle_datagram(now, from, datagram);
        }
    }
    fn handle_timeout(&mut self, now: Instant) {
        match self {
            Peer::Honest(ep) => ep.handle_timeout(now),
            Peer::Hostile(f) => f.tick(now),
        }
    }
    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        match self {
            Peer::Honest(ep) => ep.poll_transmit(now),
            Peer::Hostile(f) => f.out.pop_front(),
        }
    }
    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Peer::Honest(ep) => ep.poll_timeout(),
            Peer::Hostile(f) => (f.next < f.until).then_some(f.next),
        }
    }
}

struct Flooder {
    rng: ChaCha8Rng,
    next: Instant,
    until: Instant,
    next_fresh: u64,
    next_squatter_heartbeat: Instant,
    out: VecDeque<Transmit>,
}

impl Flooder {
    fn new(spawn: &Spawn) -> Flooder {
        Flooder {
            rng: ChaCha8Rng::seed_from_u64(spawn.seed),
            next: spawn.now + FLOOD_FROM,
            until: spawn.now + FLOOD_FROM + FLOOD_FOR,
            next_fresh: FRESH,
            next_squatter_heartbeat: spawn.now + FLOOD_FROM,
            out: VecDeque::new(),
        }
    }

    fn fresh(&mut self) -> Header {
        self.next_fresh += 1;
        header(NodeId(self.next_fresh))
    }

    fn tick(&mut self, now: Instant) {
        if now < self.next {
            return;
        }
        self.next = now + Duration::from_millis(1);
        if now >= self.next_squatter_heartbeat {
            self.next_squatter_heartbeat = now + Duration::from_millis(200);
            self.push(forge::heartbeat(&header(SQUATTER)));
        }
        for i in 0..PER_MS {
            let target = node_id(self.rng.random_range(0..HONEST));
            let datagram = match i % 5 {
                0 => {
                    let h = self.fresh();
                    let total_len = 1 << 20;
                    let offset = self.rng.random_range(0..total_len - 1200);
                    let seq = self.rng.random_range(1..10);
                    wire::encode_fragment(&h, seq, total_len, offset, &[0x5A; 1200], None)
                }
                1 => {
                    let h = self.fresh();
                    forge::heartbeat(&h)
                }
                2 => {
                    let h = self.fresh();
                    nak(h, target, 500)
                }
                3 => nak(header(SQUATTER), target, 50),
                _ => {
                    let len = self.rng.random_range(0..300);
                    let mut junk: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
                    if len > wire::HEADER_LEN && self.rng.random_bool(0.5) {
                        // A valid header in front of junk: gets past the first checks.
                        let good = forge::heartbeat(&self.fresh());
                        junk[..wire::HEADER_LEN].copy_from_slice(&good[..wire::HEADER_LEN]);
                    }
                    Bytes::from(junk)
                }
            };
            self.push(datagram);
        }
    }

    fn push(&mut self, payload: Bytes) {
        self.out.push_back(Transmit {
            destination: Destination::Group,
            payload,
        });
    }
}

fn cluster() -> chorus_protocol::ClusterId {
    Preset::Lan.config(NodeId(1), Incarnation(1), 0).cluster
}

fn header(node: NodeId) -> Header {
    Header::new(cluster(), node, Incarnation(1))
}

fn nak(h: Header, target: NodeId, ranges: usize) -> Bytes {
    let nak = proto::Nak {
        target_node: target.0,
        target_incarnation: 1,
        ranges: vec![
            proto::SeqRange {
                first: 1,
                last: u64::MAX,
            };
            ranges
        ],
        partial: vec![proto::PartialNak {
            seq: 1,
            missing: vec![proto::ByteRange {
                offset: 0,
                len: u32::MAX,
            }],
        }],
        sender_highest_sent: 0,
    };
    wire::encode(
        &h,
        &proto::Frame {
            kind: Some(Kind::Nak(nak)),
        },
    )
}

fn payload(seed: u64, node: usize, k: usize) -> Bytes {
    let len = if k % 10 == 9 { 50_000 } else { 40 + k % 200 };
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((node as u64) << 32) ^ k as u64);
    Bytes::from((0..len).map(|_| rng.random::<u8>()).collect::<Vec<u8>>())
}

/// What the observer saw.
#[derive(Default)]
struct Seen {
    /// (receiver, sender node id) → delivered (seq, payload).
    delivered: BTreeMap<(usize, NodeId), Vec<(u64, Bytes)>>,
    lost: Vec<String>,
    joined: Vec<(usize, NodeId)>,
    violations: Vec<String>,
}

fn run(seed: u64) {
    let hint = replay_hint(seed, "hostile");
    let link = LinkConfig::lan().with_loss(0.02);
    let config = SimConfig::new(seed, HONEST + 1)
        .with_link(link)
        .with_max_events(30_000_000);
    let mut sim = Sim::new(config, move |spawn: &Spawn| {
        if spawn.index == HOSTILE {
            return Peer::Hostile(Box::new(Flooder::new(spawn)));
        }
        let incarnation = Incarnation(u64::from(spawn.restarts) + 1);
        let cfg = Preset::Lan.config(node_id(spawn.index), incarnation, spawn.seed);
        Peer::Honest(Box::new(Endpoint::new(cfg, spawn.now)))
    });
    let seen = Rc::new(RefCell::new(Seen::default()));
    let observer_seen = Rc::clone(&seen);
    sim.set_observer(move |now, index, peer: &mut Peer| {
        let Peer::Honest(ep) = peer else { return };
        let mut seen = observer_seen.borrow_mut();
        let (budget, used) = (ep.config().receive_budget_bytes, ep.receive_memory());
        if used > budget && seen.violations.len() < 10 {
            seen.violations.push(format!(
                "node {index} at {now:?}: {used} B held > budget {budget} B"
            ));
        }
        if ep.candidates() > ep.config().max_candidates.get() && seen.violations.len() < 10 {
            seen.violations
                .push(format!("node {index}: {} candidates", ep.candidates()));
        }
        while let Some(event) = ep.poll_event() {
            match event {
                Event::Delivered {
                    sender,
                    seq,
                    payload,
                    ..
                } => seen
                    .delivered
                    .entry((index, sender))
                    .or_default()
                    .push((seq, payload)),
                Event::Lost { sender, range, .. } => {
                    seen.lost
                        .push(format!("node {index}: {sender} lost {range:?}"));
                }
                Event::MemberJoined { node, .. } => seen.joined.push((index, node)),
                _ => {}
            }
        }
    });
    sim.run_for(FORM);
    for k in 0..MESSAGES {
        for i in 0..HONEST {
            let p = payload(seed, i, k);
            let sent = sim.act(i, |peer, now| match peer {
                Peer::Honest(ep) => ep.send(now, p).is_ok(),
                Peer::Hostile(_) => false,
            });
            assert_eq!(sent, Some(true), "{hint}: node {i} message {k} refused");
        }
        sim.run_for(Duration::from_millis(30));
    }
    sim.run_for(Duration::from_secs(5));
    assert!(!sim.budget_exhausted(), "{hint}: event budget exhausted");

    let seen = seen.borrow();
    assert!(seen.violations.is_empty(), "{hint}: {:?}", seen.violations);
    assert!(
        seen.lost.is_empty(),
        "{hint}: {:?}",
        &seen.lost[..seen.lost.len().min(5)]
    );
    for receiver in 0..HONEST {
        for sender in (0..HONEST).filter(|s| *s != receiver) {
            let got = seen
                .delivered
                .get(&(receiver, node_id(sender)))
                .map_or(&[][..], Vec::as_slice);
            let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
            assert_eq!(
                seqs,
                (1..=MESSAGES as u64).collect::<Vec<_>>(),
                "{hint}: node {receiver} from node {sender}"
            );
            for (seq, p) in got {
                assert_eq!(p, &payload(seed, sender, *seq as usize - 1), "{hint}");
            }
        }
        let Peer::Honest(ep) = sim.node(receiver).machine().expect("up") else {
            unreachable!("honest index");
        };
        let members: Vec<NodeId> = ep.members().iter().map(|m| m.node).collect();
        let honest: Vec<NodeId> = (0..HONEST)
            .filter(|s| *s != receiver)
            .map(node_id)
            .collect();
        assert!(
            honest.iter().all(|n| members.contains(n)),
            "{hint}: node {receiver} members {members:?}"
        );
        assert!(
            members.iter().all(|n| honest.contains(n) || *n == SQUATTER),
            "{hint}: node {receiver} took a fresh id as a member: {members:?}"
        );
        let st = ep.stats();
        assert!(
            st.candidates_evicted + st.candidates_expired > 0 && st.repairs_refused > 0,
            "{hint}: the flood did not reach node {receiver}: {st:?}"
        );
    }
    assert!(
        seen.joined.iter().all(|(_, n)| n.0 < FRESH),
        "{hint}: a fresh id joined"
    );
}

proptest! {
    #![proptest_config(proptest_config(2, "proptest-regressions/hostile.txt"))]

    #[test]
    fn honest_nodes_converge_while_a_hostile_sender_floods(generated in any::<u64>()) {
        run(pick_seed(generated));
    }
}
