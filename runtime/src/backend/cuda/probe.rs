//! The probe of the CUDA stack (driver, NVRTC, cuBLAS, a device), loaded at run time through
//! cudarc's dynamic loading so every build has it and none needs CUDA to build.
//!
//! Invariants: nothing here panics, even where cudarc would on a missing library or symbol (each
//! library is probed before first use and calls into cudarc are caught); every failure is one
//! line naming what is missing and the setting to change.

use crate::error::{Error, Result};

/// What the probe found: one usable CUDA device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaDevice {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor).
    pub compute_capability: (i32, i32),
    pub total_bytes: u64,
    pub free_bytes: u64,
}

pub(super) fn unavailable(reason: String) -> Error {
    Error::BackendUnavailable {
        backend: "cuda".into(),
        reason,
    }
}

/// The CUDA libraries the backend loads.
#[derive(Clone, Copy)]
enum Library {
    Driver,
    Nvrtc,
    Cublas,
}

impl Library {
    /// Whether the library can be loaded (cudarc would panic on first use otherwise).
    fn present(self) -> bool {
        match self {
            // SAFETY: `is_culib_present` only dlopens the library under its candidate names and
            // drops the handle; no function of the library is called.
            Library::Driver => unsafe { cudarc::driver::sys::is_culib_present() },
            // SAFETY: as above.
            Library::Nvrtc => unsafe { cudarc::nvrtc::sys::is_culib_present() },
            // SAFETY: as above.
            Library::Cublas => unsafe { cudarc::cublas::sys::is_culib_present() },
        }
    }
}

/// Checks the CUDA stack and opens device `ordinal`: the driver library, NVRTC (kernels are
/// compiled at first use), cuBLAS, then the device. The error names the first thing missing.
pub fn probe(ordinal: usize) -> Result<CudaDevice> {
    let fix =
        "set device = \"cpu\" (or \"sim\" to simulate a GPU, \"auto\" to use one when present)";
    let libraries = [
        (
            Library::Driver,
            "the CUDA driver (libcuda.so.1; install the NVIDIA driver)",
        ),
        (
            Library::Nvrtc,
            "NVRTC 13 (libnvrtc.so.13; install the CUDA 13.0 toolkit, or the \
             nvidia-cuda-nvrtc==13.0.88 wheel with its lib folder on LD_LIBRARY_PATH)",
        ),
        (
            Library::Cublas,
            "cuBLAS 13 (libcublas.so.13; install the CUDA 13.0 toolkit)",
        ),
    ];
    for (lib, what) in libraries {
        if !lib.present() {
            return Err(unavailable(format!("{what} was not found; {fix}")));
        }
    }
    // cudarc panics where a symbol is missing (a driver older than the CUDA 13.0 bindings): catch
    // it and say so.
    let opened = std::panic::catch_unwind(|| -> std::result::Result<CudaDevice, String> {
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| e.to_string())?;
        let name = ctx.name().map_err(|e| e.to_string())?;
        let compute_capability = ctx.compute_capability().map_err(|e| e.to_string())?;
        let (free, total) = ctx.mem_get_info().map_err(|e| e.to_string())?;
        Ok(CudaDevice {
            ordinal,
            name,
            compute_capability,
            total_bytes: total as u64,
            free_bytes: free as u64,
        })
    });
    match opened {
        Ok(Ok(dev)) => Ok(dev),
        Ok(Err(e)) => Err(unavailable(format!(
            "CUDA device {ordinal} cannot be opened ({e}); {fix}"
        ))),
        Err(_) => Err(unavailable(format!(
            "the CUDA driver lacks a CUDA 13.0 function (driver 580 or newer is needed); {fix}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{select, Activations, AnyBackend, DeviceKind};

    #[test]
    fn cuda_opens_only_where_usable_and_auto_falls_back_to_the_cpu() {
        let dir = tempfile::tempdir().unwrap();
        let usable = crate::backend::cuda::usable(0);
        match crate::backend::Cuda::new(0, dir.path()) {
            Ok(c) => assert!(usable.is_ok(), "opened {} but not usable", c.describe()),
            Err(e) => {
                // Here (no GPU) the probe names the first missing part: one line, the fix.
                let e = e.to_string();
                assert!(usable.is_err());
                assert!(e.contains("cuda backend unavailable"), "{e}");
                assert!(e.contains("device = \"cpu\"") && !e.contains('\n'), "{e}");
                assert!(matches!(
                    select(DeviceKind::Cuda, Activations::F32, dir.path()),
                    Err(Error::BackendUnavailable { .. })
                ));
                // `auto` never fails: without a usable GPU it computes on the CPU.
                assert_eq!(DeviceKind::Auto.resolve().unwrap(), DeviceKind::Cpu);
                assert!(matches!(
                    select(DeviceKind::Auto, Activations::F32, dir.path()),
                    Ok(AnyBackend::Cpu(_))
                ));
                assert!(DeviceKind::Cuda.resolve().is_err());
            }
        }
        assert!(matches!(
            select(DeviceKind::Sim, Activations::Q8, dir.path()),
            Ok(AnyBackend::Cpu(c)) if c.activations == Activations::Q8
        ));
    }

    #[test]
    fn the_probe_names_the_first_missing_library_or_the_device() {
        match probe(0) {
            Ok(dev) => {
                assert!(!dev.name.is_empty() && dev.total_bytes >= dev.free_bytes);
                assert!(dev.compute_capability.0 >= 7, "{dev:?}");
            }
            Err(e) => {
                let e = e.to_string();
                assert!(
                    [
                        "libcuda.so.1",
                        "libnvrtc.so.13",
                        "libcublas.so.13",
                        "cannot be opened"
                    ]
                    .iter()
                    .any(|w| e.contains(w)),
                    "{e}"
                );
            }
        }
    }
}
