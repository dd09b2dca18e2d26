//! The [`Gpu`] of a real device, through the CUDA driver API (cudarc's `result` layer, loaded at
//! run time). Kernels are compiled by NVRTC for the device's compute capability at their first
//! launch, one source at a time, and the CUBIN is kept in the compiled-kernel cache.
//!
//! Invariants: every operation runs on the context's legacy default stream, so copies, memsets
//! and launches execute in the order they are issued and a device-to-host copy returns after
//! everything before it; the context is made current on the calling thread before every call
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
use super::gpu::{DevPtr, Gpu, Grid, KArg};
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
}

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
        Ok(DriverGpu {
            ctx,
            cc: (major * 10 + minor) as u32,
            name: dev.name.clone(),
            cache: CubinCache::new(cache_dir, nvrtc),
            loaded: Mutex::new(Loaded::default()),
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
}
