//! The optimizer side of a training step: AdamW exactly as `torch.optim.AdamW` computes it
//! (with transformers' Trainer parameter groups: no weight decay on biases and norm weights) and
//! global-norm gradient clipping as `torch.nn.utils.clip_grad_norm_`. The learning rate comes
//! from whet-shared's `schedule`, the one the studio plots.
//!
//! AdamW keeps its moments for a contiguous range of the flat trainable space
//! ([`crate::model::FlatLayout`]) — the whole space in one process, a shard of it on a ZeRO rank
//! — and they round-trip through a safetensors file for an exact resume.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::grad::Gradients;
use crate::model::params::Piece;
use crate::model::{FlatLayout, TrainableParams};
use crate::sync::GradSync;
use crate::tensor_files;

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

/// AdamW with decoupled weight decay, per element at step `s` with learning rate `lr`:
/// `p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g^2;
///  p -= lr/(1-b1^s) * m / (sqrt(v)/sqrt(1-b2^s) + eps)`.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    params: Vec<(String, Var)>,
    decays: Vec<bool>,
    layout: Arc<FlatLayout>,
    /// The part of the flat space this optimizer updates.
    range: Range<usize>,
    /// First and second moments of `range`, flat, in f32 (f64 for f64 masters).
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Use the single-pass CPU update where it applies (off only to test it against the
    /// tensor form).
    fused: bool,
    /// The range's master values end to end, when the parameters are not held whole (ZeRO-3):
    /// updated here instead of in the parameters.
    flat_master: Option<Tensor>,
}

/// What went wrong restoring optimizer state.
#[derive(Debug, thiserror::Error)]
pub enum OptimizerStateError {
    #[error("cannot read optimizer state {path}: {message}")]
    Read { path: String, message: String },
    #[error("optimizer state {path} does not match this run: {message}")]
    Mismatch { path: String, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The file format [`AdamW::save`] writes.
const STATE_FORMAT: &str = "whet-adamw-flat-v1";

/// A fingerprint of the parameters' names and sizes, so that state saved for other parameters
/// (another model, another tuner) is refused instead of applied.
fn layout_fingerprint(params: &[(String, Var)]) -> String {
    // FNV-1a, 64 bit.
    let mut hash: u64 = 0xcbf29ce484222325;
    for (name, var) in params {
        for byte in format!("{name}:{};", var.elem_count()).bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x100000001b3);
        }
    }
    format!("{hash:016x}")
}

impl AdamW {
    /// State for every trainable parameter (one process).
    pub fn new(params: &TrainableParams, config: AdamWConfig) -> Result<Self> {
        Self::for_range(params, 0..params.num_elements(), config)
    }

    /// State for `range` of the flat trainable space only (a rank's shard).
    pub fn for_range(
        params: &TrainableParams,
        range: Range<usize>,
        config: AdamWConfig,
    ) -> Result<Self> {
        let list = params.as_slice();
        let (dtype, device) = match list.first() {
            // Moments in f32 at least, whatever the master dtype.
            Some((_, var)) if var.dtype() == DType::F64 => (DType::F64, var.device().clone()),
            Some((_, var)) => (DType::F32, var.device().clone()),
            None => (DType::F32, Device::Cpu),
        };
        if range.end > params.num_elements() || range.start > range.end {
            candle_core::bail!(
                "optimizer range {range:?} is outside the {} trainable elements",
                params.num_elements()
            );
        }
        Ok(Self {
            config,
            step: 0,
            params: list.to_vec(),
            decays: list.iter().map(|(n, _)| applies_weight_decay(n)).collect(),
            layout: params.layout().clone(),
            exp_avg: Tensor::zeros(range.len(), dtype, &device)?,
            exp_avg_sq: Tensor::zeros(range.len(), dtype, &device)?,
            range,
            fused: true,
            flat_master: None,
        })
    }

    /// Updates `master` (the range's values end to end, same dtype as the parameters) instead
    /// of the parameters.
    pub fn with_flat_master(mut self, master: Option<Tensor>) -> Result<Self> {
        if let Some(master) = &master {
            if master.dims1()? != self.range.len() {
                candle_core::bail!(
                    "the flat master has {} elements, the optimizer's range {}",
                    master.elem_count(),
                    self.range.len()
                );
            }
        }
        self.flat_master = master;
        Ok(self)
    }

    /// Keeps the moments on `device` and runs each update there — DeepSpeed's optimizer
    /// offload: for a GPU job the f32 moments live in host memory and every piece's update
    /// runs on the CPU (the fused CPU pass), its gradient and values brought over and the
    /// updated values sent back. On the CPU this changes nothing.
    pub fn with_state_on(mut self, device: &Device) -> Result<Self> {
        self.exp_avg = self.exp_avg.to_device(device)?;
        self.exp_avg_sq = self.exp_avg_sq.to_device(device)?;
        Ok(self)
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// One update with learning rate `lr` of every parameter element in the range. A parameter
    /// without a gradient is updated as if its gradient were zero (moments decay, weight decay
    /// applies), which is what torch does for an MoE expert that no token chose, since
    /// transformers stores experts in fused tensors.
    pub fn step(&mut self, grads: &Gradients, lr: f64) -> Result<()> {
        assert_eq!(
            grads.len(),
            self.params.len(),
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
        let shared = StepConstants {
            decay: (weight_decay != 0.0).then_some(1.0 - lr * weight_decay),
            beta1,
            beta2,
            eps,
            bias_correction2_sqrt,
            step_size,
        };
        if crate::cuda::kernels_enabled() && self.step_in_one_launch(grads, &shared)? {
            return Ok(());
        }
        let layout = self.layout.clone();
        for piece in layout.pieces(self.range.clone()) {
            debug_assert_eq!(grads.name(piece.param), self.params[piece.param].0);
            let constants = StepConstants {
                decay: (self.decays[piece.param] && weight_decay != 0.0)
                    .then_some(1.0 - lr * weight_decay),
                beta1,
                beta2,
                eps,
                bias_correction2_sqrt,
                step_size,
            };
            self.update_piece(&piece, grads.unscaled(piece.param), &constants)?;
        }
        Ok(())
    }

    /// The whole step as one multi-tensor launch that updates every piece in place, when the
    /// parameters, their gradients and the moments are f32 on one GPU and there is no flat
    /// master (whet's CUDA kernels on); false, having changed nothing, otherwise. The same
    /// arithmetic as the per-piece kernel, element for element.
    fn step_in_one_launch(&self, grads: &Gradients, c: &StepConstants) -> Result<bool> {
        let device = self.exp_avg.device();
        if !self.fused || !device.is_cuda() || self.flat_master.is_some() {
            return Ok(false);
        }
        let mut pieces = Vec::new();
        for piece in self.layout.pieces(self.range.clone()) {
            let var = &self.params[piece.param].1;
            let grad = grads.get(piece.param);
            let on_device = |t: &Tensor| t.dtype() == DType::F32 && t.device().same_device(device);
            if !on_device(var.as_tensor())
                || !var.is_contiguous()
                || grad.is_some_and(|g| !on_device(g))
            {
                return Ok(false);
            }
            let len = piece.within.len();
            let param = var
                .as_tensor()
                .flatten_all()?
                .narrow(0, piece.within.start, len)?;
            let grad = grad
                .map(|g| {
                    g.flatten_all()?
                        .narrow(0, piece.within.start, len)?
                        .contiguous()
                })
                .transpose()?;
            let m = self.exp_avg.narrow(0, piece.at, len)?;
            let v = self.exp_avg_sq.narrow(0, piece.at, len)?;
            let decay = self.decays[piece.param] && c.decay.is_some();
            pieces.push((param, grad, m, v, decay));
        }
        let tensors: Vec<crate::cuda::AdamWTensors> = pieces
            .iter()
            .map(|(param, grad, m, v, decay)| crate::cuda::AdamWTensors {
                param,
                grad: grad.as_ref(),
                exp_avg: m,
                exp_avg_sq: v,
                decay: *decay,
            })
            .collect();
        Ok(crate::cuda::adamw_multi(&tensors, &c.rounded())?.is_some())
    }

    /// Updates one parameter's elements `piece.within` and their moments, from its gradient
    /// times `factor` (clipping's, when pending).
    fn update_piece(
        &mut self,
        piece: &Piece,
        (grad, factor): (Option<&Tensor>, Option<f32>),
        c: &StepConstants,
    ) -> Result<()> {
        let var = self.params[piece.param].1.clone();
        let len = piece.within.len();
        let whole = len == var.elem_count();
        let cut = |t: Tensor| {
            if whole {
                Ok(t)
            } else {
                t.narrow(0, piece.within.start, len)
            }
        };
        let flat_param = match &self.flat_master {
            Some(master) => master.clone(),
            None => var.as_tensor().flatten_all()?,
        };
        let param = match &self.flat_master {
            Some(master) => master.narrow(0, piece.at, len)?,
            None => cut(flat_param.clone())?,
        };
        // The update runs where the moments are (the host, when offloaded).
        let state_device = self.exp_avg.device().clone();
        let param = param.to_device(&state_device)?;
        let grad = grad
            .map(|g| cut(g.flatten_all()?)?.to_device(&state_device))
            .transpose()?;
        let m = self.exp_avg.narrow(0, piece.at, len)?;
        let v = self.exp_avg_sq.narrow(0, piece.at, len)?;
        // On the host the fused update writes param and the moments in place: param is a view
        // of the variable (or of the flat master), or, with offloaded moments, a host copy of
        // a device parameter that is copied back below.
        let updated_on_host =
            self.fused && fused_cpu_update(&param, grad.as_ref(), factor, &m, &v, c)?;
        if updated_on_host && flat_param.device().is_cpu() {
            return Ok(());
        }
        let new_param = if updated_on_host {
            param
        } else {
            // Elementwise, so scaling the piece is scaling the whole gradient and cutting it.
            let grad = match factor {
                Some(factor) => grad.map(|g| g * f64::from(factor)).transpose()?,
                None => grad,
            };
            let fused = match (self.fused, param.device().is_cuda()) {
                (true, true) => crate::cuda::adamw(&param, grad.as_ref(), &m, &v, &c.rounded())?,
                _ => None,
            };
            let (new_param, new_m, new_v) = match fused {
                Some(updated) => updated,
                None => tensor_update(&param, grad.as_ref(), &m, &v, c)?,
            };
            self.exp_avg.slice_set(&new_m, 0, piece.at)?;
            self.exp_avg_sq.slice_set(&new_v, 0, piece.at)?;
            new_param
        };
        let new_param = new_param
            .to_dtype(var.dtype())?
            .to_device(flat_param.device())?;
        if self.flat_master.is_some() {
            flat_param.slice_set(&new_param, 0, piece.at)
        } else if whole {
            var.set(&new_param.reshape(var.shape())?)
        } else {
            flat_param.slice_set(&new_param, 0, piece.within.start)
        }
    }

    /// The state as flat tensors (`exp_avg`, `exp_avg_sq` over the range) plus metadata
    /// (`step`, the range, the parameters' fingerprint, and the hyper-parameters for the record).
    pub fn state_tensors(&self) -> (Vec<(String, Tensor)>, HashMap<String, String>) {
        let tensors = vec![
            ("exp_avg".to_string(), self.exp_avg.clone()),
            ("exp_avg_sq".to_string(), self.exp_avg_sq.clone()),
        ];
        let metadata = HashMap::from([
            ("format".to_string(), STATE_FORMAT.to_string()),
            ("step".to_string(), self.step.to_string()),
            ("range_start".to_string(), self.range.start.to_string()),
            ("range_end".to_string(), self.range.end.to_string()),
            ("parameters".to_string(), layout_fingerprint(&self.params)),
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
        tensor_files::write(path, tensors, metadata).map_err(|e| OptimizerStateError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Restores the step count and moments saved by [`AdamW::save`] for the same parameters and
    /// range.
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
        let metadata = tensor_files::read_metadata(path).map_err(|e| read_err(e.to_string()))?;
        let field = |key: &str| metadata.get(key).map(String::as_str).unwrap_or("");
        if field("format") != STATE_FORMAT {
            return Err(mismatch(format!(
                "it has format `{}`, this whet reads `{STATE_FORMAT}`; resume with --resume_only_model true to load the weights only",
                field("format")
            )));
        }
        if field("parameters") != layout_fingerprint(&self.params) {
            return Err(mismatch(
                "it was saved for other trainable parameters (another model or tuner)".into(),
            ));
        }
        let saved_range = format!("{}..{}", field("range_start"), field("range_end"));
        if saved_range != format!("{:?}", self.range) {
            return Err(mismatch(format!(
                "it holds elements {saved_range} of the parameters, this process updates {:?}",
                self.range
            )));
        }
        let step: u64 = field("step")
            .parse()
            .map_err(|_| read_err("no `step` in the metadata".into()))?;
        let mut tensors =
            tensor_files::read_all(path, &Device::Cpu).map_err(|e| read_err(e.to_string()))?;
        for (key, slot) in [
            ("exp_avg", &mut self.exp_avg),
            ("exp_avg_sq", &mut self.exp_avg_sq),
        ] {
            let t = tensors
                .remove(key)
                .ok_or_else(|| mismatch(format!("no `{key}`")))?;
            if t.dims() != slot.dims() {
                return Err(mismatch(format!(
                    "`{key}` has shape {:?}, expected {:?}",
                    t.dims(),
                    slot.dims()
                )));
            }
            *slot = t.to_dtype(slot.dtype())?.to_device(slot.device())?;
        }
        self.step = step;
        Ok(())
    }
}

/// Below this many elements per thread the fused update runs on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

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

impl StepConstants {
    /// The scalars in f32, as the tensor form rounds them (the fused CPU and CUDA updates).
    fn rounded(&self) -> crate::cuda::AdamWScalars {
        let f = |x: f64| x as f32;
        crate::cuda::AdamWScalars {
            decay: self.decay.map(f),
            one_minus_beta1: f(1.0 - self.beta1),
            beta2: f(self.beta2),
            one_minus_beta2: f(1.0 - self.beta2),
            bias_correction2_sqrt: f(self.bias_correction2_sqrt),
            eps: f(self.eps),
            neg_step_size: f(-self.step_size),
        }
    }
}

/// New (param, exp_avg, exp_avg_sq) of one flat piece, as whole-tensor operations (any device).
fn tensor_update(
    param: &Tensor,
    grad: Option<&Tensor>,
    m: &Tensor,
    v: &Tensor,
    c: &StepConstants,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dtype = m.dtype();
    let grad = match grad {
        Some(g) => g.to_dtype(dtype)?,
        None => m.zeros_like()?,
    };
    let mut param = param.to_dtype(dtype)?;
    if let Some(decay) = c.decay {
        param = param.affine(decay, 0.0)?;
    }
    // torch: exp_avg.lerp_(grad, 1 - beta1), i.e. m + (1 - b1) * (g - m).
    let m = (m + (&grad - m)?.affine(1.0 - c.beta1, 0.0)?)?;
    let v = (v.affine(c.beta2, 0.0)? + grad.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
    let scalar = |x: f64| Tensor::new(x, m.device())?.to_dtype(dtype);
    let denom = v
        .sqrt()?
        .broadcast_div(&scalar(c.bias_correction2_sqrt)?)?
        .affine(1.0, c.eps)?;
    let update = (&m / denom)?.affine(-c.step_size, 0.0)?;
    Ok(((param + update)?, m, v))
}

/// The same update of one f32 piece on the CPU, in place and in a single pass over its
/// elements, instead of a dozen whole-tensor temporaries. It performs the very f32 operations,
/// in the same order, that [`tensor_update`] does (candle's `affine(m, a)` is `x * m + a` in
/// f32), so the results are bit-identical. Returns false (nothing done) for other dtypes and
/// devices.
fn fused_cpu_update(
    param: &Tensor,
    grad: Option<&Tensor>,
    grad_factor: Option<f32>,
    m: &Tensor,
    v: &Tensor,
    c: &StepConstants,
) -> Result<bool> {
    let all_f32 = param.dtype() == DType::F32
        && m.dtype() == DType::F32
        && v.dtype() == DType::F32
        && grad.is_none_or(|g| g.dtype() == DType::F32);
    let all_cpu = [param, m, v].iter().all(|t| t.device().is_cpu())
        && grad.is_none_or(|g| g.device().is_cpu());
    if !all_cpu || !all_f32 {
        return Ok(false);
    }
    let grad = grad.map(Tensor::contiguous).transpose()?;
    let crate::cuda::AdamWScalars {
        decay,
        one_minus_beta1: one_minus_b1,
        beta2: b2,
        one_minus_beta2: one_minus_b2,
        bias_correction2_sqrt: bc2,
        eps,
        neg_step_size: neg_step,
    } = c.rounded();
    let k = AdamWLanes {
        decay,
        grad_factor,
        one_minus_b1,
        b2,
        one_minus_b2,
        bc2,
        eps,
        neg_step,
    };
    let update =
        |p: &mut [f32], m: &mut [f32], v: &mut [f32], g: Option<&[f32]>| k.update(p, m, v, g);
    let in_place = |g: Option<&[f32]>| {
        with_cpu_slice_mut(m, |m| {
            with_cpu_slice_mut(v, |v| {
                with_cpu_slice_mut(param, |p| {
                    // Tasks on rayon's pool (the matmuls' too) only pay off for large tensors.
                    let chunk = p
                        .len()
                        .div_ceil(crate::host::cpu_threads().max(1))
                        .max(PARALLEL_MIN_ELEMENTS);
                    if chunk >= p.len() {
                        update(p, m, v, g);
                    } else {
                        use rayon::prelude::*;
                        p.par_chunks_mut(chunk)
                            .zip(m.par_chunks_mut(chunk))
                            .zip(v.par_chunks_mut(chunk))
                            .enumerate()
                            .for_each(|(i, ((p, m), v))| {
                                let g = g.map(|g| &g[i * chunk..i * chunk + p.len()]);
                                update(p, m, v, g)
                            });
                    }
                    Ok(())
                })
            })
        })
    };
    match &grad {
        Some(g) => {
            crate::ops::with_cpu_slice(g, |g: &[f32]| in_place(Some(g)))?.expect("a CPU tensor")?
        }
        None => in_place(None)?,
    }
    Ok(true)
}

/// The rounded step constants of [`fused_cpu_update`].
struct AdamWLanes {
    decay: Option<f32>,
    /// Clipping's factor, multiplied into each gradient element as `g * f + 0.0` (candle's
    /// `affine(f, 0)`, which an eager scale would have run).
    grad_factor: Option<f32>,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    bc2: f32,
    eps: f32,
    neg_step: f32,
}

impl AdamWLanes {
    /// One element's update: the f32 operations of [`tensor_update`] in its order (`affine(m,
    /// a)` is `x * m + a`, hence the `+ 0.0`s). A missing gradient is zero.
    #[inline(always)]
    fn element(&self, p: &mut f32, m: &mut f32, v: &mut f32, grad: f32) {
        let mut param = *p;
        if let Some(decay) = self.decay {
            param = param * decay + 0.0;
        }
        let new_m = *m + ((grad - *m) * self.one_minus_b1 + 0.0);
        let new_v = (*v * self.b2 + 0.0) + ((grad * grad) * self.one_minus_b2 + 0.0);
        let denom = (new_v.sqrt() / self.bc2) * 1.0 + self.eps;
        let update = (new_m / denom) * self.neg_step + 0.0;
        *p = param + update;
        *m = new_m;
        *v = new_v;
    }

    /// Written as zipped slices so that the compiler vectorises it (exact IEEE lanes: Rust never
    /// contracts to FMA, so the bits are those of the scalar loop).
    #[inline(always)]
    fn lanes(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: Option<&[f32]>) {
        let pmv = p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut());
        match (g, self.grad_factor) {
            (Some(g), None) => pmv
                .zip(g)
                .for_each(|(((p, m), v), &g)| self.element(p, m, v, g)),
            (Some(g), Some(f)) => pmv
                .zip(g)
                .for_each(|(((p, m), v), &g)| self.element(p, m, v, g * f + 0.0)),
            // A missing gradient scaled is still zero.
            (None, _) => pmv.for_each(|((p, m), v)| self.element(p, m, v, 0.0)),
        }
    }

    /// [`Self::lanes`] at the widest vectors the CPU has (picked at run time).
    fn update(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: Option<&[f32]>) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512(
                k: &AdamWLanes,
                p: &mut [f32],
                m: &mut [f32],
                v: &mut [f32],
                g: Option<&[f32]>,
            ) {
                k.lanes(p, m, v, g)
            }
            #[target_feature(enable = "avx2")]
            unsafe fn avx2(
                k: &AdamWLanes,
                p: &mut [f32],
                m: &mut [f32],
                v: &mut [f32],
                g: Option<&[f32]>,
            ) {
                k.lanes(p, m, v, g)
            }
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked above).
                return unsafe { avx512(self, p, m, v, g) };
            }
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked above).
                return unsafe { avx2(self, p, m, v, g) };
            }
        }
        self.lanes(p, m, v, g)
    }
}

/// Calls `f` with the elements of a contiguous CPU f32 tensor, writable in place (through
/// candle's in-place op, which holds the storage's write lock meanwhile).
fn with_cpu_slice_mut(tensor: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
    struct InPlace<F>(std::sync::Mutex<Option<F>>);
    impl<F: FnOnce(&mut [f32]) -> Result<()>> candle_core::InplaceOp1 for InPlace<F> {
        fn name(&self) -> &'static str {
            "adamw-in-place"
        }
        fn cpu_fwd(
            &self,
            storage: &mut candle_core::CpuStorage,
            layout: &candle_core::Layout,
        ) -> Result<()> {
            let (candle_core::CpuStorage::F32(data), Some((start, end))) =
                (storage, layout.contiguous_offsets())
            else {
                candle_core::bail!("the in-place AdamW update needs contiguous f32 tensors");
            };
            let f = self
                .0
                .lock()
                .expect("not poisoned")
                .take()
                .expect("called once");
            f(&mut data[start..end])
        }
    }
    tensor.inplace_op1(&InPlace(std::sync::Mutex::new(Some(f))))
}

/// Scales all gradients so that their global L2 norm is at most `max_norm` and returns the norm
/// before clipping, as `torch.nn.utils.clip_grad_norm_`: every gradient is multiplied by
/// `min(1, max_norm / (norm + 1e-6))`. The squares are summed over the range this process
/// owns and then over all processes, so every rank clips by the same global norm.
pub fn clip_grad_norm(
    grads: &mut Gradients,
    max_norm: f64,
    sync: &mut dyn GradSync,
) -> Result<f64> {
    let mut sum_sq = [grads.sum_of_squares(sync.norm_range())?];
    sync.sum_scalars(&mut sum_sq)?;
    let norm = sum_sq[0].sqrt();
    // torch computes the coefficient in float32; multiplying by a clamped 1.0 changes nothing.
    let coef = ((max_norm as f32) / (norm as f32 + 1e-6)).min(1.0);
    if coef < 1.0 {
        grads.scale(coef)?;
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
        let params = TrainableParams::from_vars(vec![
            (
                "w".to_string(),
                Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap(),
            ),
            (
                "norm.weight".to_string(),
                Var::new(&[0.5f32], &Device::Cpu).unwrap(),
            ),
        ]);
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
        let w: Vec<f32> = params.as_slice()[0].1.to_vec1().unwrap();
        let expected0 = 1.0 * (1.0 - 0.01 * 0.1) - 0.01 * 0.3 / (0.3 + 1e-8);
        assert!((w[0] as f64 - expected0).abs() < 1e-6, "{w:?}");
        let n: Vec<f32> = params.as_slice()[1].1.to_vec1().unwrap();
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
        for (a, b) in [
            (&opt.exp_avg, &restored.exp_avg),
            (&opt.exp_avg_sq, &restored.exp_avg_sq),
        ] {
            let (a, b): (Vec<f32>, Vec<f32>) = (a.to_vec1().unwrap(), b.to_vec1().unwrap());
            assert_eq!(a, b);
        }
        // State saved for other parameters or another shard is refused, not applied.
        let other = TrainableParams::from_vars(vec![(
            "w".to_string(),
            Var::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap(),
        )]);
        let err = AdamW::new(&other, config).unwrap().load(&path).unwrap_err();
        assert!(
            err.to_string().contains("other trainable parameters"),
            "{err}"
        );
        let err = AdamW::for_range(&params, 1..3, config)
            .unwrap()
            .load(&path)
            .unwrap_err();
        assert!(err.to_string().contains("updates 1..3"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn fused_update_is_bit_identical_to_the_tensor_form() {
        let values = |n: usize, seed: u64| crate::ops::tests::test_values(n, seed);
        let make_params = || {
            TrainableParams::from_vars(vec![
                (
                    "w".to_string(),
                    Var::from_vec(
                        values(150_000, 1).iter().map(|&v| v as f32).collect(),
                        (300, 500),
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
            ])
        };
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let (fused_params, plain_params) = (make_params(), make_params());
        let mut fused = AdamW::new(&fused_params, config).unwrap();
        let mut plain = AdamW::new(&plain_params, config).unwrap();
        plain.fused = false;
        // A third copy gets clipping's factor multiplied in beforehand, as candle would.
        let eager_params = make_params();
        let mut eager = AdamW::new(&eager_params, config).unwrap();
        for step in 0..4u64 {
            let mut grads = Gradients::empty(&fused_params);
            let g: Vec<f32> = values(150_000, 10 + step)
                .iter()
                .map(|&v| (v * 1e-3) as f32)
                .collect();
            // A transposed (non-contiguous) gradient too, large enough for the parallel path.
            let g = Tensor::from_vec(g, (500, 300), &Device::Cpu)
                .unwrap()
                .t()
                .unwrap();
            grads.set(0, Some(g));
            grads.set(
                1,
                Some(Tensor::new(&[1e-9f32, -3.0, 0.0], &Device::Cpu).unwrap()),
            );
            let mut eager_grads = grads.clone();
            // Odd steps clip (lazily for the first two, already multiplied for the third).
            if step % 2 == 1 {
                let factor = 0.37f32;
                grads.scale(factor).unwrap();
                for i in 0..2 {
                    let g = eager_grads.get(i).unwrap() * f64::from(factor);
                    eager_grads.set(i, Some(g.unwrap()));
                }
            }
            fused.step(&grads, 1e-3 * (step + 1) as f64).unwrap();
            plain.step(&grads, 1e-3 * (step + 1) as f64).unwrap();
            eager.step(&eager_grads, 1e-3 * (step + 1) as f64).unwrap();
            let pairs = fused_params.as_slice().iter().zip(plain_params.as_slice());
            let eager_pairs = fused_params.as_slice().iter().zip(eager_params.as_slice());
            for ((name, a), (_, b)) in pairs.chain(eager_pairs) {
                let (a, b): (Vec<f32>, Vec<f32>) = (
                    a.flatten_all().unwrap().to_vec1().unwrap(),
                    b.flatten_all().unwrap().to_vec1().unwrap(),
                );
                let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{name} differs after step {step}");
            }
            for (x, y) in [
                (&fused.exp_avg, &plain.exp_avg),
                (&fused.exp_avg_sq, &plain.exp_avg_sq),
                (&fused.exp_avg, &eager.exp_avg),
                (&fused.exp_avg_sq, &eager.exp_avg_sq),
            ] {
                let (x, y): (Vec<f32>, Vec<f32>) = (x.to_vec1().unwrap(), y.to_vec1().unwrap());
                assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()));
            }
        }
    }

    /// Shards of the flat space updated one by one give exactly the whole-space update: a
    /// parameter cut between two ranges is updated half here, half there.
    #[test]
    fn ranges_of_the_flat_space_update_like_the_whole() {
        let values = |n: usize, seed: u64| -> Vec<f32> {
            crate::ops::tests::test_values(n, seed)
                .iter()
                .map(|&v| v as f32)
                .collect()
        };
        let make = || {
            TrainableParams::from_vars(vec![
                (
                    "a".into(),
                    Var::from_vec(values(6, 1), (2, 3), &Device::Cpu).unwrap(),
                ),
                (
                    "norm.weight".into(),
                    Var::from_vec(values(4, 2), 4, &Device::Cpu).unwrap(),
                ),
                (
                    "b".into(),
                    Var::from_vec(values(5, 3), 5, &Device::Cpu).unwrap(),
                ),
            ])
        };
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let (whole_params, shard_params) = (make(), make());
        let mut whole = AdamW::new(&whole_params, config).unwrap();
        let mut shards: Vec<AdamW> = [0..4, 4..8, 8..15]
            .into_iter()
            .map(|r| AdamW::for_range(&shard_params, r, config).unwrap())
            .collect();
        shards[1].fused = false; // the tensor form on ranges too
        for step in 0..3u64 {
            let mut grads = Gradients::empty(&whole_params);
            grads.set(
                0,
                Some(Tensor::from_vec(values(6, 10 + step), (2, 3), &Device::Cpu).unwrap()),
            );
            grads.set(
                2,
                Some(Tensor::from_vec(values(5, 20 + step), 5, &Device::Cpu).unwrap()),
            );
            whole.step(&grads, 1e-2).unwrap();
            for shard in &mut shards {
                shard.step(&grads, 1e-2).unwrap();
            }
        }
        for ((name, a), (_, b)) in whole_params.as_slice().iter().zip(shard_params.as_slice()) {
            let (a, b): (Vec<f32>, Vec<f32>) = (
                a.flatten_all().unwrap().to_vec1().unwrap(),
                b.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(a, b, "{name}");
        }
        let joined: Vec<f32> = shards
            .iter()
            .flat_map(|s| s.exp_avg_sq.to_vec1::<f32>().unwrap())
            .collect();
        assert_eq!(joined, whole.exp_avg_sq.to_vec1::<f32>().unwrap());
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let params = TrainableParams::from_vars(vec![(
            "a".to_string(),
            Var::new(&[0f32, 0.0], &Device::Cpu).unwrap(),
        )]);
        let mut grads = Gradients::empty(&params);
        grads.set(0, Some(Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap()));
        let norm = clip_grad_norm(
            &mut grads,
            1.0,
            &mut crate::sync::SingleProcess::new(params.num_elements()),
        )
        .unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let g: Vec<f32> = grads.get(0).unwrap().to_vec1().unwrap();
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
        // The lane-parallel sum of squares agrees with the tensor form (one f64 chain) to
        // rounding; it sums in another order, so not bit for bit.
        let values: Vec<f32> = crate::ops::tests::test_values(10_000, 5)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let g = Tensor::from_vec(values, 10_000, &Device::Cpu).unwrap();
        let params = TrainableParams::from_vars(vec![(
            "a".to_string(),
            Var::zeros(10_000, DType::F32, &Device::Cpu).unwrap(),
        )]);
        let mut grads = Gradients::empty(&params);
        grads.set(0, Some(g.clone()));
        let fast = clip_grad_norm(
            &mut grads,
            1e9,
            &mut crate::sync::SingleProcess::new(params.num_elements()),
        )
        .unwrap();
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
        assert!(
            (fast - tensor_form).abs() <= 1e-12 * tensor_form,
            "{fast} vs {tensor_form}"
        );
    }
}
