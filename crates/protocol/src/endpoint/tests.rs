//! Tests of one endpoint fed hand-made datagrams: the checks every datagram goes through
//! (framing, authentication, drops counted), and the helpers the endpoint's modules' tests
//! share. Tests over a network of endpoints are in `crates/sim/tests/protocol_endpoint`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::proto::{self, frame::Kind};
use crate::wire::{self, Header};
use crate::*;

pub(super) const CLUSTER: ClusterId = ClusterId(0xC0FFEE);

pub(super) fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8 + 1], 7400))
}

pub(super) fn config(i: usize, incarnation: u64) -> Config {
    let mut c = Config::lan(
        CLUSTER,
        NodeId(i as u64 + 1),
        Incarnation(incarnation),
        1000 + i as u64,
    );
    c.rate_bytes_per_sec = None;
    c
}

pub(super) fn frame_of(bytes: &Bytes) -> Kind {
    wire::decode(bytes, usize::MAX, CLUSTER)
        .expect("valid datagram")
        .1
        .kind
        .expect("kind")
}

/// A plain heartbeat of `node`/`incarnation` saying it sent up to `highest_sent`.
pub(super) fn heartbeat(node: NodeId, incarnation: Incarnation, highest_sent: u64) -> Bytes {
    let hb = proto::Heartbeat {
        highest_sent,
        low_retained: 1,
        delivered: vec![],
        wall_ms: 0,
        name: Default::default(),
    };
    wire::encode(
        &Header::new(CLUSTER, node, incarnation),
        &proto::Frame {
            kind: Some(Kind::Heartbeat(hb)),
        },
    )
}

pub(super) fn msg(i: u64) -> Bytes {
    Bytes::from(format!("message {i}"))
}

pub(super) fn ring(id: u16, fill: u8) -> Keyring {
    Keyring::single(Key::new(KeyId::new(id).unwrap(), [fill; auth::KEY_LEN]))
}

pub(super) fn keyed(i: usize, incarnation: u64, keyring: &Keyring) -> Config {
    Config {
        keyring: Some(keyring.clone()),
        ..config(i, incarnation)
    }
}

/// Seals a plain datagram as a holder of `keyring` would.
pub(super) fn seal_with(keyring: &Keyring, plain: &[u8], counter: u64) -> Bytes {
    auth::Ciphers::new(keyring).seal(plain, counter).unwrap()
}

#[test]
fn every_drop_reason_is_counted() {
    let t0 = Instant::now();
    let mut ep = Endpoint::new(config(0, 1), t0);
    let from = addr(1);
    let h = Header::new(CLUSTER, NodeId(2), Incarnation(1));
    let good = wire::encode_data(&h, 1, [msg(1)].iter(), None);
    let mutate = |at: usize, v: u8| {
        let mut m = good.to_vec();
        m[at] = v;
        m
    };
    let mut expect = Stats::default();
    let feed = |ep: &mut Endpoint, bytes: &[u8]| ep.handle_datagram(t0, from, bytes);

    feed(&mut ep, &good[..20]);
    expect.truncated += 1;
    feed(&mut ep, &vec![0u8; 70_000]);
    expect.oversized += 1;
    feed(&mut ep, &mutate(0, b'Z'));
    expect.bad_magic += 1;
    feed(&mut ep, &mutate(4, 9));
    expect.wrong_version += 1;
    feed(&mut ep, &mutate(wire::HEADER_LEN, 0));
    expect.bad_checksum += 1;
    feed(
        &mut ep,
        &wire::encode_data(
            &Header::new(ClusterId(1), NodeId(2), Incarnation(1)),
            1,
            [msg(1)].iter(),
            None,
        ),
    );
    expect.wrong_cluster += 1;
    // Sealed, but this endpoint has no key.
    feed(&mut ep, &seal_with(&ring(1, 1), &good, 1));
    expect.unauthenticated += 1;
    let empty = proto::Frame {
        kind: Some(Kind::Data(proto::Data {
            first_seq: 1,
            messages: vec![],
        })),
    };
    feed(&mut ep, &wire::encode(&h, &empty));
    expect.malformed += 1;
    feed(&mut ep, &wire::encode(&h, &proto::Frame { kind: None }));
    expect.unknown_frame += 1;
    feed(
        &mut ep,
        &wire::encode_data(
            &Header::new(CLUSTER, NodeId(1), Incarnation(1)),
            1,
            [msg(1)].iter(),
            None,
        ),
    );
    expect.own_datagrams += 1;
    feed(
        &mut ep,
        &wire::encode_data(
            &Header::new(CLUSTER, NodeId(1), Incarnation(5)),
            1,
            [msg(1)].iter(),
            None,
        ),
    );
    expect.node_id_conflict += 1;
    let huge = wire::encode_fragment(&h, 1, u32::MAX, 0, b"x", None);
    feed(&mut ep, &huge);
    expect.oversized += 1;
    let bad_fragment = wire::encode_fragment(&h, 1, 10, 8, b"xyz", None);
    feed(&mut ep, &bad_fragment);
    expect.malformed += 1;
    // Valid: node 2 incarnation 3 joins; then incarnation 1 is stale.
    feed(
        &mut ep,
        &wire::encode_data(
            &Header::new(CLUSTER, NodeId(2), Incarnation(3)),
            1,
            [msg(1)].iter(),
            None,
        ),
    );
    feed(&mut ep, &good);
    expect.stale_incarnation += 1;
    let st = ep.stats();
    assert_eq!(
        (
            st.truncated,
            st.oversized,
            st.bad_magic,
            st.wrong_version,
            st.bad_checksum,
            st.wrong_cluster
        ),
        (
            expect.truncated,
            expect.oversized,
            expect.bad_magic,
            expect.wrong_version,
            expect.bad_checksum,
            expect.wrong_cluster
        )
    );
    assert_eq!(
        (
            st.unauthenticated,
            st.malformed,
            st.unknown_frame,
            st.own_datagrams,
            st.node_id_conflict,
            st.stale_incarnation
        ),
        (
            expect.unauthenticated,
            expect.malformed,
            expect.unknown_frame,
            expect.own_datagrams,
            expect.node_id_conflict,
            expect.stale_incarnation
        )
    );
    assert_eq!(st.drops(), 14);
    // Incarnation 3 is on probation: its message is held until it sends two heartbeats half
    // a heartbeat interval apart.
    assert_eq!(st.messages_delivered, 0);
    ep.handle_datagram(t0, from, &heartbeat(NodeId(2), Incarnation(3), 1));
    let later = t0 + Duration::from_millis(150);
    ep.handle_datagram(later, from, &heartbeat(NodeId(2), Incarnation(3), 1));
    assert_eq!(ep.stats().messages_delivered, 1);
    ep.close(t0);
    while ep.poll_transmit(t0).is_some() {}
    ep.handle_datagram(t0, from, &good);
    assert_eq!(ep.stats().after_close, 1);
}

#[test]
fn garbage_never_panics() {
    let t0 = Instant::now();
    let mut ep = Endpoint::new(config(0, 1), t0);
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let h = Header::new(CLUSTER, NodeId(2), Incarnation(1));
    let good = wire::encode_data(&h, 1, [msg(1), msg(2)].iter(), None);
    for _ in 0..20_000 {
        let mut d = good.to_vec();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..d.len());
            d[at] = rng.random();
        }
        d.truncate(rng.random_range(0..=d.len()));
        ep.handle_datagram(t0, addr(1), &d);
        // Re-seal the mutated body with a valid header and CRC so it reaches the decoder.
        if d.len() > wire::OVERHEAD {
            let mut w = wire::encode(&h, &proto::Frame { kind: None }).to_vec();
            w.truncate(wire::HEADER_LEN);
            w.extend_from_slice(&d[wire::HEADER_LEN..d.len() - wire::CRC_LEN]);
            let body = (w.len() - wire::HEADER_LEN) as u32;
            w[12..16].copy_from_slice(&body.to_be_bytes());
            let crc = crc32fast::hash(&w);
            w.extend_from_slice(&crc.to_be_bytes());
            ep.handle_datagram(t0, addr(1), &w);
        }
    }
    ep.handle_timeout(t0 + Duration::from_secs(1));
    while ep.poll_transmit(t0 + Duration::from_secs(1)).is_some() {}
    assert!(ep.stats().drops() > 10_000);
}

#[test]
fn tampered_header_counter_body_or_tag_is_rejected() {
    let k = ring(1, 0x11);
    let t0 = Instant::now();
    let mut ep = Endpoint::new(keyed(0, 1, &k), t0);
    let h = Header::new(CLUSTER, NodeId(2), Incarnation(1));
    let plain = wire::encode_data(&h, 1, [msg(1), msg(2)].iter(), None);
    let sealed = seal_with(&k, &plain, 1);
    let body_end = sealed.len() - wire::CRC_LEN;
    for at in 0..body_end {
        for bit in [0x01u8, 0x80] {
            let mut d = sealed.to_vec();
            d[at] ^= bit;
            // Recompute the CRC: the attacker can, so only the tag stands in the way.
            let crc = wire::crc32(&d[..body_end]);
            d[body_end..].copy_from_slice(&crc.to_be_bytes());
            ep.handle_datagram(t0, addr(1), &d);
        }
    }
    let st = ep.stats().clone();
    assert_eq!(st.messages_delivered, 0);
    assert!(ep.members().is_empty());
    assert!(ep.poll_event().is_none());
    // Flips in the flags byte, the reserved bytes, node, incarnation, counter, body and tag
    // all reach the tag check and fail it.
    let authenticated_bytes = 1 + 2 + 8 + 8 + 8 + (body_end - 48);
    assert!(
        st.auth_failed >= 2 * authenticated_bytes as u64,
        "auth_failed {} of {}",
        st.auth_failed,
        2 * authenticated_bytes
    );
    assert_eq!(st.drops(), 2 * body_end as u64);
    // The untouched datagram is accepted (and delivered once its sender passed probation).
    ep.handle_datagram(t0, addr(1), &sealed);
    let hb = heartbeat(NodeId(2), Incarnation(1), 2);
    ep.handle_datagram(t0, addr(1), &seal_with(&k, &hb, 2));
    let later = t0 + Duration::from_millis(150);
    ep.handle_datagram(later, addr(1), &seal_with(&k, &hb, 3));
    assert_eq!(ep.stats().messages_delivered, 2);
}
