//! The forward layer: a request, already in the neurons' OpenAI dialect, sent to a neuron holding
//! its model, least outstanding requests first; a neuron that fails before the first byte is
//! marked down and the request goes to another replica (or a fresh copy is loaded). The answer
//! is relayed as it streams ([`relay`]), framed into whole SSE events once ([`sse`]).
//!
//! It speaks only the neurons' dialect and never imports `dialect/`: errors come back as
//! [`Error`]s for the caller's responder to write.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | [`send`]: the retry loop |
//! | `call.rs` | [`call::Call`]: what is known of the request, and the model's rename |
//! | `guard.rs` | [`guard::RequestGuard`]: outstanding counts, latencies, tokens |
//! | `relay.rs` | [`relay::Relay`]: the answer's body, inspected event by event |
//! | `sse.rs` | SSE framing |
//! | `loading.rs` | streams that start while a cold model loads |

pub mod call;
pub mod guard;
pub mod loading;
pub mod relay;
pub mod sse;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;

use crate::error::Error;
use crate::fleet::Fleet;
use crate::fleet::catalogue::Placement;
use crate::metrics::Counted;
use call::Call;
use guard::RequestGuard;
use relay::Relay;

/// A JSON value as a request body.
pub fn json_body(v: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("a JSON value always serializes"))
}

/// Sends `body` (the neuron's JSON request, as it goes on the wire) to a neuron holding `p`,
/// loading a copy when none is ready, trying another replica when one fails before answering.
/// Either way the request has been counted: the answer carries [`Counted`], and an error
/// was counted where it arose.
#[tracing::instrument(name = "forward", skip_all, fields(model = %p.name, request_id = %call.id, dialect = call.dialect.as_str()))]
pub async fn send(
    fleet: &Arc<Fleet>,
    p: &Placement,
    path: &str,
    body: &Bytes,
    call: &Call,
) -> Result<Response, Error> {
    let dialect = call.dialect;
    let request_id = call.id.to_string();
    let mut skip: Vec<String> = Vec::new();
    let mut last = String::new();
    for _ in 0..3 {
        let n = match fleet.pick(p, &skip) {
            Some(n) => n,
            None => {
                let ready = match fleet.load_copy(p).await {
                    Ok(()) => fleet.pick(p, &skip).ok_or_else(|| {
                        Error::NoCapacity(format!(
                            "'{}' loaded but no replica is ready",
                            p.served_name()
                        ))
                    }),
                    Err(e) => Err(e),
                };
                // Counted here unless an attempt on a neuron already counted it.
                ready.inspect_err(|e| {
                    if skip.is_empty() {
                        fleet.metrics.unrouted(&p.name, dialect, e.status())
                    }
                })?
            }
        };
        tracing::debug!(neuron = %n.cfg.name, "routing");
        let mut guard = RequestGuard::new(n.clone(), &fleet.metrics, p, call);
        if skip.is_empty() {
            guard
                .route
                .queue_time
                .observe(call.arrived.elapsed().as_secs_f64());
        }
        let res = tokio::time::timeout(
            fleet.request_timeout,
            fleet.upstream.post(&n, path, body.clone(), &request_id),
        )
        .await
        .map_err(|_| format!("no answer within {} s", fleet.request_timeout.as_secs()))
        .and_then(|r| r);
        match res {
            Err(e) => {
                guard.record(StatusCode::BAD_GATEWAY);
                n.mark_down(&e);
                last = format!("{}: {e}", n.cfg.name);
                skip.push(n.cfg.name.clone());
            }
            // The neuron no longer has the model ready (unloaded, restarted): refresh and go on.
            Ok(r)
                if r.status() == StatusCode::SERVICE_UNAVAILABLE
                    || r.status() == StatusCode::NOT_FOUND =>
            {
                guard.record(r.status());
                last = format!("{} answered {}", n.cfg.name, r.status());
                skip.push(n.cfg.name.clone());
                fleet.refresh().await;
            }
            // The neuron's body limit is below the gateway's: every replica would refuse it
            // alike, so the caller hears why at once, in its own dialect (and the neuron stays up).
            Ok(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                guard.answered(r.status());
                let bytes = axum::body::to_bytes(Body::new(r.into_body()), 64 << 10)
                    .await
                    .unwrap_or_default();
                return Err(Error::NeuronBodyTooLarge {
                    neuron: n.cfg.name.clone(),
                    message: crate::error::neuron_message(&bytes),
                });
            }
            Ok(r) => {
                let (parts, body) = r.into_parts();
                guard.answered(parts.status);
                let ctype = parts.headers.get(header::CONTENT_TYPE).cloned();
                let sse = ctype
                    .as_ref()
                    .is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream"));
                let relay = Relay::new(body, guard, sse, fleet.stream_idle_timeout, call.clone());
                let mut resp = Response::new(Body::new(relay));
                *resp.status_mut() = parts.status;
                resp.extensions_mut().insert(Counted);
                if let Some(ct) = ctype {
                    resp.headers_mut().insert(header::CONTENT_TYPE, ct);
                }
                // A neuron's full queue says when to come back (429 with Retry-After).
                if let Some(ra) = parts.headers.get(header::RETRY_AFTER) {
                    resp.headers_mut().insert(header::RETRY_AFTER, ra.clone());
                }
                return Ok(resp);
            }
        }
    }
    Err(Error::Upstream(format!(
        "no replica of '{}' answered; last: {last}",
        p.served_name()
    )))
}
