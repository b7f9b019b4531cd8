//! End to end on a real API server: the CRDs applied with kubectl, two real neuron processes with
//! real SmolLM2 weights registered as Neurons, the operator and the gateway (`cortex serve
//! --kubernetes`) as real processes, and the official `openai` SDK as the client.
//!
//! apply → Ready → "Paris" through the gateway → scale to 2 (a copy on each neuron) → scale to 0
//! (unloaded) → a request wakes it → idle placement scales itself to zero → a neuron killed (its
//! Neuron turns not ready, the copy moves) → the operator replaced by a standby replica (leader
//! election; nothing loaded twice) → delete (unloaded by the finalizer).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use cortex_core::crd::{ModelPlacement, Neuron, Phase};
use cortex_testkit::{ControlPlane, free_port};
use kube::Api;

/// One chat completion through the gateway with the official openai SDK.
fn ask_with_openai_sdk(gateway: &str, model: &str) -> String {
    let script = r#"
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", timeout=300)
r = client.chat.completions.create(
    model=sys.argv[2],
    messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    max_tokens=16,
    temperature=0,
)
print(r.choices[0].message.content)
"#;
    let out = Command::new(python())
        .args(["-c", script, gateway, model])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai SDK call failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_lives_its_whole_life_on_a_real_cluster() {
    let cp = ControlPlane::start().await;
    let client = cp.client().await;
    install_crds(&cp);

    // Two neurons, registered by hand as hosts outside the cluster would be.
    let ports = [free_port(), free_port()];
    let mut neurons: Vec<Option<Proc>> =
        ports.iter().map(|&p| Some(start_neuron(p, &[]))).collect();
    for (name, port) in [("alpha", ports[0]), ("beta", ports[1])] {
        apply(&cp, name, &neuron_yaml(name, port));
    }
    let op_metrics = free_port();
    let operator = start_operator(&cp, op_metrics, "op-a", &[]);
    let (gport, gmport) = (free_port(), free_port());
    let _gateway = Proc(
        Command::new(bin("cortex"))
            .env("KUBECONFIG", &cp.kubeconfig)
            .args(["serve", "--kubernetes", "--namespace", "default"])
            .args(["--listen", &format!("127.0.0.1:{gport}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{gmport}")])
            .args(["--neuron-token", TOKEN])
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(cp.dir().join("gateway.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let gateway = format!("http://127.0.0.1:{gport}");

    let neuron_api: Api<Neuron> = Api::all(client.clone());
    wait_until("both Neurons ready", 60, || {
        let api = neuron_api.clone();
        async move {
            for n in ["alpha", "beta"] {
                let n = api.get(n).await.map_err(|e| e.to_string())?;
                let st = n.status.as_ref().ok_or("no status")?;
                if !st.ready || st.devices.is_empty() {
                    return Err(format!("{n:?} not ready"));
                }
            }
            Ok(())
        }
    })
    .await;

    // apply → Ready
    let api: Api<ModelPlacement> = Api::namespaced(client.clone(), "default");
    let applied = Instant::now();
    apply(
        &cp,
        "smollm2",
        &smollm2_placement("smollm2", "  aliases: [smol]\n  contextLength: 2048\n"),
    );
    let ready_phase = |want: u32| {
        let api = api.clone();
        move || {
            let api = api.clone();
            async move {
                let mp = placement(&api, "smollm2").await.ok_or("no object")?;
                let st = mp.status.clone().ok_or("no status")?;
                if st.phase == Phase::Ready && st.ready_replicas == want {
                    Ok(())
                } else {
                    Err(format!("{st:?}"))
                }
            }
        }
    };
    wait_until("smollm2 Ready", 120, ready_phase(1)).await;
    let apply_to_ready = applied.elapsed();
    let mp = placement(&api, "smollm2").await.unwrap();
    let st = mp.status.as_ref().unwrap();
    assert_eq!(st.model_id.as_deref(), Some("smollm2.default"));
    assert_eq!(st.observed_generation, mp.metadata.generation);
    assert_eq!(st.conditions[0].type_, "Ready");
    assert_eq!(st.conditions[0].status, "True");

    // the official openai SDK gets "Paris" through the gateway, by name and by alias
    let answer = ask_with_openai_sdk(&gateway, "smollm2");
    assert!(answer.contains("Paris"), "{answer}");
    assert!(ask_with_openai_sdk(&gateway, "smol").contains("Paris"));

    // kubectl scale --replicas=2 → a copy on each neuron
    cp.kubectl_ok(&["scale", "mp/smollm2", "--replicas=2"]);
    wait_until("two ready copies", 120, ready_phase(2)).await;
    for p in ports {
        let m = neuron_models(p).await;
        assert!(
            m.iter()
                .any(|(id, s, _)| id == "smollm2.default" && s == "ready"),
            "neuron :{p} holds {m:?}"
        );
    }

    // kubectl scale --replicas=0 → unloaded everywhere, phase Idle
    cp.kubectl_ok(&["scale", "mp/smollm2", "--replicas=0"]);
    wait_until("unloaded at zero", 60, || async {
        for p in ports {
            if neuron_models(p)
                .await
                .iter()
                .any(|(id, ..)| id == "smollm2.default")
            {
                return Err(format!("still on :{p}"));
            }
        }
        let mp = placement(&api, "smollm2").await.ok_or("gone")?;
        match mp.status.map(|s| s.phase) {
            Some(Phase::Idle) => Ok(()),
            other => Err(format!("phase {other:?}")),
        }
    })
    .await;

    // a request wakes it: the gateway scales the placement to one and answers
    let woke = Instant::now();
    let answer = ask_with_openai_sdk(&gateway, "smollm2");
    assert!(answer.contains("Paris"), "{answer}");
    let wake_time = woke.elapsed();
    let mp = placement(&api, "smollm2").await.unwrap();
    assert_eq!(mp.spec.replicas, Some(1), "the gateway scaled it to one");

    // An idle placement with minReplicas 0 scales itself to zero after idleTimeout.
    apply(
        &cp,
        "napper",
        &smollm2_placement(
            "napper",
            "  minReplicas: 0\n  idleTimeout: 3\n  contextLength: 1024\n",
        ),
    );
    wait_until("napper scaled itself to zero", 120, || async {
        let mp = placement(&api, "napper").await.ok_or("gone")?;
        let st = mp.status.clone().unwrap_or_default();
        if mp.spec.replicas == Some(0) && st.phase == Phase::Idle {
            Ok(())
        } else {
            Err(format!("replicas {:?}, {st:?}", mp.spec.replicas))
        }
    })
    .await;
    let events = cp.kubectl_ok(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=napper",
        "-o",
        "json",
    ]);
    assert!(
        events.contains("ScaledDown"),
        "no ScaledDown event: {events}"
    );
    cp.kubectl_ok(&["delete", "mp/napper", "--wait=true", "--timeout=60s"]);

    // A neuron killed → its Neuron turns not ready and the copy moves to the other neuron.
    let mp = placement(&api, "smollm2").await.unwrap();
    let holder = mp.status.unwrap().placements[0].neuron.clone();
    let (dead, alive) = if holder == "alpha" { (0, 1) } else { (1, 0) };
    neurons[dead] = None;
    let dead_name = if dead == 0 { "alpha" } else { "beta" };
    let alive_name = if alive == 0 { "alpha" } else { "beta" };
    wait_until("the killed neuron not ready", 30, || async {
        let n = neuron_api.get(dead_name).await.map_err(|e| e.to_string())?;
        let st = n.status.unwrap_or_default();
        if !st.ready && st.conditions.iter().any(|c| c.reason == "Unreachable") {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    wait_until("the copy moved", 120, || async {
        let mp = placement(&api, "smollm2").await.ok_or("gone")?;
        let st = mp.status.unwrap_or_default();
        let on_alive = st
            .placements
            .iter()
            .any(|p| p.neuron == alive_name && p.state == cortex_core::neuron::ModelState::Ready);
        if on_alive && st.phase == Phase::Ready {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await;
    assert!(ask_with_openai_sdk(&gateway, "smollm2").contains("Paris"));
    let before = neuron_models(ports[alive]).await;
    let loaded_at = before
        .iter()
        .find(|(id, ..)| id == "smollm2.default")
        .and_then(|(.., at)| *at);

    // The operator replaced: a standby replica takes the lease over; nothing is loaded twice.
    let op_metrics_b = free_port();
    let _operator_b = start_operator(&cp, op_metrics_b, "op-b", &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        scrape(op_metrics_b, "cortex_operator_leader").await,
        0.0,
        "two leaders"
    );
    let reconcile_secs = scrape(op_metrics, "cortex_operator_reconcile_duration_seconds_sum").await;
    let reconciles = scrape(
        op_metrics,
        "cortex_operator_reconcile_duration_seconds_count",
    )
    .await;
    drop(operator);
    wait_until("the standby leads", 30, || async {
        if scrape(op_metrics_b, "cortex_operator_leader").await == 1.0 {
            Ok(())
        } else {
            Err("standing by".into())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = neuron_models(ports[alive]).await;
    assert_eq!(
        after
            .iter()
            .find(|(id, ..)| id == "smollm2.default")
            .and_then(|(.., at)| *at),
        loaded_at,
        "the model was loaded again: {before:?} → {after:?}"
    );
    assert_eq!(
        after
            .iter()
            .filter(|(id, ..)| id == "smollm2.default")
            .count(),
        1
    );
    wait_until("still Ready under the new leader", 30, ready_phase(1)).await;

    // kubectl delete → unloaded by the finalizer, object gone
    cp.kubectl_ok(&["delete", "mp/smollm2", "--wait=true", "--timeout=60s"]);
    assert!(
        !neuron_models(ports[alive])
            .await
            .iter()
            .any(|(id, ..)| id == "smollm2.default")
    );
    assert!(placement(&api, "smollm2").await.is_none());

    eprintln!(
        "e2e figures: apply→Ready {:.2}s; wake from zero through the gateway {:.2}s; mean reconcile {:.2} ms over {} reconciles",
        apply_to_ready.as_secs_f64(),
        wake_time.as_secs_f64(),
        1000.0 * reconcile_secs / reconciles.max(1.0),
        reconciles
    );
    drop(neurons);
}
