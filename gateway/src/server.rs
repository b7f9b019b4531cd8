//! The gateway's HTTP server: the routes, the API-key check, and the one middleware that counts
//! every answer no neuron was asked for (from the answer's extensions, see [`crate::metrics`]).
//! `/v1/models` (the whole catalogue) and `/cortex/fleet` (for `cortex status`) are answered
//! here; the inference endpoints by the dialects ([`crate::dialect`]).

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::dialect::{Dialect, Rejection, anthropic, openai};
use crate::error::Error;
use crate::fleet::Fleet;
use crate::fleet::view::{FleetView, ModelList};
use crate::metrics::{Counted, Metrics, Named};

pub struct AppState {
    pub fleet: Arc<Fleet>,
    /// SHA-256 (hex) of the accepted keys; empty = open.
    pub key_hashes: Vec<String>,
}

/// Installed only when keys are configured (an open gateway pays nothing for it).
async fn auth(State(keys): State<Arc<Vec<String>>>, req: Request, next: Next) -> Response {
    if req.uri().path() != "/healthz" {
        let h = req.headers();
        let given = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()));
        let ok = given.is_some_and(|g| {
            let h = crate::config::hash_key(g);
            keys.iter()
                .any(|k| cortex_core::constant_time_eq(k.as_bytes(), h.as_bytes()))
        });
        if !ok {
            let dialect = Dialect::of_path(req.uri().path());
            return Rejection::new(dialect, Error::Unauthorized).into_response();
        }
    }
    next.run(req).await
}

/// Counts the requests to the inference endpoints that were answered without reaching a neuron
/// (400 malformed, 401 wrong key, 404 unknown model, 413 too large…), by status class, dialect
/// and the placement when one was named ([`Named`], else `unknown`, so label values stay
/// bounded). An answer marked [`Counted`] was counted where it was made. Installed outermost,
/// so it sees the answers of the auth layer and of the body extractors too.
async fn count(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let Some(dialect) = Dialect::of(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let res = next.run(req).await;
    if res.extensions().get::<Counted>().is_none() {
        let model = res.extensions().get::<Named>().map(|n| n.0.as_str());
        m.unrouted(model.unwrap_or("unknown"), dialect, res.status());
    }
    res
}

/// Every placement, loaded or not, with where it is loaded and its state.
async fn models(State(fleet): State<Arc<Fleet>>) -> Json<ModelList> {
    Json(fleet.cards())
}

/// The fleet as `cortex status` prints it; neuron tokens are never included.
async fn fleet_view(State(fleet): State<Arc<Fleet>>) -> Json<FleetView> {
    Json(fleet.view())
}

async fn not_found() -> Rejection {
    Rejection::new(
        Dialect::OpenAi,
        Error::InvalidRequest {
            message: "no such endpoint; see /v1/models, /v1/chat/completions, /v1/completions"
                .into(),
            param: None,
        },
    )
}

/// Serves the API on `listen` and the metrics on `metrics_listen` until Ctrl-C.
pub async fn serve(
    st: Arc<AppState>,
    listen: &str,
    metrics_listen: &str,
) -> Result<(), std::io::Error> {
    let bind = |addr: &str| {
        let addr = addr.to_string();
        async move {
            tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("binding {addr}: {e}")))
        }
    };
    let metrics_listener = bind(metrics_listen).await?;
    let metrics_app = crate::metrics::router(st.fleet.metrics.clone());
    tokio::spawn(async move { axum::serve(metrics_listener, metrics_app).await });
    let listener = bind(listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "gateway serving");
    axum::serve(listener, router(st))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

pub fn router(st: Arc<AppState>) -> Router {
    let fleet = st.fleet.clone();
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/messages", post(anthropic::handlers::messages))
        .route(
            "/v1/messages/count_tokens",
            post(anthropic::handlers::count_tokens),
        )
        .route("/cortex/fleet", get(fleet_view))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(fleet.max_body_bytes));
    let app = if st.key_hashes.is_empty() {
        app
    } else {
        let keys = Arc::new(st.key_hashes.clone());
        app.layer(middleware::from_fn_with_state(keys, auth))
    };
    app.layer(middleware::from_fn_with_state(fleet.metrics.clone(), count))
        .with_state(fleet)
}
