//! `cortex status` and `cortex models`, the real binary against a real static fleet: one neuron
//! with SmolLM2 loaded and Gemma 3 listed but not loaded, behind an API key.

mod common;

use common::{Fleet, models_dir};
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
    let st: Value = reqwest::get(format!("http://127.0.0.1:{port}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
