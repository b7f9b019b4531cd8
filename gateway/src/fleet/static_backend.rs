//! Static mode (`cortex serve --config cortex.toml`): the neurons of the config, polled for their
//! `/status`; a copy is where a neuron's status lists the model. A model with no ready copy is
//! loaded where the planner from `core` says, evicting first when it must, and each placement's
//! minimum copies are kept loaded.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cortex_core::neuron::{ModelState, NeuronStatus};
use cortex_core::openai::ErrorBody;
use cortex_core::placer::{Answer, Next, Outcome, Placer};
use cortex_core::planner::{self, LoadAsk, ModelView, NeuronView, Strategy};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::json;

use crate::fleet::catalogue::{Catalogue, Placement};
use crate::fleet::neuron::{Neuron, NeuronConfig};
use crate::fleet::view::NeuronReport;
use crate::fleet::{Backend, Fleet, Settings};

/// Static mode's [`Backend`]: the planner decides where a copy goes, the gateway loads it.
#[derive(Clone, Copy)]
pub struct Planned {
    pub strategy: Strategy,
}

/// The fleet of `neurons` serving `placements` (names already checked unique by
/// `config::load`), evicting by `strategy`. Nothing runs until [`spawn`].
pub fn fleet(
    settings: &Settings,
    strategy: Strategy,
    neurons: Vec<NeuronConfig>,
    placements: Vec<Placement>,
) -> Arc<Fleet> {
    let fleet = Fleet::new(settings, Planned { strategy });
    fleet.set_neurons(neurons);
    fleet.set_catalogue(Catalogue::new(placements).0);
    fleet
}

/// Polls the neurons every `poll_every` and keeps each placement's minimum copies loaded: at
/// start, and again whenever a neuron that was down (or not yet up) comes back or a copy was lost.
/// Every `defrag_after` of these planning cycles (every 5 s), it consolidates models to free a whole
/// neuron ([`defrag`]).
pub fn spawn(fleet: &Arc<Fleet>, poll_every: Duration, defrag_after: Option<u32>) {
    let f = fleet.clone();
    tokio::spawn(async move {
        loop {
            poll(&f).await;
            tokio::time::sleep(poll_every).await;
        }
    });
    let f = fleet.clone();
    tokio::spawn(async move {
        let mut cycles: u64 = 0;
        loop {
            load_initial(&f).await;
            cycles += 1;
            if let Some(n) = defrag_after.filter(|n| *n > 0)
                && cycles.is_multiple_of(u64::from(n))
            {
                defrag(&f).await;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
}

/// Moves models off the least-used neuron onto the others where they all fit (the planner's
/// [`planner::plan_defrag`]): each is loaded on its new neuron first and unloaded from the old one
/// once its requests there are done, so it is never unavailable.
pub async fn defrag(fleet: &Arc<Fleet>) {
    poll(fleet).await;
    let moves = planner::plan_defrag(&views(fleet));
    let catalogue = fleet.catalogue();
    let neurons = fleet.neurons();
    for mv in moves {
        let p = catalogue.placements.iter().find(|p| p.name == mv.model);
        let from = neurons.iter().find(|n| n.cfg.name == mv.from);
        let to = neurons.iter().find(|n| n.cfg.name == mv.to);
        let (Some(p), Some(from), Some(to)) = (p, from, to) else {
            continue; // a model loaded by someone else, or a neuron gone since
        };
        tracing::info!(model = %p.name, from = %mv.from, to = %mv.to, "defrag: moving to free a neuron");
        let loaded = match load_on(fleet, to, p).await {
            Ok(r) if r.status().is_success() => follow_load(fleet, to, &p.name).await,
            Ok(r) => Err(format!("{} answered {}", mv.to, r.status())),
            Err(e) => Err(e),
        };
        if let Err(e) = loaded {
            tracing::warn!(model = %p.name, to = %mv.to, error = %e, "defrag: move failed; nothing unloaded");
            return;
        }
        // Let the requests on the old copy finish (new ones already go to either copy).
        for _ in 0..40 {
            poll(fleet).await;
            let busy = from
                .status
                .read()
                .expect("status lock")
                .as_ref()
                .is_some_and(|s| {
                    s.models
                        .iter()
                        .any(|m| m.id == p.name && m.inflight + m.queued > 0)
                });
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if let Err(e) = unload(fleet, from, &p.name).await {
            tracing::warn!(model = %p.name, from = %mv.from, error = %e, "defrag: unload failed");
        }
        fleet.metrics.defrag_moves.inc();
    }
    poll(fleet).await;
}

/// Time a neuron gets past the load timeout to answer a bounded `?wait=true` load.
const LOAD_ANSWER_SLACK: Duration = Duration::from_secs(10);

/// How often a load in progress checks whether its neuron is still up.
const DOWN_CHECK: Duration = Duration::from_millis(250);

/// `POST /models/load?wait=true` of the placement on a neuron (bounded by the load timeout).
fn load_request(fleet: &Fleet, n: &Neuron, p: &Placement) -> reqwest::RequestBuilder {
    let body = json!({
        "id": p.name,
        "source": p.spec.model,
        "contextLength": p.spec.context_length,
        "device": p.spec.device,
    });
    n.request(
        &fleet.http,
        reqwest::Method::POST,
        &format!(
            "/models/load?wait=true&timeout={}",
            fleet.load_timeout.as_secs()
        ),
    )
    .timeout(fleet.load_timeout + LOAD_ANSWER_SLACK)
    .json(&body)
}

/// Sends the load of `p` to `n` and waits for its answer, giving up as soon as the poller finds
/// the neuron down (killed, or frozen and no longer answering `/status`): a neuron that stops
/// answering mid-load would otherwise hold every request for the model until the timeout.
async fn load_on(fleet: &Fleet, n: &Neuron, p: &Placement) -> Result<reqwest::Response, String> {
    tokio::select! {
        r = load_request(fleet, n, p).send() => r.map_err(|e| crate::error::with_causes(&e)),
        () = went_down(n) => Err(format!("{} went down while loading '{}'", n.cfg.name, p.name)),
    }
}

/// Resolves once `n` is marked down (by the poller, or a failed request).
async fn went_down(n: &Neuron) {
    while n.up.load(Ordering::Relaxed) {
        tokio::time::sleep(DOWN_CHECK).await;
    }
}

/// `POST /models/unload` of `id` on `n`, bounded by the request timeout; an error only when the
/// neuron did not answer (a refusal is logged: the load that follows says whether room was made).
async fn unload(fleet: &Fleet, n: &Neuron, id: &str) -> Result<(), String> {
    let r = n
        .request(&fleet.http, reqwest::Method::POST, "/models/unload")
        .timeout(fleet.request_timeout)
        .json(&json!({"id": id}))
        .send()
        .await
        .map_err(|e| format!("unloading '{id}': {}", crate::error::with_causes(&e)))?;
    if !r.status().is_success() {
        tracing::warn!(neuron = %n.cfg.name, model = %id, status = %r.status(), "unload refused");
    }
    Ok(())
}

/// Asks every neuron for its status; those that do not answer are marked down.
pub async fn poll(fleet: &Fleet) {
    let neurons = fleet.neurons();
    let polls = neurons.iter().map(|n| async move {
        let mark = n.probe_mark();
        let res = n
            .request(&fleet.http, reqwest::Method::GET, "/status")
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let down = match res {
            Ok(r) if r.status().is_success() => match r.json::<NeuronStatus>().await {
                Ok(s) => {
                    *n.status.write().expect("status lock") = Some(s);
                    None
                }
                Err(e) => Some(format!("unreadable /status: {e}")),
            },
            Ok(r) => Some(format!("/status answered {}", r.status())),
            Err(e) => Some(e.to_string()),
        };
        if down.is_none() && !n.still_up_since(mark) {
            return; // a request failed on it while this answer was on its way: that is newer
        }
        fleet.set_up(n, down.is_none(), down.as_deref().unwrap_or_default());
    });
    futures::future::join_all(polls).await;
}

/// Loads the copies each placement keeps (`minReplicas`, else `replicas`) on distinct neurons;
/// what cannot be loaded now is tried again on the next call.
pub async fn load_initial(fleet: &Arc<Fleet>) {
    for p in &fleet.catalogue().placements {
        let want = p.spec.min_copies() as usize;
        while fleet.ready_replicas(p) < want {
            if let Err(e) = fleet.load_copy(p).await {
                tracing::warn!(model = %p.name, error = %e, "could not load at start");
                break;
            }
        }
    }
}

impl Backend for Planned {
    fn copies(&self, fleet: &Fleet, p: &Placement) -> Vec<(Arc<Neuron>, ModelState)> {
        fleet
            .neurons()
            .iter()
            .filter_map(|n| {
                let st = n.status.read().expect("status lock");
                let m = st.as_ref()?.models.iter().find(|m| m.id == p.name)?;
                Some((n.clone(), m.state))
            })
            .collect()
    }

    fn make_ready(
        &self,
        fleet: Arc<Fleet>,
        p: Placement,
    ) -> BoxFuture<'static, Result<(), String>> {
        let strategy = self.strategy;
        async move { load_somewhere(&fleet, &p, strategy).await }.boxed()
    }

    fn refresh<'a>(&'a self, fleet: &'a Fleet) -> BoxFuture<'a, ()> {
        poll(fleet).boxed()
    }

    fn describe(&self, n: &Neuron) -> Option<NeuronReport> {
        n.status
            .read()
            .expect("status lock")
            .as_ref()
            .and_then(NeuronReport::of)
    }
}

/// The neurons as the planner sees them.
fn views(fleet: &Fleet) -> Vec<NeuronView> {
    let catalogue = fleet.catalogue();
    fleet
        .neurons()
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
                            let p = catalogue.placements.iter().find(|p| p.name == m.id);
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

/// Plans, evicts and loads until the placement has one more ready copy, or says why not; the
/// rules of what each answer means are the executor's ([`Placer`]), shared with the operator.
async fn load_somewhere(fleet: &Fleet, p: &Placement, strategy: Strategy) -> Result<(), String> {
    let ask = LoadAsk {
        model: p.name.clone(),
        bytes: None,
        priority: p.spec.priority,
        exclude: Vec::new(),
    };
    let mut placer = Placer::new(ask, strategy);
    loop {
        poll(fleet).await;
        let (target, evict) = match placer.next(&views(fleet)) {
            Next::Load { neuron, evict } => (neuron, evict),
            Next::GiveUp { message } => return Err(message),
        };
        let n = fleet.neuron(&target).expect("planned neuron exists");
        let mut evicted = Ok(());
        for victim in &evict {
            tracing::info!(neuron = %target, evicted = %victim, for_model = %p.name, "evicting to make room");
            fleet.metrics.evicted(victim, &target);
            evicted = unload(fleet, &n, victim).await;
            if evicted.is_err() {
                break;
            }
        }
        let res = match evicted {
            Ok(()) => load_on(fleet, &n, p).await,
            Err(e) => Err(e),
        };
        let answer = match res {
            // Accepted: follow the load there to its end (a large download may outlast the
            // neuron's bounded wait) rather than starting another copy elsewhere, unless the
            // neuron goes down meanwhile: then another one gets the load.
            Ok(r) if r.status().is_success() => match follow_load(fleet, &n, &p.name).await {
                Err(e) if !n.up.load(Ordering::Relaxed) => Answer::Unreachable(e),
                r => return r,
            },
            Ok(r) => {
                let status = r.status();
                let err: Option<ErrorBody> = r.json().await.ok();
                let message = err
                    .as_ref()
                    .map(|e| e.error.message.clone())
                    .unwrap_or_default();
                if status == reqwest::StatusCode::CONFLICT {
                    let needed = err.as_ref().and_then(|e| e.error.needed_bytes);
                    Answer::NoRoom { needed, message }
                } else {
                    Answer::Refused {
                        status: status.as_u16(),
                        message,
                    }
                }
            }
            Err(e) => {
                n.mark_down(&e);
                Answer::Unreachable(e)
            }
        };
        match placer.record(answer) {
            Outcome::Placed { .. } => return Ok(()),
            Outcome::Retry => {}
            Outcome::Failed {
                neuron,
                status,
                message,
            } => {
                let status = reqwest::StatusCode::from_u16(status)
                    .map_or_else(|_| status.to_string(), |s| s.to_string());
                return Err(format!("{neuron} answered {status}: {message}"));
            }
        }
    }
}

/// Polls a neuron until `id` is ready there, or failed, or the neuron stops answering (its last
/// `/status` stays behind then, still saying "loading"), for at most an hour: a large download
/// may outlast the load timeout, and the requests waiting give up at theirs anyway.
async fn follow_load(fleet: &Fleet, n: &Neuron, id: &str) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(3600);
    loop {
        poll(fleet).await;
        if !n.up.load(Ordering::Relaxed) {
            return Err(format!("{} went down while loading '{id}'", n.cfg.name));
        }
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
