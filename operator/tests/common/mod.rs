//! Shared by the operator's tests: real neuron and operator processes on loopback, waiting, and
//! reading neurons and metrics.
#![allow(dead_code)]

pub mod chart;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cortex_core::crd::ModelPlacement;
use cortex_testkit::ControlPlane;
use kube::Api;
use serde_json::Value;

pub const TOKEN: &str = "e2e-neuron-token";

pub use cortex_testkit::{Proc, models_dir};

pub fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_cortex-operator")).with_file_name(name);
    assert!(
        p.is_file(),
        "{} is missing; run `cargo build --workspace` first",
        p.display()
    );
    p
}

pub fn python() -> PathBuf {
    let p = cortex_testkit::cache_dir().join("venv/bin/python");
    assert!(
        p.is_file(),
        "{} is missing; run scripts/python-env first (it installs the openai SDK)",
        p.display()
    );
    p
}

pub fn start_neuron(port: u16, extra: &[&str]) -> Proc {
    models_dir();
    Proc(
        cortex_testkit::neuron(&bin("neuron"), port)
            .args(["--token", TOKEN])
            .args(extra)
            .spawn()
            .unwrap(),
    )
}

/// The operator, without pod discovery unless `extra` turns it on.
pub fn start_operator(
    cp: &ControlPlane,
    metrics_port: u16,
    identity: &str,
    extra: &[&str],
) -> Proc {
    Proc(
        Command::new(bin("cortex-operator"))
            .env("KUBECONFIG", &cp.kubeconfig)
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--neuron-token", TOKEN, "--poll-interval", "0.5"])
            .args(["--lease-seconds", "4", "--identity", identity])
            .args(if extra.is_empty() {
                &["--neuron-pods", ""][..]
            } else {
                extra
            })
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(cp.dir().join(format!("operator-{identity}.log"))).unwrap(),
            )
            .spawn()
            .unwrap(),
    )
}

pub async fn wait_until<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f().await {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => panic!("{what}: not after {secs}s: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

pub async fn get(url: &str) -> Option<Value> {
    let r = reqwest::Client::new()
        .get(url)
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// The ids a neuron lists, with their state.
pub async fn neuron_models(port: u16) -> Vec<(String, String, Option<u64>)> {
    let v = get(&format!("http://127.0.0.1:{port}/models"))
        .await
        .unwrap_or(Value::Null);
    v["data"]
        .as_array()
        .or(v.as_array())
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or_default().to_string(),
                m["state"].as_str().unwrap_or_default().to_string(),
                m["loadedAt"].as_u64(),
            )
        })
        .collect()
}

pub async fn scrape(port: u16, metric: &str) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(metric))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn placement(api: &Api<ModelPlacement>, name: &str) -> Option<ModelPlacement> {
    api.get_opt(name).await.ok().flatten()
}

/// Applies the CRDs from `crds/` and waits until the API server serves them.
pub fn install_crds(cp: &ControlPlane) {
    cp.kubectl_ok(&[
        "apply",
        "-f",
        cortex_testkit::workspace_root()
            .join("crds")
            .to_str()
            .unwrap(),
    ]);
    cp.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/modelplacements.cortex.helexa.io",
        "crd/neurons.cortex.helexa.io",
        "--timeout=60s",
    ]);
}

/// Writes `yaml` beside the control plane's files and applies it with kubectl.
pub fn apply(cp: &ControlPlane, name: &str, yaml: &str) {
    let f = cp.dir().join(format!("{name}.yaml"));
    std::fs::write(&f, yaml).unwrap();
    cp.kubectl_ok(&["apply", "-f", f.to_str().unwrap()]);
}

/// A ModelPlacement of the SmolLM2 test model named `name`, with `extra` spec lines.
pub fn smollm2_placement(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: cortex.helexa.io/v1alpha1\nkind: ModelPlacement\nmetadata:\n  name: {name}\nspec:\n{extra}  model:\n    uri: file://{}/SmolLM2-135M-Instruct.Q4_1.gguf\n",
        models_dir().display()
    )
}

/// A Neuron for a host outside the cluster.
pub fn neuron_yaml(name: &str, port: u16) -> String {
    format!(
        "apiVersion: cortex.helexa.io/v1alpha1\nkind: Neuron\nmetadata:\n  name: {name}\nspec:\n  endpoint: http://127.0.0.1:{port}\n"
    )
}

/// The chart under test.
pub fn chart() -> PathBuf {
    cortex_testkit::workspace_root().join("helm/cortex")
}

/// `helm` from `scripts/envtest-assets`, with its caches and settings in `home` (never the
/// user's), talking to `cp` when given.
pub fn helm(home: &std::path::Path, cp: Option<&ControlPlane>) -> Command {
    let mut c = Command::new(cortex_testkit::assets().join("helm"));
    for (var, dir) in [
        ("HELM_CACHE_HOME", "cache"),
        ("HELM_CONFIG_HOME", "config"),
        ("HELM_DATA_HOME", "data"),
    ] {
        c.env(var, home.join(dir));
    }
    match cp {
        Some(cp) => c.env("KUBECONFIG", &cp.kubeconfig),
        None => c.env("KUBECONFIG", home.join("no-cluster")),
    };
    c
}

/// Runs `cmd`; panics with the command line and its output unless it succeeds; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `helm template` of the chart as release `cortex` in namespace `cortex`, with `args` (values
/// files, `--set`), parsed into its objects.
pub fn render_chart(home: &std::path::Path, args: &[&str]) -> Vec<serde_yaml::Value> {
    let out = run_ok(
        helm(home, None)
            .args(["template", "cortex"])
            .arg(chart())
            .args(["--namespace", "cortex"])
            .args(args),
    );
    serde_yaml::Deserializer::from_str(&out)
        .map(|d| {
            <serde_yaml::Value as serde::Deserialize>::deserialize(d)
                .expect("helm template printed YAML")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The objects of `kind` among `objects`.
pub fn of_kind<'a>(objects: &'a [serde_yaml::Value], kind: &str) -> Vec<&'a serde_yaml::Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// A Debian-packaged tool (`promtool`, `prometheus`); fails naming the package when missing.
pub fn debian_tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("{name} is missing; install it with: apt-get install prometheus (scripts/test does)")
    })
}
