//! The inference engine: a loaded model and the loop that serves it.
//!
//! One OS thread per loaded model drains a bounded channel of [`GenRequest`]s, each carrying its
//! own response sender, and runs them as one continuous batch: every step is one forward pass
//! over the next token of every decoding sequence plus a chunk of the prompt of sequences still
//! being read ([`PREFILL_CHUNK`] tokens; while others decode, one chunk per step, so a long
//! prompt delays each stream by one chunk's time rather than the whole prompt's). Sequences join
//! at any step and leave as soon as they finish or their client disconnects.
//!
//! Each sequence owns a KV cache that grows with it. All caches of a model share a budget
//! ([`Batching::kv_tokens`]); a newcomer waits until its prompt fits, and when a running
//! sequence must grow past the budget the youngest other sequence is preempted: its cache is
//! freed and it is read again from its tokens when room returns (as vLLM does), so nothing
//! running is dropped.
//!
//! Prompts that start alike share the work: a newcomer copies the keys and values of the longest
//! prefix it has in common with a running sequence or a recently finished one (kept while the
//! budget has room), in whole prompt chunks, and reads only the rest. Because the copied positions
//! were computed as prompt chunks from position 0, exactly as the newcomer would compute them, the
//! answer is the same as without the copy.

pub mod attention;
pub mod elementwise;
pub mod kernels;
pub mod linear;
pub mod model;
pub mod sampling;
pub mod stop;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cortex_core::openai::FinishReason;
use tokio::sync::mpsc;

use crate::error::Result;
use crate::metrics::{FinishLabel, Metrics};
use crate::template::ChatTemplate;
use crate::tokenizer::{StreamDecoder, TextTokenizer};
use model::{KvCache, Model, SeqInput};
use sampling::{Sampler, SamplingParams};
use stop::StopMatcher;

/// Prompt tokens of one sequence per forward pass. The split of a prompt into chunks depends only
/// on its length, never on the batch, so a sequence computes the same numbers alone or batched.
pub const PREFILL_CHUNK: usize = 128;

/// KV caches are allocated in multiples of this many tokens.
const KV_ROUND: usize = 64;

/// Finished sequences whose prompt caches are kept for prefix reuse (while the budget has room).
const KEEP_PREFIXES: usize = 4;

/// How a model's sequences share its engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Tokens of KV cache all sequences together may hold.
    pub kv_tokens: usize,
    /// Most sequences in one step.
    pub max_batch: usize,
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
    /// A piece of generated text (never empty) and the tokens generated so far.
    Text(String, usize),
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
    /// KV cache tokens allocated to running sequences.
    pub kv_used: std::sync::atomic::AtomicUsize,
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
        lm,
        load,
        metrics,
        batching,
        waiting: VecDeque::new(),
        running: Vec::new(),
        admitted: 0,
        prefixes: VecDeque::new(),
    };
    engine.run(rx, &stop);
}

/// One request on its way through the batch.
struct Seq {
    req: GenRequest,
    /// The prompt, then every token sampled (the last one not yet in the cache).
    tokens: Vec<u32>,
    /// Held while running; freed while waiting.
    cache: Option<KvCache>,
    /// Cache positions computed as prompt chunks from position 0: the part others may copy.
    exact: usize,
    /// Admission order: preemption takes the youngest.
    order: u64,
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
            tokens: req.prompt.clone(),
            cache: None,
            exact: 0,
            order: 0,
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

    fn fed(&self) -> usize {
        self.cache.as_ref().map_or(0, KvCache::len)
    }

    fn capacity(&self) -> usize {
        self.cache.as_ref().map_or(0, KvCache::capacity)
    }

    /// Tokens to run next: one when decoding, else the next chunk of the prompt.
    fn chunk(&self) -> std::ops::Range<usize> {
        let fed = self.fed();
        fed..self.tokens.len().min(fed + PREFILL_CHUNK)
    }

    fn decoding(&self) -> bool {
        self.tokens.len() - self.fed() == 1 && self.generated > 0
    }
}

struct Engine {
    lm: Arc<LoadedModel>,
    label: crate::metrics::ModelLabel,
    load: Arc<Load>,
    metrics: Arc<Metrics>,
    batching: Batching,
    /// Not yet running (new, or preempted), oldest first.
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    admitted: u64,
    /// Prompt caches of finished sequences, most recent first, dropped first when room is short.
    prefixes: VecDeque<Prefix>,
}

/// A finished sequence's prompt and the cache that holds it.
struct Prefix {
    tokens: Vec<u32>,
    cache: KvCache,
}

/// How many leading positions `a` and `b` share, in whole prompt chunks.
fn shared_chunks(a: &[u32], b: &[u32]) -> usize {
    let n = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    n / PREFILL_CHUNK * PREFILL_CHUNK
}

/// What a step did to a sequence.
/// One sequence's draw in [`Engine::draw`].
struct Draw<'a> {
    index: usize,
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
    fn run(&mut self, mut rx: mpsc::Receiver<GenRequest>, stop: &AtomicBool) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.blocking_recv() {
                    Some(req) => self.waiting.push_back(Seq::new(req)),
                    None => break,
                }
            }
            while let Ok(req) = rx.try_recv() {
                self.waiting.push_back(Seq::new(req));
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            self.drop_abandoned();
            self.admit();
            if let Err(e) = self.step() {
                // A failed pass fails every sequence in it; the model stays up for the next.
                tracing::warn!(model = %self.lm.id, error = %e, "forward pass failed");
                for seq in std::mem::take(&mut self.running) {
                    self.leave(seq, Some(GenEvent::Error(e.to_string())));
                }
            }
            self.publish();
        }
        // Whatever is still here when the model goes away gets an answer rather than a hang.
        rx.close();
        while let Ok(req) = rx.try_recv() {
            self.waiting.push_back(Seq::new(req));
        }
        let gone = GenEvent::Error(format!("model '{}' was unloaded", self.lm.id));
        for seq in std::mem::take(&mut self.running) {
            self.leave(seq, Some(gone.clone()));
        }
        while let Some(seq) = self.waiting.pop_front() {
            self.unqueue();
            let _ = seq.req.tx.send(gone.clone());
        }
        self.publish();
    }

    /// Sequences whose clients went away leave before the next pass.
    fn drop_abandoned(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|s| !s.req.tx.is_closed());
        for _ in self.waiting.len()..before {
            self.unqueue();
        }
        let (gone, kept) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| s.req.tx.is_closed());
        self.running = kept;
        for seq in gone {
            self.leave(seq, None);
        }
    }

    /// Tokens of KV cache allocated: running sequences and kept prefixes.
    fn kv_used(&self) -> usize {
        self.running.iter().map(Seq::capacity).sum::<usize>()
            + self
                .prefixes
                .iter()
                .map(|p| p.cache.capacity())
                .sum::<usize>()
    }

    /// Budget left after dropping kept prefixes, oldest first, until `tokens` fit (or none are
    /// left).
    fn room_for(&mut self, tokens: usize) -> usize {
        loop {
            let free = self.batching.kv_tokens.saturating_sub(self.kv_used());
            if free >= tokens || self.prefixes.pop_back().is_none() {
                return free;
            }
        }
    }

    /// The longest chunk-aligned prefix of `tokens` (leaving at least one token to read) that a
    /// running sequence or a kept prefix holds: `(positions, source)`.
    fn best_prefix(&self, tokens: &[u32]) -> Option<(usize, &KvCache)> {
        let limit = tokens.len() - 1;
        let running = self
            .running
            .iter()
            .filter_map(|s| Some((&s.tokens[..s.exact], s.cache.as_ref()?)));
        let kept = self
            .prefixes
            .iter()
            .map(|p| (p.tokens.as_slice(), &p.cache));
        running
            .chain(kept)
            .map(|(t, c)| (shared_chunks(&t[..t.len().min(limit)], tokens), c))
            .filter(|(n, _)| *n > 0)
            .max_by_key(|(n, _)| *n)
    }

    /// Starts waiting sequences, oldest first, while the batch and the KV budget have room.
    fn admit(&mut self) {
        let max = self.lm.model.max_len;
        while self.running.len() < self.batching.max_batch {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let need = front.tokens.len() + 1;
            if need > max {
                let seq = self.waiting.pop_front().expect("front");
                self.unqueue();
                let _ = seq.req.tx.send(GenEvent::Error(format!(
                    "{} tokens do not fit the {max}-token context of model '{}'",
                    need, self.lm.id
                )));
                continue;
            }
            let cap = need.next_multiple_of(KV_ROUND).min(max);
            if self.room_for(cap) < cap {
                break;
            }
            let mut cache = match self.lm.model.new_cache_with(cap) {
                Ok(c) => c,
                Err(e) if self.running.is_empty() => {
                    let seq = self.waiting.pop_front().expect("front");
                    self.unqueue();
                    let _ = seq.req.tx.send(GenEvent::Error(format!(
                        "allocating a KV cache of {cap} tokens failed: {e}"
                    )));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(model = %self.lm.id, error = %e, "allocating a KV cache failed; waiting for room");
                    break;
                }
            };
            let front = self.waiting.front().expect("front");
            let reused = match self.best_prefix(&front.tokens) {
                Some((n, src)) => match cache.copy_prefix(src, n) {
                    Ok(()) => n,
                    Err(e) => {
                        tracing::warn!(model = %self.lm.id, error = %e, "copying a shared prefix failed");
                        0
                    }
                },
                None => 0,
            };
            if front.admitted_at.is_none() {
                self.metrics
                    .prefix_queries
                    .get_or_create(&self.label)
                    .inc_by(front.tokens.len() as u64);
                self.metrics
                    .prefix_hits
                    .get_or_create(&self.label)
                    .inc_by(reused as u64);
            }
            let mut seq = self.waiting.pop_front().expect("front");
            self.unqueue();
            seq.cache = Some(cache);
            seq.exact = reused;
            self.admitted += 1;
            seq.order = self.admitted;
            if seq.admitted_at.is_none() {
                seq.admitted_at = Some(Instant::now());
                self.metrics
                    .queue
                    .get_or_create(&self.label)
                    .observe(seq.req.arrived.elapsed().as_secs_f64());
            }
            self.load
                .last_used
                .store(crate::now_secs(), Ordering::Relaxed);
            self.running.push(seq);
        }
    }

    /// A waiting request left the queue (admitted, refused or abandoned).
    fn unqueue(&self) {
        self.load.queued.fetch_sub(1, Ordering::Relaxed);
        self.metrics.waiting.get_or_create(&self.label).dec();
    }

    /// Picks this step's sequences: every decoding one, and prompt chunks (while anything
    /// decodes, one chunk, so streams keep flowing).
    fn pick(&self) -> Vec<usize> {
        let mut picked: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].decoding())
            .collect();
        let decoding = !picked.is_empty();
        let mut prompt_tokens = 0;
        for (i, s) in self.running.iter().enumerate() {
            if s.decoding() {
                continue;
            }
            let n = s.chunk().len();
            if decoding && prompt_tokens > 0 && prompt_tokens + n > PREFILL_CHUNK {
                break;
            }
            prompt_tokens += n;
            picked.push(i);
        }
        picked.sort_unstable();
        picked
    }

    /// Grows the caches of the picked sequences for this step, preempting the youngest others
    /// when the budget is short. Returns the picked sequences still running.
    fn make_room(&mut self, mut picked: Vec<usize>) -> Result<Vec<usize>> {
        let max = self.lm.model.max_len;
        let mut i = 0;
        while i < picked.len() {
            let s = &self.running[picked[i]];
            let need = s.chunk().end;
            let cap = s.capacity();
            if need <= cap {
                i += 1;
                continue;
            }
            let want = need.max(cap * 2).next_multiple_of(KV_ROUND).min(max);
            let free = self.room_for(want - cap);
            let grow_to = if want - cap <= free {
                want
            } else if need.next_multiple_of(KV_ROUND).min(max) - cap <= free {
                need.next_multiple_of(KV_ROUND).min(max)
            } else {
                // The youngest sequence gives way, which may be this one.
                let me = picked[i];
                let victim = (0..self.running.len())
                    .max_by_key(|&j| self.running[j].order)
                    .expect("running");
                self.preempt(victim);
                picked.retain(|&j| j != victim);
                picked
                    .iter_mut()
                    .filter(|j| **j > victim)
                    .for_each(|j| *j -= 1);
                if victim != me {
                    // Look at this one again with the room freed.
                    let me = me - usize::from(me > victim);
                    i = picked.iter().position(|&j| j == me).expect("still picked");
                }
                continue;
            };
            let model = &self.lm.model;
            let s = &mut self.running[picked[i]];
            s.cache.as_mut().expect("running").grow(model, grow_to)?;
            i += 1;
        }
        Ok(picked)
    }

    /// Frees a running sequence's cache and sends it back to the head of the queue; it is read
    /// again from its tokens when room returns.
    fn preempt(&mut self, idx: usize) {
        let mut seq = self.running.remove(idx);
        tracing::debug!(model = %self.lm.id, tokens = seq.tokens.len(), "preempted for KV room");
        seq.cache = None;
        self.metrics.preemptions.get_or_create(&self.label).inc();
        self.load.queued.fetch_add(1, Ordering::Relaxed);
        self.metrics.waiting.get_or_create(&self.label).inc();
        self.waiting.push_front(seq);
    }

    /// One forward pass over the picked sequences, then sampling for those that reached the
    /// end of their tokens.
    fn step(&mut self) -> Result<()> {
        let picked = self.pick();
        let picked = self.make_room(picked)?;
        if picked.is_empty() {
            return Ok(());
        }
        self.metrics
            .batch
            .get_or_create(&self.label)
            .observe(picked.len() as f64);
        // Prompt chunks that continue a cache computed chunk by chunk from position 0 keep it
        // copyable (see `best_prefix`); a decode step ends that.
        let extends: Vec<bool> = picked
            .iter()
            .map(|&i| {
                let s = &self.running[i];
                !s.decoding() && s.exact == s.fed()
            })
            .collect();
        let logits = {
            let mut inputs = Vec::with_capacity(picked.len());
            let mut rest = self.running.as_mut_slice();
            let mut base = 0;
            for &i in &picked {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - base);
                let (s, tail) = tail.split_first_mut().expect("picked index");
                base = i + 1;
                rest = tail;
                let range = s.chunk();
                inputs.push(SeqInput {
                    tokens: &s.tokens[range],
                    cache: s.cache.as_mut().expect("running"),
                });
            }
            self.lm.model.forward_batch(&mut inputs)?
        };
        let rows = logits
            .to_dtype(candle_core::DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec2::<f32>()?;
        for (&i, extends) in picked.iter().zip(extends) {
            if extends {
                let s = &mut self.running[i];
                s.exact = s.fed();
            }
        }
        // Sequences with their whole prompt read get a token; the rest read more next step.
        let ready: Vec<(usize, Vec<f32>)> = picked
            .iter()
            .zip(rows)
            .filter(|(i, _)| {
                let s = &self.running[**i];
                s.fed() >= s.tokens.len()
            })
            .map(|(&i, row)| (i, row))
            .collect();
        let tokens = self.draw(ready);
        let mut leaving = Vec::new();
        for (i, tok) in tokens {
            match tok.and_then(|tok| self.take(i, tok)) {
                Ok(Outcome::Continue) => {}
                Ok(Outcome::Leave(ev)) => leaving.push((i, ev)),
                Err(e) => leaving.push((i, Some(GenEvent::Error(e.to_string())))),
            }
        }
        for (i, ev) in leaving.into_iter().rev() {
            let seq = self.running.remove(i);
            self.leave(seq, ev);
        }
        Ok(())
    }

    /// Each sequence's next token from its logits, `(index, logits)` in, `(index, token)` out
    /// in the same order. A temperature's softmax and a top-p nucleus take up to a millisecond
    /// of a 49k vocabulary, so a batch's draws are spread over the kernel pool; each sequence
    /// keeps its own sampler (and seed), so where it is drawn changes nothing.
    fn draw(&mut self, ready: Vec<(usize, Vec<f32>)>) -> Vec<(usize, Result<u32>)> {
        if ready.len() < 2 {
            return ready
                .into_iter()
                .map(|(i, row)| (i, self.running[i].sampler.sample(row)))
                .collect();
        }
        let mut rows: Vec<Option<Vec<f32>>> = (0..self.running.len()).map(|_| None).collect();
        for (i, row) in ready {
            rows[i] = Some(row);
        }
        let cells: Vec<Mutex<Draw<'_>>> = self
            .running
            .iter_mut()
            .zip(rows)
            .enumerate()
            .filter_map(|(index, (s, logits))| {
                Some(Mutex::new(Draw {
                    index,
                    sampler: &mut s.sampler,
                    logits: logits?,
                    token: None,
                }))
            })
            .collect();
        kernels::parallel(cells.len(), |t| {
            let mut d = cells[t].lock().unwrap_or_else(|e| e.into_inner());
            let logits = std::mem::take(&mut d.logits);
            d.token = Some(d.sampler.sample(logits));
        });
        cells
            .into_iter()
            .map(|c| {
                let d = c.into_inner().unwrap_or_else(|e| e.into_inner());
                (d.index, d.token.expect("every sequence is drawn"))
            })
            .collect()
    }

    /// Sequence `i` takes its next token `tok`: sends the text it completes, or leaves.
    fn take(&mut self, i: usize, tok: u32) -> Result<Outcome> {
        let (lm, metrics, label) = (&self.lm, &self.metrics, &self.label);
        let s = &mut self.running[i];
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
            }
            Some(_) => metrics
                .itl
                .get_or_create(label)
                .observe(now.duration_since(s.last_at).as_secs_f64()),
        }
        s.last_at = now;
        metrics.generation_tokens.get_or_create(label).inc();
        if !s.req.ignore_eos && lm.tokenizer.stop_ids.contains(&tok) {
            return Ok(Outcome::Leave(Some(self.done(i, FinishReason::Stop, None))));
        }
        s.tokens.push(tok);
        let piece = s.decoder.push(&lm.tokenizer, tok)?;
        let (text, hit) = s.stops.push(&piece);
        if !text.is_empty() && s.req.tx.send(GenEvent::Text(text, s.generated)).is_err() {
            return Ok(Outcome::Leave(None));
        }
        if hit.is_some() {
            return Ok(Outcome::Leave(Some(self.done(i, FinishReason::Stop, hit))));
        }
        if s.generated >= s.req.max_tokens || s.tokens.len() > lm.model.max_len {
            return Ok(Outcome::Leave(Some(self.done(
                i,
                FinishReason::Length,
                None,
            ))));
        }
        Ok(Outcome::Continue)
    }

    /// The closing event of a finished sequence, after the text held back for stop strings
    /// and the per-request metrics.
    fn done(&mut self, i: usize, finish: FinishReason, stop: Option<String>) -> GenEvent {
        let (metrics, label) = (&self.metrics, &self.label);
        let s = &mut self.running[i];
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
        }
    }

    /// A sequence leaves the batch: its cache is freed and the counters updated before its
    /// last event goes out, so a client that has its answer finds /status already counting it.
    fn leave(&mut self, mut seq: Seq, last: Option<GenEvent>) {
        if let Some(cache) = seq.cache.take().filter(|_| seq.exact >= PREFILL_CHUNK) {
            seq.tokens.truncate(seq.exact);
            self.prefixes.push_front(Prefix {
                tokens: std::mem::take(&mut seq.tokens),
                cache,
            });
            self.prefixes.truncate(KEEP_PREFIXES);
        }
        self.load
            .last_used
            .store(crate::now_secs(), Ordering::Relaxed);
        self.publish();
        if let Some(ev) = last {
            let _ = seq.req.tx.send(ev);
        }
    }

    /// Batch size and KV use for /status and /metrics.
    fn publish(&self) {
        let used = self.kv_used();
        self.load
            .inflight
            .store(self.running.len() as u32, Ordering::Relaxed);
        self.load.kv_used.store(used, Ordering::Relaxed);
        self.metrics
            .running
            .get_or_create(&self.label)
            .set(self.running.len() as i64);
        self.metrics
            .kv_usage
            .get_or_create(&self.label)
            .set(used as f64 / self.batching.kv_tokens.max(1) as f64);
    }
}

/// How long a client should wait before retrying when the queue is full.
pub fn retry_after(queued: usize) -> Duration {
    Duration::from_secs((queued as u64).clamp(1, 30))
}
