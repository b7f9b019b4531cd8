//! Anthropic's dialect: `/v1/messages` and `/v1/messages/count_tokens`, translated to the
//! neurons' OpenAI dialect ([`translate`]) and back, streamed as Anthropic's events ([`stream`]).

pub mod handlers;
pub mod stream;
pub mod translate;
