//! End-to-end faults and bad input, static mode: real neuron processes (frozen with SIGSTOP where
//! a hang is wanted) and the real `cortex serve` on loopback, real SmolLM2 and Gemma 3 weights
//! (`scripts/fetch-test-models`). The official SDKs' view of the same faults is in
//! `tests/python/test_gateway_faults.py`.

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, metric, models_dir};
use futures::StreamExt;
use serde_json::{Value, json};

/// models.toml: smollm2 pinned, and a cold copy of Gemma 3 under each of `cold`.
fn placements(cold: &[&str]) -> String {
    let m = models_dir();
    let mut out = format!(
        "[[placements]]\nname = \"smollm2\"\npinned = true\nmodel = {{ uri = \"file://{}/SmolLM2-135M-Instruct.Q4_1.gguf\" }}\n",
        m.display()
    );
    for name in cold {
        out.push_str(&format!(
            "[[placements]]\nname = \"{name}\"\nminReplicas = 0\ncontextLength = 2048\nmodel = {{ uri = \"file://{}/gemma-3-270m-Q4_K_M.gguf\" }}\n",
            m.display()
        ));
    }
    out
}

fn ask(model: &str) -> Value {
    json!({"model": model, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
}

/// Sends `body` and reads the whole answer: status, headers, text.
async fn post_text(
    fleet: &Fleet,
    path: &str,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, String) {
    let r = fleet.send(path, body).await;
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversize_body_gets_413_in_the_callers_dialect_naming_the_limit_and_the_key() {
    let fleet = Fleet::start_with(1, &[], "max_body_bytes = 4096", &placements(&[])).await;
    fleet.wait_state("smollm2", "ready").await;
    let pad = "x".repeat(8192);
    let big = json!({"model": "smollm2", "max_tokens": 4, "prompt": pad,
        "messages": [{"role": "user", "content": pad}]});
    let says_how =
        |m: &str| m.contains("limit of 4096 bytes") && m.contains("[gateway] max_body_bytes");
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let (s, body) = fleet.post(path, big.clone()).await;
        assert_eq!(s, 413, "{path}: {body}");
        assert_eq!(body["error"]["code"], "request_too_large", "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert!(
            says_how(body["error"]["message"].as_str().unwrap()),
            "{body}"
        );
    }
    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        let (s, body) = fleet.post(path, big.clone()).await;
        assert_eq!(s, 413, "{path}: {body}");
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], "request_too_large", "{body}");
        assert!(
            says_how(body["error"]["message"].as_str().unwrap()),
            "{body}"
        );
    }
    // A body sent in chunks, with no length announced, meets the same limit.
    let chunks = futures::stream::iter(
        (0..4).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 2048]))),
    );
    let r = fleet
        .http
        .post(format!("{}/v1/messages", fleet.url))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "request_too_large", "{body}");
    // Under the limit, the same gateway answers.
    let (s, body) = fleet.post("/v1/chat/completions", ask("smollm2")).await;
    assert_eq!(s, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_between_the_neurons_old_limit_and_the_gateways_is_answered() {
    // Both limits default to 32 MiB (the neuron's was 4 MiB and refused what the gateway took).
    let fleet = Fleet::start_with(1, &[], "", &placements(&[])).await;
    fleet.wait_state("smollm2", "ready").await;
    let ten_mib = 10 << 20;
    // OpenAI: the caller's bytes go to the neuron as they came, padding and all.
    let mut body = serde_json::to_vec(&ask("smollm2")).unwrap();
    body.resize(body.len() + ten_mib, b' ');
    let r = fleet
        .http
        .post(format!("{}/v1/chat/completions", fleet.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion", "{answer}");
    // Anthropic: the request is translated, so the neuron gets as many bytes only from content;
    // a tool described at length keeps the prompt short (SmolLM2's chat template leaves tools out).
    let mut with_tool = ask("smollm2");
    with_tool["tools"] = json!([{"name": "lookup", "description": "x".repeat(ten_mib),
        "input_schema": {"type": "object", "properties": {}}}]);
    let (s, answer) = fleet.post("/v1/messages", with_tool).await;
    assert_eq!(s, 200, "{answer}");
    assert_eq!(answer["type"], "message", "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_neurons_lower_body_limit_reaches_the_caller_as_413_in_its_dialect_and_the_neuron_stays_up()
 {
    let fleet = Fleet::start_with(1, &["--max-body-bytes", "65536"], "", &placements(&[])).await;
    fleet.wait_state("smollm2", "ready").await;
    let mut big = ask("smollm2");
    big["messages"][0]["content"] = json!("x".repeat(100_000));
    let mut streamed = big.clone();
    streamed["stream"] = json!(true);
    let names_it = |m: &str| {
        m.contains("neuron 'n1' refused the request body")
            && m.contains("limit of 65536 bytes")
            && m.contains("--max-body-bytes")
    };
    for body in [&big, &streamed] {
        let (s, _, text) = post_text(&fleet, "/v1/chat/completions", body).await;
        assert_eq!(s, 413, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["code"], "request_too_large", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(names_it(v["error"]["message"].as_str().unwrap()), "{v}");
    }
    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        let (s, _, text) = post_text(&fleet, path, &big).await;
        assert_eq!(s, 413, "{path}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], "request_too_large", "{v}");
        assert!(names_it(v["error"]["message"].as_str().unwrap()), "{v}");
    }
    // An Anthropic stream has started (with a ping) before the neuron is asked: its error event.
    let (s, _, text) = post_text(&fleet, "/v1/messages", &streamed).await;
    assert_eq!(s, 200, "{text}");
    let error = text
        .split("\n\n")
        .find_map(|e| e.strip_prefix("event: error\ndata: "))
        .unwrap_or_else(|| panic!("no error event: {text}"));
    let error: Value = serde_json::from_str(error).unwrap();
    assert_eq!(error["error"]["type"], "request_too_large", "{error}");
    assert!(
        names_it(error["error"]["message"].as_str().unwrap()),
        "{error}"
    );
    // No neuron failure: all five were answered by n1 (4xx), none failed over, and n1 stays up
    // and answers the next request.
    let text = fleet.metrics().await;
    let requests = |class: &str| {
        metric(
            &text,
            "cortex_gateway_requests_total",
            &["neuron=\"n1\"", &format!("status_class=\"{class}\"")],
        )
    };
    assert_eq!((requests("4xx"), requests("5xx")), (5.0, 0.0), "{text}");
    assert_eq!(
        metric(&text, "cortex_gateway_neuron_up", &["neuron=\"n1\""]),
        1.0
    );
    let (s, body) = fleet.post("/v1/chat/completions", ask("smollm2")).await;
    assert_eq!(s, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_neuron_frozen_during_a_load_fails_it_promptly_and_another_neuron_loads_the_model() {
    // The load bound is far beyond what the test waits: only noticing the frozen neuron ends it.
    let fleet = Fleet::start_with(
        2,
        &[],
        "load_timeout_secs = 300\nrequest_timeout_secs = 60",
        &placements(&["gemma3"]),
    )
    .await;
    fleet.wait_state("smollm2", "ready").await;
    let url = fleet.url.clone();
    let first = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .json(&ask("gemma3"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    // Freeze whichever neuron the planner gave the load to, while it loads.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let frozen = 'found: loop {
        assert!(
            Instant::now() < deadline,
            "no neuron ever started loading gemma3"
        );
        for (i, (port, _)) in fleet.neurons.iter().enumerate() {
            let r = http
                .get(format!("http://127.0.0.1:{port}/models/gemma3"))
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                let m: Value = r.json().await.unwrap();
                assert_ne!(
                    m["state"], "ready",
                    "the load ended before it could be frozen"
                );
                break 'found i;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    fleet.signal(frozen, "-STOP");
    let frozen_at = Instant::now();
    // A request that comes after the freeze must not wait on the doomed load either.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (s2, _, body2) = post_text(&fleet, "/v1/chat/completions", &ask("gemma3")).await;
    let (s1, body1) = first.await.unwrap();
    let took = frozen_at.elapsed();
    fleet.signal(frozen, "-CONT");
    assert_eq!(s1, 200, "{body1}");
    assert_eq!(s2, 200, "{body2}");
    assert!(
        took < Duration::from_secs(90),
        "the load outlived its frozen neuron by {took:?}"
    );
    let other = format!("n{}", 2 - frozen);
    let m = fleet.wait_state("gemma3", "ready").await;
    let on: Vec<&str> = m["loaded_on"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["neuron"].as_str().unwrap())
        .collect();
    assert!(on.contains(&other.as_str()), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_load_bound_every_dialect_is_told_when_to_retry() {
    let fleet = Fleet::start_with(1, &[], "load_timeout_secs = 1", &placements(&["gemma3"])).await;
    fleet.wait_state("smollm2", "ready").await;
    // Gemma 3 takes longer than a second to load here; the three share its one load.
    let stream = |mut v: Value| {
        v["stream"] = json!(true);
        v
    };
    let (plain, streamed) = (ask("gemma3"), stream(ask("gemma3")));
    let ((s_an, h_an, an), (s_ans, _, ans), (s_oas, _, oas)) = tokio::join!(
        post_text(&fleet, "/v1/messages", &plain),
        post_text(&fleet, "/v1/messages", &streamed),
        post_text(&fleet, "/v1/chat/completions", &streamed),
    );
    // Anthropic, not streaming: 503 with Retry-After, in Anthropic's shape.
    assert_eq!(s_an, 503, "{an}");
    assert_eq!(h_an["retry-after"], "10");
    let body: Value = serde_json::from_str(&an).unwrap();
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], "overloaded_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("could not be loaded in 1 s; the load goes on, retry after 10 s"),
        "{body}"
    );
    // Anthropic, streaming: the stream started, so the hint is in the error event.
    assert_eq!(s_ans, 200);
    assert!(ans.contains("event: ping"), "{ans}");
    let error = ans
        .split("\n\n")
        .find_map(|e| e.strip_prefix("event: error\ndata: "))
        .unwrap_or_else(|| panic!("no error event: {ans}"));
    let error: Value = serde_json::from_str(error).unwrap();
    assert_eq!(error["error"]["type"], "overloaded_error", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retry after 10 s"),
        "{error}"
    );
    // OpenAI, streaming: the error event carries `retry_after` in its error object.
    assert_eq!(s_oas, 200);
    let data = oas
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .find(|d| d.contains("\"error\""))
        .unwrap_or_else(|| panic!("no error event: {oas}"));
    let error: Value = serde_json::from_str(data).unwrap();
    assert_eq!(error["error"]["retry_after"], 10, "{error}");
    assert_eq!(error["error"]["type"], "service_unavailable", "{error}");
    assert!(oas.trim_end().ends_with("data: [DONE]"), "{oas}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_neurons_own_retry_after_reaches_the_caller_in_each_dialect() {
    // A neuron that queues nothing refuses every request with 429 and Retry-After.
    let fleet = Fleet::start_with(1, &["--max-queue", "0"], "", &placements(&[])).await;
    fleet.wait_state("smollm2", "ready").await;
    let mut streamed = ask("smollm2");
    streamed["stream"] = json!(true);
    for (path, body) in [
        ("/v1/chat/completions", ask("smollm2")),
        ("/v1/chat/completions", streamed),
    ] {
        let (s, h, text) = post_text(&fleet, path, &body).await;
        assert_eq!(s, 429, "{text}");
        assert_eq!(h["retry-after"], "1", "{text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("retry after"),
            "{body}"
        );
    }
    let (s, h, text) = post_text(&fleet, "/v1/messages", &ask("smollm2")).await;
    assert_eq!(s, 429, "{text}");
    assert_eq!(h["retry-after"], "1", "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
}

/// Reads a stream until its first `data` event and asserts that `keepalive`s came before it,
/// one at once and then about one every `every` seconds (at 5 s, the default, a load this long
/// would get one or two).
async fn assert_keepalives_before_data(
    fleet: &Fleet,
    path: &str,
    body: &Value,
    keepalive: &str,
    data: &str,
    every: f64,
) {
    let started = Instant::now();
    let r = fleet.send(path, body).await;
    assert_eq!(r.status(), 200);
    let mut s = r.bytes_stream();
    let mut text = String::new();
    while let Some(c) = s.next().await {
        text.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
        if let Some(at) = text.find(data) {
            let (count, waited) = (text[..at].matches(keepalive).count(), started.elapsed());
            let due = (waited.as_secs_f64() / every) as usize;
            assert!(
                count >= 3 && count + 2 >= due / 2,
                "{path}: {count} keep-alives in {waited:?}: {text}"
            );
            return;
        }
    }
    panic!("{path}: no {data} in {text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alives_repeat_at_the_configured_interval_while_a_cold_model_loads() {
    let fleet = Fleet::start_with(
        1,
        &[],
        "keepalive_secs = 0.2",
        &placements(&["gemma-a", "gemma-b"]),
    )
    .await;
    fleet.wait_state("smollm2", "ready").await;
    let mut openai = json!({"model": "gemma-a", "prompt": "The capital of France is", "max_tokens": 4, "stream": true});
    let comment = ": loading model\n\n";
    assert_keepalives_before_data(&fleet, "/v1/completions", &openai, comment, "data: {", 0.2)
        .await;
    let mut anthropic = ask("gemma-b");
    anthropic["stream"] = json!(true);
    let (ping, start) = ("event: ping\n", "event: message_start");
    assert_keepalives_before_data(&fleet, "/v1/messages", &anthropic, ping, start, 0.2).await;
    // The default body limit is well above axum's 2 MB: a 3 MB body is read (and routed).
    openai["model"] = json!("no-such-model");
    openai["padding"] = json!("x".repeat(3 << 20));
    let (s, body) = fleet.post("/v1/completions", openai).await;
    assert_eq!(s, 404, "{body}");
}
