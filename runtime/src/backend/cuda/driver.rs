//! The [`Gpu`] of a real device, through the CUDA driver API (cudarc's `result` layer, loaded at
//! run time). Kernels are compiled by NVRTC for the device's compute capability at their first
//! launch, one source at a time, and the CUBIN is kept in the compiled-kernel cache.
//!
//! Invariants: compute work (launches, memsets, the ops' synchronous copies) runs on the
//! context's legacy default stream, so it executes in the order it is issued and a
//! device-to-host copy returns after everything before it; expert copies run on one
//! non-blocking copy stream from pinned host buffers, ordered against compute by events only; the context is made current on the calling thread before every call
//! (the backend is used from the compute pool's threads); a launch's argument list is checked
//! against the kernel's declared parameters before it reaches the driver; driver failures
//! become [`Error::Device`] (fatal, except a failed allocation).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::Path;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext};
use parking_lot::Mutex;

use super::cubin::CubinCache;
use super::gpu::{DevPtr, EventId, Gpu, Grid, HostId, KArg, Stream};
use super::probe::CudaDevice;
use super::signature::{self, Param};
use crate::error::{Error, Result};

/// A loaded kernel: its function handle and parameter list.
#[derive(Clone)]
struct Kernel {
    func: sys::CUfunction,
    params: Vec<Param>,
}

/// Loaded modules and kernels.
#[derive(Default)]
struct Loaded {
    modules: HashMap<&'static str, sys::CUmodule>,
    kernels: HashMap<&'static str, Kernel>,
}

// SAFETY: CUmodule and CUfunction are driver handles, valid on any thread while their context
// is current (every use below makes it current first); they are only read after insertion.
unsafe impl Send for Loaded {}

/// A CUDA device driven through the driver API (see the module doc).
pub struct DriverGpu {
    ctx: Arc<CudaContext>,
    cc: u32,
    name: String,
    cache: CubinCache,
    loaded: Mutex<Loaded>,
    /// The copy stream (non-blocking: it does not wait for the legacy stream).
    copy: CopyStream,
    /// Pinned host buffers by address, with their sizes.
    host: Mutex<HashMap<u64, usize>>,
    /// The cuBLAS handle, created at the first GEMM.
    blas: Mutex<Option<Blas>>,
    /// Pinned memory the ops' small uploads are staged in (created at the first one).
    uploads: Mutex<Option<UploadRing>>,
}

/// Bytes of the small-upload ring: thousands of uploads (positions, row indices, routing
/// weights) between two waits.
const UPLOAD_RING_BYTES: usize = 4 << 20;
/// Largest upload staged in the ring; larger ones (weights at load) are plain synchronous
/// copies.
const UPLOAD_MAX_BYTES: usize = 64 << 10;

/// A pinned ring the ops' small host-to-device copies are staged in, so they run
/// asynchronously on the legacy stream instead of making the host wait for the device at every
/// one: a region is written once per pass of the ring, and before the ring wraps the host waits
/// once for the stream (every copy out of the ring has then completed).
struct UploadRing {
    base: *mut u8,
    head: usize,
}

// SAFETY: the ring's pinned memory is only touched under the mutex that holds it.
unsafe impl Send for UploadRing {}

/// A cuBLAS handle on the legacy stream.
struct Blas(cudarc::cublas::sys::cublasHandle_t);

// SAFETY: the handle is used under the mutex that holds it, with the context current.
unsafe impl Send for Blas {}

/// The copy stream's handle.
struct CopyStream(sys::CUstream);

// SAFETY: a stream handle is usable from any thread while its context is current (every use
// below binds the context first).
unsafe impl Send for CopyStream {}
// SAFETY: as above; the handle is only read.
unsafe impl Sync for CopyStream {}

fn fail(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device {
        reason: format!("{what} failed: {e:?}"),
        fatal: true,
    }
}

impl DriverGpu {
    /// Opens the probed device, with kernels compiled into `cache_dir/cuda/`.
    pub fn open(dev: &CudaDevice, cache_dir: &Path) -> Result<DriverGpu> {
        let nvrtc = moe_kernels::nvrtc::probe().map_err(|e| Error::BackendUnavailable {
            backend: "cuda".into(),
            reason: format!("{e}; set device = \"cpu\""),
        })?;
        let ctx = CudaContext::new(dev.ordinal).map_err(|e| fail("opening the CUDA context", e))?;
        let (major, minor) = dev.compute_capability;
        ctx.bind_to_thread()
            .map_err(|e| fail("making the CUDA context current", e))?;
        let copy = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| fail("creating the copy stream", e))?;
        Ok(DriverGpu {
            ctx,
            cc: (major * 10 + minor) as u32,
            name: dev.name.clone(),
            cache: CubinCache::new(cache_dir, nvrtc),
            loaded: Mutex::new(Loaded::default()),
            copy: CopyStream(copy),
            host: Mutex::new(HashMap::new()),
            blas: Mutex::new(None),
            uploads: Mutex::new(None),
        })
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| fail("making the CUDA context current", e))
    }

    /// The kernel `name`, its source compiled (or loaded from the cache) on first use.
    fn kernel(&self, name: &'static str) -> Result<Kernel> {
        let mut loaded = self.loaded.lock();
        if let Some(k) = loaded.kernels.get(name) {
            return Ok(k.clone());
        }
        let src = moe_kernels::cuda::source_of(name)
            .ok_or_else(|| Error::Internal(format!("no CUDA kernel named `{name}`")))?;
        let module = match loaded.modules.get(src.file) {
            Some(&m) => m,
            None => {
                let cubin = self
                    .cache
                    .get(src, self.cc, &moe_kernels::nvrtc::compile_cubin)?;
                // SAFETY: `bytes` is a CUBIN image NVRTC produced for this device's
                // architecture (or the checksummed copy of one); the driver copies the image.
                let m = unsafe { result::module::load_data(cubin.bytes.as_ptr() as *const c_void) }
                    .map_err(|e| fail(&format!("loading kernels/cuda/{}", src.file), e))?;
                loaded.modules.insert(src.file, m);
                m
            }
        };
        let cname = CString::new(name).expect("kernel names have no NUL");
        // SAFETY: `module` was loaded above in this context and is never unloaded while the
        // device is open.
        let func = unsafe { result::module::get_function(module, cname) }
            .map_err(|e| fail(&format!("finding kernel {name}"), e))?;
        let params = signature::of(name)
            .ok_or_else(|| Error::Internal(format!("kernel {name}: parameters not understood")))?;
        let k = Kernel { func, params };
        loaded.kernels.insert(name, k.clone());
        Ok(k)
    }
}

impl DriverGpu {
    /// A small upload through the pinned ring (see [`UploadRing`]), ordered on the legacy
    /// stream like every compute operation.
    fn htod_staged(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        let mut guard = self.uploads.lock();
        if guard.is_none() {
            // SAFETY: the context is current; the ring lives as long as the device (freed in
            // Drop).
            let base = unsafe { result::malloc_host(UPLOAD_RING_BYTES, 0) }
                .map_err(|e| fail("allocating the pinned upload ring", e))?;
            *guard = Some(UploadRing {
                base: base as *mut u8,
                head: 0,
            });
        }
        let ring = guard.as_mut().expect("created above");
        if ring.head + src.len() > UPLOAD_RING_BYTES {
            // Every copy out of the ring has completed once the stream has caught up.
            // SAFETY: the null stream is the context's legacy stream.
            unsafe { result::stream::synchronize(std::ptr::null_mut()) }
                .map_err(|e| fail("waiting for the device", e))?;
            ring.head = 0;
        }
        // SAFETY: [head, head + len) lies in the ring (checked above) and no copy issued since
        // the last wait reads it; `src` is a separate Rust slice.
        let staged = unsafe {
            let at = ring.base.add(ring.head);
            std::ptr::copy_nonoverlapping(src.as_ptr(), at, src.len());
            std::slice::from_raw_parts(at as *const u8, src.len())
        };
        // 16-byte steps keep every staged upload aligned for any element type.
        ring.head += src.len().next_multiple_of(16);
        // SAFETY: `staged` is pinned memory left untouched until the stream passes this copy
        // (above); `dst` holds at least `src.len()` bytes of a live allocation.
        unsafe { result::memcpy_htod_async(dst, staged, std::ptr::null_mut()) }
            .map_err(|e| fail("host-to-device copy", e))
    }
}

impl Drop for DriverGpu {
    fn drop(&mut self) {
        if let Some(ring) = self.uploads.get_mut().take() {
            if self.bind().is_ok() {
                // SAFETY: the ring came from malloc_host and is freed once; waiting for the
                // device first means no copy still reads it.
                unsafe {
                    let _ = result::stream::synchronize(std::ptr::null_mut());
                    let _ = result::free_host(ring.base as *mut c_void);
                }
            }
        }
        if let Some(blas) = self.blas.get_mut().take() {
            // SAFETY: the handle was created by this device and is destroyed once.
            let _ = unsafe { cudarc::cublas::result::destroy_handle(blas.0) };
        }
        if self.bind().is_ok() {
            // SAFETY: the copy stream was created by `open` and is destroyed once; the driver
            // lets queued work finish first.
            let _ = unsafe { result::stream::destroy(self.copy.0) };
        }
    }
}

impl Gpu for DriverGpu {
    fn describe(&self) -> String {
        format!("{} (sm_{})", self.name, self.cc)
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        self.bind()?;
        // SAFETY: the context is current; the allocation is freed once, by `free`.
        unsafe { result::malloc_sync(bytes) }.map_err(|e| Error::Device {
            reason: format!("allocating {bytes} bytes of device memory failed: {e:?}"),
            fatal: false,
        })
    }

    fn free(&self, ptr: DevPtr) {
        if self.bind().is_ok() {
            // SAFETY: `ptr` came from `alloc` and is freed once (the allocator's contract);
            // cuMemFree waits for work using it on the legacy stream.
            if let Err(e) = unsafe { result::free_sync(ptr) } {
                tracing::warn!("freeing device memory failed: {e:?}");
            }
        }
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.bind()?;
        if src.len() <= UPLOAD_MAX_BYTES {
            return self.htod_staged(dst, src);
        }
        // SAFETY: `dst` points to at least `src.len()` bytes of a live allocation (callers copy
        // into their own buffers); the synchronous copy reads `src` before returning.
        unsafe { result::memcpy_htod_sync(dst, src) }.map_err(|e| fail("host-to-device copy", e))
    }

    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: as above, for `dst.len()` bytes at `src`; the synchronous copy follows every
        // operation issued before it on the legacy stream.
        unsafe { result::memcpy_dtoh_sync(dst, src) }.map_err(|e| fail("device-to-host copy", e))
    }

    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: both ranges lie in live allocations (the callers' buffers); the legacy
        // stream (null) orders the copy with the launches.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, std::ptr::null_mut()) }
            .map_err(|e| fail("device-to-device copy", e))
    }

    fn zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: as above.
        unsafe { result::memset_d8_async(dst, 0, bytes, std::ptr::null_mut()) }
            .map_err(|e| fail("clearing device memory", e))
    }

    fn launch(&self, kernel: &'static str, grid: Grid, args: &[KArg]) -> Result<()> {
        self.bind()?;
        let k = self.kernel(kernel)?;
        signature::check_args(kernel, &k.params, args).map_err(Error::Internal)?;
        // Each parameter's value, in storage the driver reads during the call.
        let mut values: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                KArg::Ptr(p) => p,
                KArg::U64(v) => v,
                KArg::U32(v) => v as u64,
                KArg::F32(v) => v.to_bits() as u64,
            })
            .collect();
        // A 4-byte parameter is read from the first 4 bytes of its slot (little-endian).
        let mut params: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| v as *mut u64 as *mut c_void)
            .collect();
        let block = moe_kernels::cuda::BLOCK_THREADS;
        // SAFETY: the function was loaded from its source and `params` points to one value
        // per declared parameter, of the declared width (checked above: pointers and
        // `unsigned long long` are 8 bytes, `unsigned` and `float` 4, read little-endian from
        // the slot's start); the values outlive the call, which copies them. The buffers the
        // pointers name are the callers' live allocations, ordered on the legacy stream.
        unsafe {
            result::launch_kernel(
                k.func,
                (grid[0], grid[1], grid[2]),
                (block, 1, 1),
                0,
                std::ptr::null_mut(),
                &mut params,
            )
        }
        .map_err(|e| fail(&format!("launching {kernel}"), e))
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.ctx
            .synchronize()
            .map_err(|e| fail("synchronizing the device", e))
    }

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
    ) -> Result<()> {
        use crate::weights::Dtype;
        use cudarc::cublas::{result as blas, sys as bsys};
        self.bind()?;
        let int =
            |v: usize| i32::try_from(v).map_err(|_| Error::Internal(format!("GEMM size {v}")));
        let mut guard = self.blas.lock();
        if guard.is_none() {
            let h = blas::create_handle().map_err(|e| fail("creating the cuBLAS handle", e))?;
            // SAFETY: the handle was just created; the null stream is the legacy stream.
            unsafe { blas::set_stream(h, std::ptr::null_mut()) }
                .map_err(|e| fail("setting the cuBLAS stream", e))?;
            *guard = Some(Blas(h));
        }
        let h = guard.as_ref().expect("created above").0;
        // Column-major: C[n, m] = Wᵀ-view[n, k] · X[k, m], W row-major [n, k] read transposed.
        let sgemm = |rows: usize, a: DevPtr, c: DevPtr| -> Result<()> {
            let (one, zero) = (1.0f32, 0.0f32);
            // SAFETY: `a` holds `rows` rows of k f32, `x` m rows of k, `c` m rows of n floats
            // starting at the tile's column (ldc = n); all live on this device and ordered on
            // the legacy stream; alpha and beta are host scalars that outlive the call.
            unsafe {
                blas::sgemm(
                    h,
                    bsys::cublasOperation_t::CUBLAS_OP_T,
                    bsys::cublasOperation_t::CUBLAS_OP_N,
                    int(rows)?,
                    int(m)?,
                    int(k)?,
                    &one,
                    a as *const f32,
                    int(k)?,
                    x as *const f32,
                    int(k)?,
                    &zero,
                    c as *mut f32,
                    int(n)?,
                )
            }
            .map_err(|e| fail("a cuBLAS GEMM", e))
        };
        if dtype == Dtype::F32 {
            return sgemm(n, w, out);
        }
        let (block, block_bytes) = dtype.block().unwrap_or((1, dtype.bytes_for(1)));
        let kernel = match dtype {
            Dtype::Bf16 => "dequant_bf16",
            Dtype::F16 => "dequant_f16",
            Dtype::Q8_0 => "dequant_q8_0",
            Dtype::Q4K => "dequant_q4_k",
            Dtype::F8B128 => "dequant_f8",
            Dtype::Nf4 => "dequant_nf4",
            Dtype::Fp4 => "dequant_fp4",
            Dtype::Nf4Bf16 => "dequant_nf4bf16",
            Dtype::Nf4F16 => "dequant_nf4f16",
            Dtype::Fp4Bf16 => "dequant_fp4bf16",
            Dtype::Fp4F16 => "dequant_fp4f16",
            Dtype::Mxfp4 => "dequant_mxfp4",
            other => {
                return Err(Error::Internal(format!(
                    "no GEMM for {} weights",
                    other.name()
                )))
            }
        };
        let tile = (scratch_bytes / (k * 4)).clamp(1, n.max(1));
        let row_bytes = k / block * block_bytes;
        let mut r0 = 0;
        while r0 < n {
            let rows = tile.min(n - r0);
            let values = (rows * k) as u64;
            self.launch(
                kernel,
                [
                    ((values as usize).div_ceil(256)).clamp(1, 8192) as u32,
                    1,
                    1,
                ],
                &[
                    KArg::Ptr(w + (r0 * row_bytes) as u64),
                    KArg::U64(values / block as u64),
                    KArg::Ptr(scratch),
                ],
            )?;
            sgemm(rows, scratch, out + (r0 * 4) as u64)?;
            r0 += rows;
        }
        Ok(())
    }

    fn host_alloc(&self, bytes: usize) -> Result<HostId> {
        self.bind()?;
        // Portable, not write-combined: the CPU writes it with a memcpy and may read it.
        // SAFETY: the context is current; the buffer is freed once, by `host_free`.
        let p = unsafe { result::malloc_host(bytes.max(1), sys::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(|e| Error::Device {
                reason: format!("allocating {bytes} bytes of pinned host memory failed: {e:?}"),
                fatal: false,
            })?;
        self.host.lock().insert(p as u64, bytes);
        Ok(p as u64)
    }

    fn host_free(&self, id: HostId) {
        if self.host.lock().remove(&id).is_some() && self.bind().is_ok() {
            // SAFETY: `id` is the address `host_alloc` returned, freed once (removed above).
            if let Err(e) = unsafe { result::free_host(id as *mut c_void) } {
                tracing::warn!("freeing pinned host memory failed: {e:?}");
            }
        }
    }

    fn host_write(&self, id: HostId, src: &[u8]) -> Result<()> {
        let len = self.host.lock().get(&id).copied();
        match len {
            Some(len) if src.len() <= len => {
                // SAFETY: `id` is a live pinned buffer of `len >= src.len()` bytes (checked
                // above), which no copy in flight reads (the caller's contract), and `src` is a
                // separate Rust slice.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), id as *mut u8, src.len()) };
                Ok(())
            }
            _ => Err(Error::Internal(format!(
                "a write of {} bytes to pinned buffer {id:#x} ({len:?} bytes)",
                src.len()
            ))),
        }
    }

    fn copy_async(&self, dst: DevPtr, src: HostId, bytes: usize) -> Result<()> {
        self.bind()?;
        let len = self.host.lock().get(&src).copied().unwrap_or(0);
        if bytes > len {
            return Err(Error::Internal(format!(
                "a copy of {bytes} bytes from a {len}-byte pinned buffer"
            )));
        }
        // SAFETY: `src` is a live pinned buffer of at least `bytes` bytes (checked above) that
        // the caller leaves untouched until the copy's event completes; `dst` is a slot of at
        // least `bytes` bytes whose readers the copy stream has waited for.
        let host = unsafe { std::slice::from_raw_parts(src as *const u8, bytes) };
        // SAFETY: as above.
        unsafe { result::memcpy_htod_async(dst, host, self.copy.0) }
            .map_err(|e| fail("an expert copy", e))
    }

    fn record(&self, stream: Stream) -> Result<EventId> {
        self.bind()?;
        let ev = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(|e| fail("creating an event", e))?;
        let s = match stream {
            Stream::Compute => std::ptr::null_mut(),
            Stream::Copy => self.copy.0,
        };
        // SAFETY: the event was just created and the stream lives as long as the device.
        unsafe { result::event::record(ev, s) }.map_err(|e| fail("recording an event", e))?;
        Ok(ev as u64)
    }

    fn wait_event(&self, stream: Stream, event: EventId) -> Result<()> {
        self.bind()?;
        let s = match stream {
            Stream::Compute => std::ptr::null_mut(),
            Stream::Copy => self.copy.0,
        };
        // SAFETY: `event` came from `record` and is not yet freed (the caller holds it).
        unsafe {
            result::stream::wait_event(
                s,
                event as sys::CUevent,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| fail("waiting for an event", e))
    }

    fn event_done(&self, event: EventId) -> Result<bool> {
        self.bind()?;
        // SAFETY: as above.
        match unsafe { result::event::query(event as sys::CUevent) } {
            Ok(()) => Ok(true),
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_NOT_READY => Ok(false),
            Err(e) => Err(fail("querying an event", e)),
        }
    }

    fn event_sync(&self, event: EventId) -> Result<()> {
        self.bind()?;
        // SAFETY: as above.
        unsafe { result::event::synchronize(event as sys::CUevent) }
            .map_err(|e| fail("waiting for an event", e))
    }

    fn elapsed_ms(&self, start: EventId, end: EventId) -> Result<f32> {
        self.bind()?;
        // SAFETY: as above, both events recorded and completed.
        unsafe { result::event::elapsed(start as sys::CUevent, end as sys::CUevent) }
            .map_err(|e| fail("timing events", e))
    }

    fn event_free(&self, event: EventId) {
        if self.bind().is_ok() {
            // SAFETY: `event` came from `record` and is freed once (by its owner's drop).
            if let Err(e) = unsafe { result::event::destroy(event as sys::CUevent) } {
                tracing::warn!("releasing an event failed: {e:?}");
            }
        }
    }
}
