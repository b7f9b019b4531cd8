//! The gateway's per-request metrics, on a real neuron with real SmolLM2 weights: time to first
//! token counts from the request's arrival to the first generated token (not the chat stream's
//! role-only first chunk), inter-token latency and tokens per second come from the gaps between
//! tokens, and requests refused before reaching a neuron are counted too.

mod common;

use common::{Fleet, metric, models_dir};
use futures::StreamExt;
use serde_json::{Value, json};

fn smollm2_only() -> String {
    format!(
        "[[placements]]\nname = \"smollm2\"\nreplicas = 1\npinned = true\nmodel = {{ uri = \"file://{}/SmolLM2-135M-Instruct.Q4_1.gguf\" }}\n",
        models_dir().display()
    )
}

/// A streamed chat answer: the number of chunks carrying text and the usage it reported.
async fn stream_chat(fleet: &Fleet, prompt: &str, max_tokens: u32) -> (usize, Value) {
    let res = fleet
        .send(
            "/v1/chat/completions",
            &json!({"model": "smollm2", "stream": true, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": prompt}]}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let mut text = String::new();
    let mut s = res.bytes_stream();
    while let Some(c) = s.next().await {
        text.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
    }
    let mut chunks = 0;
    let mut usage = Value::Null;
    for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            chunks += 1;
        }
        if v["usage"].is_object() {
            usage = v["usage"].clone();
        }
    }
    (chunks, usage)
}

#[tokio::test(flavor = "multi_thread")]
async fn time_to_first_token_covers_prompt_processing_and_speed_follows_the_token_gaps() {
    let fleet = Fleet::start_with(1, &[], "", &smollm2_only()).await;
    fleet.wait_state("smollm2", "ready").await;
    // Warm up, so the measured request pays no first-use costs.
    stream_chat(&fleet, "Hi", 2).await;

    let before = fleet.metrics().await;
    // About 900 prompt tokens: processing them takes far longer than generating one token.
    let long = "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(60);
    let prompt = format!("{long}\nHow many times did the fox jump?");
    let (chunks, usage) = stream_chat(&fleet, &prompt, 24).await;
    let after = fleet.metrics().await;
    let delta = |name: &str| metric(&after, name, &[]) - metric(&before, name, &[]);
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 500, "{usage}");
    let generated = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(generated, 24, "ignore_eos: every token asked for");

    assert_eq!(
        delta("cortex_gateway_time_to_first_token_seconds_count"),
        1.0
    );
    let ttft = delta("cortex_gateway_time_to_first_token_seconds_sum");
    let e2e = delta("cortex_gateway_e2e_request_latency_seconds_sum");
    let queue = delta("cortex_gateway_request_queue_time_seconds_sum");
    assert_eq!(
        delta("cortex_gateway_e2e_request_latency_seconds_count"),
        1.0
    );
    assert!(
        queue <= ttft && ttft < e2e,
        "queue {queue} ≤ ttft {ttft} < e2e {e2e}"
    );
    // One gap per text chunk after the first: the role-only chunk and the usage chunk are none.
    let gaps = delta("cortex_gateway_inter_token_latency_seconds_count");
    assert_eq!(gaps, (chunks - 1) as f64);
    let itl = delta("cortex_gateway_inter_token_latency_seconds_sum");
    let mean_gap = itl / gaps;
    assert!(
        ttft > 2.0 * mean_gap,
        "the first token waits for the prompt: ttft {ttft} s, mean gap {mean_gap} s"
    );
    // Speed: the tokens after the first over the time from the first to the last.
    assert_eq!(
        delta("cortex_gateway_generation_tokens_per_second_count"),
        1.0
    );
    let speed = delta("cortex_gateway_generation_tokens_per_second_sum");
    let expected = (generated - 1) as f64 / itl;
    assert!(
        (speed - expected).abs() < expected * 1e-3,
        "tokens/s {speed}, expected {expected}"
    );
    let route = ["model=\"smollm2\"", "neuron=\"n1\"", "dialect=\"openai\""];
    assert_eq!(
        metric(
            &after,
            "cortex_gateway_generation_tokens_per_second_count",
            &route
        ) - metric(
            &before,
            "cortex_gateway_generation_tokens_per_second_count",
            &route
        ),
        1.0
    );
    assert_eq!(
        metric(&after, "cortex_gateway_in_flight_requests", &route),
        0.0,
        "in-flight is labelled by model, neuron and dialect:\n{after}"
    );

    // A completions stream's first token is text too; a JSON answer shows no token timing.
    let before = fleet.metrics().await;
    let res = fleet
        .send(
            "/v1/completions",
            &json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 5,
            "ignore_eos": true, "stream": true}),
        )
        .await;
    assert!(res.text().await.unwrap().contains("[DONE]"));
    let (s, body) = fleet
        .post(
            "/v1/chat/completions",
            json!({"model": "smollm2", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let after = fleet.metrics().await;
    let delta = |name: &str| metric(&after, name, &[]) - metric(&before, name, &[]);
    assert_eq!(
        delta("cortex_gateway_time_to_first_token_seconds_count"),
        1.0
    );
    assert_eq!(
        delta("cortex_gateway_generation_tokens_per_second_count"),
        1.0
    );
    assert_eq!(
        delta("cortex_gateway_e2e_request_latency_seconds_count"),
        2.0
    );
}

/// An Anthropic stream asks the neuron for usage on every chunk (running totals): the token
/// counters take the request's last report once, not every chunk's. The same prompt sent again
/// is read from the neuron's prefix cache, and the cached counter says how much.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_with_usage_on_every_chunk_counts_its_tokens_once() {
    let fleet = Fleet::start_with(1, &[], "", &smollm2_only()).await;
    fleet.wait_state("smollm2", "ready").await;
    let system = "You are a careful assistant who answers in full sentences. ".repeat(30);
    let mut usages = Vec::new();
    for _ in 0..2 {
        let before = fleet.metrics().await;
        let res = fleet
            .send(
                "/v1/messages",
                &json!({"model": "smollm2", "stream": true, "max_tokens": 12, "temperature": 0,
                "system": system, "messages": [{"role": "user", "content": "Count to ten."}]}),
            )
            .await;
        assert_eq!(res.status(), 200);
        let text = res.text().await.unwrap();
        let delta_line = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .find(|v| v["type"] == "message_delta")
            .expect("a message_delta event");
        let u = delta_line["usage"].clone();
        let after = fleet.metrics().await;
        let route = ["model=\"smollm2\"", "dialect=\"anthropic\""];
        let delta = |name: &str| metric(&after, name, &route) - metric(&before, name, &route);
        let n = |k: &str| u[k].as_f64().unwrap();
        let prompt =
            n("input_tokens") + n("cache_read_input_tokens") + n("cache_creation_input_tokens");
        assert_eq!(delta("cortex_gateway_prompt_tokens_total"), prompt, "{u}");
        assert_eq!(
            delta("cortex_gateway_prompt_cached_tokens_total"),
            n("cache_read_input_tokens"),
            "{u}"
        );
        assert_eq!(
            delta("cortex_gateway_generation_tokens_total"),
            n("output_tokens"),
            "{u}"
        );
        usages.push(u);
    }
    assert!(
        usages[1]["cache_read_input_tokens"].as_u64().unwrap() >= 256,
        "the second request reads the system prompt from the cache: {:?}",
        usages
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_refused_before_a_neuron_are_counted_by_status_class_and_dialect() {
    let m = models_dir();
    let placements = format!(
        "{}\n[[placements]]\nname = \"broken\"\nminReplicas = 0\nmodel = {{ uri = \"file://{}/no-such-model.gguf\" }}\n",
        smollm2_only(),
        m.display()
    );
    let fleet = Fleet::start_with(
        1,
        &[],
        "api_keys = [\"sk-test\"]\nmax_body_bytes = 4096",
        &placements,
    )
    .await
    .with_key("sk-test");
    let post = |path: &str, key: Option<&str>, body: Vec<u8>| {
        let mut rb = fleet
            .http
            .post(format!("{}{path}", fleet.url))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            rb = rb.header("x-api-key", k);
        }
        async move { rb.send().await.unwrap().status().as_u16() }
    };
    let chat = |model: &str| {
        serde_json::to_vec(&json!({"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}))
            .unwrap()
    };
    let key = Some("sk-test");
    // The pinned model is loaded at start.
    fleet.wait_state("smollm2", "ready").await;
    assert_eq!(
        post("/v1/chat/completions", None, chat("smollm2")).await,
        401
    );
    assert_eq!(
        post("/v1/chat/completions", key, b"{not json".to_vec()).await,
        400
    );
    assert_eq!(post("/v1/completions", key, chat("gpt-9")).await, 404);
    assert_eq!(
        post("/v1/chat/completions", key, vec![b' '; 8192]).await,
        413
    );
    assert_eq!(post("/v1/messages", key, chat("claude-9")).await, 404);
    // A Messages request naming a served model but invalid: counted under that model.
    let bad = json!({"model": "smollm2", "max_tokens": 0, "messages": [{"role": "user", "content": "Hi"}]});
    assert_eq!(
        post("/v1/messages", key, serde_json::to_vec(&bad).unwrap()).await,
        400
    );
    // A model whose load fails: 503, counted under it, and the failed cold load has no neuron.
    assert_eq!(post("/v1/chat/completions", key, chat("broken")).await, 503);

    let text = fleet.metrics().await;
    let requests = |labels: &[&str]| metric(&text, "cortex_gateway_requests_total", labels);
    let unknown = ["model=\"unknown\"", "neuron=\"none\""];
    assert_eq!(
        requests(&[
            unknown[0],
            unknown[1],
            "dialect=\"openai\"",
            "status_class=\"4xx\""
        ]),
        4.0,
        "401, 400, 404 and 413:\n{text}"
    );
    assert_eq!(
        requests(&[unknown[0], "dialect=\"anthropic\"", "status_class=\"4xx\""]),
        1.0
    );
    assert_eq!(
        requests(&[
            "model=\"smollm2\"",
            "neuron=\"none\"",
            "dialect=\"anthropic\"",
            "status_class=\"4xx\""
        ]),
        1.0
    );
    assert_eq!(
        requests(&[
            "model=\"broken\"",
            "neuron=\"none\"",
            "dialect=\"openai\"",
            "status_class=\"5xx\""
        ]),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "cortex_gateway_cold_loads_total",
            &["model=\"broken\"", "neuron=\"none\"", "result=\"failure\""]
        ),
        1.0
    );
    // The pinned model's load at start names the neuron that got it.
    assert_eq!(
        metric(
            &text,
            "cortex_gateway_cold_loads_total",
            &["model=\"smollm2\"", "neuron=\"n1\"", "result=\"success\""]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "cortex_gateway_cold_load_duration_seconds_count",
            &["model=\"smollm2\"", "neuron=\"n1\""]
        ),
        1.0,
        "{text}"
    );
    // Nothing refused reached a neuron.
    assert_eq!(requests(&["neuron=\"n1\""]), 0.0, "{text}");
}
