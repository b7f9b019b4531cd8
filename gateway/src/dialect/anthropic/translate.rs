//! Anthropic Messages ⇄ OpenAI chat completions. Requests are translated to the neurons' OpenAI
//! dialect; answers, stream events and errors are translated back.
//!
//! Failures seen in other gateways that this translation must not repeat (each has a test):
//! tool arguments dropped or sent as empty `input_json_delta`, `stop_sequences` ignored or the
//! matched sequence not reported, a length stop reported as `end_turn`, usage reported as zero (or with cache reads counted as input),
//! text sent as an empty delta.

use cortex_core::anthropic::{
    Block, CacheControl, Content, MessagesRequest, MessagesResponse, ToolChoice, Usage,
};
use cortex_core::openai::{
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage, FinishReason,
    FunctionCall, MessageContent, SamplingFields, StopSpec, StreamOptions, ToolCall,
};
use serde_json::{Value, json};

use crate::error::Error;

fn invalid(message: String) -> Error {
    Error::InvalidRequest {
        message,
        param: None,
    }
}

fn text_of(content: &Content, what: &str) -> Result<String, Error> {
    match content {
        Content::Text(t) => Ok(t.clone()),
        Content::Blocks(blocks) => blocks
            .iter()
            .map(|b| match b {
                Block::Text { text, .. } => Ok(text.clone()),
                other => Err(invalid(format!(
                    "{what} may hold only text blocks; found {}",
                    block_type(other)
                ))),
            })
            .collect(),
    }
}

fn block_type(b: &Block) -> String {
    match b {
        Block::Text { .. } => "text".into(),
        Block::ToolUse { .. } => "tool_use".into(),
        Block::ToolResult { .. } => "tool_result".into(),
        Block::Other(v) => v
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string(),
    }
}

/// Claude Code's first system block, `x-anthropic-billing-header: cc_version=…; cch=…;`, changes
/// on every request; sent on, it would make every prompt differ from its first tokens and defeat
/// the neurons' prefix cache (Ollama and llama.cpp drop it too).
const BILLING_HEADER: &str = "x-anthropic-billing-header:";

/// The system prompt's text, without a leading billing-header block (or line).
fn system_text(system: &Content) -> Result<String, Error> {
    match system {
        Content::Text(t) if t.starts_with(BILLING_HEADER) => {
            Ok(t.split_once('\n').map_or("", |(_, rest)| rest).to_string())
        }
        Content::Blocks(blocks) if matches!(blocks.first(), Some(Block::Text { text, .. }) if text.starts_with(BILLING_HEADER)) => {
            text_of(&Content::Blocks(blocks[1..].to_vec()), "system")
        }
        other => text_of(other, "system"),
    }
}

/// Checks a `cache_control` breakpoint as Anthropic does. The neurons cache every prompt prefix
/// by themselves, so a valid breakpoint needs nothing more.
fn check_cache_control(cc: Option<&CacheControl>, at: &str) -> Result<(), Error> {
    let Some(cc) = cc else { return Ok(()) };
    if cc.kind != "ephemeral" {
        return Err(invalid(format!(
            "{at}.cache_control.type '{}' is not supported; use {{\"type\": \"ephemeral\"}} (cortex caches every prompt prefix by itself)",
            cc.kind
        )));
    }
    if let Some(ttl) = cc.ttl.as_deref().filter(|t| !matches!(*t, "5m" | "1h")) {
        return Err(invalid(format!(
            "{at}.cache_control.ttl '{ttl}' is not supported; use \"5m\" or \"1h\""
        )));
    }
    Ok(())
}

fn check_blocks(content: &Content, at: &str) -> Result<(), Error> {
    if let Content::Blocks(blocks) = content {
        for (j, b) in blocks.iter().enumerate() {
            let at = format!("{at}.content[{j}]");
            match b {
                Block::Text { cache_control, .. } | Block::ToolUse { cache_control, .. } => {
                    check_cache_control(cache_control.as_ref(), &at)?
                }
                Block::ToolResult {
                    cache_control,
                    content,
                    ..
                } => {
                    check_cache_control(cache_control.as_ref(), &at)?;
                    if let Some(c) = content {
                        check_blocks(c, &at)?;
                    }
                }
                Block::Other(_) => {}
            }
        }
    }
    Ok(())
}

/// Every `cache_control` of a request: top level, system blocks, tools, message blocks.
fn check_cache_controls(req: &MessagesRequest) -> Result<(), Error> {
    check_cache_control(req.cache_control.as_ref(), "request")?;
    if let Some(s) = &req.system {
        check_blocks(s, "system")?;
    }
    for (i, t) in req.tools.iter().flatten().enumerate() {
        check_cache_control(t.cache_control.as_ref(), &format!("tools[{i}]"))?;
    }
    for (i, m) in req.messages.iter().enumerate() {
        check_blocks(&m.content, &format!("messages[{i}]"))?;
    }
    Ok(())
}

/// Anthropic's usage for the neuron's: cache reads and writes are not part of `input_tokens`.
pub fn usage_of(u: &cortex_core::openai::Usage) -> Usage {
    let (read, created) = (u.cached_tokens(), u.cache_creation_tokens());
    Usage {
        input_tokens: u.prompt_tokens.saturating_sub(read + created),
        output_tokens: u.completion_tokens,
        cache_creation_input_tokens: created,
        cache_read_input_tokens: read,
    }
}

/// A chat message of `role` with text `content`.
fn text_message(role: &str, content: String) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: Some(MessageContent::Text(content)),
        ..Default::default()
    }
}

/// The OpenAI chat request for an Anthropic one (with `model` left as the caller sent it).
pub fn to_openai(req: &MessagesRequest) -> Result<ChatCompletionRequest, Error> {
    if req.max_tokens < 1 {
        return Err(Error::InvalidRequest {
            message: format!("max_tokens must be at least 1, got {}", req.max_tokens),
            param: Some("max_tokens"),
        });
    }
    check_cache_controls(req)?;
    let mut messages = Vec::new();
    // Claude Code also sends `system` messages among `messages` (its context reminders): their
    // text joins the system prompt, as chat templates take one system turn, at the start.
    let mut system = Vec::new();
    if let Some(s) = &req.system {
        system.push(system_text(s)?);
    }
    for (i, m) in req.messages.iter().enumerate() {
        if m.role == "system" {
            system.push(text_of(&m.content, &format!("messages[{i}] (system)"))?);
        }
    }
    if !system.is_empty() {
        messages.push(text_message("system", system.join("\n\n")));
    }
    for (i, m) in req.messages.iter().enumerate() {
        match (m.role.as_str(), &m.content) {
            ("system", _) => {}
            ("user" | "assistant", Content::Text(t)) => {
                messages.push(text_message(&m.role, t.clone()))
            }
            ("user", Content::Blocks(blocks)) => {
                let mut text = String::new();
                for b in blocks {
                    match b {
                        Block::Text { text: t, .. } => text.push_str(t),
                        Block::ToolResult {
                            tool_use_id,
                            content,
                            is_error,
                            ..
                        } => {
                            let mut body = match content {
                                Some(c) => text_of(c, "tool_result content")?,
                                None => String::new(),
                            };
                            if *is_error == Some(true) {
                                body = format!("Error: {body}");
                            }
                            messages.push(ChatMessage {
                                tool_call_id: Some(tool_use_id.clone()),
                                ..text_message("tool", body)
                            });
                        }
                        other => {
                            return Err(invalid(format!(
                                "messages[{i}] has a {} block; cortex models take text, tool_use and tool_result blocks",
                                block_type(other)
                            )));
                        }
                    }
                }
                if !text.is_empty() {
                    messages.push(text_message("user", text));
                }
            }
            ("assistant", Content::Blocks(blocks)) => {
                let mut text = String::new();
                let mut calls = Vec::new();
                for b in blocks {
                    match b {
                        Block::Text { text: t, .. } => text.push_str(t),
                        Block::ToolUse {
                            id, name, input, ..
                        } => calls.push(ToolCall {
                            index: None,
                            id: Some(id.clone()),
                            kind: Some("function".into()),
                            function: FunctionCall {
                                name: Some(name.clone()),
                                arguments: input.to_string(),
                            },
                        }),
                        other => {
                            return Err(invalid(format!(
                                "messages[{i}] (assistant) has a {} block",
                                block_type(other)
                            )));
                        }
                    }
                }
                messages.push(ChatMessage {
                    tool_calls: (!calls.is_empty()).then_some(calls),
                    ..text_message("assistant", text)
                });
            }
            (role, _) => {
                return Err(invalid(format!(
                    "messages[{i}].role '{role}' must be user, assistant or system"
                )));
            }
        }
    }
    let stream = req.stream == Some(true);
    Ok(ChatCompletionRequest {
        model: req.model.clone(),
        messages,
        sampling: SamplingFields {
            max_tokens: Some(req.max_tokens),
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            stop: req.stop_sequences.clone().map(StopSpec::Many),
            stream: stream.then_some(true),
            // Usage on every chunk: the first one's prompt count goes into `message_start`.
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
                continuous_usage_stats: true,
            }),
            ..Default::default()
        },
        tools: req.tools.as_ref().map(|tools| {
            tools
                .iter()
                .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.input_schema}}))
                .collect()
        }),
        tool_choice: req.tool_choice.as_ref().map(|choice| match choice {
            ToolChoice::Auto => json!("auto"),
            ToolChoice::Any => json!("required"),
            ToolChoice::None => json!("none"),
            ToolChoice::Tool { name } => json!({"type": "function", "function": {"name": name}}),
        }),
        user: req.metadata.as_ref().and_then(|m| m.user_id.clone()),
    })
}

/// Anthropic's `stop_reason` and `stop_sequence` for an OpenAI finish.
pub fn stop_reason(finish: Option<FinishReason>, stop: Option<&str>) -> (String, Option<String>) {
    match (finish, stop) {
        (Some(FinishReason::Length), _) => ("max_tokens".into(), None),
        (Some(FinishReason::ToolCalls), _) => ("tool_use".into(), None),
        (_, Some(s)) => ("stop_sequence".into(), Some(s.to_string())),
        _ => ("end_turn".into(), None),
    }
}

fn tool_input(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return json!({});
    }
    serde_json::from_str(arguments).unwrap_or_else(|_| json!({"_raw_arguments": arguments}))
}

pub fn from_openai(resp: &ChatCompletion, model: &str) -> MessagesResponse {
    let choice = resp.choices.first();
    let mut content = Vec::new();
    if let Some(c) = choice {
        if let Some(text) = c
            .message
            .content
            .as_ref()
            .and_then(|c| c.text().ok())
            .filter(|t| !t.is_empty())
        {
            content.push(Block::Text {
                text,
                cache_control: None,
            });
        }
        for call in c.message.tool_calls.iter().flatten() {
            content.push(Block::ToolUse {
                id: call
                    .id
                    .clone()
                    .unwrap_or_else(|| format!("toolu_{}", content.len())),
                name: call.function.name.clone().unwrap_or_default(),
                input: tool_input(&call.function.arguments),
                cache_control: None,
            });
        }
    }
    let (reason, seq) = stop_reason(
        choice.and_then(|c| c.finish_reason),
        choice.and_then(|c| c.stop_reason.as_deref()),
    );
    MessagesResponse {
        id: format!("msg_{}", resp.id),
        kind: "message".into(),
        role: "assistant".into(),
        content,
        model: model.to_string(),
        stop_reason: Some(reason),
        stop_sequence: seq,
        usage: usage_of(&resp.usage),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Open {
    Text,
    Tool,
}

/// Turns a stream of OpenAI chunks into Anthropic's event sequence.
pub struct StreamTranslator {
    id: String,
    model: String,
    open: Option<(usize, Open)>,
    next: usize,
    finish: Option<FinishReason>,
    stop: Option<String>,
    usage: Usage,
    /// `message_start` went out.
    started: bool,
}

pub type Event = (&'static str, Value);

impl StreamTranslator {
    pub fn new(id: String, model: String) -> Self {
        StreamTranslator {
            id,
            model,
            open: None,
            next: 0,
            finish: None,
            stop: None,
            usage: Usage::default(),
            started: false,
        }
    }

    /// `message_start`, once, before anything else: sent with the neuron's first chunk, which
    /// carries the prompt's token count (`continuous_usage_stats`), so clients that read usage
    /// from `message_start` (Claude Code does) see the real input tokens.
    fn start(&mut self, out: &mut Vec<Event>) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        out.push((
            "message_start",
            json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "content": [], "model": self.model,
                "stop_reason": null, "stop_sequence": null,
                "usage": self.usage,
            }}),
        ));
    }

    fn close(&mut self, out: &mut Vec<Event>) {
        if let Some((i, _)) = self.open.take() {
            out.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": i}),
            ));
        }
    }

    fn open_block(&mut self, kind: Open, block: Value, out: &mut Vec<Event>) -> usize {
        self.close(out);
        let i = self.next;
        self.next += 1;
        self.open = Some((i, kind));
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": i, "content_block": block}),
        ));
        i
    }

    pub fn chunk(&mut self, c: &ChatCompletionChunk) -> Vec<Event> {
        let mut out = Vec::new();
        if let Some(u) = &c.usage {
            self.usage = usage_of(u);
        }
        // `message_start` waits for the first chunk that knows what the prefix cache read (the
        // neuron's chunks after its prompt is read) or that carries the answer, so its usage
        // is the one clients keep.
        let answers = c.choices.iter().any(|ch| {
            ch.delta.content.as_deref().is_some_and(|t| !t.is_empty())
                || ch.delta.tool_calls.is_some()
                || ch.finish_reason.is_some()
        });
        if answers || c.usage.is_some_and(|u| u.prompt_tokens_details.is_some()) {
            self.start(&mut out);
        }
        for ch in &c.choices {
            if let Some(text) = ch.delta.content.as_deref().filter(|t| !t.is_empty()) {
                let i = match self.open {
                    Some((i, Open::Text)) => i,
                    _ => self.open_block(Open::Text, json!({"type": "text", "text": ""}), &mut out),
                };
                out.push(("content_block_delta", json!({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": text}})));
            }
            for call in ch.delta.tool_calls.iter().flatten() {
                // A call with an id starts a new tool_use block; later pieces carry its arguments.
                if call.id.is_some() || !matches!(self.open, Some((_, Open::Tool))) {
                    let block = json!({"type": "tool_use", "id": call.id.clone().unwrap_or_else(|| format!("toolu_{}", self.next)),
                        "name": call.function.name.clone().unwrap_or_default(), "input": {}});
                    self.open_block(Open::Tool, block, &mut out);
                }
                let i = self.open.map(|(i, _)| i).unwrap_or(0);
                if !call.function.arguments.is_empty() {
                    out.push(("content_block_delta", json!({"type": "content_block_delta", "index": i,
                        "delta": {"type": "input_json_delta", "partial_json": call.function.arguments}})));
                }
            }
            if let Some(f) = ch.finish_reason {
                self.finish = Some(f);
                self.stop = ch.stop_reason.clone();
            }
        }
        out
    }

    /// Closes the open block, then `message_delta` (stop reason, usage) and `message_stop`.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        self.start(&mut out);
        self.close(&mut out);
        let (reason, seq) = stop_reason(self.finish, self.stop.as_deref());
        out.push((
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": seq},
            "usage": self.usage}),
        ));
        out.push(("message_stop", json!({"type": "message_stop"})));
        out
    }
}

/// One server-sent event in Anthropic's framing.
pub fn sse(event: &Event) -> bytes::Bytes {
    bytes::Bytes::from(format!("event: {}\ndata: {}\n\n", event.0, event.1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cortex_core::openai::{PromptTokensDetails, Usage as OpenAiUsage};

    fn request(v: Value) -> MessagesRequest {
        serde_json::from_value(v).expect("a valid Messages request")
    }

    fn system_of(req: &ChatCompletionRequest) -> String {
        let m = &req.messages[0];
        assert_eq!(m.role, "system");
        m.content.as_ref().unwrap().text().unwrap()
    }

    #[test]
    fn a_leading_billing_header_block_is_dropped_and_the_rest_kept_in_order() {
        let req = request(json!({
            "model": "m", "max_tokens": 8,
            "system": [
                {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; cc_entrypoint=cli; cch=91ab;"},
                {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": " Be brief."}
            ],
            "messages": [{"role": "user", "content": "hi"}]
        }));
        let out = to_openai(&req).unwrap();
        assert_eq!(system_of(&out), "You are Claude Code. Be brief.");

        // As one string: the header is its first line.
        let req = request(json!({
            "model": "m", "max_tokens": 8,
            "system": "x-anthropic-billing-header: cch=1;\nYou are helpful.",
            "messages": [{"role": "user", "content": "hi"}]
        }));
        assert_eq!(system_of(&to_openai(&req).unwrap()), "You are helpful.");

        // Only a leading one: the same words later are the user's own text.
        let req = request(json!({
            "model": "m", "max_tokens": 8,
            "system": [{"type": "text", "text": "A."}, {"type": "text", "text": "x-anthropic-billing-header: kept"}],
            "messages": [{"role": "user", "content": "hi"}]
        }));
        assert_eq!(
            system_of(&to_openai(&req).unwrap()),
            "A.x-anthropic-billing-header: kept"
        );
    }

    #[test]
    fn cache_control_is_accepted_everywhere_anthropic_allows_it() {
        let eph = json!({"type": "ephemeral"});
        let req = request(json!({
            "model": "m", "max_tokens": 8,
            "cache_control": eph,
            "system": [{"type": "text", "text": "S", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
            "tools": [{"name": "t", "input_schema": {"type": "object"}, "cache_control": eph}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "q", "cache_control": eph}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "t", "input": {}, "cache_control": eph}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "cache_control": eph,
                    "content": [{"type": "text", "text": "r", "cache_control": {"type": "ephemeral", "ttl": "5m"}}]}]}
            ]
        }));
        let out = to_openai(&req).unwrap();
        assert_eq!(system_of(&out), "S");
        assert_eq!(out.tools.as_ref().unwrap().len(), 1);
    }

    #[test]
    fn a_bad_cache_control_is_refused_with_where_and_the_fix() {
        let req = request(json!({
            "model": "m", "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "q", "cache_control": {"type": "persistent"}}]}]
        }));
        let e = format!("{:?}", to_openai(&req).unwrap_err());
        assert!(
            e.contains("messages[0].content[0].cache_control.type 'persistent'"),
            "{e}"
        );
        assert!(
            e.contains("use {\\\"type\\\": \\\"ephemeral\\\"}") || e.contains("ephemeral"),
            "{e}"
        );

        let req = request(json!({
            "model": "m", "max_tokens": 8,
            "tools": [{"name": "t", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral", "ttl": "2d"}}],
            "messages": [{"role": "user", "content": "q"}]
        }));
        let e = format!("{:?}", to_openai(&req).unwrap_err());
        assert!(e.contains("tools[0].cache_control.ttl '2d'"), "{e}");
        assert!(e.contains("\"5m\" or \"1h\"") || e.contains("5m"), "{e}");
    }

    fn openai_usage(prompt: u32, completion: u32, cached: u32, created: u32) -> OpenAiUsage {
        OpenAiUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: Some(PromptTokensDetails {
                cached_tokens: cached,
                cache_creation_tokens: created,
            }),
        }
    }

    #[test]
    fn cache_reads_and_writes_are_not_counted_as_input_tokens() {
        let u = usage_of(&openai_usage(4100, 7, 3968, 128));
        assert_eq!(
            (
                u.input_tokens,
                u.cache_read_input_tokens,
                u.cache_creation_input_tokens,
                u.output_tokens
            ),
            (4, 3968, 128, 7)
        );
        // A neuron that reports no details: everything is input.
        let u = usage_of(&OpenAiUsage::new(50, 3));
        assert_eq!((u.input_tokens, u.cache_read_input_tokens), (50, 0));
    }

    fn chunk(
        content: Option<&str>,
        finish: Option<FinishReason>,
        usage: Option<OpenAiUsage>,
    ) -> ChatCompletionChunk {
        serde_json::from_value(json!({
            "id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish, "logprobs": null}],
            "usage": usage,
        }))
        .unwrap()
    }

    #[test]
    fn a_stream_reports_the_cache_in_message_start_and_message_delta() {
        let mut t = StreamTranslator::new("msg_1".into(), "m".into());
        // The role chunk, before the prompt is read: nothing known yet, nothing sent.
        let first = t.chunk(&chunk(Some(""), None, Some(OpenAiUsage::new(4100, 0))));
        assert!(first.is_empty(), "{first:?}");
        // The prompt is read: the cache's figures are known and message_start carries them.
        let read = t.chunk(&chunk(
            Some(""),
            None,
            Some(openai_usage(4100, 0, 3968, 128)),
        ));
        assert_eq!(read[0].0, "message_start");
        let u = &read[0].1["message"]["usage"];
        assert_eq!(u["cache_read_input_tokens"], 3968);
        assert_eq!(u["cache_creation_input_tokens"], 128);
        assert_eq!(u["input_tokens"], 4);
        t.chunk(&chunk(
            Some("Hi"),
            None,
            Some(openai_usage(4100, 1, 3968, 128)),
        ));
        t.chunk(&chunk(
            None,
            Some(FinishReason::Stop),
            Some(openai_usage(4100, 2, 3968, 128)),
        ));
        let end = t.finish();
        let delta = end.iter().find(|e| e.0 == "message_delta").unwrap();
        assert_eq!(delta.1["usage"]["cache_read_input_tokens"], 3968);
        assert_eq!(delta.1["usage"]["output_tokens"], 2);
    }

    #[test]
    fn an_answer_before_any_usage_still_starts_the_message() {
        let mut t = StreamTranslator::new("msg_1".into(), "m".into());
        let ev = t.chunk(&chunk(Some("Hi"), None, None));
        assert_eq!(ev[0].0, "message_start");
        assert_eq!(ev[1].0, "content_block_start");
    }
}
