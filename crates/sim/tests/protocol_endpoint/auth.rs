//! Authenticated encryption: sealed traffic, wrong keys, tampering, replays, stale
//! incarnations, key rotation, forgeries.

use super::*;

fn ring(id: u16, fill: u8) -> Keyring {
    Keyring::single(Key::new(
        KeyId::new(id).unwrap(),
        [fill; chorus_protocol::auth::KEY_LEN],
    ))
}

fn ring2(send: u16, keys: &[(u16, u8)]) -> Keyring {
    Keyring::new(
        KeyId::new(send).unwrap(),
        keys.iter()
            .map(|&(id, fill)| {
                Key::new(
                    KeyId::new(id).unwrap(),
                    [fill; chorus_protocol::auth::KEY_LEN],
                )
            })
            .collect(),
    )
    .unwrap()
}

fn keyed(i: usize, incarnation: u64, keyring: &Keyring) -> Config {
    Config {
        keyring: Some(keyring.clone()),
        ..config(i, incarnation)
    }
}

/// Seals a plain datagram as a holder of `keyring` would.
fn seal_with(keyring: &Keyring, plain: &[u8], counter: u64) -> Bytes {
    wire::seal(plain, keyring, counter).unwrap()
}

/// Opens a sealed datagram (for the tests' inspection of what went on the wire).
fn open_with(keyring: &Keyring, sealed: &Bytes) -> Kind {
    wire::open(sealed, usize::MAX, CLUSTER, keyring)
        .expect("authentic datagram")
        .1
        .kind
        .expect("kind")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn membership_events(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| !matches!(e, Event::Delivered { .. } | Event::Writable))
        .count()
}

/// Frames an attacker without the key would forge against member node 2 (incarnation 1).
fn forgeries(k_wrong: &Keyring) -> Vec<Bytes> {
    let h = Header::new(CLUSTER, NodeId(2), Incarnation(1));
    let newer = Header::new(CLUSTER, NodeId(2), Incarnation(99));
    let goodbye = proto::Frame {
        kind: Some(Kind::Goodbye(proto::Goodbye { highest_sent: 1 })),
    };
    // A heartbeat that would declare 1..1000 lost.
    let heartbeat = proto::Frame {
        kind: Some(Kind::Heartbeat(proto::Heartbeat {
            highest_sent: 1000,
            low_retained: 1000,
            delivered: vec![],
            wall_ms: 0,
            name: Default::default(),
        })),
    };
    let mut out = Vec::new();
    for header in [h, newer] {
        for frame in [&goodbye, &heartbeat] {
            let plain = wire::encode(&header, frame);
            out.push(plain.clone());
            out.push(seal_with(k_wrong, &plain, 1 << 40));
        }
        out.push(wire::encode_data(&header, 2, [msg(666)].iter(), None));
    }
    out
}
#[test]
fn sealed_pair_delivers_and_shows_no_plaintext() {
    let k = ring(1, 0x11);
    let mut net = Net::new(vec![keyed(0, 1, &k), keyed(1, 1, &k)]);
    net.run_for(JOIN);
    for i in 1..=300 {
        net.send(0, msg(i));
    }
    net.send(0, Bytes::from(vec![0x5A; 100_000])); // fragmented
    net.run_for(Duration::from_millis(100));
    let got = net.delivered(1, NodeId(1));
    assert_eq!(got.len(), 301);
    for (seq, payload) in &got[..300] {
        assert_eq!(payload, &msg(*seq));
    }
    assert_eq!(got[300].1.len(), 100_000);
    assert!(!net.sent.is_empty());
    for (_, d) in &net.sent {
        assert!(d.len() <= 1400, "sealed datagram {} > mtu", d.len());
        assert_eq!(u16::from_be_bytes([d[6], d[7]]), 1, "key id");
        assert_eq!(u16::from_be_bytes([d[8], d[9]]), 16, "tag length");
        assert!(!contains(d, b"message 1"), "plaintext on the wire");
        assert!(!contains(d, &[0x5A; 16]), "plaintext fragment on the wire");
        // ... but it is all there for a key holder.
        let _ = open_with(&k, d);
    }
    let st = net.node(1).stats().clone();
    assert_eq!(
        (
            st.auth_failed,
            st.unknown_key,
            st.replayed,
            st.unauthenticated
        ),
        (0, 0, 0, 0)
    );
    // Each datagram of one sender carries a fresh counter (the nonce's last 8 bytes).
    let mut counters: Vec<u64> = net
        .sent
        .iter()
        .filter(|(from, _)| *from == 0)
        .map(|(_, d)| u64::from_be_bytes(d[40..48].try_into().unwrap()))
        .collect();
    let n = counters.len();
    counters.sort_unstable();
    counters.dedup();
    assert_eq!(counters.len(), n, "a counter (nonce) was reused");
}

#[test]
fn wrong_or_missing_key_is_refused_and_counted() {
    // Same key id, another secret: the tag fails.
    let mut net = Net::new(vec![
        keyed(0, 1, &ring(1, 0x11)),
        keyed(1, 1, &ring(1, 0x22)),
    ]);
    net.run_for(JOIN);
    net.send(0, msg(1));
    net.run_for(Duration::from_millis(500));
    assert!(net.node(1).members().is_empty());
    assert!(net.events[1].is_empty(), "{:?}", net.events[1]);
    assert!(net.node(1).stats().auth_failed >= 3);
    assert_eq!(net.node(1).stats().messages_delivered, 0);

    // Another key id: unknown key.
    let mut net = Net::new(vec![
        keyed(0, 1, &ring(1, 0x11)),
        keyed(1, 1, &ring(2, 0x11)),
    ]);
    net.run_for(Duration::from_millis(500));
    assert!(net.node(1).members().is_empty());
    assert!(net.node(1).stats().unknown_key >= 3);

    // No key against a key, both ways: unauthenticated.
    let mut net = Net::new(vec![config(0, 1), keyed(1, 1, &ring(1, 0x11))]);
    net.run_for(JOIN);
    net.send(0, msg(1));
    net.run_for(Duration::from_millis(500));
    assert!(net.node(0).members().is_empty());
    assert!(net.node(1).members().is_empty());
    assert!(net.node(0).stats().unauthenticated >= 3);
    assert!(net.node(1).stats().unauthenticated >= 3);
    assert_eq!(net.node(1).stats().messages_delivered, 0);
}

#[test]
fn replayed_datagrams_are_rejected_and_counted() {
    let k = ring(1, 0x11);
    let mut net = Net::new(vec![keyed(0, 1, &k), keyed(1, 1, &k)]);
    net.run_for(JOIN);
    for i in 1..=50 {
        net.send(0, msg(i));
    }
    net.run_for(Duration::from_millis(300));
    assert_stream(&net, 1, NodeId(1), 50);
    let before = net.node(1).stats().clone();
    let events_before = net.events[1].len();
    let captured: Vec<Bytes> = net
        .sent
        .iter()
        .filter(|(from, _)| *from == 0)
        .map(|(_, d)| d.clone())
        .collect();
    let now = net.now;
    for d in &captured {
        net.node(1).handle_datagram(now, addr(0), d);
    }
    net.flush();
    let after = net.node(1).stats().clone();
    assert_eq!(after.replayed - before.replayed, captured.len() as u64);
    assert_eq!(after.messages_delivered, before.messages_delivered);
    assert_eq!(
        after.duplicates, before.duplicates,
        "replays reached the stream"
    );
    assert_eq!(after.heartbeats_received, before.heartbeats_received);
    assert_eq!(net.events[1].len(), events_before);
}

#[test]
fn older_incarnation_is_rejected_once_a_newer_is_seen() {
    let k = ring(1, 0x11);
    let mut net = Net::new(vec![keyed(0, 1, &k), keyed(1, 1, &k)]);
    net.run_for(JOIN);
    net.send(1, msg(1));
    net.run_for(Duration::from_millis(300));
    let old: Vec<Bytes> = net
        .sent
        .iter()
        .filter(|(from, _)| *from == 1)
        .map(|(_, d)| d.clone())
        .collect();
    // Node 1 restarts. Once node 0 has authenticated the new incarnation, every datagram of
    // the old one, replayed, is refused as stale (whatever its counter).
    net.start(1, keyed(1, 2, &k));
    net.run_for(Duration::from_millis(300));
    assert_eq!(net.node(0).members()[0].incarnation, Incarnation(2));
    let stale = net.node(0).stats().stale_incarnation;
    let events = net.events[0].len();
    let now = net.now;
    for d in &old {
        net.node(0).handle_datagram(now, addr(1), d);
    }
    net.flush();
    assert_eq!(
        net.node(0).stats().stale_incarnation - stale,
        old.len() as u64
    );
    assert_eq!(net.events[0].len(), events);
    assert_eq!(net.node(0).members()[0].incarnation, Incarnation(2));
}

#[test]
fn key_rotation_under_traffic_loses_nothing() {
    let k1 = ring(1, 0x11);
    let mut net = Net::new((0..3).map(|i| keyed(i, 1, &k1)).collect());
    net.run_for(JOIN);
    let mut sent = [0u64; 3];
    let mut traffic = |net: &mut Net, rounds: usize| {
        for _ in 0..rounds {
            for (i, n) in sent.iter_mut().enumerate() {
                *n += 1;
                net.send(i, msg(*n));
            }
            net.run_for(Duration::from_millis(3));
        }
    };
    traffic(&mut net, 20);
    // Phase 1, node by node: accept key 2 as well, still send with key 1.
    for i in 0..3 {
        net.node(i)
            .set_keyring(ring2(1, &[(1, 0x11), (2, 0x22)]))
            .unwrap();
        traffic(&mut net, 10);
    }
    // Phase 2, node by node: send with key 2.
    for i in 0..3 {
        net.node(i)
            .set_keyring(ring2(2, &[(1, 0x11), (2, 0x22)]))
            .unwrap();
        traffic(&mut net, 10);
    }
    // Phase 3, node by node: drop key 1.
    for i in 0..3 {
        net.node(i).set_keyring(ring(2, 0x22)).unwrap();
        traffic(&mut net, 10);
    }
    net.run_for(Duration::from_millis(500));
    for i in 0..3 {
        for (j, &n) in sent.iter().enumerate() {
            if i != j {
                assert_stream(&net, i, NodeId(j as u64 + 1), n);
            }
        }
        assert!(net.lost(i).is_empty(), "node {i} lost {:?}", net.lost(i));
        let st = net.node(i).stats().clone();
        assert_eq!(
            (st.auth_failed, st.unknown_key, st.replayed),
            (0, 0, 0),
            "node {i}"
        );
        assert_eq!(
            st.members_left + st.members_restarted + st.members_suspected,
            0
        );
    }
    // Key 1 is gone: a datagram sealed with it is refused now.
    let h = Header::new(CLUSTER, NodeId(9), Incarnation(1));
    let plain = wire::encode_data(&h, 1, [msg(1)].iter(), None);
    let now = net.now;
    net.node(0)
        .handle_datagram(now, addr(2), &seal_with(&k1, &plain, 1));
    assert_eq!(net.node(0).stats().unknown_key, 1);
    // Rotation cannot turn encryption on: that needs a restart.
    let mut plain_ep = Endpoint::new(config(5, 1), now);
    assert_eq!(plain_ep.set_keyring(k1), Err(KeyringError::NotKeyed));
}

#[test]
fn forged_goodbye_or_heartbeat_cannot_evict_restart_or_suspect_a_member() {
    let k = ring(1, 0x11);
    let wrong = ring(1, 0x66);
    let mut net = Net::new(vec![keyed(0, 1, &k), keyed(1, 1, &k)]);
    net.run_for(JOIN);
    net.send(1, msg(1));
    net.run_for(Duration::from_millis(50));
    let events = membership_events(&net.events[0]);
    let before = net.node(0).stats().clone();
    let now = net.now;
    let forged = forgeries(&wrong);
    for d in &forged {
        net.node(0).handle_datagram(now, addr(7), d);
    }
    net.run_for(Duration::from_secs(3));
    assert_eq!(
        membership_events(&net.events[0]),
        events,
        "{:?}",
        net.events[0]
    );
    let m = &net.node(0).members()[0];
    assert_eq!(
        (m.incarnation, m.state, m.addr),
        (Incarnation(1), MemberState::Alive, addr(1))
    );
    assert!(net.lost(0).is_empty());
    assert_eq!(net.delivered(0, NodeId(2)), vec![(1, msg(1))]);
    let st = net.node(0).stats();
    assert_eq!(
        (st.unauthenticated - before.unauthenticated) + (st.auth_failed - before.auth_failed),
        forged.len() as u64
    );

    // The same forgeries against an unkeyed cluster do the damage (the test can fail).
    let mut net = Net::pair();
    net.run_for(JOIN);
    net.send(1, msg(1));
    net.run_for(Duration::from_millis(50));
    let now = net.now;
    for d in forgeries(&wrong) {
        net.node(0).handle_datagram(now, addr(7), &d);
    }
    net.flush();
    assert!(net.events[0].iter().any(|e| matches!(
        e,
        Event::MemberLeft {
            reason: LeaveReason::Goodbye,
            ..
        } | Event::MemberRestarted { .. }
    )));
}
