//! Harness for the gateway's end-to-end tests: real neuron processes and the real `cortex serve`
//! on loopback ports, with real weights from `scripts/fetch-test-models`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use cortex_testkit::{Proc, free_port, models_dir};

/// The neuron binary, built beside this crate's binary by `cargo build --workspace`.
pub fn neuron_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_cortex")).with_file_name("neuron");
    assert!(
        p.is_file(),
        "{} is missing; run `cargo build --workspace` first",
        p.display()
    );
    p
}

pub async fn wait_healthy(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if reqwest::get(format!("{url}/healthz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not become healthy");
}

pub fn start_neuron(port: u16, extra: &[&str]) -> Proc {
    models_dir();
    Proc(
        cortex_testkit::neuron(&neuron_bin(), port)
            .args(extra)
            .spawn()
            .unwrap(),
    )
}

/// Sends `sig` (`-STOP`, `-CONT`, `-KILL`…) to the process `pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// A neuron's own `/status` answer, asked directly on its port.
pub async fn neuron_status(port: u16) -> Value {
    reqwest::get(format!("http://127.0.0.1:{port}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The sum of every sample of `name` in a metrics `text` whose labels contain each of `labels`
/// (`key="value"`).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let ok = (rest.is_empty() || rest.starts_with('{'))
                && labels.iter().all(|want| rest.contains(want));
            ok.then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

pub struct Fleet {
    pub _dir: tempfile::TempDir,
    pub neurons: Vec<(u16, Option<Proc>)>,
    pub _gateway: Proc,
    pub url: String,
    pub metrics_url: String,
    pub http: reqwest::Client,
    /// The API key [`Fleet::catalogue`] and [`Fleet::wait_state`] send, for a gateway with
    /// `api_keys` ([`Fleet::with_key`]).
    pub key: Option<String>,
}

impl Fleet {
    /// The default fleet: two neurons; smollm2 pinned (alias smol) and gemma3 at zero.
    pub async fn start(extra_gateway_toml: &str) -> Fleet {
        let m = models_dir();
        let placements = format!(
            "[[placements]]\nname = \"smollm2\"\nreplicas = 1\npinned = true\naliases = [\"smol\"]\nmodel = {{ uri = \"file://{m}/SmolLM2-135M-Instruct.Q4_1.gguf\" }}\n\n\
             [[placements]]\nname = \"gemma3\"\nminReplicas = 0\ncontextLength = 2048\nmodel = {{ uri = \"file://{m}/gemma-3-270m-Q4_K_M.gguf\" }}\n",
            m = m.display()
        );
        Self::start_with(2, &[], extra_gateway_toml, &placements).await
    }

    /// `count` neurons started with `neuron_args`, the gateway with `extra_gateway_toml` under
    /// `[gateway]`, and `placements` as models.toml.
    pub async fn start_with(
        count: usize,
        neuron_args: &[&str],
        extra_gateway_toml: &str,
        placements: &str,
    ) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let mut neurons = Vec::new();
        for &p in &ports {
            neurons.push((p, Some(start_neuron(p, neuron_args))));
        }
        for &p in &ports {
            wait_healthy(&format!("http://127.0.0.1:{p}")).await;
        }
        let gport = free_port();
        let mport = free_port();
        let neuron_toml: String = ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "[[neurons]]\nname = \"n{}\"\nendpoint = \"http://127.0.0.1:{p}\"\n",
                    i + 1
                )
            })
            .collect();
        std::fs::write(
            dir.path().join("cortex.toml"),
            format!(
                "[gateway]\nlisten = \"127.0.0.1:{gport}\"\nmetrics_listen = \"127.0.0.1:{mport}\"\npoll_interval_secs = 0.2\n{extra_gateway_toml}\n{neuron_toml}"
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("models.toml"), placements).unwrap();
        let gateway = Proc(
            Command::new(env!("CARGO_BIN_EXE_cortex"))
                .args([
                    "serve",
                    "--config",
                    &dir.path().join("cortex.toml").display().to_string(),
                ])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let url = format!("http://127.0.0.1:{gport}");
        wait_healthy(&url).await;
        Fleet {
            _dir: dir,
            neurons,
            _gateway: gateway,
            url,
            metrics_url: format!("http://127.0.0.1:{mport}/metrics"),
            http: reqwest::Client::new(),
            key: None,
        }
    }

    /// The same fleet, its catalogue read with `key` (as `x-api-key`).
    pub fn with_key(mut self, key: &str) -> Fleet {
        self.key = Some(key.to_string());
        self
    }

    /// Sends `sig` to the `idx`th neuron's process.
    pub fn signal(&self, idx: usize, sig: &str) {
        signal(self.neurons[idx].1.as_ref().unwrap().0.id(), sig);
    }

    /// POSTs `body` as JSON to the gateway and hands back the response as it comes.
    pub async fn send(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.send(path, &body).await;
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// The gateway's `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(&self.metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `GET /v1/models`: every placement's served names with their state.
    pub async fn catalogue(&self) -> Vec<Value> {
        let mut rb = self.http.get(format!("{}/v1/models", self.url));
        if let Some(k) = &self.key {
            rb = rb.header("x-api-key", k);
        }
        let v: Value = rb.send().await.unwrap().json().await.unwrap();
        v["data"].as_array().unwrap().clone()
    }

    /// Waits (up to a minute) until `model`'s catalogue entry has `state`, and returns the entry.
    pub async fn wait_state(&self, model: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let cat = self.catalogue().await;
            let m = cat.iter().find(|m| m["id"] == model).unwrap().clone();
            if m["state"] == state {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "{model} never became {state}: {m}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Model loads a neuron reports in its metrics (successful ones).
    pub async fn loads_on(&self, port: u16, model: &str) -> u32 {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let prefix = format!(
            "cortex_neuron_model_loads_total{{model_name=\"{model}\",result=\"success\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.parse::<f64>().unwrap() as u32)
            .unwrap_or(0)
    }
}
