//! Timings of our kernels against candle's `QMatMul` on SmolLM2-sized products, side by side in
//! one run (a measurement, not a check): `cargo run --release -p neuron --example kernel_timings`
//! (all types), or with type names to time only those (`-- Q4K Q6K`).

mod common;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use neuron::engine::linear::Linear;

fn main() {
    let dev = Device::Cpu;
    // The last shape of each list, 100M weights, is larger than any CPU's last-level cache: its
    // weights stream from memory on every call, as a decode step's do (one row only).
    let smollm2 = [
        (576, 576),
        (1536, 576),
        (576, 1536),
        (49152, 576),
        (131072, 768),
    ];
    // K-quant rows are 256-weight superblocks: Gemma 3 270M's attn_output (Q4_K) and ffn_down
    // (Q6_K), and a square one.
    let kquant = [(640, 1024), (640, 2048), (2048, 2048), (131072, 768)];
    let only: Vec<String> = std::env::args().skip(1).collect();
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        if !only.is_empty() && !only.iter().any(|t| *t == format!("{dtype:?}")) {
            continue;
        }
        let shapes: &[(usize, usize)] =
            if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K) {
                &kquant
            } else {
                &smollm2
            };
        for &(n, k) in shapes {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let ours = Linear::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            let theirs = QMatMul::from_qtensor(q).unwrap();
            let streamed = n * k > 64 << 20;
            for m in if streamed { &[1][..] } else { &[1, 8, 127] } {
                let m = *m;
                let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev).unwrap();
                let iters = if m == 1 { 50 } else { 3 }.min(20_000_000 / (n * k * m).max(1) + 1);
                let a = common::best_of_five(|| drop(ours.forward(&x).unwrap()), iters) * 1e6;
                let b = common::best_of_five(|| drop(theirs.forward(&x).unwrap()), iters) * 1e6;
                println!(
                    "{dtype:?} n={n:5} k={k:4} m={m:3}: ours {a:9.1} us  candle {b:9.1} us  ({:.2}x)",
                    b / a
                );
            }
        }
    }
}
