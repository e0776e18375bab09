//! Stable hashes for buckets, digests and responder selection.
//!
//! FNV-1a 64 followed by the SplitMix64 finaliser: stable across processes, platforms and
//! releases (never `std`'s randomly keyed `DefaultHasher`), and well mixed in every bit.

use chorus_protocol::util::{FNV1A_64_OFFSET as FNV_OFFSET, fnv1a_64_from as fnv1a};

use crate::hlc::Version;

/// SplitMix64 finaliser: spreads every input bit over every output bit.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hash of a key alone (decides its bucket).
pub(crate) fn key_hash(key: &str) -> u64 {
    mix(fnv1a(FNV_OFFSET, key.as_bytes()))
}

/// Bucket of a key among `buckets` buckets (`buckets > 0`).
pub(crate) fn bucket_of(key: &str, buckets: u32) -> u32 {
    // The remainder is < buckets <= u32::MAX, so the cast is lossless.
    (key_hash(key) % u64::from(buckets)) as u32
}

/// Hash of one (key, version, tombstone) triple; bucket hashes are wrapping sums of these,
/// so they do not depend on insertion order and can be updated incrementally.
pub(crate) fn entry_hash(key: &str, version: Version, tombstone: bool) -> u64 {
    let mut h = fnv1a(FNV_OFFSET, key.as_bytes());
    h = fnv1a(h, &[0xff]);
    h = fnv1a(h, &version.hlc.0.to_le_bytes());
    h = fnv1a(h, &version.node.to_le_bytes());
    h = fnv1a(h, &[u8::from(tombstone)]);
    let h = mix(h);
    // Never 0, so a non-empty bucket is distinguishable from an empty one (sum 0) except
    // for sums that wrap to exactly 0, which is negligible.
    if h == 0 { 1 } else { h }
}

/// Rendezvous (highest random weight) score of `candidate` for the triple
/// (`requester`, `round`, `bucket`).
pub(crate) fn rendezvous(requester: u64, round: u64, bucket: u32, candidate: u64) -> u64 {
    let mut h = fnv1a(FNV_OFFSET, &requester.to_le_bytes());
    h = fnv1a(h, &round.to_le_bytes());
    h = fnv1a(h, &bucket.to_le_bytes());
    h = fnv1a(h, &candidate.to_le_bytes());
    mix(h)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;

    #[test]
    fn hashes_are_stable_constants() {
        // Pinned values: a change here changes the wire meaning of digests.
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(key_hash("a"), mix(0xaf63_dc4c_8601_ec8c));
        assert_eq!(bucket_of("a", 1), 0);
    }

    #[test]
    fn entry_hash_depends_on_every_field() {
        let v = Version {
            hlc: Hlc::new(1, 0),
            node: 1,
        };
        let base = entry_hash("k", v, false);
        assert_ne!(base, entry_hash("k2", v, false));
        assert_ne!(base, entry_hash("k", Version { node: 2, ..v }, false));
        assert_ne!(
            base,
            entry_hash(
                "k",
                Version {
                    hlc: Hlc::new(1, 1),
                    ..v
                },
                false
            )
        );
        assert_ne!(base, entry_hash("k", v, true));
    }

    #[test]
    fn buckets_spread_keys() {
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[bucket_of(&format!("key/{i}"), 16) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven bucket: {counts:?}");
        }
    }
}
