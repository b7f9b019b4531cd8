//! The custom resources of group `cortex.helexa.io/v1alpha1`: [`ModelPlacement`] ("serve this
//! model, this many copies, on these neurons") and [`Neuron`] (one inference host). The CRD YAML
//! in `crds/` is generated from these types by `cortex-operator crds`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::neuron::{DeviceInfo, ModelState};
use crate::placement::PlacementSpec;

pub const GROUP: &str = "cortex.helexa.io";
/// Finalizer that unloads a placement's copies before the object goes away.
pub const FINALIZER: &str = "cortex.helexa.io/unload";

/// Spec of a ModelPlacement: the same fields as a static `models.toml` placement.
#[allow(clippy::duplicated_attributes)] // one printcolumn(...) per column
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cortex.helexa.io",
    version = "v1alpha1",
    kind = "ModelPlacement",
    plural = "modelplacements",
    shortname = "mp",
    namespaced,
    status = "ModelPlacementStatus",
    doc = "Serve this model, this many copies, on these neurons.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Served", type_ = "string", json_path = ".spec.servedName"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(transparent)]
pub struct ModelPlacementSpec(pub PlacementSpec);

impl std::ops::Deref for ModelPlacementSpec {
    type Target = PlacementSpec;
    fn deref(&self) -> &PlacementSpec {
        &self.0
    }
}

impl ModelPlacement {
    /// The name clients send: `servedName`, else the object's name.
    pub fn served_name(&self) -> &str {
        self.spec
            .served_name
            .as_deref()
            .unwrap_or_else(|| self.metadata.name.as_deref().unwrap_or_default())
    }

    /// The id the model has on neurons: `<name>.<namespace>`, unique in the cluster.
    pub fn model_id(&self) -> String {
        format!(
            "{}.{}",
            self.metadata.name.as_deref().unwrap_or_default(),
            self.metadata.namespace.as_deref().unwrap_or("default")
        )
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    #[default]
    Pending,
    Loading,
    Ready,
    Degraded,
    Idle,
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Pending,
        Phase::Loading,
        Phase::Ready,
        Phase::Degraded,
        Phase::Idle,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Loading => "Loading",
            Phase::Ready => "Ready",
            Phase::Degraded => "Degraded",
            Phase::Idle => "Idle",
            Phase::Failed => "Failed",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelPlacementStatus {
    #[serde(default)]
    pub phase: Phase,
    /// Copies loaded or loading.
    #[serde(default)]
    pub replicas: u32,
    #[serde(default)]
    pub ready_replicas: u32,
    /// The label selector of the scale subresource (for autoscalers); names this placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default)]
    pub placements: Vec<PlacementStatus>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The id the model has on neurons (`<name>.<namespace>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
}

/// One copy of a placement on a neuron.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementStatus {
    pub neuron: String,
    pub endpoint: String,
    pub state: ModelState,
    #[serde(default)]
    pub progress: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<String>,
}

/// One inference host: a pod of the neuron DaemonSet, or a host outside the cluster applied by hand.
#[allow(clippy::duplicated_attributes)] // one printcolumn(...) per column
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cortex.helexa.io",
    version = "v1alpha1",
    kind = "Neuron",
    plural = "neurons",
    status = "NeuronResourceStatus",
    doc = "An inference host running the cortex neuron.",
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".spec.endpoint"),
    printcolumn(name = "Ready", type_ = "boolean", json_path = ".status.ready"),
    printcolumn(name = "Devices", type_ = "integer", json_path = ".status.deviceCount"),
    printcolumn(name = "Free", type_ = "string", json_path = ".status.memoryFree"),
    printcolumn(name = "Models", type_ = "integer", json_path = ".status.modelCount"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NeuronSpec {
    /// Base URL of the neuron's API, e.g. `http://10.0.0.7:13131`.
    #[schemars(regex(pattern = r"^https?://"))]
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// No new copies are placed here (existing ones stay).
    #[serde(default)]
    pub unschedulable: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NeuronResourceStatus {
    #[serde(default)]
    pub ready: bool,
    /// RFC 3339 time of the last answer to `/status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
    #[serde(default)]
    pub models: Vec<NeuronModel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// For the printer columns.
    #[serde(default)]
    pub device_count: u32,
    #[serde(default)]
    pub model_count: u32,
    /// Free memory of the roomiest device, human-readable (e.g. `11.2Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_free: Option<String>,
}

/// A model on a neuron, as its `/status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NeuronModel {
    pub id: String,
    pub state: ModelState,
    #[serde(default)]
    pub progress: f32,
    #[serde(default)]
    pub bytes: u64,
    /// Seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<u64>,
    #[serde(default)]
    pub inflight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `1.5Gi`-style sizes for printer columns.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b}")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn a_placement_reads_the_design_example() {
        let mp: ModelPlacement = serde_json::from_value(serde_json::json!({
            "apiVersion": "cortex.helexa.io/v1alpha1",
            "kind": "ModelPlacement",
            "metadata": {"name": "qwen3", "namespace": "ml"},
            "spec": {"model": {"repo": "unsloth/Qwen3-0.6B-GGUF", "quant": "Q4_K_M"}, "minReplicas": 0}
        }))
        .unwrap();
        assert_eq!(mp.served_name(), "qwen3");
        assert_eq!(mp.model_id(), "qwen3.ml");
        assert_eq!(mp.spec.min_replicas, Some(0));
    }

    #[test]
    fn the_crds_have_scale_status_and_short_names() {
        let mp = serde_json::to_value(ModelPlacement::crd()).unwrap();
        let v = &mp["spec"]["versions"][0];
        assert_eq!(
            v["subresources"]["scale"]["specReplicasPath"],
            ".spec.replicas"
        );
        assert!(v["subresources"]["status"].is_object());
        assert_eq!(mp["spec"]["names"]["shortNames"][0], "mp");
        let n = serde_json::to_value(Neuron::crd()).unwrap();
        assert_eq!(n["spec"]["scope"], "Cluster");
    }

    #[test]
    fn sizes_read_like_kubectl() {
        assert_eq!(human_bytes(512), "512");
        assert_eq!(human_bytes(3 << 29), "1.5Gi");
    }
}
