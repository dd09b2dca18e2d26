//! The CUDA backend: weights, activations, KV caches and recurrent state in device memory,
//! computed by the kernels of `moe_kernels::cuda` launched by name through a [`Gpu`] (the CUDA
//! driver, or the mock device that runs each kernel's CPU twin).
//!
//! Every device buffer comes from one accounting allocator ([`Vram`]) whose cap is the planned
//! VRAM budget. Backend ops cannot return errors, so a failed operation (an allocation past the
//! cap, a driver error) is kept as this backend's fault: later operations are skipped and the
//! decoder's [`Backend::check`] returns it at the end of the forward pass.
//!
//! What runs where: embedding, matmuls (+ bias), norms, RoPE (rotate-half or interleaved), the
//! elementwise ops, the per-head products and head splits of latent attention (MLA), KV stores
//! and attention (standard, or latent over a keys-only cache) run as kernels; routing takes the
//! router logits to the host (one small copy per MoE layer, which the expert store needs
//! anyway) and runs the CPU rule; the gated DeltaNet
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
//! row lengths, head_dim within the attention kernel's limit, head blocks inside their weight)
//! before launching. A latent KV cache allocates keys only, so `kv_bytes` counts what it holds.

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
    AttnShape, Backend, Cpu, DeltaNetParams, Glu, HeadBlocks, KvElem, RouterRule, Routing, Scoring,
};
use crate::config::Rope;
use crate::error::{Error, Result};
use crate::weights::{Dtype, TensorRef};

/// Largest head_dim the attention kernel takes (`ATT_MAX_HEAD_DIM` in attention.cu).
pub const ATTENTION_MAX_HEAD_DIM: usize = 256;

/// Largest head_dim and value_dim the latent attention kernel takes (`LAT_MAX_HEAD_DIM`,
/// `LAT_MAX_VALUE_DIM` in attention.cu): DeepSeek-V3's kv_lora_rank 512 plus its 64 rope values.
pub const ATTENTION_LATENT_MAX_HEAD_DIM: usize = 576;
pub const ATTENTION_LATENT_MAX_VALUE_DIM: usize = 512;
/// Query heads one latent attention block takes (`LAT_HEADS` in attention.cu).
const ATTENTION_LATENT_HEADS: usize = 2;

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
/// values in `elem`, the first `len` valid. A latent cache (attended without values, MLA) holds
/// keys only: `v` stays empty.
pub struct DevKv {
    k: DevBuf,
    v: DevBuf,
    elem: KvElem,
    len: usize,
    cap: usize,
    /// Attended without values (set by the first `attend`).
    latent: bool,
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
            latent: self.latent,
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

    /// Makes room in `kv` for `n` more positions of `row` values (keys only in a latent cache).
    fn kv_reserve(&self, kv: &mut DevKv, n: usize, row: usize) {
        if kv.len + n <= kv.cap {
            return;
        }
        let cap = (kv.len + n).next_multiple_of(KV_GROW_POSITIONS);
        let eb = kv.elem.elem_bytes() as usize;
        // A latent cache holds no values: its value buffer stays empty.
        let v_bytes = if kv.latent { 0 } else { cap * row * eb };
        let (k, v) = (self.alloc(cap * row * eb), self.alloc(v_bytes));
        let used = kv.len * row * eb;
        if used > 0 && !self.faulted() {
            let mut r = self.gpu.dtod(k.ptr(), kv.k.ptr(), used);
            if !kv.latent {
                r = r.and_then(|()| self.gpu.dtod(v.ptr(), kv.v.ptr(), used));
            }
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
        self.matvec_into(x.ptr(), rows, w, dtype, n_in, n_out, out.ptr());
        out
    }

    /// [`Cuda::matvec`] from the `[rows, n_in]` rows at `x` into the `[rows, n_out]` rows at
    /// `out` (both inside live buffers).
    #[allow(clippy::too_many_arguments)]
    fn matvec_into(
        &self,
        x: DevPtr,
        rows: usize,
        w: DevPtr,
        dtype: Dtype,
        n_in: usize,
        n_out: usize,
        out: DevPtr,
    ) {
        if rows == 0 || n_out == 0 {
            return;
        }
        if let Some((block, _)) = dtype.block() {
            if !n_in.is_multiple_of(block) {
                self.refuse(format!(
                    "a {} weight with rows of {n_in} values: not whole {block}-value blocks",
                    dtype.name()
                ));
                return;
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
                    x,
                    w,
                    dtype,
                    out,
                    rows,
                    n_out,
                    n_in,
                    scratch.ptr(),
                    scratch_bytes,
                );
                self.ok(r);
            }
            return;
        }
        self.launch(
            matvec_kernel(dtype),
            [u32_of(n_out.div_ceil(8)), 1, 1],
            &[
                KArg::Ptr(x),
                KArg::Ptr(w),
                KArg::Ptr(out),
                KArg::U32(u32_of(rows)),
                KArg::U32(u32_of(n_out)),
                KArg::U32(u32_of(n_in)),
            ],
        );
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

/// Most f32 scratch the transposed [`Backend::head_matmul`] dequantizes a weight's head blocks
/// into at once (the GEMM's scratch bound: DeepSeek-V3's whole `kv_b_proj`, 32 640 rows of 512,
/// fits in one).
const HEAD_SCRATCH_BYTES: usize = GEMM_SCRATCH_BYTES;
/// Activation rows one `head_matmul_t_*` block takes (`HM_ROWS` in head_matmul.cu).
const HEAD_MATMUL_ROWS: usize = 8;
/// Most blocks on a grid's y and z axes.
const MAX_GRID_YZ: usize = 65535;
/// Rows one entry of the grouped matvec takes (`1 <= m <= 8` in matvec.cu): up to this many
/// rows, the not-transposed head products are one launch.
const GROUPED_MAX_ROWS: usize = 8;

/// The `head_matmul_t_*` entry point reading a weight of `dtype` directly, if there is one.
fn head_matmul_t_kernel(dtype: Dtype) -> Option<&'static str> {
    Some(match dtype {
        Dtype::F32 => "head_matmul_t_f32",
        Dtype::Bf16 => "head_matmul_t_bf16",
        Dtype::F16 => "head_matmul_t_f16",
        Dtype::F8B128 => "head_matmul_t_f8",
        Dtype::Q8_0 => "head_matmul_t_q8_0",
        _ => return None,
    })
}

/// Heads whose row blocks (`(heads - 1) * stride + len` rows of `cols` f32) fit
/// `scratch_bytes`: at least one, at most a grid axis.
fn heads_per_scratch(stride: usize, len: usize, cols: usize, scratch_bytes: usize) -> usize {
    let rows = (scratch_bytes / (cols * 4).max(1)).max(len);
    ((rows - len) / stride.max(1) + 1).clamp(1, MAX_GRID_YZ)
}

impl Cuda {
    /// [`Backend::head_matmul`] (see [`Cuda::head_products_within`]).
    fn head_products(
        &self,
        x: &DevBuf,
        rows: usize,
        w: &DevWeight,
        blocks: &HeadBlocks,
        transposed: bool,
    ) -> DevBuf {
        self.head_products_within(x, rows, w, blocks, transposed, HEAD_SCRATCH_BYTES)
    }

    /// [`Backend::head_matmul`], as the CPU computes it. Not transposed, each head is an
    /// ordinary product with its row block, as the CPU's matmul over that head's rows: up to
    /// 8 rows one launch of the grouped decode matvec (`matvec_grouped_*`, every weight type
    /// read directly, one entry per head), more rows one matvec or GEMM per head; with several
    /// rows each head's rows are gathered together first and the products' rows scattered
    /// back. Transposed: one launch of the weight type's `head_matmul_t_*`; a
    /// type without one is dequantized first into f32 scratch of at most `scratch_bytes` (the
    /// rows from a group's first block to its last), then `head_matmul_t_f32` runs over it.
    fn head_products_within(
        &self,
        x: &DevBuf,
        rows: usize,
        w: &DevWeight,
        blocks: &HeadBlocks,
        transposed: bool,
        scratch_bytes: usize,
    ) -> DevBuf {
        let HeadBlocks {
            heads,
            stride,
            offset,
            len,
            cols,
        } = *blocks;
        let (x_width, out_width) = if transposed { (len, cols) } else { (cols, len) };
        let n_out = rows * heads * out_width;
        if rows == 0 || heads == 0 || len == 0 || cols == 0 {
            // Empty sums: zeros, as the CPU gives.
            return self.zeros(n_out);
        }
        let out = self.f32_buf(n_out);
        let w_rows = w.numel / cols;
        let last = (heads - 1)
            .checked_mul(stride)
            .and_then(|r| r.checked_add(offset + len));
        if last.is_none_or(|end| end > w_rows) || !w.numel.is_multiple_of(cols) {
            self.refuse(format!(
                "head_matmul: {heads} heads of rows h * {stride} + {offset} .. + {len} of a \
                 weight of {} values in rows of {cols}: the blocks must lie inside the weight",
                w.numel
            ));
            return out;
        }
        if Self::n_f32(x) < rows * heads * x_width {
            self.refuse(format!(
                "head_matmul: {} input values for {rows} rows of {heads} heads x {x_width}",
                Self::n_f32(x)
            ));
            return out;
        }
        if rows.div_ceil(HEAD_MATMUL_ROWS) > MAX_GRID_YZ {
            self.refuse(format!(
                "head_matmul over {rows} rows: at most {} rows per call",
                MAX_GRID_YZ * HEAD_MATMUL_ROWS
            ));
            return out;
        }
        let (block, block_bytes) = w.dtype.block().unwrap_or((1, w.dtype.size_bytes()));
        if !cols.is_multiple_of(block) {
            self.refuse(format!(
                "head_matmul: a {} weight with rows of {cols} values: not whole {block}-value \
                 blocks",
                w.dtype.name()
            ));
            return out;
        }
        let row_bytes = cols / block * block_bytes;
        if !transposed {
            self.head_rows_grouped(x, rows, w, blocks, row_bytes, &out);
            return out;
        }
        let z = u32_of(rows.div_ceil(HEAD_MATMUL_ROWS));
        let args = |wp: DevPtr, h0: usize, off: usize| {
            [
                x.arg(),
                KArg::Ptr(wp),
                out.arg(),
                KArg::U32(u32_of(rows)),
                KArg::U32(u32_of(heads)),
                KArg::U32(u32_of(h0)),
                KArg::U32(u32_of(stride)),
                KArg::U32(u32_of(off)),
                KArg::U32(u32_of(len)),
                KArg::U32(u32_of(cols)),
            ]
        };
        if let Some(kernel) = head_matmul_t_kernel(w.dtype) {
            for h0 in (0..heads).step_by(MAX_GRID_YZ) {
                let n = (heads - h0).min(MAX_GRID_YZ);
                let wp = w.buf.at(h0 * stride * row_bytes);
                self.launch(
                    kernel,
                    [col_blocks(cols), u32_of(n), z],
                    &args(wp, h0, offset),
                );
            }
            return out;
        }
        if w.dtype.block().is_none() {
            self.refuse(format!(
                "head_matmul: dtype {} has no CUDA kernel",
                w.dtype.name()
            ));
            return out;
        }
        let group = heads_per_scratch(stride, len, cols, scratch_bytes);
        let scratch = self.f32_buf(((group.min(heads) - 1) * stride + len) * cols);
        for h0 in (0..heads).step_by(group) {
            let n = (heads - h0).min(group);
            let first_row = h0 * stride + offset;
            let n_rows = (n - 1) * stride + len;
            self.launch(
                dequant_kernel(w.dtype),
                [stride_blocks(n_rows * cols), 1, 1],
                &[
                    KArg::Ptr(w.buf.at(first_row * row_bytes)),
                    KArg::U64((n_rows * cols / block) as u64),
                    scratch.arg(),
                ],
            );
            self.launch(
                "head_matmul_t_f32",
                [col_blocks(cols), u32_of(n), z],
                &args(scratch.ptr(), h0, 0),
            );
        }
        out
    }

    /// The not-transposed head products into `out` (see [`Cuda::head_products_within`]).
    fn head_rows_grouped(
        &self,
        x: &DevBuf,
        rows: usize,
        w: &DevWeight,
        blocks: &HeadBlocks,
        row_bytes: usize,
        out: &DevBuf,
    ) {
        let HeadBlocks {
            heads,
            stride,
            offset,
            len,
            cols,
        } = *blocks;
        let w_at = |h: usize| w.buf.ptr() + ((h * stride + offset) * row_bytes) as u64;
        if rows == 1 {
            // One row: each head's input and output are already contiguous.
            let entries: Vec<(Dtype, [u64; 4])> = (0..heads)
                .map(|h| {
                    let e = [w_at(h), x.at(h * cols * 4), out.at(h * len * 4), 1];
                    (w.dtype, e)
                })
                .collect();
            self.grouped_matvec(&entries, x, out, len, cols);
            return;
        }
        // Several rows: [rows, heads, cols] gathered to [heads, rows, cols], the products
        // [heads, rows, len] gathered back to [rows, heads, len] (bit copies).
        let n = rows * heads;
        let head_major: Vec<u32> = (0..heads)
            .flat_map(|h| (0..rows).map(move |r| u32_of(r * heads + h)))
            .collect();
        let row_major: Vec<u32> = (0..rows)
            .flat_map(|r| (0..heads).map(move |h| u32_of(h * rows + r)))
            .collect();
        let xt = self.f32_buf(n * cols);
        let ot = self.f32_buf(n * len);
        let gather = |src: &DevBuf, order: &[u32], width: usize, dst: &DevBuf| {
            let order = self.upload(order);
            self.launch(
                "gather_rows_f32",
                [u32_of(n), col_blocks(width), 1],
                &[
                    src.arg(),
                    order.arg(),
                    KArg::U32(u32_of(n)),
                    KArg::U32(u32_of(width)),
                    dst.arg(),
                ],
            );
        };
        gather(x, &head_major, cols, &xt);
        let (xh, oh) = (
            |h: usize| xt.at(h * rows * cols * 4),
            |h: usize| ot.at(h * rows * len * 4),
        );
        if rows <= GROUPED_MAX_ROWS {
            // A batch of decode rows: still one launch, each head's rows one entry (the CPU's
            // product over all of them at once, so the same sums).
            let entries: Vec<(Dtype, [u64; 4])> = (0..heads)
                .map(|h| (w.dtype, [w_at(h), xh(h), oh(h), rows as u64]))
                .collect();
            self.grouped_matvec(&entries, &xt, &ot, len, cols);
        } else {
            // Prefill: one product per head, each the matmul's own (the GEMM from 32 rows).
            for h in 0..heads {
                self.matvec_into(xh(h), rows, w_at(h), w.dtype, cols, len, oh(h));
            }
        }
        gather(&ot, &row_major, len, out);
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
        Dtype::Nf4Bf16 => "nf4bf16",
        Dtype::Nf4F16 => "nf4f16",
        Dtype::Fp4Bf16 => "fp4bf16",
        Dtype::Fp4F16 => "fp4f16",
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
        Dtype::Nf4Bf16 => "matvec_nf4bf16",
        Dtype::Nf4F16 => "matvec_nf4f16",
        Dtype::Fp4Bf16 => "matvec_fp4bf16",
        Dtype::Fp4F16 => "matvec_fp4f16",
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
        Dtype::Nf4Bf16 => "dequant_nf4bf16",
        Dtype::Nf4F16 => "dequant_nf4f16",
        Dtype::Fp4Bf16 => "dequant_fp4bf16",
        Dtype::Fp4F16 => "dequant_fp4f16",
        Dtype::Mxfp4 => "dequant_mxfp4",
        _ => "dequant_fp4",
    }
}

/// The store and attention kernels of a cache of `elem` (`latent`: keys only).
fn kv_kernels(elem: KvElem, latent: bool) -> (&'static str, &'static str) {
    match (elem, latent) {
        (KvElem::F32, false) => ("kv_store_f32", "attention_decode_f32"),
        (KvElem::Bf16, false) => ("kv_store_bf16", "attention_decode_bf16"),
        (KvElem::F16, false) => ("kv_store_f16", "attention_decode_f16"),
        (KvElem::F32, true) => ("kv_store_f32", "attention_latent_f32"),
        (KvElem::Bf16, true) => ("kv_store_bf16", "attention_latent_bf16"),
        (KvElem::F16, true) => ("kv_store_f16", "attention_latent_f16"),
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

    fn split_heads(&self, x: &DevBuf, a: usize, b: usize) -> (DevBuf, DevBuf) {
        // As the CPU: whole blocks of a + b values (the heads of every row).
        let blocks = Self::n_f32(x).checked_div(a + b).unwrap_or(0);
        let (xa, xb) = (self.f32_buf(blocks * a), self.f32_buf(blocks * b));
        if blocks > 0 {
            self.launch(
                "split_heads_f32",
                [u32_of(blocks), col_blocks(a + b), 1],
                &[
                    x.arg(),
                    xa.arg(),
                    xb.arg(),
                    KArg::U32(u32_of(blocks)),
                    KArg::U32(u32_of(a)),
                    KArg::U32(u32_of(b)),
                ],
            );
        }
        (xa, xb)
    }

    fn join_heads(&self, x: &DevBuf, y: &DevBuf, a: usize, b: usize) -> DevBuf {
        // As the CPU: as many blocks as both inputs hold whole heads for.
        let blocks = (Self::n_f32(x) / a.max(1)).min(Self::n_f32(y) / b.max(1));
        let out = self.f32_buf(blocks * (a + b));
        if blocks > 0 && a + b > 0 {
            self.launch(
                "join_heads_f32",
                [u32_of(blocks), col_blocks(a + b), 1],
                &[
                    x.arg(),
                    y.arg(),
                    out.arg(),
                    KArg::U32(u32_of(blocks)),
                    KArg::U32(u32_of(a)),
                    KArg::U32(u32_of(b)),
                ],
            );
        }
        out
    }

    fn head_matmul(
        &self,
        x: &DevBuf,
        rows: usize,
        w: &DevWeight,
        blocks: &HeadBlocks,
        transposed: bool,
    ) -> DevBuf {
        self.head_products(x, rows, w, blocks, transposed)
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
                KArg::U32(u32::from(rope.interleaved)),
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
            latent: false,
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
        v: Option<&DevBuf>,
        lens: &[usize],
        caches: &mut [&mut DevKv],
        shape: &AttnShape,
        sinks: Option<&DevVec>,
    ) -> DevBuf {
        let (nh, nkv, hd) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        // A latent cache (no values) reads each head's values from its key row.
        let latent = v.is_none();
        let vd = if latent { shape.value_dim } else { hd };
        let sinks = sinks.map_or(KArg::Ptr(0), |s| s.buf.arg());
        let rows: usize = lens.iter().sum();
        let out = self.f32_buf(rows * nh * vd);
        if rows == 0 {
            return out;
        }
        if nkv == 0 || nh % nkv != 0 {
            self.refuse(format!(
                "attention with {nh} heads and {nkv} KV heads: the CUDA kernels take heads a \
                 multiple of KV heads"
            ));
            return out;
        }
        if latent {
            if hd > ATTENTION_LATENT_MAX_HEAD_DIM
                || vd > hd.min(ATTENTION_LATENT_MAX_VALUE_DIM)
                || nh.div_ceil(ATTENTION_LATENT_HEADS) > MAX_GRID_YZ
            {
                self.refuse(format!(
                    "latent attention with {nh} heads, head_dim {hd} and value_dim {vd}: the CUDA \
                     kernel takes head_dim <= {ATTENTION_LATENT_MAX_HEAD_DIM} and value_dim <= \
                     {ATTENTION_LATENT_MAX_VALUE_DIM} (and <= head_dim)"
                ));
                return out;
            }
        } else if hd > ATTENTION_MAX_HEAD_DIM || shape.value_dim != hd {
            self.refuse(format!(
                "attention with head_dim {hd} and value_dim {}: the CUDA kernel takes head_dim \
                 <= {ATTENTION_MAX_HEAD_DIM} and values as wide as keys",
                shape.value_dim
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
            if kv.latent != latent {
                if kv.len > 0 {
                    self.refuse(format!(
                        "a KV cache holding {} is attended {}",
                        if kv.latent {
                            "keys only"
                        } else {
                            "keys and values"
                        },
                        if latent {
                            "without values"
                        } else {
                            "with values"
                        }
                    ));
                    return out;
                }
                // An empty cache changes form: its buffers are allocated again for it.
                kv.latent = latent;
                kv.cap = 0;
            }
            self.kv_reserve(kv, n, kvr);
            let (store, attend) = kv_kernels(kv.elem, latent);
            attention = Some(attend);
            let eb = kv.elem.elem_bytes() as usize;
            let sources = [(k, &kv.k)].into_iter().chain(v.map(|v| (v, &kv.v)));
            for (src, dst) in sources {
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
        if caches
            .iter()
            .any(|c| kv_kernels(c.elem, latent).1 != kernel)
        {
            self.refuse("sequences of one batch hold KV caches of different types".into());
            return out;
        }
        let (k_addr, pos) = (self.upload(&k_addr), self.upload(&pos));
        let window = shape.sliding_window.filter(|&w| w > 0).map_or(0, u32_of);
        let scale = shape.scale;
        let splits = attention_splits(longest);
        let partial = (splits > 1).then(|| self.f32_buf(rows * nh * splits * (vd + 2)));
        let partial_arg = partial.as_ref().map_or(KArg::Ptr(0), DevBuf::arg);
        if latent {
            self.launch(
                kernel,
                [
                    u32_of(rows),
                    u32_of(nh.div_ceil(ATTENTION_LATENT_HEADS)),
                    u32_of(splits),
                ],
                &[
                    q.arg(),
                    k_addr.arg(),
                    pos.arg(),
                    KArg::U32(window),
                    KArg::U32(u32_of(nh)),
                    KArg::U32(u32_of(nkv)),
                    KArg::U32(u32_of(hd)),
                    KArg::U32(u32_of(vd)),
                    KArg::F32(scale),
                    KArg::U32(u32_of(splits)),
                    partial_arg,
                    out.arg(),
                    sinks,
                ],
            );
        } else {
            let v_addr = self.upload(&v_addr);
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
                    partial_arg,
                    out.arg(),
                    sinks,
                ],
            );
        }
        if let Some(partial) = &partial {
            self.launch(
                "attention_merge_f32",
                [u32_of(rows), u32_of(nh), 1],
                &[
                    partial.arg(),
                    KArg::U32(u32_of(splits)),
                    KArg::U32(u32_of(nh)),
                    KArg::U32(u32_of(vd)),
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

    /// A `[rows, cols]` weight of `dtype` holding `bytes`, in owned storage.
    fn weight_of(dtype: Dtype, rows: usize, cols: usize, bytes: Vec<u8>) -> TensorRef {
        use crate::weights::Storage;
        let len = bytes.len();
        let mut words = vec![0u64; len.div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..len].copy_from_slice(&bytes);
        TensorRef::in_storage(
            "kv_b_proj.weight".into(),
            Arc::new(std::path::PathBuf::from("/models/t/model.safetensors")),
            dtype,
            vec![rows, cols],
            Arc::new(Storage::Words { words, len }),
            0,
            len,
        )
    }

    /// Random `[rows, cols]` weights in every type the backend holds: the floats encoded, the
    /// GGML blocks quantized, the pre-quantized blocks with random codes and scales.
    fn weights_of_every_type(rng: &mut Rng, rows: usize, cols: usize) -> Vec<TensorRef> {
        let vals = random(rng, rows * cols);
        let f32_w = weight_of(Dtype::F32, rows, cols, bytemuck::cast_slice(&vals).to_vec());
        let mut out = vec![
            weight_of(
                Dtype::Bf16,
                rows,
                cols,
                cpu::attention::encode_kv(KvElem::Bf16, &vals),
            ),
            weight_of(
                Dtype::F16,
                rows,
                cols,
                cpu::attention::encode_kv(KvElem::F16, &vals),
            ),
        ];
        for to in [Dtype::Q8_0, Dtype::Q4K] {
            out.push(f32_w.quantize(to).unwrap().expect("a quantizable shape"));
        }
        out.insert(0, f32_w);
        let mut byte = || (rng.next_f64() * 256.0) as u8;
        // (block values, block bytes, scale bytes) of the pre-quantized formats.
        for (dtype, values, bytes) in [
            (Dtype::F8B128, 128usize, 132usize),
            (Dtype::Nf4, 64, 36),
            (Dtype::Mxfp4, 32, 17),
        ] {
            let blocks = rows * cols / values;
            let mut w = Vec::with_capacity(blocks * bytes);
            for b in 0..blocks {
                if dtype == Dtype::Mxfp4 {
                    // E8M0 scales around 1 (2^-4 .. 2^3).
                    w.push(123 + (b % 8) as u8);
                } else {
                    w.extend_from_slice(&(0.01 + 0.001 * (b % 13) as f32).to_le_bytes());
                }
                while w.len() % bytes != 0 {
                    let c = byte();
                    // No FP8 NaN codes (0x7F, 0xFF): NaN payloads are not compared here.
                    w.push(if dtype == Dtype::F8B128 && c & 0x7F == 0x7F {
                        0x3C
                    } else {
                        c
                    });
                }
            }
            out.push(weight_of(dtype, rows, cols, w));
        }
        out
    }

    #[test]
    fn split_and_join_heads_on_the_mock_equal_the_cpu() {
        let cuda = Cuda::mock(u64::MAX);
        let cpu = Cpu::default();
        let mut rng = Rng::new(3);
        // MLA's q heads (nope 128 | rope 64) and small ragged ones, over several rows.
        for (rows, heads, a, b) in [
            (3usize, 4usize, 128usize, 64usize),
            (5, 3, 7, 300),
            (1, 2, 1, 0),
        ] {
            let x = random(&mut rng, rows * heads * (a + b));
            let (wa, wb) = cpu.split_heads(&x, a, b);
            let (ga, gb) = cuda.split_heads(&cuda.act_from_host(x.clone()), a, b);
            cuda.check().unwrap();
            assert_eq!(
                cuda.to_host(&ga).into_owned(),
                wa,
                "split {a} | {b}: first parts"
            );
            assert_eq!(
                cuda.to_host(&gb).into_owned(),
                wb,
                "split {a} | {b}: second parts"
            );
            let joined = cuda.join_heads(&ga, &gb, a, b);
            cuda.check().unwrap();
            assert_eq!(
                cuda.to_host(&joined).into_owned(),
                cpu.join_heads(&wa, &wb, a, b)
            );
            if a > 0 && b > 0 {
                assert_eq!(cuda.to_host(&joined).into_owned(), x, "join undoes split");
            }
        }
    }

    #[test]
    fn head_matmul_on_the_mock_equals_the_cpu_for_every_weight_type() {
        let mock = Arc::new(mock::MockGpu::new());
        let cuda = Cuda::on(mock.clone(), u64::MAX);
        let cpu = Cpu::default();
        let mut rng = Rng::new(5);
        // 3 heads of stride 20 rows in a [60, 256] weight (kv_b_proj's nope rows 0..8 and value
        // rows 8..20 of each head, in small): one decode row, a batch of 3 decode rows (one
        // grouped launch), prefills of 11 rows (past 8 rows per block) and of 33 (the GEMM).
        let (heads, stride, cols) = (3usize, 20usize, 256usize);
        for w in weights_of_every_type(&mut rng, heads * stride, cols) {
            let wd = cuda.upload_weight(w.clone()).unwrap();
            for (offset, len) in [(0usize, 8usize), (8, 12)] {
                let blocks = HeadBlocks {
                    heads,
                    stride,
                    offset,
                    len,
                    cols,
                };
                for rows in [1usize, 3, 11, 33] {
                    for transposed in [false, true] {
                        let x_width = if transposed { len } else { cols };
                        let x = random(&mut rng, rows * heads * x_width);
                        let want = cpu.head_matmul(&x, rows, &w, &blocks, transposed);
                        let got = cuda.head_matmul(
                            &cuda.act_from_host(x),
                            rows,
                            &wd,
                            &blocks,
                            transposed,
                        );
                        cuda.check().unwrap();
                        let got = cuda.to_host(&got).into_owned();
                        assert!(
                            bits(&got) == bits(&want),
                            "{} offset {offset} len {len} rows {rows} transposed {transposed}",
                            w.dtype.name()
                        );
                    }
                }
            }
        }
        let launched = mock.launched();
        for k in [
            "gemm",
            "matvec_q4_k",
            "matvec_grouped_bf16",
            "matvec_grouped_q4_k",
            "gather_rows_f32",
            "head_matmul_t_f8",
            "head_matmul_t_q8_0",
            "dequant_q4_k",
            "head_matmul_t_f32",
        ] {
            assert!(launched.contains(&k), "{k} was not launched");
        }
        // Scratch for two heads' blocks at a time: the dequantized path runs in groups.
        let scratch_bytes = (stride + 12) * cols * 4;
        assert_eq!(heads_per_scratch(stride, 12, cols, scratch_bytes), 2);
        assert_eq!(heads_per_scratch(stride, 12, cols, 0), 1);
        let blocks = HeadBlocks {
            heads,
            stride,
            offset: 8,
            len: 12,
            cols,
        };
        let nf4 = weights_of_every_type(&mut rng, heads * stride, cols)
            .into_iter()
            .find(|w| w.dtype == Dtype::Nf4)
            .unwrap();
        let x = random(&mut rng, 3 * heads * 12);
        let want = cpu.head_matmul(&x, 3, &nf4, &blocks, true);
        let before = mock.launched().len();
        let got = cuda.head_products_within(
            &cuda.act_from_host(x),
            3,
            &cuda.upload_weight(nf4).unwrap(),
            &blocks,
            true,
            scratch_bytes,
        );
        cuda.check().unwrap();
        assert!(bits(&cuda.to_host(&got)) == bits(&want), "grouped scratch");
        let groups = mock.launched()[before..]
            .iter()
            .filter(|k| **k == "dequant_nf4")
            .count();
        assert_eq!(groups, 2, "3 heads in groups of 2");
        // A block past the weight's rows is refused, naming the blocks.
        let w = cuda
            .upload_weight(weight_of(Dtype::F32, 4, 8, vec![0; 128]))
            .unwrap();
        let blocks = HeadBlocks {
            heads: 2,
            stride: 3,
            offset: 0,
            len: 2,
            cols: 8,
        };
        let _ = cuda.head_matmul(&cuda.zeros(2 * 8), 1, &w, &blocks, false);
        let e = cuda.check().unwrap_err().to_string();
        assert!(e.contains("must lie inside the weight"), "{e}");
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn interleaved_rope_on_the_mock_equals_the_cpu() {
        let cuda = Cuda::mock(u64::MAX);
        let cpu = Cpu::default();
        let mut rng = Rng::new(9);
        // DeepSeek-V3's shape in small: 64 rope values of a 64-wide key head and of 3 query
        // heads of 64, at positions of two sequences.
        let (rot, hd) = (64usize, 64usize);
        let rope = Rope {
            inv_freq: (0..rot / 2)
                .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / rot as f32))
                .collect(),
            attention_scaling: 1.2,
            rot_dim: rot,
            interleaved: true,
        };
        let positions = [0usize, 1, 2, 900, 5];
        let n = positions.len();
        let (q, k) = (random(&mut rng, n * 3 * hd), random(&mut rng, n * hd));
        let (mut qc, mut kc) = (q.clone(), k.clone());
        cpu.rope(&mut qc, &mut kc, hd, &positions, &rope);
        let (mut qg, mut kg) = (cuda.act_from_host(q.clone()), cuda.act_from_host(k));
        cuda.rope(&mut qg, &mut kg, hd, &positions, &rope);
        cuda.check().unwrap();
        assert!(bits(&cuda.to_host(&qg)) == bits(&qc), "q differs");
        assert!(bits(&cuda.to_host(&kg)) == bits(&kc), "k differs");
        assert_ne!(qc, q, "the rope turned something");
    }

    #[test]
    fn latent_attention_on_the_mock_equals_the_cpu() {
        // MLA in small: 6 query heads over one latent KV head of 40 (a 32-value latent and 8
        // rope values), values the first 32 of each key.
        let (nh, nkv, hd, vd) = (6usize, 1usize, 40usize, 32usize);
        let shape = AttnShape {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            value_dim: vd,
            scale: 0.11,
            sliding_window: None,
        };
        let cuda = Cuda::mock(u64::MAX);
        let cpu = Cpu::default();
        let mut rng = Rng::new(13);
        for (elem, window) in [
            (KvElem::F32, None),
            (KvElem::Bf16, None),
            (KvElem::F16, None),
            (KvElem::Bf16, Some(5)),
        ] {
            let shape = AttnShape {
                sliding_window: window,
                ..shape
            };
            // Two sequences in one batch: prefills of 9 and 4 rows, then decode steps of both.
            let mut kc: Vec<_> = (0..2).map(|_| cpu.kv_new(elem)).collect();
            let mut kg: Vec<_> = (0..2).map(|_| cuda.kv_new(elem)).collect();
            for lens in [[9usize, 4], [1, 1], [1, 1]] {
                let rows: usize = lens.iter().sum();
                let q = random(&mut rng, rows * nh * hd);
                let k = random(&mut rng, rows * nkv * hd);
                let mut cref: Vec<&mut _> = kc.iter_mut().collect();
                let want = cpu.attend(&q, &k, None, &lens, &mut cref, &shape, None);
                let mut gref: Vec<&mut _> = kg.iter_mut().collect();
                let (qd, kd) = (cuda.act_from_host(q), cuda.act_from_host(k));
                let got = cuda.attend(&qd, &kd, None, &lens, &mut gref, &shape, None);
                cuda.check().unwrap();
                assert_eq!(want.len(), rows * nh * vd);
                let got = cuda.to_host(&got).into_owned();
                assert!(
                    bits(&got) == bits(&want),
                    "{elem:?} {lens:?}: outputs differ"
                );
            }
            // A latent cache holds its keys only.
            let eb = elem.elem_bytes() as usize;
            assert_eq!(cuda.kv_bytes(&kg[0]), KV_GROW_POSITIONS * nkv * hd * eb);
            assert_eq!(cuda.kv_len(&kg[0]), 11);
        }
    }

    #[test]
    fn long_latent_contexts_split_and_stay_within_rounding_of_the_cpu() {
        // DeepSeek-V3's latent widths (576-wide keys, 512 values) over 1400 positions (3
        // splits, the merge over 512-wide values), with a 2-byte cache and with sinks.
        let (nh, nkv, hd, vd) = (3usize, 1usize, 576usize, 512usize);
        let cuda = Cuda::mock(u64::MAX);
        let cpu = Cpu::default();
        let mut rng = Rng::new(17);
        for (elem, with_sinks) in [(KvElem::Bf16, false), (KvElem::F32, true)] {
            let shape = AttnShape {
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                value_dim: vd,
                scale: 0.04,
                sliding_window: None,
            };
            let sinks = with_sinks.then(|| random(&mut rng, nh));
            let sinks_dev = sinks.clone().map(|s| cuda.upload_vector(s).unwrap());
            let (mut kc, mut kg) = (cpu.kv_new(elem), cuda.kv_new(elem));
            for n in [1400usize, 1] {
                let q = random(&mut rng, n * nh * hd);
                let k = random(&mut rng, n * nkv * hd);
                let want = cpu.attend(&q, &k, None, &[n], &mut [&mut kc], &shape, sinks.as_ref());
                let (qd, kd) = (cuda.act_from_host(q), cuda.act_from_host(k));
                let got = cuda.attend(
                    &qd,
                    &kd,
                    None,
                    &[n],
                    &mut [&mut kg],
                    &shape,
                    sinks_dev.as_ref(),
                );
                cuda.check().unwrap();
                let got = cuda.to_host(&got).into_owned();
                assert_eq!(got.len(), want.len());
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-5,
                    "{elem:?} sinks {with_sinks} {n} rows: off by {worst}"
                );
            }
        }
        // Widths past the kernel's are refused, naming them.
        let shape = AttnShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 640,
            value_dim: 512,
            scale: 0.04,
            sliding_window: None,
        };
        let mut kv = cuda.kv_new(KvElem::F32);
        let (q, k) = (cuda.zeros(2 * 640), cuda.zeros(640));
        let _ = cuda.attend(&q, &k, None, &[1], &mut [&mut kv], &shape, None);
        let e = cuda.check().unwrap_err().to_string();
        assert!(e.contains("head_dim <= 576"), "{e}");
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
            let shape = AttnShape::standard(nh, nkv, hd, window);
            let (mut kc, mut kg) = (cpu.kv_new(elem), cuda.kv_new(elem));
            // A 1400-position prompt, then two decode steps: every step past the split point.
            for n in [1400usize, 1, 1] {
                let q = random(&mut rng, n * nh * hd);
                let k = random(&mut rng, n * nkv * hd);
                let v = random(&mut rng, n * nkv * hd);
                let want = cpu.attend(
                    &q,
                    &k,
                    Some(&v),
                    &[n],
                    &mut [&mut kc],
                    &shape,
                    sinks.as_ref(),
                );
                let (qd, kd, vd) = (
                    cuda.act_from_host(q),
                    cuda.act_from_host(k),
                    cuda.act_from_host(v),
                );
                let got = cuda.attend(
                    &qd,
                    &kd,
                    Some(&vd),
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
