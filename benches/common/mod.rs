//! What the bench binaries share: their environment knobs, the median,
//! the seeded generator and the events' payloads. Each bench includes it
//! with `#[path = "common/mod.rs"] mod common;` and uses part of it (it
//! sits in a folder so that cargo does not take it for a bench).
#![allow(dead_code)]

use anyhow::Result;

/// Payload size of every event the benches append.
pub const PAYLOAD_BYTES: usize = 256;

/// The value of the environment variable `name`, or `default` when unset.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

/// The median of `runs` (the mean of the middle two for an even count).
pub fn median(runs: &[f64]) -> f64 {
    let mut v = runs.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// SplitMix64: the benches' seeded generator.
pub fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The payload of event `i`: [`PAYLOAD_BYTES`] seeded bytes.
pub fn payload(i: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAYLOAD_BYTES];
    for (j, chunk) in p.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&splitmix(i ^ ((j as u64) << 48)).to_le_bytes());
    }
    p
}
