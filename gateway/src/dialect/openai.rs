//! OpenAI's dialect: `/v1/chat/completions` and `/v1/completions`, which the neurons speak too.
//! The body is read only enough to route it ([`RequestHead`]); the neuron validates the rest and
//! answers in OpenAI's shape. The client's bytes go to the neuron as they came unless something
//! in them must change.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};

use crate::dialect::request_head::RequestHead;
use crate::dialect::{Dialect, Rejection, read_body};
use crate::error::Error;
use crate::fleet::Fleet;
use crate::fleet::catalogue::Placement;
use crate::forward::call::Call;
use crate::forward::loading::{channel_stream, wait_ready};
use crate::forward::{json_body, send};

/// A request routed: its placement, the body for the neuron, whether it streams, its call.
struct Routed {
    p: Placement,
    body: Bytes,
    stream: bool,
    call: Call,
}

/// Reads the body enough to route it. A stream always asks the neuron for usage (to count
/// tokens); the gateway drops that chunk again when the client did not ask for it.
fn route(fleet: &Fleet, body: &Bytes) -> Result<Routed, Error> {
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
    let p = fleet
        .placement(model)
        .ok_or_else(|| Error::ModelNotFound(model.to_string()))?;
    let mut call = Call::new(Dialect::OpenAi);
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
    Ok(Routed {
        p,
        body,
        stream,
        call,
    })
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
    Ok(json_body(&v))
}

pub async fn chat(
    State(fleet): State<Arc<Fleet>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(fleet, "/v1/chat/completions", body).await
}

pub async fn completions(
    State(fleet): State<Arc<Fleet>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(fleet, "/v1/completions", body).await
}

async fn handle(
    fleet: Arc<Fleet>,
    path: &'static str,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let routed = read_body(fleet.max_body_bytes, body).and_then(|b| route(&fleet, &b));
    let r = match routed {
        Ok(r) => r,
        Err(e) => return Rejection::new(Dialect::OpenAi, e).into_response(),
    };
    if r.stream && fleet.pick(&r.p, &[]).is_none() {
        return stream_while_loading(fleet, r, path);
    }
    match send(&fleet, &r.p, path, &r.body, &r.call).await {
        Ok(res) => res,
        Err(e) => Rejection::new(Dialect::OpenAi, e).counted().into_response(),
    }
}

/// A stream for a model with no ready copy: keep-alive comments while a copy loads, then the
/// neuron's answer, or the error as the stream's last event.
fn stream_while_loading(fleet: Arc<Fleet>, r: Routed, path: &'static str) -> Response {
    channel_stream(|mut tx| async move {
        let keepalive = Bytes::from_static(b": loading model\n\n");
        let result = match wait_ready(&fleet, &r.p, &mut tx, &keepalive).await {
            Ok(false) => return,
            Ok(true) => send(&fleet, &r.p, path, &r.body, &r.call).await,
            Err(e) => {
                fleet
                    .metrics
                    .unrouted(&r.p.name, r.call.dialect, e.status());
                Err(e)
            }
        };
        let rejection = match result {
            Ok(resp) if resp.status().is_success() => {
                let mut s = resp.into_body().into_data_stream();
                while let Some(chunk) = s.next().await {
                    if tx.send(chunk.map_err(std::io::Error::other)).await.is_err() {
                        return;
                    }
                }
                return;
            }
            Ok(resp) => {
                let status = resp.status();
                let retry_after = resp.headers().get(header::RETRY_AFTER).cloned();
                let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .unwrap_or_default();
                Rejection::neuron(Dialect::OpenAi, status, retry_after, bytes)
            }
            Err(e) => Rejection::new(Dialect::OpenAi, e),
        };
        let _ = tx.send(Ok(rejection.event())).await;
    })
}
