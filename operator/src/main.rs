//! `cortex-operator`: flags and wiring only; see the library for the parts.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cortex_core::planner::Strategy;
use cortex_operator::metrics::Metrics;

#[derive(Parser)]
#[command(
    name = "cortex-operator",
    version,
    about = "cortex operator: reconciles ModelPlacements into neuron loads and keeps Neuron resources"
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Reconcile ModelPlacements of this namespace only (default: all namespaces).
    #[arg(long, env = "CORTEX_NAMESPACE")]
    namespace: Option<String>,
    /// /metrics and /healthz.
    #[arg(long, env = "CORTEX_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    metrics_listen: String,
    /// Bearer token the neurons require.
    #[arg(long, env = "CORTEX_NEURON_TOKEN", hide_env_values = true)]
    neuron_token: Option<String>,
    /// Eviction strategy when nothing fits: lru or priority.
    #[arg(long, env = "CORTEX_EVICTION", default_value = "lru", value_parser = parse_strategy)]
    eviction: Strategy,
    /// Seconds between two polls of every neuron's /status.
    #[arg(long, env = "CORTEX_POLL_INTERVAL", default_value_t = 2.0)]
    poll_interval: f64,
    /// Namespace of the neuron DaemonSet's pods and of the leader Lease (default: the pod's own
    /// namespace from POD_NAMESPACE, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pod_namespace: String,
    /// Label selector of the neuron DaemonSet's pods; empty turns pod discovery off (Neurons are
    /// then only those applied by hand).
    #[arg(
        long,
        env = "CORTEX_NEURON_PODS",
        default_value = "app.kubernetes.io/component=neuron"
    )]
    neuron_pods: String,
    /// Port of the neuron API on its pods.
    #[arg(long, env = "CORTEX_NEURON_PORT", default_value_t = 13131)]
    neuron_port: u16,
    #[arg(long, env = "CORTEX_LEASE_NAME", default_value = "cortex-operator")]
    lease_name: String,
    /// Seconds a leader's lease lasts without renewal.
    #[arg(long, env = "CORTEX_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// This replica's name in the lease (default: POD_NAME, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the CustomResourceDefinitions (YAML), as `crds/` holds them.
    Crds,
}

fn parse_strategy(s: &str) -> Result<Strategy, String> {
    match s {
        "lru" => Ok(Strategy::Lru),
        "priority" => Ok(Strategy::Priority),
        other => Err(format!(
            "unknown eviction strategy '{other}'; use lru or priority"
        )),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Cmd::Crds) = args.cmd {
        print!("{}", cortex_operator::crds_yaml());
        return Ok(());
    }
    cortex_core::init_tracing();
    let metrics = Arc::new(Metrics::new());
    let m = metrics.clone();
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/metrics",
            axum::routing::get(move |headers: axum::http::HeaderMap| {
                let m = m.clone();
                async move {
                    let accept = headers
                        .get(axum::http::header::ACCEPT)
                        .and_then(|v| v.to_str().ok());
                    let (ctype, body) = cortex_core::exposition::negotiate(accept, m.encode());
                    ([(axum::http::header::CONTENT_TYPE, ctype)], body)
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(&args.metrics_listen)
        .await
        .with_context(|| format!("binding --metrics-listen {}", args.metrics_listen))?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster, or KUBECONFIG)")?;
    let identity = args.identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "operator".into());
        format!("{host}-{}", std::process::id())
    });
    let settings = cortex_operator::Settings {
        namespace: args.namespace,
        neuron_token: args.neuron_token,
        strategy: args.eviction,
        poll_interval: Duration::from_secs_f64(args.poll_interval.max(0.2)),
        pod_namespace: args.pod_namespace,
        pod_selector: Some(args.neuron_pods).filter(|s| !s.is_empty()),
        neuron_port: args.neuron_port,
        lease_name: args.lease_name,
        lease_duration: Duration::from_secs(args.lease_seconds.max(3)),
        identity,
    };
    tokio::select! {
        r = cortex_operator::run(client, settings, metrics) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
