//! Mapping a [`NodeBuilder`] onto the transport's and the protocol's configuration.

use std::time::Duration;

use chorus_protocol::{ClusterId, Config as ProtocolConfig, Incarnation, NodeId, NodeName};
use chorus_transport::{
    DatagramTransport, Interface, LinkRate, Mode, TransportConfig, UdpTransport,
};

use crate::Error;
use crate::{DEFAULT_GROUP, NodeBuilder, Preset};

/// Opens the real sockets the builder asks for.
pub(crate) fn open_transport(builder: &NodeBuilder) -> Result<UdpTransport, Error> {
    let mode = match &builder.mode {
        Some(mode) => mode.clone(),
        None => {
            let group = builder.group.unwrap_or(DEFAULT_GROUP);
            let interface = match (&builder.interface, group) {
                (Some(iface), _) => iface.clone(),
                (None, g) if g.is_ipv4() => Interface::loopback_v4(),
                (None, _) => {
                    return Err(Error::Config(
                        "an IPv6 group needs an interface (name or index): IPv6 multicast does not route over lo".into(),
                    ));
                }
            };
            let on_loopback = match &interface {
                Interface::Addr(a) => a.is_loopback(),
                Interface::Name(n) => n == "lo",
                _ => false,
            };
            let ttl = builder.ttl.unwrap_or(if on_loopback { 0 } else { 1 });
            Mode::Multicast {
                group,
                interface,
                ttl,
                loopback: true,
            }
        }
    };
    let mut config = TransportConfig::loopback_multicast(DEFAULT_GROUP);
    config.mode = mode;
    Ok(UdpTransport::bind(config)?)
}

/// The node's name: the one asked for, checked, or the host name (none when it has no
/// valid one).
pub(super) fn node_name(builder: &NodeBuilder) -> Result<Option<NodeName>, Error> {
    if let Some(name) = &builder.node_name {
        return NodeName::new(name)
            .map(Some)
            .map_err(|e| Error::Config(format!("node name {name:?}: {e}")));
    }
    Ok(host_name())
}

/// This host's name (`gethostname`), if it is a valid [`NodeName`].
fn host_name() -> Option<NodeName> {
    #[cfg(unix)]
    {
        let host = nix::unistd::gethostname().ok()?;
        let host = host.to_str()?;
        match NodeName::new(host) {
            Ok(name) => Some(name),
            Err(e) => {
                tracing::debug!(host, error = %e, "the host name is no valid node name; none is sent");
                None
            }
        }
    }
    #[cfg(not(unix))]
    {
        None
    }
}

pub(super) fn protocol_config<T: DatagramTransport>(
    builder: &NodeBuilder,
    node: u64,
    incarnation: u64,
    seed: u64,
    transport: &T,
) -> ProtocolConfig {
    let cluster = ClusterId::from_name(&builder.cluster);
    let (node, incarnation) = (NodeId(node), Incarnation(incarnation));
    let mut config = match builder.preset {
        Preset::Lan => ProtocolConfig::lan(cluster, node, incarnation, seed),
        Preset::Lossy => ProtocolConfig::lossy(cluster, node, incarnation, seed),
    };
    if let Some(max) = builder.max_members {
        config.max_members = max;
    }
    if let Some(bytes) = builder.receive_budget_bytes {
        config.receive_budget_bytes = bytes;
    }
    // Datagrams as large as the path carries whole: the transport reads the interface's MTU
    // (64 KiB on lo, so dozens of messages share one system call there).
    config.mtu = transport.max_datagram_size();
    // Keep no more in flight than a peer's socket holds: Linux reports twice the payload it
    // grants (the rest is accounting overhead). A sender far ahead of a busy receiver
    // otherwise overruns its socket and pays in NAKs and repairs; early heartbeats at a
    // quarter of the window keep the stream moving.
    if let Some(buffer) = transport.receive_buffer() {
        let bytes = (buffer / 2).clamp(1 << 20, config.window_max_bytes.get());
        config.window_max_bytes =
            std::num::NonZeroUsize::new(bytes).unwrap_or(config.window_max_bytes);
    }
    // The LAN preset paces to what the link carries: the loopback has no wire (the CPU paces
    // it; the send window still bounds what is in flight), Ethernet and veth report their
    // speed. The lossy preset keeps its own, lower pace unless the link is slower still.
    let link_bytes = match transport.link_rate() {
        LinkRate::Unlimited => None,
        LinkRate::BitsPerSec(bits) => std::num::NonZeroU64::new(bits / 8),
        LinkRate::Unknown => config.rate_bytes_per_sec,
    };
    config.rate_bytes_per_sec = match builder.preset {
        Preset::Lan => link_bytes,
        Preset::Lossy => match (config.rate_bytes_per_sec, link_bytes) {
            (Some(preset), Some(link)) => Some(preset.min(link)),
            (preset, _) => preset,
        },
    };
    // The driver batches by itself: every command waiting is handed to the core before the
    // datagrams are built, so messages queued together share datagrams without a timer
    // (tokio's 1 ms timer granularity made that timer cost small messages ~1 ms of latency).
    config.batch_delay = Duration::ZERO;
    config.keyring = builder.keyring.clone();
    config
}
