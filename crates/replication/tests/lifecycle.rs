//! `NodeCore`'s lifecycle and write path in the simulator: shutdown drains (waits for a
//! member that is catching up, gives up at `DRAIN_MAX`), says goodbye, lingers and closes;
//! write back-pressure; persistence as an output and acknowledgement after it.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_replication::chorus_protocol::{ClusterId, Config, Incarnation, NodeId};
use chorus_replication::{
    CoreError, DRAIN_MAX, DurableError, GOODBYE_LINGER, Lifecycle, Loaded, NodeConfig, NodeCore,
    NodeEvent, Op, Origin, Persist, WallClock,
};
use chorus_sim::{LinkConfig, Sim, SimConfig};
use common::{Disks, SimNode, sim, sim_durable};

fn lifecycle(s: &mut Sim<SimNode>, i: usize) -> Lifecycle {
    s.act(i, |m, _| m.core.lifecycle()).unwrap()
}

fn put(key: &str) -> Vec<Op> {
    vec![Op::put(key, Bytes::from("v"))]
}

#[test]
fn shutdown_waits_for_a_member_that_is_catching_up_then_says_goodbye() {
    let mut s = sim(SimConfig::new(21, 2).with_link(LinkConfig::lan()), |_| {});
    s.run_for(Duration::from_secs(1));
    // Half of what node 0 sends is lost on the way to node 1: it catches up by NAKs.
    s.set_link(0, 1, LinkConfig::lan().with_loss(0.5));
    s.act(0, |m, now| {
        for i in 0..50 {
            m.core.put(now, format!("k/{i}"), "v").unwrap();
        }
        m.core.shutdown(now);
        assert!(matches!(m.core.lifecycle(), Lifecycle::Draining { .. }));
        assert!(!m.core.accepts_writes());
        assert_eq!(m.core.put(now, "late", "v"), Err(CoreError::Closed));
    });
    let mut drained_with = None;
    for _ in 0..400 {
        s.run_for(Duration::from_millis(5));
        if !matches!(lifecycle(&mut s, 0), Lifecycle::Draining { .. }) {
            drained_with = Some(s.node(1).machine().unwrap().core.store().len());
            break;
        }
    }
    assert_eq!(
        drained_with,
        Some(50),
        "goodbye only once the member has everything"
    );
    s.run_for(GOODBYE_LINGER + Duration::from_millis(10));
    assert_eq!(lifecycle(&mut s, 0), Lifecycle::Closed);
    assert_eq!(s.act(0, |m, _| m.core.poll_timeout()).unwrap(), None);
    // The goodbye got out: node 1 saw node 0 leave.
    s.run_for(Duration::from_millis(100));
    assert!(s.node(1).machine().unwrap().core.members().is_empty());
}

#[test]
fn shutdown_gives_up_waiting_at_the_drain_deadline() {
    let mut s = sim(SimConfig::new(22, 2).with_link(LinkConfig::lan()), |_| {});
    s.run_for(Duration::from_secs(1));
    // Node 1 hears nothing from node 0: node 0's window never empties.
    s.set_link(0, 1, LinkConfig::lan().with_loss(1.0));
    let started = s
        .act(0, |m, now| {
            m.core.put(now, "stuck", "v").unwrap();
            m.core.shutdown(now);
            now
        })
        .unwrap();
    assert_eq!(
        lifecycle(&mut s, 0),
        Lifecycle::Draining {
            deadline: started + DRAIN_MAX
        }
    );
    s.run_for(DRAIN_MAX - Duration::from_millis(100));
    assert!(matches!(lifecycle(&mut s, 0), Lifecycle::Draining { .. }));
    s.run_for(Duration::from_millis(100));
    assert_eq!(
        lifecycle(&mut s, 0),
        Lifecycle::Lingering {
            deadline: started + DRAIN_MAX + GOODBYE_LINGER
        },
        "the deadline comes out of poll_timeout"
    );
    s.run_for(GOODBYE_LINGER);
    assert_eq!(lifecycle(&mut s, 0), Lifecycle::Closed);
}

#[test]
fn with_nothing_in_flight_shutdown_says_goodbye_at_once_then_lingers() {
    let mut s = sim(SimConfig::new(23, 2).with_link(LinkConfig::lan()), |_| {});
    s.run_for(Duration::from_secs(1));
    let at = s
        .act(0, |m, now| {
            m.core.shutdown(now);
            now
        })
        .unwrap();
    assert_eq!(
        lifecycle(&mut s, 0),
        Lifecycle::Lingering {
            deadline: at + GOODBYE_LINGER
        }
    );
    s.run_for(GOODBYE_LINGER - Duration::from_millis(1));
    assert!(matches!(lifecycle(&mut s, 0), Lifecycle::Lingering { .. }));
    s.run_for(Duration::from_millis(1));
    assert_eq!(lifecycle(&mut s, 0), Lifecycle::Closed);
    s.run_for(Duration::from_millis(100));
    let left = s.node(1).machine().unwrap().core.members().is_empty();
    assert!(left, "the goodbye reached the peer");
}

#[test]
fn writes_are_refused_while_the_write_backlog_is_full_and_taken_again_after() {
    let mut s = sim(SimConfig::new(24, 2).with_link(LinkConfig::lan()), |nc| {
        nc.protocol.window_max_messages = std::num::NonZeroUsize::new(4).unwrap();
        nc.max_write_backlog_bytes = 4096;
    });
    s.run_for(Duration::from_secs(1));
    let taken = s
        .act(0, |m, now| {
            let mut n = 0;
            while m.core.accepts_writes() {
                m.core.put(now, format!("k/{n}"), vec![b'x'; 100]).unwrap();
                n += 1;
                assert!(n < 10_000, "back-pressure never set in");
            }
            assert!(m.core.write_backlog_bytes() >= 4096);
            n
        })
        .unwrap();
    assert!(taken > 4);
    let mut open_again = false;
    for _ in 0..200 {
        s.run_for(Duration::from_millis(10));
        if s.act(0, |m, _| m.core.accepts_writes()).unwrap() {
            open_again = true;
            break;
        }
    }
    assert!(open_again, "the backlog drained and writes are taken again");
}

/// A lone durable `NodeCore`, outside the simulator.
fn durable_core(now: Instant) -> NodeCore {
    let proto = Config::lossy(ClusterId::from_name("acks"), NodeId(1), Incarnation(1), 5);
    NodeCore::restore(
        NodeConfig::new(proto, WallClock::simulated(now)),
        now,
        Loaded::default(),
    )
}

fn acks(core: &mut NodeCore) -> Vec<(u64, Result<chorus_replication::Version, CoreError>)> {
    let mut out = Vec::new();
    while let Some(e) = core.poll_event() {
        if let NodeEvent::Acked { ticket, result } = e {
            out.push((ticket, result));
        }
    }
    out
}

#[test]
fn a_write_is_acknowledged_only_once_its_record_is_persisted() {
    let now = Instant::now();
    let mut core = durable_core(now);
    let v1 = core.batch(now, put("a"), 7).unwrap();
    let v2 = core.batch(now, put("b"), 8).unwrap();
    assert_eq!(acks(&mut core), [], "nothing is durable yet");
    assert_eq!(core.unacknowledged(), 2);
    let mut seqs = Vec::new();
    while let Some(item) = core.poll_persist() {
        match item {
            Persist::Append { seq, origin, .. } => {
                assert_eq!(origin, Origin::Local);
                seqs.push(seq);
            }
            Persist::SyncAll => panic!("no sync before the node closes"),
        }
    }
    assert_eq!(seqs, [1, 2]);
    core.handle_persisted(1);
    assert_eq!(acks(&mut core), [(7, Ok(v1))]);
    core.handle_persisted(2);
    assert_eq!(acks(&mut core), [(8, Ok(v2))]);
    // A refused write is answered at once, with its error.
    assert!(core.batch(now, put(""), 9).is_err());
    assert_eq!(
        acks(&mut core),
        [(
            9,
            Err(CoreError::Replica(chorus_replication::Error::EmptyKey))
        )]
    );
}

#[test]
fn without_a_durable_store_a_write_is_acknowledged_at_once() {
    let now = Instant::now();
    let proto = Config::lossy(ClusterId::from_name("acks"), NodeId(1), Incarnation(1), 5);
    let mut core = NodeCore::new(NodeConfig::new(proto, WallClock::simulated(now)), now);
    let v = core.batch(now, put("a"), 3).unwrap();
    assert_eq!(acks(&mut core), [(3, Ok(v))]);
    assert_eq!(core.poll_persist(), None);
}

#[test]
fn a_failed_store_fails_the_waiting_writes_and_every_later_one() {
    let now = Instant::now();
    let mut core = durable_core(now);
    core.batch(now, put("a"), 1).unwrap();
    while core.poll_persist().is_some() {}
    let error = DurableError::Io {
        op: "fsync",
        path: "wal".into(),
        source: std::sync::Arc::new(std::io::Error::other("disk on fire")),
    };
    core.handle_persist_failed(error.clone());
    assert_eq!(acks(&mut core), [(1, Err(CoreError::Durability(error)))]);
    // Later writes are applied (and replicated) but answered with the failure at once.
    core.batch(now, put("b"), 2).unwrap();
    let later = acks(&mut core);
    assert!(
        matches!(
            &later[..],
            [(2, Err(CoreError::Durability(DurableError::Failed(_))))]
        ),
        "{later:?}"
    );
    assert!(core.store().get("b").is_some());
}

#[test]
fn a_closing_node_ends_its_persist_output_with_one_sync() {
    let now = Instant::now();
    let mut core = durable_core(now);
    core.batch(now, put("a"), 1).unwrap();
    core.shutdown(now);
    // Alone, its message is never confirmed by a member: it drains until the deadline.
    assert!(matches!(core.lifecycle(), Lifecycle::Draining { .. }));
    core.handle_timeout(now + DRAIN_MAX);
    assert!(matches!(core.lifecycle(), Lifecycle::Lingering { .. }));
    assert!(
        core.poll_persist().is_some(),
        "the record is still handed out"
    );
    assert_eq!(core.poll_persist(), None, "no sync before closed");
    core.handle_timeout(now + DRAIN_MAX + GOODBYE_LINGER);
    assert_eq!(core.lifecycle(), Lifecycle::Closed);
    assert_eq!(core.poll_persist(), Some(Persist::SyncAll));
    assert_eq!(core.poll_persist(), None, "one sync only");
}

#[test]
fn a_closing_node_hands_out_its_records_before_the_sync() {
    let now = Instant::now();
    let mut core = durable_core(now);
    core.batch(now, put("a"), 1).unwrap();
    core.close(now);
    core.handle_timeout(now + GOODBYE_LINGER);
    assert_eq!(core.lifecycle(), Lifecycle::Closed);
    let items: Vec<Persist> = std::iter::from_fn(|| core.poll_persist()).collect();
    assert!(matches!(items[0], Persist::Append { seq: 1, .. }));
    assert_eq!(items[1..], [Persist::SyncAll]);
}

#[test]
fn in_the_simulator_writes_are_acknowledged_after_the_disk_sync_and_receivers_persist_them() {
    let disks = Disks::default();
    let mut s = sim_durable(
        SimConfig::new(25, 2).with_link(LinkConfig::lan()),
        |_| {},
        disks.clone(),
    );
    s.run_for(Duration::from_secs(1));
    let version = s
        .act(0, |m, now| {
            let v = m.core.batch(now, put("k"), 42).unwrap();
            m.drain();
            assert!(m.acked.is_empty(), "acknowledged before the disk sync");
            v
        })
        .unwrap();
    s.run_for(Duration::from_secs(1));
    let m = s.node(0).machine().unwrap();
    assert_eq!(m.acked, [(42, Ok(version))]);
    let on_disk = |i: usize| {
        disks.borrow()[&i]
            .borrow()
            .durable_state()
            .get("k")
            .map(|e| e.1)
    };
    assert_eq!(on_disk(0), Some(version));
    assert_eq!(on_disk(1), Some(version), "the receiver persisted it too");
}
