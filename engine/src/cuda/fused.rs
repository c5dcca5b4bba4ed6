//! The opt-in CUDA kernels of the model's ops (engine/kernels/fused.cu) as differentiable
//! candle ops, and the multi-tensor optimizer launches (engine/kernels/train.cu).
//!
//! They run only when [`kernels_enabled`] says so (`WHET_CUDA_KERNELS=1`): until each has
//! passed the GPU bundle's check (engine/tests/cuda_kernels.rs) on a device, the composed
//! candle forms stay the default on CUDA. Callers in `ops` and the model ask the switch, then
//! call these; each returns `Ok(None)` where it does not apply (not on a GPU, a dtype other
//! than f32/bf16, an unsupported head_dim), so the caller falls back to its composed form.
//!
//! * [`attention`]: causal GQA attention with key padding, FlashAttention-2's tiles and online
//!   softmax, the backward recomputing from the saved log-sum-exp;
//! * [`rms_norm`], [`add_rms_norm`]: RMSNorm, and the residual add fused before it;
//! * [`rope`]: rotate-half RoPE; [`swiglu`]: `silu(gate) · up`;
//! * [`embedding`]: the lookup, its backward adding rows with atomics;
//! * [`head_loss`]: the output projection and cross-entropy a chunk of rows at a time, the
//!   logits' gradient written over the chunk's logits;
//! * [`moe_groups`], [`grouped_matmul`]: MoE picks grouped by expert on the device (no read
//!   back) and one grouped matmul per projection over the sorted rows;
//! * [`adamw_multi`], [`sum_of_squares_multi`]: AdamW and the squared norm over many tensors
//!   in one launch.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use candle_core::{Result, Tensor};

/// The environment variable that turns the kernels on (`1`); anything else leaves the composed
/// forms.
pub const KERNELS_ENV: &str = "WHET_CUDA_KERNELS";

/// 0: not read yet, 1: off, 2: on.
static KERNELS: AtomicU8 = AtomicU8::new(0);
/// Whether fresh outputs are filled with NaN first (the kernel check's poison).
static POISON: AtomicBool = AtomicBool::new(false);

/// Whether the model's ops run whet's CUDA kernels on a GPU: `WHET_CUDA_KERNELS=1`, read once,
/// or what [`set_kernels_enabled`] last said.
pub fn kernels_enabled() -> bool {
    match KERNELS.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var(KERNELS_ENV).is_ok_and(|v| v == "1");
            KERNELS.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        state => state == 2,
    }
}

/// Turns the kernels on or off for the whole process (the kernel check runs both forms).
pub fn set_kernels_enabled(on: bool) {
    KERNELS.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Makes every output these kernels allocate start as NaN, so an element a kernel never writes
/// shows in a comparison (the kernel check turns it on).
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

#[cfg(feature = "cuda")]
fn poison_outputs() -> bool {
    POISON.load(Ordering::Relaxed)
}

/// MoE picks grouped by expert, all on the device: `offsets` (experts + 1,) u32, the picks'
/// token `rows` and `slots` (row · k + pick) in expert order, and the grouped matmul's tile
/// table (`tiles`: (expert, first row) pairs, `tiles_used` of them, at most `max_tiles`).
#[derive(Debug, Clone)]
pub struct DeviceExpertGroups {
    pub offsets: Tensor,
    pub rows: Tensor,
    pub slots: Tensor,
    pub tiles: Tensor,
    pub tiles_used: Tensor,
    pub max_tiles: usize,
}

/// The per-row results of [`head_loss`]: the summed loss (a scalar with the gradients of x
/// and W behind it) and whether each row's argmax is its target, (rows,) u8.
pub struct DeviceHeadLoss {
    pub sum: Tensor,
    pub correct: Tensor,
}

/// One parameter's tensors for [`adamw_multi`]: f32, contiguous, on one GPU, updated in place.
pub struct AdamWTensors<'a> {
    pub param: &'a Tensor,
    pub grad: Option<&'a Tensor>,
    pub exp_avg: &'a Tensor,
    pub exp_avg_sq: &'a Tensor,
    pub decay: bool,
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;
    use crate::cuda::AdamWScalars;

    pub fn attention(_: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn rms_norm(_: &Tensor, _: &Tensor, _: f64) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn add_rms_norm(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: f64,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
    pub fn rope(_: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn swiglu(_: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn embedding(_: &Tensor, _: &Tensor, _: candle_core::DType) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn head_loss(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: bool,
    ) -> Result<Option<DeviceHeadLoss>> {
        Ok(None)
    }
    pub fn moe_groups(_: &Tensor, _: usize) -> Result<Option<DeviceExpertGroups>> {
        Ok(None)
    }
    pub fn grouped_matmul(
        _: &Tensor,
        _: &Tensor,
        _: &DeviceExpertGroups,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
    pub fn adamw_multi(_: &[AdamWTensors], _: &AdamWScalars) -> Result<Option<()>> {
        Ok(None)
    }
    pub fn sum_of_squares_multi(_: &[&Tensor]) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::Mutex;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, DevicePtr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage};
    use half::{bf16, f16};

    use super::super::imp::{elementwise, fused, on_gpu, train, wrap};
    use super::*;
    use crate::cuda::AdamWScalars;

    // -----------------------------------------------------------------------------------------
    // Plumbing: device pointers, fresh outputs, launches.

    /// A kernel argument: a device pointer (0 for null) or a scalar.
    enum Arg {
        Ptr(u64),
        U64(u64),
        U32(u32),
        I32(i32),
        F32(f32),
    }

    fn launch(
        f: &CudaFunction,
        dev: &CudaDevice,
        config: LaunchConfig,
        args: &[Arg],
    ) -> Result<()> {
        if config.grid_dim.0 == 0 || config.grid_dim.1 == 0 || config.grid_dim.2 == 0 {
            return Ok(());
        }
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(f);
        for arg in args {
            match arg {
                Arg::Ptr(v) | Arg::U64(v) => builder.arg(v),
                Arg::U32(v) => builder.arg(v),
                Arg::I32(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
            };
        }
        // SAFETY: each caller passes the arguments of the kernel's signature, pointers to
        // device buffers of the extents the kernel reads and writes.
        unsafe { builder.launch(config) }.map_err(wrap)?;
        Ok(())
    }

    fn run(dev: &CudaDevice, name: &str, config: LaunchConfig, args: &[Arg]) -> Result<()> {
        launch(&fused(dev, name)?, dev, config, args)
    }

    fn grid(blocks: (u32, u32, u32), threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: blocks,
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The address of a contiguous storage's first element. The kernels run on the device's
    /// one stream, in order after whatever wrote the storage.
    fn storage_ptr(storage: &CudaStorage, layout: &Layout) -> Result<u64> {
        let Some((start, _)) = layout.contiguous_offsets() else {
            candle_core::bail!("whet's CUDA kernels need contiguous tensors");
        };
        let stream = storage.device().cuda_stream();
        macro_rules! at {
            ($t:ty) => {{
                let slice = storage.as_cuda_slice::<$t>()?;
                let (ptr, _sync) = slice.device_ptr(&stream);
                ptr + (start * std::mem::size_of::<$t>()) as u64
            }};
        }
        Ok(match storage.dtype() {
            DType::F32 => at!(f32),
            DType::BF16 => at!(bf16),
            DType::F16 => at!(f16),
            DType::F64 => at!(f64),
            DType::U32 => at!(u32),
            DType::U8 => at!(u8),
            DType::I64 => at!(i64),
            other => candle_core::bail!("whet's CUDA kernels do not take {other:?} tensors"),
        })
    }

    /// The device pointer of a tensor on a GPU (made contiguous by the caller).
    fn ptr(tensor: &Tensor) -> Result<u64> {
        let (storage, layout) = tensor.storage_and_layout();
        let Storage::Cuda(cuda) = &*storage else {
            candle_core::bail!("expected every tensor of the op on the GPU");
        };
        storage_ptr(cuda, layout)
    }

    /// `n` uninitialised elements of `dtype` (NaN-poisoned when the check asks).
    fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
        macro_rules! fresh {
            ($t:ty) => {{
                // SAFETY: every caller's kernel writes all n elements before any read.
                let slice = unsafe { dev.alloc::<$t>(n.max(1)) }?;
                CudaStorage::wrap_cuda_slice(slice, dev.clone())
            }};
        }
        let storage = match dtype {
            DType::F32 => fresh!(f32),
            DType::BF16 => fresh!(bf16),
            DType::U32 => fresh!(u32),
            DType::U8 => fresh!(u8),
            other => candle_core::bail!("whet's CUDA kernels do not write {other:?} tensors"),
        };
        if poison_outputs() {
            let bytes = n.max(1) * dtype.size_in_bytes();
            let at = storage_ptr(&storage, &Layout::contiguous(n.max(1)))?;
            run(
                dev,
                "fill_bytes",
                elementwise(bytes),
                &[Arg::Ptr(at), Arg::U64(bytes as u64), Arg::I32(0xff)],
            )?;
        }
        Ok(storage)
    }

    fn tensor(storage: CudaStorage, shape: impl Into<Shape>) -> Tensor {
        Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
    }

    /// A fresh (uninitialised) tensor on the GPU.
    fn empty(dev: &CudaDevice, dtype: DType, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        Ok(tensor(alloc(dev, dtype, shape.elem_count())?, shape))
    }

    /// The kernels' suffix for f32 and bf16, the dtypes they take; None for any other.
    fn suffix(dtype: DType) -> Option<&'static str> {
        match dtype {
            DType::F32 => Some("f32"),
            DType::BF16 => Some("bf16"),
            _ => None,
        }
    }

    fn suffix_of(dtype: DType) -> Result<&'static str> {
        suffix(dtype).ok_or_else(|| candle_core::Error::Msg(format!("{dtype:?} operands")))
    }

    fn cpu_unsupported(name: &str) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{name} is a CUDA kernel; the CPU runs the ops in whet-engine's ops")
    }

    /// Whether every tensor is on a GPU in one dtype the kernels take.
    fn applies(tensors: &[&Tensor]) -> Option<CudaDevice> {
        let first = tensors.first()?;
        let dev = on_gpu(first)?;
        suffix(first.dtype())?;
        tensors
            .iter()
            .all(|t| t.dtype() == first.dtype() && t.device().same_device(first.device()))
            .then_some(dev)
    }

    fn dim_i32(n: usize, what: &str) -> Result<i32> {
        i32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{what} {n} is too large")))
    }

    /// Warps per block of the one-warp-per-row kernels.
    const ROW_WARPS: usize = 8;

    fn per_row_warp(rows: usize) -> LaunchConfig {
        grid(
            (rows.div_ceil(ROW_WARPS).max(1) as u32, 1, 1),
            (ROW_WARPS * 32) as u32,
        )
    }

    // -----------------------------------------------------------------------------------------
    // Attention.

    /// Query rows per block (ATT_ROWS in fused.cu).
    const ATT_ROWS: usize = 32;

    struct Attention {
        /// (batch, seq) u8, 1 for a real key.
        real_keys: Tensor,
        scale: f32,
        /// (batch, heads, seq) f32 from the forward pass.
        log_sum_exp: Mutex<Option<Tensor>>,
    }

    /// The CPU op's attention dimensions (the same shape checks), limited to the head sizes
    /// the kernel is built for.
    struct AttentionDims(crate::ops::AttentionDims);

    impl std::ops::Deref for AttentionDims {
        type Target = crate::ops::AttentionDims;
        fn deref(&self) -> &Self::Target {
            &self.0
        }
    }

    impl AttentionDims {
        fn of(q: &Shape, k: &Shape, v: &Shape, real_keys: &Shape) -> Result<Self> {
            let d = crate::ops::AttentionDims::of(q, k, v, real_keys.elem_count())?;
            if !matches!(d.head_dim, 64 | 128) {
                candle_core::bail!("attention kernel: head_dim {} (64 or 128)", d.head_dim);
            }
            Ok(Self(d))
        }

        fn config(&self, heads: usize) -> LaunchConfig {
            grid(
                (
                    self.seq.div_ceil(ATT_ROWS) as u32,
                    heads as u32,
                    self.batch as u32,
                ),
                (ATT_ROWS * self.head_dim / 32) as u32,
            )
        }

        fn name(&self, kernel: &str, dtype: DType) -> Result<String> {
            Ok(format!("{kernel}_{}_{}", suffix_of(dtype)?, self.head_dim))
        }

        fn shape_args(&self) -> Result<[Arg; 3]> {
            Ok([
                Arg::I32(dim_i32(self.heads, "heads")?),
                Arg::I32(dim_i32(self.kv_heads, "kv heads")?),
                Arg::I32(dim_i32(self.seq, "seq")?),
            ])
        }
    }

    impl CustomOp3 for Attention {
        fn name(&self) -> &'static str {
            "cuda-attention"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cpu_unsupported("cuda-attention")
        }

        fn cuda_fwd(
            &self,
            sq: &CudaStorage,
            lq: &Layout,
            sk: &CudaStorage,
            lk: &Layout,
            sv: &CudaStorage,
            lv: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let d = AttentionDims::of(lq.shape(), lk.shape(), lv.shape(), self.real_keys.shape())?;
            let dev = sq.device().clone();
            let out_shape = Shape::from((d.batch, d.seq, d.heads * d.head_dim));
            let out = alloc(&dev, sq.dtype(), out_shape.elem_count())?;
            let lse = empty(&dev, DType::F32, (d.batch, d.heads, d.seq))?;
            let [heads, kv_heads, seq] = d.shape_args()?;
            run(
                &dev,
                &d.name("attention_forward", sq.dtype())?,
                d.config(d.heads),
                &[
                    Arg::Ptr(storage_ptr(sq, lq)?),
                    Arg::Ptr(storage_ptr(sk, lk)?),
                    Arg::Ptr(storage_ptr(sv, lv)?),
                    Arg::Ptr(ptr(&self.real_keys)?),
                    heads,
                    kv_heads,
                    seq,
                    Arg::F32(self.scale),
                    Arg::Ptr(storage_ptr(&out, &Layout::contiguous(out_shape.clone()))?),
                    Arg::Ptr(ptr(&lse)?),
                ],
            )?;
            *self.log_sum_exp.lock().expect("not poisoned") = Some(lse);
            Ok((out, out_shape))
        }

        fn bwd(
            &self,
            q: &Tensor,
            k: &Tensor,
            v: &Tensor,
            out: &Tensor,
            dout: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let d = AttentionDims::of(q.shape(), k.shape(), v.shape(), self.real_keys.shape())?;
            let Some(dev) = on_gpu(q) else {
                candle_core::bail!("cuda-attention: backward off the GPU");
            };
            let lse = self
                .log_sum_exp
                .lock()
                .expect("not poisoned")
                .clone()
                .ok_or_else(|| {
                    candle_core::Error::Msg("attention: backward before forward".into())
                })?;
            let dtype = q.dtype();
            let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
            let (out, dout) = (out.contiguous()?, dout.to_dtype(dtype)?.contiguous()?);
            let rows = d.batch * d.seq * d.heads;
            let delta = empty(&dev, DType::F32, (d.batch, d.heads, d.seq))?;
            run(
                &dev,
                &format!("attention_backward_delta_{}", suffix_of(dtype)?),
                per_row_warp(rows),
                &[
                    Arg::Ptr(ptr(&out)?),
                    Arg::Ptr(ptr(&dout)?),
                    Arg::I32(dim_i32(d.batch, "batch")?),
                    Arg::I32(dim_i32(d.heads, "heads")?),
                    Arg::I32(dim_i32(d.seq, "seq")?),
                    Arg::I32(dim_i32(d.head_dim, "head_dim")?),
                    Arg::Ptr(ptr(&delta)?),
                ],
            )?;
            let dq = empty(&dev, dtype, q.shape())?;
            let dk = empty(&dev, dtype, k.shape())?;
            let dv = empty(&dev, dtype, v.shape())?;
            let inputs = [
                ptr(&q)?,
                ptr(&k)?,
                ptr(&v)?,
                ptr(&self.real_keys)?,
                ptr(&dout)?,
                ptr(&lse)?,
                ptr(&delta)?,
            ];
            // The backward kernels' arguments: the inputs, the shape, then their outputs.
            let tail = |outputs: &[&Tensor]| -> Result<Vec<Arg>> {
                let mut args: Vec<Arg> = inputs.iter().map(|&p| Arg::Ptr(p)).collect();
                args.extend(d.shape_args()?);
                args.push(Arg::F32(self.scale));
                for t in outputs {
                    args.push(Arg::Ptr(ptr(t)?));
                }
                Ok(args)
            };
            run(
                &dev,
                &d.name("attention_backward_dq", dtype)?,
                d.config(d.heads),
                &tail(&[&dq])?,
            )?;
            run(
                &dev,
                &d.name("attention_backward_dkv", dtype)?,
                d.config(d.kv_heads),
                &tail(&[&dk, &dv])?,
            )?;
            Ok((Some(dq), Some(dk), Some(dv)))
        }
    }

    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        real_keys: &Tensor,
    ) -> Result<Option<Tensor>> {
        if applies(&[q, k, v]).is_none() || !matches!(q.dim(3)?, 64 | 128) {
            return Ok(None);
        }
        let op = Attention {
            real_keys: real_keys.to_dtype(DType::U8)?.contiguous()?,
            scale: (1.0 / (q.dim(3)? as f64).sqrt()) as f32,
            log_sum_exp: Mutex::new(None),
        };
        Ok(Some(q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            op,
        )?))
    }

    // -----------------------------------------------------------------------------------------
    // RMSNorm, alone and after the residual add.

    /// Rows summed per chunk of the weight's gradient: a few hundred chunks at most.
    fn dw_rows_per_chunk(rows: usize) -> usize {
        rows.div_ceil(512).max(16)
    }

    /// (dx, dw) of RMSNorm over `x` (rows, dim) for `dy`, plus `dsum` added to dx.
    fn rms_norm_backward(
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        dsum: Option<&Tensor>,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        let Some(dev) = on_gpu(x) else {
            candle_core::bail!("rms-norm kernel: backward off the GPU");
        };
        let dtype = x.dtype();
        let dim = w.elem_count();
        let rows = x.elem_count() / dim.max(1);
        let name = suffix_of(dtype)?;
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let dy = dy.to_dtype(dtype)?.contiguous()?;
        let dsum = dsum.map(|t| t.to_dtype(dtype)?.contiguous()).transpose()?;
        let dx = empty(&dev, dtype, x.shape())?;
        let inv_rms = empty(&dev, DType::F32, rows)?;
        let dim32 = dim_i32(dim, "dim")?;
        run(
            &dev,
            &format!("rms_norm_backward_dx_{name}"),
            per_row_warp(rows),
            &[
                Arg::Ptr(ptr(&x)?),
                Arg::Ptr(ptr(&w)?),
                Arg::Ptr(ptr(&dy)?),
                Arg::Ptr(dsum.as_ref().map(ptr).transpose()?.unwrap_or(0)),
                Arg::U64(rows as u64),
                Arg::I32(dim32),
                Arg::F32(eps),
                Arg::Ptr(ptr(&dx)?),
                Arg::Ptr(ptr(&inv_rms)?),
            ],
        )?;
        let per_chunk = dw_rows_per_chunk(rows);
        let chunks = rows.div_ceil(per_chunk).max(1);
        let partial = empty(&dev, DType::F32, (chunks, dim))?;
        let columns = dim.div_ceil(256) as u32;
        run(
            &dev,
            &format!("rms_norm_backward_dw_partial_{name}"),
            grid((columns, chunks as u32, 1), 256),
            &[
                Arg::Ptr(ptr(&x)?),
                Arg::Ptr(ptr(&dy)?),
                Arg::Ptr(ptr(&inv_rms)?),
                Arg::U64(rows as u64),
                Arg::I32(dim32),
                Arg::U64(per_chunk as u64),
                Arg::Ptr(ptr(&partial)?),
            ],
        )?;
        let dw = empty(&dev, dtype, w.shape())?;
        run(
            &dev,
            &format!("sum_columns_{name}"),
            grid((columns, 1, 1), 256),
            &[
                Arg::Ptr(ptr(&partial)?),
                Arg::U64(chunks as u64),
                Arg::I32(dim32),
                Arg::Ptr(ptr(&dw)?),
            ],
        )?;
        Ok((dx, dw))
    }

    /// The forward kernel: y (and the residual sum when `residual`) for rows of `dim`.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_forward(
        dev: &CudaDevice,
        dtype: DType,
        x: u64,
        residual: Option<u64>,
        w: u64,
        rows: usize,
        dim: usize,
        eps: f32,
        sum_out: Option<u64>,
        y: u64,
    ) -> Result<()> {
        run(
            dev,
            &format!("rms_norm_forward_{}", suffix_of(dtype)?),
            per_row_warp(rows),
            &[
                Arg::Ptr(x),
                Arg::Ptr(residual.unwrap_or(0)),
                Arg::Ptr(w),
                Arg::U64(rows as u64),
                Arg::I32(dim_i32(dim, "dim")?),
                Arg::F32(eps),
                Arg::Ptr(sum_out.unwrap_or(0)),
                Arg::Ptr(y),
            ],
        )
    }

    fn rows_of(x: &Shape, w: &Shape) -> Result<(usize, usize)> {
        let dim = x.dims().last().copied().unwrap_or(0);
        if w.dims() != [dim] || dim == 0 {
            candle_core::bail!("rms-norm kernel: weight {w:?} for x {x:?}");
        }
        Ok((x.elem_count() / dim, dim))
    }

    struct RmsNorm {
        eps: f32,
    }

    impl CustomOp2 for RmsNorm {
        fn name(&self) -> &'static str {
            "cuda-rms-norm"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cpu_unsupported("cuda-rms-norm")
        }

        fn cuda_fwd(
            &self,
            sx: &CudaStorage,
            lx: &Layout,
            sw: &CudaStorage,
            lw: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (rows, dim) = rows_of(lx.shape(), lw.shape())?;
            let dev = sx.device().clone();
            let y = alloc(&dev, sx.dtype(), rows * dim)?;
            let y_ptr = storage_ptr(&y, &Layout::contiguous(rows * dim))?;
            rms_norm_forward(
                &dev,
                sx.dtype(),
                storage_ptr(sx, lx)?,
                None,
                storage_ptr(sw, lw)?,
                rows,
                dim,
                self.eps,
                None,
                y_ptr,
            )?;
            Ok((y, lx.shape().clone()))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _res: &Tensor,
            dy: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let (dx, dw) = rms_norm_backward(x, w, dy, None, self.eps)?;
            Ok((Some(dx), Some(dw)))
        }
    }

    pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<Tensor>> {
        if applies(&[x, w]).is_none() {
            return Ok(None);
        }
        let op = RmsNorm { eps: eps as f32 };
        Ok(Some(x.contiguous()?.apply_op2(&w.contiguous()?, op)?))
    }

    /// (x + residual, rms_norm(x + residual)) as one (2, …x) result, so that one node carries
    /// both outputs' gradients.
    struct AddRmsNorm {
        eps: f32,
    }

    impl CustomOp3 for AddRmsNorm {
        fn name(&self) -> &'static str {
            "cuda-add-rms-norm"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cpu_unsupported("cuda-add-rms-norm")
        }

        fn cuda_fwd(
            &self,
            sx: &CudaStorage,
            lx: &Layout,
            sr: &CudaStorage,
            lr: &Layout,
            sw: &CudaStorage,
            lw: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            if lx.shape() != lr.shape() {
                candle_core::bail!(
                    "add-rms-norm: x {:?}, residual {:?}",
                    lx.shape(),
                    lr.shape()
                );
            }
            let (rows, dim) = rows_of(lx.shape(), lw.shape())?;
            let dev = sx.device().clone();
            let n = rows * dim;
            let both = alloc(&dev, sx.dtype(), 2 * n)?;
            let at = storage_ptr(&both, &Layout::contiguous(2 * n))?;
            let elem = sx.dtype().size_in_bytes() as u64;
            rms_norm_forward(
                &dev,
                sx.dtype(),
                storage_ptr(sx, lx)?,
                Some(storage_ptr(sr, lr)?),
                storage_ptr(sw, lw)?,
                rows,
                dim,
                self.eps,
                Some(at),
                at + n as u64 * elem,
            )?;
            let mut dims = vec![2];
            dims.extend_from_slice(lx.dims());
            Ok((both, Shape::from(dims)))
        }

        fn bwd(
            &self,
            _x: &Tensor,
            _residual: &Tensor,
            w: &Tensor,
            both: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let sum = both.get(0)?;
            let (dsum, dy) = (grad.get(0)?, grad.get(1)?);
            let (dtotal, dw) = rms_norm_backward(&sum, w, &dy, Some(&dsum), self.eps)?;
            Ok((Some(dtotal.clone()), Some(dtotal), Some(dw)))
        }
    }

    pub fn add_rms_norm(
        x: &Tensor,
        residual: &Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if applies(&[x, residual, w]).is_none() || x.shape() != residual.shape() {
            return Ok(None);
        }
        let op = AddRmsNorm { eps: eps as f32 };
        let both = x
            .contiguous()?
            .apply_op3(&residual.contiguous()?, &w.contiguous()?, op)?;
        Ok(Some((both.get(0)?, both.get(1)?)))
    }

    // -----------------------------------------------------------------------------------------
    // RoPE and SwiGLU.

    struct Rope {
        cos: Tensor,
        sin: Tensor,
    }

    impl Rope {
        /// Rotates `x` (…, seq, dim) into `out`, or by the adjoint with `transpose`.
        fn rotate(
            &self,
            x: u64,
            dtype: DType,
            shape: &Shape,
            transpose: bool,
            out: u64,
        ) -> Result<()> {
            let Some(dev) = on_gpu(&self.cos) else {
                candle_core::bail!("rope kernel: tables off the GPU");
            };
            let [.., seq, dim] = shape.dims() else {
                candle_core::bail!("rope: x {shape:?} has no (seq, head_dim)");
            };
            if self.cos.dims() != [*seq, *dim] || self.sin.dims() != [*seq, *dim] || dim % 2 != 0 {
                candle_core::bail!("rope: tables {:?} for x {shape:?}", self.cos.shape());
            }
            let rows = shape.elem_count() / dim;
            run(
                &dev,
                &format!("rope_{}", suffix_of(dtype)?),
                elementwise(rows * dim / 2),
                &[
                    Arg::Ptr(x),
                    Arg::Ptr(ptr(&self.cos)?),
                    Arg::Ptr(ptr(&self.sin)?),
                    Arg::U64(rows as u64),
                    Arg::I32(dim_i32(*seq, "seq")?),
                    Arg::I32(dim_i32(*dim, "head_dim")?),
                    Arg::I32(i32::from(transpose)),
                    Arg::Ptr(out),
                ],
            )
        }
    }

    impl CustomOp1 for Rope {
        fn name(&self) -> &'static str {
            "cuda-rope"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            cpu_unsupported("cuda-rope")
        }

        fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
            let shape = layout.shape().clone();
            let out = alloc(storage.device(), storage.dtype(), shape.elem_count())?;
            let out_ptr = storage_ptr(&out, &Layout::contiguous(shape.clone()))?;
            self.rotate(
                storage_ptr(storage, layout)?,
                storage.dtype(),
                &shape,
                false,
                out_ptr,
            )?;
            Ok((out, shape))
        }

        fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
            let Some(dev) = on_gpu(x) else {
                candle_core::bail!("rope kernel: backward off the GPU");
            };
            let dy = dy.to_dtype(x.dtype())?.contiguous()?;
            let dx = empty(&dev, x.dtype(), x.shape())?;
            self.rotate(ptr(&dy)?, x.dtype(), x.shape(), true, ptr(&dx)?)?;
            Ok(Some(dx))
        }
    }

    pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
        if applies(&[x]).is_none() || on_gpu(cos).is_none() {
            return Ok(None);
        }
        let op = Rope {
            cos: cos.to_dtype(x.dtype())?.contiguous()?,
            sin: sin.to_dtype(x.dtype())?.contiguous()?,
        };
        Ok(Some(x.contiguous()?.apply_op1(op)?))
    }

    struct SwiGlu;

    impl CustomOp2 for SwiGlu {
        fn name(&self) -> &'static str {
            "cuda-swiglu"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cpu_unsupported("cuda-swiglu")
        }

        fn cuda_fwd(
            &self,
            sg: &CudaStorage,
            lg: &Layout,
            su: &CudaStorage,
            lu: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            if lg.shape() != lu.shape() {
                candle_core::bail!("swiglu: gate {:?}, up {:?}", lg.shape(), lu.shape());
            }
            let n = lg.shape().elem_count();
            let dev = sg.device().clone();
            let y = alloc(&dev, sg.dtype(), n)?;
            run(
                &dev,
                &format!("swiglu_forward_{}", suffix_of(sg.dtype())?),
                elementwise(n),
                &[
                    Arg::Ptr(storage_ptr(sg, lg)?),
                    Arg::Ptr(storage_ptr(su, lu)?),
                    Arg::U64(n as u64),
                    Arg::Ptr(storage_ptr(&y, &Layout::contiguous(n))?),
                ],
            )?;
            Ok((y, lg.shape().clone()))
        }

        fn bwd(
            &self,
            gate: &Tensor,
            up: &Tensor,
            _res: &Tensor,
            dy: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let Some(dev) = on_gpu(gate) else {
                candle_core::bail!("swiglu kernel: backward off the GPU");
            };
            let dtype = gate.dtype();
            let (gate, up) = (gate.contiguous()?, up.contiguous()?);
            let dy = dy.to_dtype(dtype)?.contiguous()?;
            let n = gate.elem_count();
            let dgate = empty(&dev, dtype, gate.shape())?;
            let dup = empty(&dev, dtype, up.shape())?;
            run(
                &dev,
                &format!("swiglu_backward_{}", suffix_of(dtype)?),
                elementwise(n),
                &[
                    Arg::Ptr(ptr(&gate)?),
                    Arg::Ptr(ptr(&up)?),
                    Arg::Ptr(ptr(&dy)?),
                    Arg::U64(n as u64),
                    Arg::Ptr(ptr(&dgate)?),
                    Arg::Ptr(ptr(&dup)?),
                ],
            )?;
            Ok((Some(dgate), Some(dup)))
        }
    }

    pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
        if applies(&[gate, up]).is_none() || gate.shape() != up.shape() {
            return Ok(None);
        }
        Ok(Some(
            gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?,
        ))
    }

    // -----------------------------------------------------------------------------------------
    // Embedding.

    struct Embedding {
        /// (n,) u32 token ids.
        ids: Tensor,
        out_dtype: DType,
    }

    impl CustomOp1 for Embedding {
        fn name(&self) -> &'static str {
            "cuda-embedding"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            cpu_unsupported("cuda-embedding")
        }

        fn cuda_fwd(&self, table: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
            let (vocab, hidden) = layout.shape().dims2()?;
            let n = self.ids.elem_count();
            let dev = table.device().clone();
            let out = alloc(&dev, self.out_dtype, n * hidden)?;
            let name = format!(
                "embedding_forward_{}_{}",
                suffix_of(table.dtype())?,
                suffix_of(self.out_dtype)?
            );
            run(
                &dev,
                &name,
                elementwise(n * hidden),
                &[
                    Arg::Ptr(storage_ptr(table, layout)?),
                    Arg::Ptr(ptr(&self.ids)?),
                    Arg::U64(n as u64),
                    Arg::I32(dim_i32(hidden, "hidden")?),
                    Arg::U64(vocab as u64),
                    Arg::Ptr(storage_ptr(&out, &Layout::contiguous(n * hidden))?),
                ],
            )?;
            Ok((out, Shape::from((n, hidden))))
        }

        fn bwd(&self, table: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
            let Some(dev) = on_gpu(table) else {
                candle_core::bail!("embedding kernel: backward off the GPU");
            };
            let (vocab, hidden) = table.dims2()?;
            let n = self.ids.elem_count();
            let dy = dy.to_dtype(self.out_dtype)?.contiguous()?;
            // The atomics add into zeros.
            let dtable = Tensor::zeros((vocab, hidden), DType::F32, table.device())?;
            run(
                &dev,
                &format!("embedding_backward_{}", suffix_of(self.out_dtype)?),
                elementwise(n * hidden),
                &[
                    Arg::Ptr(ptr(&dy)?),
                    Arg::Ptr(ptr(&self.ids)?),
                    Arg::U64(n as u64),
                    Arg::I32(dim_i32(hidden, "hidden")?),
                    Arg::U64(vocab as u64),
                    Arg::Ptr(ptr(&dtable)?),
                ],
            )?;
            Ok(Some(dtable.to_dtype(table.dtype())?))
        }
    }

    pub fn embedding(table: &Tensor, ids: &Tensor, dtype: DType) -> Result<Option<Tensor>> {
        if applies(&[table]).is_none() || suffix(dtype).is_none() || table.rank() != 2 {
            return Ok(None);
        }
        let op = Embedding {
            ids: ids.to_dtype(DType::U32)?.flatten_all()?.contiguous()?,
            out_dtype: dtype,
        };
        Ok(Some(table.contiguous()?.apply_op1(op)?))
    }

    // -----------------------------------------------------------------------------------------
    // Output projection + cross-entropy in chunks.

    /// Logits elements alive at a time: 2^28 (512 MiB in bf16), about 1,700 rows of a 152k
    /// vocabulary.
    const HEAD_CHUNK_ELEMENTS: usize = 1 << 28;

    /// Hands the head's precomputed loss and gradients to candle's graph: the forward copies
    /// the scalar, the backward scales the gradients by the upstream one.
    struct HeadLossGrads {
        sum: Tensor,
        grads: Mutex<Option<(Tensor, Tensor)>>,
    }

    impl CustomOp2 for HeadLossGrads {
        fn name(&self) -> &'static str {
            "cuda-head-loss"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cpu_unsupported("cuda-head-loss")
        }

        fn cuda_fwd(
            &self,
            _: &CudaStorage,
            _: &Layout,
            _: &CudaStorage,
            _: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (storage, layout) = self.sum.storage_and_layout();
            let Storage::Cuda(cuda) = &*storage else {
                candle_core::bail!("cuda-head-loss: the loss is off the GPU");
            };
            Ok((cuda.try_clone(layout)?, Shape::from(())))
        }

        fn bwd(
            &self,
            _x: &Tensor,
            w: &Tensor,
            _res: &Tensor,
            grad: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let Some((dx, dw)) = self.grads.lock().expect("not poisoned").take() else {
                candle_core::bail!("cuda-head-loss: backward of a forward without gradients");
            };
            let upstream = grad.to_dtype(DType::F32)?;
            let dx = dx
                .to_dtype(DType::F32)?
                .broadcast_mul(&upstream)?
                .to_dtype(dx.dtype())?;
            let dw = dw.broadcast_mul(&upstream)?.to_dtype(w.dtype())?;
            Ok((Some(dx), Some(dw)))
        }
    }

    pub fn head_loss(
        x: &Tensor,
        w: &Tensor,
        targets: &Tensor,
        with_grad: bool,
    ) -> Result<Option<DeviceHeadLoss>> {
        let Some(dev) = applies(&[x, w]) else {
            return Ok(None);
        };
        let (rows, hidden) = x.dims2()?;
        let (vocab, w_hidden) = w.dims2()?;
        if w_hidden != hidden || targets.elem_count() != rows {
            candle_core::bail!(
                "head loss: x {:?}, weight {:?}, {} targets",
                x.shape(),
                w.shape(),
                targets.elem_count()
            );
        }
        let dtype = x.dtype();
        let (xd, wd) = (x.detach().contiguous()?, w.detach().contiguous()?);
        let wt = wd.t()?;
        let targets = targets.to_dtype(DType::I64)?.contiguous()?;
        let loss = empty(&dev, DType::F32, rows)?;
        let correct = empty(&dev, DType::U8, rows)?;
        let chunk = (HEAD_CHUNK_ELEMENTS / vocab.max(1)).clamp(1, rows.max(1));
        let kernel = fused(&dev, &format!("cross_entropy_chunk_{}", suffix_of(dtype)?))?;
        let mut dx_chunks = Vec::new();
        let mut dw: Option<Tensor> = None;
        for start in (0..rows).step_by(chunk) {
            let n = chunk.min(rows - start);
            let x_chunk = xd.narrow(0, start, n)?;
            // (n, hidden) · (hidden, vocab): the chunk's logits, in the compute dtype.
            let logits = x_chunk.matmul(&wt)?.contiguous()?;
            launch(
                &kernel,
                &dev,
                grid((n as u32, 1, 1), 512),
                &[
                    Arg::Ptr(ptr(&logits)?),
                    Arg::Ptr(ptr(&targets)? + (start * 8) as u64),
                    Arg::U64(vocab as u64),
                    Arg::I32(i32::from(with_grad)),
                    Arg::Ptr(ptr(&loss)? + (start * 4) as u64),
                    Arg::Ptr(ptr(&correct)? + start as u64),
                ],
            )?;
            if with_grad {
                // The logits now hold softmax − onehot: dx = dlogits · W, dW += dlogitsᵀ · x.
                dx_chunks.push(logits.matmul(&wd)?);
                let dw_chunk = logits.t()?.matmul(&x_chunk)?.to_dtype(DType::F32)?;
                dw = Some(match dw {
                    Some(acc) => (acc + dw_chunk)?,
                    None => dw_chunk,
                });
            }
        }
        let sum = loss.sum_all()?;
        let sum = if with_grad && rows > 0 {
            let dx = Tensor::cat(&dx_chunks, 0)?;
            let dw = dw.expect("a chunk ran");
            let op = HeadLossGrads {
                sum,
                grads: Mutex::new(Some((dx, dw))),
            };
            x.contiguous()?.apply_op2(&w.contiguous()?, op)?
        } else {
            sum
        };
        Ok(Some(DeviceHeadLoss { sum, correct }))
    }

    // -----------------------------------------------------------------------------------------
    // MoE: grouping and grouped matmuls.

    /// Rows per tile of the grouped matmul (GEMM_M in fused.cu), and its output tile width.
    const GEMM_M: usize = 64;
    const GEMM_N: usize = 64;

    pub fn moe_groups(chosen: &Tensor, num_experts: usize) -> Result<Option<DeviceExpertGroups>> {
        let Some(dev) = on_gpu(chosen) else {
            return Ok(None);
        };
        let (rows, k) = chosen.dims2()?;
        let picks = rows * k;
        let chosen = chosen.to_dtype(DType::U32)?.contiguous()?;
        let max_tiles = picks.div_ceil(GEMM_M) + num_experts;
        let offsets = empty(&dev, DType::U32, num_experts + 1)?;
        let rows_out = empty(&dev, DType::U32, picks)?;
        let slots_out = empty(&dev, DType::U32, picks)?;
        let tiles = empty(&dev, DType::U32, (max_tiles, 2))?;
        let tiles_used = empty(&dev, DType::U32, 1)?;
        let config = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (
                num_experts.clamp(32, 1024).next_multiple_of(32) as u32,
                1,
                1,
            ),
            shared_mem_bytes: ((num_experts + 1) * 4) as u32,
        };
        let to_u32 = |n: usize, what: &str| {
            u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{what} {n} too large")))
        };
        run(
            &dev,
            "moe_expert_offsets",
            config,
            &[
                Arg::Ptr(ptr(&chosen)?),
                Arg::U32(to_u32(picks, "picks")?),
                Arg::U32(to_u32(k, "k")?),
                Arg::U32(to_u32(num_experts, "experts")?),
                Arg::Ptr(ptr(&offsets)?),
                Arg::Ptr(ptr(&rows_out)?),
                Arg::Ptr(ptr(&slots_out)?),
                Arg::Ptr(ptr(&tiles)?),
                Arg::Ptr(ptr(&tiles_used)?),
            ],
        )?;
        Ok(Some(DeviceExpertGroups {
            offsets,
            rows: rows_out,
            slots: slots_out,
            tiles,
            tiles_used,
            max_tiles,
        }))
    }

    /// `y[r] = x[r] · W_e(r)ᵀ` for the rows sorted by expert, W (experts, n, k).
    struct GroupedMatmul {
        groups: DeviceExpertGroups,
    }

    impl GroupedMatmul {
        /// The grouped kernel: `out` (rows, n_out) from `x` (rows, k) against each expert's
        /// matrix at `w`, element (n, k) at `n · w_n + k · w_k`.
        #[allow(clippy::too_many_arguments)]
        fn run(
            &self,
            dev: &CudaDevice,
            dtype: DType,
            x: u64,
            w: u64,
            (k, n_out): (usize, usize),
            (w_expert, w_n, w_k): (usize, usize, usize),
            out: u64,
        ) -> Result<()> {
            run(
                dev,
                &format!("grouped_matmul_{}", suffix_of(dtype)?),
                grid(
                    (
                        n_out.div_ceil(GEMM_N) as u32,
                        self.groups.max_tiles as u32,
                        1,
                    ),
                    256,
                ),
                &[
                    Arg::Ptr(x),
                    Arg::Ptr(w),
                    Arg::Ptr(ptr(&self.groups.offsets)?),
                    Arg::Ptr(ptr(&self.groups.tiles)?),
                    Arg::Ptr(ptr(&self.groups.tiles_used)?),
                    Arg::I32(dim_i32(k, "k")?),
                    Arg::I32(dim_i32(n_out, "n")?),
                    Arg::U64(w_expert as u64),
                    Arg::U64(w_n as u64),
                    Arg::U64(w_k as u64),
                    Arg::Ptr(out),
                ],
            )
        }
    }

    impl CustomOp2 for GroupedMatmul {
        fn name(&self) -> &'static str {
            "cuda-grouped-matmul"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            cpu_unsupported("cuda-grouped-matmul")
        }

        fn cuda_fwd(
            &self,
            sx: &CudaStorage,
            lx: &Layout,
            sw: &CudaStorage,
            lw: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (rows, k) = lx.shape().dims2()?;
            let (_, n, wk) = lw.shape().dims3()?;
            if wk != k {
                candle_core::bail!("grouped matmul: x {:?}, w {:?}", lx.shape(), lw.shape());
            }
            let dev = sx.device().clone();
            let y = alloc(&dev, sx.dtype(), rows * n)?;
            let y_ptr = storage_ptr(&y, &Layout::contiguous(rows * n))?;
            self.run(
                &dev,
                sx.dtype(),
                storage_ptr(sx, lx)?,
                storage_ptr(sw, lw)?,
                (k, n),
                (n * k, k, 1),
                y_ptr,
            )?;
            Ok((y, Shape::from((rows, n))))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _res: &Tensor,
            dy: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let Some(dev) = on_gpu(x) else {
                candle_core::bail!("grouped matmul: backward off the GPU");
            };
            let dtype = x.dtype();
            let (rows, k) = x.dims2()?;
            let (experts, n, _) = w.dims3()?;
            let (x, w) = (x.contiguous()?, w.contiguous()?);
            let dy = dy.to_dtype(dtype)?.contiguous()?;
            // dx[r] = dy[r] · W_e: output index k (stride 1 in W_e), reduction over n (stride k).
            let dx = empty(&dev, dtype, (rows, k))?;
            self.run(
                &dev,
                dtype,
                ptr(&dy)?,
                ptr(&w)?,
                (n, k),
                (n * k, 1, k),
                ptr(&dx)?,
            )?;
            let dw = empty(&dev, dtype, (experts, n, k))?;
            run(
                &dev,
                &format!("grouped_weight_grad_{}", suffix_of(dtype)?),
                grid(
                    (
                        k.div_ceil(GEMM_N) as u32,
                        n.div_ceil(GEMM_M) as u32,
                        experts as u32,
                    ),
                    256,
                ),
                &[
                    Arg::Ptr(ptr(&dy)?),
                    Arg::Ptr(ptr(&x)?),
                    Arg::Ptr(ptr(&self.groups.offsets)?),
                    Arg::I32(dim_i32(n, "n")?),
                    Arg::I32(dim_i32(k, "k")?),
                    Arg::Ptr(ptr(&dw)?),
                ],
            )?;
            Ok((Some(dx), Some(dw)))
        }
    }

    pub fn grouped_matmul(
        x: &Tensor,
        w: &Tensor,
        groups: &DeviceExpertGroups,
    ) -> Result<Option<Tensor>> {
        if applies(&[x, w]).is_none() || w.rank() != 3 {
            return Ok(None);
        }
        let op = GroupedMatmul {
            groups: groups.clone(),
        };
        Ok(Some(x.contiguous()?.apply_op2(&w.contiguous()?, op)?))
    }

    // -----------------------------------------------------------------------------------------
    // Multi-tensor AdamW and squared norm.

    /// Elements per block of the multi-tensor kernels.
    const MULTI_CHUNK: usize = 1 << 16;

    /// (tensor, first element) for every MULTI_CHUNK-element chunk of tensors of these sizes,
    /// flattened.
    fn chunk_table(sizes: &[usize]) -> Vec<u64> {
        let mut table = Vec::new();
        for (t, &n) in sizes.iter().enumerate() {
            for first in (0..n).step_by(MULTI_CHUNK) {
                table.extend([t as u64, first as u64]);
            }
        }
        table
    }

    fn f32_on_gpu(t: &Tensor) -> Result<u64> {
        if t.dtype() != DType::F32 || !t.is_contiguous() {
            candle_core::bail!("multi-tensor kernels take contiguous f32 tensors");
        }
        ptr(t)
    }

    pub fn adamw_multi(tensors: &[AdamWTensors], c: &AdamWScalars) -> Result<Option<()>> {
        let Some(dev) = tensors.first().and_then(|t| on_gpu(t.param)) else {
            return Ok(None);
        };
        let mut table = Vec::with_capacity(tensors.len() * 6);
        for t in tensors {
            let n = t.param.elem_count();
            if t.exp_avg.elem_count() != n
                || t.exp_avg_sq.elem_count() != n
                || t.grad.is_some_and(|g| g.elem_count() != n)
            {
                candle_core::bail!("adamw: a parameter's state does not match its size");
            }
            // The update writes the parameter and moments in place, on the device's one stream.
            table.extend([
                f32_on_gpu(t.param)?,
                t.grad.map(f32_on_gpu).transpose()?.unwrap_or(0),
                f32_on_gpu(t.exp_avg)?,
                f32_on_gpu(t.exp_avg_sq)?,
                n as u64,
                u64::from(t.decay),
            ]);
        }
        let sizes: Vec<usize> = tensors.iter().map(|t| t.param.elem_count()).collect();
        let chunks = chunk_table(&sizes);
        if chunks.is_empty() {
            return Ok(Some(()));
        }
        let table = dev.clone_htod(&table)?;
        let chunk_ids = dev.clone_htod(&chunks)?;
        let stream = dev.cuda_stream();
        let (table_ptr, _t) = table.device_ptr(&stream);
        let (chunks_ptr, _c) = chunk_ids.device_ptr(&stream);
        launch(
            &train(&dev, "adamw_multi_f32")?,
            &dev,
            grid(((chunks.len() / 2) as u32, 1, 1), 256),
            &[
                Arg::Ptr(table_ptr),
                Arg::Ptr(chunks_ptr),
                Arg::U64(MULTI_CHUNK as u64),
                Arg::F32(c.decay.unwrap_or(1.0)),
                Arg::F32(c.one_minus_beta1),
                Arg::F32(c.beta2),
                Arg::F32(c.one_minus_beta2),
                Arg::F32(c.bias_correction2_sqrt),
                Arg::F32(c.eps),
                Arg::F32(c.neg_step_size),
            ],
        )?;
        Ok(Some(()))
    }

    pub fn sum_of_squares_multi(tensors: &[&Tensor]) -> Result<Option<Tensor>> {
        let Some(dev) = tensors.first().and_then(|t| on_gpu(t)) else {
            return Ok(None);
        };
        let pointers = tensors
            .iter()
            .map(|t| f32_on_gpu(t))
            .collect::<Result<Vec<u64>>>()?;
        let sizes: Vec<usize> = tensors.iter().map(|t| t.elem_count()).collect();
        let chunks = chunk_table(&sizes);
        let blocks = (chunks.len() / 2).max(1);
        let partial = dev.alloc_zeros::<f64>(blocks)?;
        let out = dev.alloc_zeros::<f64>(1)?;
        let stream = dev.cuda_stream();
        if !chunks.is_empty() {
            let sizes64: Vec<u64> = sizes.iter().map(|&n| n as u64).collect();
            let (pointers, sizes64, chunk_ids) = (
                dev.clone_htod(&pointers)?,
                dev.clone_htod(&sizes64)?,
                dev.clone_htod(&chunks)?,
            );
            let (pp, _p) = pointers.device_ptr(&stream);
            let (sp, _s) = sizes64.device_ptr(&stream);
            let (cp, _c) = chunk_ids.device_ptr(&stream);
            let (partial_ptr, _q) = partial.device_ptr(&stream);
            launch(
                &train(&dev, "sum_of_squares_multi_f32")?,
                &dev,
                grid((blocks as u32, 1, 1), 256),
                &[
                    Arg::Ptr(pp),
                    Arg::Ptr(sp),
                    Arg::Ptr(cp),
                    Arg::U64(MULTI_CHUNK as u64),
                    Arg::Ptr(partial_ptr),
                ],
            )?;
        }
        {
            let (partial_ptr, _q) = partial.device_ptr(&stream);
            let (out_ptr, _o) = out.device_ptr(&stream);
            launch(
                &train(&dev, "sum_f64")?,
                &dev,
                grid((1, 1, 1), 1024),
                &[
                    Arg::Ptr(partial_ptr),
                    Arg::U64(blocks as u64),
                    Arg::Ptr(out_ptr),
                ],
            )?;
        }
        let storage = CudaStorage::wrap_cuda_slice(out, dev.clone());
        Ok(Some(tensor(storage, ())))
    }
}

pub use imp::*;
