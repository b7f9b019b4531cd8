//! The fleet as the gateway routes over it, the same in both modes: the neurons and the requests
//! the gateway has outstanding on each, the catalogue of placements by served name and alias,
//! the ready copy with the fewest outstanding requests, and getting a copy ready when there is
//! none, where concurrent requests for the same cold model share one attempt.
//!
//! Where the neurons, the catalogue and the copies come from, and how a copy is made ready, is a
//! [`Backend`]'s: static mode polls the neurons of `cortex.toml` and loads where the planner says
//! ([`static_backend`]); Kubernetes mode reads Neuron and ModelPlacement objects and scales
//! ModelPlacements ([`kube_backend`]). Both swap the neurons and the catalogue whole, so a
//! request always sees one consistent list.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | [`Fleet`] (the routing table) and the [`Backend`] trait |
//! | `neuron.rs`, `catalogue.rs` | the domain types: [`Neuron`], [`NeuronConfig`], [`Placement`], [`Catalogue`] |
//! | `upstream.rs` | the HTTP client proxied requests reach neurons with |
//! | `view.rs` | `/cortex/fleet` and `/v1/models`, typed |
//! | `static_backend.rs`, `kube_backend.rs` | the two backends |

pub mod catalogue;
pub mod kube_backend;
pub mod neuron;
pub mod static_backend;
pub mod upstream;
pub mod view;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cortex_core::neuron::ModelState;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::error::Error;
use crate::metrics::{Metrics, RouteLabelsNeuron};
use catalogue::{Catalogue, Placement};
use neuron::{Neuron, NeuronConfig};
use upstream::Upstream;
use view::{CardState, CopyState, FleetView, ModelCard, ModelList, NeuronEntry, NeuronReport};

/// The fleet's bounds, the same in both modes (`[gateway]` keys, or flags in Kubernetes mode).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Longest a request waits for a cold model.
    pub load_timeout: Duration,
    /// Longest wait for a neuron's answer to start.
    pub request_timeout: Duration,
    /// Longest silence in the middle of a streamed answer.
    pub stream_idle_timeout: Duration,
    /// How often a streaming caller waiting for a cold model gets a keep-alive.
    pub keepalive: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
}

/// Where the fleet's copies come from and how one is made ready: one per mode.
pub trait Backend: Send + Sync {
    /// Every copy of `p` the backend knows of, with its state; the fleet keeps those on up neurons.
    fn copies(&self, fleet: &Fleet, p: &Placement) -> Vec<(Arc<Neuron>, ModelState)>;

    /// Gets one more copy of `p` ready, or says why it cannot.
    fn make_ready(&self, fleet: Arc<Fleet>, p: Placement)
    -> BoxFuture<'static, Result<(), String>>;

    /// Brings the fleet up to date after a neuron answered that it no longer holds a model.
    fn refresh<'a>(&'a self, fleet: &'a Fleet) -> BoxFuture<'a, ()>;

    /// The neuron's report as `/cortex/fleet` shows it; `None` when there is none.
    fn describe(&self, n: &Neuron) -> Option<NeuronReport>;
}

type LoadFuture = Shared<BoxFuture<'static, Result<(), String>>>;

pub struct Fleet {
    neurons: RwLock<Arc<Vec<Arc<Neuron>>>>,
    catalogue: RwLock<Arc<Catalogue>>,
    backend: Box<dyn Backend>,
    pub http: reqwest::Client,
    /// Where proxied requests go through (`http` for the neurons it cannot reach directly).
    pub upstream: Upstream,
    pub load_timeout: Duration,
    /// Longest wait for a neuron's answer to start.
    pub request_timeout: Duration,
    /// Longest silence in the middle of a streamed answer.
    pub stream_idle_timeout: Duration,
    /// How often a streaming caller waiting for a cold model gets a keep-alive.
    pub keepalive: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    pub metrics: Arc<Metrics>,
    loads: Mutex<HashMap<String, LoadFuture>>,
}

impl Fleet {
    /// An empty fleet with `settings`' bounds, filled and served by `backend`.
    pub fn new(settings: &Settings, backend: impl Backend + 'static) -> Arc<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("building the HTTP client");
        Arc::new(Fleet {
            neurons: RwLock::default(),
            catalogue: RwLock::default(),
            backend: Box::new(backend),
            upstream: Upstream::new(http.clone()),
            http,
            load_timeout: settings.load_timeout,
            request_timeout: settings.request_timeout,
            stream_idle_timeout: settings.stream_idle_timeout,
            keepalive: settings.keepalive,
            max_body_bytes: settings.max_body_bytes,
            metrics: Arc::new(Metrics::new()),
            loads: Mutex::new(HashMap::new()),
        })
    }

    pub fn neurons(&self) -> Arc<Vec<Arc<Neuron>>> {
        self.neurons.read().expect("neurons lock").clone()
    }

    pub fn neuron(&self, name: &str) -> Option<Arc<Neuron>> {
        self.neurons().iter().find(|n| n.cfg.name == name).cloned()
    }

    /// Replaces the neurons with `cfgs` and returns them in that order; a neuron whose
    /// configuration is unchanged is kept, with its outstanding requests, state and status.
    pub fn set_neurons(&self, cfgs: Vec<NeuronConfig>) -> Arc<Vec<Arc<Neuron>>> {
        let mut guard = self.neurons.write().expect("neurons lock");
        let old = guard.clone();
        let new: Vec<Arc<Neuron>> = cfgs
            .into_iter()
            .map(|cfg| match old.iter().find(|n| n.cfg == cfg) {
                Some(n) => n.clone(),
                None => Arc::new(Neuron::new(cfg)),
            })
            .collect();
        for gone in old
            .iter()
            .filter(|o| !new.iter().any(|n| n.cfg.name == o.cfg.name))
        {
            self.metrics.neuron_up.remove(&RouteLabelsNeuron {
                neuron: gone.cfg.name.clone(),
            });
        }
        *guard = Arc::new(new);
        guard.clone()
    }

    /// Records whether a neuron answers (static mode) or is ready (Kubernetes mode).
    pub fn set_up(&self, n: &Neuron, up: bool, why: &str) {
        if up {
            if !n.up.swap(true, Ordering::Relaxed) {
                tracing::info!(neuron = %n.cfg.name, "neuron up");
            }
        } else {
            n.mark_down(why);
        }
        self.metrics
            .neuron_up
            .get_or_create(&RouteLabelsNeuron {
                neuron: n.cfg.name.clone(),
            })
            .set(i64::from(up));
    }

    pub fn catalogue(&self) -> Arc<Catalogue> {
        self.catalogue.read().expect("catalogue lock").clone()
    }

    pub fn set_catalogue(&self, c: Catalogue) {
        *self.catalogue.write().expect("catalogue lock") = Arc::new(c);
    }

    /// The placement serving a name or alias.
    pub fn placement(&self, name: &str) -> Option<Placement> {
        self.catalogue().get(name).cloned()
    }

    /// The copies of `p` on up neurons, in any state.
    pub fn copies(&self, p: &Placement) -> Vec<(Arc<Neuron>, ModelState)> {
        let mut copies = self.backend.copies(self, p);
        copies.retain(|(n, _)| n.up.load(Ordering::Relaxed));
        copies
    }

    fn ready_copies(&self, p: &Placement) -> impl Iterator<Item = Arc<Neuron>> {
        self.copies(p)
            .into_iter()
            .filter(|(_, s)| *s == ModelState::Ready)
            .map(|(n, _)| n)
    }

    /// The up neuron holding the placement ready with the fewest outstanding requests, leaving
    /// out the neurons named in `skip` (they just failed this request).
    pub fn pick(&self, p: &Placement, skip: &[String]) -> Option<Arc<Neuron>> {
        self.ready_copies(p)
            .filter(|n| !skip.contains(&n.cfg.name))
            .min_by_key(|n| n.outstanding.load(Ordering::Relaxed))
    }

    pub fn ready_replicas(&self, p: &Placement) -> usize {
        self.ready_copies(p).count()
    }

    /// Brings the fleet up to date after a neuron answered that it no longer holds a model.
    pub async fn refresh(&self) {
        self.backend.refresh(self).await
    }

    /// The neuron's report as `/cortex/fleet` shows it.
    pub fn describe(&self, n: &Neuron) -> Option<NeuronReport> {
        self.backend.describe(n)
    }

    /// `/cortex/fleet`: every neuron, whether it is up, its outstanding requests and its report.
    pub fn view(&self) -> FleetView {
        FleetView {
            neurons: self
                .neurons()
                .iter()
                .map(|n| NeuronEntry {
                    name: n.cfg.name.clone(),
                    endpoint: n.cfg.endpoint.clone(),
                    up: n.up.load(Ordering::Relaxed),
                    outstanding: n.outstanding.load(Ordering::Relaxed),
                    status: self.describe(n),
                })
                .collect(),
        }
    }

    /// `/v1/models`: a card for each served name and alias of every placement, loaded or not,
    /// with where it is loaded and its state.
    pub fn cards(&self) -> ModelList {
        let mut data = Vec::new();
        for p in &self.catalogue().placements {
            let copies = self.copies(p);
            let loaded_on: Vec<CopyState> = copies
                .iter()
                .map(|(n, s)| CopyState {
                    neuron: n.cfg.name.clone(),
                    state: *s,
                })
                .collect();
            let state = CardState::of(copies.iter().map(|(_, s)| *s));
            data.extend(p.names().map(|id| ModelCard {
                id: id.to_string(),
                object: "model".into(),
                created: 0,
                owned_by: "cortex".into(),
                state,
                placement: p.name.clone(),
                loaded_on: loaded_on.clone(),
                pinned: p.spec.pinned,
                min_replicas: p.spec.min_copies(),
            }));
        }
        ModelList::new(data)
    }

    /// Gets one more copy of the placement ready; concurrent calls for the same placement share it.
    pub async fn load_copy(self: &Arc<Self>, p: &Placement) -> Result<(), Error> {
        let fut = {
            let mut loads = self.loads.lock().expect("loads lock");
            loads
                .entry(p.name.clone())
                .or_insert_with(|| {
                    let me = self.clone();
                    let p = p.clone();
                    let fut = async move {
                        let started = std::time::Instant::now();
                        let before: Vec<Arc<Neuron>> = me.ready_copies(&p).collect();
                        let r = me.backend.make_ready(me.clone(), p.clone()).await;
                        me.loads.lock().expect("loads lock").remove(&p.name);
                        // The copy made is the ready one that was not there before.
                        let on = me
                            .ready_copies(&p)
                            .find(|n| !before.iter().any(|b| Arc::ptr_eq(b, n)));
                        me.metrics.cold_load(
                            &p.name,
                            r.is_ok(),
                            on.as_ref().map(|n| n.cfg.name.as_str()),
                            started.elapsed(),
                        );
                        r
                    }
                    .boxed()
                    .shared();
                    // The attempt runs to its end even when every waiting request gives up, so
                    // it never stays half-done in `loads`.
                    tokio::spawn(fut.clone());
                    fut
                })
                .clone()
        };
        match tokio::time::timeout(self.load_timeout, fut).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::NoCapacity(e)),
            Err(_) => Err(Error::LoadTimeout {
                model: p.served_name().to_string(),
                secs: self.load_timeout.as_secs(),
            }),
        }
    }
}
