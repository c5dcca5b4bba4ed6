//! The optimizer side of a training step: AdamW exactly as `torch.optim.AdamW` computes it
//! (with transformers' Trainer parameter groups: no weight decay on biases and norm weights),
//! global-norm gradient clipping as `torch.nn.utils.clip_grad_norm_`, and the learning-rate
//! schedules of transformers' `get_scheduler`.
//!
//! The optimizer state (step count, exp_avg, exp_avg_sq per parameter) round-trips through a
//! safetensors file for exact resume.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::grad::Gradients;

/// Whether transformers' Trainer puts a parameter in the weight-decay group: everything except
/// biases and norm weights (its rule matches `bias`, `layernorm`, `rmsnorm`, a `norm` path
/// component and components ending in `_norm`).
pub fn applies_weight_decay(name: &str) -> bool {
    let lower = name.to_lowercase();
    if lower.contains("bias") || lower.contains("layernorm") || lower.contains("rmsnorm") {
        return false;
    }
    !lower
        .split('.')
        .any(|part| part == "norm" || part.ends_with("_norm"))
}

/// AdamW hyper-parameters (the learning rate comes with each step, from the scheduler).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

#[derive(Debug)]
struct ParamState {
    name: String,
    var: Var,
    decays: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW with decoupled weight decay, per element at step `s` with learning rate `lr`:
/// `p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g^2;
///  p -= lr/(1-b1^s) * m / (sqrt(v)/sqrt(1-b2^s) + eps)`.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    states: Vec<ParamState>,
    /// Use the single-pass CPU update where it applies (off only to test it against the
    /// tensor form).
    fused: bool,
}

/// What went wrong restoring optimizer state.
#[derive(Debug, thiserror::Error)]
pub enum OptimizerStateError {
    #[error("cannot read optimizer state {path}: {message}")]
    Read { path: String, message: String },
    #[error("optimizer state {path} does not match the model: {message}")]
    Mismatch { path: String, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl AdamW {
    /// One state per parameter, in the order of `params` (which gradients must follow).
    pub fn new(params: &[(String, Var)], config: AdamWConfig) -> Result<Self> {
        let states = params
            .iter()
            .map(|(name, var)| {
                // Moments in f32 at least, whatever the master dtype.
                let dtype = if var.dtype() == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                Ok(ParamState {
                    name: name.clone(),
                    var: var.clone(),
                    decays: applies_weight_decay(name),
                    exp_avg: Tensor::zeros(var.shape(), dtype, var.device())?,
                    exp_avg_sq: Tensor::zeros(var.shape(), dtype, var.device())?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            step: 0,
            states,
            fused: true,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr`. A parameter without a gradient is updated as if its
    /// gradient were zero (moments decay, weight decay applies), which is what torch does for
    /// an MoE expert that no token chose, since transformers stores experts in fused tensors.
    pub fn step(&mut self, grads: &Gradients, lr: f64) -> Result<()> {
        assert_eq!(
            grads.len(),
            self.states.len(),
            "gradients were computed for other parameters"
        );
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let bias_correction1 = 1.0 - beta1.powi(self.step as i32);
        let bias_correction2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias_correction1;
        for (i, state) in self.states.iter_mut().enumerate() {
            debug_assert_eq!(grads.name(i), state.name);
            let constants = StepConstants {
                decay: if state.decays && weight_decay != 0.0 {
                    Some(1.0 - lr * weight_decay)
                } else {
                    None
                },
                beta1,
                beta2,
                eps,
                bias_correction2_sqrt,
                step_size,
            };
            if self.fused && fused_cpu_update(state, grads.get(i), &constants)? {
                continue;
            }
            let dtype = state.exp_avg.dtype();
            let grad = match grads.get(i) {
                Some(g) => g.to_dtype(dtype)?,
                None => state.exp_avg.zeros_like()?,
            };
            let mut param = state.var.as_detached_tensor().to_dtype(dtype)?;
            if state.decays && weight_decay != 0.0 {
                param = param.affine(1.0 - lr * weight_decay, 0.0)?;
            }
            // torch: exp_avg.lerp_(grad, 1 - beta1), i.e. m + (1 - b1) * (g - m).
            state.exp_avg =
                (&state.exp_avg + (&grad - &state.exp_avg)?.affine(1.0 - beta1, 0.0)?)?;
            state.exp_avg_sq =
                (state.exp_avg_sq.affine(beta2, 0.0)? + grad.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            let scalar = |v: f64| Tensor::new(v, state.var.device())?.to_dtype(dtype);
            let denom = state
                .exp_avg_sq
                .sqrt()?
                .broadcast_div(&scalar(bias_correction2_sqrt)?)?
                .affine(1.0, eps)?;
            let update = (&state.exp_avg / denom)?.affine(-step_size, 0.0)?;
            state
                .var
                .set(&(param + update)?.to_dtype(state.var.dtype())?)?;
        }
        Ok(())
    }

    /// The state as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) plus metadata
    /// (`step`, and the hyper-parameters for the record).
    pub fn state_tensors(&self) -> (Vec<(String, Tensor)>, HashMap<String, String>) {
        let mut tensors = Vec::with_capacity(2 * self.states.len());
        for s in &self.states {
            tensors.push((format!("{}.exp_avg", s.name), s.exp_avg.clone()));
            tensors.push((format!("{}.exp_avg_sq", s.name), s.exp_avg_sq.clone()));
        }
        let metadata = HashMap::from([
            ("format".to_string(), "whet-adamw".to_string()),
            ("step".to_string(), self.step.to_string()),
            ("beta1".to_string(), self.config.beta1.to_string()),
            ("beta2".to_string(), self.config.beta2.to_string()),
            ("eps".to_string(), self.config.eps.to_string()),
            (
                "weight_decay".to_string(),
                self.config.weight_decay.to_string(),
            ),
        ]);
        (tensors, metadata)
    }

    pub fn save(&self, path: impl AsRef<Path>) -> std::result::Result<(), OptimizerStateError> {
        let path = path.as_ref();
        let (tensors, metadata) = self.state_tensors();
        crate::model::qwen3::write_safetensors(path, tensors, metadata).map_err(|e| {
            OptimizerStateError::Read {
                path: path.display().to_string(),
                message: e.to_string(),
            }
        })
    }

    /// Restores the step count and moments saved by [`AdamW::save`] for the same parameters.
    pub fn load(&mut self, path: impl AsRef<Path>) -> std::result::Result<(), OptimizerStateError> {
        let path = path.as_ref();
        let read_err = |message: String| OptimizerStateError::Read {
            path: path.display().to_string(),
            message,
        };
        let mismatch = |message: String| OptimizerStateError::Mismatch {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| read_err(e.to_string()))?;
        let step: u64 = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| read_err("no `step` in the metadata".into()))?;
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
        for s in &mut self.states {
            for (suffix, slot) in [
                ("exp_avg", &mut s.exp_avg),
                ("exp_avg_sq", &mut s.exp_avg_sq),
            ] {
                let key = format!("{}.{suffix}", s.name);
                let t = tensors
                    .remove(&key)
                    .ok_or_else(|| mismatch(format!("no `{key}`")))?;
                if t.shape() != slot.shape() {
                    return Err(mismatch(format!(
                        "`{key}` has shape {:?}, expected {:?}",
                        t.dims(),
                        slot.dims()
                    )));
                }
                *slot = t.to_dtype(slot.dtype())?.to_device(s.var.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Below this many elements per thread the fused update runs on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 18;

/// The per-step scalars of one AdamW update.
struct StepConstants {
    /// `1 - lr * weight_decay` when the parameter decays.
    decay: Option<f64>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    bias_correction2_sqrt: f64,
    step_size: f64,
}

/// The AdamW update of one f32 parameter on the CPU in a single pass over its elements,
/// instead of a dozen whole-tensor temporaries. It performs the very f32 operations, in the
/// same order, that the tensor form in [`AdamW::step`] does (candle's `affine(m, a)` is
/// `x * m + a` in f32), so the results are bit-identical. Returns false (nothing done) for
/// other dtypes and devices.
fn fused_cpu_update(
    state: &mut ParamState,
    grad: Option<&Tensor>,
    c: &StepConstants,
) -> Result<bool> {
    let param = state.var.as_tensor();
    let all_f32 = param.dtype() == DType::F32
        && state.exp_avg.dtype() == DType::F32
        && grad.is_none_or(|g| g.dtype() == DType::F32);
    if !param.device().is_cpu() || !all_f32 || !param.is_contiguous() {
        return Ok(false);
    }
    let grad = grad.map(Tensor::contiguous).transpose()?;
    let (exp_avg, exp_avg_sq) = (state.exp_avg.contiguous()?, state.exp_avg_sq.contiguous()?);
    let n = param.elem_count();
    let (mut new_param, mut new_avg, mut new_avg_sq) =
        (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    {
        let guards = [
            Some(param),
            Some(&exp_avg),
            Some(&exp_avg_sq),
            grad.as_ref(),
        ]
        .map(|t| t.map(Tensor::storage_and_layout));
        let slices: Vec<Option<&[f32]>> = guards
            .iter()
            .map(|guard| match guard {
                Some((storage, layout)) => match (&**storage, layout.contiguous_offsets()) {
                    (candle_core::Storage::Cpu(cpu), Some((start, end))) => {
                        Ok(Some(&cpu.as_slice::<f32>()?[start..end]))
                    }
                    _ => candle_core::bail!("fused AdamW expects contiguous CPU tensors"),
                },
                None => Ok(None),
            })
            .collect::<Result<_>>()?;
        let (p, m, v, g) = (
            slices[0].expect("param"),
            slices[1].expect("exp_avg"),
            slices[2].expect("exp_avg_sq"),
            slices[3],
        );
        // The scalars as the tensor form rounds them.
        let f = |x: f64| x as f32;
        let (one_minus_b1, b2, one_minus_b2) = (f(1.0 - c.beta1), f(c.beta2), f(1.0 - c.beta2));
        let (bc2, eps, neg_step) = (f(c.bias_correction2_sqrt), f(c.eps), f(-c.step_size));
        let decay = c.decay.map(f);
        let update = |out_p: &mut [f32], out_m: &mut [f32], out_v: &mut [f32], start: usize| {
            for j in 0..out_p.len() {
                let i = start + j;
                let grad = g.map_or(0.0, |g| g[i]);
                let mut param = p[i];
                if let Some(decay) = decay {
                    param = param * decay + 0.0;
                }
                let m = m[i] + ((grad - m[i]) * one_minus_b1 + 0.0);
                let v = (v[i] * b2 + 0.0) + ((grad * grad) * one_minus_b2 + 0.0);
                let denom = (v.sqrt() / bc2) * 1.0 + eps;
                let update = (m / denom) * neg_step + 0.0;
                out_p[j] = param + update;
                out_m[j] = m;
                out_v[j] = v;
            }
        };
        // Threads only pay off for large tensors (spawning is not free on a busy machine).
        let threads = candle_core::utils::get_num_threads().clamp(1, 16);
        let chunk = n.div_ceil(threads).max(PARALLEL_MIN_ELEMENTS);
        if chunk >= n {
            update(&mut new_param, &mut new_avg, &mut new_avg_sq, 0);
        } else {
            std::thread::scope(|scope| {
                for (((out_p, out_m), out_v), start) in new_param
                    .chunks_mut(chunk)
                    .zip(new_avg.chunks_mut(chunk))
                    .zip(new_avg_sq.chunks_mut(chunk))
                    .zip((0..n).step_by(chunk))
                {
                    let update = &update;
                    scope.spawn(move || update(out_p, out_m, out_v, start));
                }
            });
        }
    }
    let (shape, device) = (param.shape().clone(), param.device().clone());
    state.exp_avg = Tensor::from_vec(new_avg, &shape, &device)?;
    state.exp_avg_sq = Tensor::from_vec(new_avg_sq, &shape, &device)?;
    state
        .var
        .set(&Tensor::from_vec(new_param, &shape, &device)?)?;
    Ok(true)
}

/// Scales all gradients so that their global L2 norm is at most `max_norm` and returns the norm
/// before clipping, as `torch.nn.utils.clip_grad_norm_`: every gradient is multiplied by
/// `min(1, max_norm / (norm + 1e-6))`. Missing gradients count as zero.
pub fn clip_grad_norm(grads: &mut Gradients, max_norm: f64) -> Result<f64> {
    let mut sum_sq = 0f64;
    for (_, grad) in grads.iter() {
        let Some(g) = grad else { continue };
        // One pass over a contiguous f32 CPU gradient, with the same f64 squares summed in the
        // same order as the tensor form below (whose temporaries cost three passes).
        if g.dtype() == DType::F32 && g.is_contiguous() {
            let squares = crate::ops::with_cpu_slice(g, |xs: &[f32]| {
                xs.iter()
                    .fold(0f64, |acc, &x| acc + f64::from(x) * f64::from(x))
            })?;
            if let Some(squares) = squares {
                sum_sq += squares;
                continue;
            }
        }
        sum_sq += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let norm = sum_sq.sqrt();
    // torch computes the coefficient in float32; multiplying by a clamped 1.0 changes nothing.
    let coef = ((max_norm as f32) / (norm as f32 + 1e-6)).min(1.0);
    if coef < 1.0 {
        grads.scale(coef as f64)?;
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_decay_groups_follow_transformers() {
        for name in [
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.self_attn.q_norm.weight",
            "model.layers.0.self_attn.k_norm.weight",
            "model.layers.0.self_attn.q_proj.bias",
        ] {
            assert!(!applies_weight_decay(name), "{name}");
        }
        for name in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.mlp.gate.weight",
            "model.layers.0.mlp.experts.3.down_proj.weight",
        ] {
            assert!(applies_weight_decay(name), "{name}");
        }
    }

    #[test]
    fn adamw_matches_hand_computation_and_state_round_trips() {
        let params = vec![
            (
                "w".to_string(),
                Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap(),
            ),
            (
                "norm.weight".to_string(),
                Var::new(&[0.5f32], &Device::Cpu).unwrap(),
            ),
        ];
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(&params, config).unwrap();
        let mut grads = Gradients::empty(&params);
        grads.set(0, Some(Tensor::new(&[0.3f32, -0.1], &Device::Cpu).unwrap()));
        grads.set(1, Some(Tensor::new(&[0.2f32], &Device::Cpu).unwrap()));
        opt.step(&grads, 0.01).unwrap();
        // Step 1: m_hat = g, v_hat = g^2, so the update is lr * sign(g) (up to eps).
        let w: Vec<f32> = params[0].1.to_vec1().unwrap();
        let expected0 = 1.0 * (1.0 - 0.01 * 0.1) - 0.01 * 0.3 / (0.3 + 1e-8);
        assert!((w[0] as f64 - expected0).abs() < 1e-6, "{w:?}");
        let n: Vec<f32> = params[1].1.to_vec1().unwrap();
        assert!(
            (n[0] as f64 - (0.5 - 0.01)).abs() < 1e-6,
            "no decay on norms: {n:?}"
        );

        let dir = std::env::temp_dir().join(format!("whet-adamw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("optimizer.safetensors");
        opt.save(&path).unwrap();
        let mut restored = AdamW::new(&params, config).unwrap();
        restored.load(&path).unwrap();
        assert_eq!(restored.step_count(), 1);
        for (a, b) in opt.states.iter().zip(&restored.states) {
            let d = (&a.exp_avg_sq - &b.exp_avg_sq)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        }
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn fused_update_is_bit_identical_to_the_tensor_form() {
        let values = |n: usize, seed: u64| crate::ops::tests::test_values(n, seed);
        let make_params = || {
            vec![
                (
                    "w".to_string(),
                    Var::from_vec(
                        values(5000, 1).iter().map(|&v| v as f32).collect(),
                        (50, 100),
                        &Device::Cpu,
                    )
                    .unwrap(),
                ),
                (
                    "norm.weight".to_string(),
                    Var::new(&[0.5f32, -1.0, 2.0], &Device::Cpu).unwrap(),
                ),
                (
                    "unused".to_string(),
                    Var::new(&[0.25f32], &Device::Cpu).unwrap(),
                ),
            ]
        };
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let (fused_params, plain_params) = (make_params(), make_params());
        let mut fused = AdamW::new(&fused_params, config).unwrap();
        let mut plain = AdamW::new(&plain_params, config).unwrap();
        plain.fused = false;
        for step in 0..4u64 {
            let mut grads = Gradients::empty(&fused_params);
            let g: Vec<f32> = values(5000, 10 + step)
                .iter()
                .map(|&v| (v * 1e-3) as f32)
                .collect();
            // A transposed (non-contiguous) gradient too.
            let g = Tensor::from_vec(g, (100, 50), &Device::Cpu)
                .unwrap()
                .t()
                .unwrap();
            grads.set(0, Some(g));
            grads.set(
                1,
                Some(Tensor::new(&[1e-9f32, -3.0, 0.0], &Device::Cpu).unwrap()),
            );
            fused.step(&grads, 1e-3 * (step + 1) as f64).unwrap();
            plain.step(&grads, 1e-3 * (step + 1) as f64).unwrap();
            for ((name, a), (_, b)) in fused_params.iter().zip(&plain_params) {
                let (a, b): (Vec<f32>, Vec<f32>) = (
                    a.flatten_all().unwrap().to_vec1().unwrap(),
                    b.flatten_all().unwrap().to_vec1().unwrap(),
                );
                let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{name} differs after step {step}");
            }
            for (a, b) in fused.states.iter().zip(&plain.states) {
                for (x, y) in [(&a.exp_avg, &b.exp_avg), (&a.exp_avg_sq, &b.exp_avg_sq)] {
                    let (x, y): (Vec<f32>, Vec<f32>) = (
                        x.flatten_all().unwrap().to_vec1().unwrap(),
                        y.flatten_all().unwrap().to_vec1().unwrap(),
                    );
                    assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
                }
            }
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let params = vec![(
            "a".to_string(),
            Var::new(&[0f32, 0.0], &Device::Cpu).unwrap(),
        )];
        let mut grads = Gradients::empty(&params);
        grads.set(0, Some(Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap()));
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let g: Vec<f32> = grads.get(0).unwrap().to_vec1().unwrap();
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
        // The single-pass sum of squares is the tensor form's, bit for bit.
        let values: Vec<f32> = crate::ops::tests::test_values(10_000, 5)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let g = Tensor::from_vec(values, 10_000, &Device::Cpu).unwrap();
        let mut grads = Gradients::empty(&params);
        grads.set(0, Some(g.clone()));
        let fast = clip_grad_norm(&mut grads, 1e9).unwrap();
        let tensor_form = g
            .to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt();
        assert_eq!(fast.to_bits(), tensor_form.to_bits());
    }
}
