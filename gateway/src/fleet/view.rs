//! What `/cortex/fleet` and `/v1/models` answer, typed at both ends: the gateway writes these
//! structs and `cortex status` / `cortex models` read them back.
//!
//! A neuron's report is the fields `cortex status` prints, typed, with the rest of whatever the
//! mode knows of it (a neuron's own `/status` in static mode, its Neuron object's status in
//! Kubernetes mode) passed on as it is.

use cortex_core::neuron::{DeviceInfo, ModelState};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `GET /cortex/fleet`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetView {
    pub neurons: Vec<NeuronEntry>,
}

/// One neuron of `/cortex/fleet`; its token is never included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NeuronEntry {
    pub name: String,
    pub endpoint: String,
    pub up: bool,
    /// Requests the gateway is proxying to it now.
    #[serde(default)]
    pub outstanding: u32,
    /// What the neuron last reported; `null` when it never answered.
    pub status: Option<NeuronReport>,
}

/// A neuron's report: its devices, models and requests in flight, and the other fields of the
/// mode's source as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NeuronReport {
    #[serde(default)]
    pub devices: Vec<DeviceInfo>,
    #[serde(default)]
    pub models: Vec<ModelReport>,
    #[serde(default)]
    pub inflight: u32,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl NeuronReport {
    /// The report of a neuron's `/status` or of a Neuron object's status.
    pub fn of(status: &impl Serialize) -> Option<NeuronReport> {
        serde_json::to_value(status)
            .ok()
            .and_then(|v| serde_json::from_value(v).ok())
    }
}

/// One model a neuron holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelReport {
    pub id: String,
    pub state: ModelState,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub inflight: u32,
    #[serde(default)]
    pub queued: u32,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// `GET /v1/models`: OpenAI's model list, every placement's names with cortex's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

impl ModelList {
    pub fn new(data: Vec<ModelCard>) -> Self {
        ModelList {
            object: "list".into(),
            data,
        }
    }
}

/// One served name or alias of a placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    pub state: CardState,
    /// The placement serving this name.
    pub placement: String,
    pub loaded_on: Vec<CopyState>,
    pub pinned: bool,
    pub min_replicas: u32,
}

/// A placement's state over all its copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CardState {
    /// At least one copy is ready.
    Ready,
    /// No copy is ready, one is on its way.
    Loading,
    /// No copy, or only failed ones.
    NotLoaded,
}

impl CardState {
    /// The state of a placement whose copies are in `states`.
    pub fn of(states: impl IntoIterator<Item = ModelState>) -> CardState {
        let mut state = CardState::NotLoaded;
        for s in states {
            if s == ModelState::Ready {
                return CardState::Ready;
            }
            if s != ModelState::Failed {
                state = CardState::Loading;
            }
        }
        state
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CardState::Ready => "ready",
            CardState::Loading => "loading",
            CardState::NotLoaded => "not_loaded",
        }
    }
}

/// One copy of a placement and its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyState {
    pub neuron: String,
    pub state: ModelState,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_card_is_ready_with_one_ready_copy_and_failed_copies_count_as_none() {
        use ModelState::*;
        assert_eq!(CardState::of([Loading, Ready]), CardState::Ready);
        assert_eq!(CardState::of([Downloading, Failed]), CardState::Loading);
        assert_eq!(CardState::of([Failed]), CardState::NotLoaded);
        assert_eq!(CardState::of([]), CardState::NotLoaded);
    }

    #[test]
    fn a_report_keeps_the_fields_it_does_not_type() {
        let status = json!({"node": "beast", "version": "0.1.0", "devices": [], "inflight": 2,
            "queued": 1, "models": [{"id": "m", "state": "ready", "bytes": 7, "inflight": 1,
            "queued": 0, "contextLength": 2048}]});
        let r = NeuronReport::of(&status).unwrap();
        assert_eq!((r.inflight, r.models[0].bytes), (2, 7));
        assert_eq!(serde_json::to_value(&r).unwrap(), status);
    }
}
