//! Our quantized kernels against a plain f32 reference, and every SIMD path against the portable
//! one, on random blocks of odd shapes.

use neuron::engine::kernels::{
    self, BlockQ8, Level, QK, QType, Weights,
    blocks::{QK_K, dequantize_row},
    quantize, scalar,
};

const TYPES: [QType; 8] = [
    QType::Q4_0,
    QType::Q4_1,
    QType::Q8_0,
    QType::Q5_0,
    QType::Q5_1,
    QType::Q4K,
    QType::Q5K,
    QType::Q6K,
];

fn is_k(qtype: QType) -> bool {
    qtype.block_weights() == QK_K
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn byte(&mut self) -> u8 {
        (self.u64() >> 56) as u8
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// A positive f16 between about 2^-10 and 2, as its bits.
    fn scale(&mut self) -> u16 {
        let exp = 5 + (self.u64() % 11) as u16;
        (exp << 10) | (self.u64() as u16 & 0x3ff)
    }
}

const ONE_F16: u16 = 0x3c00;

/// `n` rows of `k` random weights; `unit_scales` sets d = 1 (and Q4_1's m = 1).
fn weights(rng: &mut Rng, qtype: QType, n: usize, k: usize, unit_scales: bool) -> Vec<u8> {
    if is_k(qtype) {
        return k_weights(rng, qtype, n, k, unit_scales);
    }
    let mut w = Vec::with_capacity(n * qtype.row_bytes(k));
    for _ in 0..n * k / QK {
        let d = if unit_scales { ONE_F16 } else { rng.scale() };
        w.extend_from_slice(&d.to_le_bytes());
        let payload = match qtype {
            QType::Q4_0 => 16,
            QType::Q4_1 | QType::Q5_1 => {
                let m = if unit_scales {
                    ONE_F16
                } else {
                    rng.scale() | ((rng.byte() as u16 & 1) << 15)
                };
                w.extend_from_slice(&m.to_le_bytes());
                if qtype == QType::Q5_1 { 20 } else { 16 }
            }
            QType::Q8_0 => 32,
            // 4 bytes of high bits, 16 of nibbles.
            QType::Q5_0 => 20,
            QType::Q4K | QType::Q5K | QType::Q6K => unreachable!("k_weights"),
        };
        // Q8_0 weights never hold -128 (llama.cpp quantizes to ±127); the SIMD sign trick relies
        // on it.
        w.extend((0..payload).map(|_| match (qtype, rng.byte()) {
            (QType::Q8_0, 0x80) => 0x81,
            (_, b) => b,
        }));
    }
    w
}

/// K-quant super-blocks: random quants, f16 `d` (and `dmin`) where the layout has them; with
/// `unit_scales`, d = dmin = 1 and every sub-block scale (and min) within ±3 so integer sums stay
/// exact in f32.
fn k_weights(rng: &mut Rng, qtype: QType, n: usize, k: usize, unit_scales: bool) -> Vec<u8> {
    let bb = qtype.block_bytes();
    let mut w = Vec::with_capacity(n * qtype.row_bytes(k));
    for _ in 0..n * k / QK_K {
        let mut b: Vec<u8> = (0..bb).map(|_| rng.byte()).collect();
        let f16_at = |b: &mut Vec<u8>, at: usize, rng: &mut Rng| {
            let v = if unit_scales { ONE_F16 } else { rng.scale() };
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        };
        if qtype == QType::Q6K {
            f16_at(&mut b, 208, rng);
            if unit_scales {
                for s in &mut b[192..208] {
                    *s = ((*s % 7) as i8 - 3) as u8;
                }
            }
        } else {
            f16_at(&mut b, 0, rng);
            f16_at(&mut b, 2, rng);
            if unit_scales {
                for s in &mut b[4..16] {
                    *s &= 0x03;
                }
            }
        }
        w.extend_from_slice(&b);
    }
    w
}

/// `SHAPES` with k rounded up to whole super-blocks for the K-quants.
fn shapes(qtype: QType) -> Vec<(usize, usize, usize)> {
    let bw = qtype.block_weights();
    SHAPES
        .iter()
        .map(|&(n, k, m)| (n, k.div_ceil(bw) * bw, m))
        .collect()
}

fn floats(rng: &mut Rng, len: usize) -> Vec<f32> {
    // Some blocks all zero, to cover d = 0.
    (0..len)
        .map(|i| {
            if (i / QK) % 7 == 3 {
                0.0
            } else {
                rng.unit() * 4.0
            }
        })
        .collect()
}

/// Shapes (n, k, m): one and many activation rows, row counts that are not a multiple of the
/// four-row tile, k of one block and of many.
const SHAPES: [(usize, usize, usize); 8] = [
    (1, 32, 1),
    (7, 64, 3),
    (13, 96, 5),
    (33, 576, 1),
    (19, 160, 9),
    (64, 1536, 4),
    (100, 288, 2),
    (577, 64, 7),
];

#[test]
fn matmul_matches_f32_reference_within_activation_rounding() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for qtype in TYPES {
        for (n, k, m) in shapes(qtype) {
            let w = weights(&mut rng, qtype, n, k, false);
            let x = floats(&mut rng, m * k);
            let mut y = vec![f32::NAN; m * n];
            kernels::matmul(&Weights::new(qtype, w.clone(), n, k), &x, m, &mut y);
            let mut wf = vec![0f32; k];
            for j in 0..n {
                dequantize_row(
                    qtype,
                    &w[j * qtype.row_bytes(k)..][..qtype.row_bytes(k)],
                    &mut wf,
                );
                for i in 0..m {
                    let xr = &x[i * k..][..k];
                    let want: f64 = wf.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                    // Rounding x to 8 bits moves each element by at most half a step (amax/254,
                    // amax of the block, or of the super-block for the K-quants).
                    let group = qtype.block_weights();
                    let bound: f64 = wf
                        .chunks(group)
                        .zip(xr.chunks(group))
                        .map(|(wb, xb)| {
                            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                            let wsum: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                            wsum * amax / 254.0
                        })
                        .sum::<f64>()
                        * 1.001
                        + 1e-4 * want.abs()
                        + 1e-5;
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= bound,
                        "{qtype:?} n={n} k={k} m={m} row {i} col {j}: got {got}, want {want} ± {bound}"
                    );
                }
            }
        }
    }
}

#[test]
fn simd_quantization_matches_portable_exactly() {
    let mut rng = Rng(7);
    let x = floats(&mut rng, 64 * QK);
    for group in [1, 8] {
        let mut fast = vec![BlockQ8::default(); 64];
        let mut slow = vec![BlockQ8::default(); 64];
        quantize::quantize_row(&x, &mut fast, group);
        quantize::quantize_row_scalar(&x, &mut slow, group);
        assert_eq!(fast, slow, "level {:?} group {group}", kernels::level());
        // A group shares one scale, that of its largest magnitude.
        for g in fast.chunks(group) {
            assert!(g.iter().all(|b| b.d == g[0].d));
        }
    }
}

/// Every SIMD level this CPU runs (the tests cover the ones it has).
fn levels() -> Vec<Level> {
    let arm = cfg!(target_arch = "aarch64");
    [Level::Neon, Level::Avx2, Level::Avx512Vnni]
        .into_iter()
        .filter(|l| *l <= kernels::detected() && (*l == Level::Neon) == arm)
        .collect()
}

/// `CORTEX_EXPECT_KERNELS` (set by `scripts/test-arm64`, whose emulated CPU has NEON with the
/// dot-product extension) names the level this CPU must be detected at, so the SIMD comparisons
/// cannot pass by running portable code on both sides.
#[test]
fn expected_simd_level_is_detected() {
    if let Ok(want) = std::env::var("CORTEX_EXPECT_KERNELS") {
        assert_eq!(format!("{:?}", kernels::detected()), want);
    }
}

/// Random Q8 activations with d = 1, so every partial sum is an integer and exact in f32.
fn unit_acts(rng: &mut Rng, nb: usize) -> Vec<BlockQ8> {
    (0..nb)
        .map(|_| {
            let qs: [i8; QK] = std::array::from_fn(|_| (rng.byte() as i8).max(-127));
            let half = |h: usize| {
                qs[16 * h..16 * h + 16]
                    .iter()
                    .map(|&q| q as i32)
                    .sum::<i32>()
            };
            let hs = [half(0) as i16, half(1) as i16];
            BlockQ8 {
                d: 1.0,
                s: (hs[0] + hs[1]) as f32,
                qs,
                hs,
            }
        })
        .collect()
}

#[test]
fn simd_dot_products_equal_portable_integer_sums() {
    let mut rng = Rng(42);
    for qtype in TYPES {
        for blocks in [1, 2, 5, 18] {
            let k = blocks * qtype.block_weights();
            let nb = k / QK;
            let w = weights(&mut rng, qtype, 1, k, true);
            for rows in 1..=9 {
                let acts: Vec<Vec<BlockQ8>> = (0..rows).map(|_| unit_acts(&mut rng, nb)).collect();
                let refs: Vec<&[BlockQ8]> = acts.iter().map(|a| a.as_slice()).collect();
                let mut slow = vec![0f32; rows];
                scalar::dot_rows(qtype, &w, &refs, &mut slow);
                for lvl in levels() {
                    let mut fast = vec![0f32; rows];
                    kernels::dot_rows_at(lvl, qtype, &w, &refs, &mut fast);
                    assert_eq!(fast, slow, "{qtype:?} k={k} rows={rows} {lvl:?}");
                }
            }
        }
    }
}

/// Interleaved rows (Q4_0, Q4_1), with the tail rows past the last group of eight left in GGUF
/// layout, give every row's portable integer sum exactly, at every level; and each row reads
/// back as the GGUF bytes it was made from.
#[test]
fn interleaved_rows_equal_portable_integer_sums() {
    let mut rng = Rng(11);
    for qtype in TYPES {
        for (n, blocks) in [(8, 1), (16, 3), (13, 2), (27, 18), (5, 4)] {
            let k = blocks * qtype.block_weights();
            let (nb, rb) = (k / QK, qtype.row_bytes(k));
            let w = weights(&mut rng, qtype, n, k, true);
            let packed = Weights::new(qtype, w.clone(), n, k);
            assert_eq!(
                packed.packed(),
                if kernels::interleaves(qtype) {
                    n / 8 * 8
                } else {
                    0
                },
                "{qtype:?}"
            );
            let mut row = vec![0u8; rb];
            for j in 0..n {
                packed.row(j, &mut row);
                assert_eq!(row, w[j * rb..][..rb], "{qtype:?} n={n} row {j}");
            }
            for m in [1, 3, 4, 6] {
                let acts: Vec<Vec<BlockQ8>> = (0..m).map(|_| unit_acts(&mut rng, nb)).collect();
                let refs: Vec<&[BlockQ8]> = acts.iter().map(|a| a.as_slice()).collect();
                let slow: Vec<f32> = refs
                    .iter()
                    .flat_map(|a| (0..n).map(|j| scalar::dot(qtype, &w[j * rb..][..rb], a)))
                    .collect();
                for lvl in [Level::Scalar].into_iter().chain(levels()) {
                    let mut fast = vec![f32::NAN; m * n];
                    kernels::dot_all_at(lvl, &packed, &refs, &mut fast);
                    assert_eq!(fast, slow, "{qtype:?} n={n} k={k} m={m} {lvl:?}");
                }
            }
        }
    }
}

#[test]
fn simd_matmul_matches_portable_on_random_scales() {
    let mut rng = Rng(99);
    for qtype in TYPES {
        for (n, k, m) in shapes(qtype) {
            let w = weights(&mut rng, qtype, n, k, false);
            let x = floats(&mut rng, m * k);
            let mut y = vec![0f32; m * n];
            kernels::matmul(&Weights::new(qtype, w.clone(), n, k), &x, m, &mut y);
            let nb = k / QK;
            let rb = qtype.row_bytes(k);
            let mut wf = vec![0f32; k];
            for i in 0..m {
                let xr = &x[i * k..][..k];
                let mut a = vec![BlockQ8::default(); nb];
                quantize::quantize_row_scalar(xr, &mut a, qtype.block_weights() / QK);
                for j in 0..n {
                    let row = &w[j * rb..][..rb];
                    let want = scalar::dot(qtype, row, &a);
                    let got = y[i * n + j];
                    // Same integer sums; only the order (and fusing) of f32 operations differs,
                    // so the error is a few ulps of the magnitudes added.
                    dequantize_row(qtype, row, &mut wf);
                    let mag: f32 = wf.iter().zip(xr).map(|(p, q)| (p * q).abs()).sum();
                    let tol = 1e-5 * (mag + want.abs()) + 1e-6;
                    assert!(
                        (got - want).abs() <= tol,
                        "{qtype:?} n={n} k={k} m={m}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// Our reading of every block layout against candle's (which follows ggml's): the reference the
/// kernels are tested against must itself be right.
#[test]
fn dequantize_matches_candle() {
    use candle_core::quantized::{GgmlDType, ggml_file::qtensor_from_ggml};
    let mut rng = Rng(5);
    for qtype in TYPES {
        let dtype = match qtype {
            QType::Q4_0 => GgmlDType::Q4_0,
            QType::Q4_1 => GgmlDType::Q4_1,
            QType::Q8_0 => GgmlDType::Q8_0,
            QType::Q5_0 => GgmlDType::Q5_0,
            QType::Q5_1 => GgmlDType::Q5_1,
            QType::Q4K => GgmlDType::Q4K,
            QType::Q5K => GgmlDType::Q5K,
            QType::Q6K => GgmlDType::Q6K,
        };
        let (n, k) = (3, 512);
        let w = weights(&mut rng, qtype, n, k, false);
        let want = qtensor_from_ggml(dtype, &w, vec![n, k], &candle_core::Device::Cpu)
            .unwrap()
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut got = vec![0f32; n * k];
        for (row, out) in w
            .chunks_exact(qtype.row_bytes(k))
            .zip(got.chunks_exact_mut(k))
        {
            dequantize_row(qtype, row, out);
        }
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "{qtype:?} weight {i}: ours {g}, candle {w}"
            );
        }
    }
}

/// The masked all-at-once reading of Q4_K/Q5_K scales and mins equals the plain one, on every
/// byte pattern of random blocks.
#[test]
fn packed_k_scales_decode_alike() {
    use neuron::engine::kernels::blocks::{scale_min_k4, scales_mins_k4};
    let mut rng = Rng(11);
    for _ in 0..10_000 {
        let packed: [u8; 12] = std::array::from_fn(|_| rng.byte());
        let (sc, mn) = scales_mins_k4(&packed);
        for t in 0..8 {
            assert_eq!((sc[t], mn[t]), scale_min_k4(&packed, t), "{packed:?} t={t}");
        }
    }
}

/// Several matrices of one width by one input in one hand-off give each the very numbers of its
/// own `matmul`: odd row counts (tails outside the interleaved groups), one row, a decode batch
/// and a prompt-sized input.
#[test]
fn matmul_many_equals_one_matmul_per_matrix() {
    let mut rng = Rng(123);
    for qtype in TYPES {
        let k = 2 * qtype.block_weights();
        let ns = [24, 13, 40];
        let ws: Vec<Weights> = ns
            .iter()
            .map(|&n| Weights::new(qtype, weights(&mut rng, qtype, n, k, false), n, k))
            .collect();
        for m in [1, 5, 21] {
            let x = floats(&mut rng, m * k);
            let mut many: Vec<Vec<f32>> = ns.iter().map(|n| vec![0f32; m * n]).collect();
            let mut outs: Vec<&mut [f32]> = many.iter_mut().map(|y| y.as_mut_slice()).collect();
            kernels::matmul_many(&ws.iter().collect::<Vec<_>>(), &x, m, &mut outs);
            for (w, got) in ws.iter().zip(&many) {
                let mut want = vec![0f32; m * w.n()];
                kernels::matmul(w, &x, m, &mut want);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{qtype:?} n={} m={m}",
                    w.n()
                );
            }
        }
    }
}

/// Every row of a decode batch of eight (which Q4_0, Q4_1 and Q8_0 take in one pass with VNNI)
/// and of a prompt-sized product (past the decode path's row count, where the same types take
/// two interleaved groups at a time in 512-bit registers) gives the very bits it gives alone:
/// pairs of groups, a last group alone and rows past the groups alike.
#[test]
fn a_batchs_rows_equal_the_same_rows_alone() {
    let mut rng = Rng(321);
    for (qtype, m) in TYPES.into_iter().flat_map(|t| [(t, 8), (t, 21)]) {
        let k = 3 * qtype.block_weights();
        let n = 44; // two pairs of groups, a fifth group, four rows outside the groups
        let w = Weights::new(qtype, weights(&mut rng, qtype, n, k, false), n, k);
        let x = floats(&mut rng, m * k);
        let mut all = vec![0f32; m * n];
        kernels::matmul(&w, &x, m, &mut all);
        for i in 0..m {
            let mut one = vec![0f32; n];
            kernels::matmul(&w, &x[i * k..][..k], 1, &mut one);
            assert!(
                all[i * n..][..n]
                    .iter()
                    .zip(&one)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{qtype:?} row {i} of {m}"
            );
        }
    }
}
