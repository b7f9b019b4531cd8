//! `[eviction] defrag_after_cycles` in static mode, on two real neurons: the planner spreads two
//! models over both, nothing moves before the N-th planning cycle, then that cycle moves the one
//! on the less used neuron beside the other so a whole neuron is free, without the model ever
//! being unavailable.

mod common;

use std::time::{Duration, Instant};

use common::{Fleet, models_dir};
use serde_json::{Value, json};

/// The neurons listing `model` in any state (a move shows as a second copy loading).
fn listed_on(cat: &[Value], model: &str) -> Vec<String> {
    let m = cat.iter().find(|m| m["id"] == model).unwrap();
    m["loaded_on"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["neuron"].as_str().unwrap().to_string())
        .collect()
}

fn holders(cat: &[Value], model: &str) -> Vec<String> {
    let m = cat.iter().find(|m| m["id"] == model).unwrap();
    m["loaded_on"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == "ready")
        .map(|c| c["neuron"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn defrag_consolidates_models_to_free_a_whole_neuron() {
    let m = models_dir();
    let placements = format!(
        "[[placements]]\nname = \"smollm2\"\ncontextLength = 1024\nmodel = {{ uri = \"file://{m}/SmolLM2-135M-Instruct.Q4_1.gguf\" }}\n\
         [[placements]]\nname = \"gemma3\"\ncontextLength = 1024\nmodel = {{ uri = \"file://{m}/gemma-3-270m-Q4_K_M.gguf\" }}\n",
        m = m.display()
    );
    // Both neurons run on this one host: a memory cap gives each its own free memory to report.
    let fleet = Fleet::start_with(
        2,
        &["--max-memory", "2000000000"],
        "\n[eviction]\ndefrag_after_cycles = 3\n",
        &placements,
    )
    .await;
    // Both load at start, one on each neuron (the planner picks the one with most free memory).
    let spread_at = Instant::now();
    let (smol_on, gemma_on) = loop {
        let cat = fleet.catalogue().await;
        let (s, g) = (holders(&cat, "smollm2"), holders(&cat, "gemma3"));
        if s.len() == 1 && g.len() == 1 {
            break (s, g);
        }
        assert!(spread_at.elapsed() < Duration::from_secs(60), "{cat:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(smol_on, gemma_on, "the planner spreads copies first");
    let spread_seen = Instant::now();

    // Planning cycles come every 5 s, the first ending with these loads: the third, 10 s later,
    // is the first to defragment. Until then nothing moves (a defrag every cycle, or every other,
    // would have started a copy by now).
    while spread_seen.elapsed() < Duration::from_secs(60) {
        let cat = fleet.catalogue().await;
        let (s, g) = (listed_on(&cat, "smollm2"), listed_on(&cat, "gemma3"));
        if s != smol_on || g != gemma_on {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let quiet = spread_seen.elapsed();
    assert!(
        quiet > Duration::from_secs(8),
        "a copy moved {quiet:?} after the spread, before the third cycle"
    );

    // Meanwhile requests keep working; after a defrag cycle both sit on one neuron (which one
    // depends on the bytes each model holds).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, b) = fleet
            .post(
                "/v1/completions",
                json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 2, "temperature": 0}),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        let cat = fleet.catalogue().await;
        let (s, g) = (holders(&cat, "smollm2"), holders(&cat, "gemma3"));
        if s.len() == 1 && s == g {
            break;
        }
        assert!(Instant::now() < deadline, "not consolidated: {cat:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The move is counted once the old copy's unload has been answered, which can come a moment
    // after the catalogue already shows the model gone from there.
    let counted_by = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = fleet.metrics().await;
        let moves = metrics
            .lines()
            .find_map(|l| l.strip_prefix("cortex_gateway_defrag_moves_total "))
            .map(str::to_string);
        if moves.as_deref() == Some("1") {
            break;
        }
        assert!(
            Instant::now() < counted_by && moves.as_deref() == Some("0"),
            "one move expected, metric says {moves:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stable afterwards: a later cycle has nothing to move.
    let together = holders(&fleet.catalogue().await, "gemma3");
    assert!(together == smol_on || together == gemma_on);
    tokio::time::sleep(Duration::from_secs(11)).await;
    let cat = fleet.catalogue().await;
    assert_eq!(holders(&cat, "smollm2"), together);
    assert_eq!(holders(&cat, "gemma3"), together);
}
