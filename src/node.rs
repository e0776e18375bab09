//! The public handle ([`Node`]) and its builder.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chorus_protocol::Keyring;
use chorus_replication::Fsync;
use chorus_transport::{Interface, Mode};
use tokio::sync::oneshot;

use crate::driver::{self, Command, Shared};
use crate::watch::Watch;
use crate::{Error, Version};

/// Tuning presets for the protocol timers and windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preset {
    /// A LAN with little loss: short timers.
    #[default]
    Lan,
    /// A lossy network: larger windows, more patient NAK retries.
    Lossy,
}

/// One operation of an atomic [`Node::batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Bytes,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: String,
    },
}

/// A live value as read from the local store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value bytes.
    pub value: Bytes,
    /// The version that wrote it (HLC timestamp + writer node id).
    pub version: Version,
    /// The local revision at which this node applied it.
    pub revision: u64,
}

/// One member of the cluster as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// The member's node id.
    pub node_id: u64,
    /// Its current incarnation (changes on every restart).
    pub incarnation: u64,
    /// The address its datagrams come from.
    pub addr: SocketAddr,
    /// `"self"`, `"alive"` or `"suspected"`.
    pub state: String,
    /// Its wall clock minus this node's, in milliseconds, measured from its heartbeats
    /// (`Some(0)` for this node itself; `None` until a heartbeat with wall time arrived, e.g.
    /// from an older version). Writes are refused while this node is further ahead of every
    /// peer than the drift bound allows ([`Error::ClockAhead`](crate::Error::ClockAhead)).
    pub clock_offset_ms: Option<i64>,
}

/// Builds and starts a [`Node`].
///
/// Every setting has a default that works on one host (cluster `chorus`, group
/// `239.255.77.1:7400` on the loopback with TTL 0, the LAN preset, the store in memory).
///
/// # Examples
///
/// ```
/// # use chorus::Node;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let node = Node::builder()
///     .cluster("prod-config")
///     .group("239.255.77.41:17941".parse()?)
///     .interface("127.0.0.1")
///     .node_id(7)
///     .preset(chorus::Preset::Lan)
///     .start()
///     .await?;
/// assert_eq!(node.node_id(), 7);
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
    pub(crate) node_id: Option<u64>,
    pub(crate) preset: Preset,
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
    pub fn node_id(mut self, id: u64) -> Self {
        self.node_id = Some(id);
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

    /// Drop this share of received datagrams, chosen by a generator seeded with `seed`.
    /// For demonstrations and tests of loss repair; not for production.
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
    /// [`Error::Config`] for an invalid combination of settings.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // Two nodes over an in-memory network: no sockets at all.
    /// let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// let a = Node::builder()
    ///     .node_id(1)
    ///     .start_with_transport(hub.endpoint("10.0.0.1:7400".parse()?)?)
    ///     .await?;
    /// let b = Node::builder()
    ///     .node_id(2)
    ///     .start_with_transport(hub.endpoint("10.0.0.2:7400".parse()?)?)
    ///     .await?;
    /// let mut on_b = b.watch("");
    /// a.put("greeting", "hello").await?;
    /// assert_eq!(on_b.next().await.map(|c| c.key), Some("greeting".to_owned()));
    /// a.shutdown().await?;
    /// b.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start_with_transport<T>(self, transport: T) -> Result<Node, Error>
    where
        T: chorus_transport::DatagramTransport,
    {
        let shared = driver::spawn(self, transport)?;
        Ok(Node {
            inner: Arc::new(Inner { shared }),
        })
    }
}

/// A running member of a Chorus cluster. Cheap to clone; every clone is the same node.
///
/// Writes ([`put`](Node::put), [`delete`](Node::delete), [`batch`](Node::batch)) apply
/// locally at once and reach every other node by reliable multicast; reads
/// ([`get`](Node::get), [`scan`](Node::scan)) see the local store. Concurrent writes of one
/// key converge on the one with the highest version (last writer wins) on every node.
///
/// # Examples
///
/// ```
/// # use chorus::Node;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
/// # let node = |id: u8| {
/// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
/// #     Node::builder().cluster("docs").node_id(u64::from(id)).start_with_transport(transport)
/// # };
/// let (a, b) = (node(1).await?, node(2).await?);
/// let mut on_b = b.watch("app/");
/// a.put("app/db/url", "postgres://db1/app").await?;
/// let change = on_b.next().await.expect("the node is running");
/// assert_eq!(change.key, "app/db/url");
/// assert_eq!(b.get("app/db/url").map(|e| e.value), Some("postgres://db1/app".into()));
/// a.shutdown().await?;
/// b.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
}

impl Node {
    /// A builder with the defaults: cluster `chorus`, group `239.255.77.1:7400` on the loopback.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.inner.shared.node_id
    }

    async fn command<R>(
        &self,
        make: impl FnOnce(oneshot::Sender<R>) -> Command,
    ) -> Result<R, Error> {
        let (tx, rx) = oneshot::channel();
        self.inner.shared.send(make(tx)).await?;
        rx.await.map_err(|_| Error::Closed)
    }

    /// Set `key` to `value` on every node. Returns once the write is applied locally,
    /// persisted as the [`fsync`](NodeBuilder::fsync) policy says (with a data directory) and
    /// queued for reliable multicast; other nodes apply it as it arrives.
    ///
    /// # Errors
    ///
    /// [`Error::Replication`] when the key or value breaks a limit (nothing changed);
    /// [`Error::ClockAhead`] when this node's clock, or the history it loaded, is further
    /// ahead of every live peer's clock than they accept (nothing changed; they would drop
    /// the write); [`Error::Closed`] after shutdown; [`Error::Durability`] when the data directory could
    /// not be written: the write is applied and replicated but may not survive a crash of
    /// this node.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: if cancelled after the command reached the driver, the write may
    /// still happen.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(u64::from(id)).start_with_transport(transport)
    /// # };
    /// let (a, b) = (node(1).await?, node(2).await?);
    /// // A new node is on probation until its second heartbeat: wait until each knows the other.
    /// while a.members().len() < 2 || b.members().len() < 2 {
    ///     tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    /// }
    /// let mut on_b = b.watch("");
    /// let v1 = a.put("app/mode", "blue").await?;
    /// let v2 = b.put("app/mode", "green").await?;
    /// // Both writes reach both nodes; the higher version wins everywhere.
    /// let winner = if v2 > v1 { "green" } else { "blue" };
    /// let mut seen = 0;
    /// while seen < 2 {
    ///     if on_b.next().await.is_some() { seen += 1; }
    /// }
    /// while a.get("app/mode").map(|e| e.version) != Some(v1.max(v2)) {
    ///     tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    /// }
    /// assert_eq!(a.get("app/mode").map(|e| e.value), Some(winner.into()));
    /// assert_eq!(b.get("app/mode").map(|e| e.value), Some(winner.into()));
    ///
    /// // Limits give a clear error and change nothing.
    /// let err = a.put("", "no key").await.unwrap_err();
    /// assert!(matches!(err, chorus::Error::Replication(_)), "{err}");
    /// a.shutdown().await?;
    /// b.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn put(
        &self,
        key: impl Into<String>,
        value: impl Into<Bytes>,
    ) -> Result<Version, Error> {
        let (key, value) = (key.into(), value.into());
        self.command(|reply| Command::Put { key, value, reply })
            .await?
    }

    /// Delete `key` on every node (a tombstone with a new version).
    ///
    /// # Errors
    ///
    /// As for [`Node::put`].
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(u64::from(id)).start_with_transport(transport)
    /// # };
    /// let node = node(1).await?;
    /// node.put("app/feature", "on").await?;
    /// let version = node.delete("app/feature").await?;
    /// assert!(node.get("app/feature").is_none());
    /// // The delete is a change like any other, with its own version.
    /// let change = node.watch_from("app/", 1).await?.next().await.expect("logged");
    /// assert_eq!((change.version, change.value), (version, None));
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delete(&self, key: impl Into<String>) -> Result<Version, Error> {
        let key = key.into();
        self.command(|reply| Command::Delete { key, reply }).await?
    }

    /// Apply several operations atomically under one version: every node applies all of them
    /// or none, and a reader never sees half of a batch.
    ///
    /// # Errors
    ///
    /// As for [`Node::put`]; also when the batch is larger than the batch limit.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(u64::from(id)).start_with_transport(transport)
    /// # };
    /// use chorus::Op;
    /// let node = node(1).await?;
    /// node.put("db/old-replica", "10.0.0.9").await?;
    /// let version = node
    ///     .batch(vec![
    ///         Op::Put { key: "db/primary".into(), value: "10.0.0.1".into() },
    ///         Op::Put { key: "db/replica".into(), value: "10.0.0.2".into() },
    ///         Op::Delete { key: "db/old-replica".into() },
    ///     ])
    ///     .await?;
    /// // One version for the whole batch.
    /// assert_eq!(node.get("db/primary").map(|e| e.version), Some(version));
    /// assert_eq!(node.get("db/replica").map(|e| e.version), Some(version));
    /// assert!(node.get("db/old-replica").is_none());
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn batch(&self, ops: Vec<Op>) -> Result<Version, Error> {
        self.command(|reply| Command::Batch { ops, reply }).await?
    }

    /// The live value of `key` in the local store, if any.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(u64::from(id)).start_with_transport(transport)
    /// # };
    /// let node = node(1).await?;
    /// let version = node.put("app/port", "8080").await?;
    /// let entry = node.get("app/port").expect("just written");
    /// assert_eq!((entry.value, entry.version), ("8080".into(), version));
    /// assert!(node.get("app/missing").is_none());
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn get(&self, key: &str) -> Option<Entry> {
        self.inner.shared.get(key)
    }

    /// Every live key starting with `prefix`, sorted by key.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(u64::from(id)).start_with_transport(transport)
    /// # };
    /// let node = node(1).await?;
    /// for (key, value) in [("svc/b", "2"), ("svc/a", "1"), ("other", "x")] {
    ///     node.put(key, value).await?;
    /// }
    /// let keys: Vec<String> = node.scan("svc/").into_iter().map(|(k, _)| k).collect();
    /// assert_eq!(keys, ["svc/a", "svc/b"]);
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn scan(&self, prefix: &str) -> Vec<(String, Entry)> {
        self.inner.shared.scan(prefix)
    }

    /// The local revision: how many changes this node has applied.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(u64::from(id)).start_with_transport(transport)
    /// # };
    /// let node = node(1).await?;
    /// let before = node.revision();
    /// node.put("a", "1").await?;
    /// assert_eq!(node.revision(), before + 1);
    /// assert_eq!(node.get("a").map(|e| e.revision), Some(before + 1));
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn revision(&self) -> u64 {
        self.inner.shared.revision()
    }

    /// A stream of the changes under `prefix` from now on.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(u64::from(id)).start_with_transport(transport)
    /// # };
    /// let (a, b) = (node(1).await?, node(2).await?);
    /// let mut watch = b.watch("cfg/");
    /// a.put("unrelated", "x").await?;
    /// a.put("cfg/level", "debug").await?;
    /// a.delete("cfg/level").await?;
    /// let first = watch.next().await.expect("running");
    /// let second = watch.next().await.expect("running");
    /// assert_eq!((first.key.as_str(), first.value), ("cfg/level", Some("debug".into())));
    /// assert_eq!((second.key.as_str(), second.value), ("cfg/level", None));
    /// a.shutdown().await?;
    /// b.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn watch(&self, prefix: &str) -> Watch {
        Watch::new(self.inner.shared.clone(), prefix, self.revision())
    }

    /// A stream of the changes under `prefix` after local revision `revision`.
    ///
    /// # Errors
    ///
    /// [`Error::Compacted`] when `revision` is older than the retained change log;
    /// [`Error::Closed`] after shutdown.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(u64::from(id)).start_with_transport(transport)
    /// # };
    /// let node = node(1).await?;
    /// node.put("jobs/1", "queued").await?;
    /// let seen = node.revision();
    /// node.put("jobs/2", "queued").await?;
    /// // Resume after the last revision a consumer handled: nothing is missed.
    /// let mut watch = node.watch_from("jobs/", seen).await?;
    /// assert_eq!(watch.next().await.map(|c| c.key), Some("jobs/2".to_owned()));
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn watch_from(&self, prefix: &str, revision: u64) -> Result<Watch, Error> {
        let mut watch = Watch::new(self.inner.shared.clone(), prefix, revision);
        watch.backfill().await?;
        Ok(watch)
    }

    /// The members this node currently knows, itself included.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(u64::from(id)).start_with_transport(transport)
    /// # };
    /// let (a, b) = (node(1).await?, node(2).await?);
    /// while a.members().len() < 2 {
    ///     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    /// }
    /// let states: Vec<(u64, String)> = a.members().into_iter().map(|m| (m.node_id, m.state)).collect();
    /// assert_eq!(states, [(1, "self".to_owned()), (2, "alive".to_owned())]);
    /// a.shutdown().await?;
    /// b.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn members(&self) -> Vec<MemberInfo> {
        self.inner.shared.members()
    }

    /// Every counter of the protocol, the replication layer and the driver, refreshed every
    /// 100 ms, by stable snake_case name.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(u64::from(id)).start_with_transport(transport)
    /// # };
    /// let node = node(1).await?;
    /// node.put("k", "v").await?;
    /// tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    /// let counters = node.counters();
    /// let keys = counters.iter().find(|(name, _)| name == "store_keys").map(|(_, v)| *v);
    /// assert_eq!(keys, Some(1));
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn counters(&self) -> Vec<(String, u64)> {
        self.inner.shared.counters()
    }

    /// Whether this node's store matched every live peer's at the last digest exchange.
    pub fn is_in_sync(&self) -> bool {
        *self.inner.shared.in_sync.borrow()
    }

    /// Wait until [`Node::is_in_sync`] holds: the first digest exchange after start (or after
    /// a loss the protocol could not repair) found nothing missing.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when it does not within `timeout`; [`Error::Closed`] if the node stops.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(u64::from(id)).start_with_transport(transport)
    /// # };
    /// use std::time::Duration;
    /// let a = node(1).await?;
    /// for i in 0..100 {
    ///     a.put(format!("key/{i}"), "value").await?;
    /// }
    /// // A late joiner catches up by anti-entropy, then says it is in sync.
    /// let b = node(2).await?;
    /// b.wait_in_sync(Duration::from_secs(10)).await?;
    /// assert!(b.is_in_sync());
    /// assert_eq!(b.scan("key/").len(), 100);
    /// a.shutdown().await?;
    /// b.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn wait_in_sync(&self, timeout: Duration) -> Result<(), Error> {
        let mut rx = self.inner.shared.in_sync.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|v| *v)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// Graceful shutdown: send what is queued, multicast a goodbye, stop the driver.
    /// Calling it again is harmless.
    ///
    /// With a data directory, everything written is fsynced before the driver stops.
    ///
    /// # Errors
    ///
    /// None today: a failed final fsync is logged (the writes it covered were already
    /// acknowledged under the chosen fsync policy).
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(u64::from(id)).start_with_transport(transport)
    /// # };
    /// let node = node(1).await?;
    /// node.put("k", "v").await?;
    /// node.shutdown().await?;
    /// node.shutdown().await?; // harmless
    /// // Writes after shutdown are refused.
    /// assert!(matches!(node.put("k", "w").await, Err(chorus::Error::Closed)));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self) -> Result<(), Error> {
        match self.command(|reply| Command::Shutdown { reply }).await {
            Ok(()) | Err(Error::Closed) => {}
            Err(e) => return Err(e),
        }
        self.inner.shared.wait_stopped().await;
        Ok(())
    }

    /// Stop the driver at once, without a goodbye: what a crash looks like to the peers.
    /// For tests and demonstrations.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus_transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(u64::from(id)).start_with_transport(transport)
    /// # };
    /// let (a, b) = (node(1).await?, node(2).await?);
    /// while b.members().len() < 2 {
    ///     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    /// }
    /// a.abort();
    /// // b notices through missed heartbeats (suspected, then gone).
    /// while b.members().iter().any(|m| m.node_id == 1 && m.state == "alive") {
    ///     tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    /// }
    /// b.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn abort(&self) {
        self.inner.shared.abort();
    }
}
