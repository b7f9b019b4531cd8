//! Token selection: OpenAI's presence and frequency penalties on the logits, then candle's
//! `LogitsProcessor` for temperature, top-k and top-p (greedy at temperature 0).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

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
    processor: LogitsProcessor,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let sampling = if params.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            let temperature = params.temperature;
            match (params.top_k, params.top_p) {
                (None, None) => Sampling::All { temperature },
                (Some(k), None) => Sampling::TopK { k, temperature },
                (None, Some(p)) => Sampling::TopP { p, temperature },
                (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
            }
        };
        Sampler {
            processor: LogitsProcessor::from_sampling(params.seed, sampling),
            params,
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
        let tok = self.processor.sample(&t)?;
        *self.counts.entry(tok).or_insert(0) += 1;
        Ok(tok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
