//! Receiving: data, fragments and repairs go into the stream of their sender (a member's,
//! or a candidate's while it is on probation), and the one receive budget makes room by
//! evicting the least established senders' held data first.

use crate::NodeId;
use crate::proto;
use crate::recv::{Out, REASSEMBLY_OVERHEAD, Rank, RecvStream, Standing, keep_charge};
use crate::wire::DropReason;

use super::{Endpoint, Feeds};

/// Where a message or fragment stands in its stream, for [`Endpoint::make_room`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum InLine {
    /// A member's next message to deliver: it may push out other members' data held ahead.
    Next,
    /// Anything else: only less established streams, and its own farther data, give way.
    Later,
}

impl Endpoint {
    /// Runs `f` on the stream the datagram being handled feeds (a member's, or a
    /// candidate's when `feeding` says so), keeping the holders index up to date.
    pub(super) fn with_stream<T>(
        &mut self,
        node: NodeId,
        f: impl FnOnce(&mut RecvStream, &mut Out<'_>) -> T,
    ) -> Option<T> {
        let stream = match self.feeding {
            Feeds::Candidate => &mut self.candidates.get_mut(&node)?.stream,
            Feeds::Member => &mut self.peers.get_mut(&node)?.stream,
        };
        let mut out = Out {
            events: &mut self.events,
            stats: &mut self.stats,
            budget: &mut self.budget,
            delivered: (0, 0),
            shared: self.shared,
        };
        let result = f(stream, &mut out);
        let (messages, bytes) = out.delivered;
        self.delivered_since_heartbeat.0 += messages;
        self.delivered_since_heartbeat.1 += bytes;
        if stream.held_bytes() > 0 {
            self.holders.insert(stream.rank, node);
        } else {
            self.holders.remove(&stream.rank);
        }
        Some(result)
    }

    /// The stream the datagram being handled feeds (see [`Endpoint::with_stream`]).
    pub(super) fn current_stream(&self, node: NodeId) -> Option<&RecvStream> {
        match self.feeding {
            Feeds::Candidate => self.candidates.get(&node).map(|c| &c.stream),
            Feeds::Member => self.peers.get(&node).map(|p| &p.stream),
        }
    }

    pub(super) fn next_rank(&mut self, standing: Standing) -> Rank {
        self.next_order += 1;
        Rank {
            standing,
            order: self.next_order,
        }
    }

    /// Makes room for `need` more bytes for a stream of rank `rank`, at sequence number
    /// `seq` of its own (`None`: new state, no data yet). Held data gives way from the least
    /// established stream down: every stream of a higher rank loses what it holds above its
    /// delivery point (a candidate: everything), then the stream's own data farther than
    /// `seq`; a member's next message in line ([`InLine::Next`]) may also push out any
    /// member's data held ahead of its delivery point. Nothing else is ever evicted, and
    /// nothing is evicted if `need` already fits.
    pub(super) fn make_room(&mut self, rank: Rank, seq: Option<u64>, line: InLine, need: usize) {
        let mut cursor: Option<Rank> = None;
        while !self.budget.fits(need) {
            let next = match cursor {
                None => self.holders.last_key_value(),
                Some(c) => self.holders.range(..c).next_back(),
            };
            let Some((&victim, &node)) = next else {
                break;
            };
            cursor = Some(victim);
            if victim < rank && line == InLine::Later {
                break;
            }
            let stream = match victim.standing {
                Standing::Candidate => self.candidates.get_mut(&node).map(|c| &mut c.stream),
                Standing::Member => self.peers.get_mut(&node).map(|p| &mut p.stream),
            };
            let Some(stream) = stream else {
                self.holders.remove(&victim);
                continue;
            };
            let above = if victim == rank {
                match seq {
                    Some(seq) => seq,
                    None => continue,
                }
            } else if stream.holding() {
                0
            } else {
                stream.next_expected
            };
            let mut out = Out {
                events: &mut self.events,
                stats: &mut self.stats,
                budget: &mut self.budget,
                delivered: (0, 0),
                shared: 0,
            };
            stream.evict_above(above, need, &mut out);
            if stream.held_bytes() == 0 {
                self.holders.remove(&victim);
            }
        }
    }

    pub(super) fn on_data(&mut self, node: NodeId, data: proto::Data) -> Result<(), DropReason> {
        let count = data.messages.len() as u64;
        if data.first_seq == 0 || count == 0 || data.first_seq.checked_add(count).is_none() {
            return Err(DropReason::Malformed);
        }
        let last = data.first_seq + (count - 1);
        let room = self.current_stream(node).and_then(|s| {
            // Messages from the delivery point on are delivered at once, not held.
            let delivered_now = !s.holding() && (!s.started() || data.first_seq <= s.next_expected);
            (!delivered_now).then_some(s.rank)
        });
        if let Some(rank) = room {
            let shared = self.shared;
            let need = data
                .messages
                .iter()
                .map(|m| keep_charge(m.len(), shared))
                .sum();
            self.make_room(rank, Some(last), InLine::Later, need);
        }
        self.with_stream(node, |stream, out| {
            // first_seq + count does not overflow (checked above): neither does any seq.
            for (i, payload) in (0..count).zip(data.messages) {
                stream.on_message(data.first_seq + i, payload, out);
            }
        });
        Ok(())
    }

    pub(super) fn on_fragment(
        &mut self,
        node: NodeId,
        frag: &proto::Fragment,
    ) -> Result<(), DropReason> {
        if frag.total_len as usize > self.cfg.max_message_size {
            return Err(DropReason::Oversized);
        }
        if let Some(s) = self.current_stream(node) {
            let line = if !s.holding() && (!s.started() || s.next_expected == frag.seq) {
                InLine::Next
            } else {
                InLine::Later
            };
            let need = REASSEMBLY_OVERHEAD + keep_charge(frag.chunk.len(), self.shared);
            self.make_room(s.rank, Some(frag.seq), line, need);
        }
        self.with_stream(node, |stream, out| stream.on_fragment(frag, out))
            .unwrap_or(Ok(()))
    }

    pub(super) fn on_repair(
        &mut self,
        node: NodeId,
        repair: proto::Repair,
    ) -> Result<(), DropReason> {
        self.stats.repairs_received += 1;
        let result = match repair.payload {
            Some(proto::repair::Payload::Data(data)) => self.on_data(node, data),
            Some(proto::repair::Payload::Fragment(frag)) => self.on_fragment(node, &frag),
            None => Err(DropReason::Malformed),
        };
        if result.is_ok() {
            self.with_stream(node, |stream, out| {
                stream.advance_to(repair.low_retained, out)
            });
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::endpoint::tests::*;
    use crate::proto::{self, frame::Kind};
    use crate::wire::{self, Header};
    use crate::*;

    #[test]
    fn sequence_numbers_near_u64_max_never_overflow() {
        let t0 = Instant::now();
        let mut ep = Endpoint::new(config(0, 1), t0);
        let (node, inc) = (NodeId(7), Incarnation(1));
        let h = Header::new(CLUSTER, node, inc);
        let t1 = t0 + Duration::from_millis(150);
        ep.handle_datagram(t0, addr(6), &heartbeat(node, inc, u64::MAX - 2));
        ep.handle_datagram(t1, addr(6), &heartbeat(node, inc, u64::MAX - 2));
        assert_eq!(ep.members().len(), 1);
        let last = u64::MAX - 1;
        ep.handle_datagram(
            t1,
            addr(6),
            &wire::encode_data(&h, last, [msg(1)].iter(), None),
        );
        ep.handle_datagram(
            t1,
            addr(6),
            &wire::encode_fragment(&h, u64::MAX, 1, 0, b"x", None),
        );
        ep.handle_datagram(
            t1,
            addr(6),
            &wire::encode_data(&h, u64::MAX, [msg(2)].iter(), None),
        );
        let hb = proto::Heartbeat {
            highest_sent: u64::MAX,
            low_retained: u64::MAX,
            delivered: vec![],
            wall_ms: 0,
            name: Default::default(),
        };
        let hb = wire::encode(
            &h,
            &proto::Frame {
                kind: Some(Kind::Heartbeat(hb)),
            },
        );
        ep.handle_datagram(t1, addr(6), &hb);
        assert_eq!(ep.stats().malformed, 2);
        assert_eq!(ep.members()[0].delivered_up_to, last);
        // Nothing is missing, so nothing is ever NAKed.
        let mut now = t1;
        for _ in 0..50 {
            now += Duration::from_millis(20);
            ep.handle_timeout(now);
            while ep.poll_transmit(now).is_some() {}
        }
        assert_eq!(ep.stats().naks_sent, 0);
        assert_eq!(ep.stats().messages_delivered, 1);
    }
}
