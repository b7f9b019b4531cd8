//! The OpenAI dialect: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, streaming and not.
//! Requests are validated into a [`GenRequest`] before they are queued; messages quote the field.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use cortex_core::openai::{
    ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage,
    ChunkChoice, Completion, CompletionChoice, CompletionRequest, Delta, FinishReason,
    MessageContent, ModelCard, ModelList, SamplingFields, ToolCall, Usage,
};
use futures::Stream;
use tokio::sync::mpsc;

use super::{ApiJson, AppState};
use crate::engine::sampling::SamplingParams;
use crate::engine::{GenEvent, GenRequest, LoadedModel};
use crate::error::{Error, Result};
use crate::registry::Entry;
use crate::template::TemplateMessage;
use crate::toolcall::ToolParser;

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

pub async fn models(State(st): State<Arc<AppState>>) -> Json<ModelList> {
    let data = st
        .registry
        .list()
        .into_iter()
        .map(|e| {
            let info = e.info();
            let mut extra = serde_json::Map::new();
            extra.insert("state".into(), serde_json::json!(info.state));
            extra.insert(
                "context_length".into(),
                serde_json::json!(info.context_length),
            );
            ModelCard {
                id: info.id,
                object: "model".into(),
                created: info.loaded_at.unwrap_or(0),
                owned_by: "cortex".into(),
                extra,
            }
        })
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
}

/// Validated sampling and length settings.
struct Params {
    sampling: SamplingParams,
    max_tokens: Option<usize>,
    stop: Vec<String>,
    ignore_eos: bool,
    stream: bool,
    include_usage: bool,
    /// vLLM's `continuous_usage_stats`: usage on every chunk.
    continuous_usage: bool,
}

fn range(param: &'static str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f64>> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(Error::invalid(
            param,
            format!("{param} must be between {lo} and {hi}, got {x}"),
        )),
        other => Ok(other),
    }
}

fn validate(s: &SamplingFields) -> Result<Params> {
    if let Some(n) = s.n.filter(|n| *n != 1) {
        return Err(Error::invalid(
            "n",
            format!("n must be 1 (one choice per request), got {n}"),
        ));
    }
    let max_tokens = match (s.max_completion_tokens, s.max_tokens) {
        (Some(v), _) => Some(("max_completion_tokens", v)),
        (None, Some(v)) => Some(("max_tokens", v)),
        _ => None,
    };
    let max_tokens = match max_tokens {
        Some((p, v)) if v < 1 => {
            return Err(Error::invalid(
                p,
                format!("{p} must be at least 1, got {v}"),
            ));
        }
        Some((_, v)) => Some(v as usize),
        None => None,
    };
    let temperature = range("temperature", s.temperature, 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = range("top_p", s.top_p, 0.0, 1.0)?;
    if top_p == Some(0.0) {
        return Err(Error::invalid(
            "top_p",
            "top_p must be greater than 0 and at most 1, got 0",
        ));
    }
    let top_k = match s.top_k {
        Some(k) if k < -1 => {
            return Err(Error::invalid(
                "top_k",
                format!("top_k must be -1 or 0 (off) or a positive number, got {k}"),
            ));
        }
        Some(k) if k > 0 => Some(k as usize),
        _ => None,
    };
    let presence = range("presence_penalty", s.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let frequency = range("frequency_penalty", s.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let stop = s.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > 16 {
        return Err(Error::invalid(
            "stop",
            format!("at most 16 stop sequences, got {}", stop.len()),
        ));
    }
    Ok(Params {
        sampling: SamplingParams {
            temperature,
            top_p: top_p.filter(|p| *p < 1.0),
            top_k,
            seed: s.seed.unwrap_or_else(rand::random),
            presence_penalty: presence as f32,
            frequency_penalty: frequency as f32,
        },
        max_tokens,
        stop,
        ignore_eos: s.ignore_eos.unwrap_or(false),
        stream: s.stream.unwrap_or(false),
        include_usage: s.stream_options.as_ref().is_some_and(|o| o.include_usage),
        continuous_usage: s
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage && o.continuous_usage_stats),
    })
}

fn find(st: &AppState, model: &str) -> Result<(Arc<Entry>, Arc<LoadedModel>)> {
    if model.is_empty() {
        return Err(Error::invalid(
            "model",
            "model is required; list models with GET /v1/models",
        ));
    }
    let entry = st
        .registry
        .get(model)
        .ok_or_else(|| Error::ModelNotFound(model.to_string()))?;
    let lm = entry.ready()?;
    Ok((entry, lm))
}

fn template_messages(messages: &[ChatMessage]) -> Result<Vec<TemplateMessage>> {
    if messages.is_empty() {
        return Err(Error::invalid(
            "messages",
            "messages must hold at least one message",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(Error::invalid(
                    "messages",
                    format!("messages[{i}].role '{}' is not one of {}", m.role, ROLES.join(", ")),
                ));
            }
            let content = match &m.content {
                Some(c) => c.text().map_err(|kind| {
                    Error::invalid(
                        "messages",
                        format!("messages[{i}].content has a part of type '{kind}'; this model takes text parts only"),
                    )
                })?,
                None if m.role == "assistant" && m.tool_calls.is_some() => String::new(),
                None => {
                    return Err(Error::invalid("messages", format!("messages[{i}].content is required")));
                }
            };
            Ok(TemplateMessage {
                role: if m.role == "developer" { "system".into() } else { m.role.clone() },
                content,
                name: m.name.clone(),
                tool_calls: m.tool_calls.as_ref().and_then(|t| serde_json::to_value(t).ok()),
                tool_call_id: m.tool_call_id.clone(),
            })
        })
        .collect()
}

/// Checks the prompt against the context and works out the completion budget.
fn budget(lm: &LoadedModel, prompt: usize, max_tokens: Option<usize>) -> Result<usize> {
    let context = lm.model.max_len;
    let completion = max_tokens.unwrap_or(context.saturating_sub(prompt));
    if prompt == 0 {
        return Err(Error::invalid("prompt", "the prompt is empty"));
    }
    if prompt + completion.max(1) > context {
        return Err(Error::ContextLength {
            context,
            needed: prompt + completion.max(1),
            prompt,
            completion: completion.max(1),
        });
    }
    Ok(completion)
}

fn now() -> u64 {
    crate::now_secs()
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Queues a request and returns the receiver of its events.
fn start(
    st: &AppState,
    entry: &Entry,
    prompt: Vec<u32>,
    max_tokens: usize,
    p: &Params,
) -> Result<mpsc::UnboundedReceiver<GenEvent>> {
    let (tx, rx) = mpsc::unbounded_channel();
    entry.submit(
        GenRequest {
            prompt,
            max_tokens,
            sampling: p.sampling.clone(),
            stop: p.stop.clone(),
            ignore_eos: p.ignore_eos,
            tx,
            arrived: Instant::now(),
        },
        st.registry.settings.max_queue,
        &st.metrics,
    )?;
    Ok(rx)
}

/// Collects a whole answer.
async fn collect(
    mut rx: mpsc::UnboundedReceiver<GenEvent>,
) -> Result<(String, FinishReason, Option<String>, Usage)> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Prompt { .. } => {}
            GenEvent::Text(t, _) => text.push_str(&t),
            GenEvent::Done {
                finish,
                stop,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                cache_creation_tokens,
            } => {
                return Ok((
                    text,
                    finish,
                    stop,
                    Usage::cached(
                        prompt_tokens as u32,
                        completion_tokens as u32,
                        cached_tokens as u32,
                        cache_creation_tokens as u32,
                    ),
                ));
            }
            GenEvent::Error(e) => return Err(Error::Unavailable(e)),
        }
    }
    Err(Error::Unavailable(
        "the model stopped before finishing the answer".into(),
    ))
}

/// The prompt tokens of a chat: the messages rendered with the model's template, tokenized.
fn chat_prompt(
    lm: &LoadedModel,
    model: &str,
    messages: &[ChatMessage],
    tools: Option<&[serde_json::Value]>,
) -> Result<Vec<u32>> {
    let messages = template_messages(messages)?;
    let template = lm.template.as_ref().ok_or_else(|| {
        Error::invalid(
            "messages",
            format!("model '{model}' has no chat template (none in its GGUF or tokenizer_config.json); use /v1/completions"),
        )
    })?;
    let special =
        |t: &Option<(u32, String)>| t.as_ref().map(|(_, s)| s.clone()).unwrap_or_default();
    let text = template.render(
        &messages,
        tools,
        &special(&lm.tokenizer.bos),
        &special(&lm.tokenizer.eos),
    )?;
    lm.tokenizer.encode(&text, false)
}

/// `POST /tokenize` (as vLLM has it): `{model, messages}` or `{model, prompt}` → the token count,
/// so a gateway can answer Anthropic's `count_tokens` exactly.
#[derive(serde::Deserialize)]
pub struct TokenizeRequest {
    model: String,
    #[serde(default)]
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    tools: Option<Vec<serde_json::Value>>,
}

pub async fn tokenize(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<serde_json::Value>> {
    let (_, lm) = find(&st, &req.model)?;
    let tokens = match (&req.messages, &req.prompt) {
        (Some(m), None) => chat_prompt(&lm, &req.model, m, req.tools.as_deref())?,
        (None, Some(p)) => lm.tokenizer.encode(p, lm.tokenizer.add_bos)?,
        _ => return Err(Error::invalid("messages", "send either messages or prompt")),
    };
    Ok(Json(serde_json::json!({
        "count": tokens.len(),
        "max_model_len": lm.model.max_len,
        "tokens": tokens,
    })))
}

pub async fn chat(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response> {
    let p = validate(&req.sampling)?;
    let (entry, lm) = find(&st, &req.model)?;
    let prompt = chat_prompt(&lm, &req.model, &req.messages, req.tools.as_deref())?;
    let max_tokens = budget(&lm, prompt.len(), p.max_tokens)?;
    let usage = UsageMode::of(&p, prompt.len());
    let rx = start(&st, &entry, prompt, max_tokens, &p)?;
    let id = request_id("chatcmpl");
    // Tool calls in the output are parsed when the caller offered tools and did not turn them off.
    let tools = req.tools.as_ref().is_some_and(|t| !t.is_empty())
        && req.tool_choice.as_ref().and_then(|c| c.as_str()) != Some("none");
    if p.stream {
        let parser = tools.then(ToolParser::default);
        return Ok(sse(ChunkKind::Chat, id, req.model, rx, usage, parser));
    }
    let (mut text, mut finish, mut stop_reason, usage) = collect(rx).await?;
    let mut tool_calls = None;
    if tools {
        let mut parser = ToolParser::default();
        let head = parser.push(&text);
        let (rest, calls) = parser.finish();
        if !calls.is_empty() {
            text = head + &rest;
            finish = FinishReason::ToolCalls;
            stop_reason = None;
            tool_calls = Some(calls);
        }
    }
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion".into(),
        created: now(),
        model: req.model,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatMessage {
                role: "assistant".into(),
                content: (tool_calls.is_none() || !text.is_empty())
                    .then_some(MessageContent::Text(text)),
                tool_calls,
                ..Default::default()
            },
            finish_reason: Some(finish),
            logprobs: None,
            stop_reason,
        }],
        usage,
    })
    .into_response())
}

pub async fn completions(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response> {
    let p = validate(&req.sampling)?;
    if req.echo == Some(true) {
        return Err(Error::invalid("echo", "echo is not supported"));
    }
    let prompt_text = match &req.prompt {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            return Err(Error::invalid(
                "prompt",
                "prompt must be a string (or a list holding one string)",
            ));
        }
    };
    let (entry, lm) = find(&st, &req.model)?;
    let prompt = lm.tokenizer.encode(&prompt_text, lm.tokenizer.add_bos)?;
    let max_tokens = budget(&lm, prompt.len(), p.max_tokens.or(Some(16)))?;
    let usage = UsageMode::of(&p, prompt.len());
    let rx = start(&st, &entry, prompt, max_tokens, &p)?;
    let id = request_id("cmpl");
    if p.stream {
        return Ok(sse(ChunkKind::Text, id, req.model, rx, usage, None));
    }
    let (text, finish, stop_reason, usage) = collect(rx).await?;
    Ok(Json(Completion {
        id,
        object: "text_completion".into(),
        created: now(),
        model: req.model,
        choices: vec![CompletionChoice {
            index: 0,
            text,
            finish_reason: Some(finish),
            logprobs: None,
            stop_reason,
        }],
        usage: Some(usage),
    })
    .into_response())
}

#[derive(Clone, Copy)]
enum ChunkKind {
    Chat,
    Text,
}

struct StreamState {
    kind: ChunkKind,
    id: String,
    model: String,
    created: u64,
    rx: mpsc::UnboundedReceiver<GenEvent>,
    usage: UsageMode,
    pending: VecDeque<Event>,
    finished: bool,
    /// Set when the caller offered tools: holds back text that may be a tool call.
    tools: Option<ToolParser>,
}

impl StreamState {
    fn chunk(
        &self,
        text: Option<String>,
        role: bool,
        finish: Option<(FinishReason, Option<String>)>,
        usage: Option<Usage>,
    ) -> Event {
        self.chunk_with(text, role, finish, usage, None)
    }

    fn chunk_with(
        &self,
        text: Option<String>,
        role: bool,
        finish: Option<(FinishReason, Option<String>)>,
        usage: Option<Usage>,
        tool_calls: Option<Vec<ToolCall>>,
    ) -> Event {
        let data = match self.kind {
            ChunkKind::Chat => serde_json::to_string(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                choices: if usage.is_some() && finish.is_none() && text.is_none() {
                    vec![]
                } else {
                    vec![ChunkChoice {
                        index: 0,
                        delta: Delta {
                            role: role.then(|| "assistant".into()),
                            content: text,
                            tool_calls,
                        },
                        finish_reason: finish.as_ref().map(|f| f.0),
                        stop_reason: finish.as_ref().and_then(|f| f.1.clone()),
                        logprobs: None,
                    }]
                },
                usage,
            }),
            ChunkKind::Text => serde_json::to_string(&Completion {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: if usage.is_some() && finish.is_none() && text.is_none() {
                    vec![]
                } else {
                    vec![CompletionChoice {
                        index: 0,
                        text: text.unwrap_or_default(),
                        finish_reason: finish.as_ref().map(|f| f.0),
                        stop_reason: finish.as_ref().and_then(|f| f.1.clone()),
                        logprobs: None,
                    }]
                },
                usage,
            }),
        };
        Event::default().data(data.unwrap_or_default())
    }
}

/// Which chunks of a stream carry `usage`.
#[derive(Clone, Copy)]
enum UsageMode {
    None,
    /// `stream_options.include_usage`: a last chunk with the totals.
    Final,
    /// `continuous_usage_stats` too: every chunk, the first with the prompt's token count,
    /// those after the prompt is read with its cached tokens.
    Continuous {
        prompt: usize,
        cached: Option<usize>,
    },
}

impl UsageMode {
    fn of(p: &Params, prompt: usize) -> Self {
        match (p.include_usage, p.continuous_usage) {
            (true, true) => UsageMode::Continuous {
                prompt,
                cached: None,
            },
            (true, false) => UsageMode::Final,
            _ => UsageMode::None,
        }
    }

    /// The usage a chunk sent after `generated` tokens carries.
    fn so_far(self, generated: usize) -> Option<Usage> {
        match self {
            UsageMode::Continuous {
                prompt,
                cached: None,
            } => Some(Usage::new(prompt as u32, generated as u32)),
            UsageMode::Continuous {
                prompt,
                cached: Some(c),
            } => Some(Usage::cached(prompt as u32, generated as u32, c as u32, 0)),
            _ => None,
        }
    }
}

/// Server-sent events: a role chunk, text chunks, a chunk with `finish_reason`, a usage chunk when
/// `stream_options.include_usage`, then `[DONE]`. An error mid-stream is sent as an OpenAI error
/// object (the SDKs raise it) before `[DONE]`.
fn sse(
    kind: ChunkKind,
    id: String,
    model: String,
    rx: mpsc::UnboundedReceiver<GenEvent>,
    usage: UsageMode,
    tools: Option<ToolParser>,
) -> Response {
    let mut st = StreamState {
        kind,
        id,
        model,
        created: now(),
        rx,
        usage,
        pending: VecDeque::new(),
        finished: false,
        tools,
    };
    if matches!(kind, ChunkKind::Chat) {
        let first = st.chunk(Some(String::new()), true, None, usage.so_far(0));
        st.pending.push_back(first);
    }
    let stream = futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(ev), st));
            }
            if st.finished {
                return None;
            }
            match st.rx.recv().await {
                Some(GenEvent::Prompt { cached_tokens }) => {
                    if let UsageMode::Continuous { cached, .. } = &mut st.usage {
                        *cached = Some(cached_tokens);
                    }
                }
                Some(GenEvent::Text(t, generated)) => {
                    let t = match st.tools.as_mut() {
                        Some(p) => p.push(&t),
                        None => t,
                    };
                    if !t.is_empty() {
                        let ev = st.chunk(Some(t), false, None, st.usage.so_far(generated));
                        st.pending.push_back(ev);
                    }
                }
                Some(GenEvent::Done {
                    mut finish,
                    mut stop,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                    cache_creation_tokens,
                }) => {
                    if let Some(p) = st.tools.take() {
                        let (rest, calls) = p.finish();
                        if !rest.is_empty() {
                            let ev = st.chunk(Some(rest), false, None, None);
                            st.pending.push_back(ev);
                        }
                        if !calls.is_empty() {
                            let ev = st.chunk_with(None, false, None, None, Some(calls));
                            st.pending.push_back(ev);
                            finish = FinishReason::ToolCalls;
                            stop = None;
                        }
                    }
                    let usage = Usage::cached(
                        prompt_tokens as u32,
                        completion_tokens as u32,
                        cached_tokens as u32,
                        cache_creation_tokens as u32,
                    );
                    let text = matches!(st.kind, ChunkKind::Text).then(String::new);
                    let ev = st.chunk(text, false, Some((finish, stop)), None);
                    st.pending.push_back(ev);
                    if !matches!(st.usage, UsageMode::None) {
                        let ev = st.chunk(None, false, None, Some(usage));
                        st.pending.push_back(ev);
                    }
                    st.pending.push_back(Event::default().data("[DONE]"));
                    st.finished = true;
                }
                Some(GenEvent::Error(e)) => {
                    let body = Error::Unavailable(e).body();
                    st.pending.push_back(
                        Event::default().data(serde_json::to_string(&body).unwrap_or_default()),
                    );
                    st.pending.push_back(Event::default().data("[DONE]"));
                    st.finished = true;
                }
                None => {
                    let body =
                        Error::Unavailable("the model stopped before finishing the answer".into())
                            .body();
                    st.pending.push_back(
                        Event::default().data(serde_json::to_string(&body).unwrap_or_default()),
                    );
                    st.finished = true;
                }
            }
        }
    });
    sse_response(stream)
}

fn sse_response(
    stream: impl Stream<Item = std::result::Result<Event, Infallible>> + Send + 'static,
) -> Response {
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
