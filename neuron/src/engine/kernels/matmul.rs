//! `y = x · Wᵀ` for quantized `W` (n rows of k) and f32 `x` (m rows of k), split over our
//! worker pool (`pool.rs`; the calling thread works too).
//!
//! Each task owns a range of weight rows and walks the activation rows four at a time, so a
//! weight block is unpacked once per four rows while the task's weights stay in cache; decode
//! (m = 1) is the same loop with one row. The quantized activations live in a per-thread buffer
//! that grows to the largest product seen, so steady-state calls allocate nothing but `y`.

use std::cell::RefCell;

use super::blocks::{BlockQ8, QK, QType};
use super::{Level, detected, level, pool, quantize, scalar};

/// Activation rows that share one pass over a weight row.
const TILE: usize = 4;
/// Enough tasks per thread to even out a neighbour stealing a core.
const TASKS_PER_THREAD: usize = 4;
/// Up to this many activation rows, each weight row meets all of them before the next.
const SMALL_M: usize = 16;
/// Weight rows per kernel call: one type dispatch per this many rows, and a stack buffer for
/// their outputs.
const CHUNK: usize = 32;
/// Below this many weight rows per task the hand-off costs more than it saves.
const MIN_ROWS_PER_TASK: usize = 16;

thread_local! {
    static ACTS: RefCell<Vec<BlockQ8>> = const { RefCell::new(Vec::new()) };
}

/// Computes `y[i * n + j] = Σₖ x[i * k + k'] · W[j, k']` where `w` holds `n` rows of `k`
/// weights of type `qtype` in GGUF block layout.
///
/// # Panics
/// If `k` is not a multiple of 32 or a slice length does not match `n`, `k`, `m`.
pub fn matmul(qtype: QType, w: &[u8], n: usize, k: usize, x: &[f32], m: usize, y: &mut [f32]) {
    let bw = qtype.block_weights();
    assert!(k.is_multiple_of(bw), "k = {k} is not a multiple of {bw}");
    assert_eq!(
        w.len(),
        n * qtype.row_bytes(k),
        "weight bytes for {n}x{k} {qtype:?}"
    );
    assert_eq!(x.len(), m * k, "activations for {m}x{k}");
    assert_eq!(y.len(), m * n, "output for {m}x{n}");
    let nb = k / QK;
    ACTS.with_borrow_mut(|acts| {
        if acts.len() < m * nb {
            acts.resize(m * nb, BlockQ8::default());
        }
        let acts = &mut acts[..m * nb];
        for (xr, ar) in x.chunks_exact(k).zip(acts.chunks_exact_mut(nb)) {
            quantize::quantize_row(xr, ar, bw / QK);
        }
        run(qtype, w, n, k, acts, m, y);
    });
}

/// `out[r] = row · acts[r]` with the best kernel this CPU has (any number of rows).
pub fn dot_rows(qtype: QType, row: &[u8], acts: &[&[BlockQ8]], out: &mut [f32]) {
    dot_rows_at(level(), qtype, row, acts, out)
}

/// [`dot_rows`] with the kernels of `lvl`, or of [`detected`] if that is lower (for tests).
pub fn dot_rows_at(lvl: Level, qtype: QType, row: &[u8], acts: &[&[BlockQ8]], out: &mut [f32]) {
    for (a, o) in acts.chunks(TILE).zip(out.chunks_mut(TILE)) {
        dot_many(lvl, qtype, row, row.len(), a, o);
    }
}

/// `out[j * R + r] = row_j · acts[r]` for the consecutive `rb`-byte weight rows in `rows`,
/// `R = acts.len() <= TILE`.
fn dot_many(
    lvl: Level,
    qtype: QType,
    rows: &[u8],
    rb: usize,
    acts: &[&[BlockQ8]],
    out: &mut [f32],
) {
    let lvl = lvl.min(detected());
    #[cfg(target_arch = "x86_64")]
    if lvl >= Level::Avx2 {
        // SAFETY: `detected()` checked the CPU features.
        unsafe { super::avx2::dot_rows(qtype, rows, rb, acts, out, lvl >= Level::Avx512Vnni) };
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = lvl;
    let r = acts.len();
    for (w, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(r)) {
        scalar::dot_rows(qtype, w, acts, o);
    }
}

/// Output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint elements (their own weight rows = output columns).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// A method, not a field access, so closures capture the whole (Sync) wrapper.
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

fn run(qtype: QType, w: &[u8], n: usize, k: usize, acts: &[BlockQ8], m: usize, y: &mut [f32]) {
    let nb = k / QK;
    let rb = qtype.row_bytes(k);
    let threads = candle_core::utils::get_num_threads().max(1);
    let per_task = n
        .div_ceil(threads * TASKS_PER_THREAD)
        .max(MIN_ROWS_PER_TASK)
        .min(n.max(1));
    let tasks = n.div_ceil(per_task);
    let out = Out(y.as_mut_ptr());
    let tile_at = |i0: usize| -> (usize, [&[BlockQ8]; TILE]) {
        let r = TILE.min(m - i0);
        (
            r,
            std::array::from_fn(|i| &acts[(i0 + i.min(r - 1)) * nb..][..nb]),
        )
    };
    let lvl = level();
    // Weight rows `js` times one tile of activation rows, through a stack buffer.
    let chunk = |js: std::ops::Range<usize>, i0: usize, r: usize, a: &[&[BlockQ8]]| {
        let mut buf = [0f32; CHUNK * TILE];
        let len = js.len();
        dot_many(
            lvl,
            qtype,
            &w[js.start * rb..js.end * rb],
            rb,
            a,
            &mut buf[..len * r],
        );
        for (jj, vals) in buf[..len * r].chunks_exact(r).enumerate() {
            for (i, v) in vals.iter().enumerate() {
                // SAFETY: (i0 + i) < m and js.start + jj < n, inside `y`; no other task owns
                // these columns.
                unsafe { *out.at((i0 + i) * n + js.start + jj) = *v };
            }
        }
    };
    let chunks = |rows: std::ops::Range<usize>| {
        (rows.start..rows.end)
            .step_by(CHUNK)
            .map(move |j| j..(j + CHUNK).min(rows.end))
    };
    let task = |t: usize| {
        let rows = t * per_task..((t + 1) * per_task).min(n);
        if m <= SMALL_M {
            // A decode batch: every activation row meets a chunk of weight rows while it is in
            // L1, so the weights stream from memory once per product, not once per tile.
            for js in chunks(rows) {
                for i0 in (0..m).step_by(TILE) {
                    let (r, a) = tile_at(i0);
                    chunk(js.clone(), i0, r, &a[..r]);
                }
            }
        } else {
            // A prompt: the task's weight rows stay in cache while the tiles pass over them.
            for i0 in (0..m).step_by(TILE) {
                let (r, a) = tile_at(i0);
                for js in chunks(rows.clone()) {
                    chunk(js, i0, r, &a[..r]);
                }
            }
        }
    };
    pool::run(tasks, task);
}
