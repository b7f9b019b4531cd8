//! The dialects callers speak, OpenAI's and Anthropic's, turned into the neurons' OpenAI dialect
//! and back, and the one responder that writes every error in the caller's shape: as a JSON
//! answer with its status and `Retry-After`, or as the event that ends a stream.
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | [`Dialect`], the responder ([`Rejection`]), [`read_body`] |
//! | `openai.rs` | `/v1/chat/completions`, `/v1/completions` |
//! | `request_head.rs` | the routing fields of an OpenAI request, read without the rest |
//! | `anthropic/handlers.rs` | `/v1/messages`, `/v1/messages/count_tokens` |
//! | `anthropic/translate.rs` | Messages ⇄ chat completions, typed |
//! | `anthropic/stream.rs` | the Anthropic event stream over a relayed OpenAI one |

pub mod anthropic;
pub mod openai;
pub mod request_head;

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use cortex_core::anthropic::ErrorResponse;

use crate::error::{Error, neuron_message};
use crate::forward::sse;
pub use crate::metrics::Dialect;
use crate::metrics::{Counted, Named};

/// Why a request got no answer of its own.
#[derive(Debug)]
pub enum Cause {
    /// The gateway's own error.
    Gateway(Error),
    /// A neuron's error answer: its status, its `Retry-After` (a full queue's 429 has one) and
    /// its body, in the neurons' OpenAI shape.
    Neuron {
        status: StatusCode,
        retry_after: Option<HeaderValue>,
        body: Bytes,
    },
}

/// A request answered with an error in its caller's dialect: the one place errors become
/// responses and stream events.
#[derive(Debug)]
pub struct Rejection {
    pub dialect: Dialect,
    pub cause: Cause,
    /// The placement the request named, once known (for its count).
    pub model: Option<String>,
    /// The forward layer counted the request already.
    pub counted: bool,
}

impl Rejection {
    pub fn new(dialect: Dialect, e: Error) -> Self {
        Rejection {
            dialect,
            cause: Cause::Gateway(e),
            model: None,
            counted: false,
        }
    }

    /// A neuron's error answer, passed on in `dialect`.
    pub fn neuron(
        dialect: Dialect,
        status: StatusCode,
        retry_after: Option<HeaderValue>,
        body: Bytes,
    ) -> Self {
        Rejection {
            cause: Cause::Neuron {
                status,
                retry_after,
                body,
            },
            ..Rejection::new(dialect, Error::Upstream(String::new()))
        }
    }

    /// The request named the placement `model`.
    pub fn named(mut self, model: &str) -> Self {
        self.model = Some(model.to_string());
        self
    }

    /// The forward layer counted the request (every error it returns was counted where it arose).
    pub fn counted(mut self) -> Self {
        self.counted = true;
        self
    }

    fn status(&self) -> StatusCode {
        match &self.cause {
            Cause::Gateway(e) => e.status(),
            Cause::Neuron { status, .. } => *status,
        }
    }

    fn retry_after(&self) -> Option<HeaderValue> {
        match &self.cause {
            Cause::Gateway(e) => e.retry_after().map(HeaderValue::from),
            Cause::Neuron { retry_after, .. } => retry_after.clone(),
        }
    }

    /// The error's message, as Anthropic's shape carries it.
    fn message(&self) -> String {
        match &self.cause {
            Cause::Gateway(e) => e.to_string(),
            Cause::Neuron { body, .. } => neuron_message(body),
        }
    }

    /// The error as the event that ends a stream: OpenAI's error object (with `retry_after`, in
    /// seconds, where a JSON answer would have had the header) and `[DONE]`, or Anthropic's
    /// `error` event.
    pub fn event(&self) -> Bytes {
        match self.dialect {
            Dialect::OpenAi => {
                let json = match &self.cause {
                    Cause::Gateway(e) => serde_json::to_vec(&e.openai_event()).unwrap_or_default(),
                    Cause::Neuron {
                        retry_after, body, ..
                    } => with_retry_after(body, retry_after.as_ref().and_then(seconds)),
                };
                let mut out = BytesMut::from(&sse::data_event(&json)[..]);
                out.extend_from_slice(sse::DONE);
                out.freeze()
            }
            Dialect::Anthropic => {
                let body = anthropic_body(self.status(), &self.message());
                let json = serde_json::to_string(&body).unwrap_or_default();
                Bytes::from(format!("event: error\ndata: {json}\n\n"))
            }
        }
    }
}

impl From<(Dialect, Error)> for Rejection {
    fn from((dialect, e): (Dialect, Error)) -> Self {
        Rejection::new(dialect, e)
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut res = match (self.dialect, &self.cause) {
            (Dialect::OpenAi, Cause::Gateway(e)) => (status, Json(e.openai_body())).into_response(),
            (Dialect::OpenAi, Cause::Neuron { body, .. }) => (
                status,
                [(header::CONTENT_TYPE, "application/json")],
                body.clone(),
            )
                .into_response(),
            (Dialect::Anthropic, _) => {
                (status, Json(anthropic_body(status, &self.message()))).into_response()
            }
        };
        if let Some(v) = self.retry_after() {
            res.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.counted {
            res.extensions_mut().insert(Counted);
        }
        if let Some(m) = self.model {
            res.extensions_mut().insert(Named(m));
        }
        res
    }
}

/// Anthropic's error type for an HTTP status.
pub fn anthropic_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

fn anthropic_body(status: StatusCode, message: &str) -> ErrorResponse {
    ErrorResponse::new(anthropic_error_type(status), message)
}

/// The seconds of a `Retry-After` value, when it has them.
fn seconds(v: &HeaderValue) -> Option<u64> {
    v.to_str().ok()?.trim().parse().ok()
}

/// A neuron's OpenAI error body with `retry_after` in its error object, as a stream's error
/// event carries what would have been the `Retry-After` header.
fn with_retry_after(body: &Bytes, secs: Option<u64>) -> Vec<u8> {
    let Some(secs) = secs else {
        return body.to_vec();
    };
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(mut v) if v["error"].is_object() => {
            v["error"]["retry_after"] = secs.into();
            serde_json::to_vec(&v).unwrap_or_default()
        }
        _ => body.to_vec(),
    }
}

/// The request body, or why it could not be read: larger than `limit` (axum's own answer to
/// that is plain text, which no SDK can read), or cut off.
pub fn read_body(limit: usize, body: Result<Bytes, BytesRejection>) -> Result<Bytes, Error> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::BodyTooLarge { limit }
        } else {
            Error::InvalidRequest {
                message: format!("could not read the request body: {}", r.body_text()),
                param: None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(res: Response) -> serde_json::Value {
        let b = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        serde_json::from_slice(&b).unwrap()
    }

    #[tokio::test]
    async fn one_error_is_written_in_each_dialects_shape_with_its_retry_after() {
        let e = || Error::NoCapacity("no room".into());
        let res = Rejection::new(Dialect::OpenAi, e()).into_response();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[header::RETRY_AFTER], "10");
        let v = body_of(res).await;
        assert_eq!(v["error"]["type"], "service_unavailable");
        let res = Rejection::new(Dialect::Anthropic, e())
            .named("m")
            .into_response();
        assert_eq!(res.headers()[header::RETRY_AFTER], "10");
        assert_eq!(res.extensions().get::<Named>().unwrap().0, "m");
        let v = body_of(res).await;
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "overloaded_error");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("no room")
        );
    }

    #[tokio::test]
    async fn a_neuron_error_keeps_its_status_and_retry_after_and_gives_its_message() {
        let body = Bytes::from_static(
            br#"{"error":{"message":"queue full","type":"t","param":null,"code":null}}"#,
        );
        let r = || {
            Rejection::neuron(
                Dialect::Anthropic,
                StatusCode::TOO_MANY_REQUESTS,
                Some(HeaderValue::from(3)),
                body.clone(),
            )
        };
        let res = r().counted().into_response();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()[header::RETRY_AFTER], "3");
        assert!(res.extensions().get::<Counted>().is_some());
        let v = body_of(res).await;
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["message"], "queue full");
        let ev = String::from_utf8(r().event().to_vec()).unwrap();
        assert!(
            ev.starts_with("event: error\ndata: {") && ev.contains("queue full"),
            "{ev}"
        );
        let mut oa = r();
        oa.dialect = Dialect::OpenAi;
        let ev = String::from_utf8(oa.event().to_vec()).unwrap();
        assert!(
            ev.contains("\"retry_after\":3") && ev.ends_with("data: [DONE]\n\n"),
            "{ev}"
        );
    }
}
