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

/// A member's repair allowance: a bucket of `size` bytes refilled at `size` per `period`.
/// Whole bytes, no deficit: what is not in the bucket is not answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Allowance {
    left: u64,
    updated: Instant,
}

impl Allowance {
    /// A full bucket.
    pub(crate) fn full(size: u64, now: Instant) -> Allowance {
        Allowance {
            left: size,
            updated: now,
        }
    }

    /// Bytes available at `now`.
    pub(crate) fn available(&mut self, size: u64, period: Duration, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.updated);
        let refill = u128::from(size) * elapsed.as_nanos() / period.as_nanos().max(1);
        // Time that bought less than a byte is kept for later.
        if refill > 0 || self.left >= size {
            self.left = u64::try_from(u128::from(self.left) + refill)
                .unwrap_or(u64::MAX)
                .min(size);
            self.updated = self.updated.max(now);
        }
        self.left
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
    fn allowance_refills_at_its_rate_up_to_its_size() {
        let t0 = Instant::now();
        let period = Duration::from_millis(200);
        let mut a = Allowance::full(1000, t0);
        assert_eq!(a.available(1000, period, t0), 1000);
        a.spend(1000);
        assert_eq!(a.available(1000, period, t0), 0);
        assert_eq!(
            a.available(1000, period, t0 + Duration::from_millis(50)),
            250
        );
        a.spend(250);
        assert_eq!(
            a.available(1000, period, t0 + Duration::from_secs(60)),
            1000
        );
    }
}
