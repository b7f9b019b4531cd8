//! The fleet as the gateway routes over it, the same in both modes: the neurons and the requests
//! the gateway has outstanding on each, the catalogue of placements by served name and alias,
//! the ready copy with the fewest outstanding requests, and getting a copy ready when there is
//! none, where concurrent requests for the same cold model share one attempt.
//!
//! Where the neurons, the catalogue and the copies come from, and how a copy is made ready, is a
//! [`Backend`]'s: static mode polls the neurons of `cortex.toml` and loads where the planner says
//! ([`crate::static_mode`]); Kubernetes mode reads Neuron and ModelPlacement objects and scales
//! ModelPlacements ([`crate::kubernetes`]). Both swap the neurons and the catalogue whole, so a
//! request always sees one consistent list.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cortex_core::neuron::{ModelState, NeuronStatus};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde_json::Value;

use crate::config::{GatewayConfig, NeuronConfig, Placement};
use crate::error::Error;
use crate::metrics::{Metrics, RouteLabelsNeuron};

pub struct Neuron {
    pub cfg: NeuronConfig,
    /// Its last `/status` answer, in static mode (Kubernetes mode reads the Neuron object instead).
    pub status: RwLock<Option<NeuronStatus>>,
    pub up: AtomicBool,
    /// Times it was marked down: a probe that saw it answer counts only if no request failed
    /// on it while the probe was out (see [`Neuron::still_up_since`]).
    downs: AtomicU64,
    /// Requests the gateway is proxying to this neuron now.
    pub outstanding: AtomicU32,
}

impl Neuron {
    pub fn new(cfg: NeuronConfig) -> Self {
        Neuron {
            cfg,
            status: RwLock::new(None),
            up: AtomicBool::new(false),
            downs: AtomicU64::new(0),
            outstanding: AtomicU32::new(0),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.cfg.endpoint.trim_end_matches('/'))
    }

    /// A request to the neuron, with its token when it has one.
    pub fn request(
        &self,
        http: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let rb = http.request(method, self.url(path));
        match &self.cfg.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    pub fn mark_down(&self, why: &str) {
        self.downs.fetch_add(1, Ordering::SeqCst);
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(neuron = %self.cfg.name, reason = why, "neuron marked down");
        }
    }
}

impl Neuron {
    /// A mark for [`Neuron::still_up_since`], taken before a probe goes out.
    pub fn probe_mark(&self) -> u64 {
        self.downs.load(Ordering::SeqCst)
    }

    /// Whether an answer to a probe sent at `mark` still says the neuron is up: not when a
    /// request has failed on it since (the answer may have left just before it stopped).
    pub fn still_up_since(&self, mark: u64) -> bool {
        self.downs.load(Ordering::SeqCst) == mark
    }
}

/// The placements served, by served name and alias.
#[derive(Default)]
pub struct Catalogue {
    pub placements: Vec<Placement>,
    names: HashMap<String, usize>,
}

impl Catalogue {
    /// The catalogue of `placements`, and the names more than one of them asks for: such a name
    /// goes to the first that asks.
    pub fn new(placements: Vec<Placement>) -> (Catalogue, Vec<String>) {
        let mut names = HashMap::new();
        let mut shadowed = Vec::new();
        for (i, p) in placements.iter().enumerate() {
            for name in p.names() {
                if names.contains_key(name) {
                    shadowed.push(name.to_string());
                } else {
                    names.insert(name.to_string(), i);
                }
            }
        }
        (Catalogue { placements, names }, shadowed)
    }

    /// The placement serving a name or alias.
    pub fn get(&self, name: &str) -> Option<&Placement> {
        self.names.get(name).map(|&i| &self.placements[i])
    }
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

    /// The neuron's status as `/cortex/fleet` shows it.
    fn describe(&self, n: &Neuron) -> Value;
}

type LoadFuture = Shared<BoxFuture<'static, Result<(), String>>>;

pub struct Fleet {
    neurons: RwLock<Arc<Vec<Arc<Neuron>>>>,
    catalogue: RwLock<Arc<Catalogue>>,
    backend: Box<dyn Backend>,
    pub http: reqwest::Client,
    /// Where proxied requests go through (`http` for the neurons it cannot reach directly).
    pub upstream: crate::upstream::Upstream,
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
    /// An empty fleet with `gw`'s timeouts, filled and served by `backend`.
    pub fn new(gw: &GatewayConfig, backend: impl Backend + 'static) -> Arc<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("building the HTTP client");
        Arc::new(Fleet {
            neurons: RwLock::default(),
            catalogue: RwLock::default(),
            backend: Box::new(backend),
            upstream: crate::upstream::Upstream::new(http.clone()),
            http,
            load_timeout: Duration::from_secs(gw.load_timeout_secs),
            request_timeout: Duration::from_secs(gw.request_timeout_secs),
            stream_idle_timeout: Duration::from_secs(gw.stream_idle_timeout_secs),
            keepalive: Duration::try_from_secs_f64(gw.keepalive_secs.max(0.01))
                .unwrap_or(Duration::from_secs(5)),
            max_body_bytes: gw.max_body_bytes,
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

    /// The neuron's status as `/cortex/fleet` shows it.
    pub fn describe(&self, n: &Neuron) -> Value {
        self.backend.describe(n)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(name: &str, aliases: &[&str]) -> Placement {
        serde_json::from_value(serde_json::json!({
            "name": name, "aliases": aliases, "model": {"uri": "file:///m.gguf"}
        }))
        .unwrap()
    }

    #[test]
    fn a_name_two_placements_ask_for_goes_to_the_first_and_is_reported() {
        let (c, shadowed) =
            Catalogue::new(vec![placement("a", &["x"]), placement("b", &["x", "y"])]);
        assert_eq!(c.get("x").unwrap().name, "a");
        assert_eq!(c.get("y").unwrap().name, "b");
        assert!(c.get("z").is_none());
        assert_eq!(shadowed, vec!["x".to_string()]);
    }
}
