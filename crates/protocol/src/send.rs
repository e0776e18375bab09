//! This endpoint's own stream: the send window (queued + retained messages), first
//! transmission (batching and fragmentation) and repairs.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::proto;
use crate::wire::{self, DATA_OVERHEAD, FRAGMENT_OVERHEAD, Header};

/// Most whole-message ranges of one NAK looked at (this implementation sends at most 48).
pub(crate) const NAK_RANGES_TAKEN: usize = 64;
/// Most partial-message entries of one NAK looked at (this implementation sends at most 128).
pub(crate) const NAK_PARTIALS_TAKEN: usize = 128;
/// Most byte ranges of one partial-message entry looked at (this implementation sends 24).
pub(crate) const NAK_BYTE_RANGES_TAKEN: usize = 32;
/// Most messages one NAK's ranges make the sender look at.
pub(crate) const NAK_MESSAGES_TAKEN: u64 = 4096;
/// Most byte ranges kept for one pending partial repair; beyond, the whole message is resent.
const MAX_PARTS: usize = 64;

#[derive(Debug)]
struct Entry {
    payload: Bytes,
    /// When queued, then when its transmission completed.
    at: Instant,
    /// When it was last repaired.
    last_repair: Option<Instant>,
    /// A repair of it waits in the repair queue.
    queued: bool,
}

/// What [`SendWindow::on_nak`] did with one NAK.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NakAnswer {
    /// Some of it asked for messages no longer retained.
    pub(crate) beyond: bool,
    /// Upper bound of the bytes the repairs it added will take on the wire.
    pub(crate) charged: u64,
    /// Messages it asked for that were not taken because the allowance ran out.
    pub(crate) refused: u64,
    /// Entries past the per-NAK caps, not looked at.
    pub(crate) ignored: u64,
}

/// What a repair must resend of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    Whole,
    /// Byte ranges `[start, end)` of a fragmented message.
    Parts(Vec<(u32, u32)>),
}

#[derive(Debug)]
struct RepairItem {
    seq: u64,
    want: Want,
    /// Next fragment offset to consider.
    cursor: u32,
}

/// Whether small queued messages wait for company.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Batching {
    /// A batch that is not full waits up to `batch_delay` while the stream is busy.
    Wait,
    /// Everything queued is due at once (the endpoint is closing).
    Flush,
}

/// What one first-transmission datagram carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    Batch { messages: usize },
    Fragment,
}

#[derive(Debug)]
pub(crate) struct SendWindow {
    header: Header,
    mtu: usize,
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`.
    low: u64,
    bytes: usize,
    /// Next sequence number to transmit for the first time.
    next_tx: u64,
    /// Bytes of `next_tx` already sent as fragments.
    frag_offset: u32,
    /// NAKed messages gathered during the hold-off.
    pending_repairs: BTreeMap<u64, Want>,
    pub(crate) repair_deadline: Option<Instant>,
    repairs: VecDeque<RepairItem>,
    /// When the last first-transmission datagram left (batching waits only while busy).
    last_data: Option<Instant>,
}

impl SendWindow {
    pub(crate) fn new(header: Header, mtu: usize) -> SendWindow {
        SendWindow {
            header,
            mtu,
            entries: VecDeque::new(),
            low: 1,
            bytes: 0,
            next_tx: 1,
            frag_offset: 0,
            pending_repairs: BTreeMap::new(),
            repair_deadline: None,
            repairs: VecDeque::new(),
            last_data: None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Lowest retained (retransmittable or not yet sent) sequence number.
    pub(crate) fn low(&self) -> u64 {
        self.low
    }

    /// Highest sequence number completely transmitted.
    pub(crate) fn highest_sent(&self) -> u64 {
        self.next_tx - 1
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.low + self.entries.len() as u64
    }

    /// Payload bytes of the retained messages in `first..=last` that were transmitted
    /// (nothing for what was trimmed or not sent yet).
    pub(crate) fn sent_bytes_between(&self, first: u64, last: u64) -> u64 {
        let first = first.max(self.low);
        let last = last.min(self.highest_sent());
        if first > last {
            return 0;
        }
        let (Ok(a), Ok(b)) = (
            usize::try_from(first - self.low),
            usize::try_from(last - self.low),
        ) else {
            return 0;
        };
        self.entries
            .range(a..=b.min(self.entries.len().saturating_sub(1)))
            .map(|e| e.payload.len() as u64)
            .sum()
    }

    fn entry(&self, seq: u64) -> Option<&Entry> {
        self.entries
            .get(usize::try_from(seq.checked_sub(self.low)?).ok()?)
    }

    fn entry_mut(&mut self, seq: u64) -> Option<&mut Entry> {
        self.entries
            .get_mut(usize::try_from(seq.checked_sub(self.low)?).ok()?)
    }

    /// Queues a message; returns its sequence number.
    pub(crate) fn push(&mut self, payload: Bytes, now: Instant) -> u64 {
        let seq = self.next_seq();
        self.bytes += payload.len();
        self.entries.push_back(Entry {
            payload,
            at: now,
            last_repair: None,
            queued: false,
        });
        seq
    }

    fn is_small(&self, len: usize) -> bool {
        DATA_OVERHEAD + wire::message_cost(len) <= self.mtu
    }

    fn chunk_size(&self) -> usize {
        self.mtu - FRAGMENT_OVERHEAD
    }

    /// Whether unsent data exists and the datagram it would make is due now: a fragment, a
    /// full batch, a batch whose oldest message waited `batch_delay`, or anything with
    /// [`Batching::Flush`].
    pub(crate) fn data_due(&self, now: Instant, batch_delay: Duration, batching: Batching) -> bool {
        match self.data_deadline(batch_delay, batching) {
            Some(at) => at <= now,
            None => false,
        }
    }

    /// When unsent data becomes due (`None` if there is none). A datagram that is already due
    /// reports the time it was queued. A batch that is not full goes `batch_delay` after the
    /// previous data datagram (at most one partial batch per `batch_delay`), or at once when
    /// that has passed: small messages wait for company only while the stream is busy.
    pub(crate) fn data_deadline(
        &self,
        batch_delay: Duration,
        batching: Batching,
    ) -> Option<Instant> {
        let first = self.entry(self.next_tx)?;
        if batching == Batching::Flush
            || !self.is_small(first.payload.len())
            || self.frag_offset > 0
        {
            return Some(first.at);
        }
        let mut size = DATA_OVERHEAD;
        for seq in self.next_tx..self.next_seq() {
            let entry = self.entry(seq)?;
            if !self.is_small(entry.payload.len()) {
                return Some(first.at);
            }
            size += wire::message_cost(entry.payload.len());
            if size > self.mtu {
                return Some(first.at);
            }
        }
        let busy_until = self.last_data.map_or(first.at, |t| t + batch_delay);
        Some(first.at.max(busy_until))
    }

    /// Builds the next first-transmission datagram, which the caller has checked is due.
    pub(crate) fn build_data(&mut self, now: Instant) -> Option<(Bytes, Sent)> {
        self.last_data = Some(now);
        let first_seq = self.next_tx;
        let first_len = self.entry(first_seq)?.payload.len();
        if !self.is_small(first_len) {
            let chunk = self.chunk_size();
            let entry = self.entry(first_seq)?;
            let start = self.frag_offset as usize;
            let end = (start + chunk).min(first_len);
            let datagram = wire::encode_fragment(
                &self.header,
                first_seq,
                first_len as u32,
                start as u32,
                &entry.payload[start..end],
                None,
            );
            if end == first_len {
                self.frag_offset = 0;
                self.next_tx += 1;
                if let Some(entry) = self.entry_mut(first_seq) {
                    entry.at = now;
                }
            } else {
                self.frag_offset = end as u32;
            }
            return Some((datagram, Sent::Fragment));
        }
        let mut size = DATA_OVERHEAD;
        let mut count = 0usize;
        for seq in first_seq..self.next_seq() {
            let len = self.entry(seq)?.payload.len();
            let cost = wire::message_cost(len);
            if !self.is_small(len) || size + cost > self.mtu {
                break;
            }
            size += cost;
            count += 1;
        }
        let start = usize::try_from(first_seq - self.low).ok()?;
        let datagram = wire::encode_data(
            &self.header,
            first_seq,
            self.entries.range(start..start + count).map(|e| &e.payload),
            None,
        );
        for entry in self.entries.range_mut(start..start + count) {
            entry.at = now;
        }
        self.next_tx += count as u64;
        Some((datagram, Sent::Batch { messages: count }))
    }

    /// Releases transmitted messages up to `upto` (stable); returns how many.
    pub(crate) fn trim_stable(&mut self, upto: u64) -> u64 {
        let mut trimmed = 0;
        while self.low <= upto && self.low < self.next_tx {
            self.pop_front();
            trimmed += 1;
        }
        trimmed
    }

    /// Releases transmitted messages older than `max_age`; returns how many.
    pub(crate) fn trim_age(&mut self, now: Instant, max_age: Duration) -> u64 {
        let mut trimmed = 0;
        while self.low < self.next_tx {
            match self.entries.front() {
                Some(e) if e.at + max_age <= now => {
                    self.pop_front();
                    trimmed += 1;
                }
                _ => break,
            }
        }
        trimmed
    }

    /// When [`SendWindow::trim_age`] will next release something.
    pub(crate) fn age_deadline(&self, max_age: Duration) -> Option<Instant> {
        if self.low < self.next_tx {
            self.entries.front().map(|e| e.at + max_age)
        } else {
            None
        }
    }

    fn pop_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= e.payload.len();
            self.low += 1;
        }
    }

    /// Records a NAK for this stream, spending at most `allowance` bytes of repairs on it.
    ///
    /// Work is O(ranges + partial entries + messages taken), never O(window) per range:
    /// ranges are clamped to the retained window, then sorted and merged, and at most
    /// [`NAK_RANGES_TAKEN`] ranges, [`NAK_PARTIALS_TAKEN`] partial entries (of at most
    /// [`NAK_BYTE_RANGES_TAKEN`] byte ranges) and [`NAK_MESSAGES_TAKEN`] messages are looked
    /// at. A message already waiting for its repair, or repaired less than `holdoff` ago, is
    /// not taken again (whoever asks): each message is repaired at most once per hold-off.
    pub(crate) fn on_nak(
        &mut self,
        nak: &proto::Nak,
        now: Instant,
        holdoff: Duration,
        allowance: u64,
    ) -> NakAnswer {
        let mut answer = NakAnswer::default();
        let mut left = allowance;
        let high = self.highest_sent();
        let taken = nak.ranges.len().min(NAK_RANGES_TAKEN);
        answer.ignored += (nak.ranges.len() - taken) as u64;
        let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(taken);
        for range in &nak.ranges[..taken] {
            if range.first > range.last {
                continue;
            }
            if range.first < self.low {
                answer.beyond = true;
            }
            let (first, last) = (range.first.max(self.low), range.last.min(high));
            if first <= last {
                ranges.push((first, last));
            }
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (first, last) in ranges {
            match merged.last_mut() {
                Some(prev) if first <= prev.1.saturating_add(1) => prev.1 = prev.1.max(last),
                _ => merged.push((first, last)),
            }
        }
        let mut examined = 0u64;
        'ranges: for (first, last) in merged {
            for seq in first..=last {
                if examined == NAK_MESSAGES_TAKEN {
                    answer.ignored += 1;
                    break 'ranges;
                }
                examined += 1;
                if !self.request(seq, Want::Whole, now, holdoff, &mut left) {
                    answer.refused += 1;
                    break 'ranges;
                }
            }
        }
        let taken = nak.partial.len().min(NAK_PARTIALS_TAKEN);
        answer.ignored += (nak.partial.len() - taken) as u64;
        for partial in &nak.partial[..taken] {
            if partial.seq < self.low {
                answer.beyond = true;
                continue;
            }
            if partial.seq > high {
                continue;
            }
            let byte_ranges = partial.missing.len().min(NAK_BYTE_RANGES_TAKEN);
            answer.ignored += (partial.missing.len() - byte_ranges) as u64;
            let parts: Vec<(u32, u32)> = partial.missing[..byte_ranges]
                .iter()
                .filter(|r| r.len > 0)
                .map(|r| (r.offset, r.offset.saturating_add(r.len)))
                .collect();
            if parts.is_empty() {
                continue;
            }
            if !self.request(partial.seq, Want::Parts(parts), now, holdoff, &mut left) {
                answer.refused += 1;
                break;
            }
        }
        if !self.pending_repairs.is_empty() && self.repair_deadline.is_none() {
            self.repair_deadline = Some(now + holdoff);
        }
        answer.charged = allowance - left;
        answer
    }

    /// Adds `want` of message `seq` to the pending repairs if its cost fits in `left`
    /// (spending it). Returns `false` only when the allowance ran out.
    fn request(
        &mut self,
        seq: u64,
        want: Want,
        now: Instant,
        holdoff: Duration,
        left: &mut u64,
    ) -> bool {
        let Some(entry) = self.entry(seq) else {
            return true;
        };
        if entry.queued || entry.last_repair.is_some_and(|t| now < t + holdoff) {
            return true;
        }
        let len = entry.payload.len();
        let old = self.pending_repairs.get(&seq);
        let merged = match (old, want) {
            (Some(Want::Whole), _) | (_, Want::Whole) => Want::Whole,
            (None, Want::Parts(parts)) => normalize(parts, len),
            (Some(Want::Parts(have)), Want::Parts(parts)) => {
                normalize(have.iter().copied().chain(parts).collect(), len)
            }
        };
        if let Want::Parts(parts) = &merged
            && parts.is_empty()
        {
            return true;
        }
        let before = old.map_or(0, |w| self.repair_cost(w, len));
        let cost = self.repair_cost(&merged, len).saturating_sub(before);
        if cost > *left {
            return false;
        }
        *left -= cost;
        self.pending_repairs.insert(seq, merged);
        true
    }

    /// Upper bound of the bytes repairing `want` of a message of `len` bytes puts on the wire.
    fn repair_cost(&self, want: &Want, len: usize) -> u64 {
        if self.is_small(len) {
            return (DATA_OVERHEAD + wire::message_cost(len)) as u64;
        }
        let chunk = self.chunk_size();
        let per = (chunk + FRAGMENT_OVERHEAD) as u64;
        match want {
            Want::Whole => (len + len.div_ceil(chunk) * FRAGMENT_OVERHEAD) as u64,
            Want::Parts(parts) => {
                // Distinct fragments the (sorted, disjoint) parts overlap.
                let mut count = 0u64;
                let mut last_counted: Option<usize> = None;
                for &(a, b) in parts {
                    let first = a as usize / chunk;
                    let last = (b as usize - 1) / chunk;
                    let from = last_counted.map_or(first, |l| first.max(l + 1));
                    if from <= last {
                        count += (last - from + 1) as u64;
                        last_counted = Some(last);
                    }
                }
                count * per
            }
        }
    }

    /// The hold-off is over: queue the gathered repairs for transmission.
    pub(crate) fn release_repairs(&mut self) {
        self.repair_deadline = None;
        for (seq, want) in std::mem::take(&mut self.pending_repairs) {
            let Some(entry) = self.entry_mut(seq) else {
                continue;
            };
            entry.queued = true;
            self.repairs.push_back(RepairItem {
                seq,
                want,
                cursor: 0,
            });
        }
    }

    pub(crate) fn has_repairs(&self) -> bool {
        !self.repairs.is_empty()
    }

    /// Drops every queued repair (on close).
    pub(crate) fn clear_repairs(&mut self) {
        for item in std::mem::take(&mut self.repairs) {
            self.unqueue(item.seq);
        }
        self.pending_repairs.clear();
        self.repair_deadline = None;
    }

    /// A queued repair of `seq` is done (sent or dropped).
    fn unqueue(&mut self, seq: u64) {
        if let Some(entry) = self.entry_mut(seq) {
            entry.queued = false;
        }
    }

    /// Builds the next repair datagram, if any repair is queued.
    pub(crate) fn build_repair(&mut self, now: Instant) -> Option<Bytes> {
        while let Some(mut item) = self.repairs.pop_front() {
            let Some(entry) = self.entry(item.seq) else {
                continue;
            };
            if item.seq > self.highest_sent() {
                self.unqueue(item.seq);
                continue;
            }
            let len = entry.payload.len();
            if self.is_small(len) {
                // Batch with the following queued repairs of consecutive small messages.
                let mut size = DATA_OVERHEAD + wire::message_cost(len);
                let mut count = 1usize;
                while let Some(next) = self.repairs.front() {
                    let seq = item.seq + count as u64;
                    let Some(e) = (next.seq == seq && seq <= self.highest_sent())
                        .then(|| self.entry(seq))
                        .flatten()
                    else {
                        break;
                    };
                    let cost = wire::message_cost(e.payload.len());
                    if !self.is_small(e.payload.len()) || size + cost > self.mtu {
                        break;
                    }
                    size += cost;
                    count += 1;
                    self.repairs.pop_front();
                }
                let start = usize::try_from(item.seq - self.low).ok()?;
                let datagram = wire::encode_data(
                    &self.header,
                    item.seq,
                    self.entries.range(start..start + count).map(|e| &e.payload),
                    Some(self.low),
                );
                for e in self.entries.range_mut(start..start + count) {
                    e.last_repair = Some(now);
                    e.queued = false;
                }
                return Some(datagram);
            }
            let chunk = self.chunk_size() as u32;
            let total = len as u32;
            let mut offset = item.cursor;
            while offset < total {
                let end = offset.saturating_add(chunk).min(total);
                let wanted = match &item.want {
                    Want::Whole => true,
                    Want::Parts(parts) => parts.iter().any(|&(a, b)| a < end && offset < b),
                };
                if wanted {
                    break;
                }
                offset = end;
            }
            if offset >= total {
                self.unqueue(item.seq);
                continue;
            }
            let end = offset.saturating_add(chunk).min(total);
            let datagram = wire::encode_fragment(
                &self.header,
                item.seq,
                total,
                offset,
                &entry.payload[offset as usize..end as usize],
                Some(self.low),
            );
            if let Some(e) = self.entry_mut(item.seq) {
                e.last_repair = Some(now);
                e.queued = end < total;
            }
            if end < total {
                item.cursor = end;
                self.repairs.push_front(item);
            }
            return Some(datagram);
        }
        None
    }
}

/// Byte ranges clamped to a message of `len` bytes, sorted and merged; more than
/// [`MAX_PARTS`] of them, or ones covering the whole message, become [`Want::Whole`].
fn normalize(mut parts: Vec<(u32, u32)>, len: usize) -> Want {
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    parts.retain_mut(|(a, b)| {
        *b = (*b).min(len);
        *a < *b
    });
    parts.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(parts.len());
    for (a, b) in parts {
        match merged.last_mut() {
            Some(prev) if a <= prev.1 => prev.1 = prev.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    if merged.len() > MAX_PARTS || merged == [(0, len)] {
        return Want::Whole;
    }
    Want::Parts(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClusterId, Incarnation, NodeId};

    const HOLDOFF: Duration = Duration::from_millis(5);

    /// A window that transmitted `count` messages of `len` bytes.
    fn window(count: usize, len: usize, now: Instant) -> SendWindow {
        let header = Header::new(ClusterId(1), NodeId(1), Incarnation(1));
        let mut w = SendWindow::new(header, 1400);
        for _ in 0..count {
            w.push(Bytes::from(vec![7u8; len]), now);
        }
        while w.build_data(now).is_some() {}
        assert_eq!(w.highest_sent(), count as u64);
        w
    }

    fn nak(ranges: Vec<(u64, u64)>, partial: Vec<proto::PartialNak>) -> proto::Nak {
        proto::Nak {
            target_node: 1,
            target_incarnation: 1,
            ranges: ranges
                .into_iter()
                .map(|(first, last)| proto::SeqRange { first, last })
                .collect(),
            partial,
            sender_highest_sent: 0,
        }
    }

    /// Releases the pending repairs and builds them all; returns the bytes built.
    fn repair_all(w: &mut SendWindow, now: Instant) -> u64 {
        w.release_repairs();
        std::iter::from_fn(|| w.build_repair(now))
            .map(|d| d.len() as u64)
            .sum()
    }

    #[test]
    fn nak_of_ten_thousand_full_ranges_costs_bounded_work_and_bytes() {
        let t0 = Instant::now();
        let mut w = window(10_000, 100, t0);
        w.trim_stable(99);
        let flood = nak(vec![(1, u64::MAX); 10_000], vec![]);
        let a = w.on_nak(&flood, t0, HOLDOFF, u64::MAX);
        assert!(a.beyond);
        assert_eq!(a.ignored, (10_000 - NAK_RANGES_TAKEN) as u64 + 1);
        assert_eq!(w.pending_repairs.len() as u64, NAK_MESSAGES_TAKEN);
        assert_eq!(*w.pending_repairs.first_key_value().unwrap().0, 100);
        // Asking again during the hold-off, or while the repairs are queued, adds nothing.
        assert_eq!(w.on_nak(&flood, t0, HOLDOFF, u64::MAX).charged, 0);
        w.release_repairs();
        assert_eq!(w.on_nak(&flood, t0, HOLDOFF, u64::MAX).charged, 0);
        assert!(w.pending_repairs.is_empty());
        let built: u64 = std::iter::from_fn(|| w.build_repair(t0))
            .map(|d| d.len() as u64)
            .sum();
        assert!(built <= a.charged, "{built} > {}", a.charged);
        assert!(built >= NAK_MESSAGES_TAKEN * 100);
        // Just repaired: not again within the hold-off, whoever asks.
        assert_eq!(
            w.on_nak(&flood, t0 + HOLDOFF / 2, HOLDOFF, u64::MAX)
                .charged,
            0
        );
        assert!(w.on_nak(&flood, t0 + HOLDOFF, HOLDOFF, u64::MAX).charged > 0);
    }

    #[test]
    fn repairs_stop_at_the_allowance() {
        let t0 = Instant::now();
        let mut w = window(100, 100, t0);
        let per = (DATA_OVERHEAD + wire::message_cost(100)) as u64;
        let a = w.on_nak(&nak(vec![(1, 100)], vec![]), t0, HOLDOFF, 3 * per + 1);
        assert_eq!((a.charged, a.refused), (3 * per, 1));
        assert_eq!(w.pending_repairs.len(), 3);
        let built = repair_all(&mut w, t0);
        assert!(built <= 3 * per, "{built}");
        assert_eq!(
            w.on_nak(&nak(vec![(1, 100)], vec![]), t0, HOLDOFF, 0)
                .refused,
            1
        );
    }

    #[test]
    fn partial_nak_flood_keeps_one_bounded_request_per_message() {
        let t0 = Instant::now();
        let len = 100_000;
        let mut w = window(1, len, t0);
        let mut rng = 1u64;
        let mut next = move || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) as u32
        };
        let mut charged = 0;
        for _ in 0..2_000 {
            let partial = (0..NAK_PARTIALS_TAKEN + 10)
                .map(|_| proto::PartialNak {
                    seq: 1,
                    missing: (0..NAK_BYTE_RANGES_TAKEN + 5)
                        .map(|_| proto::ByteRange {
                            offset: next() % (2 * len as u32),
                            len: next() % 50,
                        })
                        .collect(),
                })
                .collect();
            let a = w.on_nak(&nak(vec![], partial), t0, HOLDOFF, u64::MAX);
            charged += a.charged;
            match &w.pending_repairs[&1] {
                Want::Whole => {}
                Want::Parts(parts) => assert!(parts.len() <= MAX_PARTS, "{}", parts.len()),
            }
        }
        let whole = (len + len.div_ceil(w.chunk_size()) * FRAGMENT_OVERHEAD) as u64;
        assert!(charged <= whole, "{charged} > {whole}");
        let built = repair_all(&mut w, t0);
        assert!(built <= whole, "{built} > {whole}");
    }
}
