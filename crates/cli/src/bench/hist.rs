//! The latency histogram: log-linear buckets, fixed memory, quantiles.

/// Sub-buckets per power of two (2^7): a recorded value is off by at most 1/128 of itself.
const SUB_BITS: u32 = 7;
const SUB: usize = 1 << SUB_BITS;
const HALF: usize = SUB / 2;
const BUCKETS: usize = SUB + (64 - SUB_BITS as usize) * HALF;

/// Latencies in nanoseconds, log-linear buckets: fixed memory (30 KiB) however many messages.
#[derive(Debug, Clone)]
pub struct Hist {
    counts: Box<[u64]>,
    total: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: vec![0; BUCKETS].into_boxed_slice(),
            total: 0,
        }
    }
}

impl Hist {
    fn bucket(v: u64) -> usize {
        if v < SUB as u64 {
            return v as usize;
        }
        let msb = 63 - v.leading_zeros();
        let shift = msb - (SUB_BITS - 1);
        let mantissa = (v >> shift) as usize; // in HALF..SUB
        SUB + (shift as usize - 1) * HALF + (mantissa - HALF)
    }

    /// The middle of bucket `i`, in nanoseconds.
    fn value(i: usize) -> f64 {
        if i < SUB {
            return i as f64;
        }
        let k = i - SUB;
        let shift = k / HALF + 1;
        let low = ((k % HALF + HALF) as u64) << shift;
        low as f64 + (1u64 << shift) as f64 / 2.0
    }

    /// Counts one latency.
    pub fn record(&mut self, ns: u64) {
        self.counts[Self::bucket(ns)] += 1;
        self.total += 1;
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
    }

    /// The `q` quantile (0.0..=1.0) in microseconds; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((self.total - 1) as f64 * q.clamp(0.0, 1.0)).round() as u64;
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen > rank {
                return Self::value(i) / 1e3;
            }
        }
        0.0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_within_one_percent() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut values = vec![0, 1, 127, 128, 129, 255, 256, u64::MAX / 2, u64::MAX];
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x >> (x % 64));
        }
        let mut prev = 0;
        values.sort_unstable();
        for v in values {
            let b = Hist::bucket(v);
            assert!(b < BUCKETS, "{v} -> {b}");
            assert!(b >= prev, "buckets not monotonic at {v}");
            prev = b;
            let mid = Hist::value(b);
            assert!(
                (mid - v as f64).abs() <= v as f64 / 128.0 + 0.5,
                "{v} -> bucket {b} = {mid}"
            );
        }
        let mut a = Hist::default();
        let mut b = Hist::default();
        a.record(1_000);
        b.record(3_000_000);
        b.record(3_000_000);
        a.merge(&b);
        assert_eq!(a.total, 3);
        assert!((a.quantile_us(1.0) - 3000.0).abs() < 30.0);
        assert!((a.quantile_us(0.0) - 1.0).abs() < 0.01);
    }
}
