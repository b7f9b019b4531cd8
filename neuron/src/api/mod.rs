//! The neuron's HTTP API: the model lifecycle (`/models/*`, `/status`), the OpenAI dialect
//! (`/v1/*`), and `/metrics`, `/healthz`, `/readyz`. Errors become responses in one place
//! ([`IntoResponse`] for [`Error`]), always in OpenAI's error shape.

mod lifecycle;
mod openai;

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::metrics::{ErrorLabel, Metrics};
use crate::registry::Registry;

/// Shared by every handler.
pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub token: Option<String>,
    pub max_body: usize,
    pub node: String,
}

/// Marks a response as an error of this type, for the error counter.
#[derive(Clone, Copy)]
struct ErrorType(&'static str);

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let mut res = (self.status(), Json(self.body())).into_response();
        if let Some(secs) = self.retry_after() {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res.extensions_mut().insert(ErrorType(self.error_type()));
        res
    }
}

/// `Json` whose rejections (bad JSON, wrong types, oversize bodies) are OpenAI-shaped errors.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(match rejection {
                JsonRejection::BytesRejection(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                    Error::PayloadTooLarge { limit: 0 }
                }
                JsonRejection::JsonDataError(e) => Error::InvalidRequest {
                    message: format!("request body does not match the API: {}", e.body_text()),
                    param: None,
                },
                JsonRejection::JsonSyntaxError(e) => Error::InvalidRequest {
                    message: format!("request body is not valid JSON: {}", e.body_text()),
                    param: None,
                },
                JsonRejection::MissingJsonContentType(_) => Error::InvalidRequest {
                    message: "send the body as JSON with 'Content-Type: application/json'".into(),
                    param: None,
                },
                other => Error::InvalidRequest {
                    message: other.body_text(),
                    param: None,
                },
            }),
        }
    }
}

/// Bearer-token check for everything but health and metrics.
async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(token) = &st.token {
        let path = req.uri().path();
        let open = matches!(path, "/healthz" | "/readyz" | "/metrics");
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !open
            && !given.is_some_and(|g| cortex_core::constant_time_eq(g.as_bytes(), token.as_bytes()))
        {
            return Error::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Counts error responses by type and fills in the body limit the extractor could not know.
async fn count_errors(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    if let Some(ErrorType(t)) = res.extensions().get::<ErrorType>().copied() {
        st.metrics
            .errors
            .get_or_create(&ErrorLabel {
                error_type: t.to_string(),
            })
            .inc();
        if res.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Error::PayloadTooLarge { limit: st.max_body }.into_response();
        }
    }
    res
}

/// Every request runs in a span with the id the gateway sent (`x-request-id`), so one request can
/// be followed from the gateway's log into this one.
#[tracing::instrument(name = "request", skip_all, fields(request_id = request_id(&req), path = %req.uri().path()))]
async fn trace(req: Request, next: Next) -> Response {
    next.run(req).await
}

fn request_id(req: &Request) -> &str {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

async fn metrics(State(st): State<Arc<AppState>>, headers: axum::http::HeaderMap) -> Response {
    for d in lifecycle::devices(&st) {
        let l = crate::metrics::DeviceLabel {
            device: lifecycle::device_key(&d),
            name: d.name,
        };
        st.metrics
            .device_total
            .get_or_create(&l)
            .set(d.memory_total as i64);
        st.metrics
            .device_free
            .get_or_create(&l)
            .set(d.memory_free as i64);
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (ctype, body) = cortex_core::exposition::negotiate(accept, st.metrics.encode());
    ([(header::CONTENT_TYPE, ctype)], body).into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn not_found() -> Error {
    Error::InvalidRequest {
        message: "no such endpoint; see /v1/models, /v1/chat/completions, /v1/completions, /models, /status".into(),
        param: None,
    }
}

pub fn router(st: Arc<AppState>) -> Router {
    Router::new()
        .route("/models/load", post(lifecycle::load))
        .route("/models/unload", post(lifecycle::unload))
        .route("/models", get(lifecycle::list))
        .route("/models/{*id}", get(lifecycle::show))
        .route("/status", get(lifecycle::status))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/tokenize", post(openai::tokenize))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(healthz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(st.max_body))
        .layer(middleware::from_fn_with_state(st.clone(), auth))
        .layer(middleware::from_fn_with_state(st.clone(), count_errors))
        .layer(middleware::from_fn(trace))
        .with_state(st)
}
