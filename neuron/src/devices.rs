//! What this host can hold: NVIDIA GPUs through NVML (with the `cuda` feature), and the host's
//! memory for models served on the CPU.

use cortex_core::neuron::DeviceInfo;

/// Total and available system memory from `/proc/meminfo`.
pub fn system_memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

pub fn cpu_device() -> DeviceInfo {
    let (total, free) = system_memory();
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "cpu".into());
    DeviceInfo {
        index: 0,
        name,
        kind: "cpu".into(),
        memory_total: total,
        memory_free: free,
    }
}

/// NVIDIA GPUs seen by NVML; empty where there is no driver or no GPU.
#[cfg(feature = "cuda")]
pub fn gpus() -> Vec<DeviceInfo> {
    use std::sync::OnceLock;
    static NVML: OnceLock<Option<nvml_wrapper::Nvml>> = OnceLock::new();
    let Some(nvml) = NVML
        .get_or_init(|| match nvml_wrapper::Nvml::init() {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "NVML unavailable; no GPUs reported");
                None
            }
        })
        .as_ref()
    else {
        return Vec::new();
    };
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| {
            let d = nvml.device_by_index(i).ok()?;
            let mem = d.memory_info().ok()?;
            Some(DeviceInfo {
                index: i,
                name: d.name().unwrap_or_else(|_| format!("cuda:{i}")),
                kind: "cuda".into(),
                memory_total: mem.total,
                memory_free: mem.free,
            })
        })
        .collect()
}

#[cfg(not(feature = "cuda"))]
pub fn gpus() -> Vec<DeviceInfo> {
    Vec::new()
}

/// Every device models can be placed on: GPUs first, then the CPU.
pub fn all() -> Vec<DeviceInfo> {
    let mut v = gpus();
    v.push(cpu_device());
    v
}
