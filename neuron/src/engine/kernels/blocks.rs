//! GGUF block layouts of the weight types we multiply ourselves, and the Q8 block we quantize
//! activations into.
//!
//! Weights stay in the bytes GGUF stores (little-endian, no padding), read in place: a row of
//! `k` weights is `k / 32` consecutive blocks.

/// Weights (and activations) per block for every type here.
pub const QK: usize = 32;

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
        }
    }

    /// Bytes of one row of `k` weights.
    pub const fn row_bytes(self, k: usize) -> usize {
        k / QK * self.block_bytes()
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
        }
    }
}
