//! Revisions and the bounded change log behind `changes_since` (resumable watches).

use super::{Change, Replica, ReplicaEvent};
use crate::error::Compacted;
use crate::hlc::Version;
use crate::store::{Attrs, Key, Value, bytes_of};

/// One change as the change log keeps it: the key shared with the store, the value shared
/// with the stored entry. Its revision is implicit: every revision is logged, in order, so
/// the log holds revisions `next_revision − len .. next_revision`.
#[derive(Debug, Clone)]
pub(super) struct Logged {
    pub(super) key: Key,
    pub(super) value: Option<Value>,
    pub(super) version: Version,
    pub(super) attrs: Attrs,
}

impl Logged {
    fn change(&self, revision: u64) -> Change {
        let meta = self.attrs.get();
        Change {
            revision,
            key: self.key.to_string(),
            value: self.value.as_ref().map(bytes_of),
            version: self.version,
            flags: meta.flags,
            owner: meta.owner,
        }
    }

    /// Key and value bytes, charged against `change_log_max_bytes`.
    fn cost(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, |v| v.len())
    }
}

impl Replica {
    /// Changes with a revision greater than `revision` whose key starts with `prefix`, oldest
    /// first, from the bounded change log.
    ///
    /// # Errors
    /// [`Compacted`] when changes after `revision` are no longer all in the log.
    pub fn changes_since(&self, revision: u64, prefix: &str) -> Result<Vec<Change>, Compacted> {
        let oldest = self.next_revision - self.log.len() as u64;
        if revision.saturating_add(1) < oldest {
            return Err(Compacted {
                requested: revision,
                oldest_available: oldest,
            });
        }
        Ok((oldest..)
            .zip(&self.log)
            .filter(|(rev, c)| *rev > revision && c.key.starts_with(prefix))
            .map(|(rev, c)| c.change(rev))
            .collect())
    }

    /// Gives `change` the next revision, reports it and logs it; returns the revision.
    pub(super) fn record(&mut self, change: Logged) -> u64 {
        let revision = self.next_revision;
        self.next_revision += 1;
        self.events
            .push_back(ReplicaEvent::Change(change.change(revision)));
        let cap = self.cfg.change_log_capacity;
        if cap == 0 {
            return revision;
        }
        self.log_bytes += change.cost();
        // Room is made before the push, so the log never grows past its capacity.
        while self.log.len() >= cap
            || (self.log_bytes > self.cfg.change_log_max_bytes && !self.log.is_empty())
        {
            match self.log.pop_front() {
                Some(old) => self.log_bytes -= old.cost(),
                None => break,
            }
        }
        let len = self.log.len();
        if len == self.log.capacity() {
            // Doubling, but never past the capacity the log is bounded by.
            self.log.reserve_exact(len.max(16).min(cap - len));
        }
        self.log.push_back(change);
        revision
    }
}
