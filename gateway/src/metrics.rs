//! The gateway's Prometheus metrics (`cortex_gateway_*`, on `metrics_listen`). Names follow vLLM's
//! where an equivalent exists (`time_to_first_token_seconds`, `e2e_request_latency_seconds`,
//! `inter_token_latency_seconds`), with units in the names; label values are bounded: placement
//! names (`unknown` for a request naming none), neuron names (from the config or the Neuron
//! objects; `none` for a request answered before it reached one), the dialect (`openai`,
//! `anthropic`) and the status class.
//!
//! Every client request is counted once in `cortex_gateway_requests_total`: by its route when a
//! neuron was asked (each attempt on a neuron counts, so a request retried elsewhere after a
//! failure counts on both), else by the server's counting middleware from the answer's
//! extensions ([`Counted`], [`Named`]): bad bodies, unknown models, wrong keys, oversize bodies;
//! or where a cold load failed.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use axum::http::{Method, StatusCode};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The API a caller speaks: the gateway answers it, errors included, in that shape, and labels
/// its series with it (`openai`, `anthropic`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

impl Dialect {
    /// The dialect of an inference endpoint, from its method and path (`None` for the others).
    pub fn of(method: &Method, path: &str) -> Option<Dialect> {
        if method != Method::POST {
            return None;
        }
        match path {
            "/v1/chat/completions" | "/v1/completions" => Some(Dialect::OpenAi),
            "/v1/messages" | "/v1/messages/count_tokens" => Some(Dialect::Anthropic),
            _ => None,
        }
    }

    /// The shape errors take for a request to `path`: Anthropic's under `/v1/messages`, else
    /// OpenAI's.
    pub fn of_path(path: &str) -> Dialect {
        if path.starts_with("/v1/messages") {
            Dialect::Anthropic
        } else {
            Dialect::OpenAi
        }
    }

    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::OpenAi => "openai",
            Dialect::Anthropic => "anthropic",
        }
    }
}

impl EncodeLabelValue for Dialect {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        self.as_str().encode(encoder)
    }
}

/// A response extension: the request was counted already (by its route, where its cold load
/// failed, or by the stream task answering it), so the counting middleware leaves it.
#[derive(Clone, Copy, Debug)]
pub struct Counted;

/// A response extension: the placement a request named, for its count when it is answered
/// before reaching a neuron (else it counts as `unknown`).
#[derive(Clone, Debug)]
pub struct Named(pub String);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub neuron: String,
    pub dialect: Dialect,
    pub status_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub model: String,
    pub neuron: String,
    pub dialect: Dialect,
}

/// A model on a neuron (`none` where the event had none, as a cold load that failed).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
    pub neuron: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoadLabels {
    pub model: String,
    pub neuron: String,
    pub result: String,
}

type Hist<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    Histogram::new([
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
        160.0,
    ])
}

fn throughput() -> Histogram {
    Histogram::new([
        1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0,
        2000.0,
    ])
}

fn load() -> Histogram {
    Histogram::new([
        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ])
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub in_flight: Family<RouteLabels, Gauge>,
    pub ttft: Hist<RouteLabels>,
    pub e2e: Hist<RouteLabels>,
    pub itl: Hist<RouteLabels>,
    pub tokens_per_second: Hist<RouteLabels>,
    pub queue_time: Hist<RouteLabels>,
    pub prompt_tokens: Family<RouteLabels, Counter>,
    pub cached_prompt_tokens: Family<RouteLabels, Counter>,
    pub generation_tokens: Family<RouteLabels, Counter>,
    pub cold_loads: Family<LoadLabels, Counter>,
    pub cold_load_seconds: Hist<ModelLabels>,
    pub evictions: Family<ModelLabels, Counter>,
    pub defrag_moves: Counter,
    pub neuron_up: Family<RouteLabelsNeuron, Gauge>,
    /// The handles of each route's series, by model.
    routes: RwLock<HashMap<String, Vec<Arc<RouteMetrics>>>>,
}

/// The handles of one route's series (model, neuron, dialect), looked up once and then reused:
/// `Family::get_or_create` builds and hashes a label set of fresh `String`s and takes the
/// family's lock, which on every request and every streamed chunk was a good part of the
/// gateway's CPU per request. The handles share their values with the families, so the
/// exposition is the same.
pub struct RouteMetrics {
    pub labels: RouteLabels,
    pub in_flight: Gauge,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    ttft: Series<Histogram, fn() -> Histogram>,
    itl: Series<Histogram, fn() -> Histogram>,
    tokens_per_second: Series<Histogram, fn() -> Histogram>,
    prompt_tokens: Series<Counter, fn() -> Counter>,
    cached_prompt_tokens: Series<Counter, fn() -> Counter>,
    generation_tokens: Series<Counter, fn() -> Counter>,
    requests: Family<RequestLabels, Counter>,
    /// The requests counters of status classes 1xx to 5xx.
    by_class: [OnceLock<Counter>; 5],
}

/// A route's series in a family, made on first use, so that a series shows up only once it has
/// a value (as with `get_or_create` at the point of use): a JSON route has no inter-token series.
struct Series<M, C> {
    family: Family<RouteLabels, M, C>,
    handle: OnceLock<M>,
}

impl<M: Clone, C: MetricConstructor<M> + Clone> Series<M, C> {
    fn new(family: &Family<RouteLabels, M, C>) -> Self {
        Series {
            family: family.clone(),
            handle: OnceLock::new(),
        }
    }

    fn get(&self, labels: &RouteLabels) -> &M {
        self.handle
            .get_or_init(|| self.family.get_or_create(labels).clone())
    }
}

impl RouteMetrics {
    pub fn ttft(&self) -> &Histogram {
        self.ttft.get(&self.labels)
    }

    pub fn itl(&self) -> &Histogram {
        self.itl.get(&self.labels)
    }

    pub fn tokens_per_second(&self) -> &Histogram {
        self.tokens_per_second.get(&self.labels)
    }

    pub fn prompt_tokens(&self) -> &Counter {
        self.prompt_tokens.get(&self.labels)
    }

    pub fn cached_prompt_tokens(&self) -> &Counter {
        self.cached_prompt_tokens.get(&self.labels)
    }

    pub fn generation_tokens(&self) -> &Counter {
        self.generation_tokens.get(&self.labels)
    }

    /// Counts a request answered with `status`.
    pub fn request(&self, status: StatusCode) {
        let class = status.as_u16() / 100;
        let make = || {
            self.requests
                .get_or_create(&RequestLabels {
                    model: self.labels.model.clone(),
                    neuron: self.labels.neuron.clone(),
                    dialect: self.labels.dialect,
                    status_class: format!("{class}xx"),
                })
                .clone()
        };
        match self.by_class.get(usize::from(class).wrapping_sub(1)) {
            Some(c) => c.get_or_init(make).inc(),
            None => make().inc(),
        };
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabelsNeuron {
    pub neuron: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            in_flight: Family::default(),
            ttft: Family::new_with_constructor(latency),
            e2e: Family::new_with_constructor(latency),
            itl: Family::new_with_constructor(latency),
            tokens_per_second: Family::new_with_constructor(throughput),
            queue_time: Family::new_with_constructor(latency),
            prompt_tokens: Family::default(),
            cached_prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            cold_loads: Family::default(),
            cold_load_seconds: Family::new_with_constructor(load),
            evictions: Family::default(),
            defrag_moves: Counter::default(),
            neuron_up: Family::default(),
            routes: RwLock::default(),
        };
        let mut r = Registry::default();
        r.register(
            "cortex_gateway_requests",
            "Requests answered, by model, neuron (none when no neuron was asked), dialect and status class",
            m.requests.clone(),
        );
        r.register(
            "cortex_gateway_in_flight_requests",
            "Requests being proxied to a neuron now",
            m.in_flight.clone(),
        );
        r.register(
            "cortex_gateway_time_to_first_token_seconds",
            "Time from the request's arrival to the first streamed chunk carrying generated text or a tool call (streams only)",
            m.ttft.clone(),
        );
        r.register(
            "cortex_gateway_e2e_request_latency_seconds",
            "Time from the request's arrival to the end of the answer, once per answered request",
            m.e2e.clone(),
        );
        r.register(
            "cortex_gateway_inter_token_latency_seconds",
            "Time between two streamed chunks carrying generated tokens (streams only)",
            m.itl.clone(),
        );
        r.register(
            "cortex_gateway_generation_tokens_per_second",
            "Tokens a streamed answer generated after its first, per second from its first token to its last",
            m.tokens_per_second.clone(),
        );
        r.register(
            "cortex_gateway_request_queue_time_seconds",
            "Time from the request's arrival to its dispatch to a neuron (cold loads included)",
            m.queue_time.clone(),
        );
        r.register(
            "cortex_gateway_prompt_tokens",
            "Prompt tokens of answered requests, as the neuron counted them",
            m.prompt_tokens.clone(),
        );
        r.register(
            "cortex_gateway_prompt_cached_tokens",
            "Prompt tokens of answered requests the neuron read from its prefix cache",
            m.cached_prompt_tokens.clone(),
        );
        r.register(
            "cortex_gateway_generation_tokens",
            "Tokens generated for answered requests, as the neuron counted them",
            m.generation_tokens.clone(),
        );
        r.register(
            "cortex_gateway_cold_loads",
            "Loads started because no replica was ready, by the neuron that got the copy (none when it failed) and result",
            m.cold_loads.clone(),
        );
        r.register(
            "cortex_gateway_cold_load_duration_seconds",
            "Time a successful cold load took, by model and the neuron that got the copy",
            m.cold_load_seconds.clone(),
        );
        r.register(
            "cortex_gateway_evictions",
            "Models unloaded to make room, by evicted model and the neuron it left",
            m.evictions.clone(),
        );
        r.register(
            "cortex_gateway_defrag_moves",
            "Models moved to another neuron to free a whole one (defrag_after_cycles)",
            m.defrag_moves.clone(),
        );
        r.register(
            "cortex_gateway_neuron_up",
            "1 when the neuron answers its status probe",
            m.neuron_up.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// The series of requests for `model` sent to `neuron` in `dialect`.
    pub fn route(&self, model: &str, neuron: &str, dialect: Dialect) -> Arc<RouteMetrics> {
        let find = |routes: &[Arc<RouteMetrics>]| {
            routes
                .iter()
                .find(|r| r.labels.neuron == neuron && r.labels.dialect == dialect)
                .cloned()
        };
        let known = self.routes.read().expect("routes lock");
        if let Some(r) = known.get(model).and_then(|v| find(v)) {
            return r;
        }
        drop(known);
        let mut routes = self.routes.write().expect("routes lock");
        let of_model = routes.entry(model.to_string()).or_default();
        if let Some(r) = find(of_model) {
            return r;
        }
        let labels = RouteLabels {
            model: model.into(),
            neuron: neuron.into(),
            dialect,
        };
        let r = Arc::new(RouteMetrics {
            in_flight: self.in_flight.get_or_create(&labels).clone(),
            e2e: self.e2e.get_or_create(&labels).clone(),
            queue_time: self.queue_time.get_or_create(&labels).clone(),
            ttft: Series::new(&self.ttft),
            itl: Series::new(&self.itl),
            tokens_per_second: Series::new(&self.tokens_per_second),
            prompt_tokens: Series::new(&self.prompt_tokens),
            cached_prompt_tokens: Series::new(&self.cached_prompt_tokens),
            generation_tokens: Series::new(&self.generation_tokens),
            requests: self.requests.clone(),
            by_class: Default::default(),
            labels,
        });
        of_model.push(r.clone());
        r
    }

    /// Counts a request answered with `status` before any neuron was asked (`model` is a
    /// placement name, or `unknown`).
    pub fn unrouted(&self, model: &str, dialect: Dialect, status: StatusCode) {
        self.requests
            .get_or_create(&RequestLabels {
                model: model.into(),
                neuron: "none".into(),
                dialect,
                status_class: format!("{}xx", status.as_u16() / 100),
            })
            .inc();
    }

    /// A cold load of `model` ended, successfully when `ok`, with the copy on `neuron` (`none`
    /// for a failed load; `unknown` when the backend cannot say which neuron got it).
    pub fn cold_load(&self, model: &str, ok: bool, neuron: Option<&str>, took: Duration) {
        let neuron = match (ok, neuron) {
            (false, _) => "none",
            (true, n) => n.unwrap_or("unknown"),
        };
        self.cold_loads
            .get_or_create(&LoadLabels {
                model: model.into(),
                neuron: neuron.into(),
                result: if ok { "success" } else { "failure" }.into(),
            })
            .inc();
        if ok {
            self.cold_load_seconds
                .get_or_create(&ModelLabels {
                    model: model.into(),
                    neuron: neuron.into(),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// `model` was unloaded from `neuron` to make room.
    pub fn evicted(&self, model: &str, neuron: &str) {
        self.evictions
            .get_or_create(&ModelLabels {
                model: model.into(),
                neuron: neuron.into(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// `GET /metrics`, in the exposition format the scraper asks for.
pub fn router(metrics: std::sync::Arc<Metrics>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let m = metrics.clone();
            async move {
                let accept = headers
                    .get(axum::http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let (ctype, body) = cortex_core::exposition::negotiate(accept, m.encode());
                ([(axum::http::header::CONTENT_TYPE, ctype)], body)
            }
        }),
    )
}
