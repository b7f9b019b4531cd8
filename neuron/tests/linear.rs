//! `Linear` (our kernels where they apply) against the dequantized weights of real model files.

mod common;

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::{GgmlDType, gguf_file};
use candle_core::{Device, Tensor};
use neuron::engine::linear::Linear;

fn check_model(name: &str) {
    let path = common::model_path(name);
    let mut f = BufReader::new(File::open(&path).unwrap());
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut names: Vec<_> = ct.tensor_infos.keys().cloned().collect();
    names.sort();
    let mut checked = 0;
    for tname in names {
        let info = &ct.tensor_infos[&tname];
        let ours = matches!(
            info.ggml_dtype,
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0
        );
        // One layer's projections and the embeddings are enough to cover every type and shape.
        if !ours
            || info.shape.rank() != 2
            || !(tname.starts_with("blk.0.") || tname.starts_with("token_embd"))
        {
            continue;
        }
        let q = ct.tensor(&mut f, &tname, &Device::Cpu).unwrap();
        let w = q.dequantize(&Device::Cpu).unwrap();
        let (_, k) = w.dims2().unwrap();
        let lin = Linear::from_qtensor(q).unwrap();
        assert!(
            lin.is_own(),
            "{tname}: {:?} should use our kernels",
            info.ggml_dtype
        );
        for m in [1, 5] {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &Device::Cpu).unwrap();
            let got = lin.forward(&x).unwrap();
            let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            let scale = want
                .abs()
                .unwrap()
                .max_keepdim(2)
                .unwrap()
                .max_keepdim(1)
                .unwrap();
            let scale = scale.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
            let diff = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            // 8-bit activations: about 1% of the largest output.
            assert!(
                diff <= 0.02 * scale,
                "{tname} m={m}: max error {diff}, outputs up to {scale}"
            );
        }
        checked += 1;
    }
    assert!(
        checked > 0,
        "{name} has no tensor of the types our kernels handle"
    );
}

#[test]
fn smollm2_projections_match_dequantized_weights() {
    check_model(common::SMOLLM2);
}

#[test]
fn gemma3_projections_of_our_types_match_dequantized_weights() {
    check_model(common::GEMMA3);
}
