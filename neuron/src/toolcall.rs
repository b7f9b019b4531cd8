//! Tool calls in a model's output, turned into OpenAI `tool_calls`. Models write them in one of a
//! few conventions, all handled here:
//!
//! - Hermes / Qwen 2.5–3 / SmolLM3: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, one
//!   block per call, possibly after some text;
//! - Llama 3.x: the whole answer is `{"name": …, "parameters": {…}}` (optionally after
//!   `<|python_tag|>`);
//! - Mistral: `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`.
//!
//! [`ToolParser`] works on a stream: text that cannot be part of a call is passed on at once, text
//! that may be is held back until it is known. Nothing is dropped: a block that does not parse is
//! given back as text.

use cortex_core::openai::{FunctionCall, ToolCall};
use serde_json::Value;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const MISTRAL: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

#[derive(Debug, Default)]
pub struct ToolParser {
    /// Text held back, not yet given out.
    held: String,
    /// Something was given out as text already (a bare JSON answer must start the output).
    started: bool,
    /// Inside (or after) a `<tool_call>` block: everything from here on is held.
    in_calls: bool,
    /// The output began like a bare JSON call: held whole until the end.
    whole: bool,
}

impl ToolParser {
    /// Takes generated text; returns what can be given out as content now.
    pub fn push(&mut self, text: &str) -> String {
        self.held.push_str(text);
        if self.in_calls || self.whole {
            return String::new();
        }
        if !self.started {
            let t = self.held.trim_start();
            if t.is_empty() {
                return String::new();
            }
            if t.starts_with('{') || t.starts_with(MISTRAL) || t.starts_with(PYTHON_TAG) {
                self.whole = true;
                return String::new();
            }
            // Could still become one of the markers: wait for more.
            if MISTRAL.starts_with(t) || PYTHON_TAG.starts_with(t) {
                return String::new();
            }
        }
        if let Some(at) = self.held.find(OPEN) {
            self.in_calls = true;
            let before: String = self.held.drain(..at).collect();
            return self.give(before);
        }
        // Hold back a tail that may be the start of `<tool_call>`.
        let keep = (1..OPEN.len())
            .rev()
            .find(|&n| self.held.ends_with(&OPEN[..n]))
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out: String = self.held.drain(..cut).collect();
        self.give(out)
    }

    fn give(&mut self, s: String) -> String {
        if !s.is_empty() {
            self.started = true;
        }
        s
    }

    /// At the end of the output: the remaining content and the calls found.
    pub fn finish(mut self) -> (String, Vec<ToolCall>) {
        let held = std::mem::take(&mut self.held);
        if self.whole {
            return match parse_bare(&held) {
                Some(calls) => (String::new(), calls),
                None => (held, vec![]),
            };
        }
        if !self.in_calls {
            return (held, vec![]);
        }
        let mut calls = Vec::new();
        let mut rest = held.as_str();
        let mut text = String::new();
        while let Some(start) = rest.find(OPEN) {
            text.push_str(&rest[..start]);
            let body_start = start + OPEN.len();
            let (body, next) = match rest[body_start..].find(CLOSE) {
                Some(end) => (
                    &rest[body_start..body_start + end],
                    &rest[body_start + end + CLOSE.len()..],
                ),
                // Stopped at end of turn before the closing tag.
                None => (&rest[body_start..], ""),
            };
            match serde_json::from_str::<Value>(body.trim())
                .ok()
                .and_then(|v| call_of(&v, calls.len()))
            {
                Some(c) => calls.push(c),
                None => {
                    text.push_str(&rest[start..rest.len() - next.len()]);
                }
            }
            rest = next;
        }
        text.push_str(rest);
        if calls.is_empty() {
            return (held, vec![]);
        }
        (text.trim().to_string(), calls)
    }
}

/// A Llama-style bare JSON call (or list of calls), or Mistral's `[TOOL_CALLS]` list.
fn parse_bare(text: &str) -> Option<Vec<ToolCall>> {
    let t = text.trim();
    let t = t.strip_prefix(PYTHON_TAG).unwrap_or(t);
    let t = t.strip_prefix(MISTRAL).unwrap_or(t).trim();
    let v: Value = serde_json::from_str(t).ok()?;
    let items = match v {
        Value::Array(a) => a,
        v => vec![v],
    };
    let calls: Option<Vec<ToolCall>> = items
        .iter()
        .enumerate()
        .map(|(i, v)| call_of(v, i))
        .collect();
    calls.filter(|c| !c.is_empty())
}

/// `{"name": …, "arguments" | "parameters": {…} | "…"}` → a tool call numbered `index`.
fn call_of(v: &Value, index: usize) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or(Value::Object(Default::default()));
    let arguments = match args {
        Value::String(s) => s,
        other => other.to_string(),
    };
    Some(ToolCall {
        index: Some(index as u32),
        id: Some(format!("call_{}", random_id())),
        kind: Some("function".into()),
        function: FunctionCall {
            name: Some(name),
            arguments,
        },
    })
}

fn random_id() -> String {
    use rand::Rng;
    let mut r = rand::rng();
    (0..24)
        .map(|_| {
            let c = r.random_range(0..36u8);
            (if c < 10 { b'0' + c } else { b'a' + c - 10 }) as char
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` in pieces of `n` bytes (on char boundaries); returns (streamed, rest, calls).
    fn run(text: &str, n: usize) -> (String, String, Vec<ToolCall>) {
        let mut p = ToolParser::default();
        let mut out = String::new();
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(n) {
            out.push_str(&p.push(&piece.iter().collect::<String>()));
        }
        let (rest, calls) = p.finish();
        (out, rest, calls)
    }

    fn args(c: &ToolCall) -> Value {
        serde_json::from_str(&c.function.arguments).unwrap()
    }

    #[test]
    fn hermes_blocks_become_calls_and_the_text_before_streams() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"time\", \"arguments\": {}}</tool_call>";
        for n in [1, 3, 7, 1000] {
            let (streamed, rest, calls) = run(text, n);
            assert_eq!(streamed, "Let me check.\n", "piece size {n}");
            assert_eq!(rest, "");
            assert_eq!(calls.len(), 2);
            assert_eq!(calls[0].function.name.as_deref(), Some("weather"));
            assert_eq!(args(&calls[0]), serde_json::json!({"city": "Paris"}));
            assert_eq!(calls[1].index, Some(1));
            assert_ne!(calls[0].id, calls[1].id);
        }
    }

    #[test]
    fn llama_bare_json_and_mistral_lists_are_calls() {
        let (s, rest, calls) = run(
            "<|python_tag|>{\"name\": \"weather\", \"parameters\": {\"city\": \"Oslo\"}}",
            4,
        );
        assert_eq!((s.as_str(), rest.as_str()), ("", ""));
        assert_eq!(args(&calls[0]), serde_json::json!({"city": "Oslo"}));
        let (_, _, calls) = run(
            "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": \"{\\\"x\\\":1}\"}, {\"name\": \"b\", \"arguments\": {}}]",
            5,
        );
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].function.arguments, "{\"x\":1}");
    }

    #[test]
    fn plain_text_and_broken_calls_are_never_dropped() {
        let (s, rest, calls) = run("Paris is the capital. <tool_ca", 2);
        assert_eq!(format!("{s}{rest}"), "Paris is the capital. <tool_ca");
        assert!(calls.is_empty());
        let broken = "Hm <tool_call>{\"name\": oops}</tool_call>";
        let (s, rest, calls) = run(broken, 3);
        assert_eq!(format!("{s}{rest}"), broken);
        assert!(calls.is_empty());
        let (s, rest, calls) = run("{not json at all", 3);
        assert_eq!(format!("{s}{rest}"), "{not json at all");
        assert!(calls.is_empty());
    }

    #[test]
    fn an_unclosed_block_at_the_end_of_the_turn_still_counts() {
        let (_, rest, calls) = run(
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": [1, 2]}}",
            6,
        );
        assert_eq!(rest, "");
        assert_eq!(args(&calls[0]), serde_json::json!({"a": [1, 2]}));
    }
}
