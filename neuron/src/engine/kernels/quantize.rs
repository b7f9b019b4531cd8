//! Activations to Q8 blocks, once per matmul, so every weight row is an integer dot product
//! (what llama.cpp does). Both paths round half to even, so they give the same blocks.

use super::blocks::{BlockQ8, QK};

/// Quantizes `x` into `out` (`x.len() / 32` blocks), every `group` consecutive blocks sharing one
/// scale: 1 for the legacy weight types, 8 for the K-quants, whose kernels then add a whole
/// super-block's integer sums before scaling (as llama.cpp's Q8_K). `x.len()` must be a multiple
/// of `32 * group`.
pub fn quantize_row(x: &[f32], out: &mut [BlockQ8], group: usize) {
    #[cfg(target_arch = "x86_64")]
    if super::level() >= super::Level::Avx2 {
        // SAFETY: AVX2 was detected at run time.
        unsafe { quantize_row_avx2(x, out, group) };
        return;
    }
    quantize_row_scalar(x, out, group)
}

pub fn quantize_row_scalar(x: &[f32], out: &mut [BlockQ8], group: usize) {
    for (xg, bg) in x.chunks_exact(QK * group).zip(out.chunks_exact_mut(group)) {
        let amax = xg.iter().fold(0f32, |a, v| a.max(v.abs()));
        quantize_group_scalar(xg, bg, amax);
    }
}

fn quantize_group_scalar(x: &[f32], out: &mut [BlockQ8], amax: f32) {
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        for (q, v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round_ties_even() as i8;
        }
        let half = |h: usize| {
            b.qs[16 * h..16 * h + 16]
                .iter()
                .map(|&q| q as i32)
                .sum::<i32>()
        };
        let (h0, h1) = (half(0), half(1));
        b.d = d;
        b.s = d * (h0 + h1) as f32;
        b.hs = [h0 as i16, h1 as i16];
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_avx2(x: &[f32], out: &mut [BlockQ8], group: usize) {
    use std::arch::x86_64::*;
    let abs_mask = _mm256_set1_ps(-0.0);
    for (xg, bg) in x.chunks_exact(QK * group).zip(out.chunks_exact_mut(group)) {
        let mut m = _mm256_setzero_ps();
        for c in xg.chunks_exact(8) {
            // SAFETY: `c` holds 8 floats; the load is unaligned.
            let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
            m = _mm256_max_ps(m, _mm256_andnot_ps(abs_mask, v));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m1 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m1);
        // SAFETY: forwarded; the features are enabled on this function.
        unsafe { quantize_group_avx2(xg, bg, amax) };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_group_avx2(x: &[f32], out: &mut [BlockQ8], amax: f32) {
    use std::arch::x86_64::*;
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        // SAFETY: `xs` holds 32 floats; loads are unaligned.
        let v = unsafe {
            [
                _mm256_loadu_ps(xs.as_ptr()),
                _mm256_loadu_ps(xs.as_ptr().add(8)),
                _mm256_loadu_ps(xs.as_ptr().add(16)),
                _mm256_loadu_ps(xs.as_ptr().add(24)),
            ]
        };
        let r = v.map(|vi| {
            _mm256_cvtps_epi32(_mm256_round_ps(
                _mm256_mul_ps(vi, id),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            ))
        });
        // Pack i32 -> i16 -> i8 and undo the lane interleaving of the packs.
        let i01 = _mm256_packs_epi32(r[0], r[1]);
        let i23 = _mm256_packs_epi32(r[2], r[3]);
        let i = _mm256_packs_epi16(i01, i23);
        let i = _mm256_permutevar8x32_epi32(i, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: `qs` is 32 bytes.
        unsafe { _mm256_storeu_si256(b.qs.as_mut_ptr().cast(), i) };
        // Sums of each half's quants: pairs, then quads of each half side by side.
        let ones = _mm256_set1_epi16(1);
        let lo = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(i)), ones);
        let hi = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(i, 1)), ones);
        let both = _mm256_hadd_epi32(lo, hi);
        let both = _mm256_hadd_epi32(both, both);
        let s4 = _mm_add_epi32(
            _mm256_castsi256_si128(both),
            _mm256_extracti128_si256(both, 1),
        );
        let (h0, h1) = (_mm_cvtsi128_si32(s4), _mm_extract_epi32(s4, 1));
        b.d = d;
        b.s = d * (h0 + h1) as f32;
        b.hs = [h0 as i16, h1 as i16];
    }
}
