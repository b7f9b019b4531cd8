//! Helpers shared by the integration tests: real model files and a real neuron process.
#![allow(dead_code)]

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-Q4_K_M.gguf";

pub use cortex_testkit::free_port;

/// Where `scripts/fetch-test-models` puts the weights.
pub fn model_dir() -> PathBuf {
    cortex_testkit::cache_dir().join("models")
}

/// A real model file; fails loudly, naming the command that provides it, when it is missing.
pub fn model_path(name: &str) -> PathBuf {
    let p = model_dir().join(name);
    assert!(
        p.is_file(),
        "test model {} is missing; run scripts/fetch-test-models first",
        p.display()
    );
    p
}

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A real neuron process on a free loopback port, killed on drop.
pub struct Neuron {
    pub child: Child,
    pub url: String,
    pub token: Option<String>,
}

impl Drop for Neuron {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Neuron {
    /// Starts `neuron` with the test model directory allowed, plus `extra` flags.
    pub fn start(extra: &[&str]) -> Neuron {
        Self::start_with_env(extra, &[])
    }

    /// Like [`Neuron::start`], with extra environment variables.
    pub fn start_with_env(extra: &[&str], envs: &[(&str, &str)]) -> Neuron {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let mut cmd = cortex_testkit::neuron(Path::new(env!("CARGO_BIN_EXE_neuron")), port);
        cmd.args(extra)
            .envs(envs.iter().copied())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("starting the neuron binary");
        let token = extra
            .iter()
            .position(|a| *a == "--token")
            .map(|i| extra[i + 1].to_string());
        let n = Neuron { child, url, token };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if reqwest::blocking_get_ok(&format!("{}/healthz", n.url)) {
                return n;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("neuron did not answer /healthz within 20 s");
    }

    pub fn client(&self) -> Client {
        Client {
            http: ::reqwest::Client::new(),
            base: self.url.clone(),
            token: self.token.clone(),
        }
    }
}

/// A tiny blocking probe without pulling reqwest's blocking feature.
mod reqwest {
    pub fn blocking_get_ok(url: &str) -> bool {
        use std::io::{Read, Write};
        let addr = url.trim_start_matches("http://");
        let (host, path) = addr.split_once('/').unwrap();
        let Ok(mut s) = std::net::TcpStream::connect(host) else {
            return false;
        };
        let _ = write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200")
    }
}

/// JSON over HTTP to a neuron.
pub struct Client {
    pub http: ::reqwest::Client,
    pub base: String,
    pub token: Option<String>,
}

impl Client {
    fn auth(&self, rb: ::reqwest::RequestBuilder) -> ::reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        Self::read(
            self.auth(self.http.post(format!("{}{path}", self.base)))
                .json(&body),
        )
        .await
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        Self::read(self.auth(self.http.get(format!("{}{path}", self.base)))).await
    }

    /// POSTs JSON and hands back the raw response (for streams and headers).
    pub async fn send(&self, path: &str, body: &serde_json::Value) -> ::reqwest::Response {
        self.auth(self.http.post(format!("{}{path}", self.base)))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Status and JSON body (or the body as a string when it is not JSON).
    async fn read(rb: ::reqwest::RequestBuilder) -> (u16, serde_json::Value) {
        let res = rb.send().await.unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    /// Loads a test model by `file://` URI and waits until it is ready.
    pub async fn load(&self, id: &str, file: &str) -> serde_json::Value {
        let uri = format!("file://{}", model_path(file).display());
        let (status, body) = self
            .post(
                "/models/load?wait=true",
                serde_json::json!({"id": id, "source": {"uri": uri}}),
            )
            .await;
        assert_eq!(status, 200, "loading {id}: {body}");
        assert_eq!(body["state"], "ready", "{body}");
        body
    }

    pub async fn chat(&self, model: &str, prompt: &str, max_tokens: u32) -> serde_json::Value {
        let (status, body) = self
            .post(
                "/v1/chat/completions",
                serde_json::json!({
                    "model": model, "temperature": 0, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": prompt}]
                }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Writes a 2-layer model of architecture `arch` with random weights and, when `with_tokenizer`,
/// SmolLM2's vocabulary in its metadata (without it, a tokenizer.json must come from elsewhere).
pub fn write_tiny(path: &Path, arch: &str, with_tokenizer: bool) {
    let mut f = BufReader::new(File::open(model_path(SMOLLM2)).unwrap());
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
        .filter(|(k, _)| with_tokenizer || k.ends_with("_token_id"))
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

/// SmolLM2's tokenizer (built from its GGUF metadata) as `tokenizer.json`.
pub fn smollm2_tokenizer_json() -> String {
    let mut f = BufReader::new(File::open(model_path(SMOLLM2)).unwrap());
    let ct = gguf_file::Content::read(&mut f).unwrap();
    neuron::tokenizer::TextTokenizer::from_gguf(&neuron::gguf::Meta(&ct.metadata))
        .unwrap()
        .to_json()
        .unwrap()
}
