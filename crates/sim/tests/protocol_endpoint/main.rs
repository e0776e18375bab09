//! Tests of the real `chorus_protocol::Endpoint` over the simulated network: delivery, repair,
//! flow control, membership, authentication and the bounds against hostile senders, each an
//! example scenario with exact expectations (the property tests are in `tests/protocol.rs`).
//!
//! [`Net`] is a thin harness over [`chorus_sim::Sim`]: perfect links with a fixed 200 µs
//! delay (so datagrams arrive in the order they were sent), every transmitted datagram
//! recorded in [`Net::sent`], every event in [`Net::events`], and a receive filter
//! ([`Net::set_filter`]) that drops chosen datagrams (by sender, receiver and content) just
//! before they reach a machine — what the tests use to lose exactly the datagrams they mean
//! to. Datagrams a test forges are handed to an endpoint directly ([`Net::node`]), past the
//! network and the filter.

#![allow(clippy::unwrap_used)]

mod auth;
mod bounds;
mod membership;
mod stream;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU64, NonZeroUsize};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_protocol::proto::frame::Kind;
use chorus_protocol::wire::Header;
use chorus_protocol::*;
use chorus_sim::{LinkConfig, Machine, Sim, SimConfig, node_addr};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CLUSTER: ClusterId = ClusterId(0xC0FFEE);

/// Long enough for every node to pass every other's probation: a second heartbeat, one
/// heartbeat interval (200 ms) after the first.
const JOIN: Duration = Duration::from_millis(250);

/// One-way delay of every link.
const LATENCY: Duration = Duration::from_micros(200);

/// The address of node `i` in the simulation.
fn addr(i: usize) -> SocketAddr {
    node_addr(i)
}

/// The index of the node with address `addr` (the inverse of [`node_addr`]).
fn index_of(addr: SocketAddr) -> usize {
    match addr.ip() {
        IpAddr::V4(ip) => {
            let [_, _, hi, lo] = ip.octets();
            usize::from(hi) * 250 + usize::from(lo) - 1
        }
        IpAddr::V6(_) => usize::MAX,
    }
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

/// Decides whether a datagram from `from` to `to` is delivered.
type Filter = Box<dyn FnMut(usize, usize, &Bytes) -> bool>;

/// What the machines and the harness share.
struct Shared {
    filter: RefCell<Filter>,
    /// Datagrams transmitted since the harness last collected them: (from, bytes).
    sent: RefCell<Vec<(usize, Bytes)>>,
    /// Events emitted since the harness last collected them, per node.
    events: RefCell<Vec<Vec<Event>>>,
    /// The configuration each node's next machine is built with.
    configs: RefCell<Vec<Config>>,
}

/// One node's machine: the endpoint, behind the receive filter, recording what it sends.
struct Probe {
    ep: Endpoint,
    index: usize,
    shared: Rc<Shared>,
}

impl Machine for Probe {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let bytes = Bytes::copy_from_slice(datagram);
        if (self.shared.filter.borrow_mut())(index_of(from), self.index, &bytes) {
            self.ep.handle_datagram(now, from, datagram);
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.ep.handle_timeout(now);
    }

    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let t = self.ep.poll_transmit(now)?;
        self.shared
            .sent
            .borrow_mut()
            .push((self.index, t.payload.clone()));
        Some(t)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.ep.poll_timeout()
    }
}

struct Net {
    sim: Sim<Probe>,
    shared: Rc<Shared>,
    /// The virtual epoch.
    t0: Instant,
    /// The current virtual time.
    now: Instant,
    /// Every event of every node, in order, per node (kept across restarts).
    events: Vec<Vec<Event>>,
    /// Every datagram put on the wire: (from, bytes).
    sent: Vec<(usize, Bytes)>,
}

impl Net {
    fn new(configs: Vec<Config>) -> Net {
        let n = configs.len();
        let shared = Rc::new(Shared {
            filter: RefCell::new(Box::new(|_, _, _| true)),
            sent: RefCell::new(Vec::new()),
            events: RefCell::new(vec![Vec::new(); n]),
            configs: RefCell::new(configs),
        });
        let link = LinkConfig::perfect().with_delay(LATENCY, Duration::ZERO);
        let factory = {
            let shared = Rc::clone(&shared);
            move |spawn: &chorus_sim::Spawn| Probe {
                ep: Endpoint::new(shared.configs.borrow()[spawn.index].clone(), spawn.now),
                index: spawn.index,
                shared: Rc::clone(&shared),
            }
        };
        let mut sim = Sim::new(SimConfig::new(1, n).with_link(link), factory);
        let log = Rc::clone(&shared);
        sim.set_observer(move |_, i, m: &mut Probe| {
            let mut events = log.events.borrow_mut();
            if events.len() <= i {
                events.resize(i + 1, Vec::new());
            }
            events[i].extend(std::iter::from_fn(|| m.ep.poll_event()));
        });
        let t0 = sim.epoch();
        let mut net = Net {
            sim,
            shared,
            t0,
            now: t0,
            events: vec![Vec::new(); n],
            sent: Vec::new(),
        };
        net.collect();
        net
    }

    fn pair() -> Net {
        Net::new(vec![config(0, 1), config(1, 1)])
    }

    fn node(&mut self, i: usize) -> &mut Endpoint {
        &mut self
            .sim
            .node_mut(i)
            .machine_mut()
            .expect("node is running")
            .ep
    }

    /// Replaces the receive filter.
    fn set_filter(&mut self, filter: impl FnMut(usize, usize, &Bytes) -> bool + 'static) {
        *self.shared.filter.borrow_mut() = Box::new(filter);
    }

    /// Starts node `i` now with a fresh endpoint built from `config`: a restart (without
    /// goodbye; what was in flight to it is lost) if it ran before, a late join if `i` is the
    /// next index.
    fn start(&mut self, i: usize, config: Config) {
        let mut configs = self.shared.configs.borrow_mut();
        if i == configs.len() {
            configs.push(config);
            drop(configs);
            self.sim.add_node();
        } else {
            configs[i] = config;
            drop(configs);
            self.sim.restart(i);
        }
        self.collect();
    }

    fn send(&mut self, i: usize, payload: impl Into<Bytes>) -> u64 {
        let payload = payload.into();
        let seq = self
            .sim
            .act(i, |m, now| m.ep.send(now, payload))
            .expect("node is running")
            .expect("send");
        self.flush();
        seq
    }

    /// Drains every node's transmits onto the wire and its events into `events`.
    fn flush(&mut self) {
        for i in self.sim.live_nodes() {
            self.sim.act(i, |_, _| ());
        }
        self.collect();
    }

    /// Runs the network for `d` of virtual time.
    fn run_for(&mut self, d: Duration) {
        self.flush();
        self.sim.run_for(d);
        assert!(!self.sim.budget_exhausted(), "event budget exhausted");
        self.flush();
    }

    /// Moves what the machines recorded into `sent` and `events`; reads the clock.
    fn collect(&mut self) {
        self.now = self.sim.now();
        self.sent.append(&mut self.shared.sent.borrow_mut());
        let mut events = self.shared.events.borrow_mut();
        if self.events.len() < events.len() {
            self.events.resize(events.len(), Vec::new());
        }
        for (all, new) in self.events.iter_mut().zip(events.iter_mut()) {
            all.append(new);
        }
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
        name: Default::default(),
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
