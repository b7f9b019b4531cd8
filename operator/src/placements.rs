//! The ModelPlacement controller: makes the fleet hold `spec.replicas` copies of each placement
//! (on ready, schedulable Neurons matching `neuronSelector`, where the planner in `core` says,
//! evicting by the configured strategy when nothing fits), unloads surplus copies, scales idle
//! placements down to `minReplicas` after `idleTimeout`, and writes what the neurons report into
//! the status. A finalizer unloads every copy before the object goes away.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cortex_core::crd::{FINALIZER, ModelPlacement, ModelPlacementStatus, Phase, PlacementStatus};
use cortex_core::neuron::{LoadRequest, ModelState};
use cortex_core::placer::{Answer, Next, Outcome, Placer};
use cortex_core::planner::{LoadAsk, ModelView, NeuronView};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::Ctx;
use crate::neuron_api::LoadAnswer;
use crate::neurons::Observed;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// The error's kind, as the `error` label of `cortex_operator_reconcile_errors_total`.
    pub fn error_type(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

/// Why a placement has fewer copies than it wants, as its `Ready` condition and events say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Nowhere to put a copy, even after evicting what may be evicted.
    NoRoom,
    /// A neuron refused the model (a wrong quant, a file that is not a GGUF…).
    LoadFailed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoRoom => "NoRoom",
            Reason::LoadFailed => "LoadFailed",
        }
    }
}

/// How long a load the operator asked for counts as a copy before the neuron lists it.
const PENDING_FOR: Duration = Duration::from_secs(30);
/// Label value the scale subresource's selector names a placement by.
pub const PLACEMENT_LABEL: &str = "cortex.helexa.io/placement";

/// A failed load on one neuron: not retried there before `retry_at`.
#[derive(Debug, Clone)]
pub struct Failure {
    pub count: u32,
    pub retry_at: Instant,
    pub message: String,
    /// Set when a load is asked again; the next failure seen counts as a new one.
    pub retrying: bool,
}

impl Failure {
    /// No failure counted yet; the next one seen counts.
    fn new() -> Self {
        Failure {
            count: 0,
            retry_at: Instant::now(),
            message: String::new(),
            retrying: true,
        }
    }

    /// Counts a failure and starts its backoff.
    fn record(&mut self, message: String) {
        self.count += 1;
        self.retry_at = Instant::now() + backoff(self.count);
        self.message = message;
        self.retrying = false;
    }
}

fn backoff(count: u32) -> Duration {
    Duration::from_secs((5u64 << count.min(6)).min(300))
}

/// A copy of the placement on a neuron.
#[derive(Debug, Clone)]
struct Copy {
    neuron: String,
    endpoint: String,
    state: ModelState,
    progress: f32,
    error: Option<String>,
    loaded_at: Option<u64>,
    last_used: u64,
    inflight: u32,
    /// Asked for, not yet listed by the neuron.
    pending: bool,
}

impl Copy {
    fn live(&self) -> bool {
        is_live(self.state)
    }
}

#[tracing::instrument(skip_all, fields(placement = %mp.name_any(), namespace = mp.namespace().as_deref().unwrap_or("default")))]
pub async fn reconcile(mp: Arc<ModelPlacement>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = mp.namespace().unwrap_or_else(|| "default".into());
    let api: Api<ModelPlacement> = Api::namespaced(ctx.client.clone(), &ns);
    let r = finalizer(&api, FINALIZER, mp, |ev| async {
        match ev {
            Finalizer::Apply(mp) => apply(&mp, &ctx, &api).await,
            Finalizer::Cleanup(mp) => cleanup(&mp, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let error = r.as_ref().err().map(Error::error_type);
    ctx.metrics
        .reconciled("modelplacement", error, started.elapsed().as_secs_f64());
    r
}

pub fn error_policy(mp: Arc<ModelPlacement>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(placement = %mp.name_any(), error = %e, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Copies wanted now: `replicas` (default 1), at least `minReplicas`, at most `maxReplicas`.
pub fn desired(mp: &ModelPlacement) -> u32 {
    let s = &mp.spec;
    let r = s.replicas.unwrap_or(1).max(s.min_replicas.unwrap_or(0));
    s.max_replicas.map_or(r, |m| r.min(m))
}

fn copies(id: &str, observed: &BTreeMap<String, Observed>) -> Vec<Copy> {
    let mut out = Vec::new();
    for (name, o) in observed {
        let Some(s) = o.status.as_ref().filter(|_| o.ready) else {
            continue;
        };
        for m in s.models.iter().filter(|m| m.id == id) {
            out.push(Copy {
                neuron: name.clone(),
                endpoint: o.endpoint.clone(),
                state: m.state,
                progress: m.progress,
                error: m.error.clone(),
                loaded_at: m.loaded_at,
                last_used: m.last_used_at.or(m.loaded_at).unwrap_or(0),
                inflight: m.inflight + m.queued,
                pending: false,
            });
        }
    }
    out
}

/// Loaded, or on its way to it.
fn is_live(state: ModelState) -> bool {
    matches!(
        state,
        ModelState::Downloading | ModelState::Loading | ModelState::Ready
    )
}

/// Copies of each model id loaded or loading on ready neurons.
fn live_copies(observed: &BTreeMap<String, Observed>) -> HashMap<&str, u32> {
    let mut n = HashMap::new();
    for o in observed.values().filter(|o| o.ready) {
        for m in o.status.iter().flat_map(|s| &s.models) {
            if is_live(m.state) {
                *n.entry(m.id.as_str()).or_default() += 1;
            }
        }
    }
    n
}

fn selects(mp: &ModelPlacement, labels: &BTreeMap<String, String>) -> bool {
    match &mp.spec.neuron_selector {
        None => true,
        Some(ls) => {
            let ls =
                k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector::from(ls.clone());
            Selector::try_from(ls).is_ok_and(|s| s.matches(labels))
        }
    }
}

async fn publish(ctx: &Ctx, mp: &ModelPlacement, type_: EventType, reason: &str, note: String) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &mp.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing an event");
    }
}

async fn apply(mp: &ModelPlacement, ctx: &Ctx, api: &Api<ModelPlacement>) -> Result<Action, Error> {
    let id = mp.model_id();
    let name = mp.name_any();
    let observed = ctx.observed.read().expect("observed lock").clone();
    let mut all = copies(&id, &observed);
    // Loads asked for that the neuron does not list yet.
    {
        let mut pending = ctx.pending.lock().expect("pending lock");
        pending.retain(|(m, n), at| {
            at.elapsed() < PENDING_FOR && !(m == &id && all.iter().any(|c| &c.neuron == n))
        });
        for (m, n) in pending.keys() {
            if m == &id {
                all.push(Copy {
                    neuron: n.clone(),
                    endpoint: observed
                        .get(n)
                        .map(|o| o.endpoint.clone())
                        .unwrap_or_default(),
                    state: ModelState::Loading,
                    progress: 0.0,
                    error: None,
                    loaded_at: None,
                    last_used: 0,
                    inflight: 0,
                    pending: true,
                });
            }
        }
    }
    // Failures seen on neurons start (or continue) their backoff there.
    {
        let mut failures = ctx.failures.lock().expect("failures lock");
        for c in &all {
            let key = (id.clone(), c.neuron.clone());
            match c.state {
                ModelState::Failed => {
                    let f = failures.entry(key).or_insert_with(Failure::new);
                    if f.retrying {
                        f.record(c.error.clone().unwrap_or_default());
                    }
                }
                ModelState::Ready => {
                    failures.remove(&key);
                }
                _ => {}
            }
        }
    }
    let want = desired(mp);
    let live: Vec<&Copy> = all.iter().filter(|c| c.live()).collect();
    let mut notes: Option<(Reason, String)> = None;

    // Idle: scale down to minReplicas after idleTimeout without requests.
    if let (Some(idle), Some(floor)) = (mp.spec.idle_timeout, mp.spec.min_replicas) {
        let quiet = !live.is_empty()
            && live
                .iter()
                .all(|c| c.state == ModelState::Ready && c.inflight == 0 && !c.pending);
        let last = live.iter().map(|c| c.last_used).max().unwrap_or(0);
        let now = Timestamp::now().as_second() as u64;
        if want > floor && quiet && now.saturating_sub(last) >= idle {
            api.patch_scale(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": floor}})),
            )
            .await?;
            ctx.metrics.scale_to_zero.inc();
            publish(
                ctx,
                mp,
                EventType::Normal,
                "ScaledDown",
                format!(
                    "idle for {}s (idleTimeout {idle}s): scaled to {floor}",
                    now - last
                ),
            )
            .await;
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
    }

    let mut live_count = live.len() as u32;
    if live_count < want {
        let mut exclude: Vec<String> = all
            .iter()
            .filter(|c| c.live())
            .map(|c| c.neuron.clone())
            .collect();
        // Neurons where the load failed lately wait out their backoff.
        let backing_off: Vec<(String, String, Duration)> = {
            let failures = ctx.failures.lock().expect("failures lock");
            failures
                .iter()
                .filter(|((m, _), f)| m == &id && Instant::now() < f.retry_at)
                .map(|((_, n), f)| (n.clone(), f.message.clone(), f.retry_at - Instant::now()))
                .collect()
        };
        exclude.extend(backing_off.iter().map(|(n, ..)| n.clone()));
        while live_count < want {
            match place_one(mp, ctx, &observed, &mut exclude).await {
                Ok(neuron) => {
                    live_count += 1;
                    exclude.push(neuron);
                }
                Err((Reason::NoRoom, _)) if !backing_off.is_empty() => {
                    // Nowhere else to go: the failure is the news, not the lack of room.
                    let (n, m, wait) = &backing_off[0];
                    notes = Some((
                        Reason::LoadFailed,
                        format!("{n}: {m} (retrying in {}s)", wait.as_secs() + 1),
                    ));
                    break;
                }
                Err((reason, message)) => {
                    if reason == Reason::NoRoom {
                        let event = reason.as_str();
                        publish(ctx, mp, EventType::Warning, event, message.clone()).await;
                    }
                    notes = Some((reason, message));
                    break;
                }
            }
        }
    } else if live_count > want {
        let mut surplus: Vec<&Copy> = live.iter().copied().filter(|c| c.inflight == 0).collect();
        // Copies still loading go first, then the least recently used.
        surplus.sort_by_key(|c| (c.state == ModelState::Ready, c.last_used));
        for c in surplus.into_iter().take((live_count - want) as usize) {
            match ctx.neuron_client.unload(&c.endpoint, &id).await {
                Ok(()) => {
                    ctx.metrics.unloads.inc();
                    ctx.pending
                        .lock()
                        .expect("pending lock")
                        .remove(&(id.clone(), c.neuron.clone()));
                    publish(
                        ctx,
                        mp,
                        EventType::Normal,
                        "Unloaded",
                        format!("unloaded the copy on {} ({} wanted)", c.neuron, want),
                    )
                    .await;
                }
                Err(e) => {
                    tracing::warn!(placement = %name, neuron = %c.neuron, error = %e, "unloading a surplus copy")
                }
            }
        }
    }

    let failure = {
        let failures = ctx.failures.lock().expect("failures lock");
        failures
            .iter()
            .filter(|((m, _), _)| m == &id)
            .map(|((_, n), f)| format!("{n}: {}", f.message))
            .next()
    };
    let status = status_for(mp, &all, want, notes.clone(), failure);
    write_status(mp, api, status.clone()).await?;
    let loading = all
        .iter()
        .any(|c| matches!(c.state, ModelState::Downloading | ModelState::Loading) || c.pending);
    Ok(Action::requeue(
        if loading || status.ready_replicas < want {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(mp.spec.idle_timeout.map_or(10, |t| t.clamp(1, 10)))
        },
    ))
}

/// Puts one more copy somewhere; returns the neuron, or why not for the condition.
async fn place_one(
    mp: &ModelPlacement,
    ctx: &Ctx,
    observed: &BTreeMap<String, Observed>,
    exclude: &mut Vec<String>,
) -> Result<String, (Reason, String)> {
    let id = mp.model_id();
    let placements = ctx.placements.state();
    let owners: HashMap<String, &ModelPlacement> =
        placements.iter().map(|p| (p.model_id(), &**p)).collect();
    let live = live_copies(observed);
    let views: Vec<NeuronView> = observed
        .iter()
        .filter(|(_, o)| o.ready && !o.unschedulable && selects(mp, &o.labels))
        .map(|(name, o)| {
            let s = o.status.as_ref();
            NeuronView {
                name: name.clone(),
                ready: true,
                free: s
                    .and_then(|s| s.devices.iter().map(|d| d.memory_free).max())
                    .unwrap_or(0),
                models: s
                    .map(|s| {
                        s.models
                            .iter()
                            .filter(|m| m.state != ModelState::Failed)
                            .map(|m| {
                                let owner = owners.get(&m.id);
                                ModelView {
                                    id: m.id.clone(),
                                    bytes: m.bytes,
                                    last_used: m.last_used_at.or(m.loaded_at).unwrap_or(0),
                                    inflight: m.inflight + m.queued,
                                    // Never below a placement's minReplicas either.
                                    pinned: owner.is_some_and(|p| {
                                        p.spec.pinned
                                            || live.get(m.id.as_str()).copied().unwrap_or(0)
                                                <= p.spec.min_replicas.unwrap_or(0)
                                    }),
                                    priority: owner.map_or(0, |p| p.spec.priority),
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        })
        .collect();
    let ask = LoadAsk {
        model: id.clone(),
        bytes: None,
        priority: mp.spec.priority,
        exclude: exclude.clone(),
    };
    // The executor's rules decide what each answer means (shared with the gateway's static mode).
    let mut placer = Placer::new(ask, ctx.strategy);
    loop {
        let (target, evict) = match placer.next(&views) {
            Next::Load { neuron, evict } => (neuron, evict),
            Next::GiveUp { message } => return Err((Reason::NoRoom, message)),
        };
        let endpoint = observed[&target].endpoint.clone();
        for victim in &evict {
            match ctx.neuron_client.unload(&endpoint, victim).await {
                Ok(()) => {
                    ctx.metrics.evictions.inc();
                    let note = format!("evicted {victim} from {target} to make room for {id}");
                    tracing::info!("{note}");
                    publish(ctx, mp, EventType::Normal, "Evicted", note.clone()).await;
                    if let Some(owner) = owners.get(victim) {
                        // The evicted placement gives the copy up for good (until a request wakes
                        // it through the gateway), so the two do not take turns evicting each other.
                        let floor = owner.spec.min_replicas.unwrap_or(0);
                        let keep = desired(owner).saturating_sub(1).max(floor);
                        let owner_api: Api<ModelPlacement> = Api::namespaced(
                            ctx.client.clone(),
                            &owner.namespace().unwrap_or_else(|| "default".into()),
                        );
                        if let Err(e) = owner_api
                            .patch_scale(
                                &owner.name_any(),
                                &PatchParams::default(),
                                &Patch::Merge(json!({"spec": {"replicas": keep}})),
                            )
                            .await
                        {
                            tracing::warn!(placement = %owner.name_any(), error = %e, "scaling an evicted placement down");
                        }
                        publish(
                            ctx,
                            owner,
                            EventType::Warning,
                            "Evicted",
                            format!("{note}; scaled to {keep}"),
                        )
                        .await;
                    }
                }
                Err(e) => tracing::warn!(neuron = %target, %victim, error = %e, "evicting"),
            }
        }
        let req = LoadRequest {
            id: id.clone(),
            source: mp.spec.model.clone(),
            device: mp.spec.device,
            context_length: mp.spec.context_length,
        };
        let answer = ctx.neuron_client.load(&endpoint, &req).await;
        let result = match &answer {
            Ok(LoadAnswer::Accepted) => "accepted",
            Ok(LoadAnswer::NoRoom { .. }) => "no_room",
            Ok(LoadAnswer::Refused { .. }) => "refused",
            Err(_) => "unreachable",
        };
        ctx.metrics
            .loads
            .get_or_create(&crate::metrics::OutcomeLabels {
                result: result.into(),
            })
            .inc();
        let answer = match answer {
            Ok(LoadAnswer::Accepted) => Answer::Accepted,
            Ok(LoadAnswer::NoRoom { needed, message }) => Answer::NoRoom { needed, message },
            Ok(LoadAnswer::Refused { status, message }) => Answer::Refused { status, message },
            Err(e) => Answer::Unreachable(e),
        };
        match placer.record(answer) {
            Outcome::Placed { neuron } => {
                ctx.pending
                    .lock()
                    .expect("pending lock")
                    .insert((id.clone(), neuron.clone()), Instant::now());
                if let Some(f) = ctx
                    .failures
                    .lock()
                    .expect("failures lock")
                    .get_mut(&(id.clone(), neuron.clone()))
                {
                    f.retrying = true;
                }
                publish(
                    ctx,
                    mp,
                    EventType::Normal,
                    "Loading",
                    format!("loading {} on {neuron}", mp.spec.model),
                )
                .await;
                return Ok(neuron);
            }
            Outcome::Retry => {}
            Outcome::Failed {
                neuron,
                status,
                message,
            } => {
                let message = format!("{neuron} refused the load ({status}): {message}");
                ctx.failures
                    .lock()
                    .expect("failures lock")
                    .entry((id.clone(), neuron.clone()))
                    .or_insert_with(Failure::new)
                    .record(message.clone());
                exclude.push(neuron);
                let reason = Reason::LoadFailed;
                publish(
                    ctx,
                    mp,
                    EventType::Warning,
                    reason.as_str(),
                    message.clone(),
                )
                .await;
                return Err((reason, message));
            }
        }
    }
}

fn rfc3339(epoch: u64) -> Option<String> {
    Timestamp::from_second(epoch as i64)
        .ok()
        .map(|t| t.to_string())
}

/// The status a placement gets from its copies.
fn status_for(
    mp: &ModelPlacement,
    all: &[Copy],
    want: u32,
    scheduling: Option<(Reason, String)>,
    failure: Option<String>,
) -> ModelPlacementStatus {
    let live: Vec<&Copy> = all.iter().filter(|c| c.live()).collect();
    let ready = live.iter().filter(|c| c.state == ModelState::Ready).count() as u32;
    let loading = live.iter().any(|c| c.state != ModelState::Ready);
    let phase = if want == 0 && live.is_empty() {
        Phase::Idle
    } else if want > 0 && ready >= want {
        Phase::Ready
    } else if loading {
        Phase::Loading
    } else if ready > 0 {
        Phase::Degraded
    } else if failure.is_some()
        || scheduling
            .as_ref()
            .is_some_and(|(r, _)| *r == Reason::LoadFailed)
    {
        Phase::Failed
    } else {
        Phase::Pending
    };
    let (reason, message) = match (phase, &scheduling, &failure) {
        (Phase::Ready, _, _) => ("Ready".to_string(), format!("{ready}/{want} copies ready")),
        (Phase::Idle, _, _) => ("ScaledToZero".to_string(), "no copies wanted".to_string()),
        (_, Some((r, m)), _) => (r.as_str().to_string(), m.clone()),
        (_, None, Some(f)) => (Reason::LoadFailed.as_str().to_string(), f.clone()),
        (Phase::Loading, None, None) => (
            "Loading".to_string(),
            format!("{ready}/{want} copies ready, the rest loading"),
        ),
        _ => (
            phase.as_str().to_string(),
            format!("{ready}/{want} copies ready"),
        ),
    };
    ModelPlacementStatus {
        phase,
        replicas: live.len() as u32,
        ready_replicas: ready,
        selector: Some(format!("{PLACEMENT_LABEL}={}", mp.name_any())),
        placements: all
            .iter()
            .map(|c| PlacementStatus {
                neuron: c.neuron.clone(),
                endpoint: c.endpoint.clone(),
                state: c.state,
                progress: c.progress,
                message: c.error.clone(),
                loaded_at: c.loaded_at.and_then(rfc3339),
            })
            .collect(),
        conditions: vec![crate::ready_condition(
            mp.status.as_ref().map_or(&[][..], |s| &s.conditions),
            phase == Phase::Ready || phase == Phase::Idle,
            reason,
            message,
            mp.metadata.generation,
        )],
        observed_generation: mp.metadata.generation,
        model_id: Some(mp.model_id()),
    }
}

async fn write_status(
    mp: &ModelPlacement,
    api: &Api<ModelPlacement>,
    status: ModelPlacementStatus,
) -> Result<(), kube::Error> {
    if mp.status.as_ref() == Some(&status) {
        return Ok(());
    }
    api.patch_status(
        &mp.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// On delete: unload every copy the neurons list (unreachable neurons cannot be asked; their copy
/// goes when they come back and the id belongs to no placement).
async fn cleanup(mp: &ModelPlacement, ctx: &Ctx) -> Result<Action, Error> {
    let id = mp.model_id();
    let observed = ctx.observed.read().expect("observed lock").clone();
    for c in copies(&id, &observed) {
        match ctx.neuron_client.unload(&c.endpoint, &id).await {
            Ok(()) => {
                ctx.metrics.unloads.inc();
                tracing::info!(placement = %mp.name_any(), neuron = %c.neuron, "unloaded on delete");
            }
            Err(e) => tracing::warn!(neuron = %c.neuron, error = %e, "unloading on delete"),
        }
    }
    ctx.pending
        .lock()
        .expect("pending lock")
        .retain(|(m, _), _| m != &id);
    ctx.failures
        .lock()
        .expect("failures lock")
        .retain(|(m, _), _| m != &id);
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cortex_core::neuron::ModelSource;
    use cortex_core::placement::PlacementSpec;

    fn mp(replicas: Option<u32>, min: Option<u32>, max: Option<u32>) -> ModelPlacement {
        let mut spec: PlacementSpec =
            serde_json::from_value(json!({"model": {"uri": "file:///m.gguf"}})).unwrap();
        spec.replicas = replicas;
        spec.min_replicas = min;
        spec.max_replicas = max;
        assert!(matches!(spec.model, ModelSource::Uri { .. }));
        ModelPlacement::new("m", cortex_core::crd::ModelPlacementSpec(spec))
    }

    fn copy(state: ModelState) -> Copy {
        Copy {
            neuron: "n".into(),
            endpoint: "http://n".into(),
            state,
            progress: 0.5,
            error: None,
            loaded_at: Some(1_700_000_000),
            last_used: 0,
            inflight: 0,
            pending: false,
        }
    }

    #[test]
    fn desired_copies_respect_min_and_max() {
        assert_eq!(desired(&mp(None, None, None)), 1);
        assert_eq!(desired(&mp(Some(0), None, None)), 0);
        assert_eq!(desired(&mp(Some(0), Some(1), None)), 1);
        assert_eq!(desired(&mp(Some(5), None, Some(2))), 2);
    }

    #[test]
    fn phases_follow_the_copies() {
        let m = mp(Some(2), None, None);
        let ready = copy(ModelState::Ready);
        let loading = copy(ModelState::Loading);
        assert_eq!(
            status_for(&m, &[ready.clone(), ready.clone()], 2, None, None).phase,
            Phase::Ready
        );
        assert_eq!(
            status_for(&m, &[ready.clone(), loading], 2, None, None).phase,
            Phase::Loading
        );
        assert_eq!(
            status_for(&m, std::slice::from_ref(&ready), 2, None, None).phase,
            Phase::Degraded
        );
        assert_eq!(status_for(&m, &[], 0, None, None).phase, Phase::Idle);
        assert_eq!(status_for(&m, &[], 2, None, None).phase, Phase::Pending);
        let failed = status_for(
            &m,
            &[copy(ModelState::Failed)],
            2,
            None,
            Some("n: no such file".into()),
        );
        assert_eq!(failed.phase, Phase::Failed);
        assert_eq!(failed.conditions[0].reason, "LoadFailed");
        assert!(failed.conditions[0].message.contains("no such file"));
        let s = status_for(&m, &[ready], 2, Some((Reason::NoRoom, "full".into())), None);
        assert_eq!((s.replicas, s.ready_replicas), (1, 1));
        assert_eq!(s.conditions[0].reason, "NoRoom");
        assert_eq!(
            s.placements[0].loaded_at.as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
    }

    #[test]
    fn neuron_selectors_match_labels_and_expressions() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let mut m = mp(None, None, None);
        assert!(
            selects(&m, &labels(&[])),
            "no selector selects every neuron"
        );
        m.spec.0.neuron_selector = Some(
            serde_json::from_value(json!({
                "matchLabels": {"gpu": "h100"},
                "matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["eu-2"]}]
            }))
            .unwrap(),
        );
        assert!(selects(&m, &labels(&[("gpu", "h100"), ("zone", "eu-1")])));
        assert!(selects(&m, &labels(&[("gpu", "h100")])));
        assert!(!selects(&m, &labels(&[("gpu", "a100")])));
        assert!(!selects(&m, &labels(&[("gpu", "h100"), ("zone", "eu-2")])));
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!(backoff(1) < backoff(2));
        assert_eq!(backoff(30), Duration::from_secs(300));
    }
}
