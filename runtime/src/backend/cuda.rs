//! The CUDA backend's place: the probe of the CUDA stack (driver, NVRTC, cuBLAS, a device),
//! loaded at run time through cudarc's dynamic loading so every build has it and none needs CUDA
//! to build, and the backend type itself. This build's CUDA backend runs no model yet: [`Cuda`]
//! has no values (every op is an empty match), so call sites stay free of `cfg`, and
//! [`Cuda::new`] always fails, with what the probe found.
//!
//! Invariants: nothing here panics, even where cudarc would on a missing library or symbol (each
//! library is probed before first use and calls into cudarc are caught); every failure is one
//! line naming what is missing and the setting to change.

use std::borrow::Cow;
use std::ops::Range;

use crate::backend::{AttnShape, Backend, DeltaNetParams, Glu, KvElem, RouterRule, Routing};
use crate::config::Rope;
use crate::error::{Error, Result};
use crate::weights::TensorRef;

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

fn unavailable(reason: String) -> Error {
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

/// A type with no values: what the backend, activations, weights and states hold until the
/// CUDA backend runs models.
#[derive(Clone, Copy, Debug)]
pub enum Never {}

/// The GPU backend (see the module doc).
#[derive(Debug)]
pub struct Cuda {
    never: Never,
}

impl Cuda {
    /// Opens GPU `ordinal` for running a model: fails with what the probe found (this build's
    /// CUDA backend runs no model yet).
    pub fn new(ordinal: usize) -> Result<Cuda> {
        let dev = probe(ordinal)?;
        Err(unavailable(format!(
            "found {} (compute capability {}.{}, {} MiB free of {} MiB), but this build's CUDA \
             backend does not run models yet; set device = \"cpu\" or \"sim\"",
            dev.name,
            dev.compute_capability.0,
            dev.compute_capability.1,
            dev.free_bytes >> 20,
            dev.total_bytes >> 20
        )))
    }
}

impl Backend for Cuda {
    type Weight = Never;
    type Vector = Never;
    type Act = Never;
    type Kv = Never;
    type Recurrent = Never;

    fn name(&self) -> &'static str {
        match self.never {}
    }
    fn upload_weight(&self, _: TensorRef) -> Result<Never> {
        match self.never {}
    }
    fn upload_vector(&self, _: Vec<f32>) -> Result<Never> {
        match self.never {}
    }
    fn act_from_host(&self, _: Vec<f32>) -> Never {
        match self.never {}
    }
    fn to_host<'a>(&self, x: &'a Never) -> Cow<'a, [f32]> {
        match *x {}
    }
    fn embed(&self, t: &Never, _: &[u32], _: usize) -> Never {
        match *t {}
    }
    fn matmul(
        &self,
        x: &Never,
        _: usize,
        _: &Never,
        _: usize,
        _: usize,
        _: Option<&Never>,
    ) -> Never {
        match *x {}
    }
    fn rms_norm(&self, x: &mut Never, _: &Never, _: usize, _: f32) {
        match *x {}
    }
    fn copy(&self, x: &Never) -> Never {
        match *x {}
    }
    fn add(&self, x: &mut Never, _: &Never) {
        match *x {}
    }
    fn take_rows(&self, x: &Never, _: usize, _: &[Range<usize>]) -> Never {
        match *x {}
    }
    fn split_halves(&self, x: &Never, _: usize) -> (Never, Never) {
        match *x {}
    }
    fn clamp(&self, x: &mut Never, _: f32) {
        match *x {}
    }
    fn rope(&self, q: &mut Never, _: &mut Never, _: usize, _: &[usize], _: &Rope) {
        match *q {}
    }
    fn mul_sigmoid(&self, x: &mut Never, _: &Never) {
        match *x {}
    }
    fn glu(&self, g: &Never, _: &mut Never, _: Glu) {
        match *g {}
    }
    fn add_gated_rows(&self, o: &mut Never, _: &Never, _: &Never, _: usize) {
        match *o {}
    }
    fn route(&self, l: Never, _: &RouterRule, _: Option<&Never>) -> Routing {
        match l {}
    }
    fn kv_new(&self, _: KvElem) -> Never {
        match self.never {}
    }
    fn kv_len(&self, kv: &Never) -> usize {
        match *kv {}
    }
    fn kv_truncate(&self, kv: &mut Never, _: usize, _: usize) {
        match *kv {}
    }
    fn kv_bytes(&self, kv: &Never) -> usize {
        match *kv {}
    }
    fn attend(
        &self,
        q: &Never,
        _: &Never,
        _: &Never,
        _: &[usize],
        _: &mut [&mut Never],
        _: &AttnShape,
    ) -> Never {
        match *q {}
    }
    fn recurrent_new(&self, _: usize, _: usize) -> Never {
        match self.never {}
    }
    fn recurrent_bytes(&self, st: &Never) -> usize {
        match *st {}
    }
    fn delta_net(
        &self,
        q: &Never,
        _: &Never,
        _: &DeltaNetParams<'_, Cuda>,
        _: &[usize],
        _: &mut [&mut Never],
    ) -> Never {
        match *q {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{select, Activations, AnyBackend, DeviceKind};

    #[test]
    fn opening_cuda_fails_with_a_clear_error_and_cpu_opens() {
        let e = Cuda::new(0).unwrap_err().to_string();
        // Here (no GPU) the probe names the first missing library; on a GPU machine it names
        // the device and says the backend runs no model yet. Either way: one line, the fix.
        assert!(e.contains("cuda backend unavailable"), "{e}");
        assert!(
            e.contains("was not found") || e.contains("does not run models yet"),
            "{e}"
        );
        assert!(e.contains("device = \"cpu\"") && !e.contains('\n'), "{e}");
        assert!(matches!(
            select(DeviceKind::Cuda, Activations::F32),
            Err(Error::BackendUnavailable { .. })
        ));
        assert!(matches!(
            select(DeviceKind::Sim, Activations::Q8),
            Ok(AnyBackend::Cpu(c)) if c.activations == Activations::Q8
        ));
        // `auto` never fails: without a usable GPU it computes on the CPU.
        assert_eq!(DeviceKind::Auto.resolve().unwrap(), DeviceKind::Cpu);
        assert!(matches!(
            select(DeviceKind::Auto, Activations::F32),
            Ok(AnyBackend::Cpu(_))
        ));
        assert!(DeviceKind::Cuda.resolve().is_err());
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
