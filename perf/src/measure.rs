//! Timing helpers: best of several runs, since on a shared machine the fastest run is the one
//! least disturbed by neighbours.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// Runs `f` `reps` times and returns the shortest duration.
pub fn best_of(reps: usize, mut f: impl FnMut()) -> Duration {
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .expect("at least one run")
}

/// GB/s (10^9 bytes per second).
pub fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// memcpy throughput over `bytes` bytes (source and destination both warm): the reference
/// every other figure is set against.
pub fn memcpy_gbps(bytes: usize, reps: usize) -> f64 {
    let src = vec![0x5au8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src); // fault the pages in before timing
    let d = best_of(reps, || {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    });
    gbps(bytes as u64, d)
}
