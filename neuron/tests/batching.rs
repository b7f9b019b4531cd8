//! Continuous batching, end to end: the real `neuron` binary with real SmolLM2 and Gemma 3
//! weights (`scripts/fetch-test-models`), many clients at once over HTTP.

mod common;

use std::time::{Duration, Instant};

use common::{Client, GEMMA3, Neuron, SMOLLM2};
use futures::StreamExt;
use serde_json::{Value, json};

/// Eight prompts of different lengths; the longest spans several prefill chunks.
fn prompts() -> Vec<String> {
    let long = "The quick brown fox jumps over the lazy dog while the cat watches. ".repeat(30);
    vec![
        "Hi".into(),
        "The capital of France is".into(),
        "Write a list of three colours:".into(),
        format!("{long}Summarise the story above in one line:"),
        "1, 2, 3, 4, 5,".into(),
        "Once upon a time, in a small village by the sea, there lived".into(),
        "def fibonacci(n):".into(),
        "Translate to French: good morning, my friend. How are you today?".into(),
    ]
}

async fn complete(c: &Client, model: &str, prompt: &str, max_tokens: u32) -> Value {
    let (s, b) = c
        .post(
            "/v1/completions",
            json!({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                   "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    b
}

fn text(b: &Value) -> String {
    b["choices"][0]["text"].as_str().unwrap().to_string()
}

/// `(count of observations <= le, total count)` of a histogram series in /metrics.
async fn histogram(c: &Client, name: &str, model: &str, le: &str) -> (u64, u64) {
    let text = c
        .http
        .get(format!("{}/metrics", c.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |series: String| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    (
        value(format!(
            "{name}_bucket{{le=\"{le}\",model_name=\"{model}\"}} "
        )),
        value(format!("{name}_count{{model_name=\"{model}\"}} ")),
    )
}

async fn metric(c: &Client, series: &str) -> f64 {
    let text = c
        .http
        .get(format!("{}/metrics", c.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Each prompt alone, then all eight at once: greedy answers must be identical.
async fn same_alone_and_batched(file: &str) {
    let n = Neuron::start(&[]);
    let c = n.client();
    c.load("m", file).await;
    let prompts = prompts();
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(text(&complete(&c, "m", p, 24).await));
    }
    let (small_before, steps_before) = histogram(&c, "cortex_neuron_batch_size", "m", "4.0").await;
    let batched = futures::future::join_all(prompts.iter().map(|p| complete(&c, "m", p, 24))).await;
    for ((p, a), b) in prompts.iter().zip(&alone).zip(&batched) {
        assert_eq!(&text(b), a, "{file}: prompt {p:?} alone vs in a batch of 8");
        assert_eq!(b["usage"]["completion_tokens"], 24);
    }
    // The eight really ran together: some passes held more than four sequences.
    let (small, steps) = histogram(&c, "cortex_neuron_batch_size", "m", "4.0").await;
    assert!(
        steps - steps_before > small - small_before,
        "no pass held more than 4 sequences ({} of {} passes held at most 4)",
        small - small_before,
        steps - steps_before
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn smollm2_greedy_output_is_the_same_alone_and_in_a_batch_of_eight() {
    same_alone_and_batched(SMOLLM2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gemma3_greedy_output_is_the_same_alone_and_in_a_batch_of_eight() {
    same_alone_and_batched(GEMMA3).await;
}

/// Sampled answers too: with a seed, a request draws the same tokens alone and among seven
/// others (each sequence keeps its own sampler, wherever in the batch its draw runs), and
/// different seeds draw differently.
#[tokio::test(flavor = "multi_thread")]
async fn seeded_top_p_samples_are_the_same_alone_and_in_a_batch_of_eight() {
    let n = Neuron::start(&[]);
    let c = n.client();
    c.load("m", SMOLLM2).await;
    let ask = |prompt: String, seed: u64| {
        let c = &c;
        async move {
            let (s, b) = c
                .post(
                    "/v1/completions",
                    json!({"model": "m", "prompt": prompt, "max_tokens": 24, "ignore_eos": true,
                           "temperature": 1.0, "top_p": 0.9, "seed": seed}),
                )
                .await;
            assert_eq!(s, 200, "{b}");
            text(&b)
        }
    };
    let prompts = prompts();
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        alone.push(ask(p.clone(), 100 + i as u64).await);
    }
    let batched = futures::future::join_all(
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| ask(p.clone(), 100 + i as u64)),
    )
    .await;
    for ((p, a), b) in prompts.iter().zip(&alone).zip(&batched) {
        assert_eq!(b, a, "prompt {p:?} (seeded) alone vs in a batch of 8");
    }
    let others: Vec<String> =
        futures::future::join_all((0..4).map(|i| ask(prompts[5].clone(), 900 + i))).await;
    assert!(
        others.iter().any(|o| *o != alone[5]),
        "four other seeds all drew {:?}",
        alone[5]
    );
}

/// SmolLM2 keeps 23,040 bytes of KV cache per token on the CPU (30 layers, 3 KV heads of 64,
/// keys and values in f16).
const SMOLLM2_KV_TOKEN: u64 = 30 * 2 * 3 * 64 * 2;

#[tokio::test(flavor = "multi_thread")]
async fn a_small_kv_budget_makes_sequences_wait_and_preempts_without_dropping_any() {
    // Room for 512 tokens: six sequences of ~170 tokens cannot all hold their caches at once.
    let budget = 512 * SMOLLM2_KV_TOKEN;
    let n = Neuron::start(&["--kv-cache-memory", &budget.to_string()]);
    let c = n.client();
    let info = c.load("m", SMOLLM2).await;
    assert_eq!(info["kvCacheBytes"], budget, "{info}");
    assert_eq!(
        info["contextLength"], 512,
        "the budget bounds the context: {info}"
    );
    let prompts = &prompts()[..6];
    let mut alone = Vec::new();
    for p in prompts.iter().filter(|p| p.len() < 200) {
        alone.push(text(&complete(&c, "m", p, 150).await));
    }

    let watch = async {
        // /status while they run: never over budget.
        let (mut most, mut waited) = (0u64, false);
        let until = Instant::now() + Duration::from_secs(120);
        while Instant::now() < until {
            let (_, st) = c.get("/status").await;
            let m = &st["models"][0];
            let used = m["kvCacheUsedBytes"].as_u64().unwrap();
            assert!(used <= budget, "{used} > {budget}: {m}");
            most = most.max(used);
            waited |= m["queued"].as_u64().unwrap() > 0;
            if m["inflight"] == 0 && m["queued"] == 0 && most > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (most, waited)
    };
    let run = futures::future::join_all(
        prompts
            .iter()
            .filter(|p| p.len() < 200)
            .map(|p| complete(&c, "m", p, 150)),
    );
    let (results, (most, waited)) = tokio::join!(run, watch);
    for b in &results {
        assert_eq!(b["usage"]["completion_tokens"], 150, "{b}");
        assert_eq!(b["choices"][0]["finish_reason"], "length", "{b}");
    }
    assert!(most > budget / 2, "the batch used the budget: {most}");
    assert!(waited, "some sequence waited for room");
    let preempted = metric(&c, "vllm:num_preemptions_total{model_name=\"m\"} ").await;
    assert!(preempted >= 1.0, "growing past the budget preempts");
    // Preempted sequences are read again from their tokens, through the same attention kernel
    // and products their decoded tokens went through: greedy answers stay exactly as alone.
    let same = results
        .iter()
        .zip(&alone)
        .filter(|(b, a)| &text(b) == *a)
        .count();
    assert_eq!(
        same,
        alone.len(),
        "{same} of {} answers as alone",
        alone.len()
    );

    // A prompt longer than the whole budget is refused up front, in OpenAI's shape.
    let (s, b) = c
        .post(
            "/v1/completions",
            json!({"model": "m", "prompt": "word ".repeat(600), "max_tokens": 4}),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"]["code"], "context_length_exceeded", "{b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_leaves_the_batch_and_the_others_finish() {
    let n = Neuron::start(&[]);
    let c = n.client();
    c.load("m", SMOLLM2).await;
    let expected = text(&complete(&c, "m", "The capital of France is", 40).await);

    let quitter = async {
        let res = c
            .send(
                "/v1/completions",
                &json!({"model": "m", "prompt": "Count to a thousand:", "max_tokens": 4000,
                        "temperature": 0, "ignore_eos": true, "stream": true}),
            )
            .await;
        assert_eq!(res.status(), 200);
        let mut body = res.bytes_stream();
        for _ in 0..5 {
            body.next().await.unwrap().unwrap();
        }
        // Dropping the stream closes the connection.
    };
    let stayer = complete(&c, "m", "The capital of France is", 40);
    let ((), kept) = tokio::join!(quitter, stayer);
    assert_eq!(text(&kept), expected);

    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, st) = c.get("/status").await;
        let m = &st["models"][0];
        if m["inflight"] == 0 && m["kvCacheUsedBytes"] == 0 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the abandoned sequence is still running: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let generated = metric(&c, "vllm:generation_tokens_total{model_name=\"m\"} ").await;
    assert!(
        generated < 40.0 * 2.0 + 400.0,
        "the abandoned request stopped early, {generated} tokens in all"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_prompt_prefix_is_read_once_and_answers_do_not_change() {
    let system =
        "You are a careful assistant for a bakery. Answer briefly, politely and only about \
                  bread, cakes, opening hours and prices. "
            .repeat(12);
    let first = format!("{system}\nQuestion: when do you open?\nAnswer:");
    let second = format!("{system}\nQuestion: do you sell rye bread?\nAnswer:");

    // The second prompt on a neuron that has seen nothing like it.
    let cold = Neuron::start(&[]);
    let c = cold.client();
    c.load("m", SMOLLM2).await;
    let expected = text(&complete(&c, "m", &second, 24).await);
    drop(cold);

    let warm = Neuron::start(&[]);
    let c = warm.client();
    c.load("m", SMOLLM2).await;
    complete(&c, "m", &first, 24).await;
    let hits = "vllm:prefix_cache_hits_total{model_name=\"m\"} ";
    let before = metric(&c, hits).await;
    let (_, st) = c.get("/status").await;
    assert!(
        st["models"][0]["prefixCacheUsedBytes"].as_u64().unwrap() > 0,
        "the finished prompt's cache is kept for reuse: {st}"
    );
    let answer = text(&complete(&c, "m", &second, 24).await);
    let reused = metric(&c, hits).await - before;
    assert!(
        reused >= 256.0,
        "the shared system prompt is copied, not read again ({reused} tokens reused)"
    );
    assert_eq!(answer, expected, "reusing the prefix changed the answer");
}
