//! Prometheus metrics. Where vLLM has an equivalent, the name and `model_name` label are vLLM's,
//! so vLLM dashboards and the Gateway API Inference Extension's endpoint picker read a neuron
//! unchanged; cortex-only signals are `cortex_neuron_*`. Label values are bounded: model ids
//! (which an operator chooses), finish reasons and error types.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishLabel {
    pub model_name: String,
    pub finished_reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub model_name: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub error_type: String,
}

type Hist = Family<ModelLabel, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
        40.0, 80.0, 160.0,
    ])
}

fn tokens() -> Histogram {
    Histogram::new([
        1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
    ])
}

fn batch() -> Histogram {
    Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
}

fn load() -> Histogram {
    Histogram::new([
        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ])
}

pub struct Metrics {
    pub registry: Registry,
    pub running: Family<ModelLabel, Gauge>,
    pub waiting: Family<ModelLabel, Gauge>,
    pub kv_usage: Family<ModelLabel, Gauge<f64, AtomicU64>>,
    pub kv_budget: Family<ModelLabel, Gauge>,
    pub preemptions: Family<ModelLabel, Counter>,
    pub batch: Hist,
    pub prefix_queries: Family<ModelLabel, Counter>,
    pub prefix_hits: Family<ModelLabel, Counter>,
    pub prompt_tokens: Family<ModelLabel, Counter>,
    pub generation_tokens: Family<ModelLabel, Counter>,
    pub success: Family<FinishLabel, Counter>,
    pub ttft: Hist,
    pub itl: Hist,
    pub e2e: Hist,
    pub queue: Hist,
    pub prefill: Hist,
    pub decode: Hist,
    pub req_prompt_tokens: Hist,
    pub req_gen_tokens: Hist,
    pub load_seconds: Hist,
    pub loads: Family<ResultLabel, Counter>,
    pub model_bytes: Family<ModelLabel, Gauge>,
    pub errors: Family<ErrorLabel, Counter>,
    pub device_total: Family<DeviceLabel, Gauge>,
    pub device_free: Family<DeviceLabel, Gauge>,
}

/// A device of this host: `cpu` or `cuda:N`, and its name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabel {
    pub device: String,
    pub name: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        let m = Metrics {
            running: Family::default(),
            waiting: Family::default(),
            kv_usage: Family::default(),
            kv_budget: Family::default(),
            preemptions: Family::default(),
            batch: Family::new_with_constructor(batch),
            prefix_queries: Family::default(),
            prefix_hits: Family::default(),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            success: Family::default(),
            ttft: Family::new_with_constructor(latency),
            itl: Family::new_with_constructor(latency),
            e2e: Family::new_with_constructor(latency),
            queue: Family::new_with_constructor(latency),
            prefill: Family::new_with_constructor(latency),
            decode: Family::new_with_constructor(latency),
            req_prompt_tokens: Family::new_with_constructor(tokens),
            req_gen_tokens: Family::new_with_constructor(tokens),
            load_seconds: Family::new_with_constructor(load),
            loads: Family::default(),
            model_bytes: Family::default(),
            device_total: Family::default(),
            device_free: Family::default(),
            errors: Family::default(),
            registry: Registry::default(),
        };
        r.register(
            "vllm:num_requests_running",
            "Requests being generated",
            m.running.clone(),
        );
        r.register(
            "vllm:num_requests_waiting",
            "Requests queued for the model",
            m.waiting.clone(),
        );
        r.register(
            "vllm:kv_cache_usage_perc",
            "KV cache usage, 0 to 1",
            m.kv_usage.clone(),
        );
        r.register(
            "vllm:num_preemptions",
            "Sequences preempted (cache freed, read again later) to let another grow",
            m.preemptions.clone(),
        );
        r.register(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up for a shared prefix",
            m.prefix_queries.clone(),
        );
        r.register(
            "vllm:prefix_cache_hits",
            "Prompt tokens whose keys and values were copied from a shared prefix instead of computed",
            m.prefix_hits.clone(),
        );
        r.register(
            "cortex_neuron_batch_size",
            "Sequences in each forward pass of the engine",
            m.batch.clone(),
        );
        r.register(
            "cortex_neuron_kv_cache_budget_bytes",
            "KV cache memory all sequences of a model may hold together (--kv-cache-memory)",
            m.kv_budget.clone(),
        );
        r.register(
            "vllm:prompt_tokens",
            "Prompt tokens processed",
            m.prompt_tokens.clone(),
        );
        r.register(
            "vllm:generation_tokens",
            "Tokens generated",
            m.generation_tokens.clone(),
        );
        r.register(
            "vllm:request_success",
            "Finished requests by finish reason",
            m.success.clone(),
        );
        r.register(
            "vllm:time_to_first_token_seconds",
            "Time to first token",
            m.ttft.clone(),
        );
        r.register(
            "vllm:inter_token_latency_seconds",
            "Time between generated tokens",
            m.itl.clone(),
        );
        r.register(
            "vllm:e2e_request_latency_seconds",
            "Request latency from arrival to last token",
            m.e2e.clone(),
        );
        r.register(
            "vllm:request_queue_time_seconds",
            "Time a request waited for the model",
            m.queue.clone(),
        );
        r.register(
            "vllm:request_prefill_time_seconds",
            "Prompt processing time",
            m.prefill.clone(),
        );
        r.register(
            "vllm:request_decode_time_seconds",
            "Generation time after the first token",
            m.decode.clone(),
        );
        r.register(
            "vllm:request_prompt_tokens",
            "Prompt tokens per request",
            m.req_prompt_tokens.clone(),
        );
        r.register(
            "vllm:request_generation_tokens",
            "Generated tokens per request",
            m.req_gen_tokens.clone(),
        );
        r.register(
            "cortex_neuron_model_load_duration_seconds",
            "Time to load a model (download excluded)",
            m.load_seconds.clone(),
        );
        r.register(
            "cortex_neuron_model_loads",
            "Model loads by result",
            m.loads.clone(),
        );
        r.register(
            "cortex_neuron_model_bytes",
            "Memory held by each loaded model",
            m.model_bytes.clone(),
        );
        r.register(
            "cortex_neuron_device_memory_total_bytes",
            "Memory of each device models may use (within --max-memory)",
            m.device_total.clone(),
        );
        r.register(
            "cortex_neuron_device_memory_free_bytes",
            "Memory of each device still free for models, as /status reports it",
            m.device_free.clone(),
        );
        r.register(
            "cortex_neuron_request_errors",
            "Requests refused or failed, by error type",
            m.errors.clone(),
        );
        Metrics { registry: r, ..m }
    }

    pub fn label(model: &str) -> ModelLabel {
        ModelLabel {
            model_name: model.to_string(),
        }
    }

    /// Drops a model's series when it is unloaded, so label sets stay bounded.
    pub fn forget(&self, model: &str) {
        let l = Self::label(model);
        self.running.remove(&l);
        self.waiting.remove(&l);
        self.kv_usage.remove(&l);
        self.kv_budget.remove(&l);
        self.model_bytes.remove(&l);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
