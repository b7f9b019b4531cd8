//! Arm64 NEON products of interleaved rows (`weights.rs`) with the dot-product extension
//! (`sdot`, Armv8.2+: Neoverse, Graviton 2 and later, Apple M-series, Cortex-A76 and later).
//!
//! The interleaved layout suits `sdot` by the lane: a 16-byte load holds four weights of each of
//! four rows, and `vdotq_laneq_s32` multiplies them with one group of four activation bytes
//! picked from a register, one row per 32-bit lane. Both operands are signed, so the unsigned
//! quants of Q4/Q5/Q6 (below 64) need no offset trick and Q8_0 no sign trick. The K-quants
//! ([`groups_k`]) multiply each sub-block's 32-bit sums by the rows' scales as integers, as the
//! x86 kernels do, so a super-block ends in the same integers as the portable code.

use std::arch::aarch64::*;
use std::arch::asm;

use super::blocks::{BlockQ8, QType};
use super::weights::{K_WORDS, k_high, k_nibbles, k_pair, k_scales};

/// Interleaved groups: `out[g * 8R + r * 8 + i] = row(8g + i) · acts[r]` for every group in
/// `groups` (`nb` blocks, or super-blocks for the K-quants, each), `R = acts.len() <= 4`.
///
/// # Safety
/// The CPU must support NEON and the dot-product extension.
pub unsafe fn dot_groups(
    qtype: QType,
    groups: &[u8],
    nb: usize,
    acts: &[&[BlockQ8]],
    out: &mut [f32],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match qtype {
            QType::Q4_0 => groups_dot::<Q4_0>(groups, nb, acts, out),
            QType::Q4_1 => groups_dot::<Q4_1>(groups, nb, acts, out),
            QType::Q5_0 => groups_dot::<Q5_0>(groups, nb, acts, out),
            QType::Q5_1 => groups_dot::<Q5_1>(groups, nb, acts, out),
            QType::Q8_0 => groups_dot::<Q8_0>(groups, nb, acts, out),
            QType::Q4K => groups_k::<Q4K>(groups, nb, acts, out),
            QType::Q5K => groups_k::<Q5K>(groups, nb, acts, out),
            QType::Q6K => groups_k::<Q6K>(groups, nb, acts, out),
        }
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

/// Eight f16 (16 bytes at `p`) to f32, subnormals included: the half's bits moved to the f32
/// exponent and mantissa positions scale the value by exactly 2^-112.
#[inline(always)]
unsafe fn halves(p: *const u8) -> [float32x4_t; 2] {
    // SAFETY: the callers enable NEON and pass 16 readable bytes.
    unsafe {
        let h = vld1q_u16(p.cast());
        let two112 = vdupq_n_f32(f32::from_bits((127 + 112) << 23));
        let conv = |h: uint32x4_t| {
            let mag = vshlq_n_u32::<13>(vandq_u32(h, vdupq_n_u32(0x7fff)));
            let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
            let v = vmulq_f32(vreinterpretq_f32_u32(mag), two112);
            vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(v), sign))
        };
        [
            conv(vmovl_u16(vget_low_u16(h))),
            conv(vmovl_u16(vget_high_u16(h))),
        ]
    }
}

/// Vector `u`'s fifth bits in place (0x10) from bits `u` of `q` (`weights::fifth_bits`).
#[inline(always)]
unsafe fn fifth_bit(q: uint8x16_t, u: usize) -> uint8x16_t {
    // SAFETY: the callers enable NEON.
    unsafe {
        let at = match u {
            0 => vshlq_n_u8::<4>(q),
            1 => vshlq_n_u8::<3>(q),
            2 => vshlq_n_u8::<2>(q),
            3 => vshlq_n_u8::<1>(q),
            4 => q,
            5 => vshrq_n_u8::<1>(q),
            6 => vshrq_n_u8::<2>(q),
            _ => vshrq_n_u8::<3>(q),
        };
        vandq_u8(at, vdupq_n_u8(0x10))
    }
}

/// `sdot acc.4s, w.16b, a.4b[L]`: adds to each 32-bit lane of `acc` the dot product of that
/// lane's four bytes of `w` with bytes `4L..4L+4` of `a`. (Rust's `vdotq_laneq_s32` is not
/// stable yet.)
#[inline(always)]
unsafe fn sdot<const L: i32>(mut acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    // SAFETY: the callers enable the dot-product extension; the instruction touches only the
    // three registers.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {a:v}.4b[{l}]",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            a = in(vreg) a,
            l = const L,
            options(pure, nomem, nostack),
        );
    }
    acc
}

/// Adds `w · a[lane u]` into `acc` per 32-bit lane (rows).
#[inline(always)]
unsafe fn sdot_lane(acc: int32x4_t, w: int8x16_t, a: [int8x16_t; 2], u: usize) -> int32x4_t {
    // SAFETY: the callers enable the dot-product extension.
    unsafe {
        match u {
            0 => sdot::<0>(acc, w, a[0]),
            1 => sdot::<1>(acc, w, a[0]),
            2 => sdot::<2>(acc, w, a[0]),
            3 => sdot::<3>(acc, w, a[0]),
            4 => sdot::<0>(acc, w, a[1]),
            5 => sdot::<1>(acc, w, a[1]),
            6 => sdot::<2>(acc, w, a[1]),
            _ => sdot::<3>(acc, w, a[1]),
        }
    }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn groups_dot<const T: u8>(groups: &[u8], nb: usize, acts: &[&[BlockQ8]], out: &mut [f32]) {
    let minimum = T == Q4_1 || T == Q5_1;
    let fifth = T == Q5_0 || T == Q5_1;
    let quants = 16 * (1 + minimum as usize) + 32 * fifth as usize;
    let gb = quants + if T == Q8_0 { 256 } else { 128 };
    let r_n = acts.len();
    assert!((1..=4).contains(&r_n) && acts.iter().all(|a| a.len() >= nb));
    assert!(
        groups.len().is_multiple_of(nb * gb) && out.len() >= groups.len() / (nb * gb) * 8 * r_n
    );
    // SAFETY: group `g` block `b` reads bytes (g * nb + b) * gb .. + gb of `groups`, activation
    // block `b < nb` of each row, and writes out[g * 8R .. (g + 1) * 8R], all in bounds by the
    // assertions; NEON and the dot-product extension are enabled on this function.
    unsafe {
        let low4 = vdupq_n_u8(0x0f);
        for (g, grp) in groups.chunks_exact(nb * gb).enumerate() {
            // [row half][act row]: rows 0..4 and 4..8.
            let mut acc = [[vdupq_n_f32(0.0); 4]; 2];
            for b in 0..nb {
                let p = grp.as_ptr().add(b * gb);
                let d = halves(p);
                let m = if minimum { halves(p.add(16)) } else { d };
                // w[u][h]: weights 4u..4u+4 of rows 4h..4h+4, one row per 32-bit lane.
                let mut w = [[vdupq_n_s8(0); 2]; 8];
                for h in 0..2 {
                    if T == Q8_0 {
                        for (u, wu) in w.iter_mut().enumerate() {
                            wu[h] = vld1q_s8(p.add(quants + 32 * u + 16 * h).cast());
                        }
                    } else {
                        for v in 0..4 {
                            let raw = vld1q_u8(p.add(quants + 32 * v + 16 * h));
                            let mut lo = vandq_u8(raw, low4);
                            let mut hi = vshrq_n_u8::<4>(raw);
                            if fifth {
                                let q = vld1q_u8(p.add(quants - 32 + 16 * h));
                                lo = vorrq_u8(lo, fifth_bit(q, v));
                                hi = vorrq_u8(hi, fifth_bit(q, 4 + v));
                            }
                            w[v][h] = vreinterpretq_s8_u8(lo);
                            w[4 + v][h] = vreinterpretq_s8_u8(hi);
                        }
                    }
                }
                for (r, a) in acts.iter().enumerate() {
                    let ab = &*a.as_ptr().add(b);
                    let q = ab.qs.as_ptr();
                    let av = [vld1q_s8(q), vld1q_s8(q.add(16))];
                    for h in 0..2 {
                        let mut isum = vdupq_n_s32(0);
                        for (u, wu) in w.iter().enumerate() {
                            isum = sdot_lane(isum, wu[h], av, u);
                        }
                        let isum = vcvtq_f32_s32(isum);
                        acc[h][r] = if minimum {
                            let t = vmulq_n_f32(vmulq_f32(isum, d[h]), ab.d);
                            vfmaq_n_f32(vaddq_f32(acc[h][r], t), m[h], ab.s)
                        } else {
                            // d * (d_act * Σ q a - offset * s): Q4_0 and Q5_0 quants are
                            // stored as q + 8 and q + 16.
                            let offset = match T {
                                Q4_0 => -8.0,
                                Q5_0 => -16.0,
                                _ => 0.0,
                            };
                            let t = vfmaq_n_f32(vdupq_n_f32(offset * ab.s), isum, ab.d);
                            vfmaq_f32(acc[h][r], t, d[h])
                        };
                    }
                }
            }
            for (r, (lo, hi)) in acc[0].iter().zip(&acc[1]).take(r_n).enumerate() {
                let o = out.as_mut_ptr().add(g * 8 * r_n + r * 8);
                vst1q_f32(o, *lo);
                vst1q_f32(o.add(4), *hi);
            }
        }
    }
}

/// Byte `b` of every 32-bit lane of `v`, as a 32-bit integer.
#[inline(always)]
unsafe fn byte_of(v: uint32x4_t, b: usize) -> int32x4_t {
    // SAFETY: the callers enable NEON.
    unsafe {
        let shifted = vshlq_u32(v, vdupq_n_s32(-8 * b as i32));
        vreinterpretq_s32_u32(vandq_u32(shifted, vdupq_n_u32(0xff)))
    }
}

/// Interleaved K-quant groups (layout: `weights::K_WORDS`), four rows per vector as
/// [`groups_dot`]. Each sub-block's quants meet its activation block in `sdot` chains (one per
/// scale: the whole sub-block for Q4_K and Q5_K, each half for Q6_K), multiplied by the rows'
/// scales as 32-bit integers; Q4_K's and Q5_K's minimums and Q6_K's offset of 32 multiply the
/// activations' half sums (`BlockQ8::hs`), so a super-block ends in integers before one f32
/// scaling (its activations share one scale, see `quantize_row`): the integers of the portable
/// code.
#[target_feature(enable = "neon,dotprod")]
unsafe fn groups_k<const T: u8>(groups: &[u8], nsb: usize, acts: &[&[BlockQ8]], out: &mut [f32]) {
    let qtype = match T {
        Q4K => QType::Q4K,
        Q5K => QType::Q5K,
        _ => QType::Q6K,
    };
    let gb = 8 * qtype.block_bytes();
    let r_n = acts.len();
    assert!((1..=4).contains(&r_n) && acts.iter().all(|a| a.len() >= nsb * 8));
    assert!(
        groups.len().is_multiple_of(nsb * gb) && out.len() >= groups.len() / (nsb * gb) * 8 * r_n
    );
    // SAFETY: group `g` super-block `sb` reads bytes (g * nsb + sb) * gb .. + gb of `groups` (the
    // layout's pieces lie inside), activation blocks 8sb..8sb+8 of each row, and writes
    // out[g * 8R .. (g + 1) * 8R], all in bounds by the assertions; NEON and the dot-product
    // extension are enabled on this function.
    unsafe {
        let low4 = vdupq_n_u8(0x0f);
        let bits = vdupq_n_u8(0x30);
        for (g, grp) in groups.chunks_exact(nsb * gb).enumerate() {
            // [row half][act row]: rows 0..4 and 4..8.
            let mut acc = [[vdupq_n_f32(0.0); 4]; 2];
            let mut acc_min = [[vdupq_n_f32(0.0); 4]; 2];
            for sb in 0..nsb {
                let p = grp.as_ptr().add(sb * gb);
                let d = halves(p);
                // Q4_K/Q5_K, per row half: the scales (one byte per sub-block: 0..4, then 4..8)
                // and minimums of each row's lane, decoded from its three words as
                // `scales_mins_k4` does.
                let mut sc = [[vdupq_n_u32(0); 2]; 2];
                let mut mn = [[vdupq_n_u32(0); 2]; 2];
                if T != Q6K {
                    for h in 0..2 {
                        let word = |w: usize| vld1q_u32(p.add(K_WORDS + 32 * w + 16 * h).cast());
                        let (w0, w1, w2) = (word(0), word(1), word(2));
                        let high = |w: uint32x4_t| {
                            vshlq_n_u32::<4>(vandq_u32(
                                vshrq_n_u32::<6>(w),
                                vdupq_n_u32(0x0303_0303),
                            ))
                        };
                        let (low6, low4w) = (vdupq_n_u32(0x3f3f_3f3f), vdupq_n_u32(0x0f0f_0f0f));
                        sc[h] = [
                            vandq_u32(w0, low6),
                            vorrq_u32(vandq_u32(w2, low4w), high(w0)),
                        ];
                        mn[h] = [
                            vandq_u32(w1, low6),
                            vorrq_u32(vandq_u32(vshrq_n_u32::<4>(w2), low4w), high(w1)),
                        ];
                    }
                }
                let mut isum = [[vdupq_n_s32(0); 4]; 2];
                // Q4_K/Q5_K: Σ min * half sums; Q6_K: Σ scale * half sums (times 32).
                let mut ioff = [[vdupq_n_s32(0); 4]; 2];
                for pair in 0..4 {
                    let (_, sub_lo, sub_hi) = k_pair(qtype, pair);
                    for (half, t) in [(0, sub_lo), (1, sub_hi)] {
                        for h in 0..2 {
                            // w[u]: weights 4u..4u+4 of sub-block t of rows 4h..4h+4.
                            let mut w = [vdupq_n_s8(0); 8];
                            let fifth = if T == Q5K {
                                vld1q_u8(p.add(k_high(qtype, t) + 16 * h))
                            } else {
                                vdupq_n_u8(0)
                            };
                            let high = if T == Q6K {
                                [0, 1].map(|v| vld1q_u8(p.add(k_high(qtype, t) + 32 * v + 16 * h)))
                            } else {
                                [vdupq_n_u8(0); 2]
                            };
                            for (u, wu) in w.iter_mut().enumerate() {
                                let raw = vld1q_u8(p.add(k_nibbles(qtype, pair) + 32 * u + 16 * h));
                                let mut q = if half == 0 {
                                    vandq_u8(raw, low4)
                                } else {
                                    vshrq_n_u8::<4>(raw)
                                };
                                if T == Q5K {
                                    q = vorrq_u8(q, fifth_bit(fifth, u));
                                }
                                if T == Q6K {
                                    // Bits 2u'..2u'+2 of vector u / 4: the high bits of vector u.
                                    let v = high[u / 4];
                                    let at = match u % 4 {
                                        0 => vshlq_n_u8::<4>(v),
                                        1 => vshlq_n_u8::<2>(v),
                                        2 => v,
                                        _ => vshrq_n_u8::<2>(v),
                                    };
                                    q = vorrq_u8(q, vandq_u8(at, bits));
                                }
                                *wu = vreinterpretq_s8_u8(q);
                            }
                            // Per row lane: the scales of weights 0..16 and 16..32 of sub-block
                            // t, and what multiplies the two half sums of its activations.
                            let (s_a, s_b, off_a, off_b) = if T == Q6K {
                                let pairs = vreinterpretq_s32_s16(vmovl_s8(vld1_s8(
                                    p.add(k_scales(t) + 8 * h).cast(),
                                )));
                                let a = vshrq_n_s32::<16>(vshlq_n_s32::<16>(pairs));
                                let b = vshrq_n_s32::<16>(pairs);
                                (a, b, a, b)
                            } else {
                                let s = byte_of(sc[h][t / 4], t % 4);
                                let m = byte_of(mn[h][t / 4], t % 4);
                                (s, s, m, m)
                            };
                            for (r, a) in acts.iter().enumerate() {
                                let ab = &*a.as_ptr().add(8 * sb + t);
                                let q = ab.qs.as_ptr();
                                let av = [vld1q_s8(q), vld1q_s8(q.add(16))];
                                let mut lo = vdupq_n_s32(0);
                                for (u, wu) in w.iter().enumerate().take(4) {
                                    lo = sdot_lane(lo, *wu, av, u);
                                }
                                let part = if T == Q6K {
                                    let mut hi = vdupq_n_s32(0);
                                    for (u, wu) in w.iter().enumerate().skip(4) {
                                        hi = sdot_lane(hi, *wu, av, u);
                                    }
                                    vmlaq_s32(vmulq_s32(lo, s_a), hi, s_b)
                                } else {
                                    for (u, wu) in w.iter().enumerate().skip(4) {
                                        lo = sdot_lane(lo, *wu, av, u);
                                    }
                                    vmulq_s32(lo, s_a)
                                };
                                isum[h][r] = vaddq_s32(isum[h][r], part);
                                let off = vmlaq_n_s32(
                                    vmulq_n_s32(off_a, ab.hs[0] as i32),
                                    off_b,
                                    ab.hs[1] as i32,
                                );
                                ioff[h][r] = vaddq_s32(ioff[h][r], off);
                            }
                        }
                    }
                }
                let dmin = if T == Q6K { d } else { halves(p.add(16)) };
                for (r, a) in acts.iter().enumerate() {
                    // One activation scale for the whole super-block.
                    let da = (*a.as_ptr().add(8 * sb)).d;
                    for h in 0..2 {
                        if T == Q6K {
                            let q = vsubq_s32(isum[h][r], vshlq_n_s32::<5>(ioff[h][r]));
                            acc[h][r] =
                                vfmaq_f32(acc[h][r], vcvtq_f32_s32(q), vmulq_n_f32(d[h], da));
                        } else {
                            acc[h][r] = vfmaq_f32(
                                acc[h][r],
                                vcvtq_f32_s32(isum[h][r]),
                                vmulq_n_f32(d[h], da),
                            );
                            acc_min[h][r] = vfmaq_f32(
                                acc_min[h][r],
                                vcvtq_f32_s32(ioff[h][r]),
                                vmulq_n_f32(dmin[h], da),
                            );
                        }
                    }
                }
            }
            for r in 0..r_n {
                let o = out.as_mut_ptr().add(g * 8 * r_n + r * 8);
                vst1q_f32(o, vsubq_f32(acc[0][r], acc_min[0][r]));
                vst1q_f32(o.add(4), vsubq_f32(acc[1][r], acc_min[1][r]));
            }
        }
    }
}
