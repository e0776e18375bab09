//! Tests that need a private network namespace: IPv6 multicast and IPv4
//! broadcast over a veth pair, and the errors of an interface that is down or a
//! host without routes.
//!
//! Each test re-executes this test binary inside `unshare --net` (see
//! `common::in_netns`); the addresses used (10.77.0.0/24, fd77::/64) exist only
//! inside that namespace. Skipped with a printed reason where no namespace can
//! be made. Linux only.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};

use chorus_transport::{
    DatagramTransport, Interface, Mode, Outgoing, TransportConfig, TransportError, UdpTransport,
};
use common::{in_netns, labels, recv_until_all, runtime, sh};

fn batch(prefix: &str, n: usize) -> Vec<Outgoing> {
    (0..n)
        .map(|i| Outgoing::to_group(format!("{prefix}-{i}")))
        .collect()
}

#[test]
fn netns_down_interface_and_missing_routes_give_enodev_and_enetunreach() {
    in_netns(
        "netns_down_interface_and_missing_routes_give_enodev_and_enetunreach",
        || {
            runtime().block_on(async {
                // A fresh namespace's `lo` is down.
                let group: SocketAddr = "239.255.72.1:47201".parse().unwrap();
                let err = UdpTransport::bind(TransportConfig::multicast(group, "lo")).unwrap_err();
                assert!(matches!(err, TransportError::NoDevice { .. }), "{err:?}");
                assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
                let msg = err.to_string();
                assert!(
                    msg.contains("`lo`") && msg.contains("ip link set lo up"),
                    "{msg}"
                );

                // No route to the group: the kernel cannot pick an interface to join on.
                let err = UdpTransport::bind(TransportConfig::multicast(group, Interface::Default))
                    .unwrap_err();
                assert!(matches!(err, TransportError::NoDevice { .. }), "{err:?}");
                let group6: SocketAddr = "[ff15::72:1]:47201".parse().unwrap();
                let err =
                    UdpTransport::bind(TransportConfig::multicast(group6, Interface::Default))
                        .unwrap_err();
                assert_eq!(err.raw_os_error(), Some(libc::ENODEV), "{err:?}");

                sh("ip link set lo up");
                let ok = UdpTransport::bind(TransportConfig::multicast(group, "lo")).unwrap();
                assert_eq!(ok.interface().unwrap().ipv4, Some([127, 0, 0, 1].into()));

                // No default route: 255.255.255.255 and off-host unicast are unreachable.
                let all: SocketAddr = "255.255.255.255:47202".parse().unwrap();
                let bc = UdpTransport::bind(TransportConfig::broadcast(all)).unwrap();
                let err = bc.send_batch(&batch("b", 1)).await.unwrap_err();
                assert!(
                    matches!(err, TransportError::NetworkUnreachable { .. }),
                    "{err:?}"
                );
                let msg = err.to_string();
                assert!(
                    msg.contains("255.255.255.255") && msg.contains("subnet broadcast"),
                    "{msg}"
                );

                let peer: SocketAddr = "10.99.0.1:47203".parse().unwrap();
                let uc = UdpTransport::bind(TransportConfig::peers(
                    "0.0.0.0:47204".parse().unwrap(),
                    vec![peer],
                ))
                .unwrap();
                let err = uc.send_batch(&batch("u", 1)).await.unwrap_err();
                assert!(
                    matches!(err, TransportError::NetworkUnreachable { .. }),
                    "{err:?}"
                );
                assert_eq!(err.raw_os_error(), Some(libc::ENETUNREACH));
                assert!(err.to_string().contains("10.99.0.1:47203"));
            });
        },
    );
}

#[test]
fn netns_ipv6_multicast_over_a_veth_pair() {
    in_netns("netns_ipv6_multicast_over_a_veth_pair", || {
        sh("ip link set lo up");
        sh("ip link add a0 type veth peer name a1");
        sh("ip -6 addr add fd77::1/64 dev a0 nodad");
        sh("ip -6 addr add fd77::2/64 dev a1 nodad");
        sh("ip link set a0 up && ip link set a1 up");
        common::wait_until_up(&["a0", "a1"]);
        runtime().block_on(async {
            let group: SocketAddr = "[ff15::77:1]:47211".parse().unwrap();
            let receiver = || {
                let mut c = TransportConfig::multicast(group, "a1");
                c.extra_groups = vec!["ff15::77:2".parse().unwrap()];
                UdpTransport::bind(c).unwrap()
            };
            let (r1, r2) = (receiver(), receiver());
            let mut c = TransportConfig::multicast(group, "a0");
            if let Mode::Multicast { loopback, .. } = &mut c.mode {
                *loopback = false;
            }
            let sender = UdpTransport::bind(c).unwrap();
            assert_eq!(sender.max_datagram_size(), 1452);

            // a0 has no IPv4 address: IPv4 multicast cannot be sent through it.
            let v4_group: SocketAddr = "239.255.72.9:47212".parse().unwrap();
            let err = UdpTransport::bind(TransportConfig::multicast(v4_group, "a0")).unwrap_err();
            assert!(
                matches!(err, TransportError::NoIpv4Address { .. }),
                "{err:?}"
            );
            assert!(err.to_string().contains("ip addr add"), "{err}");

            let mut b = batch("v6", 20);
            b.push(Outgoing::to_addr(
                "[ff15::77:2]:47211".parse().unwrap(),
                "v6-extra",
            ));
            assert_eq!(sender.send_batch(&b).await.unwrap(), 21);
            let mut want = labels("v6", 20);
            want.insert("v6-extra".into());
            for r in [&r1, &r2] {
                let got = recv_until_all(r, &want).await;
                for d in &got {
                    assert!(d.via_group, "{d:?}");
                    let dst = d.destination.unwrap();
                    assert!(dst.is_multicast(), "{d:?}");
                    if common::text(d) == "v6-extra" {
                        assert_eq!(dst, "ff15::77:2".parse::<IpAddr>().unwrap());
                    } else {
                        assert_eq!(dst, group.ip());
                    }
                    assert!(d.source.is_ipv6());
                }
            }
        });
    });
}

#[test]
fn netns_ipv4_broadcast_over_a_veth_pair() {
    in_netns("netns_ipv4_broadcast_over_a_veth_pair", || {
        sh("ip link set lo up");
        sh("ip link add b0 type veth peer name b1");
        sh("ip addr add 10.77.0.1/24 dev b0");
        sh("ip addr add 10.77.0.2/24 dev b1");
        sh("ip link set b0 up && ip link set b1 up");
        common::wait_until_up(&["b0", "b1"]);
        runtime().block_on(async {
            // Subnet broadcast.
            let subnet: SocketAddr = "10.77.0.255:47221".parse().unwrap();
            let a = UdpTransport::bind(TransportConfig::broadcast(subnet)).unwrap();
            let b = UdpTransport::bind(TransportConfig::broadcast(subnet)).unwrap();
            a.send_batch(&batch("sub", 10)).await.unwrap();
            for node in [&a, &b] {
                for d in recv_until_all(node, &labels("sub", 10)).await {
                    assert!(d.via_group, "{d:?}");
                    assert_eq!(d.destination, Some(subnet.ip()));
                }
            }

            // 255.255.255.255 needs a default route; inside the namespace it goes to b0.
            sh("ip route add default dev b0");
            let all: SocketAddr = "255.255.255.255:47222".parse().unwrap();
            let c = UdpTransport::bind(TransportConfig::broadcast(all)).unwrap();
            let d = UdpTransport::bind(TransportConfig::broadcast(all)).unwrap();
            c.send_batch(&batch("all", 10)).await.unwrap();
            for node in [&c, &d] {
                for r in recv_until_all(node, &labels("all", 10)).await {
                    assert!(r.via_group, "{r:?}");
                    assert_eq!(r.destination, Some(all.ip()));
                }
            }
        });
        if common::have_python("netns_ipv4_broadcast_over_a_veth_pair (python part)") {
            python_broadcast_on_the_veth();
        }
    });
}

/// A seed-style Python broadcast sender on the veth subnet, received by the transport.
fn python_broadcast_on_the_veth() {
    runtime().block_on(async {
        let subnet: SocketAddr = "10.77.0.255:47223".parse().unwrap();
        let t = UdpTransport::bind(TransportConfig::broadcast(subnet)).unwrap();
        let status = tokio::process::Command::new("python3")
            .arg(common::python_script("bcast_send.py"))
            .args(["10.77.0.255", "47223", "5", "pyb"])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        for d in recv_until_all(&t, &labels("pyb", 5)).await {
            assert!(d.via_group);
            assert_eq!(d.destination, Some(subnet.ip()));
        }
    });
}
