//! `cortex status` and `cortex models`, the real binary against a real static fleet: one neuron
//! with SmolLM2 loaded and Gemma 3 listed but not loaded, behind an API key; and `cortex status`
//! for a neuron with several devices.

mod common;

use common::{Fleet, models_dir};
use cortex_core::neuron::{DeviceInfo, ModelInfo, ModelSource, ModelState, NeuronStatus};
use serde_json::Value;

fn cortex(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cortex"))
        .args(args)
        .env_remove("CORTEX_GATEWAY")
        .env_remove("CORTEX_API_KEY")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The cells of a table line (split on runs of two or more spaces, so a device name's single
/// spaces stay in its cell).
fn cells(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_models_print_the_fleet_and_the_catalogue() {
    let m = models_dir();
    let placements = format!(
        "[[placements]]\nname = \"smollm2\"\nreplicas = 1\npinned = true\naliases = [\"smol\"]\nmodel = {{ uri = \"file://{m}/SmolLM2-135M-Instruct.Q4_1.gguf\" }}\n\n\
         [[placements]]\nname = \"gemma3\"\nminReplicas = 0\nmodel = {{ uri = \"file://{m}/gemma-3-270m-Q4_K_M.gguf\" }}\n",
        m = m.display()
    );
    // A memory cap makes the neuron's free memory its own, steady figure.
    let fleet = Fleet::start_with(
        1,
        &["--max-memory", "3000000000"],
        "api_keys = [\"sk-cli\"]",
        &placements,
    )
    .await
    .with_key("sk-cli");
    fleet.wait_state("smollm2", "ready").await;

    // Without the key: a clear error, no table.
    let (ok, out, err) = cortex(&["status", "--gateway", &fleet.url]);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("401") && err.contains("API key"), "{err}");

    let (ok, out, err) = cortex(&["status", "--gateway", &fleet.url, "--api-key", "sk-cli"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        cells(lines[0]),
        [
            "NEURON", "ENDPOINT", "UP", "DEVICE", "FREE", "TOTAL", "INFLIGHT"
        ]
    );
    // The neuron's own status says what the line must show.
    let port = fleet.neurons[0].0;
    let st = common::neuron_status(port).await;
    let devices = st["devices"].as_array().unwrap();
    assert_eq!(lines.len(), 1 + devices.len() + 1, "{out}");
    let row = cells(lines[1]);
    assert_eq!(
        row[..3],
        ["n1", format!("http://127.0.0.1:{port}").as_str(), "yes"]
    );
    let cpu = devices.last().unwrap();
    assert_eq!(cpu["kind"], "cpu");
    assert!(row[3].starts_with("cpu "), "{out}");
    // FREE, TOTAL and INFLIGHT close the line (a CPU's name may hold runs of spaces).
    let [free, total, inflight] = &row[row.len() - 3..] else {
        unreachable!()
    };
    assert_eq!(*total, gib(cpu["memoryTotal"].as_u64().unwrap()));
    assert_eq!(*total, gib(3_000_000_000));
    // Free: the cap less what SmolLM2 holds.
    let held = st["models"][0]["bytes"].as_u64().unwrap();
    assert!(held > 50_000_000, "{st}");
    assert_eq!(*free, gib(3_000_000_000 - held), "{out}");
    assert_eq!(*free, gib(cpu["memoryFree"].as_u64().unwrap()));
    assert_eq!(inflight, "0");
    let model = cells(lines[2].trim_start_matches("  └ "));
    assert_eq!(model[0], "smollm2");
    assert_eq!(model[1], "ready");
    assert_eq!(model[2], gib(held));

    let (ok, out, err) = cortex(&["models", "--gateway", &fleet.url, "--api-key", "sk-cli"]);
    assert!(ok, "{err}");
    let table: Vec<Vec<String>> = out.lines().map(cells).collect();
    assert_eq!(
        table,
        [
            vec!["MODEL", "STATE", "PINNED", "LOADED ON"],
            vec!["smollm2", "ready", "true", "n1 (ready)"],
            vec!["smol", "ready", "true", "n1 (ready)"],
            vec!["gemma3", "not_loaded", "false", "-"],
        ]
    );

    // A gateway that is not there: says where it looked and what to start.
    let (ok, _, err) = cortex(&["models", "--gateway", "http://127.0.0.1:9"]);
    assert!(!ok);
    assert!(
        err.contains("cannot reach the gateway at http://127.0.0.1:9")
            && err.contains("cortex serve"),
        "{err}"
    );
}

fn device(kind: &str, index: u32, name: &str, total_gib: u64, free_gib: u64) -> DeviceInfo {
    DeviceInfo {
        index,
        name: name.into(),
        kind: kind.into(),
        memory_total: total_gib << 30,
        memory_free: free_gib << 30,
    }
}

/// A stand-in neuron that answers only `GET /status` with `status`, on a free loopback port;
/// its URL. A real neuron reports GPUs only from the `cuda` build through NVML, so no neuron on a
/// machine without GPUs can report several devices: this is the one fleet member the tests fake.
async fn status_only_neuron(status: NeuronStatus) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/status",
        axum::routing::get(move || {
            let s = status.clone();
            async move { axum::Json(s) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test(flavor = "multi_thread")]
async fn status_prints_a_line_for_every_device_of_a_neuron_with_several() {
    // As a `cuda` neuron on a host with two GPUs reports them: the GPUs, then the host's CPU.
    let status = NeuronStatus {
        node: "gpu-box".into(),
        version: "0.1.0".into(),
        devices: vec![
            device("cuda", 0, "NVIDIA H200", 141, 100),
            device("cuda", 1, "NVIDIA H200", 141, 7),
            device("cpu", 0, "AMD EPYC 9654 96-Core Processor", 1024, 900),
        ],
        models: vec![ModelInfo {
            id: "qwen3-32b".into(),
            state: ModelState::Ready,
            progress: 1.0,
            source: ModelSource::Repo {
                repo: "unsloth/Qwen3-32B-GGUF".into(),
                quant: Some("Q4_K_M".into()),
                file: None,
                revision: None,
                tokenizer_repo: None,
            },
            bytes: 34 << 30,
            device: "cuda:1".into(),
            architecture: Some("qwen3".into()),
            context_length: 32768,
            error: None,
            loaded_at: None,
            last_used_at: None,
            inflight: 2,
            queued: 1,
            kv_cache_bytes: 8 << 30,
            kv_cache_used_bytes: 1 << 30,
            prefix_cache_bytes: 0,
            prefix_cache_used_bytes: 0,
        }],
        inflight: 2,
        queued: 1,
    };
    let url = status_only_neuron(status).await;
    // No real neurons; the stand-in joins as a [[neurons]] table, and nothing is to be loaded.
    let fleet = Fleet::start_with(
        0,
        &[],
        &format!("[[neurons]]\nname = \"gpu-box\"\nendpoint = \"{url}\"\n"),
        &format!(
            "[[placements]]\nname = \"smollm2\"\nminReplicas = 0\nmodel = {{ uri = \"file://{}/SmolLM2-135M-Instruct.Q4_1.gguf\" }}\n",
            models_dir().display()
        ),
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let v: Value = reqwest::get(format!("{}/cortex/fleet", fleet.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["neurons"][0]["up"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never up: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let (ok, out, err) = cortex(&["status", "--gateway", &fleet.url]);
    assert!(ok, "{err}");
    let table: Vec<Vec<String>> = out.lines().map(cells).collect();
    let [g7, g34, g100, g141, g900, g1024] = [7, 34, 100, 141, 900, 1024].map(|n| gib(n << 30));
    assert_eq!(
        table[..4],
        [
            vec![
                "NEURON", "ENDPOINT", "UP", "DEVICE", "FREE", "TOTAL", "INFLIGHT"
            ],
            // The neuron's own columns and its in-flight count on its first device's line only.
            vec![
                "gpu-box",
                &url,
                "yes",
                "cuda:0 NVIDIA H200",
                &g100,
                &g141,
                "2"
            ],
            vec!["cuda:1 NVIDIA H200", &g7, &g141],
            vec!["cpu AMD EPYC 9654 96-Core Processor", &g900, &g1024],
        ],
        "{out}"
    );
    // Each further device's line leaves the neuron's columns empty.
    assert!(out.lines().nth(2).unwrap().starts_with("      "), "{out}");
    let model = cells(out.lines().nth(4).unwrap().trim_start_matches("  └ "));
    assert_eq!(
        model,
        ["qwen3-32b", "ready", &g34, "in-flight 2", "queued 1"],
        "{out}"
    );
    assert_eq!(table.len(), 5, "{out}");
}
