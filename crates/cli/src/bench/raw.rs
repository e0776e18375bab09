//! The baseline: raw UDP multicast with blocking sockets, one OS thread per side, no protocol
//! and no runtime. What the kernel drops stays lost.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::Figures;
use super::clock::{HEADER, nanos, now_ns, offset, stamp};
use super::tally::{Bounds, Tally};

/// A raw receiver of the in-process run stops after this long without a datagram.
const RAW_IDLE: Duration = Duration::from_millis(500);

/// How long a blocking `recv` waits before the receiver looks at its idle and time bounds.
const RECV_POLL: Duration = Duration::from_millis(50);

/// Socket buffers asked for (the kernel caps them at `rmem_max` / `wmem_max`).
const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// One blocking receiver socket joined to `group` on the interface with address `iface`.
pub(super) fn receiver(group: SocketAddrV4, iface: Ipv4Addr) -> std::io::Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, group.port())).into())?;
    sock.join_multicast_v4(group.ip(), &iface)?;
    sock.set_read_timeout(Some(RECV_POLL))?;
    Ok(sock.into())
}

/// The blocking sender socket: multicast out of `iface` with `ttl`, loop on or off.
pub(super) fn sender(
    iface: Ipv4Addr,
    ttl: u32,
    multicast_loop: bool,
) -> std::io::Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_multicast_if_v4(&iface)?;
    sock.set_multicast_ttl_v4(ttl)?;
    sock.set_multicast_loop_v4(multicast_loop)?;
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(iface, 0)).into())?;
    Ok(sock.into())
}

/// Blocking `recv` in a loop until `bounds` say stop.
pub(super) fn receive(sock: &UdpSocket, size: usize, bounds: Bounds) -> Tally {
    let mut buf = vec![0u8; size.max(2048) + 64];
    let mut tally = Tally::new();
    let started = now_ns();
    while !bounds.done(&tally, started) {
        match sock.recv(&mut buf) {
            Ok(n) => {
                tally.record(&buf[..n]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                eprintln!("bench: raw receive failed: {e}");
                tally.stop = "error";
                return tally;
            }
        }
    }
    tally.stop = bounds.reason(&tally);
    tally
}

/// Blocking `sendto` of `messages` stamped datagrams in a loop, paced at `rate` if given, until
/// `deadline` ([`now_ns`]). Returns how many were sent.
pub(super) fn send(
    sock: &UdpSocket,
    group: SocketAddrV4,
    size: usize,
    messages: u64,
    deadline: u64,
    rate: Option<u64>,
) -> std::io::Result<u64> {
    let mut payload = vec![0xA5u8; size.max(HEADER)];
    let t0 = now_ns();
    let mut sent = 0;
    for seq in 0..messages {
        let now = now_ns();
        if now >= deadline {
            break;
        }
        if let Some(due) = offset(seq, rate).map(|d| t0.saturating_add(nanos(d)))
            && due > now
        {
            std::thread::sleep(Duration::from_nanos(due - now));
        }
        stamp(&mut payload, seq);
        sock.send_to(&payload, group)?;
        sent += 1;
    }
    Ok(sent)
}

/// Raw UDP multicast on the loopback: `messages` datagrams of `size` bytes to `receivers`
/// sockets, each read by its own thread; the calling thread sends.
///
/// # Errors
/// When a socket cannot be made or joined, or sending fails.
pub fn measure(
    group: SocketAddrV4,
    size: usize,
    receivers: usize,
    messages: usize,
    max: Duration,
    rate: Option<u64>,
) -> anyhow::Result<Figures> {
    let size = size.max(HEADER);
    let socks = (0..receivers)
        .map(|_| receiver(group, Ipv4Addr::LOCALHOST))
        .collect::<std::io::Result<Vec<_>>>()?;
    let sender = sender(Ipv4Addr::LOCALHOST, 0, true)?;
    let deadline = now_ns().saturating_add(nanos(max));
    let bounds = Bounds {
        expect: messages as u64,
        deadline,
        idle: Some(RAW_IDLE),
        idle_before_first: true,
    };
    let (start, sent, tallies) = std::thread::scope(|s| {
        let threads: Vec<_> = socks
            .iter()
            .map(|sock| s.spawn(move || receive(sock, size, bounds)))
            .collect();
        let start = now_ns();
        let sent = send(&sender, group, size, messages as u64, deadline, rate);
        let tallies = threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| anyhow::anyhow!("a raw receiver thread panicked"))
            })
            .collect::<anyhow::Result<Vec<Tally>>>();
        (start, sent, tallies)
    });
    Ok(Figures::from_tallies(sent?, start, &tallies?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::bench::pick_group;

    #[test]
    fn raw_loopback_delivers() {
        let group = pick_group(rand::random(), 1);
        let f = measure(group, 64, 2, 200, Duration::from_secs(5), None).unwrap();
        assert_eq!(f.sent, 200);
        assert_eq!(f.receivers, 2);
        assert!(f.delivered > 0, "{f:?}");
        assert!(f.delivered <= 400);
        assert!(f.secs > 0.0 && f.secs < 5.0, "{f:?}");
    }
}
