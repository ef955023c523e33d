//! Seeded, reproducible choices for property tests: a seed from `IMA_SEED` (printed by
//! the caller so a failure can be replayed) or from the clock, and a tiny generator.

use std::time::{SystemTime, UNIX_EPOCH};

/// splitmix64: tiny, deterministic, good enough to pick test cases.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The generator of case `index` of `seed`: cases can be replayed one by one.
    pub fn for_case(seed: u64, index: usize) -> Rng {
        Rng(seed ^ (index as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// `IMA_SEED` (decimal or 0x-hex) when set and not empty, else one from the clock; the
/// caller prints it.
pub fn seed() -> u64 {
    match std::env::var("IMA_SEED") {
        Ok(text) if !text.trim().is_empty() => {
            let text = text.trim();
            match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            }
            .unwrap_or_else(|_| panic!("IMA_SEED={text:?} is not a number"))
        }
        _ => {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            // Short enough to type, different per run.
            (nanos ^ u64::from(std::process::id()).rotate_left(32)) % 1_000_000_000_000
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_choices() {
        let (mut a, mut b) = (Rng::new(42), Rng::new(42));
        let first: Vec<u64> = (0..5).map(|_| a.below(1000)).collect();
        let second: Vec<u64> = (0..5).map(|_| b.below(1000)).collect();
        assert_eq!(first, second);
        assert!(first.iter().all(|v| *v < 1000));
    }
}
