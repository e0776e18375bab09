//! Counters of everything an endpoint does and drops.

use crate::wire::DropReason;

/// Counters of one endpoint. All monotonically increasing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Datagrams returned by `poll_transmit` (all kinds).
    pub datagrams_sent: u64,
    /// Bytes of those datagrams.
    pub bytes_sent: u64,
    /// Datagrams given to `handle_datagram` (before any check).
    pub datagrams_received: u64,
    /// Bytes of those datagrams.
    pub bytes_received: u64,
    /// Application messages accepted by `send`.
    pub messages_sent: u64,
    /// Data datagrams sent for the first time (batches and fragments).
    pub data_datagrams_sent: u64,
    /// Data datagrams that carried more than one message.
    pub batches_sent: u64,
    /// Fragments sent for the first time.
    pub fragments_sent: u64,
    /// Messages delivered to the application.
    pub messages_delivered: u64,
    /// Fragmented messages completely reassembled.
    pub messages_reassembled: u64,
    /// Messages received again after they were delivered or buffered.
    pub duplicates: u64,
    /// Fragments received again (bytes already held).
    pub duplicate_fragments: u64,
    /// Messages older than the first one seen from a stream (before this endpoint joined it).
    pub before_start: u64,
    /// NAK datagrams sent.
    pub naks_sent: u64,
    /// NAKs not sent because another receiver's NAK covered the same gap.
    pub naks_suppressed: u64,
    /// NAK datagrams received for this endpoint's own stream.
    pub naks_received: u64,
    /// NAK datagrams received for other streams (used for suppression).
    pub naks_overheard: u64,
    /// Repair datagrams sent.
    pub repairs_sent: u64,
    /// Repair datagrams received.
    pub repairs_received: u64,
    /// NAKs asking for messages no longer retained (answered with a heartbeat).
    pub naks_beyond_window: u64,
    /// Messages reported lost through `Event::Lost`.
    pub lost_messages: u64,
    /// `Event::Lost` events emitted.
    pub lost_events: u64,
    /// Heartbeats sent.
    pub heartbeats_sent: u64,
    /// Heartbeats received.
    pub heartbeats_received: u64,
    /// Goodbyes sent.
    pub goodbyes_sent: u64,
    /// Goodbyes received.
    pub goodbyes_received: u64,
    /// `send` calls refused with `WindowFull`.
    pub window_full: u64,
    /// Messages removed from the retransmission window because every member delivered them.
    pub window_trimmed_stable: u64,
    /// Messages removed from the retransmission window by age before being stable.
    pub window_trimmed_age: u64,
    /// Times `poll_transmit` held data or repairs back for lack of rate tokens.
    pub rate_limited: u64,
    /// Members joined.
    pub members_joined: u64,
    /// Members left (goodbye or timeout).
    pub members_left: u64,
    /// Members restarted (new incarnation).
    pub members_restarted: u64,
    /// Members suspected.
    pub members_suspected: u64,
    /// Dropped: shorter than a header + CRC, or than the length it declares.
    pub truncated: u64,
    /// Dropped: longer than `max_datagram_size`, or a fragment of a message over
    /// `max_message_size`.
    pub oversized: u64,
    /// Dropped: bad magic number.
    pub bad_magic: u64,
    /// Dropped: unsupported protocol version.
    pub wrong_version: u64,
    /// Dropped: CRC mismatch.
    pub bad_checksum: u64,
    /// Dropped: another cluster.
    pub wrong_cluster: u64,
    /// Dropped: a plain datagram while this endpoint has a keyring, or a sealed one (key id,
    /// tag) while it has none.
    pub unauthenticated: u64,
    /// Dropped: sealed with a key id this endpoint does not accept.
    pub unknown_key: u64,
    /// Dropped: the authentication tag did not verify (wrong key, tampered datagram).
    pub auth_failed: u64,
    /// Dropped: an authentic datagram whose counter was already seen from this (sender,
    /// incarnation), or is older than the replay window.
    pub replayed: u64,
    /// Datagrams not sent because they could not be sealed (the datagram counter is exhausted
    /// after 2^64 - 1 datagrams: never in practice).
    pub seal_failed: u64,
    /// Dropped: the body is not a valid frame, or the frame contradicts itself or earlier ones.
    pub malformed: u64,
    /// Dropped: no frame kind this version knows.
    pub unknown_frame: u64,
    /// Dropped: from this endpoint itself (multicast loopback).
    pub own_datagrams: u64,
    /// Dropped: another process uses this endpoint's node id with another incarnation.
    pub node_id_conflict: u64,
    /// Dropped: from an older incarnation of a member, or from a member that said goodbye.
    pub stale_incarnation: u64,
    /// Not held: a message or fragment that did not fit the receive budget
    /// (`Config::receive_budget_bytes`); a member's is NAKed again later.
    pub buffer_full: u64,
    /// Held messages or partial reassemblies dropped to make room for a more established
    /// stream (candidates' first, then the newest members' farthest-ahead data).
    pub receive_evicted: u64,
    /// Dropped: a datagram from a new sender while the member table is full
    /// (`Config::max_members`).
    pub members_full: u64,
    /// Dropped: a datagram from a new sender whose state did not fit the receive budget.
    pub senders_over_budget: u64,
    /// Candidates (senders on probation) pushed out of the full probation table
    /// (`Config::max_candidates`), oldest first.
    pub candidates_evicted: u64,
    /// Candidates forgotten because they did not pass probation within `suspect_after`.
    pub candidates_expired: u64,
    /// Departed members forgotten (older than `Config::forget_after`, or the oldest when more
    /// than `max_members` are remembered).
    pub departed_forgotten: u64,
    /// Replay windows of senders no longer heard that were forgotten (same rule).
    pub replay_forgotten: u64,
    /// NAK entries ignored beyond the per-NAK caps (ranges, partial messages, byte ranges,
    /// messages examined).
    pub nak_entries_ignored: u64,
    /// NAKed messages not repaired because the requester's repair allowance was spent
    /// (3x its bytes for a non-member, its earned credit for a
    /// member), and beyond-window NAKs of non-members left unanswered.
    pub repairs_refused: u64,
    /// Dropped: arrived after `close`.
    pub after_close: u64,
    /// Node names in heartbeats refused (too long, not UTF-8, not printable): the field is
    /// ignored, the heartbeat taken.
    pub names_invalid: u64,
}

impl Stats {
    pub(crate) fn count_drop(&mut self, reason: DropReason) {
        let counter = match reason {
            DropReason::Truncated => &mut self.truncated,
            DropReason::Oversized => &mut self.oversized,
            DropReason::BadMagic => &mut self.bad_magic,
            DropReason::WrongVersion => &mut self.wrong_version,
            DropReason::BadChecksum => &mut self.bad_checksum,
            DropReason::WrongCluster => &mut self.wrong_cluster,
            DropReason::Unauthenticated => &mut self.unauthenticated,
            DropReason::UnknownKey => &mut self.unknown_key,
            DropReason::AuthFailed => &mut self.auth_failed,
            DropReason::Replayed => &mut self.replayed,
            DropReason::Malformed => &mut self.malformed,
            DropReason::UnknownFrame => &mut self.unknown_frame,
        };
        *counter += 1;
    }

    /// Every counter with its field name, for exporters (JSON, Prometheus).
    ///
    /// The destructuring is exhaustive, so a new field cannot be forgotten here.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let Stats {
            datagrams_sent,
            bytes_sent,
            datagrams_received,
            bytes_received,
            messages_sent,
            data_datagrams_sent,
            batches_sent,
            fragments_sent,
            messages_delivered,
            messages_reassembled,
            duplicates,
            duplicate_fragments,
            before_start,
            naks_sent,
            naks_suppressed,
            naks_received,
            naks_overheard,
            repairs_sent,
            repairs_received,
            naks_beyond_window,
            lost_messages,
            lost_events,
            heartbeats_sent,
            heartbeats_received,
            goodbyes_sent,
            goodbyes_received,
            window_full,
            window_trimmed_stable,
            window_trimmed_age,
            rate_limited,
            members_joined,
            members_left,
            members_restarted,
            members_suspected,
            truncated,
            oversized,
            bad_magic,
            wrong_version,
            bad_checksum,
            wrong_cluster,
            unauthenticated,
            unknown_key,
            auth_failed,
            replayed,
            seal_failed,
            malformed,
            unknown_frame,
            own_datagrams,
            node_id_conflict,
            stale_incarnation,
            buffer_full,
            receive_evicted,
            members_full,
            senders_over_budget,
            candidates_evicted,
            candidates_expired,
            departed_forgotten,
            replay_forgotten,
            nak_entries_ignored,
            repairs_refused,
            after_close,
            names_invalid,
        } = self;
        vec![
            ("datagrams_sent", *datagrams_sent),
            ("bytes_sent", *bytes_sent),
            ("datagrams_received", *datagrams_received),
            ("bytes_received", *bytes_received),
            ("messages_sent", *messages_sent),
            ("data_datagrams_sent", *data_datagrams_sent),
            ("batches_sent", *batches_sent),
            ("fragments_sent", *fragments_sent),
            ("messages_delivered", *messages_delivered),
            ("messages_reassembled", *messages_reassembled),
            ("duplicates", *duplicates),
            ("duplicate_fragments", *duplicate_fragments),
            ("before_start", *before_start),
            ("naks_sent", *naks_sent),
            ("naks_suppressed", *naks_suppressed),
            ("naks_received", *naks_received),
            ("naks_overheard", *naks_overheard),
            ("repairs_sent", *repairs_sent),
            ("repairs_received", *repairs_received),
            ("naks_beyond_window", *naks_beyond_window),
            ("lost_messages", *lost_messages),
            ("lost_events", *lost_events),
            ("heartbeats_sent", *heartbeats_sent),
            ("heartbeats_received", *heartbeats_received),
            ("goodbyes_sent", *goodbyes_sent),
            ("goodbyes_received", *goodbyes_received),
            ("window_full", *window_full),
            ("window_trimmed_stable", *window_trimmed_stable),
            ("window_trimmed_age", *window_trimmed_age),
            ("rate_limited", *rate_limited),
            ("members_joined", *members_joined),
            ("members_left", *members_left),
            ("members_restarted", *members_restarted),
            ("members_suspected", *members_suspected),
            ("truncated", *truncated),
            ("oversized", *oversized),
            ("bad_magic", *bad_magic),
            ("wrong_version", *wrong_version),
            ("bad_checksum", *bad_checksum),
            ("wrong_cluster", *wrong_cluster),
            ("unauthenticated", *unauthenticated),
            ("unknown_key", *unknown_key),
            ("auth_failed", *auth_failed),
            ("replayed", *replayed),
            ("seal_failed", *seal_failed),
            ("malformed", *malformed),
            ("unknown_frame", *unknown_frame),
            ("own_datagrams", *own_datagrams),
            ("node_id_conflict", *node_id_conflict),
            ("stale_incarnation", *stale_incarnation),
            ("buffer_full", *buffer_full),
            ("receive_evicted", *receive_evicted),
            ("members_full", *members_full),
            ("senders_over_budget", *senders_over_budget),
            ("candidates_evicted", *candidates_evicted),
            ("candidates_expired", *candidates_expired),
            ("departed_forgotten", *departed_forgotten),
            ("replay_forgotten", *replay_forgotten),
            ("nak_entries_ignored", *nak_entries_ignored),
            ("repairs_refused", *repairs_refused),
            ("after_close", *after_close),
            ("names_invalid", *names_invalid),
        ]
    }

    /// Total datagrams dropped for any reason.
    pub fn drops(&self) -> u64 {
        self.truncated
            + self.oversized
            + self.bad_magic
            + self.wrong_version
            + self.bad_checksum
            + self.wrong_cluster
            + self.unauthenticated
            + self.unknown_key
            + self.auth_failed
            + self.replayed
            + self.malformed
            + self.unknown_frame
            + self.own_datagrams
            + self.node_id_conflict
            + self.stale_incarnation
            + self.buffer_full
            + self.members_full
            + self.senders_over_budget
            + self.after_close
    }
}
