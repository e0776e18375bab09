//! Seeds: reading a replay seed from the environment and deriving independent sub-seeds.

/// Environment variable that pins the seed of a simulation test so a failure replays:
/// `CHORUS_SIM_SEED=1234 cargo test -p chorus-sim <test name>` (decimal or `0x` hex).
pub const SEED_ENV: &str = "CHORUS_SIM_SEED";

/// The seed given in [`SEED_ENV`], if it is set and parses (decimal, or hex with `0x`).
///
/// A set but unparsable value is reported on stderr and ignored, so a typo does not silently
/// run a different test than intended without a trace.
#[must_use]
pub fn seed_from_env() -> Option<u64> {
    let raw = std::env::var(SEED_ENV).ok()?;
    let text = raw.trim();
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse::<u64>(),
    };
    match parsed {
        Ok(seed) => Some(seed),
        Err(err) => {
            eprintln!("chorus-sim: ignoring {SEED_ENV}={raw:?}: {err}");
            None
        }
    }
}

/// Derives an independent, well-mixed sub-seed from `seed` for `(stream, index)`.
///
/// Used to give each node (and each restart of it) its own RNG seed, so that adding a node or
/// a restart does not shift the random choices of every other node. SplitMix64 finaliser.
#[must_use]
pub fn derive_seed(seed: u64, stream: u64, index: u64) -> u64 {
    let mut z = seed
        ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::derive_seed;

    #[test]
    fn derived_seeds_differ_per_stream_and_index() {
        let a = derive_seed(7, 0, 0);
        assert_ne!(a, derive_seed(7, 0, 1));
        assert_ne!(a, derive_seed(7, 1, 0));
        assert_ne!(a, derive_seed(8, 0, 0));
        assert_eq!(a, derive_seed(7, 0, 0));
    }
}
