//! cortex gateway: one OpenAI- and Anthropic-compatible endpoint for a fleet of neurons. In
//! static mode (`cortex serve --config cortex.toml`) it polls the neurons listed in the config,
//! loads the placements of `models.toml` where the planner says, and routes each request to a
//! ready replica. In Kubernetes mode (`cortex serve --kubernetes`) it watches ModelPlacement and
//! Neuron objects and routes from their status, waking a model at zero by scaling its
//! ModelPlacement.
//!
//! The layers, each importing only those below it:
//!
//! | module | does |
//! |---|---|
//! | [`server`] | routes, API keys, the counting middleware, `/v1/models`, `/cortex/fleet` |
//! | [`dialect`] | OpenAI and Anthropic in, the one error responder |
//! | [`forward`] | the retry loop, the relay, SSE framing (never imports `dialect`) |
//! | [`fleet`] | the routing table, the `Backend` trait and its two modes, the domain types |
//! | [`config`] | `cortex.toml`, `models.toml`, the Kubernetes-mode flags |
//! | [`metrics`], [`error`] | `cortex_gateway_*`, the one error type |
//! | [`cli`] | `cortex status`, `cortex models`, `cortex probe` |
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use cortex_gateway::{config, fleet::static_backend, server};
//! let (cfg, placements) = config::load("cortex.toml".as_ref())?;
//! let fleet = static_backend::fleet(
//!     &cfg.gateway.settings(),
//!     cfg.eviction.strategy,
//!     cfg.neurons.clone(),
//!     placements,
//! );
//! static_backend::spawn(&fleet, std::time::Duration::from_secs(2), cfg.eviction.defrag_after_cycles);
//! let st = Arc::new(server::AppState { fleet, key_hashes: cfg.gateway.key_hashes });
//! server::serve(st, "127.0.0.1:31313", "127.0.0.1:31314").await?;
//! # Ok(()) }
//! ```

pub mod cli;
pub mod config;
pub mod dialect;
pub mod error;
pub mod fleet;
pub mod forward;
pub mod metrics;
pub mod server;
