//! `/models/load`, `/models/unload`, `/models`, `/models/{id}`, `/status`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cortex_core::neuron::{LoadRequest, ModelInfo, ModelState, NeuronStatus, UnloadRequest};
use serde::Deserialize;

use super::{ApiJson, AppState};
use crate::error::{Error, Result};

#[derive(Deserialize)]
pub struct LoadQuery {
    #[serde(default)]
    wait: bool,
    /// Seconds `wait=true` waits at most (default 600).
    timeout: Option<u64>,
}

/// `202` while loading, `200` once ready; with `?wait=true`, waits (bounded) for the end and
/// answers `200` when ready or the load error when it failed.
pub async fn load(
    State(st): State<Arc<AppState>>,
    Query(q): Query<LoadQuery>,
    ApiJson(req): ApiJson<LoadRequest>,
) -> Result<Response> {
    let (entry, created) = st.registry.load(req).await?;
    if q.wait {
        entry
            .wait(Duration::from_secs(q.timeout.unwrap_or(600).min(3600)))
            .await;
    }
    let info = entry.info();
    if q.wait && info.state == ModelState::Failed {
        return Err(Error::Load(info.error.unwrap_or_default()));
    }
    let status = if info.state == ModelState::Ready {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    tracing::info!(model = %info.id, state = info.state.as_str(), created, "load requested");
    Ok((status, Json(info)).into_response())
}

pub async fn unload(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<UnloadRequest>,
) -> Result<Json<ModelInfo>> {
    st.registry.unload(&req.id).await.map(Json)
}

pub async fn list(State(st): State<Arc<AppState>>) -> Json<Vec<ModelInfo>> {
    Json(st.registry.list().iter().map(|e| e.info()).collect())
}

pub async fn show(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ModelInfo>> {
    st.registry
        .get(&id)
        .map(|e| Json(e.info()))
        .ok_or(Error::ModelNotFound(id))
}

/// A device's name in loads and metrics: `cpu` or `cuda:N`.
pub fn device_key(d: &cortex_core::neuron::DeviceInfo) -> String {
    if d.kind == "cpu" {
        "cpu".to_string()
    } else {
        format!("{}:{}", d.kind, d.index)
    }
}

/// This host's devices, with free memory as models may use it: within --max-memory and after the
/// loads under way.
pub fn devices(st: &AppState) -> Vec<cortex_core::neuron::DeviceInfo> {
    crate::devices::all()
        .into_iter()
        .map(|mut d| {
            d.memory_free = st.registry.available(&device_key(&d), d.memory_free, None);
            if let Some(cap) = st.registry.settings.max_memory {
                d.memory_total = d.memory_total.min(cap);
            }
            d
        })
        .collect()
}

pub async fn status(State(st): State<Arc<AppState>>) -> Json<NeuronStatus> {
    let entries = st.registry.list();
    let inflight = entries
        .iter()
        .map(|e| e.load.inflight.load(Ordering::Relaxed))
        .sum();
    let queued = entries
        .iter()
        .map(|e| e.load.queued.load(Ordering::Relaxed))
        .sum();
    Json(NeuronStatus {
        node: st.node.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        devices: devices(&st),
        models: entries.iter().map(|e| e.info()).collect(),
        inflight,
        queued,
    })
}
