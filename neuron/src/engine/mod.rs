//! The inference engine: a loaded model and the loop that serves it.
//!
//! One OS thread per loaded model drains a bounded channel of [`GenRequest`]s, each carrying its
//! own response sender, and runs them as one continuous batch. What runs in each forward pass
//! is the [`scheduler`]'s decision (admission, prompt chunks, preemption); the keys and values
//! live in fixed-size blocks of one store per model ([`kv_store`]), handed out by the KV cache
//! manager ([`kv_cache`]), which keeps the blocks of finished requests as a prefix cache: a
//! request whose prompt starts as an earlier one did (an agent's system prompt and tools, a
//! conversation's earlier turns) computes only what is new. This file holds the request side:
//! samplers, streamed text, stop strings, metrics and the answers.
//!
//! Module map: `config` (what the GGUF says), `loader` (reading the weights), `model` (the
//! forward pass), `attention` (the CPU kernel), `kv_cache` (blocks and prefixes), `kv_store`
//! (their memory), `scheduler`, `linear` and `kernels` (quantized products), `elementwise`,
//! `sampling`, `stop`.

pub mod attention;
pub mod config;
pub mod elementwise;
pub mod kernels;
pub mod kv_cache;
pub mod kv_store;
pub mod linear;
pub mod loader;
pub mod model;
pub mod sampling;
pub mod scheduler;
pub mod stop;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cortex_core::openai::FinishReason;
use tokio::sync::mpsc;

use crate::error::Result;
use crate::metrics::{FinishLabel, Metrics};
use crate::template::ChatTemplate;
use crate::tokenizer::{StreamDecoder, TextTokenizer};
use kv_cache::BLOCK;
use kv_store::KvStore;
use model::{Model, SeqInput};
use sampling::{Sampler, SamplingParams};
use scheduler::{Event, Limits, Scheduler, SeqId};
use stop::StopMatcher;

pub use scheduler::PREFILL_CHUNK;

/// How a model's sequences share its engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Tokens of KV cache the running sequences may hold together.
    pub kv_tokens: usize,
    /// Tokens of KV cache kept for prefix reuse beyond that (finished requests' blocks).
    pub prefix_tokens: usize,
    /// Most sequences in one step.
    pub max_batch: usize,
}

impl Batching {
    fn limits(&self, max_len: usize) -> Limits {
        let running_blocks = self.kv_tokens.max(max_len).div_ceil(BLOCK);
        Limits {
            running_blocks,
            total_blocks: running_blocks + self.prefix_tokens / BLOCK,
            max_batch: self.max_batch.max(1),
            max_len,
        }
    }
}

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
    /// The prompt is read: how many of its tokens came from the prefix cache. Sent once,
    /// before the first text, so streams can report usage as they go.
    Prompt {
        cached_tokens: usize,
    },
    /// A piece of generated text (never empty) and the tokens generated so far.
    Text(String, usize),
    Done {
        finish: FinishReason,
        /// The stop string that ended generation, if one did.
        stop: Option<String>,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens read from the prefix cache instead of computed.
        cached_tokens: usize,
        /// Prompt tokens this request computed and left in the prefix cache.
        cache_creation_tokens: usize,
    },
    Error(String),
}

/// Counters the HTTP layer and `/status` read.
#[derive(Default)]
pub struct Load {
    pub inflight: std::sync::atomic::AtomicU32,
    pub queued: std::sync::atomic::AtomicU32,
    pub last_used: std::sync::atomic::AtomicU64,
    /// KV cache tokens held by running sequences.
    pub kv_used: std::sync::atomic::AtomicUsize,
    /// KV cache tokens kept for prefix reuse that no running sequence holds.
    pub prefix_cached: std::sync::atomic::AtomicUsize,
}

/// Runs the engine loop until the channel closes or `stop` is set.
pub fn run_loop(
    lm: Arc<LoadedModel>,
    rx: mpsc::Receiver<GenRequest>,
    stop: Arc<AtomicBool>,
    load: Arc<Load>,
    metrics: Arc<Metrics>,
    batching: Batching,
) {
    let mut engine = Engine {
        label: Metrics::label(&lm.id),
        sched: Scheduler::new(batching.limits(lm.model.max_len)),
        store: lm.model.new_store(),
        lm,
        load,
        metrics,
        seqs: HashMap::new(),
        next: 0,
    };
    engine.run(rx, &stop);
}

/// The request side of a sequence (the scheduler has its tokens and blocks).
struct Seq {
    req: GenRequest,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    generated: usize,
    admitted_at: Option<Instant>,
    first_at: Option<Instant>,
    last_at: Instant,
}

impl Seq {
    fn new(req: GenRequest) -> Self {
        Seq {
            sampler: Sampler::new(req.sampling.clone()),
            decoder: StreamDecoder::default(),
            stops: StopMatcher::new(req.stop.clone()),
            generated: 0,
            admitted_at: None,
            first_at: None,
            last_at: Instant::now(),
            req,
        }
    }
}

struct Engine {
    lm: Arc<LoadedModel>,
    label: crate::metrics::ModelLabel,
    load: Arc<Load>,
    metrics: Arc<Metrics>,
    sched: Scheduler,
    store: KvStore,
    seqs: HashMap<SeqId, Seq>,
    next: SeqId,
}

/// One sequence's draw in [`Engine::draw`].
struct Draw<'a> {
    id: SeqId,
    sampler: &'a mut Sampler,
    logits: Vec<f32>,
    token: Option<Result<u32>>,
}

enum Outcome {
    Continue,
    /// Finished or abandoned; the event (if any) is the last thing its client gets.
    Leave(Option<GenEvent>),
}

impl Engine {
    fn add(&mut self, req: GenRequest) {
        self.next += 1;
        self.sched.add(self.next, req.prompt.clone());
        self.seqs.insert(self.next, Seq::new(req));
    }

    fn run(&mut self, mut rx: mpsc::Receiver<GenRequest>, stop: &AtomicBool) {
        loop {
            if self.sched.is_idle() {
                match rx.blocking_recv() {
                    Some(req) => self.add(req),
                    None => break,
                }
            }
            while let Ok(req) = rx.try_recv() {
                self.add(req);
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            self.drop_abandoned();
            if let Err(e) = self.step() {
                // A failed pass fails every sequence in it; the model stays up for the next.
                tracing::warn!(model = %self.lm.id, error = %e, "forward pass failed");
                for id in self.sched.running_ids() {
                    self.leave(id, Some(GenEvent::Error(e.to_string())));
                }
            }
            self.publish();
        }
        // Whatever is still here when the model goes away gets an answer rather than a hang.
        rx.close();
        while let Ok(req) = rx.try_recv() {
            self.add(req);
        }
        let gone = GenEvent::Error(format!("model '{}' was unloaded", self.lm.id));
        let running = self.sched.running_ids();
        for id in self.sched.all() {
            if !running.contains(&id) {
                self.unqueue();
            }
            self.leave(id, Some(gone.clone()));
        }
        self.publish();
    }

    /// Sequences whose clients went away leave before the next pass.
    fn drop_abandoned(&mut self) {
        let seqs = &self.seqs;
        let gone = self
            .sched
            .remove_waiting_if(|id| seqs.get(&id).is_none_or(|s| s.req.tx.is_closed()));
        for id in gone {
            self.unqueue();
            self.seqs.remove(&id);
        }
        for id in self.sched.running_ids() {
            if self.seqs.get(&id).is_none_or(|s| s.req.tx.is_closed()) {
                self.leave(id, None);
            }
        }
    }

    /// A waiting request left the queue (admitted, refused or abandoned).
    fn unqueue(&self) {
        self.load.queued.fetch_sub(1, Ordering::Relaxed);
        self.metrics.waiting.get_or_create(&self.label).dec();
    }

    /// What the scheduler did outside the pass: admissions, preemptions, refusals.
    fn events(&mut self, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::Admitted { id, .. } => {
                    self.unqueue();
                    self.load
                        .last_used
                        .store(crate::now_secs(), Ordering::Relaxed);
                    let Some(s) = self.seqs.get_mut(&id) else {
                        continue;
                    };
                    if s.admitted_at.is_none() {
                        s.admitted_at = Some(Instant::now());
                        self.metrics
                            .queue
                            .get_or_create(&self.label)
                            .observe(s.req.arrived.elapsed().as_secs_f64());
                    }
                }
                Event::Preempted { id } => {
                    tracing::debug!(model = %self.lm.id, seq = id, "preempted for KV room");
                    self.metrics.preemptions.get_or_create(&self.label).inc();
                    self.load.queued.fetch_add(1, Ordering::Relaxed);
                    self.metrics.waiting.get_or_create(&self.label).inc();
                }
                Event::TooLong { id, tokens } => {
                    self.unqueue();
                    if let Some(s) = self.seqs.remove(&id) {
                        let _ = s.req.tx.send(GenEvent::Error(format!(
                            "{tokens} tokens do not fit the {}-token context of model '{}'",
                            self.lm.model.max_len, self.lm.id
                        )));
                    }
                }
            }
        }
    }

    /// One forward pass over the scheduled sequences, then sampling for those that reached
    /// the end of their tokens.
    fn step(&mut self) -> Result<()> {
        let plan = self.sched.schedule();
        self.events(plan.events);
        if plan.runs.is_empty() {
            return Ok(());
        }
        self.metrics
            .batch
            .get_or_create(&self.label)
            .observe(plan.runs.len() as f64);
        let logits = {
            let sched = &self.sched;
            let inputs: Vec<SeqInput<'_>> = plan
                .runs
                .iter()
                .map(|r| SeqInput {
                    tokens: &sched.tokens(r.id).expect("scheduled")[r.range.clone()],
                    pos: r.range.start,
                    blocks: sched.blocks(r.id).expect("running"),
                })
                .collect();
            self.lm.model.forward_batch(&inputs, &mut self.store)?
        };
        self.sched.computed(&plan.runs);
        let rows = logits
            .to_dtype(candle_core::DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec2::<f32>()?;
        // Sequences with their tokens all computed get a token; the rest read more next pass.
        let ready: Vec<(SeqId, Vec<f32>)> = plan
            .runs
            .iter()
            .zip(rows)
            .filter(|(r, _)| r.sample)
            .map(|(r, row)| (r.id, row))
            .collect();
        let tokens = self.draw(ready);
        for (id, tok) in tokens {
            match tok.and_then(|tok| self.take(id, tok)) {
                Ok(Outcome::Continue) => {}
                Ok(Outcome::Leave(ev)) => self.leave(id, ev),
                Err(e) => self.leave(id, Some(GenEvent::Error(e.to_string()))),
            }
        }
        Ok(())
    }

    /// Each sequence's next token from its logits. A temperature's softmax and a top-p nucleus
    /// take up to a millisecond of a 49k vocabulary, so a batch's draws are spread over the
    /// kernel pool; each sequence keeps its own sampler (and seed), so where it is drawn
    /// changes nothing.
    fn draw(&mut self, ready: Vec<(SeqId, Vec<f32>)>) -> Vec<(SeqId, Result<u32>)> {
        if ready.len() < 2 {
            return ready
                .into_iter()
                .filter_map(|(id, row)| Some((id, self.seqs.get_mut(&id)?.sampler.sample(row))))
                .collect();
        }
        let mut rows: HashMap<SeqId, Vec<f32>> = ready.into_iter().collect();
        let cells: Vec<Mutex<Draw<'_>>> = self
            .seqs
            .iter_mut()
            .filter_map(|(&id, s)| {
                Some(Mutex::new(Draw {
                    id,
                    sampler: &mut s.sampler,
                    logits: rows.remove(&id)?,
                    token: None,
                }))
            })
            .collect();
        kernels::parallel(cells.len(), |t| {
            let mut d = cells[t].lock().unwrap_or_else(|e| e.into_inner());
            let logits = std::mem::take(&mut d.logits);
            d.token = Some(d.sampler.sample(logits));
        });
        let mut out: Vec<(SeqId, Result<u32>)> = cells
            .into_iter()
            .map(|c| {
                let d = c.into_inner().unwrap_or_else(|e| e.into_inner());
                (d.id, d.token.expect("every sequence is drawn"))
            })
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }
    /// Sequence `id` takes its next token `tok`: sends the text it completes, or leaves.
    fn take(&mut self, id: SeqId, tok: u32) -> Result<Outcome> {
        let (lm, metrics, label) = (&self.lm, &self.metrics, &self.label);
        let (cached, _) = self.sched.cache_counts(id);
        let Some(s) = self.seqs.get_mut(&id) else {
            return Ok(Outcome::Leave(None));
        };
        s.generated += 1;
        let now = Instant::now();
        match s.first_at {
            None => {
                s.first_at = Some(now);
                metrics
                    .ttft
                    .get_or_create(label)
                    .observe(now.duration_since(s.req.arrived).as_secs_f64());
                let admitted = s.admitted_at.unwrap_or(now);
                metrics
                    .prefill
                    .get_or_create(label)
                    .observe(now.duration_since(admitted).as_secs_f64());
                metrics
                    .prompt_tokens
                    .get_or_create(label)
                    .inc_by(s.req.prompt.len() as u64);
                metrics
                    .prefix_queries
                    .get_or_create(label)
                    .inc_by(s.req.prompt.len() as u64);
                metrics
                    .prefix_hits
                    .get_or_create(label)
                    .inc_by(cached as u64);
                let _ = s.req.tx.send(GenEvent::Prompt {
                    cached_tokens: cached,
                });
            }
            Some(_) => metrics
                .itl
                .get_or_create(label)
                .observe(now.duration_since(s.last_at).as_secs_f64()),
        }
        s.last_at = now;
        metrics.generation_tokens.get_or_create(label).inc();
        if !s.req.ignore_eos && lm.tokenizer.stop_ids.contains(&tok) {
            return Ok(Outcome::Leave(Some(self.done(
                id,
                FinishReason::Stop,
                None,
            ))));
        }
        let tokens = s.req.prompt.len() + s.generated;
        let piece = s.decoder.push(&lm.tokenizer, tok)?;
        let (text, hit) = s.stops.push(&piece);
        if !text.is_empty() && s.req.tx.send(GenEvent::Text(text, s.generated)).is_err() {
            return Ok(Outcome::Leave(None));
        }
        if hit.is_some() {
            return Ok(Outcome::Leave(Some(self.done(id, FinishReason::Stop, hit))));
        }
        if s.generated >= s.req.max_tokens || tokens > lm.model.max_len {
            return Ok(Outcome::Leave(Some(self.done(
                id,
                FinishReason::Length,
                None,
            ))));
        }
        self.sched.push_token(id, tok);
        Ok(Outcome::Continue)
    }

    /// The closing event of a finished sequence, after the text held back for stop strings
    /// and the per-request metrics.
    fn done(&mut self, id: SeqId, finish: FinishReason, stop: Option<String>) -> GenEvent {
        let (metrics, label) = (&self.metrics, &self.label);
        let (cached, created) = self.sched.cache_counts(id);
        let s = self.seqs.get_mut(&id).expect("a sequence that is done");
        // Text held back as a possible stop string was not one after all.
        let rest = s.stops.flush();
        if stop.is_none() && !rest.is_empty() {
            let _ = s.req.tx.send(GenEvent::Text(rest, s.generated));
        }
        let reason = match finish {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        };
        metrics
            .success
            .get_or_create(&FinishLabel {
                model_name: self.lm.id.clone(),
                finished_reason: reason.into(),
            })
            .inc();
        metrics
            .e2e
            .get_or_create(label)
            .observe(s.req.arrived.elapsed().as_secs_f64());
        if let Some(f) = s.first_at {
            metrics
                .decode
                .get_or_create(label)
                .observe(s.last_at.duration_since(f).as_secs_f64());
        }
        metrics
            .req_prompt_tokens
            .get_or_create(label)
            .observe(s.req.prompt.len() as f64);
        metrics
            .req_gen_tokens
            .get_or_create(label)
            .observe(s.generated as f64);
        GenEvent::Done {
            finish,
            stop,
            prompt_tokens: s.req.prompt.len(),
            completion_tokens: s.generated,
            cached_tokens: cached,
            cache_creation_tokens: created,
        }
    }

    /// A sequence leaves the batch: its blocks go back to the pool (the full ones stay cached)
    /// and the counters are updated before its last event goes out, so a client that has its
    /// answer finds /status already counting it.
    fn leave(&mut self, id: SeqId, last: Option<GenEvent>) {
        self.sched.remove(id);
        let seq = self.seqs.remove(&id);
        self.load
            .last_used
            .store(crate::now_secs(), Ordering::Relaxed);
        self.publish();
        if let (Some(seq), Some(ev)) = (seq, last) {
            let _ = seq.req.tx.send(ev);
        }
    }

    /// Batch size and KV use for /status and /metrics.
    fn publish(&self) {
        let u = self.sched.usage();
        let limits = self.sched.limits();
        self.load
            .inflight
            .store(u.running as u32, Ordering::Relaxed);
        self.load
            .kv_used
            .store(u.held_blocks * BLOCK, Ordering::Relaxed);
        self.load
            .prefix_cached
            .store(u.cached_blocks * BLOCK, Ordering::Relaxed);
        self.metrics
            .running
            .get_or_create(&self.label)
            .set(u.running as i64);
        self.metrics
            .kv_usage
            .get_or_create(&self.label)
            .set(u.held_blocks as f64 / limits.running_blocks.max(1) as f64);
    }
}

/// How long a client should wait before retrying when the queue is full.
pub fn retry_after(queued: usize) -> Duration {
    Duration::from_secs((queued as u64).clamp(1, 30))
}
