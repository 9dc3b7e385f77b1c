//! Seeded randomness: every random draw in curec comes from a stream named by (seed, purpose,
//! record key), so results do not depend on the order streams are drawn in or on which worker
//! draws them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A deterministic RNG for one purpose, derived from (seed, stream, index): results do not
/// depend on the order in which streams are drawn (or on which worker draws them).
pub fn rng_for(seed: u64, stream: u64, index: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.set_stream(index);
    r
}

/// One draw from N(0, 1) (Box–Muller).
pub fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    // Box–Muller; u1 in (0, 1] so the log is finite.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}
