//! chorus-transport: UDP datagram I/O for Chorus.
//!
//! What it does:
//! - IPv4 and IPv6 multicast: join and leave groups on an interface named by
//!   name, address or index ([`Interface`]); several groups on one socket;
//!   TTL / hop limit; multicast loopback; `SO_REUSEADDR` + `SO_REUSEPORT` so
//!   several nodes on one host share the group port.
//! - IPv4 broadcast (`SO_BROADCAST`) to `255.255.255.255` or a subnet broadcast address.
//! - Unicast fan-out to a peer list, for networks where multicast is blocked.
//! - Receiving with the sender's address and the local destination address
//!   (`IP_PKTINFO` / `IPV6_RECVPKTINFO`), so group traffic can be told from unicast.
//! - Socket buffer sizes with read-back and a warning that says how to raise the limit.
//! - Batched I/O through `quinn-udp` (`recvmmsg`, UDP GSO and GRO on Linux; one
//!   datagram per system call elsewhere).
//! - A seam, [`DatagramTransport`], implemented by the real [`UdpTransport`] and
//!   by the in-memory [`MemoryTransport`] (a seeded lossy hub for driver tests).
//!
//! What it does not do: anything of the protocol. It does not look inside
//! payloads, filter its own loopback traffic, number, order, retransmit,
//! authenticate or fragment datagrams. That is `chorus-protocol`'s job.
//!
//! See `docs/transport.md` for options, defaults, errors and platform notes.
//!
//! # Examples
//!
//! Multicast that stays on this host (interface 127.0.0.1, TTL 0):
//!
//! ```no_run
//! use chorus_transport::{DatagramTransport, Outgoing, TransportConfig, UdpTransport};
//!
//! # async fn demo() -> Result<(), chorus_transport::TransportError> {
//! let group = "239.255.77.1:7400".parse().expect("a valid socket address");
//! let transport = UdpTransport::bind(TransportConfig::loopback_multicast(group))?;
//! transport.send_batch(&[Outgoing::to_group("hello")]).await?;
//! let mut received = Vec::new();
//! transport.recv_batch(&mut received, 32).await?;
//! for datagram in &received {
//!     println!("{:?} from {} (group: {})", datagram.payload, datagram.source, datagram.via_group);
//! }
//! # Ok(())
//! # }
//! ```

mod config;
mod error;
mod interface;
mod memory;
mod udp;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub use bytes::Bytes;
pub use config::{Mode, TransportConfig};
pub use error::TransportError;
pub use interface::{Interface, InterfaceInfo, LinkRate, ResolvedInterface, list_interfaces};
pub use memory::{HubConfig, HubStats, MemoryHub, MemoryTransport};
pub use udp::{BufferSizes, TransportStats, UdpTransport};

/// The largest UDP payload over IPv4 (65 535 − 20 − 8); also the receive slot size.
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// Where one outgoing datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    /// Everyone: the multicast group, the broadcast address, or every peer of
    /// the list, depending on the transport's [`Mode`].
    Group,
    /// One address (unicast, or any group address the caller chooses).
    Addr(SocketAddr),
}

/// One datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Where it goes.
    pub destination: Destination,
    /// What it carries; sent without a copy unless GSO coalesces it with its neighbours.
    pub payload: Bytes,
}

impl Outgoing {
    /// A datagram to everyone.
    pub fn to_group(payload: impl Into<Bytes>) -> Self {
        Outgoing {
            destination: Destination::Group,
            payload: payload.into(),
        }
    }

    /// A datagram to one address.
    pub fn to_addr(addr: SocketAddr, payload: impl Into<Bytes>) -> Self {
        Outgoing {
            destination: Destination::Addr(addr),
            payload: payload.into(),
        }
    }
}

/// One received datagram. Everything in it came from the network and is untrusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The datagram's payload, whole (never truncated: every receive slot holds
    /// [`MAX_UDP_PAYLOAD`] bytes).
    pub payload: Bytes,
    /// The sender's address as the IP header says it.
    pub source: SocketAddr,
    /// The IP header's destination address: the group for multicast, the
    /// broadcast address for broadcast, a local address for unicast. `None` where
    /// the platform does not report it.
    pub destination: Option<IpAddr>,
    /// Whether it came to a multicast group or a broadcast address rather than
    /// to this host alone. Always false in [`Mode::Peers`] unless it arrived on a joined group.
    pub via_group: bool,
}

/// The seam between the driver and the network: a real socket
/// ([`UdpTransport`]) or a simulated network ([`MemoryTransport`]).
///
/// The futures are `Send`, so a driver may run on a multi-threaded runtime.
/// The trait uses `impl Future` in return position, so it is used generically
/// (`T: DatagramTransport`), not as `dyn`.
pub trait DatagramTransport: Send + Sync + 'static {
    /// Sends a batch, in order; returns how many of its datagrams were sent.
    ///
    /// A datagram to [`Destination::Group`] counts as sent when it went to the
    /// group / broadcast address, or to at least one peer of a peer list.
    ///
    /// # Errors
    ///
    /// If the first datagram cannot be sent, its error. If a later one fails,
    /// `Ok(n)` with `n` the number sent before it: sending the rest again
    /// reports the error if it persists.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe in the sense that if the future is dropped, a prefix of
    /// the batch may have been sent, and its length is lost. Each datagram is
    /// either sent whole or not at all.
    fn send_batch<'a>(
        &'a self,
        batch: &'a [Outgoing],
    ) -> impl Future<Output = Result<usize, TransportError>> + Send + 'a;

    /// Waits for at least one datagram, then appends up to `max` (at least one)
    /// that are ready to `out`; returns how many were appended.
    ///
    /// # Errors
    ///
    /// An OS error of the receive call; [`TransportError::Closed`] if a memory hub was dropped.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped before it completes, no datagram
    /// has been taken from the socket or queue.
    fn recv_batch<'a>(
        &'a self,
        out: &'a mut Vec<Received>,
        max: usize,
    ) -> impl Future<Output = Result<usize, TransportError>> + Send + 'a;

    /// The address this transport is bound to.
    ///
    /// # Errors
    ///
    /// An OS error from `getsockname`.
    fn local_addr(&self) -> Result<SocketAddr, TransportError>;

    /// The address peers see this transport send from, when it knows one better than
    /// [`local_addr`](Self::local_addr): a socket bound to a wildcard address (`0.0.0.0`)
    /// answers the address of the interface it sends multicast from. The default is
    /// `local_addr`.
    ///
    /// # Errors
    ///
    /// As [`local_addr`](Self::local_addr).
    fn advertised_addr(&self) -> Result<SocketAddr, TransportError> {
        self.local_addr()
    }

    /// The largest payload [`send_batch`](Self::send_batch) accepts.
    fn max_datagram_size(&self) -> usize;

    /// How fast the link under this transport can carry data; the default is
    /// [`LinkRate::Unknown`].
    fn link_rate(&self) -> LinkRate {
        LinkRate::Unknown
    }

    /// Bytes of received datagrams the transport can hold before it drops (for a socket, the
    /// receive buffer the kernel granted, overhead included); `None` if unbounded or unknown.
    /// Peers are assumed to hold about as much: a sender that keeps more than this in flight
    /// overruns them.
    fn receive_buffer(&self) -> Option<usize> {
        None
    }
}

impl<T: DatagramTransport> DatagramTransport for Arc<T> {
    fn send_batch<'a>(
        &'a self,
        batch: &'a [Outgoing],
    ) -> impl Future<Output = Result<usize, TransportError>> + Send + 'a {
        (**self).send_batch(batch)
    }

    fn recv_batch<'a>(
        &'a self,
        out: &'a mut Vec<Received>,
        max: usize,
    ) -> impl Future<Output = Result<usize, TransportError>> + Send + 'a {
        (**self).recv_batch(out, max)
    }

    fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        (**self).local_addr()
    }

    fn advertised_addr(&self) -> Result<SocketAddr, TransportError> {
        (**self).advertised_addr()
    }

    fn max_datagram_size(&self) -> usize {
        (**self).max_datagram_size()
    }

    fn link_rate(&self) -> LinkRate {
        (**self).link_rate()
    }

    fn receive_buffer(&self) -> Option<usize> {
        (**self).receive_buffer()
    }
}
