//! cortex gateway: one OpenAI-compatible endpoint for a fleet of neurons. In static mode
//! (`cortex serve --config cortex.toml`) it polls the neurons listed in the config, loads the
//! placements of `models.toml` where the planner says, and routes each request to a ready replica.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! let (cfg, placements) = cortex_gateway::config::load("cortex.toml".as_ref())?;
//! let fleet = cortex_gateway::fleet::Fleet::new(&cfg, placements);
//! let app = cortex_gateway::api::router(Arc::new(cortex_gateway::api::AppState {
//!     fleet, key_hashes: cfg.gateway.key_hashes }));
//! axum::serve(tokio::net::TcpListener::bind("127.0.0.1:31313").await?, app).await?;
//! # Ok(()) }
//! ```

pub mod anthropic;
pub mod api;
pub mod cli;
pub mod config;
pub mod error;
pub mod fleet;
pub mod metrics;
pub mod proxy;
