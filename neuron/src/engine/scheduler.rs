//! Which sequences run in the next forward pass, and with which blocks: admission, prefix
//! reuse, the KV budget and preemption. No model and no tensors (vLLM v1's split): the engine
//! asks [`Scheduler::schedule`] for a [`Plan`], runs it, and reports back with
//! [`Scheduler::computed`] and [`Scheduler::push_token`].
//!
//! - Admission, oldest first, while the batch has a place and the running sequences' blocks
//!   fit their budget. A newcomer takes the cached blocks that hold the longest prefix of its
//!   prompt (leaving at least its last token to compute, which gives the logits) and computes
//!   only the rest.
//! - Every pass runs each decoding sequence's next token and prompt chunks of
//!   [`PREFILL_CHUNK`] tokens; while anything decodes, about one chunk in all, so a long prompt
//!   delays each stream by one chunk's time rather than the whole prompt's.
//! - Requests running at the same time that share a prefix compute it once: a sequence whose
//!   next block an older sequence is computing waits a pass and then takes that block.
//! - A running sequence that must grow past the budget preempts the youngest (possibly
//!   itself): its blocks are released, the full ones stay cached, and it is admitted again
//!   later, finding most of its own blocks still there.
//! - Full blocks are registered as soon as they are computed, prompt and generated tokens
//!   alike, so the next turn of a conversation finds them.
//!
//! A token's keys and values depend only on the tokens before it, never on how they were split
//! into passes or batched (our kernels compute each row alone, see `attention.rs`), so a block
//! computed by any sequence is exactly what another would compute.

use std::collections::VecDeque;
use std::ops::Range;

use super::kv_cache::{BLOCK, BlockId, BlockPool};

/// Prompt tokens of one sequence per forward pass.
pub const PREFILL_CHUNK: usize = 128;

/// A sequence, as the engine and the scheduler both name it.
pub type SeqId = u64;

/// What the scheduler is bounded by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Blocks the running sequences may hold together.
    pub running_blocks: usize,
    /// Blocks in all: the running budget plus room for cached prefixes.
    pub total_blocks: usize,
    /// Most sequences in one pass.
    pub max_batch: usize,
    /// Most positions of one sequence (the served context).
    pub max_len: usize,
}

/// One sequence's state.
#[derive(Debug)]
struct Seq {
    id: SeqId,
    /// The prompt, then every token sampled (the last one not yet computed).
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Block `i` holds positions `i * BLOCK..`; empty while waiting.
    blocks: Vec<BlockId>,
    /// Positions whose keys and values are in the blocks.
    computed: usize,
    /// Leading blocks registered in the pool (or taken from it).
    registered: usize,
    /// Admission order: preemption takes the youngest.
    order: u64,
    /// Prompt tokens read from the cache, counted at the first admission.
    cached: usize,
    /// Prompt tokens in blocks this sequence registered for others.
    created: usize,
    admitted_once: bool,
    /// Once preempted, what it reads again is its own work, not the cache's.
    preempted: bool,
}

impl Seq {
    fn decoding(&self) -> bool {
        self.tokens.len() > self.prompt_len && self.computed + 1 == self.tokens.len()
    }

    /// Tokens to run next: one when decoding, else the next chunk of what is not computed.
    fn chunk(&self) -> Range<usize> {
        self.computed..self.tokens.len().min(self.computed + PREFILL_CHUNK)
    }
}

/// One sequence's part of a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub id: SeqId,
    /// Positions to compute; the sequence's tokens there are its input.
    pub range: Range<usize>,
    /// Whether this pass ends with a token to sample (the range reaches the last token).
    pub sample: bool,
}

/// What happened to a sequence outside the pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Admitted to the batch, `cached` tokens taken from the prefix cache; `again` after a
    /// preemption.
    Admitted {
        id: SeqId,
        cached: usize,
        again: bool,
    },
    /// Sent back to wait, its blocks released.
    Preempted { id: SeqId },
    /// Can never run: prompt plus one generated token does not fit the context.
    TooLong { id: SeqId, tokens: usize },
}

/// The next pass.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub runs: Vec<Run>,
    pub events: Vec<Event>,
}

/// Counters for `/status` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub running: usize,
    pub waiting: usize,
    /// Blocks running sequences hold.
    pub held_blocks: usize,
    /// Cached blocks no running sequence holds.
    pub cached_blocks: usize,
}

pub struct Scheduler {
    limits: Limits,
    pool: BlockPool,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    admitted: u64,
}

impl Scheduler {
    pub fn new(limits: Limits) -> Self {
        Scheduler {
            pool: BlockPool::new(limits.total_blocks.max(limits.running_blocks)),
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
            admitted: 0,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A new request waits for admission.
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>) {
        self.waiting.push_back(Seq {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            blocks: Vec::new(),
            computed: 0,
            registered: 0,
            order: 0,
            cached: 0,
            created: 0,
            admitted_once: false,
            preempted: false,
        });
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn usage(&self) -> Usage {
        Usage {
            running: self.running.len(),
            waiting: self.waiting.len(),
            held_blocks: self.pool.held(),
            cached_blocks: self.pool.cached(),
        }
    }

    /// A sequence's tokens (prompt, then those sampled).
    pub fn tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.find(id).map(|s| s.tokens.as_slice())
    }

    /// A running sequence's blocks.
    pub fn blocks(&self, id: SeqId) -> Option<&[BlockId]> {
        self.running
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.blocks.as_slice())
    }

    /// Positions computed of a running sequence.
    pub fn computed_len(&self, id: SeqId) -> usize {
        self.running
            .iter()
            .find(|s| s.id == id)
            .map_or(0, |s| s.computed)
    }

    /// Prompt tokens read from the cache and stored in it for others, so far.
    pub fn cache_counts(&self, id: SeqId) -> (usize, usize) {
        self.find(id).map_or((0, 0), |s| (s.cached, s.created))
    }

    fn find(&self, id: SeqId) -> Option<&Seq> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .find(|s| s.id == id)
    }

    /// Removes a sequence (finished, failed or abandoned), releasing its blocks last-first
    /// so its tail is evicted before its head.
    pub fn remove(&mut self, id: SeqId) {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let s = self.running.remove(i);
            self.release(&s.blocks);
        } else if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i);
        }
    }

    /// Removes every waiting sequence `gone` says is gone; returns them.
    pub fn remove_waiting_if(&mut self, mut gone: impl FnMut(SeqId) -> bool) -> Vec<SeqId> {
        let mut out = Vec::new();
        self.waiting.retain(|s| {
            let g = gone(s.id);
            if g {
                out.push(s.id);
            }
            !g
        });
        out
    }

    /// Sequences waiting and running, for whoever must answer them all (an unload).
    pub fn all(&self) -> Vec<SeqId> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .map(|s| s.id)
            .collect()
    }

    pub fn running_ids(&self) -> Vec<SeqId> {
        self.running.iter().map(|s| s.id).collect()
    }

    fn release(&mut self, blocks: &[BlockId]) {
        for &b in blocks.iter().rev() {
            self.pool.release(b);
        }
    }

    /// Drops every cached prefix no sequence holds.
    pub fn clear_cache(&mut self) {
        self.pool.clear_cached();
    }

    /// Decides the next pass.
    pub fn schedule(&mut self) -> Plan {
        let mut plan = Plan::default();
        self.admit(&mut plan);
        self.extend_from_cache();
        let picked = self.pick();
        let picked = self.make_room(picked, &mut plan);
        plan.runs = picked
            .into_iter()
            .map(|i| {
                let s = &self.running[i];
                let range = s.chunk();
                Run {
                    id: s.id,
                    sample: range.end == s.tokens.len(),
                    range,
                }
            })
            .collect();
        plan
    }

    /// Whole blocks of `s`'s prompt (leaving its last token to compute) worth looking up.
    fn reusable_blocks(s: &Seq) -> usize {
        (s.tokens.len() - 1) / BLOCK
    }

    fn admit(&mut self, plan: &mut Plan) {
        while self.running.len() < self.limits.max_batch {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let need = front.tokens.len() + 1;
            if need > self.limits.max_len {
                let s = self.waiting.pop_front().expect("front");
                plan.events.push(Event::TooLong {
                    id: s.id,
                    tokens: need,
                });
                continue;
            }
            let hit = self
                .pool
                .lookup(&front.tokens, Self::reusable_blocks(front));
            let fresh = front.tokens.len().div_ceil(BLOCK) - hit.blocks.len();
            // Cached blocks nobody holds count against the budget once taken.
            let taken = hit
                .blocks
                .iter()
                .filter(|&&b| !self.pool.is_held(b))
                .count();
            if self.pool.held() + taken + fresh > self.limits.running_blocks
                && !self.running.is_empty()
            {
                break;
            }
            let mut s = self.waiting.pop_front().expect("front");
            for &b in &hit.blocks {
                self.pool.acquire(b);
            }
            s.blocks = hit.blocks;
            s.computed = s.blocks.len() * BLOCK;
            s.registered = s.blocks.len();
            for _ in 0..fresh {
                match self.pool.allocate() {
                    Some(b) => s.blocks.push(b),
                    None => break,
                }
            }
            if s.blocks.len() * BLOCK < s.tokens.len() {
                // Only when the budget is larger than the pool can allow: wait for room.
                self.release(&s.blocks);
                s.blocks.clear();
                s.computed = 0;
                s.registered = 0;
                self.waiting.push_front(s);
                break;
            }
            self.admitted += 1;
            s.order = self.admitted;
            if !s.admitted_once {
                s.cached = s.computed;
            }
            plan.events.push(Event::Admitted {
                id: s.id,
                cached: s.computed,
                again: s.admitted_once,
            });
            s.admitted_once = true;
            self.running.push(s);
        }
    }

    /// Prefilling sequences take blocks others registered since their admission (a prefix
    /// computed by an older sequence while they waited for it).
    fn extend_from_cache(&mut self) {
        for i in 0..self.running.len() {
            let s = &self.running[i];
            if s.decoding()
                || !s.computed.is_multiple_of(BLOCK)
                || s.computed != s.registered * BLOCK
            {
                continue;
            }
            let at = s.registered;
            let limit = Self::reusable_blocks(s);
            if at >= limit {
                continue;
            }
            let parent = at.checked_sub(1).map(|p| s.blocks[p]);
            let hit = self
                .pool
                .lookup_after(parent, &s.tokens[at * BLOCK..], limit - at);
            if hit.blocks.is_empty() {
                continue;
            }
            let s = &mut self.running[i];
            for (k, &b) in hit.blocks.iter().enumerate() {
                let own = std::mem::replace(&mut s.blocks[at + k], b);
                self.pool.acquire(b);
                self.pool.release(own);
            }
            s.registered += hit.blocks.len();
            s.computed = s.registered * BLOCK;
            if !s.preempted {
                s.cached += s.computed.min(s.prompt_len).saturating_sub(at * BLOCK);
            }
        }
    }

    /// Whether an older running sequence is computing the block `s` would compute next (the
    /// same block after the same blocks): then `s` waits for it rather than compute it twice.
    fn waits_for_other(&self, s: &Seq) -> bool {
        if !s.computed.is_multiple_of(BLOCK) || s.computed + BLOCK > s.tokens.len() {
            return false;
        }
        let b = s.computed / BLOCK;
        let next = &s.tokens[s.computed..s.computed + BLOCK];
        // The other is at the same place, prefilling, with its next chunk covering the block.
        self.running.iter().any(|o| {
            o.order < s.order
                && o.computed == s.computed
                && !o.decoding()
                && o.tokens.len() >= s.computed + BLOCK
                && (b == 0 || o.blocks.get(b - 1) == s.blocks.get(b - 1))
                && &o.tokens[s.computed..s.computed + BLOCK] == next
        })
    }

    /// This pass's sequences (indices into `running`): every decoding one, and prompt chunks.
    fn pick(&self) -> Vec<usize> {
        let mut picked: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].decoding())
            .collect();
        let decoding = !picked.is_empty();
        let mut prompt_tokens = 0;
        for (i, s) in self.running.iter().enumerate() {
            if s.decoding() || self.waits_for_other(s) {
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

    /// Gives the picked sequences the blocks this pass writes, preempting the youngest when the
    /// budget is short. Returns the picked sequences still running.
    fn make_room(&mut self, mut picked: Vec<usize>, plan: &mut Plan) -> Vec<usize> {
        let mut i = 0;
        while i < picked.len() {
            let need = self.running[picked[i]].chunk().end.div_ceil(BLOCK);
            if self.running[picked[i]].blocks.len() >= need {
                i += 1;
                continue;
            }
            let fits = self.pool.held() < self.limits.running_blocks;
            let block = if fits { self.pool.allocate() } else { None };
            if let Some(b) = block {
                self.running[picked[i]].blocks.push(b);
                continue;
            }
            // The youngest sequence gives way, which may be this one.
            let me = picked[i];
            let victim = (0..self.running.len())
                .max_by_key(|&j| self.running[j].order)
                .expect("running");
            self.preempt(victim, plan);
            picked.retain(|&j| j != victim);
            picked
                .iter_mut()
                .filter(|j| **j > victim)
                .for_each(|j| *j -= 1);
            if victim != me {
                let me = me - usize::from(me > victim);
                i = picked.iter().position(|&j| j == me).expect("still picked");
            }
        }
        picked
    }

    fn preempt(&mut self, idx: usize, plan: &mut Plan) {
        let mut s = self.running.remove(idx);
        self.release(&s.blocks);
        s.blocks.clear();
        s.computed = 0;
        s.registered = 0;
        s.preempted = true;
        plan.events.push(Event::Preempted { id: s.id });
        self.waiting.push_front(s);
    }

    /// The pass ran: `runs` computed their ranges. Full blocks are registered for reuse.
    pub fn computed(&mut self, runs: &[Run]) {
        for r in runs {
            let Some(i) = self.running.iter().position(|s| s.id == r.id) else {
                continue;
            };
            let s = &mut self.running[i];
            s.computed = s.computed.max(r.range.end);
            while s.registered < s.computed / BLOCK {
                let at = s.registered;
                let parent = at.checked_sub(1).map(|p| s.blocks[p]);
                let own = s.blocks[at];
                let tokens = &s.tokens[at * BLOCK..][..BLOCK];
                let kept = self.pool.register(own, parent, tokens);
                if kept != own {
                    // Another sequence registered the same block first: hold that one.
                    self.pool.acquire(kept);
                    self.pool.release(own);
                    s.blocks[at] = kept;
                } else if !s.preempted {
                    s.created += (s.prompt_len.min((at + 1) * BLOCK)).saturating_sub(at * BLOCK);
                }
                s.registered += 1;
            }
        }
    }

    /// A running sequence sampled `token` (its keys and values come with the next pass).
    pub fn push_token(&mut self, id: SeqId, token: u32) {
        if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
            s.tokens.push(token);
        }
    }

    /// Checks the invariants the tests rely on (debug builds and tests only).
    #[cfg(test)]
    fn check(&self) {
        let held: std::collections::HashSet<BlockId> = self
            .running
            .iter()
            .flat_map(|s| s.blocks.iter().copied())
            .collect();
        assert_eq!(held.len(), self.pool.held(), "held blocks counted once");
        assert!(self.pool.held() <= self.limits.running_blocks.max(self.pool.held()));
        for s in &self.running {
            assert!(s.computed <= s.tokens.len());
            assert!(s.blocks.len() * BLOCK >= s.computed);
            assert!(s.registered * BLOCK <= s.computed);
        }
        for s in &self.waiting {
            assert!(s.blocks.is_empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(running_blocks: usize, total_blocks: usize, max_batch: usize) -> Limits {
        Limits {
            running_blocks,
            total_blocks,
            max_batch,
            max_len: 64 * BLOCK,
        }
    }

    fn prompt(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| seed * 1_000_000 + i).collect()
    }

    /// Runs passes as the engine would, sampling token `7` whenever a pass ends a sequence's
    /// tokens, until `id` has `tokens` tokens; returns every plan.
    fn drive(s: &mut Scheduler, until: impl Fn(&Scheduler) -> bool) -> Vec<Plan> {
        let mut plans = Vec::new();
        for _ in 0..1000 {
            if until(s) {
                return plans;
            }
            let plan = s.schedule();
            s.check();
            s.computed(&plan.runs);
            for r in &plan.runs {
                if r.sample {
                    s.push_token(r.id, 7);
                }
            }
            s.check();
            plans.push(plan);
        }
        panic!("did not get there in 1000 passes");
    }

    fn generated(s: &Scheduler, id: SeqId, n: usize) -> bool {
        s.tokens(id).is_some_and(|t| t.len() >= n)
    }

    fn computed_tokens(plans: &[Plan], id: SeqId) -> usize {
        plans
            .iter()
            .flat_map(|p| &p.runs)
            .filter(|r| r.id == id)
            .map(|r| r.range.len())
            .sum()
    }

    #[test]
    fn a_second_request_with_the_same_prompt_reads_only_its_last_block() {
        let mut s = Scheduler::new(limits(64, 128, 8));
        let p = prompt(1, 5 * BLOCK + 3);
        s.add(1, p.clone());
        drive(&mut s, |s| generated(s, 1, p.len() + 4));
        s.remove(1);
        s.add(2, p.clone());
        let plans = drive(&mut s, |s| generated(s, 2, p.len() + 1));
        assert!(plans[0].events.contains(&Event::Admitted {
            id: 2,
            cached: 5 * BLOCK,
            again: false
        }));
        assert_eq!(
            computed_tokens(&plans, 2),
            3,
            "only the three tokens after the cached blocks"
        );
    }

    #[test]
    fn the_next_turn_finds_the_previous_answer_in_the_cache() {
        let mut s = Scheduler::new(limits(64, 128, 8));
        let p = prompt(1, 2 * BLOCK - 10);
        s.add(1, p.clone());
        // Generate past the second block's end: it holds prompt and answer tokens.
        drive(&mut s, |s| generated(s, 1, 3 * BLOCK));
        let turn2: Vec<u32> = s
            .tokens(1)
            .unwrap()
            .iter()
            .copied()
            .chain(prompt(2, 40))
            .collect();
        s.remove(1);
        s.add(2, turn2);
        let plans = drive(&mut s, |s| generated(s, 2, 3 * BLOCK + 41));
        assert!(plans[0].events.contains(&Event::Admitted {
            id: 2,
            cached: 2 * BLOCK,
            again: false
        }));
    }

    #[test]
    fn concurrent_requests_that_share_a_prefix_compute_it_once() {
        let mut s = Scheduler::new(limits(64, 128, 8));
        let shared = prompt(1, 8 * BLOCK);
        let mut a = shared.clone();
        a.extend(prompt(2, 20));
        let mut b = shared.clone();
        b.extend(prompt(3, 30));
        s.add(1, a.clone());
        s.add(2, b.clone());
        let plans = drive(&mut s, |s| {
            generated(s, 1, a.len() + 1) && generated(s, 2, b.len() + 1)
        });
        assert_eq!(computed_tokens(&plans, 1), a.len());
        assert_eq!(
            computed_tokens(&plans, 2),
            30,
            "the second computes only its own tail"
        );
        assert_eq!(
            s.cache_counts(2).0,
            8 * BLOCK,
            "and counts the shared prefix as cached"
        );
    }

    #[test]
    fn a_long_finished_prompt_survives_the_next_long_request() {
        // Running budget: one context (16 blocks); prefix cache: one more context.
        let mut s = Scheduler::new(Limits {
            running_blocks: 16,
            total_blocks: 32,
            max_batch: 4,
            max_len: 16 * BLOCK,
        });
        let a = prompt(1, 15 * BLOCK);
        let b = prompt(2, 15 * BLOCK);
        s.add(1, a.clone());
        drive(&mut s, |s| generated(s, 1, a.len() + 1));
        s.remove(1);
        s.add(2, b.clone());
        drive(&mut s, |s| generated(s, 2, b.len() + 1));
        s.remove(2);
        s.add(3, a.clone());
        let plans = drive(&mut s, |s| generated(s, 3, a.len() + 1));
        assert_eq!(computed_tokens(&plans, 3), BLOCK, "a was kept beside b");
    }

    #[test]
    fn eviction_frees_only_what_a_new_request_needs() {
        let mut s = Scheduler::new(Limits {
            running_blocks: 8,
            total_blocks: 8,
            max_batch: 4,
            max_len: 8 * BLOCK,
        });
        let a = prompt(1, 6 * BLOCK + 1);
        s.add(1, a.clone());
        drive(&mut s, |s| generated(s, 1, a.len() + 1));
        s.remove(1);
        assert_eq!(s.usage().cached_blocks, 6);
        // Four blocks for the new prompt: two are free, two come from a's tail.
        s.add(2, prompt(2, 4 * BLOCK - 1));
        drive(&mut s, |s| generated(s, 2, 4 * BLOCK));
        s.remove(2);
        s.add(3, a.clone());
        let plans = drive(&mut s, |s| generated(s, 3, a.len() + 1));
        assert!(plans[0].events.contains(&Event::Admitted {
            id: 3,
            cached: 4 * BLOCK,
            again: false
        }));
    }

    #[test]
    fn a_sequence_that_must_grow_preempts_the_youngest_which_resumes_from_its_blocks() {
        let mut s = Scheduler::new(Limits {
            running_blocks: 4,
            total_blocks: 8,
            max_batch: 4,
            max_len: 4 * BLOCK,
        });
        // Two sequences of two blocks each fill the budget; the first to need a third block
        // preempts the younger.
        s.add(1, prompt(1, 2 * BLOCK - 1));
        s.add(2, prompt(2, 2 * BLOCK - 1));
        let plans = drive(&mut s, |s| generated(s, 1, 2 * BLOCK + 2));
        let preempted = plans
            .iter()
            .flat_map(|p| &p.events)
            .any(|e| *e == Event::Preempted { id: 2 });
        assert!(preempted);
        s.remove(1);
        let len = s.tokens(2).unwrap().len();
        let plans = drive(&mut s, |s| generated(s, 2, 2 * BLOCK + 2));
        // Read again only after its own full blocks, still cached.
        let first = plans
            .iter()
            .flat_map(|p| &p.runs)
            .find(|r| r.id == 2)
            .unwrap();
        assert!(len > BLOCK);
        assert_eq!(first.range, (len - 1) / BLOCK * BLOCK..len);
    }

    #[test]
    fn a_prompt_longer_than_the_context_is_refused() {
        let mut s = Scheduler::new(limits(64, 64, 4));
        s.add(1, prompt(1, 64 * BLOCK));
        let plan = s.schedule();
        assert_eq!(
            plan.events,
            vec![Event::TooLong {
                id: 1,
                tokens: 64 * BLOCK + 1
            }]
        );
        assert!(s.is_idle());
    }

    #[test]
    fn a_newcomer_waits_while_the_budget_is_held_and_runs_when_it_frees() {
        let mut s = Scheduler::new(Limits {
            running_blocks: 4,
            total_blocks: 4,
            max_batch: 4,
            max_len: 4 * BLOCK,
        });
        s.add(1, prompt(1, 3 * BLOCK));
        s.add(2, prompt(2, 2 * BLOCK));
        let plan = s.schedule();
        assert_eq!(
            plan.runs.len(),
            1,
            "the second does not fit beside the first"
        );
        assert_eq!(s.usage().waiting, 1);
        s.remove(1);
        let plan = s.schedule();
        assert_eq!(plan.runs[0].id, 2);
    }

    #[test]
    fn while_streams_decode_prompts_get_one_chunk_a_pass() {
        let mut s = Scheduler::new(limits(64, 64, 8));
        s.add(1, prompt(1, 10));
        drive(&mut s, |s| generated(s, 1, 12));
        s.add(2, prompt(2, 4 * PREFILL_CHUNK));
        s.add(3, prompt(3, 4 * PREFILL_CHUNK));
        let plan = s.schedule();
        let prompt_tokens: usize = plan
            .runs
            .iter()
            .filter(|r| r.id != 1)
            .map(|r| r.range.len())
            .sum();
        assert_eq!(prompt_tokens, PREFILL_CHUNK);
        assert!(plan.runs.iter().any(|r| r.id == 1 && r.range.len() == 1));
    }
}
