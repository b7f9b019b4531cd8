//! The fleet as the gateway sees it: each neuron's last `/status`, whether it answers, the
//! requests the gateway has outstanding on it; and loading a placement where the planner says,
//! evicting first when it must. Concurrent requests for the same cold model share one load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cortex_core::neuron::{ModelState, NeuronStatus};
use cortex_core::openai::ErrorBody;
use cortex_core::planner::{self, LoadAsk, ModelView, NeuronView, Plan, Strategy};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde_json::json;

use crate::config::{Config, NeuronConfig, Placement};
use crate::error::Error;
use crate::metrics::{LoadLabels, Metrics, ModelLabels, RouteLabelsNeuron};

pub struct Neuron {
    pub cfg: NeuronConfig,
    pub status: RwLock<Option<NeuronStatus>>,
    pub up: AtomicBool,
    /// Requests the gateway is proxying to this neuron now.
    pub outstanding: AtomicU32,
}

impl Neuron {
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
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(neuron = %self.cfg.name, reason = why, "neuron marked down");
        }
    }

    fn holds_ready(&self, id: &str) -> bool {
        self.status
            .read()
            .expect("status lock")
            .as_ref()
            .is_some_and(|s| {
                s.models
                    .iter()
                    .any(|m| m.id == id && m.state == ModelState::Ready)
            })
    }
}

type LoadFuture = Shared<BoxFuture<'static, Result<(), String>>>;

pub struct Fleet {
    pub neurons: Vec<Arc<Neuron>>,
    pub placements: Vec<Placement>,
    names: HashMap<String, usize>,
    pub strategy: Strategy,
    pub http: reqwest::Client,
    pub load_timeout: Duration,
    /// Longest wait for a neuron's answer to start.
    pub request_timeout: Duration,
    /// Longest silence in the middle of a streamed answer.
    pub stream_idle_timeout: Duration,
    pub metrics: Arc<Metrics>,
    loads: Mutex<HashMap<String, LoadFuture>>,
}

impl Fleet {
    /// The fleet of `cfg`'s neurons serving `placements`.
    pub fn new(cfg: &Config, placements: Vec<Placement>) -> Arc<Self> {
        let neurons = cfg.neurons.clone();
        let strategy = cfg.eviction.strategy;
        let gw = &cfg.gateway;
        let mut names = HashMap::new();
        for (i, p) in placements.iter().enumerate() {
            names.insert(p.served_name().to_string(), i);
            for a in &p.spec.aliases {
                names.insert(a.clone(), i);
            }
        }
        Arc::new(Fleet {
            neurons: neurons
                .into_iter()
                .map(|cfg| {
                    Arc::new(Neuron {
                        cfg,
                        status: RwLock::new(None),
                        up: AtomicBool::new(false),
                        outstanding: AtomicU32::new(0),
                    })
                })
                .collect(),
            placements,
            names,
            strategy,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .expect("building the HTTP client"),
            load_timeout: Duration::from_secs(gw.load_timeout_secs),
            request_timeout: Duration::from_secs(gw.request_timeout_secs),
            stream_idle_timeout: Duration::from_secs(gw.stream_idle_timeout_secs),
            metrics: Arc::new(Metrics::new()),
            loads: Mutex::new(HashMap::new()),
        })
    }

    /// The placement serving a name or alias.
    pub fn placement(&self, name: &str) -> Option<&Placement> {
        self.names.get(name).map(|&i| &self.placements[i])
    }

    /// Asks every neuron for its status; those that do not answer are marked down.
    pub async fn poll(&self) {
        let polls = self.neurons.iter().map(|n| async move {
            let res = n
                .request(&self.http, reqwest::Method::GET, "/status")
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            match res {
                Ok(r) if r.status().is_success() => match r.json::<NeuronStatus>().await {
                    Ok(s) => {
                        *n.status.write().expect("status lock") = Some(s);
                        if !n.up.swap(true, Ordering::Relaxed) {
                            tracing::info!(neuron = %n.cfg.name, "neuron up");
                        }
                    }
                    Err(e) => n.mark_down(&format!("unreadable /status: {e}")),
                },
                Ok(r) => n.mark_down(&format!("/status answered {}", r.status())),
                Err(e) => n.mark_down(&e.to_string()),
            }
            self.metrics
                .neuron_up
                .get_or_create(&RouteLabelsNeuron {
                    neuron: n.cfg.name.clone(),
                })
                .set(i64::from(n.up.load(Ordering::Relaxed)));
        });
        futures::future::join_all(polls).await;
    }

    pub fn spawn_poller(self: &Arc<Self>, every: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                me.poll().await;
                tokio::time::sleep(every).await;
            }
        });
    }

    /// The up neuron holding the placement ready with the fewest outstanding requests, leaving
    /// out the neurons named in `skip` (they just failed this request).
    pub fn pick(&self, p: &Placement, skip: &[String]) -> Option<Arc<Neuron>> {
        self.neurons
            .iter()
            .filter(|n| {
                n.up.load(Ordering::Relaxed)
                    && n.holds_ready(&p.name)
                    && !skip.contains(&n.cfg.name)
            })
            .min_by_key(|n| n.outstanding.load(Ordering::Relaxed))
            .cloned()
    }

    pub fn ready_replicas(&self, p: &Placement) -> usize {
        self.neurons
            .iter()
            .filter(|n| n.up.load(Ordering::Relaxed) && n.holds_ready(&p.name))
            .count()
    }

    /// Loads one more copy of the placement; concurrent calls for the same placement share it.
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
                        let r = me.load_somewhere(&p).await;
                        me.loads.lock().expect("loads lock").remove(&p.name);
                        let result = if r.is_ok() { "success" } else { "failure" };
                        me.metrics
                            .cold_loads
                            .get_or_create(&LoadLabels {
                                model: p.name.clone(),
                                result: result.into(),
                            })
                            .inc();
                        if r.is_ok() {
                            me.metrics
                                .cold_load_seconds
                                .get_or_create(&ModelLabels {
                                    model: p.name.clone(),
                                })
                                .observe(started.elapsed().as_secs_f64());
                        }
                        r
                    }
                    .boxed()
                    .shared();
                    // The load runs to its end even when every waiting request gives up, so
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

    fn views(&self) -> Vec<NeuronView> {
        self.neurons
            .iter()
            .map(|n| {
                let st = n.status.read().expect("status lock");
                let (free, models) = match st.as_ref() {
                    Some(s) => (
                        s.devices.iter().map(|d| d.memory_free).max().unwrap_or(0),
                        s.models
                            .iter()
                            // A failed load holds nothing and must not block a retry.
                            .filter(|m| m.state != ModelState::Failed)
                            .map(|m| {
                                let p = self.placements.iter().find(|p| p.name == m.id);
                                ModelView {
                                    id: m.id.clone(),
                                    bytes: m.bytes,
                                    last_used: m.last_used_at.or(m.loaded_at).unwrap_or(0),
                                    inflight: m.inflight + m.queued,
                                    pinned: p.is_some_and(|p| p.spec.pinned),
                                    priority: p.map(|p| p.spec.priority).unwrap_or(0),
                                }
                            })
                            .collect(),
                    ),
                    None => (0, Vec::new()),
                };
                NeuronView {
                    name: n.cfg.name.clone(),
                    ready: n.up.load(Ordering::Relaxed),
                    free,
                    models,
                }
            })
            .collect()
    }

    fn neuron(&self, name: &str) -> Option<&Arc<Neuron>> {
        self.neurons.iter().find(|n| n.cfg.name == name)
    }

    /// Plans, evicts and loads until the placement has one more ready copy, or says why not.
    async fn load_somewhere(&self, p: &Placement) -> Result<(), String> {
        let mut bytes = None;
        let mut exclude = Vec::new();
        let mut last_error = String::new();
        for _ in 0..4 {
            self.poll().await;
            let ask = LoadAsk {
                model: p.name.clone(),
                bytes,
                priority: p.spec.priority,
                exclude: exclude.clone(),
            };
            let (target, evict) = match planner::plan_load(&self.views(), &ask, self.strategy) {
                Plan::Load { neuron } => (neuron, vec![]),
                Plan::EvictThenLoad { neuron, evict } => (neuron, evict),
                Plan::NoRoom { reason } if last_error.is_empty() => return Err(reason),
                Plan::NoRoom { reason } => {
                    return Err(format!("{reason}; last attempt: {last_error}"));
                }
            };
            let n = self.neuron(&target).expect("planned neuron exists").clone();
            for victim in &evict {
                tracing::info!(neuron = %target, evicted = %victim, for_model = %p.name, "evicting to make room");
                self.metrics
                    .evictions
                    .get_or_create(&ModelLabels {
                        model: victim.clone(),
                    })
                    .inc();
                let _ = n
                    .request(&self.http, reqwest::Method::POST, "/models/unload")
                    .json(&json!({"id": victim}))
                    .send()
                    .await;
            }
            let body = json!({
                "id": p.name,
                "source": p.spec.model,
                "contextLength": p.spec.context_length,
                "device": p.spec.device,
            });
            let res = n
                .request(
                    &self.http,
                    reqwest::Method::POST,
                    &format!(
                        "/models/load?wait=true&timeout={}",
                        self.load_timeout.as_secs()
                    ),
                )
                .json(&body)
                .send()
                .await;
            match res {
                // Accepted: follow the load there to its end (a large download may outlast the
                // neuron's bounded wait) rather than starting another copy elsewhere.
                Ok(r) if r.status().is_success() => {
                    return self.follow_load(&n, &p.name).await;
                }
                Ok(r) => {
                    let status = r.status();
                    let err: Option<ErrorBody> = r.json().await.ok();
                    let message = err
                        .as_ref()
                        .map(|e| e.error.message.clone())
                        .unwrap_or_default();
                    last_error = format!("{target} answered {status}: {message}");
                    match err.as_ref().and_then(|e| e.error.needed_bytes) {
                        Some(needed) if status == reqwest::StatusCode::CONFLICT => {
                            bytes = Some(needed)
                        }
                        // A model that fails to load fails everywhere: say why at once.
                        _ => return Err(last_error),
                    }
                    if !evict.is_empty() {
                        exclude.push(target);
                    }
                }
                Err(e) => {
                    n.mark_down(&e.to_string());
                    last_error = format!("{target} unreachable: {e}");
                    exclude.push(target);
                }
            }
        }
        Err(last_error)
    }

    /// Polls a neuron until `id` is ready there, or failed, for at most an hour.
    async fn follow_load(&self, n: &Neuron, id: &str) -> Result<(), String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(3600);
        loop {
            self.poll().await;
            let state = n
                .status
                .read()
                .expect("status lock")
                .as_ref()
                .and_then(|s| {
                    s.models
                        .iter()
                        .find(|m| m.id == id)
                        .map(|m| (m.state, m.error.clone()))
                });
            match state {
                Some((ModelState::Ready, _)) => {
                    tracing::info!(neuron = %n.cfg.name, model = %id, "model loaded");
                    return Ok(());
                }
                Some((ModelState::Failed, error)) => {
                    return Err(format!(
                        "{} failed to load '{id}': {}",
                        n.cfg.name,
                        error.unwrap_or_default()
                    ));
                }
                None if !n.up.load(Ordering::Relaxed) => {
                    return Err(format!("{} went down while loading '{id}'", n.cfg.name));
                }
                None => {
                    return Err(format!(
                        "{} accepted '{id}' but no longer lists it",
                        n.cfg.name
                    ));
                }
                Some(_) if std::time::Instant::now() > deadline => {
                    return Err(format!(
                        "{} was still loading '{id}' after an hour",
                        n.cfg.name
                    ));
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    /// Loads the copies each placement keeps (`minReplicas`, else `replicas`) on distinct neurons;
    /// what cannot be loaded now is tried again on the next call.
    pub async fn load_initial(self: &Arc<Self>) {
        for p in &self.placements {
            let want = p.spec.min_copies() as usize;
            while self.ready_replicas(p) < want {
                if let Err(e) = self.load_copy(p).await {
                    tracing::warn!(model = %p.name, error = %e, "could not load at start");
                    break;
                }
            }
        }
    }
}
