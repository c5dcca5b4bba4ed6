//! Common training GPUs: usable memory as the driver reports it and whether they compute in
//! bfloat16 (Ampere, compute capability 8.0, and newer).

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Gpu {
    pub id: &'static str,
    pub name: &'static str,
    /// Memory as nvidia-smi reports it, in GiB.
    pub memory_gib: f64,
    pub supports_bf16: bool,
}

pub const GPUS: &[Gpu] = &[
    Gpu {
        id: "h100-80",
        name: "NVIDIA H100 80GB",
        memory_gib: 79.6,
        supports_bf16: true,
    },
    Gpu {
        id: "h200-141",
        name: "NVIDIA H200 141GB",
        memory_gib: 140.4,
        supports_bf16: true,
    },
    Gpu {
        id: "a100-80",
        name: "NVIDIA A100 80GB",
        memory_gib: 80.0,
        supports_bf16: true,
    },
    Gpu {
        id: "a100-40",
        name: "NVIDIA A100 40GB",
        memory_gib: 40.0,
        supports_bf16: true,
    },
    Gpu {
        id: "l40s-48",
        name: "NVIDIA L40S 48GB",
        memory_gib: 45.0,
        supports_bf16: true,
    },
    Gpu {
        id: "a6000-48",
        name: "NVIDIA RTX A6000 48GB",
        memory_gib: 47.5,
        supports_bf16: true,
    },
    Gpu {
        id: "rtx4090-24",
        name: "NVIDIA RTX 4090 24GB",
        memory_gib: 24.0,
        supports_bf16: true,
    },
    Gpu {
        id: "rtx3090-24",
        name: "NVIDIA RTX 3090 24GB",
        memory_gib: 24.0,
        supports_bf16: true,
    },
    Gpu {
        id: "a10-24",
        name: "NVIDIA A10 24GB",
        memory_gib: 22.5,
        supports_bf16: true,
    },
    Gpu {
        id: "l4-24",
        name: "NVIDIA L4 24GB",
        memory_gib: 22.5,
        supports_bf16: true,
    },
    Gpu {
        id: "v100-32",
        name: "NVIDIA V100 32GB",
        memory_gib: 31.7,
        supports_bf16: false,
    },
    Gpu {
        id: "t4-16",
        name: "NVIDIA T4 16GB",
        memory_gib: 15.0,
        supports_bf16: false,
    },
];

/// The GPU a config is judged against when none is chosen: the common 80 GB training card.
pub fn default_gpu() -> &'static Gpu {
    &GPUS[0]
}

pub fn find(id: &str) -> Option<&'static Gpu> {
    GPUS.iter().find(|g| g.id.eq_ignore_ascii_case(id))
}
