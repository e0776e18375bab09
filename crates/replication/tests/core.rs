//! `NodeCore` over chorus-sim: routing between protocol and replica, backlog, membership.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use chorus_replication::{CoreError, Error, Op};
use chorus_sim::{LinkConfig, SimConfig};
use common::{run_until_settled, settled, sim};

#[test]
fn writes_replicate_to_every_node_and_events_flow() {
    let mut s = sim(SimConfig::new(11, 3).with_link(LinkConfig::lan()), |_| {});
    s.run_for(Duration::from_secs(1));
    s.act(0, |m, now| m.core.put(now, "a", "1").unwrap());
    s.run_for(Duration::from_millis(100));
    s.act(1, |m, now| {
        m.core
            .batch(
                now,
                vec![Op::put("b", Bytes::from("2")), Op::delete("a")],
                1,
            )
            .unwrap()
    });
    assert!(run_until_settled(
        &mut s,
        Duration::from_millis(100),
        Duration::from_secs(10)
    ));
    for i in 0..3 {
        let m = s.node(i).machine().unwrap();
        assert_eq!(m.core.store().get("b"), Some(Bytes::from("2")));
        assert_eq!(m.core.store().get("a"), None);
        assert_eq!(m.changes, 3, "node {i}");
        assert_eq!(m.core.members().len(), 2);
        assert!(m.order_violations.is_empty());
        let stats = m.core.stats();
        assert!(stats.protocol.messages_delivered >= 2);
    }
}

#[test]
fn full_send_window_queues_writes_instead_of_dropping_them() {
    let mut s = sim(SimConfig::new(12, 2).with_link(LinkConfig::lan()), |nc| {
        nc.protocol.window_max_messages = std::num::NonZeroUsize::new(4).unwrap();
    });
    s.run_for(Duration::from_secs(1));
    let backlog = s
        .act(0, |m, now| {
            for i in 0..200 {
                m.core.put(now, format!("k/{i}"), "v").unwrap();
            }
            m.core.stats().write_backlog
        })
        .unwrap();
    assert!(backlog > 0, "the window never filled");
    assert!(run_until_settled(
        &mut s,
        Duration::from_millis(100),
        Duration::from_secs(20)
    ));
    assert_eq!(s.node(1).machine().unwrap().core.store().len(), 200);
    assert_eq!(s.node(0).machine().unwrap().core.stats().write_backlog, 0);
}

#[test]
fn commands_after_close_fail_and_limits_surface() {
    let mut s = sim(SimConfig::new(13, 2).with_link(LinkConfig::lan()), |_| {});
    s.run_for(Duration::from_secs(1));
    let err = s
        .act(0, |m, now| m.core.put(now, "", "x").unwrap_err())
        .unwrap();
    assert_eq!(err, CoreError::Replica(Error::EmptyKey));
    s.act(0, |m, now| {
        m.core.put(now, "last", "words").unwrap();
        m.core.close(now);
        assert_eq!(m.core.put(now, "k", "v"), Err(CoreError::Closed));
    });
    s.run_for(Duration::from_secs(2));
    assert_eq!(
        s.node(1).machine().unwrap().core.store().get("last"),
        Some(Bytes::from("words"))
    );
}

#[test]
fn restarted_node_catches_up_and_reports_in_sync() {
    let mut s = sim(
        SimConfig::new(14, 3).with_link(LinkConfig::lan().with_loss(0.1)),
        |_| {},
    );
    s.run_for(Duration::from_secs(1));
    for i in 0..100 {
        s.act(i % 2, |m, now| {
            m.core.put(now, format!("k/{i}"), "v").unwrap()
        });
        s.run_for(Duration::from_millis(5));
    }
    s.restart(2);
    assert!(!settled(&s));
    assert!(run_until_settled(
        &mut s,
        Duration::from_millis(100),
        Duration::from_secs(30)
    ));
    let m = s.node(2).machine().unwrap();
    assert_eq!(m.core.store().len(), 100);
    assert!(m.in_sync);
}
