//! Kubernetes mode (`cortex serve --kubernetes`): the catalogue comes from ModelPlacements and the
//! neurons from Neuron objects, both kept by reflectors over watches (the API is never polled). A
//! copy is ready where a ModelPlacement's `status.placements` says so; requests carry the model's
//! neuron-side id (`<name>.<namespace>`). A model with no ready copy is woken by scaling its
//! ModelPlacement to one through the `scale` subresource when it is at zero; the operator loads
//! it, and the request waits until the reflector shows a ready copy. The gateway never calls
//! `/models/load` here.
//!
//! Turning objects into routing state is done by plain functions ([`catalogue_of`],
//! [`neurons_of`]) so it is tested without an API server.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cortex_core::crd::{self, ModelPlacement, Phase};
use cortex_core::neuron::ModelState;
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::watch;

use crate::error::Error;
use crate::fleet::catalogue::{Catalogue, Placement};
use crate::fleet::neuron::{Neuron, NeuronConfig};
use crate::fleet::view::NeuronReport;
use crate::fleet::{Backend, Fleet, Settings};

/// How often the routing state is rebuilt from the reflectors' caches even when nothing changed,
/// so a neuron marked down after a failed request is tried again.
const RESYNC: Duration = Duration::from_secs(5);

/// How long the gateway waits for the first lists before it serves anyway.
const FIRST_LIST: Duration = Duration::from_secs(30);

/// Kubernetes mode's [`Backend`]: copies from ModelPlacement statuses, neurons from Neuron
/// objects, a copy made ready by scaling.
#[derive(Clone)]
pub struct Kube {
    placements: Store<ModelPlacement>,
    neurons: Store<crd::Neuron>,
    client: kube::Client,
    token: Option<String>,
    /// Bumped after every rebuild of the routing state, for requests waiting on a wake.
    changed: Arc<watch::Sender<u64>>,
    wake_timeout: Duration,
}

impl Kube {
    /// A backend reading `placements` and `neurons` (caches a reflector fills), scaling through
    /// `client`, sending `token` to neurons and waiting at most `wake_timeout` for a woken model.
    pub fn new(
        client: kube::Client,
        placements: Store<ModelPlacement>,
        neurons: Store<crd::Neuron>,
        token: Option<String>,
        wake_timeout: Duration,
    ) -> Self {
        Kube {
            placements,
            neurons,
            client,
            token,
            changed: Arc::new(watch::channel(0).0),
            wake_timeout,
        }
    }

    /// Rebuilds the fleet's neurons and catalogue from the caches and wakes the requests waiting
    /// on a model; returns the names more than one ModelPlacement asks for.
    pub fn sync(&self, fleet: &Fleet) -> Vec<String> {
        let mps = self.placements.state();
        let neurons = neurons_of(&self.neurons.state(), &mps, self.token.as_deref());
        let set = fleet.set_neurons(neurons.iter().map(|(cfg, _)| cfg.clone()).collect());
        for (n, (_, ready)) in set.iter().zip(&neurons) {
            fleet.set_up(n, *ready, "its Neuron object is not ready");
        }
        let (catalogue, shadowed) = catalogue_of(&mps);
        fleet.set_catalogue(catalogue);
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
        shadowed
    }

    /// Scales the placement's ModelPlacement to one when it is at zero, then waits until the
    /// reflector shows a ready copy, the operator says it failed, or `wake_timeout` passes.
    async fn wake(&self, fleet: &Fleet, p: &Placement) -> Result<(), String> {
        let key =
            object_ref(&p.name).ok_or_else(|| format!("'{}' names no ModelPlacement", p.name))?;
        let ns = key.namespace.clone().unwrap_or_default();
        let what = format!("ModelPlacement {ns}/{}", key.name);
        let gone = || format!("{what} is gone");
        let mut changed = self.changed.subscribe();
        let mp = self.placements.get(&key).ok_or_else(gone)?;
        // A failure is only news once the operator has seen the spec as it is from here on.
        let mut since = mp.metadata.generation.unwrap_or(0);
        if mp.spec.replicas == Some(0) {
            let api: Api<ModelPlacement> = Api::namespaced(self.client.clone(), &ns);
            let patch = Patch::Merge(json!({"spec": {"replicas": 1}}));
            api.patch_scale(&key.name, &PatchParams::default(), &patch)
                .await
                .map_err(|e| format!("could not scale {what} to 1 to wake it: {e}"))?;
            since += 1;
            tracing::info!(model = %p.name, placement = %what, "woke a model at zero: scaled it to 1");
        }
        let deadline = tokio::time::Instant::now() + self.wake_timeout;
        loop {
            changed.borrow_and_update();
            if fleet.ready_replicas(p) > 0 {
                return Ok(());
            }
            let mp = self.placements.get(&key).ok_or_else(gone)?;
            if let Some(why) = failure(&mp, since) {
                return Err(format!("{what} failed: {why}"));
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err("the gateway stopped watching Kubernetes".into()),
                Err(_) => {
                    return Err(format!(
                        "{what} had no ready copy after {} s",
                        self.wake_timeout.as_secs()
                    ));
                }
            }
        }
    }
}

impl Backend for Kube {
    fn copies(&self, fleet: &Fleet, p: &Placement) -> Vec<(Arc<Neuron>, ModelState)> {
        let Some(mp) = object_ref(&p.name).and_then(|k| self.placements.get(&k)) else {
            return Vec::new();
        };
        let neurons = fleet.neurons();
        mp.status
            .iter()
            .flat_map(|s| &s.placements)
            .filter_map(|c| {
                let n = neurons.iter().find(|n| n.cfg.name == c.neuron)?;
                Some((n.clone(), c.state))
            })
            .collect()
    }

    fn make_ready(
        &self,
        fleet: Arc<Fleet>,
        p: Placement,
    ) -> BoxFuture<'static, Result<(), String>> {
        let me = self.clone();
        async move { me.wake(&fleet, &p).await }.boxed()
    }

    /// Nothing to do: the reflectors keep the caches current.
    fn refresh<'a>(&'a self, _fleet: &'a Fleet) -> BoxFuture<'a, ()> {
        futures::future::ready(()).boxed()
    }

    fn describe(&self, n: &Neuron) -> Option<NeuronReport> {
        self.neurons
            .get(&ObjectRef::new(&n.cfg.name))
            .and_then(|o| o.status.as_ref().and_then(NeuronReport::of))
    }
}

/// Connects to Kubernetes (in-cluster config or KUBECONFIG), starts the reflectors over
/// ModelPlacements (in `namespace`, or all) and Neurons, and returns the fleet once their
/// first lists are in (or after [`FIRST_LIST`], the catalogue filling in when they come). The
/// neurons are sent `neuron_token`.
pub async fn start(
    namespace: Option<&str>,
    neuron_token: Option<String>,
    settings: &Settings,
) -> Result<Arc<Fleet>, Error> {
    let client = kube::Client::try_default().await.map_err(|e| {
        Error::Config(format!(
            "no Kubernetes configuration (in-cluster service account or KUBECONFIG): {e}"
        ))
    })?;
    let (mp_store, mp_writer) = reflector::store();
    let (n_store, n_writer) = reflector::store();
    let kube = Kube::new(
        client.clone(),
        mp_store,
        n_store,
        neuron_token,
        settings.load_timeout,
    );
    let fleet = Fleet::new(settings, kube.clone());
    let mp_api: Api<ModelPlacement> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let placements = reflector::reflector(mp_writer, watcher(mp_api, watcher::Config::default()))
        .default_backoff()
        .map(|e| ("ModelPlacements", e.map(|e| settled(&e))))
        .boxed();
    let neurons = reflector::reflector(
        n_writer,
        watcher(Api::<crd::Neuron>::all(client), watcher::Config::default()),
    )
    .default_backoff()
    .map(|e| ("Neurons", e.map(|e| settled(&e))))
    .boxed();
    tokio::spawn(follow(
        fleet.clone(),
        kube.clone(),
        futures::stream::select(placements, neurons),
    ));
    let lists = async {
        let _ = kube.placements.wait_until_ready().await;
        let _ = kube.neurons.wait_until_ready().await;
    };
    if tokio::time::timeout(FIRST_LIST, lists).await.is_err() {
        tracing::warn!(
            "no ModelPlacement and Neuron lists from Kubernetes after {} s; serving, the catalogue fills in when they come",
            FIRST_LIST.as_secs()
        );
    }
    kube.sync(&fleet);
    let catalogue = fleet.catalogue();
    tracing::info!(
        namespace = namespace.unwrap_or("(all)"),
        placements = catalogue.placements.len(),
        neurons = fleet.neurons().len(),
        "watching ModelPlacements and Neurons"
    );
    Ok(fleet)
}

/// Whether a watch event leaves the cache settled (not halfway through a relist).
fn settled<K>(e: &watcher::Event<K>) -> bool {
    !matches!(e, watcher::Event::Init | watcher::Event::InitApply(_))
}

/// Rebuilds the routing state after every settled change the reflectors see, and every [`RESYNC`].
async fn follow(
    fleet: Arc<Fleet>,
    kube: Kube,
    mut events: impl Stream<Item = (&'static str, Result<bool, watcher::Error>)> + Unpin,
) {
    let mut tick = tokio::time::interval(RESYNC);
    let mut shadowed = Vec::new();
    loop {
        tokio::select! {
            e = events.next() => match e {
                Some((_, Ok(true))) => {}
                Some((_, Ok(false))) => continue,
                Some((kind, Err(e))) => {
                    tracing::warn!(kind, error = %e, "watching Kubernetes failed; retrying");
                    continue;
                }
                None => return,
            },
            _ = tick.tick() => {}
        }
        let now = kube.sync(&fleet);
        if now != shadowed {
            for name in &now {
                tracing::warn!(name = %name, "two ModelPlacements serve this name; the older one gets it");
            }
            shadowed = now;
        }
    }
}

/// The ModelPlacement a model id (`<name>.<namespace>`, see [`ModelPlacement::model_id`]) names;
/// a namespace has no dots, a name may.
fn object_ref(model_id: &str) -> Option<ObjectRef<ModelPlacement>> {
    let (name, ns) = model_id.rsplit_once('.')?;
    Some(ObjectRef::new(name).within(ns))
}

/// The placement a ModelPlacement stands for: named by its neuron-side id, served by its served
/// name and aliases.
fn placement_of(mp: &ModelPlacement) -> Placement {
    let mut spec = mp.spec.0.clone();
    spec.served_name = Some(mp.served_name().to_string());
    Placement {
        name: mp.model_id(),
        spec,
    }
}

/// The catalogue of the ModelPlacements not being deleted, and the names more than one asks
/// for: the oldest keeps such a name, so a new object cannot take over a name in use.
pub fn catalogue_of(mps: &[Arc<ModelPlacement>]) -> (Catalogue, Vec<String>) {
    let mut mps: Vec<&ModelPlacement> = mps
        .iter()
        .map(AsRef::as_ref)
        .filter(|mp| mp.metadata.deletion_timestamp.is_none())
        .collect();
    mps.sort_by(|a, b| {
        let key = |m: &ModelPlacement| {
            (
                m.metadata.creation_timestamp.clone(),
                m.metadata.namespace.clone(),
                m.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    Catalogue::new(mps.into_iter().map(placement_of).collect())
}

/// The neurons to route to, with whether each is ready: every Neuron object (its `spec.endpoint`,
/// ready as its status says), and any neuron a ModelPlacement's status names that has no object
/// (the endpoint from there, taken as ready). Sorted by name; each carries the cluster's `token`.
pub fn neurons_of(
    objects: &[Arc<crd::Neuron>],
    mps: &[Arc<ModelPlacement>],
    token: Option<&str>,
) -> Vec<(NeuronConfig, bool)> {
    let mut found: BTreeMap<String, (String, bool)> = objects
        .iter()
        .filter_map(|o| {
            let ready = o.status.as_ref().is_some_and(|s| s.ready);
            Some((o.metadata.name.clone()?, (o.spec.endpoint.clone(), ready)))
        })
        .collect();
    for c in mps
        .iter()
        .filter_map(|mp| mp.status.as_ref())
        .flat_map(|s| &s.placements)
    {
        found
            .entry(c.neuron.clone())
            .or_insert_with(|| (c.endpoint.clone(), true));
    }
    found
        .into_iter()
        .map(|(name, (endpoint, ready))| {
            let token = token.map(str::to_string);
            (
                NeuronConfig {
                    name,
                    endpoint,
                    token,
                },
                ready,
            )
        })
        .collect()
}

/// Why a ModelPlacement cannot get ready: its phase is Failed, as the operator wrote it after
/// seeing generation `since` or later; the copies' and conditions' messages say why.
fn failure(mp: &ModelPlacement, since: i64) -> Option<String> {
    let s = mp.status.as_ref()?;
    if s.phase != Phase::Failed || s.observed_generation.unwrap_or(0) < since {
        return None;
    }
    let why: Vec<&str> = s
        .placements
        .iter()
        .filter_map(|c| c.message.as_deref())
        .chain(
            s.conditions
                .iter()
                .filter(|c| c.status == "False")
                .map(|c| c.message.as_str()),
        )
        .filter(|m| !m.is_empty())
        .collect();
    Some(if why.is_empty() {
        "its phase is Failed".into()
    } else {
        why.join("; ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;
    use serde_json::Value;
    use std::sync::Mutex;

    /// A ModelPlacement as the API server would hand it over; `status` may be `null`.
    fn mp(ns: &str, name: &str, spec: Value, status: Value) -> ModelPlacement {
        let mut spec = spec;
        spec["model"] = json!({"uri": "file:///models/m.gguf"});
        serde_json::from_value(json!({
            "apiVersion": "cortex.helexa.io/v1alpha1", "kind": "ModelPlacement",
            "metadata": {"name": name, "namespace": ns, "generation": 1,
                         "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": spec, "status": status,
        }))
        .unwrap()
    }

    /// A status with one copy per `(neuron, endpoint, state)`.
    fn copies(list: &[(&str, &str, &str)]) -> Value {
        let placements: Vec<Value> = list
            .iter()
            .map(|(n, e, s)| json!({"neuron": n, "endpoint": e, "state": s}))
            .collect();
        json!({"phase": "Ready", "placements": placements, "observedGeneration": 1})
    }

    fn neuron(name: &str, endpoint: &str, ready: bool) -> crd::Neuron {
        serde_json::from_value(json!({
            "apiVersion": "cortex.helexa.io/v1alpha1", "kind": "Neuron",
            "metadata": {"name": name},
            "spec": {"endpoint": endpoint},
            "status": {"ready": ready, "models": [{"id": "smol.ml", "state": "ready", "bytes": 100}]},
        }))
        .unwrap()
    }

    /// The caches a reflector would fill, and a backend over them talking to `api` (an address
    /// nothing answers on unless a test serves a fake API server there).
    struct Cluster {
        placements: Writer<ModelPlacement>,
        neurons: Writer<crd::Neuron>,
        kube: Kube,
        fleet: Arc<Fleet>,
    }

    impl Cluster {
        fn new(api: &str, load_timeout_secs: u64) -> Cluster {
            let placements = Writer::default();
            let neurons = Writer::default();
            let client = kube::Client::try_from(kube::Config::new(api.parse().unwrap())).unwrap();
            let kube = Kube::new(
                client,
                placements.as_reader(),
                neurons.as_reader(),
                Some("secret".into()),
                Duration::from_secs(load_timeout_secs),
            );
            let settings = Settings {
                load_timeout: Duration::from_secs(load_timeout_secs),
                request_timeout: Duration::from_secs(600),
                stream_idle_timeout: Duration::from_secs(60),
                keepalive: Duration::from_secs(5),
                max_body_bytes: 32 << 20,
            };
            let fleet = Fleet::new(&settings, kube.clone());
            Cluster {
                placements,
                neurons,
                kube,
                fleet,
            }
        }

        fn apply(&mut self, mp: ModelPlacement) {
            self.placements
                .apply_watcher_event(&watcher::Event::Apply(mp));
            self.kube.sync(&self.fleet);
        }

        fn apply_neuron(&mut self, n: crd::Neuron) {
            self.neurons.apply_watcher_event(&watcher::Event::Apply(n));
            self.kube.sync(&self.fleet);
        }
    }

    #[test]
    fn a_placement_is_served_by_its_names_and_routed_by_its_model_id() {
        let m = mp(
            "ml",
            "smol",
            json!({"servedName": "smollm2", "aliases": ["small"]}),
            Value::Null,
        );
        let (c, shadowed) = catalogue_of(&[Arc::new(m)]);
        assert!(shadowed.is_empty());
        let p = c.get("small").unwrap();
        assert_eq!(p.name, "smol.ml");
        assert_eq!(p.served_name(), "smollm2");
        assert!(c.get("smol").is_none());
        let plain = mp("ml", "qwen", json!({}), Value::Null);
        let (c, _) = catalogue_of(&[Arc::new(plain)]);
        assert_eq!(c.get("qwen").unwrap().name, "qwen.ml");
    }

    #[test]
    fn the_oldest_placement_keeps_a_name_two_ask_for_and_one_being_deleted_is_not_served() {
        let old = mp("a", "x", json!({"servedName": "chat"}), Value::Null);
        let mut new = mp("b", "y", json!({"servedName": "chat"}), Value::Null);
        new.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2025-06-01T00:00:00Z".parse().unwrap(),
            ));
        let (c, shadowed) = catalogue_of(&[Arc::new(new.clone()), Arc::new(old.clone())]);
        assert_eq!(c.get("chat").unwrap().name, "x.a");
        assert_eq!(shadowed, vec!["chat".to_string()]);
        let mut deleting = old;
        deleting.metadata.deletion_timestamp = new.metadata.creation_timestamp.clone();
        let (c, _) = catalogue_of(&[Arc::new(new), Arc::new(deleting)]);
        assert_eq!(c.get("chat").unwrap().name, "y.b");
    }

    #[test]
    fn neurons_come_from_objects_and_from_placement_statuses_that_name_others() {
        let objects = [
            Arc::new(neuron("n1", "http://10.0.0.1:13131", true)),
            Arc::new(neuron("n2", "http://10.0.0.2:13131", false)),
        ];
        let m = mp(
            "ml",
            "smol",
            json!({}),
            copies(&[
                ("n1", "http://stale:13131", "ready"),
                ("outside", "http://192.168.1.9:13131", "ready"),
            ]),
        );
        let got = neurons_of(&objects, &[Arc::new(m)], Some("t"));
        let view: Vec<(&str, &str, bool)> = got
            .iter()
            .map(|(c, up)| (c.name.as_str(), c.endpoint.as_str(), *up))
            .collect();
        assert_eq!(
            view,
            vec![
                ("n1", "http://10.0.0.1:13131", true),
                ("n2", "http://10.0.0.2:13131", false),
                ("outside", "http://192.168.1.9:13131", true),
            ]
        );
        assert!(got.iter().all(|(c, _)| c.token.as_deref() == Some("t")));
    }

    #[test]
    fn a_model_id_leads_back_to_its_object_even_with_dots_in_the_name() {
        let m = mp("ml", "qwen3.5-0.6b", json!({}), Value::Null);
        let r = object_ref(&m.model_id()).unwrap();
        assert_eq!(r, ObjectRef::from_obj(&m));
        assert!(object_ref("nodot").is_none());
    }

    #[test]
    fn a_failure_is_news_only_once_the_operator_saw_the_current_spec() {
        let mut m = mp(
            "ml",
            "smol",
            json!({}),
            json!({"phase": "Failed", "observedGeneration": 1,
                   "placements": [{"neuron": "n1", "endpoint": "http://n1", "state": "failed",
                                   "message": "no GGUF file matching quant Q9"}]}),
        );
        assert_eq!(failure(&m, 1).unwrap(), "no GGUF file matching quant Q9");
        assert_eq!(failure(&m, 2), None, "written before the wake's scale");
        m.status.as_mut().unwrap().phase = Phase::Loading;
        assert_eq!(failure(&m, 1), None);
    }

    #[tokio::test]
    async fn requests_go_to_ready_copies_on_ready_neurons_fewest_outstanding_first() {
        let mut c = Cluster::new("http://127.0.0.1:9", 1);
        c.apply_neuron(neuron("n1", "http://10.0.0.1:13131", true));
        c.apply_neuron(neuron("n2", "http://10.0.0.2:13131", true));
        c.apply_neuron(neuron("n3", "http://10.0.0.3:13131", false));
        c.apply(mp(
            "ml",
            "smol",
            json!({"aliases": ["s"]}),
            copies(&[
                ("n1", "http://10.0.0.1:13131", "ready"),
                ("n2", "http://10.0.0.2:13131", "ready"),
                ("n3", "http://10.0.0.3:13131", "ready"),
            ]),
        ));
        let p = c.fleet.placement("s").unwrap();
        assert_eq!(c.fleet.ready_replicas(&p), 2, "n3's Neuron is not ready");
        c.fleet
            .neuron("n1")
            .unwrap()
            .outstanding
            .store(3, std::sync::atomic::Ordering::Relaxed);
        let n = c.fleet.pick(&p, &[]).unwrap();
        assert_eq!(n.cfg.name, "n2");
        assert_eq!(n.cfg.token.as_deref(), Some("secret"));
        assert_eq!(c.fleet.pick(&p, &["n2".into()]).unwrap().cfg.name, "n1");
        // A neuron marked down after a failed request is tried again after the next resync.
        n.mark_down("connection refused");
        assert_eq!(c.fleet.pick(&p, &[]).unwrap().cfg.name, "n1");
        c.kube.sync(&c.fleet);
        assert_eq!(c.fleet.pick(&p, &[]).unwrap().cfg.name, "n2");
        // The counters survive a rebuild; /cortex/fleet shows the Neuron object's status.
        assert_eq!(
            c.fleet
                .neuron("n1")
                .unwrap()
                .outstanding
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
        let described = c.fleet.describe(&c.fleet.neuron("n1").unwrap());
        assert_eq!(described.unwrap().models[0].id, "smol.ml");
    }

    /// Serves a fake API server that records each request and answers with a Scale.
    async fn fake_api() -> (String, Arc<Mutex<Vec<(String, String, String, Value)>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let s = s.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
                let ctype = parts
                    .headers
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                s.lock().unwrap().push((
                    parts.method.to_string(),
                    parts.uri.path().to_string(),
                    ctype,
                    serde_json::from_slice(&body).unwrap_or(Value::Null),
                ));
                axum::Json(json!({
                    "apiVersion": "autoscaling/v1", "kind": "Scale",
                    "metadata": {"name": "smol", "namespace": "ml"},
                    "spec": {"replicas": 1}, "status": {"replicas": 0},
                }))
            }
        });
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        (url, seen)
    }

    #[tokio::test]
    async fn a_model_at_zero_is_woken_by_one_scale_call_and_served_once_a_copy_is_ready() {
        let (api, seen) = fake_api().await;
        let mut c = Cluster::new(&api, 30);
        c.apply_neuron(neuron("n1", "http://10.0.0.1:13131", true));
        c.apply(mp(
            "ml",
            "smol",
            json!({"replicas": 0}),
            json!({"phase": "Idle"}),
        ));
        let p = c.fleet.placement("smol").unwrap();
        let (a, b) = (c.fleet.clone(), c.fleet.clone());
        let (pa, pb) = (p.clone(), p.clone());
        let first = tokio::spawn(async move { a.load_copy(&pa).await });
        let second = tokio::spawn(async move { b.load_copy(&pb).await });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "no scale call");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!first.is_finished() && !second.is_finished());
        // The operator loads it; the reflector shows the copy ready.
        c.apply(mp(
            "ml",
            "smol",
            json!({"replicas": 1}),
            copies(&[("n1", "http://10.0.0.1:13131", "ready")]),
        ));
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "one scale call for both requests: {seen:?}");
        let (method, path, ctype, body) = &seen[0];
        assert_eq!(method, "PATCH");
        assert_eq!(
            path,
            "/apis/cortex.helexa.io/v1alpha1/namespaces/ml/modelplacements/smol/scale"
        );
        assert_eq!(ctype, "application/merge-patch+json");
        assert_eq!(body, &json!({"spec": {"replicas": 1}}));
        assert_eq!(c.fleet.pick(&p, &[]).unwrap().cfg.name, "n1");
    }

    #[tokio::test]
    async fn a_model_with_copies_wanted_is_waited_for_without_scaling() {
        let (api, seen) = fake_api().await;
        let mut c = Cluster::new(&api, 1);
        c.apply_neuron(neuron("n1", "http://10.0.0.1:13131", true));
        c.apply(mp(
            "ml",
            "smol",
            json!({"replicas": 2}),
            copies(&[("n1", "http://10.0.0.1:13131", "loading")]),
        ));
        let p = c.fleet.placement("smol").unwrap();
        let e = c.fleet.load_copy(&p).await.unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_failed_placement_answers_why_at_once() {
        let (api, _) = fake_api().await;
        let mut c = Cluster::new(&api, 30);
        c.apply(mp(
            "ml",
            "smol",
            json!({}),
            json!({"phase": "Failed", "observedGeneration": 1, "conditions": [{
                "type": "Ready", "status": "False", "reason": "LoadFailed",
                "message": "no GGUF file matching quant Q9 in a/b; available: Q4_K_M",
                "lastTransitionTime": "2025-01-01T00:00:00Z"}]}),
        ));
        let p = c.fleet.placement("smol").unwrap();
        let started = std::time::Instant::now();
        let e = c.fleet.load_copy(&p).await.unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            e.contains("ModelPlacement ml/smol failed: no GGUF file matching quant Q9"),
            "{e}"
        );
    }
}
