//! Forwarding a request to a neuron holding the model: least outstanding requests first; a
//! neuron that fails before the first byte is marked down and the request goes to another replica
//! (or a fresh copy is loaded). A streaming caller of a cold model gets SSE keep-alive comments
//! while the model loads, so client timeouts do not fire during the load.

use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use memchr::memmem::Finder;

use crate::config::Placement;
use crate::error::Error;
use crate::fleet::{Fleet, Neuron};
use crate::metrics::{Metrics, RouteMetrics};
use crate::relay::{Relay, Rename};

/// Held while a proxied answer streams: keeps the neuron's outstanding count and the in-flight
/// gauge up, and records the request's latencies and speed. Time to first token and end-to-end
/// latency count from the request's arrival at the gateway (as vLLM's count from its arrival at
/// the engine), so a cold load or a wait for a replica is part of them.
///
/// Only a stream shows when tokens come: its first chunk carrying generated text or a tool call
/// gives the time to first token (a chat stream's first chunk, with the role and no text, comes
/// before the prompt is processed and does not count), and the gaps between such chunks give the
/// inter-token latency and, with the neuron's token count, the tokens per second. A JSON answer
/// records none of the three, only its end-to-end latency and tokens.
pub struct RequestGuard {
    neuron: Arc<Neuron>,
    route: Arc<RouteMetrics>,
    /// When the client's request reached the gateway.
    arrived: Instant,
    /// When the first and the last chunk carrying tokens came.
    first_token: Option<Instant>,
    last_token: Instant,
    /// Tokens generated, as the neuron's usage reported them.
    generated: AtomicU64,
    /// The neuron answered and its answer is being relayed: only then does the request record its
    /// end-to-end latency and speed, so a failed attempt retried elsewhere adds no sample.
    answered: bool,
}

impl RequestGuard {
    fn new(neuron: Arc<Neuron>, metrics: &Metrics, p: &Placement, call: &Call) -> Self {
        neuron.outstanding.fetch_add(1, Ordering::Relaxed);
        let route = metrics.route(&p.name, &neuron.cfg.name, call.dialect);
        route.in_flight.inc();
        crate::metrics::counted();
        RequestGuard {
            neuron,
            route,
            arrived: call.arrived,
            first_token: None,
            last_token: call.arrived,
            generated: AtomicU64::new(0),
            answered: false,
        }
    }

    /// Counts an attempt that failed before the neuron answered (the request may go on elsewhere).
    fn record(&self, status: StatusCode) {
        self.route.request(status);
    }

    /// Counts the request, answered by the neuron with `status`.
    fn answered(&mut self, status: StatusCode) {
        self.route.request(status);
        self.answered = true;
    }

    pub fn neuron_name(&self) -> &str {
        &self.neuron.cfg.name
    }

    /// Whole SSE events of the answer arrived at `now`: those carrying tokens time the first
    /// token and the gaps between tokens.
    pub fn events(&mut self, events: &[u8], now: Instant) {
        if !carries_tokens(events) {
            return;
        }
        match self.first_token {
            None => {
                self.first_token = Some(now);
                self.route
                    .ttft()
                    .observe((now - self.arrived).as_secs_f64());
            }
            Some(_) => self
                .route
                .itl()
                .observe((now - self.last_token).as_secs_f64()),
        }
        self.last_token = now;
    }

    /// Counts the tokens of the usage the neuron reported.
    pub fn tokens(&self, prompt: u64, completion: u64) {
        self.route.prompt_tokens().inc_by(prompt);
        self.route.generation_tokens().inc_by(completion);
        self.generated.store(completion, Ordering::Relaxed);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.neuron.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.route.in_flight.dec();
        if !self.answered {
            return;
        }
        self.route.e2e.observe(self.arrived.elapsed().as_secs_f64());
        // The first token's time is the time to first token; the speed counts those after it
        // (as `cortex probe` does).
        let generated = self.generated.load(Ordering::Relaxed);
        if let Some(first) = self.first_token
            && generated > 1
            && self.last_token > first
        {
            let decode = (self.last_token - first).as_secs_f64();
            self.route
                .tokens_per_second()
                .observe((generated - 1) as f64 / decode);
        }
    }
}

static CONTENT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""content":""#));
static TEXT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""text":""#));
static TOOL_CALLS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""tool_calls":["#));

/// Whether OpenAI stream events carry generated tokens: non-empty `content` (chat) or `text`
/// (completions), or a tool call. A key cannot appear inside a JSON string (its quotes would be
/// escaped there), so finding it finds the field.
fn carries_tokens(events: &[u8]) -> bool {
    let non_empty = |key: &Finder<'_>| {
        key.find_iter(events)
            .any(|i| matches!(events.get(i + key.needle().len()), Some(c) if !b"\"]".contains(c)))
    };
    non_empty(&CONTENT) || non_empty(&TEXT) || non_empty(&TOOL_CALLS)
}

/// What the gateway knows about one client request while it proxies it.
#[derive(Clone)]
pub struct Call {
    pub dialect: &'static str,
    /// When the request reached the gateway (for the queue-time histogram).
    pub arrived: Instant,
    /// The gateway asked the neuron for a usage chunk the client did not ask for: drop it.
    pub strip_usage: bool,
    /// When the neuron knows the model by another id than the client sent, so answers carry the
    /// client's name.
    pub rename: Option<Arc<Rename>>,
}

impl Call {
    pub fn new(dialect: &'static str) -> Self {
        Call {
            dialect,
            arrived: Instant::now(),
            strip_usage: false,
            rename: None,
        }
    }

    /// Answers name the model `client` where the neuron says `neuron`.
    pub fn rename(&mut self, neuron: &str, client: &str) {
        self.rename = Some(Arc::new(Rename::new(neuron, client)));
    }
}

/// A JSON value as a request body.
pub fn json_body(v: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("a JSON value always serializes"))
}

/// Sends `body` (the neuron's JSON request, as it goes on the wire) to a neuron holding `p`.
pub async fn forward(
    fleet: Arc<Fleet>,
    p: Placement,
    path: &'static str,
    body: Bytes,
    stream: bool,
    call: Call,
) -> Response {
    if stream && fleet.pick(&p, &[]).is_none() {
        return stream_while_loading(fleet, p, path, body, call);
    }
    match send(&fleet, &p, path, &body, &call).await {
        Ok(r) => r,
        Err(e) => crate::api::error_response(e),
    }
}

pub async fn send(
    fleet: &Arc<Fleet>,
    p: &Placement,
    path: &str,
    body: &Bytes,
    call: &Call,
) -> Result<Response, Error> {
    let dialect = call.dialect;
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
        let mut guard = RequestGuard::new(n.clone(), &fleet.metrics, p, call);
        if skip.is_empty() {
            guard
                .route
                .queue_time
                .observe(call.arrived.elapsed().as_secs_f64());
        }
        let res = tokio::time::timeout(
            fleet.request_timeout,
            fleet.upstream.post(&n, path, body.clone()),
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
                    message: crate::anthropic::upstream_message(&bytes),
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

pub type Tx = futures::channel::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Waits until the placement has a ready replica, loading one if needed, and sends `keepalive`
/// down the stream every `[gateway] keepalive_secs` meanwhile. `Ok(false)` when the client went away.
pub async fn wait_ready(
    fleet: &Arc<Fleet>,
    p: &Placement,
    tx: &mut Tx,
    keepalive: &Bytes,
) -> Result<bool, Error> {
    if fleet.pick(p, &[]).is_some() {
        return Ok(true);
    }
    let load = fleet.load_copy(p);
    tokio::pin!(load);
    let mut tick = tokio::time::interval(fleet.keepalive);
    loop {
        tokio::select! {
            r = &mut load => return r.map(|_| true),
            _ = tick.tick() => {
                if tx.send(Ok(keepalive.clone())).await.is_err() {
                    return Ok(false);
                }
            }
        }
    }
}

/// A streamed response whose body is fed by `task` through a channel.
pub fn channel_stream<F>(task: impl FnOnce(Tx) -> F) -> Response
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    // The task counts the request: by its route, or where its cold load failed.
    crate::metrics::counted();
    tokio::spawn(task(tx));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(rx),
    )
        .into_response()
}

fn stream_while_loading(
    fleet: Arc<Fleet>,
    p: Placement,
    path: &'static str,
    body: Bytes,
    call: Call,
) -> Response {
    channel_stream(|mut tx| async move {
        let keepalive = Bytes::from_static(b": loading model\n\n");
        let result = match wait_ready(&fleet, &p, &mut tx, &keepalive).await {
            Ok(false) => return,
            Ok(true) => send(&fleet, &p, path, &body, &call).await,
            Err(e) => {
                fleet.metrics.unrouted(&p.name, call.dialect, e.status());
                Err(e)
            }
        };
        match result {
            Ok(resp) if resp.status().is_success() => {
                let mut s = resp.into_body().into_data_stream();
                while let Some(chunk) = s.next().await {
                    if tx.send(chunk.map_err(std::io::Error::other)).await.is_err() {
                        return;
                    }
                }
            }
            Ok(resp) => {
                let retry_after = retry_after_secs(resp.headers());
                let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .unwrap_or_default();
                let bytes = with_retry_after(bytes, retry_after);
                let _ = tx.send(Ok(sse_data(&bytes))).await;
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
            }
            Err(e) => {
                let body = serde_json::to_vec(&e.openai_event()).unwrap_or_default();
                let _ = tx.send(Ok(sse_data(&body))).await;
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
            }
        }
    })
}

/// The seconds of a `Retry-After` header, when it has them.
pub fn retry_after_secs(h: &axum::http::HeaderMap) -> Option<u64> {
    h.get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A neuron's OpenAI error body with `retry_after` in its error object, as a stream's error
/// event carries what would have been the `Retry-After` header.
fn with_retry_after(body: Bytes, secs: Option<u64>) -> Bytes {
    let Some(secs) = secs else { return body };
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(mut v) if v["error"].is_object() => {
            v["error"]["retry_after"] = secs.into();
            json_body(&v)
        }
        _ => body,
    }
}

fn sse_data(json: &[u8]) -> Bytes {
    let mut v = b"data: ".to_vec();
    v.extend_from_slice(json);
    v.extend_from_slice(b"\n\n");
    Bytes::from(v)
}

#[cfg(test)]
mod tests {
    use super::carries_tokens;

    #[test]
    fn only_events_with_generated_text_or_tool_calls_carry_tokens() {
        // A chat stream's first chunk: the role, no text yet.
        assert!(!carries_tokens(
            br#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#
        ));
        assert!(carries_tokens(
            br#"data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#
        ));
        assert!(carries_tokens(
            br#"data: {"choices":[{"delta":{"content":"\n"}}]}"#
        ));
        assert!(carries_tokens(br#"data: {"choices":[{"text":" Paris"}]}"#));
        assert!(!carries_tokens(
            br#"data: {"choices":[{"text":"","finish_reason":"stop"}]}"#
        ));
        assert!(carries_tokens(
            br#"data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#
        ));
        assert!(!carries_tokens(
            br#"data: {"choices":[],"usage":{"completion_tokens":3}}"#
        ));
        // Text that looks like a key is escaped inside its string.
        assert!(!carries_tokens(
            br#"data: {"choices":[{"delta":{"content":""}}],"x":"\"content\":\"a"}"#
        ));
        // Several events in one chunk: any one with text counts.
        assert!(carries_tokens(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"
        ));
    }
}
