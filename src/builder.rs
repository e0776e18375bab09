//! [`NodeBuilder`]: every setting of a node, and starting it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use chorus_protocol::{Keyring, NodeId};
use chorus_replication::Fsync;
use chorus_transport::{Interface, Mode};

use crate::driver;
use crate::{Error, Node};

/// Tuning presets for the protocol timers and windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preset {
    /// A LAN with little loss: short timers.
    #[default]
    Lan,
    /// A lossy network: larger windows, more patient NAK retries.
    Lossy,
}

/// Builds and starts a [`Node`].
///
/// Every setting has a default that works on one host (cluster `chorus`, group
/// `239.255.77.1:7400` on the loopback with TTL 0, the LAN preset, the store in memory).
///
/// # Examples
///
/// ```
/// # use chorus::{Node, NodeId};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let node = Node::builder()
///     .cluster("prod-config")
///     .group("239.255.77.41:17941".parse()?)
///     .interface("127.0.0.1")
///     .node_id(NodeId(7))
///     .preset(chorus::Preset::Lan)
///     .start()
///     .await?;
/// assert_eq!(node.node_id(), NodeId(7));
/// node.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    pub(crate) cluster: String,
    pub(crate) mode: Option<Mode>,
    pub(crate) group: Option<SocketAddr>,
    pub(crate) interface: Option<Interface>,
    pub(crate) ttl: Option<u32>,
    /// The id asked for (`None`: a random one, drawn at start).
    pub(crate) node_id: Option<u64>,
    /// The name asked for (`None`: the host name), checked at start.
    pub(crate) node_name: Option<String>,
    pub(crate) preset: Preset,
    /// Share of received datagrams to drop and the seed choosing them (the `testing`
    /// feature's `inject_receive_loss`; `None` without).
    pub(crate) receive_loss: Option<(f64, u64)>,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) fsync: Fsync,
    pub(crate) keyring: Option<Keyring>,
    pub(crate) max_members: Option<std::num::NonZeroUsize>,
    pub(crate) receive_budget_bytes: Option<usize>,
}

/// The default multicast group when none is given.
pub const DEFAULT_GROUP: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(239, 255, 77, 1)), 7400);

impl Default for NodeBuilder {
    fn default() -> Self {
        NodeBuilder {
            cluster: "chorus".to_owned(),
            mode: None,
            group: None,
            interface: None,
            ttl: None,
            node_id: None,
            node_name: None,
            preset: Preset::Lan,
            receive_loss: None,
            data_dir: None,
            fsync: Fsync::Always,
            keyring: None,
            max_members: None,
            receive_budget_bytes: None,
        }
    }
}

impl NodeBuilder {
    /// The cluster name; nodes of other clusters on the same group are ignored. Default `chorus`.
    pub fn cluster(mut self, name: &str) -> Self {
        name.clone_into(&mut self.cluster);
        self
    }

    /// Multicast to this group (IPv4 or IPv6). Default `239.255.77.1:7400` on `127.0.0.1`.
    pub fn group(mut self, group: SocketAddr) -> Self {
        self.mode = None;
        self.group = Some(group);
        self
    }

    /// The interface for multicast: a name (`eth0`, `lo`), an address or an index
    /// (see [`Interface`]'s parsing). Default `127.0.0.1` for IPv4 groups; IPv6 groups need one.
    pub fn interface(mut self, iface: &str) -> Self {
        self.interface = Some(iface.parse().unwrap_or(Interface::Name(iface.to_owned())));
        self
    }

    /// Multicast TTL / hop limit. Default 0 on the loopback, 1 elsewhere.
    pub fn ttl(mut self, ttl: u32) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Use broadcast or a unicast peer list instead of multicast (or a fully specified
    /// multicast mode); overrides [`group`](Self::group), [`interface`](Self::interface) and
    /// [`ttl`](Self::ttl).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = Some(mode);
        self
    }

    /// This node's id; default a random one. Ids must be unique in the cluster.
    pub fn node_id(mut self, id: NodeId) -> Self {
        self.node_id = Some(id.0);
        self
    }

    /// This node's name for people: shown by [`Node::members`](crate::Node::members) on every
    /// node, in member events, logs and the agent's metrics labels; carried in heartbeats.
    /// Default: the host name. 1 to 64 bytes of printable UTF-8 (see
    /// [`NodeName`](crate::NodeName)); unlike the id it need not be unique.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// let node = chorus::Node::builder()
    ///     .node_name("web-1")
    ///     .start_with_transport(hub.endpoint("10.0.0.1:7400".parse()?)?)
    ///     .await?;
    /// assert_eq!(node.members()[0].name.as_deref(), Some("web-1"));
    /// node.shutdown().await?;
    ///
    /// // A name with a line break (or longer than 64 bytes) is refused at start.
    /// let err = chorus::Node::builder()
    ///     .node_name("web\n1")
    ///     .start_with_transport(hub.endpoint("10.0.0.2:7400".parse()?)?)
    ///     .await
    ///     .unwrap_err();
    /// assert!(matches!(err, chorus::Error::Config(_)), "{err}");
    /// # Ok(())
    /// # }
    /// ```
    pub fn node_name(mut self, name: &str) -> Self {
        self.node_name = Some(name.to_owned());
        self
    }

    /// Protocol tuning preset.
    pub fn preset(mut self, preset: Preset) -> Self {
        self.preset = preset;
        self
    }

    /// Most members this node keeps (default 256). When the table is full, new senders are
    /// refused and counted (`members_full`); members are never evicted by newcomers. See
    /// `docs/protocol.md`, Heartbeats and membership.
    pub fn max_members(mut self, max: std::num::NonZeroUsize) -> Self {
        self.max_members = Some(max);
        self
    }

    /// The receive budget: most bytes of received data held over all senders (out-of-order
    /// messages, partial reassemblies, per-sender state; default 64 MiB, raised to twice the
    /// largest message). When it is reached the newest, least-established senders lose first
    /// (`receive_evicted`). See `docs/protocol.md`, The receive budget.
    pub fn receive_budget_bytes(mut self, bytes: usize) -> Self {
        self.receive_budget_bytes = Some(bytes);
        self
    }

    /// Keep the store in `dir` (a write-ahead log plus snapshots, created if missing): the
    /// node starts from what the directory holds, then syncs only what changed while it was
    /// away. Without it the store lives in memory and a restarted node refills from its peers.
    /// One node per directory (a lock file enforces it). See `docs/replication.md`,
    /// Durability.
    pub fn data_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.data_dir = Some(dir.as_ref().to_owned());
        self
    }

    /// When writes reach stable storage (only with [`data_dir`](Self::data_dir)). Default
    /// [`Fsync::Always`]: `put`, `delete` and `batch` return after an fsync that covers them
    /// (writes arriving together share one).
    pub fn fsync(mut self, policy: Fsync) -> Self {
        self.fsync = policy;
        self
    }

    /// Seal every datagram with these cluster keys (XChaCha20-Poly1305: headers authenticated,
    /// bodies encrypted, replays refused) and accept only datagrams sealed with one of them.
    /// Without a keyring anyone on the network segment can read and forge the cluster's
    /// traffic; the node then logs a warning at start. See `docs/security.md`.
    pub fn keyring(mut self, keyring: Keyring) -> Self {
        self.keyring = Some(keyring);
        self
    }

    /// Drop this share of received datagrams, chosen by a generator seeded with `seed`
    /// (counted as `driver_injected_drops`). For demonstrations and tests of loss repair; not
    /// for production: only with the cargo feature `testing`.
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// // Every datagram from the network is dropped on arrival.
    /// let deaf = chorus::Node::builder()
    ///     .inject_receive_loss(1.0, 7)
    ///     .start_with_transport(hub.endpoint("10.0.0.1:7400".parse()?)?)
    ///     .await?;
    /// let talker = chorus::Node::builder()
    ///     .start_with_transport(hub.endpoint("10.0.0.2:7400".parse()?)?)
    ///     .await?;
    /// while deaf.counters().driver.injected_drops == 0 {
    ///     tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    /// }
    /// assert_eq!(deaf.members().len(), 1, "it hears nobody");
    /// talker.shutdown().await?;
    /// deaf.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "testing")]
    pub fn inject_receive_loss(mut self, probability: f64, seed: u64) -> Self {
        self.receive_loss = Some((probability.clamp(0.0, 1.0), seed));
        self
    }

    /// Open the sockets, start the driver task and announce this node to the group.
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Transport`] when the sockets cannot be set up (unknown interface, no multicast
    /// route, port in use, ...); the message says how to fix it. [`Error::Config`] for an
    /// invalid combination of settings. [`Error::Durability`] when the data directory cannot
    /// be opened, read or locked.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let node = Node::builder()
    ///     .cluster("docs-start")
    ///     .group("239.255.77.42:17942".parse()?)
    ///     .start()
    ///     .await?;
    /// // A node alone is its only member.
    /// assert_eq!(node.members().len(), 1);
    /// node.shutdown().await?;
    ///
    /// // A clear error, naming the problem, for an interface this host does not have.
    /// let err = Node::builder().interface("no-such-if0").start().await.unwrap_err();
    /// assert!(matches!(err, chorus::Error::Transport(_)), "{err}");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start(self) -> Result<Node, Error> {
        let transport = driver::open_transport(&self)?;
        self.start_with_transport(transport).await
    }

    /// Start over a transport of the caller's choosing, such as an in-memory one in tests.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid combination of settings (or an invalid
    /// [`node_name`](Self::node_name)).
    ///
    /// # Examples
    ///
    /// ```
    /// use chorus::{Node, NodeId};
    /// use futures_util::StreamExt;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Two nodes over an in-memory network: no sockets at all.
    /// let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// let a = Node::builder()
    ///     .node_id(NodeId(1))
    ///     .start_with_transport(hub.endpoint("10.0.0.1:7400".parse()?)?)
    ///     .await?;
    /// let b = Node::builder()
    ///     .node_id(NodeId(2))
    ///     .start_with_transport(hub.endpoint("10.0.0.2:7400".parse()?)?)
    ///     .await?;
    /// let mut on_b = b.watch("");
    /// a.put("greeting", "hello").await?;
    /// assert_eq!(on_b.next().await.transpose()?.map(|c| c.key), Some("greeting".to_owned()));
    /// a.shutdown().await?;
    /// b.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start_with_transport<T>(self, transport: T) -> Result<Node, Error>
    where
        T: crate::transport::DatagramTransport,
    {
        let shared = driver::spawn(self, transport)?;
        Ok(Node::from_shared(shared))
    }
}
