//! Types shared by every part of cortex: the neuron's lifecycle API ([`neuron`]), the OpenAI
//! wire format ([`openai`]), what a placement asks for ([`placement`]) and the placement planner
//! ([`planner`]). `core` does no I/O and depends on no other cortex crate.
//!
//! ```
//! use cortex_core::neuron::{LoadRequest, ModelSource};
//! let req: LoadRequest = serde_json::from_str(
//!     r#"{"id": "smollm2", "source": {"uri": "file:///models/SmolLM2-135M-Instruct.Q4_1.gguf"}}"#,
//! ).unwrap();
//! assert!(matches!(req.source, ModelSource::Uri { .. }));
//! ```

pub mod anthropic;
pub mod exposition;
pub mod neuron;
pub mod openai;
pub mod placement;
pub mod planner;
