//! Hybrid logical clock and entry versions.

use std::fmt;

/// Number of bits of the logical counter in an [`Hlc`].
const LOGICAL_BITS: u32 = 16;
/// Mask of the logical counter.
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;
/// Largest physical time (milliseconds) an [`Hlc`] can hold: 48 bits.
pub const MAX_PHYSICAL_MS: u64 = (1 << (64 - LOGICAL_BITS)) - 1;

/// A hybrid logical clock timestamp: 48 bits of physical time (unix milliseconds) followed
/// by a 16-bit logical counter. Ordered as the plain `u64`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(pub u64);

impl Hlc {
    /// Builds a timestamp from its parts (`physical_ms` is truncated to 48 bits).
    #[must_use]
    pub fn new(physical_ms: u64, logical: u16) -> Hlc {
        Hlc(((physical_ms & MAX_PHYSICAL_MS) << LOGICAL_BITS) | u64::from(logical))
    }

    /// Physical part, unix milliseconds.
    #[must_use]
    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// Logical counter.
    #[must_use]
    pub fn logical(self) -> u16 {
        // Masked to 16 bits, so the cast is lossless.
        (self.0 & LOGICAL_MASK) as u16
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({}.{})", self.physical_ms(), self.logical())
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.logical())
    }
}

/// The version of an entry: the writer's HLC timestamp, then the writer's node id as a
/// tie-break. The total order `(hlc, node)` decides every conflict: the larger version wins.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Version {
    /// When the write was stamped.
    pub hlc: Hlc,
    /// Which node stamped it.
    pub node: u64,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.hlc, self.node)
    }
}

/// The text of a [`Version`] was not `<physical ms>.<logical>@<node>` (the format its
/// `Display` prints, e.g. `1767225600000.3@42`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid version {0:?}: expected <physical ms>.<logical>@<node> as printed by Chorus, e.g. 1767225600000.3@42"
)]
pub struct ParseVersionError(String);

/// Parses what [`Version`]'s `Display` prints: `<physical ms>.<logical>@<node>`, decimal
/// digits only, the physical part at most [`MAX_PHYSICAL_MS`] and the logical part at most
/// 65535.
///
/// # Examples
/// ```
/// use chorus_replication::{Hlc, Version};
/// let v: Version = "1767225600000.3@42".parse().expect("valid");
/// assert_eq!(v, Version { hlc: Hlc::new(1_767_225_600_000, 3), node: 42 });
/// assert_eq!(v.to_string().parse::<Version>(), Ok(v));
/// assert!("1767225600000@42".parse::<Version>().is_err());
/// ```
impl std::str::FromStr for Version {
    type Err = ParseVersionError;

    fn from_str(s: &str) -> Result<Version, ParseVersionError> {
        fn digits<T: std::str::FromStr>(part: &str) -> Option<T> {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            part.parse().ok()
        }
        let bad = || ParseVersionError(s.chars().take(64).collect());
        let (hlc, node) = s.split_once('@').ok_or_else(bad)?;
        let (physical, logical) = hlc.split_once('.').ok_or_else(bad)?;
        let physical: u64 = digits(physical)
            .filter(|p| *p <= MAX_PHYSICAL_MS)
            .ok_or_else(bad)?;
        let logical: u16 = digits(logical).ok_or_else(bad)?;
        let node: u64 = digits(node).ok_or_else(bad)?;
        Ok(Version {
            hlc: Hlc::new(physical, logical),
            node,
        })
    }
}

/// A remote timestamp lies too far ahead of the local wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "remote timestamp {remote} is {ahead_ms} ms ahead of the local clock (max drift {max_drift_ms} ms)"
)]
pub struct DriftError {
    /// The offending timestamp.
    pub remote: Hlc,
    /// How far ahead of local wall time it is.
    pub ahead_ms: u64,
    /// The configured bound.
    pub max_drift_ms: u64,
}

/// The hybrid logical clock of one node: `now` is strictly monotonic and never behind any
/// timestamp observed from a peer (within the drift bound).
#[derive(Debug, Clone)]
pub struct HlcClock {
    last: Hlc,
    max_drift_ms: u64,
}

impl HlcClock {
    /// A clock that rejects remote timestamps more than `max_drift_ms` ahead of local wall time.
    #[must_use]
    pub fn new(max_drift_ms: u64) -> HlcClock {
        HlcClock {
            last: Hlc(0),
            max_drift_ms,
        }
    }

    /// The latest timestamp issued or observed.
    #[must_use]
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A fresh timestamp, strictly greater than every previous one, given the wall clock in
    /// unix milliseconds. When the 16-bit logical counter overflows, the physical part is
    /// advanced by one millisecond (the clock runs slightly ahead of wall time until wall time
    /// catches up).
    pub fn now(&mut self, wall_ms: u64) -> Hlc {
        let wall = Hlc::new(wall_ms.min(MAX_PHYSICAL_MS), 0);
        let next = if wall > self.last {
            wall
        } else {
            // `last + 1` carries a logical overflow into the physical part. Saturates at the
            // end of the 48-bit range (year 10889), where monotonicity can no longer hold.
            Hlc(self.last.0.saturating_add(1))
        };
        self.last = next;
        next
    }

    /// Checks a remote timestamp against the drift bound without updating the clock.
    ///
    /// # Errors
    /// [`DriftError`] when `remote` is more than `max_drift_ms` ahead of `wall_ms`.
    pub fn check(&self, remote: Hlc, wall_ms: u64) -> Result<(), DriftError> {
        let ahead_ms = remote.physical_ms().saturating_sub(wall_ms);
        if ahead_ms > self.max_drift_ms {
            return Err(DriftError {
                remote,
                ahead_ms,
                max_drift_ms: self.max_drift_ms,
            });
        }
        Ok(())
    }

    /// Merges a remote timestamp: later local timestamps will be greater than it.
    ///
    /// # Errors
    /// [`DriftError`] when `remote` is too far ahead; the clock is then unchanged.
    pub fn observe(&mut self, remote: Hlc, wall_ms: u64) -> Result<(), DriftError> {
        self.check(remote, wall_ms)?;
        if remote > self.last {
            self.last = remote;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip() {
        let h = Hlc::new(1_700_000_000_000, 7);
        assert_eq!(h.physical_ms(), 1_700_000_000_000);
        assert_eq!(h.logical(), 7);
        assert!(Hlc::new(5, 0) > Hlc::new(4, u16::MAX));
    }

    #[test]
    fn now_is_strictly_monotonic_even_when_wall_clock_goes_back() {
        let mut c = HlcClock::new(1000);
        let a = c.now(1000);
        let b = c.now(1000);
        let d = c.now(900);
        let e = c.now(2000);
        assert!(a < b && b < d && d < e);
        assert_eq!(a, Hlc::new(1000, 0));
        assert_eq!(b, Hlc::new(1000, 1));
        assert_eq!(d, Hlc::new(1000, 2));
        assert_eq!(e, Hlc::new(2000, 0));
    }

    #[test]
    fn logical_overflow_carries_into_physical() {
        let mut c = HlcClock::new(1000);
        c.observe(Hlc::new(1000, u16::MAX), 1000).unwrap();
        let next = c.now(1000);
        assert_eq!(next, Hlc::new(1001, 0));
    }

    #[test]
    fn observe_moves_clock_forward_and_rejects_drift() {
        let mut c = HlcClock::new(500);
        c.observe(Hlc::new(1400, 3), 1000).unwrap();
        assert!(c.now(1000) > Hlc::new(1400, 3));
        let err = c.observe(Hlc::new(1600, 0), 1000).unwrap_err();
        assert_eq!(err.ahead_ms, 600);
        assert!(c.last() < Hlc::new(1600, 0));
    }

    #[test]
    fn version_orders_by_hlc_then_node() {
        let a = Version {
            hlc: Hlc::new(10, 0),
            node: 9,
        };
        let b = Version {
            hlc: Hlc::new(10, 0),
            node: 10,
        };
        let c = Version {
            hlc: Hlc::new(10, 1),
            node: 1,
        };
        assert!(a < b && b < c);
    }
}
