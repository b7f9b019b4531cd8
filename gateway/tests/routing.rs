//! Routing among replicas, on two real neurons holding the same SmolLM2 copy (`replicas = 2`):
//! the least outstanding requests win; a neuron that stops answering is marked down, its request
//! goes to the other replica (counted once end to end), and once it answers its status probe
//! again it gets requests again. Static mode's neuron tokens reach the neurons and no client.

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, free_port, metric, models_dir, start_neuron, wait_healthy};
use serde_json::{Value, json};

fn placement(replicas: u32) -> String {
    format!(
        "[[placements]]\nname = \"smollm2\"\nreplicas = {replicas}\nmodel = {{ uri = \"file://{}/SmolLM2-135M-Instruct.Q4_1.gguf\" }}\n",
        models_dir().display()
    )
}

/// Waits until `model` is ready on `count` neurons.
async fn wait_replicas(fleet: &Fleet, model: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let cat = fleet.catalogue().await;
        let m = cat.iter().find(|m| m["id"] == model).unwrap();
        let ready = m["loaded_on"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["state"] == "ready")
            .count();
        if ready == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{model} never ready on {count}: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/cortex/fleet`.
async fn fleet_view(fleet: &Fleet) -> Value {
    fleet
        .http
        .get(format!("{}/cortex/fleet", fleet.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The gateway's outstanding requests on each neuron, by name.
async fn outstanding(fleet: &Fleet) -> Vec<(String, u64)> {
    fleet_view(fleet).await["neurons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["outstanding"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A neuron's own count of the requests it is decoding or has queued (its `/status`).
async fn busy_on(port: u16) -> u64 {
    let st = common::neuron_status(port).await;
    st["inflight"].as_u64().unwrap() + st["queued"].as_u64().unwrap()
}

/// Waits until the neuron on `port` has `count` requests decoding or queued.
async fn wait_busy(port: u16, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let busy = busy_on(port).await;
        if busy == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the neuron on {port} has {busy} requests, not {count}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a long streamed answer and returns it open once its headers came (by then the gateway
/// has picked its neuron).
async fn open_stream(fleet: &Fleet) -> reqwest::Response {
    let res = fleet
        .send(
            "/v1/chat/completions",
            &json!({"model": "smollm2", "stream": true, "max_tokens": 4000, "ignore_eos": true,
            "messages": [{"role": "user", "content": "Write a very long story about the sea."}]}),
        )
        .await;
    assert_eq!(res.status(), 200);
    res
}

/// The neuron whose outstanding count went up between two snapshots.
fn grown(before: &[(String, u64)], after: &[(String, u64)]) -> String {
    let up: Vec<&String> = after
        .iter()
        .zip(before)
        .filter(|(a, b)| a.1 == b.1 + 1)
        .map(|(a, _)| &a.0)
        .collect();
    assert_eq!(up.len(), 1, "before {before:?}, after {after:?}");
    up[0].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_go_to_the_replica_with_the_fewest_outstanding() {
    let fleet = Fleet::start_with(2, &[], "", &placement(2)).await;
    wait_replicas(&fleet, "smollm2", 2).await;
    // Four streams held open: two on each neuron, whichever order ties are broken in.
    let mut open: Vec<(String, reqwest::Response)> = Vec::new();
    for _ in 0..4 {
        let before = outstanding(&fleet).await;
        let res = open_stream(&fleet).await;
        let on = grown(&before, &outstanding(&fleet).await);
        open.push((on, res));
    }
    let counts = outstanding(&fleet).await;
    assert_eq!(counts.iter().map(|c| c.1).collect::<Vec<_>>(), [2, 2]);
    // The neurons agree: each is decoding two of them.
    let ports: Vec<u16> = fleet.neurons.iter().map(|(p, _)| *p).collect();
    for p in &ports {
        wait_busy(*p, 2).await;
    }

    // Close the two on n1: n1 has none left, n2 two; the next two both go to n1 (round robin would
    // send one to n2).
    open.retain(|(on, _)| on != "n1");
    let deadline = Instant::now() + Duration::from_secs(20);
    while outstanding(&fleet).await[0].1 != 0 {
        assert!(
            Instant::now() < deadline,
            "closed streams still outstanding"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..2 {
        let before = outstanding(&fleet).await;
        let res = open_stream(&fleet).await;
        assert_eq!(grown(&before, &outstanding(&fleet).await), "n1");
        open.push(("n1".into(), res));
    }
    assert_eq!(
        outstanding(&fleet)
            .await
            .iter()
            .map(|c| c.1)
            .collect::<Vec<_>>(),
        [2, 2]
    );
    // The neuron sees them too (once it has noticed the closed ones are gone).
    wait_busy(ports[0], 2).await;
    wait_busy(ports[1], 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_neuron_that_stops_answering_is_marked_down_and_probed_back_in() {
    let fleet = Fleet::start_with(2, &[], "request_timeout_secs = 3", &placement(2)).await;
    wait_replicas(&fleet, "smollm2", 2).await;
    let ask = json!({"model": "smollm2", "max_tokens": 3, "temperature": 0,
        "messages": [{"role": "user", "content": "Hi"}]});
    // With nothing outstanding the tie goes to n1, the first neuron.
    let (s, body) = fleet.post("/v1/chat/completions", ask.clone()).await;
    assert_eq!(s, 200, "{body}");
    let before = fleet.metrics().await;
    assert_eq!(
        metric(
            &before,
            "cortex_gateway_requests_total",
            &["neuron=\"n1\"", "status_class=\"2xx\""]
        ),
        1.0,
        "{before}"
    );

    // A stopped n1 keeps its socket and never answers: the request times out there and is
    // answered by n2; the client sees one request, and one end-to-end sample.
    fleet.signal(0, "-STOP");
    let (s, body) = fleet.post("/v1/chat/completions", ask.clone()).await;
    assert_eq!(s, 200, "{body}");
    let after = fleet.metrics().await;
    let delta =
        |name: &str, labels: &[&str]| metric(&after, name, labels) - metric(&before, name, labels);
    assert_eq!(
        delta(
            "cortex_gateway_requests_total",
            &["neuron=\"n1\"", "status_class=\"5xx\""]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "cortex_gateway_requests_total",
            &["neuron=\"n2\"", "status_class=\"2xx\""]
        ),
        1.0
    );
    assert_eq!(
        delta("cortex_gateway_e2e_request_latency_seconds_count", &[]),
        1.0
    );
    let view = fleet_view(&fleet).await;
    assert_eq!(view["neurons"][0]["up"], false, "{view}");
    // While n1 is down, everything goes to n2 at once (no more timeouts).
    let started = Instant::now();
    for _ in 0..3 {
        let (s, _) = fleet.post("/v1/chat/completions", ask.clone()).await;
        assert_eq!(s, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Resumed, n1 answers its status probe, is up again, and the next request (a tie again)
    // goes to it.
    fleet.signal(0, "-CONT");
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet_view(&fleet).await["neurons"][0]["up"] != true {
        assert!(Instant::now() < deadline, "n1 was never probed back in");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_replicas(&fleet, "smollm2", 2).await;
    let before = fleet.metrics().await;
    let (s, body) = fleet.post("/v1/chat/completions", ask.clone()).await;
    assert_eq!(s, 200, "{body}");
    let after = fleet.metrics().await;
    assert_eq!(
        metric(
            &after,
            "cortex_gateway_requests_total",
            &["neuron=\"n1\"", "status_class=\"2xx\""]
        ) - metric(
            &before,
            "cortex_gateway_requests_total",
            &["neuron=\"n1\"", "status_class=\"2xx\""]
        ),
        1.0,
        "{after}"
    );
    assert!(metric(&after, "cortex_gateway_neuron_up", &["neuron=\"n1\""]) == 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn neuron_tokens_reach_the_neurons_and_no_client() {
    const GOOD: &str = "tok-8d1f-right-one";
    const WRONG: &str = "tok-51aa-wrong-one";
    // n1 wants GOOD and is given it; n2 wants another token and is given WRONG.
    let (p1, p2) = (free_port(), free_port());
    let _n1 = start_neuron(p1, &["--token", GOOD]);
    let _n2 = start_neuron(p2, &["--token", "tok-n2-expected"]);
    for p in [p1, p2] {
        wait_healthy(&format!("http://127.0.0.1:{p}")).await;
    }
    let neurons = format!(
        "[[neurons]]\nname = \"n1\"\nendpoint = \"http://127.0.0.1:{p1}\"\ntoken = \"{GOOD}\"\n\
         [[neurons]]\nname = \"n2\"\nendpoint = \"http://127.0.0.1:{p2}\"\ntoken = \"{WRONG}\"\n"
    );
    let fleet = Fleet::start_with(0, &[], &neurons, &placement(1)).await;
    // Loading, probing and proxying all carry n1's token: the model loads there and answers.
    let m = fleet.wait_state("smollm2", "ready").await;
    assert_eq!(m["loaded_on"][0]["neuron"], "n1", "{m}");
    let (s, body) = fleet
        .post(
            "/v1/chat/completions",
            json!({"model": "smollm2", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    // The neuron refuses the same call without the token, so the gateway did send it.
    let direct = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{p1}/v1/chat/completions"))
        .json(&json!({"model": "smollm2", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 401);
    // n2 refuses the wrong token: it is down, and says so without the token.
    let view = fleet_view(&fleet).await;
    assert_eq!(view["neurons"][1]["up"], false, "{view}");

    // Nothing a client can read carries either token: the catalogue, the fleet, an error the
    // neuron wrote, an error of the gateway's, `cortex status`.
    let mut seen = vec![
        view.to_string(),
        serde_json::to_string(&fleet.catalogue().await).unwrap(),
    ];
    let (s, body) = fleet
        .post(
            "/v1/chat/completions",
            json!({"model": "smollm2", "max_tokens": -5, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert!((400..500).contains(&s), "{s} {body}");
    seen.push(body.to_string());
    seen.push(
        fleet
            .post("/v1/chat/completions", json!({"model": "nope"}))
            .await
            .1
            .to_string(),
    );
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_cortex"))
        .args(["status", "--gateway", &fleet.url])
        .output()
        .unwrap();
    seen.push(String::from_utf8_lossy(&status.stdout).into_owned());
    seen.push(fleet.metrics().await);
    for text in &seen {
        assert!(
            !text.contains(GOOD) && !text.contains(WRONG),
            "a token leaked: {text}"
        );
    }
}
