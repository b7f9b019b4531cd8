//! The gateway's HTTP API: `/v1/models` (the whole catalogue), `/v1/chat/completions` and
//! `/v1/completions` routed to the fleet, `/cortex/fleet` for `cortex status`, `/healthz`.
//! Errors are written in OpenAI's shape in one place ([`error_response`]), and in Anthropic's
//! for `/v1/messages` callers in another ([`AnthropicError`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use cortex_core::neuron::ModelState;
use serde_json::{Value, json};

use crate::config::Placement;
use crate::error::Error;
use crate::fleet::Fleet;
use crate::proxy::Call;
use crate::request::RequestHead;

pub struct AppState {
    pub fleet: Arc<Fleet>,
    /// SHA-256 (hex) of the accepted keys; empty = open.
    pub key_hashes: Vec<String>,
}

pub fn error_response(e: Error) -> Response {
    let mut res = (e.status(), Json(e.openai_body())).into_response();
    if let Some(s) = e.retry_after() {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    res
}

/// A gateway error in Anthropic's shape, for `/v1/messages` callers.
pub fn anthropic_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(crate::anthropic::error_body(status.as_u16(), message)),
    )
        .into_response()
}

fn anthropic_error_of(e: Error) -> Response {
    let mut res = anthropic_error(e.status(), &e.to_string());
    if let Some(s) = e.retry_after() {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    res
}

/// The request body, or why it could not be read: larger than `max_body_bytes` (axum's own
/// answer to that is plain text, which no SDK can read), or cut off.
fn read_body(st: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, Error> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::BodyTooLarge {
                limit: st.fleet.max_body_bytes,
            }
        } else {
            Error::InvalidRequest {
                message: format!("could not read the request body: {}", r.body_text()),
                param: None,
            }
        }
    })
}

/// Installed only when keys are configured (an open gateway pays nothing for it).
async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if req.uri().path() != "/healthz" {
        let h = req.headers();
        let given = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()));
        let ok = given.is_some_and(|g| {
            let h = crate::config::hash_key(g);
            st.key_hashes
                .iter()
                .any(|k| cortex_core::constant_time_eq(k.as_bytes(), h.as_bytes()))
        });
        if !ok {
            return if req.uri().path().starts_with("/v1/messages") {
                anthropic_error_of(Error::Unauthorized)
            } else {
                error_response(Error::Unauthorized)
            };
        }
    }
    next.run(req).await
}

/// Every placement, loaded or not, with where it is loaded and its state.
async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    let fleet = &st.fleet;
    let data: Vec<Value> = fleet
        .catalogue()
        .placements
        .iter()
        .flat_map(|p| {
            let mut on = Vec::new();
            let mut state = "not_loaded";
            for (n, s) in fleet.copies(p) {
                on.push(json!({"neuron": n.cfg.name, "state": s}));
                if s == ModelState::Ready {
                    state = "ready";
                } else if state != "ready" && s != ModelState::Failed {
                    state = "loading";
                }
            }
            let card = json!({
                "object": "model", "created": 0, "owned_by": "cortex",
                "state": state, "placement": p.name, "loaded_on": on,
                "pinned": p.spec.pinned, "min_replicas": p.spec.min_copies(),
            });
            p.names().map(move |id| {
                let mut c = card.clone();
                c["id"] = json!(id);
                c
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// Reads the body enough to route it; the neuron validates the rest and answers in OpenAI's shape.
/// A stream always asks the neuron for usage (to count tokens); the gateway drops that chunk again
/// when the client did not ask for it. The client's bytes go to the neuron as they came unless
/// something in them must change.
fn route(st: &AppState, body: &Bytes) -> Result<(Placement, Bytes, bool, Call), Error> {
    let head: RequestHead = serde_json::from_slice(body).map_err(|e| Error::InvalidRequest {
        message: match e.classify() {
            serde_json::error::Category::Data => format!("request body must be a JSON object: {e}"),
            _ => format!("request body is not valid JSON: {e}"),
        },
        param: None,
    })?;
    let model = head
        .model
        .as_ref()
        .and_then(Value::as_str)
        .ok_or(Error::InvalidRequest {
            message: "model is required; list models with GET /v1/models".into(),
            param: Some("model"),
        })?;
    let p = st
        .fleet
        .placement(model)
        .ok_or_else(|| Error::ModelNotFound(model.to_string()))?;
    let mut call = Call::new("openai");
    let renamed = p.name != model;
    if renamed {
        call.rename(&p.name, model);
    }
    let stream = head.stream.as_ref().and_then(Value::as_bool) == Some(true);
    let asked = head
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    call.strip_usage = stream && !asked;
    let body = match (renamed, call.strip_usage) {
        (false, false) => body.clone(),
        (false, true) if head.stream_options.is_none() => ask_usage(body),
        _ => rewrite(body, &p.name, call.strip_usage)?,
    };
    Ok((p, body, stream, call))
}

/// `body` (a JSON object without `stream_options`) asking for a usage chunk, spliced in
/// rather than parsed and written again.
fn ask_usage(body: &Bytes) -> Bytes {
    const FIELD: &[u8] = br#""stream_options":{"include_usage":true},"#;
    // The object has a `model`, so a field after the spliced one keeps the JSON valid.
    let open = body.iter().position(|&c| c == b'{').map_or(0, |i| i + 1);
    let mut out = Vec::with_capacity(body.len() + FIELD.len());
    out.extend_from_slice(&body[..open]);
    out.extend_from_slice(FIELD);
    out.extend_from_slice(&body[open..]);
    Bytes::from(out)
}

/// `body` naming the model as the neuron knows it, and asking for usage when `usage`.
fn rewrite(body: &Bytes, model: &str, usage: bool) -> Result<Bytes, Error> {
    let mut v: Value = serde_json::from_slice(body).map_err(|e| Error::InvalidRequest {
        message: format!("request body is not valid JSON: {e}"),
        param: None,
    })?;
    if usage {
        match v.get_mut("stream_options").and_then(Value::as_object_mut) {
            Some(o) => {
                o.insert("include_usage".into(), json!(true));
            }
            None => v["stream_options"] = json!({"include_usage": true}),
        }
    }
    v["model"] = json!(model);
    Ok(crate::proxy::json_body(&v))
}

async fn chat(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match read_body(&st, body).and_then(|b| route(&st, &b)) {
        Ok((p, body, stream, call)) => {
            crate::proxy::forward(
                st.fleet.clone(),
                p,
                "/v1/chat/completions",
                body,
                stream,
                call,
            )
            .await
        }
        Err(e) => error_response(e),
    }
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match read_body(&st, body).and_then(|b| route(&st, &b)) {
        Ok((p, body, stream, call)) => {
            crate::proxy::forward(st.fleet.clone(), p, "/v1/completions", body, stream, call).await
        }
        Err(e) => error_response(e),
    }
}

/// The placement an Anthropic request names and the request in the neurons' OpenAI dialect.
fn route_anthropic(
    st: &AppState,
    req: &cortex_core::anthropic::MessagesRequest,
) -> Result<(Placement, Value), Error> {
    let p = st
        .fleet
        .placement(&req.model)
        .ok_or_else(|| Error::ModelNotFound(req.model.clone()))?;
    crate::metrics::note_model(&p.name);
    let mut oa = crate::anthropic::to_openai(req)?;
    oa["model"] = json!(p.name);
    Ok((p, oa))
}

/// A neuron's whole answer: its status, its `Retry-After` (a full queue's 429 has one), its body.
struct Answer {
    status: StatusCode,
    retry_after: Option<HeaderValue>,
    bytes: Bytes,
}

impl Answer {
    /// The neuron's error answer in Anthropic's shape, its `Retry-After` kept.
    fn anthropic_error(&self) -> Response {
        let mut res = anthropic_error(
            self.status,
            &crate::anthropic::upstream_message(&self.bytes),
        );
        if let Some(v) = &self.retry_after {
            res.headers_mut().insert(header::RETRY_AFTER, v.clone());
        }
        res
    }
}

/// Sends to a neuron holding `p` and reads the whole answer; a neuron's own error answer comes
/// back as its status and body.
async fn ask_neuron(
    st: &AppState,
    p: &Placement,
    path: &str,
    body: &Value,
) -> Result<Answer, Error> {
    let body = crate::proxy::json_body(body);
    let resp = crate::proxy::send(&st.fleet, p, path, &body, &Call::new("anthropic")).await?;
    let status = resp.status();
    let retry_after = resp.headers().get(header::RETRY_AFTER).cloned();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
        .await
        .unwrap_or_default();
    Ok(Answer {
        status,
        retry_after,
        bytes,
    })
}

/// Why an Anthropic handler could not answer: the gateway's own error, or a neuron's error
/// answer; either is written in Anthropic's shape. `?` turns a gateway [`Error`] into one.
enum AnthropicError {
    Gateway(Error),
    Neuron(Answer),
}

impl From<Error> for AnthropicError {
    fn from(e: Error) -> Self {
        AnthropicError::Gateway(e)
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        match self {
            AnthropicError::Gateway(e) => anthropic_error_of(e),
            AnthropicError::Neuron(answer) => answer.anthropic_error(),
        }
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidRequest {
        message,
        param: None,
    }
}

/// `/v1/messages`: translated to the neurons' OpenAI dialect and back; errors in Anthropic's shape.
async fn messages(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AnthropicError> {
    let body = read_body(&st, body)?;
    let req: cortex_core::anthropic::MessagesRequest = serde_json::from_slice(&body)
        .map_err(|e| invalid(format!("request body is not a valid Messages request: {e}")))?;
    let (p, oa) = route_anthropic(&st, &req)?;
    if req.stream == Some(true) {
        let body = crate::proxy::json_body(&oa);
        return Ok(crate::anthropic::stream(
            st.fleet.clone(),
            p,
            body,
            req.model,
        ));
    }
    let answer = ask_neuron(&st, &p, "/v1/chat/completions", &oa).await?;
    if !answer.status.is_success() {
        return Err(AnthropicError::Neuron(answer));
    }
    let c: cortex_core::openai::ChatCompletion = serde_json::from_slice(&answer.bytes)
        .map_err(|e| Error::Upstream(format!("unreadable answer from the neuron: {e}")))?;
    Ok(Json(crate::anthropic::from_openai(&c, &req.model)).into_response())
}

/// `/v1/messages/count_tokens`: the request translated like a message, counted by the neuron's
/// tokenizer and chat template (loading the model if it is cold).
async fn count_tokens(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AnthropicError> {
    let body = read_body(&st, body)?;
    let mut v: serde_json::Map<String, Value> = serde_json::from_slice(&body).map_err(|e| {
        invalid(if e.is_data() {
            format!("request body must be a JSON object: {e}")
        } else {
            format!("request body is not valid JSON: {e}")
        })
    })?;
    // count_tokens takes no max_tokens; the translation wants one.
    v.insert("max_tokens".into(), json!(1));
    let req: cortex_core::anthropic::MessagesRequest = serde_json::from_value(Value::Object(v))
        .map_err(|e| {
            invalid(format!(
                "request body is not a valid count_tokens request: {e}"
            ))
        })?;
    let (p, oa) = route_anthropic(&st, &req)?;
    let ask = json!({"model": p.name, "messages": oa["messages"], "tools": oa.get("tools")});
    let answer = ask_neuron(&st, &p, "/tokenize", &ask).await?;
    let count = serde_json::from_slice::<Value>(&answer.bytes)
        .ok()
        .and_then(|v| v["count"].as_u64());
    match count {
        Some(n) if answer.status.is_success() => {
            Ok(Json(json!({"input_tokens": n})).into_response())
        }
        _ => Err(AnthropicError::Neuron(answer)),
    }
}

/// The fleet as `cortex status` prints it; neuron tokens are never included.
async fn fleet(State(st): State<Arc<AppState>>) -> Json<Value> {
    let neurons: Vec<Value> = st
        .fleet
        .neurons()
        .iter()
        .map(|n| {
            json!({
                "name": n.cfg.name,
                "endpoint": n.cfg.endpoint,
                "up": n.up.load(Ordering::Relaxed),
                "outstanding": n.outstanding.load(Ordering::Relaxed),
                "status": st.fleet.describe(n),
            })
        })
        .collect();
    Json(json!({"neurons": neurons}))
}

async fn not_found() -> Response {
    error_response(Error::InvalidRequest {
        message: "no such endpoint; see /v1/models, /v1/chat/completions, /v1/completions".into(),
        param: None,
    })
}

/// Serves the API on `listen` and the metrics on `metrics_listen` until Ctrl-C.
pub async fn serve(
    st: Arc<AppState>,
    listen: &str,
    metrics_listen: &str,
) -> Result<(), std::io::Error> {
    let bind = |addr: &str| {
        let addr = addr.to_string();
        async move {
            tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))
        }
    };
    let metrics_listener = bind(metrics_listen).await?;
    let metrics_app = crate::metrics::router(st.fleet.metrics.clone());
    tokio::spawn(async move { axum::serve(metrics_listener, metrics_app).await });
    let listener = bind(listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "gateway serving");
    axum::serve(listener, router(st))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

pub fn router(st: Arc<AppState>) -> Router {
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/cortex/fleet", get(fleet))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(st.fleet.max_body_bytes));
    let app = if st.key_hashes.is_empty() {
        app
    } else {
        app.layer(middleware::from_fn_with_state(st.clone(), auth))
    };
    app.layer(middleware::from_fn_with_state(
        st.fleet.metrics.clone(),
        crate::metrics::count_unrouted,
    ))
    .with_state(st)
}
