//! Neurons: the operator keeps one Neuron object per pod of the neuron DaemonSet, polls every
//! Neuron's `/status` and writes what it found (readiness, devices, free memory, models) to the
//! object's status. What it saw is also kept in memory ([`Observed`]) for the placement
//! controller, so a reconcile never acts on a status patch that has not come back through the watch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cortex_core::crd::{Neuron, NeuronModel, NeuronResourceStatus, NeuronSpec, human_bytes};
use cortex_core::neuron::NeuronStatus;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::Ctx;
use crate::metrics::ReadyLabels;

/// Label on the Neuron objects the operator made for DaemonSet pods (it deletes them with the pod).
pub const MANAGED_LABEL: &str = "cortex.helexa.io/managed-by";
const MANAGER: &str = "cortex-operator";
/// Consecutive failed polls before a neuron is marked not ready.
const MISSES_BEFORE_DOWN: u32 = 2;
/// `lastSeen` is rewritten at least this often even when nothing else changed.
const LAST_SEEN_EVERY_SECS: i64 = 30;

/// A neuron as the operator last saw it.
#[derive(Debug, Clone)]
pub struct Observed {
    pub endpoint: String,
    pub ready: bool,
    pub unschedulable: bool,
    pub labels: BTreeMap<String, String>,
    /// The last `/status` (kept while not ready: it says what was there).
    pub status: Option<NeuronStatus>,
    pub misses: u32,
}

/// Polls every Neuron once, updates [`Ctx::observed`] and the objects' status; true when anything
/// a placement depends on changed.
pub async fn poll_all(ctx: &Arc<Ctx>) -> bool {
    let neurons = ctx.neurons.state();
    let polls = neurons.iter().map(|n| {
        let ctx = ctx.clone();
        let n = n.clone();
        async move {
            let res = ctx.neuron_client.status(&n.spec.endpoint).await;
            (n, res)
        }
    });
    let results = futures::future::join_all(polls).await;
    let mut changed = false;
    let mut ready_count = 0;
    let names: Vec<String> = results.iter().map(|(n, _)| n.name_any()).collect();
    for (n, res) in results {
        let name = n.name_any();
        let (before, after) = {
            let mut seen = ctx.observed.write().expect("observed lock");
            let prev = seen.get(&name).cloned();
            let mut o = prev.clone().unwrap_or(Observed {
                endpoint: n.spec.endpoint.clone(),
                ready: false,
                unschedulable: n.spec.unschedulable,
                labels: n.labels().clone(),
                status: None,
                misses: 0,
            });
            o.endpoint = n.spec.endpoint.clone();
            o.unschedulable = n.spec.unschedulable;
            o.labels = n.labels().clone();
            match &res {
                Ok(s) => {
                    o.ready = true;
                    o.misses = 0;
                    o.status = Some(s.clone());
                }
                Err(_) => {
                    o.misses += 1;
                    if o.misses >= MISSES_BEFORE_DOWN {
                        o.ready = false;
                    }
                }
            }
            seen.insert(name.clone(), o.clone());
            (prev, o)
        };
        if after.ready {
            ready_count += 1;
        }
        if before.as_ref().map(placement_facts) != Some(placement_facts(&after)) {
            changed = true;
        }
        if let Some(error) = res.as_ref().err()
            && before.as_ref().is_some_and(|b| b.ready)
            && !after.ready
        {
            tracing::warn!(neuron = %name, %error, "neuron not ready");
        }
        if let Err(e) = write_status(ctx, &n, &after, res.err()).await {
            tracing::warn!(neuron = %name, error = %e, "writing Neuron status");
        }
    }
    // Forget neurons whose objects are gone.
    ctx.observed
        .write()
        .expect("observed lock")
        .retain(|k, _| names.contains(k));
    let total = names.len() as i64;
    let m = &ctx.metrics.neurons;
    m.get_or_create(&ReadyLabels {
        ready: "true".into(),
    })
    .set(ready_count);
    m.get_or_create(&ReadyLabels {
        ready: "false".into(),
    })
    .set(total - ready_count);
    changed
}

/// Readiness, schedulability, labels, and (id, state, bytes) of each model.
type Facts = (
    bool,
    bool,
    BTreeMap<String, String>,
    Vec<(String, String, u64)>,
);

/// What the placement controller decides on: readiness, schedulability, labels and each model's
/// state and size. (Free memory and last use move with every request; the periodic requeue
/// covers them.)
fn placement_facts(o: &Observed) -> Facts {
    let models = o
        .status
        .as_ref()
        .map(|s| {
            s.models
                .iter()
                .map(|m| (m.id.clone(), m.state.as_str().to_string(), m.bytes))
                .collect()
        })
        .unwrap_or_default();
    (o.ready, o.unschedulable, o.labels.clone(), models)
}

fn status_of(
    o: &Observed,
    error: Option<&str>,
    prev: Option<&NeuronResourceStatus>,
) -> NeuronResourceStatus {
    let s = o.status.as_ref();
    let devices = s.map(|s| s.devices.clone()).unwrap_or_default();
    let models: Vec<NeuronModel> = s
        .map(|s| {
            s.models
                .iter()
                .map(|m| NeuronModel {
                    id: m.id.clone(),
                    state: m.state,
                    progress: m.progress,
                    bytes: m.bytes,
                    loaded_at: m.loaded_at,
                    last_used_at: m.last_used_at,
                    inflight: m.inflight + m.queued,
                    error: m.error.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    let (reason, message) = match (o.ready, error) {
        (true, _) => ("Reachable", "the neuron answers /status".to_string()),
        (false, Some(e)) => ("Unreachable", e.to_string()),
        (false, None) => ("Unreachable", "no answer yet".to_string()),
    };
    NeuronResourceStatus {
        ready: o.ready,
        last_seen: if error.is_none() {
            Some(Timestamp::now().to_string())
        } else {
            prev.and_then(|p| p.last_seen.clone())
        },
        memory_free: devices.iter().map(|d| d.memory_free).max().map(human_bytes),
        device_count: devices.len() as u32,
        model_count: models.len() as u32,
        devices,
        models,
        version: s.map(|s| s.version.clone()),
        conditions: vec![crate::ready_condition(
            prev.map_or(&[][..], |p| &p.conditions),
            o.ready,
            reason.into(),
            message,
            None,
        )],
    }
}

async fn write_status(
    ctx: &Ctx,
    n: &Neuron,
    o: &Observed,
    error: Option<String>,
) -> Result<(), kube::Error> {
    let prev = n.status.as_ref();
    let mut next = status_of(o, error.as_deref(), prev);
    if let Some(p) = prev {
        // Unchanged but for lastSeen: write only every LAST_SEEN_EVERY_SECS.
        let mut same = next.clone();
        same.last_seen = p.last_seen.clone();
        let fresh = p
            .last_seen
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok())
            .is_some_and(|t| Timestamp::now().as_second() - t.as_second() < LAST_SEEN_EVERY_SECS);
        if same == *p && fresh {
            return Ok(());
        }
        if same == *p {
            next = same;
            next.last_seen = Some(Timestamp::now().to_string());
        }
    }
    ctx.neurons_api
        .patch_status(
            &n.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": next })),
        )
        .await
        .map(|_| ())
}

/// Keeps one Neuron per running pod of the neuron DaemonSet (named after its node) and deletes
/// the Neurons it made for pods that are gone.
pub async fn sync_pods(ctx: &Ctx, pods: &Store<Pod>, port: u16) {
    let mut wanted: HashMap<String, (String, String, String)> = HashMap::new();
    for p in pods.state() {
        let st = p.status.as_ref();
        let running = st.and_then(|s| s.phase.as_deref()) == Some("Running")
            && p.metadata.deletion_timestamp.is_none();
        let ip = st.and_then(|s| s.pod_ip.clone());
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
        if let (true, Some(ip), Some(node)) = (running, ip, node) {
            let endpoint = if ip.contains(':') {
                format!("http://[{ip}]:{port}")
            } else {
                format!("http://{ip}:{port}")
            };
            wanted.insert(node.clone(), (endpoint, node, p.name_any()));
        }
    }
    let existing = ctx.neurons.state();
    for (name, (endpoint, node, pod)) in &wanted {
        let current = existing.iter().find(|n| &n.name_any() == name);
        if current.is_some_and(|n| {
            n.spec.endpoint == *endpoint && n.spec.node_name.as_deref() == Some(node)
        }) {
            continue;
        }
        let mut neuron = Neuron::new(
            name,
            NeuronSpec {
                endpoint: endpoint.clone(),
                node_name: Some(node.clone()),
                unschedulable: current.is_some_and(|n| n.spec.unschedulable),
            },
        );
        neuron.metadata.labels = Some(BTreeMap::from([
            (MANAGED_LABEL.to_string(), MANAGER.to_string()),
            ("cortex.helexa.io/pod".to_string(), pod.clone()),
        ]));
        let r = ctx
            .neurons_api
            .patch(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&neuron),
            )
            .await;
        match r {
            Ok(_) => tracing::info!(neuron = %name, %endpoint, "neuron registered from its pod"),
            Err(e) => tracing::warn!(neuron = %name, error = %e, "registering a neuron pod"),
        }
    }
    for n in existing {
        let managed = n.labels().get(MANAGED_LABEL).map(String::as_str) == Some(MANAGER);
        if managed && !wanted.contains_key(&n.name_any()) {
            let api: &Api<Neuron> = &ctx.neurons_api;
            match api.delete(&n.name_any(), &DeleteParams::default()).await {
                Ok(_) => tracing::info!(neuron = %n.name_any(), "neuron pod gone; Neuron deleted"),
                Err(e) => tracing::warn!(neuron = %n.name_any(), error = %e, "deleting a Neuron"),
            }
        }
    }
}
