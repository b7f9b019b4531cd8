//! Attention of each token of a batch over its sequence's cached keys and values, on the CPU:
//! decoded tokens and prompt tokens alike, every sequence at once.
//!
//! Through candle this is about thirty small tensor operations per sequence and layer, whose
//! fixed costs add up to as much as the projections once a batch holds several sequences. Here it
//! is one pass per (token, KV head) over the cache in place, split over the kernel pool. A
//! token's result depends only on the keys it sees, never on what else is in the batch or on
//! whether it was decoded or read as part of a prompt: each task reads only its own rows, in the
//! same order (so a sequence read again after a preemption gets back the very same numbers).

use std::cell::RefCell;

use half::f16;

use super::kernels;

/// One decoding sequence: where its query row sits and the keys it may see.
pub struct Row<'a> {
    /// Token index in the batch (the query's column in `q`, the output row).
    pub token: usize,
    /// The sequence's cache, `(n_kv_head, cap, head_dim)` row-major, in f16 (as llama.cpp
    /// keeps it: half the memory and half the reading of f32). Head-major, so the keys a task
    /// reads are one contiguous run rather than a slice of every position's row.
    pub k: &'a [f16],
    pub v: &'a [f16],
    /// Positions the cache holds per KV head.
    pub cap: usize,
    /// Visible cache positions `start..end` (the new token's own key included).
    pub start: usize,
    pub end: usize,
}

/// Shapes shared by every row.
#[derive(Clone, Copy)]
pub struct Heads {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub scale: f32,
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `q`: the batch's queries, `(tokens, n_head, head_dim)` row-major (as the projection and
/// the rotation leave them). Writes each row's attention
/// output into `out` at `(row.token, n_head * head_dim)`; other rows of `out` are untouched.
pub fn decode(q: &[f32], tokens: usize, rows: &[Row<'_>], h: Heads, out: &mut [f32]) {
    let (hd, nkv) = (h.head_dim, h.n_kv_head);
    let rep = h.n_head / nkv;
    let width = h.n_head * hd;
    assert_eq!(q.len(), h.n_head * tokens * hd, "queries");
    assert_eq!(out.len(), tokens * width, "output");
    for r in rows {
        assert!(r.token < tokens && r.start < r.end, "row");
        assert!(r.end <= r.cap && r.k.len() >= nkv * r.cap * hd && r.v.len() >= nkv * r.cap * hd);
    }
    let dst = kernels::Out(out.as_mut_ptr());
    kernels::parallel(rows.len() * nkv, |t| {
        let (row, g) = (&rows[t / nkv], t % nkv);
        SCORES.with_borrow_mut(|scores| {
            let qs = Queries {
                q,
                n_head: h.n_head,
                rep,
            };
            // SAFETY: the heads of group g at row.token are this task's alone: `rep * hd`
            // consecutive floats inside `out` (checked above).
            let o = unsafe {
                std::slice::from_raw_parts_mut(dst.at(row.token * width + g * rep * hd), rep * hd)
            };
            group(qs, row, g, h, scores, o);
        });
    });
}

/// The batch's queries, `(tokens, n_head, head_dim)`, with `rep` query heads per KV head.
#[derive(Clone, Copy)]
struct Queries<'a> {
    q: &'a [f32],
    n_head: usize,
    rep: usize,
}

/// softmax(q·Kᵀ · scale) · V for the query heads that share KV head `g`: each key and
/// value row is read once for all of them. `out` holds the heads' outputs one after another.
fn group(
    qs: Queries<'_>,
    row: &Row<'_>,
    g: usize,
    h: Heads,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = h.head_dim;
    // This KV head's keys and values, position after position.
    let (keys, values) = (
        &row.k[g * row.cap * hd..][..row.cap * hd],
        &row.v[g * row.cap * hd..][..row.cap * hd],
    );
    let (rep, len) = (qs.rep, row.end - row.start);
    let q_of = |r: usize| &qs.q[(row.token * qs.n_head + g * rep + r) * hd..][..hd];
    // scores[r * len + i]: head r, key row.start + i; then each head's sum.
    scores.clear();
    scores.resize(rep * len + rep, 0.0);
    let (scores, sums) = scores.split_at_mut(rep * len);
    let key = |j: usize| &keys[j * hd..][..hd];
    for r in 0..rep {
        let (q, s) = (q_of(r), &mut scores[r * len..][..len]);
        // Four keys at a time: the query is read once for them, one reduction for the four.
        let mut quads = s.chunks_exact_mut(4);
        for (i, s4) in (&mut quads).enumerate() {
            let j = row.start + 4 * i;
            let d = dot4(q, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
            for (s, d) in s4.iter_mut().zip(d) {
                *s = d * h.scale;
            }
        }
        let done = len - quads.into_remainder().len();
        for (i, s) in s.iter_mut().enumerate().skip(done) {
            *s = dot(q, key(row.start + i)) * h.scale;
        }
    }
    // Each head's unnormalised weights; the sums divide the outputs at the end.
    for (r, s) in scores.chunks_exact_mut(len).enumerate() {
        let max = s.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        for v in s.iter_mut() {
            *v = (*v - max).exp();
            sums[r] += *v;
        }
    }
    let values = &values[row.start * hd..];
    for ((o, p), sum) in out
        .chunks_exact_mut(hd)
        .zip(scores.chunks_exact(len))
        .zip(sums.iter())
    {
        weighted_sum(p, values, hd, o);
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|v| *v *= inv);
    }
}

/// `out = Σᵢ p[i] · v[i * stride..][..out.len()]`, in the order of `i`.
fn weighted_sum(p: &[f32], v: &[f16], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    // Only the x86 path below advances it.
    #[allow(unused_mut)]
    let mut col = 0;
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        // 64 columns at a time in eight registers, over every key before they are stored:
        // eight independent sums keep both FMA units busy (four wait on each other's latency).
        // Then 32 at a time in four.
        while col + 64 <= hd {
            // SAFETY: AVX2 and FMA are in the build's target; col + 64 <= hd.
            unsafe { weighted_columns::<8>(p, v, stride, col, out) };
            col += 64;
        }
        while col + 32 <= hd {
            // SAFETY: as above, col + 32 <= hd.
            unsafe { weighted_columns::<4>(p, v, stride, col, out) };
            col += 32;
        }
    }
    let rest = &mut out[col..];
    rest.fill(0.0);
    for (i, w) in p.iter().enumerate() {
        for (o, x) in rest.iter_mut().zip(&v[i * stride + col..][..hd - col]) {
            *o += w * x.to_f32();
        }
    }
}

/// Columns `col..col + 8R` of [`weighted_sum`], in `R` registers over every key.
///
/// # Safety
/// AVX2, FMA and F16C must be in the build's target (they are where this is compiled), and
/// `col + 8R <= out.len()`, with `v` holding `p.len()` rows of `stride`, the last `out.len()` long.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    target_feature = "f16c"
))]
#[inline(always)]
unsafe fn weighted_columns<const R: usize>(
    p: &[f32],
    v: &[f16],
    stride: usize,
    col: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    // SAFETY: every load and store is inside `v` or `out`, by the caller's bounds.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); R];
        for (i, &w) in p.iter().enumerate() {
            let (w, row) = (_mm256_set1_ps(w), v.as_ptr().add(i * stride + col));
            for (u, a) in acc.iter_mut().enumerate() {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(row.add(8 * u).cast()));
                *a = _mm256_fmadd_ps(w, x, *a);
            }
        }
        for (u, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(col + 8 * u), *a);
        }
    }
}

/// `q` against four keys.
#[inline(always)]
fn dot4(q: &[f32], k: [&[f16]; 4]) -> [f32; 4] {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    ))]
    {
        use std::arch::x86_64::*;
        let n = q.len();
        assert!(k.iter().all(|k| k.len() == n));
        let body = n / 8 * 8;
        // SAFETY: AVX2, FMA and F16C are in the build's target; loads stay below `body <= n`.
        let mut out = unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in (0..body).step_by(8) {
                let x = _mm256_loadu_ps(q.as_ptr().add(c));
                for (a, k) in acc.iter_mut().zip(&k) {
                    let y = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(c).cast()));
                    *a = _mm256_fmadd_ps(x, y, *a);
                }
            }
            // Each accumulator's eight lanes summed, the four results side by side.
            let s = _mm256_hadd_ps(
                _mm256_hadd_ps(acc[0], acc[1]),
                _mm256_hadd_ps(acc[2], acc[3]),
            );
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            let mut out = [0f32; 4];
            _mm_storeu_ps(out.as_mut_ptr(), s);
            out
        };
        for (o, k) in out.iter_mut().zip(&k) {
            *o += q[body..]
                .iter()
                .zip(&k[body..])
                .map(|(a, b)| a * b.to_f32())
                .sum::<f32>();
        }
        out
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma",
        target_feature = "f16c"
    )))]
    k.map(|k| dot(q, k))
}

/// Eight running sums, so the compiler keeps them in one vector register.
#[inline(always)]
fn dot(a: &[f32], b: &[f16]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y.to_f32())
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward attention in f64 for one row.
    fn reference(q: &[f32], row: &Row<'_>, h: Heads) -> Vec<f32> {
        let (hd, nkv) = (h.head_dim, h.n_kv_head);
        let rep = h.n_head / nkv;
        let mut out = vec![0f32; h.n_head * hd];
        for head in 0..h.n_head {
            let g = head / rep;
            let qr = &q[(row.token * h.n_head + head) * hd..][..hd];
            let s: Vec<f64> = (row.start..row.end)
                .map(|j| {
                    let k = &row.k[(g * row.cap + j) * hd..][..hd];
                    qr.iter()
                        .zip(k)
                        .map(|(a, b)| *a as f64 * b.to_f64())
                        .sum::<f64>()
                        * h.scale as f64
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for d in 0..hd {
                let acc: f64 = (row.start..row.end)
                    .zip(&e)
                    .map(|(j, p)| p * row.v[(g * row.cap + j) * hd + d].to_f64())
                    .sum();
                out[head * hd + d] = (acc / z) as f32;
            }
        }
        out
    }

    #[test]
    fn matches_reference_with_grouped_heads_windows_and_odd_sizes() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        for (n_head, n_kv_head, head_dim) in [(9, 3, 64), (4, 1, 36), (2, 2, 13), (2, 1, 100)] {
            let h = Heads {
                n_head,
                n_kv_head,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            };
            let tokens = 6;
            let q: Vec<f32> = (0..n_head * tokens * head_dim).map(|_| rnd()).collect();
            let caches: Vec<(Vec<f16>, Vec<f16>)> = [1usize, 7, 300]
                .iter()
                .map(|cap| {
                    let n = cap * n_kv_head * head_dim;
                    (
                        (0..n).map(|_| f16::from_f32(rnd() * 3.0)).collect(),
                        (0..n).map(|_| f16::from_f32(rnd())).collect(),
                    )
                })
                .collect();
            let rows = [
                Row {
                    token: 0,
                    k: &caches[0].0,
                    v: &caches[0].1,
                    cap: 1,
                    start: 0,
                    end: 1,
                },
                Row {
                    token: 3,
                    k: &caches[1].0,
                    v: &caches[1].1,
                    cap: 7,
                    start: 2,
                    end: 7,
                },
                Row {
                    token: 4,
                    k: &caches[2].0,
                    v: &caches[2].1,
                    cap: 300,
                    start: 0,
                    end: 300,
                },
                // A prompt's tokens: rows of one cache, each seeing one key more.
                Row {
                    token: 1,
                    k: &caches[2].0,
                    v: &caches[2].1,
                    cap: 300,
                    start: 0,
                    end: 5,
                },
                Row {
                    token: 2,
                    k: &caches[2].0,
                    v: &caches[2].1,
                    cap: 300,
                    start: 0,
                    end: 6,
                },
            ];
            let width = n_head * head_dim;
            let mut out = vec![7f32; tokens * width];
            decode(&q, tokens, &rows, h, &mut out);
            for row in &rows {
                let want = reference(&q, row, h);
                let got = &out[row.token * width..][..width];
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{a} vs {b} ({n_head}/{n_kv_head}/{head_dim})"
                    );
                }
            }
            // Rows of tokens that were not asked for are left alone.
            assert!(out[5 * width..].iter().all(|v| *v == 7.0));
        }
    }
}
