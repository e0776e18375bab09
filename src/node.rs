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
}

/// Builds and starts a [`Node`].
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
    pub async fn start(self) -> Result<Node, Error> {
        let transport = driver::open_transport(&self)?;
        self.start_with_transport(transport).await
    }

    /// Start over a transport of the caller's choosing, such as an in-memory one in tests.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid combination of settings.
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
        self.inner
            .shared
            .cmd_tx
            .send(make(tx))
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)
    }

    /// Set `key` to `value` on every node. Returns once the write is applied locally,
    /// persisted as the [`fsync`](NodeBuilder::fsync) policy says (with a data directory) and
    /// queued for reliable multicast; other nodes apply it as it arrives.
    ///
    /// # Errors
    ///
    /// [`Error::Replication`] when the key or value breaks a limit (nothing changed);
    /// [`Error::Closed`] after shutdown; [`Error::Durability`] when the data directory could
    /// not be written: the write is applied and replicated but may not survive a crash of
    /// this node.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: if cancelled after the command reached the driver, the write may
    /// still happen.
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
    pub async fn batch(&self, ops: Vec<Op>) -> Result<Version, Error> {
        self.command(|reply| Command::Batch { ops, reply }).await?
    }

    /// The live value of `key` in the local store, if any.
    pub fn get(&self, key: &str) -> Option<Entry> {
        self.inner.shared.get(key)
    }

    /// Every live key starting with `prefix`, sorted by key.
    pub fn scan(&self, prefix: &str) -> Vec<(String, Entry)> {
        self.inner.shared.scan(prefix)
    }

    /// The local revision: how many changes this node has applied.
    pub fn revision(&self) -> u64 {
        self.inner.shared.revision()
    }

    /// A stream of the changes under `prefix` from now on.
    pub fn watch(&self, prefix: &str) -> Watch {
        Watch::new(self.inner.shared.clone(), prefix, self.revision())
    }

    /// A stream of the changes under `prefix` after local revision `revision`.
    ///
    /// # Errors
    ///
    /// [`Error::Compacted`] when `revision` is older than the retained change log;
    /// [`Error::Closed`] after shutdown.
    pub async fn watch_from(&self, prefix: &str, revision: u64) -> Result<Watch, Error> {
        let mut watch = Watch::new(self.inner.shared.clone(), prefix, revision);
        watch.backfill().await?;
        Ok(watch)
    }

    /// The members this node currently knows, itself included.
    pub fn members(&self) -> Vec<MemberInfo> {
        self.inner.shared.members()
    }

    /// Every counter of the protocol, the replication layer and the driver.
    pub fn counters(&self) -> Vec<(String, u64)> {
        self.inner.shared.counters()
    }

    /// Whether this node's store matched every live peer's at the last digest exchange.
    pub fn is_in_sync(&self) -> bool {
        *self.inner.shared.in_sync.borrow()
    }

    /// Wait until [`Node::is_in_sync`] holds.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when it does not within `timeout`; [`Error::Closed`] if the node stops.
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
    pub fn abort(&self) {
        self.inner.shared.abort();
    }
}
