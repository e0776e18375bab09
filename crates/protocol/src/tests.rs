//! Endpoint tests over a small in-memory network with a virtual clock.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::endpoint::REPAIR_START_CREDIT;
use crate::proto::{self, frame::Kind};
use crate::wire::{self, Header};
use crate::*;

const CLUSTER: ClusterId = ClusterId(0xC0FFEE);

/// Long enough for every node to pass every other's probation: a second heartbeat, one
/// heartbeat interval (200 ms) after the first.
const JOIN: Duration = Duration::from_millis(250);

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8 + 1], 7400))
}

fn config(i: usize, incarnation: u64) -> Config {
    let mut c = Config::lan(
        CLUSTER,
        NodeId(i as u64 + 1),
        Incarnation(incarnation),
        1000 + i as u64,
    );
    c.rate_bytes_per_sec = None;
    c
}

/// A datagram on the wire: (deliver at, order, from, to, bytes).
type InFlight = (Reverse<(Instant, u64)>, usize, usize, Bytes);

/// Decides whether a datagram from `from` to `to` is delivered.
type Filter = Box<dyn FnMut(usize, usize, &Bytes) -> bool>;

struct Net {
    t0: Instant,
    now: Instant,
    latency: Duration,
    nodes: Vec<Option<Endpoint>>,
    events: Vec<Vec<Event>>,
    wire: BinaryHeap<InFlightOrd>,
    counter: u64,
    filter: Filter,
    /// Every datagram put on the wire: (from, bytes).
    sent: Vec<(usize, Bytes)>,
}

struct InFlightOrd(InFlight);

impl PartialEq for InFlightOrd {
    fn eq(&self, other: &Self) -> bool {
        self.0.0 == other.0.0
    }
}
impl Eq for InFlightOrd {}
impl PartialOrd for InFlightOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for InFlightOrd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.0.cmp(&other.0.0)
    }
}

impl Net {
    fn new(configs: Vec<Config>) -> Net {
        let t0 = Instant::now();
        let n = configs.len();
        Net {
            t0,
            now: t0,
            latency: Duration::from_micros(200),
            nodes: configs
                .into_iter()
                .map(|c| Some(Endpoint::new(c, t0)))
                .collect(),
            events: vec![Vec::new(); n],
            wire: BinaryHeap::new(),
            counter: 0,
            filter: Box::new(|_, _, _| true),
            sent: Vec::new(),
        }
    }

    fn pair() -> Net {
        Net::new(vec![config(0, 1), config(1, 1)])
    }

    fn node(&mut self, i: usize) -> &mut Endpoint {
        self.nodes[i].as_mut().expect("node is running")
    }

    fn send(&mut self, i: usize, payload: impl Into<Bytes>) -> u64 {
        let now = self.now;
        let seq = self.node(i).send(now, payload.into()).expect("send");
        self.flush();
        seq
    }

    /// Drains every node's transmits onto the wire and its events into `events`.
    fn flush(&mut self) {
        let now = self.now;
        let n = self.nodes.len();
        for i in 0..n {
            let Some(ep) = self.nodes[i].as_mut() else {
                continue;
            };
            while let Some(t) = ep.poll_transmit(now) {
                self.sent.push((i, t.payload.clone()));
                let targets: Vec<usize> = match t.destination {
                    Destination::Group => (0..n).filter(|&j| j != i).collect(),
                    Destination::Addr(a) => (0..n).filter(|&j| addr(j) == a).collect(),
                };
                for j in targets {
                    self.counter += 1;
                    let at = now + self.latency;
                    self.wire.push(InFlightOrd((
                        Reverse((at, self.counter)),
                        i,
                        j,
                        t.payload.clone(),
                    )));
                }
            }
            while let Some(e) = ep.poll_event() {
                self.events[i].push(e);
            }
        }
    }

    fn next_time(&self) -> Option<Instant> {
        let wire = self.wire.peek().map(|d| (d.0).0.0.0);
        let timers = self
            .nodes
            .iter()
            .flatten()
            .filter_map(|e| e.poll_timeout())
            .min();
        match (wire, timers) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the network for `d` of virtual time.
    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.flush();
        for _ in 0..5_000_000 {
            let Some(next) = self.next_time() else { break };
            if next > end {
                break;
            }
            self.now = self.now.max(next);
            let now = self.now;
            while self.wire.peek().is_some_and(|d| (d.0).0.0.0 <= now) {
                let Some(InFlightOrd((_, from, to, bytes))) = self.wire.pop() else {
                    break;
                };
                if !(self.filter)(from, to, &bytes) {
                    continue;
                }
                if let Some(ep) = self.nodes[to].as_mut() {
                    ep.handle_datagram(now, addr(from), &bytes);
                }
            }
            for ep in self.nodes.iter_mut().flatten() {
                if ep.poll_timeout().is_some_and(|t| t <= now) {
                    ep.handle_timeout(now);
                }
            }
            self.flush();
        }
        self.now = self.now.max(end);
        self.flush();
    }

    fn delivered(&self, i: usize, from: NodeId) -> Vec<(u64, Bytes)> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                Event::Delivered {
                    sender,
                    seq,
                    payload,
                    ..
                } if *sender == from => Some((*seq, payload.clone())),
                _ => None,
            })
            .collect()
    }

    fn lost(&self, i: usize) -> Vec<std::ops::RangeInclusive<u64>> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                Event::Lost { range, .. } => Some(range.clone()),
                _ => None,
            })
            .collect()
    }
}

fn frame_of(bytes: &Bytes) -> Kind {
    wire::decode(bytes, usize::MAX, CLUSTER)
        .expect("valid datagram")
        .1
        .kind
        .expect("kind")
}

fn is_first_data(bytes: &Bytes) -> bool {
    matches!(frame_of(bytes), Kind::Data(_) | Kind::Fragment(_))
}

/// A plain heartbeat of `node`/`incarnation` saying it sent up to `highest_sent`.
fn heartbeat(node: NodeId, incarnation: Incarnation, highest_sent: u64) -> Bytes {
    let hb = proto::Heartbeat {
        highest_sent,
        low_retained: 1,
        delivered: vec![],
        wall_ms: 0,
    };
    wire::encode(
        &Header::new(CLUSTER, node, incarnation),
        &proto::Frame {
            kind: Some(Kind::Heartbeat(hb)),
        },
    )
}

fn msg(i: u64) -> Bytes {
    Bytes::from(format!("message {i}"))
}

/// Checks that node `i` delivered `from`'s stream in order, exactly once, with the payloads
/// `msg(seq)`, covering `1..=n` together with its `Lost` ranges.
fn assert_stream(net: &Net, i: usize, from: NodeId, n: u64) {
    let got = net.delivered(i, from);
    let mut covered = BTreeMap::new();
    let mut last = 0;
    for (seq, payload) in &got {
        assert!(*seq > last, "node {i}: seq {seq} after {last}");
        last = *seq;
        assert_eq!(payload, &msg(*seq));
        covered.insert(*seq, ());
    }
    for range in net.lost(i) {
        for s in range {
            assert!(
                covered.insert(s, ()).is_none(),
                "seq {s} delivered and lost"
            );
        }
    }
    let keys: Vec<u64> = covered.keys().copied().collect();
    assert_eq!(
        keys,
        (1..=n).collect::<Vec<_>>(),
        "node {i} did not settle 1..={n}"
    );
}

#[test]
fn in_order_delivery() {
    let mut net = Net::pair();
    for i in 1..=200 {
        assert_eq!(net.send(0, msg(i)), i);
    }
    net.run_for(Duration::from_millis(500));
    assert_stream(&net, 1, NodeId(1), 200);
    assert!(net.lost(1).is_empty());
    assert_eq!(net.node(1).stats().messages_delivered, 200);
    assert_eq!(net.node(0).stats().messages_sent, 200);
}

#[test]
fn duplicates_are_dropped_and_counted() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    net.send(0, msg(1));
    net.run_for(Duration::from_millis(10));
    let data: Vec<Bytes> = net
        .sent
        .iter()
        .filter(|(f, b)| *f == 0 && is_first_data(b))
        .map(|(_, b)| b.clone())
        .collect();
    assert_eq!(data.len(), 1);
    let now = net.now;
    net.node(1).handle_datagram(now, addr(0), &data[0]);
    net.node(1).handle_datagram(now, addr(0), &data[0]);
    net.flush();
    assert_eq!(net.delivered(1, NodeId(1)).len(), 1);
    assert_eq!(net.node(1).stats().duplicates, 2);
}

#[test]
fn reordered_datagrams_are_delivered_in_order() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    // Capture five separate data datagrams without delivering them.
    net.filter = Box::new(|_, _, b| !is_first_data(b));
    for i in 1..=5 {
        net.send(0, msg(i));
        net.run_for(Duration::from_millis(1));
    }
    let data: Vec<Bytes> = net
        .sent
        .iter()
        .filter(|(f, b)| *f == 0 && is_first_data(b))
        .map(|(_, b)| b.clone())
        .collect();
    assert_eq!(data.len(), 5);
    let now = net.now;
    // Seq 1 first (so the stream starts there), then 5, 3, 4, 2.
    for k in [0, 4, 2, 3, 1] {
        net.node(1).handle_datagram(now, addr(0), &data[k]);
    }
    net.flush();
    assert_stream(&net, 1, NodeId(1), 5);
    assert_eq!(net.node(1).stats().naks_sent, 0);
}

#[test]
fn lost_data_is_repaired_after_nak() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    let mut nth = 0;
    net.filter = Box::new(move |from, _, b| {
        if from == 0 && is_first_data(b) {
            nth += 1;
            return nth != 3 && nth != 5;
        }
        true
    });
    for i in 1..=10 {
        net.send(0, msg(i));
        net.run_for(Duration::from_millis(1));
    }
    net.run_for(Duration::from_millis(300));
    assert_stream(&net, 1, NodeId(1), 10);
    assert!(net.lost(1).is_empty());
    let (a, b) = (net.node(0).stats().clone(), net.node(1).stats().clone());
    assert!(b.naks_sent >= 1, "{b:?}");
    assert!(a.naks_received >= 1 && a.repairs_sent >= 1, "{a:?}");
    assert!(b.repairs_received >= 1);
}

#[test]
fn tail_loss_is_found_by_heartbeat() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    for i in 1..=3 {
        net.send(0, msg(i));
        net.run_for(Duration::from_millis(1));
    }
    // The last message is lost: nothing after it reveals the gap except a heartbeat.
    let mut dropped = false;
    net.filter = Box::new(move |from, _, b| {
        if from == 0 && is_first_data(b) && !dropped {
            dropped = true;
            return false;
        }
        true
    });
    net.send(0, msg(4));
    net.run_for(Duration::from_millis(100));
    assert_eq!(net.delivered(1, NodeId(1)).len(), 3);
    net.run_for(Duration::from_millis(500));
    assert_stream(&net, 1, NodeId(1), 4);
    assert!(net.node(1).stats().naks_sent >= 1);
}

#[test]
fn gap_below_window_is_reported_lost() {
    let mut configs = vec![config(0, 1), config(1, 1)];
    configs[0].window_max_age = Duration::from_millis(50);
    let mut net = Net::new(configs);
    net.run_for(JOIN);
    net.send(0, msg(1));
    net.run_for(Duration::from_millis(5));
    // Seq 2 and 3 never reach node 1, and neither do repairs.
    net.filter = Box::new(|from, _, b| {
        !(from == 0
            && matches!(
                frame_of(b),
                Kind::Data(proto::Data {
                    first_seq: 2..=3,
                    ..
                }) | Kind::Repair(_)
            ))
    });
    net.send(0, msg(2));
    net.run_for(Duration::from_millis(1));
    net.send(0, msg(3));
    net.run_for(Duration::from_millis(1));
    net.send(0, msg(4));
    net.run_for(Duration::from_millis(1000));
    assert_eq!(net.lost(1), vec![2..=3]);
    assert_stream(&net, 1, NodeId(1), 4);
    assert_eq!(net.node(1).stats().lost_messages, 2);
    assert!(net.node(0).stats().window_trimmed_age >= 2);
    // Later messages flow normally.
    net.send(0, msg(5));
    net.run_for(Duration::from_millis(50));
    assert_stream(&net, 1, NodeId(1), 5);
}

#[test]
fn one_mebibyte_is_fragmented_and_reassembled_under_loss() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let big: Vec<u8> = (0..(1 << 20)).map(|_| rng.random()).collect();
    let mut loss = ChaCha8Rng::seed_from_u64(8);
    net.filter = Box::new(move |_, _, _| loss.random_bool(0.9));
    net.send(0, big.clone());
    net.send(0, msg(2));
    net.run_for(Duration::from_secs(3));
    let got = net.delivered(1, NodeId(1));
    assert_eq!(
        got.len(),
        2,
        "lost: {:?} stats {:?}",
        net.lost(1),
        net.node(1).stats()
    );
    assert_eq!(got[0].1.as_ref(), big.as_slice());
    let st = net.node(0).stats().clone();
    assert!(st.fragments_sent > 700, "{st:?}");
    assert_eq!(net.node(1).stats().messages_reassembled, 1);
    assert!(net.sent.iter().all(|(_, b)| b.len() <= 1400));
}

#[test]
fn small_messages_are_batched() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    let now = net.now;
    for i in 1..=300 {
        net.node(0).send(now, msg(i)).unwrap();
    }
    // Within the batch delay nothing goes out unless a datagram is full.
    let before = net.node(0).stats().data_datagrams_sent;
    net.flush();
    let full = net.node(0).stats().data_datagrams_sent - before;
    net.run_for(Duration::from_millis(50));
    let st = net.node(0).stats().clone();
    assert!(full >= 1, "full batches leave at once");
    assert!(st.data_datagrams_sent - before <= 4, "{st:?}");
    assert!(st.batches_sent >= 3);
    assert_stream(&net, 1, NodeId(1), 300);
}

#[test]
fn full_window_pushes_back_until_stable() {
    let mut configs = vec![config(0, 1), config(1, 1)];
    configs[0].window_max_messages = NonZeroUsize::new(8).unwrap();
    let mut net = Net::new(configs);
    net.run_for(JOIN);
    let now = net.now;
    for i in 1..=8 {
        assert_eq!(net.node(0).send(now, msg(i)), Ok(i));
    }
    assert_eq!(net.node(0).send(now, msg(9)), Err(SendError::WindowFull));
    assert!(!net.node(0).is_writable());
    // The receiver's heartbeat reports stability and frees the window.
    net.run_for(Duration::from_millis(400));
    assert!(net.events[0].contains(&Event::Writable));
    assert!(net.node(0).is_writable());
    assert_eq!(net.node(0).stats().window_full, 1);
    assert_eq!(net.node(0).stats().window_trimmed_stable, 8);
    let now = net.now;
    assert_eq!(net.node(0).send(now, msg(9)), Ok(9));
    assert_eq!(
        net.node(0).send(now, Bytes::from(vec![0; 2 << 20])),
        Err(SendError::TooLarge {
            size: 2 << 20,
            max: (1 << 20) + (64 << 10)
        })
    );
}

#[test]
fn rate_limit_paces_data() {
    let mut configs = vec![config(0, 1), config(1, 1)];
    configs[0].rate_bytes_per_sec = NonZeroU64::new(100_000);
    configs[0].rate_burst_bytes = NonZeroU64::new(10_000).unwrap();
    let mut net = Net::new(configs);
    let now = net.now;
    net.node(0)
        .send(now, Bytes::from(vec![1u8; 500_000]))
        .unwrap();
    net.run_for(Duration::from_secs(1));
    // Out of tokens: nothing to send now, and the timeout says when tokens return.
    let now = net.now;
    assert!(net.node(0).poll_transmit(now).is_none());
    let wake = net.node(0).poll_timeout().unwrap();
    assert!(
        wake > now && wake <= now + Duration::from_millis(20),
        "{:?}",
        wake - now
    );
    net.run_for(Duration::from_secs(3));
    assert!(
        net.delivered(1, NodeId(1)).is_empty(),
        "500 kB at 100 kB/s takes ~5 s"
    );
    assert!(net.node(0).stats().rate_limited > 0);
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.delivered(1, NodeId(1)).len(), 1);
}

#[test]
fn naks_for_a_shared_gap_are_suppressed() {
    let mut net = Net::new(vec![config(0, 1), config(1, 1), config(2, 1)]);
    net.run_for(JOIN);
    net.send(0, msg(1));
    net.run_for(Duration::from_millis(1));
    net.filter = Box::new(|from, _, b| {
        !(from == 0 && matches!(frame_of(b), Kind::Data(proto::Data { first_seq: 2, .. })))
    });
    net.send(0, msg(2));
    net.run_for(Duration::from_millis(1));
    net.send(0, msg(3));
    net.run_for(Duration::from_millis(300));
    for i in [1, 2] {
        assert_stream(&net, i, NodeId(1), 3);
    }
    let naks = net.node(1).stats().naks_sent + net.node(2).stats().naks_sent;
    let suppressed = net.node(1).stats().naks_suppressed + net.node(2).stats().naks_suppressed;
    assert_eq!((naks, suppressed), (1, 1));
    assert_eq!(net.node(0).stats().repairs_sent, 1);
}

#[test]
fn membership_join_suspect_alive_leave() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    assert!(matches!(
        net.events[0][0],
        Event::MemberJoined {
            node: NodeId(2),
            incarnation: Incarnation(1),
            ..
        }
    ));
    assert_eq!(net.node(0).members().len(), 1);
    // Node 1 goes silent towards node 0.
    net.filter = Box::new(|from, _, _| from != 1);
    net.run_for(Duration::from_secs(2));
    assert!(net.events[0].contains(&Event::MemberSuspected {
        node: NodeId(2),
        incarnation: Incarnation(1)
    }));
    assert_eq!(net.node(0).members()[0].state, MemberState::Suspected);
    net.filter = Box::new(|_, _, _| true);
    net.run_for(Duration::from_millis(300));
    assert!(net.events[0].contains(&Event::MemberAlive {
        node: NodeId(2),
        incarnation: Incarnation(1)
    }));
    net.filter = Box::new(|from, _, _| from != 1);
    net.run_for(Duration::from_secs(6));
    assert!(net.events[0].contains(&Event::MemberLeft {
        node: NodeId(2),
        incarnation: Incarnation(1),
        reason: LeaveReason::Timeout
    }));
    assert!(net.node(0).members().is_empty());
    // It comes back (same incarnation, partition healed): joined again.
    net.filter = Box::new(|_, _, _| true);
    net.run_for(Duration::from_millis(300));
    let joins = net.events[0]
        .iter()
        .filter(|e| matches!(e, Event::MemberJoined { .. }))
        .count();
    assert_eq!(joins, 2);
}

#[test]
fn restart_and_goodbye() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    net.send(1, msg(1));
    net.run_for(Duration::from_millis(10));
    // Node 1 crashes and restarts with a new incarnation.
    let now = net.now;
    net.nodes[1] = Some(Endpoint::new(config(1, 2), now));
    net.run_for(JOIN);
    assert!(net.events[0].iter().any(|e| matches!(
        e,
        Event::MemberRestarted {
            node: NodeId(2),
            old: Incarnation(1),
            new: Incarnation(2),
            ..
        }
    )));
    net.send(1, msg(1));
    net.run_for(Duration::from_millis(10));
    let delivered: Vec<Incarnation> = net.events[0]
        .iter()
        .filter_map(|e| match e {
            Event::Delivered { incarnation, .. } => Some(*incarnation),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![Incarnation(1), Incarnation(2)]);
    // Graceful close: the last message is flushed, then the goodbye.
    let now = net.now;
    net.node(1).send(now, msg(2)).unwrap();
    net.node(1).close(now);
    assert_eq!(net.node(1).send(now, msg(3)), Err(SendError::Closed));
    net.run_for(Duration::from_millis(10));
    assert_eq!(net.delivered(0, NodeId(2)).len(), 3);
    assert!(net.events[0].contains(&Event::MemberLeft {
        node: NodeId(2),
        incarnation: Incarnation(2),
        reason: LeaveReason::Goodbye
    }));
    assert_eq!(net.node(1).stats().goodbyes_sent, 1);
    assert_eq!(net.node(1).poll_timeout(), None);
    assert!(net.node(0).members().is_empty());
}

#[test]
fn every_drop_reason_is_counted() {
    let t0 = Instant::now();
    let mut ep = Endpoint::new(config(0, 1), t0);
    let from = addr(1);
    let h = Header::new(CLUSTER, NodeId(2), Incarnation(1));
    let good = wire::encode_data(&h, 1, [msg(1)].iter(), None);
    let mutate = |at: usize, v: u8| {
        let mut m = good.to_vec();
        m[at] = v;
        m
    };
    let mut expect = Stats::default();
    let feed = |ep: &mut Endpoint, bytes: &[u8]| ep.handle_datagram(t0, from, bytes);

    feed(&mut ep, &good[..20]);
    expect.truncated += 1;
    feed(&mut ep, &vec![0u8; 70_000]);
    expect.oversized += 1;
    feed(&mut ep, &mutate(0, b'Z'));
    expect.bad_magic += 1;
    feed(&mut ep, &mutate(4, 9));
    expect.wrong_version += 1;
    feed(&mut ep, &mutate(wire::HEADER_LEN, 0));
    expect.bad_checksum += 1;
    feed(
        &mut ep,
        &wire::encode_data(
            &Header::new(ClusterId(1), NodeId(2), Incarnation(1)),
            1,
            [msg(1)].iter(),
            None,
        ),
    );
    expect.wrong_cluster += 1;
    // Sealed, but this endpoint has no key.
    feed(&mut ep, &seal_with(&ring(1, 1), &good, 1));
    expect.unauthenticated += 1;
    let empty = proto::Frame {
        kind: Some(Kind::Data(proto::Data {
            first_seq: 1,
            messages: vec![],
        })),
    };
    feed(&mut ep, &wire::encode(&h, &empty));
    expect.malformed += 1;
    feed(&mut ep, &wire::encode(&h, &proto::Frame { kind: None }));
    expect.unknown_frame += 1;
    feed(
        &mut ep,
        &wire::encode_data(
            &Header::new(CLUSTER, NodeId(1), Incarnation(1)),
            1,
            [msg(1)].iter(),
            None,
        ),
    );
    expect.own_datagrams += 1;
    feed(
        &mut ep,
        &wire::encode_data(
            &Header::new(CLUSTER, NodeId(1), Incarnation(5)),
            1,
            [msg(1)].iter(),
            None,
        ),
    );
    expect.node_id_conflict += 1;
    let huge = wire::encode_fragment(&h, 1, u32::MAX, 0, b"x", None);
    feed(&mut ep, &huge);
    expect.oversized += 1;
    let bad_fragment = wire::encode_fragment(&h, 1, 10, 8, b"xyz", None);
    feed(&mut ep, &bad_fragment);
    expect.malformed += 1;
    // Valid: node 2 incarnation 3 joins; then incarnation 1 is stale.
    feed(
        &mut ep,
        &wire::encode_data(
            &Header::new(CLUSTER, NodeId(2), Incarnation(3)),
            1,
            [msg(1)].iter(),
            None,
        ),
    );
    feed(&mut ep, &good);
    expect.stale_incarnation += 1;
    let st = ep.stats();
    assert_eq!(
        (
            st.truncated,
            st.oversized,
            st.bad_magic,
            st.wrong_version,
            st.bad_checksum,
            st.wrong_cluster
        ),
        (
            expect.truncated,
            expect.oversized,
            expect.bad_magic,
            expect.wrong_version,
            expect.bad_checksum,
            expect.wrong_cluster
        )
    );
    assert_eq!(
        (
            st.unauthenticated,
            st.malformed,
            st.unknown_frame,
            st.own_datagrams,
            st.node_id_conflict,
            st.stale_incarnation
        ),
        (
            expect.unauthenticated,
            expect.malformed,
            expect.unknown_frame,
            expect.own_datagrams,
            expect.node_id_conflict,
            expect.stale_incarnation
        )
    );
    assert_eq!(st.drops(), 14);
    // Incarnation 3 is on probation: its message is held until it sends two heartbeats half
    // a heartbeat interval apart.
    assert_eq!(st.messages_delivered, 0);
    ep.handle_datagram(t0, from, &heartbeat(NodeId(2), Incarnation(3), 1));
    let later = t0 + Duration::from_millis(150);
    ep.handle_datagram(later, from, &heartbeat(NodeId(2), Incarnation(3), 1));
    assert_eq!(ep.stats().messages_delivered, 1);
    ep.close(t0);
    while ep.poll_transmit(t0).is_some() {}
    ep.handle_datagram(t0, from, &good);
    assert_eq!(ep.stats().after_close, 1);
}

#[test]
fn garbage_never_panics() {
    let t0 = Instant::now();
    let mut ep = Endpoint::new(config(0, 1), t0);
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let h = Header::new(CLUSTER, NodeId(2), Incarnation(1));
    let good = wire::encode_data(&h, 1, [msg(1), msg(2)].iter(), None);
    for _ in 0..20_000 {
        let mut d = good.to_vec();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..d.len());
            d[at] = rng.random();
        }
        d.truncate(rng.random_range(0..=d.len()));
        ep.handle_datagram(t0, addr(1), &d);
        // Re-seal the mutated body with a valid header and CRC so it reaches the decoder.
        if d.len() > wire::OVERHEAD {
            let mut w = wire::encode(&h, &proto::Frame { kind: None }).to_vec();
            w.truncate(wire::HEADER_LEN);
            w.extend_from_slice(&d[wire::HEADER_LEN..d.len() - wire::CRC_LEN]);
            let body = (w.len() - wire::HEADER_LEN) as u32;
            w[12..16].copy_from_slice(&body.to_be_bytes());
            let crc = crc32fast::hash(&w);
            w.extend_from_slice(&crc.to_be_bytes());
            ep.handle_datagram(t0, addr(1), &w);
        }
    }
    ep.handle_timeout(t0 + Duration::from_secs(1));
    while ep.poll_transmit(t0 + Duration::from_secs(1)).is_some() {}
    assert!(ep.stats().drops() > 10_000);
}

#[test]
fn random_loss_three_nodes_settles_every_stream() {
    for seed in 0..3u64 {
        let mut net = Net::new((0..3).map(|i| config(i, 1)).collect());
        net.run_for(JOIN);
        let mut loss = ChaCha8Rng::seed_from_u64(seed);
        net.filter = Box::new(move |_, _, _| loss.random_bool(0.8));
        for round in 1..=300u64 {
            for i in 0..3 {
                net.send(i, msg(round));
            }
            net.run_for(Duration::from_millis(1));
        }
        net.run_for(Duration::from_secs(3));
        for i in 0..3 {
            for j in 0..3 {
                if i != j {
                    assert_stream(&net, i, NodeId(j as u64 + 1), 300);
                }
            }
        }
        let lost: usize = (0..3).map(|i| net.lost(i).len()).sum();
        assert_eq!(
            lost, 0,
            "seed {seed}: window is large, nothing should be lost"
        );
    }
}

#[test]
fn same_seed_same_run() {
    let run = || {
        let mut net = Net::new((0..3).map(|i| config(i, 1)).collect());
        let mut loss = ChaCha8Rng::seed_from_u64(5);
        net.filter = Box::new(move |_, _, _| loss.random_bool(0.7));
        for round in 1..=50u64 {
            net.send(0, msg(round));
            net.run_for(Duration::from_millis(2));
        }
        net.run_for(Duration::from_secs(1));
        let t0 = net.t0;
        (
            net.sent
                .iter()
                .map(|(f, b)| (*f, b.clone()))
                .collect::<Vec<_>>(),
            net.now - t0,
        )
    };
    assert_eq!(run(), run());
}

#[test]
fn member_back_from_timeout_resumes_its_stream() {
    let mut net = Net::new(vec![config(0, 1), config(1, 1), config(2, 1)]);
    net.run_for(JOIN);
    for i in 1..=3 {
        net.send(0, msg(i));
        net.run_for(Duration::from_millis(5));
    }
    // Node 2 is cut off long enough for everyone to time it out, while node 0 sends more.
    net.filter = Box::new(|from, to, _| from != 2 && to != 2);
    for i in 4..=10 {
        net.send(0, msg(i));
        net.run_for(Duration::from_millis(5));
    }
    net.run_for(Duration::from_secs(6));
    assert!(net.events[2].iter().any(|e| matches!(
        e,
        Event::MemberLeft {
            reason: LeaveReason::Timeout,
            ..
        }
    )));
    net.filter = Box::new(|_, _, _| true);
    net.run_for(Duration::from_secs(1));
    // 4..=10 were released by node 0 once it dropped node 2, so node 2 learns they are lost;
    // either way nothing is skipped silently.
    assert_stream(&net, 2, NodeId(1), 10);
    assert_eq!(net.lost(2), vec![4..=10]);
}

#[test]
fn stream_first_heard_through_a_nak_is_anchored_there() {
    let t0 = Instant::now();
    let mut ep = Endpoint::new(config(0, 1), t0);
    let h = Header::new(CLUSTER, NodeId(2), Incarnation(1));
    // Node 2 is first heard through a NAK (about someone else's stream) saying it sent 10;
    // its heartbeats, later, say 12.
    let nak = proto::Nak {
        target_node: 9,
        target_incarnation: 1,
        sender_highest_sent: 10,
        ..Default::default()
    };
    ep.handle_datagram(
        t0,
        addr(1),
        &wire::encode(
            &h,
            &proto::Frame {
                kind: Some(Kind::Nak(nak)),
            },
        ),
    );
    // Its seq 11 is lost; seq 12 arrives (after its probation): 11 must be NAKed, not
    // skipped.
    let t1 = t0 + Duration::from_millis(150);
    ep.handle_datagram(t0, addr(1), &heartbeat(NodeId(2), Incarnation(1), 12));
    ep.handle_datagram(t1, addr(1), &heartbeat(NodeId(2), Incarnation(1), 12));
    ep.handle_datagram(
        t1,
        addr(1),
        &wire::encode_data(&h, 12, [msg(12)].iter(), None),
    );
    assert_eq!(ep.members()[0].delivered_up_to, 10);
    let later = t1 + Duration::from_millis(30);
    ep.handle_timeout(later);
    let naks: Vec<proto::Nak> = std::iter::from_fn(|| ep.poll_transmit(later))
        .filter_map(|t| match frame_of(&t.payload) {
            Kind::Nak(n) => Some(n),
            _ => None,
        })
        .collect();
    assert_eq!(naks.len(), 1);
    assert_eq!(
        naks[0].ranges,
        vec![proto::SeqRange {
            first: 11,
            last: 11
        }]
    );
}

// --- Authenticated encryption ------------------------------------------------------------

fn ring(id: u16, fill: u8) -> Keyring {
    Keyring::single(Key::new(KeyId::new(id).unwrap(), [fill; auth::KEY_LEN]))
}

fn ring2(send: u16, keys: &[(u16, u8)]) -> Keyring {
    Keyring::new(
        KeyId::new(send).unwrap(),
        keys.iter()
            .map(|&(id, fill)| Key::new(KeyId::new(id).unwrap(), [fill; auth::KEY_LEN]))
            .collect(),
    )
    .unwrap()
}

fn keyed(i: usize, incarnation: u64, keyring: &Keyring) -> Config {
    Config {
        keyring: Some(keyring.clone()),
        ..config(i, incarnation)
    }
}

/// Seals a plain datagram as a holder of `keyring` would.
fn seal_with(keyring: &Keyring, plain: &[u8], counter: u64) -> Bytes {
    auth::Ciphers::new(keyring).seal(plain, counter).unwrap()
}

/// Opens a sealed datagram (for the tests' inspection of what went on the wire).
fn open_with(keyring: &Keyring, sealed: &Bytes) -> Kind {
    wire::open(sealed, usize::MAX, CLUSTER, keyring)
        .expect("authentic datagram")
        .1
        .kind
        .expect("kind")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn membership_events(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| !matches!(e, Event::Delivered { .. } | Event::Writable))
        .count()
}

#[test]
fn sealed_pair_delivers_and_shows_no_plaintext() {
    let k = ring(1, 0x11);
    let mut net = Net::new(vec![keyed(0, 1, &k), keyed(1, 1, &k)]);
    net.run_for(JOIN);
    for i in 1..=300 {
        net.send(0, msg(i));
    }
    net.send(0, Bytes::from(vec![0x5A; 100_000])); // fragmented
    net.run_for(Duration::from_millis(100));
    let got = net.delivered(1, NodeId(1));
    assert_eq!(got.len(), 301);
    for (seq, payload) in &got[..300] {
        assert_eq!(payload, &msg(*seq));
    }
    assert_eq!(got[300].1.len(), 100_000);
    assert!(!net.sent.is_empty());
    for (_, d) in &net.sent {
        assert!(d.len() <= 1400, "sealed datagram {} > mtu", d.len());
        assert_eq!(u16::from_be_bytes([d[6], d[7]]), 1, "key id");
        assert_eq!(u16::from_be_bytes([d[8], d[9]]), 16, "tag length");
        assert!(!contains(d, b"message 1"), "plaintext on the wire");
        assert!(!contains(d, &[0x5A; 16]), "plaintext fragment on the wire");
        // ... but it is all there for a key holder.
        let _ = open_with(&k, d);
    }
    let st = net.node(1).stats().clone();
    assert_eq!(
        (
            st.auth_failed,
            st.unknown_key,
            st.replayed,
            st.unauthenticated
        ),
        (0, 0, 0, 0)
    );
    // Each datagram of one sender carries a fresh counter (the nonce's last 8 bytes).
    let mut counters: Vec<u64> = net
        .sent
        .iter()
        .filter(|(from, _)| *from == 0)
        .map(|(_, d)| u64::from_be_bytes(d[40..48].try_into().unwrap()))
        .collect();
    let n = counters.len();
    counters.sort_unstable();
    counters.dedup();
    assert_eq!(counters.len(), n, "a counter (nonce) was reused");
}

#[test]
fn wrong_or_missing_key_is_refused_and_counted() {
    // Same key id, another secret: the tag fails.
    let mut net = Net::new(vec![
        keyed(0, 1, &ring(1, 0x11)),
        keyed(1, 1, &ring(1, 0x22)),
    ]);
    net.run_for(JOIN);
    net.send(0, msg(1));
    net.run_for(Duration::from_millis(500));
    assert!(net.node(1).members().is_empty());
    assert!(net.events[1].is_empty(), "{:?}", net.events[1]);
    assert!(net.node(1).stats().auth_failed >= 3);
    assert_eq!(net.node(1).stats().messages_delivered, 0);

    // Another key id: unknown key.
    let mut net = Net::new(vec![
        keyed(0, 1, &ring(1, 0x11)),
        keyed(1, 1, &ring(2, 0x11)),
    ]);
    net.run_for(Duration::from_millis(500));
    assert!(net.node(1).members().is_empty());
    assert!(net.node(1).stats().unknown_key >= 3);

    // No key against a key, both ways: unauthenticated.
    let mut net = Net::new(vec![config(0, 1), keyed(1, 1, &ring(1, 0x11))]);
    net.run_for(JOIN);
    net.send(0, msg(1));
    net.run_for(Duration::from_millis(500));
    assert!(net.node(0).members().is_empty());
    assert!(net.node(1).members().is_empty());
    assert!(net.node(0).stats().unauthenticated >= 3);
    assert!(net.node(1).stats().unauthenticated >= 3);
    assert_eq!(net.node(1).stats().messages_delivered, 0);
}

#[test]
fn tampered_header_counter_body_or_tag_is_rejected() {
    let k = ring(1, 0x11);
    let t0 = Instant::now();
    let mut ep = Endpoint::new(keyed(0, 1, &k), t0);
    let h = Header::new(CLUSTER, NodeId(2), Incarnation(1));
    let plain = wire::encode_data(&h, 1, [msg(1), msg(2)].iter(), None);
    let sealed = seal_with(&k, &plain, 1);
    let body_end = sealed.len() - wire::CRC_LEN;
    for at in 0..body_end {
        for bit in [0x01u8, 0x80] {
            let mut d = sealed.to_vec();
            d[at] ^= bit;
            // Recompute the CRC: the attacker can, so only the tag stands in the way.
            let crc = wire::crc32(&d[..body_end]);
            d[body_end..].copy_from_slice(&crc.to_be_bytes());
            ep.handle_datagram(t0, addr(1), &d);
        }
    }
    let st = ep.stats().clone();
    assert_eq!(st.messages_delivered, 0);
    assert!(ep.members().is_empty());
    assert!(ep.poll_event().is_none());
    // Flips in the flags byte, the reserved bytes, node, incarnation, counter, body and tag
    // all reach the tag check and fail it.
    let authenticated_bytes = 1 + 2 + 8 + 8 + 8 + (body_end - 48);
    assert!(
        st.auth_failed >= 2 * authenticated_bytes as u64,
        "auth_failed {} of {}",
        st.auth_failed,
        2 * authenticated_bytes
    );
    assert_eq!(st.drops(), 2 * body_end as u64);
    // The untouched datagram is accepted (and delivered once its sender passed probation).
    ep.handle_datagram(t0, addr(1), &sealed);
    let hb = heartbeat(NodeId(2), Incarnation(1), 2);
    ep.handle_datagram(t0, addr(1), &seal_with(&k, &hb, 2));
    let later = t0 + Duration::from_millis(150);
    ep.handle_datagram(later, addr(1), &seal_with(&k, &hb, 3));
    assert_eq!(ep.stats().messages_delivered, 2);
}

#[test]
fn replayed_datagrams_are_rejected_and_counted() {
    let k = ring(1, 0x11);
    let mut net = Net::new(vec![keyed(0, 1, &k), keyed(1, 1, &k)]);
    net.run_for(JOIN);
    for i in 1..=50 {
        net.send(0, msg(i));
    }
    net.run_for(Duration::from_millis(300));
    assert_stream(&net, 1, NodeId(1), 50);
    let before = net.node(1).stats().clone();
    let events_before = net.events[1].len();
    let captured: Vec<Bytes> = net
        .sent
        .iter()
        .filter(|(from, _)| *from == 0)
        .map(|(_, d)| d.clone())
        .collect();
    let now = net.now;
    for d in &captured {
        net.node(1).handle_datagram(now, addr(0), d);
    }
    net.flush();
    let after = net.node(1).stats().clone();
    assert_eq!(after.replayed - before.replayed, captured.len() as u64);
    assert_eq!(after.messages_delivered, before.messages_delivered);
    assert_eq!(
        after.duplicates, before.duplicates,
        "replays reached the stream"
    );
    assert_eq!(after.heartbeats_received, before.heartbeats_received);
    assert_eq!(net.events[1].len(), events_before);
}

#[test]
fn older_incarnation_is_rejected_once_a_newer_is_seen() {
    let k = ring(1, 0x11);
    let mut net = Net::new(vec![keyed(0, 1, &k), keyed(1, 1, &k)]);
    net.run_for(JOIN);
    net.send(1, msg(1));
    net.run_for(Duration::from_millis(300));
    let old: Vec<Bytes> = net
        .sent
        .iter()
        .filter(|(from, _)| *from == 1)
        .map(|(_, d)| d.clone())
        .collect();
    // Node 1 restarts. Once node 0 has authenticated the new incarnation, every datagram of
    // the old one, replayed, is refused as stale (whatever its counter).
    let now = net.now;
    net.nodes[1] = Some(Endpoint::new(keyed(1, 2, &k), now));
    net.run_for(Duration::from_millis(300));
    assert_eq!(net.node(0).members()[0].incarnation, Incarnation(2));
    let stale = net.node(0).stats().stale_incarnation;
    let events = net.events[0].len();
    let now = net.now;
    for d in &old {
        net.node(0).handle_datagram(now, addr(1), d);
    }
    net.flush();
    assert_eq!(
        net.node(0).stats().stale_incarnation - stale,
        old.len() as u64
    );
    assert_eq!(net.events[0].len(), events);
    assert_eq!(net.node(0).members()[0].incarnation, Incarnation(2));
}

#[test]
fn key_rotation_under_traffic_loses_nothing() {
    let k1 = ring(1, 0x11);
    let mut net = Net::new((0..3).map(|i| keyed(i, 1, &k1)).collect());
    net.run_for(JOIN);
    let mut sent = [0u64; 3];
    let mut traffic = |net: &mut Net, rounds: usize| {
        for _ in 0..rounds {
            for (i, n) in sent.iter_mut().enumerate() {
                *n += 1;
                net.send(i, msg(*n));
            }
            net.run_for(Duration::from_millis(3));
        }
    };
    traffic(&mut net, 20);
    // Phase 1, node by node: accept key 2 as well, still send with key 1.
    for i in 0..3 {
        net.node(i)
            .set_keyring(ring2(1, &[(1, 0x11), (2, 0x22)]))
            .unwrap();
        traffic(&mut net, 10);
    }
    // Phase 2, node by node: send with key 2.
    for i in 0..3 {
        net.node(i)
            .set_keyring(ring2(2, &[(1, 0x11), (2, 0x22)]))
            .unwrap();
        traffic(&mut net, 10);
    }
    // Phase 3, node by node: drop key 1.
    for i in 0..3 {
        net.node(i).set_keyring(ring(2, 0x22)).unwrap();
        traffic(&mut net, 10);
    }
    net.run_for(Duration::from_millis(500));
    for i in 0..3 {
        for (j, &n) in sent.iter().enumerate() {
            if i != j {
                assert_stream(&net, i, NodeId(j as u64 + 1), n);
            }
        }
        assert!(net.lost(i).is_empty(), "node {i} lost {:?}", net.lost(i));
        let st = net.node(i).stats().clone();
        assert_eq!(
            (st.auth_failed, st.unknown_key, st.replayed),
            (0, 0, 0),
            "node {i}"
        );
        assert_eq!(
            st.members_left + st.members_restarted + st.members_suspected,
            0
        );
    }
    // Key 1 is gone: a datagram sealed with it is refused now.
    let h = Header::new(CLUSTER, NodeId(9), Incarnation(1));
    let plain = wire::encode_data(&h, 1, [msg(1)].iter(), None);
    let now = net.now;
    net.node(0)
        .handle_datagram(now, addr(2), &seal_with(&k1, &plain, 1));
    assert_eq!(net.node(0).stats().unknown_key, 1);
    // Rotation cannot turn encryption on: that needs a restart.
    let mut plain_ep = Endpoint::new(config(5, 1), now);
    assert_eq!(plain_ep.set_keyring(k1), Err(KeyringError::NotKeyed));
}

/// Frames an attacker without the key would forge against member node 2 (incarnation 1).
fn forgeries(k_wrong: &Keyring) -> Vec<Bytes> {
    let h = Header::new(CLUSTER, NodeId(2), Incarnation(1));
    let newer = Header::new(CLUSTER, NodeId(2), Incarnation(99));
    let goodbye = proto::Frame {
        kind: Some(Kind::Goodbye(proto::Goodbye { highest_sent: 1 })),
    };
    // A heartbeat that would declare 1..1000 lost.
    let heartbeat = proto::Frame {
        kind: Some(Kind::Heartbeat(proto::Heartbeat {
            highest_sent: 1000,
            low_retained: 1000,
            delivered: vec![],
            wall_ms: 0,
        })),
    };
    let mut out = Vec::new();
    for header in [h, newer] {
        for frame in [&goodbye, &heartbeat] {
            let plain = wire::encode(&header, frame);
            out.push(plain.clone());
            out.push(seal_with(k_wrong, &plain, 1 << 40));
        }
        out.push(wire::encode_data(&header, 2, [msg(666)].iter(), None));
    }
    out
}

#[test]
fn forged_goodbye_or_heartbeat_cannot_evict_restart_or_suspect_a_member() {
    let k = ring(1, 0x11);
    let wrong = ring(1, 0x66);
    let mut net = Net::new(vec![keyed(0, 1, &k), keyed(1, 1, &k)]);
    net.run_for(JOIN);
    net.send(1, msg(1));
    net.run_for(Duration::from_millis(50));
    let events = membership_events(&net.events[0]);
    let before = net.node(0).stats().clone();
    let now = net.now;
    let forged = forgeries(&wrong);
    for d in &forged {
        net.node(0).handle_datagram(now, addr(7), d);
    }
    net.run_for(Duration::from_secs(3));
    assert_eq!(
        membership_events(&net.events[0]),
        events,
        "{:?}",
        net.events[0]
    );
    let m = &net.node(0).members()[0];
    assert_eq!(
        (m.incarnation, m.state, m.addr),
        (Incarnation(1), MemberState::Alive, addr(1))
    );
    assert!(net.lost(0).is_empty());
    assert_eq!(net.delivered(0, NodeId(2)), vec![(1, msg(1))]);
    let st = net.node(0).stats();
    assert_eq!(
        (st.unauthenticated - before.unauthenticated) + (st.auth_failed - before.auth_failed),
        forged.len() as u64
    );

    // The same forgeries against an unkeyed cluster do the damage (the test can fail).
    let mut net = Net::pair();
    net.run_for(JOIN);
    net.send(1, msg(1));
    net.run_for(Duration::from_millis(50));
    let now = net.now;
    for d in forgeries(&wrong) {
        net.node(0).handle_datagram(now, addr(7), &d);
    }
    net.flush();
    assert!(net.events[0].iter().any(|e| matches!(
        e,
        Event::MemberLeft {
            reason: LeaveReason::Goodbye,
            ..
        } | Event::MemberRestarted { .. }
    )));
}

// --- Bounds against hostile senders ------------------------------------------------------

fn nak_datagram(from: NodeId, target: NodeId, ranges: usize) -> Bytes {
    let nak = proto::Nak {
        target_node: target.0,
        target_incarnation: 1,
        ranges: vec![
            proto::SeqRange {
                first: 1,
                last: u64::MAX
            };
            ranges
        ],
        partial: vec![],
        sender_highest_sent: 0,
    };
    wire::encode(
        &Header::new(CLUSTER, from, Incarnation(1)),
        &proto::Frame {
            kind: Some(Kind::Nak(nak)),
        },
    )
}

fn repair_bytes(net: &Net, from: usize, since: usize) -> u64 {
    net.sent[since..]
        .iter()
        .filter(|(f, b)| *f == from && matches!(frame_of(b), Kind::Repair(_)))
        .map(|(_, b)| b.len() as u64)
        .sum()
}

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
    assert_eq!(ep.receive_memory(), crate::recv::SENDER_OVERHEAD);
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
        std::iter::from_fn(|| ep.poll_event()).all(|e| matches!(e, Event::MemberSuspected { .. }))
    );
}

#[test]
fn a_restart_takes_effect_only_once_the_new_incarnation_passed_probation() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    net.send(1, msg(1));
    net.run_for(Duration::from_millis(10));
    // One spoofed datagram of a "newer incarnation" of node 2 changes nothing.
    let now = net.now;
    net.node(0)
        .handle_datagram(now, addr(1), &heartbeat(NodeId(2), Incarnation(9), 0));
    net.send(1, msg(2));
    net.run_for(Duration::from_millis(300));
    assert!(
        !net.events[0]
            .iter()
            .any(|e| matches!(e, Event::MemberRestarted { .. }))
    );
    assert_stream(&net, 0, NodeId(2), 2);
    assert_eq!(net.node(0).members()[0].incarnation, Incarnation(1));
    // A real restart is one a little later.
    let now = net.now;
    net.nodes[1] = Some(Endpoint::new(config(1, 10), now));
    net.run_for(JOIN);
    assert!(net.events[0].iter().any(|e| matches!(
        e,
        Event::MemberRestarted {
            old: Incarnation(1),
            new: Incarnation(10),
            ..
        }
    )));
}

#[test]
fn fragment_flood_from_fresh_ids_stays_within_the_budget_and_spares_members() {
    let budget = 4 << 20;
    let mut configs = vec![config(0, 1), config(1, 1)];
    configs[1].receive_budget_bytes = budget;
    let mut net = Net::new(configs);
    net.run_for(JOIN);
    let mut loss = ChaCha8Rng::seed_from_u64(21);
    net.filter =
        Box::new(move |from, _, b| !(from == 0 && is_first_data(b)) || loss.random_bool(0.9));
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let big: Vec<u8> = (0..(600 << 10)).map(|_| rng.random()).collect();
    net.send(0, big.clone());
    let declared = net.node(1).config().max_message_size as u32;
    let mut sent = 1;
    for i in 0..10_000u64 {
        let h = Header::new(CLUSTER, NodeId(1_000 + i), Incarnation(1));
        let offset = rng.random_range(0..declared - 1200);
        let d = wire::encode_fragment(&h, 1 + i % 5, declared, offset, &[0xAB; 1200], None);
        let now = net.now;
        net.node(1).handle_datagram(now, addr(7), &d);
        assert!(net.node(1).receive_memory() <= budget);
        if i % 100 == 99 {
            sent += 1;
            net.send(0, msg(sent));
            net.run_for(Duration::from_millis(1));
            assert!(net.node(1).receive_memory() <= budget);
        }
    }
    net.run_for(Duration::from_secs(3));
    let got = net.delivered(1, NodeId(1));
    assert!(net.lost(1).is_empty(), "{:?}", net.node(1).stats());
    assert_eq!(got.len(), sent as usize);
    assert_eq!(got[0].1.as_ref(), big.as_slice());
    for (seq, payload) in &got[1..] {
        assert_eq!(payload, &msg(*seq));
    }
    let st = net.node(1).stats().clone();
    assert_eq!(net.node(1).members().len(), 1);
    assert!(
        st.candidates_evicted > 0 && st.receive_evicted > 0,
        "{st:?}"
    );
    assert!(
        !net.events[1]
            .iter()
            .any(|e| matches!(e, Event::MemberJoined { node, .. } if node.0 >= 1_000))
    );
    // The candidates were forgotten: what is left is the member's own state.
    assert_eq!(net.node(1).receive_memory(), crate::recv::SENDER_OVERHEAD);
}

#[test]
fn membership_stays_bounded_under_heartbeats_from_fresh_ids() {
    let mut net = Net::new(vec![config(0, 1), config(1, 1), config(2, 1)]);
    net.nodes[2] = None;
    net.run_for(JOIN);
    let max_members = net.node(0).config().max_members.get();
    let max_candidates = net.node(0).config().max_candidates.get();
    // 20 000 one-shot heartbeats from fresh ids, 10 000 a second, while a real node starts.
    for i in 0..20_000u64 {
        let now = net.now;
        let hb = heartbeat(NodeId(1_000 + i), Incarnation(1), 0);
        net.node(0).handle_datagram(now, addr(7), &hb);
        if i % 10 == 9 {
            net.run_for(Duration::from_millis(1));
        }
        if i == 5_000 {
            let now = net.now;
            net.nodes[2] = Some(Endpoint::new(config(2, 1), now));
        }
        assert!(net.node(0).candidates() <= max_candidates);
    }
    let members: Vec<NodeId> = net.node(0).members().iter().map(|m| m.node).collect();
    assert_eq!(members, vec![NodeId(2), NodeId(3)]);
    let st = net.node(0).stats().clone();
    assert_eq!(st.members_joined, 2);
    assert!(st.candidates_evicted + st.candidates_expired >= 20_000 - max_candidates as u64);
    // Senders that do prove themselves fill the table up to its bound, never beyond, and
    // never push a member out.
    let now = net.now;
    for i in 0..400u64 {
        let hb = heartbeat(NodeId(100_000 + i), Incarnation(1), 0);
        net.node(0).handle_datagram(now, addr(7), &hb);
    }
    net.run_for(Duration::from_millis(120));
    let now = net.now;
    for i in 0..400u64 {
        let hb = heartbeat(NodeId(100_000 + i), Incarnation(1), 0);
        net.node(0).handle_datagram(now, addr(7), &hb);
    }
    assert_eq!(net.node(0).members().len(), max_members);
    assert!(net.node(0).stats().members_full >= (400 - (max_members - 2)) as u64);
    let members: Vec<NodeId> = net.node(0).members().iter().map(|m| m.node).collect();
    assert!(members.contains(&NodeId(2)) && members.contains(&NodeId(3)));
    // The established streams still flow.
    net.send(1, msg(1));
    net.send(2, msg(1));
    net.run_for(Duration::from_millis(50));
    assert_stream(&net, 0, NodeId(2), 1);
    assert_stream(&net, 0, NodeId(3), 1);
}

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

#[test]
fn a_fresh_id_gets_at_most_three_times_its_bytes_in_repairs() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    // Node 1 goes quiet towards node 0, so node 0 keeps its whole window.
    net.filter = Box::new(|from, _, _| from != 1);
    let now = net.now;
    for _ in 0..2_000 {
        net.node(0).send(now, Bytes::from(vec![3u8; 1000])).unwrap();
    }
    net.run_for(Duration::from_millis(20));
    assert_eq!(net.node(0).window_len(), 2_000);
    let since = net.sent.len();
    let mut asked = 0u64;
    for round in 0..400u64 {
        // One attacker id that keeps asking, and a new id every fourth round.
        let from = if round % 4 == 3 {
            NodeId(50_000 + round)
        } else {
            NodeId(40_000)
        };
        let nak = nak_datagram(from, NodeId(1), 1 + (round % 3) as usize * 1_000);
        asked += nak.len() as u64;
        let now = net.now;
        net.node(0).handle_datagram(now, addr(8), &nak);
        net.run_for(Duration::from_millis(6));
    }
    let answered = repair_bytes(&net, 0, since);
    assert!(
        answered <= 3 * asked,
        "{answered} B of repairs for {asked} B asked"
    );
    assert!(net.node(0).stats().repairs_refused > 0);
    assert!(net.node(0).stats().nak_entries_ignored > 0);
}

#[test]
fn a_member_that_never_acknowledges_gets_its_start_credit_and_three_times_its_bytes() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    // Node 1 goes quiet towards node 0 (no heartbeat acknowledges anything), so node 0 keeps
    // its whole window.
    net.filter = Box::new(|from, _, _| from != 1);
    let now = net.now;
    for _ in 0..2_000 {
        net.node(0).send(now, Bytes::from(vec![3u8; 1000])).unwrap();
    }
    net.run_for(Duration::from_millis(20));
    let since = net.sent.len();
    let mut asked = 0u64;
    // Node 1 (a member) asks for everything every millisecond for one second.
    for _ in 0..1_000 {
        let now = net.now;
        let nak = nak_datagram(NodeId(2), NodeId(1), 4);
        asked += nak.len() as u64;
        net.node(0).handle_datagram(now, addr(1), &nak);
        net.run_for(Duration::from_millis(1));
    }
    let answered = repair_bytes(&net, 0, since);
    // A repair datagram carries a little more than the payload the credit counts.
    let bound = (REPAIR_START_CREDIT + 2 * asked) * 11 / 10;
    assert!(
        answered <= bound,
        "{answered} B of repairs for {asked} B asked"
    );
    // Repairs did flow, within the bound, and the rest was refused.
    assert!(answered >= REPAIR_START_CREDIT, "{answered}");
    assert!(net.node(0).stats().repairs_refused > 0);
}

#[test]
fn a_member_that_acknowledges_what_it_receives_earns_its_repairs() {
    // Node 1 loses a third of node 0's data and repairs it: its acknowledgements earn the
    // credit for every repair it needs, far beyond the start credit.
    let mut net = Net::pair();
    net.run_for(JOIN);
    let mut n = 0u64;
    net.filter = Box::new(move |from, _, _| {
        n += 1;
        !(from == 0 && n.is_multiple_of(3))
    });
    let now = net.now;
    for _ in 0..3_000 {
        net.node(0).send(now, Bytes::from(vec![5u8; 1000])).unwrap();
    }
    let since = net.sent.len();
    net.run_for(Duration::from_secs(5));
    let repaired = repair_bytes(&net, 0, since);
    assert!(repaired > 4 * REPAIR_START_CREDIT, "{repaired}");
    let delivered: Vec<u64> = net.delivered(1, NodeId(1)).iter().map(|d| d.0).collect();
    assert_eq!(delivered.len(), 3_000);
    // In order and nothing reported lost: every gap was repaired.
    assert!(delivered.windows(2).all(|w| w[1] == w[0] + 1));
}

#[test]
fn sequence_numbers_near_u64_max_never_overflow() {
    let t0 = Instant::now();
    let mut ep = Endpoint::new(config(0, 1), t0);
    let (node, inc) = (NodeId(7), Incarnation(1));
    let h = Header::new(CLUSTER, node, inc);
    let t1 = t0 + Duration::from_millis(150);
    ep.handle_datagram(t0, addr(6), &heartbeat(node, inc, u64::MAX - 2));
    ep.handle_datagram(t1, addr(6), &heartbeat(node, inc, u64::MAX - 2));
    assert_eq!(ep.members().len(), 1);
    let last = u64::MAX - 1;
    ep.handle_datagram(
        t1,
        addr(6),
        &wire::encode_data(&h, last, [msg(1)].iter(), None),
    );
    ep.handle_datagram(
        t1,
        addr(6),
        &wire::encode_fragment(&h, u64::MAX, 1, 0, b"x", None),
    );
    ep.handle_datagram(
        t1,
        addr(6),
        &wire::encode_data(&h, u64::MAX, [msg(2)].iter(), None),
    );
    let hb = proto::Heartbeat {
        highest_sent: u64::MAX,
        low_retained: u64::MAX,
        delivered: vec![],
        wall_ms: 0,
    };
    let hb = wire::encode(
        &h,
        &proto::Frame {
            kind: Some(Kind::Heartbeat(hb)),
        },
    );
    ep.handle_datagram(t1, addr(6), &hb);
    assert_eq!(ep.stats().malformed, 2);
    assert_eq!(ep.members()[0].delivered_up_to, last);
    // Nothing is missing, so nothing is ever NAKed.
    let mut now = t1;
    for _ in 0..50 {
        now += Duration::from_millis(20);
        ep.handle_timeout(now);
        while ep.poll_transmit(now).is_some() {}
    }
    assert_eq!(ep.stats().naks_sent, 0);
    assert_eq!(ep.stats().messages_delivered, 1);
}

#[test]
fn a_starting_node_and_its_peer_join_each_other_within_one_interval() {
    let mut net = Net::new(vec![config(0, 1), config(1, 1)]);
    net.nodes[1] = None;
    net.run_for(Duration::from_millis(250));
    let now = net.now;
    net.nodes[1] = Some(Endpoint::new(config(1, 1), now));
    let interval = net.node(0).config().heartbeat_interval;
    // Each holds the other on probation, so each heartbeats every half interval: each sees the
    // other's second heartbeat half an interval after its first (without that, the starting
    // node would wait for its peer's second regular heartbeat: up to two intervals).
    net.run_for(interval);
    assert_eq!(net.node(0).members().len(), 1);
    assert_eq!(net.node(1).members().len(), 1);
    // Once nobody is on probation, heartbeats go back to one per interval.
    let before = net.node(0).stats().heartbeats_sent;
    net.run_for(interval * 10);
    let sent = net.node(0).stats().heartbeats_sent - before;
    assert!(
        (9..=11).contains(&sent),
        "{sent} heartbeats in 10 intervals"
    );
}

#[test]
fn a_goodbye_that_overtakes_the_last_data_waits_for_it() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    // Hold node 0's data back; let its goodbye through first.
    net.filter = Box::new(|from, _, b| !(from == 0 && is_first_data(b)));
    let now = net.now;
    net.node(0).send(now, msg(1)).unwrap();
    net.node(0).close(now);
    net.run_for(Duration::from_millis(1));
    let data: Vec<Bytes> = net
        .sent
        .iter()
        .filter(|(f, b)| *f == 0 && is_first_data(b))
        .map(|(_, b)| b.clone())
        .collect();
    assert_eq!(net.node(0).stats().goodbyes_sent, 1);
    assert!(net.node(1).stats().goodbyes_received == 1 && data.len() == 1);
    assert_eq!(net.node(1).members().len(), 1, "still waiting for its data");
    let now = net.now;
    net.node(1).handle_datagram(now, addr(0), &data[0]);
    net.flush();
    assert_stream(&net, 1, NodeId(1), 1);
    assert!(net.lost(1).is_empty());
    assert!(net.node(1).members().is_empty());
    assert!(net.events[1].contains(&Event::MemberLeft {
        node: NodeId(1),
        incarnation: Incarnation(1),
        reason: LeaveReason::Goodbye
    }));
    // Data that never comes is reported lost after the grace period.
    let mut net = Net::pair();
    net.run_for(JOIN);
    net.filter = Box::new(|from, _, b| !(from == 0 && is_first_data(b)));
    let now = net.now;
    net.node(0).send(now, msg(1)).unwrap();
    net.node(0).close(now);
    net.run_for(Duration::from_millis(50));
    assert_eq!(net.lost(1), vec![1..=1]);
    assert!(net.node(1).members().is_empty());
}
