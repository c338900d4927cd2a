//! Seeded, platform-independent randomness.
//!
//! Every random draw in training comes from a seeded stream, never from a thread RNG: data
//! order, LoRA init and sampling from ChaCha streams derived from (seed, purpose, counter);
//! dropout masks from a counter-based hash of (seed, call, element) computed where the tensor
//! lives (`kernels::dropout`). A resumed run replays exactly the same draws from a step number
//! alone, with no RNG state to save.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A ChaCha generator for `(seed, stream)`; distinct streams never overlap.
pub fn stream_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Uniform samples in [-bound, bound).
pub fn uniform_vec(rng: &mut impl Rng, n: usize, bound: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-bound..bound)).collect()
}

/// Normal(0, std) samples (Box-Muller, so the sequence depends on nothing but the RNG).
pub fn normal_vec(rng: &mut impl Rng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out.push((r * t.cos()) as f32 * std);
        out.push((r * t.sin()) as f32 * std);
    }
    out.truncate(n);
    out
}

/// Mixes a few integers into one seed (SplitMix64 finaliser over each), e.g. (seed, step,
/// micro-batch) for a step's dropout stream.
pub fn mix_seed(a: u64, b: u64, c: u64) -> u64 {
    fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    splitmix(splitmix(splitmix(a) ^ b) ^ c)
}
