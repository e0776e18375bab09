//! A deficit token bucket over bytes.
//!
//! A datagram may go whenever the balance is positive; its size is then subtracted, possibly
//! driving the balance negative. The average rate is exact, a datagram never waits for a full
//! datagram's worth of tokens, and the time until sending is possible again is simply
//! `-balance / rate`.

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct TokenBucket {
    /// Bytes per second; `None` = unlimited.
    rate: Option<NonZeroU64>,
    burst: f64,
    balance: f64,
    updated: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: Option<NonZeroU64>, burst: NonZeroU64, now: Instant) -> TokenBucket {
        let burst = burst.get() as f64;
        TokenBucket {
            rate,
            burst,
            balance: burst,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let Some(rate) = self.rate else { return };
        let elapsed = now.saturating_duration_since(self.updated);
        self.updated = self.updated.max(now);
        self.balance = (self.balance + elapsed.as_secs_f64() * rate.get() as f64).min(self.burst);
    }

    /// Whether a datagram may be sent now.
    pub(crate) fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.rate.is_none() || self.balance > 0.0
    }

    /// Charges a datagram that was sent.
    pub(crate) fn consume(&mut self, bytes: usize) {
        if self.rate.is_some() {
            self.balance -= bytes as f64;
        }
    }

    /// When [`TokenBucket::ready`] will next be true, if it is not already.
    pub(crate) fn ready_at(&self) -> Option<Instant> {
        let rate = self.rate?;
        if self.balance > 0.0 {
            return None;
        }
        // A hair past zero so that the refill at that instant makes the balance positive.
        let secs = (-self.balance + 1.0) / rate.get() as f64;
        Some(self.updated + Duration::from_secs_f64(secs))
    }
}

/// A member's repair credit: the bytes of repairs its NAKs may still have queued.
///
/// Earned, never granted by time alone: twice the bytes the member sends us and the bytes
/// of our stream it acknowledges delivering in its heartbeats, up to a cap. A receiver that repairs what it lost and moves on earns more than
/// it spends (at 20 % loss it acknowledges five bytes for each one repaired); a member that
/// asks and never acknowledges gets its start credit plus twice what it sends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Credit {
    left: u64,
}

impl Credit {
    /// A new member's credit: `start`, at most `cap`.
    pub(crate) fn new(start: u64, cap: u64) -> Credit {
        Credit {
            left: start.min(cap),
        }
    }

    /// Bytes available.
    pub(crate) fn available(&self) -> u64 {
        self.left
    }

    /// Adds `bytes`, up to `cap`.
    pub(crate) fn earn(&mut self, bytes: u64, cap: u64) {
        self.left = self.left.saturating_add(bytes).min(cap);
    }

    /// Takes `bytes` (at most what is available).
    pub(crate) fn spend(&mut self, bytes: u64) {
        self.left = self.left.saturating_sub(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enforces_average_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(NonZeroU64::new(1000), NonZeroU64::new(500).unwrap(), t0);
        let mut now = t0;
        let mut sent = 0usize;
        for _ in 0..10_000 {
            if b.ready(now) {
                b.consume(100);
                sent += 100;
            } else {
                now = b.ready_at().unwrap();
            }
            if now > t0 + Duration::from_secs(10) {
                break;
            }
        }
        // 10 s at 1000 B/s plus the 500 B burst, give or take one datagram.
        assert!((10_400..=10_700).contains(&sent), "{sent}");
    }

    #[test]
    fn credit_is_earned_capped_and_spent() {
        let mut c = Credit::new(5_000, 1_000);
        assert_eq!(c.available(), 1_000);
        c.spend(400);
        assert_eq!(c.available(), 600);
        c.earn(300, 1_000);
        assert_eq!(c.available(), 900);
        c.earn(u64::MAX, 1_000);
        assert_eq!(c.available(), 1_000);
        c.spend(u64::MAX);
        assert_eq!(c.available(), 0);
    }
}
