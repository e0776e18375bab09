//! Network interfaces: naming one (by name, address or index) and finding it.
//!
//! Resolution uses `if_nametoindex` / `if_nameindex` / `getifaddrs` through the
//! `nix` crate, so this crate needs no `unsafe` of its own.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::TransportError;

/// The interface multicast is joined and sent on.
///
/// Parsed from a string by [`FromStr`]: an IP address becomes [`Interface::Addr`],
/// a decimal number [`Interface::Index`], `""`/`"default"`/`"any"` [`Interface::Default`],
/// anything else [`Interface::Name`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Interface {
    /// Let the kernel choose by its routing table (the interface of the route to
    /// the group, usually the default route's). Do not use this on a host whose
    /// default interface is a real network when testing.
    #[default]
    Default,
    /// An interface by name, such as `eth0` or `lo`.
    Name(String),
    /// The interface that has this address assigned, such as `127.0.0.1`.
    Addr(IpAddr),
    /// An interface by index, as `ip link` numbers them.
    Index(u32),
}

impl Interface {
    /// The loopback interface addressed as `127.0.0.1`; what single-host tests use.
    pub fn loopback_v4() -> Self {
        Interface::Addr(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// Finds the interface on this host.
    ///
    /// # Errors
    ///
    /// [`TransportError::UnknownInterface`] if no interface matches;
    /// [`TransportError::Io`] if the interface list cannot be read.
    pub fn resolve(&self) -> Result<ResolvedInterface, TransportError> {
        if let Interface::Default = self {
            return Ok(ResolvedInterface {
                name: "default".to_owned(),
                index: 0,
                ipv4: None,
                up: true,
                loopback: false,
            });
        }
        let all = list_interfaces()?;
        let unknown = || TransportError::UnknownInterface {
            interface: self.to_string(),
        };
        let found = match self {
            Interface::Default => None,
            Interface::Name(name) => all.into_iter().find(|i| &i.name == name),
            Interface::Index(index) => all.into_iter().find(|i| i.index == *index),
            Interface::Addr(IpAddr::V4(addr)) => all.into_iter().find(|i| i.ipv4.contains(addr)),
            Interface::Addr(IpAddr::V6(addr)) => all.into_iter().find(|i| i.ipv6.contains(addr)),
        };
        let info = found.ok_or_else(unknown)?;
        // An interface named by one of its IPv4 addresses sends from that address.
        let ipv4 = match self {
            Interface::Addr(IpAddr::V4(addr)) => Some(*addr),
            _ => info.ipv4.first().copied(),
        };
        Ok(ResolvedInterface {
            name: info.name,
            index: info.index,
            ipv4,
            up: info.up,
            loopback: info.loopback,
        })
    }
}

impl fmt::Display for Interface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Interface::Default => f.write_str("default"),
            Interface::Name(name) => f.write_str(name),
            Interface::Addr(addr) => write!(f, "{addr}"),
            Interface::Index(index) => write!(f, "#{index}"),
        }
    }
}

impl FromStr for Interface {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        Ok(if s.is_empty() || s == "default" || s == "any" {
            Interface::Default
        } else if let Ok(addr) = s.parse::<IpAddr>() {
            Interface::Addr(addr)
        } else if let Ok(index) = s.trim_start_matches('#').parse::<u32>() {
            Interface::Index(index)
        } else {
            Interface::Name(s.to_owned())
        })
    }
}

impl From<&str> for Interface {
    fn from(s: &str) -> Self {
        match s.parse() {
            Ok(interface) => interface,
            Err(never) => match never {},
        }
    }
}

/// An interface found on this host, as a transport uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedInterface {
    /// Its name (`"default"` for [`Interface::Default`]).
    pub name: String,
    /// Its index; 0 means "let the kernel choose".
    pub index: u32,
    /// The IPv4 address multicast is sent from, if it has one.
    pub ipv4: Option<Ipv4Addr>,
    /// Whether it is administratively up (always true for [`Interface::Default`]).
    pub up: bool,
    /// Whether it is a loopback interface (`lo`): nothing it carries leaves the host.
    pub loopback: bool,
}

impl ResolvedInterface {
    /// How fast this interface can carry data: [`LinkRate::Unlimited`] for loopback (there is
    /// no wire; the CPU is the limit), the speed the driver reports in
    /// `/sys/class/net/<name>/speed` (Ethernet, veth), or [`LinkRate::Unknown`].
    pub fn link_rate(&self) -> LinkRate {
        if self.loopback {
            return LinkRate::Unlimited;
        }
        self.sysfs("speed")
            .and_then(|text| text.trim().parse::<u64>().ok())
            .filter(|mbit| *mbit > 0)
            .map_or(LinkRate::Unknown, |mbit| {
                LinkRate::BitsPerSec(mbit.saturating_mul(1_000_000))
            })
    }

    /// The interface's link MTU in bytes (65 536 for Linux's `lo`, 1 500 for Ethernet and
    /// veth, 9 000 with jumbo frames), read from `/sys/class/net/<name>/mtu`. `None` for
    /// [`Interface::Default`] or where the kernel does not say.
    pub fn mtu(&self) -> Option<usize> {
        let text = self.sysfs("mtu")?;
        text.trim().parse().ok().filter(|mtu: &usize| *mtu >= 576)
    }

    /// `/sys/class/net/<name>/<attribute>`, for a real interface with a plain name.
    fn sysfs(&self, attribute: &str) -> Option<String> {
        if self.index == 0 || self.name.contains('/') || self.name.starts_with('.') {
            return None;
        }
        std::fs::read_to_string(format!("/sys/class/net/{}/{attribute}", self.name)).ok()
    }
}

/// How fast a transport's link can carry data, as far as the host knows; the protocol's send
/// rate limit follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinkRate {
    /// The host does not say (no interface, or a driver without a speed).
    #[default]
    Unknown,
    /// No wire to overrun: the loopback, or an in-memory network.
    Unlimited,
    /// The link's nominal speed in bits per second.
    BitsPerSec(u64),
}

/// One interface of this host and its state; see [`list_interfaces`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// Name, such as `eth0`.
    pub name: String,
    /// Index, as `ip link` numbers them.
    pub index: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Can do multicast (`IFF_MULTICAST`).
    pub multicast: bool,
    /// Is a loopback interface (`IFF_LOOPBACK`).
    pub loopback: bool,
    /// IPv4 addresses assigned to it.
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv4 broadcast addresses of its subnets.
    pub ipv4_broadcast: Vec<Ipv4Addr>,
    /// IPv6 addresses assigned to it.
    pub ipv6: Vec<Ipv6Addr>,
}

/// Lists this host's interfaces, including those without any address (a
/// freshly made network namespace's `lo` is down and has none).
///
/// # Errors
///
/// [`TransportError::Io`] if the kernel's interface list cannot be read.
#[cfg(unix)]
pub fn list_interfaces() -> Result<Vec<InterfaceInfo>, TransportError> {
    use nix::net::if_::InterfaceFlags;

    let io_err = |errno: nix::errno::Errno| TransportError::Io {
        op: "listing",
        target: "network interfaces".to_owned(),
        source: std::io::Error::from(errno),
    };

    let mut out: Vec<InterfaceInfo> = Vec::new();
    let info_for = |out: &mut Vec<InterfaceInfo>, name: &str| -> Option<usize> {
        if let Some(pos) = out.iter().position(|i| i.name == name) {
            return Some(pos);
        }
        // An interface that vanished between the two calls is skipped.
        let index = nix::net::if_::if_nametoindex(name).ok()?;
        out.push(InterfaceInfo {
            name: name.to_owned(),
            index,
            up: false,
            multicast: false,
            loopback: false,
            ipv4: Vec::new(),
            ipv4_broadcast: Vec::new(),
            ipv6: Vec::new(),
        });
        Some(out.len() - 1)
    };

    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    for iface in nix::net::if_::if_nameindex().map_err(io_err)?.iter() {
        let name = iface.name().to_string_lossy();
        info_for(&mut out, &name);
    }

    for ifaddr in nix::ifaddrs::getifaddrs().map_err(io_err)? {
        let Some(pos) = info_for(&mut out, &ifaddr.interface_name) else {
            continue;
        };
        let info = &mut out[pos];
        info.up |= ifaddr.flags.contains(InterfaceFlags::IFF_UP);
        info.multicast |= ifaddr.flags.contains(InterfaceFlags::IFF_MULTICAST);
        info.loopback |= ifaddr.flags.contains(InterfaceFlags::IFF_LOOPBACK);
        let Some(address) = ifaddr.address else {
            continue;
        };
        if let Some(v4) = address.as_sockaddr_in() {
            info.ipv4.push(v4.ip());
            if let Some(brd) = ifaddr.broadcast.as_ref().and_then(|b| b.as_sockaddr_in()) {
                info.ipv4_broadcast.push(brd.ip());
            }
        } else if let Some(v6) = address.as_sockaddr_in6() {
            info.ipv6.push(v6.ip());
        }
    }
    out.sort_by_key(|i| i.index);
    Ok(out)
}

/// Lists this host's interfaces; on this platform there is no way to, so the list is empty.
///
/// # Errors
///
/// Never on this platform.
#[cfg(not(unix))]
pub fn list_interfaces() -> Result<Vec<InterfaceInfo>, TransportError> {
    Ok(Vec::new())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(Interface::from("eth0"), Interface::Name("eth0".into()));
        assert_eq!(Interface::from("lo"), Interface::Name("lo".into()));
        assert_eq!(
            Interface::from("127.0.0.1"),
            Interface::Addr("127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            Interface::from("::1"),
            Interface::Addr("::1".parse().unwrap())
        );
        assert_eq!(Interface::from("3"), Interface::Index(3));
        assert_eq!(Interface::from("#3"), Interface::Index(3));
        assert_eq!(Interface::from("default"), Interface::Default);
        assert_eq!(Interface::from(""), Interface::Default);
    }

    #[test]
    fn loopback_resolves_by_name_address_and_index() {
        let by_name = Interface::from("lo").resolve().unwrap();
        assert!(by_name.index > 0);
        assert_eq!(by_name.ipv4, Some(Ipv4Addr::LOCALHOST));
        let by_addr = Interface::loopback_v4().resolve().unwrap();
        assert_eq!(by_addr, by_name);
        let by_index = Interface::Index(by_name.index).resolve().unwrap();
        assert_eq!(by_index.name, "lo");
    }

    #[test]
    fn unknown_interface_names_the_remedy() {
        let err = Interface::from("nosuchif0").resolve().unwrap_err();
        assert!(matches!(err, TransportError::UnknownInterface { .. }));
        let msg = err.to_string();
        assert!(msg.contains("`nosuchif0`"), "{msg}");
        assert!(msg.contains("ip -br link"), "{msg}");
        let err = Interface::Index(999_999).resolve().unwrap_err();
        assert!(err.to_string().contains("#999999"));
        let err = Interface::from("192.0.2.254").resolve();
        // 192.0.2.0/24 is TEST-NET-1; this host must not have .254 of it.
        assert!(matches!(err, Err(TransportError::UnknownInterface { .. })));
    }

    #[test]
    fn lists_loopback_as_up_multicast_loopback() {
        let all = list_interfaces().unwrap();
        let lo = all.iter().find(|i| i.name == "lo").unwrap();
        assert!(lo.up && lo.loopback);
        assert!(lo.ipv4.contains(&Ipv4Addr::LOCALHOST));
    }
}
