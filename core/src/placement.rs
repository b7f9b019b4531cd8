//! What a placement asks for: the spec of a ModelPlacement, also one `[[placements]]` table of a
//! static `models.toml`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::neuron::{DeviceKind, ModelSource};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementSpec {
    #[schemars(schema_with = "model_source_schema")]
    pub model: ModelSource,
    /// The name clients send; default: the placement's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Copies wanted now (the `scale` subresource moves it). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = 1), range(min = 0, max = 1000))]
    pub replicas: Option<u32>,
    /// Copies kept even when idle; 0 lets the model scale to zero. Default: `replicas` (or 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: Option<u32>,
    /// Seconds without requests before copies above `minReplicas` are unloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub idle_timeout: Option<u64>,
    /// Never evicted.
    #[serde(default)]
    pub pinned: bool,
    /// With the `priority` eviction strategy, lower priorities are evicted first.
    #[serde(default)]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 1048576))]
    pub context_length: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceKind>,
    /// Which Neurons may hold copies (Kubernetes mode); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neuron_selector: Option<LabelSelector>,
}

/// `model`: exactly one of `uri` or `repo`; `quant`, `file`, `revision` and `tokenizerRepo` go with
/// `repo`. Written by hand because the untagged enum's derived schema cannot say "exactly one".
fn model_source_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let s = |d: &str| serde_json::json!({"type": "string", "minLength": 1, "description": d});
    schemars::json_schema!({
        "type": "object",
        "description": "Where the weights come from: `uri` (a file:// GGUF already on the host) or `repo` (a Hugging Face repository, with `quant` or `file`).",
        "properties": {
            "uri": s("file:// URL of a GGUF file inside the neuron's --model-dirs"),
            "repo": s("Hugging Face repository, e.g. unsloth/Qwen3-0.6B-GGUF"),
            "quant": s("quantisation to pick from the repository, e.g. Q4_K_M"),
            "file": s("exact GGUF file in the repository"),
            "revision": s("branch, tag or commit of the repository"),
            "tokenizerRepo": s("repository with tokenizer.json when the GGUF has none"),
        },
        "x-kubernetes-validations": [
            {"rule": "has(self.uri) != has(self.repo)", "message": "model needs exactly one of uri or repo"},
            {"rule": "!has(self.uri) || !(has(self.quant) || has(self.file) || has(self.revision) || has(self.tokenizerRepo))",
             "message": "quant, file, revision and tokenizerRepo go with repo, not uri"},
            {"rule": "!(has(self.quant) && has(self.file))", "message": "give quant or file, not both"},
        ],
    })
}

impl PlacementSpec {
    /// Copies to load at start and keep: `minReplicas`, else `replicas`, else 1.
    pub fn min_copies(&self) -> u32 {
        self.min_replicas.or(self.replicas).unwrap_or(1)
    }
}
