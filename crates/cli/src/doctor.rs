//! `chorus doctor`: checks that multicast can work on this host and says how to fix what cannot.
//!
//! The probe datagrams are sent with TTL (hop limit) 0 and multicast loop on, so they never
//! leave this host whatever interface is checked.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use chorus_transport::{Interface, InterfaceInfo, list_interfaces};
use serde_json::json;
use socket2::{Domain, Protocol, Socket, Type};

use crate::cli::DoctorArgs;
use crate::config::DEFAULT_GROUP;

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but worth a look.
    Warn,
    /// Multicast will not work until this is fixed.
    Fail,
}

/// One check: what was looked at, what was found, how to fix it.
#[derive(Debug, Clone)]
pub struct Check {
    /// Short name.
    pub name: &'static str,
    /// Verdict.
    pub status: Status,
    /// What was found, in plain words.
    pub detail: String,
    /// What to do about it (empty when nothing).
    pub fix: String,
}

impl Check {
    fn new(
        name: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name,
            status,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

/// Recommended minimum for `net.core.rmem_max` / `wmem_max`.
const RECOMMENDED_BUF: u64 = 4 * 1024 * 1024;

/// Runs every check; returns them in order.
pub fn run_checks(args: &DoctorArgs) -> Vec<Check> {
    let mut checks = Vec::new();
    let group = args.group.unwrap_or_else(|| {
        // A random high port so the probe does not disturb an agent on the default one.
        SocketAddr::new(DEFAULT_GROUP.ip(), 40_000 + rand::random::<u16>() % 20_000)
    });
    let iface_text = args.iface.clone().unwrap_or_default();
    let iface: Interface = if iface_text.is_empty() {
        if group.is_ipv4() {
            Interface::loopback_v4()
        } else {
            Interface::Name("lo".into())
        }
    } else {
        Interface::from(iface_text.as_str())
    };

    if !group.ip().is_multicast() {
        checks.push(Check::new(
            "group",
            Status::Fail,
            format!("{} is not a multicast address", group.ip()),
            "use an address in 239.255.0.0/16 (IPv4, site-local) or ff15::/16 (IPv6)",
        ));
        return checks;
    }

    let info = check_interface(&iface, group, &mut checks);
    check_ttl(args.ttl, info.as_ref(), &mut checks);
    if let Some(info) = &info {
        if group.is_ipv4() {
            check_route_v4(info, &mut checks);
        }
        check_probe(&iface, info, group, &mut checks);
    }
    check_buffers(&mut checks);
    checks
}

/// Finds the interface and checks its state.
fn check_interface(
    iface: &Interface,
    group: SocketAddr,
    checks: &mut Vec<Check>,
) -> Option<InterfaceInfo> {
    let all = match list_interfaces() {
        Ok(all) => all,
        Err(e) => {
            checks.push(Check::new(
                "interface",
                Status::Fail,
                format!("cannot list interfaces: {e}"),
                "",
            ));
            return None;
        }
    };
    let found = all.iter().find(|i| match iface {
        Interface::Name(n) => &i.name == n,
        Interface::Index(x) => i.index == *x,
        Interface::Addr(IpAddr::V4(a)) => i.ipv4.contains(a),
        Interface::Addr(IpAddr::V6(a)) => i.ipv6.contains(a),
        Interface::Default => false,
    });
    let Some(info) = found.cloned() else {
        let names: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
        checks.push(Check::new(
            "interface",
            Status::Fail,
            format!("no interface `{iface}` on this host (there are: {})", names.join(", ")),
            "pass one of those names or one of their addresses with --iface (`ip -br addr` lists them)",
        ));
        return None;
    };
    let name = info.name.clone();
    if !info.up {
        checks.push(Check::new(
            "interface",
            Status::Fail,
            format!("interface {name} is down"),
            format!("bring it up: `ip link set {name} up` (as root)"),
        ));
        return Some(info);
    }
    if group.is_ipv4() && info.ipv4.is_empty() {
        checks.push(Check::new(
            "interface",
            Status::Fail,
            format!("interface {name} has no IPv4 address, needed to send IPv4 multicast"),
            format!("assign one (`ip addr add ADDR/LEN dev {name}`) or use an IPv6 group"),
        ));
        return Some(info);
    }
    if !info.multicast && !info.loopback {
        checks.push(Check::new(
            "interface",
            Status::Fail,
            format!("interface {name} does not have the MULTICAST flag"),
            format!("enable it: `ip link set {name} multicast on` (as root)"),
        ));
        return Some(info);
    }
    let addrs: Vec<String> = info
        .ipv4
        .iter()
        .map(ToString::to_string)
        .chain(info.ipv6.iter().map(ToString::to_string))
        .collect();
    checks.push(Check::new(
        "interface",
        Status::Ok,
        format!(
            "{name} (index {}) is up, addresses {}",
            info.index,
            addrs.join(", ")
        ),
        "",
    ));
    Some(info)
}

/// Says whether the TTL makes sense for the interface.
fn check_ttl(ttl: Option<u32>, info: Option<&InterfaceInfo>, checks: &mut Vec<Check>) {
    let loopback = info.is_some_and(|i| i.loopback);
    let default = if loopback { 0 } else { 1 };
    let ttl = ttl.unwrap_or(default);
    let check = match (ttl, loopback) {
        (t, _) if t > 255 => Check::new(
            "ttl",
            Status::Fail,
            format!("TTL {t} is above 255"),
            "use 1 on a LAN",
        ),
        (0, false) => Check::new(
            "ttl",
            Status::Warn,
            "TTL 0: datagrams never leave this host, other machines will not hear this node",
            "use --ttl 1 to reach the local network",
        ),
        (t, false) if t > 1 => Check::new(
            "ttl",
            Status::Warn,
            format!("TTL {t}: multicast may cross routers that forward it"),
            "use --ttl 1 unless the cluster spans routed subnets",
        ),
        (t, _) => Check::new("ttl", Status::Ok, format!("TTL {t}"), ""),
    };
    checks.push(check);
}

/// Looks for a route that covers IPv4 multicast (informational when an interface is given).
fn check_route_v4(info: &InterfaceInfo, checks: &mut Vec<Check>) {
    let routes = match std::fs::read_to_string("/proc/net/route") {
        Ok(t) => t,
        Err(e) => {
            checks.push(Check::new(
                "route",
                Status::Warn,
                format!("cannot read /proc/net/route: {e}"),
                "",
            ));
            return;
        }
    };
    // Columns: Iface Destination Gateway Flags RefCnt Use Metric Mask ... (hex, little-endian).
    let mut multicast_route = None;
    let mut default_route = None;
    for line in routes.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 8 {
            continue;
        }
        let dest = u32::from_str_radix(cols[1], 16).map(|d| Ipv4Addr::from(d.swap_bytes()));
        let mask = u32::from_str_radix(cols[7], 16).map(|m| Ipv4Addr::from(m.swap_bytes()));
        match (dest, mask) {
            (Ok(d), Ok(m))
                if d == Ipv4Addr::new(224, 0, 0, 0) && m == Ipv4Addr::new(240, 0, 0, 0) =>
            {
                multicast_route = Some(cols[0].to_string());
            }
            (Ok(d), Ok(m)) if d.is_unspecified() && m.is_unspecified() => {
                default_route = Some(cols[0].to_string());
            }
            _ => {}
        }
    }
    let check = match (multicast_route, default_route) {
        (Some(dev), _) if dev == info.name => Check::new(
            "route",
            Status::Ok,
            format!("224.0.0.0/4 is routed via {dev}"),
            "",
        ),
        (Some(dev), _) => Check::new(
            "route",
            Status::Ok,
            format!(
                "224.0.0.0/4 is routed via {dev}; chorus selects {} explicitly (IP_MULTICAST_IF), so that is fine",
                info.name
            ),
            "",
        ),
        (None, Some(dev)) => Check::new(
            "route",
            Status::Ok,
            format!(
                "multicast follows the default route via {dev}; chorus selects {} explicitly (IP_MULTICAST_IF)",
                info.name
            ),
            "",
        ),
        (None, None) => Check::new(
            "route",
            Status::Warn,
            "no route for 224.0.0.0/4 and no default route: programs that do not choose an interface get ENETUNREACH",
            format!(
                "chorus chooses {} itself (--iface); for other tools: `ip route add 224.0.0.0/4 dev {}`",
                info.name, info.name
            ),
        ),
    };
    checks.push(check);
}

/// Joins the group and sends a datagram to it with TTL 0, expecting it back.
fn check_probe(
    iface: &Interface,
    info: &InterfaceInfo,
    group: SocketAddr,
    checks: &mut Vec<Check>,
) {
    let receiver = match join(iface, info, group) {
        Ok(sock) => {
            checks.push(Check::new(
                "join",
                Status::Ok,
                format!("joined {} on {}", group.ip(), info.name),
                "",
            ));
            sock
        }
        Err(e) => {
            checks.push(join_failure(&e, info, group));
            return;
        }
    };
    let token: u64 = rand::random();
    let payload = format!("chorus-doctor {token:016x}");
    let sent = send_probe(info, group, payload.as_bytes());
    if let Err(e) = sent {
        let fix = match e.raw_os_error() {
            Some(101) => format!("ENETUNREACH: give {} an address and bring it up, or choose another --iface", info.name),
            Some(1) | Some(13) => "a firewall refuses the send (EPERM/EACCES): allow UDP to 224.0.0.0/4 in the OUTPUT chain".into(),
            _ => String::new(),
        };
        checks.push(Check::new(
            "loopback",
            Status::Fail,
            format!("cannot send to {group}: {e}"),
            fix,
        ));
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            checks.push(Check::new(
                "loopback",
                Status::Fail,
                format!("joined {} and sent to it with TTL 0, but nothing came back within 2 s", group.ip()),
                "a firewall probably drops it: allow UDP from this host to 224.0.0.0/4 in INPUT \
                 (`iptables -I INPUT -d 224.0.0.0/4 -p udp -j ACCEPT`); check `sysctl net.ipv4.conf.all.rp_filter`",
            ));
            return;
        }
        if receiver.set_read_timeout(Some(left)).is_err() {
            continue;
        }
        match receiver.recv_from(&mut buf) {
            Ok((n, _)) if buf[..n] == *payload.as_bytes() => {
                checks.push(Check::new(
                    "loopback",
                    Status::Ok,
                    format!(
                        "sent to {group} on {} with TTL 0 and received it back",
                        info.name
                    ),
                    "",
                ));
                return;
            }
            Ok(_) => {} // Someone else's traffic on the group; keep waiting for ours.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                checks.push(Check::new(
                    "loopback",
                    Status::Fail,
                    format!("receive failed: {e}"),
                    "",
                ));
                return;
            }
        }
    }
}

fn join_failure(e: &std::io::Error, info: &InterfaceInfo, group: SocketAddr) -> Check {
    let fix = match e.raw_os_error() {
        Some(19) => format!(
            "ENODEV: interface {} is down or cannot do multicast: `ip link set {} up`",
            info.name, info.name
        ),
        Some(105) => {
            "ENOBUFS: too many groups joined: raise `sysctl net.ipv4.igmp_max_memberships`".into()
        }
        Some(98) => format!(
            "port {} is taken by a socket without SO_REUSEADDR: stop it or choose another port",
            group.port()
        ),
        Some(99) => format!(
            "EADDRNOTAVAIL: {} has no usable address for this group family",
            info.name
        ),
        _ => String::new(),
    };
    Check::new(
        "join",
        Status::Fail,
        format!("cannot join {} on {}: {e}", group.ip(), info.name),
        fix,
    )
}

fn join(iface: &Interface, info: &InterfaceInfo, group: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = if group.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    match group.ip() {
        IpAddr::V4(g) => {
            sock.bind(&SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), group.port()).into())?;
            let local = match iface {
                Interface::Addr(IpAddr::V4(a)) => *a,
                _ => info.ipv4.first().copied().unwrap_or(Ipv4Addr::UNSPECIFIED),
            };
            sock.join_multicast_v4(&g, &local)?;
        }
        IpAddr::V6(g) => {
            sock.set_only_v6(true)?;
            sock.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), group.port()).into())?;
            sock.join_multicast_v6(&g, info.index)?;
        }
    }
    Ok(sock.into())
}

fn send_probe(info: &InterfaceInfo, group: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
    let domain = if group.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    match group {
        SocketAddr::V4(_) => {
            let local = info.ipv4.first().copied().unwrap_or(Ipv4Addr::LOCALHOST);
            sock.set_multicast_if_v4(&local)?;
            sock.set_multicast_ttl_v4(0)?;
            sock.set_multicast_loop_v4(true)?;
        }
        SocketAddr::V6(_) => {
            sock.set_multicast_if_v6(info.index)?;
            sock.set_multicast_hops_v6(0)?;
            sock.set_multicast_loop_v6(true)?;
        }
    }
    // Three copies: a single probe lost to a full buffer should not fail the check.
    for _ in 0..3 {
        sock.send_to(payload, &group.into())?;
    }
    Ok(())
}

/// Reads the kernel's socket buffer limits.
fn check_buffers(checks: &mut Vec<Check>) {
    for (name, sysctl) in [
        ("rmem_max", "net.core.rmem_max"),
        ("wmem_max", "net.core.wmem_max"),
    ] {
        let path = format!("/proc/sys/net/core/{name}");
        let check = match std::fs::read_to_string(&path).map(|t| t.trim().parse::<u64>()) {
            Ok(Ok(v)) if v >= RECOMMENDED_BUF => Check::new(
                if name == "rmem_max" {
                    "rmem_max"
                } else {
                    "wmem_max"
                },
                Status::Ok,
                format!("{sysctl} = {v} bytes"),
                "",
            ),
            Ok(Ok(v)) => Check::new(
                if name == "rmem_max" {
                    "rmem_max"
                } else {
                    "wmem_max"
                },
                Status::Warn,
                format!(
                    "{sysctl} = {v} bytes: socket buffers are capped below {} MiB, bursts will be dropped by the kernel and repaired",
                    RECOMMENDED_BUF / (1024 * 1024)
                ),
                format!("`sysctl -w {sysctl}=8388608` (and add it to /etc/sysctl.d/ to keep it)"),
            ),
            _ => Check::new(
                if name == "rmem_max" {
                    "rmem_max"
                } else {
                    "wmem_max"
                },
                Status::Warn,
                format!("cannot read {path}"),
                "",
            ),
        };
        checks.push(check);
    }
}

/// `chorus doctor`: prints the checks; `Ok(true)` when none failed.
pub fn run(args: &DoctorArgs) -> anyhow::Result<bool> {
    let checks = run_checks(args);
    let failed = checks.iter().any(|c| c.status == Status::Fail);
    let mut out = std::io::stdout().lock();
    if args.json {
        let list: Vec<_> = checks
            .iter()
            .map(|c| {
                json!({
                    "check": c.name,
                    "status": match c.status { Status::Ok => "ok", Status::Warn => "warn", Status::Fail => "fail" },
                    "detail": c.detail,
                    "fix": c.fix,
                })
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &json!({ "ok": !failed, "checks": list }))?;
        writeln!(out)?;
    } else {
        for c in &checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            writeln!(out, "[{tag}] {:<9} {}", c.name, c.detail)?;
            if !c.fix.is_empty() {
                writeln!(out, "       {:<9} fix: {}", "", c.fix)?;
            }
        }
        writeln!(
            out,
            "{}",
            if failed {
                "multicast will not work until the FAIL lines above are fixed"
            } else {
                "multicast works here"
            }
        )?;
    }
    Ok(!failed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn loopback_probe_passes() {
        let args = DoctorArgs {
            iface: None,
            group: None,
            ttl: None,
            json: false,
        };
        let checks = run_checks(&args);
        for c in &checks {
            assert_ne!(c.status, Status::Fail, "{c:?}");
        }
        assert!(
            checks
                .iter()
                .any(|c| c.name == "loopback" && c.status == Status::Ok)
        );
    }

    #[test]
    fn unknown_interface_fails_with_a_fix() {
        let args = DoctorArgs {
            iface: Some("no-such-if0".into()),
            group: None,
            ttl: None,
            json: false,
        };
        let checks = run_checks(&args);
        let c = checks.iter().find(|c| c.name == "interface").unwrap();
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.contains("--iface"));
        assert!(
            !checks.iter().any(|c| c.name == "loopback"),
            "no probe on a missing interface"
        );
    }

    #[test]
    fn unicast_group_fails() {
        let args = DoctorArgs {
            iface: None,
            group: Some("10.0.0.1:7400".parse().unwrap()),
            ttl: None,
            json: false,
        };
        assert_eq!(run_checks(&args)[0].status, Status::Fail);
    }
}
