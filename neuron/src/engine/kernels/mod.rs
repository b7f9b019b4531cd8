//! Quantized matrix products on the CPU, our own where candle's are slow (docs/candle-notes.md: Q4_1 has
//! no run-time SIMD path, prompts run one dot product per row).
//!
//! As in llama.cpp, the activations are quantized to 8-bit blocks once per product and every
//! weight block meets them in an integer dot product; SIMD is chosen at run time
//! (AVX-512 VNNI, AVX2, NEON with `sdot` on arm64, else portable code) so one binary is fast on
//! every host.
//!
//! ```text
//! let mut y = vec![0f32; m * n];
//! let w = Weights::new(QType::Q4_0, weight_bytes, n, k);
//! kernels::matmul(&w, &x, m, &mut y);
//! ```

#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod blocks;
mod matmul;
#[cfg(target_arch = "aarch64")]
mod neon;
mod pool;
pub mod quantize;
pub mod scalar;
mod weights;

use std::sync::OnceLock;

pub use blocks::{BlockQ8, QK, QType};
pub use matmul::{dot_all_at, dot_rows, dot_rows_at, matmul, matmul_many};
pub use weights::{GROUP, Weights, interleaves};

/// Calls `f(0..tasks)` once per task over the kernel workers and the calling thread (see
/// `pool.rs`), for other CPU loops of the forward pass that split the same way.
pub fn parallel<F: Fn(usize) + Sync>(tasks: usize, f: F) {
    pool::run(tasks, f)
}

/// Threads a [`parallel`] call runs on (the workers and the caller).
pub fn threads() -> usize {
    pool::threads()
}

/// An output buffer shared by the tasks of one [`parallel`] call, each of which writes only
/// elements no other task writes (its own rows, columns or chunk).
#[derive(Clone, Copy)]
pub struct Out(pub *mut f32);
// SAFETY: the tasks sharing one write disjoint elements, and the buffer outlives the call.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// A method, not a field access, so closures capture the whole (Sync) wrapper.
    pub fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// The instruction sets a kernel may use, best last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Scalar,
    /// Arm64 NEON with the dot-product extension (interleaved rows of every type; the few rows
    /// past a projection's last group of eight portable).
    Neon,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX2 plus AVX-512 F/VL/VNNI (`vpdpbusd` on 256-bit vectors).
    Avx512Vnni,
}

/// What this CPU supports, capped by `CORTEX_KERNELS` (`scalar`, `avx2`; for comparisons).
/// Levels of the other architecture never come out of [`detected`].
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("CORTEX_KERNELS").as_deref() {
            Ok("scalar") => Level::Scalar,
            Ok("avx2") => Level::Avx2,
            _ => Level::Avx512Vnni,
        };
        detected().min(cap)
    })
}

/// False when `CORTEX_KERNELS=candle`: every product then goes through candle's `QMatMul`,
/// which is how the benchmark measures candle as it is.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("CORTEX_KERNELS").as_deref() != Ok("candle"))
}

/// The best level this CPU runs.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let vnni = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        match (avx2, vnni) {
            (true, true) => Level::Avx512Vnni,
            (true, false) => Level::Avx2,
            _ => Level::Scalar,
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            Level::Neon
        } else {
            Level::Scalar
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    Level::Scalar
}
