//! One neuron as the gateway routes to it: its configuration, whether it is up, its last status
//! (static mode) and the requests outstanding on it.

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use cortex_core::neuron::NeuronStatus;
use serde::Deserialize;

/// A neuron to route to: one `[[neurons]]` table of `cortex.toml`, or a Neuron object.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeuronConfig {
    pub name: String,
    pub endpoint: String,
    /// The neuron's `--token`, sent to it and never shown to clients.
    #[serde(default)]
    pub token: Option<String>,
}

pub struct Neuron {
    pub cfg: NeuronConfig,
    /// Its last `/status` answer, in static mode (Kubernetes mode reads the Neuron object instead).
    pub status: RwLock<Option<NeuronStatus>>,
    pub up: AtomicBool,
    /// Times it was marked down: a probe that saw it answer counts only if no request failed
    /// on it while the probe was out (see [`Neuron::still_up_since`]).
    downs: AtomicU64,
    /// Requests the gateway is proxying to this neuron now.
    pub outstanding: AtomicU32,
}

impl Neuron {
    pub fn new(cfg: NeuronConfig) -> Self {
        Neuron {
            cfg,
            status: RwLock::new(None),
            up: AtomicBool::new(false),
            downs: AtomicU64::new(0),
            outstanding: AtomicU32::new(0),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.cfg.endpoint.trim_end_matches('/'))
    }

    /// A request to the neuron, with its token when it has one.
    pub fn request(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let rb = http.request(method, self.url(path));
        match &self.cfg.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    pub fn mark_down(&self, why: &str) {
        self.downs.fetch_add(1, Ordering::SeqCst);
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(neuron = %self.cfg.name, reason = why, "neuron marked down");
        }
    }
}

impl Neuron {
    /// A mark for [`Neuron::still_up_since`], taken before a probe goes out.
    pub fn probe_mark(&self) -> u64 {
        self.downs.load(Ordering::SeqCst)
    }

    /// Whether an answer to a probe sent at `mark` still says the neuron is up: not when a
    /// request has failed on it since (the answer may have left just before it stopped).
    pub fn still_up_since(&self, mark: u64) -> bool {
        self.downs.load(Ordering::SeqCst) == mark
    }
}
