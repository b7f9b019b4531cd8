//! `cortex.toml` (`[gateway]`, `[eviction]`, `[[neurons]]`) and the `models.toml` of placements
//! beside it, for static mode, and the flags of Kubernetes mode ([`KubeArgs`]); both become the
//! fleet's [`Settings`]. Unknown keys are errors that name the key, so a typo never passes
//! silently.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cortex_core::planner::Strategy;
use serde::Deserialize;

use crate::error::Error;
use crate::fleet::Settings;
use crate::fleet::catalogue::Placement;
use crate::fleet::neuron::NeuronConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub eviction: EvictionConfig,
    #[serde(default)]
    pub neurons: Vec<NeuronConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: String,
    /// Path of the placements file; relative paths are beside `cortex.toml`.
    #[serde(default)]
    pub models: Option<PathBuf>,
    /// Keys clients must send (`Authorization: Bearer` or `x-api-key`); none here nor in
    /// `api_keys_file` = open.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// A file of accepted keys as `sha256:<hex>` lines (`cortex hash-key KEY` prints one), so the
    /// keys themselves need not be stored; relative paths are beside `cortex.toml`.
    #[serde(default)]
    pub api_keys_file: Option<PathBuf>,
    /// SHA-256 (hex) of every accepted key: `api_keys` hashed plus `api_keys_file`'s lines.
    #[serde(skip)]
    pub key_hashes: Vec<String>,
    /// Longest a request waits for a cold model to load, in seconds.
    #[serde(default = "default_load_timeout")]
    pub load_timeout_secs: u64,
    /// Longest wait, in seconds, for a neuron's answer to start (its first byte).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Longest silence, in seconds, in the middle of a streamed answer.
    #[serde(default = "default_stream_idle")]
    pub stream_idle_timeout_secs: u64,
    /// Seconds between polls of each neuron's `/status`.
    #[serde(default = "default_poll")]
    pub poll_interval_secs: f64,
    /// Largest request body accepted, in bytes; larger ones get 413 in the caller's dialect.
    /// Generous by default: Claude Code sends whole conversations and tool definitions.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Seconds between keep-alives (SSE comments, Anthropic `ping`s) to a streaming caller while
    /// its model loads.
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: f64,
}

fn default_listen() -> String {
    "0.0.0.0:31313".into()
}
fn default_metrics_listen() -> String {
    "0.0.0.0:31314".into()
}
fn default_load_timeout() -> u64 {
    600
}
fn default_request_timeout() -> u64 {
    600
}
fn default_stream_idle() -> u64 {
    60
}
fn default_poll() -> f64 {
    2.0
}
fn default_max_body() -> usize {
    32 << 20
}
fn default_keepalive() -> f64 {
    5.0
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: default_listen(),
            metrics_listen: default_metrics_listen(),
            models: None,
            api_keys: Vec::new(),
            api_keys_file: None,
            key_hashes: Vec::new(),
            load_timeout_secs: default_load_timeout(),
            request_timeout_secs: default_request_timeout(),
            stream_idle_timeout_secs: default_stream_idle(),
            poll_interval_secs: default_poll(),
            max_body_bytes: default_max_body(),
            keepalive_secs: default_keepalive(),
        }
    }
}

impl GatewayConfig {
    /// The fleet's bounds these keys set.
    pub fn settings(&self) -> Settings {
        Settings {
            load_timeout: Duration::from_secs(self.load_timeout_secs),
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            stream_idle_timeout: Duration::from_secs(self.stream_idle_timeout_secs),
            keepalive: Duration::try_from_secs_f64(self.keepalive_secs.max(0.01))
                .unwrap_or(Duration::from_secs(5)),
            max_body_bytes: self.max_body_bytes,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvictionConfig {
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub defrag_after_cycles: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelsFile {
    #[serde(default)]
    placements: Vec<Placement>,
}

/// The flags of `cortex serve --kubernetes`.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// Route from ModelPlacement and Neuron objects (in-cluster config or KUBECONFIG) instead of a
    /// cortex.toml.
    #[arg(long, env = "CORTEX_KUBERNETES")]
    pub kubernetes: bool,
    /// Kubernetes mode: serve the ModelPlacements of this namespace only (default: all namespaces).
    #[arg(long, env = "CORTEX_NAMESPACE")]
    pub namespace: Option<String>,
    /// Kubernetes mode: the token of the cluster's neurons (their --token).
    #[arg(long, env = "CORTEX_NEURON_TOKEN", hide_env_values = true)]
    pub neuron_token: Option<String>,
    /// Kubernetes mode: accepted API keys as `sha256:<hex>` lines (`cortex hash-key KEY` prints
    /// one); open when absent.
    #[arg(long, env = "CORTEX_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Kubernetes mode: longest a request waits for a model to wake, in seconds (default 600).
    #[arg(long, env = "CORTEX_LOAD_TIMEOUT_SECS")]
    pub load_timeout_secs: Option<u64>,
    /// Kubernetes mode: longest wait for a neuron's first byte, in seconds (default 600).
    #[arg(long, env = "CORTEX_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<u64>,
    /// Kubernetes mode: longest silence mid-stream, in seconds (default 60).
    #[arg(long, env = "CORTEX_STREAM_IDLE_TIMEOUT_SECS")]
    pub stream_idle_timeout_secs: Option<u64>,
    /// Kubernetes mode: largest request body accepted, in bytes (default 32 MiB).
    #[arg(long, env = "CORTEX_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Kubernetes mode: seconds between keep-alives to a stream waiting for a model (default 5).
    #[arg(long, env = "CORTEX_KEEPALIVE_SECS")]
    pub keepalive_secs: Option<f64>,
}

impl KubeArgs {
    /// The `[gateway]` settings these flags stand for: static mode's defaults where a flag is absent.
    pub fn gateway_config(&self) -> Result<GatewayConfig, Error> {
        let d = GatewayConfig::default();
        Ok(GatewayConfig {
            key_hashes: match &self.api_keys_file {
                Some(f) => read_key_hashes(f)?,
                None => Vec::new(),
            },
            api_keys_file: self.api_keys_file.clone(),
            load_timeout_secs: self.load_timeout_secs.unwrap_or(d.load_timeout_secs),
            request_timeout_secs: self.request_timeout_secs.unwrap_or(d.request_timeout_secs),
            stream_idle_timeout_secs: self
                .stream_idle_timeout_secs
                .unwrap_or(d.stream_idle_timeout_secs),
            max_body_bytes: self.max_body_bytes.unwrap_or(d.max_body_bytes),
            keepalive_secs: self.keepalive_secs.unwrap_or(d.keepalive_secs),
            ..d
        })
    }
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
}

/// The `sha256:<hex>` line for a key, as `api_keys_file` holds it.
pub fn hash_key(key: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The accepted key hashes of an `api_keys_file`: `sha256:<hex>` lines, `#` comments, blank lines.
pub fn read_key_hashes(path: &Path) -> Result<Vec<String>, Error> {
    read(path)?
        .lines()
        .enumerate()
        .map(|(i, l)| (i, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(i, l)| match l.strip_prefix("sha256:") {
            Some(h) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {
                Ok(h.to_ascii_lowercase())
            }
            _ => Err(Error::Config(format!(
                "{}:{}: expected 'sha256:<64 hex digits>' (print one with `cortex hash-key KEY`)",
                path.display(),
                i + 1
            ))),
        })
        .collect()
}

/// Reads `cortex.toml` and its placements.
pub fn load(path: &Path) -> Result<(Config, Vec<Placement>), Error> {
    let mut cfg: Config = toml::from_str(&read(path)?)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    if cfg.neurons.is_empty() {
        return Err(Error::Config(format!(
            "{}: no [[neurons]]; add one per neuron, e.g. [[neurons]] name = \"local\" endpoint = \"http://127.0.0.1:13131\"",
            path.display()
        )));
    }
    let mut names = HashSet::new();
    for n in &cfg.neurons {
        if !names.insert(&n.name) {
            return Err(Error::Config(format!(
                "{}: neuron name '{}' appears twice",
                path.display(),
                n.name
            )));
        }
    }
    let gw = &cfg.gateway;
    if !(gw.keepalive_secs.is_finite() && gw.keepalive_secs > 0.0) {
        return Err(Error::Config(format!(
            "{}: [gateway] keepalive_secs must be a positive number of seconds, got {}",
            path.display(),
            gw.keepalive_secs
        )));
    }
    if gw.max_body_bytes == 0 {
        return Err(Error::Config(format!(
            "{}: [gateway] max_body_bytes must be at least 1 (default {})",
            path.display(),
            default_max_body()
        )));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    cfg.gateway.key_hashes = cfg.gateway.api_keys.iter().map(|k| hash_key(k)).collect();
    if let Some(f) = &cfg.gateway.api_keys_file {
        cfg.gateway
            .key_hashes
            .extend(read_key_hashes(&dir.join(f))?);
    }
    let models = match &cfg.gateway.models {
        Some(p) if p.is_absolute() => p.clone(),
        Some(p) => dir.join(p),
        None => dir.join("models.toml"),
    };
    let placements = if models.exists() || cfg.gateway.models.is_some() {
        let file: ModelsFile = toml::from_str(&read(&models)?)
            .map_err(|e| Error::Config(format!("{}: {e}", models.display())))?;
        file.placements
    } else {
        Vec::new()
    };
    let mut served = HashSet::new();
    for p in &placements {
        for name in p.names() {
            if !served.insert(name.to_string()) {
                return Err(Error::Config(format!(
                    "{}: the name '{name}' is served by two placements; served names and aliases must be unique",
                    models.display()
                )));
            }
        }
    }
    Ok((cfg, placements))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_design_example_parses() {
        let d = tempfile::tempdir().unwrap();
        let cfg = write(
            d.path(),
            "cortex.toml",
            r#"
[gateway]
listen = "0.0.0.0:31313"
metrics_listen = "0.0.0.0:31314"
models = "models.toml"
[eviction]
strategy = "lru"
defrag_after_cycles = 50
[[neurons]]
name = "beast"
endpoint = "http://beast.internal:13131"
"#,
        );
        write(
            d.path(),
            "models.toml",
            r#"
[[placements]]
name = "smollm2"
replicas = 1
pinned = true
model = { uri = "file:///var/lib/cortex/models/SmolLM2-135M-Instruct.Q4_1.gguf" }

[[placements]]
name = "qwen3-0.6b"
minReplicas = 0
model = { repo = "unsloth/Qwen3-0.6B-GGUF", quant = "Q4_K_M" }
"#,
        );
        let (c, p) = load(&cfg).unwrap();
        assert_eq!(c.neurons[0].name, "beast");
        assert_eq!(c.eviction.strategy, Strategy::Lru);
        assert_eq!(p.len(), 2);
        assert!(p[0].spec.pinned);
        assert_eq!(p[0].spec.min_copies(), 1);
        assert_eq!(p[1].spec.min_copies(), 0);
    }

    #[test]
    fn api_keys_and_a_file_of_hashes_are_both_accepted_and_a_bad_line_is_named() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "keys.txt",
            &format!("# team keys\nsha256:{}\n\n", hash_key("sk-file")),
        );
        let cfg = write(
            d.path(),
            "cortex.toml",
            "[gateway]\napi_keys = [\"sk-plain\"]\napi_keys_file = \"keys.txt\"\n[[neurons]]\nname = \"a\"\nendpoint = \"http://a\"\n",
        );
        let (c, _) = load(&cfg).unwrap();
        assert_eq!(
            c.gateway.key_hashes,
            vec![hash_key("sk-plain"), hash_key("sk-file")]
        );
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        write(d.path(), "keys.txt", "sk-plaintext-key\n");
        let e = load(&cfg).unwrap_err().to_string();
        assert!(e.contains("keys.txt:1: expected 'sha256:"), "{e}");
    }

    #[test]
    fn a_typo_is_an_error_naming_the_key() {
        let d = tempfile::tempdir().unwrap();
        let cfg = write(
            d.path(),
            "cortex.toml",
            "[gateway]\nlisten_addr = \"x\"\n[[neurons]]\nname = \"a\"\nendpoint = \"http://a\"\n",
        );
        let e = load(&cfg).unwrap_err().to_string();
        assert!(e.contains("listen_addr"), "{e}");
    }

    #[test]
    fn body_limit_and_keepalive_are_read_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let neuron = "[[neurons]]\nname = \"a\"\nendpoint = \"http://a\"\n";
        let cfg = write(d.path(), "cortex.toml", neuron);
        let (c, _) = load(&cfg).unwrap();
        assert_eq!(c.gateway.max_body_bytes, 32 << 20);
        assert_eq!(c.gateway.keepalive_secs, 5.0);
        write(
            d.path(),
            "cortex.toml",
            &format!("[gateway]\nmax_body_bytes = 1024\nkeepalive_secs = 0.5\n{neuron}"),
        );
        let (c, _) = load(&cfg).unwrap();
        assert_eq!(
            (c.gateway.max_body_bytes, c.gateway.keepalive_secs),
            (1024, 0.5)
        );
        write(
            d.path(),
            "cortex.toml",
            &format!("[gateway]\nkeepalive_secs = 0\n{neuron}"),
        );
        let e = load(&cfg).unwrap_err().to_string();
        assert!(e.contains("keepalive_secs must be a positive"), "{e}");
        // A typo names the key and lists the real ones, these among them.
        write(
            d.path(),
            "cortex.toml",
            &format!("[gateway]\nmax_body_size = 1\n{neuron}"),
        );
        let e = load(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("max_body_size")
                && e.contains("max_body_bytes")
                && e.contains("keepalive_secs"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_served_names_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let cfg = write(
            d.path(),
            "cortex.toml",
            "[[neurons]]\nname = \"a\"\nendpoint = \"http://a\"\n",
        );
        write(
            d.path(),
            "models.toml",
            "[[placements]]\nname = \"x\"\nmodel = { uri = \"file:///a.gguf\" }\n[[placements]]\nname = \"y\"\naliases = [\"x\"]\nmodel = { uri = \"file:///b.gguf\" }\n",
        );
        let e = load(&cfg).unwrap_err().to_string();
        assert!(e.contains("'x' is served by two placements"), "{e}");
    }
}
