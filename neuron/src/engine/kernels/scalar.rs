//! Portable dot products of one weight row with Q8 activation rows: the fallback on CPUs
//! without the SIMD paths, and the reference the SIMD paths must match.

use super::blocks::{BlockQ8, QK, QType, five_bits, k_sub_block, read_f16};

/// `out[r] = row · acts[r]` for every activation row.
pub fn dot_rows(qtype: QType, row: &[u8], acts: &[&[BlockQ8]], out: &mut [f32]) {
    for (a, o) in acts.iter().zip(out.iter_mut()) {
        *o = dot(qtype, row, a);
    }
}

pub fn dot(qtype: QType, row: &[u8], a: &[BlockQ8]) -> f32 {
    let bb = qtype.block_bytes();
    if qtype.block_weights() != QK {
        return dot_k(qtype, row, a);
    }
    let mut sum = 0f32;
    let mut min_sum = 0f32;
    for (w, a) in row.chunks_exact(bb).zip(a) {
        let d = read_f16(w, 0);
        let isum: i32 = match qtype {
            QType::Q4_0 => (0..16)
                .map(|j| {
                    let q = w[2 + j];
                    ((q & 0xf) as i32 - 8) * a.qs[j] as i32
                        + ((q >> 4) as i32 - 8) * a.qs[j + 16] as i32
                })
                .sum(),
            QType::Q4_1 => {
                min_sum += read_f16(w, 2) * a.s;
                (0..16)
                    .map(|j| {
                        let q = w[4 + j];
                        (q & 0xf) as i32 * a.qs[j] as i32 + (q >> 4) as i32 * a.qs[j + 16] as i32
                    })
                    .sum()
            }
            QType::Q8_0 => (0..32)
                .map(|j| w[2 + j] as i8 as i32 * a.qs[j] as i32)
                .sum(),
            QType::Q5_0 => (0..32)
                .map(|j| (five_bits(&w[2..], j) as i32 - 16) * a.qs[j] as i32)
                .sum(),
            QType::Q5_1 => {
                min_sum += read_f16(w, 2) * a.s;
                (0..32)
                    .map(|j| five_bits(&w[4..], j) as i32 * a.qs[j] as i32)
                    .sum()
            }
            QType::Q4K | QType::Q5K | QType::Q6K => unreachable!("dot_k"),
        };
        sum += isum as f32 * (d * a.d);
    }
    sum + min_sum
}

/// K-quants: every 32-weight sub-block meets one Q8 block; per half of 16 weights an integer sum
/// times its scale, added over the super-block (whose activations share one scale, see
/// `quantize_row`) before the f32 scaling, as the SIMD kernels do.
fn dot_k(qtype: QType, row: &[u8], a: &[BlockQ8]) -> f32 {
    let mut sum = 0f32;
    let mut min_sum = 0f32;
    for (blk, a8) in row.chunks_exact(qtype.block_bytes()).zip(a.chunks_exact(8)) {
        let mut isum = 0i32;
        let mut d = 0f32;
        for (t, a) in a8.iter().enumerate() {
            let sub = k_sub_block(qtype, blk, t);
            let half = |h: usize| -> i32 {
                (16 * h..16 * h + 16)
                    .map(|l| sub.q[l] as i32 * a.qs[l] as i32)
                    .sum()
            };
            isum += half(0) * sub.isc[0] + half(1) * sub.isc[1];
            d = sub.d;
            min_sum += sub.min * a.s;
        }
        sum += isum as f32 * (d * a8[0].d);
    }
    sum - min_sum
}
