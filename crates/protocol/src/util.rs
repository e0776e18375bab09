//! Small helpers every Chorus crate shares: one stable hash and one source of random
//! durations.
//!
//! - [`fnv1a_64`], [`fnv1a_64_from`] and the [`Fnv1a`] [`Hasher`]: FNV-1a 64 (offset basis
//!   [`FNV1A_64_OFFSET`], prime [`FNV1A_64_PRIME`], xor then multiply, per byte). Stable
//!   across processes, builds, platforms and languages, unlike `std`'s randomly keyed
//!   `DefaultHasher`; not a defence against chosen inputs (callers that need well-mixed bits
//!   apply a finaliser of their own).
//! - [`random_below`], [`random_between`] and [`jittered`]: uniform random durations drawn
//!   from a caller's seeded RNG (this crate never uses global or unseeded randomness).
//!   Durations are drawn in whole nanoseconds; spans beyond `u64::MAX` ns (584 years) are
//!   clamped to it.

use std::hash::Hasher;
use std::time::Duration;

use rand::Rng;

/// FNV-1a 64 offset basis: the state of a hash that has seen no byte.
pub const FNV1A_64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a 64 prime.
pub const FNV1A_64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `bytes`.
///
/// # Examples
///
/// ```
/// use chorus_protocol::util::fnv1a_64;
/// assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
/// assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
/// ```
#[must_use]
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    fnv1a_64_from(FNV1A_64_OFFSET, bytes)
}

/// FNV-1a 64 over `bytes`, continuing from `state` (a previous result, or
/// [`FNV1A_64_OFFSET`]): `fnv1a_64_from(fnv1a_64(a), b) == fnv1a_64(a ‖ b)`.
#[must_use]
pub fn fnv1a_64_from(mut state: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        state ^= u64::from(byte);
        state = state.wrapping_mul(FNV1A_64_PRIME);
    }
    state
}

/// FNV-1a 64 as a [`Hasher`], for hashing `Hash` values stably (e.g. a trace digest).
///
/// Integers are fed to it in native byte order, as [`Hasher`]'s provided methods do.
///
/// # Examples
///
/// ```
/// use std::hash::Hasher;
/// use chorus_protocol::util::{Fnv1a, fnv1a_64};
/// let mut h = Fnv1a::new();
/// h.write(b"ab");
/// assert_eq!(h.finish(), fnv1a_64(b"ab"));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Fnv1a(u64);

impl Fnv1a {
    /// A hasher that has seen nothing (state [`FNV1A_64_OFFSET`]).
    #[must_use]
    pub fn new() -> Fnv1a {
        Fnv1a(FNV1A_64_OFFSET)
    }

    /// A hasher continuing from `state` (a previous [`Hasher::finish`] result).
    #[must_use]
    pub fn with_state(state: u64) -> Fnv1a {
        Fnv1a(state)
    }
}

impl Default for Fnv1a {
    fn default() -> Fnv1a {
        Fnv1a::new()
    }
}

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = fnv1a_64_from(self.0, bytes);
    }
}

/// A duration's length in nanoseconds, clamped to `u64::MAX`.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Uniform in `[0, max)`, in whole nanoseconds; zero (drawing nothing) when `max` is zero.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rand::SeedableRng;
/// use chorus_protocol::util::random_below;
/// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
/// assert!(random_below(&mut rng, Duration::from_millis(10)) < Duration::from_millis(10));
/// assert_eq!(random_below(&mut rng, Duration::ZERO), Duration::ZERO);
/// ```
pub fn random_below<R: Rng + ?Sized>(rng: &mut R, max: Duration) -> Duration {
    let max = nanos(max);
    if max == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rng.random_range(0..max))
}

/// Uniform in `[min, max]` (both ends included), in whole nanoseconds; `min` (drawing nothing)
/// when `max <= min`. `random_between(rng, Duration::ZERO, max)` is uniform in `[0, max]`.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rand::SeedableRng;
/// use chorus_protocol::util::random_between;
/// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
/// let (lo, hi) = (Duration::from_millis(1), Duration::from_millis(5));
/// let d = random_between(&mut rng, lo, hi);
/// assert!(lo <= d && d <= hi);
/// assert_eq!(random_between(&mut rng, hi, lo), hi);
/// ```
pub fn random_between<R: Rng + ?Sized>(rng: &mut R, min: Duration, max: Duration) -> Duration {
    if max <= min {
        return min;
    }
    min + Duration::from_nanos(rng.random_range(0..=nanos(max - min)))
}

/// `interval` jittered uniformly by ±25 %: in `[interval - q, interval + q)` with
/// `q = interval / 4` (so that periodic timers of many nodes do not fire in step).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rand::SeedableRng;
/// use chorus_protocol::util::jittered;
/// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
/// let d = jittered(&mut rng, Duration::from_secs(4));
/// assert!(Duration::from_secs(3) <= d && d < Duration::from_secs(5));
/// ```
pub fn jittered<R: Rng + ?Sized>(rng: &mut R, interval: Duration) -> Duration {
    let quarter = interval / 4;
    interval - quarter + random_below(rng, quarter * 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn fnv1a_matches_published_vectors_and_continues() {
        // Test vectors of the FNV reference (isthe.com/chongo/tech/comp/fnv).
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(fnv1a_64_from(fnv1a_64(b"foo"), b"bar"), fnv1a_64(b"foobar"));
        let mut h = Fnv1a::default();
        h.write(b"foo");
        let mut g = Fnv1a::with_state(h.finish());
        g.write(b"bar");
        assert_eq!(g.finish(), fnv1a_64(b"foobar"));
        h.write_u8(b'b');
        assert_ne!(h.finish(), g.finish());
    }

    #[test]
    fn random_durations_stay_in_their_ranges() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let ms = Duration::from_millis;
        for _ in 0..2_000 {
            assert!(random_below(&mut rng, ms(7)) < ms(7));
            let d = random_between(&mut rng, ms(2), ms(9));
            assert!(ms(2) <= d && d <= ms(9), "{d:?}");
            let j = jittered(&mut rng, ms(400));
            assert!(ms(300) <= j && j < ms(500), "{j:?}");
        }
        // Tiny spans reach both ends.
        let ends: std::collections::BTreeSet<Duration> = (0..200)
            .map(|_| random_between(&mut rng, Duration::from_nanos(5), Duration::from_nanos(6)))
            .collect();
        assert_eq!(ends.len(), 2);
        let below: std::collections::BTreeSet<Duration> = (0..200)
            .map(|_| random_below(&mut rng, Duration::from_nanos(1)))
            .collect();
        assert_eq!(below.into_iter().collect::<Vec<_>>(), [Duration::ZERO]);
    }

    #[test]
    fn empty_ranges_draw_nothing() {
        let mut a = ChaCha8Rng::seed_from_u64(4);
        let b = a.clone();
        assert_eq!(random_below(&mut a, Duration::ZERO), Duration::ZERO);
        let ms = Duration::from_millis;
        assert_eq!(random_between(&mut a, ms(3), ms(3)), ms(3));
        assert_eq!(random_between(&mut a, ms(5), ms(3)), ms(5));
        assert_eq!(
            jittered(&mut a, Duration::from_nanos(3)),
            Duration::from_nanos(3)
        );
        assert_eq!(a, b, "the RNG moved");
    }

    #[test]
    fn same_seed_same_durations() {
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..10)
                .map(|_| random_between(&mut rng, Duration::ZERO, Duration::from_secs(1)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(9), draw(9));
        assert_ne!(draw(9), draw(10));
    }
}
