//! End-to-end, static mode: two real neuron processes and the real `cortex serve` on loopback,
//! real SmolLM2 and Gemma 3 weights (`scripts/fetch-test-models`).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn models_dir() -> PathBuf {
    let cache = std::env::var("CORTEX_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cortex"));
    let d = cache.join("models");
    for f in [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma-3-270m-Q4_K_M.gguf",
    ] {
        assert!(
            d.join(f).is_file(),
            "test model {f} is missing; run scripts/fetch-test-models first"
        );
    }
    d
}

/// The neuron binary, built beside this crate's binary by `cargo build --workspace`.
fn neuron_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_cortex")).with_file_name("neuron");
    assert!(
        p.is_file(),
        "{} is missing; run `cargo build --workspace` first",
        p.display()
    );
    p
}

async fn wait_healthy(url: &str) {
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

fn start_neuron(port: u16) -> Proc {
    Proc(
        Command::new(neuron_bin())
            .args(["--listen", &format!("127.0.0.1:{port}"), "--device", "cpu"])
            .args(["--model-dirs", &models_dir().display().to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

struct Fleet {
    _dir: tempfile::TempDir,
    neurons: Vec<(u16, Option<Proc>)>,
    _gateway: Proc,
    url: String,
    metrics_url: String,
    http: reqwest::Client,
}

impl Fleet {
    async fn start(extra_gateway_toml: &str) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let models = models_dir();
        let ports = [free_port(), free_port()];
        let mut neurons = Vec::new();
        for p in ports {
            neurons.push((p, Some(start_neuron(p))));
        }
        for p in ports {
            wait_healthy(&format!("http://127.0.0.1:{p}")).await;
        }
        let gport = free_port();
        let mport = free_port();
        std::fs::write(
            dir.path().join("cortex.toml"),
            format!(
                "[gateway]\nlisten = \"127.0.0.1:{gport}\"\nmetrics_listen = \"127.0.0.1:{mport}\"\npoll_interval_secs = 0.2\nload_timeout_secs = 60\n{extra_gateway_toml}\n\
                 [[neurons]]\nname = \"n1\"\nendpoint = \"http://127.0.0.1:{}\"\n[[neurons]]\nname = \"n2\"\nendpoint = \"http://127.0.0.1:{}\"\n",
                ports[0], ports[1]
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("models.toml"),
            format!(
                "[[placements]]\nname = \"smollm2\"\nreplicas = 1\npinned = true\naliases = [\"smol\"]\nmodel = {{ uri = \"file://{m}/SmolLM2-135M-Instruct.Q4_1.gguf\" }}\n\n\
                 [[placements]]\nname = \"gemma3\"\nminReplicas = 0\ncontextLength = 2048\nmodel = {{ uri = \"file://{m}/gemma-3-270m-Q4_K_M.gguf\" }}\n",
                m = models.display()
            ),
        )
        .unwrap();
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
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn catalogue(&self) -> Vec<Value> {
        let v: Value = self
            .http
            .get(format!("{}/v1/models", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["data"].as_array().unwrap().clone()
    }

    async fn wait_state(&self, model: &str, state: &str) -> Value {
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
    async fn loads_on(&self, port: u16, model: &str) -> u32 {
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

fn chat(model: &str, prompt: &str) -> Value {
    json!({"model": model, "temperature": 0, "max_tokens": 30, "messages": [{"role": "user", "content": prompt}]})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_static_fleet_serves_loads_on_demand_and_survives_a_dead_neuron() {
    let mut fleet = Fleet::start("").await;
    // The pinned placement is loaded at start; the scale-to-zero one is listed but not loaded.
    let smol = fleet.wait_state("smollm2", "ready").await;
    assert_eq!(smol["loaded_on"].as_array().unwrap().len(), 1);
    let cat = fleet.catalogue().await;
    let ids: Vec<&str> = cat.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["smollm2", "smol", "gemma3"]);
    assert_eq!(cat[2]["state"], "not_loaded");

    let (s, body) = fleet
        .post(
            "/v1/chat/completions",
            chat(
                "smol",
                "What is the capital of France? Answer in one sentence.",
            ),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{body}"
    );

    // Three concurrent requests for the cold model cause one load.
    let ask = json!({"model": "gemma3", "prompt": "Question: What is the capital of France?\nAnswer:", "max_tokens": 5, "temperature": 0, "stop": ["\n"]});
    let results =
        futures::future::join_all((0..3).map(|_| fleet.post("/v1/completions", ask.clone()))).await;
    for (s, body) in &results {
        assert_eq!(*s, 200, "{body}");
        assert_eq!(body["choices"][0]["text"].as_str().unwrap().trim(), "Paris");
    }
    let ports: Vec<u16> = fleet.neurons.iter().map(|(p, _)| *p).collect();
    let mut loads = 0;
    for p in &ports {
        loads += fleet.loads_on(*p, "gemma3").await;
    }
    assert_eq!(loads, 1, "concurrent cold requests must share one load");

    // Unknown models get OpenAI's not-found error.
    let (s, body) = fleet
        .post("/v1/chat/completions", chat("gpt-9", "hi"))
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );

    // Kill the neuron holding smollm2: the next request loads it on the other one and answers.
    let holder = smol["loaded_on"][0]["neuron"].as_str().unwrap().to_string();
    let idx = if holder == "n1" { 0 } else { 1 };
    fleet.neurons[idx].1.take();
    let (s, body) = fleet
        .post(
            "/v1/chat/completions",
            chat(
                "smollm2",
                "What is the capital of France? Answer in one sentence.",
            ),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris")
    );
    let smol = fleet.wait_state("smollm2", "ready").await;
    assert_ne!(smol["loaded_on"][0]["neuron"].as_str().unwrap(), holder);

    // A streamed request passes the neuron's stream through to the end.
    let res = fleet
        .http
        .post(format!("{}/v1/chat/completions", fleet.url))
        .json(&json!({"model": "smollm2", "stream": true, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    let mut s = res.bytes_stream();
    while let Some(c) = s.next().await {
        text.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // The gateway's metrics saw all of it.
    let m = reqwest::get(&fleet.metrics_url).await.unwrap().text().await.unwrap();
    for series in [
        "cortex_gateway_requests_total{model=\"gemma3\",neuron=",
        "dialect=\"openai\",status_class=\"2xx\"}",
        "cortex_gateway_cold_loads_total{model=\"gemma3\",result=\"success\"} 1",
        "cortex_gateway_cold_load_duration_seconds_count{model=\"gemma3\"} 1",
        "cortex_gateway_time_to_first_token_seconds_bucket{",
        "cortex_gateway_e2e_request_latency_seconds_count{model=\"smollm2\"",
        "cortex_gateway_in_flight_requests{model=\"smollm2\"} 0",
        &format!("cortex_gateway_neuron_up{{neuron=\"{holder}\"}} 0"),
    ] {
        assert!(m.contains(series), "missing {series} in\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_are_required_when_configured() {
    let fleet = Fleet::start("api_keys = [\"sk-test\"]").await;
    let r = fleet
        .http
        .get(format!("{}/v1/models", fleet.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
    for (h, v) in [
        ("authorization", "Bearer sk-test"),
        ("x-api-key", "sk-test"),
    ] {
        let r = fleet
            .http
            .get(format!("{}/v1/models", fleet.url))
            .header(h, v)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{h}");
    }
    let r = fleet
        .http
        .get(format!("{}/v1/models", fleet.url))
        .header("x-api-key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
