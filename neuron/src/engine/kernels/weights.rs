//! A projection's weights as the kernels read them.
//!
//! Rows of the 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are repacked at load, eight
//! rows interleaved (as llama.cpp's `Q4_0x8`). For each block of 32 weights: the eight rows' f16
//! scales side by side (16 bytes), then their minimums (Q4_1, Q5_1); for Q5 the fifth bits
//! (32 bytes, see [`fifth_bits`]); then the quants, where byte `32c + 4i + t` is byte `4c + t` of
//! row `i`'s quants (nibbles or bytes). A 32-byte load then holds four weights of each of the
//! eight rows, the vector lanes are the rows, and one broadcast group of four activation bytes
//! meets all eight at once: no per-row horizontal sum, no per-block scalar scale, and the eight
//! scales convert in one instruction. The layout has exactly the bytes GGUF has. The K-quants'
//! super-blocks are interleaved likewise (see [`K_WORDS`] for their layout). Rows past the last
//! whole group of eight stay in GGUF layout.

use std::cell::RefCell;

use super::blocks::{BlockQ8, QK, QType};
use super::scalar;

/// Rows interleaved in one group.
pub const GROUP: usize = 8;

/// Quantized weights of `n` rows of `k`.
pub struct Weights {
    qtype: QType,
    n: usize,
    k: usize,
    /// Rows `0..packed` (a multiple of [`GROUP`]) interleaved, then rows `packed..n` in GGUF
    /// layout.
    packed: usize,
    bytes: Vec<u8>,
}

/// Whether rows of this type are interleaved at load.
pub fn interleaves(_qtype: QType) -> bool {
    true
}

/// f16 fields at the head of a block: `d`, and the minimum `m` of Q4_1 and Q5_1.
fn f16_fields(qtype: QType) -> usize {
    match qtype {
        QType::Q4_1 | QType::Q5_1 => 2,
        _ => 1,
    }
}

/// Whether blocks carry 32 fifth bits (a u32 after the f16 fields in GGUF).
fn has_fifth_bits(qtype: QType) -> bool {
    matches!(qtype, QType::Q5_0 | QType::Q5_1)
}

/// Bytes of a GGUF block before its quants.
fn head(qtype: QType) -> usize {
    2 * f16_fields(qtype) + if has_fifth_bits(qtype) { 4 } else { 0 }
}

/// The fifth bits of eight rows, arranged for the kernels: bit `u` of byte `4i + t` is the fifth
/// bit of row `i`'s weight `4u + t`, the weight whose nibble is in byte `t` of row `i`'s lane of
/// quant vector `u` (low nibbles of vectors 0..4, high nibbles of 4..8). Shifting the 32 bytes by
/// `4 - u` and masking 0x10 then gives vector `u` its fifth bits in place.
fn fifth_bits(qh: [u32; GROUP]) -> [u8; 32] {
    std::array::from_fn(|p| {
        let (i, t) = (p / 4, p % 4);
        (0..8).fold(0u8, |b, u| b | ((((qh[i] >> (4 * u + t)) & 1) as u8) << u))
    })
}

/// Row `i`'s GGUF fifth bits back from [`fifth_bits`].
fn row_fifth_bits(packed: &[u8], i: usize) -> u32 {
    (0..32).fold(0u32, |q, j| {
        let (u, t) = (j / 4, j % 4);
        q | ((((packed[4 * i + t] >> u) & 1) as u32) << j)
    })
}

/// Offset of the quants in an interleaved block.
fn quants_at(qtype: QType) -> usize {
    GROUP * 2 * f16_fields(qtype) + if has_fifth_bits(qtype) { 32 } else { 0 }
}

impl Weights {
    /// Takes `n` GGUF rows of `k` weights of type `qtype`.
    ///
    /// # Panics
    /// If `k` is not a whole number of blocks or `bytes` is not `n` rows of `k`.
    pub fn new(qtype: QType, bytes: Vec<u8>, n: usize, k: usize) -> Self {
        let bw = qtype.block_weights();
        assert!(k.is_multiple_of(bw), "k = {k} is not a multiple of {bw}");
        assert_eq!(
            bytes.len(),
            n * qtype.row_bytes(k),
            "weight bytes for {n}x{k} {qtype:?}"
        );
        let packed = if interleaves(qtype) {
            n / GROUP * GROUP
        } else {
            0
        };
        let mut w = Weights {
            qtype,
            n,
            k,
            packed,
            bytes,
        };
        if packed > 0 {
            w.interleave();
        }
        w
    }

    fn interleave(&mut self) {
        let (rb, bb) = (self.row_bytes(), self.qtype.block_bytes());
        let nb = self.k / self.qtype.block_weights();
        let mut out = vec![0u8; GROUP * rb];
        for g in self.bytes[..self.packed * rb].chunks_exact_mut(GROUP * rb) {
            for b in 0..nb {
                let dst = &mut out[b * GROUP * bb..][..GROUP * bb];
                let src: [&[u8]; GROUP] = std::array::from_fn(|i| &g[i * rb + b * bb..][..bb]);
                pack_block(self.qtype, src, dst);
            }
            g.copy_from_slice(&out);
        }
    }

    pub fn qtype(&self) -> QType {
        self.qtype
    }

    /// Output features (rows).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features (weights per row).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Rows held interleaved (the rest are GGUF rows).
    pub fn packed(&self) -> usize {
        self.packed
    }

    /// Bytes held: the same as the GGUF tensor's.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn row_bytes(&self) -> usize {
        self.qtype.row_bytes(self.k)
    }

    /// The GGUF bytes of row `j` into `out` (`row_bytes()` long).
    pub fn row(&self, j: usize, out: &mut [u8]) {
        let rb = self.row_bytes();
        assert!(j < self.n, "row {j} of {}", self.n);
        let out = &mut out[..rb];
        if j >= self.packed {
            out.copy_from_slice(&self.bytes[j * rb..][..rb]);
            return;
        }
        let (g, i) = (j / GROUP, j % GROUP);
        row_from(
            self.qtype,
            &self.bytes[g * GROUP * rb..][..GROUP * rb],
            i,
            out,
        );
    }

    /// Interleaved groups `gs` (whole groups of [`GROUP`] rows).
    pub(super) fn groups(&self, gs: std::ops::Range<usize>) -> &[u8] {
        let gb = GROUP * self.row_bytes();
        &self.bytes[gs.start * gb..gs.end * gb]
    }

    /// GGUF rows `js` (all at or past `packed()`).
    pub(super) fn gguf_rows(&self, js: std::ops::Range<usize>) -> &[u8] {
        debug_assert!(js.start >= self.packed);
        let rb = self.row_bytes();
        &self.bytes[js.start * rb..js.end * rb]
    }
}

thread_local! {
    static ROW: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Portable products of interleaved groups: `out[g * 8R + r * 8 + i] = row(8g + i) · acts[r]`
/// for the groups in `groups` of `w`'s layout, through each row's GGUF bytes.
pub(super) fn dot_groups_scalar(w: &Weights, groups: &[u8], acts: &[&[BlockQ8]], out: &mut [f32]) {
    let rb = w.row_bytes();
    let r = acts.len();
    ROW.with_borrow_mut(|row| {
        row.resize(rb, 0);
        for (grp, o) in groups
            .chunks_exact(GROUP * rb)
            .zip(out.chunks_exact_mut(GROUP * r))
        {
            for i in 0..GROUP {
                row_from(w.qtype, grp, i, row);
                for (ri, a) in acts.iter().enumerate() {
                    o[ri * GROUP + i] = scalar::dot(w.qtype, row, a);
                }
            }
        }
    });
}

/// One block of eight GGUF rows (`src[i]`, `bb` bytes each) into the interleaved layout.
fn pack_block(qtype: QType, src: [&[u8]; GROUP], dst: &mut [u8]) {
    if qtype.block_weights() != QK {
        return pack_k(qtype, src, dst);
    }
    let (h, q) = (head(qtype), quants_at(qtype));
    for (i, s) in src.iter().enumerate() {
        for f in 0..f16_fields(qtype) {
            dst[f * 2 * GROUP + 2 * i..][..2].copy_from_slice(&s[2 * f..][..2]);
        }
        for (c, four) in s[h..].chunks_exact(4).enumerate() {
            dst[q + 32 * c + 4 * i..][..4].copy_from_slice(four);
        }
    }
    if has_fifth_bits(qtype) {
        let at = 2 * f16_fields(qtype);
        let qh = src.map(|s| u32::from_le_bytes(s[at..at + 4].try_into().expect("4 bytes")));
        dst[GROUP * at..][..32].copy_from_slice(&fifth_bits(qh));
    }
}

/// Row `i` of the one interleaved group `grp`, in GGUF bytes.
fn row_from(qtype: QType, grp: &[u8], i: usize, out: &mut [u8]) {
    let (bb, h, q) = (qtype.block_bytes(), head(qtype), quants_at(qtype));
    for (b, dst) in out.chunks_exact_mut(bb).enumerate() {
        let src = &grp[b * GROUP * bb..][..GROUP * bb];
        if qtype.block_weights() != QK {
            unpack_k(qtype, src, i, dst);
            continue;
        }
        for f in 0..f16_fields(qtype) {
            dst[2 * f..][..2].copy_from_slice(&src[f * 2 * GROUP + 2 * i..][..2]);
        }
        if has_fifth_bits(qtype) {
            let at = 2 * f16_fields(qtype);
            dst[at..at + 4].copy_from_slice(&row_fifth_bits(&src[GROUP * at..], i).to_le_bytes());
        }
        for (c, four) in dst[h..].chunks_exact_mut(4).enumerate() {
            four.copy_from_slice(&src[q + 32 * c + 4 * i..][..4]);
        }
    }
}

/// Where the pieces of an interleaved K-quant super-block of eight rows lie: in the order the
/// kernels read them, so a super-block is read from its first byte to its last and the hardware
/// prefetcher keeps ahead (with the scales, high bits and nibbles in three regions, a streamed
/// Q6_K product took a third to a half longer, and Q5_K a quarter).
///
/// - The head: `d` of each row (16 bytes); for Q4_K and Q5_K also `dmin` (16) and the GGUF 12
///   bytes of packed scales and minimums as three u32 words, word `w` of row `i` at
///   [`K_WORDS`]` + 32 w + 4 i` (96).
/// - Then the four pairs of sub-blocks that share nibble bytes ([`k_pair`]), each:
///   - Q6_K: per sub-block of the pair (low, then high nibbles), 16 bytes of scales, row `i`'s two
///     (of weights 0..16 and 16..32) at `2i`, `2i + 1` ([`k_scales`]); then per sub-block 64 bytes
///     of high bits ([`k_high`]): two 32-byte vectors, bits `2u'..2u' + 2` of byte `4i + t'` of
///     vector `h` being the high bits of row `i`'s weight `4 (4h + u') + t'`.
///   - Q5_K: per sub-block its 32 fifth bits, as [`fifth_bits`] arranges them ([`k_high`]).
///   - The nibbles, 256 bytes ([`k_nibbles`]): byte `32u + 4i + t'` is the byte whose low nibble
///     is row `i`'s weight `4u + t'` of the pair's first sub-block and whose high nibble that of
///     its second.
pub(super) const K_WORDS: usize = 32;

const fn k_head(qtype: QType) -> usize {
    match qtype {
        QType::Q6K => 16,
        _ => 128,
    }
}

/// Bytes of a pair before its 256 bytes of nibbles: Q6_K's scales and high bits, Q5_K's fifth
/// bits.
const fn k_before_nibbles(qtype: QType) -> usize {
    match qtype {
        QType::Q6K => 2 * 16 + 2 * 64,
        QType::Q5K => 2 * 32,
        _ => 0,
    }
}

const fn k_pair_at(qtype: QType, p: usize) -> usize {
    k_head(qtype) + p * (k_before_nibbles(qtype) + 256)
}

/// Sub-block `t`'s pair, and whether it takes the pair's low (0) or high (1) nibbles.
const fn k_pair_of(qtype: QType, t: usize) -> (usize, usize) {
    match qtype {
        QType::Q6K => (2 * (t / 4) + t % 2, (t % 4) / 2),
        _ => (t / 2, t % 2),
    }
}

/// The nibbles of pair `p`.
pub(super) const fn k_nibbles(qtype: QType, p: usize) -> usize {
    k_pair_at(qtype, p) + k_before_nibbles(qtype)
}

/// Sub-block `t`'s high bits: Q6_K's two 2-bit vectors, Q5_K's fifth bits.
pub(super) const fn k_high(qtype: QType, t: usize) -> usize {
    let (p, h) = k_pair_of(qtype, t);
    match qtype {
        QType::Q6K => k_pair_at(qtype, p) + 2 * 16 + 64 * h,
        _ => k_pair_at(qtype, p) + 32 * h,
    }
}

/// Q6_K sub-block `t`'s 16 bytes of scales.
pub(super) const fn k_scales(t: usize) -> usize {
    let (p, h) = k_pair_of(QType::Q6K, t);
    k_pair_at(QType::Q6K, p) + 16 * h
}

/// Pair `p` of sub-blocks sharing nibble bytes: (offset of its 32 bytes in a GGUF super-block,
/// sub-block of the low nibbles, sub-block of the high nibbles).
pub(super) const fn k_pair(qtype: QType, p: usize) -> (usize, usize, usize) {
    match qtype {
        // ql[64n + 32c ..]: sub-blocks 4n + c (low) and 4n + c + 2 (high).
        QType::Q6K => (32 * p, 4 * (p / 2) + p % 2, 4 * (p / 2) + p % 2 + 2),
        QType::Q5K => (48 + 32 * p, 2 * p, 2 * p + 1),
        _ => (16 + 32 * p, 2 * p, 2 * p + 1),
    }
}

/// The 2-bit high part of Q6_K weight `l` (0..32) of sub-block `t`, from a GGUF super-block.
fn q6_high(blk: &[u8], t: usize, l: usize) -> u8 {
    let (n, c) = (t / 4, t % 4);
    (blk[128 + 32 * n + l] >> (2 * c)) & 3
}

fn pack_k(qtype: QType, src: [&[u8]; GROUP], dst: &mut [u8]) {
    for (i, s) in src.iter().enumerate() {
        for p in 0..4 {
            let at = k_pair(qtype, p).0;
            for u in 0..8 {
                dst[k_nibbles(qtype, p) + 32 * u + 4 * i..][..4]
                    .copy_from_slice(&s[at + 4 * u..][..4]);
            }
        }
        if qtype == QType::Q6K {
            dst[2 * i..][..2].copy_from_slice(&s[208..210]);
            for t in 0..8 {
                dst[k_scales(t) + 2 * i..][..2].copy_from_slice(&s[192 + 2 * t..][..2]);
                for (h, v) in [0, 1]
                    .map(|h| k_high(qtype, t) + 32 * h)
                    .into_iter()
                    .enumerate()
                {
                    for tt in 0..4 {
                        dst[v + 4 * i + tt] = (0..4).fold(0u8, |b, u| {
                            b | q6_high(s, t, 4 * (4 * h + u) + tt) << (2 * u)
                        });
                    }
                }
            }
        } else {
            dst[2 * i..][..2].copy_from_slice(&s[0..2]);
            dst[16 + 2 * i..][..2].copy_from_slice(&s[2..4]);
            for w in 0..3 {
                dst[K_WORDS + 32 * w + 4 * i..][..4].copy_from_slice(&s[4 + 4 * w..][..4]);
            }
        }
    }
    if qtype == QType::Q5K {
        // GGUF: bit t of qh[l] is weight l of sub-block t.
        for t in 0..8 {
            let qh =
                src.map(|s| (0..32).fold(0u32, |q, l| q | (((s[16 + l] >> t) & 1) as u32) << l));
            dst[k_high(qtype, t)..][..32].copy_from_slice(&fifth_bits(qh));
        }
    }
}

/// Row `i` of one interleaved K-quant super-block `src`, as GGUF bytes.
fn unpack_k(qtype: QType, src: &[u8], i: usize, dst: &mut [u8]) {
    for p in 0..4 {
        let at = k_pair(qtype, p).0;
        for u in 0..8 {
            dst[at + 4 * u..][..4]
                .copy_from_slice(&src[k_nibbles(qtype, p) + 32 * u + 4 * i..][..4]);
        }
    }
    if qtype == QType::Q6K {
        dst[208..210].copy_from_slice(&src[2 * i..][..2]);
        dst[128..192].fill(0);
        for t in 0..8 {
            dst[192 + 2 * t..][..2].copy_from_slice(&src[k_scales(t) + 2 * i..][..2]);
            let (n, c) = (t / 4, t % 4);
            for l in 0..32 {
                let (h, u, tt) = (l / 16, (l / 4) % 4, l % 4);
                let bits = (src[k_high(qtype, t) + 32 * h + 4 * i + tt] >> (2 * u)) & 3;
                dst[128 + 32 * n + l] |= bits << (2 * c);
            }
        }
    } else {
        dst[0..2].copy_from_slice(&src[2 * i..][..2]);
        dst[2..4].copy_from_slice(&src[16 + 2 * i..][..2]);
        for w in 0..3 {
            dst[4 + 4 * w..][..4].copy_from_slice(&src[K_WORDS + 32 * w + 4 * i..][..4]);
        }
        if qtype == QType::Q5K {
            dst[16..48].fill(0);
            for t in 0..8 {
                let qh = row_fifth_bits(&src[k_high(qtype, t)..], i);
                for l in 0..32 {
                    dst[16 + l] |= (((qh >> l) & 1) as u8) << t;
                }
            }
        }
    }
}
