//! The neuron's one error type. Each error knows its HTTP status and its short `error_type()`,
//! used in response bodies and metric labels; `api::respond` turns it into OpenAI's error shape.

use axum::http::StatusCode;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field of the request is wrong; `param` names it.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error(
        "model '{0}' is not loaded on this neuron; load it with POST /models/load or list models with GET /v1/models"
    )]
    ModelNotFound(String),
    #[error("model '{id}' is {state}, not ready; follow GET /models/{id} until it is ready")]
    ModelNotReady { id: String, state: &'static str },
    #[error(
        "this model's maximum context length is {context} tokens, but the request needs {needed} tokens ({prompt} in the prompt and {completion} for the completion); shorten the prompt or lower max_tokens"
    )]
    ContextLength {
        context: usize,
        needed: usize,
        prompt: usize,
        completion: usize,
    },
    #[error(
        "model '{model}' has {queued} requests waiting, the most this neuron queues; retry after {retry_after} s"
    )]
    QueueFull {
        model: String,
        queued: usize,
        retry_after: u64,
    },
    #[error(
        "not enough memory on {device} for model '{id}': needs {needed} bytes ({needed_h}), {free} bytes ({free_h}) free; unload a model or pick a smaller quant or context length"
    )]
    InsufficientMemory {
        id: String,
        device: String,
        needed: u64,
        free: u64,
        needed_h: String,
        free_h: String,
    },
    #[error("model '{id}' is already {state} from {existing}; unload it first to load {requested}")]
    IdConflict {
        id: String,
        state: &'static str,
        existing: String,
        requested: String,
    },
    #[error(
        "request body is larger than this neuron's limit of {limit} bytes; send a smaller request or raise the neuron's --max-body-bytes (CORTEX_MAX_BODY_BYTES)"
    )]
    PayloadTooLarge { limit: usize },
    #[error(
        "missing or wrong bearer token; send 'Authorization: Bearer <token>' with the neuron's --token"
    )]
    Unauthorized,
    /// Resolving or loading a model failed; the message says what was tried.
    #[error("{0}")]
    Load(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Error::InvalidRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidRequest { .. } | Error::ContextLength { .. } => StatusCode::BAD_REQUEST,
            Error::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Error::ModelNotReady { .. } | Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::InsufficientMemory { .. } | Error::IdConflict { .. } => StatusCode::CONFLICT,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::Load(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Short, bounded name: the OpenAI `type` field and a metric label value.
    pub fn error_type(&self) -> &'static str {
        match self {
            Error::InvalidRequest { .. } | Error::PayloadTooLarge { .. } => "invalid_request_error",
            Error::ContextLength { .. } => "invalid_request_error",
            Error::ModelNotFound(_) => "invalid_request_error",
            Error::ModelNotReady { .. } | Error::Unavailable(_) => "service_unavailable",
            Error::QueueFull { .. } => "rate_limit_exceeded",
            Error::InsufficientMemory { .. } => "insufficient_memory",
            Error::IdConflict { .. } => "conflict",
            Error::Unauthorized => "authentication_error",
            Error::Load(_) => "load_failed",
            Error::Internal(_) => "server_error",
        }
    }

    /// OpenAI's `code` field, where OpenAI has one for this case.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Error::ModelNotFound(_) => Some("model_not_found"),
            Error::ContextLength { .. } => Some("context_length_exceeded"),
            Error::QueueFull { .. } => Some("rate_limit_exceeded"),
            Error::Unauthorized => Some("invalid_api_key"),
            Error::InsufficientMemory { .. } => Some("insufficient_memory"),
            _ => None,
        }
    }

    pub fn param(&self) -> Option<&'static str> {
        match self {
            Error::InvalidRequest { param, .. } => *param,
            Error::ModelNotFound(_) => Some("model"),
            Error::ContextLength { .. } => Some("messages"),
            _ => None,
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Error::QueueFull { retry_after, .. } => Some(*retry_after),
            Error::ModelNotReady { .. } => Some(5),
            _ => None,
        }
    }

    pub fn body(&self) -> cortex_core::openai::ErrorBody {
        cortex_core::openai::ErrorBody {
            error: cortex_core::openai::ErrorDetail {
                message: self.to_string(),
                kind: self.error_type().to_string(),
                param: self.param().map(str::to_string),
                code: self.code().map(str::to_string),
                needed_bytes: match self {
                    Error::InsufficientMemory { needed, .. } => Some(*needed),
                    _ => None,
                },
                free_bytes: match self {
                    Error::InsufficientMemory { free, .. } => Some(*free),
                    _ => None,
                },
            },
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Internal(e.to_string())
    }
}

/// `1.5 GiB`-style sizes for messages.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insufficient_memory_names_both_sizes() {
        let e = Error::InsufficientMemory {
            id: "m".into(),
            device: "cpu".into(),
            needed: 3 << 30,
            free: 1 << 30,
            needed_h: human_bytes(3 << 30),
            free_h: human_bytes(1 << 30),
        };
        assert_eq!(e.status(), StatusCode::CONFLICT);
        let msg = e.to_string();
        assert!(msg.contains("3.0 GiB") && msg.contains("1.0 GiB"), "{msg}");
    }
}
