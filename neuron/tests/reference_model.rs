//! Our transformer against candle-transformers' reference implementations on real weights: the
//! same token ids must give the same next-token logits, in prefill and in decode, so the model code
//! we own stays faithful to each architecture.

mod common;

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use neuron::engine::linear::Matmul;
use neuron::engine::model::{Activation, Config, Model};
use neuron::gguf::Meta;

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as u32
}

fn open(path: &Path) -> (gguf_file::Content, BufReader<File>) {
    let mut f = BufReader::new(File::open(path).unwrap());
    (gguf_file::Content::read(&mut f).unwrap(), f)
}

/// Runs `prompt` then `steps` greedy decode steps through our model and through `reference`
/// (token ids, position → logits), asserting the logits agree within `tol` at every step.
fn compare(
    ours: &Model,
    prompt: &[u32],
    steps: usize,
    tol: f32,
    mut reference: impl FnMut(&[u32], usize) -> Vec<f32>,
) {
    let mut cache = ours.new_cache().unwrap();
    let (mut input, mut pos) = (prompt.to_vec(), 0);
    for step in 0..=steps {
        let a = Model::logits_vec(&ours.forward(&input, &mut cache).unwrap()).unwrap();
        let b = reference(&input, pos);
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(
            diff < tol,
            "step {step} (0 = prefill): logits differ by {diff}"
        );
        pos += input.len();
        input = vec![argmax(&a)];
    }
}

fn logits(t: candle_core::Result<Tensor>) -> Vec<f32> {
    t.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn ids(tokens: &[u32]) -> Tensor {
    Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

#[test]
fn smollm2_logits_match_candle_quantized_llama_for_prefill_and_decode() {
    let path = common::model_path(common::SMOLLM2);
    let (ct, mut f) = open(&path);
    let mut cfg = Config::from_meta(&Meta(&ct.metadata)).unwrap();
    // The same matmul kernels and attention operations as the reference, so what differs is the
    // model code alone (our kernels are checked against f32 weights in kernels_model.rs, our
    // attention against an f64 reference in its unit test and end to end in llamacpp_greedy.rs).
    cfg.matmul = Matmul::Candle;
    cfg.candle_attention = true;
    let ours = Model::load(&ct, &mut f, cfg, 512, &Device::Cpu, &|_| {}).unwrap();
    let (ct, mut f) = open(&path);
    let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        ct,
        &mut f,
        &Device::Cpu,
    )
    .unwrap();
    let prompt: Vec<u32> = (0..40).map(|i| 100 + i * 37).collect();
    compare(&ours, &prompt, 3, 1e-2, |t, pos| {
        logits(reference.forward(&ids(t), pos))
    });
}

/// candle 0.11's quantized_gemma3 uses SiLU where Gemma 3 uses GELU (candle #3745); with our
/// activation switched to SiLU for this test, everything else must agree with it.
#[test]
fn gemma3_matches_candle_quantized_gemma3_apart_from_its_activation() {
    let path = common::model_path(common::GEMMA3);
    let (ct, mut f) = open(&path);
    let mut cfg = Config::from_meta(&Meta(&ct.metadata)).unwrap();
    assert_eq!(cfg.activation, Activation::GeluTanh);
    cfg.activation = Activation::Silu;
    cfg.matmul = Matmul::Candle;
    cfg.candle_attention = true;
    let ours = Model::load(&ct, &mut f, cfg, 1024, &Device::Cpu, &|_| {}).unwrap();
    let (ct, mut f) = open(&path);
    let mut reference = candle_transformers::models::quantized_gemma3::ModelWeights::from_gguf(
        ct,
        &mut f,
        &Device::Cpu,
    )
    .unwrap();
    let prompt: Vec<u32> = (0..24).map(|i| 2 + i * 1013).collect();
    compare(&ours, &prompt, 1, 2e-2, |t, pos| {
        logits(reference.forward(&ids(t), pos))
    });
}
