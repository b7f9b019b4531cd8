//! Element-wise steps of the forward pass on the CPU, split over the kernel pool.
//!
//! candle runs an element-wise operation on one thread below 64k elements, which is every
//! decode step: SiLU's exponentials alone took 6% of a batch of eight on one core while the
//! other waited. These compute exactly what candle's operations compute, element by element
//! in the same order of operations, so the results are bit for bit the same.

use candle_core::{DType, Device, Storage, Tensor};

use super::kernels;
use crate::error::{Error, Result};

/// Elements per task: enough that a hand-off costs little beside the work.
const CHUNK: usize = 2048;

/// `silu(gate) * up` (the gated feed-forward of llama-like models) for f32 CPU tensors of one
/// shape: `g / (1 + e^-g) * u`, as candle's `silu` and `mul` round it.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() || gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
        return Err(Error::Internal(format!(
            "silu_mul of {:?} {:?} and {:?} {:?}",
            gate.shape(),
            gate.dtype(),
            up.shape(),
            up.dtype()
        )));
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let n = gate.elem_count();
    let mut out = vec![0f32; n];
    {
        let (gs, gl) = gate.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        let (Storage::Cpu(gc), Storage::Cpu(uc)) = (&*gs, &*us) else {
            return Err(Error::Internal("silu_mul of a device tensor".into()));
        };
        let g = &gc.as_slice::<f32>()?[gl.start_offset()..][..n];
        let u = &uc.as_slice::<f32>()?[ul.start_offset()..][..n];
        let dst = kernels::Out(out.as_mut_ptr());
        kernels::parallel(n.div_ceil(CHUNK), |t| {
            let lo = t * CHUNK;
            let len = CHUNK.min(n - lo);
            // SAFETY: task t alone writes out[lo..lo + len], inside `out`.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.at(lo), len) };
            for ((o, &g), &u) in o.iter_mut().zip(&g[lo..][..len]).zip(&u[lo..][..len]) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        });
    }
    Ok(Tensor::from_vec(out, gate.shape(), &Device::Cpu)?)
}

/// Rotary position embedding in place, on the layout the projections leave: `x` holds tokens of
/// `heads` heads of `head_dim`, and token `t` turns by row `t` of `cos` and `sin` (`head_dim / 2`
/// each). `interleaved` rotates pairs `(2i, 2i + 1)` (candle's `rope_i`, llama), otherwise pairs
/// `(i, i + head_dim / 2)` (`rope`, the other architectures). Each element is what candle's
/// operation gives, the same products and sums in the same order, without the transposes to and
/// from `(heads, tokens, head_dim)` and the thread hand-off candle makes for several tokens.
///
/// # Panics
/// If `x` is not a whole number of tokens or the tables are shorter than the tokens.
pub fn rotate(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) {
    let half = head_dim / 2;
    assert!(
        head_dim.is_multiple_of(2) && x.len().is_multiple_of(heads * head_dim),
        "rotate of {} values",
        x.len()
    );
    let tokens = x.len() / (heads * head_dim);
    assert!(
        cos.len() >= tokens * half && sin.len() >= tokens * half,
        "rotary rows for {tokens} tokens"
    );
    for (t, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
        for h in row.chunks_exact_mut(head_dim) {
            if interleaved {
                for ((p, &c), &s) in h.chunks_exact_mut(2).zip(c).zip(s) {
                    let (a, b) = (p[0], p[1]);
                    p[0] = a * c - b * s;
                    p[1] = a * s + b * c;
                }
            } else {
                let (lo, hi) = h.split_at_mut(half);
                for (((a, b), &c), &s) in lo.iter_mut().zip(hi).zip(c).zip(s) {
                    let (x1, x2) = (*a, *b);
                    *a = x1 * c - x2 * s;
                    *b = x1 * s + x2 * c;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit for bit candle's `rope_i` and `rope`, which take `(batch, heads, tokens, head_dim)`,
    /// for one token and for several (candle has a separate path for each).
    #[test]
    fn rotate_is_candles_rope() {
        let dev = Device::Cpu;
        for (tokens, heads, hd) in [(1, 3, 64), (5, 9, 64), (7, 2, 10)] {
            let x = Tensor::randn(0f32, 2.0, (1, tokens, heads, hd), &dev).unwrap();
            let cos = Tensor::randn(0f32, 1.0, (tokens, hd / 2), &dev).unwrap();
            let sin = Tensor::randn(0f32, 1.0, (tokens, hd / 2), &dev).unwrap();
            let heads_first = x.transpose(1, 2).unwrap().contiguous().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for interleaved in [true, false] {
                let want = if interleaved {
                    candle_nn::rotary_emb::rope_i(&heads_first, &cos, &sin).unwrap()
                } else {
                    candle_nn::rotary_emb::rope(&heads_first, &cos, &sin).unwrap()
                };
                let want = flat(&want.transpose(1, 2).unwrap().contiguous().unwrap());
                let mut got = flat(&x);
                rotate(&mut got, heads, hd, &flat(&cos), &flat(&sin), interleaved);
                assert!(
                    want.iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "tokens {tokens}, heads {heads}, head_dim {hd}, interleaved {interleaved}"
                );
            }
        }
    }

    /// Bit for bit what candle's two operations give, over more elements than one task takes
    /// and a ragged tail.
    #[test]
    fn silu_mul_is_candles_silu_then_mul() {
        let dev = Device::Cpu;
        for n in [1, 7, CHUNK, 3 * CHUNK + 5] {
            let g = Tensor::randn(0f32, 4.0, (1, n), &dev).unwrap();
            let u = Tensor::randn(0f32, 1.0, (1, n), &dev).unwrap();
            let want = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
            let got = silu_mul(&g, &u).unwrap();
            let (want, got) = (
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(
                want.iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "n = {n}"
            );
        }
    }
}
