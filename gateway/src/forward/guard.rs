//! The request guard: held while a proxied answer streams, it keeps the neuron's outstanding
//! count and the in-flight gauge up and records the request's latencies, speed and tokens.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use axum::http::StatusCode;
use memchr::memmem::Finder;

use crate::fleet::catalogue::Placement;
use crate::fleet::neuron::Neuron;
use crate::forward::call::Call;
use crate::metrics::{Metrics, RouteMetrics};

/// Held while a proxied answer streams: keeps the neuron's outstanding count and the in-flight
/// gauge up, and records the request's latencies and speed. Time to first token and end-to-end
/// latency count from the request's arrival at the gateway (as vLLM's count from its arrival at
/// the engine), so a cold load or a wait for a replica is part of them.
///
/// Only a stream shows when tokens come: its first chunk carrying generated text or a tool call
/// gives the time to first token (a chat stream's first chunk, with the role and no text, comes
/// before the prompt is processed and does not count), and the gaps between such chunks give the
/// inter-token latency and, with the neuron's token count, the tokens per second. A JSON answer
/// records none of the three, only its end-to-end latency and tokens.
pub struct RequestGuard {
    neuron: Arc<Neuron>,
    pub route: Arc<RouteMetrics>,
    /// When the client's request reached the gateway.
    arrived: Instant,
    /// When the first and the last chunk carrying tokens came.
    first_token: Option<Instant>,
    last_token: Instant,
    /// The neuron's last usage: prompt tokens, those read from its prefix cache, tokens
    /// generated. A stream with `continuous_usage_stats` reports running totals on every chunk,
    /// so the counters take the last report, once, when the request ends.
    prompt: AtomicU64,
    cached: AtomicU64,
    generated: AtomicU64,
    reported: AtomicBool,
    /// The neuron answered and its answer is being relayed: only then does the request record its
    /// end-to-end latency and speed, so a failed attempt retried elsewhere adds no sample.
    answered: bool,
}

impl RequestGuard {
    pub fn new(neuron: Arc<Neuron>, metrics: &Metrics, p: &Placement, call: &Call) -> Self {
        neuron.outstanding.fetch_add(1, Ordering::Relaxed);
        let route = metrics.route(&p.name, &neuron.cfg.name, call.dialect);
        route.in_flight.inc();
        RequestGuard {
            neuron,
            route,
            arrived: call.arrived,
            first_token: None,
            last_token: call.arrived,
            prompt: AtomicU64::new(0),
            cached: AtomicU64::new(0),
            generated: AtomicU64::new(0),
            reported: AtomicBool::new(false),
            answered: false,
        }
    }

    /// Counts an attempt that failed before the neuron answered (the request may go on elsewhere).
    pub fn record(&self, status: StatusCode) {
        self.route.request(status);
    }

    /// Counts the request, answered by the neuron with `status`.
    pub fn answered(&mut self, status: StatusCode) {
        self.route.request(status);
        self.answered = true;
    }

    pub fn neuron_name(&self) -> &str {
        &self.neuron.cfg.name
    }

    /// Whole SSE events of the answer arrived at `now`: those carrying tokens time the first
    /// token and the gaps between tokens.
    pub fn events(&mut self, events: &[u8], now: Instant) {
        if !carries_tokens(events) {
            return;
        }
        match self.first_token {
            None => {
                self.first_token = Some(now);
                self.route
                    .ttft()
                    .observe((now - self.arrived).as_secs_f64());
            }
            Some(_) => self
                .route
                .itl()
                .observe((now - self.last_token).as_secs_f64()),
        }
        self.last_token = now;
    }

    /// Keeps the usage the neuron reported (`cached` of the prompt's came from its prefix
    /// cache); a later report replaces it.
    pub fn tokens(&self, prompt: u64, completion: u64, cached: u64) {
        self.prompt.store(prompt, Ordering::Relaxed);
        self.cached.store(cached, Ordering::Relaxed);
        self.generated.store(completion, Ordering::Relaxed);
        self.reported.store(true, Ordering::Relaxed);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.neuron.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.route.in_flight.dec();
        let generated = self.generated.load(Ordering::Relaxed);
        if self.reported.load(Ordering::Relaxed) {
            let route = &self.route;
            route
                .prompt_tokens()
                .inc_by(self.prompt.load(Ordering::Relaxed));
            route
                .cached_prompt_tokens()
                .inc_by(self.cached.load(Ordering::Relaxed));
            route.generation_tokens().inc_by(generated);
        }
        if !self.answered {
            return;
        }
        self.route.e2e.observe(self.arrived.elapsed().as_secs_f64());
        // The first token's time is the time to first token; the speed counts those after it
        // (as `cortex probe` does).
        if let Some(first) = self.first_token
            && generated > 1
            && self.last_token > first
        {
            let decode = (self.last_token - first).as_secs_f64();
            self.route
                .tokens_per_second()
                .observe((generated - 1) as f64 / decode);
        }
    }
}

static CONTENT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""content":""#));
static TEXT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""text":""#));
static TOOL_CALLS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(br#""tool_calls":["#));

/// Whether OpenAI stream events carry generated tokens: non-empty `content` (chat) or `text`
/// (completions), or a tool call. A key cannot appear inside a JSON string (its quotes would be
/// escaped there), so finding it finds the field.
fn carries_tokens(events: &[u8]) -> bool {
    let non_empty = |key: &Finder<'_>| {
        key.find_iter(events)
            .any(|i| matches!(events.get(i + key.needle().len()), Some(c) if !b"\"]".contains(c)))
    };
    non_empty(&CONTENT) || non_empty(&TEXT) || non_empty(&TOOL_CALLS)
}

#[cfg(test)]
mod tests {
    use super::carries_tokens;

    #[test]
    fn only_events_with_generated_text_or_tool_calls_carry_tokens() {
        // A chat stream's first chunk: the role, no text yet.
        assert!(!carries_tokens(
            br#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#
        ));
        assert!(carries_tokens(
            br#"data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#
        ));
        assert!(carries_tokens(
            br#"data: {"choices":[{"delta":{"content":"\n"}}]}"#
        ));
        assert!(carries_tokens(br#"data: {"choices":[{"text":" Paris"}]}"#));
        assert!(!carries_tokens(
            br#"data: {"choices":[{"text":"","finish_reason":"stop"}]}"#
        ));
        assert!(carries_tokens(
            br#"data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#
        ));
        assert!(!carries_tokens(
            br#"data: {"choices":[],"usage":{"completion_tokens":3}}"#
        ));
        // Text that looks like a key is escaped inside its string.
        assert!(!carries_tokens(
            br#"data: {"choices":[{"delta":{"content":""}}],"x":"\"content\":\"a"}"#
        ));
        // Several events in one chunk: any one with text counts.
        assert!(carries_tokens(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"
        ));
    }
}
