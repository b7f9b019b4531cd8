//! One decoder-only transformer for every architecture the neuron serves (llama, qwen2, qwen3,
//! gemma3), read from GGUF: the forward pass over a batch of sequences whose keys and values
//! live in the blocks of a [`KvStore`].
//!
//! We own this code rather than use candle-transformers' per-architecture models because those
//! keep their KV cache inside the weights (one sequence per model, no way to clear it for gemma3),
//! build 131k-position rotary tables in every gemma3 layer and use SiLU where Gemma 3 uses GELU
//! (docs/candle-notes.md). Here the weights are immutable and shared; each sequence brings its own
//! blocks, which is what batching and the prefix cache need.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use super::attention::{self, window_start};
use super::elementwise;
use super::kv_cache::{BLOCK, BlockId};
use super::kv_store::{HostStore, KvShape, KvStore, TensorStore};
use super::linear::Linear;
use crate::error::{Error, Result};

pub use super::config::{Activation, Arch, Config, SUPPORTED};
pub use super::loader::estimate_bytes;

/// An RMS norm's weights, as candle-transformers' `RmsNorm` holds them, with a host copy on the
/// CPU for the fused residual step ([`elementwise::add_rms_norm`]).
pub(super) struct RmsNorm {
    weight: Tensor,
    host: Option<Vec<f32>>,
    eps: f64,
}

impl RmsNorm {
    pub(super) fn from_qtensor(t: QTensor, eps: f64) -> Result<Self> {
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
pub(super) struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub(super) fn new(
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

pub(super) struct Layer {
    pub(super) attn_norm: RmsNorm,
    pub(super) wq: Linear,
    pub(super) wk: Linear,
    pub(super) wv: Linear,
    pub(super) wo: Linear,
    pub(super) bq: Option<Tensor>,
    pub(super) bk: Option<Tensor>,
    pub(super) bv: Option<Tensor>,
    pub(super) q_norm: Option<RmsNorm>,
    pub(super) k_norm: Option<RmsNorm>,
    pub(super) post_attn_norm: Option<RmsNorm>,
    pub(super) ffn_norm: RmsNorm,
    pub(super) post_ffn_norm: Option<RmsNorm>,
    pub(super) gate: Linear,
    pub(super) up: Linear,
    pub(super) down: Linear,
    /// Sliding-window size for local layers.
    pub(super) window: Option<usize>,
    /// Index into `Model::ropes`.
    pub(super) rope: usize,
}

/// Token embeddings. On the CPU, for the types our kernels read, the table stays quantized and
/// only the rows a pass needs are expanded (Gemma 3 270M's 262k × 640 table is 178 MB as Q8_0 and
/// 671 MB in f32); the tied output projection shares it. Elsewhere it is expanded once.
pub(super) enum Embedding {
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

/// The weights of a loaded model. Immutable: sequences bring their own blocks.
pub struct Model {
    pub cfg: Config,
    /// Max positions served: the requested context, at most the trained one.
    pub max_len: usize,
    pub(super) embed: Embedding,
    pub(super) embed_scale: Option<f64>,
    pub(super) layers: Vec<Layer>,
    pub(super) norm: RmsNorm,
    pub(super) output: Arc<Linear>,
    pub(super) ropes: Vec<Rope>,
    pub(super) device: Device,
}

/// One sequence's part of a batched forward pass: `tokens` at positions `pos..`, whose keys
/// and values go into (and are read from) `blocks`, which cover at least `pos + tokens.len()`
/// positions.
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub pos: usize,
    pub blocks: &'a [BlockId],
}

/// A single sequence's cache with a store of its own, for tests and tools that run one
/// sequence at a time (the engine shares one store among all its sequences).
pub struct KvCache {
    store: KvStore,
    blocks: Vec<BlockId>,
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

    /// Tokens it can hold.
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
}

impl Model {
    /// The shapes of this model's keys and values.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            n_layer: self.cfg.n_layer,
            n_kv_head: self.cfg.n_kv_head,
            head_dim: self.cfg.head_dim,
        }
    }

    /// Whether attention runs on our CPU kernel (else candle's operations).
    fn host_attention(&self) -> bool {
        self.device.is_cpu() && !self.cfg.candle_attention
    }

    /// An empty store for this model's blocks, on its device.
    pub fn new_store(&self) -> KvStore {
        if self.host_attention() {
            KvStore::Host(HostStore::new(self.kv_shape()))
        } else {
            KvStore::Tensors(TensorStore::new(
                self.kv_shape(),
                self.cfg.kv_dtype(&self.device),
                &self.device,
            ))
        }
    }

    /// A single-sequence cache for the whole served context.
    pub fn new_cache(&self) -> Result<KvCache> {
        self.new_cache_with(self.max_len)
    }

    /// A single-sequence cache for `cap` tokens (at most the served context).
    pub fn new_cache_with(&self, cap: usize) -> Result<KvCache> {
        let cap = cap.min(self.max_len);
        let mut store = self.new_store();
        let blocks: Vec<BlockId> = (0..cap.div_ceil(BLOCK) as BlockId).collect();
        if let Some(&last) = blocks.last() {
            store.ensure(last)?;
        }
        Ok(KvCache {
            store,
            blocks,
            len: 0,
            cap,
        })
    }

    /// Runs `tokens` after what `cache` holds and returns the logits of the last one (f32, vocab).
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        if cache.len + tokens.len() > cache.cap {
            return Err(Error::Internal(format!(
                "sequence of {} tokens exceeds its KV cache of {}",
                cache.len + tokens.len(),
                cache.cap
            )));
        }
        let seq = SeqInput {
            tokens,
            pos: cache.len,
            blocks: &cache.blocks,
        };
        let logits = self.forward_batch(&[seq], &mut cache.store)?;
        cache.len += tokens.len();
        Ok(logits.get(0)?)
    }

    /// Runs every sequence's tokens after what its blocks hold, in one pass: the projections
    /// see all tokens of the batch as the rows of one matrix, attention runs per sequence.
    /// Returns the logits of each sequence's last token, `(sequences, vocab)`.
    pub fn forward_batch(&self, seqs: &[SeqInput<'_>], store: &mut KvStore) -> Result<Tensor> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(seqs.len());
        for s in seqs {
            let (pos, t) = (s.pos, s.tokens.len());
            if t == 0 {
                return Err(Error::Internal("forward of an empty sequence".into()));
            }
            if pos + t > s.blocks.len() * BLOCK || pos + t > self.max_len {
                return Err(Error::Internal(format!(
                    "sequence of {} tokens exceeds its {} KV blocks or the {}-token context",
                    pos + t,
                    s.blocks.len(),
                    self.max_len
                )));
            }
            if let Some(&top) = s.blocks[..(pos + t).div_ceil(BLOCK)].iter().max() {
                store.ensure(top)?;
            }
            spans.push(BatchSpan {
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
            let h = self.attention(layer, i, &h, seqs, &spans, &rotary[layer.rope], store)?;
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

    /// Attention of layer `li` for the whole batch; `x` is `(1, tokens, n_embd)`. The batch's
    /// keys and values are written into the sequences' blocks first, then read from them.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        l: &Layer,
        li: usize,
        x: &Tensor,
        seqs: &[SeqInput<'_>],
        spans: &[BatchSpan],
        rot: &Rotary,
        store: &mut KvStore,
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
        let interleaved = self.cfg.arch == Arch::Llama;
        match store {
            // On the CPU every token, decoded or of a prompt, goes through our kernel, all
            // sequences at once: a token's numbers do not depend on the pass that computed it.
            KvStore::Host(host) if q.dtype() == DType::F32 => {
                let Some((cos, sin)) = &rot.host else {
                    return Err(Error::Internal("host attention without host rotary".into()));
                };
                let mut qh = q.flatten_all()?.to_vec1::<f32>()?;
                let mut kh = k.flatten_all()?.to_vec1::<f32>()?;
                let vh = v.flatten_all()?.to_vec1::<f32>()?;
                elementwise::rotate(&mut qh, nh, hd, cos, sin, interleaved);
                elementwise::rotate(&mut kh, nkv, hd, cos, sin, interleaved);
                let row = nkv * hd;
                for (s, sp) in seqs.iter().zip(spans) {
                    let ours = sp.offset * row..(sp.offset + sp.len) * row;
                    host.write(li, s.blocks, sp.pos, &kh[ours.clone()], &vh[ours])?;
                }
                let host = &*host;
                let att_spans: Vec<attention::Span<'_>> = seqs
                    .iter()
                    .zip(spans)
                    .map(|(s, sp)| attention::Span {
                        offset: sp.offset,
                        len: sp.len,
                        pos: sp.pos,
                        window: l.window,
                        blocks: s.blocks[..(sp.pos + sp.len).div_ceil(BLOCK)]
                            .iter()
                            .map(|&b| attention::BlockKv {
                                k: host.keys(b, li),
                                v: host.values(b, li),
                            })
                            .collect(),
                    })
                    .collect();
                let mut out = vec![0f32; t * nh * hd];
                attention::attend(
                    &qh,
                    t,
                    &att_spans,
                    attention::Heads {
                        n_head: nh,
                        n_kv_head: nkv,
                        head_dim: hd,
                        scale: 1.0 / (hd as f32).sqrt(),
                    },
                    &mut out,
                );
                let y = Tensor::from_vec(out, (1, t, nh * hd), &Device::Cpu)?;
                l.wo.forward(&y)
            }
            KvStore::Host(_) => Err(Error::Internal(format!(
                "host attention on {:?} activations",
                q.dtype()
            ))),
            KvStore::Tensors(ts) => {
                let rope = |y: &Tensor| -> Result<Tensor> {
                    let y = y.transpose(1, 2)?.contiguous()?;
                    Ok(if interleaved {
                        candle_nn::rotary_emb::rope_i(&y, &rot.cos, &rot.sin)?
                    } else {
                        candle_nn::rotary_emb::rope(&y, &rot.cos, &rot.sin)?
                    })
                };
                // Head-major, as the blocks hold them.
                let kv_dtype = self.cfg.kv_dtype(&self.device);
                let k = rope(&k)?.to_dtype(kv_dtype)?.squeeze(0)?;
                let v = v
                    .transpose(1, 2)?
                    .contiguous()?
                    .to_dtype(kv_dtype)?
                    .squeeze(0)?;
                for (s, sp) in seqs.iter().zip(spans) {
                    let (ks, vs) = (
                        k.narrow(1, sp.offset, sp.len)?,
                        v.narrow(1, sp.offset, sp.len)?,
                    );
                    ts.write(li, s.blocks, sp.pos, &ks, &vs)?;
                }
                let q = rope(&q)?.transpose(1, 2)?;
                let parts = seqs
                    .iter()
                    .zip(spans)
                    .map(|(s, sp)| {
                        let start = window_start(l.window, sp.pos);
                        let (ck, cv) = ts.gather(li, s.blocks, start, sp.pos + sp.len)?;
                        self.chunk_attention(l, &q, &ck, &cv, start, sp)
                    })
                    .collect::<Result<Vec<_>>>()?;
                l.wo.forward(&Tensor::cat(&parts, 1)?)
            }
        }
    }

    /// Attention of one sequence's chunk with candle's operations: every step on a GPU, and
    /// on the CPU when `candle_attention` is set. `q` is the batch's `(1, tokens, n_head,
    /// head_dim)`; `k` and `v` hold positions `start..` up to the chunk's last,
    /// `(1, n_kv_head, positions, head_dim)`.
    fn chunk_attention(
        &self,
        l: &Layer,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        start: usize,
        sp: &BatchSpan,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim);
        let (t, pos) = (sp.len, sp.pos);
        let total = pos + t;
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
        let y = att.matmul(v)?;
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

/// A pass's rotary rows, one per token, for one frequency base; with a host copy on the CPU.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
    host: Option<(Vec<f32>, Vec<f32>)>,
}

/// Where one sequence's tokens sit in a batch: rows `offset..offset + len`, positions from `pos`.
struct BatchSpan {
    offset: usize,
    len: usize,
    pos: usize,
}
