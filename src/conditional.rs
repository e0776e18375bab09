//! Conditional writes and writes with metadata on [`Node`]: [`Node::batch_checked`] and its
//! shorthands, [`Node::put_with`].
//!
//! The checks are evaluated by the node's single writer (the driver's `NodeCore`) at the
//! moment the batch is applied, against this node's store only: see `docs/replication.md`,
//! Conditional writes, for what that does and does not guarantee.

use bytes::Bytes;

use crate::driver::Command;
use crate::{Check, Error, Expect, Node, Op, PutMeta, Version};

impl Node {
    /// Apply `ops` atomically under one version, as [`Node::batch`] does, but only if every
    /// check of `checks` holds in this node's store at the moment the batch is applied. All
    /// or nothing: when one check fails no op is applied, nothing is sent and the store,
    /// its revision and the clock are unchanged.
    ///
    /// The checks see this node's view only. Another node may accept a conflicting
    /// conditional write at the same time (before either write reaches the other); the two
    /// then resolve by last writer wins like any concurrent writes. A check is a guard
    /// against stale local state, not a cluster-wide lock.
    ///
    /// # Errors
    ///
    /// [`Error::Replication`] with
    /// [`ReplicationError::ConditionFailed`](crate::ReplicationError::ConditionFailed) for
    /// the first check that does not hold (with the key's current version and revision);
    /// otherwise as [`Node::batch`].
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
    /// use chorus::{Check, Expect, Op, ReplicationError};
    /// let node = node(1).await?;
    /// let v1 = node.put("cfg/schema", "1").await?;
    /// // Move to schema 2 only if nobody changed schema 1 meanwhile, and only once.
    /// node.batch_checked(
    ///     vec![Check::new("cfg/schema", Expect::Version(v1)), Check::new("cfg/migrated", Expect::Absent)],
    ///     vec![Op::put("cfg/schema", "2"), Op::put("cfg/migrated", "yes")],
    /// )
    /// .await?;
    /// // The same again fails: nothing changes.
    /// let before = node.revision();
    /// let err = node
    ///     .batch_checked(vec![Check::new("cfg/schema", Expect::Version(v1))], vec![Op::put("cfg/schema", "3")])
    ///     .await
    ///     .unwrap_err();
    /// assert!(matches!(
    ///     err,
    ///     chorus::Error::Replication(ReplicationError::ConditionFailed { ref key, current: Some(_), .. }) if key == "cfg/schema"
    /// ), "{err}");
    /// assert_eq!(node.revision(), before);
    /// assert_eq!(node.get("cfg/schema").map(|e| e.value), Some("2".into()));
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn batch_checked(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<Version, Error> {
        self.command(|reply| Command::Write { checks, ops, reply })
            .await?
    }

    /// Set `key` to `value` only if this node holds no live value for it (never written, or
    /// deleted: a tombstone counts as absent). See [`Node::batch_checked`] for what the
    /// check guarantees: two nodes may both succeed for the same key at the same time, and
    /// the later version then wins everywhere.
    ///
    /// # Errors
    ///
    /// [`Error::Replication`] with
    /// [`ReplicationError::ConditionFailed`](crate::ReplicationError::ConditionFailed)
    /// (carrying the current version) when the key holds a value; otherwise as
    /// [`Node::put`].
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
    /// use chorus::ReplicationError;
    /// let node = node(1).await?;
    /// let first = node.put_if_absent("locks/report", "node-1").await?;
    /// match node.put_if_absent("locks/report", "node-1 again").await {
    ///     Err(chorus::Error::Replication(ReplicationError::ConditionFailed { current, .. })) => {
    ///         assert_eq!(current, Some(first));
    ///     }
    ///     other => panic!("expected a failed condition, got {other:?}"),
    /// }
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn put_if_absent(
        &self,
        key: impl Into<String>,
        value: impl Into<Bytes>,
    ) -> Result<Version, Error> {
        let key = key.into();
        let check = Check::new(key.clone(), Expect::Absent);
        self.batch_checked(vec![check], vec![Op::put(key, value)])
            .await
    }

    /// Set `key` to `value` only if its live value on this node has exactly the version
    /// `expected` (compare and set). See [`Node::batch_checked`] for what is guaranteed.
    ///
    /// # Errors
    ///
    /// [`Error::Replication`] with
    /// [`ReplicationError::ConditionFailed`](crate::ReplicationError::ConditionFailed) when
    /// the key is absent or holds another version; otherwise as [`Node::put`].
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
    /// let v1 = node.put("counter", "1").await?;
    /// let v2 = node.put_if_version("counter", "2", v1).await?;
    /// // A writer still holding v1 is refused.
    /// assert!(node.put_if_version("counter", "2 again", v1).await.is_err());
    /// assert_eq!(node.get("counter").map(|e| e.version), Some(v2));
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn put_if_version(
        &self,
        key: impl Into<String>,
        value: impl Into<Bytes>,
        expected: Version,
    ) -> Result<Version, Error> {
        let key = key.into();
        let check = Check::new(key.clone(), Expect::Version(expected));
        self.batch_checked(vec![check], vec![Op::put(key, value)])
            .await
    }

    /// Delete `key` only if its live value on this node has exactly the version `expected`.
    /// See [`Node::batch_checked`] for what is guaranteed.
    ///
    /// # Errors
    ///
    /// As [`Node::put_if_version`].
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
    /// let v1 = node.put("jobs/7", "claimed by a").await?;
    /// let v2 = node.put("jobs/7", "claimed by b").await?;
    /// assert!(node.delete_if_version("jobs/7", v1).await.is_err());
    /// node.delete_if_version("jobs/7", v2).await?;
    /// assert!(node.get("jobs/7").is_none());
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn delete_if_version(
        &self,
        key: impl Into<String>,
        expected: Version,
    ) -> Result<Version, Error> {
        let key = key.into();
        let check = Check::new(key.clone(), Expect::Version(expected));
        self.batch_checked(vec![check], vec![Op::delete(key)]).await
    }

    /// Set `key` to `value` with metadata: opaque `flags` and, with `owned`, this node (and
    /// its incarnation) recorded as the entry's owner. Both are replicated and persisted
    /// with the value and read back in [`Entry::flags`](crate::Entry::flags) and
    /// [`Entry::owner`](crate::Entry::owner).
    ///
    /// # Errors
    ///
    /// As [`Node::put`].
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
    /// use chorus::PutMeta;
    /// let node = node(1).await?;
    /// node.put_with("svc/web/1", "10.0.0.5:80", PutMeta { flags: 42, owned: true }).await?;
    /// let entry = node.get("svc/web/1").expect("just written");
    /// assert_eq!(entry.flags, 42);
    /// assert_eq!(entry.owner.map(|o| o.node), Some(node.node_id()));
    /// node.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn put_with(
        &self,
        key: impl Into<String>,
        value: impl Into<Bytes>,
        meta: PutMeta,
    ) -> Result<Version, Error> {
        self.batch(vec![Op::put_with(key, value, meta)]).await
    }
}
