//! What one receiver counts (a [`Tally`]) and when it stops ([`Bounds`]).

use std::time::Duration;

use super::clock::{nanos, now_ns, unstamp};
use super::hist::Hist;

/// What one receiver got.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// One-way latencies.
    pub hist: Hist,
    /// Stamped payloads received.
    pub count: u64,
    /// Earliest send time among them ([`now_ns`]; `u64::MAX` before the first).
    pub first_sent: u64,
    /// When the last one arrived ([`now_ns`]; 0 before the first).
    pub last_at: u64,
    /// Why the receiver stopped: `all`, `idle`, `deadline`, `error` or `node-stopped`.
    pub stop: &'static str,
    /// Chorus: changes counted in `count` that the node applied but its watch did not
    /// yield, because the watch fell behind the change log and was restarted (no latency).
    pub unobserved: u64,
}

impl Tally {
    pub(super) fn new() -> Tally {
        Tally {
            first_sent: u64::MAX,
            ..Tally::default()
        }
    }

    /// Counts a stamped payload received now; `false` (nothing counted) when it is too short.
    pub fn record(&mut self, payload: &[u8]) -> bool {
        let Some((_, sent)) = unstamp(payload) else {
            return false;
        };
        let now = now_ns();
        self.hist.record(now.saturating_sub(sent));
        self.count += 1;
        self.first_sent = self.first_sent.min(sent);
        self.last_at = now;
        true
    }

    pub(super) fn merge(&mut self, other: &Tally) {
        self.hist.merge(&other.hist);
        self.count += other.count;
        self.unobserved += other.unobserved;
        self.first_sent = self.first_sent.min(other.first_sent);
        self.last_at = self.last_at.max(other.last_at);
    }

    /// Seconds from the earliest send to the last arrival (0 when nothing arrived).
    pub(super) fn span_secs(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.last_at.saturating_sub(self.first_sent) as f64 / 1e9
    }
}

/// When a receiver stops: after `expect` payloads, at `deadline` ([`now_ns`]), or after `idle`
/// without one (counted from the receiver's start, or only once the first one arrived).
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
    pub(super) expect: u64,
    pub(super) deadline: u64,
    pub(super) idle: Option<Duration>,
    pub(super) idle_before_first: bool,
}

impl Bounds {
    /// Since when a receiver that started at `started` and holds `t` has been idle, if the
    /// idle bound applies to it.
    fn idle_since(&self, t: &Tally, started: u64) -> Option<u64> {
        self.idle?;
        if t.count > 0 {
            Some(t.last_at)
        } else if self.idle_before_first {
            Some(started)
        } else {
            None
        }
    }

    /// When the receiver must stop at the latest if nothing more arrives ([`now_ns`]).
    pub(super) fn wake(&self, t: &Tally, started: u64) -> u64 {
        match (self.idle_since(t, started), self.idle) {
            (Some(since), Some(idle)) => self.deadline.min(since.saturating_add(nanos(idle))),
            _ => self.deadline,
        }
    }

    /// Whether the receiver should stop now.
    pub(super) fn done(&self, t: &Tally, started: u64) -> bool {
        t.count >= self.expect || now_ns() >= self.wake(t, started)
    }

    /// Which bound stopped a receiver that is done.
    pub(super) fn reason(&self, t: &Tally) -> &'static str {
        if t.count >= self.expect {
            "all"
        } else if now_ns() >= self.deadline {
            "deadline"
        } else {
            "idle"
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::bench::clock::{offset, stamp};

    #[test]
    fn stamp_roundtrip_and_percentiles() {
        let mut buf = [0u8; 32];
        let before = now_ns();
        stamp(&mut buf, 42);
        let (seq, sent) = unstamp(&buf).unwrap();
        assert_eq!(seq, 42);
        assert!(sent >= before && sent <= now_ns());
        assert!(unstamp(&buf[..10]).is_none());
        let mut t = Tally::new();
        assert!(t.record(&buf));
        assert!(!t.record(&buf[..10]));
        assert_eq!(t.count, 1);
        assert_eq!(t.first_sent, sent);
        let mut h = Hist::default();
        for us in 1..=100u64 {
            h.record(us * 1000);
        }
        let (p50, p99) = (h.quantile_us(0.5), h.quantile_us(0.99));
        assert!((p50 - 50.5).abs() <= 1.0, "{p50}");
        assert!((p99 - 99.0).abs() <= 1.0, "{p99}");
        assert_eq!(Hist::default().quantile_us(0.5), 0.0);
    }

    #[test]
    fn pacing_and_bounds() {
        assert_eq!(offset(5, None), None);
        assert_eq!(offset(5, Some(0)), None);
        assert_eq!(offset(0, Some(1000)), Some(Duration::ZERO));
        assert_eq!(offset(1500, Some(1000)), Some(Duration::from_millis(1500)));
        let now = now_ns();
        let t = Tally::new();
        let far = Bounds {
            expect: 10,
            deadline: now + 60_000_000_000,
            idle: Some(Duration::from_millis(1)),
            idle_before_first: false,
        };
        // Before the first message only the deadline counts, unless told otherwise.
        assert!(!far.done(&t, now - 1_000_000_000));
        let eager = Bounds {
            idle_before_first: true,
            ..far
        };
        assert!(eager.done(&t, now - 1_000_000_000));
        let mut got = Tally::new();
        got.count = 3;
        got.last_at = now - 1_000_000_000;
        assert!(far.done(&got, now));
        assert_eq!(far.reason(&got), "idle");
        got.count = 10;
        got.last_at = now_ns();
        assert!(far.done(&got, now), "all expected arrived");
        assert_eq!(far.reason(&got), "all");
        let past = Bounds {
            deadline: now,
            idle: None,
            ..far
        };
        assert!(past.done(&Tally::new(), now));
        assert_eq!(past.reason(&Tally::new()), "deadline");
    }
}
