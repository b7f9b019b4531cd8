//! Our CPU attention kernel alone, on synthetic keys and values: a prompt chunk of 128 tokens
//! at growing positions, and one decoded token, for SmolLM2's and Gemma 3's head shapes.
//! `cargo run --release -p neuron --example attention_timings`

use std::time::Instant;

use half::f16;
use neuron::engine::attention::{BlockKv, Heads, Span, attend};
use neuron::engine::kv_cache::BLOCK;

fn main() {
    let threads = neuron::engine::kernels::threads();
    println!("threads {threads}");
    for (name, nh, nkv, hd) in [("smollm2", 9, 3, 64), ("gemma3", 4, 1, 256)] {
        let h = Heads {
            n_head: nh,
            n_kv_head: nkv,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        for pos in [0usize, 1024, 4096, 8192] {
            for len in [128usize, 1] {
                let blocks_n = (pos + len).div_ceil(BLOCK);
                let data: Vec<(Vec<f16>, Vec<f16>)> = (0..blocks_n)
                    .map(|b| {
                        let n = nkv * hd * BLOCK;
                        (
                            (0..n)
                                .map(|i| f16::from_f32(((i + b) % 17) as f32 * 0.01))
                                .collect(),
                            (0..n)
                                .map(|i| f16::from_f32(((i * 3 + b) % 13) as f32 * 0.02))
                                .collect(),
                        )
                    })
                    .collect();
                let blocks: Vec<BlockKv<'_>> = data.iter().map(|(k, v)| BlockKv { k, v }).collect();
                let q: Vec<f32> = (0..len * nh * hd).map(|i| (i % 7) as f32 * 0.1).collect();
                let mut out = vec![0f32; len * nh * hd];
                let span = || Span {
                    offset: 0,
                    len,
                    pos,
                    window: None,
                    blocks: blocks.clone(),
                };
                attend(&q, len, &[span()], h, &mut out);
                let iters = if len == 1 { 200 } else { 10 };
                let t = Instant::now();
                for _ in 0..iters {
                    attend(&q, len, &[span()], h, &mut out);
                }
                let dt = t.elapsed().as_secs_f64() / iters as f64;
                // Multiply-adds: scores and weighted values, every head, every visible key.
                let keys: f64 = (0..len).map(|i| (pos + i + 1) as f64).sum();
                let fma = keys * nh as f64 * hd as f64 * 2.0;
                println!(
                    "{name:8} pos {pos:5} rows {len:3}: {:8.3} ms  {:6.1} GFMA/s",
                    dt * 1e3,
                    fma / dt / 1e9
                );
            }
        }
    }
}
