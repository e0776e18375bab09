//! Bounds against hostile senders: receive budget, member and candidate tables, repair
//! amplification.

use super::*;

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
fn fragment_flood_from_fresh_ids_stays_within_the_budget_and_spares_members() {
    let budget = 4 << 20;
    let mut configs = vec![config(0, 1), config(1, 1)];
    configs[1].receive_budget_bytes = budget;
    let mut net = Net::new(configs);
    net.run_for(JOIN);
    let mut loss = ChaCha8Rng::seed_from_u64(21);
    net.set_filter(move |from, _, b| !(from == 0 && is_first_data(b)) || loss.random_bool(0.9));
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
    assert_eq!(net.node(1).receive_memory(), SENDER_OVERHEAD);
}

#[test]
fn membership_stays_bounded_under_heartbeats_from_fresh_ids() {
    let mut net = Net::new(vec![config(0, 1), config(1, 1)]);
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
            net.start(2, config(2, 1));
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
fn a_fresh_id_gets_at_most_three_times_its_bytes_in_repairs() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    // Node 1 goes quiet towards node 0, so node 0 keeps its whole window.
    net.set_filter(|from, _, _| from != 1);
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
    net.set_filter(|from, _, _| from != 1);
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
    net.set_filter(move |from, _, _| {
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
