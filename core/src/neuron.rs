//! The neuron's model lifecycle API: `/models/load`, `/models/unload`, `/models`, `/status`.

use serde::{Deserialize, Serialize};

/// Where a model's weights come from: a Hugging Face repository or a file already on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    untagged,
    deny_unknown_fields,
    expecting = "a model source: {\"uri\": \"file:///var/lib/cortex/models/x.gguf\"} or \
                 {\"repo\": \"unsloth/Qwen3-0.6B-GGUF\", \"quant\": \"Q4_K_M\"} (optionally with \
                 \"file\", \"revision\" and \"tokenizerRepo\")"
)]
pub enum ModelSource {
    /// `{"uri": "file:///var/lib/cortex/models/x.gguf"}`
    Uri { uri: String },
    /// `{"repo": "unsloth/Qwen3-0.6B-GGUF", "quant": "Q4_K_M"}` or with an explicit `file`.
    #[serde(rename_all = "camelCase")]
    Repo {
        repo: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quant: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokenizer_repo: Option<String>,
    },
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Uri { uri } => f.write_str(uri),
            ModelSource::Repo {
                repo, quant, file, ..
            } => {
                f.write_str(repo)?;
                if let Some(file) = file {
                    write!(f, "/{file}")
                } else if let Some(q) = quant {
                    write!(f, ":{q}")
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Which kind of device a model should run on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// `POST /models/load`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadRequest {
    pub id: String,
    pub source: ModelSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
}

/// `POST /models/unload`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnloadRequest {
    pub id: String,
}

/// The lifecycle of a model on a neuron: `downloading → loading → ready → unloading`, or `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    Downloading,
    Loading,
    Ready,
    Unloading,
    Failed,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Downloading => "downloading",
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Unloading => "unloading",
            ModelState::Failed => "failed",
        }
    }
}

/// `GET /models/{id}` and each entry of `GET /models` and `/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelInfo {
    pub id: String,
    pub state: ModelState,
    /// 0..1 within the current state (download or load).
    pub progress: f32,
    pub source: ModelSource,
    /// Memory the model holds (weights, expanded embeddings and its KV cache budget), in bytes.
    pub bytes: u64,
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    pub context_length: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<u64>,
    /// Requests in the running batch.
    pub inflight: u32,
    /// Requests waiting for a place in the batch (or for KV cache room).
    pub queued: u32,
    /// KV cache memory all of the model's sequences may hold together, in bytes.
    #[serde(default)]
    pub kv_cache_bytes: u64,
    /// KV cache memory its running sequences hold now, in bytes.
    #[serde(default)]
    pub kv_cache_used_bytes: u64,
    /// Memory kept beyond `kv_cache_bytes` for finished requests' blocks (the prefix cache).
    #[serde(default)]
    pub prefix_cache_bytes: u64,
    /// Bytes of cached prefix blocks no running request holds now (they live in
    /// `kv_cache_bytes + prefix_cache_bytes`).
    #[serde(default)]
    pub prefix_cache_used_bytes: u64,
}

/// One accelerator or the host's memory when it serves models on the CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct DeviceInfo {
    pub index: u32,
    pub name: String,
    /// `cpu` or `cuda`
    pub kind: String,
    pub memory_total: u64,
    pub memory_free: u64,
}

/// `GET /status`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NeuronStatus {
    pub node: String,
    pub version: String,
    pub devices: Vec<DeviceInfo>,
    pub models: Vec<ModelInfo>,
    pub inflight: u32,
    pub queued: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_source_parses_with_quant_and_camel_case_keys() {
        let s: ModelSource = serde_json::from_str(
            r#"{"repo":"unsloth/Qwen3-0.6B-GGUF","quant":"Q4_K_M","tokenizerRepo":"Qwen/Qwen3-0.6B"}"#,
        )
        .unwrap();
        assert_eq!(
            s,
            ModelSource::Repo {
                repo: "unsloth/Qwen3-0.6B-GGUF".into(),
                quant: Some("Q4_K_M".into()),
                file: None,
                revision: None,
                tokenizer_repo: Some("Qwen/Qwen3-0.6B".into()),
            }
        );
        assert_eq!(s.to_string(), "unsloth/Qwen3-0.6B-GGUF:Q4_K_M");
    }

    #[test]
    fn load_request_rejects_unknown_fields() {
        let err = serde_json::from_str::<LoadRequest>(
            r#"{"id":"x","source":{"uri":"file:///a.gguf"},"contxt":5}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("contxt"), "{err}");
    }

    #[test]
    fn a_source_of_neither_form_says_both_forms() {
        let err =
            serde_json::from_str::<LoadRequest>(r#"{"id":"x","source":{"path":"/models/a.gguf"}}"#)
                .unwrap_err()
                .to_string();
        assert!(
            err.contains(r#"{"uri": "file:///"#) && err.contains(r#"{"repo": "#),
            "{err}"
        );
    }
}
