//! The CUDA backend: weights, activations, KV caches and recurrent state in device memory,
//! computed by the kernels of `moe_kernels::cuda` launched by name through a [`Gpu`] (the CUDA
//! driver, or the mock device that runs each kernel's CPU twin).
//!
//! Every device buffer comes from one accounting allocator ([`Vram`]) whose cap is the planned
//! VRAM budget. Backend ops cannot return errors, so a failed operation (an allocation past the
//! cap, a driver error) is kept as this backend's fault: later operations are skipped and the
//! decoder's [`Backend::check`] returns it at the end of the forward pass.
//!
//! What runs where: embedding, matmuls (+ bias), norms, RoPE, the elementwise ops, KV stores and
//! attention run as kernels; routing takes the router logits to the host (one small copy per
//! MoE layer, which the expert store needs anyway) and runs the CPU rule; the gated DeltaNet
//! mixer runs as kernels (split, convolution, q/k normalisation, the delta rule on the state in
//! VRAM, norm and gate; each sequence's tokens one after another, the recurrent form) for
//! decode steps and prefill chunks of at least 64 tokens; a shorter chunk runs the CPU's
//! chunked form over the state copied to the host and back; experts are computed by the expert store (in VRAM slots through
//! `store::CudaTier`, or on the host).
//!
//! Invariants: on the mock device every result equals the CPU backend's (activations `f32`)
//! bit for bit, except where the device takes another form of the same computation (attention
//! split over positions past 1024, DeltaNet prefill chunks of 64 tokens or more in the
//! recurrent form), which stays within rounding of it; on a GPU dequantization, elementwise ops and KV stores are bit-exact with the
//! CPU and reductions (matvec, norms, attention) are deterministic and within the tolerances
//! ARCHITECTURE.md states; the host checks each kernel's launch requirements (block-multiple
//! row lengths, head_dim within the attention kernel's limit) before launching.

mod cubin;
mod deltanet;
pub mod driver;
mod experts;
pub mod gpu;
pub mod mock;
mod probe;
pub mod signature;

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;

pub use cubin::{Cubin, CubinCache};
pub use experts::{DeviceExpert, ExpertWork};
pub use gpu::{DevBuf, DevPtr, Gpu, Grid, KArg, Vram, VramUsage};
pub use probe::{probe, CudaDevice};

use crate::backend::cpu::{self, LinearState};
use crate::backend::{
    AttnShape, Backend, Cpu, DeltaNetParams, Glu, KvElem, RouterRule, Routing, Scoring,
};
use crate::config::Rope;
use crate::error::{Error, Result};
use crate::weights::{Dtype, TensorRef};

/// Largest head_dim the attention kernel takes (`ATT_MAX_HEAD_DIM` in attention.cu).
pub const ATTENTION_MAX_HEAD_DIM: usize = 256;

/// Attended positions up to which decode attention runs as one block per (row, KV head); past
/// it the positions are split over blocks and merged, so a long context keeps the GPU busy.
const ATTENTION_SPLIT_FROM_POSITIONS: usize = 1024;
/// Positions per split past [`ATTENTION_SPLIT_FROM_POSITIONS`].
const ATTENTION_POSITIONS_PER_SPLIT: usize = 512;
/// Most splits (enough blocks for every SM of a large GPU at one sequence and 4 KV heads).
const ATTENTION_MAX_SPLITS: usize = 64;

/// Splits of decode attention for a launch whose longest row attends to `positions`: from the
/// context length alone (never from load or timing), so results do not vary between runs.
fn attention_splits(positions: usize) -> usize {
    if positions <= ATTENTION_SPLIT_FROM_POSITIONS {
        1
    } else {
        positions
            .div_ceil(ATTENTION_POSITIONS_PER_SPLIT)
            .min(ATTENTION_MAX_SPLITS)
    }
}

/// KV caches grow by whole multiples of this many positions: a copy per 256 new tokens, and at
/// most 255 unused positions per cache.
const KV_GROW_POSITIONS: usize = 256;

/// Limits of `route_softmax_topk_f32` (`ROUTE_MAX_EXPERTS`, `ROUTE_MAX_K` in `route.cu`); other
/// shapes are routed on the host.
const ROUTE_MAX_EXPERTS: usize = 1024;
const ROUTE_MAX_K: usize = 32;

/// Most blocks a grid-stride kernel is launched with (enough to fill any current GPU).
const MAX_STRIDE_BLOCKS: usize = 8192;

/// The GPU backend (see the module doc).
pub struct Cuda {
    gpu: Arc<dyn Gpu>,
    vram: Arc<Vram>,
    fault: Mutex<Option<Error>>,
    /// RoPE frequency tables on the device, by their bits (one per distinct table).
    rope_tables: Mutex<HashMap<Vec<u32>, Arc<DevBuf>>>,
}

/// A resident weight on the device, in its stored type.
pub struct DevWeight {
    buf: DevBuf,
    dtype: Dtype,
    numel: usize,
}

/// A small f32 vector on the device, with its host copy (routing biases and the DeltaNet
/// parameters are read on the host).
pub struct DevVec {
    buf: DevBuf,
    host: Vec<f32>,
}

/// One attention layer's KV cache on the device: `cap` positions of `[kv_heads * head_dim]`
/// values in `elem`, the first `len` valid.
pub struct DevKv {
    k: DevBuf,
    v: DevBuf,
    elem: KvElem,
    len: usize,
    cap: usize,
}

/// One DeltaNet layer's state on the device.
pub struct DevRecurrent {
    conv: DevBuf,
    ssm: DevBuf,
    conv_len: usize,
    ssm_len: usize,
}

/// Whether CUDA can run here: the probe of device `ordinal` and NVRTC (kernels compile at first
/// use), without opening a context for a model.
pub fn usable(ordinal: usize) -> Result<CudaDevice> {
    let dev = probe(ordinal)?;
    moe_kernels::nvrtc::probe()
        .map_err(|e| probe::unavailable(format!("{e}; set device = \"cpu\"")))?;
    Ok(dev)
}

/// A device copy of `src` (used by the state types' `Clone`, which cannot fail: a failure
/// leaves an empty buffer and is reported by the next operation that needs it).
fn clone_buf(src: &DevBuf) -> DevBuf {
    let vram = src.vram().clone();
    match vram.alloc(src.bytes()) {
        Ok(b) => {
            if src.bytes() > 0 {
                if let Err(e) = vram.gpu().dtod(b.ptr(), src.ptr(), src.bytes()) {
                    tracing::error!("copying a device state failed: {e}");
                }
            }
            b
        }
        Err(e) => {
            tracing::error!("copying a device state failed: {e}");
            vram.alloc(0).expect("an empty buffer always exists")
        }
    }
}

impl Clone for DevKv {
    fn clone(&self) -> Self {
        DevKv {
            k: clone_buf(&self.k),
            v: clone_buf(&self.v),
            elem: self.elem,
            len: self.len,
            cap: self.cap,
        }
    }
}

impl Clone for DevRecurrent {
    fn clone(&self) -> Self {
        DevRecurrent {
            conv: clone_buf(&self.conv),
            ssm: clone_buf(&self.ssm),
            conv_len: self.conv_len,
            ssm_len: self.ssm_len,
        }
    }
}

/// Blocks for a grid-stride kernel over `n` elements.
fn stride_blocks(n: usize) -> u32 {
    n.div_ceil(moe_kernels::cuda::BLOCK_THREADS as usize)
        .clamp(1, MAX_STRIDE_BLOCKS) as u32
}

/// Blocks to cover `n` columns with one thread each.
fn col_blocks(n: usize) -> u32 {
    n.div_ceil(moe_kernels::cuda::BLOCK_THREADS as usize).max(1) as u32
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Cuda {
    /// The backend on `gpu`, allocating at most `cap_bytes` (the planner lowers or raises the
    /// cap to the planned budget with [`Cuda::set_vram_cap`]).
    pub fn on(gpu: Arc<dyn Gpu>, cap_bytes: u64) -> Cuda {
        Cuda {
            vram: Vram::new(gpu.clone(), cap_bytes),
            gpu,
            fault: Mutex::new(None),
            rope_tables: Mutex::new(HashMap::new()),
        }
    }

    /// The backend on the mock device (host memory, CPU twins): the CUDA path without a GPU.
    pub fn mock(cap_bytes: u64) -> Cuda {
        Cuda::on(Arc::new(mock::MockGpu::new()), cap_bytes)
    }

    /// Opens GPU `ordinal` through the CUDA driver, compiling kernels into (or loading them
    /// from) `cache_dir`; the VRAM cap starts at the device's free memory.
    pub fn new(ordinal: usize, cache_dir: &std::path::Path) -> Result<Cuda> {
        let dev = probe(ordinal)?;
        let gpu = driver::DriverGpu::open(&dev, cache_dir)?;
        Ok(Cuda::on(Arc::new(gpu), dev.free_bytes))
    }

    /// What the backend computes on.
    pub fn describe(&self) -> String {
        self.gpu.describe()
    }

    /// The device interface (tests read the mock's launch log through it).
    pub fn gpu(&self) -> &Arc<dyn Gpu> {
        &self.gpu
    }

    /// Sets the VRAM cap (the planned budget).
    pub fn set_vram_cap(&mut self, cap_bytes: u64) {
        let vram = Vram::new(self.gpu.clone(), cap_bytes);
        self.vram = vram;
    }

    pub fn vram_usage(&self) -> VramUsage {
        self.vram.usage()
    }

    fn faulted(&self) -> bool {
        self.fault.lock().is_some()
    }

    /// Keeps the first failure (see the module doc).
    fn record(&self, e: Error) {
        let mut f = self.fault.lock();
        if f.is_none() {
            tracing::error!("{e}");
            *f = Some(e);
        }
    }

    fn ok<T>(&self, r: Result<T>) -> Option<T> {
        r.map_err(|e| self.record(e)).ok()
    }

    /// A buffer of `bytes`, or an empty one after recording the failure.
    fn alloc(&self, bytes: usize) -> DevBuf {
        match self.vram.alloc(bytes) {
            Ok(b) => b,
            Err(e) => {
                self.record(e);
                self.vram.alloc(0).expect("an empty buffer always exists")
            }
        }
    }

    fn launch(&self, kernel: &'static str, grid: Grid, args: &[KArg]) {
        if !self.faulted() {
            let r = self.gpu.launch(kernel, grid, args);
            self.ok(r);
        }
    }

    fn upload<T: bytemuck::Pod>(&self, v: &[T]) -> DevBuf {
        let bytes: &[u8] = bytemuck::cast_slice(v);
        let b = self.alloc(bytes.len());
        if !self.faulted() && !bytes.is_empty() {
            let r = self.gpu.htod(b.ptr(), bytes);
            self.ok(r);
        }
        b
    }

    fn f32_buf(&self, n: usize) -> DevBuf {
        self.alloc(n * 4)
    }

    fn n_f32(x: &DevBuf) -> usize {
        x.bytes() / 4
    }

    /// A host check before a launch failed: no launch, the forward pass fails with `reason`.
    fn refuse(&self, reason: String) {
        self.record(Error::Device {
            reason,
            fatal: false,
        });
    }

    fn rope_table(&self, rope: &Rope) -> Arc<DevBuf> {
        let key: Vec<u32> = rope.inv_freq.iter().map(|f| f.to_bits()).collect();
        if let Some(b) = self.rope_tables.lock().get(&key) {
            return b.clone();
        }
        let b = Arc::new(self.upload(&rope.inv_freq));
        self.rope_tables.lock().insert(key, b.clone());
        b
    }

    /// Makes room in `kv` for `n` more positions of `row` values.
    fn kv_reserve(&self, kv: &mut DevKv, n: usize, row: usize) {
        if kv.len + n <= kv.cap {
            return;
        }
        let cap = (kv.len + n).next_multiple_of(KV_GROW_POSITIONS);
        let eb = kv.elem.elem_bytes() as usize;
        let (k, v) = (self.alloc(cap * row * eb), self.alloc(cap * row * eb));
        let used = kv.len * row * eb;
        if used > 0 && !self.faulted() {
            let r = self
                .gpu
                .dtod(k.ptr(), kv.k.ptr(), used)
                .and_then(|()| self.gpu.dtod(v.ptr(), kv.v.ptr(), used));
            self.ok(r);
        }
        if !self.faulted() {
            kv.k = k;
            kv.v = v;
            kv.cap = cap;
        }
    }

    fn host_f32(&self, x: &DevBuf) -> Vec<f32> {
        let mut out = vec![0f32; Self::n_f32(x)];
        if !self.faulted() && !out.is_empty() {
            let r = self.gpu.dtoh(x.ptr(), bytemuck::cast_slice_mut(&mut out));
            self.ok(r);
        }
        out
    }

    fn store_f32(&self, dst: &DevBuf, v: &[f32]) {
        if !self.faulted() && !v.is_empty() {
            let r = self.gpu.htod(dst.ptr(), bytemuck::cast_slice(v));
            self.ok(r);
        }
    }
}

/// Rows from which a matmul is one GEMM rather than the matvec kernel (which reads the weight
/// once per 8 rows).
const GEMM_MIN_ROWS: usize = 32;
/// Most scratch a GEMM widens weights into at once (64 MiB: within the planner's device
/// scratch, and tiles of thousands of rows for common widths).
const GEMM_SCRATCH_BYTES: usize = 64 << 20;

impl Cuda {
    /// The accounting allocator every device buffer of this backend comes from.
    pub fn vram(&self) -> &Arc<Vram> {
        &self.vram
    }

    /// `[rows, n_out] = x · wᵀ` for a weight of `dtype` at `w` (`[n_out, n_in]`).
    fn matvec(
        &self,
        x: &DevBuf,
        rows: usize,
        w: DevPtr,
        dtype: Dtype,
        n_in: usize,
        n_out: usize,
    ) -> DevBuf {
        let out = self.f32_buf(rows * n_out);
        if rows == 0 || n_out == 0 {
            return out;
        }
        if let Some((block, _)) = dtype.block() {
            if !n_in.is_multiple_of(block) {
                self.refuse(format!(
                    "a {} weight with rows of {n_in} values: not whole {block}-value blocks",
                    dtype.name()
                ));
                return out;
            }
        }
        if rows >= GEMM_MIN_ROWS {
            // Prefill: one GEMM (cuBLAS over f32 tiles) instead of re-reading the weight for
            // every 8 rows.
            let scratch_bytes = if dtype == Dtype::F32 {
                0
            } else {
                (n_out * n_in * 4).min(GEMM_SCRATCH_BYTES.max(n_in * 4))
            };
            let scratch = self.alloc(scratch_bytes);
            if !self.faulted() {
                let r = self.gpu.gemm(
                    x.ptr(),
                    w,
                    dtype,
                    out.ptr(),
                    rows,
                    n_out,
                    n_in,
                    scratch.ptr(),
                    scratch_bytes,
                );
                self.ok(r);
            }
            return out;
        }
        self.launch(
            matvec_kernel(dtype),
            [u32_of(n_out.div_ceil(8)), 1, 1],
            &[
                x.arg(),
                KArg::Ptr(w),
                out.arg(),
                KArg::U32(u32_of(rows)),
                KArg::U32(u32_of(n_out)),
                KArg::U32(u32_of(n_in)),
            ],
        );
        out
    }

    /// A zeroed `[n]` f32 buffer.
    pub fn zeros(&self, n: usize) -> DevBuf {
        let b = self.f32_buf(n);
        if n > 0 && !self.faulted() {
            let r = self.gpu.zero(b.ptr(), b.bytes());
            self.ok(r);
        }
        b
    }
}

/// The kernel name suffix of a weight type (`matvec_<suffix>`, `dequant_<suffix>`).
fn kernel_suffix(dtype: Dtype) -> Option<&'static str> {
    Some(match dtype {
        Dtype::F32 => "f32",
        Dtype::Bf16 => "bf16",
        Dtype::F16 => "f16",
        Dtype::Q8_0 => "q8_0",
        Dtype::Q4K => "q4_k",
        Dtype::F8B128 => "f8",
        Dtype::Nf4 => "nf4",
        Dtype::Fp4 => "fp4",
        Dtype::Mxfp4 => "mxfp4",
        _ => return None,
    })
}

fn matvec_kernel(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "matvec_f32",
        Dtype::Bf16 => "matvec_bf16",
        Dtype::F16 => "matvec_f16",
        Dtype::Q8_0 => "matvec_q8_0",
        Dtype::Q4K => "matvec_q4_k",
        Dtype::F8B128 => "matvec_f8",
        Dtype::Nf4 => "matvec_nf4",
        Dtype::Mxfp4 => "matvec_mxfp4",
        _ => "matvec_fp4",
    }
}

fn dequant_kernel(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Q8_0 => "dequant_q8_0",
        Dtype::Q4K => "dequant_q4_k",
        Dtype::F8B128 => "dequant_f8",
        Dtype::Nf4 => "dequant_nf4",
        Dtype::Mxfp4 => "dequant_mxfp4",
        _ => "dequant_fp4",
    }
}

fn kv_kernels(elem: KvElem) -> (&'static str, &'static str) {
    match elem {
        KvElem::F32 => ("kv_store_f32", "attention_decode_f32"),
        KvElem::Bf16 => ("kv_store_bf16", "attention_decode_bf16"),
        KvElem::F16 => ("kv_store_f16", "attention_decode_f16"),
    }
}

impl Backend for Cuda {
    type Weight = DevWeight;
    type Vector = DevVec;
    type Act = DevBuf;
    type Kv = DevKv;
    type Recurrent = DevRecurrent;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn check(&self) -> Result<()> {
        match self.fault.lock().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn upload_weight(&self, t: TensorRef) -> Result<DevWeight> {
        if kernel_suffix(t.dtype).is_none() {
            return Err(Error::BadTensor {
                name: t.name.to_string(),
                reason: format!("dtype {} has no CUDA kernels", t.dtype.name()),
            });
        }
        if t.is_virtual() {
            return Err(Error::BadTensor {
                name: t.name.to_string(),
                reason: "has no data (planned without weights)".into(),
            });
        }
        let bytes = t.bytes();
        let buf = self.vram.alloc(bytes.len())?;
        if !bytes.is_empty() {
            self.gpu.htod(buf.ptr(), bytes)?;
        }
        Ok(DevWeight {
            buf,
            dtype: t.dtype,
            numel: t.numel(),
        })
    }

    fn upload_vector(&self, v: Vec<f32>) -> Result<DevVec> {
        let buf = self.vram.alloc(v.len() * 4)?;
        if !v.is_empty() {
            self.gpu.htod(buf.ptr(), bytemuck::cast_slice(&v))?;
        }
        Ok(DevVec { buf, host: v })
    }

    fn act_from_host(&self, v: Vec<f32>) -> DevBuf {
        self.upload(&v)
    }

    fn to_host<'a>(&self, x: &'a DevBuf) -> Cow<'a, [f32]> {
        Cow::Owned(self.host_f32(x))
    }

    fn embed(&self, table: &DevWeight, ids: &[u32], width: usize) -> DevBuf {
        let out = self.f32_buf(ids.len() * width);
        if ids.is_empty() || width == 0 {
            return out;
        }
        let vocab = table.numel / width;
        match table.dtype {
            Dtype::F32 | Dtype::Bf16 | Dtype::F16 => {
                let kernel = match table.dtype {
                    Dtype::F32 => "embed_f32",
                    Dtype::Bf16 => "embed_bf16",
                    _ => "embed_f16",
                };
                let ids_d = self.upload(ids);
                self.launch(
                    kernel,
                    [u32_of(ids.len()), col_blocks(width), 1],
                    &[
                        table.buf.arg(),
                        ids_d.arg(),
                        KArg::U32(u32_of(ids.len())),
                        KArg::U32(u32_of(vocab)),
                        KArg::U32(u32_of(width)),
                        out.arg(),
                    ],
                );
            }
            dtype => {
                // A block-quantized table: each row dequantized on its own.
                let (block, block_bytes) = dtype.block().expect("a block format");
                if !width.is_multiple_of(block) {
                    self.refuse(format!(
                        "embedding rows of {width} values are not whole {block}-value blocks"
                    ));
                    return out;
                }
                let row_bytes = width / block * block_bytes;
                for (i, &id) in ids.iter().enumerate() {
                    self.launch(
                        dequant_kernel(dtype),
                        [col_blocks(width), 1, 1],
                        &[
                            KArg::Ptr(table.buf.at(id as usize * row_bytes)),
                            KArg::U64((width / block) as u64),
                            KArg::Ptr(out.at(i * width * 4)),
                        ],
                    );
                }
            }
        }
        out
    }

    fn matmul(
        &self,
        x: &DevBuf,
        rows: usize,
        w: &DevWeight,
        n_in: usize,
        n_out: usize,
        bias: Option<&DevVec>,
    ) -> DevBuf {
        let out = self.matvec(x, rows, w.buf.ptr(), w.dtype, n_in, n_out);
        if let Some(b) = bias {
            self.launch(
                "add_rows_f32",
                [u32_of(rows), col_blocks(n_out), 1],
                &[
                    out.arg(),
                    b.buf.arg(),
                    KArg::U32(u32_of(rows)),
                    KArg::U32(u32_of(n_out)),
                ],
            );
        }
        out
    }

    fn rms_norm(&self, x: &mut DevBuf, w: &DevVec, width: usize, eps: f32) {
        let rows = Self::n_f32(x) / width.max(1);
        if rows == 0 {
            return;
        }
        self.launch(
            "rms_norm_f32",
            [u32_of(rows), 1, 1],
            &[
                x.arg(),
                w.buf.arg(),
                KArg::U32(u32_of(rows)),
                KArg::U32(u32_of(width)),
                KArg::F32(eps),
            ],
        );
    }

    fn copy(&self, x: &DevBuf) -> DevBuf {
        let out = self.alloc(x.bytes());
        if x.bytes() > 0 && !self.faulted() {
            let r = self.gpu.dtod(out.ptr(), x.ptr(), x.bytes());
            self.ok(r);
        }
        out
    }

    fn add(&self, x: &mut DevBuf, y: &DevBuf) {
        let n = Self::n_f32(x);
        if n > 0 {
            self.launch(
                "add_f32",
                [stride_blocks(n), 1, 1],
                &[x.arg(), y.arg(), KArg::U32(u32_of(n))],
            );
        }
    }

    fn take_rows(&self, x: &DevBuf, width: usize, ranges: &[Range<usize>]) -> DevBuf {
        let total: usize = ranges.iter().map(|r| r.len()).sum();
        let out = self.f32_buf(total * width);
        let mut at = 0;
        for r in ranges.iter().filter(|r| !r.is_empty()) {
            let bytes = r.len() * width * 4;
            if !self.faulted() {
                let res = self.gpu.dtod(out.at(at), x.at(r.start * width * 4), bytes);
                self.ok(res);
            }
            at += bytes;
        }
        out
    }

    fn split_halves(&self, x: &DevBuf, d: usize) -> (DevBuf, DevBuf) {
        self.split_blocks("split_halves_f32", x, d)
    }

    fn clamp(&self, x: &mut DevBuf, limit: f32) {
        let n = Self::n_f32(x);
        if limit.is_nan() || limit < 0.0 {
            // The CPU's clamp refuses such a limit too (config validation keeps it positive).
            self.refuse(format!("clamp limit {limit} is not a non-negative number"));
            return;
        }
        if n > 0 {
            self.launch(
                "clamp_f32",
                [stride_blocks(n), 1, 1],
                &[x.arg(), KArg::U32(u32_of(n)), KArg::F32(limit)],
            );
        }
    }

    fn rope(
        &self,
        q: &mut DevBuf,
        k: &mut DevBuf,
        head_dim: usize,
        positions: &[usize],
        rope: &Rope,
    ) {
        let rows = positions.len();
        if rows == 0 || rope.rot_dim == 0 {
            return;
        }
        let (qw, kw) = (Self::n_f32(q) / rows, Self::n_f32(k) / rows);
        let pos: Vec<u32> = positions.iter().map(|&p| u32_of(p)).collect();
        let pos_d = self.upload(&pos);
        let table = self.rope_table(rope);
        self.launch(
            "rope_f32",
            [u32_of(rows), 1, 1],
            &[
                q.arg(),
                k.arg(),
                pos_d.arg(),
                table.arg(),
                KArg::U32(u32_of(rows)),
                KArg::U32(u32_of(qw)),
                KArg::U32(u32_of(kw)),
                KArg::U32(u32_of(head_dim)),
                KArg::U32(u32_of(rope.rot_dim)),
                KArg::F32(rope.attention_scaling),
            ],
        );
    }

    fn mul_sigmoid(&self, x: &mut DevBuf, gate: &DevBuf) {
        let n = Self::n_f32(x);
        if n > 0 {
            self.launch(
                "mul_sigmoid_f32",
                [stride_blocks(n), 1, 1],
                &[x.arg(), gate.arg(), KArg::U32(u32_of(n))],
            );
        }
    }

    fn glu(&self, gate: &DevBuf, up: &mut DevBuf, kind: Glu) {
        let n = Self::n_f32(up);
        if n == 0 {
            return;
        }
        let grid = [stride_blocks(n), 1, 1];
        match kind {
            Glu::SwiGlu => self.launch(
                "silu_mul_f32",
                grid,
                &[gate.arg(), up.arg(), KArg::U32(u32_of(n))],
            ),
            Glu::ClampedSwiGlu { limit, alpha } => self.launch(
                "glu_clamped_f32",
                grid,
                &[
                    gate.arg(),
                    up.arg(),
                    KArg::U32(u32_of(n)),
                    KArg::F32(limit),
                    KArg::F32(alpha),
                ],
            ),
        }
    }

    fn add_gated_rows(&self, out: &mut DevBuf, y: &DevBuf, gate: &DevBuf, width: usize) {
        let rows = Self::n_f32(gate);
        if rows == 0 || width == 0 {
            return;
        }
        self.launch(
            "add_gated_rows_f32",
            [u32_of(rows), col_blocks(width), 1],
            &[
                out.arg(),
                y.arg(),
                gate.arg(),
                KArg::U32(u32_of(rows)),
                KArg::U32(u32_of(width)),
            ],
        );
    }

    fn route(&self, logits: DevBuf, rule: &RouterRule, selection_bias: Option<&DevVec>) -> Routing {
        let (e, k) = (rule.num_experts, rule.top_k);
        let rows = Self::n_f32(&logits) / e.max(1);
        let on_device = rule.scoring == Scoring::Softmax
            && rule.groups.is_none()
            && e <= ROUTE_MAX_EXPERTS
            && (1..=ROUTE_MAX_K.min(e)).contains(&k)
            && rows > 0;
        if !on_device {
            // Other rules pick on the host, with the CPU's code: the same routing bit for bit.
            let host = self.host_f32(&logits);
            return cpu::route::route(host, rule, selection_bias.map(|b| &b.host[..]));
        }
        // The chosen experts and their weights come back in one copy (the store decides hits
        // and misses on the host): `rows * k` indices, then as many weights.
        let n = rows * k;
        let out = self.alloc(n * 8);
        self.launch(
            "route_softmax_topk_f32",
            [u32_of(rows), 1, 1],
            &[
                logits.arg(),
                selection_bias.map_or(KArg::Ptr(0), |b| b.buf.arg()),
                KArg::U32(u32_of(e)),
                KArg::U32(u32_of(k)),
                KArg::U32(u32::from(rule.renormalize)),
                KArg::F32(rule.scale),
                out.arg(),
                KArg::Ptr(out.ptr() + (n * 4) as u64),
            ],
        );
        let mut words = vec![0u32; 2 * n];
        if !self.faulted() {
            let r = self
                .gpu
                .dtoh(out.ptr(), bytemuck::cast_slice_mut(&mut words));
            self.ok(r);
        }
        let weights = words[n..].iter().map(|&b| f32::from_bits(b)).collect();
        // (A failed launch or copy leaves zeros, valid indices; the step fails at `check`. An
        // index past the experts is refused by the store as an internal error.)
        words.truncate(n);
        Routing {
            indices: words,
            weights,
            // Not copied back: nothing after routing reads them on this backend.
            logits: Vec::new(),
        }
    }

    fn kv_new(&self, elem: KvElem) -> DevKv {
        DevKv {
            k: self.alloc(0),
            v: self.alloc(0),
            elem,
            len: 0,
            cap: 0,
        }
    }

    fn kv_len(&self, kv: &DevKv) -> usize {
        kv.len
    }

    fn kv_truncate(&self, kv: &mut DevKv, len: usize, _row: usize) {
        kv.len = kv.len.min(len);
    }

    fn kv_bytes(&self, kv: &DevKv) -> usize {
        kv.k.bytes() + kv.v.bytes()
    }

    fn attend(
        &self,
        q: &DevBuf,
        k: &DevBuf,
        v: &DevBuf,
        lens: &[usize],
        caches: &mut [&mut DevKv],
        shape: &AttnShape,
        sinks: Option<&DevVec>,
    ) -> DevBuf {
        let (nh, nkv, hd) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let sinks = sinks.map_or(KArg::Ptr(0), |s| s.buf.arg());
        let rows: usize = lens.iter().sum();
        let out = self.f32_buf(rows * nh * hd);
        if rows == 0 {
            return out;
        }
        if hd > ATTENTION_MAX_HEAD_DIM || nkv == 0 || nh % nkv != 0 {
            self.refuse(format!(
                "attention with {nh} heads, {nkv} KV heads and head_dim {hd}: the CUDA kernel \
                 takes head_dim <= {ATTENTION_MAX_HEAD_DIM} and heads a multiple of KV heads"
            ));
            return out;
        }
        let kvr = nkv * hd;
        let mut k_addr = Vec::with_capacity(rows);
        let mut v_addr = Vec::with_capacity(rows);
        let mut pos = Vec::with_capacity(rows);
        let mut row0 = 0;
        let mut attention = None;
        // The most positions any row attends to: it alone decides the splits.
        let mut longest = 0usize;
        for (&n, kv) in lens.iter().zip(caches.iter_mut()) {
            self.kv_reserve(kv, n, kvr);
            let (store, attend) = kv_kernels(kv.elem);
            attention = Some(attend);
            let eb = kv.elem.elem_bytes() as usize;
            for (src, dst) in [(k, &kv.k), (v, &kv.v)] {
                self.launch(
                    store,
                    [stride_blocks(n * kvr), 1, 1],
                    &[
                        KArg::Ptr(src.at(row0 * kvr * 4)),
                        KArg::Ptr(dst.at(kv.len * kvr * eb)),
                        KArg::U64((n * kvr) as u64),
                    ],
                );
            }
            for i in 0..n {
                k_addr.push(kv.k.ptr());
                v_addr.push(kv.v.ptr());
                pos.push(u32_of(kv.len + i));
            }
            let attended = match shape.sliding_window {
                Some(w) if w > 0 => (kv.len + n).min(w),
                _ => kv.len + n,
            };
            longest = longest.max(attended);
            kv.len += n;
            row0 += n;
        }
        let Some(kernel) = attention else {
            return out;
        };
        if caches.iter().any(|c| kv_kernels(c.elem).1 != kernel) {
            self.refuse("sequences of one batch hold KV caches of different types".into());
            return out;
        }
        let (k_addr, v_addr, pos) = (
            self.upload(&k_addr),
            self.upload(&v_addr),
            self.upload(&pos),
        );
        let window = shape.sliding_window.filter(|&w| w > 0).map_or(0, u32_of);
        let scale = (hd as f32).powf(-0.5);
        let splits = attention_splits(longest);
        let partial = (splits > 1).then(|| self.f32_buf(rows * nh * splits * (hd + 2)));
        self.launch(
            kernel,
            [u32_of(rows), u32_of(nkv), u32_of(splits)],
            &[
                q.arg(),
                k_addr.arg(),
                v_addr.arg(),
                pos.arg(),
                KArg::U32(window),
                KArg::U32(u32_of(nh)),
                KArg::U32(u32_of(nkv)),
                KArg::U32(u32_of(hd)),
                KArg::F32(scale),
                KArg::U32(u32_of(splits)),
                partial.as_ref().map_or(KArg::Ptr(0), DevBuf::arg),
                out.arg(),
                sinks,
            ],
        );
        if let Some(partial) = &partial {
            self.launch(
                "attention_merge_f32",
                [u32_of(rows), u32_of(nh), 1],
                &[
                    partial.arg(),
                    KArg::U32(u32_of(splits)),
                    KArg::U32(u32_of(nh)),
                    KArg::U32(u32_of(hd)),
                    out.arg(),
                    sinks,
                ],
            );
        }
        out
    }

    fn recurrent_new(&self, conv: usize, ssm: usize) -> DevRecurrent {
        let st = DevRecurrent {
            conv: self.f32_buf(conv),
            ssm: self.f32_buf(ssm),
            conv_len: conv,
            ssm_len: ssm,
        };
        for b in [&st.conv, &st.ssm] {
            if b.bytes() > 0 && !self.faulted() {
                let r = self.gpu.zero(b.ptr(), b.bytes());
                self.ok(r);
            }
        }
        st
    }

    fn recurrent_bytes(&self, st: &DevRecurrent) -> usize {
        st.conv.bytes() + st.ssm.bytes()
    }

    fn delta_net(
        &self,
        qkvz: &DevBuf,
        ba: &DevBuf,
        p: &DeltaNetParams<'_, Cuda>,
        lens: &[usize],
        states: &mut [&mut DevRecurrent],
    ) -> DevBuf {
        let d = p.dims;
        let kernels_fit = (1..=deltanet::CONV_MAX_KERNEL).contains(&d.conv_kernel)
            && d.key_head_dim <= deltanet::L2NORM_MAX_HEAD_DIM
            && d.num_key_heads > 0
            && d.num_value_heads.is_multiple_of(d.num_key_heads);
        // Decode steps and long prefill chunks run the recurrent form on the device (the state
        // stays there); short prefill chunks the CPU's chunked form.
        if kernels_fit
            && lens
                .iter()
                .all(|&n| n == 1 || n >= deltanet::DEVICE_PREFILL_MIN_TOKENS)
        {
            return self.delta_net_seq(qkvz, ba, p, lens, states);
        }
        // Prefill: the CPU code (its chunked form) over host copies of the inputs and states.
        let (qkvz, ba) = (self.host_f32(qkvz), self.host_f32(ba));
        let mut host: Vec<LinearState> = states
            .iter()
            .map(|st| LinearState {
                conv: self.host_f32(&st.conv),
                ssm: self.host_f32(&st.ssm),
            })
            .collect();
        if self.faulted() {
            return self.alloc(0);
        }
        let params = DeltaNetParams::<'_, Cpu> {
            dims: p.dims,
            conv_weight: &p.conv_weight.host,
            neg_a: &p.neg_a.host,
            dt_bias: &p.dt_bias.host,
            norm: &p.norm.host,
            norm_eps: p.norm_eps,
        };
        let mut refs: Vec<&mut LinearState> = host.iter_mut().collect();
        let out = cpu::deltanet::delta_net(&qkvz, &ba, &params, lens, &mut refs);
        for (st, h) in states.iter().zip(&host) {
            self.store_f32(&st.conv, &h.conv);
            self.store_f32(&st.ssm, &h.ssm);
        }
        self.upload(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::Rng;

    fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect()
    }

    #[test]
    fn long_deltanet_prefill_chunks_run_on_the_device_within_rounding_of_the_cpu() {
        use crate::config::LinearAttentionConfig;
        let dims = LinearAttentionConfig {
            num_key_heads: 2,
            num_value_heads: 4,
            key_head_dim: 16,
            value_head_dim: 8,
            conv_kernel: 4,
        };
        let (nk, nv, dk, dv) = (2usize, 4usize, 16usize, 8usize);
        let conv_dim = dims.conv_dim();
        let per_row = nk * (2 * dk + 2 * (nv / nk) * dv);
        let mut rng = Rng::new(11);
        let conv_w = random(&mut rng, conv_dim * dims.conv_kernel);
        let neg_a: Vec<f32> = random(&mut rng, nv)
            .iter()
            .map(|v| -v.abs() - 0.1)
            .collect();
        let dt_bias = random(&mut rng, nv);
        let norm: Vec<f32> = random(&mut rng, dv).iter().map(|v| 1.0 + v * 0.1).collect();
        let mock = Arc::new(mock::MockGpu::new());
        let cuda = Cuda::on(mock.clone(), u64::MAX);
        let cpu = Cpu::default();
        let up = |v: &Vec<f32>| cuda.upload_vector(v.clone()).unwrap();
        let (cw, na, dt, nm) = (up(&conv_w), up(&neg_a), up(&dt_bias), up(&norm));
        let pg = DeltaNetParams::<'_, Cuda> {
            dims,
            conv_weight: &cw,
            neg_a: &na,
            dt_bias: &dt,
            norm: &nm,
            norm_eps: 1e-6,
        };
        let pc = DeltaNetParams::<'_, Cpu> {
            dims,
            conv_weight: &conv_w,
            neg_a: &neg_a,
            dt_bias: &dt_bias,
            norm: &norm,
            norm_eps: 1e-6,
        };
        let (conv_len, ssm_len) = ((dims.conv_kernel - 1) * conv_dim, nv * dk * dv);
        let (mut sc, mut sg) = (
            cpu.recurrent_new(conv_len, ssm_len),
            cuda.recurrent_new(conv_len, ssm_len),
        );
        // A 100-token chunk (on the device), then a decode step, then another long chunk.
        for n in [100usize, 1, 70] {
            let qkvz = random(&mut rng, n * per_row);
            let ba = random(&mut rng, n * 2 * nv);
            let want = cpu.delta_net(&qkvz, &ba, &pc, &[n], &mut [&mut sc]);
            let (qd, bd) = (cuda.act_from_host(qkvz), cuda.act_from_host(ba));
            let got = cuda.delta_net(&qd, &bd, &pg, &[n], &mut [&mut sg]);
            cuda.check().unwrap();
            let got = cuda.to_host(&got).into_owned();
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{n} tokens: off by {worst}");
            let state = cuda.host_f32(&sg.ssm);
            let worst = state
                .iter()
                .zip(&sc.ssm)
                .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{n} tokens: state off by {worst}");
        }
        let launched = mock.launched();
        for k in ["conv1d_silu_seq_f32", "gated_delta_seq_f32"] {
            assert!(launched.contains(&k), "{k} was not launched");
        }
    }

    #[test]
    fn long_contexts_split_attention_and_stay_within_rounding_of_the_cpu() {
        // Also with sinks: they join once, after the splits are merged.
        assert_eq!(attention_splits(ATTENTION_SPLIT_FROM_POSITIONS), 1);
        assert_eq!(attention_splits(1500), 3);
        assert_eq!(attention_splits(1 << 20), ATTENTION_MAX_SPLITS);
        let (nh, nkv, hd) = (4usize, 2usize, 16usize);
        let cuda = Cuda::mock(u64::MAX);
        let cpu = Cpu::default();
        let mut rng = Rng::new(7);
        for (elem, window, with_sinks) in [
            (KvElem::F32, None, false),
            (KvElem::Bf16, Some(1200), false),
            (KvElem::F32, None, true),
        ] {
            let sinks = with_sinks.then(|| random(&mut rng, nh));
            let sinks_dev = sinks.clone().map(|s| cuda.upload_vector(s).unwrap());
            let shape = AttnShape {
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                sliding_window: window,
            };
            let (mut kc, mut kg) = (cpu.kv_new(elem), cuda.kv_new(elem));
            // A 1400-position prompt, then two decode steps: every step past the split point.
            for n in [1400usize, 1, 1] {
                let q = random(&mut rng, n * nh * hd);
                let k = random(&mut rng, n * nkv * hd);
                let v = random(&mut rng, n * nkv * hd);
                let want = cpu.attend(&q, &k, &v, &[n], &mut [&mut kc], &shape, sinks.as_ref());
                let (qd, kd, vd) = (
                    cuda.act_from_host(q),
                    cuda.act_from_host(k),
                    cuda.act_from_host(v),
                );
                let got = cuda.attend(
                    &qd,
                    &kd,
                    &vd,
                    &[n],
                    &mut [&mut kg],
                    &shape,
                    sinks_dev.as_ref(),
                );
                cuda.check().unwrap();
                let got = cuda.to_host(&got).into_owned();
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-5, "{elem:?} {window:?} {n} rows: off by {worst}");
            }
        }
    }
}
