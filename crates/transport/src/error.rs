//! The error type of this crate, and the mapping from OS error codes to it.
//!
//! Every message names the remedy, because the person who reads it is usually
//! an operator looking at a log line, not a programmer looking at the code.

use std::io;
use std::net::{IpAddr, SocketAddr};

/// Everything that can go wrong in this crate.
///
/// Errors raised while building a transport leave nothing behind (the socket is
/// closed). Errors raised by `send_batch` / `recv_batch` leave the transport
/// usable; the caller decides whether to retry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// No interface has this name, index or address.
    #[error(
        "unknown network interface `{interface}`: list the interfaces with `ip -br link` \
         (or `ip -br addr` for their addresses) and pass one of those names, indexes or addresses"
    )]
    UnknownInterface {
        /// The interface as the caller gave it.
        interface: String,
    },

    /// IPv4 multicast needs an IPv4 address on the sending interface.
    #[error(
        "interface `{interface}` has no IPv4 address, needed to send IPv4 multicast through it: \
         assign one (`ip addr add <addr>/<len> dev {interface}`), bring it up \
         (`ip link set {interface} up`) or choose another interface"
    )]
    NoIpv4Address {
        /// The interface's name.
        interface: String,
    },

    /// A group address that is not a multicast address.
    #[error(
        "{addr} is not a multicast address: use an address in 224.0.0.0/4 \
         (239.255.0.0/16 is the site-local range meant for this) or in ff00::/8 (e.g. ff15::1:2)"
    )]
    NotMulticast {
        /// The address given as a group.
        addr: IpAddr,
    },

    /// IPv4 and IPv6 mixed where they cannot be.
    #[error(
        "address family mismatch: {what}; use IPv4 addresses with an IPv4 group or bind \
         address and IPv6 addresses with an IPv6 one"
    )]
    FamilyMismatch {
        /// What was mixed.
        what: String,
    },

    /// `ENODEV`: the interface is down or cannot do multicast.
    #[error(
        "{op} on interface `{interface}` failed: no such device (ENODEV): the interface is down \
         or has no multicast support; bring it up with `ip link set {interface} up` and check that \
         `ip link show {interface}` lists UP and MULTICAST (for `lo`: `ip link set lo up`)"
    )]
    NoDevice {
        /// The operation that failed.
        op: &'static str,
        /// The interface involved.
        interface: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// `ENETUNREACH`: no route to the destination.
    #[error(
        "{op} to {target} failed: network unreachable (ENETUNREACH): there is no route to it; \
         for multicast name the interface explicitly (on one host: `lo` / 127.0.0.1 with TTL 0) \
         or add a route (`ip route add 224.0.0.0/4 dev <iface>`); broadcast to 255.255.255.255 \
         needs a default route, so prefer the subnet broadcast address (e.g. 10.1.2.255)"
    )]
    NetworkUnreachable {
        /// The operation that failed.
        op: &'static str,
        /// The destination.
        target: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// `EADDRINUSE`: another socket holds the port without sharing it.
    #[error(
        "binding {addr} failed: address in use (EADDRINUSE): another socket holds this port \
         without SO_REUSEPORT; find it with `ss -ulpn 'sport = :{port}'`, stop it, or choose \
         another port",
        port = addr.port()
    )]
    AddrInUse {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// `EACCES` / `EPERM`.
    #[error(
        "{op} {target} failed: permission denied ({source}): sending to a broadcast address \
         needs SO_BROADCAST (use broadcast mode, not a peer list, for broadcast addresses); \
         ports below 1024 need root or CAP_NET_BIND_SERVICE; a firewall rule may also \
         reject it (`iptables -S`)"
    )]
    PermissionDenied {
        /// The operation that failed.
        op: &'static str,
        /// The destination or bind address.
        target: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// A datagram larger than the configured maximum, or than the path MTU (`EMSGSIZE`).
    #[error(
        "datagram of {len} bytes to {target} is too large (maximum {max}): split it, or raise \
         `max_datagram_size` only if every link on the path has a matching MTU (`ip link show`)"
    )]
    DatagramTooLarge {
        /// Size of the datagram.
        len: usize,
        /// The limit in force (configured, or the kernel's when it said `EMSGSIZE`).
        max: usize,
        /// The destination.
        target: String,
    },

    /// The configuration cannot work.
    #[error("invalid transport configuration: {0}")]
    InvalidConfig(String),

    /// The in-memory hub this transport belonged to was dropped.
    #[error(
        "the in-memory network hub was dropped: keep the `MemoryHub` alive while its endpoints are used"
    )]
    Closed,

    /// Any other I/O error.
    #[error("{op} {target} failed: {source}")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The destination, interface or address involved.
        target: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl TransportError {
    /// Maps an OS error to the variant that names its remedy.
    ///
    /// `target` is the address or interface the operation was about; for
    /// `ENODEV` it is reported as the interface.
    pub(crate) fn from_io(op: &'static str, target: impl ToString, source: io::Error) -> Self {
        let target = target.to_string();
        match source.raw_os_error() {
            Some(code) if code == libc::ENODEV => Self::NoDevice {
                op,
                interface: target,
                source,
            },
            Some(code) if code == libc::ENETUNREACH => {
                Self::NetworkUnreachable { op, target, source }
            }
            Some(code) if code == libc::EACCES || code == libc::EPERM => {
                Self::PermissionDenied { op, target, source }
            }
            _ => Self::Io { op, target, source },
        }
    }

    /// Maps a `bind` error; `EADDRINUSE` gets its own variant.
    pub(crate) fn from_bind(addr: SocketAddr, source: io::Error) -> Self {
        if source.raw_os_error() == Some(libc::EADDRINUSE) {
            Self::AddrInUse { addr, source }
        } else {
            Self::from_io("binding", addr, source)
        }
    }

    /// The OS error code behind this error, if there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::NoDevice { source, .. }
            | Self::NetworkUnreachable { source, .. }
            | Self::AddrInUse { source, .. }
            | Self::PermissionDenied { source, .. }
            | Self::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
