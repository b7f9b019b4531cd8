//! The operator's Prometheus metrics (`cortex_operator_*`, on `:8080/metrics`): reconciles and
//! their errors and durations, placements by phase, neurons by readiness, loads, evictions and
//! leadership. Label values are bounded: controller names, results, phases.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    /// The error's kind (`Error::error_type`): `kube`, `finalizer`.
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub controller: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    pub ready: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub result: String,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_seconds: Family<ControllerLabels, Histogram, fn() -> Histogram>,
    pub placements: Family<PhaseLabels, Gauge>,
    pub neurons: Family<ReadyLabels, Gauge>,
    pub loads: Family<OutcomeLabels, Counter>,
    pub unloads: Counter,
    pub evictions: Counter,
    pub scale_to_zero: Counter,
    pub leader: Gauge,
}

fn durations() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cortex_operator");
        let m = Metrics {
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_seconds: Family::new_with_constructor(durations),
            placements: Family::default(),
            neurons: Family::default(),
            loads: Family::default(),
            unloads: Counter::default(),
            evictions: Counter::default(),
            scale_to_zero: Counter::default(),
            leader: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "reconciles",
            "Reconciles by controller and result (success, error)",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by controller",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile, excluding model loads (they run on the neurons)",
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "placements",
            "ModelPlacements by phase",
            m.placements.clone(),
        );
        registry.register("neurons", "Neurons by readiness", m.neurons.clone());
        registry.register(
            "model_loads",
            "Load calls made to neurons, by result (accepted, no_room, refused, unreachable)",
            m.loads.clone(),
        );
        registry.register(
            "model_unloads",
            "Unload calls made to neurons (surplus copies, scale to zero, deletes)",
            m.unloads.clone(),
        );
        registry.register(
            "evictions",
            "Models evicted to make room for another",
            m.evictions.clone(),
        );
        registry.register(
            "scale_to_zero",
            "Placements scaled down after their idle timeout",
            m.scale_to_zero.clone(),
        );
        registry.register(
            "leader",
            "1 when this replica holds the leader lease",
            m.leader.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry)
            .expect("encoding metrics");
        s
    }

    /// A reconcile of `controller` ended after `secs`, failing with an error of kind `error`
    /// when it is given.
    pub fn reconciled(&self, controller: &str, error: Option<&str>, secs: f64) {
        self.reconciles
            .get_or_create(&ResultLabels {
                controller: controller.into(),
                result: if error.is_none() { "success" } else { "error" }.into(),
            })
            .inc();
        let c = ControllerLabels {
            controller: controller.into(),
        };
        if let Some(error) = error {
            self.reconcile_errors
                .get_or_create(&ErrorLabels {
                    controller: controller.into(),
                    error: error.into(),
                })
                .inc();
        }
        self.reconcile_seconds.get_or_create(&c).observe(secs);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
