//! Arm64 NEON products of interleaved rows (`weights.rs`) with the dot-product extension
//! (`sdot`, Armv8.2+: Neoverse, Graviton 2 and later, Apple M-series, Cortex-A76 and later).
//!
//! The interleaved layout suits `sdot` by the lane: a 16-byte load holds four weights of each of
//! four rows, and `vdotq_laneq_s32` multiplies them with one group of four activation bytes
//! picked from a register, one row per 32-bit lane. Both operands are signed, so the unsigned
//! quants of Q4/Q5 (below 32) need no offset trick and Q8_0 no sign trick.

use std::arch::aarch64::*;
use std::arch::asm;

use super::blocks::{BlockQ8, QType};

/// Interleaved groups of a 32-weight block type: `out[g * 8R + r * 8 + i] = row(8g + i) ·
/// acts[r]` for every group in `groups` (`nb` blocks each), `R = acts.len() <= 4`.
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
            t => panic!("{t:?} rows are not interleaved"),
        }
    }
}

const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q8_0: u8 = 2;
const Q5_0: u8 = 3;
const Q5_1: u8 = 4;

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
        let bit4 = vdupq_n_u8(0x10);
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
                                // Bit u of each byte is vector u's fifth bit.
                                let q = vld1q_u8(p.add(quants - 32 + 16 * h));
                                let at = |u: usize| match u {
                                    0 => vshlq_n_u8::<4>(q),
                                    1 => vshlq_n_u8::<3>(q),
                                    2 => vshlq_n_u8::<2>(q),
                                    3 => vshlq_n_u8::<1>(q),
                                    4 => q,
                                    5 => vshrq_n_u8::<1>(q),
                                    6 => vshrq_n_u8::<2>(q),
                                    _ => vshrq_n_u8::<3>(q),
                                };
                                lo = vorrq_u8(lo, vandq_u8(at(v), bit4));
                                hi = vorrq_u8(hi, vandq_u8(at(4 + v), bit4));
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
