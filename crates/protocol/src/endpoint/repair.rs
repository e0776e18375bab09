//! Repair: when this endpoint NAKs a gap (random delay, suppression by others' NAKs,
//! exponential backoff, new losses asked for at once) and how it answers NAKs for its own
//! stream (within the requester's repair credit).

use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;

use crate::probation::Candidate;
use crate::proto::{self, frame::Kind};
use crate::rate::Credit;
use crate::recv::NakTimer;
use crate::util::random_between;
use crate::wire;
use crate::{Config, Destination, LeaveReason, NodeId, Transmit};

use super::timers::Timer;
use super::{Endpoint, Feeds, Lifecycle, payload_mtu};

/// Repair credit a new member starts with, before it has acknowledged anything of our stream
/// (a few hundred full datagrams: enough for the losses of a first burst). See
/// `docs/protocol.md` §3.3.1.
pub const REPAIR_START_CREDIT: u64 = 256 << 10;

/// Repair credit a member earns per byte it sends us. Two, not quinn's three: with the start
/// credit on top, what a member that never acknowledges anything gets stays under three times
/// what it sent once it has sent more than the start credit. Real receivers earn their
/// repairs mostly by acknowledging our stream.
pub(super) const MEMBER_CREDIT_PER_BYTE: u64 = 2;

impl Endpoint {
    pub(super) fn on_nak(&mut self, node: NodeId, nak: &proto::Nak) {
        let now = self.now;
        // Like a heartbeat, a NAK tells how far its sender's own stream has gone.
        self.with_stream(node, |stream, _| {
            stream.start_at(nak.sender_highest_sent.saturating_add(1));
            stream.on_highest_sent(nak.sender_highest_sent);
        });
        if nak.target_node == self.cfg.node.0 {
            if nak.target_incarnation != self.cfg.incarnation.0 {
                return;
            }
            self.stats.naks_received += 1;
            let allowance = self.repair_allowance(node);
            let answer = self
                .window
                .on_nak(nak, now, self.cfg.repair_holdoff, allowance);
            self.stats.nak_entries_ignored += answer.ignored;
            self.stats.repairs_refused += answer.refused;
            if self.feeding == Feeds::Candidate {
                if let Some(c) = self.candidates.get_mut(&node) {
                    c.answered += answer.charged;
                }
            } else if let Some(credit) = self.repair_credit.get_mut(&node) {
                credit.spend(answer.charged);
            }
            if answer.beyond {
                self.stats.naks_beyond_window += 1;
                let recent = self
                    .last_beyond_reply
                    .is_some_and(|t| now < t + self.cfg.repair_holdoff);
                if self.feeding == Feeds::Candidate {
                    // Not a member yet: its own heartbeats will tell it soon enough.
                    self.stats.repairs_refused += 1;
                } else if !recent && self.lifecycle == Lifecycle::Open {
                    self.last_beyond_reply = Some(now);
                    self.queue_heartbeat();
                }
            }
            return;
        }
        self.stats.naks_overheard += 1;
        let target = NodeId(nak.target_node);
        let Some(peer) = self.peers.get_mut(&target) else {
            return;
        };
        if target == node || peer.incarnation.0 != nak.target_incarnation {
            return;
        }
        if let Some(timer) = peer.stream.nak
            && peer.stream.covered_by(nak)
        {
            let at = now + retry_delay(&self.cfg, &mut self.rng, timer.attempts.max(1));
            peer.stream.nak = Some(NakTimer {
                at: timer.at.max(at),
                attempts: timer.attempts,
            });
            self.stats.naks_suppressed += 1;
            self.sync_peer_timers(target);
        }
    }

    /// Repair bytes the sender of the NAK being handled may still have queued: three times
    /// what it sent us minus what it cost already for a candidate, its earned credit for a
    /// member (see [`Credit`]).
    pub(super) fn repair_allowance(&mut self, node: NodeId) -> u64 {
        if self.feeding == Feeds::Candidate {
            return self.candidates.get(&node).map_or(0, Candidate::allowance);
        }
        let cap = self.cfg.repair_bytes_per_member.get() as u64;
        self.repair_credit
            .entry(node)
            .or_insert_with(|| Credit::new(REPAIR_START_CREDIT, cap))
            .available()
    }

    /// After a data-bearing datagram: arm or disarm the stream's NAK timer; send an early
    /// heartbeat if much was delivered since the last one.
    pub(super) fn after_receive(&mut self, node: NodeId) {
        let now = self.now;
        let member = self.feeding == Feeds::Member;
        if member
            && self.timers.get(Timer::Leaving(node)).is_some()
            && self.peers.get(&node).is_none_or(|p| !p.stream.has_gap())
        {
            self.remove_peer(node, LeaveReason::Goodbye);
            self.trim_stable();
            return;
        }
        if let Some(peer) = self.peers.get_mut(&node).filter(|_| member) {
            let stream = &mut peer.stream;
            if !stream.has_gap() {
                stream.nak = None;
                stream.retry_at = None;
            } else if stream.nak.is_none() {
                let at = now
                    + random_between(
                        &mut self.rng,
                        self.cfg.nak_delay_min,
                        self.cfg.nak_delay_max,
                    );
                stream.nak = Some(NakTimer { at, attempts: 0 });
            } else if let Some(timer) = stream.nak
                && stream.has_new_gap()
                && timer.at > now + self.cfg.nak_delay_max
            {
                // A new loss while an older NAK waits for its retry: NAK it after the usual
                // short random delay, not after the backoff.
                let at = now
                    + random_between(
                        &mut self.rng,
                        self.cfg.nak_delay_min,
                        self.cfg.nak_delay_max,
                    );
                stream.nak = Some(NakTimer {
                    at,
                    attempts: timer.attempts,
                });
            }
            self.sync_peer_timers(node);
        }
        let (messages, bytes) = self.delivered_since_heartbeat;
        let many = messages as usize >= self.cfg.window_max_messages.get() / 4
            || bytes as usize >= self.cfg.window_max_bytes.get() / 4;
        if many && self.lifecycle == Lifecycle::Open {
            self.queue_heartbeat();
        }
    }

    /// Sends the NAKs due at `now` (their timers come out of the table in node order). A
    /// member that said goodbye with data missing NAKs nothing more: its timer waits for
    /// the goodbye's deadline, when the member is settled.
    pub(super) fn fire_naks(&mut self, now: Instant) {
        // Room for ranges in one NAK: the datagram less the header and the NAK's other fields.
        let budget = payload_mtu(&self.cfg).saturating_sub(wire::OVERHEAD + 48);
        for node in self.timers.take_due(now, Timer::Nak) {
            let leaving = self.timers.get(Timer::Leaving(node));
            let Some(peer) = self.peers.get_mut(&node) else {
                continue;
            };
            match (&mut peer.stream.nak, leaving) {
                (Some(timer), Some(deadline)) if timer.at <= now => {
                    timer.at = timer.at.max(deadline);
                }
                (Some(timer), None) if timer.at <= now => self.fire_nak(node, now, budget),
                _ => {}
            }
            self.sync_peer_timers(node);
        }
    }

    /// Sends the NAK of member `node`'s stream, whose timer is due, and re-arms the timer.
    fn fire_nak(&mut self, node: NodeId, now: Instant, budget: usize) {
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        // Before the retry of the last NAK is due, ask only for gaps found since (new
        // losses are not held back by the retry backoff; repairs in flight are not asked
        // for twice).
        let retry_at = peer.stream.retry_at.filter(|r| now < *r);
        let from = retry_at.map_or(0, |_| peer.stream.naked_upto.saturating_add(1));
        let missing = peer.stream.missing(from, budget);
        let Some(timer) = peer.stream.nak else {
            return;
        };
        if let Some(retry) = retry_at {
            if !missing.is_empty() {
                peer.stream.naked_upto = peer.stream.naked_upto.max(missing.upto);
            }
            peer.stream.nak = Some(NakTimer {
                at: retry,
                attempts: timer.attempts,
            });
            if missing.is_empty() {
                return;
            }
        } else if missing.is_empty() {
            // Only a message still being transmitted is incomplete: look again later.
            peer.stream.nak = if peer.stream.has_gap() {
                let at = now
                    + random_between(
                        &mut self.rng,
                        self.cfg.nak_delay_min,
                        self.cfg.nak_delay_max,
                    );
                Some(NakTimer {
                    at,
                    attempts: timer.attempts,
                })
            } else {
                None
            };
            return;
        }
        let attempts = if retry_at.is_some() {
            timer.attempts
        } else {
            let attempts = if std::mem::take(&mut peer.stream.filled) {
                1
            } else {
                timer.attempts + 1
            };
            let at = now + retry_delay(&self.cfg, &mut self.rng, attempts);
            peer.stream.nak = Some(NakTimer { at, attempts });
            peer.stream.retry_at = Some(at);
            peer.stream.naked_upto = peer.stream.naked_upto.max(missing.upto);
            attempts
        };
        if peer.stream.has_new_gap() {
            // The NAK was full: ask for the rest soon rather than at the retry.
            let soon = now + self.cfg.nak_delay_min;
            if let Some(t) = &mut peer.stream.nak {
                t.at = t.at.min(soon);
            }
        }
        let nak = proto::Nak {
            target_node: node.0,
            target_incarnation: peer.incarnation.0,
            ranges: missing.ranges,
            partial: missing.partial,
            sender_highest_sent: self.window.highest_sent(),
        };
        tracing::trace!(node = %self.cfg.node, target = %node, attempts, "NAK");
        self.stats.naks_sent += 1;
        let payload = wire::encode(
            &self.header,
            &proto::Frame {
                kind: Some(Kind::Nak(nak)),
            },
        );
        self.control.push_back(Transmit {
            destination: Destination::Group,
            payload,
        });
    }
}

/// Wait before NAK attempt `attempts + 1`: exponential backoff plus jitter.
fn retry_delay(cfg: &Config, rng: &mut ChaCha8Rng, attempts: u32) -> Duration {
    let shift = attempts.saturating_sub(1).min(16);
    let backoff = cfg
        .nak_retry_base
        .saturating_mul(1 << shift)
        .min(cfg.nak_retry_max);
    backoff + random_between(rng, Duration::ZERO, cfg.nak_delay_max)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::endpoint::tests::*;
    use crate::proto::{self, frame::Kind};
    use crate::wire::{self, Header};
    use crate::*;

    #[test]
    fn stream_first_heard_through_a_nak_is_anchored_there() {
        let t0 = Instant::now();
        let mut ep = Endpoint::new(config(0, 1), t0);
        let h = Header::new(CLUSTER, NodeId(2), Incarnation(1));
        // Node 2 is first heard through a NAK (about someone else's stream) saying it sent 10;
        // its heartbeats, later, say 12.
        let nak = proto::Nak {
            target_node: 9,
            target_incarnation: 1,
            sender_highest_sent: 10,
            ..Default::default()
        };
        ep.handle_datagram(
            t0,
            addr(1),
            &wire::encode(
                &h,
                &proto::Frame {
                    kind: Some(Kind::Nak(nak)),
                },
            ),
        );
        // Its seq 11 is lost; seq 12 arrives (after its probation): 11 must be NAKed, not
        // skipped.
        let t1 = t0 + Duration::from_millis(150);
        ep.handle_datagram(t0, addr(1), &heartbeat(NodeId(2), Incarnation(1), 12));
        ep.handle_datagram(t1, addr(1), &heartbeat(NodeId(2), Incarnation(1), 12));
        ep.handle_datagram(
            t1,
            addr(1),
            &wire::encode_data(&h, 12, [msg(12)].iter(), None),
        );
        assert_eq!(ep.members()[0].delivered_up_to, 10);
        let later = t1 + Duration::from_millis(30);
        ep.handle_timeout(later);
        let naks: Vec<proto::Nak> = std::iter::from_fn(|| ep.poll_transmit(later))
            .filter_map(|t| match frame_of(&t.payload) {
                Kind::Nak(n) => Some(n),
                _ => None,
            })
            .collect();
        assert_eq!(naks.len(), 1);
        assert_eq!(
            naks[0].ranges,
            vec![proto::SeqRange {
                first: 11,
                last: 11
            }]
        );
    }
}
