//! Clock safety: a node never acknowledges a write its peers will drop for being from the
//! future, does not report in sync while its store differs from a peer's, and a history
//! loaded from the future is kept but not written on until the clock catches up.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_replication::{
    ClockCause, CoreError, Error, Hlc, Loaded, NodeCore, Replica, ReplicaConfig, Version,
};
use chorus_sim::{LinkConfig, SimConfig};
use common::{SimNode, sim, sim_with};

/// Five minutes, the skew of the report.
const AHEAD_MS: u64 = 300_000;
/// The simulator's wall clock at its epoch (`WallClock::simulated`).
const SIM_EPOCH_MS: u64 = 1_700_000_000_000;

fn value(core: &NodeCore, key: &str) -> Option<Bytes> {
    core.store().get(key)
}

fn node(s: &chorus_sim::Sim<SimNode>, i: usize) -> &SimNode {
    s.node(i).machine().unwrap()
}

#[test]
fn a_node_ahead_of_every_peer_refuses_writes_and_stores_that_differ_are_not_in_sync() {
    // Node 1 (index 0) runs five minutes ahead.
    let mut s = sim(SimConfig::new(51, 2).with_link(LinkConfig::lan()), |nc| {
        if nc.protocol.node.0 == 1 {
            nc.wall_clock.epoch_ms += AHEAD_MS;
        }
    });
    // Before it heard any peer a node cannot know its clock is wrong: this write is taken.
    let early = s.act(0, |m, now| m.core.put(now, "early", "from the future"));
    assert!(early.unwrap().is_ok());
    s.run_for(Duration::from_secs(2));
    assert_eq!(node(&s, 0).core.members().len(), 1);
    let offset = node(&s, 0).core.members()[0].clock_offset_ms.unwrap();
    assert!(
        (-(AHEAD_MS as i64) - 50..=-(AHEAD_MS as i64)).contains(&offset),
        "{offset}"
    );

    // Once it has heard its peer, it refuses instead of acknowledging a write that peer drops.
    let refused = s.act(0, |m, now| m.core.put(now, "late", "lost?")).unwrap();
    match refused {
        Err(CoreError::Replica(Error::ClockAhead {
            offset_ms,
            bound_ms,
            cause,
        })) => {
            assert!(
                (AHEAD_MS..AHEAD_MS + 100).contains(&offset_ms),
                "{offset_ms}"
            );
            assert_eq!(bound_ms, 59_000);
            assert_eq!(cause, ClockCause::WallClock);
        }
        other => panic!("a write the peer will drop was not refused: {other:?}"),
    }
    assert!(value(&node(&s, 0).core, "late").is_none());
    assert_eq!(node(&s, 0).core.stats().replication.clock_refused, 1);
    assert!(node(&s, 0).core.stats().clock_refusing);
    // The healthy node writes; the skewed one takes it (it lies in its past).
    let healthy = s.act(1, |m, now| m.core.put(now, "healthy", "ok")).unwrap();
    assert!(healthy.is_ok());

    // While "early" is ahead of node 2's clock, node 2 drops it: the stores differ, and
    // neither node may say it is in sync.
    let mut differed = 0;
    while s.elapsed() < Duration::from_secs(200) {
        s.run_for(Duration::from_millis(500));
        let (a, b) = (node(&s, 0), node(&s, 1));
        assert!(
            !a.in_sync,
            "the skewed node reported in sync at {:?}",
            s.elapsed()
        );
        if s.elapsed() > Duration::from_secs(5) && a.contents() != b.contents() {
            differed += 1;
            assert!(
                !b.in_sync,
                "in sync while the stores differ, at {:?}",
                s.elapsed()
            );
        }
    }
    assert!(
        differed > 300,
        "the stores should differ for a while ({differed})"
    );
    assert!(node(&s, 1).core.stats().replication.drift_rejected > 0);
    assert_eq!(value(&node(&s, 0).core, "healthy"), Some(Bytes::from("ok")));

    // Once node 2's clock reaches it (within the drift bound), anti-entropy brings "early"
    // over: every acknowledged write is on both nodes, and the healthy one is in sync.
    let converged = (0..400).any(|_| {
        s.run_for(Duration::from_millis(500));
        node(&s, 0).contents() == node(&s, 1).contents() && node(&s, 1).in_sync
    });
    assert!(converged, "no convergence by {:?}", s.elapsed());
    for i in 0..2 {
        let core = &node(&s, i).core;
        assert_eq!(value(core, "early"), Some(Bytes::from("from the future")));
        assert_eq!(value(core, "healthy"), Some(Bytes::from("ok")));
        assert!(value(core, "late").is_none());
    }
    // The skewed node keeps refusing and keeps reporting not in sync: its clock is still wrong.
    assert!(!node(&s, 0).in_sync);
    let again = s.act(0, |m, now| m.core.put(now, "late", "x")).unwrap();
    assert!(matches!(
        again,
        Err(CoreError::Replica(Error::ClockAhead { .. }))
    ));
}

#[test]
fn one_peer_with_a_slow_clock_does_not_stop_the_others_and_nobody_claims_sync_meanwhile() {
    // Node 3 (index 2) runs five minutes behind; nodes 1 and 2 agree with each other.
    let mut s = sim(SimConfig::new(52, 3).with_link(LinkConfig::lan()), |nc| {
        if nc.protocol.node.0 == 3 {
            nc.wall_clock.epoch_ms -= AHEAD_MS;
        }
    });
    assert!(common::run_until_settled(
        &mut s,
        Duration::from_millis(100),
        Duration::from_secs(20)
    ));
    // Node 1 is five minutes ahead of node 3, but not of node 2: it writes.
    let ok = s.act(0, |m, now| m.core.put(now, "k", "v")).unwrap();
    assert!(ok.is_ok(), "{ok:?}");
    // The slow node's writes are in everyone's past: taken.
    let slow = s.act(2, |m, now| m.core.put(now, "s", "v")).unwrap();
    assert!(slow.is_ok(), "{slow:?}");
    // Within a second every node knows the stores differ (node 3 drops "k" for now), and
    // none says it is in sync while they do.
    s.run_for(Duration::from_secs(1));
    while s.elapsed() < Duration::from_secs(120) {
        for i in 0..3 {
            assert!(
                !node(&s, i).in_sync,
                "node {} in sync while node 3 lacks \"k\", at {:?}",
                i + 1,
                s.elapsed()
            );
        }
        s.run_for(Duration::from_millis(200));
    }
    assert!(value(&node(&s, 1).core, "k").is_some());
    assert!(value(&node(&s, 1).core, "s").is_some());
    assert!(value(&node(&s, 2).core, "k").is_none());
    // When node 3's clock reaches "k", everyone converges and is in sync again.
    assert!(common::run_until_settled(
        &mut s,
        Duration::from_millis(500),
        Duration::from_secs(300)
    ));
    assert!(value(&node(&s, 2).core, "k").is_some());
}

/// A `Loaded` holding one entry stamped `ahead_ms` after the simulator's epoch.
fn future_history(ahead_ms: u64) -> Loaded {
    Loaded {
        entries: vec![(
            "from/the/future".to_owned(),
            Some(Bytes::from("kept")),
            Version {
                hlc: Hlc::new(SIM_EPOCH_MS + ahead_ms, 0),
                node: 1,
            },
            Default::default(),
        )],
        last_wall_ms: SIM_EPOCH_MS + ahead_ms,
        ..Loaded::default()
    }
}

#[test]
fn a_history_from_the_future_is_kept_but_not_written_on_until_the_clock_catches_up() {
    let t0 = Instant::now();
    let cfg = ReplicaConfig::new(1, 7);
    let mut r = Replica::restore(cfg, t0, SIM_EPOCH_MS, future_history(AHEAD_MS));
    assert_eq!(r.get("from/the/future"), Some(Bytes::from("kept")));
    match r.put(SIM_EPOCH_MS, "k", "v") {
        Err(Error::ClockAhead {
            offset_ms,
            bound_ms,
            cause,
        }) => {
            assert_eq!(offset_ms, AHEAD_MS);
            assert_eq!(bound_ms, 59_000);
            assert_eq!(cause, ClockCause::History);
            let text = Error::ClockAhead {
                offset_ms,
                bound_ms,
                cause,
            }
            .to_string();
            assert!(
                text.contains("local history") && text.contains("300000"),
                "{text}"
            );
        }
        other => panic!("a write stamped from the future history was taken: {other:?}"),
    }
    assert!(r.get("k").is_none());
    // Still refused just short of the bound, taken once the clock is within it.
    assert!(
        r.put(SIM_EPOCH_MS + AHEAD_MS - 59_000 - 1, "k", "v")
            .is_err()
    );
    let v = r.put(SIM_EPOCH_MS + AHEAD_MS - 59_000, "k", "v").unwrap();
    assert!(v.hlc > Hlc::new(SIM_EPOCH_MS + AHEAD_MS, 0));
    assert_eq!(r.stats().clock_refused, 2);
}

#[test]
fn a_restored_future_history_reaches_peers_once_their_clocks_do() {
    // Node 1 (index 0) restarts from a data directory written while its clock was five
    // minutes ahead; its clock is right now.
    let mut s = sim_with(
        SimConfig::new(53, 2).with_link(LinkConfig::lan()),
        |_| {},
        |spawn, nc| {
            if spawn.index == 0 {
                NodeCore::restore(nc, spawn.now, future_history(AHEAD_MS))
            } else {
                NodeCore::new(nc, spawn.now)
            }
        },
    );
    s.run_for(Duration::from_secs(2));
    let refused = s.act(0, |m, now| m.core.put(now, "k", "v")).unwrap();
    assert!(
        matches!(
            refused,
            Err(CoreError::Replica(Error::ClockAhead {
                cause: ClockCause::History,
                ..
            }))
        ),
        "{refused:?}"
    );
    s.run_for(Duration::from_secs(20));
    // Kept where it was loaded, dropped by the peer for now; neither is in sync.
    assert!(value(&node(&s, 0).core, "from/the/future").is_some());
    assert!(value(&node(&s, 1).core, "from/the/future").is_none());
    assert!(!node(&s, 0).in_sync && !node(&s, 1).in_sync);
    // Once the clocks reach it, the peer takes it and the restored node writes again.
    let converged = (0..600).any(|_| {
        s.run_for(Duration::from_millis(500));
        value(&node(&s, 1).core, "from/the/future").is_some()
            && node(&s, 0).in_sync
            && node(&s, 1).in_sync
    });
    assert!(converged, "no convergence by {:?}", s.elapsed());
    let ok = s.act(0, |m, now| m.core.put(now, "k", "v")).unwrap();
    assert!(ok.is_ok(), "{ok:?}");
}
