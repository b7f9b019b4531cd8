//! Types shared by every part of cortex: the neuron's lifecycle API ([`neuron`]), the OpenAI
//! wire format ([`openai`]), what a placement asks for ([`placement`]), the custom resources
//! ([`crd`], with the `kube` feature) and the placement planner ([`planner`]) and its executor
//! ([`placer`]). `core` does no I/O and depends on no other cortex crate. Without the `kube`
//! feature it needs serde alone, so the neuron compiles no Kubernetes crate.
//!
//! ```
//! use cortex_core::neuron::{LoadRequest, ModelSource};
//! let req: LoadRequest = serde_json::from_str(
//!     r#"{"id": "smollm2", "source": {"uri": "file:///models/SmolLM2-135M-Instruct.Q4_1.gguf"}}"#,
//! ).unwrap();
//! assert!(matches!(req.source, ModelSource::Uri { .. }));
//! ```

pub mod anthropic;
#[cfg(feature = "kube")]
pub mod crd;
pub mod exposition;
pub mod neuron;
pub mod openai;
pub mod placement;
pub mod placer;
pub mod planner;

/// Compares secrets (tokens, key hashes) in time that does not depend on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Logs of every cortex binary: to stderr, level from `RUST_LOG` (default `info`), JSON when
/// `CORTEX_LOG_FORMAT=json`.
pub fn init_tracing() {
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
