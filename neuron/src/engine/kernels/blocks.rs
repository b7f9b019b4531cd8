//! GGUF block layouts of the weight types we multiply ourselves, and the Q8 block we quantize
//! activations into.
//!
//! Weights stay in the bytes GGUF stores (little-endian, no padding), read in place: a row of
//! `k` weights is `k / 32` consecutive blocks.

/// Activations per Q8 block, and weights per block of the legacy types (Q4_0 … Q8_0). The
/// K-quants group eight such sub-blocks into a super-block of [`QK_K`] with shared scales.
pub const QK: usize = 32;

/// Weights per K-quant super-block.
pub const QK_K: usize = 256;

/// The weight types with our own kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    /// f16 scale `d`, 16 bytes of nibbles: `w = d * (q - 8)`; low nibbles are weights 0..16,
    /// high nibbles 16..32.
    Q4_0,
    /// f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles: `w = d * q + m`.
    Q4_1,
    /// f16 scale `d`, 32 signed bytes: `w = d * q`.
    Q8_0,
    /// f16 scale `d`, 32 high bits (u32, bit j for weight j), 16 bytes of nibbles:
    /// `w = d * ((q | h << 4) - 16)`, nibbles ordered as in Q4_0.
    Q5_0,
    /// f16 scale `d`, f16 minimum `m`, 32 high bits, 16 bytes of nibbles: `w = d * (q | h << 4) + m`.
    Q5_1,
    /// Super-block of 256: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales and mins (one
    /// pair per 32-weight sub-block), 128 bytes of nibbles (sub-blocks 2j and 2j+1 are the low
    /// and high nibbles of bytes 32j..32j+32): `w = d * sc * q - dmin * m`.
    Q4K,
    /// As Q4_K with a fifth bit per weight: 32 bytes `qh` after the scales, bit t of byte l is
    /// weight l of sub-block t.
    Q5K,
    /// Super-block of 256: 128 bytes of low nibbles `ql`, 64 bytes of 2-bit highs `qh`, 16 signed
    /// scales (one per 16 weights), f16 `d` last: `w = d * sc * (q - 32)`.
    Q6K,
}

impl QType {
    /// Bytes per block of 32 weights.
    pub const fn block_bytes(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q8_0 => 34,
            QType::Q5_0 => 22,
            QType::Q5_1 => 24,
            QType::Q4K => 144,
            QType::Q5K => 176,
            QType::Q6K => 210,
        }
    }

    /// Weights per block: 32, or 256 for the K-quants.
    pub const fn block_weights(self) -> usize {
        match self {
            QType::Q4K | QType::Q5K | QType::Q6K => QK_K,
            _ => QK,
        }
    }

    /// Bytes of one row of `k` weights.
    pub const fn row_bytes(self, k: usize) -> usize {
        k / self.block_weights() * self.block_bytes()
    }
}

/// One block of 32 activations quantized to 8 bits: `x ≈ d * q`. `s` is `d * Σq`, which Q4_1's
/// and Q5_1's minimum multiplies (llama.cpp's Q8_1 carries the same sum).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(C, align(8))]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
    /// Sums of the quants 0..16 and 16..32 (what the interleaved K-quant kernels multiply Q4_K's
    /// and Q5_K's minimums and Q6_K's offset of 32 by).
    pub hs: [i16; 2],
}

/// IEEE half to single precision, subnormals included (scales can be tiny).
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    match exp {
        0 => {
            // Zero or subnormal: man * 2^-24, exact in f32.
            let v = man as f32 * (1.0 / 16_777_216.0);
            if sign != 0 { -v } else { v }
        }
        31 => f32::from_bits(sign | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

/// Weight `j` (0..32) of a Q5 block's payload (`qh` then `qs`) as an unsigned 5-bit value.
#[inline]
pub fn five_bits(payload: &[u8], j: usize) -> u8 {
    let qh = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
    let nibble = if j < 16 {
        payload[4 + j] & 0xf
    } else {
        payload[4 + j - 16] >> 4
    };
    nibble | (((qh >> j) & 1) as u8) << 4
}

#[inline]
pub fn read_f16(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Expands one row of weights to f32: the reference the kernels are tested against.
pub fn dequantize_row(qtype: QType, row: &[u8], out: &mut [f32]) {
    let bb = qtype.block_bytes();
    if qtype.block_weights() == QK_K {
        for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK_K)) {
            for (t, o) in o.chunks_exact_mut(QK).enumerate() {
                let sub = k_sub_block(qtype, blk, t);
                for (l, w) in o.iter_mut().enumerate() {
                    *w = sub.weight(l);
                }
            }
        }
        return;
    }
    for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
        let d = read_f16(blk, 0);
        match qtype {
            QType::Q4_0 => {
                for j in 0..16 {
                    o[j] = d * ((blk[2 + j] & 0xf) as f32 - 8.0);
                    o[j + 16] = d * ((blk[2 + j] >> 4) as f32 - 8.0);
                }
            }
            QType::Q4_1 => {
                let m = read_f16(blk, 2);
                for j in 0..16 {
                    o[j] = d * (blk[4 + j] & 0xf) as f32 + m;
                    o[j + 16] = d * (blk[4 + j] >> 4) as f32 + m;
                }
            }
            QType::Q8_0 => {
                for j in 0..QK {
                    o[j] = d * blk[2 + j] as i8 as f32;
                }
            }
            QType::Q5_0 => {
                for (j, w) in o.iter_mut().enumerate() {
                    *w = d * (five_bits(&blk[2..], j) as f32 - 16.0);
                }
            }
            QType::Q5_1 => {
                let m = read_f16(blk, 2);
                for (j, w) in o.iter_mut().enumerate() {
                    *w = d * five_bits(&blk[4..], j) as f32 + m;
                }
            }
            QType::Q4K | QType::Q5K | QType::Q6K => unreachable!("handled above"),
        }
    }
}

/// The 6-bit scale and min of sub-block `t` (0..8) from a Q4_K/Q5_K super-block's 12 packed
/// bytes (ggml's `get_scale_min_k4`).
#[inline]
pub fn scale_min_k4(scales: &[u8], t: usize) -> (u8, u8) {
    if t < 4 {
        (scales[t] & 63, scales[t + 4] & 63)
    } else {
        (
            (scales[t + 4] & 0xf) | ((scales[t - 4] >> 6) << 4),
            (scales[t + 4] >> 4) | ((scales[t] >> 6) << 4),
        )
    }
}

/// All eight 6-bit scales and mins of a Q4_K/Q5_K super-block at once, with ggml's masks on
/// three u32 words (what the kernels use; [`scale_min_k4`] is the plain reading they are tested
/// against).
#[inline(always)]
pub fn scales_mins_k4(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([packed[i], packed[i + 1], packed[i + 2], packed[i + 3]]);
    let (w0, w1, w2) = (w(0), w(4), w(8));
    let sc = [w0 & LOW6, (w2 & LOW4) | (((w0 >> 6) & TOP2) << 4)];
    let mn = [w1 & LOW6, ((w2 >> 4) & LOW4) | (((w1 >> 6) & TOP2) << 4)];
    let bytes = |v: [u32; 2]| {
        let (a, b) = (v[0].to_le_bytes(), v[1].to_le_bytes());
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
    };
    (bytes(sc), bytes(mn))
}

/// Sub-block `t` (32 weights) of a K-quant super-block, decoded:
/// `w[l] = d * isc[l / 16] * q[l] - min`.
pub struct KSub {
    pub q: [i8; QK],
    /// Integer scale of weights 0..16 and of 16..32 (Q4_K and Q5_K use one scale for both).
    pub isc: [i32; 2],
    pub d: f32,
    pub min: f32,
}

impl KSub {
    /// Weight `l` in f32, rounded as ggml's dequantization (`(d * sc) * q - min`).
    pub fn weight(&self, l: usize) -> f32 {
        self.d * self.isc[l / 16] as f32 * self.q[l] as f32 - self.min
    }
}

/// Decodes sub-block `t` of a K-quant super-block: the reference layout the SIMD kernels follow.
pub fn k_sub_block(qtype: QType, blk: &[u8], t: usize) -> KSub {
    match qtype {
        QType::Q4K | QType::Q5K => {
            let (d, dmin) = (read_f16(blk, 0), read_f16(blk, 2));
            let (sc, m) = scale_min_k4(&blk[4..16], t);
            let qs = if qtype == QType::Q4K { 16 } else { 48 };
            let bytes = &blk[qs + 32 * (t / 2)..][..32];
            let q = std::array::from_fn(|l| {
                let nib = if t.is_multiple_of(2) {
                    bytes[l] & 0xf
                } else {
                    bytes[l] >> 4
                };
                let high = if qtype == QType::Q5K {
                    ((blk[16 + l] >> t) & 1) << 4
                } else {
                    0
                };
                (nib | high) as i8
            });
            KSub {
                q,
                isc: [sc as i32; 2],
                d,
                min: dmin * m as f32,
            }
        }
        QType::Q6K => {
            let d = read_f16(blk, 208);
            let (n, u) = (t / 4, t % 4);
            let ql = &blk[64 * n + 32 * (u & 1)..][..32];
            let qh = &blk[128 + 32 * n..][..32];
            let q = std::array::from_fn(|l| {
                let nib = if u < 2 { ql[l] & 0xf } else { ql[l] >> 4 };
                let high = ((qh[l] >> (2 * u)) & 3) << 4;
                (nib | high) as i8 - 32
            });
            let sc = [
                blk[192 + 8 * n + 2 * u] as i8,
                blk[192 + 8 * n + 2 * u + 1] as i8,
            ];
            KSub {
                q,
                isc: [sc[0] as i32, sc[1] as i32],
                d,
                min: 0.0,
            }
        }
        _ => panic!("{qtype:?} is not a K-quant"),
    }
}
