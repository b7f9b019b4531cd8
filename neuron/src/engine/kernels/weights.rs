//! A projection's weights as the kernels read them.
//!
//! Q4_0 and Q4_1 rows are repacked at load, eight rows interleaved (as llama.cpp's `Q4_0x8`):
//! for each block of 32 weights, the eight rows' f16 scales (and Q4_1's minimums) side by side,
//! then 128 bytes where byte `32v + 4i + t` is byte `4v + t` of row `i`'s nibbles. A 32-byte load
//! then holds four weights of each of the eight rows, the vector lanes are the rows, and one
//! broadcast group of four activation bytes meets all eight at once: no per-row horizontal sum,
//! no per-block scalar scale, and the eight scales convert in one instruction. The layout has
//! exactly the bytes GGUF has. Rows past the last whole group of eight, and every other type,
//! stay in GGUF layout.

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
pub fn interleaves(qtype: QType) -> bool {
    matches!(qtype, QType::Q4_0 | QType::Q4_1)
}

/// Bytes before the nibbles in a GGUF block: `d`, and Q4_1's `m`.
fn head(qtype: QType) -> usize {
    qtype.block_bytes() - QK / 2
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
        let (rb, bb, h) = (self.row_bytes(), self.qtype.block_bytes(), head(self.qtype));
        let nb = self.k / QK;
        let mut out = vec![0u8; GROUP * rb];
        for g in self.bytes[..self.packed * rb].chunks_exact_mut(GROUP * rb) {
            for b in 0..nb {
                let dst = &mut out[b * GROUP * bb..][..GROUP * bb];
                for i in 0..GROUP {
                    let src = &g[i * rb + b * bb..][..bb];
                    // The head fields: d of every row, then m of every row.
                    for f in 0..h / 2 {
                        dst[f * 2 * GROUP + 2 * i..][..2].copy_from_slice(&src[2 * f..][..2]);
                    }
                    for v in 0..4 {
                        dst[GROUP * h + 32 * v + 4 * i..][..4]
                            .copy_from_slice(&src[h + 4 * v..][..4]);
                    }
                }
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

/// Row `i` of the one interleaved group `grp`, in GGUF bytes.
fn row_from(qtype: QType, grp: &[u8], i: usize, out: &mut [u8]) {
    let (bb, h) = (qtype.block_bytes(), head(qtype));
    for (b, dst) in out.chunks_exact_mut(bb).enumerate() {
        let src = &grp[b * GROUP * bb..][..GROUP * bb];
        for f in 0..h / 2 {
            dst[2 * f..][..2].copy_from_slice(&src[f * 2 * GROUP + 2 * i..][..2]);
        }
        for v in 0..4 {
            dst[h + 4 * v..][..4].copy_from_slice(&src[GROUP * h + 32 * v + 4 * i..][..4]);
        }
    }
}
