//! Reading a model's weights from GGUF, and the memory it will take before it is read.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::{QTensor, gguf_file};
use candle_core::{Device, Tensor};

use super::config::{Arch, Config};
use super::linear::{Linear, Matmul, own_qtype};
use super::model::{Embedding, Layer, Model, RmsNorm, Rope};
use crate::error::{Error, Result};

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
}

/// Memory a model will take, estimated from the GGUF before loading it: the tensors as stored,
/// plus the f32 copy of the token embeddings where one is made (see `model::Embedding`), plus KV
/// cache room for `kv_tokens` tokens (the running requests' budget and the prefix cache's).
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
