//! A projection `y = x · Wᵀ` of quantized GGUF weights: our kernels for the types they cover on
//! the CPU (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), candle's `QMatMul` for everything
//! else (Q2_K, Q3_K, Q8_K, f16, GPU tensors).

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Storage, Tensor};

use super::kernels::{self, QType};
use crate::error::Result;

/// Which kernels a model's projections use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matmul {
    /// Ours where the type and device allow, else candle's.
    Own,
    /// candle's `QMatMul` throughout (`CORTEX_KERNELS=candle`): how the benchmark measures
    /// candle as it is, and what the reference-model tests compare our model code under.
    Candle,
    /// Weights expanded to f32 at load, unquantized activations: the numerical reference.
    F32,
}

impl Matmul {
    /// `Candle` when `CORTEX_KERNELS=candle`, else `Own`.
    pub fn from_env() -> Self {
        if kernels::enabled() {
            Matmul::Own
        } else {
            Matmul::Candle
        }
    }
}

/// The GGUF types our kernels multiply (on the CPU).
pub fn own_qtype(dtype: GgmlDType) -> Option<QType> {
    match dtype {
        GgmlDType::Q4_0 => Some(QType::Q4_0),
        GgmlDType::Q4_1 => Some(QType::Q4_1),
        GgmlDType::Q8_0 => Some(QType::Q8_0),
        GgmlDType::Q5_0 => Some(QType::Q5_0),
        GgmlDType::Q5_1 => Some(QType::Q5_1),
        GgmlDType::Q4K => Some(QType::Q4K),
        GgmlDType::Q5K => Some(QType::Q5K),
        GgmlDType::Q6K => Some(QType::Q6K),
        _ => None,
    }
}

pub struct Linear(Inner);

enum Inner {
    /// Our kernels' copy of the weights (Q4_0/Q4_1 rows interleaved, see `kernels::Weights`).
    Own(kernels::Weights),
    Candle(QMatMul),
}

/// candle 0.11 multiplies a CPU Q6_K matrix by one activation row with its compact GEMV and by
/// several rows with its repacked tiles; the two round differently, so a sequence decoded alone
/// and the same sequence decoded in a batch drift apart after a few dozen tokens. Giving the one
/// row a twin keeps every product on the tiled kernel: a row's result no longer depends on
/// what else is in the batch. Our own Q6_K kernel has no such split; this matters where candle
/// runs Q6_K on the CPU (`CORTEX_KERNELS=candle`).
fn pads_single_row(mm: &QMatMul) -> bool {
    matches!(mm, QMatMul::QTensor(t) if t.device().is_cpu() && t.dtype() == GgmlDType::Q6K)
}

impl Linear {
    /// Takes the weights of a GGUF tensor of shape (n, k) with our kernels where they apply.
    pub fn from_qtensor(t: QTensor) -> Result<Self> {
        Self::new(t, Matmul::Own)
    }

    /// Takes the weights of a GGUF tensor of shape (n, k), to run with `matmul`.
    pub fn new(t: QTensor, matmul: Matmul) -> Result<Self> {
        match matmul {
            Matmul::Own => {}
            Matmul::Candle => return Ok(Linear(Inner::Candle(QMatMul::from_qtensor(t)?))),
            Matmul::F32 => {
                let w = t.dequantize(&t.device())?;
                return Ok(Linear(Inner::Candle(QMatMul::Tensor(w))));
            }
        }
        let qtype = own_qtype(t.dtype());
        if let (Some(qtype), true, Ok((n, k))) = (qtype, t.device().is_cpu(), t.shape().dims2()) {
            let bytes = t.data()?.into_owned();
            if k.is_multiple_of(qtype.block_weights()) && bytes.len() == n * qtype.row_bytes(k) {
                return Ok(Linear(Inner::Own(kernels::Weights::new(
                    qtype, bytes, n, k,
                ))));
            }
        }
        Ok(Linear(Inner::Candle(QMatMul::from_qtensor(t)?)))
    }

    /// Rows `ids` of the weights in f32, `(ids.len(), k)`: an embedding lookup that expands only
    /// the rows asked for. The whole table is expanded where candle holds the weights.
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        match &self.0 {
            Inner::Own(w) => {
                let (n, k) = (w.n(), w.k());
                let mut row = vec![0u8; w.row_bytes()];
                let mut out = vec![0f32; ids.len() * k];
                for (&id, o) in ids.iter().zip(out.chunks_exact_mut(k)) {
                    let id = id as usize;
                    if id >= n {
                        return Err(candle_core::Error::Msg(format!(
                            "token id {id} is outside the embedding table of {n} rows"
                        ))
                        .into());
                    }
                    w.row(id, &mut row);
                    kernels::blocks::dequantize_row(w.qtype(), &row, o);
                }
                Ok(Tensor::from_vec(out, (ids.len(), k), &Device::Cpu)?)
            }
            Inner::Candle(_) => Err(candle_core::Error::Msg(
                "Linear::rows needs weights our kernels hold; use dequantize".into(),
            )
            .into()),
        }
    }

    /// All the weights in f32, `(n, k)`.
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(match &self.0 {
            Inner::Own(w) => {
                let ids: Vec<u32> = (0..w.n() as u32).collect();
                return self.rows(&ids);
            }
            Inner::Candle(QMatMul::QTensor(t)) => t.dequantize(&t.device())?,
            Inner::Candle(QMatMul::Tensor(w)) => w.clone(),
            Inner::Candle(QMatMul::TensorF16(w)) => w.to_dtype(DType::F32)?,
        })
    }

    /// Whether our kernels run this projection (for tests and logs).
    pub fn is_own(&self) -> bool {
        matches!(self.0, Inner::Own(_))
    }

    /// `x`: f32 (.., k) → f32 (.., n).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = match &self.0 {
            Inner::Candle(mm) => {
                let k = x.dims().last().copied().unwrap_or(0);
                if k > 0 && x.elem_count() == k && pads_single_row(mm) {
                    let twins = x.reshape((1, k))?.broadcast_as((2, k))?.contiguous()?;
                    let y = mm.forward(&twins)?.narrow(0, 0, 1)?;
                    let mut shape = x.dims().to_vec();
                    if let Some(last) = shape.last_mut() {
                        *last = y.dim(1)?;
                    }
                    return Ok(y.reshape(shape)?);
                }
                return Ok(mm.forward(x)?);
            }
            Inner::Own(w) => w,
        };
        let mut ys = own_forward(&[w], x)?;
        Ok(ys.pop().expect("one product"))
    }

    /// `ls[i].forward(x)` for every projection of one input. Where our kernels run them all and
    /// their widths and activation groupings agree (a layer's query, key and value, or its gate
    /// and up), the input is quantized once and the products go to the pool together; the
    /// results are the same as one by one.
    pub fn forward_many(ls: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let ws: Option<Vec<&kernels::Weights>> = ls
            .iter()
            .map(|l| match &l.0 {
                Inner::Own(w) => Some(w),
                Inner::Candle(_) => None,
            })
            .collect();
        match ws {
            Some(ws)
                if ws.windows(2).all(|p| {
                    p[0].k() == p[1].k()
                        && p[0].qtype().block_weights() == p[1].qtype().block_weights()
                }) =>
            {
                own_forward(&ws, x)
            }
            _ => ls.iter().map(|l| l.forward(x)).collect(),
        }
    }
}

/// `x` (f32 or not, `(.., k)`) times each of `ws` (all `k` wide) with our kernels.
fn own_forward(ws: &[&kernels::Weights], x: &Tensor) -> Result<Vec<Tensor>> {
    let k = ws.first().map_or(0, |w| w.k());
    let dims = x.dims();
    if let Some(w) = ws.iter().find(|w| dims.last() != Some(&w.k())) {
        return Err(candle_core::Error::Msg(format!(
            "Linear: input of shape {dims:?} for weights of {}x{}",
            w.n(),
            w.k()
        ))
        .into());
    }
    let m = x.elem_count() / k.max(1);
    let x = if x.dtype() == DType::F32 {
        Cow::Borrowed(x)
    } else {
        Cow::Owned(x.to_dtype(DType::F32)?)
    };
    let x = if x.is_contiguous() {
        x
    } else {
        Cow::Owned(x.contiguous()?)
    };
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.n()]).collect();
    {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Err(
                candle_core::Error::Msg("Linear: CPU weights with a non-CPU input".into()).into(),
            );
        };
        let xs = &cpu.as_slice::<f32>()?[layout.start_offset()..][..m * k];
        match ws {
            [w] => kernels::matmul(w, xs, m, &mut ys[0]),
            _ => {
                let mut outs: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
                kernels::matmul_many(ws, xs, m, &mut outs);
            }
        }
    }
    ws.iter()
        .zip(ys)
        .map(|(w, y)| {
            let mut shape = dims.to_vec();
            if let Some(last) = shape.last_mut() {
                *last = w.n();
            }
            Ok(Tensor::from_vec(y, shape, &Device::Cpu)?)
        })
        .collect()
}
