//! The device a job runs on, chosen once from the config and passed through.

use candle_core::Device;
use whet_shared::JobConfig;

/// The CPU unless the job names GPUs; this build has no CUDA, so naming GPUs is refused before
/// any work rather than quietly trained on the CPU.
pub fn select_device(config: &JobConfig) -> anyhow::Result<Device> {
    match config.launch.cuda_visible_devices.as_deref().map(str::trim) {
        None | Some("") => Ok(Device::Cpu),
        Some(devices) => anyhow::bail!(
            "cuda_visible_devices: CUDA_VISIBLE_DEVICES names GPUs ({devices}) but this whet was built without CUDA; unset it (or set it to \"\") to train on the CPU, or build whet with --features cuda on a machine with a GPU"
        ),
    }
}
