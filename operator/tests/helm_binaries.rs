//! The real operator, gateway and neuron run with the Helm chart's command lines and its
//! ServiceAccount tokens, on a real API server, through a whole placement life.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;
use cortex_testkit::{ControlPlane, free_port};

/// A kubeconfig for `cp` that authenticates with `token`.
fn kubeconfig_with_token(cp: &ControlPlane, name: &str, token: &str) -> PathBuf {
    let path = cp.dir().join(format!("{name}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\ncurrent-context: test\n",
            cp.url
        ),
    )
    .unwrap();
    path
}

/// The args of a workload's first container as installed, with `--flag=` values replaced.
fn installed_args(cp: &ControlPlane, what: &str, replace: &[(&str, String)]) -> Vec<String> {
    let json = cp.kubectl_ok(&[
        "get",
        what,
        "-n",
        "cortex",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].args}",
    ]);
    let args: Vec<String> = serde_json::from_str(&json).unwrap();
    args.into_iter()
        .map(|a| {
            for (flag, value) in replace {
                if a.starts_with(&format!("{flag}=")) {
                    return format!("{flag}={value}");
                }
            }
            a
        })
        .collect()
}

/// The plain `value:` environment variables of a workload's first container.
fn installed_env(cp: &ControlPlane, what: &str) -> Vec<(String, String)> {
    let json = cp.kubectl_ok(&[
        "get",
        what,
        "-n",
        "cortex",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].env}",
    ]);
    let env: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    env.iter()
        .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
        .collect()
}

async fn chat(gateway: &str, model: &str) -> Result<String, String> {
    let r = reqwest::Client::new()
        .post(format!("{gateway}/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": model,
            "max_tokens": 12,
            "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        }))
        .timeout(std::time::Duration::from_secs(120))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let body: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    Ok(body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_run_with_the_charts_command_lines_and_service_accounts() {
    let cp = ControlPlane::start().await;
    let home = cp.dir().join("helm");
    let notes = run_ok(
        helm(&home, Some(&cp))
            .args(["install", "cortex"])
            .arg(chart())
            .args(["-n", "cortex", "--create-namespace"])
            .args(["--set", "neuron.gpu.enabled=false"]),
    );
    for want in [
        "kubectl -n cortex port-forward svc/cortex-gateway 31313",
        "http://cortex-gateway.cortex.svc:31313/v1",
        "WARNING: gateway.apiKeys.existingSecret is empty",
    ] {
        assert!(notes.contains(want), "NOTES.txt lacks {want:?}:\n{notes}");
    }
    cp.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/modelplacements.cortex.helexa.io",
        "crd/neurons.cortex.helexa.io",
        "--timeout=60s",
    ]);
    // The token the chart generated, as the pods read it from the Secret.
    let token = cp.kubectl_ok(&[
        "get",
        "secret",
        "cortex-neuron-token",
        "-n",
        "cortex",
        "-o",
        "go-template={{.data.token | base64decode}}",
    ]);
    assert_eq!(token.len(), 48, "{token}");

    // The neuron, with the DaemonSet's arguments (address and model directory made local).
    let nport = free_port();
    let nargs = installed_args(
        &cp,
        "daemonset/cortex-neuron",
        &[
            ("--listen", format!("127.0.0.1:{nport}")),
            ("--model-dirs", models_dir().display().to_string()),
        ],
    );
    assert!(nargs.contains(&"--device=cpu".to_string()), "{nargs:?}");
    let log = |name: &str| std::fs::File::create(cp.dir().join(name)).unwrap();
    let _neuron = Proc(
        Command::new(bin("neuron"))
            .args(&nargs)
            .envs(installed_env(&cp, "daemonset/cortex-neuron"))
            .env("HF_HOME", cp.dir().join("hf"))
            .env("HOME", cp.dir())
            .env("CORTEX_NEURON_TOKEN", &token)
            .env("CORTEX_NODE_NAME", "gpu-node-1")
            .stdout(Stdio::null())
            .stderr(log("neuron.log"))
            .spawn()
            .unwrap(),
    );

    // A neuron pod as the DaemonSet would make it (no kubelet runs here), with the template's labels.
    let labels: BTreeMap<String, String> = serde_json::from_str(&cp.kubectl_ok(&[
        "get",
        "daemonset/cortex-neuron",
        "-n",
        "cortex",
        "-o",
        "jsonpath={.spec.template.metadata.labels}",
    ]))
    .unwrap();
    let labels: String = labels
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    let pod = cp.dir().join("pod.yaml");
    std::fs::write(
        &pod,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: cortex-neuron-x1\n  namespace: cortex\n  labels:\n{labels}spec:\n  nodeName: gpu-node-1\n  containers:\n  - name: neuron\n    image: ghcr.io/helexa/cortex-neuron:0.1.0\n"
        ),
    )
    .unwrap();
    cp.kubectl_ok(&["apply", "-f", pod.to_str().unwrap()]);
    cp.kubectl_ok(&[
        "patch",
        "pod",
        "cortex-neuron-x1",
        "-n",
        "cortex",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running","podIP":"127.0.0.1","podIPs":[{"ip":"127.0.0.1"}]}}"#,
    ]);

    // The operator and the gateway: the Deployments' arguments, their ServiceAccounts' tokens.
    let sa_token = |sa: &str| {
        cp.kubectl_ok(&["create", "token", sa, "-n", "cortex", "--duration=1h"])
            .trim()
            .to_string()
    };
    let op_port = free_port();
    let op_args = installed_args(
        &cp,
        "deployment/cortex-operator",
        &[
            ("--metrics-listen", format!("127.0.0.1:{op_port}")),
            ("--neuron-port", nport.to_string()),
        ],
    );
    let _operator = Proc(
        Command::new(bin("cortex-operator"))
            .args(&op_args)
            .envs(installed_env(&cp, "deployment/cortex-operator"))
            .env(
                "KUBECONFIG",
                kubeconfig_with_token(&cp, "operator", &sa_token("cortex-operator")),
            )
            .env("POD_NAMESPACE", "cortex")
            .env("POD_NAME", "cortex-operator-abc")
            .env("CORTEX_NEURON_TOKEN", &token)
            .env("CORTEX_LOG_FORMAT", "text")
            .stdout(Stdio::null())
            .stderr(log("operator.log"))
            .spawn()
            .unwrap(),
    );
    let gport = free_port();
    let gw_args = installed_args(
        &cp,
        "deployment/cortex-gateway",
        &[
            ("--listen", format!("127.0.0.1:{gport}")),
            ("--metrics-listen", format!("127.0.0.1:{}", free_port())),
        ],
    );
    let _gateway = Proc(
        Command::new(bin("cortex"))
            .args(&gw_args)
            .envs(installed_env(&cp, "deployment/cortex-gateway"))
            .env(
                "KUBECONFIG",
                kubeconfig_with_token(&cp, "gateway", &sa_token("cortex-gateway")),
            )
            .env("CORTEX_NEURON_TOKEN", &token)
            .env("CORTEX_LOG_FORMAT", "text")
            .stdout(Stdio::null())
            .stderr(log("gateway.log"))
            .spawn()
            .unwrap(),
    );

    // The operator (pods list/watch, neurons create, neurons/status) registers the pod's neuron.
    wait_until("a ready Neuron for the neuron pod", 60, || async {
        let out = cp
            .kubectl()
            .args([
                "get",
                "neuron",
                "gpu-node-1",
                "-o",
                "jsonpath={.status.ready}",
            ])
            .output()
            .unwrap();
        match String::from_utf8_lossy(&out.stdout).trim() {
            "true" => Ok(()),
            other => Err(format!("ready={other:?}")),
        }
    })
    .await;
    assert!(
        cp.kubectl_ok(&[
            "get",
            "lease",
            "cortex-operator",
            "-n",
            "cortex",
            "-o",
            "jsonpath={.spec.holderIdentity}"
        ]) == "cortex-operator-abc"
    );

    // A placement: finalizer, load, status and Events, all with the operator's own rights.
    apply(
        &cp,
        "smollm2",
        &smollm2_placement("smollm2", "  contextLength: 1024\n"),
    );
    let phase = || cp.kubectl_ok(&["get", "mp", "smollm2", "-o", "jsonpath={.status.phase}"]);
    wait_until("smollm2 Ready", 120, || async {
        match phase().as_str() {
            "Ready" => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    let gateway = format!("http://127.0.0.1:{gport}");
    let mut answer = Err(String::new());
    for _ in 0..50 {
        answer = chat(&gateway, "smollm2").await;
        if answer.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        answer.as_ref().is_ok_and(|a| a.contains("Paris")),
        "{answer:?}"
    );

    // Scaled to zero, a request wakes it: the gateway's scale subresource right at work.
    cp.kubectl_ok(&["scale", "mp/smollm2", "--replicas=0"]);
    wait_until("smollm2 Idle", 60, || async {
        match phase().as_str() {
            "Idle" => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await;
    let answer = chat(&gateway, "smollm2").await;
    assert!(
        answer.as_ref().is_ok_and(|a| a.contains("Paris")),
        "{answer:?}"
    );
    assert_eq!(
        cp.kubectl_ok(&["get", "mp", "smollm2", "-o", "jsonpath={.spec.replicas}"]),
        "1"
    );
    let events = cp.kubectl_ok(&["get", "events.events.k8s.io", "-n", "default", "-o", "name"]);
    assert!(
        !events.trim().is_empty(),
        "the operator's Events were not written"
    );

    // Delete: the operator's finalizer unloads and lets go.
    cp.kubectl_ok(&["delete", "mp/smollm2", "--wait=true", "--timeout=60s"]);

    for name in ["operator.log", "gateway.log"] {
        let text = std::fs::read_to_string(cp.dir().join(name)).unwrap();
        assert!(
            !text.contains("forbidden") && !text.contains("Forbidden"),
            "{name} shows a call its ServiceAccount may not make:\n{text}"
        );
    }
}
