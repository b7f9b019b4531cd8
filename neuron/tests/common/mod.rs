//! Helpers shared by the integration tests: real model files and a real neuron process.
#![allow(dead_code)]

use std::path::PathBuf;

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-Q4_K_M.gguf";

/// Where `scripts/fetch-test-models` puts the weights.
pub fn model_dir() -> PathBuf {
    let cache = std::env::var("CORTEX_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cortex"));
    cache.join("models")
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

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
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

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_neuron"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--model-dirs", &model_dir().display().to_string()])
            .args(["--device", "cpu"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
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
        let res = self
            .auth(self.http.post(format!("{}{path}", self.base)))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let res = self
            .auth(self.http.get(format!("{}{path}", self.base)))
            .send()
            .await
            .unwrap();
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
