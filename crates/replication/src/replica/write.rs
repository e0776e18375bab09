//! Local writes: `put`, `delete`, `batch`, and the validation of their keys, values and shape.

use bytes::Bytes;
use prost::Message as _;
use std::collections::HashSet;

use super::{Outgoing, OutgoingKind, Replica, envelope};
use crate::config::Limits;
use crate::durable::Origin;
use crate::error::Error;
use crate::hlc::Version;
use crate::wire;

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: Bytes,
    },
    /// Delete `key` (store a tombstone).
    Delete {
        /// The key.
        key: String,
    },
}

impl Op {
    /// The key this operation writes.
    #[must_use]
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
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
        self.batch(
            wall_ms,
            vec![Op::Put {
                key: key.into(),
                value: value.into(),
            }],
        )
    }

    /// Deletes `key` (stores a tombstone). See [`batch`](Replica::batch).
    ///
    /// # Errors
    /// As [`batch`](Replica::batch).
    pub fn delete(&mut self, wall_ms: u64, key: impl Into<String>) -> Result<Version, Error> {
        self.batch(wall_ms, vec![Op::Delete { key: key.into() }])
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
        validate_ops(&self.cfg.limits, &ops)?;
        self.last_wall_ms = self.last_wall_ms.max(wall_ms);
        if let Err(e) = self.check_clock(wall_ms) {
            self.stats.clock_refused += 1;
            return Err(e);
        }
        let wire_ops: Vec<wire::Op> = ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => wire::Op {
                    key: key.clone(),
                    value: Some(value.clone()),
                },
                Op::Delete { key } => wire::Op {
                    key: key.clone(),
                    value: None,
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
        let items = ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => (key, Some(value), version),
                Op::Delete { key } => (key, None, version),
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
        if let Op::Put { key, value } = op
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
