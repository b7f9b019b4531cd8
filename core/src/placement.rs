//! What a placement asks for: the spec of a ModelPlacement, also one `[[placements]]` table of a
//! static `models.toml`.

use serde::{Deserialize, Serialize};

use crate::neuron::{DeviceKind, ModelSource};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementSpec {
    pub model: ModelSource,
    /// The name clients send; default: the placement's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Copies kept even when idle; 0 lets the model scale to zero. Default: `replicas` (or 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replicas: Option<u32>,
    /// Seconds without requests before copies above `minReplicas` are unloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<u64>,
    /// Never evicted.
    #[serde(default)]
    pub pinned: bool,
    /// With the `priority` eviction strategy, lower priorities are evicted first.
    #[serde(default)]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceKind>,
}

impl PlacementSpec {
    /// Copies to load at start and keep: `minReplicas`, else `replicas`, else 1.
    pub fn min_copies(&self) -> u32 {
        self.min_replicas.or(self.replicas).unwrap_or(1)
    }
}
