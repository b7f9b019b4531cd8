//! `/v1/messages` and `/v1/messages/count_tokens`: the request translated to the neurons'
//! OpenAI dialect, the answer translated back; every error in Anthropic's shape.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cortex_core::anthropic::MessagesRequest;
use cortex_core::openai::{ChatCompletion, ChatCompletionRequest};
use serde_json::{Value, json};

use crate::dialect::anthropic::stream::stream;
use crate::dialect::anthropic::translate::{from_openai, to_openai};
use crate::dialect::{Dialect, Rejection, read_body};
use crate::error::Error;
use crate::fleet::Fleet;
use crate::fleet::catalogue::Placement;
use crate::forward::call::Call;
use crate::forward::{json_body, send};
use crate::metrics::Counted;

fn invalid(message: String) -> Rejection {
    Rejection::new(
        Dialect::Anthropic,
        Error::InvalidRequest {
            message,
            param: None,
        },
    )
}

/// The placement an Anthropic request names and the request in the neurons' OpenAI dialect.
fn route(
    fleet: &Fleet,
    req: &MessagesRequest,
) -> Result<(Placement, ChatCompletionRequest), Rejection> {
    let p = fleet.placement(&req.model).ok_or_else(|| {
        Rejection::new(Dialect::Anthropic, Error::ModelNotFound(req.model.clone()))
    })?;
    let mut oa =
        to_openai(req).map_err(|e| Rejection::new(Dialect::Anthropic, e).named(&p.name))?;
    oa.model = p.name.clone();
    Ok((p, oa))
}

/// A neuron's whole answer: its status, its `Retry-After` (a full queue's 429 has one), its body.
struct Answer {
    status: StatusCode,
    retry_after: Option<HeaderValue>,
    bytes: Bytes,
}

impl Answer {
    /// The answer as an error in Anthropic's shape (the request was counted on its route).
    fn rejection(self, p: &Placement) -> Rejection {
        Rejection::neuron(
            Dialect::Anthropic,
            self.status,
            self.retry_after,
            self.bytes,
        )
        .named(&p.name)
        .counted()
    }
}

/// Sends to a neuron holding `p` and reads the whole answer; a neuron's own error answer comes
/// back as its status and body.
async fn ask_neuron(
    fleet: &Arc<Fleet>,
    p: &Placement,
    path: &str,
    body: Bytes,
) -> Result<Answer, Rejection> {
    let resp = send(fleet, p, path, &body, &Call::new(Dialect::Anthropic))
        .await
        .map_err(|e| {
            Rejection::new(Dialect::Anthropic, e)
                .named(&p.name)
                .counted()
        })?;
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

/// A JSON answer to a request the forward layer counted.
fn counted(v: impl serde::Serialize) -> Response {
    (axum::Extension(Counted), Json(v)).into_response()
}

/// `/v1/messages`: translated to the neurons' OpenAI dialect and back.
pub async fn messages(
    State(fleet): State<Arc<Fleet>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Rejection> {
    let body = read_body(fleet.max_body_bytes, body).map_err(|e| (Dialect::Anthropic, e))?;
    let req: MessagesRequest = serde_json::from_slice(&body)
        .map_err(|e| invalid(format!("request body is not a valid Messages request: {e}")))?;
    let (p, oa) = route(&fleet, &req)?;
    let body = Bytes::from(serde_json::to_vec(&oa).expect("a request always serializes"));
    if req.stream == Some(true) {
        return Ok(stream(fleet.clone(), p, body, req.model));
    }
    let answer = ask_neuron(&fleet, &p, "/v1/chat/completions", body).await?;
    if !answer.status.is_success() {
        return Err(answer.rejection(&p));
    }
    let c: ChatCompletion = serde_json::from_slice(&answer.bytes).map_err(|e| {
        let e = Error::Upstream(format!("unreadable answer from the neuron: {e}"));
        Rejection::new(Dialect::Anthropic, e)
            .named(&p.name)
            .counted()
    })?;
    Ok(counted(from_openai(&c, &req.model)))
}

/// `/v1/messages/count_tokens`: the request translated like a message, counted by the neuron's
/// tokenizer and chat template (loading the model if it is cold).
pub async fn count_tokens(
    State(fleet): State<Arc<Fleet>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Rejection> {
    let body = read_body(fleet.max_body_bytes, body).map_err(|e| (Dialect::Anthropic, e))?;
    let mut v: serde_json::Map<String, Value> = serde_json::from_slice(&body).map_err(|e| {
        invalid(if e.is_data() {
            format!("request body must be a JSON object: {e}")
        } else {
            format!("request body is not valid JSON: {e}")
        })
    })?;
    // count_tokens takes no max_tokens; the translation wants one.
    v.insert("max_tokens".into(), json!(1));
    let req: MessagesRequest = serde_json::from_value(Value::Object(v)).map_err(|e| {
        invalid(format!(
            "request body is not a valid count_tokens request: {e}"
        ))
    })?;
    let (p, oa) = route(&fleet, &req)?;
    let ask = json!({"model": p.name, "messages": oa.messages, "tools": oa.tools});
    let answer = ask_neuron(&fleet, &p, "/tokenize", json_body(&ask)).await?;
    let count = serde_json::from_slice::<Value>(&answer.bytes)
        .ok()
        .and_then(|v| v["count"].as_u64());
    match count {
        Some(n) if answer.status.is_success() => Ok(counted(json!({"input_tokens": n}))),
        _ => Err(answer.rejection(&p)),
    }
}
