//! Endpoint configuration with LAN and lossy-network presets.

use std::num::{NonZeroU64, NonZeroUsize};
use std::time::Duration;

use crate::wire::{MAX_UDP_PAYLOAD, MIN_MTU};
use crate::{ClusterId, Incarnation, Keyring, NodeId, NodeName, WallClock};

/// Configuration of one [`Endpoint`](crate::Endpoint).
///
/// Build it with a preset ([`Config::lan`], [`Config::lossy`]) and adjust fields. Values that
/// contradict each other are reported by [`Config::validate`]; [`Endpoint::new`](crate::Endpoint::new)
/// repairs them (documented per field) rather than failing, so an endpoint always runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The cluster this endpoint belongs to; other clusters' datagrams are dropped.
    pub cluster: ClusterId,
    /// This node's id.
    pub node: NodeId,
    /// This life of the node; must differ (grow) on every start.
    pub incarnation: Incarnation,
    /// Seed of every random choice the endpoint makes (NAK delays).
    pub rng_seed: u64,
    /// Largest datagram this endpoint sends, header and CRC included (default 1400).
    /// Clamped to `[MIN_MTU, MAX_UDP_PAYLOAD]`.
    pub mtu: usize,
    /// Largest datagram accepted; larger ones are dropped as `oversized` (default 65 507).
    /// Raised to at least `mtu`.
    pub max_datagram_size: usize,
    /// Largest application message accepted by `send` and by reassembly (default 1 MiB + 64 KiB).
    /// Clamped so that it fits the send window and `u32`.
    pub max_message_size: usize,
    /// How long a small message may wait for others to share its datagram. Zero sends at once.
    pub batch_delay: Duration,
    /// Period of heartbeats.
    pub heartbeat_interval: Duration,
    /// Silence after which a member is suspected.
    pub suspect_after: Duration,
    /// Silence after which a member is declared gone ([`LeaveReason::Timeout`](crate::LeaveReason)).
    /// Raised above `suspect_after`.
    pub leave_after: Duration,
    /// Lower bound of the random delay between noticing a gap and sending the first NAK.
    pub nak_delay_min: Duration,
    /// Upper bound of that delay (raised to `nak_delay_min`).
    pub nak_delay_max: Duration,
    /// Wait before repeating an unanswered NAK; doubled on every retry up to `nak_retry_max`.
    pub nak_retry_base: Duration,
    /// Longest wait between NAK retries.
    pub nak_retry_max: Duration,
    /// A sender gathers NAKs for this long before multicasting the repair, and ignores NAKs for
    /// messages it repaired less than this long ago.
    pub repair_holdoff: Duration,
    /// Most messages in the send window (queued + unstable).
    pub window_max_messages: NonZeroUsize,
    /// Most payload bytes in the send window (queued + unstable). Raised to `max_message_size`.
    pub window_max_bytes: NonZeroUsize,
    /// A transmitted message older than this leaves the retransmission window even if some
    /// member has not delivered it (that member then gets [`Event::Lost`](crate::Event::Lost)).
    pub window_max_age: Duration,
    /// Sustained send rate in bytes per second shared by data and repairs; `None` = unlimited.
    pub rate_bytes_per_sec: Option<NonZeroU64>,
    /// Bytes the rate limiter lets through in one burst.
    pub rate_burst_bytes: NonZeroU64,
    /// The one receive memory budget, over every sender (known, on probation or never heard
    /// of before): messages held out of order or during probation, partial reassemblies
    /// (charged for the bytes received, never for a declared length), and each sender's state
    /// (default 64 MiB). A held message shorter than half of its datagram is copied out;
    /// a longer one is charged the whole datagram it shares. When it is full, candidates'
    /// data gives way first, then the newest members' farthest-ahead data; what does not fit
    /// is dropped (`buffer_full`, NAKed again later for members). Raised to
    /// `2 * max_message_size`.
    pub receive_budget_bytes: usize,
    /// Most members (default 256). A new sender is refused (`members_full`) while the table
    /// is full; members are never evicted to make room for newcomers.
    pub max_members: NonZeroUsize,
    /// Most senders on probation at once (default 4096): a new (node, incarnation) becomes a
    /// member only when a heartbeat of it arrives at least `heartbeat_interval / 2` after its
    /// first heartbeat. When the table is full the oldest candidate is dropped
    /// (`candidates_evicted`).
    pub max_candidates: NonZeroUsize,
    /// Most repair credit one member can hold (default 8 MiB). A member starts with 256 KiB
    /// and earns twice the bytes it sends to this endpoint plus the bytes of this
    /// endpoint's stream it acknowledges delivering; its NAKs spend it. A requester that is
    /// not a member may have at most three times the bytes it sent to this endpoint.
    pub repair_bytes_per_member: NonZeroUsize,
    /// How long departed members and, with a keyring, the replay windows of senders no
    /// longer heard are remembered (default 10 min; at most `max_members` departed members).
    /// Raised to `leave_after`.
    pub forget_after: Duration,
    /// Cluster keys. With a keyring every datagram is sealed (authenticated and encrypted)
    /// and only sealed datagrams under an accepted key are taken; without one (the presets'
    /// default, for trusted networks) datagrams are plain and anyone on the segment can read
    /// and forge them. Sealing takes [`auth::SEAL_OVERHEAD`](crate::auth::SEAL_OVERHEAD)
    /// bytes of every datagram's `mtu`.
    pub keyring: Option<Keyring>,
    /// How `now` maps to wall-clock time. With it, heartbeats carry this node's wall time and
    /// [`Member::clock_offset_ms`](crate::Member::clock_offset_ms) shows every peer's clock
    /// offset; without it (the presets' default) heartbeats carry none.
    pub wall_clock: Option<WallClock>,
    /// This node's name for people, carried in every heartbeat (peers show it in
    /// [`Member::name`](crate::Member::name)); `None` (the presets' default) sends none.
    pub name: Option<NodeName>,
}

/// Contradictions found by [`Config::validate`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `mtu` is outside `[MIN_MTU, MAX_UDP_PAYLOAD]`.
    #[error("mtu {0} is outside [{MIN_MTU}, {MAX_UDP_PAYLOAD}]")]
    Mtu(usize),
    /// `max_message_size` exceeds the send window or `u32::MAX`.
    #[error("max_message_size {0} exceeds window_max_bytes or u32::MAX")]
    MaxMessageSize(usize),
    /// `receive_budget_bytes` is below twice `max_message_size`.
    #[error("receive_budget_bytes {budget} is below twice max_message_size ({max_message_size})")]
    ReceiveBudget {
        /// The configured budget.
        budget: usize,
        /// The configured maximum message size.
        max_message_size: usize,
    },
    /// `forget_after` is shorter than `leave_after`.
    #[error("forget_after must be at least leave_after")]
    ForgetAfter,
    /// `nak_delay_min > nak_delay_max` or `nak_retry_base > nak_retry_max`.
    #[error("NAK delay or retry bounds are inverted")]
    NakBounds,
    /// `leave_after <= suspect_after`, or a zero heartbeat interval.
    #[error("heartbeat_interval must be > 0 and leave_after > suspect_after")]
    Liveness,
}

impl Config {
    /// Preset for a LAN: low delays, 1 Gbit/s rate, generous window.
    pub fn lan(
        cluster: ClusterId,
        node: NodeId,
        incarnation: Incarnation,
        rng_seed: u64,
    ) -> Config {
        Config {
            cluster,
            node,
            incarnation,
            rng_seed,
            mtu: 1400,
            max_datagram_size: MAX_UDP_PAYLOAD,
            max_message_size: (1 << 20) + (64 << 10),
            batch_delay: Duration::from_micros(500),
            heartbeat_interval: Duration::from_millis(200),
            suspect_after: Duration::from_millis(1500),
            leave_after: Duration::from_secs(5),
            nak_delay_min: Duration::from_millis(2),
            nak_delay_max: Duration::from_millis(20),
            nak_retry_base: Duration::from_millis(15),
            nak_retry_max: Duration::from_secs(1),
            repair_holdoff: Duration::from_millis(5),
            window_max_messages: nz(65_536),
            window_max_bytes: nz(64 << 20),
            window_max_age: Duration::from_secs(10),
            rate_bytes_per_sec: NonZeroU64::new(125_000_000),
            rate_burst_bytes: NonZeroU64::MIN.saturating_add((256 << 10) - 1),
            receive_budget_bytes: 64 << 20,
            max_members: nz(256),
            max_candidates: nz(4096),
            repair_bytes_per_member: nz(8 << 20),
            forget_after: Duration::from_secs(600),
            keyring: None,
            wall_clock: None,
            name: None,
        }
    }

    /// Preset for networks that lose a lot (up to ~50 %): longer NAK delays and liveness
    /// timeouts, a longer-lived window, a lower rate.
    pub fn lossy(
        cluster: ClusterId,
        node: NodeId,
        incarnation: Incarnation,
        rng_seed: u64,
    ) -> Config {
        Config {
            suspect_after: Duration::from_secs(3),
            leave_after: Duration::from_secs(15),
            nak_delay_min: Duration::from_millis(5),
            nak_delay_max: Duration::from_millis(40),
            nak_retry_base: Duration::from_millis(80),
            nak_retry_max: Duration::from_secs(1),
            repair_holdoff: Duration::from_millis(10),
            window_max_age: Duration::from_secs(30),
            rate_bytes_per_sec: NonZeroU64::new(12_500_000),
            ..Config::lan(cluster, node, incarnation, rng_seed)
        }
    }

    /// Reports the first contradiction in this configuration, if any.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the offending field; nothing is changed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_MTU..=MAX_UDP_PAYLOAD).contains(&self.mtu) {
            return Err(ConfigError::Mtu(self.mtu));
        }
        if self.max_message_size > self.window_max_bytes.get()
            || u32::try_from(self.max_message_size).is_err()
        {
            return Err(ConfigError::MaxMessageSize(self.max_message_size));
        }
        if self.receive_budget_bytes / 2 < self.max_message_size {
            return Err(ConfigError::ReceiveBudget {
                budget: self.receive_budget_bytes,
                max_message_size: self.max_message_size,
            });
        }
        if self.nak_delay_min > self.nak_delay_max || self.nak_retry_base > self.nak_retry_max {
            return Err(ConfigError::NakBounds);
        }
        if self.heartbeat_interval.is_zero() || self.leave_after <= self.suspect_after {
            return Err(ConfigError::Liveness);
        }
        if self.forget_after < self.leave_after {
            return Err(ConfigError::ForgetAfter);
        }
        Ok(())
    }

    /// Returns a copy with every contradiction repaired as documented on the fields.
    pub(crate) fn sanitized(mut self) -> Config {
        self.mtu = self.mtu.clamp(MIN_MTU, MAX_UDP_PAYLOAD);
        self.max_datagram_size = self.max_datagram_size.max(self.mtu);
        self.max_message_size = self.max_message_size.min(u32::MAX as usize);
        self.receive_budget_bytes = self
            .receive_budget_bytes
            .max(self.max_message_size.saturating_mul(2));
        if self.window_max_bytes.get() < self.max_message_size {
            self.window_max_bytes = NonZeroUsize::new(self.max_message_size).unwrap_or(nz(1));
        }
        self.nak_delay_max = self.nak_delay_max.max(self.nak_delay_min);
        self.nak_retry_base = self.nak_retry_base.max(Duration::from_millis(1));
        self.nak_retry_max = self.nak_retry_max.max(self.nak_retry_base);
        if self.heartbeat_interval.is_zero() {
            self.heartbeat_interval = Duration::from_millis(200);
        }
        if self.leave_after <= self.suspect_after {
            self.leave_after = self.suspect_after + self.heartbeat_interval;
        }
        self.forget_after = self.forget_after.max(self.leave_after);
        self
    }
}

const fn nz(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => NonZeroUsize::MIN,
    }
}
