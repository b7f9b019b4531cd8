//! `cortex`: flags and wiring only; see the library for the parts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cortex_gateway::{api, cli, config, fleet::Fleet};

#[derive(Parser)]
#[command(
    name = "cortex",
    version,
    about = "cortex: one OpenAI-compatible endpoint for a fleet of neurons"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the fleet described by a cortex.toml (static mode).
    Serve {
        #[arg(long, env = "CORTEX_CONFIG", default_value = "cortex.toml")]
        config: PathBuf,
        /// Overrides [gateway] listen.
        #[arg(long, env = "CORTEX_LISTEN")]
        listen: Option<String>,
    },
    /// Print the fleet: neurons, devices, free memory, models and their states.
    Status {
        #[arg(long, env = "CORTEX_GATEWAY", default_value = "http://127.0.0.1:31313")]
        gateway: String,
        #[arg(long, env = "CORTEX_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// Print the `sha256:` line that lets KEY in through a cortex.toml `api_keys_file`.
    HashKey { key: String },
    /// Print the catalogue of models.
    Models {
        #[arg(long, env = "CORTEX_GATEWAY", default_value = "http://127.0.0.1:31313")]
        gateway: String,
        #[arg(long, env = "CORTEX_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("CORTEX_LOG_FORMAT").is_ok_and(|v| v == "json") {
        b.json().init();
    } else {
        b.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    match Args::parse().cmd {
        Cmd::Serve { config, listen } => {
            let (cfg, placements) = config::load(&config)?;
            let listen = listen.unwrap_or(cfg.gateway.listen.clone());
            let fleet = Fleet::new(&cfg, placements);
            fleet.spawn_poller(Duration::from_secs_f64(
                cfg.gateway.poll_interval_secs.max(0.1),
            ));
            let f = fleet.clone();
            // Keep each placement's minimum copies loaded: at start, and again whenever a neuron
            // that was down (or not yet up) comes back or a copy was lost.
            tokio::spawn(async move {
                loop {
                    f.load_initial().await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            });
            let metrics = fleet.metrics.clone();
            let metrics_app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move |headers: axum::http::HeaderMap| {
                    let m = metrics.clone();
                    async move {
                        let accept = headers
                            .get(axum::http::header::ACCEPT)
                            .and_then(|v| v.to_str().ok());
                        let (ctype, body) = cortex_core::exposition::negotiate(accept, m.encode());
                        ([(axum::http::header::CONTENT_TYPE, ctype)], body)
                    }
                }),
            );
            let metrics_listener = tokio::net::TcpListener::bind(&cfg.gateway.metrics_listen)
                .await
                .with_context(|| {
                    format!("binding metrics_listen {}", cfg.gateway.metrics_listen)
                })?;
            tokio::spawn(async move { axum::serve(metrics_listener, metrics_app).await });
            let app = api::router(Arc::new(api::AppState {
                fleet,
                key_hashes: cfg.gateway.key_hashes,
            }));
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            tracing::info!(listen = %listener.local_addr()?, "gateway serving");
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
        }
        Cmd::Status { gateway, api_key } => {
            print!("{}", cli::status(&gateway, api_key.as_deref()).await?)
        }
        Cmd::HashKey { key } => println!("sha256:{}", config::hash_key(&key)),
        Cmd::Models { gateway, api_key } => {
            print!("{}", cli::models(&gateway, api_key.as_deref()).await?)
        }
    }
    Ok(())
}
