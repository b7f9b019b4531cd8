//! `cortex probe` end to end: the real `cortex` binary against real neuron processes (and a real
//! gateway) on loopback, with the real SmolLM2 weights from `scripts/fetch-test-models`. Each
//! failure case checks that the probe prints what the neuron answered and exits non-zero.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{Proc, free_port, models_dir, neuron_bin, start_neuron, wait_healthy};

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const REPO: &str = "test-org/SmolLM2-135M-Instruct-GGUF";

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cortex probe ARGS`, bounded so that a hang fails the test instead of stalling it.
async fn probe(args: &[&str]) -> Outcome {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cortex"))
        .arg("probe")
        .args(args)
        .env_remove("CORTEX_NEURON_TOKEN")
        .env_remove("CORTEX_API_KEY")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output())
        .await
        .expect("cortex probe finished within 300 s")
        .unwrap();
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn neuron(extra: &[&str]) -> (Proc, String) {
    let port = free_port();
    let p = start_neuron(port, extra);
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(&url).await;
    (p, url)
}

fn smollm2_uri() -> String {
    format!("file://{}", models_dir().join(SMOLLM2).display())
}

/// A Hugging Face cache holding `REPO` with the real SmolLM2 file as its only GGUF, for a neuron
/// started with `HF_HUB_OFFLINE=1` (the hub itself is unreachable from CI).
fn offline_hub(home: &Path) {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home
        .join("hub")
        .join(format!("models--{}", REPO.replace('/', "--")));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::os::unix::fs::symlink(models_dir().join(SMOLLM2), snap.join(SMOLLM2)).unwrap();
}

fn assert_answered(o: &Outcome) {
    assert_eq!(o.code, Some(0), "{o}");
    assert!(o.stdout.contains("Paris"), "{o}");
    assert!(
        o.stdout.contains("TTFT ") && o.stdout.contains(" tok/s"),
        "{o}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn probing_a_neuron_loads_the_file_and_prints_the_answer_ttft_and_speed() {
    let (_n, url) = neuron(&[]).await;
    let uri = smollm2_uri();
    let o = probe(&["--neuron", &url, "--model", &uri, "--max-tokens", "20"]).await;
    assert_answered(&o);
    assert!(
        o.stderr.contains("loading 'SmolLM2-135M-Instruct.Q4_1'"),
        "{o}"
    );
    assert!(o.stderr.contains("ready in"), "{o}");
    // The model stays loaded under the id derived from the file's stem.
    let m: serde_json::Value = reqwest::get(format!("{url}/models/SmolLM2-135M-Instruct.Q4_1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["state"], "ready", "{m}");

    // Probing again finds it ready (loading twice is harmless), and --unload leaves the neuron empty.
    let o = probe(&[
        "--neuron",
        &url,
        "--model",
        &uri,
        "--max-tokens",
        "20",
        "--unload",
    ])
    .await;
    assert_answered(&o);
    let s = reqwest::get(format!("{url}/models/SmolLM2-135M-Instruct.Q4_1"))
        .await
        .unwrap()
        .status();
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_quant_prints_the_quants_the_repository_has_and_fails() {
    let hf = tempfile::tempdir().unwrap();
    offline_hub(hf.path());
    let port = free_port();
    let _n = Proc(
        std::process::Command::new(neuron_bin())
            .args(["--listen", &format!("127.0.0.1:{port}"), "--device", "cpu"])
            .args(["--model-dirs", &models_dir().display().to_string()])
            .env("HF_HOME", hf.path())
            .env("HF_HUB_OFFLINE", "1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(&url).await;

    let o = probe(&["--neuron", &url, "--model", &format!("{REPO}:Q8_0")]).await;
    assert_eq!(o.code, Some(1), "{o}");
    assert!(
        o.stderr.contains(&format!(
            "no GGUF file matching quant Q8_0 in {REPO}; available: Q4_1"
        )),
        "{o}"
    );
    assert!(o.stderr.contains("\"state\":\"failed\""), "{o}");
    assert!(o.stdout.is_empty(), "{o}");

    // The quant the repository has resolves, loads and answers.
    let o = probe(&[
        "--neuron",
        &url,
        "--model",
        &format!("{REPO}:Q4_1"),
        "--max-tokens",
        "20",
    ])
    .await;
    assert_answered(&o);
    assert!(o.stderr.contains("downloading"), "{o}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_token_or_a_missing_file_prints_the_status_and_body_and_fails() {
    let (_n, url) = neuron(&["--token", "s3cret"]).await;
    let missing = format!("file://{}", models_dir().join("nope.gguf").display());

    let o = probe(&["--neuron", &url, "--model", &missing]).await;
    assert_eq!(o.code, Some(1), "{o}");
    assert!(
        o.stderr
            .contains(&format!("GET {url}/status answered 401 Unauthorized")),
        "{o}"
    );
    assert!(o.stderr.contains("\"code\":\"invalid_api_key\""), "{o}");

    let o = probe(&["--neuron", &url, "--model", &missing, "--token", "s3cret"]).await;
    assert_eq!(o.code, Some(1), "{o}");
    assert!(
        o.stderr
            .contains(&format!("POST {url}/models/load answered 400 Bad Request")),
        "{o}"
    );
    assert!(o.stderr.contains("nope.gguf"), "{o}");
    assert!(o.stderr.contains("\"param\":\"source.uri\""), "{o}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_neuron_is_named_with_what_to_check() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let o = probe(&["--neuron", &url, "--model", &smollm2_uri()]).await;
    assert_eq!(o.code, Some(1), "{o}");
    assert!(
        o.stderr
            .contains(&format!("cannot reach the neuron at {url}/status")),
        "{o}"
    );
    assert!(o.stderr.contains("Connection refused"), "{o}");
    assert!(o.stderr.contains("systemctl status neuron"), "{o}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_does_not_fit_prints_the_409_with_both_sizes() {
    let (_n, url) = neuron(&["--max-memory", "250000000"]).await;
    let uri = smollm2_uri();
    let o = probe(&["--neuron", &url, "--model", &uri]).await;
    assert_eq!(o.code, Some(1), "{o}");
    assert!(
        o.stderr
            .contains(&format!("POST {url}/models/load answered 409 Conflict")),
        "{o}"
    );
    assert!(
        o.stderr.contains("needs") && o.stderr.contains("250000000 bytes"),
        "{o}"
    );
    assert!(
        o.stderr.contains("\"needed_bytes\":") && o.stderr.contains("\"free_bytes\":250000000"),
        "{o}"
    );

    // The message's advice works: a smaller context fits.
    let o = probe(&[
        "--neuron",
        &url,
        "--model",
        &uri,
        "--context-length",
        "256",
        "--max-tokens",
        "20",
    ])
    .await;
    assert_answered(&o);
}

#[tokio::test(flavor = "multi_thread")]
async fn probing_a_gateway_skips_the_load_and_asks_with_the_api_key() {
    let placements = format!(
        "[[placements]]\nname = \"smollm2\"\nminReplicas = 0\nmodel = {{ uri = \"{}\" }}\n\n\
         [[placements]]\nname = \"broken\"\nminReplicas = 0\nmodel = {{ uri = \"file://{}\" }}\n",
        smollm2_uri(),
        models_dir().join("nope.gguf").display()
    );
    let fleet = common::Fleet::start_with(1, &[], "api_keys = [\"sk-probe\"]", &placements).await;

    let o = probe(&["--gateway", &fleet.url, "--model", "smollm2"]).await;
    assert_eq!(o.code, Some(1), "{o}");
    assert!(o.stderr.contains("answered 401 Unauthorized"), "{o}");

    let o = probe(&[
        "--gateway",
        &fleet.url,
        "--model",
        "gpt-9",
        "--api-key",
        "sk-probe",
    ])
    .await;
    assert_eq!(o.code, Some(1), "{o}");
    assert!(o.stderr.contains("answered 404 Not Found"), "{o}");
    assert!(o.stderr.contains("\"code\":\"model_not_found\""), "{o}");

    // A placement the neuron cannot load: the gateway's error event carries the neuron's answer.
    let o = probe(&[
        "--gateway",
        &fleet.url,
        "--model",
        "broken",
        "--api-key",
        "sk-probe",
    ])
    .await;
    assert_eq!(o.code, Some(1), "{o}");
    assert!(
        o.stderr.contains("400 Bad Request") && o.stderr.contains("nope.gguf"),
        "{o}"
    );

    // The model is not loaded: the gateway loads it for this request.
    let o = probe(&[
        "--gateway",
        &fleet.url,
        "--model",
        "smollm2",
        "--api-key",
        "sk-probe",
        "--max-tokens",
        "20",
    ])
    .await;
    assert_answered(&o);
    assert!(!o.stderr.contains("/models/load"), "{o}");
}

#[test]
fn the_packaged_sample_configuration_loads() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/cortex.toml");
    let (cfg, placements) = cortex_gateway::config::load(&cfg).unwrap();
    assert_eq!(cfg.neurons.len(), 1);
    assert!(placements.is_empty());
}
