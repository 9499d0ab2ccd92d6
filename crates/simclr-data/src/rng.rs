//! Deterministic RNG streams keyed by small tuples of integers.

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// SplitMix64's finaliser: a good 64-bit mixer.
pub(crate) const fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A 64-bit key hashed from `seed` and the parts (order matters).
pub(crate) fn key(seed: u64, parts: &[u64]) -> u64 {
    let mut h = mix64(seed);
    for &p in parts {
        h = mix64(h ^ p);
    }
    h
}

/// A ChaCha8 stream for (`seed`, `parts`): the same numbers on every machine and thread.
pub(crate) fn rng_for(seed: u64, parts: &[u64]) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(key(seed, parts))
}
