//! [`Node`]: the handle on a running node (writes, reads, watches, messages, members,
//! counters), and [`Entry`], what a read returns.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chorus_protocol::NodeId;
use tokio::sync::oneshot;

use crate::driver::{Command, Shared};
use crate::pubsub::Subscription;
use crate::watch::Watch;
use crate::{Counters, Error, MemberEvents, MemberInfo, NodeBuilder, Op, TopicFilter, Version};

/// A live value as read from the local store ([`Node::get`], [`Node::scan`]).
///
/// The store also keeps tombstones (a deleted key remembers the version of its delete, so an
/// older write arriving late cannot bring it back), but reads of the public API see live
/// values only: a deleted key reads as absent, never as an entry without a value. A watch
/// reports deletes as a [`Change`](crate::Change) whose `value` is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value bytes.
    pub value: Bytes,
    /// The version that wrote it (HLC timestamp + writer node id).
    pub version: Version,
    /// The local revision at which this node applied it.
    pub revision: u64,
    /// Opaque flags written with the value ([`PutMeta::flags`](crate::PutMeta), Consul's
    /// `Flags`); 0 unless set.
    pub flags: u64,
    /// The writer and its incarnation, for a value written as owned
    /// ([`PutMeta::owned`](crate::PutMeta)); `None` otherwise.
    pub owner: Option<crate::Owner>,
}

impl Entry {
    /// The live entry a stored record holds; `None` for a tombstone.
    pub(crate) fn live(stored: chorus_replication::Entry) -> Option<Entry> {
        let chorus_replication::Entry {
            value,
            version,
            revision,
            flags,
            owner,
        } = stored;
        Some(Entry {
            value: value?,
            version,
            revision,
            flags,
            owner,
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
/// use futures_util::StreamExt;
/// # use chorus::Node;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
/// # let node = |id: u8| {
/// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
/// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
/// # };
/// let (a, b) = (node(1).await?, node(2).await?);
/// let mut on_b = b.watch("app/");
/// a.put("app/db/url", "postgres://db1/app").await?;
/// let change = on_b.next().await.expect("the node is running")?;
/// assert_eq!(change.key, "app/db/url");
/// assert_eq!(b.get("app/db/url").map(|e| e.value), Some("postgres://db1/app".into()));
/// a.shutdown().await?;
/// b.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Node {
    pub(crate) shared: Arc<Shared>,
}

impl Node {
    pub(crate) fn from_shared(shared: Arc<Shared>) -> Node {
        Node { shared }
    }

    /// A builder with the defaults: cluster `chorus`, group `239.255.77.1:7400` on the loopback.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// This node's id (the one given to [`NodeBuilder::node_id`], or the random one drawn at
    /// start).
    pub fn node_id(&self) -> NodeId {
        NodeId(self.shared.node_id)
    }

    pub(crate) async fn command<R>(
        &self,
        make: impl FnOnce(oneshot::Sender<R>) -> Command,
    ) -> Result<R, Error> {
        let (tx, rx) = oneshot::channel();
        self.shared.send(make(tx)).await?;
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
    /// use futures_util::StreamExt;
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
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
    ///     if on_b.next().await.transpose()?.is_some() { seen += 1; }
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
        self.batch(vec![Op::put(key, value)]).await
    }

    /// Set `key` to `value` as an *owned* (ephemeral) key of this node: it lives as long as
    /// this node's current life. When this node stops (its graceful shutdown deletes it
    /// first), is declared gone by the others (silent for the preset's `leave_after`) or
    /// restarts, the key is deleted on every node by an ordinary versioned delete, which
    /// watches see. While this node runs, a delete of the key by another node (e.g. the other
    /// side of a healed partition) makes it write the key again. A restarted node gets its
    /// keys back only by writing them again. A plain [`put`](Node::put) of the key (here or
    /// elsewhere) makes it an ordinary key. See `docs/replication.md`, Owned keys.
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
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// let node = Node::builder()
    ///     .node_id(chorus::NodeId(1))
    ///     .start_with_transport(hub.endpoint("10.0.0.1:7400".parse()?)?)
    ///     .await?;
    /// node.put_owned("services/api/1", "10.0.0.1:8080").await?;
    /// let owner = node.get("services/api/1").and_then(|e| e.owner).expect("owned");
    /// assert_eq!(owner.node, chorus::NodeId(1));
    /// node.shutdown().await?;
    /// // A graceful stop deleted it (as it does on every other node).
    /// assert!(node.get("services/api/1").is_none());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn put_owned(
        &self,
        key: impl Into<String>,
        value: impl Into<Bytes>,
    ) -> Result<Version, Error> {
        let meta = crate::PutMeta {
            owned: true,
            ..crate::PutMeta::default()
        };
        self.batch(vec![Op::put_with(key, value, meta)]).await
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
    /// use futures_util::StreamExt;
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
    /// # };
    /// let node = node(1).await?;
    /// node.put("app/feature", "on").await?;
    /// let version = node.delete("app/feature").await?;
    /// assert!(node.get("app/feature").is_none());
    /// // The delete is a change like any other, with its own version.
    /// let change = node.watch_from("app/", 1).await?.next().await.expect("logged")?;
    /// assert_eq!((change.version, change.value), (version, None));
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delete(&self, key: impl Into<String>) -> Result<Version, Error> {
        self.batch(vec![Op::delete(key)]).await
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
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
    /// # };
    /// use chorus::Op;
    /// let node = node(1).await?;
    /// node.put("db/old-replica", "10.0.0.9").await?;
    /// let version = node
    ///     .batch(vec![
    ///         Op::put("db/primary", "10.0.0.1"),
    ///         Op::put("db/replica", "10.0.0.2"),
    ///         Op::delete("db/old-replica"),
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
        self.batch_checked(Vec::new(), ops).await
    }

    /// The live value of `key` in the local store, if any.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
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
        self.shared.get(key)
    }

    /// Every live key starting with `prefix`, sorted by key.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
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
        self.shared.scan(prefix)
    }

    /// The local revision: how many changes this node has applied.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
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
        self.shared.revision()
    }

    /// A stream of the changes under `prefix` from now on.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures_util::StreamExt;
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
    /// # };
    /// let (a, b) = (node(1).await?, node(2).await?);
    /// let mut watch = b.watch("cfg/");
    /// a.put("unrelated", "x").await?;
    /// a.put("cfg/level", "debug").await?;
    /// a.delete("cfg/level").await?;
    /// let first = watch.next().await.expect("running")?;
    /// let second = watch.next().await.expect("running")?;
    /// assert_eq!((first.key.as_str(), first.value), ("cfg/level", Some("debug".into())));
    /// assert_eq!((second.key.as_str(), second.value), ("cfg/level", None));
    /// a.shutdown().await?;
    /// b.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn watch(&self, prefix: &str) -> Watch {
        Watch::new(self.shared.clone(), prefix, self.revision())
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
    /// use futures_util::StreamExt;
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
    /// # };
    /// let node = node(1).await?;
    /// node.put("jobs/1", "queued").await?;
    /// let seen = node.revision();
    /// node.put("jobs/2", "queued").await?;
    /// // Resume after the last revision a consumer handled: nothing is missed.
    /// let mut watch = node.watch_from("jobs/", seen).await?;
    /// assert_eq!(watch.next().await.transpose()?.map(|c| c.key), Some("jobs/2".to_owned()));
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn watch_from(&self, prefix: &str, revision: u64) -> Result<Watch, Error> {
        let mut watch = Watch::new(self.shared.clone(), prefix, revision);
        watch.catch_up().await?;
        Ok(watch)
    }

    /// Publish `payload` on `topic` to the subscriptions of every node of the group, this one
    /// included. The message is not stored: a node that is down or joins later never gets it.
    /// Returns once the message is queued for reliable multicast (in order with this node's
    /// writes, and like them it waits while the node's send queue is full: the slowest member
    /// holds the publisher back). Per sender, every subscriber gets the messages in the order
    /// they were published, exactly once, or a [`Delivery::Lost`](crate::Delivery::Lost) where
    /// the network lost some for good; see `docs/replication.md`, Messages.
    ///
    /// A topic is 1 to [`MAX_TOPIC_LEN`](crate::MAX_TOPIC_LEN) bytes of `A-Z a-z 0-9 . _ / -`;
    /// the payload is at most the node's value limit (512 KiB by default).
    ///
    /// # Errors
    ///
    /// [`Error::Topic`] for a topic that breaks the syntax, [`Error::MessageTooLarge`] for a
    /// payload over the limit (nothing sent); [`Error::Closed`] after shutdown.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: if cancelled after the command reached the driver, the message may
    /// still be sent.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures_util::StreamExt;
    /// use chorus::{Delivery, Node};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
    /// # };
    /// let (a, b) = (node(1).await?, node(2).await?);
    /// // A new node is on probation until its second heartbeat: wait until each knows the other.
    /// while a.members().len() < 2 || b.members().len() < 2 {
    ///     tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    /// }
    /// let mut jobs = b.subscribe("jobs/*")?;
    /// a.publish("jobs/resize", "img-17.png").await?;
    /// match jobs.next().await.expect("running")? {
    ///     Delivery::Message(m) => {
    ///         assert_eq!((m.from, m.topic.as_str()), (a.node_id(), "jobs/resize"));
    ///         assert_eq!(m.payload, "img-17.png");
    ///     }
    ///     other => panic!("{other:?}"),
    /// }
    /// // Nothing was stored.
    /// assert!(b.scan("").is_empty());
    /// // Bad input is a clear error.
    /// assert!(matches!(a.publish("no spaces", "x").await, Err(chorus::Error::Topic(_))));
    /// a.shutdown().await?;
    /// b.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<(), Error> {
        let (topic, payload) = (topic.to_owned(), payload.into());
        self.command(|reply| Command::Publish {
            topic,
            payload,
            reply,
        })
        .await?
    }

    /// Subscribe to the messages published from now on on the topics `filter` matches: a
    /// topic (`chat/lobby`), every topic under a prefix (`chat/*` matches `chat/lobby` and
    /// `chat/a/b`, not `chat`), or every topic (`*`). See [`Subscription`] for what it yields,
    /// and [`publish`](Node::publish) for an example.
    ///
    /// # Errors
    ///
    /// [`Error::Topic`] for a filter that breaks the syntax;
    /// [`Error::TooManySubscriptions`] when the node holds
    /// [`MAX_SUBSCRIPTIONS`](crate::MAX_SUBSCRIPTIONS) already; [`Error::Closed`] after
    /// shutdown.
    pub fn subscribe(&self, filter: &str) -> Result<Subscription, Error> {
        let filter = TopicFilter::parse(filter)?;
        self.shared.subscriptions().subscribe(filter)
    }

    /// The members this node currently knows, itself included.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
    /// # };
    /// let (a, b) = (node(1).await?, node(2).await?);
    /// while a.members().len() < 2 {
    ///     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    /// }
    /// use chorus::{MemberState, NodeId};
    /// let states: Vec<(NodeId, MemberState)> =
    ///     a.members().into_iter().map(|m| (m.node_id, m.state)).collect();
    /// assert_eq!(states, [(NodeId(1), MemberState::Local), (NodeId(2), MemberState::Alive)]);
    /// // As the HTTP API and the CLI print them.
    /// assert_eq!(a.members()[0].state.to_string(), "self");
    /// a.shutdown().await?;
    /// b.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn members(&self) -> Vec<MemberInfo> {
        self.shared.members()
    }

    /// The membership changes this node sees from now on (joined, suspected, alive again,
    /// left, restarted), each with the member's id, incarnation, name and address. Pair it
    /// with [`members`](Node::members) for the state it starts from. See [`MemberEvents`]
    /// for the example, ordering and what a subscriber that falls behind gets.
    pub fn member_events(&self) -> MemberEvents {
        MemberEvents::new(self.shared.clone())
    }

    /// This node's name ([`NodeBuilder::node_name`], by default the host name), if it has one.
    pub fn node_name(&self) -> Option<&str> {
        self.shared.name.as_deref()
    }

    /// Every counter of the protocol, the replication layer, the glue, the data directory and
    /// the driver, as of the last snapshot (refreshed every 100 ms). See [`Counters`] for the
    /// fields and their flat snake_case names.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
    /// # };
    /// let node = node(1).await?;
    /// node.put("k", "v").await?;
    /// tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    /// let counters = node.counters();
    /// assert_eq!(counters.store.keys, 1);
    /// assert_eq!(counters.get("store_keys"), Some(1));
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn counters(&self) -> Counters {
        self.shared.counters()
    }

    /// Whether this node's store matched every live peer's at the last digest exchange.
    pub fn is_in_sync(&self) -> bool {
        *self.shared.in_sync.borrow()
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
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
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
        let mut rx = self.shared.in_sync.subscribe();
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
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
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
        self.shared.wait_stopped().await;
        Ok(())
    }

    /// Stop the driver at once, without a goodbye: what a crash looks like to the peers.
    /// For tests and demonstrations: only with the cargo feature `testing`.
    ///
    /// # Examples
    ///
    /// ```
    /// # use chorus::Node;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
    /// # let node = |id: u8| {
    /// #     let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).expect("free address");
    /// #     Node::builder().cluster("docs").node_id(chorus::NodeId(id.into())).start_with_transport(transport)
    /// # };
    /// let (a, b) = (node(1).await?, node(2).await?);
    /// while b.members().len() < 2 {
    ///     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    /// }
    /// a.abort();
    /// // b notices through missed heartbeats (suspected, then gone).
    /// let alive = |m: &chorus::MemberInfo| m.node_id == chorus::NodeId(1) && m.state == chorus::MemberState::Alive;
    /// while b.members().iter().any(alive) {
    ///     tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    /// }
    /// b.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "testing")]
    pub fn abort(&self) {
        self.shared.abort();
    }
}
