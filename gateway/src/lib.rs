//! cortex gateway: one OpenAI-compatible endpoint for a fleet of neurons. In static mode
//! (`cortex serve --config cortex.toml`) it polls the neurons listed in the config, loads the
//! placements of `models.toml` where the planner says, and routes each request to a ready replica.
//! In Kubernetes mode (`cortex serve --kubernetes`) it watches ModelPlacement and Neuron objects
//! and routes from their status, waking a model at zero by scaling its ModelPlacement.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use cortex_gateway::{api, config, static_mode};
//! let (cfg, placements) = config::load("cortex.toml".as_ref())?;
//! let fleet = static_mode::fleet(&cfg, placements);
//! static_mode::spawn(&fleet, std::time::Duration::from_secs(2), cfg.eviction.defrag_after_cycles);
//! let st = Arc::new(api::AppState { fleet, key_hashes: cfg.gateway.key_hashes });
//! api::serve(st, "127.0.0.1:31313", "127.0.0.1:31314").await?;
//! # Ok(()) }
//! ```

pub mod anthropic;
pub mod api;
pub mod cli;
pub mod config;
pub mod error;
pub mod fleet;
pub mod kubernetes;
pub mod metrics;
pub mod proxy;
pub mod relay;
pub mod request;
pub mod static_mode;
pub mod upstream;
