//! Attention of each token of a batch over its sequence's cached keys and values, on the CPU:
//! decoded tokens and prompt tokens alike, every sequence at once, tiled as flash attention is.
//!
//! A task is one sequence's run of up to [`QUERY_TILE`]-ish query positions and one KV head
//! (all the query heads that share it). It walks the keys one cache block ([`BLOCK`] positions)
//! at a time: the block's keys and values are converted from f16 once for all of the task's
//! query rows, the scores of the tile come from a register-blocked product, and an online
//! softmax (running maximum and sum per row) folds the tile into each row's output. No score
//! matrix longer than one block exists, and a long prompt's keys are read once per query tile
//! instead of once per query.
//!
//! A row's numbers never depend on which other rows share its task, or on whether it was
//! decoded or read as part of a prompt: its score for a key is one chain of fused
//! multiply-adds over the dimensions, its tiles are the cache blocks (fixed positions), masked
//! keys weigh exactly zero, and every sum over a tile has the same shape. So a token's keys and
//! values are the same bits whichever pass computed them, which is what lets the prefix cache
//! hand one sequence's blocks to another (`scheduler.rs`), and a sequence read again after a
//! preemption gets back the very numbers it had.

use std::cell::RefCell;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::kernels;
use super::kv_cache::BLOCK;

/// Query rows (positions × heads of one KV head) a task aims for: enough that a block's
/// conversion and reading are shared widely, few enough that the rows' outputs stay in cache.
const TASK_ROWS: usize = 36;

/// Rows of the score and output products held in registers at once.
const MR: usize = 6;

/// Shapes shared by every row.
#[derive(Clone, Copy)]
pub struct Heads {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// One layer's keys and values of one cache block: keys `[kv_head][dim][position]`, values
/// `[kv_head][position][dim]` (see `kv_store.rs`).
#[derive(Clone, Copy)]
pub struct BlockKv<'a> {
    pub k: &'a [f16],
    pub v: &'a [f16],
}

/// One sequence's tokens in the batch.
pub struct Span<'a> {
    /// The first token's row in the batch's queries and output.
    pub offset: usize,
    pub len: usize,
    /// The first token's position in its sequence.
    pub pos: usize,
    /// A sliding layer's window: a query at `p` sees keys `p + 1 - window..=p`.
    pub window: Option<usize>,
    /// The sequence's blocks, position 0 on, covering at least `pos + len` positions.
    pub blocks: Vec<BlockKv<'a>>,
}

/// The first position a query at `pos` sees.
pub fn window_start(window: Option<usize>, pos: usize) -> usize {
    match window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    }
}

#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    acc: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
    scores: Vec<f32>,
    keys: Vec<f32>,
    values: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// `q`: the batch's queries, `(tokens, n_head, head_dim)` row-major (as the projection and the
/// rotation leave them). Writes each span's attention output into `out` at `(token, n_head *
/// head_dim)`; rows of tokens in no span are untouched.
pub fn attend(q: &[f32], tokens: usize, spans: &[Span<'_>], h: Heads, out: &mut [f32]) {
    let (hd, nkv) = (h.head_dim, h.n_kv_head);
    let rep = h.n_head / nkv;
    assert_eq!(q.len(), tokens * h.n_head * hd, "queries");
    assert_eq!(out.len(), tokens * h.n_head * hd, "output");
    // Whole groups of MR rows where the heads allow (12 queries of 3 heads, 9 of 4).
    let group = (1..=MR).find(|q| (q * rep).is_multiple_of(MR)).unwrap_or(1);
    let per_task = (TASK_ROWS / rep / group * group).max(1);
    let mut tasks = Vec::new();
    for (si, sp) in spans.iter().enumerate() {
        assert!(sp.offset + sp.len <= tokens, "span rows");
        assert!(sp.blocks.len() * BLOCK >= sp.pos + sp.len, "span blocks");
        for b in &sp.blocks {
            assert!(b.k.len() >= nkv * hd * BLOCK && b.v.len() >= nkv * hd * BLOCK);
        }
        for g in 0..nkv {
            let mut i = 0;
            while i < sp.len {
                let n = per_task.min(sp.len - i);
                tasks.push((si, g, i, i + n));
                i += n;
            }
        }
    }
    let dst = kernels::Out(out.as_mut_ptr());
    kernels::parallel(tasks.len(), |t| {
        let (si, g, i0, i1) = tasks[t];
        SCRATCH.with_borrow_mut(|s| task(q, &spans[si], g, i0..i1, h, s, dst));
    });
}

/// Queries `rows` of span `sp` against KV head `g`.
fn task(
    q: &[f32],
    sp: &Span<'_>,
    g: usize,
    rows: std::ops::Range<usize>,
    h: Heads,
    s: &mut Scratch,
    out: kernels::Out,
) {
    let (hd, nh) = (h.head_dim, h.n_head);
    let rep = nh / h.n_kv_head;
    let nq = rows.len();
    let r = nq * rep;
    // Row `i * rep + j`: query position `sp.pos + rows.start + i`, head `g * rep + j`.
    s.q.clear();
    for i in rows.clone() {
        let at = ((sp.offset + i) * nh + g * rep) * hd;
        s.q.extend_from_slice(&q[at..][..rep * hd]);
    }
    s.acc.clear();
    s.acc.resize(r * hd, 0.0);
    s.max.clear();
    s.max.resize(r, f32::NEG_INFINITY);
    s.sum.clear();
    s.sum.resize(r, 0.0);
    s.scores.resize(r * BLOCK, 0.0);
    s.keys.resize(hd * BLOCK, 0.0);
    s.values.resize(BLOCK * hd, 0.0);
    let pos_of = |row: usize| sp.pos + rows.start + row / rep;
    let first = window_start(sp.window, pos_of(0));
    let last = pos_of(r - 1);
    for b in first / BLOCK..=last / BLOCK {
        let base = b * BLOCK;
        // Each row's visible keys in this block, `lo..hi` (empty: the row skips the block).
        let range = |row: usize| {
            let p = pos_of(row);
            let lo = window_start(sp.window, p).max(base) - base;
            let hi = (p + 1).min(base + BLOCK).saturating_sub(base);
            (lo, hi.max(lo))
        };
        let (mut jlo, mut jhi) = (BLOCK, 0);
        for row in 0..r {
            let (lo, hi) = range(row);
            if lo < hi {
                jlo = jlo.min(lo);
                jhi = jhi.max(hi);
            }
        }
        if jlo >= jhi {
            continue;
        }
        let blk = sp.blocks[b];
        // Positions past `jhi` may not be written yet: only `jlo..jhi` of the values is read.
        let kt = &blk.k[g * hd * BLOCK..][..hd * BLOCK];
        let vs = &blk.v[g * BLOCK * hd..][..BLOCK * hd];
        let kv = Tile::new(kt, vs, jlo..jhi, hd, &mut s.keys, &mut s.values);
        scores(&s.q, &kv, hd, r, &mut s.scores);
        for row in 0..r {
            let (lo, hi) = range(row);
            let p = &mut s.scores[row * BLOCK..][..BLOCK];
            if lo >= hi {
                p.fill(0.0);
                continue;
            }
            let alpha = softmax_tile(p, h.scale, lo, hi, &mut s.max[row], &mut s.sum[row]);
            s.acc[row * hd..][..hd].iter_mut().for_each(|a| *a *= alpha);
        }
        weigh_values(&s.scores, &kv, hd, r, jlo..jhi, &mut s.acc);
    }
    let width = nh * hd;
    for row in 0..r {
        let (i, j) = (row / rep, row % rep);
        let inv = 1.0 / s.sum[row];
        let at = (sp.offset + rows.start + i) * width + (g * rep + j) * hd;
        // SAFETY: the heads of KV head g at this task's tokens are this task's alone: `hd`
        // floats inside `out` (the caller checked its length).
        let o = unsafe { std::slice::from_raw_parts_mut(out.at(at), hd) };
        for (o, a) in o.iter_mut().zip(&s.acc[row * hd..][..hd]) {
            *o = a * inv;
        }
    }
}

/// One block's keys and values for a task: read as f16 where the products convert as they go
/// (AVX2's `vcvtph2ps` runs beside the multiply-adds), else converted to f32 once.
enum Tile<'a> {
    #[allow(dead_code)]
    Half { k: &'a [f16], v: &'a [f16] },
    #[allow(dead_code)]
    Float { k: &'a [f32], v: &'a [f32] },
}

impl<'a> Tile<'a> {
    fn new(
        k: &'a [f16],
        v: &'a [f16],
        range: std::ops::Range<usize>,
        hd: usize,
        kbuf: &'a mut [f32],
        vbuf: &'a mut [f32],
    ) -> Self {
        if cfg!(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        )) {
            let _ = (range, hd, kbuf, vbuf);
            Tile::Half { k, v }
        } else {
            k.convert_to_f32_slice(kbuf);
            let r = range.start * hd..range.end * hd;
            v[r.clone()].convert_to_f32_slice(&mut vbuf[r]);
            Tile::Float { k: kbuf, v: vbuf }
        }
    }
}

/// `scores[row][j] = q[row] · keys[:, j]` for every row and the block's `BLOCK` positions, each
/// one chain of fused multiply-adds over the dimensions in order.
fn scores(q: &[f32], keys: &Tile<'_>, hd: usize, rows: usize, out: &mut [f32]) {
    let mut r0 = 0;
    while r0 < rows {
        let n = MR.min(rows - r0);
        let (q, out) = (&q[r0 * hd..][..n * hd], &mut out[r0 * BLOCK..][..n * BLOCK]);
        match n {
            6 => scores_rows::<6>(q, keys, hd, out),
            5 => scores_rows::<5>(q, keys, hd, out),
            4 => scores_rows::<4>(q, keys, hd, out),
            3 => scores_rows::<3>(q, keys, hd, out),
            2 => scores_rows::<2>(q, keys, hd, out),
            _ => scores_rows::<1>(q, keys, hd, out),
        }
        r0 += n;
    }
}

/// Lanes of one register-held slice of a row (two AVX2 registers).
const LANES: usize = 16;

#[inline(always)]
fn scores_rows<const N: usize>(q: &[f32], keys: &Tile<'_>, hd: usize, out: &mut [f32]) {
    assert!(q.len() >= N * hd && out.len() >= N * BLOCK);
    match *keys {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        Tile::Half { k, .. } => {
            assert!(k.len() >= hd * BLOCK);
            // SAFETY: AVX2, FMA and F16C are in the build's target; bounds checked above.
            unsafe { avx2::scores_rows::<N>(q, k, hd, out) }
        }
        Tile::Float { k, .. } => scores_rows_portable::<N>(q, k, hd, out),
        #[allow(unreachable_patterns)]
        _ => unreachable!("f16 tiles only where AVX2 reads them"),
    }
}

/// [`scores_rows`] in portable code (the same fused multiply-adds, in the same order).
#[allow(dead_code)]
#[inline(always)]
fn scores_rows_portable<const N: usize>(q: &[f32], keys: &[f32], hd: usize, out: &mut [f32]) {
    for j0 in (0..BLOCK).step_by(LANES) {
        let mut acc = [[0f32; LANES]; N];
        for (d, krow) in keys.chunks_exact(BLOCK).take(hd).enumerate() {
            let k: &[f32; LANES] = krow[j0..j0 + LANES].try_into().expect("lanes");
            for (i, a) in acc.iter_mut().enumerate() {
                let x = q[i * hd + d];
                for l in 0..LANES {
                    a[l] = x.mul_add(k[l], a[l]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            out[i * BLOCK + j0..][..LANES].copy_from_slice(a);
        }
    }
}

/// Folds one row's scores of a block (visible `lo..hi`) into its running maximum and sum:
/// leaves the row's weights in `p` (zero where masked) and returns the factor its output so
/// far is to be scaled by.
#[inline(always)]
fn softmax_tile(
    p: &mut [f32],
    scale: f32,
    lo: usize,
    hi: usize,
    max: &mut f32,
    sum: &mut f32,
) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        assert!(p.len() == BLOCK && lo < hi && hi <= BLOCK);
        // SAFETY: AVX2 and FMA are in the build's target; `p` holds BLOCK lanes.
        unsafe { avx2::softmax_tile(p, scale, lo, hi, max, sum) }
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    softmax_tile_portable(p, scale, lo, hi, max, sum)
}

#[allow(dead_code)]
#[inline(always)]
fn softmax_tile_portable(
    p: &mut [f32],
    scale: f32,
    lo: usize,
    hi: usize,
    max: &mut f32,
    sum: &mut f32,
) -> f32 {
    p.iter_mut().for_each(|v| *v *= scale);
    let tile_max = p[lo..hi].iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let new_max = max.max(tile_max);
    let alpha = (*max - new_max).exp();
    let mut sums = [0f32; 8];
    for (c, chunk) in p.chunks_exact_mut(8).enumerate() {
        let mut x = [0f32; 8];
        for l in 0..8 {
            x[l] = chunk[l] - new_max;
        }
        let e = exp8(x);
        for l in 0..8 {
            let j = c * 8 + l;
            let w = if j >= lo && j < hi { e[l] } else { 0.0 };
            chunk[l] = w;
            sums[l] += w;
        }
    }
    let tile_sum =
        ((sums[0] + sums[4]) + (sums[1] + sums[5])) + ((sums[2] + sums[6]) + (sums[3] + sums[7]));
    *sum = *sum * alpha + tile_sum;
    *max = new_max;
    alpha
}

/// `e^x` of eight lanes, to about 2 ulp for the range attention sees (x <= 0), branch-free so
/// it compiles to vector code (as llama.cpp's `ggml_v_expf`). Lanes below -87 give 0.
#[inline(always)]
fn exp8(x: [f32; 8]) -> [f32; 8] {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        let mut out = [0f32; 8];
        // SAFETY: AVX2 and FMA are in the build's target; both arrays hold eight lanes.
        unsafe {
            use std::arch::x86_64::*;
            _mm256_storeu_ps(out.as_mut_ptr(), avx2::exp(_mm256_loadu_ps(x.as_ptr())));
        }
        out
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    exp8_portable(x)
}

#[allow(dead_code)]
#[inline(always)]
fn exp8_portable(x: [f32; 8]) -> [f32; 8] {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let mut out = [0f32; 8];
    for l in 0..8 {
        let v = x[l].clamp(-87.0, 88.0);
        let n = (v * LOG2E + ROUND) - ROUND;
        let r = v - n * LN2_HI - n * LN2_LO;
        // Minimax polynomial for e^r on [-ln2/2, ln2/2] (Cephes expf).
        let mut p = 1.987_569_1e-4f32;
        p = p.mul_add(r, 1.398_199_9e-3);
        p = p.mul_add(r, 8.333_452e-3);
        p = p.mul_add(r, 4.166_579_6e-2);
        p = p.mul_add(r, 1.666_666_5e-1);
        p = p.mul_add(r, 0.5);
        let e = (p * r).mul_add(r, r) + 1.0;
        let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
        out[l] = if x[l] < -87.0 { 0.0 } else { e * scale };
    }
    out
}

/// `acc[row] += Σⱼ p[row][j] · values[j]` over `j` in `range`, in order, for every row.
fn weigh_values(
    p: &[f32],
    values: &Tile<'_>,
    hd: usize,
    rows: usize,
    range: std::ops::Range<usize>,
    acc: &mut [f32],
) {
    let mut r0 = 0;
    while r0 < rows {
        let n = MR.min(rows - r0);
        let (p, acc) = (&p[r0 * BLOCK..][..n * BLOCK], &mut acc[r0 * hd..][..n * hd]);
        match n {
            6 => weigh_rows::<6>(p, values, hd, range.clone(), acc),
            5 => weigh_rows::<5>(p, values, hd, range.clone(), acc),
            4 => weigh_rows::<4>(p, values, hd, range.clone(), acc),
            3 => weigh_rows::<3>(p, values, hd, range.clone(), acc),
            2 => weigh_rows::<2>(p, values, hd, range.clone(), acc),
            _ => weigh_rows::<1>(p, values, hd, range.clone(), acc),
        }
        r0 += n;
    }
}

#[inline(always)]
fn weigh_rows<const N: usize>(
    p: &[f32],
    values: &Tile<'_>,
    hd: usize,
    range: std::ops::Range<usize>,
    acc: &mut [f32],
) {
    assert!(p.len() >= N * BLOCK && acc.len() >= N * hd);
    match *values {
        #[cfg(all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "f16c"
        ))]
        Tile::Half { v, .. } => {
            assert!(v.len() >= range.end * hd);
            let mut c0 = 0;
            while c0 + LANES <= hd {
                // SAFETY: AVX2, FMA and F16C are in the build's target; columns c0..c0 + 16
                // are inside every row and the bounds of `p`, `v` and `acc` are checked above.
                unsafe { avx2::weigh_columns::<N>(p, v, hd, range.clone(), c0, acc) };
                c0 += LANES;
            }
            // Head sizes that are not a multiple of the lanes: the last columns one at a time.
            for c in c0..hd {
                for i in 0..N {
                    let mut a = acc[i * hd + c];
                    for j in range.clone() {
                        a = p[i * BLOCK + j].mul_add(v[j * hd + c].to_f32(), a);
                    }
                    acc[i * hd + c] = a;
                }
            }
        }
        Tile::Float { v, .. } => weigh_rows_portable::<N>(p, v, hd, range, acc),
        #[allow(unreachable_patterns)]
        _ => unreachable!("f16 tiles only where AVX2 reads them"),
    }
}

#[allow(dead_code)]
#[inline(always)]
fn weigh_rows_portable<const N: usize>(
    p: &[f32],
    values: &[f32],
    hd: usize,
    range: std::ops::Range<usize>,
    acc: &mut [f32],
) {
    let mut c0 = 0;
    while c0 + LANES <= hd {
        let mut a = [[0f32; LANES]; N];
        for (i, a) in a.iter_mut().enumerate() {
            a.copy_from_slice(&acc[i * hd + c0..][..LANES]);
        }
        for j in range.clone() {
            let v: &[f32; LANES] = values[j * hd + c0..][..LANES].try_into().expect("lanes");
            for (i, a) in a.iter_mut().enumerate() {
                let w = p[i * BLOCK + j];
                for l in 0..LANES {
                    a[l] = w.mul_add(v[l], a[l]);
                }
            }
        }
        for (i, a) in a.iter().enumerate() {
            acc[i * hd + c0..][..LANES].copy_from_slice(a);
        }
        c0 += LANES;
    }
    // Head sizes that are not a multiple of the lanes: the last columns one at a time.
    for c in c0..hd {
        for i in 0..N {
            let mut a = acc[i * hd + c];
            for j in range.clone() {
                a = p[i * BLOCK + j].mul_add(values[j * hd + c], a);
            }
            acc[i * hd + c] = a;
        }
    }
}

/// The register-blocked products with AVX2 intrinsics: the same fused multiply-adds in the same
/// order as the portable code, so the same bits, in registers the compiler could not be relied on
/// to keep.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
mod avx2 {
    use std::arch::x86_64::*;

    use super::BLOCK;

    /// `e^x` per lane (the algorithm of `exp8_portable`); lanes below -87 give 0.
    #[inline(always)]
    pub(super) unsafe fn exp(x: __m256) -> __m256 {
        unsafe {
            let v = _mm256_min_ps(
                _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
                _mm256_set1_ps(88.0),
            );
            let round = _mm256_set1_ps(12_582_912.0);
            let n = _mm256_sub_ps(
                _mm256_fmadd_ps(v, _mm256_set1_ps(std::f32::consts::LOG2_E), round),
                round,
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), v);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
            let mut p = _mm256_set1_ps(1.987_569_1e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                1.666_666_5e-1,
                0.5,
            ] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let e = _mm256_add_ps(
                _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
                _mm256_set1_ps(1.0),
            );
            let scale = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                23,
            ));
            let keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0), _CMP_GE_OQ);
            _mm256_and_ps(_mm256_mul_ps(e, scale), keep)
        }
    }

    /// The AVX2 `softmax_tile`: masked lanes weigh exactly 0, sums in the same order.
    #[inline(always)]
    pub(super) unsafe fn softmax_tile(
        p: &mut [f32],
        scale: f32,
        lo: usize,
        hi: usize,
        max: &mut f32,
        sum: &mut f32,
    ) -> f32 {
        unsafe {
            let (lo_v, hi_v) = (_mm256_set1_epi32(lo as i32), _mm256_set1_epi32(hi as i32));
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask = |c: usize| {
                let idx = _mm256_add_epi32(lanes, _mm256_set1_epi32((c * 8) as i32));
                // lo <= idx < hi
                let ge = _mm256_cmpgt_epi32(idx, _mm256_sub_epi32(lo_v, _mm256_set1_epi32(1)));
                let lt = _mm256_cmpgt_epi32(hi_v, idx);
                _mm256_castsi256_ps(_mm256_and_si256(ge, lt))
            };
            let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
            let sc = _mm256_set1_ps(scale);
            let mut m = ninf;
            for c in 0..BLOCK / 8 {
                let x = _mm256_mul_ps(_mm256_loadu_ps(p.as_ptr().add(c * 8)), sc);
                m = _mm256_max_ps(m, _mm256_blendv_ps(ninf, x, mask(c)));
            }
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m1 = _mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1));
            let new_max = max.max(_mm_cvtss_f32(m1));
            let alpha = (*max - new_max).exp();
            let nm = _mm256_set1_ps(new_max);
            let mut sums = _mm256_setzero_ps();
            for c in 0..BLOCK / 8 {
                let at = p.as_mut_ptr().add(c * 8);
                let e = exp(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(at), sc), nm));
                let w = _mm256_and_ps(e, mask(c));
                _mm256_storeu_ps(at, w);
                sums = _mm256_add_ps(sums, w);
            }
            // ((s0 + s4) + (s1 + s5)) + ((s2 + s6) + (s3 + s7))
            let a = _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
            let h = _mm_hadd_ps(a, a);
            let tile_sum = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
            *sum = *sum * alpha + tile_sum;
            *max = new_max;
            alpha
        }
    }

    /// # Safety
    /// AVX2 and FMA must be in the build's target; `q` holds `N` rows of `hd`, `keys` `hd`
    /// rows of `BLOCK`, `out` `N` rows of `BLOCK`.
    #[inline(always)]
    pub(super) unsafe fn scores_rows<const N: usize>(
        q: &[f32],
        keys: &[half::f16],
        hd: usize,
        out: &mut [f32],
    ) {
        // SAFETY: every pointer stays inside the slices, by the caller's bounds.
        unsafe {
            for j0 in (0..BLOCK).step_by(16) {
                let mut lo = [_mm256_setzero_ps(); N];
                let mut hi = [_mm256_setzero_ps(); N];
                let mut k = keys.as_ptr().add(j0);
                let qp = q.as_ptr();
                for d in 0..hd {
                    let k0 = _mm256_cvtph_ps(_mm_loadu_si128(k.cast()));
                    let k1 = _mm256_cvtph_ps(_mm_loadu_si128(k.add(8).cast()));
                    k = k.add(BLOCK);
                    for i in 0..N {
                        let x = _mm256_broadcast_ss(&*qp.add(i * hd + d));
                        lo[i] = _mm256_fmadd_ps(x, k0, lo[i]);
                        hi[i] = _mm256_fmadd_ps(x, k1, hi[i]);
                    }
                }
                for i in 0..N {
                    let o = out.as_mut_ptr().add(i * BLOCK + j0);
                    _mm256_storeu_ps(o, lo[i]);
                    _mm256_storeu_ps(o.add(8), hi[i]);
                }
            }
        }
    }

    /// Columns `c0..c0 + 16` of `acc[row] += Σⱼ p[row][j] · values[j]`.
    ///
    /// # Safety
    /// AVX2 and FMA must be in the build's target; `p` holds `N` rows of `BLOCK`, `values`
    /// rows of `hd` up to `range.end`, `acc` `N` rows of `hd`, and `c0 + 16 <= hd`.
    #[inline(always)]
    pub(super) unsafe fn weigh_columns<const N: usize>(
        p: &[f32],
        values: &[half::f16],
        hd: usize,
        range: std::ops::Range<usize>,
        c0: usize,
        acc: &mut [f32],
    ) {
        // SAFETY: every pointer stays inside the slices, by the caller's bounds.
        unsafe {
            let mut lo = [_mm256_setzero_ps(); N];
            let mut hi = [_mm256_setzero_ps(); N];
            for i in 0..N {
                let a = acc.as_ptr().add(i * hd + c0);
                lo[i] = _mm256_loadu_ps(a);
                hi[i] = _mm256_loadu_ps(a.add(8));
            }
            let pp = p.as_ptr();
            for j in range {
                let v = values.as_ptr().add(j * hd + c0);
                let v0 = _mm256_cvtph_ps(_mm_loadu_si128(v.cast()));
                let v1 = _mm256_cvtph_ps(_mm_loadu_si128(v.add(8).cast()));
                for i in 0..N {
                    let w = _mm256_broadcast_ss(&*pp.add(i * BLOCK + j));
                    lo[i] = _mm256_fmadd_ps(w, v0, lo[i]);
                    hi[i] = _mm256_fmadd_ps(w, v1, hi[i]);
                }
            }
            for i in 0..N {
                let a = acc.as_mut_ptr().add(i * hd + c0);
                _mm256_storeu_ps(a, lo[i]);
                _mm256_storeu_ps(a.add(8), hi[i]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// One sequence's cache of `blocks` blocks in the store's layout, from a generator.
    fn cache(rng: &mut Rng, nkv: usize, hd: usize, blocks: usize) -> Vec<(Vec<f16>, Vec<f16>)> {
        (0..blocks)
            .map(|_| {
                let n = nkv * hd * BLOCK;
                (
                    (0..n).map(|_| f16::from_f32(rng.next() * 3.0)).collect(),
                    (0..n).map(|_| f16::from_f32(rng.next())).collect(),
                )
            })
            .collect()
    }

    fn views(c: &[(Vec<f16>, Vec<f16>)]) -> Vec<BlockKv<'_>> {
        c.iter().map(|(k, v)| BlockKv { k, v }).collect()
    }

    /// Straightforward attention in f64 for the token at `pos` of a cache.
    fn reference(
        q: &[f32],
        c: &[(Vec<f16>, Vec<f16>)],
        h: Heads,
        pos: usize,
        window: Option<usize>,
    ) -> Vec<f32> {
        let (hd, nkv) = (h.head_dim, h.n_kv_head);
        let rep = h.n_head / nkv;
        let mut out = vec![0f32; h.n_head * hd];
        let key = |g: usize, j: usize, d: usize| c[j / BLOCK].0[(g * hd + d) * BLOCK + j % BLOCK];
        let val = |g: usize, j: usize, d: usize| c[j / BLOCK].1[(g * BLOCK + j % BLOCK) * hd + d];
        let keys = window_start(window, pos)..pos + 1;
        for head in 0..h.n_head {
            let g = head / rep;
            let qr = &q[head * hd..][..hd];
            let s: Vec<f64> = keys
                .clone()
                .map(|j| {
                    (0..hd)
                        .map(|d| qr[d] as f64 * key(g, j, d).to_f64())
                        .sum::<f64>()
                        * h.scale as f64
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let acc: f64 = keys
                    .clone()
                    .zip(&e)
                    .map(|(j, p)| p * val(g, j, d).to_f64())
                    .sum();
                out[head * hd + d] = (acc / z) as f32;
            }
        }
        out
    }

    #[test]
    fn matches_reference_with_grouped_heads_windows_and_odd_sizes() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for (n_head, n_kv_head, head_dim) in [(9, 3, 64), (4, 1, 36), (2, 2, 13), (2, 1, 100)] {
            let h = Heads {
                n_head,
                n_kv_head,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            };
            for window in [None, Some(70)] {
                let c = cache(&mut rng, n_kv_head, head_dim, 4);
                // A prompt chunk of 40 tokens at position 150 (across blocks 2 and 3).
                let (pos, len) = (150, 40);
                let q: Vec<f32> = (0..len * n_head * head_dim).map(|_| rng.next()).collect();
                let mut out = vec![7f32; len * n_head * head_dim];
                let span = Span {
                    offset: 0,
                    len,
                    pos,
                    window,
                    blocks: views(&c),
                };
                attend(&q, len, &[span], h, &mut out);
                let width = n_head * head_dim;
                for i in 0..len {
                    let want = reference(&q[i * width..][..width], &c, h, pos + i, window);
                    for (a, b) in out[i * width..][..width].iter().zip(&want) {
                        assert!(
                            (a - b).abs() < 2e-5,
                            "{a} vs {b} ({n_head}/{n_kv_head}/{head_dim}, {window:?}, row {i})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_token_gets_the_same_bits_decoded_alone_as_in_a_prompt_chunk() {
        let mut rng = Rng(42);
        for (n_head, n_kv_head, head_dim, window) in
            [(9, 3, 64, None), (4, 1, 256, Some(100)), (2, 1, 100, None)]
        {
            let h = Heads {
                n_head,
                n_kv_head,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            };
            let c = cache(&mut rng, n_kv_head, head_dim, 5);
            let width = n_head * head_dim;
            let (pos, len) = (200, 90);
            let q: Vec<f32> = (0..len * width).map(|_| rng.next()).collect();
            let mut chunk = vec![0f32; len * width];
            let blocks = views(&c);
            let span = |offset, len, pos| Span {
                offset,
                len,
                pos,
                window,
                blocks: blocks.clone(),
            };
            attend(&q, len, &[span(0, len, pos)], h, &mut chunk);
            // Each token alone, as a decode step sees it (another sequence in the batch too).
            for i in [0, 1, 37, 55, 89] {
                let mut batch = q[i * width..][..width].to_vec();
                batch.extend_from_slice(&q[..width]);
                let mut out = vec![0f32; 2 * width];
                attend(
                    &batch,
                    2,
                    &[span(0, 1, pos + i), span(1, 1, 3)],
                    h,
                    &mut out,
                );
                let alone: Vec<u32> = out[..width].iter().map(|x| x.to_bits()).collect();
                let inside: Vec<u32> = chunk[i * width..][..width]
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                assert_eq!(alone, inside, "token {i} ({n_head}/{n_kv_head}/{head_dim})");
            }
        }
    }

    #[test]
    fn exp8_is_close_to_exp_and_zero_far_below() {
        let xs = [-87.5, -80.0, -20.0, -3.3, -0.7, -1e-3, 0.0, 2.5];
        let got = exp8(xs);
        for (x, g) in xs.iter().zip(got) {
            let want = (*x as f64).exp();
            if *x < -87.0 {
                assert_eq!(g, 0.0);
            } else {
                assert!(
                    ((g as f64 - want) / want).abs() < 3e-7,
                    "exp({x}) = {g}, want {want}"
                );
            }
        }
    }
}
