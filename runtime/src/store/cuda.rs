//! The CUDA device tier: expert slots in VRAM (allocated from the backend's accounting
//! allocator, so the VRAM budget covers them), filled with an expert's bytes exactly as the host
//! buffer holds them, and experts computed there on the layer's device-resident activations
//! ([`CudaFrame`]); experts the store leaves on the host are computed there and their outputs
//! added on the device in the same ascending expert order.
//!
//! The copy engine: an expert's bytes go from the host buffer into one of a ring of pinned
//! staging buffers, then by an asynchronous copy on the copy stream into the slot, beside the
//! compute stream. Ordering is by events only, the host never waits for compute:
//! - a slot's `ready` event (recorded on the copy stream after its copy) is the copy's ticket;
//!   the store publishes the slot once it completed, so every kernel reading the slot is issued
//!   after the copy;
//! - a slot's `last use` event (recorded on the compute stream after the kernels reading it) is
//!   kept with its memory when the slot is evicted; the next copy into that memory waits for it
//!   on the copy stream, so no copy overwrites an expert a queued kernel still reads; memory new
//!   from the allocator waits for the compute work issued before;
//! - a staging buffer is rewritten only after the event of the copy that read it completed, and
//!   the ring bounds the bytes in flight (`STAGING_BUFFERS` experts).
//!
//! Invariants: a slot holds the expert's [`ExpertBuf`] byte for byte (each part at its offset);
//! results equal the host's (the same products in the same order; bit for bit on the mock
//! device, which also checks the ordering rules above on every operation); slot memory is never
//! returned to the general allocator while the tier lives (its last-use event stays with it).

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::device::{DeviceTier, Frame};
use super::layout::GateUp;
use super::{ExpertBatch, ExpertBuf, ExpertLayout, ExpertStore, TieredStore};
use crate::backend::cuda::gpu::{Event, HostBuf, Stream};
use crate::backend::cuda::{DevBuf, DeviceExpert, Gpu, Vram};
use crate::backend::{Activations, Backend, Cuda};
use crate::error::{Error, Result};
use crate::weights::Dtype;

/// Pinned staging buffers in the ring: copies of this many experts may be in flight at once
/// (two loader threads, plus one being refilled).
const STAGING_BUFFERS: usize = 3;

/// Slot memory an evicted slot left, with the last compute work that read it.
type Recycled = Arc<Mutex<Vec<(DevBuf, Option<Arc<Event>>)>>>;

/// One pinned staging buffer and the copy that last read it.
struct Staging {
    buf: Option<HostBuf>,
    busy: Option<Arc<Event>>,
}

/// The CUDA device tier (see the module doc).
pub struct CudaTier {
    vram: Arc<Vram>,
    gpu: Arc<dyn Gpu>,
    /// Host-to-device bytes per second assumed before a copy has been measured.
    link_bytes_per_s: f64,
    ring: (Sender<Staging>, Receiver<Staging>),
    recycled: Recycled,
}

/// One expert's bytes in VRAM and where its parts start.
pub struct CudaSlot {
    buf: Option<DevBuf>,
    parts: Vec<(usize, usize, Dtype)>,
    layout: Option<ExpertLayout>,
    /// The last compute work that read this memory (None: none since the tier has had it).
    last_use: Mutex<Option<Arc<Event>>>,
    /// New from the allocator: the compute stream may have used it for something else.
    fresh: bool,
    recycled: Recycled,
}

impl CudaSlot {
    fn buf(&self) -> &DevBuf {
        self.buf.as_ref().expect("a live slot holds its memory")
    }
}

impl Drop for CudaSlot {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let last = self.last_use.get_mut().take();
            self.recycled.lock().push((buf, last));
        }
    }
}

/// Completion of a copy or of an expert's kernels: an event on the device.
pub type CudaTicket = Arc<Event>;

impl CudaTier {
    /// The tier on `cuda`'s device and allocator, for experts of `layout`; None when the
    /// layout has a form the device FFN does not run (biases, interleaved gate/up), in which
    /// case experts are computed on the host.
    pub fn new(cuda: &Cuda, layout: &ExpertLayout, link_bytes_per_s: f64) -> Option<CudaTier> {
        let runs = !layout.bias && layout.gate_up != GateUp::FusedInterleaved;
        runs.then(|| {
            let ring = crossbeam_channel::bounded(STAGING_BUFFERS);
            for _ in 0..STAGING_BUFFERS {
                let _ = ring.0.send(Staging {
                    buf: None,
                    busy: None,
                });
            }
            CudaTier {
                vram: cuda.vram().clone(),
                gpu: cuda.gpu().clone(),
                link_bytes_per_s,
                ring,
                recycled: Arc::new(Mutex::new(Vec::new())),
            }
        })
    }

    /// Copies `bytes` into `dst` through a staging buffer on the copy stream; the event after it.
    fn stage_and_copy(&self, bytes: &[u8], dst: &DevBuf) -> Result<Arc<Event>> {
        let mut st = self
            .ring
            .1
            .recv()
            .map_err(|_| Error::Internal("the staging ring is closed".into()))?;
        let done = (|| {
            if let Some(busy) = st.busy.take() {
                busy.sync()?;
            }
            if st.buf.as_ref().is_none_or(|b| b.bytes() < bytes.len()) {
                st.buf = None;
                st.buf = Some(HostBuf::new(&self.gpu, bytes.len())?);
            }
            let host = st.buf.as_ref().expect("allocated above");
            self.gpu.host_write(host.id(), bytes)?;
            self.gpu.copy_async(dst.ptr(), host.id(), bytes.len())?;
            let ready = Arc::new(Event::record(&self.gpu, Stream::Copy)?);
            st.busy = Some(ready.clone());
            Ok(ready)
        })();
        let _ = self.ring.0.send(st);
        done
    }
}

impl DeviceTier for CudaTier {
    type Slot = CudaSlot;
    type Ticket = CudaTicket;

    fn alloc(&self, bytes: usize) -> Result<CudaSlot> {
        let reused = {
            let mut r = self.recycled.lock();
            r.iter()
                .position(|(b, _)| b.bytes() >= bytes)
                .map(|i| r.swap_remove(i))
        };
        let (buf, last, fresh) = match reused {
            Some((buf, last)) => (buf, last, false),
            None => (self.vram.alloc(bytes)?, None, true),
        };
        Ok(CudaSlot {
            buf: Some(buf),
            parts: Vec::new(),
            layout: None,
            last_use: Mutex::new(last),
            fresh,
            recycled: self.recycled.clone(),
        })
    }

    fn copy_in(
        &self,
        src: Arc<ExpertBuf>,
        dst: &mut CudaSlot,
        _started: Instant,
    ) -> Result<CudaTicket> {
        let bytes = src.bytes();
        if bytes.len() > dst.buf().bytes() {
            return Err(Error::Internal(format!(
                "a {}-byte expert does not fit its {}-byte slot",
                bytes.len(),
                dst.buf().bytes()
            )));
        }
        // The copy stream waits for the compute work that last read this memory.
        if dst.fresh {
            let issued = Event::record(&self.gpu, Stream::Compute)?;
            self.gpu.wait_event(Stream::Copy, issued.id())?;
            dst.fresh = false;
        } else if let Some(last) = dst.last_use.get_mut().take() {
            self.gpu.wait_event(Stream::Copy, last.id())?;
        }
        let ready = self.stage_and_copy(bytes, dst.buf())?;
        dst.parts = (0..src.num_parts()).map(|i| src.part(i)).collect();
        dst.layout = Some(*src.layout());
        Ok(ready)
    }

    fn wait(&self, ticket: &CudaTicket) -> Result<()> {
        ticket.sync()
    }

    fn is_done(&self, ticket: &CudaTicket) -> bool {
        ticket.done().unwrap_or(false)
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

    fn ffn(&mut self, tier: &CudaTier, slot: &CudaSlot, batch: &ExpertBatch) -> Result<CudaTicket> {
        let layout = slot
            .layout
            .ok_or_else(|| Error::Internal("an expert slot used before its copy".into()))?;
        let part = |i: usize| {
            let (off, _, dtype) = slot.parts[i];
            (slot.buf().at(off), dtype)
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
        // The slot's last use: its memory is overwritten only after these kernels.
        let used = Arc::new(Event::record(&tier.gpu, Stream::Compute)?);
        *slot.last_use.lock() = Some(used.clone());
        Ok(used)
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
