//! One receive stream: a remote sender's (node, incarnation) sequence as seen by this endpoint.
//!
//! Holds the in-order delivery cursor, complete messages received out of order, partially
//! reassembled fragmented messages, and the NAK timer. Delivery and loss go out through
//! [`Out`] as events.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::proto;
use crate::stats::Stats;
use crate::wire::DropReason;
use crate::{Event, Incarnation, NodeId};

/// Most whole-message ranges one NAK carries.
pub(crate) const MAX_NAK_RANGES: usize = 48;
/// Most partially received messages one NAK carries (the byte budget usually binds first).
pub(crate) const MAX_NAK_PARTIALS: usize = 128;
/// Most missing byte ranges per partially received message in one NAK.
pub(crate) const MAX_NAK_BYTE_RANGES: usize = 24;

/// Memory accounting shared by every stream of an endpoint.
#[derive(Debug)]
pub(crate) struct Budget {
    pub(crate) buffered: usize,
    pub(crate) max_buffered: usize,
    pub(crate) reassembly: usize,
    pub(crate) max_reassembly: usize,
}

/// Where a stream puts what it produces.
pub(crate) struct Out<'a> {
    pub(crate) events: &'a mut VecDeque<Event>,
    pub(crate) stats: &'a mut Stats,
    pub(crate) budget: &'a mut Budget,
    /// Messages and bytes delivered during this call (for early stability heartbeats).
    pub(crate) delivered: (u64, u64),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct NakTimer {
    pub(crate) at: Instant,
    pub(crate) attempts: u32,
}

#[derive(Debug)]
struct Reassembly {
    buf: BytesMut,
    total_len: u32,
    /// Received byte intervals `[start, end)`, sorted and disjoint.
    have: Vec<(u32, u32)>,
    max_end: u32,
}

impl Reassembly {
    /// Returns whether the chunk added any new byte.
    fn insert(&mut self, offset: u32, chunk: &[u8]) -> bool {
        let (start, end) = (offset, offset + chunk.len() as u32);
        if self.have.iter().any(|&(a, b)| a <= start && end <= b) {
            return false;
        }
        self.buf[start as usize..end as usize].copy_from_slice(chunk);
        let mut merged = Vec::with_capacity(self.have.len() + 1);
        let (mut s, mut e) = (start, end);
        for &(a, b) in &self.have {
            if b < s || a > e {
                merged.push((a, b));
            } else {
                s = s.min(a);
                e = e.max(b);
            }
        }
        merged.push((s, e));
        merged.sort_unstable();
        self.have = merged;
        self.max_end = self.max_end.max(end);
        true
    }

    fn complete(&self) -> bool {
        self.have.len() == 1 && self.have[0] == (0, self.total_len)
    }

    /// Byte ranges missing below `limit`.
    fn missing(&self, limit: u32) -> Vec<proto::ByteRange> {
        let mut out = Vec::new();
        let mut cursor = 0u32;
        for &(a, b) in &self.have {
            if a > cursor && cursor < limit {
                out.push(proto::ByteRange {
                    offset: cursor,
                    len: a.min(limit) - cursor,
                });
            }
            cursor = cursor.max(b);
        }
        if cursor < limit {
            out.push(proto::ByteRange {
                offset: cursor,
                len: limit - cursor,
            });
        }
        out.truncate(MAX_NAK_BYTE_RANGES);
        out
    }
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
    /// First sequence number this endpoint took from the stream (0 = not started yet).
    start: u64,
    /// Next sequence number to deliver (0 = not started yet).
    pub(crate) next_expected: u64,
    /// Highest sequence number of which any part was received.
    highest_seen: u64,
    /// Highest sequence number the sender said it transmitted completely.
    sender_highest_sent: u64,
    buffered: BTreeMap<u64, Bytes>,
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

    pub(crate) fn started(&self) -> bool {
        self.next_expected != 0
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
        self.next_expected = seq + 1;
    }

    fn lose(&mut self, first: u64, last: u64, out: &mut Out<'_>) {
        out.stats.lost_events += 1;
        out.stats.lost_messages += last - first + 1;
        out.events.push_back(Event::Lost {
            sender: self.node,
            incarnation: self.incarnation,
            range: first..=last,
        });
        self.next_expected = last + 1;
    }

    /// Delivers buffered messages that have become contiguous.
    fn drain(&mut self, out: &mut Out<'_>) {
        while let Some(entry) = self.buffered.first_entry() {
            if *entry.key() != self.next_expected {
                break;
            }
            let (seq, payload) = entry.remove_entry();
            out.budget.buffered -= payload.len();
            self.deliver(seq, payload, out);
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
            out.budget.reassembly -= r.total_len as usize;
        }
        if seq == self.next_expected {
            self.deliver(seq, payload, out);
            self.drain(out);
            return;
        }
        if self.buffered.contains_key(&seq) {
            out.stats.duplicates += 1;
            return;
        }
        self.buffer(seq, payload, out, false);
    }

    fn buffer(&mut self, seq: u64, payload: Bytes, out: &mut Out<'_>, force: bool) {
        if !force && out.budget.buffered + payload.len() > out.budget.max_buffered {
            out.stats.buffer_full += 1;
            return;
        }
        out.budget.buffered += payload.len();
        self.buffered.insert(seq, payload);
    }

    /// One fragment arrived. The caller has checked `total_len <= max_message_size`.
    ///
    /// # Errors
    ///
    /// [`DropReason::Malformed`] when the fragment is empty, exceeds its message, or
    /// contradicts earlier fragments of the same message.
    pub(crate) fn on_fragment(
        &mut self,
        frag: &proto::Fragment,
        out: &mut Out<'_>,
    ) -> Result<(), DropReason> {
        let end = u64::from(frag.offset) + frag.chunk.len() as u64;
        if frag.seq == 0 || frag.chunk.is_empty() || end > u64::from(frag.total_len) {
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
        if !self.partial.contains_key(&frag.seq) {
            let need = frag.total_len as usize;
            if out.budget.reassembly + need > out.budget.max_reassembly {
                if frag.seq != self.next_expected {
                    out.stats.buffer_full += 1;
                    return Ok(());
                }
                // The message next in line always gets room: evict the farthest ones.
                while out.budget.reassembly + need > out.budget.max_reassembly {
                    let Some((_, evicted)) = self.partial.pop_last() else {
                        break;
                    };
                    out.budget.reassembly -= evicted.total_len as usize;
                }
            }
            out.budget.reassembly += need;
            let reassembly = Reassembly {
                buf: BytesMut::zeroed(need),
                total_len: frag.total_len,
                have: Vec::new(),
                max_end: 0,
            };
            self.partial.insert(frag.seq, reassembly);
        }
        let Some(r) = self.partial.get_mut(&frag.seq) else {
            return Ok(());
        };
        if r.total_len != frag.total_len {
            return Err(DropReason::Malformed);
        }
        if !r.insert(frag.offset, &frag.chunk) {
            out.stats.duplicate_fragments += 1;
            return Ok(());
        }
        if frag.seq < self.highest_seen
            || u64::from(frag.offset) + (frag.chunk.len() as u64) < u64::from(r.max_end)
        {
            self.filled = true;
        }
        if r.complete() {
            let Some(r) = self.partial.remove(&frag.seq) else {
                return Ok(());
            };
            out.budget.reassembly -= r.total_len as usize;
            out.stats.messages_reassembled += 1;
            let payload = r.buf.freeze();
            if frag.seq == self.next_expected {
                self.deliver(frag.seq, payload, out);
                self.drain(out);
            } else {
                self.buffer(frag.seq, payload, out, true);
            }
        }
        Ok(())
    }

    /// The sender says it transmitted everything up to `highest_sent`.
    pub(crate) fn on_highest_sent(&mut self, highest_sent: u64) {
        self.sender_highest_sent = self.sender_highest_sent.max(highest_sent);
    }

    /// The sender can no longer retransmit anything below `low`: deliver what is buffered
    /// below it and report the rest lost.
    pub(crate) fn advance_to(&mut self, low: u64, out: &mut Out<'_>) {
        if !self.started() || low <= self.next_expected {
            return;
        }
        while let Some(entry) = self.buffered.first_entry() {
            if *entry.key() >= low {
                break;
            }
            let (seq, payload) = entry.remove_entry();
            out.budget.buffered -= payload.len();
            if seq > self.next_expected {
                self.lose(self.next_expected, seq - 1, out);
            }
            self.deliver(seq, payload, out);
        }
        if self.next_expected < low {
            self.lose(self.next_expected, low - 1, out);
        }
        while let Some(entry) = self.partial.first_entry() {
            if *entry.key() >= low {
                break;
            }
            out.budget.reassembly -= entry.remove().total_len as usize;
        }
        self.highest_seen = self.highest_seen.max(low - 1);
        self.drain(out);
    }

    /// The stream is over (sender left or restarted): settle everything known.
    pub(crate) fn finish(&mut self, out: &mut Out<'_>) {
        let end = self.highest_seen.max(self.sender_highest_sent);
        if self.started() && end < u64::MAX {
            self.advance_to(end + 1, out);
        }
        for (_, payload) in std::mem::take(&mut self.buffered) {
            out.budget.buffered -= payload.len();
        }
        for (_, r) in std::mem::take(&mut self.partial) {
            out.budget.reassembly -= r.total_len as usize;
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
        let in_ranges = |first: u64, last: u64| {
            nak.ranges
                .iter()
                .any(|r| r.first <= first && last <= r.last)
        };
        mine.ranges.iter().all(|r| in_ranges(r.first, r.last))
            && mine
                .partial
                .iter()
                .all(|p| in_ranges(p.seq, p.seq) || nak.partial.iter().any(|q| q.seq == p.seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out_parts() -> (VecDeque<Event>, Stats, Budget) {
        (
            VecDeque::new(),
            Stats::default(),
            Budget {
                buffered: 0,
                max_buffered: 1 << 20,
                reassembly: 0,
                max_reassembly: 1 << 20,
            },
        )
    }

    #[test]
    fn missing_lists_gaps_between_buffered() {
        let (mut ev, mut st, mut b) = out_parts();
        let mut out = Out {
            events: &mut ev,
            stats: &mut st,
            budget: &mut b,
            delivered: (0, 0),
        };
        let mut s = RecvStream::new(NodeId(1), Incarnation(1));
        for seq in [1, 4, 5, 8] {
            s.on_message(seq, Bytes::from_static(b"x"), &mut out);
        }
        s.on_highest_sent(10);
        let m = s.missing(0, usize::MAX);
        let ranges: Vec<(u64, u64)> = m.ranges.iter().map(|r| (r.first, r.last)).collect();
        assert_eq!(ranges, vec![(2, 3), (6, 7), (9, 10)]);
        assert_eq!(out.budget.buffered, 3);
        s.advance_to(7, &mut out);
        // 2-3 lost, 4 and 5 delivered, 6 lost; 7 still missing.
        assert_eq!(s.next_expected, 7);
        assert_eq!(out.budget.buffered, 1);
        assert_eq!(st.lost_messages, 3);
    }

    #[test]
    fn partial_missing_respects_in_flight_tail() {
        let (mut ev, mut st, mut b) = out_parts();
        let mut out = Out {
            events: &mut ev,
            stats: &mut st,
            budget: &mut b,
            delivered: (0, 0),
        };
        let mut s = RecvStream::new(NodeId(1), Incarnation(1));
        let frag = |offset: u32| proto::Fragment {
            seq: 3,
            total_len: 100,
            offset,
            chunk: Bytes::from(vec![1u8; 10]),
        };
        s.on_fragment(&frag(0), &mut out).unwrap();
        s.on_fragment(&frag(20), &mut out).unwrap();
        // Only bytes 10..20 are known missing while the message is still in flight.
        let m = s.missing(0, usize::MAX);
        assert!(m.ranges.is_empty());
        assert_eq!(
            m.partial[0].missing,
            vec![proto::ByteRange {
                offset: 10,
                len: 10
            }]
        );
        s.on_highest_sent(3);
        let m = s.missing(0, usize::MAX);
        assert_eq!(
            m.partial[0].missing,
            vec![
                proto::ByteRange {
                    offset: 10,
                    len: 10
                },
                proto::ByteRange {
                    offset: 30,
                    len: 70
                }
            ]
        );
        assert_eq!(
            s.on_fragment(
                &proto::Fragment {
                    total_len: 99,
                    ..frag(40)
                },
                &mut out
            ),
            Err(DropReason::Malformed)
        );
    }
}
