//! Membership: join, suspicion, timeout and rejoin, restart, goodbye.

use super::*;

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
    net.set_filter(|from, _, _| from != 1);
    net.run_for(Duration::from_secs(2));
    assert!(net.events[0].contains(&Event::MemberSuspected {
        node: NodeId(2),
        incarnation: Incarnation(1)
    }));
    assert_eq!(net.node(0).members()[0].state, MemberState::Suspected);
    net.set_filter(|_, _, _| true);
    net.run_for(Duration::from_millis(300));
    assert!(net.events[0].contains(&Event::MemberAlive {
        node: NodeId(2),
        incarnation: Incarnation(1)
    }));
    net.set_filter(|from, _, _| from != 1);
    net.run_for(Duration::from_secs(6));
    assert!(net.events[0].contains(&Event::MemberLeft {
        node: NodeId(2),
        incarnation: Incarnation(1),
        reason: LeaveReason::Timeout
    }));
    assert!(net.node(0).members().is_empty());
    // It comes back (same incarnation, partition healed): joined again.
    net.set_filter(|_, _, _| true);
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
    net.start(1, config(1, 2));
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
fn member_back_from_timeout_resumes_its_stream() {
    let mut net = Net::new(vec![config(0, 1), config(1, 1), config(2, 1)]);
    net.run_for(JOIN);
    for i in 1..=3 {
        net.send(0, msg(i));
        net.run_for(Duration::from_millis(5));
    }
    // Node 2 is cut off long enough for everyone to time it out, while node 0 sends more.
    net.set_filter(|from, to, _| from != 2 && to != 2);
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
    net.set_filter(|_, _, _| true);
    net.run_for(Duration::from_secs(1));
    // 4..=10 were released by node 0 once it dropped node 2, so node 2 learns they are lost;
    // either way nothing is skipped silently.
    assert_stream(&net, 2, NodeId(1), 10);
    assert_eq!(net.lost(2), vec![4..=10]);
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
    net.start(1, config(1, 10));
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
fn a_starting_node_and_its_peer_join_each_other_within_one_interval() {
    let mut net = Net::new(vec![config(0, 1)]);
    net.run_for(Duration::from_millis(250));
    net.start(1, config(1, 1));
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
    net.set_filter(|from, _, b| !(from == 0 && is_first_data(b)));
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
    net.set_filter(|from, _, b| !(from == 0 && is_first_data(b)));
    let now = net.now;
    net.node(0).send(now, msg(1)).unwrap();
    net.node(0).close(now);
    net.run_for(Duration::from_millis(50));
    assert_eq!(net.lost(1), vec![1..=1]);
    assert!(net.node(1).members().is_empty());
}
