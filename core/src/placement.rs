//! What a placement asks for: the spec of a ModelPlacement, also one `[[placements]]` table of a
//! static `models.toml`. Plain serde types; with the `kube` feature they also give the CRD's
//! schema (the label selector's is Kubernetes' own).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::neuron::{DeviceKind, ModelSource};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementSpec {
    #[cfg_attr(feature = "kube", schemars(schema_with = "model_source_schema"))]
    pub model: ModelSource,
    /// The name clients send; default: the placement's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Copies wanted now (the `scale` subresource moves it). Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(extend("default" = 1), range(min = 0, max = 1000)))]
    pub replicas: Option<u32>,
    /// Copies kept even when idle; 0 lets the model scale to zero. Default: `replicas` (or 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 0, max = 1000)))]
    pub min_replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1, max = 1000)))]
    pub max_replicas: Option<u32>,
    /// Seconds without requests before copies above `minReplicas` are unloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 1)))]
    pub idle_timeout: Option<u64>,
    /// Never evicted.
    #[serde(default)]
    pub pinned: bool,
    /// With the `priority` eviction strategy, lower priorities are evicted first.
    #[serde(default)]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "kube", schemars(range(min = 16, max = 1048576)))]
    pub context_length: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceKind>,
    /// Which Neurons may hold copies (Kubernetes mode); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neuron_selector: Option<LabelSelector>,
}

/// Kubernetes' label selector (`matchLabels`, `matchExpressions`), with the same fields and the
/// same JSON, so a static `models.toml` and the neuron need no Kubernetes crate for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_expressions: Option<Vec<LabelSelectorRequirement>>,
}

/// One `matchExpressions` entry: `key` `operator` (`In`, `NotIn`, `Exists`, `DoesNotExist`)
/// `values`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

#[cfg(feature = "kube")]
mod k8s {
    use std::borrow::Cow;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;

    use super::{LabelSelector, LabelSelectorRequirement};

    /// The schema is Kubernetes' own, so the CRD says what the API server expects.
    impl schemars::JsonSchema for LabelSelector {
        fn schema_name() -> Cow<'static, str> {
            meta::LabelSelector::schema_name()
        }

        fn schema_id() -> Cow<'static, str> {
            meta::LabelSelector::schema_id()
        }

        fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
            meta::LabelSelector::json_schema(generator)
        }

        fn inline_schema() -> bool {
            meta::LabelSelector::inline_schema()
        }
    }

    impl From<LabelSelector> for meta::LabelSelector {
        fn from(s: LabelSelector) -> Self {
            meta::LabelSelector {
                match_labels: s.match_labels,
                match_expressions: s.match_expressions.map(|v| {
                    v.into_iter()
                        .map(
                            |r: LabelSelectorRequirement| meta::LabelSelectorRequirement {
                                key: r.key,
                                operator: r.operator,
                                values: r.values,
                            },
                        )
                        .collect()
                }),
            }
        }
    }
}

/// `model`: exactly one of `uri` or `repo`; `quant`, `file`, `revision` and `tokenizerRepo` go with
/// `repo`. Written by hand because the untagged enum's derived schema cannot say "exactly one".
#[cfg(feature = "kube")]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_selector_reads_as_kubernetes_writes_it() {
        let json = serde_json::json!({"matchLabels": {"gpu": "h200"},
            "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]},
                                 {"key": "spot", "operator": "DoesNotExist"}]});
        let s: LabelSelector = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(s.match_expressions.as_ref().unwrap()[1].values, None);
        assert_eq!(serde_json::to_value(&s).unwrap(), json);
    }

    #[cfg(feature = "kube")]
    #[test]
    fn a_label_selector_is_kubernetes_own_in_schema_and_value() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
        let s: LabelSelector =
            serde_json::from_value(serde_json::json!({"matchLabels": {"gpu": "h200"}})).unwrap();
        let k: meta::LabelSelector = s.clone().into();
        assert_eq!(
            serde_json::to_value(&k).unwrap(),
            serde_json::to_value(&s).unwrap()
        );
        let ours = schemars::SchemaGenerator::default().into_root_schema_for::<LabelSelector>();
        let theirs =
            schemars::SchemaGenerator::default().into_root_schema_for::<meta::LabelSelector>();
        assert_eq!(ours, theirs);
    }
}
