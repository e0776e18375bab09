//! Addresses of one's own for tests on the loopback: a multicast group (for 127.0.0.1 with
//! TTL 0 and loop on) and free ports.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};

/// A random `u64` (std only: a randomly keyed hasher over a process-wide counter).
#[must_use]
pub fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// A random value (for a cluster name) and a loopback multicast group derived from it that no
/// other test uses: `239.255.x.y` (administratively scoped) on a port in 20 000..50 000.
#[must_use]
pub fn random_group() -> (u64, SocketAddrV4) {
    let r = random_u64();
    let b = r.to_le_bytes();
    let group = SocketAddrV4::new(
        Ipv4Addr::new(239, 255, b[0], b[1].max(1)),
        20_000 + u16::from_le_bytes([b[2], b[3]]) % 30_000,
    );
    (r, group)
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick).
///
/// # Panics
/// If no port can be bound.
#[must_use]
pub fn free_tcp_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("no free TCP port: {e}"))
        .port()
}

/// A UDP port on 127.0.0.1 that was free a moment ago (the kernel's pick).
///
/// # Panics
/// If no port can be bound.
#[must_use]
pub fn free_udp_port() -> u16 {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|s| s.local_addr())
        .unwrap_or_else(|e| panic!("no free UDP port: {e}"))
        .port()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_administratively_scoped_and_differ() {
        let groups: Vec<SocketAddrV4> = (0..64).map(|_| random_group().1).collect();
        for g in &groups {
            let [a, b, _, d] = g.ip().octets();
            assert_eq!((a, b), (239, 255), "{g}");
            assert!(d >= 1 && (20_000..50_000).contains(&g.port()), "{g}");
        }
        let distinct: std::collections::HashSet<_> = groups.iter().collect();
        assert!(distinct.len() > 60, "{groups:?}");
        assert_ne!(free_tcp_port(), 0);
        assert_ne!(free_udp_port(), 0);
    }
}
