//! Our transformer against candle-transformers' reference implementations on real weights: the
//! same token ids must give the same next-token logits (SmolLM2 through `quantized_llama`), so the
//! model code we own stays faithful to the architecture.

mod common;

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use neuron::engine::model::{Activation, Config, Model};
use neuron::gguf::Meta;

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

#[test]
fn smollm2_logits_match_candle_quantized_llama_for_prefill_and_decode() {
    let path = common::model_path(common::SMOLLM2);
    let mut f = BufReader::new(File::open(&path).unwrap());
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let cfg = Config::from_meta(&Meta(&ct.metadata)).unwrap();
    let ours = Model::load(&ct, &mut f, cfg, 512, &Device::Cpu, &|_| {}).unwrap();
    let mut cache = ours.new_cache().unwrap();

    let mut f2 = BufReader::new(File::open(&path).unwrap());
    let ct2 = gguf_file::Content::read(&mut f2).unwrap();
    let mut reference = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        ct2,
        &mut f2,
        &Device::Cpu,
    )
    .unwrap();

    // A 40-token prompt, then three decode steps.
    let prompt: Vec<u32> = (0..40).map(|i| 100 + i * 37).collect();
    let a = Model::logits_vec(&ours.forward(&prompt, &mut cache).unwrap()).unwrap();
    let b = reference
        .forward(
            &Tensor::new(prompt.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            0,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        max_abs_diff(&a, &b) < 1e-2,
        "prefill logits differ by {}",
        max_abs_diff(&a, &b)
    );
    let mut next = argmax(&a) as u32;
    for step in 0..3 {
        let a = Model::logits_vec(&ours.forward(&[next], &mut cache).unwrap()).unwrap();
        let b = reference
            .forward(
                &Tensor::new(&[next], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                prompt.len() + step,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            max_abs_diff(&a, &b) < 1e-2,
            "decode step {step} differs by {}",
            max_abs_diff(&a, &b)
        );
        next = argmax(&a) as u32;
    }
}

/// candle 0.11's quantized_gemma3 uses SiLU where Gemma 3 uses GELU (candle #3745); with our
/// activation switched to SiLU for this test, everything else must agree with it.
#[test]
fn gemma3_matches_candle_quantized_gemma3_apart_from_its_activation() {
    let path = common::model_path(common::GEMMA3);
    let mut f = BufReader::new(File::open(&path).unwrap());
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut cfg = Config::from_meta(&Meta(&ct.metadata)).unwrap();
    assert_eq!(cfg.activation, Activation::GeluTanh);
    cfg.activation = Activation::Silu;
    let ours = Model::load(&ct, &mut f, cfg, 1024, &Device::Cpu, &|_| {}).unwrap();
    let mut cache = ours.new_cache().unwrap();
    let mut f2 = BufReader::new(File::open(&path).unwrap());
    let ct2 = gguf_file::Content::read(&mut f2).unwrap();
    let mut reference = candle_transformers::models::quantized_gemma3::ModelWeights::from_gguf(
        ct2,
        &mut f2,
        &Device::Cpu,
    )
    .unwrap();
    let prompt: Vec<u32> = (0..24).map(|i| 2 + i * 1013).collect();
    let a = Model::logits_vec(&ours.forward(&prompt, &mut cache).unwrap()).unwrap();
    let b = reference
        .forward(
            &Tensor::new(prompt.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            0,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        max_abs_diff(&a, &b) < 2e-2,
        "prefill logits differ by {}",
        max_abs_diff(&a, &b)
    );
    let next = argmax(&a) as u32;
    let a = Model::logits_vec(&ours.forward(&[next], &mut cache).unwrap()).unwrap();
    let b = reference
        .forward(
            &Tensor::new(&[next], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            prompt.len(),
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        max_abs_diff(&a, &b) < 2e-2,
        "decode logits differ by {}",
        max_abs_diff(&a, &b)
    );
}
