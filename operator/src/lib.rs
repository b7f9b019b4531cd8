//! cortex-operator: reconciles ModelPlacements into neuron loads and unloads ([`placements`]),
//! keeps Neuron objects and their status ([`neurons`]), elects one leader among its replicas
//! ([`leader`]) and serves `/metrics` and `/healthz` ([`metrics`]).

pub mod leader;
pub mod metrics;
pub mod neuron_api;
pub mod neurons;
pub mod placements;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cortex_core::crd::{ModelPlacement, Neuron, Phase};
use cortex_core::planner::Strategy;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::CustomResourceExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::metrics::{Metrics, PhaseLabels};
use crate::neuron_api::NeuronClient;
use crate::neurons::Observed;

/// What the controllers share.
pub struct Ctx {
    pub client: Client,
    pub neurons_api: Api<Neuron>,
    pub neurons: Store<Neuron>,
    pub placements: Store<ModelPlacement>,
    pub neuron_client: NeuronClient,
    pub strategy: Strategy,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// What each neuron's `/status` said last, by Neuron name.
    pub observed: RwLock<BTreeMap<String, Observed>>,
    /// Loads asked for and not yet listed: (model id, neuron) → when.
    pub pending: Mutex<HashMap<(String, String), Instant>>,
    /// Failed loads by (model id, neuron), with their backoff.
    pub failures: Mutex<HashMap<(String, String), placements::Failure>>,
}

/// Settings of one operator process.
pub struct Settings {
    /// Namespace of ModelPlacements to reconcile; all when `None`.
    pub namespace: Option<String>,
    pub neuron_token: Option<String>,
    pub strategy: Strategy,
    pub poll_interval: Duration,
    /// Pods of the neuron DaemonSet: namespace and label selector; none = no pod discovery.
    pub pod_namespace: String,
    pub pod_selector: Option<String>,
    pub neuron_port: u16,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub identity: String,
}

/// Both CRDs as one YAML stream, as `crds/` holds them.
pub fn crds_yaml() -> String {
    let mut out = String::new();
    for crd in [ModelPlacement::crd(), Neuron::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).expect("CRDs serialise"));
    }
    out
}

/// Runs the operator until leadership is lost (an error, so the process restarts and stands by).
pub async fn run(client: Client, settings: Settings, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let neurons_api: Api<Neuron> = Api::all(client.clone());
    let (neuron_reader, neuron_writer) = reflector::store();
    let neuron_watch = watcher(neurons_api.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(neuron_writer)
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(neuron_watch);

    let mp_api: Api<ModelPlacement> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let controller = Controller::new(mp_api, watcher::Config::default());
    let mp_reader = controller.store();

    let (pod_reader, pod_writer) = reflector::store::<Pod>();
    if let Some(sel) = &settings.pod_selector {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &settings.pod_namespace);
        let w = watcher(pods, watcher::Config::default().labels(sel))
            .default_backoff()
            .reflect(pod_writer)
            .for_each(|_| futures::future::ready(()));
        tokio::spawn(w);
    }

    let elector = leader::Elector::new(
        client.clone(),
        &settings.pod_namespace,
        &settings.lease_name,
        &settings.identity,
        settings.lease_duration,
    );
    elector.acquire().await;
    metrics.leader.set(1);
    tracing::info!(identity = %settings.identity, "leading");

    neuron_reader.wait_until_ready().await?;
    let ctx = Arc::new(Ctx {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "cortex-operator".into(),
                instance: Some(settings.identity.clone()),
            },
        ),
        client,
        neurons_api,
        neurons: neuron_reader,
        placements: mp_reader.clone(),
        neuron_client: NeuronClient::new(settings.neuron_token.clone()),
        strategy: settings.strategy,
        metrics: metrics.clone(),
        observed: RwLock::new(BTreeMap::new()),
        pending: Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
    });
    // Placements are planned from what the neurons hold now, never from nothing: one full poll first.
    if settings.pod_selector.is_some() {
        pod_reader.wait_until_ready().await?;
        neurons::sync_pods(&ctx, &pod_reader, settings.neuron_port).await;
    }
    neurons::poll_all(&ctx).await;

    let (trigger, triggers) = futures::channel::mpsc::unbounded::<()>();
    let poller = {
        let ctx = ctx.clone();
        let every = settings.poll_interval;
        let with_pods = settings.pod_selector.is_some();
        let port = settings.neuron_port;
        async move {
            loop {
                tokio::time::sleep(every).await;
                if with_pods {
                    neurons::sync_pods(&ctx, &pod_reader, port).await;
                }
                if neurons::poll_all(&ctx).await {
                    let _ = trigger.unbounded_send(());
                }
                count_phases(&ctx);
            }
        }
    };
    tokio::spawn(poller);

    let controller = controller
        .reconcile_all_on(triggers)
        .run(placements::reconcile, placements::error_policy, ctx)
        .for_each(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile");
            }
            futures::future::ready(())
        });
    tokio::select! {
        _ = controller => anyhow::bail!("the ModelPlacement controller stopped"),
        _ = elector.hold() => {
            metrics.leader.set(0);
            anyhow::bail!("lost the leader lease; exiting so a fresh process stands by")
        }
    }
}

/// The `Ready` condition, keeping the previous transition time while its status is unchanged.
pub fn ready_condition(
    previous: &[Condition],
    ready: bool,
    reason: String,
    message: String,
    observed_generation: Option<i64>,
) -> Condition {
    let status = if ready { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(Timestamp::now()));
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason,
        message,
        last_transition_time,
        observed_generation,
    }
}

fn count_phases(ctx: &Ctx) {
    let mut counts: HashMap<Phase, i64> = Phase::ALL.iter().map(|p| (*p, 0)).collect();
    for mp in ctx.placements.state() {
        let phase = mp.status.as_ref().map(|s| s.phase).unwrap_or_default();
        *counts.entry(phase).or_default() += 1;
    }
    for (phase, n) in counts {
        ctx.metrics
            .placements
            .get_or_create(&PhaseLabels {
                phase: phase.as_str().into(),
            })
            .set(n);
    }
}
