//! The CUDA device tier: expert slots in VRAM (allocated from the backend's accounting
//! allocator, so the VRAM budget covers them), filled with an expert's bytes exactly as the host
//! buffer holds them, and experts computed there on the layer's device-resident activations
//! ([`CudaFrame`]); experts the store leaves on the host are computed there and their outputs
//! added on the device in the same ascending expert order.
//!
//! Invariants: a slot holds the expert's [`ExpertBuf`] byte for byte (each part at its offset);
//! results equal the host's (the same products in the same order; bit for bit on the mock
//! device); every copy and launch goes to the backend's one ordered stream, so a slot's copy
//! completes before any kernel reading it runs and a slot reused for another expert is
//! overwritten only after the kernels issued before on the old contents (tickets are complete
//! in stream order, which is why `wait` and `is_done` have nothing to wait for).

use std::sync::Arc;
use std::time::Instant;

use super::device::{DeviceTier, Frame};
use super::layout::GateUp;
use super::{ExpertBatch, ExpertBuf, ExpertLayout, ExpertStore, TieredStore};
use crate::backend::cuda::{DevBuf, DeviceExpert, Gpu, Vram};
use crate::backend::{Activations, Backend, Cuda};
use crate::error::{Error, Result};
use crate::weights::Dtype;

/// The CUDA device tier (see the module doc).
pub struct CudaTier {
    vram: Arc<Vram>,
    gpu: Arc<dyn Gpu>,
    /// Host-to-device bytes per second assumed before a copy has been measured.
    link_bytes_per_s: f64,
}

/// One expert's bytes in VRAM and where its parts start.
pub struct CudaSlot {
    buf: DevBuf,
    parts: Vec<(usize, usize, Dtype)>,
    layout: Option<ExpertLayout>,
}

/// Completion of work on a slot: complete in stream order (see the module doc).
pub struct CudaTicket;

impl CudaTier {
    /// The tier on `cuda`'s device and allocator, for experts of `layout`; None when the
    /// layout has a form the device FFN does not run (biases, interleaved gate/up), in which
    /// case experts are computed on the host.
    pub fn new(cuda: &Cuda, layout: &ExpertLayout, link_bytes_per_s: f64) -> Option<CudaTier> {
        let runs = !layout.bias && layout.gate_up != GateUp::FusedInterleaved;
        runs.then(|| CudaTier {
            vram: cuda.vram().clone(),
            gpu: cuda.gpu().clone(),
            link_bytes_per_s,
        })
    }
}

impl DeviceTier for CudaTier {
    type Slot = CudaSlot;
    type Ticket = CudaTicket;

    fn alloc(&self, bytes: usize) -> Result<CudaSlot> {
        Ok(CudaSlot {
            buf: self.vram.alloc(bytes)?,
            parts: Vec::new(),
            layout: None,
        })
    }

    fn copy_in(
        &self,
        src: Arc<ExpertBuf>,
        dst: &mut CudaSlot,
        _started: Instant,
    ) -> Result<CudaTicket> {
        let bytes = src.bytes();
        if bytes.len() > dst.buf.bytes() {
            return Err(Error::Internal(format!(
                "a {}-byte expert does not fit its {}-byte slot",
                bytes.len(),
                dst.buf.bytes()
            )));
        }
        if !bytes.is_empty() {
            self.gpu.htod(dst.buf.ptr(), bytes)?;
        }
        dst.parts = (0..src.num_parts()).map(|i| src.part(i)).collect();
        dst.layout = Some(*src.layout());
        Ok(CudaTicket)
    }

    fn wait(&self, _: &CudaTicket) -> Result<()> {
        Ok(())
    }

    fn is_done(&self, _: &CudaTicket) -> bool {
        true
    }

    fn ffn(
        &self,
        _slot: &CudaSlot,
        _batch: &ExpertBatch,
        _x: &[f32],
        _hidden: usize,
        _act: Activations,
        _out: &mut [f32],
    ) -> Result<CudaTicket> {
        Err(Error::Internal(
            "the CUDA tier computes on device activations (a CudaFrame), not host rows".into(),
        ))
    }

    fn estimated_copy_s(&self, bytes: usize) -> f64 {
        bytes as f64 / self.link_bytes_per_s.max(1.0)
    }
}

/// A layer's input and output on the CUDA device (see [`Frame`]).
pub struct CudaFrame<'a> {
    cuda: &'a Cuda,
    x: &'a DevBuf,
    out: DevBuf,
    hidden: usize,
    x_host: Option<Vec<f32>>,
}

impl Frame<CudaTier> for CudaFrame<'_> {
    fn x_host(&mut self) -> Result<&[f32]> {
        if self.x_host.is_none() {
            let x = self.cuda.to_host(self.x).into_owned();
            self.cuda.check()?;
            self.x_host = Some(x);
        }
        Ok(self.x_host.as_deref().unwrap_or_default())
    }

    fn add_host(&mut self, batch: &ExpertBatch, y: &[f32]) -> Result<()> {
        self.cuda
            .add_weighted_host_rows(&self.out, &batch.rows, &batch.weights, y, self.hidden);
        Ok(())
    }

    fn ffn(
        &mut self,
        _tier: &CudaTier,
        slot: &CudaSlot,
        batch: &ExpertBatch,
    ) -> Result<CudaTicket> {
        let layout = slot
            .layout
            .ok_or_else(|| Error::Internal("an expert slot used before its copy".into()))?;
        let part = |i: usize| {
            let (off, _, dtype) = slot.parts[i];
            (slot.buf.at(off), dtype)
        };
        let e = match layout.gate_up {
            GateUp::Separate => DeviceExpert {
                gate: part(0),
                up: Some(part(1)),
                down: part(2),
                inter: layout.inter,
                glu: layout.glu,
            },
            GateUp::Fused => DeviceExpert {
                gate: part(0),
                up: None,
                down: part(1),
                inter: layout.inter,
                glu: layout.glu,
            },
            GateUp::FusedInterleaved => {
                return Err(Error::Internal(
                    "an interleaved gate/up expert reached the CUDA tier".into(),
                ))
            }
        };
        self.cuda.expert_ffn_add(
            self.x,
            self.hidden,
            &batch.rows,
            &batch.weights,
            &e,
            &self.out,
        );
        Ok(CudaTicket)
    }
}

/// On CUDA the store computes with the layer's activations on the device: experts in VRAM
/// slots there, the others on the host from RAM or the mapped files, every output added on the
/// device in ascending expert order.
impl ExpertStore<Cuda> for TieredStore<CudaTier> {
    fn compute(
        &self,
        b: &Cuda,
        layer: usize,
        batches: &[ExpertBatch],
        x: &DevBuf,
        hidden: usize,
    ) -> Result<DevBuf> {
        let mut frame = CudaFrame {
            cuda: b,
            x,
            out: b.zeros(x.bytes() / 4),
            hidden,
            x_host: None,
        };
        self.compute_frame(layer, batches, &mut frame, hidden)?;
        Ok(frame.out)
    }
}
