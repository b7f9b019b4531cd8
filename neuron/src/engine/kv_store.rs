//! The memory behind the KV cache's blocks ([`super::kv_cache`] decides who holds which).
//!
//! - [`HostStore`] (the CPU, where our attention kernel reads it): each block is one
//!   allocation of f16 (as llama.cpp keeps it: half the memory and reading of f32), per layer
//!   the keys `[kv_head][dim][position]` (transposed, so the score kernel reads eight positions
//!   of one dimension at once) then the values `[kv_head][position][dim]`.
//! - [`TensorStore`] (a GPU, or the CPU when candle's operations run attention): per block
//!   and layer a key and a value tensor `(kv_head, BLOCK, dim)`, gathered for candle's
//!   attention.
//!
//! Blocks are allocated on first use and kept for reuse until the model is unloaded, so a
//! model's memory grows to what its traffic needs, at most its budget.

use candle_core::{DType, Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::kv_cache::{BLOCK, BlockId};
use crate::error::{Error, Result};

/// Shapes of one layer's keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub n_layer: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// f16 values of one layer's keys (or values) in one block.
    fn half_layer(&self) -> usize {
        self.n_kv_head * self.head_dim * BLOCK
    }
}

pub enum KvStore {
    Host(HostStore),
    Tensors(TensorStore),
}

impl KvStore {
    /// Makes sure every block up to `block` has memory.
    pub fn ensure(&mut self, block: BlockId) -> Result<()> {
        match self {
            KvStore::Host(h) => h.ensure(block),
            KvStore::Tensors(t) => t.ensure(block),
        }
    }

    /// Blocks with memory behind them.
    pub fn allocated(&self) -> usize {
        match self {
            KvStore::Host(h) => h.blocks.len(),
            KvStore::Tensors(t) => t.blocks.len(),
        }
    }
}

/// Keys and values in host memory, for our attention kernel.
pub struct HostStore {
    shape: KvShape,
    blocks: Vec<Box<[f16]>>,
}

impl HostStore {
    pub fn new(shape: KvShape) -> Self {
        HostStore {
            shape,
            blocks: Vec::new(),
        }
    }

    fn ensure(&mut self, block: BlockId) -> Result<()> {
        let len = self.shape.n_layer * 2 * self.shape.half_layer();
        while self.blocks.len() <= block as usize {
            let mut v: Vec<f16> = Vec::new();
            v.try_reserve_exact(len).map_err(|_| {
                Error::Internal(format!("allocating a KV block of {} bytes failed", len * 2))
            })?;
            v.resize(len, f16::ZERO);
            self.blocks.push(v.into_boxed_slice());
        }
        Ok(())
    }

    fn layer(&self, block: BlockId, layer: usize) -> &[f16] {
        let n = self.shape.half_layer();
        &self.blocks[block as usize][layer * 2 * n..][..2 * n]
    }

    /// One layer's keys of a block, `[kv_head][dim][position]`.
    pub fn keys(&self, block: BlockId, layer: usize) -> &[f16] {
        &self.layer(block, layer)[..self.shape.half_layer()]
    }

    /// One layer's values of a block, `[kv_head][position][dim]`.
    pub fn values(&self, block: BlockId, layer: usize) -> &[f16] {
        &self.layer(block, layer)[self.shape.half_layer()..]
    }

    /// Writes the keys and values of `len` tokens at positions `pos..` of the sequence whose
    /// blocks are `blocks`; `k` and `v` are token-major `(tokens, kv_head, dim)` f32.
    pub fn write(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<()> {
        let KvShape {
            n_kv_head: nkv,
            head_dim: hd,
            ..
        } = self.shape;
        let row = nkv * hd;
        let n = self.shape.half_layer();
        for (i, (kr, vr)) in k.chunks_exact(row).zip(v.chunks_exact(row)).enumerate() {
            let p = pos + i;
            let b = *blocks.get(p / BLOCK).ok_or_else(|| {
                Error::Internal(format!(
                    "position {p} is past the sequence's {} blocks",
                    blocks.len()
                ))
            })?;
            let j = p % BLOCK;
            let data = &mut self.blocks[b as usize][layer * 2 * n..][..2 * n];
            let (keys, values) = data.split_at_mut(n);
            for g in 0..nkv {
                let kt = &mut keys[g * hd * BLOCK..][..hd * BLOCK];
                for (d, x) in kr[g * hd..][..hd].iter().enumerate() {
                    kt[d * BLOCK + j] = f16::from_f32(*x);
                }
                values[(g * BLOCK + j) * hd..][..hd].convert_from_f32_slice(&vr[g * hd..][..hd]);
            }
        }
        Ok(())
    }
}

/// Keys and values as candle tensors on the model's device.
pub struct TensorStore {
    shape: KvShape,
    dtype: DType,
    device: Device,
    /// Per block, per layer: keys and values `(kv_head, BLOCK, dim)`.
    blocks: Vec<Vec<(Tensor, Tensor)>>,
}

impl TensorStore {
    pub fn new(shape: KvShape, dtype: DType, device: &Device) -> Self {
        TensorStore {
            shape,
            dtype,
            device: device.clone(),
            blocks: Vec::new(),
        }
    }

    fn ensure(&mut self, block: BlockId) -> Result<()> {
        let dims = (self.shape.n_kv_head, BLOCK, self.shape.head_dim);
        while self.blocks.len() <= block as usize {
            let layers = (0..self.shape.n_layer)
                .map(|_| {
                    Ok((
                        Tensor::zeros(dims, self.dtype, &self.device)?,
                        Tensor::zeros(dims, self.dtype, &self.device)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            self.blocks.push(layers);
        }
        Ok(())
    }

    /// Writes keys and values `(kv_head, tokens, dim)` of positions `pos..`.
    pub fn write(
        &mut self,
        layer: usize,
        blocks: &[BlockId],
        pos: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let t = k.dim(1)?;
        let mut done = 0;
        while done < t {
            let p = pos + done;
            let b = *blocks.get(p / BLOCK).ok_or_else(|| {
                Error::Internal(format!(
                    "position {p} is past the sequence's {} blocks",
                    blocks.len()
                ))
            })?;
            let n = (BLOCK - p % BLOCK).min(t - done);
            let (bk, bv) = &self.blocks[b as usize][layer];
            bk.slice_set(&k.narrow(1, done, n)?.contiguous()?, 1, p % BLOCK)?;
            bv.slice_set(&v.narrow(1, done, n)?.contiguous()?, 1, p % BLOCK)?;
            done += n;
        }
        Ok(())
    }

    /// Keys and values of positions `start..end`, `(1, kv_head, end - start, dim)`.
    pub fn gather(
        &self,
        layer: usize,
        blocks: &[BlockId],
        start: usize,
        end: usize,
    ) -> Result<(Tensor, Tensor)> {
        let first = start / BLOCK;
        let last = end.div_ceil(BLOCK);
        let (ks, vs): (Vec<&Tensor>, Vec<&Tensor>) = blocks[first..last]
            .iter()
            .map(|&b| {
                let (k, v) = &self.blocks[b as usize][layer];
                (k, v)
            })
            .unzip();
        let cut = |parts: Vec<&Tensor>| -> Result<Tensor> {
            let all = if parts.len() == 1 {
                parts[0].clone()
            } else {
                Tensor::cat(&parts, 1)?
            };
            Ok(all
                .narrow(1, start - first * BLOCK, end - start)?
                .contiguous()?
                .unsqueeze(0)?)
        };
        Ok((cut(ks)?, cut(vs)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_rows_land_transposed_keys_and_plain_values_across_blocks() {
        let shape = KvShape {
            n_layer: 2,
            n_kv_head: 2,
            head_dim: 3,
        };
        let mut s = HostStore::new(shape);
        s.ensure(1).unwrap();
        let blocks = [1, 0];
        // Three tokens at positions BLOCK-1, BLOCK, BLOCK+1: across blocks 1 and 0.
        let k: Vec<f32> = (0..3 * 6).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..3 * 6).map(|i| 100.0 + i as f32).collect();
        s.write(1, &blocks, BLOCK - 1, &k, &v).unwrap();
        // Token 0 (position BLOCK-1, block 1, slot 63), head 1, dim 2 = k[0*6 + 1*3 + 2].
        assert_eq!(
            s.keys(1, 1)[3 * BLOCK + 2 * BLOCK + BLOCK - 1].to_f32(),
            5.0
        );
        // Token 2 (position BLOCK+1, block 0, slot 1), head 0, dims 0..3 of the values.
        let vals: Vec<f32> = s.values(0, 1)[3..6].iter().map(|x| x.to_f32()).collect();
        assert_eq!(vals, [112.0, 113.0, 114.0]);
        // Layer 0 untouched.
        assert!(s.keys(0, 0).iter().all(|x| x.to_f32() == 0.0));
        assert!(s.write(0, &blocks, 2 * BLOCK, &k[..6], &v[..6]).is_err());
    }

    #[test]
    fn tensor_blocks_gather_back_what_was_written() {
        let shape = KvShape {
            n_layer: 1,
            n_kv_head: 2,
            head_dim: 4,
        };
        let mut s = TensorStore::new(shape, DType::F32, &Device::Cpu);
        s.ensure(2).unwrap();
        let blocks = [2, 0, 1];
        let t = BLOCK + 10;
        let k = Tensor::arange(0f32, (2 * t * 4) as f32, &Device::Cpu)
            .unwrap()
            .reshape((2, t, 4))
            .unwrap();
        let v = (&k + 0.5).unwrap();
        s.write(0, &blocks, 50, &k, &v).unwrap();
        let (gk, gv) = s.gather(0, &blocks, 50, 50 + t).unwrap();
        assert_eq!(gk.dims(), &[1, 2, t, 4]);
        let diff = (gk.squeeze(0).unwrap() - &k).unwrap().abs().unwrap();
        assert_eq!(diff.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let diff = (gv.squeeze(0).unwrap() - &v).unwrap().abs().unwrap();
        assert_eq!(diff.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
