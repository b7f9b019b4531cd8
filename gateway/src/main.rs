//! `cortex`: flags and wiring only; see the library for the parts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cortex_gateway::cli::{self, probe};
use cortex_gateway::config;
use cortex_gateway::fleet::{kube_backend, static_backend};
use cortex_gateway::server;

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
    /// Serve the fleet described by a cortex.toml (static mode), or by the cluster's
    /// ModelPlacement and Neuron objects (--kubernetes).
    Serve {
        #[arg(long, env = "CORTEX_CONFIG", default_value = "cortex.toml")]
        config: PathBuf,
        /// Overrides [gateway] listen (default 0.0.0.0:31313).
        #[arg(long, env = "CORTEX_LISTEN")]
        listen: Option<String>,
        /// Overrides [gateway] metrics_listen (default 0.0.0.0:31314).
        #[arg(long, env = "CORTEX_METRICS_LISTEN")]
        metrics_listen: Option<String>,
        #[command(flatten)]
        kube: config::KubeArgs,
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
    /// Load a model on a neuron (or ask a gateway) and send one chat request: prints the answer,
    /// TTFT and tok/s, or the status and body of whatever failed.
    Probe(probe::ProbeArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cortex_core::init_tracing();
    match Args::parse().cmd {
        Cmd::Serve {
            config,
            listen,
            metrics_listen,
            kube,
        } => {
            let (mut gw, fleet) = if kube.kubernetes {
                let gw = kube.gateway_config()?;
                let fleet = kube_backend::start(
                    kube.namespace.as_deref(),
                    kube.neuron_token.clone(),
                    &gw.settings(),
                )
                .await
                .context("starting Kubernetes mode")?;
                (gw, fleet)
            } else {
                let (cfg, placements) = config::load(&config)?;
                let fleet = static_backend::fleet(
                    &cfg.gateway.settings(),
                    cfg.eviction.strategy,
                    cfg.neurons.clone(),
                    placements,
                );
                static_backend::spawn(
                    &fleet,
                    Duration::from_secs_f64(cfg.gateway.poll_interval_secs.max(0.1)),
                    cfg.eviction.defrag_after_cycles,
                );
                (cfg.gateway, fleet)
            };
            gw.listen = listen.unwrap_or(gw.listen);
            gw.metrics_listen = metrics_listen.unwrap_or(gw.metrics_listen);
            let st = Arc::new(server::AppState {
                fleet,
                key_hashes: gw.key_hashes,
            });
            server::serve(st, &gw.listen, &gw.metrics_listen).await?;
        }
        Cmd::Status { gateway, api_key } => {
            print!(
                "{}",
                cli::status::status(&gateway, api_key.as_deref()).await?
            )
        }
        Cmd::HashKey { key } => println!("sha256:{}", config::hash_key(&key)),
        Cmd::Models { gateway, api_key } => {
            print!(
                "{}",
                cli::status::models(&gateway, api_key.as_deref()).await?
            )
        }
        Cmd::Probe(args) => {
            // The failure is the probe's report: print it as is (no backtrace) and exit 1.
            if let Err(e) = probe::run(&args).await {
                eprintln!("probe failed: {e}");
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
