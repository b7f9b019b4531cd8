//! The Anthropic stream for a translated request: a `ping` at once and more while a cold model
//! loads, then the neuron's OpenAI chunks translated as they arrive (`message_start` with the
//! first). A neuron that fails or ends early yields an `error` event, never a hang.
//!
//! The relay hands over whole SSE events (it frames the neuron's stream once, see
//! `forward::sse`), so each frame's `data:` lines are read as they are.

use std::sync::Arc;

use axum::http::header;
use axum::response::Response;
use bytes::Bytes;
use cortex_core::openai::ChatCompletionChunk;
use futures::{SinkExt, StreamExt};
use serde_json::json;

use crate::dialect::anthropic::translate::{StreamTranslator, sse};
use crate::dialect::{Dialect, Rejection};
use crate::error::Error;
use crate::fleet::Fleet;
use crate::fleet::catalogue::Placement;
use crate::forward::call::Call;
use crate::forward::loading::{channel_stream, wait_ready};
use crate::forward::{send, sse as framing};

/// Streams the answer to `body` (the translated request) as Anthropic's events, naming the
/// model `model` as the caller did.
pub fn stream(fleet: Arc<Fleet>, p: Placement, body: Bytes, model: String) -> Response {
    // Created now: latencies count from the request's arrival, the wait for a cold model included.
    let call = Call::new(Dialect::Anthropic);
    channel_stream(|mut tx| async move {
        let id = format!("msg_{:016x}", rand_id());
        let mut tr = StreamTranslator::new(id, model);
        let ping = sse(&("ping", json!({"type": "ping"})));
        if tx.send(Ok(ping.clone())).await.is_err() {
            return;
        }
        let fail = |e: Error| Rejection::new(Dialect::Anthropic, e).event();
        let resp = match wait_ready(&fleet, &p, &mut tx, &ping).await {
            Ok(false) => return,
            Ok(true) => send(&fleet, &p, "/v1/chat/completions", &body, &call).await,
            Err(e) => {
                fleet.metrics.unrouted(&p.name, call.dialect, e.status());
                Err(e)
            }
        };
        let resp = match resp {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                let status = r.status();
                let retry_after = r.headers().get(header::RETRY_AFTER).cloned();
                let bytes = axum::body::to_bytes(r.into_body(), 1 << 20)
                    .await
                    .unwrap_or_default();
                let rejection = Rejection::neuron(Dialect::Anthropic, status, retry_after, bytes);
                let _ = tx.send(Ok(rejection.event())).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Ok(fail(e))).await;
                return;
            }
        };
        let mut body = resp.into_body().into_data_stream();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            for data in framing::data_lines(&chunk) {
                let events = if data == b"[DONE]" {
                    for e in &tr.finish() {
                        if tx.send(Ok(sse(e))).await.is_err() {
                            return;
                        }
                    }
                    return;
                } else if let Ok(c) = serde_json::from_slice::<ChatCompletionChunk>(data) {
                    tr.chunk(&c)
                } else {
                    let why = crate::error::neuron_message(data);
                    let _ = tx.send(Ok(fail(Error::Upstream(why)))).await;
                    return;
                };
                for e in &events {
                    if tx.send(Ok(sse(e))).await.is_err() {
                        return;
                    }
                }
            }
        }
        let why = "the neuron ended the stream before the answer was complete";
        let _ = tx.send(Ok(fail(Error::Upstream(why.into())))).await;
    })
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
