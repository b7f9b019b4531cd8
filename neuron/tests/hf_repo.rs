//! Loading by Hugging Face reference: the real `hf-hub` client in the neuron downloads from a
//! loopback server that answers the hub's API (the hub itself is unreachable from CI), with the
//! real SmolLM2 file behind it. Covers quant selection, the error that lists the quants a
//! repository has, download progress (`downloading → loading → ready`), and `HF_HUB_OFFLINE`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::{Neuron, SMOLLM2};
use serde_json::json;

const REPO: &str = "test-org/SmolLM2-135M-Instruct-GGUF";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct Hub {
    gguf: Vec<u8>,
}

async fn info(Path((org, name, _rev)): Path<(String, String, String)>) -> Response {
    if format!("{org}/{name}") != REPO {
        return StatusCode::NOT_FOUND.into_response();
    }
    axum::Json(json!({"sha": COMMIT, "siblings": [
        {"rfilename": "README.md"},
        {"rfilename": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    ]}))
    .into_response()
}

/// `resolve` with the headers and byte ranges hf-hub relies on; each range answer is slowed a
/// little so the download is long enough to be watched.
async fn resolve(
    State(hub): State<Arc<Hub>>,
    Path((org, name, _rev, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if format!("{org}/{name}") != REPO || file != "SmolLM2-135M-Instruct.Q4_1.gguf" {
        return StatusCode::NOT_FOUND.into_response();
    }
    let total = hub.gguf.len();
    let (start, end) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .map(|(a, b)| {
            (
                a.parse::<usize>().unwrap(),
                b.parse::<usize>()
                    .map(|b| b.min(total - 1))
                    .unwrap_or(total - 1),
            )
        })
        .unwrap_or((0, total - 1));
    if end > 0 {
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header("x-repo-commit", COMMIT)
        .header(header::ETAG, "\"smollm2-etag\"")
        .header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{end}/{total}"),
        )
        .body(Body::from(hub.gguf[start..=end].to_vec()))
        .unwrap()
}

async fn serve_hub() -> (String, tokio::task::JoinHandle<()>) {
    let hub = Arc::new(Hub {
        gguf: std::fs::read(common::model_path(SMOLLM2)).unwrap(),
    });
    let app = Router::new()
        .route("/api/models/{org}/{name}/revision/{rev}", get(info))
        .route("/{org}/{name}/resolve/{rev}/{*file}", get(resolve))
        .with_state(hub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn repo_and_quant_download_with_progress_then_serve_offline_from_the_cache() {
    let (hub_url, hub) = serve_hub().await;
    let hf_home = tempfile::tempdir().unwrap();
    let home = hf_home.path().display().to_string();
    let n = Neuron::start_with_env(&[], &[("HF_ENDPOINT", &hub_url), ("HF_HOME", &home)]);
    let c = n.client();

    // A quant the repository lacks: the load is accepted, then fails listing what exists.
    let (s, body) = c
        .post(
            "/models/load",
            json!({"id": "wrong", "source": {"repo": REPO, "quant": "Q8_0"}}),
        )
        .await;
    assert_eq!(s, 202, "{body}");
    assert_eq!(body["state"], "downloading");
    let deadline = Instant::now() + Duration::from_secs(30);
    let failed = loop {
        let (_, m) = c.get("/models/wrong").await;
        if m["state"] == "failed" {
            break m;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        failed["error"],
        format!("no GGUF file matching quant Q8_0 in {REPO}; available: Q4_1")
    );

    // The right quant downloads with progress, loads and serves.
    let (s, body) = c
        .post(
            "/models/load",
            json!({"id": "smol", "source": {"repo": REPO, "quant": "Q4_1"}}),
        )
        .await;
    assert_eq!(s, 202, "{body}");
    let mut states = vec![];
    let mut progress = vec![];
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, m) = c.get("/models/smol").await;
        let state = m["state"].as_str().unwrap().to_string();
        if state == "downloading" {
            progress.push(m["progress"].as_f64().unwrap());
        }
        if states.last() != Some(&state) {
            states.push(state.clone());
        }
        if state == "ready" || state == "failed" {
            assert_eq!(state, "ready", "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        states.first().map(String::as_str),
        Some("downloading"),
        "{states:?}"
    );
    assert_eq!(
        states.last().map(String::as_str),
        Some("ready"),
        "{states:?}"
    );
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards: {progress:?}"
    );
    assert!(
        progress.iter().any(|p| *p > 0.0 && *p < 1.0),
        "no intermediate progress seen: {progress:?}"
    );
    let answer = c
        .chat(
            "smol",
            "What is the capital of France? Answer in one sentence.",
            30,
        )
        .await;
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris")
    );
    drop(n);

    // With the hub gone and HF_HUB_OFFLINE=1, the cached download is used as is.
    hub.abort();
    let n = Neuron::start_with_env(
        &[],
        &[
            ("HF_ENDPOINT", &hub_url),
            ("HF_HOME", &home),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    let c = n.client();
    let (s, body) = c
        .post(
            "/models/load?wait=true",
            json!({"id": "smol", "source": {"repo": REPO, "quant": "Q4_1"}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = c
        .post(
            "/models/load?wait=true",
            json!({"id": "other", "source": {"repo": "test-org/not-cached-GGUF", "quant": "Q4_1"}}),
        )
        .await;
    assert_eq!(s, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("HF_HUB_OFFLINE"),
        "{body}"
    );
}
