//! What the timing examples share.

use std::time::Instant;

/// Seconds per call of `f`: the best of five rounds of `iters` calls (after one call to warm
/// up), the round least disturbed by neighbours on shared cores.
pub fn best_of_five(mut f: impl FnMut(), iters: usize) -> f64 {
    f();
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() / iters as f64
        })
        .fold(f64::INFINITY, f64::min)
}
