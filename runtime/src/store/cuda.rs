//! The CUDA device tier: expert slots in VRAM (allocated from the backend's accounting
//! allocator, so the VRAM budget covers them), filled with an expert's bytes exactly as the host
//! buffer holds them, and experts computed there on the layer's device-resident activations
//! ([`CudaFrame`]: it collects the layer's experts and issues them together when the layer's
//! policy pass ends, so a decode step takes a handful of launches); experts the store leaves on
//! the host are computed there and their outputs added on the device in the same ascending
//! expert order. A slot's last use is the layer's event, set when its kernels are issued; slot
//! memory whose readers are not issued yet is not reused.
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
//!   the ring bounds the bytes in flight (`STAGING_BUFFERS` experts);
//! - experts read from their files (into the RAM pool, or for one copy) land by positioned reads
//!   in pinned host memory from the tier's [`PinnedPool`] (portable, not write-combined: the
//!   CPU also computes from it), and are copied to the device from there without staging; the
//!   copy's ticket holds the buffer until the copy completed.
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
use super::layout::{GateUp, PartRole};
use super::{ExpertBatch, ExpertBuf, ExpertLayout, ExpertStore, TieredStore};
use crate::backend::cuda::gpu::{Event, HostBuf, HostId, Stream};
use crate::backend::cuda::{DevBuf, DevPtr, DeviceExpert, ExpertWork, Gpu, Vram};
use crate::backend::{Activations, Backend, Cuda};
use crate::error::{Error, Result};
use crate::weights::Dtype;

/// Pinned staging buffers in the ring: copies of this many experts may be in flight at once
/// (two loader threads, plus one being refilled).
const STAGING_BUFFERS: usize = 3;

/// Slot memory an evicted slot left, with the last compute work that read it.
type Recycled = Arc<Mutex<Vec<(DevBuf, Option<CudaTicket>)>>>;

/// One pinned staging buffer and the copy that last read it.
struct Staging {
    buf: Option<HostBuf>,
    busy: Option<CudaTicket>,
}

/// The CUDA device tier (see the module doc).
pub struct CudaTier {
    vram: Arc<Vram>,
    gpu: Arc<dyn Gpu>,
    /// Host-to-device bytes per second assumed before a copy has been measured.
    link_bytes_per_s: f64,
    ring: (Sender<Staging>, Receiver<Staging>),
    recycled: Recycled,
    pinned: Arc<PinnedPool>,
    /// Held while one copy and the two events around it are issued, so no other copy falls
    /// between them: the events then time that transfer alone.
    issue: Mutex<()>,
}

/// One expert's bytes in VRAM and where its parts start.
pub struct CudaSlot {
    buf: Option<DevBuf>,
    parts: Vec<(usize, usize, Dtype)>,
    layout: Option<ExpertLayout>,
    /// The last compute work that read this memory (None: none since the tier has had it).
    last_use: Mutex<Option<CudaTicket>>,
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

/// Completion of a copy or of an expert's kernels: an event on the device, holding the host
/// buffer a copy reads until it completed.
pub type CudaTicket = Arc<Completion>;

/// An event, and what must outlive the work before it. An expert's kernels are issued when the
/// layer's frame finishes, so its completion's event is set then.
pub struct Completion {
    event: std::sync::OnceLock<Arc<Event>>,
    /// For a copy: an event recorded on the copy stream just before it, so the two events time
    /// the transfer alone (after whatever the stream waited for).
    started: Option<Event>,
    _reads: Option<Arc<ExpertBuf>>,
}

impl Completion {
    /// A copy's completion: `end` recorded after it, `started` just before it.
    fn copy(started: Event, end: Event, reads: Option<Arc<ExpertBuf>>) -> Arc<Completion> {
        let c = Completion {
            event: std::sync::OnceLock::new(),
            started: Some(started),
            _reads: reads,
        };
        let _ = c.event.set(Arc::new(end));
        Arc::new(c)
    }

    fn pending() -> Arc<Completion> {
        Arc::new(Completion {
            event: std::sync::OnceLock::new(),
            started: None,
            _reads: None,
        })
    }

    fn done(&self) -> bool {
        self.event.get().is_some_and(|e| e.done().unwrap_or(false))
    }

    fn sync(&self) -> Result<()> {
        match self.event.get() {
            Some(e) => e.sync(),
            None => Err(Error::Internal("waited for work never issued".into())),
        }
    }
}

/// Freed pinned buffers a pool keeps for reuse (pinning memory is slow: experts of one model
/// share a few sizes, so reads after warm-up allocate nothing).
const PINNED_KEPT_BUFFERS: usize = 8;

/// Pinned host memory for expert buffers (see the module doc): allocations of the same size
/// are reused, up to [`PINNED_KEPT_BUFFERS`] kept free.
pub struct PinnedPool {
    gpu: Arc<dyn Gpu>,
    kept: Mutex<Vec<HostBuf>>,
}

/// Words of pinned memory from a [`PinnedPool`], returned to it when dropped.
pub struct PinnedWords {
    buf: Option<HostBuf>,
    words: usize,
    pool: Arc<PinnedPool>,
}

impl PinnedPool {
    pub fn new(gpu: Arc<dyn Gpu>) -> Arc<PinnedPool> {
        Arc::new(PinnedPool {
            gpu,
            kept: Mutex::new(Vec::new()),
        })
    }

    /// `words` 8-byte words of pinned memory (contents undefined until written).
    pub fn alloc(self: &Arc<Self>, words: usize) -> Result<PinnedWords> {
        let bytes = words * 8;
        let reused = {
            let mut kept = self.kept.lock();
            kept.iter()
                .position(|b| b.bytes() == bytes)
                .map(|i| kept.swap_remove(i))
        };
        let buf = match reused {
            Some(b) => b,
            None => HostBuf::new(&self.gpu, bytes)?,
        };
        Ok(PinnedWords {
            buf: Some(buf),
            words,
            pool: self.clone(),
        })
    }
}

impl PinnedWords {
    pub fn words(&self) -> &[u64] {
        &self.buf.as_ref().expect("live").words()[..self.words]
    }
    pub fn words_mut(&mut self) -> &mut [u64] {
        let n = self.words;
        &mut self.buf.as_mut().expect("live").words_mut()[..n]
    }
    pub fn id(&self) -> crate::backend::cuda::gpu::HostId {
        self.buf.as_ref().expect("live").id()
    }
}

impl Drop for PinnedWords {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            let mut kept = self.pool.kept.lock();
            if kept.len() < PINNED_KEPT_BUFFERS {
                kept.push(b);
            }
        }
    }
}

impl CudaTier {
    /// The tier on `cuda`'s device and allocator (every expert layout runs on the device:
    /// separate, fused or interleaved gate/up, with or without biases).
    pub fn new(cuda: &Cuda, link_bytes_per_s: f64) -> CudaTier {
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
            pinned: PinnedPool::new(cuda.gpu().clone()),
            issue: Mutex::new(()),
        }
    }

    /// Issues a copy of `bytes` from pinned `src` to `dst` on the copy stream between two events;
    /// the completion keeps `reads` until it is done.
    fn timed_copy(
        &self,
        dst: DevPtr,
        src: HostId,
        bytes: usize,
        reads: Option<Arc<ExpertBuf>>,
    ) -> Result<CudaTicket> {
        let _alone = self.issue.lock();
        let started = Event::record(&self.gpu, Stream::Copy)?;
        self.gpu.copy_async(dst, src, bytes)?;
        let end = Event::record(&self.gpu, Stream::Copy)?;
        Ok(Completion::copy(started, end, reads))
    }

    /// Copies `bytes` into `dst` through a staging buffer on the copy stream; the event after it.
    fn stage_and_copy(&self, bytes: &[u8], dst: &DevBuf) -> Result<CudaTicket> {
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
            let ready = self.timed_copy(dst.ptr(), host.id(), bytes.len(), None)?;
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
            // Memory whose last readers are not issued yet (its layer is still collecting
            // experts) waits until they are: only then is there an event to order a copy after.
            r.iter()
                .position(|(b, last)| {
                    b.bytes() >= bytes && last.as_ref().is_none_or(|t| t.event.get().is_some())
                })
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
            match last.event.get() {
                Some(e) => self.gpu.wait_event(Stream::Copy, e.id())?,
                // Never issued (its layer failed first): wait for all compute so far.
                None => {
                    let issued = Event::record(&self.gpu, Stream::Compute)?;
                    self.gpu.wait_event(Stream::Copy, issued.id())?;
                }
            }
        }
        let ready = match src.pinned() {
            // Already in pinned memory: straight to the device; the ticket keeps it alive.
            Some(host) => self.timed_copy(dst.buf().ptr(), host, bytes.len(), Some(src.clone()))?,
            None => self.stage_and_copy(bytes, dst.buf())?,
        };
        dst.parts = (0..src.num_parts()).map(|i| src.part(i)).collect();
        dst.layout = Some(*src.layout());
        Ok(ready)
    }

    fn wait(&self, ticket: &CudaTicket) -> Result<()> {
        ticket.sync()
    }

    fn is_done(&self, ticket: &CudaTicket) -> bool {
        ticket.done()
    }

    fn copy_seconds(&self, ticket: &CudaTicket) -> Option<f64> {
        let (start, end) = (ticket.started.as_ref()?, ticket.event.get()?);
        let ms = self.gpu.elapsed_ms(start.id(), end.id()).ok()?;
        (ms > 0.0).then(|| f64::from(ms) / 1e3)
    }

    fn host_memory(&self) -> Option<Arc<PinnedPool>> {
        Some(self.pinned.clone())
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

/// A layer's input and output on the CUDA device (see [`Frame`]). Experts are collected in the
/// order the store hands them over and run together when the frame finishes
/// ([`CudaFrame::finish`]), so a decode step's experts take a handful of launches.
pub struct CudaFrame<'a> {
    cuda: &'a Cuda,
    x: &'a DevBuf,
    out: DevBuf,
    hidden: usize,
    x_host: Option<Vec<f32>>,
    work: Vec<Pending>,
}

/// One expert of the layer, collected.
struct Pending {
    rows: Vec<usize>,
    weights: Vec<f32>,
    /// Its matrices in VRAM and the completion its slot waits for, or its host output.
    on: Result<(DeviceExpert, CudaTicket), Vec<f32>>,
}

impl CudaFrame<'_> {
    /// Issues every collected expert (see [`Cuda::experts_add`]), then records the event each
    /// device expert's completion (its slot's last use) waits for; returns the output.
    fn finish(mut self) -> Result<DevBuf> {
        let work: Vec<ExpertWork<'_>> = self
            .work
            .iter()
            .map(|p| match &p.on {
                Ok((expert, _)) => ExpertWork::Device {
                    expert: *expert,
                    rows: &p.rows,
                    weights: &p.weights,
                },
                Err(y) => ExpertWork::Host {
                    y,
                    rows: &p.rows,
                    weights: &p.weights,
                },
            })
            .collect();
        if !work.is_empty() {
            self.cuda.experts_add(self.x, self.hidden, &work, &self.out);
        }
        let pending: Vec<&CudaTicket> = self
            .work
            .iter()
            .filter_map(|p| p.on.as_ref().ok().map(|(_, t)| t))
            .collect();
        if !pending.is_empty() {
            let gpu = self.cuda.gpu().clone();
            // One event for the whole layer, shared by its experts' completions.
            let issued = Arc::new(Event::record(&gpu, Stream::Compute)?);
            for t in pending {
                let _ = t.event.set(issued.clone());
            }
        }
        self.work.clear();
        Ok(std::mem::replace(&mut self.out, self.cuda.zeros(0)))
    }
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
        self.work.push(Pending {
            rows: batch.rows.clone(),
            weights: batch.weights.clone(),
            on: Err(y.to_vec()),
        });
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
            (slot.buf().at(off), dtype)
        };
        let bias = |role: PartRole| layout.index_of(role).map(part);
        let e = match layout.gate_up {
            GateUp::Separate => DeviceExpert {
                gate: part(0),
                up: Some(part(1)),
                down: part(2),
                inter: layout.inter,
                glu: layout.glu,
                interleaved: false,
                bias: [
                    bias(PartRole::GateBias),
                    bias(PartRole::UpBias),
                    bias(PartRole::DownBias),
                ],
            },
            GateUp::Fused | GateUp::FusedInterleaved => DeviceExpert {
                gate: part(0),
                up: None,
                down: part(1),
                inter: layout.inter,
                glu: layout.glu,
                interleaved: layout.gate_up == GateUp::FusedInterleaved,
                bias: [bias(PartRole::GateUpBias), None, bias(PartRole::DownBias)],
            },
        };
        // The slot's last use: its memory is overwritten only after the layer's kernels, whose
        // event this completion receives when the frame finishes.
        let used = Completion::pending();
        *slot.last_use.lock() = Some(used.clone());
        self.work.push(Pending {
            rows: batch.rows.clone(),
            weights: batch.weights.clone(),
            on: Ok((e, used.clone())),
        });
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
            work: Vec::new(),
        };
        let computed = self.compute_frame(layer, batches, &mut frame, hidden);
        // Issued even after a failure, so every slot's last use gets its event.
        let out = frame.finish();
        computed?;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::mock::MockGpu;
    use crate::store::{ExpertSource, ExpertWeights, TieredStore};
    use crate::weights::{Storage, TensorRef};

    fn expert(hidden: usize, inter: usize, seed: f32) -> ExpertWeights {
        let part = |name: &str, rows: usize, cols: usize| {
            let data: Vec<f32> = (0..rows * cols)
                .map(|i| ((i as f32 + seed) * 0.37).sin())
                .collect();
            let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            let mut words = vec![0u64; bytes.len().div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
            TensorRef::in_storage(
                name.into(),
                Arc::new(std::path::PathBuf::from("/models/t/experts.safetensors")),
                Dtype::F32,
                vec![rows, cols],
                Arc::new(Storage::Words {
                    words,
                    len: bytes.len(),
                }),
                0,
                bytes.len(),
            )
        };
        ExpertWeights::new(
            ExpertLayout::swiglu(hidden, inter),
            vec![
                part("gate", inter, hidden),
                part("up", inter, hidden),
                part("down", hidden, inter),
            ],
        )
    }

    #[test]
    fn copies_from_the_heap_and_from_pinned_memory_land_byte_for_byte() {
        let mock = Arc::new(MockGpu::new());
        let cuda = Cuda::on(mock.clone(), u64::MAX);
        let tier = CudaTier::new(&cuda, 25e9);
        let pool = tier.host_memory().unwrap();
        // More copies in flight than staging buffers: the ring must wait for a buffer's last
        // copy before refilling it (the mock fails the write otherwise).
        let mut copies = Vec::new();
        for i in 0..(2 * STAGING_BUFFERS + 1) {
            let e = expert(8, 4, i as f32);
            let src = if i % 3 == 2 {
                e.read_owned_in(Some(&pool)).unwrap()
            } else {
                e.read_owned().unwrap()
            };
            assert_eq!(src.pinned().is_some(), i % 3 == 2);
            let src = Arc::new(src);
            let mut slot = tier.alloc(src.size_bytes()).unwrap();
            let ticket = tier
                .copy_in(src.clone(), &mut slot, Instant::now())
                .unwrap();
            copies.push((src, slot, ticket));
        }
        for (i, (src, slot, ticket)) in copies.iter().enumerate() {
            tier.wait(ticket).unwrap();
            let mut back = vec![0u8; src.size_bytes()];
            mock.dtoh(slot.buf().ptr(), &mut back).unwrap();
            assert_eq!(back, src.bytes(), "copy {i}");
        }
    }

    #[test]
    fn a_store_on_the_cuda_tier_computes_what_the_host_computes() {
        let (hidden, inter) = (8, 4);
        let experts = vec![(0..4).map(|e| expert(hidden, inter, e as f32)).collect()];
        let cuda = Cuda::mock(u64::MAX);
        let tier = Some(CudaTier::new(&cuda, 25e9));
        let config = |device| crate::store::TieredStoreConfig {
            device,
            ..Default::default()
        };
        let dev = crate::store::DeviceTierConfig {
            slots_per_layer: 2,
            link_bytes_per_s: 25e9,
            copy_latency: std::time::Duration::ZERO,
            host_compute_bytes_per_s: 1.0,
        };
        let on_gpu = TieredStore::with_tier(
            experts.clone(),
            hidden,
            inter,
            config(Some(dev)),
            None,
            tier,
        )
        .unwrap();
        let host = TieredStore::new(experts, hidden, inter, config(None)).unwrap();
        let x: Vec<f32> = (0..3 * hidden).map(|i| (i as f32 * 0.11).cos()).collect();
        let batches = vec![
            ExpertBatch {
                expert: 0,
                rows: vec![0, 2],
                weights: vec![0.25, 0.5],
            },
            ExpertBatch {
                expert: 3,
                rows: vec![1],
                weights: vec![0.75],
            },
        ];
        for _ in 0..3 {
            let xd = cuda.act_from_host(x.clone());
            let yd = on_gpu.compute(&cuda, 0, &batches, &xd, hidden).unwrap();
            let mut want = vec![0f32; x.len()];
            host.compute_host(0, &batches, &x, hidden, &mut want)
                .unwrap();
            assert_eq!(cuda.to_host(&yd).into_owned(), want);
        }
        assert!(on_gpu.stats().hits > 0, "the second pass hits the slots");
        // The copy speed is the device's event timing of the transfers (the mock's modelled
        // link), not the host's clock around reading and copying (far slower for such tiny
        // experts).
        let link = crate::backend::cuda::mock::MOCK_LINK_BYTES_PER_S;
        // (`run --json` reports the same figure: the store's stats.)
        let rate = on_gpu.stats().copy_bytes_per_s.expect("copies were timed");
        assert!((rate / link - 1.0).abs() < 1e-3, "{rate} vs {link}");
    }
}
