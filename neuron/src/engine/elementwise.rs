//! Element-wise steps of the forward pass on the CPU, split over the kernel pool.
//!
//! candle runs an element-wise operation on one thread below 64k elements, which is every
//! decode step: SiLU's exponentials alone took 6% of a batch of eight on one core while the
//! other waited. The rotation computes exactly what candle's operation computes, element by
//! element in the same order of operations; SiLU takes its exponentials eight at a time (within
//! 1e-6 of the exact product, where candle calls libm's `expf` once per element).

use candle_core::{DType, Device, Storage, Tensor};

use super::kernels;
use crate::error::{Error, Result};

/// Elements per task: enough that a hand-off costs little beside the work.
const CHUNK: usize = 2048;

/// `silu(gate) * up` (the gated feed-forward of llama-like models) for f32 CPU tensors of one
/// shape: `g / (1 + e^-g) * u`.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() || gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
        return Err(Error::Internal(format!(
            "silu_mul of {:?} {:?} and {:?} {:?}",
            gate.shape(),
            gate.dtype(),
            up.shape(),
            up.dtype()
        )));
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let n = gate.elem_count();
    let mut out = vec![0f32; n];
    {
        let (gs, gl) = gate.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        let (Storage::Cpu(gc), Storage::Cpu(uc)) = (&*gs, &*us) else {
            return Err(Error::Internal("silu_mul of a device tensor".into()));
        };
        let g = &gc.as_slice::<f32>()?[gl.start_offset()..][..n];
        let u = &uc.as_slice::<f32>()?[ul.start_offset()..][..n];
        let dst = kernels::Out(out.as_mut_ptr());
        kernels::parallel(n.div_ceil(CHUNK), |t| {
            let lo = t * CHUNK;
            let len = CHUNK.min(n - lo);
            // SAFETY: task t alone writes out[lo..lo + len], inside `out`.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.at(lo), len) };
            silu_mul_into(&g[lo..][..len], &u[lo..][..len], o);
        });
    }
    Ok(Tensor::from_vec(out, gate.shape(), &Device::Cpu)?)
}

/// `o = g / (1 + e^-g) * u`, element by element.
fn silu_mul_into(g: &[f32], u: &[f32], o: &mut [f32]) {
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    let done = 0;
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    let done = {
        use std::arch::x86_64::*;
        let body = o.len().min(g.len()).min(u.len()) / 8 * 8;
        // SAFETY: AVX2 and FMA are in the build's target; every access is below `body`.
        unsafe {
            let one = _mm256_set1_ps(1.0);
            for i in (0..body).step_by(8) {
                let x = _mm256_loadu_ps(g.as_ptr().add(i));
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
                let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
                let y = _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i)));
                _mm256_storeu_ps(o.as_mut_ptr().add(i), y);
            }
        }
        body
    };
    for ((o, &g), &u) in o[done..].iter_mut().zip(&g[done..]).zip(&u[done..]) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `e^x` in eight lanes, rounded to f32 from a double-precision value good to about 1e-16: the
/// correctly rounded result but in the rarest near-ties, so nearly always the very float libm's
/// `expf` gives (glibc's is within 0.502 units in the last place). `x = n ln 2 + r` with
/// `|r| <= ln 2 / 2`, `e^r` from its Taylor series to `r^12 / 12!`, `2^n` put into the
/// exponent. Inputs are clamped to where f32 neither overflows nor goes subnormal.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[inline(always)]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: register arithmetic only; AVX2 and FMA are in the build's target.
    unsafe {
        let x = _mm256_min_ps(_mm256_set1_ps(88.72283), x);
        let x = _mm256_max_ps(_mm256_set1_ps(-87.33654), x);
        let half = |x: __m256d| -> __m128 {
            let n = _mm256_round_pd(
                _mm256_mul_pd(x, _mm256_set1_pd(std::f64::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            // ln 2 in two parts, so n ln 2 comes off exactly.
            let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(0.693_147_180_369_123_8), x);
            let r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.908_214_929_270_587_7e-10), r);
            let mut p = _mm256_set1_pd(1.0 / 479_001_600.0);
            let mut fact = 479_001_600.0f64;
            for k in (1..12).rev() {
                fact /= (k + 1) as f64;
                p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0 / fact));
            }
            let p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(1.0));
            // 2^n: n + 1023 in the exponent bits (n is in -126..=128).
            let n = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n));
            let pow = _mm256_slli_epi64(_mm256_add_epi64(n, _mm256_set1_epi64x(1023)), 52);
            _mm256_cvtpd_ps(_mm256_mul_pd(p, _mm256_castsi256_pd(pow)))
        };
        let lo = half(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
        let hi = half(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
        _mm256_set_m128(hi, lo)
    }
}

/// The residual step before a layer's norm, for f32 CPU tensors of rows of `alpha.len()`:
/// `x + h` (or `x` alone), and its RMS norm times `alpha`, in one pass instead of candle's add
/// and `rms_norm` (each a new tensor, a layout check and, past 32 rows, a rayon hand-off). Bit for
/// bit what those give: the same sum of squares in the same order, `v / sqrt(mean + eps) * a`.
pub fn add_rms_norm(
    x: &Tensor,
    h: Option<&Tensor>,
    alpha: &[f32],
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let n = alpha.len();
    let shape = x.shape().clone();
    if x.dtype() != DType::F32
        || n == 0
        || shape.dims().last() != Some(&n)
        || h.is_some_and(|h| h.shape() != &shape || h.dtype() != DType::F32)
    {
        return Err(Error::Internal(format!(
            "add_rms_norm of {:?} {:?} by {n} weights",
            shape,
            x.dtype()
        )));
    }
    let mut sum = x.flatten_all()?.to_vec1::<f32>()?;
    if let Some(h) = h {
        let h = h.flatten_all()?.to_vec1::<f32>()?;
        for (a, b) in sum.iter_mut().zip(&h) {
            *a += b;
        }
    }
    let mut normed = vec![0f32; sum.len()];
    let rows = sum.len() / n;
    let norm_rows = |src: &[f32], dst: &mut [f32]| {
        for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
            let sum2 = s.iter().map(|&v| v * v).sum::<f32>();
            let m = (sum2 / n as f32 + eps).sqrt();
            for ((d, s), a) in d.iter_mut().zip(s).zip(alpha) {
                *d = *s / m * *a;
            }
        }
    };
    if rows <= 32 {
        norm_rows(&sum, &mut normed);
    } else {
        let per = rows.div_ceil(2 * kernels::threads());
        let dst = kernels::Out(normed.as_mut_ptr());
        kernels::parallel(rows.div_ceil(per), |t| {
            let (lo, hi) = (t * per, ((t + 1) * per).min(rows));
            // SAFETY: task t alone writes rows lo..hi of `normed`.
            let d = unsafe { std::slice::from_raw_parts_mut(dst.at(lo * n), (hi - lo) * n) };
            norm_rows(&sum[lo * n..hi * n], d);
        });
    }
    Ok((
        Tensor::from_vec(sum, &shape, &Device::Cpu)?,
        Tensor::from_vec(normed, &shape, &Device::Cpu)?,
    ))
}

/// Rotary position embedding in place, on the layout the projections leave: `x` holds tokens of
/// `heads` heads of `head_dim`, and token `t` turns by row `t` of `cos` and `sin` (`head_dim / 2`
/// each). `interleaved` rotates pairs `(2i, 2i + 1)` (candle's `rope_i`, llama), otherwise pairs
/// `(i, i + head_dim / 2)` (`rope`, the other architectures). Each element is what candle's
/// operation gives, the same products and sums in the same order, without the transposes to and
/// from `(heads, tokens, head_dim)` and the thread hand-off candle makes for several tokens.
///
/// # Panics
/// If `x` is not a whole number of tokens or the tables are shorter than the tokens.
pub fn rotate(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) {
    let half = head_dim / 2;
    assert!(
        head_dim.is_multiple_of(2) && x.len().is_multiple_of(heads * head_dim),
        "rotate of {} values",
        x.len()
    );
    let tokens = x.len() / (heads * head_dim);
    assert!(
        cos.len() >= tokens * half && sin.len() >= tokens * half,
        "rotary rows for {tokens} tokens"
    );
    for (t, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
        for h in row.chunks_exact_mut(head_dim) {
            if interleaved {
                for ((p, &c), &s) in h.chunks_exact_mut(2).zip(c).zip(s) {
                    let (a, b) = (p[0], p[1]);
                    p[0] = a * c - b * s;
                    p[1] = a * s + b * c;
                }
            } else {
                let (lo, hi) = h.split_at_mut(half);
                for (((a, b), &c), &s) in lo.iter_mut().zip(hi).zip(c).zip(s) {
                    let (x1, x2) = (*a, *b);
                    *a = x1 * c - x2 * s;
                    *b = x1 * s + x2 * c;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit for bit candle's `rope_i` and `rope`, which take `(batch, heads, tokens, head_dim)`,
    /// for one token and for several (candle has a separate path for each).
    #[test]
    fn rotate_is_candles_rope() {
        let dev = Device::Cpu;
        for (tokens, heads, hd) in [(1, 3, 64), (5, 9, 64), (7, 2, 10)] {
            let x = Tensor::randn(0f32, 2.0, (1, tokens, heads, hd), &dev).unwrap();
            let cos = Tensor::randn(0f32, 1.0, (tokens, hd / 2), &dev).unwrap();
            let sin = Tensor::randn(0f32, 1.0, (tokens, hd / 2), &dev).unwrap();
            let heads_first = x.transpose(1, 2).unwrap().contiguous().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for interleaved in [true, false] {
                let want = if interleaved {
                    candle_nn::rotary_emb::rope_i(&heads_first, &cos, &sin).unwrap()
                } else {
                    candle_nn::rotary_emb::rope(&heads_first, &cos, &sin).unwrap()
                };
                let want = flat(&want.transpose(1, 2).unwrap().contiguous().unwrap());
                let mut got = flat(&x);
                rotate(&mut got, heads, hd, &flat(&cos), &flat(&sin), interleaved);
                assert!(
                    want.iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "tokens {tokens}, heads {heads}, head_dim {hd}, interleaved {interleaved}"
                );
            }
        }
    }

    /// Within 1e-6 (relative) of the product computed in f64 and, but for about 3 in 10,000
    /// elements (one unit in the last place), bit for bit what candle's silu then mul give, over more elements than one task takes, a
    /// ragged tail, and inputs far enough out that `e^-g` over- and underflows.
    #[test]
    fn silu_mul_matches_f64() {
        let dev = Device::Cpu;
        let close = |g: f32, u: f32, got: f32| {
            let want = g as f64 / (1.0 + (-g as f64).exp()) * u as f64;
            assert!(
                (got as f64 - want).abs() <= 1e-6 * want.abs() + 1e-30,
                "silu({g}) * {u}: {got}, want {want}"
            );
        };
        for n in [1, 7, CHUNK, 3 * CHUNK + 5, 1 << 16] {
            let g = Tensor::randn(0f32, 4.0, (1, n), &dev).unwrap();
            let u = Tensor::randn(0f32, 1.0, (1, n), &dev).unwrap();
            let got = silu_mul(&g, &u).unwrap();
            let candle = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut same = 0;
            for (((g, u), got), candle) in flat(&g)
                .into_iter()
                .zip(flat(&u))
                .zip(flat(&got))
                .zip(flat(&candle))
            {
                close(g, u, got);
                same += usize::from(got.to_bits() == candle.to_bits());
            }
            // glibc's expf is within 0.502 units in the last place, ours rounds a value good to
            // about 1e-16: they part in about 3 of 10,000 elements, by one unit.
            assert!(same * 1000 >= n * 999, "{same} of {n} the same as candle's");
        }
        let g = [
            -200.0f32, -90.0, -87.0, -20.0, -1e-8, 0.0, 1e-8, 20.0, 88.0, 90.0, 200.0, 3.0,
        ];
        let mut o = [0f32; 12];
        silu_mul_into(&g, &[1.5; 12], &mut o);
        for (g, o) in g.iter().zip(o) {
            close(*g, 1.5, o);
        }
    }

    /// Bit for bit candle's add then `rms_norm`, with and without a residual, for a few rows
    /// (one thread) and many (the pool).
    #[test]
    fn add_rms_norm_is_candles_add_then_rms_norm() {
        let dev = Device::Cpu;
        for rows in [1, 8, 40] {
            let x = Tensor::randn(0f32, 2.0, (1, rows, 96), &dev).unwrap();
            let h = Tensor::randn(0f32, 1.0, (1, rows, 96), &dev).unwrap();
            let alpha = Tensor::randn(0f32, 1.0, 96, &dev).unwrap();
            let a = alpha.to_vec1::<f32>().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let same =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            for residual in [None, Some(&h)] {
                let want_x = match residual {
                    Some(h) => (&x + h).unwrap(),
                    None => x.clone(),
                };
                let want = candle_nn::ops::rms_norm(&want_x, &alpha, 1e-5).unwrap();
                let (got_x, got) = add_rms_norm(&x, residual, &a, 1e-5).unwrap();
                assert!(same(&flat(&want_x), &flat(&got_x)), "rows {rows}: the sum");
                assert!(same(&flat(&want), &flat(&got)), "rows {rows}: the norm");
                assert_eq!(got.shape(), x.shape());
            }
        }
    }
}
