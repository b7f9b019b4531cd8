//! Token selection: OpenAI's presence and frequency penalties on the logits, then candle's
//! `LogitsProcessor` for temperature, top-k and top-p (greedy at temperature 0).
//!
//! Sampling from every token or from a top-p nucleus keeps candle's numbers but not its method:
//! - candle sorts the whole vocabulary for every token (3.2 ms of a 49k vocabulary, more than a
//!   decode step of SmolLM2 on two cores, and once per sequence of a batch). Here only the tokens
//!   that can be in the nucleus are sorted (see [`nucleus`]), and the same tokens are zeroed.
//! - candle's draw builds rand's `WeightedIndex` over the whole vocabulary. Here it is built over
//!   the tokens left in the nucleus, in the same order, from the same generator (see
//!   [`draw_nonzero`]): the same sums, the same uniform number, the same token.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use rand::SeedableRng;
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;
use rand::rngs::StdRng;

use crate::error::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: u64,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: None,
            top_k: None,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    draw: Draw,
    counts: HashMap<u32, u32>,
}

enum Draw {
    /// Greedy, top-k, and top-k then top-p: candle's own `LogitsProcessor`.
    Candle(LogitsProcessor),
    /// Every token, or a top-p nucleus without top-k (`top_p` inside (0, 1): candle samples from
    /// every token when p is outside): candle's softmax, [`nucleus`] for top-p, then the draw of
    /// candle's `LogitsProcessor` from the generator it would use (the same seed, so the same
    /// numbers).
    Weighted {
        temperature: f64,
        top_p: Option<f32>,
        rng: StdRng,
    },
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let candle = |sampling| Draw::Candle(LogitsProcessor::from_sampling(params.seed, sampling));
        let draw = if params.temperature <= 0.0 {
            candle(Sampling::ArgMax)
        } else {
            let temperature = params.temperature;
            match (params.top_k, params.top_p) {
                (Some(k), None) => candle(Sampling::TopK { k, temperature }),
                (Some(k), Some(p)) => candle(Sampling::TopKThenTopP { k, p, temperature }),
                (None, top_p) => Draw::Weighted {
                    temperature,
                    top_p: top_p.filter(|p| *p > 0.0 && *p < 1.0).map(|p| p as f32),
                    rng: StdRng::seed_from_u64(params.seed),
                },
            }
        };
        Sampler {
            params,
            draw,
            counts: HashMap::new(),
        }
    }

    /// Picks the next token from the logits of the last position.
    pub fn sample(&mut self, mut logits: Vec<f32>) -> Result<u32> {
        let (pp, fp) = (self.params.presence_penalty, self.params.frequency_penalty);
        if pp != 0.0 || fp != 0.0 {
            for (&tok, &n) in &self.counts {
                if let Some(l) = logits.get_mut(tok as usize) {
                    *l -= pp + fp * n as f32;
                }
            }
        }
        let n = logits.len();
        let t = Tensor::from_vec(logits, n, &Device::Cpu)?;
        let tok = match &mut self.draw {
            Draw::Candle(processor) => processor.sample(&t)?,
            Draw::Weighted {
                temperature,
                top_p,
                rng,
            } => {
                // What candle's `sample_f` computes for `Sampling::All`, then its draw.
                let prs = candle_nn::ops::softmax_last_dim(&(&t / *temperature)?)?;
                let mut prs = prs.to_vec1::<f32>()?;
                match *top_p {
                    Some(p) => {
                        nucleus(&mut prs, p);
                        draw_nonzero(&prs, rng)?
                    }
                    None => WeightedIndex::new(&prs).map_err(weights_error)?.sample(rng) as u32,
                }
            }
        };
        *self.counts.entry(tok).or_insert(0) += 1;
        Ok(tok)
    }
}

/// The token candle's `LogitsProcessor` draws from `prs` with `rng` (rand's `WeightedIndex`),
/// for a nucleus: built over the tokens with a weight only. Its cumulative sums at those tokens
/// and its total are the very same floats (adding a zero changes no sum), so the same uniform
/// number lands on the same token; a NaN or negative weight is refused alike.
fn draw_nonzero(prs: &[f32], rng: &mut StdRng) -> Result<u32> {
    let (tokens, weights): (Vec<u32>, Vec<f32>) = prs
        .iter()
        .enumerate()
        .filter(|(_, w)| **w != 0.0)
        .map(|(i, w)| (i as u32, *w))
        .unzip();
    let index = WeightedIndex::new(&weights).map_err(weights_error)?;
    Ok(tokens[index.sample(rng)])
}

fn weights_error(e: rand::distr::weighted::Error) -> crate::error::Error {
    crate::error::Error::Internal(format!("sampling weights: {e}"))
}

/// Zeroes every probability outside the nucleus exactly as candle's top-p does: in order of
/// falling probability (ties by index), tokens are kept while the sum of those kept so far is
/// below `p`.
///
/// Only a prefix of that order is sorted: the tokens in the few thousand buckets of float
/// exponent and leading mantissa bits that hold `p` and a little more (`MARGIN`, beyond what
/// f32 rounding of the running sum can take away). Buckets order as the values do, so those
/// tokens are exactly the first of candle's sorted list, and the same running sum over them
/// ends at the same token. Should it not end among them, everything is sorted, as candle does.
fn nucleus(prs: &mut [f32], p: f32) {
    const MARGIN: f64 = 0.01;
    // Zero and below (never out of a softmax) to bucket 0; positive floats order as their bits.
    let bucket = |v: f32| {
        if v > 0.0 {
            (v.to_bits() >> 19) as usize
        } else {
            0
        }
    };
    let order = |i: &usize, j: &usize| prs[*j].total_cmp(&prs[*i]).then(i.cmp(j));
    let mut mass = vec![0f64; 1 << 13];
    for &v in prs.iter() {
        mass[bucket(v)] += v as f64;
    }
    let mut above = 0f64;
    let low = (0..mass.len())
        .rev()
        .find(|&b| {
            above += mass[b];
            above >= p as f64 + MARGIN
        })
        .unwrap_or(0);
    let mut top: Vec<usize> = (0..prs.len()).filter(|&i| bucket(prs[i]) >= low).collect();
    let keep = loop {
        top.sort_unstable_by(order);
        let mut sum = 0f32;
        let ends = top.iter().position(|&i| {
            let full = sum >= p;
            sum += prs[i];
            full
        });
        match ends {
            Some(c) => {
                top.truncate(c);
                break top;
            }
            None if top.len() == prs.len() => return, // every token is in it
            None => top = (0..prs.len()).collect(),
        }
    };
    let mut kept = vec![false; prs.len()];
    for i in keep {
        kept[i] = true;
    }
    for (pr, kept) in prs.iter_mut().zip(kept) {
        if !kept {
            *pr = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same tokens as candle's own top-p, draw after draw from one seed: over a vocabulary
    /// the size of SmolLM2's, at nuclei of a few tokens to thousands (flat logits), and with
    /// ties (logits on a coarse grid).
    #[test]
    fn top_p_draws_what_candles_top_p_draws() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32
        };
        for (spread, grid) in [(20.0, false), (2.0, false), (0.05, false), (8.0, true)] {
            let logits: Vec<f32> = (0..49152)
                .map(|_| {
                    let v = rnd() * spread;
                    if grid { v.round() } else { v }
                })
                .collect();
            // p = 1: no nucleus, a draw from every token (candle's `All`).
            for (p, temperature) in [(0.9, 1.0), (0.5, 0.7), (0.999, 1.3), (1.0, 0.8)] {
                let mut ours = Sampler::new(SamplingParams {
                    temperature,
                    top_p: Some(p),
                    seed: 11,
                    ..Default::default()
                });
                let mut candle =
                    LogitsProcessor::from_sampling(11, Sampling::TopP { p, temperature });
                let t = Tensor::new(logits.as_slice(), &Device::Cpu).unwrap();
                for _ in 0..20 {
                    assert_eq!(
                        ours.sample(logits.clone()).unwrap(),
                        candle.sample(&t).unwrap(),
                        "spread {spread}, grid {grid}, p {p}, temperature {temperature}"
                    );
                }
            }
        }
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(vec![0.1, 3.0, 2.9]).unwrap(), 1);
    }

    #[test]
    fn frequency_penalty_moves_greedy_off_a_repeated_token() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            frequency_penalty: 0.5,
            ..Default::default()
        });
        assert_eq!(s.sample(vec![0.0, 3.0, 2.9]).unwrap(), 1);
        // Token 1 now carries a 0.5 penalty: 2.5 < 2.9.
        assert_eq!(s.sample(vec![0.0, 3.0, 2.9]).unwrap(), 2);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.0,
                seed,
                ..Default::default()
            });
            (0..20)
                .map(|_| s.sample(logits.clone()).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy_even_when_hot() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 2.0,
            top_k: Some(1),
            seed: 3,
            ..Default::default()
        });
        for _ in 0..10 {
            assert_eq!(s.sample(vec![0.0, 1.0, 0.5]).unwrap(), 1);
        }
    }
}
