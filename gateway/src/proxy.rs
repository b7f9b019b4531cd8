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

    fn chunk(&mut self) {
        if !self.first_byte {
            self.first_byte = true;
            self.metrics
                .ttfb
                .get_or_create(&self.route)
                .observe(self.started.elapsed().as_secs_f64());
        }
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

pub async fn forward(
    fleet: Arc<Fleet>,
    p: Placement,
    path: &'static str,
    body: Value,
    stream: bool,
) -> Response {
    if stream && fleet.pick(&p, &[]).is_none() {
        return stream_while_loading(fleet, p, path, body);
    }
    match send(&fleet, &p, path, &body, "openai").await {
        Ok(r) => r,
        Err(e) => crate::api::error_response(e),
    }
}

pub async fn send(
    fleet: &Arc<Fleet>,
    p: &Placement,
    path: &str,
    body: &Value,
    dialect: &'static str,
) -> Result<Response, Error> {
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
        let res = tokio::time::timeout(
            fleet.request_timeout,
            n.request(&fleet.http, reqwest::Method::POST, path)
                .json(body)
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
                let stream = relay(r, guard, sse, fleet.stream_idle_timeout, n.cfg.name.clone());
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

/// The neuron's body, relayed: each chunk counts for time-to-first-token; a neuron that fails or
/// stays silent past `idle` mid-stream ends an SSE answer with an error event in OpenAI's shape
/// and `[DONE]`, so the caller never hangs.
fn relay(
    r: reqwest::Response,
    guard: RequestGuard,
    sse: bool,
    idle: Duration,
    neuron: String,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let body = r.bytes_stream().boxed();
    futures::stream::unfold((body, guard, false), move |(mut body, mut guard, done)| {
        let neuron = neuron.clone();
        async move {
            if done {
                return None;
            }
            let failure = match tokio::time::timeout(idle, body.next()).await {
                Ok(None) => return None,
                Ok(Some(Ok(b))) => {
                    guard.chunk();
                    return Some((Ok(b), (body, guard, false)));
                }
                Ok(Some(Err(e))) => format!("neuron {neuron} failed mid-answer: {e}"),
                Err(_) => format!(
                    "neuron {neuron} sent nothing for {} s mid-answer",
                    idle.as_secs()
                ),
            };
            tracing::warn!(neuron = %neuron, error = %failure, "stream cut");
            if !sse {
                return Some((Err(std::io::Error::other(failure)), (body, guard, true)));
            }
            let err = Error::Upstream(failure).openai_body();
            let mut bytes = sse_data(&serde_json::to_vec(&err).unwrap_or_default()).to_vec();
            bytes.extend_from_slice(b"data: [DONE]\n\n");
            Some((Ok(Bytes::from(bytes)), (body, guard, true)))
        }
    })
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
    body: Value,
) -> Response {
    channel_stream(|mut tx| async move {
        let keepalive = Bytes::from_static(b": loading model\n\n");
        let result = match wait_ready(&fleet, &p, &mut tx, &keepalive).await {
            Ok(false) => return,
            Ok(true) => send(&fleet, &p, path, &body, "openai").await,
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
