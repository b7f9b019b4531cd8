//! End-to-end, static mode: two real neuron processes and the real `cortex serve` on loopback,
//! real SmolLM2 and Gemma 3 weights (`scripts/fetch-test-models`).

mod common;

use common::Fleet;
use futures::StreamExt;
use serde_json::{Value, json};

fn chat(model: &str, prompt: &str) -> Value {
    json!({"model": model, "temperature": 0, "max_tokens": 30, "messages": [{"role": "user", "content": prompt}]})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_static_fleet_serves_loads_on_demand_and_survives_a_dead_neuron() {
    let mut fleet = Fleet::start("").await;
    // The pinned placement is loaded at start; the scale-to-zero one is listed but not loaded.
    let smol = fleet.wait_state("smollm2", "ready").await;
    assert_eq!(smol["loaded_on"].as_array().unwrap().len(), 1);
    let cat = fleet.catalogue().await;
    let ids: Vec<&str> = cat.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["smollm2", "smol", "gemma3"]);
    assert_eq!(cat[2]["state"], "not_loaded");

    let (s, body) = fleet
        .post(
            "/v1/chat/completions",
            chat(
                "smol",
                "What is the capital of France? Answer in one sentence.",
            ),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{body}"
    );

    // Three concurrent requests for the cold model cause one load.
    let ask = json!({"model": "gemma3", "prompt": "Question: What is the capital of France?\nAnswer:", "max_tokens": 5, "temperature": 0, "stop": ["\n"]});
    let results =
        futures::future::join_all((0..3).map(|_| fleet.post("/v1/completions", ask.clone()))).await;
    for (s, body) in &results {
        assert_eq!(*s, 200, "{body}");
        assert_eq!(body["choices"][0]["text"].as_str().unwrap().trim(), "Paris");
    }
    let ports: Vec<u16> = fleet.neurons.iter().map(|(p, _)| *p).collect();
    let mut loads = 0;
    for p in &ports {
        loads += fleet.loads_on(*p, "gemma3").await;
    }
    assert_eq!(loads, 1, "concurrent cold requests must share one load");

    // Unknown models get OpenAI's not-found error.
    let (s, body) = fleet
        .post("/v1/chat/completions", chat("gpt-9", "hi"))
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );

    // Kill the neuron holding smollm2: the next request loads it on the other one and answers.
    let holder = smol["loaded_on"][0]["neuron"].as_str().unwrap().to_string();
    let idx = if holder == "n1" { 0 } else { 1 };
    fleet.neurons[idx].1.take();
    let (s, body) = fleet
        .post(
            "/v1/chat/completions",
            chat(
                "smollm2",
                "What is the capital of France? Answer in one sentence.",
            ),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris")
    );
    let smol = fleet.wait_state("smollm2", "ready").await;
    assert_ne!(smol["loaded_on"][0]["neuron"].as_str().unwrap(), holder);

    // A streamed request passes the neuron's stream through to the end.
    let res = fleet
        .http
        .post(format!("{}/v1/chat/completions", fleet.url))
        .json(&json!({"model": "smollm2", "stream": true, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    let mut s = res.bytes_stream();
    while let Some(c) = s.next().await {
        text.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // The gateway's metrics saw all of it.
    let m = reqwest::get(&fleet.metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "cortex_gateway_requests_total{model=\"gemma3\",neuron=",
        "dialect=\"openai\",status_class=\"2xx\"}",
        "cortex_gateway_cold_loads_total{model=\"gemma3\",result=\"success\"} 1",
        "cortex_gateway_cold_load_duration_seconds_count{model=\"gemma3\"} 1",
        "cortex_gateway_time_to_first_token_seconds_bucket{",
        "cortex_gateway_e2e_request_latency_seconds_count{model=\"smollm2\"",
        "cortex_gateway_in_flight_requests{model=\"smollm2\"} 0",
        &format!("cortex_gateway_neuron_up{{neuron=\"{holder}\"}} 0"),
    ] {
        assert!(m.contains(series), "missing {series} in\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_are_required_when_configured() {
    let fleet = Fleet::start("api_keys = [\"sk-test\"]").await;
    let r = fleet
        .http
        .get(format!("{}/v1/models", fleet.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
    for (h, v) in [
        ("authorization", "Bearer sk-test"),
        ("x-api-key", "sk-test"),
    ] {
        let r = fleet
            .http
            .get(format!("{}/v1/models", fleet.url))
            .header(h, v)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{h}");
    }
    let r = fleet
        .http
        .get(format!("{}/v1/models", fleet.url))
        .header("x-api-key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
