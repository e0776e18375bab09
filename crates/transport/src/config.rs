//! What a [`UdpTransport`](crate::UdpTransport) is built from.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::Interface;

/// How "send to everyone" ([`Destination::Group`](crate::Destination::Group)) reaches everyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// IP multicast to `group`. The socket binds the wildcard address on the
    /// group's port and joins the group on `interface`.
    Multicast {
        /// The group address and port, e.g. `239.255.77.1:7400` or `[ff15::77]:7400`.
        group: SocketAddr,
        /// The interface to join on and send from.
        interface: Interface,
        /// IPv4 TTL / IPv6 hop limit of sent multicast. 0 keeps datagrams on this
        /// host, 1 on the local link.
        ttl: u32,
        /// Whether this host's own sockets (this one included) receive what it sends.
        loopback: bool,
    },
    /// IPv4 broadcast to `addr` with `SO_BROADCAST`. The socket binds
    /// `0.0.0.0` on the same port (broadcasts are only delivered to wildcard-bound sockets).
    Broadcast {
        /// `255.255.255.255:port` (needs a default route) or a subnet broadcast
        /// address such as `10.1.2.255:port` (ip addr shows it after `brd`).
        addr: SocketAddr,
    },
    /// Unicast fan-out: a group send becomes one datagram to each peer. For
    /// networks where multicast is blocked.
    Peers {
        /// The local address to bind, e.g. `0.0.0.0:7400`.
        bind: SocketAddr,
        /// Everyone else. The list may contain this node's own address; it then
        /// receives its own group sends, as with multicast loopback.
        peers: Vec<SocketAddr>,
    },
}

/// Everything a [`UdpTransport`](crate::UdpTransport) is built from.
///
/// Start from a preset ([`TransportConfig::multicast`], [`TransportConfig::loopback_multicast`],
/// [`TransportConfig::broadcast`], [`TransportConfig::peers`]) and adjust fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportConfig {
    /// How group sends reach everyone.
    pub mode: Mode,
    /// More multicast groups to join on the same socket and port (received
    /// only; sends to them go through [`Destination::Addr`](crate::Destination::Addr)).
    /// Joined on the mode's interface ([`Interface::Default`] outside multicast mode).
    pub extra_groups: Vec<IpAddr>,
    /// `SO_RCVBUF` to ask for, in bytes; `None` keeps the kernel default.
    /// Default 4 MiB: a burst of repairs must not overflow the socket.
    pub recv_buffer: Option<usize>,
    /// `SO_SNDBUF` to ask for, in bytes; `None` keeps the kernel default. Default 1 MiB.
    pub send_buffer: Option<usize>,
    /// Largest payload this transport sends; larger sends fail with
    /// [`TransportError::DatagramTooLarge`](crate::TransportError::DatagramTooLarge).
    /// Default in multicast mode: the interface's link MTU less the IP and UDP headers (1472 on
    /// IPv4 Ethernet, 1452 on IPv6, 8 972 with jumbo frames, 65 507 on `lo`), capped at
    /// [`TransportConfig::MAX_DEFAULT_DATAGRAM`]; elsewhere, or when the MTU cannot be read, an
    /// Ethernet MTU of 1500 less the headers. Receiving accepts any size up to 65 535.
    pub max_datagram_size: Option<usize>,
    /// `SO_REUSEADDR` + `SO_REUSEPORT`, so several nodes on one host share the
    /// port. Default on. Note: unicast to a shared port reaches only one of the
    /// sockets; multicast and broadcast reach all of them.
    pub reuse_port: bool,
    /// Coalesce runs of equal-sized datagrams to one destination into one
    /// `sendmsg` with UDP GSO where the kernel offers it. Default on; costs
    /// one copy of the run into a contiguous buffer.
    pub gso: bool,
}

impl TransportConfig {
    /// Default receive buffer asked for.
    pub const DEFAULT_RECV_BUFFER: usize = 4 * 1024 * 1024;
    /// Default send buffer asked for.
    pub const DEFAULT_SEND_BUFFER: usize = 1024 * 1024;
    /// The largest datagram chosen by default from an interface's MTU (on `lo`, whose MTU is
    /// 64 KiB): large enough that dozens of 1400-byte messages share one system call, small
    /// enough that one lost datagram is a modest repair.
    pub const MAX_DEFAULT_DATAGRAM: usize = 32 * 1024;

    fn with_mode(mode: Mode) -> Self {
        TransportConfig {
            mode,
            extra_groups: Vec::new(),
            recv_buffer: Some(Self::DEFAULT_RECV_BUFFER),
            send_buffer: Some(Self::DEFAULT_SEND_BUFFER),
            max_datagram_size: None,
            reuse_port: true,
            gso: true,
        }
    }

    /// Multicast to `group` on `interface`, TTL 1 (the local link), loopback on.
    pub fn multicast(group: SocketAddr, interface: impl Into<Interface>) -> Self {
        Self::with_mode(Mode::Multicast {
            group,
            interface: interface.into(),
            ttl: 1,
            loopback: true,
        })
    }

    /// Multicast that never leaves this host: IPv4 `group` on `lo` (127.0.0.1),
    /// TTL 0, loopback on. What single-host tests and demos use.
    pub fn loopback_multicast(group: SocketAddr) -> Self {
        Self::with_mode(Mode::Multicast {
            group,
            interface: Interface::loopback_v4(),
            ttl: 0,
            loopback: true,
        })
    }

    /// IPv4 broadcast to `addr` (`255.255.255.255:port` or a subnet broadcast address).
    pub fn broadcast(addr: SocketAddr) -> Self {
        Self::with_mode(Mode::Broadcast { addr })
    }

    /// Unicast fan-out to `peers`, bound on `bind`.
    pub fn peers(bind: SocketAddr, peers: Vec<SocketAddr>) -> Self {
        Self::with_mode(Mode::Peers { bind, peers })
    }

    /// The address the socket binds.
    pub fn bind_addr(&self) -> SocketAddr {
        match &self.mode {
            Mode::Multicast { group, .. } => match group.ip() {
                IpAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), group.port()),
                IpAddr::V6(_) => {
                    SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), group.port())
                }
            },
            Mode::Broadcast { addr } => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()),
            Mode::Peers { bind, .. } => *bind,
        }
    }

    /// The maximum payload in force: [`max_datagram_size`](Self::max_datagram_size)
    /// or the family's Ethernet default.
    pub fn effective_max_datagram_size(&self) -> usize {
        self.effective_max_datagram_size_for(None)
    }

    /// The maximum payload in force on an interface whose link MTU is `link_mtu`:
    /// [`max_datagram_size`](Self::max_datagram_size) if set, else the MTU less the IP and
    /// UDP headers (at most [`MAX_DEFAULT_DATAGRAM`](Self::MAX_DEFAULT_DATAGRAM)), else the
    /// family's Ethernet default.
    pub fn effective_max_datagram_size_for(&self, link_mtu: Option<usize>) -> usize {
        let headers = match self.bind_addr() {
            SocketAddr::V4(_) => 20 + 8,
            SocketAddr::V6(_) => 40 + 8,
        };
        self.max_datagram_size
            .unwrap_or_else(|| {
                link_mtu.map_or(1500 - headers, |mtu| {
                    mtu.saturating_sub(headers)
                        .clamp(1280 - 48, Self::MAX_DEFAULT_DATAGRAM)
                })
            })
            .min(crate::MAX_UDP_PAYLOAD)
    }
}
