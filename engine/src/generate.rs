//! Text generation with a KV cache: greedy decoding, or temperature and top-p (nucleus)
//! sampling from a seeded generator, stopping at a stop token (`<|im_end|>`) or a length cap.

use candle_core::{DType, Device, Tensor};

use crate::model::qwen3::KvCache;
use crate::model::Model;
use crate::rng::SplitMix64;

#[derive(Debug, Clone, Copy)]
pub struct SamplingOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax).
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probabilities reach this mass (1 = all).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 512,
            temperature: 0.0,
            top_p: 1.0,
            seed: 42,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token was generated (it is not part of the output).
    Stop,
    /// `max_new_tokens` were generated.
    Length,
}

/// Generates after `prompt`; calls `on_token` with each new token as it comes (for streaming).
pub fn generate(
    model: &Model,
    prompt: &[u32],
    stop_tokens: &[u32],
    options: &SamplingOptions,
    on_token: &mut dyn FnMut(u32) -> anyhow::Result<()>,
) -> anyhow::Result<(Vec<u32>, Finish)> {
    anyhow::ensure!(!prompt.is_empty(), "the prompt is empty");
    let device = model.options().device.clone();
    let mut cache = KvCache::new(model.layers().len());
    let mut rng = SplitMix64::new(options.seed);
    let mut output = Vec::new();
    let mut logits = last_logits(model, prompt, &mut cache, &device)?;
    for _ in 0..options.max_new_tokens {
        let token = pick(&logits, options, &mut rng)?;
        if stop_tokens.contains(&token) {
            return Ok((output, Finish::Stop));
        }
        output.push(token);
        on_token(token)?;
        logits = last_logits(model, &[token], &mut cache, &device)?;
    }
    Ok((output, Finish::Length))
}

/// The logits of the last of `tokens` after feeding them, as f32 values.
fn last_logits(
    model: &Model,
    tokens: &[u32],
    cache: &mut KvCache,
    device: &Device,
) -> anyhow::Result<Vec<f32>> {
    let input = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), device)?;
    let logits = model.forward_cached(&input, cache)?;
    let last = logits
        .narrow(1, tokens.len() - 1, 1)?
        .squeeze(0)?
        .squeeze(0)?;
    Ok(last.to_dtype(DType::F32)?.detach().to_vec1::<f32>()?)
}

fn pick(logits: &[f32], options: &SamplingOptions, rng: &mut SplitMix64) -> anyhow::Result<u32> {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap_or(0)
    };
    if options.temperature <= 0.0 {
        return Ok(argmax());
    }
    // Softmax at the temperature, in f64 for a stable nucleus.
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / options.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1;
        if mass >= options.top_p {
            break;
        }
    }
    let nucleus = &probs[..kept];
    let mut draw = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * mass;
    for (token, p) in nucleus {
        if draw < *p {
            return Ok(*token);
        }
        draw -= p;
    }
    Ok(nucleus.last().map_or_else(argmax, |p| p.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_nucleus_picks() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut rng = SplitMix64::new(1);
        assert_eq!(
            pick(&logits, &SamplingOptions::default(), &mut rng).unwrap(),
            1
        );
        // A tiny top_p keeps only the most likely token, whatever the draw.
        let narrow = SamplingOptions {
            temperature: 1.0,
            top_p: 1e-6,
            ..SamplingOptions::default()
        };
        for _ in 0..20 {
            assert_eq!(pick(&logits, &narrow, &mut rng).unwrap(), 1);
        }
        // Sampling is seeded and visits more than one token.
        let wide = SamplingOptions {
            temperature: 1.0,
            top_p: 1.0,
            ..SamplingOptions::default()
        };
        let draws = |seed| {
            let mut rng = SplitMix64::new(seed);
            (0..50)
                .map(|_| pick(&logits, &wide, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        let seen: std::collections::BTreeSet<u32> = draws(7).into_iter().collect();
        assert!(seen.len() > 1);
    }
}
