//! The one place a job's device is chosen, from its `cuda_visible_devices` (the config's, or
//! CUDA_VISIBLE_DEVICES from the environment, which `whet sft` copies in where the config is
//! silent). A job this build or this machine cannot run where the config says is refused
//! before any work — never trained on the CPU instead.
//!
//! As torch sees devices: unset or empty CUDA_VISIBLE_DEVICES is the CPU; a list makes the
//! driver show those GPUs renumbered from 0 (the process's CUDA_VISIBLE_DEVICES is set to the
//! config's before the driver starts), and rank k of a job trains on visible device LOCAL_RANK
//! (0 for one process). A build without the `cuda` feature refuses any list.

use candle_core::Device;
use whet_shared::validate::parse_devices;
use whet_shared::{Diagnostic, JobConfig};

/// The GPUs a config lists, or None for the CPU.
// The refusals are user-facing Diagnostics by design, as in whet-shared.
#[allow(clippy::result_large_err)]
fn listed_gpus(config: &JobConfig) -> Result<Option<(String, usize)>, Diagnostic> {
    let Some(listed) = config.launch.cuda_visible_devices.as_deref() else {
        return Ok(None);
    };
    let count = parse_devices(listed)?.len();
    Ok((count > 0).then(|| (listed.trim().to_string(), count)))
}

/// Checks, without starting a context, that the devices the config names can be used: the
/// CPU always; GPUs when this build has CUDA, the driver starts and shows at least as many
/// devices as the node's ranks need. `whet sft` asks this before it launches any rank.
#[allow(clippy::result_large_err)]
pub fn check_devices(config: &JobConfig) -> Result<(), Diagnostic> {
    let Some((listed, _)) = listed_gpus(config)? else {
        return Ok(());
    };
    let ranks = config.launch.nproc_per_node.unwrap_or(1).max(1) as usize;
    gpu::probe(&listed, ranks.saturating_sub(1)).map(|_| ())
}

/// The device `whet sft` trains the job on: the CPU, or (with CUDA) visible device LOCAL_RANK,
/// with its memory pool set up. Refuses, naming the field and the fix, when the config lists
/// GPUs that cannot be used.
#[allow(clippy::result_large_err)]
pub fn select_device(config: &JobConfig) -> Result<Device, Diagnostic> {
    let Some((listed, _)) = listed_gpus(config)? else {
        return Ok(Device::Cpu);
    };
    gpu::open(&listed, local_rank())
}

/// This process's LOCAL_RANK (torchrun's, or whet's launcher's), 0 when alone.
pub fn local_rank() -> usize {
    std::env::var("LOCAL_RANK")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The GPU a command without a job config runs on (`whet bench train --device cuda`): visible
/// device LOCAL_RANK under the environment's CUDA_VISIBLE_DEVICES (every GPU when it is
/// unset), opened as [`select_device`] opens a job's, with the same refusals.
#[allow(clippy::result_large_err)]
pub fn open_visible_gpu() -> Result<Device, Diagnostic> {
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(listed) => {
            parse_devices(&listed)?;
            gpu::open(listed.trim(), local_rank())
        }
        Err(_) => gpu::open(gpu::EVERY_GPU, local_rank()),
    }
}

/// What a report names the device by: `cpu`, or the GPU's name (`NVIDIA H200`).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu::name(gpu_id),
        _ => "cpu".into(),
    }
}

/// The high-water mark of device memory in use, as torch's `reset_peak_memory_stats` and
/// `max_memory_allocated` see it: candle allocates from the GPU's default memory pool, whose
/// USED_MEM_HIGH attribute [`reset_peak_gpu_memory`] zeroes. None on the CPU.
pub fn peak_gpu_memory_bytes(device: &Device) -> Option<u64> {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu::peak_memory(gpu_id),
        _ => None,
    }
}

/// Starts [`peak_gpu_memory_bytes`] over from what is in use now (nothing on the CPU).
pub fn reset_peak_gpu_memory(device: &Device) -> anyhow::Result<()> {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu::reset_peak_memory(gpu_id),
        _ => Ok(()),
    }
}

/// What `whet check` says about the GPUs the config lists: the driver and each visible device,
/// or why none can be used.
pub fn describe_gpus(config: &JobConfig) -> String {
    // `whet check` judges a script: the config's list, else the shell's (as `whet sft` reads it).
    let mut config = config.clone();
    if config.launch.cuda_visible_devices.is_none() {
        config.launch.cuda_visible_devices = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    }
    match listed_gpus(&config) {
        Ok(Some((listed, _))) => gpu::describe(&listed),
        Ok(None) => "devices: the CPU (CUDA_VISIBLE_DEVICES is unset or empty)".into(),
        Err(d) => format!("devices: {}", d.message_en),
    }
}

/// The most memory `device`'s pool has held since it was opened, in GiB (torch's
/// `max_memory_reserved`); None for the CPU.
pub fn peak_reserved_gib(device: &Device) -> Option<f64> {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu::peak_reserved(gpu_id),
        _ => None,
    }
    .map(|bytes| bytes as f64 / (1u64 << 30) as f64)
}

/// Whether `error` is the GPU running out of memory (the driver's or cuBLAS's).
pub fn is_out_of_memory(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        let text = cause.to_string();
        text.contains("CUDA_ERROR_OUT_OF_MEMORY") || text.contains("CUBLAS_STATUS_ALLOC_FAILED")
    })
}

/// What to tell a user whose job ran out of GPU memory: the config's largest remedies, as
/// `whet check` ranks them (whet-shared's memory estimate), and the estimate itself.
pub fn out_of_memory_help(config: &JobConfig) -> String {
    let context = whet_shared::derive::CheckContext::gather(config, &|path| {
        std::fs::read_to_string(path).ok()
    });
    let Some(facts) = context.facts_for(config) else {
        return "the GPU ran out of memory; `whet check` on this config lists what saves memory (gradient checkpointing, a smaller batch, LoRA, ZeRO-3)".into();
    };
    let remedies = whet_shared::validate::oom_remedies(config, &facts);
    let estimate =
        whet_shared::derive::derive(config, Some(&facts), context.dataset_rows, context.gpu)
            .memory
            .map(|m| format!(" (whet check estimates {:.1} GiB per GPU)", m.per_gpu_gib))
            .unwrap_or_default();
    if remedies.is_empty() {
        return format!("the GPU ran out of memory{estimate}: use more GPUs or a smaller model");
    }
    let mut list = whet_shared::validate::numbered_remedies(&remedies);
    list.truncate(4);
    format!(
        "the GPU ran out of memory{estimate}; largest savings first: {}",
        list.join("; ")
    )
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    use super::*;

    fn without_cuda(listed: &str) -> Diagnostic {
        Diagnostic::error(
            "cuda_visible_devices",
            "cuda_unavailable",
            format!(
                "CUDA_VISIBLE_DEVICES is `{listed}`, but this whet was built without CUDA: it can train only on the CPU"
            ),
            format!("CUDA_VISIBLE_DEVICES 为 `{listed}`，但此 whet 构建时未启用 CUDA：只能在 CPU 上训练"),
        )
        .with_fix(
            "to train on the CPU, unset CUDA_VISIBLE_DEVICES or set it to \"\" (`CUDA_VISIBLE_DEVICES= whet sft ...`, or `cuda_visible_devices: \"\"` in the config file); to train on GPUs, build whet with `--features cuda` (README: GPU build)",
            "要在 CPU 上训练，请取消设置 CUDA_VISIBLE_DEVICES 或将其设为 \"\"（`CUDA_VISIBLE_DEVICES= whet sft ...`，或在配置文件中写 `cuda_visible_devices: \"\"`）；要在 GPU 上训练，请用 `--features cuda` 构建 whet（见 README 的 GPU 构建一节）",
        )
    }

    #[allow(clippy::result_large_err)]
    pub fn probe(listed: &str, _ordinal: usize) -> Result<usize, Diagnostic> {
        Err(without_cuda(listed))
    }

    #[allow(clippy::result_large_err)]
    pub fn open(listed: &str, _ordinal: usize) -> Result<Device, Diagnostic> {
        Err(without_cuda(listed))
    }

    pub fn describe(listed: &str) -> String {
        format!("devices: CUDA_VISIBLE_DEVICES={listed}, but this whet was built without CUDA (build with `--features cuda`)")
    }

    pub fn peak_reserved(_ordinal: usize) -> Option<u64> {
        None
    }

    /// What the refusals call an unset CUDA_VISIBLE_DEVICES.
    pub const EVERY_GPU: &str = "unset (every GPU)";

    // Without CUDA no device but the CPU exists, so these are never asked about a GPU.
    pub fn name(_ordinal: usize) -> String {
        "cpu".into()
    }

    pub fn peak_memory(_ordinal: usize) -> Option<u64> {
        None
    }

    pub fn reset_peak_memory(_ordinal: usize) -> anyhow::Result<()> {
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};

    /// The driver's CUDA version, e.g. "13.0", or why it cannot say.
    fn driver_version() -> String {
        let mut version = 0;
        // SAFETY: cuDriverGetVersion writes one int and needs no cuInit.
        match unsafe { sys::cuDriverGetVersion(&mut version) }.result() {
            Ok(()) => format!("{}.{}", version / 1000, (version % 1000) / 10),
            Err(e) => format!("unknown: cuDriverGetVersion returned {:?}", e.0),
        }
    }

    /// What the refusals call an unset CUDA_VISIBLE_DEVICES: the driver shows every GPU.
    pub const EVERY_GPU: &str = "unset (every GPU)";

    /// The number of devices the driver shows under CUDA_VISIBLE_DEVICES = `listed`.
    fn visible_devices(listed: &str) -> Result<usize, String> {
        // The driver reads CUDA_VISIBLE_DEVICES once, when it starts: the config's list must
        // be in the environment before then (a config file may name other GPUs than the shell).
        if listed != EVERY_GPU
            && std::env::var("CUDA_VISIBLE_DEVICES")
                .ok()
                .as_deref()
                .map(str::trim)
                != Some(listed)
        {
            std::env::set_var("CUDA_VISIBLE_DEVICES", listed);
        }
        result::init().map_err(|e| format!("cuInit failed with {:?}", e.0))?;
        let count = result::device::get_count()
            .map_err(|e| format!("cuDeviceGetCount failed with {:?}", e.0))?;
        Ok(count.max(0) as usize)
    }

    fn unusable(listed: &str, found: &str) -> Diagnostic {
        Diagnostic::error(
            "cuda_visible_devices",
            "cuda_unusable",
            format!(
                "CUDA_VISIBLE_DEVICES is `{listed}`, but no GPU can be used: {found} (CUDA driver version {})",
                driver_version()
            ),
            format!(
                "CUDA_VISIBLE_DEVICES 为 `{listed}`，但没有可用的 GPU：{found}（CUDA 驱动版本 {}）",
                driver_version()
            ),
        )
        .with_fix(
            "check the GPUs with `nvidia-smi` (the NVIDIA driver must support CUDA 13: version 580 or later) and that CUDA_VISIBLE_DEVICES names GPUs this machine has; to train on the CPU instead, unset CUDA_VISIBLE_DEVICES or set it to \"\"",
            "用 `nvidia-smi` 检查 GPU（NVIDIA 驱动须支持 CUDA 13：580 或更高版本），并确认 CUDA_VISIBLE_DEVICES 所列 GPU 本机确有；若改用 CPU 训练，请取消设置 CUDA_VISIBLE_DEVICES 或将其设为 \"\"",
        )
    }

    /// Starts the driver and checks that visible device `ordinal` exists; the device count.
    #[allow(clippy::result_large_err)]
    pub fn probe(listed: &str, ordinal: usize) -> Result<usize, Diagnostic> {
        let count = visible_devices(listed).map_err(|found| unusable(listed, &found))?;
        if count == 0 {
            return Err(unusable(listed, "the driver shows no device"));
        }
        if ordinal >= count {
            return Err(Diagnostic::error(
                "nproc_per_node",
                "too_few_gpus",
                format!(
                    "this rank trains on visible GPU {ordinal} (its LOCAL_RANK), but CUDA_VISIBLE_DEVICES `{listed}` shows {count} GPU(s) on this machine"
                ),
                format!(
                    "此进程应使用第 {ordinal} 块可见 GPU（其 LOCAL_RANK），但 CUDA_VISIBLE_DEVICES `{listed}` 在本机只显示 {count} 块 GPU"
                ),
            )
            .with_fix(
                "run at most as many ranks per node as CUDA_VISIBLE_DEVICES lists GPUs that exist (`nvidia-smi -L` lists them)",
                "每个节点的进程数不能超过 CUDA_VISIBLE_DEVICES 中实际存在的 GPU 数（`nvidia-smi -L` 可列出）",
            ));
        }
        Ok(count)
    }

    #[allow(clippy::result_large_err)]
    pub fn open(listed: &str, ordinal: usize) -> Result<Device, Diagnostic> {
        probe(listed, ordinal)?;
        // One stream for the whole process (not CUDA's per-thread default streams): every
        // thread's work, and NCCL's, is ordered on it, so cudarc's per-allocation events are
        // not needed and are switched off (two events per tensor otherwise).
        let device = Device::new_cuda_with_stream(ordinal)
            .map_err(|e| unusable(listed, &format!("opening GPU {ordinal} failed: {e}")))?;
        if let Device::Cuda(cuda) = &device {
            // SAFETY: one stream only (above); tensors are freed in stream order after use.
            unsafe { cuda.disable_event_tracking() };
        }
        keep_freed_memory(ordinal).map_err(|e| {
            unusable(
                listed,
                &format!(
                    "setting up GPU {ordinal}'s memory pool failed with {:?}",
                    e.0
                ),
            )
        })?;
        Ok(device)
    }

    /// Freed device memory stays in the device's pool for the next step's tensors instead of
    /// going back to the driver at every synchronisation (the pool's default release threshold
    /// is 0); torch's caching allocator keeps it likewise.
    fn keep_freed_memory(ordinal: usize) -> Result<(), result::DriverError> {
        let device = result::device::get(ordinal as i32)?;
        // SAFETY: the default pool of a valid device; the attribute takes a u64.
        unsafe {
            let pool = result::device::get_default_mem_pool(device)?;
            let mut threshold = u64::MAX;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        }
    }

    pub fn describe(listed: &str) -> String {
        let count = match visible_devices(listed) {
            Ok(count) => count,
            Err(found) => {
                return format!(
                    "devices: no GPU usable under CUDA_VISIBLE_DEVICES={listed}: {found} (CUDA driver version {})",
                    driver_version()
                )
            }
        };
        let mut lines = vec![format!(
            "devices: {count} GPU(s) visible under CUDA_VISIBLE_DEVICES={listed} (CUDA driver version {})",
            driver_version()
        )];
        for ordinal in 0..count {
            lines.push(format!("  cuda:{ordinal}  {}", describe_device(ordinal)));
        }
        lines.join("\n")
    }

    pub fn name(ordinal: usize) -> String {
        result::device::get(ordinal as i32)
            .and_then(result::device::get_name)
            .unwrap_or_else(|_| "unknown GPU".into())
    }

    /// An attribute (bytes) of the device's default pool, None if the driver cannot say.
    fn pool_attribute(ordinal: usize, attribute: sys::CUmemPool_attribute) -> Option<u64> {
        let mut value = 0u64;
        // SAFETY: the default pool of a valid device; these attributes are u64s.
        unsafe {
            let pool =
                result::device::get_default_mem_pool(result::device::get(ordinal as i32).ok()?)
                    .ok()?;
            result::mem_pool::get_attribute(pool, attribute, (&mut value as *mut u64).cast())
                .ok()?;
        }
        Some(value)
    }

    /// USED_MEM_HIGH: the most memory in use since the last reset (torch's max allocated).
    pub fn peak_memory(ordinal: usize) -> Option<u64> {
        pool_attribute(
            ordinal,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        )
    }

    /// RESERVED_MEM_HIGH: the most memory the pool has held (torch's max reserved).
    pub fn peak_reserved(ordinal: usize) -> Option<u64> {
        pool_attribute(
            ordinal,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
        )
    }

    pub fn reset_peak_memory(ordinal: usize) -> anyhow::Result<()> {
        // The driver accepts only 0: the mark restarts from the memory in use now.
        let mut zero = 0u64;
        // SAFETY: as in `peak_memory`.
        unsafe {
            let pool = result::device::get_default_mem_pool(result::device::get(ordinal as i32)?)?;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )?;
        }
        Ok(())
    }

    fn describe_device(ordinal: usize) -> String {
        let Ok(device) = result::device::get(ordinal as i32) else {
            return "unreadable".into();
        };
        let name = result::device::get_name(device).unwrap_or_else(|_| "unknown".into());
        // SAFETY: queries of a valid device handle.
        let (memory, major, minor) = unsafe {
            use sys::CUdevice_attribute::*;
            (
                result::device::total_mem(device).unwrap_or(0),
                result::device::get_attribute(device, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                    .unwrap_or(0),
                result::device::get_attribute(device, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
                    .unwrap_or(0),
            )
        };
        format!(
            "{name}, {:.1} GiB, compute capability {major}.{minor}",
            memory as f64 / (1u64 << 30) as f64
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_devices(devices: Option<&str>) -> JobConfig {
        let mut config = JobConfig::default();
        config.launch.cuda_visible_devices = devices.map(String::from);
        config
    }

    #[test]
    fn no_devices_is_the_cpu_and_a_gpu_list_is_refused() {
        for cpu in [None, Some(""), Some("  ")] {
            assert!(
                select_device(&with_devices(cpu)).unwrap().is_cpu(),
                "{cpu:?}"
            );
        }
        let unreadable = select_device(&with_devices(Some("0,x"))).unwrap_err();
        assert_eq!(unreadable.code, "devices_invalid");
        // A CUDA build asks the driver instead (engine/tests/cuda_build.rs).
        if cfg!(feature = "cuda") {
            return;
        }
        let refused = select_device(&with_devices(Some("0,1"))).unwrap_err();
        assert_eq!(
            (refused.field.as_str(), refused.code.as_str()),
            ("cuda_visible_devices", "cuda_unavailable")
        );
        assert!(
            refused.fix.contains("CUDA_VISIBLE_DEVICES= whet sft"),
            "{}",
            refused.fix
        );
    }

    #[test]
    fn a_gpu_out_of_memory_error_gets_the_configs_remedies() {
        let oom = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")")
            .context("layer 3 forward");
        assert!(is_out_of_memory(&oom));
        assert!(!is_out_of_memory(&anyhow::anyhow!("no such file")));
        let mut config = JobConfig::default();
        config.sft.model = Some("Qwen/Qwen3-30B-A3B-Thinking-2507".into());
        let help = out_of_memory_help(&config);
        assert!(help.contains("largest savings first: 1) "), "{help}");
        assert!(help.contains("GiB per GPU"), "{help}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_build_without_cuda_opens_no_gpu_from_the_environment() {
        // Unset or any list, a GPU is refused as a config's list is.
        let refused = open_visible_gpu().unwrap_err();
        assert!(
            ["cuda_unavailable", "devices_invalid"].contains(&refused.code.as_str()),
            "{refused:?}"
        );
        assert_eq!(device_name(&Device::Cpu), "cpu");
        assert_eq!(peak_gpu_memory_bytes(&Device::Cpu), None);
    }
}
