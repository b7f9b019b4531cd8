//! A neuron's answer relayed to the client as a streaming body, frame by frame as hyper hands
//! them over: no channel, no task, no copy of a chunk unless it must change. Each event carrying
//! tokens counts for time-to-first-token and inter-token latency; the usage the neuron reports counts the
//! request's tokens, and a usage event the client did not ask for is dropped; answers name the
//! model as the client did. A neuron that fails or stays silent past the idle bound mid-stream
//! ends an SSE answer with an error event in OpenAI's shape and `[DONE]`, so the caller never
//! hangs.
//!
//! An SSE event split over two chunks is held back until its end arrives ([`Framer`]), so an
//! event is inspected, dropped or rewritten whole, and the frames passed on are whole events.

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use memchr::memmem::Finder;
use tokio::time::Sleep;

use crate::error::Error;
use crate::fleet::upstream::UpstreamBody;
use crate::forward::call::Call;
use crate::forward::guard::RequestGuard;
use crate::forward::sse::{self, DATA, EVENT_END, Framer};

static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\":{"));
static PROMPT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"prompt_tokens\":"));
static CACHED: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"cached_tokens\":"));
static COMPLETION: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"completion_tokens\":"));

/// The relayed answer: an [`http_body::Body`] over the neuron's.
pub struct Relay {
    body: UpstreamBody,
    guard: RequestGuard,
    sse: bool,
    call: Call,
    idle: Duration,
    /// When the last chunk came (or the relay started): the idle bound counts from here.
    last: Instant,
    /// Armed the first time the neuron makes us wait; moved on only when it fires early, so a
    /// chunk costs no timer work.
    timer: Option<Pin<Box<Sleep>>>,
    /// Holds the start of an SSE event whose end has not arrived yet.
    framer: Framer,
    done: bool,
}

impl Relay {
    pub fn new(
        body: UpstreamBody,
        guard: RequestGuard,
        sse: bool,
        idle: Duration,
        call: Call,
    ) -> Self {
        Relay {
            body,
            guard,
            sse,
            call,
            idle,
            last: Instant::now(),
            timer: None,
            framer: Framer::default(),
            done: false,
        }
    }

    /// Whether the relay passes the neuron's bytes through unchanged, length included.
    fn verbatim(&self) -> bool {
        !self.sse && self.call.rename.is_none()
    }

    /// Counts the tokens of the usage object in `b`, if it has one, and says where it starts.
    fn count_usage(&self, b: &[u8]) -> Option<usize> {
        let at = USAGE.find(b)?;
        let u = &b[at..];
        if let (Some(prompt), Some(completion)) =
            (number_after(u, &PROMPT), number_after(u, &COMPLETION))
        {
            let cached = number_after(u, &CACHED).unwrap_or(0);
            self.guard.tokens(prompt, completion, cached);
        }
        Some(at)
    }

    /// Counts the usage in `b` (whole events, or a JSON answer), drops the usage event the client
    /// did not ask for, renames the model.
    fn inspect(&self, mut b: Bytes) -> Bytes {
        if let Some(at) = self.count_usage(&b)
            && self.sse
            && self.call.strip_usage
        {
            // The usage event is `data: {…"choices":[],"usage":{…}}\n\n`, alone in its event.
            let start = DATA.rfind(&b[..at]).unwrap_or(0);
            let end = EVENT_END.find(&b[at..]).map_or(b.len(), |i| at + i + 2);
            b = if start == 0 && end == b.len() {
                Bytes::new()
            } else {
                let mut out = BytesMut::with_capacity(b.len() - (end - start));
                out.extend_from_slice(&b[..start]);
                out.extend_from_slice(&b[end..]);
                out.freeze()
            };
        }
        match &self.call.rename {
            Some(r) => r.apply(b),
            None => b,
        }
    }

    /// Ends the answer after a failure: an error event and `[DONE]` for SSE (an unfinished event
    /// before it is dropped: no client could read it), a broken body otherwise.
    fn fail(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.done = true;
        tracing::warn!(neuron = %self.guard.neuron_name(), error = %why, "stream cut");
        if !self.sse {
            return Poll::Ready(Some(Err(std::io::Error::other(why))));
        }
        self.framer.clear();
        let err = serde_json::to_vec(&Error::Upstream(why).openai_body()).unwrap_or_default();
        let mut out = BytesMut::from(&sse::data_event(&err)[..]);
        out.extend_from_slice(sse::DONE);
        Poll::Ready(Some(Ok(Frame::data(out.freeze()))))
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let me = self.get_mut();
        if me.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut me.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(b) = frame.into_data() else {
                        continue; // trailers: not passed on
                    };
                    me.last = Instant::now();
                    if me.verbatim() {
                        me.count_usage(&b);
                        return Poll::Ready(Some(Ok(Frame::data(b))));
                    }
                    let whole = if me.sse {
                        me.framer.whole_events(b)
                    } else {
                        Some(b)
                    };
                    if let Some(events) = whole.as_ref().filter(|_| me.sse) {
                        me.guard.events(events, me.last);
                    }
                    match whole.map(|b| me.inspect(b)) {
                        Some(b) if !b.is_empty() => return Poll::Ready(Some(Ok(Frame::data(b)))),
                        _ => continue,
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let why = format!("neuron {} failed mid-answer: {e}", me.guard.neuron_name());
                    return me.fail(why);
                }
                Poll::Ready(None) => {
                    me.done = true;
                    return match me.framer.rest() {
                        None => Poll::Ready(None),
                        Some(rest) => Poll::Ready(Some(Ok(Frame::data(me.inspect(rest))))),
                    };
                }
                Poll::Pending => break,
            }
        }
        loop {
            let deadline = (me.last + me.idle).into();
            let timer = me
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if me.last.elapsed() >= me.idle {
                break;
            }
            // Chunks came since the timer was set: wait from the last one.
            timer.as_mut().reset(deadline);
        }
        let why = format!(
            "neuron {} sent nothing for {} s mid-answer",
            me.guard.neuron_name(),
            me.idle.as_secs()
        );
        me.fail(why)
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        if self.verbatim() {
            self.body.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

/// The number after `key` (`"name":`) in `b`.
fn number_after(b: &[u8], key: &Finder<'_>) -> Option<u64> {
    let i = key.find(b)? + key.needle().len();
    let digits = b[i..].iter().skip_while(|c| **c == b' ');
    let mut n: u64 = 0;
    let mut any = false;
    for c in digits.take_while(|c| c.is_ascii_digit()) {
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_after_their_key() {
        let u = b"\"usage\":{\"prompt_tokens\": 12,\"completion_tokens\":8}";
        assert_eq!(number_after(u, &PROMPT), Some(12));
        assert_eq!(number_after(u, &COMPLETION), Some(8));
        assert_eq!(number_after(b"\"prompt_tokens\":x", &PROMPT), None);
    }
}
