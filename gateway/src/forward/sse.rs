//! Server-sent events, framed once: the relay holds back an event split over two chunks until
//! its end arrives, so every frame it passes on is whole events, and whoever reads the relayed
//! stream (the Anthropic translation) takes each frame's `data:` lines as they are, without a
//! buffer of its own.

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::{Finder, FinderRev};

/// The end of an event.
pub static EVENT_END: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
/// The start of a data line, searched backwards from a field inside it.
pub static DATA: LazyLock<FinderRev<'static>> = LazyLock::new(|| FinderRev::new(b"data: "));

/// The end of an OpenAI stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// Cuts a stream of chunks into whole events.
#[derive(Default)]
pub struct Framer {
    /// The start of an event whose end has not arrived yet.
    partial: BytesMut,
}

impl Framer {
    /// The whole events of `b` (and of what came before it); the tail of an unfinished event
    /// waits for the next chunk. A chunk of whole events with nothing waiting is handed back
    /// as it is, uncopied.
    pub fn whole_events(&mut self, b: Bytes) -> Option<Bytes> {
        if self.partial.is_empty() && b.ends_with(b"\n\n") {
            return Some(b);
        }
        self.partial.extend_from_slice(&b);
        let end = last_event_end(&self.partial)?;
        Some(self.partial.split_to(end).freeze())
    }

    /// What is left of an unfinished event at the end of the stream.
    pub fn rest(&mut self) -> Option<Bytes> {
        (!self.partial.is_empty()).then(|| std::mem::take(&mut self.partial).freeze())
    }

    /// Drops an unfinished event (no client could read it).
    pub fn clear(&mut self) {
        self.partial.clear();
    }
}

/// The payloads of the `data:` lines of whole events, in order.
pub fn data_lines(events: &[u8]) -> impl Iterator<Item = &[u8]> {
    events
        .split(|&c| c == b'\n')
        .filter_map(|l| l.strip_prefix(b"data: "))
}

/// One event carrying `json` as its data.
pub fn data_event(json: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(json.len() + 8);
    v.extend_from_slice(b"data: ");
    v.extend_from_slice(json);
    v.extend_from_slice(b"\n\n");
    Bytes::from(v)
}

/// Just past the last `\n\n` in `b`.
fn last_event_end(b: &[u8]) -> Option<usize> {
    memchr::memmem::rfind(b, b"\n\n").map(|i| i + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_split_over_chunks_ends_at_its_blank_line() {
        assert_eq!(last_event_end(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(last_event_end(b"data: b"), None);
    }

    #[test]
    fn a_split_event_is_held_back_until_its_end_and_whole_chunks_pass_as_they_are() {
        let mut f = Framer::default();
        assert_eq!(
            f.whole_events(Bytes::from_static(b"data: a\n\n")).unwrap(),
            &b"data: a\n\n"[..]
        );
        assert_eq!(f.whole_events(Bytes::from_static(b"data: {\"x\"")), None);
        assert_eq!(
            f.whole_events(Bytes::from_static(b":1}\n\ndata: c"))
                .unwrap(),
            &b"data: {\"x\":1}\n\n"[..]
        );
        assert_eq!(f.rest().unwrap(), &b"data: c"[..]);
        assert_eq!(f.rest(), None);
    }

    #[test]
    fn data_lines_are_the_payloads_of_every_event() {
        let events = b"event: x\ndata: {\"a\":1}\n\n: keep-alive\n\ndata: [DONE]\n\n";
        let got: Vec<&[u8]> = data_lines(events).collect();
        assert_eq!(got, vec![&b"{\"a\":1}"[..], &b"[DONE]"[..]]);
        assert_eq!(data_event(b"{}"), &b"data: {}\n\n"[..]);
    }
}
