//! Anti-entropy: digests, summaries, requests and entries, the peers' view and the in-sync rule.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::time::Instant;

use bytes::Bytes;
use prost::Message as _;

use super::lifecycle::{Standing, SyncState};
use chorus_protocol::util::random_below;

use super::{Outgoing, OutgoingKind, Replica, ReplicaEvent, envelope};
use crate::hash::rendezvous;
use crate::hlc::{Hlc, Version};
use crate::store::{Key, Meta};
use crate::wire;

/// What this node offered one requester in its summaries: the bytes of entries the
/// requester may then ask for (see `docs/replication.md`, bounded answers).
#[derive(Debug, Clone, Copy)]
pub(super) struct Offer {
    pub(super) bytes: usize,
    pub(super) at: Instant,
}

/// A `Request` is answered with at most this many times its own size in entries, beyond
/// what this node offered the requester in its summaries (quinn's anti-amplification
/// factor).
const ANSWER_FACTOR: usize = 3;

/// What this node knows of one peer.
#[derive(Debug, Default)]
pub(super) struct Peer {
    pub(super) presence: Presence,
    /// Latest digest received from the peer.
    pub(super) digest: Option<Vec<u64>>,
    /// How the peer's digests compared with ours.
    pub(super) agreement: Agreement,
    /// Its wall clock minus ours (ms), as the protocol measured it from its heartbeats.
    pub(super) clock_offset_ms: Option<i64>,
}

impl Peer {
    pub(super) fn is_live(&self) -> bool {
        self.presence == Presence::Live
    }
}

/// Whether the protocol reported a peer up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Presence {
    /// Only heard from: a digest arrived before [`Replica::handle_peer_up`] (or after the
    /// peer left). Its digests are compared, but it counts for nothing else.
    #[default]
    Heard,
    /// Reported up by the protocol ([`Replica::handle_peer_up`]), not down since.
    Live,
}

/// How a peer's digests compared with ours when they arrived: the in-sync rule's view of
/// it, with one mismatch of hysteresis once matched.
///
/// A matching digest makes it `Matched`; a differing one turns `Matched` into `Doubted`
/// (still counted as matched: the difference may be writes in flight) and `Doubted` into
/// `Differs`; a reported loss or a dropped entry of the peer makes it `Differs`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Agreement {
    /// No digest matched yet, or two in a row differed, or the peer's writes may be missing.
    #[default]
    Differs,
    /// The latest digest matched ours.
    Matched,
    /// Matched, then one digest differed; the next one decides.
    Doubted,
}

impl Agreement {
    /// Whether the in-sync rule counts the peer as agreeing.
    pub(super) fn agrees(self) -> bool {
        matches!(self, Agreement::Matched | Agreement::Doubted)
    }
}

impl Replica {
    /// The current digest: one order-independent hash per bucket.
    #[must_use]
    pub fn digest(&self) -> Vec<u64> {
        self.buckets.digest()
    }

    /// The clock offset of live peer `node` (its wall clock minus ours, in milliseconds, as
    /// `chorus_protocol::Member::clock_offset_ms` reports it; `None` when unknown). Unknown
    /// or departed nodes are ignored.
    pub fn handle_peer_clock(
        &mut self,
        now: Instant,
        wall_ms: u64,
        node: u64,
        offset_ms: Option<i64>,
    ) {
        self.last_wall_ms = self.last_wall_ms.max(wall_ms);
        match self.peers.get_mut(&node) {
            Some(p) if p.is_live() && p.clock_offset_ms != offset_ms => {
                p.clock_offset_ms = offset_ms
            }
            _ => return,
        }
        self.evaluate_sync(now);
    }

    /// A peer became live (joined, restarted, or came back after a partition).
    pub fn handle_peer_up(&mut self, now: Instant, node: u64) {
        if node == self.cfg.node {
            return;
        }
        let long_isolation = self
            .isolated_since
            .take()
            .is_some_and(|since| now.saturating_duration_since(since) > self.cfg.tombstone_grace);
        let long_absence = self.standing == Standing::AbsentTooLong;
        if (long_isolation || long_absence) && self.standing != Standing::Fresh {
            self.standing = Standing::Recovering;
            self.stats.recoveries += 1;
        }
        let peer = self.peers.entry(node).or_default();
        *peer = Peer {
            presence: Presence::Live,
            ..Peer::default()
        };
        self.trigger_digest(now);
        self.evaluate_sync(now);
    }

    /// A peer left (goodbye or timeout).
    pub fn handle_peer_down(&mut self, now: Instant, node: u64) {
        self.peers.remove(&node);
        self.offers.remove(&node);
        if !self.has_live_peer() && self.isolated_since.is_none() {
            self.isolated_since = Some(now);
        }
        self.evaluate_sync(now);
    }

    /// The protocol reported unrecoverable loss of messages from `node`: resync.
    pub fn handle_lost(&mut self, now: Instant, node: u64) {
        self.stats.losses += 1;
        if let Some(p) = self.peers.get_mut(&node) {
            p.agreement = Agreement::Differs;
        }
        // Every peer may hold the lost writes (they were multicast), so ask everyone.
        for p in self.peers.values_mut() {
            p.agreement = Agreement::Differs;
        }
        self.evaluate_sync(now);
        self.trigger_digest(now);
    }

    pub(super) fn on_digest(&mut self, now: Instant, from: u64, d: wire::Digest) {
        self.stats.digests_received += 1;
        if d.buckets.len() != self.buckets.len() {
            self.stats.bucket_mismatch += 1;
            return;
        }
        if self.standing == Standing::Recovering && !d.fresh {
            // An empty bucket at a peer that is not fresh: the peer lacks every key of ours
            // there, so our old keys in it were deleted (and collected) while we were away.
            for b in 0..self.buckets.len() {
                if d.buckets[b] == 0 && self.buckets.sum(b) != 0 {
                    let keys = self.old_keys(b);
                    keys.into_iter().for_each(|k| self.forget(&k));
                }
            }
        }
        let ours = self.digest();
        let equal = ours == d.buckets;
        let mut confirm = false;
        {
            let peer = self.peers.entry(from).or_default();
            peer.agreement = match (equal, peer.agreement) {
                (true, _) => Agreement::Matched,
                (false, Agreement::Matched) => {
                    // The hysteresis holds for one digest (the difference may be writes in
                    // flight); ask for the peer's next digest now, so that a lasting
                    // difference ends "in sync" within a round trip, not a sync interval.
                    self.confirm_wanted = true;
                    confirm = true;
                    Agreement::Doubted
                }
                (false, Agreement::Doubted | Agreement::Differs) => Agreement::Differs,
            };
        }
        if confirm {
            self.trigger_digest(now);
        }
        if !equal {
            let mut answers: Vec<(usize, Answer)> = Vec::new();
            for (b, (mine, theirs)) in ours.iter().zip(&d.buckets).enumerate() {
                // Bucket indices fit in u32: the count is a NonZeroU32.
                let bucket = b as u32;
                if mine == theirs || self.buckets.is_empty(b) {
                    continue;
                }
                if !self.is_responder(from, d.round, bucket, *theirs) {
                    continue;
                }
                if self
                    .answered
                    .get(&(from, bucket))
                    .is_some_and(|t| now.saturating_duration_since(*t) < self.cfg.resend_holdoff)
                {
                    continue;
                }
                self.answered.insert((from, bucket), now);
                self.stats.buckets_answered += 1;
                // The requester holds nothing here: send everything, skip the summary.
                answers.push((
                    b,
                    if *theirs == 0 {
                        Answer::Entries
                    } else {
                        Answer::Summary
                    },
                ));
            }
            let mut summaries = self.summaries(from, &answers);
            for (b, answer) in answers {
                match answer {
                    Answer::Entries => {
                        let keys = self.buckets.keys(&self.store, b);
                        let keys = keys.iter().map(|(k, _)| k.clone()).collect();
                        self.send_entries(keys, usize::MAX);
                    }
                    Answer::Summary => {
                        if let Some(chunks) = summaries.get_mut(b).and_then(Option::take) {
                            self.send_summaries(now, from, chunks);
                        }
                    }
                }
            }
        }
        // Remember the digest after answering, so responder selection used the older view.
        if let Some(p) = self.peers.get_mut(&from) {
            p.digest = Some(d.buckets);
        }
        if d.reply_wanted {
            self.trigger_digest(now);
        }
        self.evaluate_sync(now);
    }

    pub(super) fn on_summary(&mut self, from: u64, s: wire::Summary) {
        if s.target != self.cfg.node {
            return;
        }
        let Some(bucket) = usize::try_from(s.bucket)
            .ok()
            .filter(|b| *b < self.buckets.len())
        else {
            self.stats.malformed += 1;
            return;
        };
        let lower = s.after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let upper = s.upto.as_deref().map_or(Bound::Unbounded, Bound::Included);
        if let (Bound::Excluded(a), Bound::Included(u)) = (lower, upper)
            && a >= u
        {
            self.stats.malformed += 1;
            return;
        }
        let theirs: HashMap<String, Version> = s
            .keys
            .into_iter()
            .map(|kv| {
                (
                    kv.key,
                    Version {
                        hlc: Hlc(kv.hlc),
                        node: kv.node,
                    },
                )
            })
            .collect();
        let horizon = self.horizon_ms(self.last_wall_ms);
        let mut to_send = Vec::new();
        let mut to_forget = Vec::new();
        let keys = self.buckets.keys(&self.store, bucket);
        let first = match lower {
            Bound::Excluded(a) => keys.partition_point(|(k, _)| &**k <= a),
            _ => 0,
        };
        let end = match upper {
            Bound::Included(u) => keys.partition_point(|(k, _)| &**k <= u),
            _ => keys.len(),
        };
        for (key, meta) in &keys[first..end.max(first)] {
            match theirs.get(&**key) {
                None if self.standing == Standing::Recovering
                    && meta.version.hlc.physical_ms() < horizon =>
                {
                    to_forget.push(key.clone());
                }
                None => to_send.push(key.clone()),
                Some(v) if *v < meta.version => to_send.push(key.clone()),
                Some(_) => {}
            }
        }
        to_forget.iter().for_each(|k| self.forget(k));
        let mut to_request: Vec<String> = theirs
            .into_iter()
            .filter(|(key, v)| {
                self.buckets
                    .meta(&self.store, key)
                    .is_none_or(|m| m.version < *v)
            })
            .map(|(key, _)| key)
            .collect();
        to_request.sort_unstable();
        self.send_entries(to_send, usize::MAX);
        self.send_requests(from, to_request);
    }

    /// Answers a `Request` naming this node: each distinct key it holds once, within the
    /// bound of `docs/replication.md` (bounded answers): at most `ANSWER_FACTOR` times the
    /// request's size, plus what this node offered the requester in its recent summaries.
    pub(super) fn on_request(&mut self, now: Instant, from: u64, r: wire::Request) {
        if r.target != self.cfg.node {
            return;
        }
        let asked = r.encoded_len();
        // A Request built by `send_requests` fits one sync message: keys of at least one
        // byte take at least three, so more keys than that are not from a Chorus node.
        let max_keys = self.cfg.max_sync_message / 3 + 1;
        if r.keys.len() > max_keys {
            self.stats.request_keys_ignored += (r.keys.len() - max_keys) as u64;
        }
        let mut seen = HashSet::with_capacity(r.keys.len().min(max_keys));
        let mut held: Vec<Key> = Vec::new();
        for k in r.keys.iter().take(max_keys) {
            if !seen.insert(k.as_str()) {
                self.stats.request_duplicates += 1;
                continue;
            }
            if let Some((key, _)) = self.store.lookup(k) {
                held.push(key);
            }
        }
        drop(seen);
        if self.standing == Standing::Recovering {
            // The requester lacks (or holds an older copy of) these keys; old ones may have
            // been deleted while we were away, so forget them rather than spread them.
            let horizon = self.horizon_ms(self.last_wall_ms);
            let (old, keep): (Vec<Key>, Vec<Key>) =
                held.into_iter().partition(|k| self.is_old(k, horizon));
            old.iter().for_each(|k| self.forget(k));
            held = keep;
        }
        let ttl = self.cfg.sync_interval * 2;
        let offered = self
            .offers
            .get(&from)
            .filter(|o| now.saturating_duration_since(o.at) < ttl)
            .map_or(0, |o| o.bytes);
        let allowance = asked.saturating_mul(ANSWER_FACTOR);
        let used = self.send_entries(held, allowance.saturating_add(offered));
        if let Some(o) = self.offers.get_mut(&from) {
            o.bytes = o.bytes.saturating_sub(used.saturating_sub(allowance));
        }
    }

    /// This node dropped an entry `from` holds (too far in the future): their stores differ
    /// for as long as that lasts, so this node is not in sync with `from`, and says so in a
    /// digest soon (which wants a reply: `from` then sees the difference too).
    pub(super) fn dropped_from(&mut self, now: Instant, from: u64) {
        if let Some(p) = self.peers.get_mut(&from) {
            p.agreement = Agreement::Differs;
        }
        self.evaluate_sync(now);
        self.trigger_digest(now);
    }

    pub(super) fn has_live_peer(&self) -> bool {
        self.peers.values().any(Peer::is_live)
    }

    fn entry_item(&self, key: &str) -> Option<wire::Entry> {
        Some(self.store.get_entry(key)?.to_wire(key))
    }

    /// Rendezvous choice among live members (this node included, the requester excluded)
    /// whose bucket differs from the requester's, as far as this node knows.
    fn is_responder(&self, requester: u64, round: u64, bucket: u32, theirs: u64) -> bool {
        let me = self.cfg.node;
        let mine = rendezvous(requester, round, bucket, me);
        !self.peers.iter().any(|(&node, p)| {
            node != requester
                && p.is_live()
                && p.digest.as_ref().is_none_or(|d| {
                    let h = d.get(bucket as usize).copied().unwrap_or(0);
                    h != theirs && h != 0
                })
                && {
                    let score = rendezvous(requester, round, bucket, node);
                    (score, node) > (mine, me)
                }
        })
    }

    pub(super) fn trigger_digest(&mut self, now: Instant) {
        let base = self.cfg.trigger_delay;
        let extra = random_below(&mut self.rng, base);
        let at = now + base + extra;
        self.triggered_digest = Some(self.triggered_digest.map_or(at, |t| t.min(at)));
    }

    pub(super) fn send_digest(&mut self) {
        self.round += 1;
        let d = wire::Digest {
            round: self.round,
            buckets: self.digest(),
            reply_wanted: !self.is_in_sync() || std::mem::take(&mut self.confirm_wanted),
            fresh: self.standing == Standing::Fresh,
        };
        self.push_sync(envelope(wire::envelope::Body::Digest(d)));
        self.stats.digests_sent += 1;
    }

    /// The summaries answering `target`'s digest, by bucket, for the buckets of `answers`
    /// to be summarised, from the buckets' key lists (see `docs/replication.md`,
    /// Anti-entropy).
    fn summaries(
        &mut self,
        target: u64,
        answers: &[(usize, Answer)],
    ) -> Vec<Option<SummaryChunks>> {
        let max = self.cfg.max_sync_message;
        let mut out: Vec<Option<SummaryChunks>> = (0..self.buckets.len()).map(|_| None).collect();
        let store = &self.store;
        for &(b, answer) in answers {
            if answer != Answer::Summary {
                continue;
            }
            // Bucket indices fit in u32: the count is a NonZeroU32.
            let mut chunks = SummaryChunks::new(target, b as u32, max);
            for (key, meta) in self.buckets.keys(store, b) {
                chunks.push(key, *meta);
            }
            out[b] = Some(chunks);
        }
        out
    }

    /// Fills the summaries of `out` from one walk of the store's index: what
    /// [`summaries`](Replica::summaries) builds from the key lists, for the tests to compare.
    #[cfg(test)]
    fn summaries_by_walk(&self, out: &mut [Option<SummaryChunks>]) {
        let n = self.buckets.bucket_count();
        self.store.for_each_meta(|key, meta| {
            if let Some(chunks) = out[crate::hash::bucket_of(key, n) as usize].as_mut() {
                chunks.push(key, meta);
            }
        });
    }

    /// Sends `target` the summaries of one bucket (this node's keys of it with their
    /// versions), and records what it thereby offers: `target` may then ask for any of these
    /// entries once.
    fn send_summaries(&mut self, now: Instant, target: u64, chunks: SummaryChunks) {
        let (chunks, offered) = chunks.finish();
        for s in chunks {
            self.push_sync(envelope(wire::envelope::Body::Summary(s)));
            self.stats.summaries_sent += 1;
        }
        let offer = self
            .offers
            .entry(target)
            .or_insert(Offer { bytes: 0, at: now });
        offer.bytes = offer.bytes.saturating_add(offered);
        offer.at = now;
    }

    fn send_requests(&mut self, target: u64, keys: Vec<String>) {
        let max = self.cfg.max_sync_message;
        let mut cur = Vec::new();
        let mut size = 16;
        for key in keys {
            let len = key.len() + 4;
            if !cur.is_empty() && size + len > max {
                let r = wire::Request {
                    target,
                    keys: std::mem::take(&mut cur),
                };
                self.push_sync(envelope(wire::envelope::Body::Request(r)));
                self.stats.requests_sent += 1;
                size = 16;
            }
            size += len;
            cur.push(key);
        }
        if !cur.is_empty() {
            let r = wire::Request { target, keys: cur };
            self.push_sync(envelope(wire::envelope::Body::Request(r)));
            self.stats.requests_sent += 1;
        }
    }

    /// Sends the entries of `keys` in `Entries` messages of at most `max_sync_message`
    /// bytes, building each entry only if it fits both `budget` (bytes this answer may
    /// take) and the sync room; stops at the first that does not (counted). Returns the
    /// bytes sent.
    fn send_entries(&mut self, keys: Vec<Key>, mut budget: usize) -> usize {
        let max = self.cfg.max_sync_message;
        let mut cur = Vec::new();
        let mut size = 8;
        let mut used = 0;
        for key in keys {
            let Some(item) = self.entry_item(&key) else {
                continue;
            };
            let len = item.encoded_len() + 6;
            if len > budget {
                self.stats.answers_capped += 1;
                break;
            }
            // What is gathered (sent before this entry or with it) plus this entry must fit.
            if size + len > self.sync_room {
                self.stats.answers_deferred += 1;
                break;
            }
            if !cur.is_empty() && size + len > max {
                self.flush_entries(std::mem::take(&mut cur));
                size = 8;
            }
            budget -= len;
            used += len;
            size += len;
            cur.push(item);
        }
        if !cur.is_empty() {
            self.flush_entries(cur);
        }
        used
    }

    fn flush_entries(&mut self, entries: Vec<wire::Entry>) {
        self.stats.entries_sent += entries.len() as u64;
        self.stats.entries_messages_sent += 1;
        self.push_sync(envelope(wire::envelope::Body::Entries(wire::Entries {
            entries,
        })));
    }

    fn push_sync(&mut self, e: wire::Envelope) {
        let payload: Bytes = e.encode_to_vec().into();
        self.sync_room = self.sync_room.saturating_sub(payload.len());
        self.outgoing.push_back(Outgoing {
            kind: OutgoingKind::Sync,
            payload,
        });
    }

    /// In sync: every live peer's latest digest matched ours when it arrived (one mismatch
    /// of hysteresis once matched); with no live peer, once `solo_in_sync_after` has passed
    /// since creation; and in both cases local writes are not refused by the clock check.
    pub(super) fn evaluate_sync(&mut self, now: Instant) {
        let live: Vec<&Peer> = self.peers.values().filter(|p| p.is_live()).collect();
        let with_peers = !live.is_empty();
        let agreed = if live.is_empty() {
            now.saturating_duration_since(self.created) >= self.cfg.solo_in_sync_after
        } else {
            live.iter().all(|p| p.agreement.agrees())
        };
        // A node whose writes its peers would drop is not in sync, whatever the digests say.
        let target = agreed && self.check_clock(self.last_wall_ms).is_ok();
        let state = if target {
            SyncState::InSync
        } else {
            SyncState::OutOfSync
        };
        if state != self.sync {
            self.sync = state;
            if target
                && with_peers
                && matches!(self.standing, Standing::Fresh | Standing::Recovering)
            {
                // Only agreement with a peer ends these: a node alone (say its first peer
                // after a long isolation left mid-sync) has learnt nothing from anyone.
                self.standing = Standing::Settled;
            }
            self.events.push_back(if target {
                ReplicaEvent::InSync
            } else {
                ReplicaEvent::OutOfSync
            });
        }
    }
}

/// About the encoded size of an `Entry` of `key` with a value of `value_len` bytes (`None`:
/// a tombstone), framing included.
fn entry_size(key: &str, value_len: Option<usize>) -> usize {
    key.len() + value_len.map_or(0, |n| n + 4) + 32
}

/// How a node answers a requester's bucket that differs from its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// The requester's bucket is empty: every entry of it.
    Entries,
    /// Its keys with their versions, in chunks.
    Summary,
}

/// The summaries of one bucket as they are built, key by key in key order: chunks of at most
/// `max_sync_message` bytes, each covering the key range `(after, upto]`.
#[derive(Debug)]
struct SummaryChunks {
    max: usize,
    chunks: Vec<wire::Summary>,
    cur: wire::Summary,
    size: usize,
    /// Bytes of the entries offered (what the requester may then ask for).
    offered: usize,
}

impl SummaryChunks {
    fn new(target: u64, bucket: u32, max: usize) -> SummaryChunks {
        let cur = wire::Summary {
            target,
            bucket,
            after: None,
            upto: None,
            keys: Vec::new(),
        };
        SummaryChunks {
            max,
            chunks: Vec::new(),
            size: cur.encoded_len() + 16,
            cur,
            offered: 0,
        }
    }

    /// Adds `key` (the next in key order) with its version.
    fn push(&mut self, key: &str, meta: Meta) {
        self.offered = self.offered.saturating_add(entry_size(key, meta.value_len));
        let kv = wire::KeyVersion {
            key: key.to_owned(),
            hlc: meta.version.hlc.0,
            node: meta.version.node,
        };
        let len = kv.encoded_len() + 4;
        if !self.cur.keys.is_empty() && self.size + len * 2 > self.max {
            let last = self.cur.keys.last().map(|k| k.key.clone());
            let next = wire::Summary {
                target: self.cur.target,
                bucket: self.cur.bucket,
                after: last.clone(),
                upto: None,
                keys: Vec::new(),
            };
            let mut done = std::mem::replace(&mut self.cur, next);
            done.upto = last;
            self.chunks.push(done);
            self.size = self.cur.encoded_len() + 16 + key.len();
        }
        self.size += len;
        self.cur.keys.push(kv);
    }

    /// The chunks, and the bytes offered.
    fn finish(mut self) -> (Vec<wire::Summary>, usize) {
        self.chunks.push(self.cur);
        (self.chunks, self.offered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReplicaConfig;

    /// Summaries from the key lists equal those of a walk of the store, and the lists stay
    /// right through the writes, deletes and collection that follow their building.
    #[test]
    fn summaries_from_the_key_lists_equal_summaries_by_walk() {
        let now = Instant::now();
        let mut cfg = ReplicaConfig::new(1, 1);
        cfg.buckets = std::num::NonZeroU32::new(8).unwrap_or(std::num::NonZeroU32::MIN);
        // Small messages, so that buckets take several chunks.
        cfg.max_sync_message = 600;
        let mut r = Replica::new(cfg, now);
        let write = |r: &mut Replica, round: usize| {
            for i in 0..2_000 {
                let key = format!("k/{:05}", (i * 7_919 + round * 13) % 10_000);
                if (i + round).is_multiple_of(5) {
                    assert!(r.delete(1_000 + round as u64, key).is_ok());
                } else {
                    assert!(r.put(1_000 + round as u64, key, vec![7u8; i % 40]).is_ok());
                }
            }
        };
        let answers: Vec<(usize, Answer)> = (0..8)
            .filter(|b| b % 3 != 1)
            .map(|b| (b, Answer::Summary))
            .collect();
        let finish = |v: Vec<Option<SummaryChunks>>| -> Vec<Option<(Vec<wire::Summary>, usize)>> {
            v.into_iter()
                .map(|c| c.map(SummaryChunks::finish))
                .collect()
        };
        let compare = |r: &mut Replica| {
            let mut walked: Vec<Option<SummaryChunks>> = (0..r.buckets.len())
                .map(|b| (b % 3 != 1).then(|| SummaryChunks::new(2, b as u32, 600)))
                .collect();
            r.summaries_by_walk(&mut walked);
            let listed = r.summaries(2, &answers);
            let (walked, listed) = (finish(walked), finish(listed));
            assert!(walked.iter().flatten().any(|(chunks, _)| chunks.len() > 2));
            assert_eq!(walked, listed);
        };
        write(&mut r, 0);
        // Builds the lists.
        compare(&mut r);
        // Overwrites, new keys and deletes while the lists live.
        write(&mut r, 1);
        compare(&mut r);
        // Collection of every tombstone (all are past the grace period at this wall clock).
        let later = 1_000 + u64::try_from(r.cfg.tombstone_grace.as_millis()).unwrap_or(0) + 10;
        r.collect_tombstones(later);
        assert!(r.stats.tombstones_collected > 0);
        compare(&mut r);
    }
}
