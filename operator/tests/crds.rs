//! The CRDs: `crds/` matches the code, and the real API server accepts them, serves their printer
//! columns, short name and scale subresource, and rejects bad objects with the schema's message.

use cortex_testkit::{ControlPlane, workspace_root};

#[test]
fn crds_dir_matches_the_code() {
    let path = workspace_root().join("crds/cortex.helexa.io.yaml");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == cortex_operator::crds_yaml(),
        "{} differs from the CRD types; regenerate it with: cargo run -p cortex-operator -- crds > crds/cortex.helexa.io.yaml",
        path.display()
    );
}

fn apply(cp: &ControlPlane, yaml: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = cp
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn placement(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: cortex.helexa.io/v1alpha1\nkind: ModelPlacement\nmetadata:\n  name: {name}\nspec:\n{spec}"
    )
}

#[tokio::test]
async fn the_api_server_accepts_the_crds_and_enforces_their_schema() {
    let cp = ControlPlane::start().await;
    let crds = workspace_root().join("crds");
    cp.kubectl_ok(&["apply", "-f", crds.to_str().unwrap()]);
    cp.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/modelplacements.cortex.helexa.io",
        "crd/neurons.cortex.helexa.io",
        "--timeout=60s",
    ]);

    // Good objects are accepted; replicas defaults to 1.
    let ok = apply(
        &cp,
        &placement(
            "smollm2",
            "  model:\n    uri: file:///var/lib/cortex/models/SmolLM2-135M-Instruct.Q4_1.gguf\n  pinned: true\n",
        ),
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let ok = apply(
        &cp,
        &placement(
            "qwen3",
            "  model:\n    repo: unsloth/Qwen3-0.6B-GGUF\n    quant: Q4_K_M\n  minReplicas: 0\n  idleTimeout: 600\n  device: cuda\n  neuronSelector:\n    matchLabels:\n      gpu: a100\n",
        ),
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(
        cp.kubectl_ok(&["get", "mp", "smollm2", "-o", "jsonpath={.spec.replicas}"]),
        "1"
    );
    let table = cp.kubectl_ok(&["get", "modelplacements"]);
    for col in ["SERVED", "REPLICAS", "READY", "PHASE", "AGE"] {
        assert!(
            table.contains(col),
            "printer column {col} missing:\n{table}"
        );
    }
    // The scale subresource works (kubectl scale goes through it).
    cp.kubectl_ok(&["scale", "mp/qwen3", "--replicas=3"]);
    assert_eq!(
        cp.kubectl_ok(&["get", "mp", "qwen3", "-o", "jsonpath={.spec.replicas}"]),
        "3"
    );

    // Bad objects are refused by the API server, with a message that says what is wrong.
    let cases = [
        (
            "  model:\n    uri: file:///a.gguf\n    repo: x/y\n",
            "exactly one of uri or repo",
        ),
        ("  model: {}\n", "exactly one of uri or repo"),
        ("  replicas: 1\n", "spec.model: Required value"),
        (
            "  model:\n    repo: x/y\n    quant: Q4_0\n    file: a.gguf\n",
            "quant or file, not both",
        ),
        ("  model:\n    repo: x/y\n  replicas: -1\n", "spec.replicas"),
        ("  model:\n    repo: x/y\n  device: tpu\n", "spec.device"),
        (
            "  model:\n    uri: file:///a.gguf\n    quant: Q4_0\n",
            "go with repo, not uri",
        ),
        (
            "  model:\n    repo: x/y\n  color: red\n",
            "unknown field \"spec.color\"",
        ),
    ];
    for (i, (spec, want)) in cases.iter().enumerate() {
        let out = apply(&cp, &placement(&format!("bad-{i}"), spec));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} was accepted:\n{spec}");
        assert!(err.contains(want), "case {i}: wanted {want:?} in:\n{err}");
    }

    // Neurons are cluster-scoped and need an http(s) endpoint.
    let neuron = |name: &str, endpoint: &str| {
        format!(
            "apiVersion: cortex.helexa.io/v1alpha1\nkind: Neuron\nmetadata:\n  name: {name}\nspec:\n  endpoint: {endpoint}\n"
        )
    };
    let ok = apply(&cp, &neuron("beast", "http://beast.internal:13131"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let bad = apply(&cp, &neuron("typo", "beast.internal:13131"));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("spec.endpoint"));
    let table = cp.kubectl_ok(&["get", "neurons"]);
    for col in ["ENDPOINT", "READY", "DEVICES", "FREE", "MODELS"] {
        assert!(
            table.contains(col),
            "printer column {col} missing:\n{table}"
        );
    }
}
