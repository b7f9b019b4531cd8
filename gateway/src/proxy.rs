//! Forwarding a request to a neuron holding the model: least outstanding requests first; a
//! neuron that fails before the first byte is marked down and the request goes to another replica
//! (or a fresh copy is loaded). A streaming caller of a cold model gets SSE keep-alive comments
//! while the model loads, so client timeouts do not fire during the load.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde_json::Value;

use crate::config::Placement;
use crate::error::Error;
use crate::fleet::{Fleet, Neuron};
use crate::metrics::{Metrics, ModelLabels, RequestLabels, RouteLabels};

/// Held while a proxied answer streams: keeps the neuron's outstanding count and the in-flight
/// gauge up, and records the request's latency when the answer is done.
struct RequestGuard {
    neuron: Arc<Neuron>,
    metrics: Arc<Metrics>,
    route: RouteLabels,
    started: std::time::Instant,
    first_byte: bool,
    last_chunk: std::time::Instant,
}

impl RequestGuard {
    fn new(neuron: Arc<Neuron>, metrics: Arc<Metrics>, model: &str, dialect: &str) -> Self {
        neuron.outstanding.fetch_add(1, Ordering::Relaxed);
        metrics
            .in_flight
            .get_or_create(&ModelLabels {
                model: model.into(),
            })
            .inc();
        RequestGuard {
            route: RouteLabels {
                model: model.into(),
                neuron: neuron.cfg.name.clone(),
                dialect: dialect.into(),
            },
            neuron,
            metrics,
            started: std::time::Instant::now(),
            first_byte: false,
            last_chunk: std::time::Instant::now(),
        }
    }

    fn record(&self, status: StatusCode) {
        let labels = RequestLabels {
            model: self.route.model.clone(),
            neuron: self.route.neuron.clone(),
            dialect: self.route.dialect.clone(),
            status_class: format!("{}xx", status.as_u16() / 100),
        };
        self.metrics.requests.get_or_create(&labels).inc();
    }

    /// A chunk of the answer arrived: the first is the time to first token; later chunks of a
    /// stream (one per token or so) give the inter-token latency.
    fn chunk(&mut self, sse: bool) {
        let now = std::time::Instant::now();
        if !self.first_byte {
            self.first_byte = true;
            self.metrics
                .ttfb
                .get_or_create(&self.route)
                .observe(self.started.elapsed().as_secs_f64());
        } else if sse {
            self.metrics
                .itl
                .get_or_create(&self.route)
                .observe((now - self.last_chunk).as_secs_f64());
        }
        self.last_chunk = now;
    }

    /// Counts the tokens of the usage object in `b`, if it has one; drops an SSE usage event the
    /// client did not ask for.
    fn usage(&self, b: Bytes, strip: bool) -> Bytes {
        let Some(at) = find(&b, b"\"usage\":{") else {
            return b;
        };
        let u = &b[at..];
        if let (Some(prompt), Some(completion)) = (
            number_after(u, "prompt_tokens"),
            number_after(u, "completion_tokens"),
        ) {
            self.metrics
                .prompt_tokens
                .get_or_create(&self.route)
                .inc_by(prompt);
            self.metrics
                .generation_tokens
                .get_or_create(&self.route)
                .inc_by(completion);
        }
        if !strip {
            return b;
        }
        // The usage event is `data: {…"choices":[],"usage":{…}}\n\n`, alone in its event.
        let start = b[..at]
            .windows(6)
            .rposition(|w| w == b"data: ")
            .unwrap_or(0);
        let end = find(&b[at..], b"\n\n").map_or(b.len(), |i| at + i + 2);
        let mut out = b[..start].to_vec();
        out.extend_from_slice(&b[end..]);
        Bytes::from(out)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.neuron.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.metrics
            .in_flight
            .get_or_create(&ModelLabels {
                model: self.route.model.clone(),
            })
            .dec();
        self.metrics
            .e2e
            .get_or_create(&self.route)
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// How often a waiting stream gets a keep-alive comment.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// What the gateway knows about one client request while it proxies it.
#[derive(Clone)]
pub struct Call {
    pub dialect: &'static str,
    /// When the request reached the gateway (for the queue-time histogram).
    pub arrived: std::time::Instant,
    /// The gateway asked the neuron for a usage chunk the client did not ask for: drop it.
    pub strip_usage: bool,
    /// When the neuron knows the model by another id than the client sent: `"model":"<id>"` and
    /// `"model":"<client's name>"`, as serde writes them, so answers carry the client's name.
    pub rename: Option<(Vec<u8>, Vec<u8>)>,
}

impl Call {
    pub fn new(dialect: &'static str) -> Self {
        Call {
            dialect,
            arrived: std::time::Instant::now(),
            strip_usage: false,
            rename: None,
        }
    }

    /// Answers name the model `client` where the neuron says `neuron`.
    pub fn rename(&mut self, neuron: &str, client: &str) {
        let field = |name: &str| format!("\"model\":{}", Value::String(name.into())).into_bytes();
        self.rename = Some((field(neuron), field(client)));
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
                fleet.load_copy(p).await?;
                fleet.pick(p, &skip).ok_or_else(|| {
                    Error::NoCapacity(format!(
                        "'{}' loaded but no replica is ready",
                        p.served_name()
                    ))
                })?
            }
        };
        let guard = RequestGuard::new(n.clone(), fleet.metrics.clone(), &p.name, dialect);
        if skip.is_empty() {
            fleet
                .metrics
                .queue_time
                .get_or_create(&guard.route)
                .observe(call.arrived.elapsed().as_secs_f64());
        }
        let res = tokio::time::timeout(
            fleet.request_timeout,
            n.request(&fleet.http, reqwest::Method::POST, path)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send(),
        )
        .await
        .map_err(|_| format!("no answer within {} s", fleet.request_timeout.as_secs()))
        .and_then(|r| r.map_err(|e| e.to_string()));
        match res {
            Err(e) => {
                guard.record(StatusCode::BAD_GATEWAY);
                n.mark_down(&e.to_string());
                last = format!("{}: {e}", n.cfg.name);
                skip.push(n.cfg.name.clone());
            }
            // The neuron no longer has the model ready (unloaded, restarted): refresh and go on.
            Ok(r)
                if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE
                    || r.status() == reqwest::StatusCode::NOT_FOUND =>
            {
                guard.record(
                    StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
                );
                last = format!("{} answered {}", n.cfg.name, r.status());
                skip.push(n.cfg.name.clone());
                fleet.refresh().await;
            }
            Ok(r) => {
                let status =
                    StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                guard.record(status);
                let ctype = r.headers().get(reqwest::header::CONTENT_TYPE).cloned();
                let sse = ctype
                    .as_ref()
                    .is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream"));
                let stream = relay(r, guard, sse, fleet.stream_idle_timeout, call.clone());
                let mut resp = Response::new(Body::from_stream(stream));
                *resp.status_mut() = status;
                if let Some(ct) = ctype.and_then(|c| HeaderValue::from_bytes(c.as_bytes()).ok()) {
                    resp.headers_mut().insert(header::CONTENT_TYPE, ct);
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

/// The neuron's body, relayed: each chunk counts for time-to-first-token and inter-token latency,
/// the usage the neuron reports counts the request's tokens; a neuron that fails or stays silent
/// past `idle` mid-stream ends an SSE answer with an error event in OpenAI's shape and `[DONE]`, so
/// the caller never hangs.
fn relay(
    r: reqwest::Response,
    guard: RequestGuard,
    sse: bool,
    idle: Duration,
    call: Call,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let body = r.bytes_stream().boxed();
    // The state carries everything the stream needs, so a chunk costs no clones.
    futures::stream::unfold(
        (body, guard, call, false),
        move |(mut body, mut guard, call, done)| async move {
            if done {
                return None;
            }
            let failure = match tokio::time::timeout(idle, body.next()).await {
                Ok(None) => return None,
                Ok(Some(Ok(b))) => {
                    guard.chunk(sse);
                    let b = guard.usage(b, sse && call.strip_usage);
                    let b = match &call.rename {
                        Some((from, to)) => rename_model(b, from, to),
                        None => b,
                    };
                    return Some((Ok(b), (body, guard, call, false)));
                }
                Ok(Some(Err(e))) => {
                    format!("neuron {} failed mid-answer: {e}", guard.route.neuron)
                }
                Err(_) => format!(
                    "neuron {} sent nothing for {} s mid-answer",
                    guard.route.neuron,
                    idle.as_secs()
                ),
            };
            tracing::warn!(neuron = %guard.route.neuron, error = %failure, "stream cut");
            if !sse {
                return Some((
                    Err(std::io::Error::other(failure)),
                    (body, guard, call, true),
                ));
            }
            let err = Error::Upstream(failure).openai_body();
            let mut bytes = sse_data(&serde_json::to_vec(&err).unwrap_or_default()).to_vec();
            bytes.extend_from_slice(b"data: [DONE]\n\n");
            Some((Ok(Bytes::from(bytes)), (body, guard, call, true)))
        },
    )
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `from` → `to` (both `"model":"…"`, see [`Call::rename`]) in a chunk of the neuron's JSON.
fn rename_model(b: Bytes, from: &[u8], to: &[u8]) -> Bytes {
    if find(&b, from).is_none() {
        return b;
    }
    let mut out = Vec::with_capacity(b.len());
    let mut rest = &b[..];
    while let Some(i) = find(rest, from) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(to);
        rest = &rest[i + from.len()..];
    }
    out.extend_from_slice(rest);
    Bytes::from(out)
}

/// The number after `"key":` in `b`.
fn number_after(b: &[u8], key: &str) -> Option<u64> {
    let k = format!("\"{key}\":");
    let i = find(b, k.as_bytes())? + k.len();
    let digits: Vec<u8> = b[i..]
        .iter()
        .copied()
        .skip_while(|c| *c == b' ')
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

pub type Tx = futures::channel::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Waits until the placement has a ready replica, loading one if needed, and sends `keepalive`
/// down the stream every few seconds meanwhile. `Ok(false)` when the client went away.
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
    let mut tick = tokio::time::interval(KEEPALIVE);
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
            Err(e) => Err(e),
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
                let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .unwrap_or_default();
                let _ = tx.send(Ok(sse_data(&bytes))).await;
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
            }
            Err(e) => {
                let body = serde_json::to_vec(&e.openai_body()).unwrap_or_default();
                let _ = tx.send(Ok(sse_data(&body))).await;
                let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
            }
        }
    })
}

fn sse_data(json: &[u8]) -> Bytes {
    let mut v = b"data: ".to_vec();
    v.extend_from_slice(json);
    v.extend_from_slice(b"\n\n");
    Bytes::from(v)
}
