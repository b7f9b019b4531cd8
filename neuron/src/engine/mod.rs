//! The inference engine: a loaded model and the loop that serves it.
//!
//! One OS thread per loaded model owns the model's KV cache and drains a bounded channel of
//! [`GenRequest`]s, each carrying its own response sender. Requests run one at a time today; the
//! loop is the place continuous batching will go. A request whose receiver is gone (the client
//! disconnected) is dropped at the next token.

pub mod kernels;
pub mod linear;
pub mod model;
pub mod sampling;
pub mod stop;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cortex_core::openai::FinishReason;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::metrics::{FinishLabel, Metrics};
use crate::template::ChatTemplate;
use crate::tokenizer::{StreamDecoder, TextTokenizer};
use model::{KvCache, Model};
use sampling::{Sampler, SamplingParams};
use stop::StopMatcher;

/// Prompt tokens processed per forward pass: bounds the attention scratch memory of long prompts
/// and lets a cancelled request stop between chunks.
const PREFILL_CHUNK: usize = 256;

/// Everything needed to serve one model.
pub struct LoadedModel {
    pub id: String,
    pub model: Model,
    pub tokenizer: TextTokenizer,
    pub template: Option<ChatTemplate>,
}

/// A generation request, validated and tokenized.
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Keep going past EOS and end-of-turn tokens (until max_tokens or a stop string).
    pub ignore_eos: bool,
    pub tx: mpsc::UnboundedSender<GenEvent>,
    pub arrived: Instant,
}

#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// A piece of generated text (never empty).
    Text(String),
    Done {
        finish: FinishReason,
        /// The stop string that ended generation, if one did.
        stop: Option<String>,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

/// Counters the HTTP layer and `/status` read.
#[derive(Default)]
pub struct Load {
    pub inflight: std::sync::atomic::AtomicU32,
    pub queued: std::sync::atomic::AtomicU32,
    pub last_used: std::sync::atomic::AtomicU64,
    pub kv_used: std::sync::atomic::AtomicUsize,
}

/// Runs the engine loop until the channel closes or `stop` is set.
pub fn run_loop(
    lm: Arc<LoadedModel>,
    mut rx: mpsc::Receiver<GenRequest>,
    stop: Arc<AtomicBool>,
    load: Arc<Load>,
    metrics: Arc<Metrics>,
) {
    let label = Metrics::label(&lm.id);
    let mut cache = match lm.model.new_cache() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(model = %lm.id, error = %e, "allocating the KV cache failed");
            return;
        }
    };
    while let Some(req) = rx.blocking_recv() {
        load.queued.fetch_sub(1, Ordering::Relaxed);
        metrics.waiting.get_or_create(&label).dec();
        if stop.load(Ordering::Relaxed) {
            let _ = req
                .tx
                .send(GenEvent::Error(format!("model '{}' was unloaded", lm.id)));
            continue;
        }
        if req.tx.is_closed() {
            continue;
        }
        load.inflight.fetch_add(1, Ordering::Relaxed);
        load.last_used.store(crate::now_secs(), Ordering::Relaxed);
        metrics.running.get_or_create(&label).inc();
        metrics
            .queue
            .get_or_create(&label)
            .observe(req.arrived.elapsed().as_secs_f64());
        let tx = req.tx.clone();
        let last = match generate(&lm, &mut cache, req, &stop, &load, &metrics) {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(model = %lm.id, error = %e, "generation failed");
                Some(GenEvent::Error(e.to_string()))
            }
        };
        cache.clear();
        load.kv_used.store(0, Ordering::Relaxed);
        metrics.kv_usage.get_or_create(&label).set(0.0);
        load.inflight.fetch_sub(1, Ordering::Relaxed);
        metrics.running.get_or_create(&label).dec();
        load.last_used.store(crate::now_secs(), Ordering::Relaxed);
        // The closing event goes out last, so a client that has its answer finds /status and
        // /metrics already counting it.
        if let Some(ev) = last {
            let _ = tx.send(ev);
        }
    }
    // Whatever is still queued when the model goes away gets an answer rather than a hang.
    while let Ok(req) = rx.try_recv() {
        load.queued.fetch_sub(1, Ordering::Relaxed);
        let _ = req
            .tx
            .send(GenEvent::Error(format!("model '{}' was unloaded", lm.id)));
    }
}

fn generate(
    lm: &LoadedModel,
    cache: &mut KvCache,
    req: GenRequest,
    stop: &AtomicBool,
    load: &Load,
    metrics: &Metrics,
) -> Result<Option<GenEvent>> {
    let label = Metrics::label(&lm.id);
    let started = Instant::now();
    let cancelled = || req.tx.is_closed() || stop.load(Ordering::Relaxed);
    let mut logits = None;
    for chunk in req.prompt.chunks(PREFILL_CHUNK) {
        if cancelled() {
            return Ok(None);
        }
        logits = Some(lm.model.forward(chunk, cache)?);
    }
    let mut logits = logits.ok_or_else(|| Error::Internal("empty prompt".into()))?;
    metrics
        .prefill
        .get_or_create(&label)
        .observe(started.elapsed().as_secs_f64());
    metrics
        .prompt_tokens
        .get_or_create(&label)
        .inc_by(req.prompt.len() as u64);

    let mut sampler = Sampler::new(req.sampling.clone());
    let mut decoder = StreamDecoder::default();
    let mut stops = StopMatcher::new(req.stop.clone());
    let mut generated = 0usize;
    let mut first_at: Option<Instant> = None;
    let mut last_at = Instant::now();
    let mut matched_stop: Option<String> = None;
    let finish = loop {
        let tok = sampler.sample(Model::logits_vec(&logits)?)?;
        generated += 1;
        let now = Instant::now();
        match first_at {
            None => {
                first_at = Some(now);
                metrics
                    .ttft
                    .get_or_create(&label)
                    .observe(now.duration_since(req.arrived).as_secs_f64());
            }
            Some(_) => metrics
                .itl
                .get_or_create(&label)
                .observe(now.duration_since(last_at).as_secs_f64()),
        }
        last_at = now;
        metrics.generation_tokens.get_or_create(&label).inc();
        if !req.ignore_eos && lm.tokenizer.stop_ids.contains(&tok) {
            break FinishReason::Stop;
        }
        let piece = decoder.push(&lm.tokenizer, tok)?;
        let (text, hit) = stops.push(&piece);
        if !text.is_empty() && req.tx.send(GenEvent::Text(text)).is_err() {
            return Ok(None);
        }
        if hit.is_some() {
            matched_stop = hit;
            break FinishReason::Stop;
        }
        if generated >= req.max_tokens || cache.len() >= cache.capacity() {
            break FinishReason::Length;
        }
        if cancelled() {
            return Ok(None);
        }
        logits = lm.model.forward(&[tok], cache)?;
        load.kv_used.store(cache.len(), Ordering::Relaxed);
        metrics
            .kv_usage
            .get_or_create(&label)
            .set(cache.len() as f64 / cache.capacity() as f64);
    };
    // Text held back as a possible stop string was not one after all.
    let rest = stops.flush();
    if matched_stop.is_none() && !rest.is_empty() {
        let _ = req.tx.send(GenEvent::Text(rest));
    }
    let done = GenEvent::Done {
        finish,
        stop: matched_stop,
        prompt_tokens: req.prompt.len(),
        completion_tokens: generated,
    };
    let reason = match finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
    };
    metrics
        .success
        .get_or_create(&FinishLabel {
            model_name: lm.id.clone(),
            finished_reason: reason.into(),
        })
        .inc();
    metrics
        .e2e
        .get_or_create(&label)
        .observe(req.arrived.elapsed().as_secs_f64());
    if let Some(f) = first_at {
        metrics
            .decode
            .get_or_create(&label)
            .observe(last_at.duration_since(f).as_secs_f64());
    }
    metrics
        .req_prompt_tokens
        .get_or_create(&label)
        .observe(req.prompt.len() as f64);
    metrics
        .req_gen_tokens
        .get_or_create(&label)
        .observe(generated as f64);
    Ok(Some(done))
}

/// How long a client should wait before retrying when the queue is full.
pub fn retry_after(queued: usize) -> Duration {
    Duration::from_secs((queued as u64).clamp(1, 30))
}
