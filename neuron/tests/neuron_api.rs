//! End-to-end: the real `neuron` binary on a loopback port, real SmolLM2 and Gemma 3 weights
//! (`scripts/fetch-test-models`), driven over HTTP as a user would.

mod common;

use std::time::{Duration, Instant};

use common::{GEMMA3, Neuron, SMOLLM2};
use futures::StreamExt;
use serde_json::{Value, json};

fn content(body: &Value) -> String {
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn smollm2_and_gemma3_say_paris_is_the_capital_of_france() {
    let n = Neuron::start(&[]);
    let c = n.client();
    let info = c.load("smol", SMOLLM2).await;
    assert_eq!(info["architecture"], "llama");
    let info = c.load("gemma", GEMMA3).await;
    assert_eq!(info["architecture"], "gemma3");

    // SmolLM2-Instruct through its chat template.
    let body = c
        .chat(
            "smol",
            "What is the capital of France? Answer in one sentence.",
            40,
        )
        .await;
    let text = content(&body);
    assert!(text.contains("Paris"), "SmolLM2 answered {text:?}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
    let usage = &body["usage"];
    assert_eq!(
        usage["prompt_tokens"], 42,
        "llama.cpp counts 42 tokens for the same rendered prompt"
    );
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    // The Gemma 3 270M on PyPI is the pretrained model: ask it as text, stop at the line end.
    let (status, body) = c
        .post(
            "/v1/completions",
            json!({"model": "gemma", "prompt": "Question: What is the capital of France?\nAnswer:",
            "max_tokens": 8, "temperature": 0, "stop": ["\n"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert_eq!(text.trim(), "Paris", "Gemma 3 answered {text:?}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
    let (_, body) = c
        .post("/v1/completions", json!({"model": "smol", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}))
        .await;
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "SmolLM2 completed {text:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn load_reports_progress_and_loading_twice_is_harmless() {
    let n = Neuron::start(&[]);
    let c = n.client();
    let uri = format!("file://{}", common::model_path(GEMMA3).display());
    let (status, body) = c
        .post("/models/load", json!({"id": "g", "source": {"uri": uri}}))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["state"], "loading");
    let mut seen = vec![];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, m) = c.get("/models/g").await;
        seen.push(m["state"].as_str().unwrap().to_string());
        if m["state"] == "ready" {
            assert_eq!(m["progress"], 1.0);
            assert!(m["bytes"].as_u64().unwrap() > 250_000_000);
            break;
        }
        assert!(Instant::now() < deadline, "not ready: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen[0], "loading");
    // Same id, same source: harmless, answers with the state.
    let (status, body) = c
        .post("/models/load", json!({"id": "g", "source": {"uri": uri}}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "ready");
    // Same id, another source: a conflict that says what to do.
    let other = format!("file://{}", common::model_path(SMOLLM2).display());
    let (status, body) = c
        .post("/models/load", json!({"id": "g", "source": {"uri": other}}))
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unload it first")
    );
    let (_, list) = c.get("/models").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    // Unload frees it; it is gone afterwards.
    let (status, _) = c.post("/models/unload", json!({"id": "g"})).await;
    assert_eq!(status, 200);
    let (status, body) = c.get("/models/g").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    let (status, _) = c.post("/models/unload", json!({"id": "g"})).await;
    assert_eq!(status, 404);
}

/// Reads an SSE response into its `data:` payloads.
async fn sse_events(res: reqwest::Response) -> Vec<String> {
    let mut out = vec![];
    let mut buf = String::new();
    let mut stream = res.bytes_stream();
    while let Some(chunk) = stream.next().await {
        buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(i) = buf.find("\n\n") {
            let event: String = buf.drain(..i + 2).collect();
            for line in event.lines() {
                if let Some(d) = line.strip_prefix("data: ") {
                    out.push(d.to_string());
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn streaming_gives_the_same_text_then_finish_usage_and_done() {
    let n = Neuron::start(&[]);
    let c = n.client();
    c.load("smol", SMOLLM2).await;
    let req = json!({
        "model": "smol", "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": "Name three colours."}]
    });
    let (_, whole) = c.post("/v1/chat/completions", req.clone()).await;
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let res = c.send("/v1/chat/completions", &sreq).await;
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let events = sse_events(res).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|ch| ch["delta"]["content"].as_str())
        })
        .collect();
    assert_eq!(text, content(&whole));
    let finish: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|ch| &ch["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&whole["choices"][0]["finish_reason"]]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));
    assert_eq!(usage, &whole["usage"]);
    // Without include_usage no chunk carries usage.
    sreq["stream_options"] = json!({"include_usage": false});
    let res = c.send("/v1/chat/completions", &sreq).await;
    let events = sse_events(res).await;
    assert!(events.iter().all(|e| !e.contains("\"usage\"")));
}

#[tokio::test(flavor = "multi_thread")]
async fn max_tokens_stop_strings_and_seeds_behave() {
    let n = Neuron::start(&[]);
    let c = n.client();
    c.load("smol", SMOLLM2).await;
    // A length stop reports exactly max_tokens generated tokens.
    for field in ["max_tokens", "max_completion_tokens"] {
        let (status, body) = c
            .post(
                "/v1/chat/completions",
                json!({"model": "smol", "temperature": 0, field: 5,
                "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}]}),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(body["usage"]["completion_tokens"], 5);
    }
    // A stop string taken from the greedy answer cuts it there and is not returned.
    let base = json!({"model": "smol", "temperature": 0, "max_tokens": 30,
        "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}]});
    let (_, full) = c.post("/v1/chat/completions", base.clone()).await;
    let full = content(&full);
    let words: Vec<&str> = full.split(' ').collect();
    assert!(words.len() > 6, "{full}");
    let stop = format!(" {}", words[4]);
    let cut = full.find(&stop).unwrap();
    let mut req = base.clone();
    req["stop"] = json!([stop.clone(), "never-appears"]);
    let (_, body) = c.post("/v1/chat/completions", req).await;
    assert_eq!(content(&body), full[..cut], "stop {stop:?}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["choices"][0]["stop_reason"],
        json!(stop),
        "vLLM's stop_reason names the stop string"
    );
    // Sampling with a seed repeats; another seed (very likely) differs.
    let sample = |seed: u64| {
        let mut r = base.clone();
        r["temperature"] = json!(1.2);
        r["top_p"] = json!(0.95);
        r["top_k"] = json!(50);
        r["seed"] = json!(seed);
        r["presence_penalty"] = json!(0.5);
        r["frequency_penalty"] = json!(0.5);
        r
    };
    let (_, a) = c.post("/v1/chat/completions", sample(1)).await;
    let (_, b) = c.post("/v1/chat/completions", sample(1)).await;
    let (_, d) = c.post("/v1/chat/completions", sample(2)).await;
    assert_eq!(content(&a), content(&b));
    assert_ne!(content(&a), content(&d));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_openai_errors_and_the_neuron_keeps_serving() {
    let n = Neuron::start(&["--max-body-bytes", "20000"]);
    let c = n.client();
    let uri = format!("file://{}", common::model_path(SMOLLM2).display());
    let (s, _) = c
        .post(
            "/models/load?wait=true",
            json!({"id": "small", "source": {"uri": uri}, "contextLength": 64}),
        )
        .await;
    assert_eq!(s, 200);
    let chat = |body: Value| async { c.post("/v1/chat/completions", body).await };
    let user = json!([{"role": "user", "content": "hi"}]);

    let raw = c
        .http
        .post(format!("{}/v1/chat/completions", c.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    let body: Value = raw.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );

    let (s, b) = chat(json!({"model": "nope", "messages": user})).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );

    let long = "word ".repeat(200);
    let (s, b) =
        chat(json!({"model": "small", "messages": [{"role": "user", "content": long}]})).await;
    assert_eq!(s, 400);
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("maximum context length is 64 tokens") && msg.contains("in the prompt"),
        "{msg}"
    );
    assert_eq!(b["error"]["code"], "context_length_exceeded");

    let (s, b) = chat(json!({"model": "small", "messages": user, "max_tokens": 0})).await;
    assert_eq!((s, b["error"]["param"].as_str()), (400, Some("max_tokens")));
    let (s, b) = chat(json!({"model": "small", "messages": user, "max_tokens": 1000})).await;
    assert_eq!(s, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1000 for the completion"),
        "{b}"
    );
    let (s, b) = chat(json!({"model": "small", "messages": user, "temperature": 3})).await;
    assert_eq!(
        (s, b["error"]["param"].as_str()),
        (400, Some("temperature"))
    );
    let (s, b) =
        chat(json!({"model": "small", "messages": [{"role": "wizard", "content": "x"}]})).await;
    assert_eq!(s, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages[0].role 'wizard'")
    );
    let (s, b) = chat(json!({"model": "small", "messages": []})).await;
    assert_eq!(s, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at least one message")
    );
    let (s, _) = chat(
        json!({"model": "small", "messages": [{"role": "user", "content": "x".repeat(30000)}]}),
    )
    .await;
    assert_eq!(s, 413);
    let (s, b) = c
        .post(
            "/v1/completions",
            json!({"model": "small", "prompt": {"a": 1}}),
        )
        .await;
    assert_eq!((s, b["error"]["param"].as_str()), (400, Some("prompt")));

    // The neuron still answers.
    let (s, b) = chat(json!({"model": "small", "messages": user, "max_tokens": 3})).await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_sources_are_refused_and_broken_files_fail_without_taking_the_neuron_down() {
    let dir = tempfile::tempdir().unwrap();
    let dirs = format!("{},{}", common::model_dir().display(), dir.path().display());
    let n = Neuron::start(&["--model-dirs", &dirs]);
    let c = n.client();
    let c = &c;
    let load = |id: &str, uri: String| {
        let body = json!({"id": id, "source": {"uri": uri}});
        async move { c.post("/models/load?wait=true", body).await }
    };
    let (s, b) = load("a", "file:///etc/passwd".into()).await;
    assert_eq!(s, 400);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outside the model directories"),
        "{b}"
    );
    let (s, b) = load(
        "a",
        format!("file://{}/../../etc/passwd", dir.path().display()),
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        b["error"]["message"].as_str().unwrap().contains(".."),
        "{b}"
    );
    let (s, _) = load("a", format!("file://{}/missing.gguf", dir.path().display())).await;
    assert_eq!(s, 400);

    // Not a GGUF at all.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a gguf file at all").unwrap();
    let (s, b) = load("junk", format!("file://{}", junk.display())).await;
    assert_eq!(s, 422, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a readable GGUF"),
        "{b}"
    );
    // Truncated: the header is intact, the tensor data is cut short.
    let full = std::fs::read(common::model_path(SMOLLM2)).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    let (s, b) = load("cut", format!("file://{}", cut.display())).await;
    assert_eq!(s, 422, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("truncated"),
        "{b}"
    );

    // The neuron is still up and serves a good model.
    c.load("smol", SMOLLM2).await;
    let body = c.chat("smol", "Say hello.", 5).await;
    assert!(!content(&body).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_does_not_fit_is_refused_with_both_sizes() {
    let n = Neuron::start(&["--max-memory", "250000000"]);
    let c = n.client();
    let uri = format!("file://{}", common::model_path(SMOLLM2).display());
    let (s, b) = c
        .post(
            "/models/load",
            json!({"id": "smol", "source": {"uri": uri}}),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("needs") && msg.contains("free") && msg.contains("250000000 bytes"),
        "{msg}"
    );
    // A smaller context fits.
    let (s, b) = c
        .post(
            "/models/load?wait=true",
            json!({"id": "smol", "source": {"uri": uri}, "contextLength": 256}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn token_guards_everything_but_health_and_metrics() {
    let n = Neuron::start(&["--token", "s3cret"]);
    let open = reqwest::Client::new();
    for path in ["/v1/models", "/models", "/status"] {
        let r = open.get(format!("{}{path}", n.url)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["error"]["type"], "authentication_error");
        let r = open
            .get(format!("{}{path}", n.url))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            open.get(format!("{}{path}", n.url))
                .send()
                .await
                .unwrap()
                .status(),
            200,
            "{path}"
        );
    }
    let (s, _) = n.client().get("/status").await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_metrics_show_models_devices_and_requests() {
    let n = Neuron::start(&[]);
    let c = n.client();
    c.load("smol", SMOLLM2).await;
    c.chat("smol", "Hi", 4).await;
    let (_, st) = c.get("/status").await;
    let dev = &st["devices"][0];
    assert_eq!(dev["kind"], "cpu");
    assert!(dev["memoryTotal"].as_u64().unwrap() >= dev["memoryFree"].as_u64().unwrap());
    assert!(dev["memoryFree"].as_u64().unwrap() > 0);
    let m = &st["models"][0];
    assert_eq!(m["id"], "smol");
    assert!(m["lastUsedAt"].as_u64().unwrap() >= m["loadedAt"].as_u64().unwrap());
    assert_eq!(st["inflight"], 0);
    let text = reqwest::get(format!("{}/metrics", n.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "vllm:num_requests_running{model_name=\"smol\"} 0",
        "vllm:num_requests_waiting{model_name=\"smol\"} 0",
        "vllm:kv_cache_usage_perc{model_name=\"smol\"}",
        "vllm:prompt_tokens_total{model_name=\"smol\"}",
        "vllm:generation_tokens_total{model_name=\"smol\"} 4",
        "vllm:request_success_total{model_name=\"smol\",finished_reason=\"length\"} 1",
        "vllm:time_to_first_token_seconds_bucket{le=",
        "vllm:inter_token_latency_seconds_count{model_name=\"smol\"} 3",
        "vllm:e2e_request_latency_seconds_count{model_name=\"smol\"} 1",
        "vllm:request_queue_time_seconds_count{model_name=\"smol\"} 1",
        "cortex_neuron_model_load_duration_seconds_count{model_name=\"smol\"} 1",
        "cortex_neuron_model_bytes{model_name=\"smol\"}",
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_are_all_answered_and_a_full_queue_says_retry_after() {
    // One sequence at a time, so the queue (not the batch) takes the overflow.
    let n = Neuron::start(&["--max-queue", "2", "--max-batch", "1"]);
    let c = n.client();
    c.load("smol", SMOLLM2).await;
    let expected = content(&c.chat("smol", "What is 2+2?", 12).await);
    let reqs = (0..6).map(|_| {
        let c = &c;
        async move {
            c.post(
                "/v1/chat/completions",
                json!({"model": "smol", "temperature": 0, "max_tokens": 12,
                "messages": [{"role": "user", "content": "What is 2+2?"}]}),
            )
            .await
        }
    });
    let results = futures::future::join_all(reqs).await;
    let ok: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b)
        .collect();
    let busy: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(ok.len() + busy.len(), 6, "{results:?}");
    assert!(ok.len() >= 2, "{results:?}");
    assert!(
        !busy.is_empty(),
        "with a queue of 2, six at once must overflow: {results:?}"
    );
    for b in ok {
        assert_eq!(content(b), expected);
    }
    assert_eq!(busy[0]["error"]["code"], "rate_limit_exceeded");
    let res = c
        .http
        .post(format!("{}/v1/chat/completions", c.base))
        .json(&json!({"model": "smol", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        200,
        "the queue drains and the neuron serves again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_stops_its_generation() {
    let n = Neuron::start(&[]);
    let c = n.client();
    c.load("smol", SMOLLM2).await;
    let req = json!({"model": "smol", "stream": true, "max_tokens": 4000, "temperature": 0.8,
        "messages": [{"role": "user", "content": "Write a very long essay about the sea."}]});
    let res = c.send("/v1/chat/completions", &req).await;
    let mut stream = res.bytes_stream();
    stream.next().await.unwrap().unwrap();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, st) = c.get("/status").await;
        if st["inflight"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "generation still running after the client left: {st}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = reqwest::get(format!("{}/metrics", n.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let generated: f64 = text
        .lines()
        .find(|l| l.starts_with("vllm:generation_tokens_total{model_name=\"smol\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        generated < 1000.0,
        "generated {generated} tokens for a client that left"
    );
}
