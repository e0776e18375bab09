//! Links: what a directed link does to a datagram (loss, duplication, reordering, delay,
//! corruption) and the table of per-link overrides and partitions.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use chorus_protocol::util::random_between;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Behaviour of one directed link. Probabilities are in `[0, 1]`; values outside are clamped
/// and NaN counts as 0.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkConfig {
    /// Probability that a datagram is lost on this link (independently per datagram and link).
    pub loss: f64,
    /// Probability that a datagram is delivered twice (each copy with its own delay).
    pub duplicate: f64,
    /// Probability that a datagram gets an extra delay of up to [`LinkConfig::reorder_delay`],
    /// so that later datagrams overtake it.
    pub reorder: f64,
    /// The largest extra delay a reordered datagram gets.
    pub reorder_delay: Duration,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Uniform random extra delay in `[0, jitter]` added to every datagram.
    pub jitter: Duration,
    /// Probability that a delivered datagram is corrupted: 1–3 random bits flipped, or
    /// truncated to a random shorter length (half of the cases each).
    pub corrupt: f64,
}

impl LinkConfig {
    /// A link that never loses, duplicates, reorders or corrupts; 100 µs delay, no jitter.
    #[must_use]
    pub fn perfect() -> LinkConfig {
        LinkConfig {
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
            delay: Duration::from_micros(100),
            jitter: Duration::ZERO,
            corrupt: 0.0,
        }
    }

    /// A LAN-like link: 200 µs ± 100 µs, otherwise perfect.
    #[must_use]
    pub fn lan() -> LinkConfig {
        LinkConfig {
            delay: Duration::from_micros(200),
            jitter: Duration::from_micros(100),
            ..LinkConfig::perfect()
        }
    }

    /// This link with loss probability `loss`.
    #[must_use]
    pub fn with_loss(mut self, loss: f64) -> LinkConfig {
        self.loss = loss;
        self
    }

    /// This link with duplication probability `duplicate`.
    #[must_use]
    pub fn with_duplicate(mut self, duplicate: f64) -> LinkConfig {
        self.duplicate = duplicate;
        self
    }

    /// This link reordering with probability `reorder` by up to `max_extra_delay`.
    #[must_use]
    pub fn with_reorder(mut self, reorder: f64, max_extra_delay: Duration) -> LinkConfig {
        self.reorder = reorder;
        self.reorder_delay = max_extra_delay;
        self
    }

    /// This link with base delay `delay` and jitter `jitter`.
    #[must_use]
    pub fn with_delay(mut self, delay: Duration, jitter: Duration) -> LinkConfig {
        self.delay = delay;
        self.jitter = jitter;
        self
    }

    /// This link with corruption probability `corrupt`.
    #[must_use]
    pub fn with_corrupt(mut self, corrupt: f64) -> LinkConfig {
        self.corrupt = corrupt;
        self
    }

    /// What this link does to one copy of `payload`, drawn from `rng`. The draws happen in a
    /// fixed order (loss, duplication, then per copy: jitter, reordering, corruption), so a
    /// seed replays the same fates.
    pub(super) fn carry(&self, rng: &mut ChaCha8Rng, payload: &Bytes) -> Carry {
        if chance(rng, self.loss) {
            return Carry::Lost;
        }
        let duplicated = chance(rng, self.duplicate);
        let first = self.one_copy(rng, payload);
        let duplicate = duplicated.then(|| self.one_copy(rng, payload));
        Carry::Delivered { first, duplicate }
    }

    fn one_copy(&self, rng: &mut ChaCha8Rng, payload: &Bytes) -> Copy {
        let mut delay = self.delay + random_between(rng, Duration::ZERO, self.jitter);
        let reordered = chance(rng, self.reorder);
        if reordered {
            delay += random_between(rng, Duration::ZERO, self.reorder_delay);
        }
        let corrupted = !payload.is_empty() && chance(rng, self.corrupt);
        let payload = if corrupted {
            corrupt(rng, payload)
        } else {
            payload.clone()
        };
        Copy {
            delay,
            payload,
            corrupted,
            reordered,
        }
    }
}

impl Default for LinkConfig {
    fn default() -> LinkConfig {
        LinkConfig::lan()
    }
}

/// The fate of one copy on a link ([`LinkConfig::carry`]).
pub(super) enum Carry {
    /// Lost at random.
    Lost,
    /// Delivered once, or twice when duplicated.
    Delivered {
        /// The copy.
        first: Copy,
        /// The extra copy of a duplication, with its own delay and corruption.
        duplicate: Option<Copy>,
    },
}

/// One copy on its way: when it arrives (after the send) and what it holds.
pub(super) struct Copy {
    /// Delay from now until arrival.
    pub(super) delay: Duration,
    /// The bytes as they arrive.
    pub(super) payload: Bytes,
    /// Whether corruption changed them.
    pub(super) corrupted: bool,
    /// Whether it got an extra reordering delay.
    pub(super) reordered: bool,
}

/// Per-link overrides of the default [`LinkConfig`] and the partitions in force.
#[derive(Default)]
pub(super) struct Links {
    overrides: HashMap<(usize, usize), LinkConfig>,
    blocked: HashSet<(usize, usize)>,
}

impl Links {
    /// The behaviour of `from → to`: its override, else `default`.
    pub(super) fn get<'a>(
        &'a self,
        from: usize,
        to: usize,
        default: &'a LinkConfig,
    ) -> &'a LinkConfig {
        self.overrides.get(&(from, to)).unwrap_or(default)
    }

    pub(super) fn set(&mut self, from: usize, to: usize, link: LinkConfig) {
        self.overrides.insert((from, to), link);
    }

    pub(super) fn clear_overrides(&mut self) {
        self.overrides.clear();
    }

    /// Cuts every link between a node of `a` and a node of `b`, both directions.
    pub(super) fn partition(&mut self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                if x != y {
                    self.blocked.insert((x, y));
                    self.blocked.insert((y, x));
                }
            }
        }
    }

    pub(super) fn heal(&mut self) {
        self.blocked.clear();
    }

    pub(super) fn is_blocked(&self, from: usize, to: usize) -> bool {
        self.blocked.contains(&(from, to))
    }

    pub(super) fn is_partitioned(&self) -> bool {
        !self.blocked.is_empty()
    }
}

/// Bernoulli draw; probabilities are clamped to `[0, 1]` and NaN is 0. Draws nothing for
/// p <= 0, so a perfect link consumes no randomness.
fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    if p.is_nan() || p <= 0.0 {
        return false;
    }
    rng.random::<f64>() < p.min(1.0)
}

/// Flips 1–3 random bits, or truncates to a random shorter length. `payload` is non-empty.
fn corrupt(rng: &mut ChaCha8Rng, payload: &Bytes) -> Bytes {
    if rng.random::<bool>() {
        let len = rng.random_range(0..payload.len());
        return payload.slice(..len);
    }
    let mut bytes = payload.to_vec();
    let flips = rng.random_range(1..=3);
    for _ in 0..flips {
        let bit = rng.random_range(0..bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
    }
    Bytes::from(bytes)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn corruption_changes_or_shortens_payload() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let payload = Bytes::from_static(b"hello, chorus");
        for _ in 0..200 {
            let out = corrupt(&mut rng, &payload);
            assert!(out.len() < payload.len() || out != payload);
        }
    }

    #[test]
    fn chance_respects_bounds() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        assert!(!chance(&mut rng, 0.0));
        assert!(!chance(&mut rng, f64::NAN));
        assert!(chance(&mut rng, 1.0));
        assert!(chance(&mut rng, 7.0));
    }
}
