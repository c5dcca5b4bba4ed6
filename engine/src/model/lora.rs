//! A linear layer's LoRA update, as PEFT computes it: `scaling * B (A dropout(x))`.
//!
//! Dropout masks are not drawn from a device RNG: each is a pure function of the step's dropout
//! seed (from `--seed`, the global step and the micro-batch) and the module's name, so a layer
//! recomputed under gradient checkpointing, and a resumed run, see exactly the same masks.

use candle_core::{Result, Tensor, Var};

use crate::rng::SplitMix64;

/// The adapter matrices of one linear layer.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// (rank, in)
    pub a: Var,
    /// (out, rank)
    pub b: Var,
    /// `alpha / rank`, or `alpha / sqrt(rank)` under rsLoRA.
    pub scaling: f64,
    /// Dropout probability on the adapter's input (training only).
    pub dropout: f64,
    /// Tells this module's masks apart from every other module's.
    pub module_key: u64,
}

impl LoraPair {
    /// The update for `x` (rows, in) in x's dtype; `dropout_seed` is None outside training.
    pub fn delta(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let a = self.a.as_tensor().to_dtype(x.dtype())?;
        let b = self.b.as_tensor().to_dtype(x.dtype())?;
        let x = match dropout_seed {
            Some(seed) if self.dropout > 0.0 => {
                let (rows, cols) = x.dims2()?;
                let seed = seed ^ self.module_key;
                let (threshold, keep) = dropout_constants(self.dropout);
                // A GPU draws the same mask on the device (no host copy).
                let mask = match crate::cuda::dropout_mask(seed, threshold, keep, x)? {
                    Some(mask) => mask,
                    None => Tensor::from_vec(
                        dropout_mask(seed, rows * cols, self.dropout),
                        (rows, cols),
                        x.device(),
                    )?
                    .to_dtype(x.dtype())?,
                };
                (x * mask)?
            }
            _ => x.clone(),
        };
        crate::ops::linear(&crate::ops::linear(&x, &a)?, &b)? * self.scaling
    }
}

/// Inverted dropout's multipliers: 0 with probability `p`, else `1 / (1 - p)` (as torch's
/// `nn.Dropout` in training), from a splitmix64 stream seeded by `seed`.
pub fn dropout_mask(seed: u64, len: usize, p: f64) -> Vec<f32> {
    if p >= 1.0 {
        return vec![0.0; len];
    }
    let (threshold, keep) = dropout_constants(p);
    let mut rng = SplitMix64::new(seed);
    (0..len)
        .map(|_| {
            if rng.next_u64() >> 11 < threshold {
                0.0
            } else {
                keep
            }
        })
        .collect()
}

/// Dropout's `(threshold, keep)`: drop when a uniform 53-bit draw falls below `threshold`
/// (every draw, for p >= 1), else multiply by `keep = 1 / (1 - p)`.
pub fn dropout_constants(p: f64) -> (u64, f32) {
    if p >= 1.0 {
        return (u64::MAX, 0.0);
    }
    ((p * (1u64 << 53) as f64) as u64, (1.0 / (1.0 - p)) as f32)
}

/// The `i`-th element of [`dropout_mask`]'s stream without the ones before it (splitmix64 is a
/// counter: its (i + 1)-th output mixes `seed + (i + 1) * golden`) — what the CUDA kernel
/// computes per element.
pub fn dropout_mask_at(seed: u64, i: u64, threshold: u64, keep: f32) -> f32 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    if z >> 11 < threshold {
        0.0
    } else {
        keep
    }
}

/// A stable 64-bit key for a module name (FNV-1a, then mixed), the same in every process.
pub fn module_key(name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    SplitMix64::new(hash).next_u64()
}

/// The dropout seed of one micro-batch of one optimizer step.
pub fn step_dropout_seed(seed: u64, global_step: u64, micro_batch: usize) -> u64 {
    let mut rng = SplitMix64::new(seed ^ 0x4c6f_5241_2044_726f); // "LoRA Dro"
    let a = rng.next_u64();
    SplitMix64::new(a ^ global_step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (micro_batch as u64))
        .next_u64()
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_device_formula_draws_the_streamed_mask() {
        for p in [0.05, 0.1, 0.5] {
            let (threshold, keep) = dropout_constants(p);
            let streamed = dropout_mask(0xfeed_beef, 1000, p);
            let at: Vec<f32> = (0..1000)
                .map(|i| dropout_mask_at(0xfeed_beef, i, threshold, keep))
                .collect();
            assert_eq!(streamed, at, "p = {p}");
        }
    }

    use super::*;

    #[test]
    fn masks_drop_about_p_and_rescale_the_rest() {
        let mask = dropout_mask(7, 100_000, 0.1);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "{dropped}");
        let kept = mask.iter().find(|&&m| m != 0.0).unwrap();
        assert!((kept - 1.0 / 0.9).abs() < 1e-6);
        // The mean multiplier is 1: dropout does not change the expected input.
        let mean = mask.iter().map(|&m| m as f64).sum::<f64>() / mask.len() as f64;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        assert_eq!(
            mask,
            dropout_mask(7, 100_000, 0.1),
            "a pure function of the seed"
        );
        assert_ne!(mask, dropout_mask(8, 100_000, 0.1));
        assert!(dropout_mask(1, 10, 0.0).iter().all(|&m| m == 1.0));
    }

    #[test]
    fn seeds_differ_by_step_micro_batch_and_module() {
        let s = step_dropout_seed(42, 3, 0);
        assert_eq!(s, step_dropout_seed(42, 3, 0));
        assert_ne!(s, step_dropout_seed(42, 4, 0));
        assert_ne!(s, step_dropout_seed(42, 3, 1));
        assert_ne!(s, step_dropout_seed(43, 3, 0));
        assert_ne!(
            module_key("model.layers.0.self_attn.q_proj"),
            module_key("model.layers.0.self_attn.k_proj")
        );
    }
}
