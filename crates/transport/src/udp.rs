//! The real transport: one UDP socket, set up with socket2, driven by tokio,
//! batched by quinn-udp.

use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;

use crate::{
    DatagramTransport, Destination, Interface, Mode, Outgoing, Received, ResolvedInterface,
    TransportConfig, TransportError,
};

/// Size of one receive slot: the largest datagram, and the largest GRO train
/// (the kernel never coalesces past 64 KiB).
const SLOT: usize = 64 * 1024;

/// The largest buffer handed to one GSO `sendmsg` (the kernel's limit is 64 KiB
/// including headers).
const GSO_MAX_BYTES: usize = 60 * 1024;

// Every datagram fits a slot; a GSO train fits the kernel's limit with headers.
const _: () = assert!(SLOT >= crate::MAX_UDP_PAYLOAD);
const _: () = assert!(GSO_MAX_BYTES < 65_535 - 48);

/// Socket buffer sizes: what was asked for and what the kernel granted.
///
/// On Linux the granted figure is what `getsockopt` reports, which is twice the
/// usable payload room (the kernel doubles the value for its bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSizes {
    /// `SO_RCVBUF` asked for, if any.
    pub recv_requested: Option<usize>,
    /// `SO_RCVBUF` as read back.
    pub recv_granted: usize,
    /// `SO_SNDBUF` asked for, if any.
    pub send_requested: Option<usize>,
    /// `SO_SNDBUF` as read back.
    pub send_granted: usize,
}

impl BufferSizes {
    /// Whether the kernel granted less receive buffer than asked for.
    pub fn recv_short(&self) -> bool {
        self.recv_requested.is_some_and(|r| self.recv_granted < r)
    }

    /// Whether the kernel granted less send buffer than asked for.
    pub fn send_short(&self) -> bool {
        self.send_requested.is_some_and(|r| self.send_granted < r)
    }
}

/// Counters of a [`UdpTransport`] since it was bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Datagrams handed to the kernel (a fan-out to 3 peers counts 3).
    pub datagrams_sent: u64,
    /// Payload bytes handed to the kernel.
    pub bytes_sent: u64,
    /// `sendmsg` calls made (fewer than datagrams when GSO coalesces).
    pub send_calls: u64,
    /// Sends to one peer of a fan-out that failed while others succeeded.
    pub peer_send_errors: u64,
    /// Datagrams received.
    pub datagrams_received: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Receive system calls that returned data (fewer than datagrams with `recvmmsg` and GRO).
    pub recv_calls: u64,
}

#[derive(Debug, Default)]
struct Counters {
    datagrams_sent: AtomicU64,
    bytes_sent: AtomicU64,
    send_calls: AtomicU64,
    peer_send_errors: AtomicU64,
    datagrams_received: AtomicU64,
    bytes_received: AtomicU64,
    recv_calls: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// The receive side's reusable memory.
struct RecvState {
    /// `quinn_udp::BATCH_SIZE` slots of [`SLOT`] bytes, allocated once.
    scratch: Vec<u8>,
    metas: Vec<RecvMeta>,
    /// Datagrams split off a GRO train beyond the caller's `max`, handed out first next time.
    pending: VecDeque<Received>,
}

/// A UDP socket set up for multicast, broadcast or a peer list; the production
/// [`DatagramTransport`].
///
/// Built with [`UdpTransport::bind`] from a [`TransportConfig`].
///
/// Receiving copies each datagram once, out of a reused receive buffer into an
/// exactly sized [`Bytes`] (the datagrams of one GRO train share one
/// allocation). That keeps a retained payload from pinning a batch-sized buffer.
/// Sending does not copy, except to coalesce a run for GSO.
pub struct UdpTransport {
    socket: tokio::net::UdpSocket,
    state: UdpSocketState,
    config: TransportConfig,
    group_targets: Vec<SocketAddr>,
    interface: Option<ResolvedInterface>,
    broadcasts: Vec<Ipv4Addr>,
    max_datagram_size: usize,
    link_rate: crate::LinkRate,
    buffers: BufferSizes,
    recv: Mutex<RecvState>,
    counters: Counters,
}

impl std::fmt::Debug for UdpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpTransport")
            .field("local_addr", &self.socket.local_addr().ok())
            .field("mode", &self.config.mode)
            .field("interface", &self.interface)
            .finish_non_exhaustive()
    }
}

fn check_multicast(addr: IpAddr) -> Result<(), TransportError> {
    if addr.is_multicast() {
        Ok(())
    } else {
        Err(TransportError::NotMulticast { addr })
    }
}

fn check_family(bind: SocketAddr, other: IpAddr, what: &str) -> Result<(), TransportError> {
    if bind.is_ipv4() == other.is_ipv4() {
        Ok(())
    } else {
        Err(TransportError::FamilyMismatch {
            what: format!("{what} {other} with a socket bound to {bind}"),
        })
    }
}

/// Sets one socket buffer, reads it back and warns when the kernel granted less.
fn set_buffer(
    socket: &Socket,
    requested: Option<usize>,
    recv: bool,
) -> Result<usize, TransportError> {
    let (kind, sysctl) = if recv {
        ("receive", "rmem_max")
    } else {
        ("send", "wmem_max")
    };
    let read_err = |e| TransportError::from_io("reading the socket buffer size of", kind, e);
    if let Some(bytes) = requested {
        let set = if recv {
            socket.set_recv_buffer_size(bytes)
        } else {
            socket.set_send_buffer_size(bytes)
        };
        set.map_err(|e| TransportError::from_io("setting the socket buffer size of", kind, e))?;
    }
    let granted = if recv {
        socket.recv_buffer_size()
    } else {
        socket.send_buffer_size()
    }
    .map_err(read_err)?;
    if let Some(bytes) = requested
        && granted < bytes
    {
        tracing::warn!(
            requested = bytes,
            granted,
            "kernel granted a {kind} buffer of {granted} bytes, less than the {bytes} asked for: \
             raise the limit with `sysctl -w net.core.{sysctl}={bytes}` (persist it in \
             /etc/sysctl.d/), or ask for less"
        );
    }
    Ok(granted)
}

impl UdpTransport {
    /// Opens and sets up the socket described by `config`.
    ///
    /// Must be called from within a tokio runtime (with I/O enabled).
    ///
    /// # Errors
    ///
    /// - [`TransportError::NotMulticast`], [`TransportError::FamilyMismatch`],
    ///   [`TransportError::InvalidConfig`] for a configuration that cannot work;
    /// - [`TransportError::UnknownInterface`], [`TransportError::NoIpv4Address`];
    /// - [`TransportError::AddrInUse`], [`TransportError::PermissionDenied`] from `bind`;
    /// - [`TransportError::NoDevice`] when joining on an interface that is down.
    pub fn bind(config: TransportConfig) -> Result<Self, TransportError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(TransportError::InvalidConfig(
                "UdpTransport::bind must be called from within a tokio runtime".to_owned(),
            ));
        }
        let bind = config.bind_addr();
        let group_targets = match &config.mode {
            Mode::Multicast { group, .. } => {
                check_multicast(group.ip())?;
                vec![*group]
            }
            Mode::Broadcast { addr } => {
                if !addr.is_ipv4() {
                    return Err(TransportError::FamilyMismatch {
                        what: format!("broadcast address {addr} (IPv6 has no broadcast)"),
                    });
                }
                vec![*addr]
            }
            Mode::Peers { peers, .. } => {
                for peer in peers {
                    check_family(bind, peer.ip(), "peer")?;
                }
                peers.clone()
            }
        };
        for group in &config.extra_groups {
            check_multicast(*group)?;
            check_family(bind, *group, "extra group")?;
        }
        let interface = match &config.mode {
            Mode::Multicast { interface, .. } => Some(interface.resolve()?),
            _ if !config.extra_groups.is_empty() => Some(Interface::Default.resolve()?),
            _ => None,
        };

        let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))
            .map_err(|e| TransportError::from_io("creating a UDP socket for", bind, e))?;
        let opt = |what: &'static str| move |e| TransportError::from_io(what, bind, e);
        if bind.is_ipv6() {
            socket
                .set_only_v6(true)
                .map_err(opt("setting IPV6_V6ONLY on"))?;
        }
        if config.reuse_port {
            socket
                .set_reuse_address(true)
                .map_err(opt("setting SO_REUSEADDR on"))?;
            #[cfg(unix)]
            socket
                .set_reuse_port(true)
                .map_err(opt("setting SO_REUSEPORT on"))?;
        }
        let buffers = BufferSizes {
            recv_requested: config.recv_buffer,
            recv_granted: set_buffer(&socket, config.recv_buffer, true)?,
            send_requested: config.send_buffer,
            send_granted: set_buffer(&socket, config.send_buffer, false)?,
        };
        socket
            .bind(&bind.into())
            .map_err(|e| TransportError::from_bind(bind, e))?;

        if let Mode::Broadcast { .. } = config.mode {
            socket
                .set_broadcast(true)
                .map_err(opt("setting SO_BROADCAST on"))?;
        }
        if let Some(iface) = &interface {
            // Without this, Linux hands a wildcard-bound socket every group any
            // socket on the host joined on this port.
            #[cfg(target_os = "linux")]
            if bind.is_ipv4() {
                socket
                    .set_multicast_all_v4(false)
                    .map_err(opt("setting IP_MULTICAST_ALL on"))?;
            } else {
                socket
                    .set_multicast_all_v6(false)
                    .map_err(opt("setting IPV6_MULTICAST_ALL on"))?;
            }
            let groups = group_targets
                .iter()
                .map(SocketAddr::ip)
                .filter(|_| matches!(config.mode, Mode::Multicast { .. }))
                .chain(config.extra_groups.iter().copied());
            for group in groups {
                join_or_leave(&socket, group, iface, true)?;
            }
        }
        if let Mode::Multicast { ttl, loopback, .. } = &config.mode
            && let Some(iface) = &interface
        {
            set_multicast_send_options(&socket, bind, iface, *ttl, *loopback)?;
        }

        let state = UdpSocketState::new((&socket).into())
            .map_err(opt("enabling batched I/O and packet info on"))?;
        let socket = tokio::net::UdpSocket::from_std(socket.into())
            .map_err(opt("registering with tokio the socket of"))?;

        let broadcasts = crate::list_interfaces()
            .map(|all| all.into_iter().flat_map(|i| i.ipv4_broadcast).collect())
            .unwrap_or_default();
        // Multicast goes out of one known interface: its MTU and speed are the path's.
        let (max_datagram_size, link_rate) = match (&config.mode, &interface) {
            (Mode::Multicast { .. }, Some(iface)) => (
                config.effective_max_datagram_size_for(iface.mtu()),
                iface.link_rate(),
            ),
            _ => (
                config.effective_max_datagram_size(),
                crate::LinkRate::Unknown,
            ),
        };
        let slots = quinn_udp::BATCH_SIZE.max(1);
        let transport = UdpTransport {
            link_rate,
            max_datagram_size,
            socket,
            state,
            group_targets,
            interface,
            broadcasts,
            buffers,
            recv: Mutex::new(RecvState {
                scratch: vec![0; slots * SLOT],
                metas: vec![RecvMeta::default(); slots],
                pending: VecDeque::new(),
            }),
            counters: Counters::default(),
            config,
        };
        tracing::debug!(
            local_addr = ?transport.socket.local_addr().ok(),
            mode = ?transport.config.mode,
            interface = ?transport.interface,
            gso_segments = transport.state.max_gso_segments(),
            gro_segments = transport.state.gro_segments(),
            "udp transport bound"
        );
        Ok(transport)
    }

    /// Joins another multicast `group` on `interface`, on this socket and port.
    ///
    /// # Errors
    ///
    /// [`TransportError::NotMulticast`], [`TransportError::FamilyMismatch`],
    /// [`TransportError::UnknownInterface`], [`TransportError::NoDevice`], or the OS error.
    pub fn join(&self, group: IpAddr, interface: &Interface) -> Result<(), TransportError> {
        self.membership(group, interface, true)
    }

    /// Leaves a multicast `group` joined on `interface` (by the config or by [`join`](Self::join)).
    ///
    /// # Errors
    ///
    /// As [`join`](Self::join); leaving a group that was not joined is an OS error (`EADDRNOTAVAIL`).
    pub fn leave(&self, group: IpAddr, interface: &Interface) -> Result<(), TransportError> {
        self.membership(group, interface, false)
    }

    fn membership(
        &self,
        group: IpAddr,
        interface: &Interface,
        join: bool,
    ) -> Result<(), TransportError> {
        check_multicast(group)?;
        check_family(self.config.bind_addr(), group, "group")?;
        let iface = interface.resolve()?;
        join_or_leave(&socket2::SockRef::from(&self.socket), group, &iface, join)
    }

    /// The socket buffer sizes asked for and granted.
    pub fn buffer_sizes(&self) -> BufferSizes {
        self.buffers
    }

    /// Counters since the transport was bound.
    pub fn stats(&self) -> TransportStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TransportStats {
            datagrams_sent: get(&c.datagrams_sent),
            bytes_sent: get(&c.bytes_sent),
            send_calls: get(&c.send_calls),
            peer_send_errors: get(&c.peer_send_errors),
            datagrams_received: get(&c.datagrams_received),
            bytes_received: get(&c.bytes_received),
            recv_calls: get(&c.recv_calls),
        }
    }

    /// The configuration this transport was built from.
    pub fn config(&self) -> &TransportConfig {
        &self.config
    }

    /// The interface multicast is joined and sent on, once resolved.
    pub fn interface(&self) -> Option<&ResolvedInterface> {
        self.interface.as_ref()
    }

    /// Where a [`Destination::Group`] datagram goes.
    pub fn group_targets(&self) -> &[SocketAddr] {
        &self.group_targets
    }

    /// How many datagrams one `sendmsg` may carry (1 without GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// How many datagrams the kernel may coalesce into one receive (1 without GRO).
    pub fn gro_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn is_group_destination(&self, dst: IpAddr) -> bool {
        match dst {
            IpAddr::V6(v6) => v6.is_multicast(),
            IpAddr::V4(v4) => {
                v4.is_multicast() || v4.is_broadcast() || self.broadcasts.contains(&v4) || {
                    matches!(self.config.mode, Mode::Broadcast { addr } if addr.ip() == dst)
                }
            }
        }
    }

    /// How many datagrams from the start of `batch` go into one GSO send.
    fn gso_run(&self, batch: &[Outgoing]) -> usize {
        let Some(first) = batch.first() else {
            return 0;
        };
        let size = first.payload.len();
        let max_segments = self.state.max_gso_segments();
        if !self.config.gso || max_segments <= 1 || size == 0 {
            return 1;
        }
        let mut run = 1;
        let mut bytes = size;
        for next in &batch[1..] {
            let len = next.payload.len();
            // Every segment but the last has the full size; the last may be shorter.
            if next.destination != first.destination
                || len == 0
                || len > size
                || run >= max_segments
                || bytes + len > GSO_MAX_BYTES
            {
                break;
            }
            run += 1;
            bytes += len;
            if len < size {
                break;
            }
        }
        run
    }

    /// Sends `contents` (one datagram, or a GSO train of `segment_size` pieces)
    /// to every target of `destination`.
    async fn send_to(
        &self,
        destination: Destination,
        contents: &[u8],
        segment_size: Option<usize>,
        datagrams: u64,
    ) -> Result<(), TransportError> {
        let one;
        let targets: &[SocketAddr] = match destination {
            Destination::Group => &self.group_targets,
            Destination::Addr(addr) => {
                check_family(self.config.bind_addr(), addr.ip(), "destination")?;
                one = [addr];
                &one
            }
        };
        if targets.is_empty() {
            return Err(TransportError::InvalidConfig(
                "a group send in peers mode with an empty peer list: add peers".to_owned(),
            ));
        }
        let mut first_error = None;
        let mut delivered = 0usize;
        for &target in targets {
            let transmit = Transmit {
                destination: target,
                ecn: None,
                contents,
                segment_size,
                src_ip: None,
            };
            let result = self
                .socket
                .async_io(Interest::WRITABLE, || {
                    self.state.try_send((&self.socket).into(), &transmit)
                })
                .await;
            match result {
                Ok(()) => {
                    delivered += 1;
                    bump(&self.counters.send_calls, 1);
                    bump(&self.counters.datagrams_sent, datagrams);
                    bump(&self.counters.bytes_sent, contents.len() as u64);
                }
                Err(e) => {
                    let err = if e.raw_os_error() == Some(libc::EMSGSIZE) {
                        TransportError::DatagramTooLarge {
                            len: segment_size.unwrap_or(contents.len()),
                            max: self.max_datagram_size,
                            target: target.to_string(),
                        }
                    } else {
                        TransportError::from_io("sending", target, e)
                    };
                    if targets.len() > 1 {
                        bump(&self.counters.peer_send_errors, 1);
                        tracing::debug!(%target, error = %err, "send to one peer failed");
                    }
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            Some(err) if delivered == 0 => Err(err),
            _ => Ok(()),
        }
    }

    /// Sends a GSO train; falls back to one datagram per call if the kernel refuses GSO.
    async fn send_run(&self, run: &[Outgoing]) -> Result<(), TransportError> {
        let (first, rest) = match run {
            [only] => {
                return self.send_to(only.destination, &only.payload, None, 1).await;
            }
            [first, rest @ ..] => (first, rest),
            [] => return Ok(()),
        };
        let size = first.payload.len();
        let mut train = Vec::with_capacity(run.iter().map(|o| o.payload.len()).sum());
        train.extend_from_slice(&first.payload);
        for o in rest {
            train.extend_from_slice(&o.payload);
        }
        match self
            .send_to(first.destination, &train, Some(size), run.len() as u64)
            .await
        {
            Ok(()) => Ok(()),
            // quinn-udp turns GSO off after EIO/EINVAL; send the run one by one.
            Err(_) if self.state.max_gso_segments() <= 1 => {
                for o in run {
                    self.send_to(o.destination, &o.payload, None, 1).await?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn lock_recv(&self) -> std::sync::MutexGuard<'_, RecvState> {
        // A poisoned lock only means another receive panicked mid-copy; the
        // buffers hold no invariant worth refusing to go on for.
        self.recv.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes what is ready from the socket without waiting; `WouldBlock` if nothing is.
    fn recv_ready(&self, out: &mut Vec<Received>, max: usize) -> io::Result<usize> {
        let max = max.max(1);
        let mut guard = self.lock_recv();
        let RecvState {
            scratch,
            metas,
            pending,
        } = &mut *guard;
        let mut taken = take_pending(pending, out, max);
        if taken > 0 {
            return Ok(taken);
        }
        let slots = max.min(metas.len());
        let mut bufs: Vec<IoSliceMut<'_>> = scratch
            .chunks_mut(SLOT)
            .take(slots)
            .map(IoSliceMut::new)
            .collect();
        let messages = self
            .state
            .recv((&self.socket).into(), &mut bufs, &mut metas[..slots])?;
        bump(&self.counters.recv_calls, 1);
        for (meta, buf) in metas.iter().zip(bufs.iter()).take(messages) {
            let len = meta.len.min(buf.len());
            let data = Bytes::copy_from_slice(&buf[..len]);
            let destination = meta.dst_ip;
            let via_group = destination.is_some_and(|d| self.is_group_destination(d));
            let stride = if meta.stride == 0 {
                len.max(1)
            } else {
                meta.stride
            };
            let mut offset = 0;
            loop {
                let end = (offset + stride).min(len);
                let datagram = Received {
                    payload: data.slice(offset..end),
                    source: meta.addr,
                    destination,
                    via_group,
                };
                bump(&self.counters.datagrams_received, 1);
                bump(&self.counters.bytes_received, (end - offset) as u64);
                if taken < max {
                    out.push(datagram);
                    taken += 1;
                } else {
                    pending.push_back(datagram);
                }
                offset = end;
                if offset >= len {
                    break;
                }
            }
        }
        Ok(taken)
    }
}

/// Moves up to `max` datagrams left over from an earlier GRO train to `out`.
fn take_pending(pending: &mut VecDeque<Received>, out: &mut Vec<Received>, max: usize) -> usize {
    let n = pending.len().min(max);
    out.extend(pending.drain(..n));
    n
}

fn join_or_leave(
    socket: &Socket,
    group: IpAddr,
    iface: &ResolvedInterface,
    join: bool,
) -> Result<(), TransportError> {
    let op = if join {
        "joining a multicast group"
    } else {
        "leaving a multicast group"
    };
    if join && !iface.up {
        // Joining by index succeeds on a down interface, and then nothing
        // arrives; report what the kernel reports for a join by address.
        return Err(TransportError::from_io(
            op,
            &iface.name,
            io::Error::from_raw_os_error(libc::ENODEV),
        ));
    }
    let result = match group {
        IpAddr::V4(group) => {
            #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
            {
                // By index (ip_mreqn), so an interface without an IPv4 address can still join.
                let how = if iface.index == 0 {
                    socket2::InterfaceIndexOrAddress::Address(Ipv4Addr::UNSPECIFIED)
                } else {
                    socket2::InterfaceIndexOrAddress::Index(iface.index)
                };
                if join {
                    socket.join_multicast_v4_n(&group, &how)
                } else {
                    socket.leave_multicast_v4_n(&group, &how)
                }
            }
            #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
            {
                let addr = match (iface.index, iface.ipv4) {
                    (0, _) => Ipv4Addr::UNSPECIFIED,
                    (_, Some(addr)) => addr,
                    (_, None) => {
                        return Err(TransportError::NoIpv4Address {
                            interface: iface.name.clone(),
                        });
                    }
                };
                if join {
                    socket.join_multicast_v4(&group, &addr)
                } else {
                    socket.leave_multicast_v4(&group, &addr)
                }
            }
        }
        IpAddr::V6(group) => {
            if join {
                socket.join_multicast_v6(&group, iface.index)
            } else {
                socket.leave_multicast_v6(&group, iface.index)
            }
        }
    };
    result.map_err(|e| {
        if e.raw_os_error() == Some(libc::ENODEV) {
            TransportError::from_io(op, &iface.name, e)
        } else {
            TransportError::from_io(op, format!("{group} on `{}`", iface.name), e)
        }
    })
}

fn set_multicast_send_options(
    socket: &Socket,
    bind: SocketAddr,
    iface: &ResolvedInterface,
    ttl: u32,
    loopback: bool,
) -> Result<(), TransportError> {
    let opt = |what: &'static str| move |e| TransportError::from_io(what, bind, e);
    if bind.is_ipv4() {
        if iface.index != 0 {
            let addr = iface.ipv4.ok_or_else(|| TransportError::NoIpv4Address {
                interface: iface.name.clone(),
            })?;
            socket
                .set_multicast_if_v4(&addr)
                .map_err(|e| TransportError::from_io("setting IP_MULTICAST_IF", &iface.name, e))?;
        }
        socket
            .set_multicast_ttl_v4(ttl)
            .map_err(opt("setting IP_MULTICAST_TTL on"))?;
        socket
            .set_multicast_loop_v4(loopback)
            .map_err(opt("setting IP_MULTICAST_LOOP on"))?;
    } else {
        if iface.index != 0 {
            socket.set_multicast_if_v6(iface.index).map_err(|e| {
                TransportError::from_io("setting IPV6_MULTICAST_IF", &iface.name, e)
            })?;
        }
        socket
            .set_multicast_hops_v6(ttl)
            .map_err(opt("setting IPV6_MULTICAST_HOPS on"))?;
        socket
            .set_multicast_loop_v6(loopback)
            .map_err(opt("setting IPV6_MULTICAST_LOOP on"))?;
    }
    Ok(())
}

impl DatagramTransport for UdpTransport {
    async fn send_batch(&self, batch: &[Outgoing]) -> Result<usize, TransportError> {
        let mut sent = 0;
        while sent < batch.len() {
            let first = &batch[sent];
            if first.payload.len() > self.max_datagram_size {
                let err = TransportError::DatagramTooLarge {
                    len: first.payload.len(),
                    max: self.max_datagram_size,
                    target: match first.destination {
                        Destination::Group => "the group".to_owned(),
                        Destination::Addr(addr) => addr.to_string(),
                    },
                };
                return if sent == 0 { Err(err) } else { Ok(sent) };
            }
            let rest = &batch[sent..];
            // A train's later datagrams are no larger than its first, so none is oversized.
            let run = self.gso_run(rest);
            match self.send_run(&rest[..run]).await {
                Ok(()) => sent += run,
                Err(err) if sent == 0 => return Err(err),
                Err(err) => {
                    tracing::debug!(error = %err, sent, "send batch stopped early");
                    return Ok(sent);
                }
            }
        }
        Ok(sent)
    }

    async fn recv_batch(
        &self,
        out: &mut Vec<Received>,
        max: usize,
    ) -> Result<usize, TransportError> {
        let taken = take_pending(&mut self.lock_recv().pending, out, max.max(1));
        if taken > 0 {
            return Ok(taken);
        }
        let local = self.config.bind_addr();
        self.socket
            .async_io(Interest::READABLE, || self.recv_ready(out, max))
            .await
            .map_err(|e| TransportError::from_io("receiving on", local, e))
    }

    fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.socket
            .local_addr()
            .map_err(|e| TransportError::from_io("reading the local address of", "the socket", e))
    }

    fn advertised_addr(&self) -> Result<SocketAddr, TransportError> {
        let local = self.local_addr()?;
        if !local.ip().is_unspecified() {
            return Ok(local);
        }
        // Bound to the wildcard: multicast leaves from the interface's IPv4 address
        // (IP_MULTICAST_IF), which is what the peers see.
        let from_interface = self
            .interface
            .as_ref()
            .and_then(|i| i.ipv4)
            .filter(|_| local.is_ipv4());
        Ok(from_interface.map_or(local, |ip| SocketAddr::new(ip.into(), local.port())))
    }

    fn max_datagram_size(&self) -> usize {
        self.max_datagram_size
    }

    fn link_rate(&self) -> crate::LinkRate {
        self.link_rate
    }

    fn receive_buffer(&self) -> Option<usize> {
        Some(self.buffers.recv_granted)
    }
}
