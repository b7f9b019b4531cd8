//! `cortex probe`: checks a host end to end. Against a neuron it loads the model (following the
//! download and load with progress), sends one streaming chat completion, and prints the answer,
//! time to first token and decode speed. Against a gateway it skips the load (the gateway loads on
//! demand) and sends the chat request there.
//!
//! The point is the failure path: whatever goes wrong, the probe prints the method, URL, HTTP
//! status and the body the server answered (an unknown quant with the quants the repository has,
//! a model that does not fit with both sizes, a wrong token), and exits non-zero, so a host that
//! does not work says why rather than "probe failed".
//!
//! ```text
//! cortex probe --neuron http://gpu1:13131 --model unsloth/Qwen3-0.6B-GGUF:Q4_K_M
//! cortex probe --neuron http://gpu1:13131 --model file:///var/lib/cortex/models/x.gguf
//! cortex probe --gateway http://cortex:31313 --model qwen3 --api-key sk-…
//! ```

use std::io::Write;
use std::time::{Duration, Instant};

use clap::{ArgGroup, Args};
use cortex_core::neuron::{
    LoadRequest, ModelInfo, ModelSource, ModelState, NeuronStatus, UnloadRequest,
};
use cortex_core::openai::{
    ChatCompletionChunk, ChatCompletionRequest, ChatMessage, ErrorBody, MessageContent,
    SamplingFields, StreamOptions, Usage,
};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::with_causes;

/// `cortex probe` flags.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("target").required(true).args(["neuron", "gateway"])))]
pub struct ProbeArgs {
    /// A neuron (`http://host:13131`): the model is loaded there first, then asked.
    #[arg(long)]
    pub neuron: Option<String>,
    /// A gateway (`http://host:31313`) instead: no load call, the gateway loads on demand.
    #[arg(long)]
    pub gateway: Option<String>,
    /// `OWNER/REPO[:QUANT]` (a Hugging Face GGUF repository), `OWNER/REPO/FILE.gguf`, or
    /// `file:///path/model.gguf` on the neuron's host. With `--gateway`: the served model name.
    #[arg(long)]
    pub model: String,
    /// Id to load the model under on the neuron (default: the file's stem, or the repository's
    /// name and quant).
    #[arg(long)]
    pub id: Option<String>,
    /// The question (one user message, temperature 0).
    #[arg(
        long,
        default_value = "What is the capital of France? Answer in one sentence."
    )]
    pub prompt: String,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: i64,
    /// Context length to load the model with (default: the neuron's `--default-context`).
    #[arg(long)]
    pub context_length: Option<usize>,
    /// The neuron's bearer token (its `--token`).
    #[arg(long, env = "CORTEX_NEURON_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A gateway API key, for `--gateway`.
    #[arg(long, env = "CORTEX_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Longest wait in seconds for each phase: the load (a download included) and the answer.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// Unload the model from the neuron after a successful probe.
    #[arg(long)]
    pub unload: bool,
}

/// Why a probe failed, with what the server said.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("--model '{model}': {why}")]
    BadModel { model: String, why: String },
    #[error("cannot reach the {what} at {url}: {cause}; {hint}")]
    Unreachable {
        what: &'static str,
        url: String,
        cause: String,
        hint: &'static str,
    },
    #[error("{method} {url} answered {status}: {message}\n  body: {body}")]
    Answered {
        method: Method,
        url: String,
        status: StatusCode,
        message: String,
        body: String,
    },
    #[error("model '{id}' failed to load: {message}\n  GET {url} answered: {body}")]
    LoadFailed {
        id: String,
        url: String,
        message: String,
        body: String,
    },
    #[error("{0}")]
    Timeout(String),
    #[error("the answer from {url} failed: {why}")]
    Stream { url: String, why: String },
}

type Result<T, E = ProbeError> = std::result::Result<T, E>;

/// A neuron or a gateway: its base URL, its credential, and one HTTP client.
struct Server {
    what: &'static str,
    base: String,
    auth: Option<String>,
    http: reqwest::Client,
}

/// Bound on each call that is not the answer's stream (the answer has `--timeout`).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

impl Server {
    fn new(what: &'static str, base: &str, auth: Option<String>) -> Self {
        Server {
            what,
            base: base.trim_end_matches('/').to_string(),
            auth,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .expect("a reqwest client with rustls builds"),
        }
    }

    /// What to check when the server cannot be reached.
    fn hint(&self) -> &'static str {
        if self.what == "neuron" {
            "check that the neuron runs there (systemctl status neuron, journalctl -u neuron), listens on that address (CORTEX_LISTEN in /etc/cortex/neuron.env) and that no firewall is in the way"
        } else {
            "check that `cortex serve` runs there, listens on that address and that no firewall is in the way"
        }
    }

    /// `base` joined with `segments`, each percent-encoded (a model id may hold `/` or `:`).
    fn url(&self, segments: &[&str]) -> String {
        match reqwest::Url::parse(&self.base) {
            Ok(mut u) => {
                if let Ok(mut p) = u.path_segments_mut() {
                    p.pop_if_empty().extend(segments);
                }
                u.to_string()
            }
            Err(_) => format!("{}/{}", self.base, segments.join("/")),
        }
    }

    /// Sends a request; an unreachable server or a non-2xx answer becomes an error that carries
    /// the status and the body.
    async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<&impl Serialize>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response> {
        let mut rb = self.http.request(method.clone(), url);
        if let Some(t) = timeout {
            rb = rb.timeout(t);
        }
        if let Some(a) = &self.auth {
            rb = rb.bearer_auth(a);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let res = rb.send().await.map_err(|e| ProbeError::Unreachable {
            what: self.what,
            url: url.to_string(),
            cause: with_causes(&e),
            hint: self.hint(),
        })?;
        if res.status().is_success() {
            return Ok(res);
        }
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        Err(ProbeError::Answered {
            method,
            url: url.to_string(),
            status,
            message: error_message(&body),
            body: if body.is_empty() {
                "(empty)".into()
            } else {
                body
            },
        })
    }

    /// [`Server::send`], then the answer's JSON as `T`.
    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        url: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let res = self
            .send(method.clone(), url, body, Some(CALL_TIMEOUT))
            .await?;
        let status = res.status();
        let text = res.text().await.map_err(|e| ProbeError::Unreachable {
            what: self.what,
            url: url.to_string(),
            cause: with_causes(&e),
            hint: self.hint(),
        })?;
        let v = serde_json::from_str(&text).map_err(|e| ProbeError::Answered {
            method,
            url: url.to_string(),
            status,
            message: format!(
                "not the {} API's JSON ({e}); is this a {}?",
                self.what, self.what
            ),
            body: text.clone(),
        })?;
        Ok(v)
    }
}

/// The message of an OpenAI-shaped error body, or the body itself.
fn error_message(body: &str) -> String {
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(e) => e.error.message,
        Err(_) if body.trim().is_empty() => "(empty body)".into(),
        Err(_) => body.trim().to_string(),
    }
}

/// `--model` as a load source and the id it is loaded under by default.
fn parse_model(model: &str) -> Result<(ModelSource, String)> {
    let bad = |why: &str| ProbeError::BadModel {
        model: model.to_string(),
        why: why.to_string(),
    };
    let uri = if model.starts_with('/') {
        Some(format!("file://{model}"))
    } else if model.starts_with("file://") {
        Some(model.to_string())
    } else if model.contains("://") {
        return Err(bad(
            "only file:// URIs and Hugging Face repositories (OWNER/REPO[:QUANT]) are supported",
        ));
    } else {
        None
    };
    if let Some(uri) = uri {
        let stem = std::path::Path::new(uri.trim_start_matches("file://"))
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .ok_or_else(|| bad("the URI names no file"))?;
        return Ok((ModelSource::Uri { uri }, sanitize(&stem)));
    }
    let (path, quant) = match model.split_once(':') {
        Some((p, q)) if !q.is_empty() => (p, Some(q.to_string())),
        Some(_) => return Err(bad("nothing after ':'; give a quant such as Q4_K_M")),
        None => (model, None),
    };
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(bad(
            "expected OWNER/REPO[:QUANT] (a Hugging Face GGUF repository) or file:///path/model.gguf",
        ));
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    let file = (parts.len() > 2).then(|| parts[2..].join("/"));
    if file.is_some() && quant.is_some() {
        return Err(bad("give a file or a quant, not both"));
    }
    let id = match (&file, &quant) {
        (Some(f), _) => std::path::Path::new(f)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| parts[1].to_string()),
        (None, Some(q)) => format!("{}:{q}", parts[1]),
        (None, None) => parts[1].to_string(),
    };
    Ok((
        ModelSource::Repo {
            repo,
            quant,
            file,
            revision: None,
            tokenizer_repo: None,
        },
        sanitize(&id),
    ))
}

/// Keeps an id within what the neuron accepts (letters, digits and `- _ . :`).
fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':') {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect()
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn say(line: impl std::fmt::Display) {
    eprintln!("probe: {line}");
}

/// Runs the probe; prints progress to stderr, the answer and its timings to stdout.
pub async fn run(args: &ProbeArgs) -> Result<()> {
    let timeout = Duration::from_secs(args.timeout.max(1));
    let (server, model) = match (&args.neuron, &args.gateway) {
        (Some(url), _) => {
            let neuron = Server::new("neuron", url, args.token.clone());
            let (source, default_id) = parse_model(&args.model)?;
            let id = args.id.clone().unwrap_or(default_id);
            describe(&neuron).await?;
            load(&neuron, &id, source, args.context_length, timeout).await?;
            (neuron, id)
        }
        (None, Some(url)) => {
            let gateway = Server::new("gateway", url, args.api_key.clone());
            let model = args.model.clone();
            say(format_args!(
                "asking the gateway at {} for '{model}' (it loads the model on demand)",
                gateway.base
            ));
            (gateway, model)
        }
        (None, None) => unreachable!("clap requires --neuron or --gateway"),
    };
    let report = chat(&server, &model, args, timeout).await?;
    println!("{}", report.summary());
    if args.unload && server.what == "neuron" {
        let url = server.url(&["models", "unload"]);
        server
            .json::<ModelInfo>(
                Method::POST,
                &url,
                Some(&UnloadRequest { id: model.clone() }),
            )
            .await?;
        say(format_args!("unloaded '{model}'"));
    }
    Ok(())
}

/// Prints the neuron's node, version and devices; the first call, so an unreachable neuron or a
/// wrong token shows here.
async fn describe(neuron: &Server) -> Result<()> {
    let url = neuron.url(&["status"]);
    let st: NeuronStatus = neuron.json(Method::GET, &url, None::<&()>).await?;
    say(format_args!(
        "neuron {} (version {}) at {}",
        st.node, st.version, neuron.base
    ));
    for d in &st.devices {
        say(format_args!(
            "  device {} {} ({}): {} free of {}",
            d.kind,
            d.index,
            d.name,
            gib(d.memory_free),
            gib(d.memory_total)
        ));
    }
    for m in &st.models {
        say(format_args!(
            "  model {} {} ({})",
            m.id,
            m.state.as_str(),
            m.source
        ));
    }
    Ok(())
}

/// `POST /models/load`, then `GET /models/{id}` until ready, failed or `timeout`.
async fn load(
    neuron: &Server,
    id: &str,
    source: ModelSource,
    context_length: Option<usize>,
    timeout: Duration,
) -> Result<()> {
    let started = Instant::now();
    say(format_args!("loading '{id}' from {source}"));
    let req = LoadRequest {
        id: id.to_string(),
        source,
        device: None,
        context_length,
    };
    let mut info: ModelInfo = neuron
        .json(Method::POST, &neuron.url(&["models", "load"]), Some(&req))
        .await?;
    let url = neuron.url(&["models", id]);
    let mut shown: Option<(ModelState, u32)> = None;
    loop {
        // Progress in steps of 5 %, and every change of state while it lasts.
        let step = (info.progress.clamp(0.0, 1.0) * 20.0) as u32;
        let underway = matches!(info.state, ModelState::Downloading | ModelState::Loading);
        if underway && shown != Some((info.state, step)) {
            shown = Some((info.state, step));
            say(format_args!(
                "  {} {:.0}%",
                info.state.as_str(),
                info.progress * 100.0
            ));
        }
        match info.state {
            ModelState::Ready => break,
            ModelState::Failed => {
                return Err(ProbeError::LoadFailed {
                    id: id.to_string(),
                    message: info
                        .error
                        .clone()
                        .unwrap_or_else(|| "(no reason given)".into()),
                    body: serde_json::to_string(&info).unwrap_or_default(),
                    url,
                });
            }
            ModelState::Unloading => {
                return Err(ProbeError::LoadFailed {
                    id: id.to_string(),
                    message: "the neuron is unloading it; run the probe again when it is gone"
                        .into(),
                    body: serde_json::to_string(&info).unwrap_or_default(),
                    url,
                });
            }
            ModelState::Downloading | ModelState::Loading => {}
        }
        if started.elapsed() > timeout {
            return Err(ProbeError::Timeout(format!(
                "model '{id}' is still {} ({:.0}%) after {} s; raise --timeout or follow GET {url}",
                info.state.as_str(),
                info.progress * 100.0,
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        info = neuron.json(Method::GET, &url, None::<&()>).await?;
    }
    say(format_args!(
        "'{id}' ready in {:.1} s: {} ({}) on {}, context {} tokens",
        started.elapsed().as_secs_f64(),
        info.architecture.as_deref().unwrap_or("?"),
        gib(info.bytes),
        info.device,
        info.context_length
    ));
    Ok(())
}

/// What one streamed answer measured.
struct Report {
    /// From sending the request to the first piece of text.
    ttft: Duration,
    /// From the first piece of text to the end of the answer.
    decode: Duration,
    usage: Option<Usage>,
    /// Text chunks seen, the token count when the server sent no usage.
    chunks: u32,
}

impl Report {
    fn summary(&self) -> String {
        let tokens = self
            .usage
            .map(|u| u.completion_tokens)
            .unwrap_or(self.chunks);
        // The first token's time is TTFT; speed counts the tokens after it.
        let rate = if tokens > 1 && self.decode > Duration::ZERO {
            format!(
                "{:.1} tok/s",
                f64::from(tokens - 1) / self.decode.as_secs_f64()
            )
        } else {
            "- tok/s (too few tokens to time)".into()
        };
        let prompt = self
            .usage
            .map(|u| format!(", prompt {} tokens", u.prompt_tokens))
            .unwrap_or_default();
        format!(
            "TTFT {:.3} s, {tokens} tokens, {rate}{prompt}",
            self.ttft.as_secs_f64()
        )
    }
}

/// Sends one streaming chat completion and prints its text as it arrives.
async fn chat(server: &Server, model: &str, args: &ProbeArgs, timeout: Duration) -> Result<Report> {
    let url = server.url(&["v1", "chat", "completions"]);
    let req = ChatCompletionRequest {
        model: model.to_string(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: Some(MessageContent::Text(args.prompt.clone())),
            ..Default::default()
        }],
        sampling: SamplingFields {
            max_tokens: Some(args.max_tokens),
            temperature: Some(0.0),
            stream: Some(true),
            stream_options: Some(StreamOptions {
                include_usage: true,
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    say(format_args!("asking '{model}': {}", args.prompt));
    match tokio::time::timeout(timeout, stream_answer(server, &url, &req)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(format!(
            "no complete answer from {url} within {} s; raise --timeout",
            timeout.as_secs()
        ))),
    }
}

async fn stream_answer(server: &Server, url: &str, req: &ChatCompletionRequest) -> Result<Report> {
    let broke = |why: String| ProbeError::Stream {
        url: url.to_string(),
        why,
    };
    let sent = Instant::now();
    let res = server.send(Method::POST, url, Some(req), None).await?;
    let mut body = res.bytes_stream();
    // Bytes, not text: a character may straddle two network chunks.
    let mut buf: Vec<u8> = Vec::new();
    let mut first: Option<Instant> = None;
    let mut usage = None;
    let mut chunks = 0;
    let mut waiting_said = false;
    let mut out = std::io::stdout();
    loop {
        let Some(bytes) = body.next().await else {
            return Err(broke(
                "the stream ended before [DONE]; the server's log says why".into(),
            ));
        };
        let bytes = bytes.map_err(|e| broke(with_causes(&e)))?;
        buf.extend(bytes.iter().filter(|&&b| b != b'\r'));
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                if let Some(comment) = line.strip_prefix(':') {
                    // A keep-alive comment: the gateway is loading the model.
                    if !waiting_said {
                        waiting_said = true;
                        say(format_args!("  waiting: {}", comment.trim()));
                    }
                    continue;
                }
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if data == "[DONE]" {
                    let _ = writeln!(out);
                    let first = first.unwrap_or_else(Instant::now);
                    return Ok(Report {
                        ttft: first - sent,
                        decode: first.elapsed(),
                        usage,
                        chunks,
                    });
                }
                if let Ok(err) = serde_json::from_str::<ErrorBody>(data) {
                    if chunks > 0 {
                        let _ = writeln!(out);
                    }
                    return Err(broke(format!("{}\n  event: {data}", err.error.message)));
                }
                let chunk: ChatCompletionChunk = serde_json::from_str(data).map_err(|e| {
                    broke(format!(
                        "an event is not a chat completion chunk ({e}): {data}"
                    ))
                })?;
                if let Some(u) = chunk.usage {
                    usage = Some(u);
                }
                for c in &chunk.choices {
                    if let Some(text) = c.delta.content.as_deref().filter(|t| !t.is_empty()) {
                        first.get_or_insert_with(Instant::now);
                        chunks += 1;
                        let _ = write!(out, "{text}");
                        let _ = out.flush();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_and_quant_become_a_repo_source_named_after_the_repo() {
        let (s, id) = parse_model("unsloth/Qwen3-0.6B-GGUF:Q4_K_M").unwrap();
        assert_eq!(s.to_string(), "unsloth/Qwen3-0.6B-GGUF:Q4_K_M");
        assert_eq!(id, "Qwen3-0.6B-GGUF:Q4_K_M");
        let (s, id) = parse_model("unsloth/Qwen3-0.6B-GGUF/sub/x.Q8_0.gguf").unwrap();
        assert_eq!(s.to_string(), "unsloth/Qwen3-0.6B-GGUF/sub/x.Q8_0.gguf");
        assert_eq!(id, "x.Q8_0");
    }

    #[test]
    fn a_file_uri_or_path_is_named_after_its_stem() {
        let (s, id) = parse_model("file:///var/lib/cortex/models/SmolLM2.Q4_1.gguf").unwrap();
        assert_eq!(
            s,
            ModelSource::Uri {
                uri: "file:///var/lib/cortex/models/SmolLM2.Q4_1.gguf".into()
            }
        );
        assert_eq!(id, "SmolLM2.Q4_1");
        let (s, _) = parse_model("/srv/m/x.gguf").unwrap();
        assert_eq!(s.to_string(), "file:///srv/m/x.gguf");
    }

    #[test]
    fn malformed_models_say_what_is_expected() {
        for m in [
            "qwen3",
            "https://x/y.gguf",
            "a/b:",
            "a//b",
            "a/b/c.gguf:Q4_0",
        ] {
            let e = parse_model(m).unwrap_err().to_string();
            assert!(e.contains(m), "{e}");
        }
    }

    #[test]
    fn error_bodies_give_their_message_and_other_bodies_themselves() {
        assert_eq!(
            error_message(r#"{"error":{"message":"no","type":"t","param":null,"code":null}}"#),
            "no"
        );
        assert_eq!(error_message("Bad Gateway\n"), "Bad Gateway");
    }
}
