//! `Linear` (our kernels where they apply) against the dequantized weights of real model files.

mod common;

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::{GgmlDType, gguf_file};
use candle_core::{Device, Tensor};
use neuron::engine::kernels::quantize::quantize_row_scalar;
use neuron::engine::kernels::{BlockQ8, QK};
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
            GgmlDType::Q4_0
                | GgmlDType::Q4_1
                | GgmlDType::Q5_0
                | GgmlDType::Q5_1
                | GgmlDType::Q8_0
                | GgmlDType::Q4K
                | GgmlDType::Q5K
                | GgmlDType::Q6K
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
        // The kernels quantize activations to Q8 blocks (as llama.cpp does); the reference takes
        // the same blocks, expanded, against candle's dequantized weights in f64, so what is left
        // is only the order of f32 additions: a bound that a wrong block, scale or tail breaks.
        let group = info.ggml_dtype.block_size() / QK;
        let w = w.to_vec2::<f32>().unwrap();
        for m in [1, 5] {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &Device::Cpu).unwrap();
            let got = lin.forward(&x).unwrap().flatten_all().unwrap();
            let got = got.to_vec1::<f32>().unwrap();
            let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut blocks = vec![BlockQ8::default(); k / QK];
            let mut worst = 0f64;
            for (r, xr) in x.chunks_exact(k).enumerate() {
                quantize_row_scalar(xr, &mut blocks, group);
                let xq: Vec<f64> = blocks
                    .iter()
                    .flat_map(|b| b.qs.iter().map(move |&q| q as f64 * b.d as f64))
                    .collect();
                for (j, wr) in w.iter().enumerate() {
                    let (mut want, mut size) = (0f64, 0f64);
                    for (wv, xv) in wr.iter().zip(&xq) {
                        want += *wv as f64 * xv;
                        size += (*wv as f64 * xv).abs();
                    }
                    let got = got[r * w.len() + j] as f64;
                    worst = worst.max((got - want).abs() / size.max(f64::MIN_POSITIVE));
                }
            }
            assert!(
                worst <= 1e-5,
                "{tname} ({:?}) m={m}: an output is off by {worst:e} of the sum of its terms' sizes",
                info.ggml_dtype
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

/// A row's product must not depend on the rows it is batched with: that is what keeps greedy
/// output the same alone and in a batch. Every projection type of both models, ours and
/// candle's (Gemma's Q6_K among them), one row alone against the same row among seven others.
#[test]
fn a_row_gets_the_same_product_alone_and_in_a_batch() {
    for name in [common::SMOLLM2, common::GEMMA3] {
        let path = common::model_path(name);
        let mut f = BufReader::new(File::open(&path).unwrap());
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        let mut names: Vec<_> = ct.tensor_infos.keys().cloned().collect();
        names.sort();
        for tname in names {
            let info = &ct.tensor_infos[&tname];
            if info.shape.rank() != 2 || !tname.starts_with("blk.") {
                continue;
            }
            if !seen.insert(format!("{:?}", info.ggml_dtype)) {
                continue;
            }
            let q = ct.tensor(&mut f, &tname, &Device::Cpu).unwrap();
            let k = q.shape().dims2().unwrap().1;
            let lin = Linear::from_qtensor(q).unwrap();
            let batch = Tensor::randn(0f32, 1.0, (8, k), &Device::Cpu).unwrap();
            let together = lin.forward(&batch).unwrap();
            for i in [0, 5] {
                let alone = lin.forward(&batch.narrow(0, i, 1).unwrap()).unwrap();
                let a = alone.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let b = together.get(i).unwrap().to_vec1::<f32>().unwrap();
                assert!(
                    a == b,
                    "{name} {tname} ({:?}): row {i} alone differs from the same row in a batch of 8",
                    info.ggml_dtype
                );
            }
        }
        eprintln!("{name}: types checked {seen:?}");
        let want: &[&str] = if name == common::GEMMA3 {
            &["Q4K", "Q5_0", "Q6K", "Q8_0"]
        } else {
            &["Q4_1"]
        };
        for t in want {
            assert!(seen.contains(*t), "{name}: no {t} projection in {seen:?}");
        }
    }
}

/// The embedding lookup expands only the rows asked for, equal to the same rows of the whole
/// table expanded by candle; and a model's memory estimate no longer counts an f32 copy of the
/// table (Gemma 3 270M: 178 MB of Q8_0 rows instead of 671 MB of f32).
#[test]
fn embedding_rows_match_the_expanded_table_and_cost_no_f32_copy() {
    use neuron::engine::model::{Config, estimate_bytes};
    use neuron::gguf::Meta;
    for name in [common::SMOLLM2, common::GEMMA3] {
        let path = common::model_path(name);
        let mut f = BufReader::new(File::open(&path).unwrap());
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let q = ct
            .tensor(&mut f, "token_embd.weight", &Device::Cpu)
            .unwrap();
        let table = q.dequantize(&Device::Cpu).unwrap();
        let lin = Linear::from_qtensor(q).unwrap();
        assert!(lin.is_own(), "{name}: the embeddings should stay quantized");
        let n = table.dim(0).unwrap() as u32;
        let ids = [0, 1, 17, n / 2, n - 1];
        let got = lin.rows(&ids).unwrap().to_vec2::<f32>().unwrap();
        let want = table
            .index_select(&Tensor::new(&ids[..], &Device::Cpu).unwrap(), 0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(got, want, "{name}");
        let err = lin.rows(&[n]).unwrap_err().to_string();
        assert!(err.contains("outside the embedding table"), "{err}");

        let cfg = Config::from_meta(&Meta(&ct.metadata)).unwrap();
        let file = std::fs::metadata(&path).unwrap().len();
        let est = estimate_bytes(&ct, &cfg, 0, &Device::Cpu);
        assert!(
            est <= file,
            "{name}: estimate {est} bytes for a {file}-byte file (no f32 table expected)"
        );
    }
}
