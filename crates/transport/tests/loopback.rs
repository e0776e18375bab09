//! Real sockets on the loopback: IPv4 multicast over `lo` (127.0.0.1, TTL 0),
//! broadcast to 127.255.255.255, unicast fan-out, buffers and errors.
//!
//! Every multicast sender here is a multicast-mode transport on `lo` with TTL 0,
//! so nothing leaves this host. Each test has its own ports and groups so the
//! tests can run in parallel.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_transport::{
    DatagramTransport, Destination, Interface, LinkRate, Mode, Outgoing, TransportConfig,
    TransportError, UdpTransport,
};
use common::{TIMEOUT, labels, recv_for, recv_until_all, text};
use tokio::io::{AsyncBufReadExt, BufReader};

fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([a, b, c, d], port))
}

fn group(last: u8, port: u16) -> SocketAddr {
    v4(239, 255, 71, last, port)
}

fn localhost(port: u16) -> SocketAddr {
    v4(127, 0, 0, 1, port)
}

fn batch(prefix: &str, n: usize) -> Vec<Outgoing> {
    (0..n)
        .map(|i| Outgoing::to_group(format!("{prefix}-{i}")))
        .collect()
}

#[tokio::test]
async fn two_receivers_on_one_port_both_get_every_multicast_datagram() {
    let g = group(1, 47101);
    let r1 = UdpTransport::bind(TransportConfig::loopback_multicast(g)).unwrap();
    let r2 = UdpTransport::bind(TransportConfig::loopback_multicast(g)).unwrap();
    let sender = UdpTransport::bind(TransportConfig::loopback_multicast(g)).unwrap();
    assert_eq!(sender.local_addr().unwrap().port(), 47101);
    assert_eq!(sender.interface().unwrap().name, "lo");

    let mut sent = 0;
    for round in 0..5 {
        let b = batch(&format!("m{round}"), 10);
        sent += sender.send_batch(&b).await.unwrap();
    }
    assert_eq!(sent, 50);

    let want: BTreeSet<String> = (0..5)
        .flat_map(|round| labels(&format!("m{round}"), 10))
        .collect();
    for r in [&r1, &r2, &sender] {
        let got = recv_until_all(r, &want).await;
        for d in &got {
            assert_eq!(d.destination, Some(g.ip()), "{d:?}");
            assert!(d.via_group, "{d:?}");
            assert_eq!(d.source.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
            assert_eq!(d.source.port(), 47101);
        }
    }
}

#[tokio::test]
async fn multicast_datagrams_follow_the_interface_mtu() {
    // lo's MTU is 64 KiB: datagrams up to the default cap travel whole, one call each.
    let g = group(19, 47199);
    let rx = UdpTransport::bind(TransportConfig::loopback_multicast(g)).unwrap();
    let tx = UdpTransport::bind(TransportConfig::loopback_multicast(g)).unwrap();
    let lo_mtu = Interface::loopback_v4().resolve().unwrap().mtu();
    if lo_mtu.is_some_and(|m| m >= TransportConfig::MAX_DEFAULT_DATAGRAM + 28) {
        assert_eq!(
            tx.max_datagram_size(),
            TransportConfig::MAX_DEFAULT_DATAGRAM
        );
    }
    // The loopback has no wire to overrun: the protocol need not pace sends to a link speed.
    assert_eq!(tx.link_rate(), LinkRate::Unlimited);
    let big = vec![7u8; tx.max_datagram_size()];
    assert_eq!(
        tx.send_batch(&[Outgoing::to_group(big.clone())])
            .await
            .unwrap(),
        1
    );
    let mut got = Vec::new();
    tokio::time::timeout(TIMEOUT, rx.recv_batch(&mut got, 8))
        .await
        .expect("timed out waiting for the large datagram")
        .unwrap();
    assert_eq!(got[0].payload.as_ref(), big.as_slice());
    // One byte more is refused with a clear error, not truncated.
    let err = tx
        .send_batch(&[Outgoing::to_group(vec![0u8; tx.max_datagram_size() + 1])])
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::DatagramTooLarge { .. }),
        "{err}"
    );
    // An explicit size wins over the interface's MTU.
    let mut c = TransportConfig::loopback_multicast(g);
    c.max_datagram_size = Some(1400);
    assert_eq!(UdpTransport::bind(c).unwrap().max_datagram_size(), 1400);
    // The MTU arithmetic: headers off, at most the cap, never below IPv6's minimum.
    let c = TransportConfig::loopback_multicast(g);
    assert_eq!(c.effective_max_datagram_size_for(Some(1500)), 1472);
    assert_eq!(c.effective_max_datagram_size_for(Some(9000)), 8972);
    assert_eq!(
        c.effective_max_datagram_size_for(Some(65_536)),
        TransportConfig::MAX_DEFAULT_DATAGRAM
    );
    assert_eq!(c.effective_max_datagram_size_for(Some(600)), 1232);
    assert_eq!(c.effective_max_datagram_size_for(None), 1472);
}

#[tokio::test]
async fn a_batch_of_equal_datagrams_arrives_whole_and_in_order() {
    let g = group(2, 47102);
    let rx = UdpTransport::bind(TransportConfig::loopback_multicast(g)).unwrap();
    let tx = UdpTransport::bind(TransportConfig::loopback_multicast(g)).unwrap();
    let payload = |i: usize| {
        let mut p = format!("gso-{i}-").into_bytes();
        p.resize(1200, b'a' + (i % 26) as u8);
        p
    };
    let mut b: Vec<Outgoing> = (0..40).map(|i| Outgoing::to_group(payload(i))).collect();
    // A shorter last datagram may end a GSO train.
    b.push(Outgoing::to_group(b"gso-tail".to_vec()));
    assert_eq!(tx.send_batch(&b).await.unwrap(), 41);

    let mut got = Vec::new();
    while got.len() < 41 {
        tokio::time::timeout(TIMEOUT, rx.recv_batch(&mut got, 8))
            .await
            .expect("timed out waiting for the batch")
            .unwrap();
    }
    assert_eq!(got.len(), 41);
    for (i, d) in got.iter().take(40).enumerate() {
        assert_eq!(d.payload.as_ref(), payload(i).as_slice(), "datagram {i}");
    }
    assert_eq!(got[40].payload.as_ref(), b"gso-tail");
    let stats = tx.stats();
    println!(
        "gso segments {}, gro segments {}, send calls {} for {} datagrams; receiver: {} recv calls for {}",
        tx.max_gso_segments(),
        rx.gro_segments(),
        stats.send_calls,
        stats.datagrams_sent,
        rx.stats().recv_calls,
        rx.stats().datagrams_received,
    );
    assert_eq!(stats.datagrams_sent, 41);
    if tx.max_gso_segments() > 1 {
        assert!(stats.send_calls < 41, "GSO should coalesce: {stats:?}");
    }
}

#[tokio::test]
async fn group_and_unicast_traffic_are_told_apart() {
    let g = group(3, 47103);
    let node = UdpTransport::bind(TransportConfig::loopback_multicast(g)).unwrap();
    let other = UdpTransport::bind(TransportConfig::peers(localhost(47104), vec![])).unwrap();

    node.send_batch(&[Outgoing::to_group("to-group")])
        .await
        .unwrap();
    other
        .send_batch(&[Outgoing::to_addr(localhost(47103), "to-node")])
        .await
        .unwrap();
    node.send_batch(&[Outgoing::to_addr(localhost(47104), "to-other")])
        .await
        .unwrap();

    let got = recv_until_all(&node, &["to-group".into(), "to-node".into()].into()).await;
    let by_text = |t: &str| got.iter().find(|d| text(d) == t).unwrap().clone();
    let group_d = by_text("to-group");
    assert!(group_d.via_group);
    assert_eq!(group_d.destination, Some(g.ip()));
    let unicast_d = by_text("to-node");
    assert!(!unicast_d.via_group);
    assert_eq!(unicast_d.destination, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    assert_eq!(unicast_d.source, localhost(47104));

    let at_other = recv_until_all(&other, &["to-other".into()].into()).await;
    assert!(!at_other[0].via_group);
    assert_eq!(at_other[0].source.port(), 47103);
}

#[tokio::test]
async fn extra_groups_runtime_join_and_leave() {
    let (g1, g2, g3) = (group(4, 47105), group(5, 47105), group(6, 47105));
    let mut config = TransportConfig::loopback_multicast(g1);
    config.extra_groups = vec![g2.ip()];
    let node = UdpTransport::bind(config).unwrap();
    let sender = UdpTransport::bind(TransportConfig::loopback_multicast(g1)).unwrap();

    sender
        .send_batch(&[Outgoing::to_addr(g2, "on-g2")])
        .await
        .unwrap();
    let got = recv_until_all(&node, &["on-g2".into()].into()).await;
    let d = got.iter().find(|d| text(d) == "on-g2").unwrap();
    assert_eq!(d.destination, Some(g2.ip()));
    assert!(d.via_group);
    // The sender did not join g2, and IP_MULTICAST_ALL is off: it must not see it.
    sender
        .send_batch(&[Outgoing::to_group("marker-1")])
        .await
        .unwrap();
    let at_sender = recv_until_all(&sender, &["marker-1".into()].into()).await;
    assert!(
        at_sender.iter().all(|d| text(d) != "on-g2"),
        "{at_sender:?}"
    );

    node.join(g3.ip(), &Interface::Name("lo".into())).unwrap();
    node.leave(g2.ip(), &Interface::loopback_v4()).unwrap();
    sender
        .send_batch(&[
            Outgoing::to_addr(g2, "after-leave"),
            Outgoing::to_addr(g3, "on-g3"),
            Outgoing::to_group("marker-2"),
        ])
        .await
        .unwrap();
    let got = recv_until_all(&node, &["on-g3".into(), "marker-2".into()].into()).await;
    assert!(got.iter().all(|d| text(d) != "after-leave"), "{got:?}");
    // Leaving again is refused by the kernel, with the group named.
    let err = node.leave(g2.ip(), &Interface::loopback_v4()).unwrap_err();
    assert!(err.to_string().contains("239.255.71.5"), "{err}");
}

#[tokio::test]
async fn unicast_fan_out_reaches_every_peer() {
    let ports = [47111, 47112, 47113];
    let nodes: Vec<UdpTransport> = ports
        .iter()
        .map(|&p| {
            let peers = ports
                .iter()
                .filter(|&&q| q != p)
                .map(|&q| localhost(q))
                .collect();
            // Not shared: a stray socket on the port fails the bind instead of stealing datagrams.
            let mut config = TransportConfig::peers(localhost(p), peers);
            config.reuse_port = false;
            UdpTransport::bind(config).unwrap()
        })
        .collect();
    assert_eq!(nodes[0].send_batch(&batch("fan", 5)).await.unwrap(), 5);
    for node in &nodes[1..] {
        let got = recv_until_all(node, &labels("fan", 5)).await;
        assert_eq!(got.len(), 5, "exactly one copy each");
        for d in &got {
            assert!(!d.via_group);
            assert_eq!(d.source, localhost(47111));
            assert_eq!(d.destination, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        }
    }
    assert_eq!(nodes[0].stats().datagrams_sent, 10);
    // A unicast send goes to one peer only.
    nodes[0]
        .send_batch(&[Outgoing::to_addr(localhost(47113), "only-c")])
        .await
        .unwrap();
    recv_until_all(&nodes[2], &["only-c".into()].into()).await;
    assert!(
        recv_for(&nodes[1], Duration::from_millis(200))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn unicast_fan_out_over_ipv6_loopback() {
    let a_addr: SocketAddr = "[::1]:47114".parse().unwrap();
    let b_addr: SocketAddr = "[::1]:47115".parse().unwrap();
    let a = UdpTransport::bind(TransportConfig::peers(a_addr, vec![b_addr])).unwrap();
    let b = UdpTransport::bind(TransportConfig::peers(b_addr, vec![a_addr])).unwrap();
    a.send_batch(&batch("six", 3)).await.unwrap();
    let got = recv_until_all(&b, &labels("six", 3)).await;
    for d in got {
        assert_eq!(d.source, a_addr);
        assert_eq!(d.destination, Some("::1".parse().unwrap()));
        assert!(!d.via_group);
    }
    assert_eq!(a.max_datagram_size(), 1452);
}

#[tokio::test]
async fn broadcast_to_the_loopback_subnet_reaches_every_node() {
    let addr = v4(127, 255, 255, 255, 47121);
    let a = UdpTransport::bind(TransportConfig::broadcast(addr)).unwrap();
    let b = UdpTransport::bind(TransportConfig::broadcast(addr)).unwrap();
    a.send_batch(&batch("bc", 5)).await.unwrap();
    for node in [&a, &b] {
        let got = recv_until_all(node, &labels("bc", 5)).await;
        for d in got {
            assert!(d.via_group, "{d:?}");
            assert_eq!(d.destination, Some(addr.ip()));
        }
    }
}

/// A `tracing` writer that keeps what it is given.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn bind_capturing_logs(config: TransportConfig) -> (UdpTransport, String) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let t = tracing::subscriber::with_default(subscriber, || UdpTransport::bind(config)).unwrap();
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    (t, logs)
}

#[tokio::test]
async fn socket_buffers_are_read_back_and_a_shortfall_says_how_to_fix_it() {
    let mut config = TransportConfig::peers(localhost(47131), vec![]);
    config.recv_buffer = Some(256 * 1024);
    config.send_buffer = Some(128 * 1024);
    let (t, logs) = bind_capturing_logs(config);
    let sizes = t.buffer_sizes();
    println!("asked 256 KiB / 128 KiB, granted {sizes:?}");
    assert!(
        sizes.recv_granted >= 256 * 1024 && !sizes.recv_short(),
        "{sizes:?}"
    );
    assert!(
        sizes.send_granted >= 128 * 1024 && !sizes.send_short(),
        "{sizes:?}"
    );
    assert!(!logs.contains("WARN"), "{logs}");
    drop(t);

    let huge = 1usize << 30;
    let limit: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if limit >= huge / 2 {
        println!("SKIPPED shortfall half: net.core.rmem_max ({limit}) is too large to exceed");
        return;
    }
    let mut config = TransportConfig::peers(localhost(47132), vec![]);
    config.recv_buffer = Some(huge);
    let (t, logs) = bind_capturing_logs(config);
    let sizes = t.buffer_sizes();
    println!("asked 1 GiB, granted {sizes:?}; log: {logs}");
    assert!(sizes.recv_short());
    assert!(sizes.recv_granted < huge);
    assert!(logs.contains("WARN"), "{logs}");
    assert!(
        logs.contains(&format!("sysctl -w net.core.rmem_max={huge}")),
        "{logs}"
    );
}

#[tokio::test]
async fn errors_name_their_remedy() {
    // Not a multicast address.
    let err =
        UdpTransport::bind(TransportConfig::loopback_multicast(localhost(47141))).unwrap_err();
    assert!(
        matches!(err, TransportError::NotMulticast { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("239.255.0.0/16"), "{err}");
    let mut config = TransportConfig::loopback_multicast(group(7, 47141));
    config.extra_groups = vec!["10.1.2.3".parse().unwrap()];
    assert!(matches!(
        UdpTransport::bind(config),
        Err(TransportError::NotMulticast { .. })
    ));

    // Families mixed.
    let mut config = TransportConfig::loopback_multicast(group(7, 47141));
    config.extra_groups = vec!["ff15::71".parse().unwrap()];
    let err = UdpTransport::bind(config).unwrap_err();
    assert!(
        matches!(err, TransportError::FamilyMismatch { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("ff15::71"), "{err}");

    // Unknown interface.
    let err =
        UdpTransport::bind(TransportConfig::multicast(group(7, 47142), "nosuchif0")).unwrap_err();
    assert!(
        matches!(err, TransportError::UnknownInterface { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("nosuchif0") && msg.contains("ip -br link"),
        "{msg}"
    );

    // Port in use by a socket that does not share it.
    let holder = std::net::UdpSocket::bind(localhost(47143)).unwrap();
    let err = UdpTransport::bind(TransportConfig::peers(localhost(47143), vec![])).unwrap_err();
    assert!(matches!(err, TransportError::AddrInUse { .. }), "{err:?}");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let msg = err.to_string();
    assert!(msg.contains("ss -ulpn 'sport = :47143'"), "{msg}");
    drop(holder);

    // Broadcast address without SO_BROADCAST: the kernel refuses (nothing is sent).
    let t = UdpTransport::bind(TransportConfig::peers(
        localhost(47144),
        vec![v4(127, 255, 255, 255, 47145)],
    ))
    .unwrap();
    let err = t
        .send_batch(&[Outgoing::to_group("nope")])
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::PermissionDenied { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("SO_BROADCAST"), "{err}");

    // Too large for the configured maximum: refused before the kernel sees it.
    let err = t
        .send_batch(&[Outgoing::to_addr(localhost(47146), vec![0u8; 1473])])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::DatagramTooLarge {
                len: 1473,
                max: 1472,
                ..
            }
        ),
        "{err:?}"
    );
    // After one good datagram, the error stops the batch and the count says where.
    let ok_then_big = [
        Outgoing::to_addr(localhost(47146), "fine"),
        Outgoing::to_addr(localhost(47146), vec![0u8; 1473]),
    ];
    assert_eq!(t.send_batch(&ok_then_big).await.unwrap(), 1);

    // Peers mode with a group send and nobody to send to.
    let lonely = UdpTransport::bind(TransportConfig::peers(localhost(47147), vec![])).unwrap();
    let err = lonely
        .send_batch(&[Outgoing::to_group("x")])
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::InvalidConfig(_)), "{err:?}");

    // IPv6 destination from an IPv4 socket.
    let err = lonely
        .send_batch(&[Outgoing {
            destination: Destination::Addr("[::1]:47148".parse().unwrap()),
            payload: "x".into(),
        }])
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::FamilyMismatch { .. }),
        "{err:?}"
    );

    // Broadcast mode is IPv4 only.
    let err =
        UdpTransport::bind(TransportConfig::broadcast("[::1]:47149".parse().unwrap())).unwrap_err();
    assert!(
        matches!(err, TransportError::FamilyMismatch { .. }),
        "{err:?}"
    );
}

#[test]
fn binding_outside_a_runtime_is_an_error_not_a_panic() {
    let err = UdpTransport::bind(TransportConfig::peers(localhost(47150), vec![])).unwrap_err();
    assert!(matches!(err, TransportError::InvalidConfig(_)), "{err:?}");
    assert!(err.to_string().contains("tokio runtime"));
}

#[test]
fn presets_are_what_the_docs_say() {
    let c = TransportConfig::loopback_multicast(group(9, 47151));
    assert_eq!(
        c.mode,
        Mode::Multicast {
            group: group(9, 47151),
            interface: Interface::loopback_v4(),
            ttl: 0,
            loopback: true
        }
    );
    assert_eq!(c.bind_addr(), v4(0, 0, 0, 0, 47151));
    assert_eq!(c.effective_max_datagram_size(), 1472);
    assert!(c.reuse_port && c.gso);
    assert_eq!(c.recv_buffer, Some(TransportConfig::DEFAULT_RECV_BUFFER));
}

// --- Interoperability with the seed tutorial's plain Python sockets ---------------------

async fn spawn_python(script: &str, args: &[String]) -> tokio::process::Child {
    tokio::process::Command::new("python3")
        .arg(common::python_script(script))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn python_seed_receiver_gets_what_the_transport_multicasts() {
    if !common::have_python("python_seed_receiver_gets_what_the_transport_multicasts") {
        return;
    }
    let g = group(10, 47161);
    let mut child = spawn_python(
        "mcast_recv.py",
        &[
            "239.255.71.10".into(),
            "47161".into(),
            "5".into(),
            "5".into(),
        ],
    )
    .await;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(TIMEOUT, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ready.as_deref(), Some("READY"));

    let t = UdpTransport::bind(TransportConfig::loopback_multicast(g)).unwrap();
    t.send_batch(&batch("py", 5)).await.unwrap();

    let mut got = Vec::new();
    while let Ok(Ok(Some(line))) = tokio::time::timeout(TIMEOUT, lines.next_line()).await {
        got.push(line);
    }
    let status = tokio::time::timeout(TIMEOUT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "python receiver failed: {got:?}");
    let want: Vec<String> = (0..5).map(|i| format!("127.0.0.1 py-{i}")).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn transport_receives_a_python_seed_multicast_sender() {
    if !common::have_python("transport_receives_a_python_seed_multicast_sender") {
        return;
    }
    let g = group(11, 47162);
    let t = UdpTransport::bind(TransportConfig::loopback_multicast(g)).unwrap();
    let mut child = spawn_python(
        "mcast_send.py",
        &[
            "239.255.71.11".into(),
            "47162".into(),
            "5".into(),
            "seed".into(),
        ],
    )
    .await;
    let got = recv_until_all(&t, &labels("seed", 5)).await;
    for d in got {
        assert!(d.via_group);
        assert_eq!(d.destination, Some(g.ip()));
        assert_eq!(d.source.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let status = tokio::time::timeout(TIMEOUT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn transport_receives_a_python_seed_broadcast_sender() {
    if !common::have_python("transport_receives_a_python_seed_broadcast_sender") {
        return;
    }
    let addr = v4(127, 255, 255, 255, 47163);
    let t = UdpTransport::bind(TransportConfig::broadcast(addr)).unwrap();
    let mut child = spawn_python(
        "bcast_send.py",
        &[
            "127.255.255.255".into(),
            "47163".into(),
            "5".into(),
            "bseed".into(),
        ],
    )
    .await;
    let got = recv_until_all(&t, &labels("bseed", 5)).await;
    for d in got {
        assert!(d.via_group);
        assert_eq!(d.destination, Some(addr.ip()));
    }
    let status = tokio::time::timeout(TIMEOUT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}
