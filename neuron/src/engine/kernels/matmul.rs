//! `y = x · Wᵀ` for quantized `W` (n rows of k) and f32 `x` (m rows of k), split over our
//! worker pool (`pool.rs`; the calling thread works too).
//!
//! Each task owns a range of weight rows and walks the activation rows four at a time (eight
//! where the kernel has the registers: Q4_0, Q4_1 and Q8_0 with AVX-512 VNNI), so a weight block
//! is unpacked once per tile of rows while the task's weights stay in cache; decode
//! (m = 1) is the same loop with one row. The quantized activations live in a per-thread buffer
//! that grows to the largest product seen, so steady-state calls allocate nothing but `y`.

use std::cell::RefCell;

use super::blocks::{BlockQ8, QK, QType};
use super::weights::{GROUP, Weights, dot_groups_scalar};
use super::{Level, Out, detected, level, pool, quantize, scalar};

/// Activation rows that share one pass over a weight row.
const TILE: usize = 4;
/// A decode batch of this many rows takes one pass where the kernel allows (`wide`).
const WIDE_TILE: usize = 8;
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

/// Computes `y[i * n + j] = Σₖ x[i * k + k'] · W[j, k']` for the `n` rows of `k` weights in `w`.
///
/// # Panics
/// If a slice length does not match `n`, `k`, `m`.
pub fn matmul(w: &Weights, x: &[f32], m: usize, y: &mut [f32]) {
    let (n, k) = (w.n(), w.k());
    assert_eq!(x.len(), m * k, "activations for {m}x{k}");
    assert_eq!(y.len(), m * n, "output for {m}x{n}");
    let nb = k / QK;
    let group = w.qtype().block_weights() / QK;
    ACTS.with_borrow_mut(|acts| {
        if acts.len() < m * nb {
            acts.resize(m * nb, BlockQ8::default());
        }
        let acts = &mut acts[..m * nb];
        for (xr, ar) in x.chunks_exact(k).zip(acts.chunks_exact_mut(nb)) {
            quantize::quantize_row(xr, ar, group);
        }
        run(w, acts, m, y);
    });
}

/// `out[r * n + j] = row_j · acts[r]` for every row of `w` with the kernels of `lvl` (or of
/// [`detected`] if that is lower), on one thread: what [`matmul`] computes once the activations
/// are quantized (for tests).
pub fn dot_all_at(lvl: Level, w: &Weights, acts: &[&[BlockQ8]], out: &mut [f32]) {
    let n = w.n();
    for (i0, a) in (0..acts.len()).step_by(TILE).zip(acts.chunks(TILE)) {
        let mut buf = vec![0f32; n * a.len()];
        rows_into(
            lvl,
            w,
            0..n,
            a,
            &mut buf,
            acts.len() > SMALL_M,
            |j, r, v| out[(i0 + r) * n + j..][..v.len()].copy_from_slice(v),
        );
    }
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

/// Products of weight rows `js` with up to [`TILE`] activation rows, handed to `put(j, r, v)`
/// (`v[i]` is row `j + i`'s product with activation row `r`: eight at a time from the
/// interleaved groups, one at a time after them);
/// `buf` holds at least `js.len() * acts.len()` floats. `js.start` is a multiple of [`GROUP`]
/// where it is below `w.packed()`.
fn rows_into(
    lvl: Level,
    w: &Weights,
    js: std::ops::Range<usize>,
    acts: &[&[BlockQ8]],
    buf: &mut [f32],
    prompt: bool,
    mut put: impl FnMut(usize, usize, &[f32]),
) {
    let r = acts.len();
    let split = js.end.min(w.packed()).max(js.start);
    if split > js.start {
        let groups = w.groups(js.start / GROUP..split / GROUP);
        let out = &mut buf[..(split - js.start) * r];
        dot_groups(lvl, w, groups, acts, out, prompt);
        for (g, vals) in out.chunks_exact(GROUP * r).enumerate() {
            for (ri, v8) in vals.chunks_exact(GROUP).enumerate() {
                put(js.start + g * GROUP, ri, v8);
            }
        }
    }
    if js.end > split {
        // The rows after the last whole group, [`TILE`] activation rows at a time.
        let rb = w.row_bytes();
        for (t, a) in acts.chunks(TILE).enumerate() {
            let r = a.len();
            let out = &mut buf[..(js.end - split) * r];
            dot_many(lvl, w.qtype(), w.gguf_rows(split..js.end), rb, a, out);
            for (jj, vals) in out.chunks_exact(r).enumerate() {
                for (ri, v) in vals.iter().enumerate() {
                    put(split + jj, t * TILE + ri, std::slice::from_ref(v));
                }
            }
        }
    }
}

/// Interleaved groups of `w` times up to [`TILE`] activation rows: `out[g * 8R + r * 8 + i]`.
/// `prompt`: part of a product of more than [`SMALL_M`] rows, where 512-bit registers over two
/// groups at a time pay (the same bits either way).
fn dot_groups(
    lvl: Level,
    w: &Weights,
    groups: &[u8],
    acts: &[&[BlockQ8]],
    out: &mut [f32],
    prompt: bool,
) {
    let lvl = lvl.min(detected());
    // Blocks (super-blocks for the K-quants) per row.
    let nb = w.k() / w.qtype().block_weights();
    #[cfg(target_arch = "x86_64")]
    if lvl >= Level::Avx2 {
        // SAFETY: `detected()` checked the CPU features.
        unsafe {
            let vnni = lvl >= Level::Avx512Vnni;
            super::avx2::dot_groups(w.qtype(), groups, nb, acts, out, vnni, prompt)
        };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    if lvl == Level::Neon {
        // SAFETY: `detected()` checked NEON and the dot-product extension.
        unsafe { super::neon::dot_groups(w.qtype(), groups, nb, acts, out) };
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (lvl, nb, prompt);
    dot_groups_scalar(w, groups, acts, out)
}

/// Whether the kernels of `lvl` take [`WIDE_TILE`] activation rows at once for `w`.
fn wide(lvl: Level, w: &Weights) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let lvl = lvl.min(detected());
        super::avx2::wide_tile(w.qtype(), lvl >= Level::Avx512Vnni)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (lvl, w);
        false
    }
}

fn run(w: &Weights, acts: &[BlockQ8], m: usize, y: &mut [f32]) {
    let (per_task, tasks) = split(w.n());
    let (out, lvl) = (Out(y.as_mut_ptr()), level());
    pool::run(tasks, |t| task(lvl, w, acts, m, out, per_task, t));
}

/// [`matmul`] of one input by several weight matrices of the same width (a layer's query, key
/// and value projections, or its gate and up): `ys[i]` gets `x · ws[i]ᵀ`. The input is quantized
/// once and every product's tasks go to the pool in one hand-off, so small matrices do not each
/// pay for a quantization and a wait on the pool. Each output is what [`matmul`] gives.
///
/// # Panics
/// If the matrices differ in width or activation grouping, or a slice length does not match.
pub fn matmul_many(ws: &[&Weights], x: &[f32], m: usize, ys: &mut [&mut [f32]]) {
    let Some(first) = ws.first() else { return };
    let (k, bw) = (first.k(), first.qtype().block_weights());
    assert!(
        ws.iter()
            .all(|w| w.k() == k && w.qtype().block_weights() == bw),
        "matmul_many takes matrices of one width and grouping"
    );
    assert_eq!(x.len(), m * k, "activations for {m}x{k}");
    assert_eq!(ws.len(), ys.len(), "an output per matrix");
    for (w, y) in ws.iter().zip(ys.iter()) {
        assert_eq!(y.len(), m * w.n(), "output for {m}x{}", w.n());
    }
    let nb = k / QK;
    ACTS.with_borrow_mut(|acts| {
        if acts.len() < m * nb {
            acts.resize(m * nb, BlockQ8::default());
        }
        let acts = &mut acts[..m * nb];
        for (xr, ar) in x.chunks_exact(k).zip(acts.chunks_exact_mut(nb)) {
            quantize::quantize_row(xr, ar, bw / QK);
        }
        let acts = &*acts;
        let splits: Vec<(usize, usize)> = ws.iter().map(|w| split(w.n())).collect();
        let outs: Vec<Out> = ys.iter_mut().map(|y| Out(y.as_mut_ptr())).collect();
        let lvl = level();
        pool::run(splits.iter().map(|s| s.1).sum(), |mut t| {
            for ((w, &(per_task, tasks)), &out) in ws.iter().zip(&splits).zip(&outs) {
                if t < tasks {
                    return task(lvl, w, acts, m, out, per_task, t);
                }
                t -= tasks;
            }
        });
    });
}

/// How the `n` rows of a product split over the pool: `(rows per task, tasks)`, whole groups of
/// interleaved rows per task.
fn split(n: usize) -> (usize, usize) {
    let per_task = n
        .div_ceil(pool::threads() * TASKS_PER_THREAD)
        .max(MIN_ROWS_PER_TASK)
        .next_multiple_of(GROUP)
        .min(n.max(1));
    (per_task, n.div_ceil(per_task))
}

/// Task `t` of the product of `w` by the `m` rows of `acts`: weight rows
/// `t * per_task..(t + 1) * per_task`, written into `out` (`m` rows of `w.n()`).
fn task(lvl: Level, w: &Weights, acts: &[BlockQ8], m: usize, out: Out, per_task: usize, t: usize) {
    let (n, nb) = (w.n(), w.k() / QK);
    // The activation rows in tiles: (first row, rows), eight at a time where the kernel takes
    // eight, then four at a time.
    let wide = wide(lvl, w);
    let tiles = || {
        let mut i0 = 0;
        std::iter::from_fn(move || {
            (i0 < m).then(|| {
                let r = if wide && m - i0 >= WIDE_TILE {
                    WIDE_TILE
                } else {
                    TILE.min(m - i0)
                };
                i0 += r;
                (i0 - r, r)
            })
        })
    };
    // Weight rows `js` times the tile of `r` activation rows from `i0`, through a stack buffer.
    let chunk = |js: std::ops::Range<usize>, (i0, r): (usize, usize)| {
        let a: [&[BlockQ8]; WIDE_TILE] =
            std::array::from_fn(|i| &acts[(i0 + i.min(r - 1)) * nb..][..nb]);
        let mut buf = [0f32; CHUNK * WIDE_TILE];
        rows_into(lvl, w, js, &a[..r], &mut buf, m > SMALL_M, |j, i, v| {
            // SAFETY: (i0 + i) < m and j + v.len() <= n, inside the output; no other task owns
            // these columns.
            unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out.at((i0 + i) * n + j), v.len()) };
        });
    };
    let chunks = |rows: std::ops::Range<usize>| {
        (rows.start..rows.end)
            .step_by(CHUNK)
            .map(move |j| j..(j + CHUNK).min(rows.end))
    };
    let rows = t * per_task..((t + 1) * per_task).min(n);
    if m <= SMALL_M {
        // A decode batch: every activation row meets a chunk of weight rows while it is in
        // L1, so the weights stream from memory once per product, not once per tile.
        for js in chunks(rows) {
            for tile in tiles() {
                chunk(js.clone(), tile);
            }
        }
    } else {
        // A prompt: the task's weight rows stay in cache while the tiles pass over them.
        for tile in tiles() {
            for js in chunks(rows.clone()) {
                chunk(js, tile);
            }
        }
    }
}
