//! Local writes: `put`, `delete`, `batch`, conditional batches (`Check`), and the validation
//! of their keys, values and shape.

use bytes::Bytes;
use prost::Message as _;
use std::collections::HashSet;

use chorus_protocol::NodeId;

use super::{Item, Outgoing, OutgoingKind, Replica, envelope};
use crate::config::Limits;
use crate::durable::Origin;
use crate::error::Error;
use crate::hlc::Version;
use crate::store::{EntryMeta, Owner};
use crate::wire;

/// Per-put metadata ([`Op::put_with`]): stored with the value under the write's version,
/// replicated and persisted with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PutMeta {
    /// Opaque flags (Consul's `Flags`), read back as [`Entry::flags`](crate::Entry::flags).
    pub flags: u64,
    /// Record this node (and its incarnation) as the entry's owner
    /// ([`Entry::owner`](crate::Entry::owner)).
    pub owned: bool,
}

/// One operation of a batch. Build with [`Op::put`], [`Op::put_with`] and [`Op::delete`];
/// match with `Op::Put { key, value, .. }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: Bytes,
        /// Flags and ownership stored with the value.
        meta: PutMeta,
    },
    /// Delete `key` (store a tombstone).
    Delete {
        /// The key.
        key: String,
    },
}

impl Op {
    /// Set `key` to `value`, without flags or owner.
    #[must_use]
    pub fn put(key: impl Into<String>, value: impl Into<Bytes>) -> Op {
        Op::put_with(key, value, PutMeta::default())
    }

    /// Set `key` to `value` with `meta` (flags, ownership).
    #[must_use]
    pub fn put_with(key: impl Into<String>, value: impl Into<Bytes>, meta: PutMeta) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            meta,
        }
    }

    /// Delete `key` (store a tombstone).
    #[must_use]
    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete { key: key.into() }
    }

    /// The key this operation writes.
    #[must_use]
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// What a [`Check`] expects of its key in the writer's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Expect {
    /// No live entry: the key was never written, or it was deleted (a tombstone counts as
    /// absent).
    Absent,
    /// A live entry, whatever its version.
    Present,
    /// A live entry with exactly this version.
    Version(Version),
    /// A live entry with exactly this local revision ([`Entry::revision`](crate::Entry),
    /// Consul's `ModifyIndex` on this node; revisions are per node).
    Revision(u64),
}

/// A condition of a conditional write ([`Replica::batch_checked`]): `key` must be as
/// `expect` says in this node's store at the moment the write is applied.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Check {
    /// The key checked (need not be one the batch writes).
    pub key: String,
    /// What it must be.
    pub expect: Expect,
}

impl Check {
    /// A check that `key` is as `expect` says.
    #[must_use]
    pub fn new(key: impl Into<String>, expect: Expect) -> Check {
        Check {
            key: key.into(),
            expect,
        }
    }

    /// Whether the check holds for `entry` (what the store holds under the key, tombstones
    /// included).
    #[must_use]
    pub fn holds(&self, entry: Option<&crate::Entry>) -> bool {
        let live = entry.filter(|e| !e.is_tombstone());
        match self.expect {
            Expect::Absent => live.is_none(),
            Expect::Present => live.is_some(),
            Expect::Version(v) => live.is_some_and(|e| e.version == v),
            Expect::Revision(r) => live.is_some_and(|e| e.revision == r),
        }
    }
}

impl Replica {
    /// Sets `key` to `value`. See [`batch`](Replica::batch).
    ///
    /// # Errors
    /// As [`batch`](Replica::batch).
    pub fn put(
        &mut self,
        wall_ms: u64,
        key: impl Into<String>,
        value: impl Into<Bytes>,
    ) -> Result<Version, Error> {
        self.batch(wall_ms, vec![Op::put(key, value)])
    }

    /// Deletes `key` (stores a tombstone). See [`batch`](Replica::batch).
    ///
    /// # Errors
    /// As [`batch`](Replica::batch).
    pub fn delete(&mut self, wall_ms: u64, key: impl Into<String>) -> Result<Version, Error> {
        self.batch(wall_ms, vec![Op::delete(key)])
    }

    /// Applies `ops` atomically under one fresh version and queues one write message.
    ///
    /// Atomic means: every op carries the same version; on this node and on every node that
    /// receives the write message, all ops become visible at once to multi-key reads
    /// (`scan_prefix`, `get_many`, `entries`), with consecutive revisions and consecutive
    /// change events. Each key still obeys last-writer-wins on its own: an op whose key
    /// already holds a newer version (possible on remote nodes) is skipped.
    ///
    /// # Errors
    /// A limit or shape error, or [`Error::ClockAhead`] when the write's version would be
    /// further ahead of the peers' clocks than they accept (see
    /// [`check_clock`](Replica::check_clock)); nothing is applied or sent and the clock does
    /// not move.
    pub fn batch(&mut self, wall_ms: u64, ops: Vec<Op>) -> Result<Version, Error> {
        self.batch_checked(wall_ms, Vec::new(), ops)
    }

    /// [`batch`](Replica::batch) under conditions: every check of `checks` is evaluated
    /// against this node's store at the moment the batch would be applied (the replica is
    /// the single writer of its store, so nothing can change in between), and the batch is
    /// applied only if all hold. All or nothing: a failed check applies no op.
    ///
    /// Only this node's view is checked: a concurrent write on another node that has not
    /// arrived yet is not seen, and it still resolves against this one by last writer wins
    /// (see `docs/replication.md`, Conditional writes).
    ///
    /// # Errors
    /// [`Error::ConditionFailed`] for the first check that does not hold (nothing changed,
    /// the clock did not move); [`Error::TooManyChecks`] or a key error for a malformed
    /// check; otherwise as [`batch`](Replica::batch).
    pub fn batch_checked(
        &mut self,
        wall_ms: u64,
        checks: Vec<Check>,
        ops: Vec<Op>,
    ) -> Result<Version, Error> {
        validate_ops(&self.cfg.limits, &ops)?;
        validate_checks(&self.cfg.limits, &checks)?;
        self.last_wall_ms = self.last_wall_ms.max(wall_ms);
        for check in &checks {
            let entry = self.store.get_entry(&check.key);
            if !check.holds(entry.as_ref()) {
                self.stats.conditions_failed += 1;
                let live = entry.filter(|e| !e.is_tombstone());
                return Err(Error::ConditionFailed {
                    key: check.key.clone(),
                    current: live.as_ref().map(|e| e.version),
                    revision: live.as_ref().map(|e| e.revision),
                });
            }
        }
        if let Err(e) = self.check_clock(wall_ms) {
            self.stats.clock_refused += 1;
            return Err(e);
        }
        let owner = wire::Owner {
            node: self.cfg.node,
            incarnation: self.cfg.incarnation,
        };
        let wire_ops: Vec<wire::Op> = ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, meta } => wire::Op {
                    key: key.clone(),
                    value: Some(value.clone()),
                    flags: meta.flags,
                    owner: meta.owned.then_some(owner),
                },
                Op::Delete { key } => wire::Op {
                    key: key.clone(),
                    value: None,
                    flags: 0,
                    owner: None,
                },
            })
            .collect();
        // The HLC is fixed64, so the size does not depend on its value as long as it is not
        // zero (proto3 omits zero fields); measure with a non-zero placeholder.
        let mut envelope = envelope(wire::envelope::Body::Write(wire::Write {
            hlc: u64::MAX,
            ops: wire_ops,
        }));
        let size = envelope.encoded_len();
        if size > self.cfg.limits.max_write_bytes {
            return Err(Error::WriteTooLarge {
                size,
                max: self.cfg.limits.max_write_bytes,
            });
        }
        let version = Version {
            hlc: self.clock.now(wall_ms),
            node: self.cfg.node,
        };
        if let Some(wire::envelope::Body::Write(w)) = envelope.body.as_mut() {
            w.hlc = version.hlc.0;
        }
        let owner = Owner {
            node: NodeId(self.cfg.node),
            incarnation: self.cfg.incarnation,
        };
        let items = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value, meta } => Item {
                    key,
                    value: Some(value),
                    version,
                    meta: EntryMeta {
                        flags: meta.flags,
                        owner: meta.owned.then_some(owner),
                    },
                },
                Op::Delete { key } => Item {
                    key,
                    value: None,
                    version,
                    meta: EntryMeta::default(),
                },
            })
            .collect();
        self.apply(items, wall_ms, Origin::Local);
        self.stats.local_writes += 1;
        self.outgoing.push_back(Outgoing {
            kind: OutgoingKind::Write,
            payload: envelope.encode_to_vec().into(),
        });
        Ok(version)
    }
}

pub(super) fn check_key(limits: &Limits, key: &str) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if key.len() > limits.max_key_len {
        return Err(Error::KeyTooLong {
            len: key.len(),
            max: limits.max_key_len,
        });
    }
    Ok(())
}

fn validate_checks(limits: &Limits, checks: &[Check]) -> Result<(), Error> {
    if checks.len() > limits.max_batch_ops {
        return Err(Error::TooManyChecks {
            checks: checks.len(),
            max: limits.max_batch_ops,
        });
    }
    checks.iter().try_for_each(|c| check_key(limits, &c.key))
}

fn validate_ops(limits: &Limits, ops: &[Op]) -> Result<(), Error> {
    if ops.is_empty() {
        return Err(Error::EmptyBatch);
    }
    if ops.len() > limits.max_batch_ops {
        return Err(Error::BatchTooLarge {
            ops: ops.len(),
            max: limits.max_batch_ops,
        });
    }
    let mut seen = HashSet::with_capacity(ops.len());
    for op in ops {
        check_key(limits, op.key())?;
        if let Op::Put { key, value, .. } = op
            && value.len() > limits.max_value_len
        {
            return Err(Error::ValueTooLarge {
                key: key.clone(),
                len: value.len(),
                max: limits.max_value_len,
            });
        }
        if !seen.insert(op.key()) {
            return Err(Error::DuplicateKey {
                key: op.key().to_owned(),
            });
        }
    }
    Ok(())
}
