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
}
