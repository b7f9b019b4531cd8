//! AVX2 dot products of one weight row with up to four Q8 activation rows at once: each weight
//! block is loaded and unpacked once and used for every activation row (the blocked kernel for
//! prompts; decode uses one row). With AVX-512 VNNI, `vpdpbusd` replaces the
//! `maddubs`+`madd` pair (same integer sums).

// Rows index several parallel arrays (pointers, accumulators, outputs) of const length R.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::blocks::{BlockQ8, QType};
use super::weights::{K_WORDS, k_high, k_nibbles, k_pair, k_scales};

/// `out[j * R + r] = row_j · acts[r]` for every row `j` of `rows` (consecutive rows of `rb`
/// bytes), `R = acts.len() <= 4`: the type dispatch happens once per call, not once per row.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (and AVX-512 F/VL/VNNI when `vnni`).
pub unsafe fn dot_rows(
    qtype: QType,
    rows: &[u8],
    rb: usize,
    acts: &[&[BlockQ8]],
    out: &mut [f32],
    vnni: bool,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match (acts.len(), vnni) {
            (4, false) => dot_avx2::<4>(qtype, rows, rb, acts, out),
            (3, false) => dot_avx2::<3>(qtype, rows, rb, acts, out),
            (2, false) => dot_avx2::<2>(qtype, rows, rb, acts, out),
            (1, false) => dot_avx2::<1>(qtype, rows, rb, acts, out),
            (4, true) => dot_vnni::<4>(qtype, rows, rb, acts, out),
            (3, true) => dot_vnni::<3>(qtype, rows, rb, acts, out),
            (2, true) => dot_vnni::<2>(qtype, rows, rb, acts, out),
            (1, true) => dot_vnni::<1>(qtype, rows, rb, acts, out),
            (n, _) => panic!("dot_rows takes 1 to 4 activation rows, got {n}"),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<const R: usize>(
    qtype: QType,
    rows: &[u8],
    rb: usize,
    acts: &[&[BlockQ8]],
    out: &mut [f32],
) {
    // SAFETY: forwarded; the features are enabled on this function.
    unsafe { dot_n::<R, false>(qtype, rows, rb, acts, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn dot_vnni<const R: usize>(
    qtype: QType,
    rows: &[u8],
    rb: usize,
    acts: &[&[BlockQ8]],
    out: &mut [f32],
) {
    // SAFETY: forwarded; the features are enabled on this function.
    unsafe { dot_n::<R, true>(qtype, rows, rb, acts, out) }
}

/// Sums of unsigned bytes `u` times signed bytes `s` in groups of four, as eight i32.
#[inline(always)]
unsafe fn dot_us<const VNNI: bool>(u: __m256i, s: __m256i) -> __m256i {
    // SAFETY: inlined only into `dot_avx2` (AVX2) and `dot_vnni` (VNNI+VL).
    unsafe {
        if VNNI {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }
}

#[inline(always)]
unsafe fn half(p: *const u8) -> f32 {
    // SAFETY: the callers enable F16C and pass two readable bytes.
    unsafe {
        let h = p.cast::<u16>().read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }
}

/// 16 bytes of nibbles to 32 bytes: low nibbles first, then high nibbles (GGUF order).
#[inline(always)]
unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
    // SAFETY: the callers enable AVX2 and pass 16 readable bytes.
    unsafe {
        let b = _mm_loadu_si128(p.cast());
        let both = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }
}

/// 32 bits (little-endian u32 at `p`) to 32 bytes: byte j is 0xff where bit j is set, else 0.
#[inline(always)]
unsafe fn bytes_from_bits(p: *const u8) -> __m256i {
    // SAFETY: the callers enable AVX2 and pass 4 readable bytes.
    unsafe {
        let bits = p.cast::<u32>().read_unaligned() as i32;
        // Byte j takes source byte j / 8, then every bit but (j % 8) is forced to one.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
    }
}

/// Q5 high bits (u32 at `p`) as 0x10 in the bytes whose weight has it.
#[inline(always)]
unsafe fn fifth_bits(p: *const u8) -> __m256i {
    // SAFETY: the callers enable AVX2 and pass 4 readable bytes.
    unsafe { _mm256_and_si256(bytes_from_bits(p), _mm256_set1_epi8(0x10)) }
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: the callers enable AVX2.
    unsafe {
        let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;
const Q5_0: u8 = 3;
const Q5_1: u8 = 4;
const Q4K: u8 = 5;
const Q5K: u8 = 6;
const Q6K: u8 = 7;

/// Monomorphises on the weight type so the block loop carries no type dispatch; the row loop
/// runs here, inside the function that enables the CPU features, so nothing per row is a call.
#[inline(always)]
unsafe fn dot_n<const R: usize, const VNNI: bool>(
    qtype: QType,
    rows: &[u8],
    rb: usize,
    acts: &[&[BlockQ8]],
    out: &mut [f32],
) {
    for (w, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(R)) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match qtype {
                QType::Q4_0 => dot_t::<R, VNNI, Q4_0>(w, acts, o),
                QType::Q4_1 => dot_t::<R, VNNI, Q4_1>(w, acts, o),
                QType::Q8_0 => dot_t::<R, VNNI, Q8_0>(w, acts, o),
                QType::Q5_0 => dot_t::<R, VNNI, Q5_0>(w, acts, o),
                QType::Q5_1 => dot_t::<R, VNNI, Q5_1>(w, acts, o),
                // Per-16 scales multiply the 16-bit pair sums (`madd` with the scales instead
                // of ones), so VNNI's fused product has nothing to add here.
                QType::Q4K => dot_k::<R, Q4K>(w, acts, o),
                QType::Q5K => dot_k::<R, Q5K>(w, acts, o),
                QType::Q6K => dot_k::<R, Q6K>(w, acts, o),
            }
        }
    }
}

/// Running sums for one chain of blocks: a vector of scaled integer sums and the min term of
/// Q4_1 and Q5_1.
#[derive(Clone, Copy)]
struct Acc<const R: usize> {
    v: [__m256; R],
    min: [f32; R],
}

#[inline(always)]
unsafe fn dot_t<const R: usize, const VNNI: bool, const T: u8>(
    row: &[u8],
    acts: &[&[BlockQ8]],
    out: &mut [f32],
) {
    let bb = match T {
        Q4_0 => QType::Q4_0.block_bytes(),
        Q4_1 => QType::Q4_1.block_bytes(),
        Q5_0 => QType::Q5_0.block_bytes(),
        Q5_1 => QType::Q5_1.block_bytes(),
        Q8_0 => QType::Q8_0.block_bytes(),
        _ => unreachable!("K-quants go through dot_k"),
    };
    let nb = row.len() / bb;
    assert!(acts.len() == R && out.len() >= R && acts.iter().all(|a| a.len() >= nb));
    let a: [*const BlockQ8; R] = std::array::from_fn(|r| acts[r].as_ptr());
    let w = row.as_ptr();
    // SAFETY: the callers enable AVX2; every block index is below `nb`, so reads stay inside
    // `row` and `acts[r]`.
    unsafe {
        let zero = Acc {
            v: [_mm256_setzero_ps(); R],
            min: [0f32; R],
        };
        // Two chains (even and odd blocks) so one block's FMA need not wait for the last one's.
        let (mut even, mut odd) = (zero, zero);
        let mut b = 0;
        while b + 2 <= nb {
            block::<R, VNNI, T>(w.add(b * bb), &a, b, &mut even);
            block::<R, VNNI, T>(w.add((b + 1) * bb), &a, b + 1, &mut odd);
            b += 2;
        }
        if b < nb {
            block::<R, VNNI, T>(w.add(b * bb), &a, b, &mut even);
        }
        for r in 0..R {
            out[r] = hsum(_mm256_add_ps(even.v[r], odd.v[r])) + (even.min[r] + odd.min[r]);
        }
    }
}

/// Adds weight block `wb` times activation block `b` of every row to `acc`.
#[inline(always)]
unsafe fn block<const R: usize, const VNNI: bool, const T: u8>(
    wb: *const u8,
    a: &[*const BlockQ8; R],
    b: usize,
    acc: &mut Acc<R>,
) {
    // SAFETY: the caller enables AVX2 and passes in-bounds blocks.
    unsafe {
        if T != Q8_0 {
            // Unsigned quants times the activations, plus a per-block offset times the
            // activations' sum: Q4_1/Q5_1's minimum, or -8d / -16d for Q4_0/Q5_0 (whose quants are
            // stored with that bias), so no sign juggling is needed.
            let d = half(wb);
            let (qx, m) = match T {
                Q4_0 => (unpack_nibbles(wb.add(2)), -8.0 * d),
                Q5_0 => (
                    _mm256_or_si256(unpack_nibbles(wb.add(6)), fifth_bits(wb.add(2))),
                    -16.0 * d,
                ),
                Q4_1 => (unpack_nibbles(wb.add(4)), half(wb.add(2))),
                _ => (
                    _mm256_or_si256(unpack_nibbles(wb.add(8)), fifth_bits(wb.add(4))),
                    half(wb.add(2)),
                ),
            };
            for r in 0..R {
                let ab = &*a[r].add(b);
                let qy = _mm256_loadu_si256(ab.qs.as_ptr().cast());
                let p = dot_us::<VNNI>(qx, qy);
                acc.v[r] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * ab.d), acc.v[r]);
                acc.min[r] += m * ab.s;
            }
        } else {
            // Q8_0's signed weights: make them unsigned for the u8×i8 product and move their
            // sign onto the activations (exact while no byte is -128: GGUF Q8_0 and our
            // activations stay within ±127).
            let qx = _mm256_loadu_si256(wb.add(2).cast());
            let ax = _mm256_sign_epi8(qx, qx);
            let d = half(wb);
            for r in 0..R {
                let ab = &*a[r].add(b);
                let qy = _mm256_loadu_si256(ab.qs.as_ptr().cast());
                let p = dot_us::<VNNI>(ax, _mm256_sign_epi8(qy, qx));
                acc.v[r] =
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * ab.d), acc.v[r]);
            }
        }
    }
}

/// K-quant rows: each 32-weight sub-block of a super-block meets one Q8 block; the integer pair
/// sums are weighted by the sub-block's scales in 16 bits and added over the super-block (its
/// activations share one scale, see `quantize_row`), then scaled by `d * d_act` in f32 once.
#[inline(always)]
unsafe fn dot_k<const R: usize, const T: u8>(row: &[u8], acts: &[&[BlockQ8]], out: &mut [f32]) {
    let bb = match T {
        Q4K => QType::Q4K.block_bytes(),
        Q5K => QType::Q5K.block_bytes(),
        _ => QType::Q6K.block_bytes(),
    };
    let nsb = row.len() / bb;
    assert!(acts.len() == R && out.len() >= R && acts.iter().all(|a| a.len() >= nsb * 8));
    let a: [*const BlockQ8; R] = std::array::from_fn(|r| acts[r].as_ptr());
    // SAFETY: the callers enable AVX2; super-block `sb` reads bytes sb*bb..(sb+1)*bb of `row`
    // and activation blocks 8sb..8sb+8, all in bounds by the assertion.
    unsafe {
        let mut acc = Acc {
            v: [_mm256_setzero_ps(); R],
            min: [0f32; R],
        };
        let low4 = _mm256_set1_epi8(0x0f);
        for sb in 0..nsb {
            let blk = row.as_ptr().add(sb * bb);
            let ab0 = sb * 8;
            let mut isum = [_mm256_setzero_si256(); R];
            // The super-block's `d`, once its integer sums are in `isum`.
            let d = if T == Q6K {
                let scales = std::slice::from_raw_parts(blk.add(192).cast::<i8>(), 16);
                let qh = [
                    _mm256_loadu_si256(blk.add(128).cast()),
                    _mm256_loadu_si256(blk.add(160).cast()),
                ];
                for t in 0..8 {
                    let (n, u) = (t / 4, t % 4);
                    let v = _mm256_loadu_si256(blk.add(64 * n + 32 * (u & 1)).cast());
                    let nib = if u < 2 {
                        _mm256_and_si256(v, low4)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16(v, 4), low4)
                    };
                    let hb = _mm256_and_si256(
                        _mm256_srl_epi16(qh[n], _mm_cvtsi32_si128(2 * u as i32)),
                        _mm256_set1_epi8(3),
                    );
                    let q = _mm256_sub_epi8(
                        _mm256_or_si256(nib, _mm256_slli_epi16(hb, 4)),
                        _mm256_set1_epi8(32),
                    );
                    let sc = _mm256_set_m128i(
                        _mm_set1_epi16(scales[8 * n + 2 * u + 1] as i16),
                        _mm_set1_epi16(scales[8 * n + 2 * u] as i16),
                    );
                    // Signed weights: as for Q8_0, their sign moves onto the activations.
                    let ax = _mm256_sign_epi8(q, q);
                    for r in 0..R {
                        let ab = &*a[r].add(ab0 + t);
                        let qy = _mm256_loadu_si256(ab.qs.as_ptr().cast());
                        let p = _mm256_madd_epi16(
                            _mm256_maddubs_epi16(ax, _mm256_sign_epi8(qy, q)),
                            sc,
                        );
                        isum[r] = _mm256_add_epi32(isum[r], p);
                    }
                }
                half(blk.add(208))
            } else {
                let (d, dmin) = (half(blk), half(blk.add(2)));
                let (scs, mins) =
                    super::blocks::scales_mins_k4(std::slice::from_raw_parts(blk.add(4), 12));
                let qs = if T == Q4K { 16 } else { 48 };
                let qh = _mm256_loadu_si256(blk.add(16).cast());
                for j in 0..4 {
                    let v = _mm256_loadu_si256(blk.add(qs + 32 * j).cast());
                    let nibs = [
                        _mm256_and_si256(v, low4),
                        _mm256_and_si256(_mm256_srli_epi16(v, 4), low4),
                    ];
                    for (h, nib) in nibs.into_iter().enumerate() {
                        let t = 2 * j + h;
                        let q = if T == Q5K {
                            let bit = _mm256_and_si256(
                                _mm256_srl_epi16(qh, _mm_cvtsi32_si128(t as i32)),
                                _mm256_set1_epi8(1),
                            );
                            _mm256_or_si256(nib, _mm256_slli_epi16(bit, 4))
                        } else {
                            nib
                        };
                        let sc = _mm256_set1_epi16(scs[t] as i16);
                        let dm = dmin * mins[t] as f32;
                        for r in 0..R {
                            let ab = &*a[r].add(ab0 + t);
                            let qy = _mm256_loadu_si256(ab.qs.as_ptr().cast());
                            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, qy), sc);
                            isum[r] = _mm256_add_epi32(isum[r], p);
                            acc.min[r] += dm * ab.s;
                        }
                    }
                }
                d
            };
            // One activation scale for the whole super-block (see `quantize_row`).
            for r in 0..R {
                let da = (*a[r].add(ab0)).d;
                acc.v[r] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(isum[r]),
                    _mm256_set1_ps(d * da),
                    acc.v[r],
                );
            }
        }
        for r in 0..R {
            out[r] = hsum(acc.v[r]) - acc.min[r];
        }
    }
}

/// Interleaved groups (`weights.rs`): `out[g * 8R + r * 8 + i] = row(8g + i) · acts[r]` for
/// every group in `groups` (`nb` blocks, or K-quant super-blocks, each), `R = acts.len() <= 4`,
/// or 8 where [`wide_tile`] says so.
/// `pairs`: with VNNI, take Q4_0, Q4_1 and Q8_0 two groups at a time in 512-bit registers (the
/// same bits; faster for prompts, not for a decode batch, whose weights stream from memory).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (and AVX-512 F/VL/VNNI when `vnni`).
pub unsafe fn dot_groups(
    qtype: QType,
    groups: &[u8],
    nb: usize,
    acts: &[&[BlockQ8]],
    out: &mut [f32],
    vnni: bool,
    pairs: bool,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match acts.len() {
            1 => groups_of::<1>(qtype, groups, nb, acts, out, vnni, pairs),
            2 => groups_of::<2>(qtype, groups, nb, acts, out, vnni, pairs),
            3 => groups_of::<3>(qtype, groups, nb, acts, out, vnni, pairs),
            4 => groups_of::<4>(qtype, groups, nb, acts, out, vnni, pairs),
            // `wide_tile` checked VNNI.
            8 if wide_tile(qtype, vnni) => match qtype {
                QType::Q4_0 => groups_vnni::<8, Q4_0>(groups, nb, acts, out, pairs),
                QType::Q4_1 => groups_vnni::<8, Q4_1>(groups, nb, acts, out, pairs),
                QType::Q8_0 => groups_vnni::<8, Q8_0>(groups, nb, acts, out, pairs),
                QType::Q4K => groups_vnni::<8, Q4K>(groups, nb, acts, out, false),
                QType::Q5K => groups_vnni::<8, Q5K>(groups, nb, acts, out, false),
                QType::Q6K => groups_vnni::<8, Q6K>(groups, nb, acts, out, false),
                _ => unreachable!("wide_tile"),
            },
            r => panic!("dot_groups takes 1 to 4 activation rows (8 where `wide_tile`), got {r}"),
        }
    }
}

/// Whether [`dot_groups`] takes eight activation rows at once for `qtype`: with VNNI (32 vector
/// registers), the 32-weight types without fifth bits, whose eight weight vectors, eight sums and
/// eight minimum sums then stay in registers while each block is unpacked once for all eight; and
/// the K-quants, whose eight weight vectors and eight integer sums and offsets stay in registers
/// through a sub-block (each sub-block's quants, high bits and scales are unpacked once for
/// eight rows instead of four: 5-13% less time at 127 rows).
pub fn wide_tile(qtype: QType, vnni: bool) -> bool {
    vnni && matches!(
        qtype,
        QType::Q4_0 | QType::Q4_1 | QType::Q8_0 | QType::Q4K | QType::Q5K | QType::Q6K
    )
}

unsafe fn groups_of<const R: usize>(
    qtype: QType,
    groups: &[u8],
    nb: usize,
    acts: &[&[BlockQ8]],
    out: &mut [f32],
    vnni: bool,
    pairs: bool,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match (qtype, vnni) {
            (QType::Q4_0, false) => groups_avx2::<R, Q4_0>(groups, nb, acts, out),
            (QType::Q4_1, false) => groups_avx2::<R, Q4_1>(groups, nb, acts, out),
            (QType::Q5_0, false) => groups_avx2::<R, Q5_0>(groups, nb, acts, out),
            (QType::Q5_1, false) => groups_avx2::<R, Q5_1>(groups, nb, acts, out),
            (QType::Q8_0, false) => groups_avx2::<R, Q8_0>(groups, nb, acts, out),
            (QType::Q4_0, true) => groups_vnni::<R, Q4_0>(groups, nb, acts, out, pairs),
            (QType::Q4_1, true) => groups_vnni::<R, Q4_1>(groups, nb, acts, out, pairs),
            (QType::Q5_0, true) => groups_vnni::<R, Q5_0>(groups, nb, acts, out, pairs),
            (QType::Q5_1, true) => groups_vnni::<R, Q5_1>(groups, nb, acts, out, pairs),
            (QType::Q8_0, true) => groups_vnni::<R, Q8_0>(groups, nb, acts, out, pairs),
            (QType::Q4K, false) => groups_avx2::<R, Q4K>(groups, nb, acts, out),
            (QType::Q5K, false) => groups_avx2::<R, Q5K>(groups, nb, acts, out),
            (QType::Q6K, false) => groups_avx2::<R, Q6K>(groups, nb, acts, out),
            (QType::Q4K, true) => groups_vnni::<R, Q4K>(groups, nb, acts, out, false),
            (QType::Q5K, true) => groups_vnni::<R, Q5K>(groups, nb, acts, out, false),
            (QType::Q6K, true) => groups_vnni::<R, Q6K>(groups, nb, acts, out, false),
        }
    }
}

/// Sets bit 4 of every byte of vector `u` from bit `u` of the same byte of `q` (the fifth bits
/// as `weights::fifth_bits` arranges them).
#[inline(always)]
unsafe fn merge_fifth_bits(w: &mut [__m256i; 8], q: __m256i) {
    // SAFETY: inlined only into functions that enable AVX2.
    unsafe {
        let bit4 = _mm256_set1_epi8(0x10);
        w[0] = _mm256_or_si256(w[0], _mm256_and_si256(_mm256_slli_epi16(q, 4), bit4));
        w[1] = _mm256_or_si256(w[1], _mm256_and_si256(_mm256_slli_epi16(q, 3), bit4));
        w[2] = _mm256_or_si256(w[2], _mm256_and_si256(_mm256_slli_epi16(q, 2), bit4));
        w[3] = _mm256_or_si256(w[3], _mm256_and_si256(_mm256_slli_epi16(q, 1), bit4));
        w[4] = _mm256_or_si256(w[4], _mm256_and_si256(q, bit4));
        w[5] = _mm256_or_si256(w[5], _mm256_and_si256(_mm256_srli_epi16(q, 1), bit4));
        w[6] = _mm256_or_si256(w[6], _mm256_and_si256(_mm256_srli_epi16(q, 2), bit4));
        w[7] = _mm256_or_si256(w[7], _mm256_and_si256(_mm256_srli_epi16(q, 3), bit4));
    }
}

/// The four activation bytes `4u..4u+4` of a block (`qa` at its quants) in every 32-bit lane: one
/// broadcast load, which takes a load port rather than a shuffle beside the products.
#[inline(always)]
unsafe fn act_group(qa: *const i8, u: usize) -> __m256i {
    // SAFETY: the callers enable AVX2 and pass a block's 32 quants.
    unsafe { _mm256_set1_epi32(qa.add(4 * u).cast::<i32>().read_unaligned()) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn groups_avx2<const R: usize, const T: u8>(
    groups: &[u8],
    nb: usize,
    acts: &[&[BlockQ8]],
    out: &mut [f32],
) {
    // SAFETY: forwarded; the features are enabled on this function.
    unsafe {
        if matches!(T, Q4K | Q5K | Q6K) {
            groups_k::<R, T, false>(groups, nb, acts, out)
        } else {
            groups_body::<R, T, false>(groups, nb, acts, out)
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn groups_vnni<const R: usize, const T: u8>(
    groups: &[u8],
    nb: usize,
    acts: &[&[BlockQ8]],
    out: &mut [f32],
    pairs: bool,
) {
    // SAFETY: forwarded; the features are enabled on this function.
    unsafe {
        if pairs && matches!(T, Q4_0 | Q4_1 | Q8_0) {
            // Two groups at a time in 512-bit registers, then any last one alone.
            let gb = nb * group_block_bytes(T);
            let pairs = groups.len() / gb / 2;
            pairs_vnni::<R, T>(&groups[..pairs * 2 * gb], nb, acts, out);
            let (rest, out) = (&groups[pairs * 2 * gb..], &mut out[pairs * 2 * 8 * R..]);
            if !rest.is_empty() {
                groups_body::<R, T, true>(rest, nb, acts, out);
            }
        } else if matches!(T, Q4K | Q5K | Q6K) {
            groups_k::<R, T, true>(groups, nb, acts, out)
        } else {
            groups_body::<R, T, true>(groups, nb, acts, out)
        }
    }
}

/// Where the quants start in one interleaved block (eight rows) of a 32-weight type: after the
/// scales, the minimums (Q4_1, Q5_1) and the fifth bits (Q5_0, Q5_1).
const fn group_quants_at(t: u8) -> usize {
    let minimum = t == Q4_1 || t == Q5_1;
    let fifth = t == Q5_0 || t == Q5_1;
    16 * (1 + minimum as usize) + 32 * fifth as usize
}

/// Bytes of one interleaved block (eight rows) of a 32-weight type.
const fn group_block_bytes(t: u8) -> usize {
    group_quants_at(t) + if t == Q8_0 { 256 } else { 128 }
}

/// [`groups_body`] with VNNI for Q4_0, Q4_1 and Q8_0, two interleaved groups (sixteen rows) at a
/// time in 512-bit registers: each broadcast of four activation bytes and each `vpdpbusd` serves
/// sixteen rows instead of eight. Every lane does the very operations of `groups_body`, so the
/// results are the same bits. `groups` holds an even number of groups.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn pairs_vnni<const R: usize, const T: u8>(
    groups: &[u8],
    nb: usize,
    acts: &[&[BlockQ8]],
    out: &mut [f32],
) {
    let minimum = T == Q4_1;
    let (quants, gb) = (group_quants_at(T), group_block_bytes(T));
    assert!(acts.len() == R && acts.iter().all(|a| a.len() >= nb));
    assert!(
        groups.len().is_multiple_of(2 * nb * gb) && out.len() >= groups.len() / (nb * gb) * 8 * R
    );
    let a: [*const BlockQ8; R] = std::array::from_fn(|r| acts[r].as_ptr());
    // Both halves of a 512-bit register from two 256-bit ones.
    #[inline(always)]
    unsafe fn join(lo: __m256i, hi: __m256i) -> __m512i {
        // SAFETY: inlined into `pairs_vnni` (AVX-512 F).
        unsafe { _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1) }
    }
    // SAFETY: pair `g` reads its two groups' blocks, bytes (2g * nb + b) * gb .. + gb and
    // ((2g + 1) * nb + b) * gb .. + gb of `groups`, activation block `b < nb` of each row, and
    // writes out[2g * 8R .. (2g + 2) * 8R], all in bounds by the assertions.
    unsafe {
        let low4 = _mm256_set1_epi8(0x0f);
        for (g, pair) in groups.chunks_exact(2 * nb * gb).enumerate() {
            let mut acc = [_mm512_setzero_ps(); R];
            let mut acc_min = [_mm512_setzero_ps(); R];
            for b in 0..nb {
                let (p0, p1) = (pair.as_ptr().add(b * gb), pair.as_ptr().add((nb + b) * gb));
                let d = _mm512_cvtph_ps(_mm256_inserti128_si256(
                    _mm256_castsi128_si256(_mm_loadu_si128(p0.cast())),
                    _mm_loadu_si128(p1.cast()),
                    1,
                ));
                let mut w = [_mm512_setzero_si512(); 8];
                if T == Q8_0 {
                    let flip = _mm256_set1_epi8(-128);
                    for u in 0..8 {
                        let lo = _mm256_loadu_si256(p0.add(quants + 32 * u).cast());
                        let hi = _mm256_loadu_si256(p1.add(quants + 32 * u).cast());
                        w[u] = join(_mm256_xor_si256(lo, flip), _mm256_xor_si256(hi, flip));
                    }
                } else {
                    for v in 0..4 {
                        let lo = _mm256_loadu_si256(p0.add(quants + 32 * v).cast());
                        let hi = _mm256_loadu_si256(p1.add(quants + 32 * v).cast());
                        w[v] = join(_mm256_and_si256(lo, low4), _mm256_and_si256(hi, low4));
                        w[4 + v] = join(
                            _mm256_and_si256(_mm256_srli_epi16(lo, 4), low4),
                            _mm256_and_si256(_mm256_srli_epi16(hi, 4), low4),
                        );
                    }
                }
                let m = if minimum {
                    _mm512_cvtph_ps(_mm256_inserti128_si256(
                        _mm256_castsi128_si256(_mm_loadu_si128(p0.add(16).cast())),
                        _mm_loadu_si128(p1.add(16).cast()),
                        1,
                    ))
                } else {
                    _mm512_setzero_ps()
                };
                for r in 0..R {
                    let ab = &*a[r].add(b);
                    let qa = ab.qs.as_ptr();
                    let mut s = _mm512_setzero_si512();
                    for u in 0..8 {
                        let x = _mm512_set1_epi32(qa.add(4 * u).cast::<i32>().read_unaligned());
                        s = _mm512_dpbusd_epi32(s, w[u], x);
                    }
                    if T == Q8_0 {
                        let sum = ab.hs[0] as i32 + ab.hs[1] as i32;
                        s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * sum));
                    }
                    let isum = _mm512_cvtepi32_ps(s);
                    if minimum {
                        acc[r] =
                            _mm512_fmadd_ps(_mm512_mul_ps(isum, _mm512_set1_ps(ab.d)), d, acc[r]);
                        acc_min[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(ab.s), acc_min[r]);
                    } else {
                        let offset = if T == Q4_0 { -8.0 } else { 0.0 };
                        let t = _mm512_fmadd_ps(
                            isum,
                            _mm512_set1_ps(ab.d),
                            _mm512_set1_ps(offset * ab.s),
                        );
                        acc[r] = _mm512_fmadd_ps(t, d, acc[r]);
                    }
                }
            }
            for r in 0..R {
                let v = _mm512_add_ps(acc[r], acc_min[r]);
                let lo = _mm512_castps512_ps256(v);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
                _mm256_storeu_ps(out.as_mut_ptr().add(2 * g * 8 * R + r * 8), lo);
                _mm256_storeu_ps(out.as_mut_ptr().add((2 * g + 1) * 8 * R + r * 8), hi);
            }
        }
    }
}

/// The interleaved product for the 32-weight types. With VNNI every group of four weight bytes
/// meets its activation bytes in one `vpdpbusd` into 32-bit sums; without, `maddubs` products are
/// summed in 16 bits and widened by one `madd`.
#[inline(always)]
unsafe fn groups_body<const R: usize, const T: u8, const VNNI: bool>(
    groups: &[u8],
    nb: usize,
    acts: &[&[BlockQ8]],
    out: &mut [f32],
) {
    let minimum = T == Q4_1 || T == Q5_1;
    let fifth = T == Q5_0 || T == Q5_1;
    let (quants, gb) = (group_quants_at(T), group_block_bytes(T));
    assert!(acts.len() == R && acts.iter().all(|a| a.len() >= nb));
    assert!(groups.len().is_multiple_of(nb * gb) && out.len() >= groups.len() / (nb * gb) * 8 * R);
    let a: [*const BlockQ8; R] = std::array::from_fn(|r| acts[r].as_ptr());
    // SAFETY: group `g` block `b` reads bytes (g * nb + b) * gb .. + gb of `groups`, activation
    // block `b < nb` of each row, and writes out[g * 8R .. (g + 1) * 8R], all in bounds by the
    // assertions; inlined only into `groups_avx2` (AVX2, FMA, F16C) and `groups_vnni` (and VNNI).
    unsafe {
        let low4 = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        for (g, grp) in groups.chunks_exact(nb * gb).enumerate() {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut acc_min = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let p = grp.as_ptr().add(b * gb);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
                // w[u]: weights 4u..4u+4 of each row, in its 32-bit lane (the low nibbles of
                // the four loads, then the high nibbles; Q8_0's eight loads as they are).
                let mut w = [_mm256_setzero_si256(); 8];
                if T == Q8_0 {
                    // With VNNI the signed weights go in offset by 128, as unsigned bytes: the
                    // products then need no sign moved onto every row's activations, and the
                    // offset comes back out as 128 times the activations' sum, in integers.
                    let flip = _mm256_set1_epi8(if VNNI { -128 } else { 0 });
                    for u in 0..8 {
                        let raw = _mm256_loadu_si256(p.add(quants + 32 * u).cast());
                        w[u] = _mm256_xor_si256(raw, flip);
                    }
                } else {
                    for v in 0..4 {
                        let raw = _mm256_loadu_si256(p.add(quants + 32 * v).cast());
                        w[v] = _mm256_and_si256(raw, low4);
                        w[4 + v] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
                    }
                }
                if fifth {
                    // Bit u of each byte is vector u's fifth bit (`weights::fifth_bits`).
                    let q = _mm256_loadu_si256(p.add(quants - 32).cast());
                    merge_fifth_bits(&mut w, q);
                }
                for r in 0..R {
                    let ab = &*a[r].add(b);
                    let qa = ab.qs.as_ptr();
                    // A macro, not a closure: a closure is a function of its own, without
                    // the callers' target features.
                    macro_rules! prod {
                        ($u:expr) => {
                            _mm256_maddubs_epi16(w[$u], act_group(qa, $u))
                        };
                    }
                    let isum = if VNNI {
                        let mut s = _mm256_setzero_si256();
                        for u in 0..8 {
                            s = _mm256_dpbusd_epi32(s, w[u], act_group(qa, u));
                        }
                        if T == Q8_0 {
                            // Σ (w + 128) a - 128 Σ a: the same integer as Σ w a.
                            let sum = ab.hs[0] as i32 + ab.hs[1] as i32;
                            s = _mm256_sub_epi32(s, _mm256_set1_epi32(128 * sum));
                        }
                        s
                    } else if T == Q8_0 {
                        // Signed weights: their sign moves onto the activations (as in
                        // `block`); a pair sum may reach 2 * 127 * 127, so each widens alone.
                        let mut s = _mm256_setzero_si256();
                        for u in 0..8 {
                            let p = _mm256_maddubs_epi16(
                                _mm256_sign_epi8(w[u], w[u]),
                                _mm256_sign_epi8(act_group(qa, u), w[u]),
                            );
                            s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                        }
                        s
                    } else if fifth {
                        // 8 products of up to 31 * 127 per 16-bit lane: two halves.
                        let h0 = _mm256_add_epi16(
                            _mm256_add_epi16(prod!(0), prod!(1)),
                            _mm256_add_epi16(prod!(2), prod!(3)),
                        );
                        let h1 = _mm256_add_epi16(
                            _mm256_add_epi16(prod!(4), prod!(5)),
                            _mm256_add_epi16(prod!(6), prod!(7)),
                        );
                        _mm256_add_epi32(_mm256_madd_epi16(h0, ones), _mm256_madd_epi16(h1, ones))
                    } else {
                        // 16 products of a nibble and a byte: at most 16 * 15 * 127 = 30480.
                        let h0 = _mm256_add_epi16(
                            _mm256_add_epi16(prod!(0), prod!(1)),
                            _mm256_add_epi16(prod!(2), prod!(3)),
                        );
                        let h1 = _mm256_add_epi16(
                            _mm256_add_epi16(prod!(4), prod!(5)),
                            _mm256_add_epi16(prod!(6), prod!(7)),
                        );
                        _mm256_madd_epi16(_mm256_add_epi16(h0, h1), ones)
                    };
                    let isum = _mm256_cvtepi32_ps(isum);
                    if minimum {
                        let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast()));
                        acc[r] =
                            _mm256_fmadd_ps(_mm256_mul_ps(isum, _mm256_set1_ps(ab.d)), d, acc[r]);
                        acc_min[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(ab.s), acc_min[r]);
                    } else {
                        // d * (d_act * Σ q a - offset * s): Q4_0 and Q5_0 quants are stored
                        // as q + 8 and q + 16.
                        let offset = match T {
                            Q4_0 => -8.0,
                            Q5_0 => -16.0,
                            _ => 0.0,
                        };
                        let t = _mm256_fmadd_ps(
                            isum,
                            _mm256_set1_ps(ab.d),
                            _mm256_set1_ps(offset * ab.s),
                        );
                        acc[r] = _mm256_fmadd_ps(t, d, acc[r]);
                    }
                }
            }
            for r in 0..R {
                let o = out.as_mut_ptr().add(g * 8 * R + r * 8);
                _mm256_storeu_ps(o, _mm256_add_ps(acc[r], acc_min[r]));
            }
        }
    }
}

/// Shuffle masks (per 128-bit lane) putting byte `t` of each 32-bit lane into both of its
/// 16-bit halves, zero-extended: a per-row scale for `madd`.
const BYTE_TO_PAIRS: [[i8; 16]; 4] = [pairs_mask(0), pairs_mask(1), pairs_mask(2), pairs_mask(3)];

const fn pairs_mask(t: i8) -> [i8; 16] {
    let mut m = [-128i8; 16]; // 0x80: a zero byte
    let mut i = 0;
    while i < 4 {
        m[4 * i] = 4 * i as i8 + t;
        m[4 * i + 2] = 4 * i as i8 + t;
        i += 1;
    }
    m
}

/// Shuffle masks copying the low (`[0]`) or high (`[1]`) 16-bit half of each 32-bit lane into
/// both halves.
const HALF_TO_PAIRS: [[i8; 16]; 2] = [halves_mask(0), halves_mask(2)];

const fn halves_mask(at: i8) -> [i8; 16] {
    let mut m = [0i8; 16];
    let mut i = 0;
    while i < 4 {
        m[4 * i] = 4 * i as i8 + at;
        m[4 * i + 1] = 4 * i as i8 + at + 1;
        m[4 * i + 2] = 4 * i as i8 + at;
        m[4 * i + 3] = 4 * i as i8 + at + 1;
        i += 1;
    }
    m
}

/// `_mm256_shuffle_epi8` with the same 16-byte mask in both lanes.
#[inline(always)]
unsafe fn shuffle_lanes(v: __m256i, mask: &[i8; 16]) -> __m256i {
    // SAFETY: the callers enable AVX2; `mask` is 16 readable bytes.
    unsafe {
        let m = _mm_loadu_si128(mask.as_ptr().cast());
        _mm256_shuffle_epi8(v, _mm256_set_m128i(m, m))
    }
}

/// Interleaved K-quant groups (layout: `weights::K_WORDS`). Each sub-block's eight quant vectors
/// meet one activation block as in [`groups_avx2`]; the 16-bit sums are weighted by the rows'
/// scales in `madd`; Q4_K's and Q5_K's minimums and Q6_K's offset of 32 multiply the
/// activations' half sums (`BlockQ8::hs`) in `madd` too, so a super-block ends in integers before
/// one f32 scaling (its activations share one scale, see `quantize_row`). With VNNI each
/// sub-block's products sum in one `vpdpbusd` chain per scale into 32 bits, multiplied by the
/// scale as integers: the same integers, so the same bits. Reached through [`groups_avx2`] and
/// [`groups_vnni`].
#[inline(always)]
unsafe fn groups_k<const R: usize, const T: u8, const VNNI: bool>(
    groups: &[u8],
    nsb: usize,
    acts: &[&[BlockQ8]],
    out: &mut [f32],
) {
    let qtype = match T {
        Q4K => QType::Q4K,
        Q5K => QType::Q5K,
        _ => QType::Q6K,
    };
    let gb = 8 * qtype.block_bytes();
    assert!(acts.len() == R && acts.iter().all(|a| a.len() >= nsb * 8));
    assert!(
        groups.len().is_multiple_of(nsb * gb) && out.len() >= groups.len() / (nsb * gb) * 8 * R
    );
    let a: [*const BlockQ8; R] = std::array::from_fn(|r| acts[r].as_ptr());
    // SAFETY: group `g` super-block `sb` reads bytes (g * nsb + sb) * gb .. + gb of `groups`
    // (the layout's pieces lie inside), activation blocks 8sb..8sb+8 of each row, and writes
    // out[g * 8R .. (g + 1) * 8R], all in bounds by the assertions; inlined only into
    // `groups_avx2` (AVX2, FMA, F16C) and `groups_vnni` (and VNNI, which `VNNI` needs).
    unsafe {
        let low4 = _mm256_set1_epi8(0x0f);
        for (g, grp) in groups.chunks_exact(nsb * gb).enumerate() {
            let mut acc = [_mm256_setzero_ps(); R];
            let mut acc_min = [_mm256_setzero_ps(); R];
            for sb in 0..nsb {
                let p = grp.as_ptr().add(sb * gb);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
                // Q4_K/Q5_K: the rows' scales (bytes 0..4 of each lane: sub-blocks 0..4, then
                // 4..8) and minimums, decoded from the three words as `scales_mins_k4` does.
                let (mut sc, mut mn) = ([_mm256_setzero_si256(); 2], [_mm256_setzero_si256(); 2]);
                if T != Q6K {
                    let word = |w: usize| _mm256_loadu_si256(p.add(K_WORDS + 32 * w).cast());
                    let (w0, w1, w2) = (word(0), word(1), word(2));
                    let (low6, low4w, top2) = (
                        _mm256_set1_epi32(0x3f3f_3f3f),
                        _mm256_set1_epi32(0x0f0f_0f0f),
                        _mm256_set1_epi32(0x0303_0303),
                    );
                    let high = |w: __m256i| {
                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w, 6), top2), 4)
                    };
                    sc = [
                        _mm256_and_si256(w0, low6),
                        _mm256_or_si256(_mm256_and_si256(w2, low4w), high(w0)),
                    ];
                    mn = [
                        _mm256_and_si256(w1, low6),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi32(w2, 4), low4w),
                            high(w1),
                        ),
                    ];
                }
                let mut isum = [_mm256_setzero_si256(); R];
                // Q4_K/Q5_K: Σ min * half sums; Q6_K: Σ scale * half sums (times 32).
                let mut ioff = [_mm256_setzero_si256(); R];
                for pair in 0..4 {
                    let (_, sub_lo, sub_hi) = k_pair(qtype, pair);
                    for (half, t) in [(0, sub_lo), (1, sub_hi)] {
                        let mut w = [_mm256_setzero_si256(); 8];
                        for (u, wu) in w.iter_mut().enumerate() {
                            let raw =
                                _mm256_loadu_si256(p.add(k_nibbles(qtype, pair) + 32 * u).cast());
                            *wu = if half == 0 {
                                _mm256_and_si256(raw, low4)
                            } else {
                                _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4)
                            };
                        }
                        if T == Q5K {
                            let q = _mm256_loadu_si256(p.add(k_high(qtype, t)).cast());
                            merge_fifth_bits(&mut w, q);
                        }
                        if T == Q6K {
                            // Bits 2u'..2u'+2 of vector h's bytes: the high bits of vector 4h + u'.
                            let bits = _mm256_set1_epi8(0x30);
                            for h in 0..2 {
                                let q = _mm256_loadu_si256(p.add(k_high(qtype, t) + 32 * h).cast());
                                let u = 4 * h;
                                w[u] = _mm256_or_si256(
                                    w[u],
                                    _mm256_and_si256(_mm256_slli_epi16(q, 4), bits),
                                );
                                w[u + 1] = _mm256_or_si256(
                                    w[u + 1],
                                    _mm256_and_si256(_mm256_slli_epi16(q, 2), bits),
                                );
                                w[u + 2] = _mm256_or_si256(w[u + 2], _mm256_and_si256(q, bits));
                                w[u + 3] = _mm256_or_si256(
                                    w[u + 3],
                                    _mm256_and_si256(_mm256_srli_epi16(q, 2), bits),
                                );
                            }
                        }
                        // The scales of this sub-block, one row per 32-bit lane: (sc, sc) for
                        // Q4_K/Q5_K, (sc of weights 0..16, sc of 16..32) for Q6_K.
                        let (s_a, s_b, s_off) = if T == Q6K {
                            let ab =
                                _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(k_scales(t)).cast()));
                            (
                                shuffle_lanes(ab, &HALF_TO_PAIRS[0]),
                                shuffle_lanes(ab, &HALF_TO_PAIRS[1]),
                                ab,
                            )
                        } else {
                            let s = shuffle_lanes(sc[t / 4], &BYTE_TO_PAIRS[t % 4]);
                            (s, s, shuffle_lanes(mn[t / 4], &BYTE_TO_PAIRS[t % 4]))
                        };
                        // The same scales as 32-bit integers, one per lane (the pairs' high halves).
                        let (s32_a, s32_b) =
                            (_mm256_srai_epi32(s_a, 16), _mm256_srai_epi32(s_b, 16));
                        for r in 0..R {
                            let ab = &*a[r].add(8 * sb + t);
                            let qa = ab.qs.as_ptr();
                            let prod = |u: usize| _mm256_maddubs_epi16(w[u], act_group(qa, u));
                            let dots = |us: std::ops::Range<usize>| {
                                let mut s = _mm256_setzero_si256();
                                for u in us {
                                    s = _mm256_dpbusd_epi32(s, w[u], act_group(qa, u));
                                }
                                s
                            };
                            let part = if VNNI {
                                if T == Q6K {
                                    _mm256_add_epi32(
                                        _mm256_mullo_epi32(dots(0..4), s32_a),
                                        _mm256_mullo_epi32(dots(4..8), s32_b),
                                    )
                                } else {
                                    _mm256_mullo_epi32(dots(0..8), s32_a)
                                }
                            } else if T == Q6K {
                                // Quants up to 63: two products per 16-bit sum at most.
                                _mm256_add_epi32(
                                    _mm256_add_epi32(
                                        _mm256_madd_epi16(_mm256_add_epi16(prod(0), prod(1)), s_a),
                                        _mm256_madd_epi16(_mm256_add_epi16(prod(2), prod(3)), s_a),
                                    ),
                                    _mm256_add_epi32(
                                        _mm256_madd_epi16(_mm256_add_epi16(prod(4), prod(5)), s_b),
                                        _mm256_madd_epi16(_mm256_add_epi16(prod(6), prod(7)), s_b),
                                    ),
                                )
                            } else {
                                let h0 = _mm256_add_epi16(
                                    _mm256_add_epi16(prod(0), prod(1)),
                                    _mm256_add_epi16(prod(2), prod(3)),
                                );
                                let h1 = _mm256_add_epi16(
                                    _mm256_add_epi16(prod(4), prod(5)),
                                    _mm256_add_epi16(prod(6), prod(7)),
                                );
                                if T == Q4K {
                                    // Nibbles: 16 products per 16-bit sum stay below 2^15.
                                    _mm256_madd_epi16(_mm256_add_epi16(h0, h1), s_a)
                                } else {
                                    _mm256_add_epi32(
                                        _mm256_madd_epi16(h0, s_a),
                                        _mm256_madd_epi16(h1, s_b),
                                    )
                                }
                            };
                            isum[r] = _mm256_add_epi32(isum[r], part);
                            // Both half sums, low then high 16 bits: one broadcast load.
                            let hs =
                                _mm256_set1_epi32(ab.hs.as_ptr().cast::<i32>().read_unaligned());
                            ioff[r] = _mm256_add_epi32(ioff[r], _mm256_madd_epi16(s_off, hs));
                        }
                    }
                }
                for r in 0..R {
                    // One activation scale for the whole super-block.
                    let da = _mm256_set1_ps((*a[r].add(8 * sb)).d);
                    if T == Q6K {
                        let q = _mm256_sub_epi32(isum[r], _mm256_slli_epi32(ioff[r], 5));
                        acc[r] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_mul_ps(d, da), acc[r]);
                    } else {
                        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast()));
                        acc[r] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(isum[r]),
                            _mm256_mul_ps(d, da),
                            acc[r],
                        );
                        acc_min[r] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(ioff[r]),
                            _mm256_mul_ps(dmin, da),
                            acc_min[r],
                        );
                    }
                }
            }
            for r in 0..R {
                let o = out.as_mut_ptr().add(g * 8 * R + r * 8);
                _mm256_storeu_ps(o, _mm256_sub_ps(acc[r], acc_min[r]));
            }
        }
    }
}
