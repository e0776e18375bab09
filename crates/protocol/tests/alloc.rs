//! Allocations per message on the send and receive paths in steady state (issue 9, target 5),
//! counted by a global allocator wrapper around the system allocator.
//!
//! One sender endpoint and one receiver endpoint connected in memory (virtual clock). After a
//! warm-up that sizes every queue, the test counts the allocations made by `send` +
//! `poll_transmit` (send path) and by `handle_datagram` + `poll_event` (receive path) while
//! many messages go through, and prints them per message and per datagram.
//!
//! Run: `cargo test -p chorus-protocol --release --test alloc -- --nocapture`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_protocol::{ClusterId, Config, Endpoint, Event, Incarnation, NodeId};
use chorus_testkit::alloc::{Counting, allocations};

#[global_allocator]
static GLOBAL: Counting = Counting;

fn config(node: u64) -> Config {
    let mut c = Config::lan(ClusterId(9), NodeId(node), Incarnation(1), node);
    c.rate_bytes_per_sec = None;
    c.batch_delay = Duration::ZERO;
    c
}

#[derive(Default, Debug)]
struct Counts {
    messages: u64,
    datagrams: u64,
    send_allocs: u64,
    recv_allocs: u64,
}

/// Moves `n` messages of `size` bytes (payloads made up front: the application's allocation,
/// not the protocol's). Counts only the messages after `warmup`.
fn run(n: u64, warmup: u64, size: usize) -> Counts {
    let t0 = Instant::now();
    let mut now = t0;
    let a_addr = SocketAddr::from(([10, 0, 0, 1], 1));
    let b_addr = SocketAddr::from(([10, 0, 0, 2], 1));
    let mut a = Endpoint::new(config(1), now);
    let mut b = Endpoint::new(config(2), now);
    let payloads: Vec<Bytes> = (0..64u8).map(|i| Bytes::from(vec![i; size])).collect();
    let mut c = Counts::default();
    let mut delivered = 0u64;
    let mut sent = 0u64;
    // Let the two find each other before the stream starts: each passes the other's
    // probation with its second heartbeat, one heartbeat interval after the first.
    for _ in 0..3 {
        a.handle_timeout(now);
        b.handle_timeout(now);
        while let Some(t) = a.poll_transmit(now) {
            b.handle_datagram(now, a_addr, &t.payload);
        }
        while let Some(t) = b.poll_transmit(now) {
            a.handle_datagram(now, b_addr, &t.payload);
        }
        while a.poll_event().is_some() {}
        while b.poll_event().is_some() {}
        now += Duration::from_millis(150);
    }
    assert_eq!((a.members().len(), b.members().len()), (1, 1));
    let mut datagrams = Vec::with_capacity(256);
    while delivered < n {
        let counting = delivered >= warmup;
        let before = allocations();
        // Send path: queue a burst, then build its datagrams.
        let mut burst = 0;
        while sent < n && burst < 256 && a.send(now, payloads[(sent % 64) as usize].clone()).is_ok()
        {
            sent += 1;
            burst += 1;
        }
        while let Some(t) = a.poll_transmit(now) {
            datagrams.push(t.payload);
        }
        let mid = allocations();
        // Receive path.
        let mut got = 0u64;
        for d in datagrams.drain(..) {
            b.handle_datagram(now, a_addr, &d);
            while let Some(e) = b.poll_event() {
                if let Event::Delivered { .. } = e {
                    got += 1;
                }
            }
        }
        let after = allocations();
        if counting {
            c.send_allocs += mid - before;
            c.recv_allocs += after - mid;
            c.messages += got;
        }
        delivered += got;
        // Stability: the receiver's heartbeat lets the sender trim its window (not counted:
        // it is per heartbeat interval, not per message).
        now += Duration::from_micros(200);
        a.handle_timeout(now);
        b.handle_timeout(now);
        while let Some(t) = b.poll_transmit(now) {
            a.handle_datagram(now, b_addr, &t.payload);
        }
        while a.poll_event().is_some() {}
        while b.poll_event().is_some() {}
    }
    c.datagrams = a.stats().data_datagrams_sent;
    c
}

#[test]
fn allocations_per_message_steady_state() {
    for size in [64usize, 1400] {
        let c = run(200_000, 50_000, size);
        let per_msg_send = c.send_allocs as f64 / c.messages as f64;
        let per_msg_recv = c.recv_allocs as f64 / c.messages as f64;
        let msgs_per_datagram = 200_000.0 / c.datagrams.max(1) as f64;
        println!(
            "alloc {size} B: {} messages counted, {:.2} messages per datagram; send path {:.3} \
             allocations per message ({:.2} per datagram), receive path {:.3} per message \
             ({:.2} per datagram)",
            c.messages,
            msgs_per_datagram,
            per_msg_send,
            per_msg_send * msgs_per_datagram,
            per_msg_recv,
            per_msg_recv * msgs_per_datagram,
        );
        assert!(c.messages > 100_000, "{c:?}");
        if size == 64 {
            // Small messages are batched: allocations are per datagram (encode buffer,
            // decoded message list), never per message.
            assert!(
                per_msg_send < 0.25,
                "send path allocates per message: {c:?}"
            );
            assert!(
                per_msg_recv < 0.5,
                "receive path allocates per message: {c:?}"
            );
        }
    }
}
