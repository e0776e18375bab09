//! Heap bytes per stored key on every path a key enters a store: a local write whose value
//! is a slice of a larger buffer (as an HTTP request body is), the remote write it becomes
//! on a peer, anti-entropy to a late joiner, and a restore from entries "found on disk"
//! that are slices of a larger buffer. Counted by a global allocator wrapper that tracks
//! live bytes; each node's share is what dropping it frees.
//!
//! Run: `cargo test -p chorus-replication --release --test memory -- --nocapture`

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_protocol::{ClusterId, Config, Incarnation, NodeId};
use chorus_replication::{
    Hlc, Loaded, NodeConfig, NodeCore, Replica, ReplicaConfig, Version, WallClock,
};
use chorus_testkit::alloc::{Counting, live_bytes};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Keys written.
const N: usize = 50_000;
/// Value bytes; keys are 25 bytes.
const VALUE_LEN: usize = 100;
/// Bytes of the buffer every value is a slice of.
const BUFFER: usize = 8192;
/// Most heap bytes per key allowed: the value and key, the map slot, the digest index and a
/// share of the change log (at 50 000 keys the log holds all of them). Measured: 277-382;
/// 8 600 on the writer before values were copied out of their buffers.
const MAX_PER_KEY: i64 = 450;
const WALL0: u64 = 1_800_000_000_000;

/// Heap bytes freed by dropping `x`.
fn footprint<T>(x: T) -> i64 {
    let before = live_bytes();
    drop(x);
    before - live_bytes()
}

fn key(i: usize) -> String {
    format!("rss/{i:08}/abcdefghijkl")
}

/// A value of `VALUE_LEN` bytes that is a slice of a `BUFFER`-byte allocation.
fn sliced_value() -> Bytes {
    Bytes::from(vec![b'v'; BUFFER]).slice(0..VALUE_LEN)
}

fn core(node: u64, t0: Instant) -> NodeCore {
    let mut p = Config::lan(ClusterId(9), NodeId(node), Incarnation(1), node);
    p.rate_bytes_per_sec = None;
    p.batch_delay = Duration::ZERO;
    let wall = WallClock {
        epoch: t0,
        epoch_ms: WALL0,
    };
    NodeCore::new(NodeConfig::new(p, wall), t0)
}

/// Timers of every node, then every datagram to every other node.
fn step(nodes: &mut [NodeCore], now: Instant) {
    for n in nodes.iter_mut() {
        n.handle_timeout(now);
    }
    for i in 0..nodes.len() {
        let from = SocketAddr::from(([10, 0, 0, i as u8 + 1], 1));
        while let Some(t) = nodes[i].poll_transmit(now) {
            for (j, n) in nodes.iter_mut().enumerate() {
                if j != i {
                    n.handle_datagram(now, from, &t.payload);
                }
            }
        }
    }
    for n in nodes.iter_mut() {
        while n.poll_event().is_some() {}
    }
}

#[test]
fn stored_keys_and_values_hold_only_their_own_bytes_on_every_path() {
    let t0 = Instant::now();
    let mut now = t0;
    // Writer and receiver.
    let mut nodes = vec![core(1, t0), core(2, t0)];
    for _ in 0..5 {
        step(&mut nodes, now);
        now += Duration::from_millis(1);
    }
    let mut i = 0;
    while i < N {
        for _ in 0..64.min(N - i) {
            nodes[0].put(now, key(i), sliced_value()).unwrap();
            i += 1;
        }
        step(&mut nodes, now);
        now += Duration::from_micros(300);
    }
    // A late joiner takes everything by anti-entropy.
    nodes.push(core(3, now));
    for _ in 0..600 {
        now += Duration::from_millis(50);
        step(&mut nodes, now);
        if nodes
            .iter()
            .all(|n| n.store().len() == N && !n.has_backlog())
        {
            break;
        }
    }
    for _ in 0..40 {
        now += Duration::from_millis(50);
        step(&mut nodes, now);
    }
    assert!(nodes.iter().all(|n| n.store().len() == N));
    let joiner = nodes.pop().unwrap();
    let receiver = nodes.pop().unwrap();
    let writer = nodes.pop().unwrap();
    // A restore whose values are slices of a larger buffer (as a decoder may hand them).
    let entries = (0..N)
        .map(|i| {
            let version = Version {
                hlc: Hlc::new(WALL0, 0),
                node: 1,
            };
            (key(i), Some(sliced_value()), version, Default::default())
        })
        .collect();
    let loaded = Loaded {
        entries,
        last_wall_ms: WALL0,
        ..Loaded::default()
    };
    let restored = Replica::restore(ReplicaConfig::new(4, 4), now, WALL0, loaded);
    let per_key = |bytes: i64| bytes / N as i64;
    let figures = [
        ("writer (local writes)", per_key(footprint(writer))),
        ("receiver (remote writes)", per_key(footprint(receiver))),
        ("late joiner (anti-entropy)", per_key(footprint(joiner))),
        ("restored from disk", per_key(footprint(restored))),
    ];
    for (what, bytes) in figures {
        println!(
            "{what}: {bytes} heap bytes per key of {} + {VALUE_LEN} B",
            key(0).len()
        );
    }
    for (what, bytes) in figures {
        assert!(bytes <= MAX_PER_KEY, "{what}: {bytes} B per key");
    }
}
