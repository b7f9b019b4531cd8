//! The operator's calls to a neuron's lifecycle API: `/status`, `/models/load`, `/models/unload`.

use std::time::Duration;

use cortex_core::neuron::{LoadRequest, NeuronStatus, UnloadRequest};
use cortex_core::openai::ErrorBody;

#[derive(Clone)]
pub struct NeuronClient {
    http: reqwest::Client,
    token: Option<String>,
}

/// What a neuron answered to a load.
#[derive(Debug)]
pub enum LoadAnswer {
    /// Accepted (202) or already there (200).
    Accepted,
    /// 409: not enough memory; the bytes it needs, when said.
    NoRoom {
        needed: Option<u64>,
        message: String,
    },
    /// Any other refusal, with the neuron's message.
    Refused { status: u16, message: String },
}

impl NeuronClient {
    pub fn new(token: Option<String>) -> Self {
        NeuronClient {
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(3))
                .timeout(Duration::from_secs(10))
                .build()
                .expect("building the HTTP client"),
            token,
        }
    }

    fn request(
        &self,
        method: reqwest::Method,
        endpoint: &str,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let rb = self
            .http
            .request(method, format!("{}{path}", endpoint.trim_end_matches('/')));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    pub async fn status(&self, endpoint: &str) -> Result<NeuronStatus, String> {
        let r = self
            .request(reqwest::Method::GET, endpoint, "/status")
            .send()
            .await
            .map_err(|e| format!("unreachable: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("/status answered {}", r.status()));
        }
        r.json()
            .await
            .map_err(|e| format!("unreadable /status: {e}"))
    }

    pub async fn load(&self, endpoint: &str, req: &LoadRequest) -> Result<LoadAnswer, String> {
        let r = self
            .request(reqwest::Method::POST, endpoint, "/models/load")
            .json(req)
            .send()
            .await
            .map_err(|e| format!("unreachable: {e}"))?;
        let status = r.status();
        if status.is_success() {
            return Ok(LoadAnswer::Accepted);
        }
        let text = r.text().await.unwrap_or_default();
        let body: Option<ErrorBody> = serde_json::from_str(&text).ok();
        let message = body
            .as_ref()
            .map(|b| b.error.message.clone())
            .unwrap_or(text);
        Ok(if status == reqwest::StatusCode::CONFLICT {
            LoadAnswer::NoRoom {
                needed: body.and_then(|b| b.error.needed_bytes),
                message,
            }
        } else {
            LoadAnswer::Refused {
                status: status.as_u16(),
                message,
            }
        })
    }

    pub async fn unload(&self, endpoint: &str, id: &str) -> Result<(), String> {
        let r = self
            .request(reqwest::Method::POST, endpoint, "/models/unload")
            .json(&UnloadRequest { id: id.to_string() })
            .send()
            .await
            .map_err(|e| format!("unreachable: {e}"))?;
        // 404: already gone, which is what we wanted.
        if r.status().is_success() || r.status() == reqwest::StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(format!(
                "/models/unload answered {}: {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ))
        }
    }
}
