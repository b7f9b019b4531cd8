//! The prefix cache, end to end: the real `neuron` binary with real SmolLM2 and Gemma 3 weights
//! (`scripts/fetch-test-models`), prompts that start alike sent one after another and at once,
//! as agents send them.

mod common;

use common::{Client, GEMMA3, Neuron, SMOLLM2, model_path};
use futures::StreamExt;
use serde_json::{Value, json};

/// A system prompt of several hundred tokens, as an agent's tools and instructions are.
fn system() -> String {
    "You are a careful assistant for a bakery. Answer briefly, politely and only about bread, \
     cakes, opening hours and prices. The shop opens at seven and closes at six. "
        .repeat(14)
}

async fn complete(c: &Client, prompt: &str, max_tokens: u32) -> Value {
    let (s, b) = c
        .post(
            "/v1/completions",
            json!({"model": "m", "prompt": prompt, "max_tokens": max_tokens,
                   "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    b
}

fn text(b: &Value) -> String {
    b["choices"][0]["text"].as_str().unwrap().to_string()
}

fn cached(b: &Value) -> u64 {
    b["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage.prompt_tokens_details.cached_tokens in {b}"))
}

fn prompt_tokens(b: &Value) -> u64 {
    b["usage"]["prompt_tokens"].as_u64().unwrap()
}

async fn load_with(c: &Client, file: &str, context: usize) {
    let uri = format!("file://{}", model_path(file).display());
    let (s, b) = c
        .post(
            "/models/load?wait=true",
            json!({"id": "m", "source": {"uri": uri}, "contextLength": context}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
}

/// Three turns of a conversation on a neuron that keeps prefixes, and each turn again on a
/// neuron that has seen nothing: the same greedy tokens, and the warm turns read most of their
/// prompt from the cache.
async fn hits_give_the_same_tokens_as_misses(file: &str) {
    let warm = Neuron::start(&[]);
    let w = warm.client();
    w.load("m", file).await;
    let mut prompt = format!("{}\nQuestion: when do you open?\nAnswer:", system());
    let mut answers = Vec::new();
    for (turn, question) in [
        "do you sell rye bread?",
        "how much is a cake?",
        "and on Sunday?",
    ]
    .iter()
    .enumerate()
    {
        let b = complete(&w, &prompt, 24).await;
        let n = prompt_tokens(&b);
        if turn == 0 {
            assert_eq!(
                cached(&b),
                0,
                "{file}: nothing is cached on a new neuron: {b}"
            );
        } else {
            // Everything before this turn's question (the earlier prompt and its answer) in
            // whole 64-token blocks.
            assert!(
                cached(&b) + 64 + 40 >= n && cached(&b) > 0,
                "{file}: turn {turn} read only {} of {n} prompt tokens from the cache",
                cached(&b)
            );
        }
        answers.push((prompt.clone(), text(&b)));
        prompt = format!("{prompt}{}\nQuestion: {question}\nAnswer:", text(&b));
    }
    drop(warm);
    let cold = Neuron::start(&[]);
    let c = cold.client();
    c.load("m", file).await;
    for (prompt, warm_answer) in answers.iter().rev() {
        // Latest first, so nothing earlier is cached when each is computed.
        c.post("/models/unload", json!({"id": "m"})).await;
        c.load("m", file).await;
        let b = complete(&c, prompt, 24).await;
        assert_eq!(cached(&b), 0);
        assert_eq!(
            &text(&b),
            warm_answer,
            "{file}: a cache hit changed the answer"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn smollm2_cache_hits_give_the_same_greedy_tokens_as_misses() {
    hits_give_the_same_tokens_as_misses(SMOLLM2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn gemma3_cache_hits_give_the_same_greedy_tokens_as_misses() {
    hits_give_the_same_tokens_as_misses(GEMMA3).await;
}

/// The default prefix cache holds one full context beside the running requests: a long prompt
/// survives the next long one. With `--prefix-cache-memory 0` it does not.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_prompt_outlives_the_next_long_one_by_default_and_not_without_room() {
    let a = format!(
        "{}\nQuestion: when do you open?\nAnswer:",
        system().repeat(2)
    );
    let b = format!(
        "{}\nQuestion: what is in the bread?\nAnswer:",
        "Our flour is milled nearby from wheat and rye grown on three farms. ".repeat(50)
    );
    for (flags, kept) in [
        (&[][..], true),
        (&["--prefix-cache-memory", "0"][..], false),
    ] {
        let n = Neuron::start(flags);
        let c = n.client();
        load_with(&c, SMOLLM2, 1024).await;
        let first = complete(&c, &a, 4).await;
        assert!(prompt_tokens(&first) > 700, "{first}");
        let other = complete(&c, &b, 4).await;
        assert!(prompt_tokens(&other) > 600, "{other}");
        let again = complete(&c, &a, 4).await;
        let hit = cached(&again);
        if kept {
            assert!(
                hit + 64 > prompt_tokens(&again),
                "{flags:?}: only {hit} tokens kept"
            );
            let (_, st) = c.get("/models/m").await;
            assert!(st["prefixCacheBytes"].as_u64().unwrap() > 0, "{st}");
            assert!(st["prefixCacheUsedBytes"].as_u64().unwrap() > 0, "{st}");
        } else {
            // Only what the second prompt left of the 1,024-token pool (the least recent
            // blocks, a's tail, went first).
            let left = 1024 - prompt_tokens(&other);
            assert!(
                hit <= left && hit + 64 < prompt_tokens(&again),
                "{flags:?}: {hit} tokens kept, with room for {left}"
            );
        }
    }
}

/// Two requests that share a long prefix, sent at once: the prefix is computed once (the
/// second waits for the first's blocks), both count what they read from the cache, and the
/// answers are those each gets alone.
#[tokio::test(flavor = "multi_thread")]
async fn requests_at_once_that_share_a_prefix_compute_it_once() {
    let n = Neuron::start(&[]);
    let c = n.client();
    c.load("m", SMOLLM2).await;
    let p1 = format!("{}\nQuestion: do you sell rye bread?\nAnswer:", system());
    let p2 = format!("{}\nQuestion: how much is a cake?\nAnswer:", system());
    let (b1, b2) = tokio::join!(complete(&c, &p1, 16), complete(&c, &p2, 16));
    let shared = cached(&b1) + cached(&b2);
    assert!(
        shared + 64 + 20 >= prompt_tokens(&b2),
        "one of them read the shared prefix from the other's blocks: cached {} and {} of {}",
        cached(&b1),
        cached(&b2),
        prompt_tokens(&b2)
    );
    // Alone, on a neuron without those blocks.
    let m = Neuron::start(&[]);
    let d = m.client();
    d.load("m", SMOLLM2).await;
    assert_eq!(text(&complete(&d, &p2, 16).await), text(&b2));
    let (_, st) = c.get("/metrics").await;
    let st = st.as_str().unwrap().to_string();
    let line = st
        .lines()
        .find(|l| l.starts_with("vllm:prefix_cache_hits_total{model_name=\"m\"}"))
        .unwrap_or_else(|| panic!("no prefix hits counter in\n{st}"));
    assert!(line.ends_with(&format!(" {shared}")), "{line} vs {shared}");
}

/// Streams report cached tokens too: in the usage chunk, and in every chunk after the prompt
/// is read with `continuous_usage_stats`.
#[tokio::test(flavor = "multi_thread")]
async fn streamed_usage_counts_cached_tokens() {
    let n = Neuron::start(&[]);
    let c = n.client();
    c.load("m", SMOLLM2).await;
    let prompt = format!("{}\nQuestion: when do you open?\nAnswer:", system());
    complete(&c, &prompt, 4).await;
    let res = c
        .send(
            "/v1/completions",
            &json!({"model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                    "stream": true,
                    "stream_options": {"include_usage": true, "continuous_usage_stats": true}}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let mut body = String::new();
    let mut s = res.bytes_stream();
    while let Some(chunk) = s.next().await {
        body.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let usages: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter(|v| !v["usage"].is_null())
        .collect();
    let last = usages.last().expect("a usage chunk");
    assert_eq!(
        cached(last),
        prompt_tokens(last) / 64 * 64,
        "every whole block of the prompt came from the cache: {last}"
    );
    assert_eq!(
        last["usage"]["prompt_tokens_details"]["cache_creation_tokens"], 0,
        "the prompt's blocks were all there: {last}"
    );
    assert!(
        usages.iter().filter(|u| cached(u) > 0).count() >= 2,
        "text chunks after the prompt carry the cached count:\n{body}"
    );
}

/// Unloading a model frees its cached blocks: loaded again, the same prompt reads nothing from
/// the cache.
#[tokio::test(flavor = "multi_thread")]
async fn an_unload_frees_the_cached_blocks() {
    let n = Neuron::start(&[]);
    let c = n.client();
    c.load("m", SMOLLM2).await;
    let prompt = format!("{}\nQuestion: when do you open?\nAnswer:", system());
    let first = complete(&c, &prompt, 4).await;
    let created = first["usage"]["prompt_tokens_details"]["cache_creation_tokens"].as_u64();
    assert_eq!(cached(&first), 0, "{first}");
    assert_eq!(
        created,
        Some(prompt_tokens(&first) / 64 * 64),
        "every whole block of the prompt was stored: {first}"
    );
    let (_, st) = c.get("/status").await;
    assert!(
        st["models"][0]["prefixCacheUsedBytes"].as_u64().unwrap() > 0,
        "{st}"
    );
    c.post("/models/unload", json!({"id": "m"})).await;
    c.load("m", SMOLLM2).await;
    let (_, st) = c.get("/status").await;
    assert_eq!(st["models"][0]["prefixCacheUsedBytes"], 0, "{st}");
    assert_eq!(cached(&complete(&c, &prompt, 4).await), 0);
}
