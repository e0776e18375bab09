//! Heartbeats carry wall time: each endpoint shows every peer's clock offset.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chorus_protocol::{ClusterId, Config, Endpoint, Incarnation, NodeId, WallClock};

fn config(node: u64, wall: Option<WallClock>) -> Config {
    let mut c = Config::lan(ClusterId(7), NodeId(node), Incarnation(1), node);
    c.wall_clock = wall;
    c
}

/// Runs both timers, then delivers what each has to send to the other.
fn exchange(a: &mut Endpoint, b: &mut Endpoint, now: Instant) {
    let (a_addr, b_addr) = (
        SocketAddr::from(([10, 0, 0, 1], 1)),
        SocketAddr::from(([10, 0, 0, 2], 1)),
    );
    a.handle_timeout(now);
    b.handle_timeout(now);
    while let Some(t) = a.poll_transmit(now) {
        b.handle_datagram(now, a_addr, &t.payload);
    }
    while let Some(t) = b.poll_transmit(now) {
        a.handle_datagram(now, b_addr, &t.payload);
    }
    while a.poll_event().is_some() || b.poll_event().is_some() {}
}

#[test]
fn heartbeats_measure_the_clock_offset_of_each_peer() {
    let t0 = Instant::now();
    let ahead = WallClock {
        epoch: t0,
        epoch_ms: 1_700_000_300_000,
    };
    let mut a = Endpoint::new(config(1, Some(ahead)), t0);
    let mut b = Endpoint::new(config(2, Some(WallClock::simulated(t0))), t0);
    let mut now = t0;
    for _ in 0..3 {
        exchange(&mut a, &mut b, now);
        now += Duration::from_millis(250);
    }
    let seen_by_b = b.members();
    let seen_by_a = a.members();
    assert_eq!(seen_by_b.len(), 1);
    assert_eq!(seen_by_b[0].clock_offset_ms, Some(300_000));
    assert_eq!(seen_by_a[0].clock_offset_ms, Some(-300_000));
}

#[test]
fn heartbeats_without_wall_time_give_no_offset() {
    let t0 = Instant::now();
    // `a` sends no wall time (an older peer, or no wall clock configured).
    let mut a = Endpoint::new(config(1, None), t0);
    let mut b = Endpoint::new(config(2, Some(WallClock::simulated(t0))), t0);
    let mut now = t0;
    for _ in 0..3 {
        exchange(&mut a, &mut b, now);
        now += Duration::from_millis(250);
    }
    assert_eq!(b.members().len(), 1);
    assert_eq!(b.members()[0].clock_offset_ms, None);
    // And `a`, having no wall clock of its own, measures nothing either.
    assert_eq!(a.members()[0].clock_offset_ms, None);
}
