//! One decoder-only transformer for every architecture the neuron serves (llama, qwen2, qwen3,
//! gemma3), read from GGUF.
//!
//! We own this code rather than use candle-transformers' per-architecture models because those
//! keep their KV cache inside the weights (one sequence per model, no way to clear it for gemma3),
//! build 131k-position rotary tables in every gemma3 layer and use SiLU where Gemma 3 uses GELU
//! (docs/candle-notes.md). Here the weights are immutable and shared; each sequence owns a [`KvCache`],
//! which is what batching needs.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::{QTensor, gguf_file};
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::linear::{Linear, Matmul, own_qtype};
use super::{attention, elementwise};
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

/// An RMS norm's weights, as candle-transformers' `RmsNorm` holds them, with a host copy on the
/// CPU for the fused residual step ([`elementwise::add_rms_norm`]).
struct RmsNorm {
    weight: Tensor,
    host: Option<Vec<f32>>,
    eps: f64,
}

impl RmsNorm {
    fn from_qtensor(t: QTensor, eps: f64) -> Result<Self> {
        let weight = t.dequantize(&t.device())?;
        let host = if weight.device().is_cpu() && weight.dtype() == DType::F32 {
            Some(weight.to_vec1::<f32>()?)
        } else {
            None
        };
        Ok(RmsNorm { weight, host, eps })
    }

    /// candle-transformers' `RmsNorm::forward`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)?)
    }

    /// `x + h` (`x` when there is no `h`) and its norm.
    fn add_forward(&self, x: &Tensor, h: Option<Tensor>) -> Result<(Tensor, Tensor)> {
        match &self.host {
            Some(alpha) if x.device().is_cpu() && x.dtype() == DType::F32 => {
                elementwise::add_rms_norm(x, h.as_ref(), alpha, self.eps as f32)
            }
            _ => {
                let x = match h {
                    Some(h) => (x + h)?,
                    None => x.clone(),
                };
                let n = self.forward(&x)?;
                Ok((x, n))
            }
        }
    }
}

/// Rotary tables for one frequency base, sized to the context we serve (not the trained maximum).
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(
        base: f32,
        head_dim: usize,
        max_len: usize,
        factors: Option<&[f32]>,
        dev: &Device,
    ) -> Result<Self> {
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| {
                let f = 1.0 / base.powf(2.0 * i as f32 / head_dim as f32);
                f / factors.and_then(|v| v.get(i)).copied().unwrap_or(1.0)
            })
            .collect();
        let inv = Tensor::from_vec(inv, (1, head_dim / 2), dev)?;
        let pos = Tensor::arange(0u32, max_len as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((max_len, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok(Rope {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
        })
    }
}

struct Layer {
    attn_norm: RmsNorm,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    post_ffn_norm: Option<RmsNorm>,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Sliding-window size for local layers.
    window: Option<usize>,
    /// Index into `Model::ropes`.
    rope: usize,
}

/// One sequence's keys and values for every layer, head-major `(1, n_kv_head, capacity,
/// head_dim)`, so the attention of one KV head reads one contiguous run. It starts as large as asked and
/// grows on demand ([`KvCache::grow`]), which is how a batch of short sequences shares the memory
/// one long one would take.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    cap: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens it can hold before it must grow.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Forgets the sequence; the memory stays allocated for the next one.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Forgets every token after the first `n`.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Takes the first `n` positions of `src` (a prefix both sequences share), replacing what
    /// this cache holds.
    pub fn copy_prefix(&mut self, src: &KvCache, n: usize) -> Result<()> {
        if n > src.len || n > self.cap {
            return Err(Error::Internal(format!(
                "prefix of {n} tokens from a cache of {} into one of {}",
                src.len, self.cap
            )));
        }
        for ((k, v), (sk, sv)) in self.layers.iter().zip(&src.layers) {
            k.slice_set(&sk.narrow(2, 0, n)?.contiguous()?, 2, 0)?;
            v.slice_set(&sv.narrow(2, 0, n)?.contiguous()?, 2, 0)?;
        }
        self.len = n;
        Ok(())
    }

    /// Reallocates to hold `cap` tokens, keeping what it holds.
    pub fn grow(&mut self, model: &Model, cap: usize) -> Result<()> {
        if cap <= self.cap {
            return Ok(());
        }
        let mut bigger = model.new_cache_with(cap)?;
        if self.len > 0 {
            for ((k, v), (bk, bv)) in self.layers.iter().zip(&bigger.layers) {
                bk.slice_set(&k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                bv.slice_set(&v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
        }
        bigger.len = self.len;
        *self = bigger;
        Ok(())
    }
}

/// One sequence's part of a batched forward pass: tokens to run after what its cache holds.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// Token embeddings. On the CPU, for the types our kernels read, the table stays quantized and
/// only the rows a pass needs are expanded (Gemma 3 270M's 262k × 640 table is 178 MB as Q8_0 and
/// 671 MB in f32); the tied output projection shares it. Elsewhere it is expanded once.
enum Embedding {
    Rows(Arc<Linear>),
    Table(Tensor),
}

impl Embedding {
    fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Embedding::Rows(l) => l.rows(ids),
            Embedding::Table(t) => Ok(t.index_select(&Tensor::new(ids, device)?, 0)?),
        }
    }
}

/// The weights of a loaded model. Immutable: sequences carry their own [`KvCache`].
pub struct Model {
    pub cfg: Config,
    /// Max positions served (the KV cache size): the requested context, at most the trained one.
    pub max_len: usize,
    embed: Embedding,
    embed_scale: Option<f64>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Arc<Linear>,
    ropes: Vec<Rope>,
    device: Device,
}

/// Reads tensors from a GGUF file and reports how far it got.
struct Loader<'a, R> {
    ct: &'a gguf_file::Content,
    reader: &'a mut R,
    device: &'a Device,
    loaded: usize,
    progress: &'a dyn Fn(f32),
    matmul: Matmul,
}

impl<R: Read + Seek> Loader<'_, R> {
    fn get(&mut self, name: &str) -> Result<QTensor> {
        let t = self
            .ct
            .tensor(self.reader, name, self.device)
            .map_err(|e| Error::Load(format!("reading tensor '{name}': {e}")))?;
        self.loaded += 1;
        (self.progress)(self.loaded as f32 / self.ct.tensor_infos.len().max(1) as f32);
        Ok(t)
    }

    fn opt(&mut self, name: &str) -> Result<Option<QTensor>> {
        if self.ct.tensor_infos.contains_key(name) {
            self.get(name).map(Some)
        } else {
            Ok(None)
        }
    }

    fn mm(&mut self, name: &str) -> Result<Linear> {
        Linear::new(self.get(name)?, self.matmul)
    }

    fn norm(&mut self, name: &str, eps: f64) -> Result<RmsNorm> {
        RmsNorm::from_qtensor(self.get(name)?, eps)
    }

    fn opt_norm(&mut self, name: &str, eps: f64) -> Result<Option<RmsNorm>> {
        match self.opt(name)? {
            Some(t) => Ok(Some(RmsNorm::from_qtensor(t, eps)?)),
            None => Ok(None),
        }
    }

    fn opt_f32(&mut self, name: &str) -> Result<Option<Tensor>> {
        match self.opt(name)? {
            Some(t) => Ok(Some(t.dequantize(self.device)?)),
            None => Ok(None),
        }
    }
}

impl Model {
    /// Loads the weights; `max_len` bounds the positions (and so the rotary tables and caches).
    pub fn load<R: Read + Seek>(
        ct: &gguf_file::Content,
        reader: &mut R,
        cfg: Config,
        max_len: usize,
        device: &Device,
        progress: &dyn Fn(f32),
    ) -> Result<Self> {
        let mut l = Loader {
            ct,
            reader,
            device,
            loaded: 0,
            progress,
            matmul: cfg.matmul,
        };
        let eps = cfg.rms_eps;
        let embed_q = l.get("token_embd.weight")?;
        let output_q = l.opt("output.weight")?;
        let (embed, output) = if cfg.matmul == Matmul::Own {
            let table = Arc::new(Linear::new(embed_q, Matmul::Own)?);
            let embed = if table.is_own() {
                Embedding::Rows(table.clone())
            } else {
                Embedding::Table(table.dequantize()?)
            };
            let output = match output_q {
                Some(t) => Arc::new(Linear::new(t, Matmul::Own)?),
                None => table,
            };
            (embed, output)
        } else {
            // Reference runs (candle's kernels, f32 weights): candle's f32 table, as it has it.
            let embed = Embedding::Table(embed_q.dequantize(device)?);
            let output = Arc::new(Linear::new(output_q.unwrap_or(embed_q), cfg.matmul)?);
            (embed, output)
        };
        let norm = l.norm("output_norm.weight", eps)?;
        let factors = l
            .opt_f32("rope_freqs.weight")?
            .map(|t| t.to_vec1::<f32>())
            .transpose()?;
        let mut ropes = vec![Rope::new(
            cfg.rope_base,
            cfg.head_dim,
            max_len,
            factors.as_deref(),
            device,
        )?];
        if cfg.sliding_window.is_some() {
            ropes.push(Rope::new(
                cfg.rope_local_base,
                cfg.head_dim,
                max_len,
                None,
                device,
            )?);
        }
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            let sliding = cfg.sliding_window.is_some() && (i + 1) % cfg.sliding_pattern.max(1) != 0;
            layers.push(Layer {
                attn_norm: l.norm(&p("attn_norm.weight"), eps)?,
                wq: l.mm(&p("attn_q.weight"))?,
                wk: l.mm(&p("attn_k.weight"))?,
                wv: l.mm(&p("attn_v.weight"))?,
                wo: l.mm(&p("attn_output.weight"))?,
                bq: l.opt_f32(&p("attn_q.bias"))?,
                bk: l.opt_f32(&p("attn_k.bias"))?,
                bv: l.opt_f32(&p("attn_v.bias"))?,
                q_norm: l.opt_norm(&p("attn_q_norm.weight"), eps)?,
                k_norm: l.opt_norm(&p("attn_k_norm.weight"), eps)?,
                post_attn_norm: l.opt_norm(&p("post_attention_norm.weight"), eps)?,
                ffn_norm: l.norm(&p("ffn_norm.weight"), eps)?,
                post_ffn_norm: l.opt_norm(&p("post_ffw_norm.weight"), eps)?,
                gate: l.mm(&p("ffn_gate.weight"))?,
                up: l.mm(&p("ffn_up.weight"))?,
                down: l.mm(&p("ffn_down.weight"))?,
                window: if sliding { cfg.sliding_window } else { None },
                rope: usize::from(sliding),
            });
        }
        progress(1.0);
        let embed_scale = (cfg.arch == Arch::Gemma3).then(|| (cfg.n_embd as f64).sqrt());
        Ok(Model {
            cfg,
            max_len,
            embed,
            embed_scale,
            layers,
            norm,
            output,
            ropes,
            device: device.clone(),
        })
    }

    /// A cache for the whole served context.
    pub fn new_cache(&self) -> Result<KvCache> {
        self.new_cache_with(self.max_len)
    }

    /// A cache for `cap` tokens (at most the served context).
    pub fn new_cache_with(&self, cap: usize) -> Result<KvCache> {
        let cap = cap.min(self.max_len);
        let shape = (1, self.cfg.n_kv_head, cap, self.cfg.head_dim);
        let dtype = self.cfg.kv_dtype(&self.device);
        let layers = (0..self.cfg.n_layer)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, &self.device)?,
                    Tensor::zeros(shape, dtype, &self.device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            cap,
        })
    }

    /// Runs `tokens` after what `cache` holds and returns the logits of the last one (f32, vocab).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let logits = self.forward_batch(&mut [SeqInput { tokens, cache }])?;
        Ok(logits.get(0)?)
    }

    /// Runs every sequence's tokens after what its cache holds, in one pass: the projections
    /// see all tokens of the batch as the rows of one matrix, attention runs per sequence.
    /// Returns the logits of each sequence's last token, `(sequences, vocab)`.
    pub fn forward_batch(&self, seqs: &mut [SeqInput<'_>]) -> Result<Tensor> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            let (pos, t) = (s.cache.len, s.tokens.len());
            if t == 0 {
                return Err(Error::Internal("forward of an empty sequence".into()));
            }
            if pos + t > s.cache.cap {
                return Err(Error::Internal(format!(
                    "sequence of {} tokens exceeds its KV cache of {}",
                    pos + t,
                    s.cache.cap
                )));
            }
            spans.push(Span {
                offset: ids.len(),
                len: t,
                pos,
            });
            ids.extend_from_slice(s.tokens);
            positions.extend(pos as u32..(pos + t) as u32);
        }
        let total = ids.len();
        let mut x = self.embed.lookup(&ids, &self.device)?.unsqueeze(0)?;
        if let Some(s) = self.embed_scale {
            x = (x * s)?;
        }
        // Rotary rows for every token's own position, once per pass.
        let rotary = self
            .ropes
            .iter()
            .map(|r| {
                let (cos, sin) = if let [one] = spans.as_slice() {
                    (
                        r.cos.narrow(0, one.pos, one.len)?,
                        r.sin.narrow(0, one.pos, one.len)?,
                    )
                } else {
                    let at = Tensor::new(positions.as_slice(), &self.device)?;
                    (r.cos.index_select(&at, 0)?, r.sin.index_select(&at, 0)?)
                };
                let host = if self.device.is_cpu() {
                    Some((
                        cos.flatten_all()?.to_vec1::<f32>()?,
                        sin.flatten_all()?.to_vec1::<f32>()?,
                    ))
                } else {
                    None
                };
                Ok(Rotary { cos, sin, host })
            })
            .collect::<Result<Vec<_>>>()?;
        // The last feed-forward output, added to the residual stream by the next norm.
        let mut pending = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let (sum, h) = layer.attn_norm.add_forward(&x, pending.take())?;
            x = sum;
            let h = self.attention(layer, i, &h, seqs, &spans, &rotary[layer.rope])?;
            let h = match &layer.post_attn_norm {
                Some(n) => n.forward(&h)?,
                None => h,
            };
            let (sum, h) = layer.ffn_norm.add_forward(&x, Some(h))?;
            x = sum;
            let [gate, up]: [Tensor; 2] = Linear::forward_many(&[&layer.gate, &layer.up], &h)?
                .try_into()
                .map_err(|_| Error::Internal("two projections".into()))?;
            let act = match self.cfg.activation {
                Activation::GeluTanh => (gate.gelu()? * up)?,
                Activation::Silu if gate.device().is_cpu() && gate.dtype() == DType::F32 => {
                    elementwise::silu_mul(&gate, &up)?
                }
                Activation::Silu => (candle_nn::ops::silu(&gate)? * up)?,
            };
            let h = layer.down.forward(&act)?;
            pending = Some(match &layer.post_ffn_norm {
                Some(n) => n.forward(&h)?,
                None => h,
            });
        }
        if let Some(h) = pending {
            x = (x + h)?;
        }
        for (s, span) in seqs.iter_mut().zip(&spans) {
            s.cache.len = span.pos + span.len;
        }
        let last: Vec<u32> = spans
            .iter()
            .map(|s| (s.offset + s.len - 1) as u32)
            .collect();
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let x = x
            .reshape((total, self.cfg.n_embd))?
            .index_select(&last, 0)?;
        self.output.forward(&self.norm.forward(&x)?)
    }

    /// Attention of layer `li` for the whole batch; `x` is `(1, tokens, n_embd)`.
    fn attention(
        &self,
        l: &Layer,
        li: usize,
        x: &Tensor,
        seqs: &mut [SeqInput<'_>],
        spans: &[Span],
        rot: &Rotary,
    ) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim);
        // Query, key and value from one pass over the input (one quantization, one hand-off).
        let [q, k, v]: [Tensor; 3] = Linear::forward_many(&[&l.wq, &l.wk, &l.wv], x)?
            .try_into()
            .map_err(|_| Error::Internal("three projections".into()))?;
        let heads = |y: Tensor, b: &Option<Tensor>, heads: usize| -> Result<Tensor> {
            let y = match b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            Ok(y.reshape((1, t, heads, hd))?)
        };
        let mut q = heads(q, &l.bq, nh)?;
        let mut k = heads(k, &l.bk, nkv)?;
        let v = heads(v, &l.bv, nkv)?;
        if let Some(n) = &l.q_norm {
            q = n.forward(&q)?;
        }
        if let Some(n) = &l.k_norm {
            k = n.forward(&k)?;
        }
        // On the CPU every token, decoded or of a prompt, goes through our kernel, all sequences
        // at once: a prompt read again after a preemption then gives the very numbers its
        // tokens had when they were decoded.
        let host = self.device.is_cpu() && q.dtype() == DType::F32 && !self.cfg.candle_attention;
        let interleaved = self.cfg.arch == Arch::Llama;
        // The queries rotated, token-major `(1, tokens, n_head, head_dim)`; the keys rotated
        // and the values, written into each sequence's cache.
        let q = match &rot.host {
            Some((cos, sin)) if host => {
                let mut qh = q.flatten_all()?.to_vec1::<f32>()?;
                let mut kh = k.flatten_all()?.to_vec1::<f32>()?;
                elementwise::rotate(&mut qh, nh, hd, cos, sin, interleaved);
                elementwise::rotate(&mut kh, nkv, hd, cos, sin, interleaved);
                let half = |x: &[f32]| {
                    let mut h = vec![f16::ZERO; x.len()];
                    h.convert_from_f32_slice(x);
                    h
                };
                let (k, v) = (half(&kh), half(&v.flatten_all()?.to_vec1::<f32>()?));
                let row = nkv * hd;
                for (s, sp) in seqs.iter_mut().zip(spans) {
                    let (ck, cv) = &s.cache.layers[li];
                    let ours = sp.offset * row..(sp.offset + sp.len) * row;
                    let (cap, pos) = (s.cache.cap, sp.pos);
                    ck.inplace_op1(&StoreRows {
                        rows: &k[ours.clone()],
                        pos,
                        cap,
                        nkv,
                        hd,
                    })?;
                    cv.inplace_op1(&StoreRows {
                        rows: &v[ours],
                        pos,
                        cap,
                        nkv,
                        hd,
                    })?;
                }
                Tensor::from_vec(qh, (1, t, nh, hd), &self.device)?
            }
            _ => {
                let rope = |y: &Tensor| -> Result<Tensor> {
                    let y = y.transpose(1, 2)?.contiguous()?;
                    Ok(if interleaved {
                        candle_nn::rotary_emb::rope_i(&y, &rot.cos, &rot.sin)?
                    } else {
                        candle_nn::rotary_emb::rope(&y, &rot.cos, &rot.sin)?
                    })
                };
                // Head-major, as the cache holds them.
                let kv_dtype = self.cfg.kv_dtype(&self.device);
                let k = rope(&k)?.to_dtype(kv_dtype)?;
                let v = v.transpose(1, 2)?.contiguous()?.to_dtype(kv_dtype)?;
                for (s, sp) in seqs.iter_mut().zip(spans) {
                    let (ck, cv) = &s.cache.layers[li];
                    ck.slice_set(&k.narrow(2, sp.offset, sp.len)?.contiguous()?, 2, sp.pos)?;
                    cv.slice_set(&v.narrow(2, sp.offset, sp.len)?.contiguous()?, 2, sp.pos)?;
                }
                rope(&q)?.transpose(1, 2)?
            }
        };
        let y = if host {
            self.decode_attention(l, li, &q, t, seqs, spans)?
        } else {
            let parts = seqs
                .iter()
                .zip(spans)
                .map(|(s, sp)| self.chunk_attention(l, &q, s.cache, li, sp))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 1)?
        };
        l.wo.forward(&y)
    }

    /// Attention of every token of the batch with our kernel, as `(1, tokens, n_head * head_dim)`.
    fn decode_attention(
        &self,
        l: &Layer,
        li: usize,
        q: &Tensor,
        tokens: usize,
        seqs: &[SeqInput<'_>],
        spans: &[Span],
    ) -> Result<Tensor> {
        let (nh, hd) = (self.cfg.n_head, self.cfg.head_dim);
        let guards: Vec<_> = seqs
            .iter()
            .map(|s| {
                let (k, v) = &s.cache.layers[li];
                (k.storage_and_layout(), v.storage_and_layout())
            })
            .collect();
        let (qs, ql) = q.storage_and_layout();
        let q = &host(&qs)?[ql.start_offset()..][..nh * tokens * hd];
        let mut rows = Vec::with_capacity(spans.len());
        for ((((ks, kl), (vs, vl)), sp), s) in guards.iter().zip(spans).zip(seqs) {
            let sp_cap = s.cache.cap;
            let (k, v) = (
                &host_f16(ks)?[kl.start_offset()..],
                &host_f16(vs)?[vl.start_offset()..],
            );
            for i in 0..sp.len {
                let pos = sp.pos + i;
                rows.push(attention::Row {
                    token: sp.offset + i,
                    k,
                    v,
                    cap: sp_cap,
                    start: window_start(l.window, pos),
                    end: pos + 1,
                });
            }
        }
        let mut out = vec![0f32; tokens * nh * hd];
        attention::decode(
            q,
            tokens,
            &rows,
            attention::Heads {
                n_head: nh,
                n_kv_head: self.cfg.n_kv_head,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
            },
            &mut out,
        );
        Ok(Tensor::from_vec(out, (1, tokens, nh * hd), &Device::Cpu)?)
    }

    /// Attention of one sequence's chunk with candle's operations: prompts, and every step on
    /// the GPU. `q` is the batch's `(1, tokens, n_head, head_dim)`.
    fn chunk_attention(
        &self,
        l: &Layer,
        q: &Tensor,
        cache: &KvCache,
        li: usize,
        sp: &Span,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim);
        let (t, pos) = (sp.len, sp.pos);
        let total = pos + t;
        // Keys visible to any query of this chunk: a sliding layer's first query sees the `w`
        // positions up to itself (query - key < w), so older keys are never read.
        let start = window_start(l.window, pos);
        let (ck, cv) = &cache.layers[li];
        let k = ck.narrow(2, start, total - start)?.contiguous()?;
        let v = cv.narrow(2, start, total - start)?.contiguous()?;
        // Grouped-query attention without copying keys: fold the query heads that share a KV
        // head into the row dimension.
        let rep = nh / nkv;
        let q = q
            .narrow(1, sp.offset, t)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((1, nkv, rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = (q.matmul(&k.t()?)? * scale)?;
        let att = if t > 1 || l.window.is_some_and(|w| total - start > w) {
            let mask = self.mask(t, pos, start, total, l.window)?;
            att.reshape((1, nkv, rep, t, total - start))?
                .broadcast_add(&mask)?
                .reshape((1, nkv, rep * t, total - start))?
        } else {
            att
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?;
        Ok(y.reshape((1, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((1, t, nh * hd))?)
    }

    /// Additive mask (t, total - start): causal, and limited to the window for sliding layers.
    fn mask(
        &self,
        t: usize,
        pos: usize,
        start: usize,
        total: usize,
        window: Option<usize>,
    ) -> Result<Tensor> {
        let cols = total - start;
        let mut m = vec![0f32; t * cols];
        for i in 0..t {
            let qpos = pos + i;
            for j in 0..cols {
                let kpos = start + j;
                let hidden = kpos > qpos || window.is_some_and(|w| qpos - kpos >= w);
                if hidden {
                    m[i * cols + j] = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Tensor::from_vec(m, (t, cols), &self.device)?)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits as a vector on the host, for sampling.
    pub fn logits_vec(logits: &Tensor) -> Result<Vec<f32>> {
        Ok(logits
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?)
    }
}

/// Copies a chunk of tokens' f16 keys or values, token-major `(tokens, nkv, hd)`, into a CPU
/// cache tensor in place at positions `pos..`: what `slice_set` does into the head-major cache,
/// without building a tensor for each sequence's rows.
struct StoreRows<'a> {
    rows: &'a [f16],
    pos: usize,
    cap: usize,
    nkv: usize,
    hd: usize,
}

impl InplaceOp1 for StoreRows<'_> {
    fn name(&self) -> &'static str {
        "store-kv-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F16(data) = storage else {
            candle_core::bail!("KV rows stored into a {:?} cache", storage.dtype());
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("KV cache not contiguous".into()))?;
        let (hd, nkv) = (self.hd, self.nkv);
        let tokens = self.rows.len() / (nkv * hd).max(1);
        if end - start != nkv * self.cap * hd || self.pos + tokens > self.cap {
            candle_core::bail!(
                "{tokens} KV rows at position {} overrun a cache of {} positions",
                self.pos,
                self.cap
            );
        }
        let cache = &mut data[start..end];
        for (i, token) in self.rows.chunks_exact(nkv * hd).enumerate() {
            for (g, head) in token.chunks_exact(hd).enumerate() {
                cache[(g * self.cap + self.pos + i) * hd..][..hd].copy_from_slice(head);
            }
        }
        Ok(())
    }
}

/// A pass's rotary rows, one per token, for one frequency base; with a host copy on the CPU.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
    host: Option<(Vec<f32>, Vec<f32>)>,
}

/// Where one sequence's tokens sit in a batch: rows `offset..offset + len`, positions from `pos`.
struct Span {
    offset: usize,
    len: usize,
    pos: usize,
}

/// The first cache position a query at `pos` (or any later one) may see.
fn window_start(window: Option<usize>, pos: usize) -> usize {
    match window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    }
}

/// The f32 data of a CPU tensor's storage.
fn host(s: &Storage) -> Result<&[f32]> {
    match s {
        Storage::Cpu(c) => Ok(c.as_slice::<f32>()?),
        _ => Err(Error::Internal("host attention on a device tensor".into())),
    }
}

/// The f16 data of a CPU tensor's storage (the KV cache where our attention reads it).
fn host_f16(s: &Storage) -> Result<&[f16]> {
    match s {
        Storage::Cpu(c) => Ok(c.as_slice::<f16>()?),
        _ => Err(Error::Internal("host attention on a device tensor".into())),
    }
}

/// Memory a model will take, estimated from the GGUF before loading it: the tensors as stored,
/// plus the f32 copy of the token embeddings where one is made (see [`Embedding`]), plus a KV
/// cache budget of `kv_tokens` tokens.
pub fn estimate_bytes(
    ct: &gguf_file::Content,
    cfg: &Config,
    kv_tokens: usize,
    device: &Device,
) -> u64 {
    let tensors: u64 = ct
        .tensor_infos
        .values()
        .map(|ti| {
            let n = ti.shape.elem_count();
            (n / ti.ggml_dtype.block_size() * ti.ggml_dtype.type_size()) as u64
        })
        .sum();
    let rows_read_in_place =
        |dtype| cfg.matmul == Matmul::Own && device.is_cpu() && own_qtype(dtype).is_some();
    let embed_f32 = ct
        .tensor_infos
        .get("token_embd.weight")
        .filter(|ti| !rows_read_in_place(ti.ggml_dtype))
        .map(|ti| ti.shape.elem_count() as u64 * 4)
        .unwrap_or(0);
    tensors + embed_f32 + cfg.kv_bytes_per_token(device) * kv_tokens as u64
}
