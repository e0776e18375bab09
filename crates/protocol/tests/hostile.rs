//! Memory of an endpoint under floods from senders it never heard of, measured as live heap
//! bytes by a global allocator wrapper (issue 13): fragments declaring large messages from
//! many fresh node ids, and heartbeats from many fresh node ids. The growth must stay within
//! the configured receive budget plus a small allowance for the tables' own structure, while
//! an established peer's stream keeps being delivered.
//!
//! Only the public API is used, so the same file measures any version of the endpoint.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_protocol::wire::{self, Header};
use chorus_protocol::{ClusterId, Config, Endpoint, Event, Incarnation, NodeId};
use chorus_sim::forge;

#[global_allocator]
static GLOBAL: chorus_testkit::alloc::Counting = chorus_testkit::alloc::Counting;

/// One measurement at a time: the counter is global.
static SERIAL: Mutex<()> = Mutex::new(());

fn live() -> isize {
    // At most a few GiB in this test: the count fits an isize.
    chorus_testkit::alloc::live_bytes() as isize
}

const CLUSTER: ClusterId = ClusterId(13);
const MIB: isize = 1 << 20;
/// Heap the endpoint may use beyond the receive budget: hash tables and indexes sized for the
/// member and probation tables, event queue, and the test's own bookkeeping.
const SLACK: isize = 16 * MIB;

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 7400))
}

fn config(node: u64) -> Config {
    let mut c = Config::lan(CLUSTER, NodeId(node), Incarnation(1), node);
    c.rate_bytes_per_sec = None;
    c.batch_delay = Duration::ZERO;
    c
}

/// The LAN preset's receive budget (`Config::receive_budget_bytes`).
const BUDGET: isize = 64 * MIB;

/// A victim endpoint with one established peer, the peer, and the current time.
struct Pair {
    now: Instant,
    victim: Endpoint,
    peer: Endpoint,
    delivered: u64,
}

impl Pair {
    fn new() -> Pair {
        let now = Instant::now();
        let mut pair = Pair {
            now,
            victim: Endpoint::new(config(1), now),
            peer: Endpoint::new(config(2), now),
            delivered: 0,
        };
        // Two heartbeat rounds: each passes the other's probation.
        for _ in 0..3 {
            pair.step(Duration::from_millis(150));
        }
        assert_eq!(pair.victim.members().len(), 1);
        pair
    }

    /// Moves time on and exchanges everything due.
    fn step(&mut self, d: Duration) {
        self.now += d;
        let now = self.now;
        self.victim.handle_timeout(now);
        self.peer.handle_timeout(now);
        while let Some(t) = self.peer.poll_transmit(now) {
            self.victim.handle_datagram(now, addr(2), &t.payload);
        }
        while let Some(t) = self.victim.poll_transmit(now) {
            self.peer.handle_datagram(now, addr(1), &t.payload);
        }
        while let Some(e) = self.victim.poll_event() {
            if let Event::Delivered { .. } = e {
                self.delivered += 1;
            }
        }
        while self.peer.poll_event().is_some() {}
    }
}

#[test]
fn fragments_declaring_large_messages_from_fresh_ids_stay_within_the_budget() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut pair = Pair::new();
    let declared = pair.victim.config().max_message_size as u32;
    let chunk = vec![0xA5u8; 1200];
    let base = live();
    let mut peak = 0isize;
    let mut sent = 0u64;
    for i in 0..10_000u64 {
        let h = Header::new(CLUSTER, NodeId(10_000 + i), Incarnation(1));
        let offset = (i as u32 * 7919) % (declared - 1200);
        let d = wire::encode_fragment(&h, 1, declared, offset, &chunk, None);
        let now = pair.now;
        pair.victim.handle_datagram(now, addr(9), &d);
        peak = peak.max(live() - base);
        if i % 50 == 49 {
            let now = pair.now;
            pair.peer
                .send(now, Bytes::from(format!("honest {i}")))
                .expect("send");
            sent += 1;
            pair.step(Duration::from_micros(500));
        }
    }
    pair.step(Duration::from_millis(50));
    println!(
        "fragment flood: heap growth peak {:.1} MiB (budget {} MiB + {} MiB slack)",
        peak as f64 / MIB as f64,
        BUDGET / MIB,
        SLACK / MIB
    );
    assert!(peak <= BUDGET + SLACK, "peak heap growth {peak} B");
    assert_eq!(pair.delivered, sent, "the established stream kept flowing");
    assert_eq!(pair.victim.members().len(), 1);
}

#[test]
fn heartbeats_from_fresh_ids_neither_join_nor_grow_memory_without_bound() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut pair = Pair::new();
    let base = live();
    let mut peak = 0isize;
    for i in 0..20_000u64 {
        let now = pair.now;
        pair.victim.handle_datagram(
            now,
            addr(9),
            &forge::heartbeat(&Header::new(CLUSTER, NodeId(100_000 + i), Incarnation(1))),
        );
        if i % 1_000 == 999 {
            pair.step(Duration::from_millis(20));
        }
        peak = peak.max(live() - base);
    }
    println!(
        "heartbeat flood: {} members, heap growth peak {:.1} MiB",
        pair.victim.members().len(),
        peak as f64 / MIB as f64
    );
    assert_eq!(pair.victim.members().len(), 1);
    assert!(peak <= SLACK, "peak heap growth {peak} B");
}
