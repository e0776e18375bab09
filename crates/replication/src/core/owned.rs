//! Owned (ephemeral) keys: entries written with `PutMeta { owned: true, .. }` belong to their
//! writer's life (node id + incarnation) and are removed on every node when that life ends.
//!
//! Liveness decides, not a timer: the membership events this node's endpoint reports.
//!
//! - **Gone owners.** A member that leaves (goodbye or timeout) or restarts with a new
//!   incarnation ends a life; so does this node's own previous life (a restart of this node).
//!   An owned entry whose owner is not a member at all (e.g. it died before this node met
//!   it) counts as gone once it stays unknown for the protocol's `leave_after`.
//! - **A deterministic deputy.** Every node keeps the list of gone lives that still own keys
//!   in its store. The lowest-id member (this node included) deletes them at once, with
//!   ordinary versioned deletes (watches see them); the member of rank `r` in id order steps
//!   in only `r` × [`DEPUTY_STEP`] later, when they are still there. So one node normally
//!   issues the deletes, and a deputy that dies too (or never met the owner) is covered by
//!   the next one, without ever losing the removal. Every node re-checks on every membership
//!   change and on every owned entry that arrives.
//! - **Re-assertion.** While it runs, an owner that sees one of its live owned keys deleted
//!   by another node (the deputies of the other side of a partition, once it heals) writes it
//!   again, with a newer version, from the value it last wrote.
//! - **A graceful stop** deletes the node's own owned keys before its goodbye.
//!
//! A gone life's keys are deleted at most [`MAX_ROUNDS`] times per departure by one node:
//! under an asymmetric partition (this node cannot hear the owner, a third node can and
//! relays its re-assertions) deletes and re-assertions would otherwise chase each other.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_protocol::{Endpoint, Event, NodeId};

use crate::replica::{Change, Op, PutMeta};
use crate::store::{Owner, Store};

/// How much later than the member before it in id order a member deletes a gone owner's
/// keys that are still there.
pub const DEPUTY_STEP: Duration = Duration::from_secs(1);
/// How often one node deletes the keys of one departed life (late arrivals included).
pub const MAX_ROUNDS: u32 = 3;
/// Most gone lives remembered; beyond it the oldest without keys, then the oldest, is
/// forgotten.
const MAX_GONE: usize = 1024;
/// How long a gone life whose keys are all deleted is remembered (to catch a late owned
/// write of it).
const REMEMBER: Duration = Duration::from_secs(600);
/// Most operations in one batch of deletes or re-assertions.
const CHUNK: usize = 128;

/// Counters of the owned-key logic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OwnedStats {
    /// Owned keys of gone owners this node deleted (as deputy or backup).
    pub deleted: u64,
    /// Own owned keys written again after another node deleted them.
    pub reasserted: u64,
    /// Times this node stopped deleting a gone life's late keys after [`MAX_ROUNDS`].
    pub gave_up: u64,
}

/// A life that ended (or an owner nobody here knows), whose owned keys must go.
#[derive(Debug, Clone, Copy)]
struct Gone {
    /// Entries owned by this node with an incarnation up to this one are stale.
    upto: u64,
    /// From when the lowest-ranked member deletes (the departure; for an unknown owner, its
    /// first sight plus `leave_after`).
    since: Instant,
    /// Deletes issued by this node for this departure.
    rounds: u32,
    /// When a failed batch may be tried again.
    retry_at: Option<Instant>,
}

/// The owned-key state of one node (see the module docs).
#[derive(Debug)]
pub(super) struct Owned {
    me: NodeId,
    incarnation: u64,
    /// Owner of every live owned entry of the store, by key.
    by_key: HashMap<String, Owner>,
    /// The keys of each owner node, with the owning incarnation.
    by_node: HashMap<NodeId, BTreeMap<String, u64>>,
    gone: BTreeMap<NodeId, Gone>,
    /// This life's own owned keys, with the value and flags last written (to re-assert).
    mine: HashMap<String, (Bytes, u64)>,
    /// Own owned keys another node deleted: written again at the next step.
    reassert: BTreeSet<String>,
    /// Something changed that a step must look at.
    dirty: bool,
    /// When this node's turn comes for keys still pending, as of the last step.
    next_due: Option<Instant>,
    grace: Duration,
    stats: OwnedStats,
}

impl Owned {
    /// The state of a node starting its life `incarnation` at `now`, with `store` as loaded:
    /// its own earlier lives are gone.
    pub(super) fn new(
        me: NodeId,
        incarnation: u64,
        grace: Duration,
        store: &Store,
        now: Instant,
    ) -> Owned {
        let mut owned = Owned {
            me,
            incarnation,
            by_key: HashMap::new(),
            by_node: HashMap::new(),
            gone: BTreeMap::new(),
            mine: HashMap::new(),
            reassert: BTreeSet::new(),
            dirty: false,
            next_due: None,
            grace,
            stats: OwnedStats::default(),
        };
        if incarnation > 0 {
            owned.mark_gone(me, incarnation - 1, now);
        }
        for (key, entry) in store.entries() {
            if entry.value.is_some()
                && let Some(owner) = entry.owner
            {
                owned.index(&key, Some(owner));
            }
        }
        owned.dirty = !owned.by_key.is_empty();
        owned
    }

    pub(super) fn stats(&self) -> OwnedStats {
        self.stats
    }

    fn mark_gone(&mut self, node: NodeId, upto: u64, since: Instant) {
        let entry = self.gone.entry(node).or_insert(Gone {
            upto,
            since,
            rounds: 0,
            retry_at: None,
        });
        if upto > entry.upto {
            *entry = Gone {
                upto,
                since,
                rounds: 0,
                retry_at: None,
            };
        }
        self.dirty = true;
        if self.gone.len() > MAX_GONE {
            let victim = self
                .gone
                .iter()
                .filter(|(n, _)| !self.by_node.contains_key(*n))
                .min_by_key(|(_, g)| g.since)
                .or_else(|| self.gone.iter().min_by_key(|(_, g)| g.since))
                .map(|(n, _)| *n);
            if let Some(victim) = victim {
                self.gone.remove(&victim);
            }
        }
    }

    /// Records the owner of `key` as the store now holds it (`None`: not a live owned entry).
    fn index(&mut self, key: &str, owner: Option<Owner>) {
        if let Some(old) = self.by_key.remove(key)
            && let Some(keys) = self.by_node.get_mut(&old.node)
        {
            keys.remove(key);
            if keys.is_empty() {
                self.by_node.remove(&old.node);
            }
        }
        if let Some(owner) = owner {
            self.by_node
                .entry(owner.node)
                .or_default()
                .insert(key.to_owned(), owner.incarnation);
            self.by_key.insert(key.to_owned(), owner);
        }
    }

    /// A membership event of the endpoint.
    pub(super) fn on_member(&mut self, now: Instant, event: &Event) {
        match *event {
            Event::MemberLeft {
                node, incarnation, ..
            } => self.mark_gone(node, incarnation.0, now),
            Event::MemberRestarted { node, new, .. } => {
                self.mark_gone(node, new.0.saturating_sub(1), now);
            }
            Event::MemberJoined {
                node, incarnation, ..
            } => {
                // Back with the same life (a healed partition): its keys are its own again.
                if self
                    .gone
                    .get(&node)
                    .is_some_and(|g| g.upto >= incarnation.0)
                {
                    self.gone.remove(&node);
                }
                self.dirty = true;
            }
            _ => self.dirty = true,
        }
    }

    /// A change the store applied.
    pub(super) fn on_change(&mut self, now: Instant, change: &Change, endpoint: &Endpoint) {
        // The change carries its entry's metadata: no lookup in the store (a search of its
        // index and a copy of the entry, for every change the node applies).
        let owner = change.value.as_ref().and(change.owner);
        let mine = Owner {
            node: self.me,
            incarnation: self.incarnation,
        };
        let local = change.version.node == self.me.0;
        match (&change.value, local) {
            (Some(value), true) if owner == Some(mine) => {
                self.mine
                    .insert(change.key.clone(), (value.clone(), change.flags));
                self.reassert.remove(&change.key);
            }
            // A plain put or a delete of our own: no longer an owned key of ours.
            (_, true) => {
                self.mine.remove(&change.key);
                self.reassert.remove(&change.key);
            }
            // Another node wrote the key: it is theirs now.
            (Some(_), false) if owner != Some(mine) => {
                self.mine.remove(&change.key);
                self.reassert.remove(&change.key);
            }
            (Some(_), false) => {}
            // Another node deleted one of our live owned keys: write it again.
            (None, false) => {
                if self.mine.contains_key(&change.key) {
                    self.reassert.insert(change.key.clone());
                    self.dirty = true;
                }
            }
        }
        self.index(&change.key, owner);
        if let Some(owner) = owner
            && owner.node != self.me
        {
            match self.gone.get(&owner.node) {
                Some(g) if g.upto >= owner.incarnation => self.dirty = true,
                Some(_) => {}
                None => {
                    let known = endpoint
                        .member(owner.node)
                        .is_some_and(|m| m.incarnation.0 >= owner.incarnation);
                    if !known {
                        // Nobody here knows this owner: gone unless it shows up soon.
                        self.mark_gone(owner.node, owner.incarnation, now + self.grace);
                    }
                }
            }
        }
    }

    /// When [`step`](Owned::step) next has work for this node (`None`: nothing pending), as
    /// of the last step (every change that could move it makes the next step due at once).
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.next_due
    }

    /// This node's position among the members in id order (0: the deputy).
    fn rank(&self, endpoint: &Endpoint) -> u32 {
        let below = endpoint
            .members()
            .iter()
            .filter(|m| m.node < self.me)
            .count();
        u32::try_from(below).unwrap_or(u32::MAX)
    }

    fn stale_keys<'a>(&'a self, node: NodeId, g: &'a Gone) -> impl Iterator<Item = &'a String> {
        self.by_node
            .get(&node)
            .into_iter()
            .flat_map(|keys| keys.iter())
            .filter(move |(_, inc)| **inc <= g.upto)
            .map(|(key, _)| key)
    }

    /// Whether [`step`](Owned::step) may have work now.
    pub(super) fn wants_step(&self, now: Instant) -> bool {
        // Re-assertions set `dirty` when they are queued; refused ones wait for `next_due`.
        self.dirty || self.next_due.is_some_and(|at| at <= now)
    }

    /// The writes due at `now`: batches of re-assertions of our own keys, then batches of
    /// deletes of gone owners' keys when this node's turn has come. Forgets departed lives
    /// that are back or whose keys are long gone.
    pub(super) fn step(
        &mut self,
        now: Instant,
        endpoint: &Endpoint,
        store: &Store,
    ) -> Vec<Vec<Op>> {
        self.dirty = false;
        let mut batches = Vec::new();
        let mut puts = Vec::new();
        for key in std::mem::take(&mut self.reassert) {
            let live = store.get_entry(&key).is_some_and(|e| e.value.is_some());
            if live {
                continue;
            }
            if let Some((value, flags)) = self.mine.get(&key) {
                puts.push(Op::put_with(
                    key.clone(),
                    value.clone(),
                    PutMeta {
                        flags: *flags,
                        owned: true,
                    },
                ));
            }
        }
        self.stats.reasserted += puts.len() as u64;
        batches.extend(chunks(puts));

        // Lives that are back, or long settled, are forgotten.
        let by_node = &self.by_node;
        self.gone.retain(|node, g| {
            let back = endpoint
                .member(*node)
                .is_some_and(|m| m.incarnation.0 <= g.upto);
            let has_keys = by_node
                .get(node)
                .is_some_and(|keys| keys.values().any(|inc| *inc <= g.upto));
            !back && (has_keys || now < g.since + REMEMBER)
        });
        let rank = self.rank(endpoint);
        let mut deletes = Vec::new();
        let mut next_due: Option<Instant> = None;
        let nodes: Vec<NodeId> = self.gone.keys().copied().collect();
        for node in nodes {
            let Some(g) = self.gone.get(&node).copied() else {
                continue;
            };
            if g.rounds >= MAX_ROUNDS {
                continue;
            }
            let stale: Vec<String> = self.stale_keys(node, &g).cloned().collect();
            if stale.is_empty() {
                continue;
            }
            let at = due(&g, rank);
            if now < at {
                next_due = Some(next_due.map_or(at, |n| n.min(at)));
                continue;
            }
            let rounds = g.rounds + 1;
            if rounds == MAX_ROUNDS {
                self.stats.gave_up += 1;
                tracing::warn!(
                    node = %self.me,
                    owner = %node,
                    keys = stale.len(),
                    "deleting a gone owner's keys for the last time: they keep coming back \
                     (an asymmetric partition?)"
                );
            }
            if let Some(g) = self.gone.get_mut(&node) {
                g.rounds = rounds;
            }
            tracing::debug!(node = %self.me, owner = %node, keys = stale.len(), rank, "deleting a gone owner's keys");
            self.stats.deleted += stale.len() as u64;
            deletes.extend(stale.into_iter().map(Op::delete));
        }
        batches.extend(chunks(deletes));
        self.next_due = next_due;
        batches
    }

    /// A batch of [`step`](Owned::step) was refused (e.g. this node's clock is too far
    /// ahead): the deletes are tried again [`DEPUTY_STEP`] later, re-assertions at the next
    /// step.
    pub(super) fn retry_later(&mut self, now: Instant, refused: &[Op]) {
        let retry = now + DEPUTY_STEP;
        for op in refused {
            let key = op.key();
            if self.mine.contains_key(key) {
                self.reassert.insert(key.to_owned());
                self.stats.reasserted = self.stats.reasserted.saturating_sub(1);
                continue;
            }
            self.stats.deleted = self.stats.deleted.saturating_sub(1);
            if let Some(owner) = self.by_key.get(key)
                && let Some(g) = self.gone.get_mut(&owner.node)
                && g.retry_at != Some(retry)
            {
                g.rounds = g.rounds.saturating_sub(1);
                g.retry_at = Some(retry);
            }
        }
        self.next_due = Some(self.next_due.map_or(retry, |n| n.min(retry)));
    }

    /// The deletes of this node's own owned keys, for a graceful stop.
    pub(super) fn own_deletes(&mut self) -> Vec<Vec<Op>> {
        let keys: Vec<String> = self.mine.keys().cloned().collect();
        self.mine.clear();
        self.reassert.clear();
        chunks(keys.into_iter().map(Op::delete).collect())
    }
}

/// When the member of `rank` deletes the keys of `g`.
fn due(g: &Gone, rank: u32) -> Instant {
    let turn = g.since + DEPUTY_STEP * rank;
    g.retry_at.map_or(turn, |retry| turn.max(retry))
}

fn chunks(ops: Vec<Op>) -> Vec<Vec<Op>> {
    let mut out = Vec::new();
    let mut ops = ops.into_iter().peekable();
    while ops.peek().is_some() {
        out.push(ops.by_ref().take(CHUNK).collect());
    }
    out
}
