//! Anthropic Messages ⇄ OpenAI chat completions. Requests are translated to the neurons' OpenAI
//! dialect; answers, stream events and errors are translated back.
//!
//! Failures seen in other gateways that this translation must not repeat (each has a test):
//! tool arguments dropped or sent as empty `input_json_delta`, `stop_sequences` ignored or the
//! matched sequence not reported, a length stop reported as `end_turn`, usage reported as zero,
//! text sent as an empty delta.

use cortex_core::anthropic::{
    Block, Content, MessagesRequest, MessagesResponse, ToolChoice, Usage,
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
                Block::Text { text } => Ok(text.clone()),
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
    let mut messages = Vec::new();
    // Claude Code also sends `system` messages among `messages` (its context reminders): their
    // text joins the system prompt, as chat templates take one system turn, at the start.
    let mut system = Vec::new();
    if let Some(s) = &req.system {
        system.push(text_of(s, "system")?);
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
                        Block::Text { text: t } => text.push_str(t),
                        Block::ToolResult {
                            tool_use_id,
                            content,
                            is_error,
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
                        Block::Text { text: t } => text.push_str(t),
                        Block::ToolUse { id, name, input } => calls.push(ToolCall {
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
            content.push(Block::Text { text });
        }
        for call in c.message.tool_calls.iter().flatten() {
            content.push(Block::ToolUse {
                id: call
                    .id
                    .clone()
                    .unwrap_or_else(|| format!("toolu_{}", content.len())),
                name: call.function.name.clone().unwrap_or_default(),
                input: tool_input(&call.function.arguments),
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
        usage: Usage {
            input_tokens: resp.usage.prompt_tokens,
            output_tokens: resp.usage.completion_tokens,
            ..Default::default()
        },
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
                "usage": {"input_tokens": self.usage.input_tokens, "output_tokens": self.usage.output_tokens,
                    "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
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
        if let Some(u) = c.usage {
            self.usage.input_tokens = u.prompt_tokens;
            self.usage.output_tokens = u.completion_tokens;
        }
        self.start(&mut out);
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
        out.push(("message_delta", json!({"type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": seq},
            "usage": {"input_tokens": self.usage.input_tokens, "output_tokens": self.usage.output_tokens}})));
        out.push(("message_stop", json!({"type": "message_stop"})));
        out
    }
}

/// One server-sent event in Anthropic's framing.
pub fn sse(event: &Event) -> bytes::Bytes {
    bytes::Bytes::from(format!("event: {}\ndata: {}\n\n", event.0, event.1))
}
