//! `neuron`: flags and wiring only; see the library for the parts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use cortex_core::neuron::DeviceKind;
use neuron::api::{self, AppState};
use neuron::metrics::Metrics;
use neuron::registry::{Registry, Settings};

#[derive(Parser, Debug)]
#[command(
    name = "neuron",
    version,
    about = "cortex neuron: local LLM inference behind an OpenAI API"
)]
struct Args {
    /// Address to serve the API on.
    #[arg(long, env = "CORTEX_LISTEN", default_value = "0.0.0.0:13131")]
    listen: SocketAddr,
    /// Bearer token every call but health and metrics must carry.
    #[arg(long, env = "CORTEX_NEURON_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where models run when a load request does not say.
    #[arg(long, env = "CORTEX_DEVICE", value_enum, default_value = "auto")]
    device: Device,
    /// The only directories a file:// source may point into (comma-separated).
    #[arg(
        long,
        env = "CORTEX_MODEL_DIRS",
        value_delimiter = ',',
        default_value = "/var/lib/cortex/models"
    )]
    model_dirs: Vec<PathBuf>,
    /// Requests that may wait per model; more get 429 with Retry-After.
    #[arg(long, env = "CORTEX_MAX_QUEUE", default_value_t = 64)]
    max_queue: usize,
    /// Most memory all models together may take, in bytes (default: whatever the device has free).
    #[arg(long, env = "CORTEX_MAX_MEMORY")]
    max_memory: Option<u64>,
    /// Context length served when a load request names none (capped by the model's).
    #[arg(long, env = "CORTEX_DEFAULT_CONTEXT", default_value_t = 8192)]
    default_context: usize,
    /// KV cache memory the sequences of each model may hold together, in bytes (default: one
    /// full context). More lets more long requests run at once; a sequence that would pass it
    /// waits, and a running one that must grow preempts the youngest.
    #[arg(long, env = "CORTEX_KV_CACHE_MEMORY")]
    kv_cache_memory: Option<u64>,
    /// Memory each model keeps, beyond the running requests' KV cache, for the blocks of
    /// finished requests, in bytes (default: one full context). A request whose prompt starts
    /// as a kept one did (an agent's system prompt and tools, earlier turns of a conversation)
    /// reads only the rest; the least recently used blocks go first when room is needed. 0
    /// keeps finished blocks only while the running budget has room.
    #[arg(long, env = "CORTEX_PREFIX_CACHE_MEMORY")]
    prefix_cache_memory: Option<u64>,
    /// Most requests of one model decoded together in a batch.
    #[arg(long, env = "CORTEX_MAX_BATCH", default_value_t = 16)]
    max_batch: usize,
    /// Largest request body accepted, in bytes; the gateway's default `max_body_bytes` too, so
    /// a request the gateway accepts is not refused here.
    #[arg(long, env = "CORTEX_MAX_BODY_BYTES", default_value_t = 32 << 20)]
    max_body_bytes: usize,
    /// Name reported in /status (default: the host name).
    #[arg(long, env = "CORTEX_NODE_NAME")]
    node_name: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Device {
    Auto,
    Cpu,
    Cuda,
}

fn main() -> anyhow::Result<()> {
    // candle counts CPU threads on every matrix product it runs (prompt attention), reading
    // /proc/cpuinfo each time unless RAYON_NUM_THREADS is set: count once, before any thread
    // exists, and set it to what candle would find.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: no other thread has started yet, so nothing reads the environment meanwhile.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    // candle's own pool (norms, rotary, element-wise steps between our products) spins 25,000
    // rounds before its workers sleep; meanwhile they hold the cores our kernels' workers need.
    // On 2 cores that left 40% of prompt processing waiting at candle's barrier; 1,000 rounds
    // keep its hand-offs quick and gave prompts 25% more tokens/s (bench/neuron). candle as it
    // is (`CORTEX_KERNELS=candle`) keeps its default.
    if neuron::engine::kernels::enabled()
        && std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none()
    {
        // SAFETY: as above, no other thread yet.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000") };
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    cortex_core::init_tracing();
    let args = Args::parse();
    let node = args.node_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "localhost".into())
    });
    let metrics = Arc::new(Metrics::new());
    let registry = Registry::new(
        Settings {
            model_dirs: args.model_dirs.clone(),
            device: match args.device {
                Device::Auto => DeviceKind::Auto,
                Device::Cpu => DeviceKind::Cpu,
                Device::Cuda => DeviceKind::Cuda,
            },
            max_queue: args.max_queue,
            max_memory: args.max_memory,
            default_context: args.default_context,
            kv_cache_memory: args.kv_cache_memory,
            prefix_cache_memory: args.prefix_cache_memory,
            max_batch: args.max_batch,
        },
        metrics.clone(),
    );
    let app = api::router(Arc::new(AppState {
        registry,
        metrics,
        token: args.token.clone(),
        max_body: args.max_body_bytes,
        node,
    }));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, model_dirs = ?args.model_dirs, "neuron serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
