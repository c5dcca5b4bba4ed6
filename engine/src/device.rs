//! The one place a job's device is chosen, from its `cuda_visible_devices` (the config's, or
//! CUDA_VISIBLE_DEVICES from the environment, which `whet sft` copies in where the config is
//! silent). A job this build cannot run where the config says is refused before any work —
//! never trained on the CPU instead.
//!
//! CUDA plugs in here: a build with the `cuda` feature returns the first listed GPU (torch
//! renumbers the visible devices from 0) and refuses a list when no GPU is visible.

use candle_core::Device;
use whet_shared::validate::parse_devices;
use whet_shared::{Diagnostic, JobConfig};

/// The device `whet sft` trains the job on. Unset or empty CUDA_VISIBLE_DEVICES is the CPU;
/// a list of GPUs is an error naming `cuda_visible_devices`, as this build has no CUDA.
// The refusal is a user-facing Diagnostic by design, as in whet-shared.
#[allow(clippy::result_large_err)]
pub fn select_device(config: &JobConfig) -> Result<Device, Diagnostic> {
    let Some(listed) = config.launch.cuda_visible_devices.as_deref() else {
        return Ok(Device::Cpu);
    };
    if parse_devices(listed)?.is_empty() {
        return Ok(Device::Cpu);
    }
    Err(Diagnostic::error(
        "cuda_visible_devices",
        "cuda_unavailable",
        format!(
            "CUDA_VISIBLE_DEVICES is `{listed}`, but this whet was built without CUDA: it can train only on the CPU"
        ),
        format!("CUDA_VISIBLE_DEVICES 为 `{listed}`，但此 whet 构建时未启用 CUDA：只能在 CPU 上训练"),
    )
    .with_fix(
        "to train on the CPU, unset CUDA_VISIBLE_DEVICES or set it to \"\" (`CUDA_VISIBLE_DEVICES= whet sft ...`, or `cuda_visible_devices: \"\"` in the config file); GPU training needs a whet built with CUDA support, which this version does not have yet",
        "要在 CPU 上训练，请取消设置 CUDA_VISIBLE_DEVICES 或将其设为 \"\"（`CUDA_VISIBLE_DEVICES= whet sft ...`，或在配置文件中写 `cuda_visible_devices: \"\"`）；GPU 训练需要启用 CUDA 构建的 whet，此版本尚不支持",
    ))
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
        let unreadable = select_device(&with_devices(Some("0,x"))).unwrap_err();
        assert_eq!(unreadable.code, "devices_invalid");
    }
}
