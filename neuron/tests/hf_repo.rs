//! Loading by Hugging Face reference: the real `hf-hub` client in the neuron downloads from a
//! loopback server that answers the hub's API (the hub itself is unreachable from CI), with the
//! real SmolLM2 file behind it. Covers quant selection, the error that lists the quants a
//! repository has, download progress (`downloading → loading → ready`), and `HF_HUB_OFFLINE`.

mod common;

use std::collections::HashMap;
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

/// repository → file → bytes
type Files = HashMap<String, HashMap<String, Vec<u8>>>;

async fn info(
    State(hub): State<Arc<Files>>,
    Path((org, name, _rev)): Path<(String, String, String)>,
) -> Response {
    match hub.get(&format!("{org}/{name}")) {
        Some(files) => axum::Json(json!({
            "sha": COMMIT,
            "siblings": files.keys().map(|f| json!({"rfilename": f})).collect::<Vec<_>>(),
        }))
        .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `resolve` with the headers and byte ranges hf-hub relies on; each range answer of a large file
/// is slowed a little so the download is long enough to be watched.
async fn resolve(
    State(hub): State<Arc<Files>>,
    Path((org, name, _rev, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(data) = hub.get(&format!("{org}/{name}")).and_then(|f| f.get(&file)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let total = data.len();
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
    if end > 0 && total > 50_000_000 {
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header("x-repo-commit", COMMIT)
        .header(header::ETAG, format!("\"{org}-{name}-{file}\""))
        .header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{end}/{total}"),
        )
        .body(Body::from(data[start..=end].to_vec()))
        .unwrap()
}

async fn serve_hub(files: Files) -> (String, tokio::task::JoinHandle<()>) {
    let app = Router::new()
        .route("/api/models/{org}/{name}/revision/{rev}", get(info))
        .route("/{org}/{name}/resolve/{rev}/{*file}", get(resolve))
        .with_state(Arc::new(files));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, task)
}

fn repo(files: &[(&str, Vec<u8>)]) -> HashMap<String, Vec<u8>> {
    files
        .iter()
        .map(|(n, b)| (n.to_string(), b.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn repo_and_quant_download_with_progress_then_serve_offline_from_the_cache() {
    let smol = std::fs::read(common::model_path(SMOLLM2)).unwrap();
    let files: Files = [(
        REPO.to_string(),
        repo(&[
            ("README.md", b"# test".to_vec()),
            ("SmolLM2-135M-Instruct.Q4_1.gguf", smol),
        ]),
    )]
    .into();
    let (hub_url, hub) = serve_hub(files).await;
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

#[tokio::test(flavor = "multi_thread")]
async fn a_gguf_without_tokenizer_takes_tokenizer_json_from_the_base_repo_and_errors_name_every_repo_tried()
 {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    common::write_tiny(&gguf, "qwen3", false);
    let tiny = std::fs::read(&gguf).unwrap();
    let files: Files = [
        (
            "test-org/tiny-GGUF".to_string(),
            repo(&[("tiny-Q8_0.gguf", tiny.clone())]),
        ),
        (
            "test-org/tiny".to_string(),
            repo(&[(
                "tokenizer.json",
                common::smollm2_tokenizer_json().into_bytes(),
            )]),
        ),
        (
            "test-org/orphan-GGUF".to_string(),
            repo(&[("orphan-Q8_0.gguf", tiny)]),
        ),
    ]
    .into();
    let (hub_url, _hub) = serve_hub(files).await;
    let hf_home = tempfile::tempdir().unwrap();
    let n = Neuron::start_with_env(
        &[],
        &[
            ("HF_ENDPOINT", &hub_url),
            ("HF_HOME", &hf_home.path().display().to_string()),
        ],
    );
    let c = n.client();
    let (s, body) = c
        .post(
            "/models/load?wait=true",
            json!({"id": "tiny", "source": {"repo": "test-org/tiny-GGUF"}}),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = c
        .post("/v1/chat/completions", json!({"model": "tiny", "max_tokens": 4,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]}))
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        body["usage"]["prompt_tokens"], 19,
        "the tokenizer.json tokenizes like the GGUF metadata did"
    );

    let (s, body) = c
        .post(
            "/models/load?wait=true",
            json!({"id": "orphan", "source": {"repo": "test-org/orphan-GGUF"}}),
        )
        .await;
    assert_eq!(s, 422, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("tried: test-org/orphan-GGUF (") && msg.contains("; test-org/orphan ("),
        "{msg}"
    );
    assert!(msg.contains("tokenizerRepo"), "{msg}");
    // Naming a tokenizerRepo fixes it.
    let (s, body) = c
        .post("/models/load?wait=true", json!({"id": "orphan", "source": {"repo": "test-org/orphan-GGUF", "tokenizerRepo": "test-org/tiny"}}))
        .await;
    assert_eq!(s, 200, "{body}");
}
