//! Helpers shared by the property tests: their proptest configuration and
//! the seeded generator that draws delivery orders.
#![allow(dead_code)] // each test file uses a subset

use proptest::test_runner::{Config as ProptestConfig, FileFailurePersistence};

/// `PROPTEST_CASES` cases (`default` without it), with failures kept in
/// `file` (relative to the package root, the tests' working directory).
pub fn config(file: &'static str, default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(file))),
        ..ProptestConfig::default()
    }
}

/// SplitMix64: delivery orders are drawn from a seed proptest supplies.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }
}
