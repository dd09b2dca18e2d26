//! The CUDA backend's place in builds without one: the same API as a real backend, and a
//! constructor that always fails with a clear error. No value of [`Cuda`] can exist, so every op
//! is unreachable by construction (an empty match), and call sites need no `cfg`.
//!
//! Invariants: [`Cuda::new`] never succeeds here; the error names the setting to change.

use std::borrow::Cow;
use std::ops::Range;

use crate::backend::{AttnShape, Backend, DeltaNetParams, Glu, KvElem, RouterRule, Routing};
use crate::config::Rope;
use crate::error::{Error, Result};
use crate::weights::TensorRef;

/// A type with no values: what the stub's backend, activations, weights and states hold.
#[derive(Clone, Copy, Debug)]
pub enum Never {}

/// The GPU backend (a stub: see the module doc).
#[derive(Debug)]
pub struct Cuda {
    never: Never,
}

impl Cuda {
    /// Opens GPU `ordinal`: always an error in this build.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        Err(Error::BackendUnavailable {
            backend: "cuda".into(),
            reason: format!(
                "no CUDA backend in this build (GPU {ordinal} cannot be opened); set \
                 device = \"cpu\", or device = \"sim\" to simulate a GPU's memory and link"
            ),
        })
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
        assert!(
            e.contains("no CUDA backend") && e.contains("device = \"cpu\""),
            "{e}"
        );
        assert!(matches!(
            select(DeviceKind::Cuda, Activations::F32),
            Err(Error::BackendUnavailable { .. })
        ));
        assert!(matches!(
            select(DeviceKind::Sim, Activations::Q8),
            Ok(AnyBackend::Cpu(c)) if c.activations == Activations::Q8
        ));
    }
}
