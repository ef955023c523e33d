//! Seeded randomness for tests that must hold for every input they generate: a small,
//! deterministic generator (splitmix64) and a seed taken from `IMA_SEED` or the clock,
//! to be printed so a failure can be replayed.

use std::time::{SystemTime, UNIX_EPOCH};

/// splitmix64: tiny, deterministic, good enough to pick test cases and timings.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0; the modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// `IMA_SEED` when set (decimal), else one from the clock, short enough to type.
pub fn seed_from_env() -> u64 {
    std::env::var("IMA_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64 % 1_000_000_000_000)
        })
}
