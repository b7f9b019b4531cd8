//! Kubernetes mode on a real API server: the CRDs applied with kubectl, a real neuron with
//! SmolLM2 registered by hand as a Neuron, a ModelPlacement whose status this test writes as the
//! operator would, and `cortex serve --kubernetes` as a real process. The gateway serves the
//! placement's names, wakes it at zero by scaling it to one, waits for the copy the status names,
//! routes there with the neuron-side id, and shows the Neuron in `/cortex/fleet`.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, free_port, models_dir, start_neuron, wait_healthy};
use cortex_core::crd::{ModelPlacement, Neuron};
use cortex_testkit::{ControlPlane, workspace_root};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const TOKEN: &str = "k8s-neuron-token";

/// Polls `check` every 100 ms until it gives a value, for at most `secs`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    secs: u64,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within {secs} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET `url`, read as JSON.
async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn a_placement_at_zero_is_woken_by_scaling_and_served_from_its_status() {
    let cp = ControlPlane::start().await;
    let crds = workspace_root().join("crds");
    cp.kubectl_ok(&["apply", "-f", &crds.display().to_string()]);
    cp.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/modelplacements.cortex.helexa.io",
        "crd/neurons.cortex.helexa.io",
    ]);
    let client = cp.client().await;

    // One neuron, registered by hand, ready, with its status as the operator would write it.
    let nport = free_port();
    let _neuron = start_neuron(nport, &["--token", TOKEN]);
    let endpoint = format!("http://127.0.0.1:{nport}");
    wait_healthy(&endpoint).await;
    let neurons: Api<Neuron> = Api::all(client.clone());
    let n: Neuron = serde_json::from_value(json!({
        "apiVersion": "cortex.helexa.io/v1alpha1", "kind": "Neuron",
        "metadata": {"name": "n1"}, "spec": {"endpoint": endpoint},
    }))
    .unwrap();
    neurons.create(&PostParams::default(), &n).await.unwrap();
    let ready = json!({"status": {"ready": true, "models": [], "deviceCount": 1, "modelCount": 0}});
    neurons
        .patch_status("n1", &PatchParams::default(), &Patch::Merge(&ready))
        .await
        .unwrap();

    // A placement scaled to zero.
    let uri = format!(
        "file://{}/SmolLM2-135M-Instruct.Q4_1.gguf",
        models_dir().display()
    );
    let mps: Api<ModelPlacement> = Api::namespaced(client.clone(), "default");
    let mp: ModelPlacement = serde_json::from_value(json!({
        "apiVersion": "cortex.helexa.io/v1alpha1", "kind": "ModelPlacement",
        "metadata": {"name": "smol"},
        "spec": {"model": {"uri": uri}, "servedName": "smollm2", "aliases": ["smol"],
                 "replicas": 0, "minReplicas": 0},
    }))
    .unwrap();
    mps.create(&PostParams::default(), &mp).await.unwrap();

    let (gport, mport) = (free_port(), free_port());
    let _gateway = Proc(
        Command::new(env!("CARGO_BIN_EXE_cortex"))
            .args(["serve", "--kubernetes", "--namespace", "default"])
            .args(["--listen", &format!("127.0.0.1:{gport}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{mport}")])
            .args(["--neuron-token", TOKEN])
            .env("KUBECONFIG", &cp.kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{gport}");
    wait_healthy(&url).await;
    let http = reqwest::Client::new();

    let cat = get_json(&http, &format!("{url}/v1/models")).await;
    let ids: Vec<&str> = cat["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["smollm2", "smol"], "{cat}");
    assert_eq!(cat["data"][0]["state"], "not_loaded");
    assert_eq!(cat["data"][0]["placement"], "smol.default");

    // A request for the cold model scales its ModelPlacement to one and waits.
    let ask = json!({"model": "smol", "max_tokens": 8, "temperature": 0,
                     "messages": [{"role": "user", "content": "What is the capital of France?"}]});
    let pending = tokio::spawn({
        let (http, url, ask) = (http.clone(), url.clone(), ask.clone());
        async move {
            let r = http
                .post(format!("{url}/v1/chat/completions"))
                .json(&ask)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    });
    eventually("the gateway scales smol to 1", 20, || {
        let mps = mps.clone();
        async move { (mps.get("smol").await.unwrap().spec.replicas == Some(1)).then_some(()) }
    })
    .await;
    assert!(!pending.is_finished(), "answered before any copy was ready");

    // Play the operator: load the copy on the neuron under its neuron-side id, then say so.
    let load = http
        .post(format!("{endpoint}/models/load?wait=true"))
        .bearer_auth(TOKEN)
        .json(&json!({"id": "smol.default", "source": {"uri": uri}}))
        .send()
        .await
        .unwrap();
    assert!(load.status().is_success(), "{}", load.text().await.unwrap());
    let status = json!({"status": {"phase": "Ready", "replicas": 1, "readyReplicas": 1,
        "placements": [{"neuron": "n1", "endpoint": endpoint, "state": "ready"}]}});
    mps.patch_status("smol", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let (code, body) = tokio::time::timeout(Duration::from_secs(60), pending)
        .await
        .expect("the woken request answers once the copy is ready")
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        !body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty(),
        "{body}"
    );

    // Warm now: a streamed request goes straight through.
    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    streamed["model"] = json!("smollm2");
    let text = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");

    // /cortex/fleet shows the Neuron object and its status.
    let fleet = get_json(&http, &format!("{url}/cortex/fleet")).await;
    assert_eq!(fleet["neurons"][0]["name"], "n1", "{fleet}");
    assert_eq!(fleet["neurons"][0]["up"], true, "{fleet}");
    assert_eq!(fleet["neurons"][0]["status"]["deviceCount"], 1, "{fleet}");
    assert!(!fleet.to_string().contains(TOKEN));

    let metrics = http
        .get(format!("http://127.0.0.1:{mport}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "cortex_gateway_cold_loads_total{model=\"smol.default\",neuron=\"n1\",result=\"success\"} 1"
        ),
        "{metrics}"
    );

    // The Neuron turns not ready: nothing to route to, and the placement is not scaled again.
    let not_ready = json!({"status": {"ready": false}});
    neurons
        .patch_status("n1", &PatchParams::default(), &Patch::Merge(&not_ready))
        .await
        .unwrap();
    eventually("the gateway sees n1 not ready", 20, || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let f = get_json(&http, &format!("{url}/cortex/fleet")).await;
            (f["neurons"][0]["up"] == false).then_some(())
        }
    })
    .await;
    let cat = get_json(&http, &format!("{url}/v1/models")).await;
    assert_eq!(cat["data"][0]["state"], "not_loaded", "{cat}");
}
