//! The gateway's one error type; each error knows its HTTP status and `error_type()`, and is
//! written in the caller's dialect by the one responder in `dialect`. The OpenAI body is also
//! the neurons' wire shape, which the forward layer writes when a relayed stream breaks.

use axum::http::StatusCode;

/// Seconds a caller is told to wait before retrying a model that is not ready yet.
pub const RETRY_AFTER_SECS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("model '{0}' is not served by this gateway; list models with GET /v1/models")]
    ModelNotFound(String),
    #[error(
        "model '{model}' could not be loaded in {secs} s; the load goes on, retry after {} s",
        RETRY_AFTER_SECS
    )]
    LoadTimeout { model: String, secs: u64 },
    #[error("{0}; retry after {secs} s", secs = RETRY_AFTER_SECS)]
    NoCapacity(String),
    #[error("{0}")]
    Upstream(String),
    #[error("missing or wrong API key; send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")]
    Unauthorized,
    #[error(
        "request body is larger than this gateway's limit of {limit} bytes; send a smaller request or raise [gateway] max_body_bytes in cortex.toml (--max-body-bytes in Kubernetes mode)"
    )]
    BodyTooLarge { limit: usize },
    /// The gateway took the body but the neuron's own limit (`--max-body-bytes`) is lower; its
    /// message names that limit.
    #[error("neuron '{neuron}' refused the request body: {message}")]
    NeuronBodyTooLarge { neuron: String, message: String },
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Config(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Error::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Error::LoadTimeout { .. } | Error::NoCapacity(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Upstream(_) => StatusCode::BAD_GATEWAY,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::BodyTooLarge { .. } | Error::NeuronBodyTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
        }
    }

    pub fn error_type(&self) -> &'static str {
        match self {
            Error::Config(_) => "server_error",
            Error::InvalidRequest { .. }
            | Error::ModelNotFound(_)
            | Error::BodyTooLarge { .. }
            | Error::NeuronBodyTooLarge { .. } => "invalid_request_error",
            Error::LoadTimeout { .. } | Error::NoCapacity(_) => "service_unavailable",
            Error::Upstream(_) => "upstream_error",
            Error::Unauthorized => "authentication_error",
        }
    }

    pub fn code(&self) -> Option<&'static str> {
        match self {
            Error::ModelNotFound(_) => Some("model_not_found"),
            Error::Unauthorized => Some("invalid_api_key"),
            Error::BodyTooLarge { .. } | Error::NeuronBodyTooLarge { .. } => {
                Some("request_too_large")
            }
            _ => None,
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Error::LoadTimeout { .. } | Error::NoCapacity(_) => Some(RETRY_AFTER_SECS),
            _ => None,
        }
    }

    pub fn openai_body(&self) -> cortex_core::openai::ErrorBody {
        cortex_core::openai::ErrorBody {
            error: cortex_core::openai::ErrorDetail {
                message: self.to_string(),
                kind: self.error_type().into(),
                param: match self {
                    Error::InvalidRequest { param, .. } => param.map(str::to_string),
                    Error::ModelNotFound(_) => Some("model".into()),
                    _ => None,
                },
                code: self.code().map(str::to_string),
                needed_bytes: None,
                free_bytes: None,
            },
        }
    }

    /// The OpenAI error body as a stream's error event carries it: with `retry_after` (seconds)
    /// in the error object when the caller should retry, since a stream has no `Retry-After`
    /// header left to set.
    pub fn openai_event(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self.openai_body()).unwrap_or_default();
        if let Some(s) = self.retry_after() {
            v["error"]["retry_after"] = s.into();
        }
        v
    }
}

/// An error with its causes, `outer: inner: …` ("error sending request …: connection refused";
/// hyper's own message alone says only "client error"); a cause already in the text is not
/// repeated.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        src = s.source();
    }
    out
}

/// The message of a neuron's OpenAI-shaped error body (or the body itself when it is not one),
/// to pass on in the caller's dialect or in a gateway error.
pub fn neuron_message(body: &[u8]) -> String {
    serde_json::from_slice::<cortex_core::openai::ErrorBody>(body)
        .map(|e| e.error.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}
