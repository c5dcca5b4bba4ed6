//! whet's own CUDA kernels (engine/kernels/*.cu, compiled by build.rs into fatbins for sm_80
//! and sm_90 plus PTX) and the ops that launch them: the GPU forms of the engine's fused CPU
//! ops, with the same semantics. Each function returns `Ok(None)` for a tensor that is not on
//! a GPU (always, in a build without the `cuda` feature), so a caller keeps its CPU form and
//! its composed form beside one call:
//!
//! * [`cross_entropy_rows`]: per-row causal-LM cross-entropy with its backward
//!   (`ops::CrossEntropySumOp`'s semantics), reading bf16/f16 logits without an f32 copy;
//! * [`adamw`]: one fused AdamW pass, operation for operation `optim::fused_cpu_update`;
//! * [`sum_of_squares`]: the f64 sum of squares of a gradient, left on the device;
//! * [`dequantize_4bit`]: NF4/FP4 codes times their (double-quantized) block scales;
//! * [`group_by_expert`]: MoE picks grouped by expert on the device, only the counts read back;
//! * [`dropout_mask`]: LoRA's dropout masks drawn on the device, element for element the CPU's.

use candle_core::{Result, Tensor};

/// The f32 scalars of one AdamW step (as `optim::fused_cpu_update` rounds them).
#[derive(Debug, Clone, Copy)]
pub struct AdamWScalars {
    pub decay: Option<f32>,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
    pub neg_step_size: f32,
}

/// A 4-bit weight's device tensors, as `quant::QuantizedTensor` keeps them.
pub struct Packed4Bit<'a> {
    /// (ceil(n / 2),) u8, the high nibble first.
    pub packed: &'a Tensor,
    /// (16,) f32: the code book.
    pub code: &'a Tensor,
    pub absmax: Absmax4Bit<'a>,
    pub elem_count: usize,
}

pub enum Absmax4Bit<'a> {
    /// (blocks,) f32.
    F32(&'a Tensor),
    /// (blocks,) u8 codes into the (256,) f32 dynamic map, times (groups,) f32 scales, plus
    /// the offset.
    Double {
        codes: &'a Tensor,
        dynamic_map: &'a Tensor,
        scales: &'a Tensor,
        offset: f32,
    },
}

/// MoE picks grouped by expert: how many picks each expert has, and the picks expert by
/// expert (ascending row within an expert): their token rows and slots (row * k + pick).
pub struct ExpertGroups {
    pub counts: Vec<usize>,
    pub rows: Tensor,
    pub slots: Tensor,
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    pub fn cross_entropy_rows(_: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn adamw(
        _: &Tensor,
        _: Option<&Tensor>,
        _: &Tensor,
        _: &Tensor,
        _: &AdamWScalars,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        Ok(None)
    }
    pub fn sum_of_squares(_: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn dequantize_4bit(_: &Packed4Bit, _: candle_core::DType) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn group_by_expert(_: &Tensor, _: usize) -> Result<Option<ExpertGroups>> {
        Ok(None)
    }
    pub fn dropout_mask(_: u64, _: u64, _: f32, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaModule, CudaView, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId};
    use candle_core::op::BackpropOp;
    use candle_core::{CustomOp1, DType, Layout, Shape, Storage};
    use half::{bf16, f16};

    use super::*;

    /// A compiled kernel file.
    pub struct Module {
        pub name: &'static str,
        pub image: &'static [u8],
    }

    mod compiled {
        use super::Module;
        include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
    }

    pub(super) fn wrap(e: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
        candle_core::Error::wrap(e)
    }

    /// `name` from `module`, loaded once per device.
    pub(super) fn function(dev: &CudaDevice, module: &Module, name: &str) -> Result<CudaFunction> {
        type Loaded = HashMap<(DeviceId, &'static str), Arc<CudaModule>>;
        static MODULES: OnceLock<Mutex<Loaded>> = OnceLock::new();
        let mut modules = MODULES
            .get_or_init(Default::default)
            .lock()
            .map_err(|_| candle_core::Error::Msg("kernel cache poisoned".into()))?;
        let key = (dev.id(), module.name);
        let loaded = match modules.get(&key) {
            Some(loaded) => loaded.clone(),
            None => {
                let loaded = dev
                    .cuda_stream()
                    .context()
                    .load_module(Ptx::from_binary(module.image.to_vec()))
                    .map_err(wrap)?;
                modules.insert(key, loaded.clone());
                loaded
            }
        };
        loaded.load_function(name).map_err(wrap)
    }

    pub(super) fn train(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
        function(dev, &compiled::TRAIN, name)
    }

    /// A kernel of kernels/fused.cu.
    pub(super) fn fused(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
        function(dev, &compiled::FUSED, name)
    }

    pub(super) const THREADS: u32 = 256;

    /// A grid-stride launch over `n` elements.
    pub(super) fn elementwise(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(THREADS as usize).clamp(1, 4096) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn view<'a, T: CudaDType>(
        storage: &'a CudaStorage,
        layout: &Layout,
    ) -> Result<CudaView<'a, T>> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("whet's CUDA kernels need contiguous tensors");
        };
        Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
    }

    /// The CUDA storage of `tensor`, or None when it is not on a GPU.
    pub(super) fn on_gpu(tensor: &Tensor) -> Option<CudaDevice> {
        match tensor.device() {
            candle_core::Device::Cuda(dev) => Some(dev.clone()),
            _ => None,
        }
    }

    pub(super) fn wrap_tensor<T: CudaDType>(
        slice: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
        dev: &CudaDevice,
        shape: impl Into<Shape>,
    ) -> Tensor {
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
        Tensor::from_storage(storage, shape, BackpropOp::none(), false)
    }

    /// Runs `f` with the CUDA storage and layout of `tensor`.
    fn with_cuda<R>(
        tensor: &Tensor,
        f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>,
    ) -> Result<R> {
        let (storage, layout) = tensor.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            candle_core::bail!("expected a CUDA tensor");
        };
        f(cuda, layout)
    }

    fn cuda(storage: &Storage) -> Result<&CudaStorage> {
        match storage {
            Storage::Cuda(c) => Ok(c),
            _ => candle_core::bail!("expected every tensor of the op on the GPU"),
        }
    }

    // ---------------------------------------------------------------------------------------
    // Cross-entropy.

    /// Per-row loss of (rows, vocab) logits against (rows,) i64 targets; keeps the rows'
    /// log-sum-exp for the backward pass.
    struct CrossEntropyRows {
        targets: Tensor,
        log_sum_exp: Mutex<Option<Tensor>>,
    }

    /// The kernels' suffix for a float dtype.
    fn dtype_name(dtype: DType) -> Result<&'static str> {
        Ok(match dtype {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            other => {
                candle_core::bail!("whet's CUDA kernels take f32, f64, bf16 or f16, not {other:?}")
            }
        })
    }

    impl CustomOp1 for CrossEntropyRows {
        fn name(&self) -> &'static str {
            "cross-entropy-rows"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!(
                "cross-entropy-rows runs on CUDA only (the CPU has CrossEntropySumOp)"
            )
        }

        fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
            let (rows, vocab) = layout.shape().dims2()?;
            let dev = storage.device().clone();
            let kernel = train(
                &dev,
                &format!("cross_entropy_forward_{}", dtype_name(storage.dtype())?),
            )?;
            let config = LaunchConfig {
                grid_dim: (rows.max(1) as u32, 1, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: 0,
            };
            let (lse, loss) = with_cuda(&self.targets, |targets_storage, targets_layout| {
                let targets = view::<i64>(targets_storage, targets_layout)?;
                macro_rules! run {
                    ($t:ty, $acc:ty) => {{
                        let logits = view::<$t>(storage, layout)?;
                        // SAFETY: the kernel writes every row of both outputs.
                        let lse = unsafe { dev.alloc::<$acc>(rows) }?;
                        let loss = unsafe { dev.alloc::<$acc>(rows) }?;
                        let vocab = vocab as u64;
                        let stream = dev.cuda_stream();
                        let mut launch = stream.launch_builder(&kernel);
                        launch
                            .arg(&logits)
                            .arg(&targets)
                            .arg(&vocab)
                            .arg(&lse)
                            .arg(&loss);
                        if rows > 0 {
                            // SAFETY: the arguments match the kernel's signature.
                            unsafe { launch.launch(config) }.map_err(wrap)?;
                        }
                        (
                            wrap_tensor(lse, &dev, rows),
                            CudaStorage::wrap_cuda_slice(loss, dev.clone()),
                        )
                    }};
                }
                Ok(match storage.dtype() {
                    DType::F32 => run!(f32, f32),
                    DType::F64 => run!(f64, f64),
                    DType::BF16 => run!(bf16, f32),
                    DType::F16 => run!(f16, f32),
                    other => {
                        candle_core::bail!("cross-entropy: unsupported logits dtype {other:?}")
                    }
                })
            })?;
            *self.log_sum_exp.lock().expect("not poisoned") = Some(lse);
            Ok((loss, Shape::from(rows)))
        }

        fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
            let (rows, vocab) = arg.dims2()?;
            let Some(dev) = on_gpu(arg) else {
                candle_core::bail!("cross-entropy-rows: backward of a non-CUDA tensor");
            };
            let lse = self
                .log_sum_exp
                .lock()
                .expect("not poisoned")
                .clone()
                .ok_or_else(|| {
                    candle_core::Error::Msg("cross-entropy: backward before forward".into())
                })?;
            let arg = arg.contiguous()?;
            let upstream = grad_res.to_dtype(lse.dtype())?.contiguous()?;
            let kernel = train(
                &dev,
                &format!("cross_entropy_backward_{}", dtype_name(arg.dtype())?),
            )?;
            let n = rows * vocab;
            let grad = with_cuda(&arg, |logits_storage, logits_layout| {
                with_cuda(&self.targets, |ts, tl| {
                    with_cuda(&lse, |ls, ll| {
                        with_cuda(&upstream, |us, ul| {
                            macro_rules! run {
                                ($t:ty, $acc:ty) => {{
                                    let logits = view::<$t>(logits_storage, logits_layout)?;
                                    let targets = view::<i64>(ts, tl)?;
                                    let lse = view::<$acc>(ls, ll)?;
                                    let upstream = view::<$acc>(us, ul)?;
                                    // SAFETY: the kernel writes every element.
                                    let grad = unsafe { dev.alloc::<$t>(n) }?;
                                    let (rows, vocab) = (rows as u64, vocab as u64);
                                    let stream = dev.cuda_stream();
                                    let mut launch = stream.launch_builder(&kernel);
                                    launch
                                        .arg(&logits)
                                        .arg(&targets)
                                        .arg(&lse)
                                        .arg(&upstream)
                                        .arg(&rows)
                                        .arg(&vocab)
                                        .arg(&grad);
                                    if n > 0 {
                                        // SAFETY: the arguments match the kernel's signature.
                                        unsafe { launch.launch(elementwise(n)) }.map_err(wrap)?;
                                    }
                                    wrap_tensor(grad, &dev, arg.shape().clone())
                                }};
                            }
                            Ok(match arg.dtype() {
                                DType::F32 => run!(f32, f32),
                                DType::F64 => run!(f64, f64),
                                DType::BF16 => run!(bf16, f32),
                                DType::F16 => run!(f16, f32),
                                other => {
                                    candle_core::bail!("cross-entropy: unsupported dtype {other:?}")
                                }
                            })
                        })
                    })
                })
            })?;
            Ok(Some(grad))
        }
    }

    pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Option<Tensor>> {
        if on_gpu(logits).is_none() {
            return Ok(None);
        }
        let op = CrossEntropyRows {
            targets: targets.to_dtype(DType::I64)?.contiguous()?,
            log_sum_exp: Mutex::new(None),
        };
        Ok(Some(logits.contiguous()?.apply_op1(op)?))
    }

    // ---------------------------------------------------------------------------------------
    // AdamW, sum of squares.

    pub fn adamw(
        param: &Tensor,
        grad: Option<&Tensor>,
        m: &Tensor,
        v: &Tensor,
        c: &AdamWScalars,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let Some(dev) = on_gpu(param) else {
            return Ok(None);
        };
        let all_f32 = [Some(param), Some(m), Some(v), grad]
            .iter()
            .flatten()
            .all(|t| t.dtype() == DType::F32);
        if !all_f32 {
            return Ok(None);
        }
        let n = param.elem_count();
        let (param, m, v) = (param.contiguous()?, m.contiguous()?, v.contiguous()?);
        let grad = grad.map(Tensor::contiguous).transpose()?;
        let kernel = train(&dev, "adamw_f32")?;
        // SAFETY: the kernel writes all 3n elements.
        let out = unsafe { dev.alloc::<f32>(3 * n) }?;
        let (ps, pl) = param.storage_and_layout();
        let (ms, ml) = m.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let grad_guard = grad.as_ref().map(Tensor::storage_and_layout);
        let (param_view, m_view, v_view) = (
            view::<f32>(cuda(&ps)?, pl)?,
            view::<f32>(cuda(&ms)?, ml)?,
            view::<f32>(cuda(&vs)?, vl)?,
        );
        let grad_view = match &grad_guard {
            Some((gs, gl)) => Some(view::<f32>(cuda(gs)?, gl)?),
            None => None,
        };
        let null: u64 = 0;
        let n64 = n as u64;
        let has_decay = i32::from(c.decay.is_some());
        let decay = c.decay.unwrap_or(1.0);
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&kernel);
        launch.arg(&param_view);
        match &grad_view {
            Some(g) => launch.arg(g),
            None => launch.arg(&null),
        };
        launch
            .arg(&m_view)
            .arg(&v_view)
            .arg(&n64)
            .arg(&has_decay)
            .arg(&decay)
            .arg(&c.one_minus_beta1)
            .arg(&c.beta2)
            .arg(&c.one_minus_beta2)
            .arg(&c.bias_correction2_sqrt)
            .arg(&c.eps)
            .arg(&c.neg_step_size)
            .arg(&out);
        if n > 0 {
            // SAFETY: the arguments match the kernel's signature.
            unsafe { launch.launch(elementwise(n)) }.map_err(wrap)?;
        }
        let out = wrap_tensor(out, &dev, 3 * n);
        Ok(Some((
            out.narrow(0, 0, n)?,
            out.narrow(0, n, n)?,
            out.narrow(0, 2 * n, n)?,
        )))
    }

    pub fn sum_of_squares(x: &Tensor) -> Result<Option<Tensor>> {
        let Some(dev) = on_gpu(x) else {
            return Ok(None);
        };
        let name = match x.dtype() {
            DType::F32 => "sum_of_squares_partial_f32",
            DType::BF16 => "sum_of_squares_partial_bf16",
            _ => return Ok(None),
        };
        let x = x.contiguous()?;
        let n = x.elem_count();
        let config = elementwise(n).min_blocks(1024);
        let blocks = config.grid_dim.0 as usize;
        let partial = dev.alloc_zeros::<f64>(blocks)?;
        let out = dev.alloc_zeros::<f64>(1)?;
        let n64 = n as u64;
        with_cuda(&x, |xs, xl| {
            let kernel = train(&dev, name)?;
            let stream = dev.cuda_stream();
            let mut launch = stream.launch_builder(&kernel);
            macro_rules! run {
                ($t:ty) => {{
                    let values = view::<$t>(xs, xl)?;
                    launch.arg(&values).arg(&n64).arg(&partial);
                    if n > 0 {
                        // SAFETY: the arguments match the kernel's signature.
                        unsafe { launch.launch(config) }.map_err(wrap)?;
                    }
                }};
            }
            match x.dtype() {
                DType::F32 => run!(f32),
                _ => run!(bf16),
            }
            Ok(())
        })?;
        let total = train(&dev, "sum_f64")?;
        let blocks64 = blocks as u64;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&total);
        launch.arg(&partial).arg(&blocks64).arg(&out);
        let one_block = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature.
        unsafe { launch.launch(one_block) }.map_err(wrap)?;
        Ok(Some(wrap_tensor(out, &dev, ()).reshape(())?))
    }

    /// Caps a launch's grid.
    trait MinBlocks {
        fn min_blocks(self, cap: u32) -> Self;
    }
    impl MinBlocks for LaunchConfig {
        fn min_blocks(mut self, cap: u32) -> Self {
            self.grid_dim.0 = self.grid_dim.0.min(cap);
            self
        }
    }

    // ---------------------------------------------------------------------------------------
    // 4-bit dequantization.

    pub fn dequantize_4bit(weight: &Packed4Bit, dtype: DType) -> Result<Option<Tensor>> {
        let Some(dev) = on_gpu(weight.packed) else {
            return Ok(None);
        };
        let name = match dtype {
            DType::F32 => "dequantize_4bit_f32",
            DType::BF16 => "dequantize_4bit_bf16",
            DType::F16 => "dequantize_4bit_f16",
            _ => return Ok(None),
        };
        let kernel = train(&dev, name)?;
        let n = weight.elem_count;
        let null: u64 = 0;
        let n64 = n as u64;
        let guard = |t: &Tensor| t.contiguous();
        let packed = guard(weight.packed)?;
        let code = guard(weight.code)?;
        let (absmax, codes, map, scales, offset) = match &weight.absmax {
            Absmax4Bit::F32(a) => (Some(guard(a)?), None, None, None, 0f32),
            Absmax4Bit::Double {
                codes,
                dynamic_map,
                scales,
                offset,
            } => (
                None,
                Some(guard(codes)?),
                Some(guard(dynamic_map)?),
                Some(guard(scales)?),
                *offset,
            ),
        };
        let guards: Vec<_> = [
            Some(&packed),
            Some(&code),
            absmax.as_ref(),
            codes.as_ref(),
            map.as_ref(),
            scales.as_ref(),
        ]
        .into_iter()
        .map(|t| t.map(Tensor::storage_and_layout))
        .collect();
        let cuda_of = |i: usize| -> Result<Option<(&CudaStorage, &Layout)>> {
            match &guards[i] {
                Some((storage, layout)) => match &**storage {
                    Storage::Cuda(c) => Ok(Some((c, *layout))),
                    _ => {
                        candle_core::bail!("4-bit dequantization: every tensor must be on the GPU")
                    }
                },
                None => Ok(None),
            }
        };
        let (ps, pl) = cuda_of(0)?.expect("packed");
        let (cs, cl) = cuda_of(1)?.expect("code");
        let packed_view = view::<u8>(ps, pl)?;
        let code_view = view::<f32>(cs, cl)?;
        let absmax_view = cuda_of(2)?.map(|(s, l)| view::<f32>(s, l)).transpose()?;
        let codes_view = cuda_of(3)?.map(|(s, l)| view::<u8>(s, l)).transpose()?;
        let map_view = cuda_of(4)?.map(|(s, l)| view::<f32>(s, l)).transpose()?;
        let scales_view = cuda_of(5)?.map(|(s, l)| view::<f32>(s, l)).transpose()?;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&kernel);
        launch.arg(&packed_view).arg(&code_view);
        match &absmax_view {
            Some(a) => launch.arg(a),
            None => launch.arg(&null),
        };
        match &codes_view {
            Some(a) => launch.arg(a),
            None => launch.arg(&null),
        };
        match &map_view {
            Some(a) => launch.arg(a),
            None => launch.arg(&null),
        };
        match &scales_view {
            Some(a) => launch.arg(a),
            None => launch.arg(&null),
        };
        launch.arg(&offset).arg(&n64);
        macro_rules! out {
            ($t:ty) => {{
                // SAFETY: the kernel writes all n elements.
                let out = unsafe { dev.alloc::<$t>(n) }?;
                launch.arg(&out);
                if n > 0 {
                    // SAFETY: the arguments match the kernel's signature.
                    unsafe { launch.launch(elementwise(n)) }.map_err(wrap)?;
                }
                wrap_tensor(out, &dev, n)
            }};
        }
        let out = match dtype {
            DType::F32 => out!(f32),
            DType::BF16 => out!(bf16),
            _ => out!(f16),
        };
        Ok(Some(out))
    }

    // ---------------------------------------------------------------------------------------
    // LoRA dropout.

    pub fn dropout_mask(
        seed: u64,
        threshold: u64,
        keep: f32,
        like: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some(dev) = on_gpu(like) else {
            return Ok(None);
        };
        let n = like.elem_count();
        let name = format!("dropout_mask_{}", dtype_name(like.dtype())?);
        let kernel = train(&dev, &name)?;
        let n64 = n as u64;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&kernel);
        launch.arg(&seed).arg(&n64).arg(&threshold).arg(&keep);
        macro_rules! run {
            ($t:ty) => {{
                // SAFETY: the kernel writes all n elements.
                let out = unsafe { dev.alloc::<$t>(n) }?;
                launch.arg(&out);
                if n > 0 {
                    // SAFETY: the arguments match the kernel's signature.
                    unsafe { launch.launch(elementwise(n)) }.map_err(wrap)?;
                }
                wrap_tensor(out, &dev, like.shape().clone())
            }};
        }
        Ok(Some(match like.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            DType::BF16 => run!(bf16),
            _ => run!(f16),
        }))
    }

    // ---------------------------------------------------------------------------------------
    // MoE routing.

    pub fn group_by_expert(chosen: &Tensor, num_experts: usize) -> Result<Option<ExpertGroups>> {
        let Some(dev) = on_gpu(chosen) else {
            return Ok(None);
        };
        let (rows, k) = chosen.dims2()?;
        let picks = rows * k;
        let chosen = chosen.to_dtype(DType::U32)?.contiguous()?;
        let counts = dev.alloc_zeros::<u32>(num_experts)?;
        let rows_out = dev.alloc_zeros::<u32>(picks)?;
        let slots_out = dev.alloc_zeros::<u32>(picks)?;
        let kernel = train(&dev, "moe_group_by_expert")?;
        with_cuda(&chosen, |cs, cl| {
            let chosen_view = view::<u32>(cs, cl)?;
            let (picks64, k32, experts32) = (picks as u64, k as u32, num_experts as u32);
            let stream = dev.cuda_stream();
            let mut launch = stream.launch_builder(&kernel);
            launch
                .arg(&chosen_view)
                .arg(&picks64)
                .arg(&k32)
                .arg(&experts32)
                .arg(&counts)
                .arg(&rows_out)
                .arg(&slots_out);
            let config = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (
                    num_experts.clamp(32, 1024).next_multiple_of(32) as u32,
                    1,
                    1,
                ),
                shared_mem_bytes: ((num_experts + 1) * 4) as u32,
            };
            // SAFETY: the arguments match the kernel's signature.
            unsafe { launch.launch(config) }.map_err(wrap)
        })?;
        // The one read back: each expert's matmul needs its row count on the host.
        let counts: Vec<u32> = dev.clone_dtoh(&counts)?;
        Ok(Some(ExpertGroups {
            counts: counts.into_iter().map(|c| c as usize).collect(),
            rows: wrap_tensor(rows_out, &dev, picks),
            slots: wrap_tensor(slots_out, &dev, picks),
        }))
    }
}

pub use imp::*;

mod fused;
pub use fused::*;
