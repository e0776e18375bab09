//! The datagrams of each attack, built with the public wire API (`chorus_protocol::wire` and
//! `chorus_protocol::proto`, `chorus_replication::wire` for replication envelopes), so that
//! every well-formed one is exactly what a real, if hostile, node could send.

use bytes::Bytes;
use chorus_replication::chorus_protocol::proto::{self, frame::Kind};
use chorus_replication::chorus_protocol::wire::{self, Header};
use chorus_replication::chorus_protocol::{ClusterId, Incarnation, NodeId};
use chorus_replication::wire as rwire;
use prost::Message;

use super::Attack;

/// A small seeded generator (SplitMix64): the whole attack replays from `--seed`.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0); the modulo bias is irrelevant here.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Uniform in `0..n` as a `usize`.
    pub fn below_usize(&mut self, n: usize) -> usize {
        usize::try_from(self.below(n as u64)).unwrap_or(0)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// What the attacker knows of the agent under attack, from the heartbeats it heard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetView {
    pub node: u64,
    pub incarnation: u64,
    pub highest_sent: u64,
    pub low_retained: u64,
}

/// Sizes and shapes of the attack datagrams.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Upper bound of a datagram of the fragment, request and junk attacks.
    pub datagram_bytes: usize,
    /// Declared length of the forged fragmented messages.
    pub total_len: u32,
    /// `[1, u64::MAX]` ranges per NAK.
    pub ranges: usize,
    /// `PartialNak` parts per NAK.
    pub partials: usize,
    /// Byte ranges per `PartialNak`.
    pub parts_per_partial: usize,
    /// The key the requests name.
    pub key: String,
}

/// How many datagrams a NAK datagram is reused for before its `PartialNak` parts are drawn
/// again (encoding thousands of ranges per datagram would cost more than sending it).
const NAK_REFRESH: u64 = 64;
/// Most captured datagrams kept for mutation.
pub const MAX_CAPTURED: usize = 64;

/// One attack's datagram source. Every datagram it returns is at most
/// [`wire::MAX_UDP_PAYLOAD`] bytes; nothing in it can panic, whatever the shape or the view.
#[derive(Debug)]
pub struct Attacker {
    attack: Attack,
    cluster: ClusterId,
    shape: Shape,
    rng: SplitMix,
    /// The attacker's own identity (naks, requests).
    node: u64,
    incarnation: u64,
    /// Node ids not to forge (the real members heard).
    avoid: Vec<u64>,
    /// Node ids used (fresh ids, or the attacker's own).
    ids: u64,
    /// Last sequence number of the attacker's own stream (requests).
    seq: u64,
    filler: Vec<u8>,
    request: Bytes,
    nak: Option<(TargetView, u64, Bytes)>,
    captured: Vec<Bytes>,
}

impl Attacker {
    pub fn new(
        attack: Attack,
        cluster: ClusterId,
        shape: Shape,
        seed: u64,
        avoid: Vec<u64>,
        captured: Vec<Bytes>,
    ) -> Attacker {
        let mut rng = SplitMix::new(seed);
        let filler = rng.bytes(wire::MAX_UDP_PAYLOAD);
        let mut a = Attacker {
            attack,
            cluster,
            shape,
            rng,
            node: 0,
            incarnation: 0,
            avoid,
            ids: 0,
            seq: 0,
            filler,
            request: Bytes::new(),
            nak: None,
            captured,
        };
        a.node = a.fresh_id();
        a.incarnation = (a.rng.next_u64() >> 1) | 1;
        if a.is_member() {
            a.ids = 1;
        }
        a
    }

    /// The node id the member-like attacks (naks, requests) send as.
    pub fn node(&self) -> u64 {
        self.node
    }

    /// Node ids used so far.
    pub fn ids(&self) -> u64 {
        self.ids
    }

    /// Whether this attack needs to look like a member (heartbeats before and during).
    pub fn is_member(&self) -> bool {
        super::is_member(self.attack)
    }

    /// A heartbeat of the attacker's own stream that acknowledges nothing (so the target's
    /// window is never trimmed by stability while the attacker is a member); `None` for the
    /// attacks that do not pose as a member.
    pub fn keepalive(&self) -> Option<Bytes> {
        self.is_member().then(|| {
            let hb = proto::Heartbeat {
                highest_sent: self.seq,
                low_retained: self.seq.saturating_add(1),
                ..Default::default()
            };
            self.own_frame(Kind::Heartbeat(hb))
        })
    }

    /// The attacker's goodbye at the end (so the target lets go of it at once).
    pub fn goodbye(&self) -> Option<Bytes> {
        self.is_member().then(|| {
            let bye = proto::Goodbye {
                highest_sent: self.seq,
            };
            self.own_frame(Kind::Goodbye(bye))
        })
    }

    /// The next attack datagram.
    pub fn next_datagram(&mut self, view: TargetView) -> Bytes {
        match self.attack {
            Attack::Fragments => self.fragment(),
            Attack::Heartbeats => self.heartbeat(),
            Attack::Naks => self.nak(view),
            Attack::Requests => self.request(view),
            Attack::Junk => self.junk(),
        }
    }

    fn own_frame(&self, kind: Kind) -> Bytes {
        let header = Header::new(
            self.cluster,
            NodeId(self.node),
            Incarnation(self.incarnation),
        );
        wire::encode(&header, &proto::Frame { kind: Some(kind) })
    }

    /// A node id no real member heard uses (and not 0).
    fn fresh_id(&mut self) -> u64 {
        let mut id = self.rng.next_u64() >> 1;
        for _ in 0..8 {
            if id != 0 && !self.avoid.contains(&id) {
                break;
            }
            id = self.rng.next_u64() >> 1;
        }
        id.max(1)
    }

    fn fresh_header(&mut self) -> Header {
        self.ids += 1;
        let node = self.fresh_id();
        let incarnation = (self.rng.next_u64() >> 1) | 1;
        Header::new(self.cluster, NodeId(node), Incarnation(incarnation))
    }

    /// The first fragment of a message of `total_len` bytes, from a node never seen before.
    fn fragment(&mut self) -> Bytes {
        let header = self.fresh_header();
        let total = self.shape.total_len.max(1);
        let chunk_len = self
            .shape
            .datagram_bytes
            .saturating_sub(wire::FRAGMENT_OVERHEAD)
            .clamp(1, self.filler.len())
            .min(total as usize);
        wire::encode_fragment(&header, 1, total, 0, &self.filler[..chunk_len], None)
    }

    /// A valid heartbeat from a node never seen before.
    fn heartbeat(&mut self) -> Bytes {
        let header = self.fresh_header();
        let hb = proto::Heartbeat {
            low_retained: 1,
            ..Default::default()
        };
        wire::encode(
            &header,
            &proto::Frame {
                kind: Some(Kind::Heartbeat(hb)),
            },
        )
    }

    /// A NAK of `[1, u64::MAX]` many times plus `PartialNak` parts for messages of the
    /// target's window, aimed at the target's current incarnation.
    fn nak(&mut self, view: TargetView) -> Bytes {
        if let Some((seen, uses, datagram)) = &mut self.nak
            && *seen == view
            && *uses < NAK_REFRESH
        {
            *uses += 1;
            return datagram.clone();
        }
        let datagram = self.build_nak(view);
        self.nak = Some((view, 1, datagram.clone()));
        datagram
    }

    fn build_nak(&mut self, view: TargetView) -> Bytes {
        let low = view.low_retained.max(1);
        let span = view.highest_sent.saturating_sub(low).saturating_add(1);
        let mut ranges = self.shape.ranges;
        loop {
            let partial = (0..self.shape.partials)
                .map(|_| proto::PartialNak {
                    seq: low.saturating_add(self.rng.below(span)),
                    missing: (0..self.shape.parts_per_partial)
                        .map(|_| proto::ByteRange {
                            offset: u32::try_from(self.rng.below(1 << 20)).unwrap_or(0),
                            len: u32::try_from(self.rng.below(65_535) + 1).unwrap_or(1),
                        })
                        .collect(),
                })
                .collect();
            let nak = proto::Nak {
                target_node: view.node,
                target_incarnation: view.incarnation,
                ranges: vec![
                    proto::SeqRange {
                        first: 1,
                        last: u64::MAX,
                    };
                    ranges
                ],
                partial,
                ..Default::default()
            };
            let datagram = self.own_frame(Kind::Nak(nak));
            if datagram.len() <= wire::MAX_UDP_PAYLOAD || ranges == 0 {
                return datagram;
            }
            ranges /= 2;
        }
    }

    /// The next message of the attacker's stream: one `Request` naming the key as many times
    /// as fit in the datagram.
    fn request(&mut self, view: TargetView) -> Bytes {
        if self.request.is_empty() {
            let key = self.shape.key.clone();
            let per_copy = key.len() + 3;
            let copies = self
                .shape
                .datagram_bytes
                .saturating_sub(wire::DATA_OVERHEAD + 24)
                .checked_div(per_copy)
                .unwrap_or(0)
                .max(1);
            let envelope = rwire::Envelope {
                body: Some(rwire::envelope::Body::Request(rwire::Request {
                    target: view.node,
                    keys: vec![key; copies],
                })),
            };
            self.request = envelope.encode_to_vec().into();
        }
        self.seq = self.seq.saturating_add(1);
        let header = Header::new(
            self.cluster,
            NodeId(self.node),
            Incarnation(self.incarnation),
        );
        wire::encode_data(&header, self.seq, std::iter::once(&self.request), None)
    }

    /// Random bytes, mutated captured frames, and well-formed frames of every kind with
    /// random contents (some mutated after their CRC was made valid again).
    fn junk(&mut self) -> Bytes {
        let max = self.shape.datagram_bytes.clamp(1, wire::MAX_UDP_PAYLOAD);
        match self.rng.below(8) {
            0 => {
                let len = self.rng.below_usize(max + 1);
                self.rng.bytes(len).into()
            }
            1 => {
                let len = self.rng.below_usize(max + 1).max(wire::OVERHEAD);
                let mut d = self.rng.bytes(len);
                d[..4].copy_from_slice(&wire::MAGIC);
                d[4] = wire::VERSION;
                d.into()
            }
            2 => {
                let mut d = self.captured_or_built().to_vec();
                let flips = 1 + self.rng.below_usize(8);
                self.flip_bits(&mut d, 0, flips);
                d.into()
            }
            3 => {
                let d = self.captured_or_built();
                let cut = self.rng.below_usize(d.len());
                d.slice(..cut)
            }
            4 => {
                let mut d = self.random_frame().to_vec();
                let flips = 1 + self.rng.below_usize(8);
                self.flip_bits(&mut d, wire::HEADER_LEN, flips);
                fix_crc(&mut d);
                d.into()
            }
            5 => {
                let mut d = self.random_frame().to_vec();
                if self.rng.below(2) == 0 {
                    if let Some(version) = d.get_mut(4) {
                        *version = wire::VERSION.wrapping_add(1);
                    }
                } else if let Some(cluster) = d.get_mut(16..24) {
                    let other = self.cluster.0 ^ (self.rng.next_u64() | 1);
                    cluster.copy_from_slice(&other.to_be_bytes());
                }
                fix_crc(&mut d);
                d.into()
            }
            6 => self.captured_or_built(),
            _ => self.random_frame(),
        }
    }

    fn captured_or_built(&mut self) -> Bytes {
        if self.captured.is_empty() {
            return self.random_frame();
        }
        let i = self.rng.below_usize(self.captured.len());
        self.captured.get(i).cloned().unwrap_or_default()
    }

    /// Flips `flips` random bits of `d` at or after `from` (none if there is no such byte
    /// before the CRC).
    fn flip_bits(&mut self, d: &mut [u8], from: usize, flips: usize) {
        let end = d.len().saturating_sub(wire::CRC_LEN);
        if end <= from {
            return;
        }
        for _ in 0..flips {
            let at = from + self.rng.below_usize(end - from);
            if let Some(byte) = d.get_mut(at) {
                *byte ^= 1 << self.rng.below(8);
            }
        }
    }

    /// A well-formed frame of a random kind with random contents, from a fresh node id.
    fn random_frame(&mut self) -> Bytes {
        let header = self.fresh_header();
        let max_total = u64::from(self.shape.total_len.max(1));
        let kind = match self.rng.below(6) {
            0 => Kind::Data(self.random_data()),
            1 => Kind::Fragment(self.random_fragment(max_total)),
            2 => Kind::Heartbeat(proto::Heartbeat {
                highest_sent: self.rng.below(1 << 40),
                low_retained: self.rng.below(1 << 40),
                delivered: (0..self.rng.below(4))
                    .map(|_| proto::PeerProgress {
                        node: self.rng.next_u64(),
                        incarnation: self.rng.next_u64(),
                        delivered_up_to: self.rng.next_u64(),
                    })
                    .collect(),
                // Any wall time at all: a clock offset claimed by a stranger must not make
                // the target refuse its writes.
                wall_ms: self.rng.next_u64(),
                // Any name bytes: too long, not UTF-8 or not printable is a counted drop of
                // the field, never of the node.
                name: (0..self.rng.below(80))
                    .map(|_| self.rng.next_u64().to_le_bytes()[0])
                    .collect::<Vec<u8>>()
                    .into(),
            }),
            3 => Kind::Nak(proto::Nak {
                target_node: self.rng.next_u64(),
                target_incarnation: self.rng.next_u64(),
                ranges: (0..self.rng.below(8))
                    .map(|_| proto::SeqRange {
                        first: self.rng.next_u64(),
                        last: self.rng.next_u64(),
                    })
                    .collect(),
                sender_highest_sent: self.rng.below(1 << 20),
                ..Default::default()
            }),
            4 => {
                let payload = if self.rng.below(2) == 0 {
                    proto::repair::Payload::Data(self.random_data())
                } else {
                    proto::repair::Payload::Fragment(self.random_fragment(max_total))
                };
                Kind::Repair(proto::Repair {
                    low_retained: self.rng.below(1 << 20),
                    payload: Some(payload),
                })
            }
            _ => Kind::Goodbye(proto::Goodbye {
                highest_sent: self.rng.below(1 << 20),
            }),
        };
        wire::encode(&header, &proto::Frame { kind: Some(kind) })
    }

    fn random_data(&mut self) -> proto::Data {
        proto::Data {
            first_seq: 1 + self.rng.below(1 << 20),
            messages: (0..1 + self.rng.below(4))
                .map(|_| {
                    let len = self.rng.below_usize(200);
                    Bytes::from(self.rng.bytes(len))
                })
                .collect(),
        }
    }

    fn random_fragment(&mut self, max_total: u64) -> proto::Fragment {
        let total = 1 + self.rng.below(max_total);
        let offset = self.rng.below(total);
        let len = 1 + self.rng.below((total - offset).min(1000));
        proto::Fragment {
            seq: 1 + self.rng.below(1 << 20),
            total_len: u32::try_from(total).unwrap_or(u32::MAX),
            offset: u32::try_from(offset).unwrap_or(0),
            chunk: Bytes::from(self.rng.bytes(usize::try_from(len).unwrap_or(1))),
        }
    }
}

/// Makes the CRC trailer of `d` match its contents again (nothing if `d` is too short).
fn fix_crc(d: &mut [u8]) {
    let Some(at) = d.len().checked_sub(wire::CRC_LEN) else {
        return;
    };
    let crc = wire::crc32(&d[..at]);
    d[at..].copy_from_slice(&crc.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_replication::chorus_protocol::wire::DropReason;

    const CLUSTER: ClusterId = ClusterId(0x1234);

    fn shape() -> Shape {
        Shape {
            datagram_bytes: 1400,
            total_len: (1 << 20) + (64 << 10),
            ranges: 2000,
            partials: 8,
            parts_per_partial: 32,
            key: "hostile/big".into(),
        }
    }

    fn view() -> TargetView {
        TargetView {
            node: 7,
            incarnation: 99,
            highest_sent: 500,
            low_retained: 400,
        }
    }

    fn decode(d: &Bytes) -> (Header, Kind) {
        let (h, f) = wire::decode(d, wire::MAX_UDP_PAYLOAD, CLUSTER).expect("well-formed");
        (h, f.kind.expect("a frame kind"))
    }

    #[test]
    fn fragments_declare_a_large_length_from_fresh_ids() {
        let mut a = Attacker::new(Attack::Fragments, CLUSTER, shape(), 1, vec![7], vec![]);
        let mut ids = std::collections::HashSet::new();
        for _ in 0..200 {
            let d = a.next_datagram(view());
            assert!(d.len() <= 1400, "{}", d.len());
            let (h, kind) = decode(&d);
            ids.insert(h.node.0);
            let Kind::Fragment(f) = kind else {
                panic!("not a fragment")
            };
            assert_eq!(f.total_len, (1 << 20) + (64 << 10));
            assert!(!f.chunk.is_empty());
        }
        assert_eq!(ids.len(), 200);
        assert!(!ids.contains(&7));
        assert_eq!(a.ids(), 200);
    }

    #[test]
    fn heartbeats_are_valid_and_from_fresh_ids() {
        let mut a = Attacker::new(Attack::Heartbeats, CLUSTER, shape(), 2, vec![], vec![]);
        let mut ids = std::collections::HashSet::new();
        for _ in 0..1000 {
            let (h, kind) = decode(&a.next_datagram(view()));
            let Kind::Heartbeat(hb) = kind else {
                panic!("not a heartbeat")
            };
            assert!(hb.low_retained >= 1 && hb.low_retained <= hb.highest_sent + 1);
            ids.insert(h.node.0);
        }
        assert_eq!(ids.len(), 1000);
        assert!(a.keepalive().is_none() && a.goodbye().is_none());
    }

    #[test]
    fn naks_carry_thousands_of_full_ranges_and_partials_inside_the_window() {
        let mut a = Attacker::new(Attack::Naks, CLUSTER, shape(), 3, vec![], vec![]);
        let d = a.next_datagram(view());
        assert!(d.len() <= wire::MAX_UDP_PAYLOAD);
        let (h, kind) = decode(&d);
        assert_eq!(h.node.0, a.node());
        let Kind::Nak(nak) = kind else {
            panic!("not a NAK")
        };
        assert_eq!((nak.target_node, nak.target_incarnation), (7, 99));
        assert_eq!(nak.ranges.len(), 2000);
        assert!(
            nak.ranges
                .iter()
                .all(|r| r.first == 1 && r.last == u64::MAX)
        );
        assert_eq!(nak.partial.len(), 8);
        assert!(nak.partial.iter().all(|p| (400..=500).contains(&p.seq)));
        let (_, hb) = decode(&a.keepalive().expect("a member-like attack"));
        assert!(matches!(hb, Kind::Heartbeat(h) if h.delivered.is_empty()));
        // The most ranges asked for still fit in one datagram.
        let big = Shape {
            ranges: 100_000,
            ..shape()
        };
        let mut a = Attacker::new(Attack::Naks, CLUSTER, big, 3, vec![], vec![]);
        assert!(a.next_datagram(view()).len() <= wire::MAX_UDP_PAYLOAD);
    }

    #[test]
    fn requests_name_one_key_many_times_in_order() {
        let mut a = Attacker::new(Attack::Requests, CLUSTER, shape(), 4, vec![], vec![]);
        for expected_seq in 1..=3 {
            let d = a.next_datagram(view());
            assert!(d.len() <= 1400, "{}", d.len());
            let (h, kind) = decode(&d);
            assert_eq!(h.node.0, a.node());
            let Kind::Data(data) = kind else {
                panic!("not data")
            };
            assert_eq!(data.first_seq, expected_seq);
            let env = rwire::Envelope::decode(data.messages[0].clone()).expect("an envelope");
            let Some(rwire::envelope::Body::Request(r)) = env.body else {
                panic!("not a request")
            };
            assert_eq!(r.target, 7);
            assert!(r.keys.len() > 50, "{}", r.keys.len());
            assert!(r.keys.iter().all(|k| k == "hostile/big"));
        }
        let (_, kind) = decode(&a.keepalive().expect("member-like"));
        assert!(matches!(kind, Kind::Heartbeat(h) if h.highest_sent == 3 && h.low_retained == 4));
        let (_, kind) = decode(&a.goodbye().expect("member-like"));
        assert!(matches!(kind, Kind::Goodbye(g) if g.highest_sent == 3));
    }

    #[test]
    fn junk_never_panics_stays_bounded_and_mixes_drop_reasons() {
        let captured = vec![
            Attacker::new(Attack::Naks, CLUSTER, shape(), 9, vec![], vec![])
                .keepalive()
                .expect("member-like"),
        ];
        let mut reasons = std::collections::HashMap::new();
        let mut valid = 0;
        for seed in 0..4 {
            let mut a = Attacker::new(
                Attack::Junk,
                CLUSTER,
                shape(),
                seed,
                vec![],
                captured.clone(),
            );
            for _ in 0..2000 {
                let d = a.next_datagram(view());
                assert!(d.len() <= 1400);
                match wire::decode(&d, wire::MAX_UDP_PAYLOAD, CLUSTER) {
                    Ok(_) => valid += 1,
                    Err(r) => *reasons.entry(r).or_insert(0) += 1,
                }
            }
        }
        for r in [
            DropReason::Truncated,
            DropReason::BadMagic,
            DropReason::BadChecksum,
            DropReason::WrongVersion,
            DropReason::WrongCluster,
        ] {
            assert!(reasons.contains_key(&r), "no {r:?} in {reasons:?}");
        }
        assert!(valid > 1000, "{valid} valid frames");
    }

    #[test]
    fn odd_shapes_and_views_do_not_panic() {
        let tiny = Shape {
            datagram_bytes: 1,
            total_len: 0,
            ranges: 0,
            partials: 3,
            parts_per_partial: 0,
            key: String::new(),
        };
        let views = [
            TargetView::default(),
            TargetView {
                node: u64::MAX,
                incarnation: u64::MAX,
                highest_sent: u64::MAX,
                low_retained: 0,
            },
        ];
        for attack in [
            Attack::Fragments,
            Attack::Heartbeats,
            Attack::Naks,
            Attack::Requests,
            Attack::Junk,
        ] {
            let mut a = Attacker::new(attack, CLUSTER, tiny.clone(), 5, vec![], vec![]);
            for v in views {
                for _ in 0..50 {
                    assert!(a.next_datagram(v).len() <= wire::MAX_UDP_PAYLOAD);
                }
            }
        }
    }
}
