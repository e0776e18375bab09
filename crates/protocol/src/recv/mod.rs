//! One receive stream: a remote sender's (node, incarnation) sequence as seen by this endpoint.
//!
//! Holds the in-order delivery cursor, complete messages received out of order, partially
//! reassembled fragmented messages, and the NAK timer. Delivery and loss go out through
//! [`Out`] as events. Everything a stream holds is charged to the endpoint's one receive
//! [`Budget`] ([`budget`]); fragmented messages are put together by [`reassembly`]. The
//! endpoint decides whose held data gives way when it is full (see
//! `Endpoint::make_room`), a stream only refuses what does not fit.

mod budget;
mod reassembly;

pub use budget::SENDER_OVERHEAD;
pub(crate) use budget::{Budget, REASSEMBLY_OVERHEAD, keep_charge};

use std::collections::btree_map::Entry as MapEntry;
use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;

use crate::proto;
use crate::stats::Stats;
use crate::wire::DropReason;
use crate::{Event, Incarnation, NodeId};

use budget::{Held, keep};
use reassembly::{Inserted, Reassembly};

/// Most whole-message ranges one NAK carries.
pub(crate) const MAX_NAK_RANGES: usize = 48;
/// Most partially received messages one NAK carries (the byte budget usually binds first).
pub(crate) const MAX_NAK_PARTIALS: usize = 128;
/// Most missing byte ranges per partially received message in one NAK.
pub(crate) const MAX_NAK_BYTE_RANGES: usize = 24;

/// Highest usable sequence number. `u64::MAX` is never a message (a `Data` frame's last seq
/// must not overflow, a fragment at `u64::MAX` is malformed), so `seq + 1` never overflows.
pub(crate) const MAX_SEQ: u64 = u64::MAX - 1;

/// How established a stream's sender is. Members rank below candidates, older below newer;
/// when the budget is full, the highest ranks give way first.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default)]
pub(crate) struct Rank {
    /// Member or still on probation.
    pub(crate) standing: Standing,
    /// When it became what it is (a counter: larger = newer).
    pub(crate) order: u64,
}

/// Whether a stream's sender is a member or on probation. Members rank below candidates.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default)]
pub(crate) enum Standing {
    /// Passed probation.
    #[default]
    Member,
    /// Still on probation.
    Candidate,
}

/// Whether a stream delivers what it receives.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Delivery {
    /// In order, as it becomes contiguous.
    Flowing,
    /// Not yet: the sender is on probation, so every message is held, and the retention floor
    /// heard meanwhile waits in `held_low`.
    Held,
}

/// Where a stream puts what it produces.
pub(crate) struct Out<'a> {
    pub(crate) events: &'a mut VecDeque<Event>,
    pub(crate) stats: &'a mut Stats,
    pub(crate) budget: &'a mut Budget,
    /// Messages and bytes delivered during this call (for early stability heartbeats).
    pub(crate) delivered: (u64, u64),
    /// Size of the buffer the current frame's byte fields share (the datagram body): what a
    /// held zero-copy slice of it pins.
    pub(crate) shared: usize,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct NakTimer {
    pub(crate) at: Instant,
    pub(crate) attempts: u32,
}

/// What a stream is missing, ready to go in a NAK.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Missing {
    pub(crate) ranges: Vec<proto::SeqRange>,
    pub(crate) partial: Vec<proto::PartialNak>,
    /// Highest sequence number this list accounts for (everything missing up to it is in it).
    pub(crate) upto: u64,
}

/// Encoded size of one repeated NAK entry: the entry, its tag and its length prefix.
fn entry_len(m: &impl prost::Message) -> usize {
    let len = m.encoded_len();
    len + 1 + prost::length_delimiter_len(len)
}

impl Missing {
    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty() && self.partial.is_empty()
    }
}

#[derive(Debug)]
pub(crate) struct RecvStream {
    pub(crate) node: NodeId,
    pub(crate) incarnation: Incarnation,
    /// How established the sender is (set by the endpoint).
    pub(crate) rank: Rank,
    /// Flowing, or held while the sender is on probation.
    delivery: Delivery,
    held_low: u64,
    /// Bytes charged for `buffered` and `partial`.
    held: usize,
    /// First sequence number this endpoint took from the stream (0 = not started yet).
    start: u64,
    /// Next sequence number to deliver (0 = not started yet).
    pub(crate) next_expected: u64,
    /// Highest sequence number of which any part was received.
    highest_seen: u64,
    /// Highest sequence number the sender said it transmitted completely.
    sender_highest_sent: u64,
    buffered: BTreeMap<u64, Held>,
    partial: BTreeMap<u64, Reassembly>,
    pub(crate) nak: Option<NakTimer>,
    /// Highest sequence number a NAK of this endpoint has asked for so far.
    pub(crate) naked_upto: u64,
    /// When the last NAK's retry (of everything still missing) is due; a NAK before it asks
    /// only for gaps above [`RecvStream::naked_upto`].
    pub(crate) retry_at: Option<Instant>,
    /// Set when a message filled a gap (a repair or a late arrival): NAKs are being
    /// answered, so the NAK backoff restarts.
    pub(crate) filled: bool,
}

impl RecvStream {
    pub(crate) fn new(node: NodeId, incarnation: Incarnation) -> RecvStream {
        RecvStream {
            node,
            incarnation,
            rank: Rank::default(),
            delivery: Delivery::Flowing,
            held_low: 0,
            held: 0,
            start: 0,
            next_expected: 0,
            highest_seen: 0,
            sender_highest_sent: 0,
            buffered: BTreeMap::new(),
            partial: BTreeMap::new(),
            nak: None,
            naked_upto: 0,
            retry_at: None,
            filled: false,
        }
    }

    /// A stream of a sender on probation: it holds everything and delivers nothing until
    /// [`RecvStream::release`].
    pub(crate) fn held(node: NodeId, incarnation: Incarnation, rank: Rank) -> RecvStream {
        RecvStream {
            rank,
            delivery: Delivery::Held,
            ..RecvStream::new(node, incarnation)
        }
    }

    pub(crate) fn started(&self) -> bool {
        self.next_expected != 0
    }

    /// Whether this stream holds everything (its sender is on probation).
    pub(crate) fn holding(&self) -> bool {
        self.delivery == Delivery::Held
    }

    /// Bytes this stream has charged to the budget.
    pub(crate) fn held_bytes(&self) -> usize {
        self.held
    }

    /// Begins the stream at `seq` if it has not begun yet.
    pub(crate) fn start_at(&mut self, seq: u64) {
        if !self.started() {
            let seq = seq.max(1);
            self.start = seq;
            self.next_expected = seq;
            self.highest_seen = seq - 1;
        }
    }

    /// Highest sequence number delivered in order (or reported lost).
    pub(crate) fn delivered_up_to(&self) -> u64 {
        self.next_expected.saturating_sub(1)
    }

    /// Whether anything known to exist is not delivered yet.
    pub(crate) fn has_gap(&self) -> bool {
        self.started() && self.next_expected <= self.highest_seen.max(self.sender_highest_sent)
    }

    /// Whether something known to exist is beyond what the last NAK asked for (a new loss).
    pub(crate) fn has_new_gap(&self) -> bool {
        self.has_gap() && self.highest_seen.max(self.sender_highest_sent) > self.naked_upto
    }

    fn deliver(&mut self, seq: u64, payload: Bytes, out: &mut Out<'_>) {
        out.delivered.0 += 1;
        out.delivered.1 += payload.len() as u64;
        out.stats.messages_delivered += 1;
        out.events.push_back(Event::Delivered {
            sender: self.node,
            incarnation: self.incarnation,
            seq,
            payload,
        });
        // seq <= MAX_SEQ: no overflow (saturating all the same).
        self.next_expected = seq.saturating_add(1);
    }

    fn lose(&mut self, first: u64, last: u64, out: &mut Out<'_>) {
        out.stats.lost_events += 1;
        out.stats.lost_messages += last - first + 1;
        out.events.push_back(Event::Lost {
            sender: self.node,
            incarnation: self.incarnation,
            range: first..=last,
        });
        // last < the retention floor <= u64::MAX: no overflow (saturating all the same).
        self.next_expected = last.saturating_add(1);
    }

    fn unhold(&mut self, charge: usize, out: &mut Out<'_>) {
        self.held -= charge;
        out.budget.release(charge);
    }

    /// Delivers buffered messages that have become contiguous.
    fn drain(&mut self, out: &mut Out<'_>) {
        if self.holding() {
            return;
        }
        while let Some(entry) = self.buffered.first_entry() {
            if *entry.key() != self.next_expected {
                break;
            }
            let (seq, held) = entry.remove_entry();
            self.unhold(held.charge, out);
            self.deliver(seq, held.payload, out);
        }
    }

    /// One complete message arrived.
    pub(crate) fn on_message(&mut self, seq: u64, payload: Bytes, out: &mut Out<'_>) {
        self.start_at(seq);
        if seq < self.highest_seen {
            self.filled = true;
        }
        self.highest_seen = self.highest_seen.max(seq);
        if seq < self.next_expected {
            if seq < self.start {
                out.stats.before_start += 1;
            } else {
                out.stats.duplicates += 1;
            }
            return;
        }
        if let Some(r) = self.partial.remove(&seq) {
            self.unhold(r.charge, out);
        }
        if seq == self.next_expected && !self.holding() {
            self.deliver(seq, payload, out);
            self.drain(out);
            return;
        }
        if self.buffered.contains_key(&seq) {
            out.stats.duplicates += 1;
            return;
        }
        let (payload, charge) = keep(payload, out.shared);
        self.buffer(seq, Held { payload, charge }, out);
    }

    fn buffer(&mut self, seq: u64, held: Held, out: &mut Out<'_>) {
        if !out.budget.try_charge(held.charge) {
            out.stats.buffer_full += 1;
            return;
        }
        self.held += held.charge;
        self.buffered.insert(seq, held);
    }

    /// One fragment arrived. The caller has checked `total_len <= max_message_size`.
    ///
    /// # Errors
    ///
    /// [`DropReason::Malformed`] when the fragment is empty, exceeds its message, is at
    /// `u64::MAX`, or contradicts earlier fragments of the same message.
    pub(crate) fn on_fragment(
        &mut self,
        frag: &proto::Fragment,
        out: &mut Out<'_>,
    ) -> Result<(), DropReason> {
        let end = u64::from(frag.offset) + frag.chunk.len() as u64;
        if frag.seq == 0
            || frag.seq > MAX_SEQ
            || frag.chunk.is_empty()
            || end > u64::from(frag.total_len)
        {
            return Err(DropReason::Malformed);
        }
        self.start_at(frag.seq);
        if frag.seq < self.next_expected || self.buffered.contains_key(&frag.seq) {
            if frag.seq < self.start {
                out.stats.before_start += 1;
            } else {
                out.stats.duplicate_fragments += 1;
            }
            return Ok(());
        }
        self.highest_seen = self.highest_seen.max(frag.seq);
        let r = match self.partial.entry(frag.seq) {
            MapEntry::Occupied(o) => o.into_mut(),
            MapEntry::Vacant(v) => {
                let need = REASSEMBLY_OVERHEAD + keep_charge(frag.chunk.len(), out.shared);
                if !out.budget.fits(need) {
                    out.stats.buffer_full += 1;
                    return Ok(());
                }
                out.budget.try_charge(REASSEMBLY_OVERHEAD);
                self.held += REASSEMBLY_OVERHEAD;
                v.insert(Reassembly::new(frag.total_len))
            }
        };
        if r.total_len != frag.total_len {
            return Err(DropReason::Malformed);
        }
        match r.insert(frag.offset, frag.chunk.clone(), out.shared, out.budget) {
            Inserted::Duplicate => {
                out.stats.duplicate_fragments += 1;
                return Ok(());
            }
            Inserted::NoRoom => {
                out.stats.buffer_full += 1;
                if r.received == 0 {
                    // Only just made for this chunk: give its room back.
                    self.partial.remove(&frag.seq);
                    self.unhold(REASSEMBLY_OVERHEAD, out);
                }
                return Ok(());
            }
            Inserted::Added { added, released } => {
                self.held = self.held + added - released;
            }
        }
        if frag.seq < self.highest_seen || end < u64::from(r.max_end) {
            self.filled = true;
        }
        if r.complete() {
            let Some(r) = self.partial.remove(&frag.seq) else {
                return Ok(());
            };
            self.unhold(r.charge, out);
            out.stats.messages_reassembled += 1;
            let (payload, charge) = r.assemble();
            if frag.seq == self.next_expected && !self.holding() {
                self.deliver(frag.seq, payload, out);
                self.drain(out);
            } else {
                // Always fits: it is charged no more than the chunks just released.
                self.buffer(frag.seq, Held { payload, charge }, out);
            }
        }
        Ok(())
    }

    /// The sender says it transmitted everything up to `highest_sent`.
    pub(crate) fn on_highest_sent(&mut self, highest_sent: u64) {
        self.sender_highest_sent = self.sender_highest_sent.max(highest_sent.min(MAX_SEQ));
    }

    /// The sender can no longer retransmit anything below `low`: deliver what is buffered
    /// below it and report the rest lost. While the stream holds (probation), the floor is
    /// remembered and applied on [`RecvStream::release`].
    pub(crate) fn advance_to(&mut self, low: u64, out: &mut Out<'_>) {
        if self.holding() {
            self.held_low = self.held_low.max(low);
            return;
        }
        if !self.started() || low <= self.next_expected {
            return;
        }
        while let Some(entry) = self.buffered.first_entry() {
            if *entry.key() >= low {
                break;
            }
            let (seq, held) = entry.remove_entry();
            self.unhold(held.charge, out);
            if seq > self.next_expected {
                self.lose(self.next_expected, seq - 1, out);
            }
            self.deliver(seq, held.payload, out);
        }
        if self.next_expected < low {
            self.lose(self.next_expected, low - 1, out);
        }
        while let Some(entry) = self.partial.first_entry() {
            if *entry.key() >= low {
                break;
            }
            let charge = entry.remove().charge;
            self.unhold(charge, out);
        }
        self.highest_seen = self.highest_seen.max(low - 1);
        self.drain(out);
    }

    /// The sender passed probation: deliver what was held, in order, then apply the retention
    /// floor heard meanwhile.
    pub(crate) fn release(&mut self, out: &mut Out<'_>) {
        self.delivery = Delivery::Flowing;
        self.drain(out);
        let low = std::mem::take(&mut self.held_low);
        self.advance_to(low, out);
    }

    /// The stream is over (sender left or restarted): settle everything known.
    pub(crate) fn finish(&mut self, out: &mut Out<'_>) {
        let end = self.highest_seen.max(self.sender_highest_sent);
        if self.started() && !self.holding() && end < u64::MAX {
            self.advance_to(end + 1, out);
        }
        self.discard(out);
    }

    /// Drops everything held, without events.
    pub(crate) fn discard(&mut self, out: &mut Out<'_>) {
        for (_, held) in std::mem::take(&mut self.buffered) {
            self.unhold(held.charge, out);
        }
        for (_, r) in std::mem::take(&mut self.partial) {
            self.unhold(r.charge, out);
        }
    }

    /// Drops held messages and partial reassemblies with a sequence number above `above`,
    /// farthest first, until `need` bytes fit the budget. Each one dropped is counted in
    /// `receive_evicted`; what a member stream loses this way is NAKed again later.
    pub(crate) fn evict_above(&mut self, above: u64, need: usize, out: &mut Out<'_>) {
        while !out.budget.fits(need) {
            let buffered = self.buffered.last_key_value().map(|(s, _)| *s);
            let partial = self.partial.last_key_value().map(|(s, _)| *s);
            let charge = match (buffered, partial) {
                (Some(b), p) if b > above && p.is_none_or(|p| b > p) => {
                    self.buffered.pop_last().map(|(_, h)| h.charge)
                }
                (_, Some(p)) if p > above => self.partial.pop_last().map(|(_, r)| r.charge),
                _ => None,
            };
            let Some(charge) = charge else { break };
            self.unhold(charge, out);
            out.stats.receive_evicted += 1;
        }
    }

    /// What to ask for in a NAK: what is missing from `from` on (at least from the delivery
    /// cursor), in at most `budget` encoded bytes of ranges. [`Missing::upto`] says how far
    /// the list got.
    pub(crate) fn missing(&self, from: u64, budget: usize) -> Missing {
        let mut missing = Missing::default();
        if !self.has_gap() {
            return missing;
        }
        let end = self.highest_seen.max(self.sender_highest_sent);
        let mut cursor = self.next_expected.max(from);
        let mut used = 0usize;
        missing.upto = end;
        let mut held = self.buffered.range(cursor..).map(|(s, _)| *s).peekable();
        let mut partial = self.partial.range(cursor..).peekable();
        while cursor <= end {
            let next_buffered = held.peek().copied();
            let next_partial = partial.peek().map(|(s, _)| **s);
            let next_held = match (next_buffered, next_partial) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let gap_end = next_held.map_or(end, |h| h.saturating_sub(1).min(end));
            if next_held != Some(cursor) && cursor <= gap_end {
                let range = proto::SeqRange {
                    first: cursor,
                    last: gap_end,
                };
                used += entry_len(&range);
                if missing.ranges.len() == MAX_NAK_RANGES || used > budget {
                    missing.upto = cursor - 1;
                    break;
                }
                missing.ranges.push(range);
            }
            let Some(held_seq) = next_held else { break };
            if next_partial == Some(held_seq) {
                if let Some((seq, r)) = partial.next() {
                    let fully_sent = *seq < self.highest_seen || *seq <= self.sender_highest_sent;
                    let limit = if fully_sent { r.total_len } else { r.max_end };
                    let bytes = r.missing(limit);
                    if *seq >= cursor && !bytes.is_empty() {
                        let nak = proto::PartialNak {
                            seq: *seq,
                            missing: bytes,
                        };
                        used += entry_len(&nak);
                        if missing.partial.len() == MAX_NAK_PARTIALS || used > budget {
                            missing.upto = seq - 1;
                            break;
                        }
                        missing.partial.push(nak);
                    }
                }
            } else {
                held.next();
            }
            if held_seq == u64::MAX {
                break;
            }
            cursor = held_seq + 1;
        }
        missing
    }

    /// Whether a NAK heard from another receiver asks for everything this stream misses.
    pub(crate) fn covered_by(&self, nak: &proto::Nak) -> bool {
        let mine = self.missing(0, usize::MAX);
        if mine.is_empty() {
            return false;
        }
        // Only as much of the NAK as this implementation ever sends is looked at: a NAK with
        // thousands of entries costs no more than one with the usual few.
        let ranges = &nak.ranges[..nak.ranges.len().min(MAX_NAK_RANGES)];
        let partial = &nak.partial[..nak.partial.len().min(MAX_NAK_PARTIALS)];
        let in_ranges =
            |first: u64, last: u64| ranges.iter().any(|r| r.first <= first && last <= r.last);
        mine.ranges.iter().all(|r| in_ranges(r.first, r.last))
            && mine
                .partial
                .iter()
                .all(|p| in_ranges(p.seq, p.seq) || partial.iter().any(|q| q.seq == p.seq))
    }
}

#[cfg(test)]
mod tests;
