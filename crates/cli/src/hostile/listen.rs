//! Listening on the group: who sends what, by node and frame kind, before the attack (to learn
//! the cluster, the target's identity and its normal traffic) and during it (what the target
//! sends in answer).

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_replication::chorus_protocol::ClusterId;
use chorus_replication::chorus_protocol::proto::frame::Kind;
use chorus_replication::chorus_protocol::wire::{self, Header};
use socket2::{Domain, Protocol, Socket, Type};

use super::attacks::{MAX_CAPTURED, TargetView};

/// Names of the traffic classes counted, in [`Traffic`] order.
pub const KINDS: [&str; 7] = [
    "data",
    "fragment",
    "heartbeat",
    "nak",
    "repair",
    "goodbye",
    "other",
];
const DATA: usize = 0;
const FRAGMENT: usize = 1;
pub const HEARTBEAT: usize = 2;
pub const NAK: usize = 3;
pub const REPAIR: usize = 4;
const GOODBYE: usize = 5;
/// Sealed (the cluster has a key), or a kind this version does not know.
const OTHER: usize = 6;

/// How long a blocking receive waits before the loop looks at its bounds.
const POLL: Duration = Duration::from_millis(20);
/// Receive buffer asked for (the kernel caps it at `rmem_max`).
const RECV_BUFFER: usize = 8 << 20;

/// Datagrams and bytes of one sender, by traffic class ([`KINDS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub datagrams: [u64; KINDS.len()],
    pub bytes: [u64; KINDS.len()],
}

impl Traffic {
    fn add(&mut self, kind: usize, len: usize) {
        if let (Some(d), Some(b)) = (self.datagrams.get_mut(kind), self.bytes.get_mut(kind)) {
            *d += 1;
            *b += len as u64;
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }

    pub fn total_datagrams(&self) -> u64 {
        self.datagrams.iter().sum()
    }

    /// `kind:bytes` for every class that has any, `/`-separated (`-` when none).
    pub fn by_kind(&self) -> String {
        let parts: Vec<String> = KINDS
            .iter()
            .zip(self.bytes)
            .filter(|(_, b)| *b > 0)
            .map(|(k, b)| format!("{k}:{b}"))
            .collect();
        if parts.is_empty() {
            "-".into()
        } else {
            parts.join("/")
        }
    }
}

/// One valid datagram heard.
struct Heard {
    header: Header,
    /// Its traffic class (index in [`KINDS`]).
    class: usize,
    /// A plain heartbeat's `(highest_sent, low_retained)`.
    heartbeat: Option<(u64, u64)>,
}

/// A datagram, if it is a valid one of `cluster` (CRC and header checked). Only heartbeats
/// are decoded whole: a frame is one protobuf `oneof`, so the first byte of a plain body is the
/// tag of its kind, and the listener must keep up with a target that may multicast repairs as
/// fast as the loopback carries them.
fn classify(d: &[u8], cluster: ClusterId) -> Option<Heard> {
    let header = wire::check(d, wire::MAX_UDP_PAYLOAD, cluster).ok()?;
    let tag = d.get(wire::HEADER_LEN).map_or(0, |t| t >> 3);
    let class = match (header.key_id, tag) {
        (0, 1) => DATA,
        (0, 2) => FRAGMENT,
        (0, 3) => HEARTBEAT,
        (0, 4) => NAK,
        (0, 5) => REPAIR,
        (0, 6) => GOODBYE,
        _ => OTHER,
    };
    let mut heartbeat = None;
    if class == HEARTBEAT {
        let (_, frame) =
            wire::decode(&Bytes::copy_from_slice(d), wire::MAX_UDP_PAYLOAD, cluster).ok()?;
        if let Some(Kind::Heartbeat(hb)) = frame.kind {
            heartbeat = Some((hb.highest_sent, hb.low_retained));
        }
    }
    Some(Heard {
        header,
        class,
        heartbeat,
    })
}

/// A node heard on the group.
#[derive(Debug, Clone)]
pub struct Seen {
    pub incarnation: u64,
    pub addr: SocketAddr,
    pub traffic: Traffic,
    pub highest_sent: u64,
    pub low_retained: u64,
    pub sealed: bool,
}

impl Seen {
    pub fn view(&self, node: u64) -> TargetView {
        TargetView {
            node,
            incarnation: self.incarnation,
            highest_sent: self.highest_sent,
            low_retained: self.low_retained,
        }
    }
}

/// What the warm-up heard.
#[derive(Debug, Default)]
pub struct Observed {
    /// Given on the command line, or learnt from the first valid datagram heard.
    pub cluster: Option<ClusterId>,
    pub nodes: BTreeMap<u64, Seen>,
    /// Node ids in the order they were first heard.
    pub order: Vec<u64>,
    /// Valid datagrams kept for the junk attack's mutations.
    pub captured: Vec<Bytes>,
    /// Datagrams that were not valid frames of the cluster.
    pub other: u64,
}

impl Observed {
    pub fn new(cluster: Option<ClusterId>) -> Observed {
        Observed {
            cluster,
            ..Observed::default()
        }
    }

    /// Takes one datagram heard from `from` (never one of the attacker's own).
    pub fn take(&mut self, d: &[u8], from: SocketAddr) {
        if self.cluster.is_none() {
            self.cluster = learn_cluster(d);
        }
        let Some(Heard {
            header,
            class,
            heartbeat: hb,
        }) = self.cluster.and_then(|c| classify(d, c))
        else {
            self.other += 1;
            return;
        };
        let node = header.node.0;
        let seen = self.nodes.entry(node).or_insert_with(|| Seen {
            incarnation: header.incarnation.0,
            addr: from,
            traffic: Traffic::default(),
            highest_sent: 0,
            low_retained: 0,
            sealed: false,
        });
        if seen.traffic.total_datagrams() == 0 {
            self.order.push(node);
        }
        seen.incarnation = header.incarnation.0;
        seen.addr = from;
        seen.sealed |= header.key_id != 0;
        seen.traffic.add(class, d.len());
        if let Some((highest, low)) = hb {
            seen.highest_sent = highest;
            seen.low_retained = low;
        }
        if self.captured.len() < MAX_CAPTURED {
            self.captured.push(Bytes::copy_from_slice(d));
        }
    }
}

/// The cluster id of a datagram whose magic and CRC are right, read from its header.
fn learn_cluster(d: &[u8]) -> Option<ClusterId> {
    let id = u64::from_be_bytes(d.get(16..24)?.try_into().ok()?);
    wire::check(d, wire::MAX_UDP_PAYLOAD, ClusterId(id))
        .ok()
        .map(|h| h.cluster)
}

/// A socket that hears everything sent to `group` on the interface `iface`.
pub fn group_listener(group: SocketAddrV4, iface: Ipv4Addr) -> std::io::Result<UdpSocket> {
    let sock = shared_socket()?;
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port())).into())?;
    sock.join_multicast_v4(group.ip(), &iface)?;
    sock.set_read_timeout(Some(POLL))?;
    Ok(sock.into())
}

/// A socket that hears only what `source` sends to `group`: bound to the group address and
/// connected to the source, so the attacker's own flood (looped back) never reaches it.
fn source_listener(
    group: SocketAddrV4,
    iface: Ipv4Addr,
    source: SocketAddr,
) -> std::io::Result<UdpSocket> {
    let sock = shared_socket()?;
    sock.bind(&SocketAddr::V4(group).into())?;
    sock.join_multicast_v4(group.ip(), &iface)?;
    sock.connect(&source.into())?;
    sock.set_read_timeout(Some(POLL))?;
    Ok(sock.into())
}

fn shared_socket() -> std::io::Result<Socket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    let _ = sock.set_recv_buffer_size(RECV_BUFFER);
    Ok(sock)
}

/// Whether a receive error only means "nothing yet".
pub fn is_idle(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// The target's progress as its heartbeats tell it, shared with the sending loop.
#[derive(Debug)]
pub struct SharedView {
    node: u64,
    incarnation: AtomicU64,
    highest_sent: AtomicU64,
    low_retained: AtomicU64,
}

impl SharedView {
    pub fn get(&self) -> TargetView {
        TargetView {
            node: self.node,
            incarnation: self.incarnation.load(Ordering::Relaxed),
            highest_sent: self.highest_sent.load(Ordering::Relaxed),
            low_retained: self.low_retained.load(Ordering::Relaxed),
        }
    }
}

/// A thread counting what the target sends, until [`TargetWatch::finish`] or `deadline`.
#[derive(Debug)]
pub struct TargetWatch {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Traffic>,
    pub view: Arc<SharedView>,
}

impl TargetWatch {
    /// Starts counting what node `view.node`, sending from `source`, multicasts on `group`.
    pub fn start(
        group: SocketAddrV4,
        iface: Ipv4Addr,
        source: SocketAddr,
        cluster: ClusterId,
        view: TargetView,
        deadline: Instant,
    ) -> std::io::Result<TargetWatch> {
        let sock = source_listener(group, iface, source)?;
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(SharedView {
            node: view.node,
            incarnation: AtomicU64::new(view.incarnation),
            highest_sent: AtomicU64::new(view.highest_sent),
            low_retained: AtomicU64::new(view.low_retained),
        });
        let (stop2, shared2) = (stop.clone(), shared.clone());
        let handle = std::thread::Builder::new()
            .name("hostile-watch".into())
            .spawn(move || count(&sock, cluster, &shared2, &stop2, deadline))?;
        Ok(TargetWatch {
            stop,
            handle,
            view: shared,
        })
    }

    /// Stops the thread and returns what the target sent meanwhile (`None` if the thread
    /// died, which it cannot unless the system does).
    pub fn finish(self) -> Option<Traffic> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().ok()
    }
}

fn count(
    sock: &UdpSocket,
    cluster: ClusterId,
    view: &SharedView,
    stop: &AtomicBool,
    deadline: Instant,
) -> Traffic {
    let mut traffic = Traffic::default();
    let mut buf = vec![0u8; wire::MAX_UDP_PAYLOAD + 1];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if is_idle(&e) => continue,
            Err(e) => {
                super::say!("hostile: listening for the target failed: {e}");
                break;
            }
        };
        let Some(Heard {
            header,
            class,
            heartbeat: hb,
        }) = classify(&buf[..n], cluster)
        else {
            continue;
        };
        if header.node.0 != view.node {
            continue;
        }
        traffic.add(class, n);
        view.incarnation
            .store(header.incarnation.0, Ordering::Relaxed);
        if let Some((highest, low)) = hb {
            view.highest_sent.store(highest, Ordering::Relaxed);
            view.low_retained.store(low, Ordering::Relaxed);
        }
    }
    traffic
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_replication::chorus_protocol::proto;
    use chorus_replication::chorus_protocol::{Incarnation, NodeId};

    fn heartbeat(cluster: ClusterId, node: u64, highest: u64) -> Bytes {
        let hb = proto::Heartbeat {
            highest_sent: highest,
            low_retained: 1,
            ..Default::default()
        };
        wire::encode(
            &Header::new(cluster, NodeId(node), Incarnation(5)),
            &proto::Frame {
                kind: Some(Kind::Heartbeat(hb)),
            },
        )
    }

    #[test]
    fn classes_by_first_tag_match_the_decoded_kind() {
        let cluster = ClusterId(7);
        let header = Header::new(cluster, NodeId(1), Incarnation(1));
        let data = proto::Data {
            first_seq: 1,
            messages: vec![Bytes::from_static(b"x")],
        };
        let fragment = proto::Fragment {
            seq: 1,
            total_len: 10,
            chunk: Bytes::from_static(b"abc"),
            ..Default::default()
        };
        let kinds = [
            (Kind::Data(data.clone()), DATA),
            (Kind::Fragment(fragment), FRAGMENT),
            (
                Kind::Heartbeat(proto::Heartbeat {
                    highest_sent: 9,
                    low_retained: 3,
                    ..Default::default()
                }),
                HEARTBEAT,
            ),
            (Kind::Nak(proto::Nak::default()), NAK),
            (
                Kind::Repair(proto::Repair {
                    low_retained: 1,
                    payload: Some(proto::repair::Payload::Data(data)),
                }),
                REPAIR,
            ),
            (Kind::Goodbye(proto::Goodbye { highest_sent: 1 }), GOODBYE),
        ];
        for (kind, class) in kinds {
            let d = wire::encode(&header, &proto::Frame { kind: Some(kind) });
            let heard = classify(&d, cluster).expect("valid");
            assert_eq!(heard.class, class, "{}", KINDS[class]);
            assert_eq!(heard.heartbeat.is_some(), class == HEARTBEAT);
        }
        let hb = heartbeat(cluster, 1, 9);
        assert_eq!(
            classify(&hb, cluster).and_then(|h| h.heartbeat),
            Some((9, 1))
        );
        assert!(classify(&hb, ClusterId(8)).is_none());
        assert!(classify(&hb[..hb.len() - 1], cluster).is_none());
    }

    #[test]
    fn observed_learns_the_cluster_nodes_and_their_heartbeats() {
        let cluster = ClusterId(42);
        let from: SocketAddr = "127.0.0.1:7400".parse().expect("an address");
        let mut seen = Observed::new(None);
        seen.take(b"not a frame", from);
        seen.take(&heartbeat(cluster, 3, 10), from);
        seen.take(&heartbeat(cluster, 2, 20), from);
        seen.take(&heartbeat(cluster, 3, 11), from);
        seen.take(&heartbeat(ClusterId(43), 4, 1), from);
        assert_eq!(seen.cluster, Some(cluster));
        assert_eq!(seen.order, vec![3, 2]);
        assert_eq!(seen.other, 2);
        let three = &seen.nodes[&3];
        assert_eq!((three.incarnation, three.highest_sent), (5, 11));
        assert_eq!(three.traffic.datagrams[HEARTBEAT], 2);
        assert_eq!(seen.captured.len(), 3);
        assert!(three.traffic.by_kind().starts_with("heartbeat:"));
    }
}
