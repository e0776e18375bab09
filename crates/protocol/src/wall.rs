//! The mapping from the monotonic `now` to wall-clock (unix) milliseconds.

use std::time::Instant;

/// Maps the monotonic `now` to unix milliseconds: `wall_ms = epoch_ms + (now − epoch)`.
///
/// The driver reads the real clock once at start (`epoch = Instant::now()`,
/// `epoch_ms = SystemTime::now()` since the unix epoch); the simulator uses a fixed
/// `epoch_ms`. Because the mapping is fixed at start, the node's clock follows the monotonic
/// clock: later NTP steps of the system clock are not seen, and the node's skew against
/// other nodes is whatever it was at start plus monotonic-clock drift.
///
/// With [`Config::wall_clock`](crate::Config::wall_clock) set, heartbeats carry the sender's
/// wall time and every [`Member`](crate::Member) shows its clock offset against this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallClock {
    /// The instant that corresponds to `epoch_ms`.
    pub epoch: Instant,
    /// Unix milliseconds at `epoch`.
    pub epoch_ms: u64,
}

impl WallClock {
    /// A clock for simulations and tests: `epoch` maps to a fixed unix time
    /// (2023-11-14T22:13:20Z), so runs are reproducible.
    #[must_use]
    pub fn simulated(epoch: Instant) -> WallClock {
        WallClock {
            epoch,
            epoch_ms: 1_700_000_000_000,
        }
    }

    /// Unix milliseconds at `now` (never before `epoch_ms`).
    #[must_use]
    pub fn wall_ms(&self, now: Instant) -> u64 {
        let elapsed = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX);
        self.epoch_ms.saturating_add(elapsed)
    }
}
