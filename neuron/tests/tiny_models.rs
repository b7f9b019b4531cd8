//! Architectures whose real weights cannot be fetched here (qwen2, qwen3) are exercised with tiny
//! GGUF files of random weights written by the test: loading, tokenizer-from-metadata, chat
//! template and generation run through the real neuron binary. An unsupported architecture fails
//! the load with a message naming it and the supported ones.

mod common;

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::{Neuron, SMOLLM2};
use serde_json::json;

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Writes a 2-layer model of architecture `arch` with SmolLM2's vocabulary.
fn write_tiny(path: &Path, arch: &str) {
    let mut f = BufReader::new(File::open(common::model_path(SMOLLM2)).unwrap());
    let smol = gguf_file::Content::read(&mut f).unwrap();
    let (n_embd, n_head, n_kv, head_dim, ffn, layers) =
        (64usize, 4usize, 2usize, 16usize, 128usize, 2usize);
    let vocab = smol.metadata["tokenizer.ggml.tokens"]
        .to_vec()
        .unwrap()
        .len();
    let mut meta: Vec<(String, Value)> = smol
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer.ggml.") && *k != "tokenizer.ggml.pre")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let k = |s: &str| format!("{arch}.{s}");
    meta.extend([
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHATML.into()),
        ),
        (k("block_count"), Value::U32(layers as u32)),
        (k("context_length"), Value::U32(512)),
        (k("embedding_length"), Value::U32(n_embd as u32)),
        (k("feed_forward_length"), Value::U32(ffn as u32)),
        (k("attention.head_count"), Value::U32(n_head as u32)),
        (k("attention.head_count_kv"), Value::U32(n_kv as u32)),
        (k("attention.key_length"), Value::U32(head_dim as u32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (k("rope.freq_base"), Value::F32(1_000_000.0)),
    ]);
    let dev = Device::Cpu;
    let q = |shape: (usize, usize)| {
        QTensor::quantize(
            &Tensor::randn(0f32, 0.05, shape, &dev).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap()
    };
    let ones = |n: usize| {
        QTensor::quantize(
            &Tensor::ones(n, candle_core::DType::F32, &dev).unwrap(),
            GgmlDType::F32,
        )
        .unwrap()
    };
    let bias = |n: usize| {
        QTensor::quantize(&Tensor::randn(0f32, 0.05, n, &dev).unwrap(), GgmlDType::F32).unwrap()
    };
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), q((vocab, n_embd))),
        ("output_norm.weight".into(), ones(n_embd)),
    ];
    for i in 0..layers {
        let p = |s: &str| format!("blk.{i}.{s}");
        tensors.extend([
            (p("attn_norm.weight"), ones(n_embd)),
            (p("attn_q.weight"), q((n_head * head_dim, n_embd))),
            (p("attn_k.weight"), q((n_kv * head_dim, n_embd))),
            (p("attn_v.weight"), q((n_kv * head_dim, n_embd))),
            (p("attn_output.weight"), q((n_embd, n_head * head_dim))),
            (p("ffn_norm.weight"), ones(n_embd)),
            (p("ffn_gate.weight"), q((ffn, n_embd))),
            (p("ffn_up.weight"), q((ffn, n_embd))),
            (p("ffn_down.weight"), q((n_embd, ffn))),
        ]);
        match arch {
            "qwen2" => tensors.extend([
                (p("attn_q.bias"), bias(n_head * head_dim)),
                (p("attn_k.bias"), bias(n_kv * head_dim)),
                (p("attn_v.bias"), bias(n_kv * head_dim)),
            ]),
            "qwen3" => tensors.extend([
                (p("attn_q_norm.weight"), ones(head_dim)),
                (p("attn_k_norm.weight"), ones(head_dim)),
            ]),
            _ => {}
        }
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = File::create(path).unwrap();
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn tiny_qwen2_and_qwen3_models_load_and_generate() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["qwen2", "qwen3"] {
        write_tiny(&dir.path().join(format!("tiny-{arch}.gguf")), arch);
    }
    write_tiny(&dir.path().join("tiny-mamba.gguf"), "mamba");
    let n = Neuron::start(&["--model-dirs", &dir.path().display().to_string()]);
    let c = n.client();
    for arch in ["qwen2", "qwen3"] {
        let uri = format!("file://{}/tiny-{arch}.gguf", dir.path().display());
        let (s, info) = c
            .post(
                "/models/load?wait=true",
                json!({"id": arch, "source": {"uri": uri}}),
            )
            .await;
        assert_eq!(s, 200, "{info}");
        assert_eq!(info["architecture"], arch);
        assert_eq!(
            info["contextLength"], 512,
            "the model's own context caps the default"
        );
        for stream in [false, true] {
            let (s, body) = c
                .post("/v1/chat/completions", json!({"model": arch, "max_tokens": 6, "temperature": 0, "stream": stream,
                    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]}))
                .await;
            assert_eq!(s, 200, "{body}");
            if !stream {
                // <|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n
                assert_eq!(body["usage"]["prompt_tokens"], 19, "{body}");
                let done = body["usage"]["completion_tokens"].as_u64().unwrap();
                let reason = body["choices"][0]["finish_reason"].as_str().unwrap();
                assert!(
                    (reason == "length" && done == 6) || (reason == "stop" && done <= 6),
                    "{body}"
                );
            }
        }
    }
    let uri = format!("file://{}/tiny-mamba.gguf", dir.path().display());
    let (s, body) = c
        .post(
            "/models/load?wait=true",
            json!({"id": "m", "source": {"uri": uri}}),
        )
        .await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(
        body["error"]["message"],
        "architecture 'mamba' (general.architecture) is not supported; supported: llama, qwen2, qwen3, gemma3"
    );
}
