//! What a GGUF's metadata says about a model: its architecture and hyper-parameters.

use candle_core::{DType, Device};

use super::linear::Matmul;
use crate::error::{Error, Result};
use crate::gguf::Meta;

pub const SUPPORTED: &[&str] = &["llama", "qwen2", "qwen3", "gemma3"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Arch {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(Error::Load(format!(
                    "architecture '{other}' (general.architecture) is not supported; supported: {}",
                    SUPPORTED.join(", ")
                )));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// The feed-forward gate's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (Gemma).
    GeluTanh,
}

/// Hyper-parameters read from GGUF metadata.
#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub activation: Activation,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    /// Gemma 3's local (sliding-window) layers use another rotary base.
    pub rope_local_base: f32,
    pub sliding_window: Option<usize>,
    /// Every `sliding_pattern`-th layer is global; the others slide (Gemma 3: 6).
    pub sliding_pattern: usize,
    /// The context the model was trained for.
    pub context_length: usize,
    /// Which kernels run the projections.
    pub matmul: Matmul,
    /// Attention through candle's operations on the CPU too, not our kernel: for the tests that
    /// compare the model code with candle's own models (with 8-bit activations, a 1e-7 change in
    /// an attention output can move a later rounding and the logits by tenths).
    pub candle_attention: bool,
}

impl Config {
    pub fn from_meta(meta: &Meta<'_>) -> Result<Self> {
        let arch_name = meta
            .str("general.architecture")
            .ok_or_else(|| Error::Load("GGUF metadata has no general.architecture".into()))?;
        let arch = Arch::parse(arch_name)?;
        let k = |s: &str| format!("{arch_name}.{s}");
        let n_head = meta.req_u32(&k("attention.head_count"))? as usize;
        let n_embd = meta.req_u32(&k("embedding_length"))? as usize;
        let head_dim = meta
            .u32(&k("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(n_embd / n_head);
        Ok(Config {
            arch,
            activation: match arch {
                Arch::Gemma3 => Activation::GeluTanh,
                _ => Activation::Silu,
            },
            n_layer: meta.req_u32(&k("block_count"))? as usize,
            n_embd,
            n_head,
            n_kv_head: meta
                .u32(&k("attention.head_count_kv"))
                .map(|v| v as usize)
                .unwrap_or(n_head),
            head_dim,
            rms_eps: meta
                .f32(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6) as f64,
            rope_base: meta.f32(&k("rope.freq_base")).unwrap_or(match arch {
                Arch::Gemma3 | Arch::Qwen2 | Arch::Qwen3 => 1_000_000.0,
                Arch::Llama => 10_000.0,
            }),
            rope_local_base: meta.f32(&k("rope.local_freq_base")).unwrap_or(10_000.0),
            sliding_window: match arch {
                Arch::Gemma3 => meta.u32(&k("attention.sliding_window")).map(|v| v as usize),
                _ => None,
            },
            sliding_pattern: meta
                .u32(&k("attention.sliding_window_type"))
                .map(|v| v as usize)
                .unwrap_or(6),
            context_length: meta.u32(&k("context_length")).unwrap_or(4096) as usize,
            matmul: Matmul::from_env(),
            candle_attention: false,
        })
    }

    /// What the KV cache holds on `device`: f16 where our attention reads it (the CPU, as
    /// llama.cpp keeps it), f32 where candle's operations do.
    pub fn kv_dtype(&self, device: &Device) -> DType {
        if device.is_cpu() && !self.candle_attention {
            DType::F16
        } else {
            DType::F32
        }
    }

    /// Bytes of KV cache one sequence needs per token on `device` (keys and values, every layer).
    pub fn kv_bytes_per_token(&self, device: &Device) -> u64 {
        (self.n_layer * 2 * self.n_kv_head * self.head_dim * self.kv_dtype(device).size_in_bytes())
            as u64
    }
}
