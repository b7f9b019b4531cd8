//! Eviction in static mode, on a real neuron whose memory is capped (`--max-memory`) so that the
//! pinned SmolLM2 and one more model fit, but not two more: loading a third evicts the least
//! recently used model that is not pinned, and the pinned one is never touched.

mod common;

use common::{Fleet, models_dir};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn lru_evicts_the_idle_model_and_never_the_pinned_one() {
    let m = models_dir();
    // smollm2 (context 8192) ≈ 474 MB, gemma3 (context 2048) ≈ 322 MB, smol-small (context 512)
    // ≈ 120 MB (quantized weights, an f16 KV cache for the running requests and as much again for
    // the prefix cache; embeddings stay quantized): the first two (796 MB) fit in 850 MB, all
    // three (916 MB) do not.
    let placements = format!(
        "[[placements]]\nname = \"smollm2\"\npinned = true\nmodel = {{ uri = \"file://{m}/SmolLM2-135M-Instruct.Q4_1.gguf\" }}\n\
         [[placements]]\nname = \"gemma3\"\nminReplicas = 0\ncontextLength = 2048\nmodel = {{ uri = \"file://{m}/gemma-3-270m-Q4_K_M.gguf\" }}\n\
         [[placements]]\nname = \"smol-small\"\nminReplicas = 0\ncontextLength = 512\nmodel = {{ uri = \"file://{m}/SmolLM2-135M-Instruct.Q4_1.gguf\" }}\n",
        m = m.display()
    );
    let fleet = Fleet::start_with(1, &["--max-memory", "850000000"], "", &placements).await;
    fleet.wait_state("smollm2", "ready").await;
    let ask = |model: &str| json!({"model": model, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0});

    let (s, b) = fleet.post("/v1/completions", ask("gemma3")).await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = fleet.post("/v1/completions", ask("smol-small")).await;
    assert_eq!(s, 200, "{b}");
    let states = |cat: &Vec<serde_json::Value>| -> Vec<(String, String)> {
        cat.iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_string(),
                    m["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let cat = fleet.catalogue().await;
    assert_eq!(
        states(&cat),
        [
            ("smollm2".into(), "ready".into()),
            ("gemma3".into(), "not_loaded".into()),
            ("smol-small".into(), "ready".into())
        ],
        "gemma3 was the least recently used model that is not pinned"
    );
    // And back: gemma3 needs more than is free, so smol-small (now the LRU unpinned one) goes.
    let (s, b) = fleet.post("/v1/completions", ask("gemma3")).await;
    assert_eq!(s, 200, "{b}");
    let cat = fleet.catalogue().await;
    assert_eq!(
        states(&cat),
        [
            ("smollm2".into(), "ready".into()),
            ("gemma3".into(), "ready".into()),
            ("smol-small".into(), "not_loaded".into())
        ]
    );
    let metrics = fleet.metrics().await;
    assert!(
        metrics.contains("cortex_gateway_evictions_total{model=\"gemma3\",neuron=\"n1\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cortex_gateway_evictions_total{model=\"smol-small\",neuron=\"n1\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("cortex_gateway_evictions_total{model=\"smollm2\","),
        "{metrics}"
    );
}
