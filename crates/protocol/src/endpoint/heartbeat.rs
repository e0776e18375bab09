//! Heartbeats: ours (periodic, early when much was delivered, and rotating through the
//! progress of every stream), theirs (stream extent, retention floor, acknowledgements and
//! wall time), and stability: trimming the send window to what every member has delivered.

use crate::proto::{self, frame::Kind};
use crate::rate::Credit;
use crate::wire::{self, DropReason};
use crate::{Destination, Event, NodeId, NodeName, Transmit};

use super::membership::Peer;
use super::repair::REPAIR_START_CREDIT;
use super::{Backpressure, Endpoint, clock_offset, payload_mtu};

/// Bytes one `PeerProgress` entry can take in a heartbeat (3 tagged varints + framing).
const PROGRESS_ENTRY_MAX: usize = 36;

impl Endpoint {
    pub(super) fn queue_heartbeat(&mut self) {
        // The name field: its bytes, a tag and a length byte.
        let name = self.cfg.name.as_ref().map_or_else(bytes::Bytes::new, |n| {
            bytes::Bytes::copy_from_slice(n.as_str().as_bytes())
        });
        let fixed = wire::OVERHEAD + 40 + name.len() + 2;
        let room = payload_mtu(&self.cfg).saturating_sub(fixed) / PROGRESS_ENTRY_MAX;
        let mut streams: Vec<(&NodeId, &Peer)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.stream.started())
            .collect();
        streams.sort_unstable_by_key(|(n, _)| **n);
        let take = streams.len().min(room.max(1));
        let skip = if streams.is_empty() {
            0
        } else {
            self.heartbeat_rotation % streams.len()
        };
        let delivered = streams
            .iter()
            .cycle()
            .skip(skip)
            .take(take)
            .map(|(node, p)| proto::PeerProgress {
                node: node.0,
                incarnation: p.incarnation.0,
                delivered_up_to: p.stream.delivered_up_to(),
            })
            .collect();
        self.heartbeat_rotation = self.heartbeat_rotation.wrapping_add(take);
        let hb = proto::Heartbeat {
            highest_sent: self.window.highest_sent(),
            low_retained: self.window.low(),
            delivered,
            wall_ms: self.cfg.wall_clock.map_or(0, |w| w.wall_ms(self.now)),
            name,
        };
        self.stats.heartbeats_sent += 1;
        self.delivered_since_heartbeat = (0, 0);
        let payload = wire::encode(
            &self.header,
            &proto::Frame {
                kind: Some(Kind::Heartbeat(hb)),
            },
        );
        self.control.push_back(Transmit {
            destination: Destination::Group,
            payload,
        });
    }

    pub(super) fn on_heartbeat(
        &mut self,
        node: NodeId,
        hb: proto::Heartbeat,
    ) -> Result<(), DropReason> {
        if hb.low_retained == 0 || hb.low_retained > hb.highest_sent.saturating_add(1) {
            return Err(DropReason::Malformed);
        }
        self.stats.heartbeats_received += 1;
        let (me, mine) = (self.cfg.node.0, self.cfg.incarnation.0);
        if let Some(peer) = self.peers.get_mut(&node) {
            if !hb.name.is_empty() {
                match NodeName::from_wire(&hb.name) {
                    Ok(name) if peer.name.as_ref() != Some(&name) => {
                        tracing::debug!(node = %self.cfg.node, peer = %node, %name, "member name");
                        peer.name = Some(name);
                    }
                    Ok(_) => {}
                    Err(reason) => {
                        // The field is ignored; the heartbeat still counts.
                        self.stats.names_invalid += 1;
                        tracing::trace!(node = %self.cfg.node, peer = %node, %reason, "bad node name");
                    }
                }
            }
            if let Some(wall) = self.cfg.wall_clock.filter(|_| hb.wall_ms != 0) {
                peer.clock_offset_ms = Some(clock_offset(hb.wall_ms, wall.wall_ms(self.now)));
            }
            let before = peer.acked;
            for progress in &hb.delivered {
                if progress.node == me && progress.incarnation == mine {
                    peer.acked = peer.acked.max(progress.delivered_up_to);
                }
            }
            if peer.acked > before {
                // What it says it now holds of our stream earns it repair credit (counted
                // before the stability trim below releases those messages).
                let cap = self.cfg.repair_bytes_per_member.get() as u64;
                let earned = self.window.sent_bytes_between(before + 1, peer.acked);
                self.repair_credit
                    .entry(node)
                    .or_insert_with(|| Credit::new(REPAIR_START_CREDIT, cap))
                    .earn(earned, cap);
            }
        }
        self.with_stream(node, |stream, out| {
            stream.start_at(hb.highest_sent.saturating_add(1));
            stream.on_highest_sent(hb.highest_sent);
            stream.advance_to(hb.low_retained, out);
        });
        self.trim_stable();
        Ok(())
    }

    /// Releases messages every live member (alive or merely suspected) has delivered; emits
    /// `Writable` if room appeared. A member that stays silent is bounded by
    /// `window_max_age` and, eventually, by its removal after `leave_after`.
    pub(super) fn trim_stable(&mut self) {
        let stable = self
            .peers
            .values()
            .map(|p| p.acked)
            .min()
            .unwrap_or(u64::MAX)
            .min(self.window.highest_sent());
        self.stats.window_trimmed_stable += self.window.trim_stable(stable);
        if self.backpressure == Backpressure::WritableOwed && self.is_writable() {
            self.backpressure = Backpressure::Clear;
            self.events.push_back(Event::Writable);
        }
    }
}
