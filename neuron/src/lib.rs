//! cortex neuron: serves GGUF models with candle, in-process, behind an OpenAI API and a model
//! lifecycle API. One neuron runs on each inference host.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use neuron::{api, metrics::Metrics, registry::{Registry, Settings}};
//! let metrics = Arc::new(Metrics::new());
//! let registry = Registry::new(
//!     Settings { model_dirs: vec!["/var/lib/cortex/models".into()], device: Default::default(),
//!                max_queue: 64, max_memory: None, default_context: 8192,
//!                kv_cache_memory: None, prefix_cache_memory: None, max_batch: 16 },
//!     metrics.clone(),
//! );
//! let app = api::router(Arc::new(api::AppState {
//!     registry, metrics, token: None, max_body: 32 << 20, node: "host".into() }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:13131").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod devices;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod metrics;
pub mod registry;
pub mod source;
pub mod template;
pub mod tokenizer;
pub mod toolcall;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
