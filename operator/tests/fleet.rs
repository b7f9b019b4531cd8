//! The operator on a real API server with real neurons: Neurons kept for the pods of the neuron
//! DaemonSet, and eviction when a neuron is full (LRU, never a pinned model, with Events).

mod common;

use common::*;
use cortex_core::crd::{ModelPlacement, Neuron, Phase};
use cortex_testkit::{ControlPlane, free_port};
use kube::Api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neuron_pod_gets_a_neuron_and_loses_it_with_the_pod() {
    let cp = ControlPlane::start().await;
    install_crds(&cp);
    let port = free_port();
    let _neuron = start_neuron(port, &[]);
    let op_port = free_port();
    let port_arg = port.to_string();
    let _op = start_operator(
        &cp,
        op_port,
        "op",
        &[
            "--neuron-pods",
            "app.kubernetes.io/component=neuron",
            "--neuron-port",
            &port_arg,
        ],
    );
    // No kubelet runs here: the pod is created as the DaemonSet would, and its status written as
    // the kubelet would.
    apply(
        &cp,
        "pod",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: neuron-x1\n  labels:\n    app.kubernetes.io/component: neuron\nspec:\n  nodeName: gpu-node-1\n  containers:\n  - name: neuron\n    image: ghcr.io/helexa/cortex-neuron:latest\n",
    );
    cp.kubectl_ok(&[
        "patch",
        "pod",
        "neuron-x1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running","podIP":"127.0.0.1","podIPs":[{"ip":"127.0.0.1"}]}}"#,
    ]);
    let client = cp.client().await;
    let neurons: Api<Neuron> = Api::all(client);
    let endpoint = format!("http://127.0.0.1:{port}");
    wait_until("a ready Neuron for the pod's node", 60, || async {
        let n = neurons
            .get_opt("gpu-node-1")
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no Neuron yet")?;
        let st = n.status.clone().unwrap_or_default();
        if n.spec.endpoint == endpoint
            && n.spec.node_name.as_deref() == Some("gpu-node-1")
            && st.ready
            && st.device_count == 1
        {
            Ok(())
        } else {
            Err(format!("{n:?}"))
        }
    })
    .await;
    let table = cp.kubectl_ok(&["get", "neurons"]);
    assert!(
        table.contains("gpu-node-1") && table.contains("true"),
        "{table}"
    );

    cp.kubectl_ok(&["delete", "pod", "neuron-x1", "--grace-period=0", "--force"]);
    wait_until("the Neuron deleted with its pod", 30, || async {
        match neurons.get_opt("gpu-node-1").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_neuron_evicts_the_least_recently_used_and_never_a_pinned_model() {
    let cp = ControlPlane::start().await;
    install_crds(&cp);
    let port = free_port();
    // Room for one copy of SmolLM2 with a 1024-token context (about 120 MB), not two.
    let _neuron = start_neuron(port, &["--max-memory", "200000000"]);
    apply(&cp, "solo", &neuron_yaml("solo", port));
    let op_port = free_port();
    let _op = start_operator(&cp, op_port, "op", &[]);
    let api: Api<ModelPlacement> = Api::namespaced(cp.client().await, "default");
    let phase_is = |name: &'static str, want: Phase| {
        let api = api.clone();
        move || {
            let api = api.clone();
            async move {
                let mp = placement(&api, name).await.ok_or("gone")?;
                let st = mp.status.clone().unwrap_or_default();
                if st.phase == want {
                    Ok(())
                } else {
                    Err(format!("{st:?}"))
                }
            }
        }
    };
    let ctx = "  contextLength: 1024\n";
    apply(&cp, "old", &smollm2_placement("old", ctx));
    wait_until("old Ready", 60, phase_is("old", Phase::Ready)).await;

    // fresh evicts old, which gives its copy up (scaled to 0) instead of evicting fresh back.
    apply(&cp, "fresh", &smollm2_placement("fresh", ctx));
    wait_until("fresh Ready", 60, phase_is("fresh", Phase::Ready)).await;
    wait_until("old Idle", 30, phase_is("old", Phase::Idle)).await;
    assert_eq!(placement(&api, "old").await.unwrap().spec.replicas, Some(0));
    let events = cp.kubectl_ok(&["get", "events", "-o", "json"]);
    assert!(
        events.contains("evicted old.default from solo to make room for fresh.default"),
        "{events}"
    );
    let models: Vec<String> = neuron_models(port).await.into_iter().map(|m| m.0).collect();
    assert_eq!(models, ["fresh.default"]);

    // A pinned placement evicts fresh; then nothing can evict the pinned one.
    apply(
        &cp,
        "keeper",
        &smollm2_placement("keeper", &format!("  pinned: true\n{ctx}")),
    );
    wait_until("keeper Ready", 60, phase_is("keeper", Phase::Ready)).await;
    wait_until("fresh Idle", 30, phase_is("fresh", Phase::Idle)).await;
    apply(&cp, "blocked", &smollm2_placement("blocked", ctx));
    wait_until("blocked waits for room", 30, || async {
        let mp = placement(&api, "blocked").await.ok_or("gone")?;
        let st = mp.status.clone().unwrap_or_default();
        let c = st.conditions.first().ok_or("no condition")?;
        if st.phase == Phase::Pending && c.reason == "NoRoom" && c.message.contains("pinned") {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    let models: Vec<String> = neuron_models(port).await.into_iter().map(|m| m.0).collect();
    assert_eq!(models, ["keeper.default"]);
    assert_eq!(
        scrape(op_port, "cortex_operator_evictions_total").await,
        2.0
    );
    let described = cp.kubectl_ok(&["describe", "mp", "blocked"]);
    assert!(described.contains("NoRoom"), "{described}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_fails_says_why_and_is_retried_with_backoff() {
    let cp = ControlPlane::start().await;
    install_crds(&cp);
    let port = free_port();
    let _neuron = start_neuron(port, &[]);
    apply(&cp, "solo", &neuron_yaml("solo", port));
    let op_port = free_port();
    let _op = start_operator(&cp, op_port, "op", &[]);
    let api: Api<ModelPlacement> = Api::namespaced(cp.client().await, "default");
    let missing = models_dir().join("no-such-model.gguf");
    apply(
        &cp,
        "typo",
        &format!(
            "apiVersion: cortex.helexa.io/v1alpha1\nkind: ModelPlacement\nmetadata:\n  name: typo\nspec:\n  model:\n    uri: file://{}\n",
            missing.display()
        ),
    );
    wait_until("typo Failed with the neuron's reason", 30, || async {
        let mp = placement(&api, "typo").await.ok_or("gone")?;
        let st = mp.status.clone().unwrap_or_default();
        let c = st.conditions.first().ok_or("no condition")?;
        if st.phase == Phase::Failed
            && c.reason == "LoadFailed"
            && c.message.contains("no-such-model.gguf")
        {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    let events = cp.kubectl_ok(&["get", "events", "-o", "json"]);
    assert!(events.contains("LoadFailed"), "{events}");
    // Backoff: a few seconds later only a couple of attempts were made, not one per poll.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let refused = scrape(
        op_port,
        "cortex_operator_model_loads_total{result=\"refused\"}",
    )
    .await
        + scrape(
            op_port,
            "cortex_operator_model_loads_total{result=\"accepted\"}",
        )
        .await;
    assert!(
        (1.0..=3.0).contains(&refused),
        "{refused} load attempts in ~5 s"
    );
}
