//! Where a batched decode step goes (a measurement, not a check): milliseconds per step of the
//! whole model at batch sizes 1, 2, 4, 8 and 16, beside the same step's projections alone (every
//! weight matrix of the model times a batch of random rows), so the rest — attention, norms,
//! rotary, cache writes, hand-offs — shows as the difference.
//!
//! `cargo run --release -p neuron --example step_timings -- <model.gguf> [context] [batch...]`

mod common;

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use neuron::engine::kv_cache::{BLOCK, BlockId};
use neuron::engine::linear::Linear;
use neuron::engine::model::{Config, Model, SeqInput};
use neuron::gguf::Meta;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .expect("usage: step_timings <model.gguf> [context] [batch...]");
    let context: usize = args.next().map_or(64, |c| c.parse().expect("context"));
    let mut batches: Vec<usize> = args.map(|b| b.parse().expect("batch size")).collect();
    if batches.is_empty() {
        batches = vec![1, 2, 4, 8, 16];
    }
    let dev = Device::Cpu;
    let mut f = BufReader::new(File::open(&path).unwrap());
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let cfg = Config::from_meta(&Meta(&ct.metadata)).unwrap();
    let model = Model::load(&ct, &mut f, cfg, context + 512, &dev, &|_| {}).unwrap();
    // Every 2-D weight the model multiplies by, as the engine loads it.
    let mut names: Vec<_> = ct
        .tensor_infos
        .iter()
        .filter(|(n, i)| i.shape.rank() == 2 && (n.starts_with("blk.") || *n == "output.weight"))
        .map(|(n, _)| n.clone())
        .collect();
    names.sort();
    if !names.iter().any(|n| n == "output.weight") {
        names.push("token_embd.weight".into()); // tied output
    }
    let linears: Vec<(Linear, usize)> = names
        .iter()
        .map(|n| {
            let k = ct.tensor_infos[n].shape.dims()[1];
            let l = Linear::from_qtensor(ct.tensor(&mut f, n, &dev).unwrap()).unwrap();
            (l, k)
        })
        .collect();
    let inputs: Vec<Vec<u32>> = (0..16)
        .map(|s| {
            (0..context as u32)
                .map(|i| 100 + (i * 7 + s) % 1000)
                .collect()
        })
        .collect();
    println!("{path}: {} projections, context {context}", linears.len());
    println!(
        "{:>5} {:>10} {:>10} {:>10} {:>8}",
        "batch", "step ms", "proj ms", "rest ms", "tok/s"
    );
    for batch in batches {
        // One store, each sequence its own run of blocks, as the engine has them.
        let mut store = model.new_store();
        let per = (context + 1).div_ceil(BLOCK);
        let tables: Vec<Vec<BlockId>> = (0..batch)
            .map(|s| ((s * per) as BlockId..((s + 1) * per) as BlockId).collect())
            .collect();
        for (tab, t) in tables.iter().zip(&inputs) {
            let seq = SeqInput {
                tokens: t,
                pos: 0,
                blocks: tab,
            };
            model.forward_batch(&[seq], &mut store).unwrap();
        }
        let next = [200u32];
        let steps = 20;
        // Every round computes position `context` again, so each times the same step.
        let step = common::best_of_five(
            || {
                let seqs: Vec<_> = tables
                    .iter()
                    .map(|tab| SeqInput {
                        tokens: &next,
                        pos: context,
                        blocks: tab,
                    })
                    .collect();
                model.forward_batch(&seqs, &mut store).unwrap();
            },
            steps,
        ) * 1e3;
        let xs: Vec<Tensor> = linears
            .iter()
            .map(|(_, k)| Tensor::randn(0f32, 1.0, (1, batch, *k), &dev).unwrap())
            .collect();
        let proj = common::best_of_five(
            || {
                for ((l, _), x) in linears.iter().zip(&xs) {
                    drop(l.forward(x).unwrap());
                }
            },
            steps,
        ) * 1e3;
        println!(
            "{batch:>5} {step:>10.2} {proj:>10.2} {:>10.2} {:>8.0}",
            step - proj,
            batch as f64 / step * 1e3
        );
    }
}
