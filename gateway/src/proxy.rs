//! Forwarding a request to a neuron holding the model: least outstanding requests first; a
//! neuron that fails before the first byte is marked down and the request goes to another replica
//! (or a fresh copy is loaded). A streaming caller of a cold model gets SSE keep-alive comments
//! while the model loads, so client timeouts do not fire during the load.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};

use crate::config::Placement;
use crate::error::Error;
use crate::fleet::{Fleet, Neuron};
use crate::metrics::{Metrics, RouteMetrics};
use crate::relay::{Relay, Rename};

/// Held while a proxied answer streams: keeps the neuron's outstanding count and the in-flight
/// gauge up, and records the request's latency when the answer is done.
pub struct RequestGuard {
    neuron: Arc<Neuron>,
    route: Arc<RouteMetrics>,
    started: Instant,
    first_byte: bool,
    last_chunk: Instant,
}

impl RequestGuard {
    fn new(neuron: Arc<Neuron>, metrics: &Metrics, model: &str, dialect: &str) -> Self {
        neuron.outstanding.fetch_add(1, Ordering::Relaxed);
        let route = metrics.route(model, &neuron.cfg.name, dialect);
        route.in_flight.inc();
        let now = Instant::now();
        RequestGuard {
            neuron,
            route,
            started: now,
            first_byte: false,
            last_chunk: now,
        }
    }

    fn record(&self, status: StatusCode) {
        self.route.request(status);
    }

    pub fn neuron_name(&self) -> &str {
        &self.neuron.cfg.name
    }

    /// A chunk of the answer arrived (now, which it returns): the first is the time to first
    /// token; later chunks of a stream (one per token or so) give the inter-token latency.
    pub fn chunk(&mut self, sse: bool) -> Instant {
        let now = Instant::now();
        if !self.first_byte {
            self.first_byte = true;
            self.route
                .ttfb()
                .observe((now - self.started).as_secs_f64());
        } else if sse {
            self.route
                .itl()
                .observe((now - self.last_chunk).as_secs_f64());
        }
        self.last_chunk = now;
        now
    }

    /// Counts the tokens of the usage the neuron reported.
    pub fn tokens(&self, prompt: u64, completion: u64) {
        self.route.prompt_tokens().inc_by(prompt);
        self.route.generation_tokens().inc_by(completion);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.neuron.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.route.in_flight.dec();
        self.route.e2e.observe(self.started.elapsed().as_secs_f64());
    }
}

/// How often a waiting stream gets a keep-alive comment.
const KEEPALIVE: Duration = Duration::from_secs(5);

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
                fleet.load_copy(p).await?;
                fleet.pick(p, &skip).ok_or_else(|| {
                    Error::NoCapacity(format!(
                        "'{}' loaded but no replica is ready",
                        p.served_name()
                    ))
                })?
            }
        };
        let guard = RequestGuard::new(n.clone(), &fleet.metrics, &p.name, dialect);
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
            Ok(r) => {
                let (parts, body) = r.into_parts();
                guard.record(parts.status);
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
