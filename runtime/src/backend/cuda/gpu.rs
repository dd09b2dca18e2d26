//! The device interface the CUDA backend drives ([`Gpu`]: device memory, copies, kernel launches
//! by name with their argument lists, a compute and a copy stream with events between them,
//! pinned host buffers, the prefill GEMM) and the one accounting allocator every device buffer
//! comes from ([`Vram`], [`DevBuf`]).
//!
//! Two implementations stand behind [`Gpu`]: the CUDA driver (`driver.rs`) and the mock device
//! (`mock.rs`: host memory, each launch running the CPU twin of the named kernel, the streams'
//! ordering rules checked), so every host-side part of the CUDA path (allocation, offsets,
//! argument lists, copies, events) runs on machines without a GPU.
//!
//! Invariants: every device allocation of the backend goes through [`Vram::alloc`], whose
//! `cap_bytes` is a hard limit (buffers kept for reuse count against it and are released first
//! when an allocation would pass it); a [`DevBuf`] returns its bytes when dropped, and a kept
//! buffer the copy stream is to write waits for the compute work issued before it (expert
//! slots, `store::CudaTier`, then keep their memory with its last-use event); work on one stream executes in the order it is issued, and only
//! events order the two streams; a launch names a registered kernel and passes exactly the
//! parameters its source declares, in order.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::size::ByteSize;

/// A device address.
pub type DevPtr = u64;

/// One kernel parameter, as the kernel's source declares it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KArg {
    /// A device address (any pointer parameter).
    Ptr(DevPtr),
    /// `unsigned`.
    U32(u32),
    /// `unsigned long long` (not a pointer).
    U64(u64),
    /// `float`.
    F32(f32),
}

/// The two streams work is ordered on: kernels and the ops' small copies on `Compute`; expert
/// copies into device slots on `Copy`, beside compute. Work on one stream runs in issue order;
/// across streams only events order it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Compute,
    Copy,
}

/// A pinned host buffer the copy stream reads from (see [`Gpu::host_alloc`]): its address in
/// this process, 8-byte aligned.
pub type HostId = u64;

/// An event recorded on a stream (see [`Gpu::record`]).
pub type EventId = u64;

/// A grid: blocks along x, y and z (every kernel runs blocks of
/// [`moe_kernels::cuda::BLOCK_THREADS`] threads).
pub type Grid = [u32; 3];

/// Device memory, copies and launches on one ordered stream.
pub trait Gpu: Send + Sync {
    /// What the device is, for logs and reports.
    fn describe(&self) -> String;
    /// `bytes` (> 0) of device memory, 256-byte aligned.
    fn alloc(&self, bytes: usize) -> Result<DevPtr>;
    /// Returns an allocation made by [`Gpu::alloc`] (after the work issued so far that uses it).
    fn free(&self, ptr: DevPtr);
    /// Host to device on the compute stream (ordered before everything issued after it);
    /// `src` may be reused as soon as it returns.
    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()>;
    /// Device to host, after every operation issued before it.
    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<()>;
    /// Device to device, ordered with the launches.
    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()>;
    /// Sets `bytes` at `dst` to zero, ordered with the launches.
    fn zero(&self, dst: DevPtr, bytes: usize) -> Result<()>;
    /// Launches `kernel` (an entry point of `moe_kernels::cuda::SOURCES`) on `grid` with `args`.
    fn launch(&self, kernel: &'static str, grid: Grid, args: &[KArg]) -> Result<()>;
    /// Waits for everything issued so far.
    fn synchronize(&self) -> Result<()>;

    /// `out[m, n] = x[m, k] · w[n, k]ᵀ` in f32 on the compute stream, for a weight stored as
    /// `dtype` (the prefill product): f32 weights directly, other types widened to f32 into
    /// `scratch` (`scratch_bytes`, at least one row) a tile of rows at a time.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        x: DevPtr,
        w: DevPtr,
        dtype: crate::weights::Dtype,
        out: DevPtr,
        m: usize,
        n: usize,
        k: usize,
        scratch: DevPtr,
        scratch_bytes: usize,
    ) -> Result<()>;

    /// A pinned (page-locked, portable) host buffer of `bytes` for asynchronous copies.
    fn host_alloc(&self, bytes: usize) -> Result<HostId>;
    /// Releases a buffer of [`Gpu::host_alloc`] (after the copies issued from it).
    fn host_free(&self, id: HostId);
    /// Writes `src` at the start of host buffer `id` (which must not be read by a copy still
    /// in flight).
    fn host_write(&self, id: HostId, src: &[u8]) -> Result<()>;
    /// Copies the first `bytes` of host buffer `src` to `dst` on the copy stream.
    fn copy_async(&self, dst: DevPtr, src: HostId, bytes: usize) -> Result<()>;
    /// An event after the work issued to `stream` so far.
    fn record(&self, stream: Stream) -> Result<EventId>;
    /// Makes `stream` wait, on the device, until `event` has completed.
    fn wait_event(&self, stream: Stream, event: EventId) -> Result<()>;
    /// Whether `event` has completed (without blocking).
    fn event_done(&self, event: EventId) -> Result<bool>;
    /// Blocks until `event` has completed.
    fn event_sync(&self, event: EventId) -> Result<()>;
    /// Milliseconds between two completed events.
    fn elapsed_ms(&self, start: EventId, end: EventId) -> Result<f32>;
    /// Releases an event.
    fn event_free(&self, event: EventId);
}

/// An event that is released when dropped.
pub struct Event {
    id: EventId,
    gpu: Arc<dyn Gpu>,
}

impl Event {
    /// An event after the work issued to `stream` so far.
    pub fn record(gpu: &Arc<dyn Gpu>, stream: Stream) -> Result<Event> {
        Ok(Event {
            id: gpu.record(stream)?,
            gpu: gpu.clone(),
        })
    }
    pub fn id(&self) -> EventId {
        self.id
    }
    pub fn done(&self) -> Result<bool> {
        self.gpu.event_done(self.id)
    }
    pub fn sync(&self) -> Result<()> {
        self.gpu.event_sync(self.id)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        self.gpu.event_free(self.id);
    }
}

/// A pinned host buffer, released when dropped.
pub struct HostBuf {
    id: HostId,
    bytes: usize,
    gpu: Arc<dyn Gpu>,
}

impl HostBuf {
    pub fn new(gpu: &Arc<dyn Gpu>, bytes: usize) -> Result<HostBuf> {
        Ok(HostBuf {
            id: gpu.host_alloc(bytes)?,
            bytes,
            gpu: gpu.clone(),
        })
    }
    pub fn id(&self) -> HostId {
        self.id
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The buffer as words, to fill in place (positioned reads straight into pinned memory).
    /// The caller must not write while a copy from it is in flight.
    pub fn words_mut(&mut self) -> &mut [u64] {
        // SAFETY: `id` is the address of a live allocation of at least `bytes` bytes, 8-byte
        // aligned (the `HostId` contract), owned by this value alone while it lives.
        unsafe { std::slice::from_raw_parts_mut(self.id as *mut u64, self.bytes / 8) }
    }

    /// The buffer as words.
    pub fn words(&self) -> &[u64] {
        // SAFETY: as above, shared.
        unsafe { std::slice::from_raw_parts(self.id as *const u64, self.bytes / 8) }
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        self.gpu.host_free(self.id);
    }
}

/// Allocation granule: requests are rounded up to it (the driver's alignment), so buffers of
/// nearly equal size share a reuse list.
const GRANULE_BYTES: usize = 256;

/// The accounting allocator: every device buffer of the backend, within `cap_bytes`.
pub struct Vram {
    gpu: Arc<dyn Gpu>,
    cap_bytes: u64,
    state: Mutex<VramState>,
}

#[derive(Default)]
struct VramState {
    /// Bytes allocated from the device: live buffers plus those kept for reuse.
    held_bytes: u64,
    /// Bytes in live buffers.
    live_bytes: u64,
    peak_live_bytes: u64,
    /// Freed buffers kept for reuse, by rounded size (decode allocates the same sizes every
    /// step, and a device allocation synchronizes the device).
    kept: HashMap<usize, Vec<DevPtr>>,
}

/// What the allocator holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VramUsage {
    pub cap_bytes: u64,
    pub held_bytes: u64,
    pub live_bytes: u64,
    pub peak_live_bytes: u64,
}

impl Vram {
    /// An allocator of at most `cap_bytes` on `gpu`.
    pub fn new(gpu: Arc<dyn Gpu>, cap_bytes: u64) -> Arc<Vram> {
        Arc::new(Vram {
            gpu,
            cap_bytes,
            state: Mutex::new(VramState::default()),
        })
    }

    pub fn gpu(&self) -> &Arc<dyn Gpu> {
        &self.gpu
    }

    pub fn usage(&self) -> VramUsage {
        let s = self.state.lock();
        VramUsage {
            cap_bytes: self.cap_bytes,
            held_bytes: s.held_bytes,
            live_bytes: s.live_bytes,
            peak_live_bytes: s.peak_live_bytes,
        }
    }

    /// A buffer of `bytes` (contents undefined), refused with the numbers when it would pass
    /// the cap even after releasing every kept buffer.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DevBuf> {
        if bytes == 0 {
            return Ok(DevBuf {
                ptr: 0,
                bytes: 0,
                vram: self.clone(),
            });
        }
        let size = bytes.next_multiple_of(GRANULE_BYTES);
        let mut s = self.state.lock();
        let ptr = match s.kept.get_mut(&size).and_then(Vec::pop) {
            Some(p) => p,
            None => {
                if s.held_bytes + size as u64 > self.cap_bytes {
                    // Release every kept buffer before refusing.
                    for (sz, ptrs) in std::mem::take(&mut s.kept) {
                        for p in ptrs {
                            self.gpu.free(p);
                            s.held_bytes -= sz as u64;
                        }
                    }
                }
                if s.held_bytes + size as u64 > self.cap_bytes {
                    return Err(Error::Device {
                        reason: format!(
                            "a {} buffer does not fit the VRAM budget {} ({} in use); raise \
                             vram_budget or lower max_context / max_batch / slots_per_layer",
                            ByteSize(size as u64),
                            ByteSize(self.cap_bytes),
                            ByteSize(s.live_bytes)
                        ),
                        fatal: false,
                    });
                }
                let p = self.gpu.alloc(size)?;
                s.held_bytes += size as u64;
                p
            }
        };
        s.live_bytes += size as u64;
        s.peak_live_bytes = s.peak_live_bytes.max(s.live_bytes);
        Ok(DevBuf {
            ptr,
            bytes,
            vram: self.clone(),
        })
    }

    fn release(&self, ptr: DevPtr, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let size = bytes.next_multiple_of(GRANULE_BYTES);
        let mut s = self.state.lock();
        s.live_bytes -= size as u64;
        s.kept.entry(size).or_default().push(ptr);
    }
}

impl Drop for Vram {
    fn drop(&mut self) {
        for (_, ptrs) in self.state.get_mut().kept.drain() {
            for p in ptrs {
                self.gpu.free(p);
            }
        }
    }
}

/// A device buffer from [`Vram`], returned to it when dropped.
pub struct DevBuf {
    ptr: DevPtr,
    bytes: usize,
    vram: Arc<Vram>,
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl DevBuf {
    pub fn ptr(&self) -> DevPtr {
        self.ptr
    }
    /// The address `offset_bytes` into the buffer.
    pub fn at(&self, offset_bytes: usize) -> DevPtr {
        debug_assert!(offset_bytes <= self.bytes);
        self.ptr + offset_bytes as u64
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn arg(&self) -> KArg {
        KArg::Ptr(self.ptr)
    }
    pub fn vram(&self) -> &Arc<Vram> {
        &self.vram
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        self.vram.release(self.ptr, self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::mock::MockGpu;

    #[test]
    fn the_cap_holds_and_freed_buffers_are_reused_then_released_under_pressure() {
        let gpu = Arc::new(MockGpu::new());
        let vram = Vram::new(gpu.clone(), 4096);
        let a = vram.alloc(1000).unwrap();
        let a_ptr = a.ptr();
        assert_eq!(a.bytes(), 1000);
        assert_eq!(vram.usage().live_bytes, 1024);
        drop(a);
        // Same rounded size: the kept buffer comes back, no new device allocation.
        let b = vram.alloc(1020).unwrap();
        assert_eq!(b.ptr(), a_ptr);
        assert_eq!(gpu.allocations(), 1);
        let c = vram.alloc(3000).unwrap();
        // 1024 + 3072 = 4096: full. One more byte is refused with the numbers.
        let e = vram.alloc(1).unwrap_err().to_string();
        assert!(
            e.contains("VRAM budget 4.00 KiB") && e.contains("vram_budget"),
            "{e}"
        );
        drop(c);
        // The kept 3072-byte buffer is released to make room for a different size.
        let d = vram.alloc(2048).unwrap();
        assert_eq!(vram.usage().held_bytes, 1024 + 2048);
        assert_eq!(
            gpu.allocations(),
            2,
            "one live besides b: the 3072 one was freed"
        );
        drop((b, d));
        assert_eq!(vram.usage().live_bytes, 0);
        assert_eq!(vram.usage().peak_live_bytes, 4096);
    }
}
