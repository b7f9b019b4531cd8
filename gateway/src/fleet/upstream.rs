//! The client that proxied requests go to neurons with. A neuron on plain `http://` (the usual
//! case: loopback, a pod IP) is called with hyper's pooled client directly, which costs a fraction
//! of reqwest's per-request work (no redirect policy, no proxy matching, no extra boxing of the
//! body); `https://` neurons, and every neuron when the environment sets an HTTP proxy, keep going
//! through reqwest, which knows TLS and proxies.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::{self, HeaderValue, header};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::error::with_causes;
use crate::fleet::neuron::Neuron;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The header that carries a request's id to the neuron, for its log.
pub const REQUEST_ID: &str = "x-request-id";

/// How long a connection to a neuron may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an unused pooled connection is kept (reqwest's default).
const POOL_IDLE: Duration = Duration::from_secs(90);

/// Sends proxied requests to neurons over the cheapest client that can reach them.
pub struct Upstream {
    /// For `http://` neurons; `None` when the environment asks for a proxy.
    direct: Option<Client<HttpConnector, Full<Bytes>>>,
    reqwest: reqwest::Client,
}

impl Upstream {
    /// `reqwest` serves the neurons the direct client cannot (TLS, proxies).
    pub fn new(reqwest: reqwest::Client) -> Self {
        let direct = (!proxy_in_env()).then(|| {
            let mut conn = HttpConnector::new();
            conn.set_nodelay(true);
            conn.set_connect_timeout(Some(CONNECT_TIMEOUT));
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE)
                .build(conn)
        });
        Upstream { direct, reqwest }
    }

    /// POSTs the JSON `body` to `path` on the neuron, with its token when it has one and the
    /// request's id as `x-request-id`; the answer comes back as soon as its head does, its body
    /// still streaming.
    pub async fn post(
        &self,
        n: &Neuron,
        path: &str,
        body: Bytes,
        request_id: &str,
    ) -> Result<http::Response<UpstreamBody>, String> {
        let id = HeaderValue::try_from(request_id).ok();
        let url = n.url(path);
        match &self.direct {
            Some(client) if url.starts_with("http://") => {
                let mut req = http::Request::post(url.as_str())
                    .header(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )
                    .body(Full::new(body))
                    .map_err(|e| format!("bad neuron URL {url}: {e}"))?;
                if let Some(t) = &n.cfg.token {
                    let v = HeaderValue::try_from(format!("Bearer {t}")).map_err(|_| {
                        format!("neuron {}: its token is not a header value", n.cfg.name)
                    })?;
                    req.headers_mut().insert(header::AUTHORIZATION, v);
                }
                if let Some(id) = id {
                    req.headers_mut().insert(REQUEST_ID, id);
                }
                let res = client.request(req).await.map_err(|e| with_causes(&e))?;
                Ok(res.map(UpstreamBody::Direct))
            }
            _ => {
                let res = n
                    .request(&self.reqwest, reqwest::Method::POST, path)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header(REQUEST_ID, request_id)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| with_causes(&e))?;
                Ok(http::Response::from(res).map(UpstreamBody::Reqwest))
            }
        }
    }
}

/// Whether the environment names an HTTP proxy, which reqwest would use for `http://` neurons.
fn proxy_in_env() -> bool {
    ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
        .iter()
        .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()))
}

/// A neuron's answer body, from whichever client fetched it.
pub enum UpstreamBody {
    Direct(hyper::body::Incoming),
    Reqwest(reqwest::Body),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Direct(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Reqwest(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Direct(b) => b.is_end_stream(),
            UpstreamBody::Reqwest(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Direct(b) => b.size_hint(),
            UpstreamBody::Reqwest(b) => b.size_hint(),
        }
    }
}
