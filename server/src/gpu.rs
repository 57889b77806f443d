//! GPU metrics with Triton's names (`nv_gpu_utilization`, `nv_gpu_memory_total_bytes`,
//! `nv_gpu_memory_used_bytes`, `nv_gpu_power_usage`, labelled `gpu_uuid`), read from NVML.
//!
//! NVML (`libnvidia-ml.so.1`, installed with the NVIDIA driver) is loaded at run time by the
//! `nvml-wrapper` crate, which holds the only `unsafe` (the FFI calls) — none is ours. It is
//! opened only once a model runs on CUDA; without the library, or on CPU, nothing is exported:
//! never an invented number.

use std::fmt::Write as _;
use std::sync::OnceLock;

use nvml_wrapper::Nvml;

/// One GPU's reading.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuReading {
    /// `GPU-…` UUID.
    pub uuid: String,
    /// Fraction of the last sample period a kernel ran (0–1).
    pub utilization: Option<f64>,
    /// Installed memory.
    pub memory_total: Option<u64>,
    /// Allocated memory.
    pub memory_used: Option<u64>,
    /// Power draw in watts.
    pub power_watts: Option<f64>,
}

static NVML: OnceLock<Option<Nvml>> = OnceLock::new();

/// NVML, opened on first use; None (logged once) where the library is missing or fails.
fn nvml() -> Option<&'static Nvml> {
    NVML.get_or_init(|| match Nvml::init() {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::info!(reason = %e, "NVML unavailable: no GPU metrics are exported");
            None
        }
    })
    .as_ref()
}

/// A reading of every GPU NVML sees (the ones the container runtime gave this pod); empty without
/// NVML.
pub fn read() -> Vec<GpuReading> {
    let Some(nvml) = nvml() else { return Vec::new() };
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| {
            let d = nvml.device_by_index(i).ok()?;
            let memory = d.memory_info().ok();
            Some(GpuReading {
                uuid: d.uuid().ok()?,
                utilization: d.utilization_rates().ok().map(|u| f64::from(u.gpu) / 100.0),
                memory_total: memory.as_ref().map(|m| m.total),
                memory_used: memory.as_ref().map(used_bytes),
                power_watts: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
            })
        })
        .collect()
}

/// Used memory as Triton reports it: NVML's version-1 `used`, which is `total - free` and so counts
/// the driver's reserved memory. `nvml-wrapper` reads version 2, whose `used` leaves the reservation
/// out (on an H200 seen 615 MiB lower than `nvidia-ml-py`'s reading of the same device).
fn used_bytes(m: &nvml_wrapper::struct_wrappers::device::MemoryInfo) -> u64 {
    m.total.saturating_sub(m.free)
}

/// Appends the readings in Triton's exposition; a value NVML did not give is left out.
pub fn render(out: &mut String, gpus: &[GpuReading]) {
    if gpus.is_empty() {
        return;
    }
    type Get = fn(&GpuReading) -> Option<f64>;
    let families: [(&str, &str, Get); 4] = [
        ("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", |g| {
            g.utilization
        }),
        ("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", |g| {
            g.memory_total.map(|b| b as f64)
        }),
        ("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", |g| {
            g.memory_used.map(|b| b as f64)
        }),
        ("nv_gpu_power_usage", "GPU power usage in watts", |g| {
            g.power_watts
        }),
    ];
    for (name, help, get) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for g in gpus {
            if let Some(v) = get(g) {
                let _ = writeln!(out, "{name}{{gpu_uuid=\"{}\"}} {v}", g.uuid.replace('"', ""));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_memory_counts_the_drivers_reservation_as_triton_does() {
        // The H200's reading (2026-11-29): NVML v2 said used 1,458,372,608 and reserved
        // 644,939,776; nvidia-ml-py's v1 `used` was 2,103,312,384.
        let total = 150_754_820_096;
        let m = nvml_wrapper::struct_wrappers::device::MemoryInfo {
            free: total - 1_458_372_608 - 644_939_776,
            reserved: 644_939_776,
            total,
            used: 1_458_372_608,
            version: 2,
        };
        assert_eq!(used_bytes(&m), 2_103_312_384);
    }

    #[test]
    fn readings_render_with_tritons_names_and_missing_values_are_left_out() {
        let mut out = String::new();
        render(&mut out, &[]);
        assert!(out.is_empty(), "no GPU, no GPU families");
        let gpu = GpuReading {
            uuid: "GPU-1234".into(),
            utilization: Some(0.5),
            memory_total: Some(80),
            memory_used: Some(40),
            power_watts: None,
        };
        render(&mut out, &[gpu]);
        assert!(
            out.contains("nv_gpu_utilization{gpu_uuid=\"GPU-1234\"} 0.5\n"),
            "{out}"
        );
        assert!(out.contains("nv_gpu_memory_used_bytes{gpu_uuid=\"GPU-1234\"} 40\n"));
        assert!(out.contains("nv_gpu_memory_total_bytes{gpu_uuid=\"GPU-1234\"} 80\n"));
        assert!(
            !out.contains("nv_gpu_power_usage{"),
            "a value NVML did not give is absent"
        );
    }
}
