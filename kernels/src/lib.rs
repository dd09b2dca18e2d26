//! CPU matmul kernels for moe-offload: plain functions on slices.
//!
//! This crate owns `y = x · Wᵀ` for weights in Hugging Face layout (`W` is `[n, k]`, row-major,
//! stored as f32, bf16 or f16, quantized in GGML's Q8_0 / Q4_K block layouts (see [`quant`]), or
//! in the blocks of pre-quantized checkpoints: FP8 E4M3 with per-128 scales, bitsandbytes
//! NF4 / FP4 with per-64 scales and MXFP4 with an E8M0 scale per 32 (see [`prequant`])), plus
//! `dot`, `axpy` and widening one stored row to f32. It knows nothing of tensors, models or
//! files. Quantized weights keep f32
//! activations and f32 accumulation: the result is exactly the f32 kernel's on `dequantize(W)`
//! (dequantization is exact and level-independent).
//! The q8-activation path ([`matmul_q8`], [`matmul_q8_par`] on [`Q8Activations`]) is the one
//! that also rounds x (to 8 bits per 32-value block), for speed; callers opt into it.
//!
//! What must always hold:
//! - Every SIMD path has a scalar twin (the [`scalar`] module) and is tested against it and
//!   against an f64 reference, on ragged shapes, for every dtype and quantized format, at every
//!   SIMD level the test machine supports (levels are forced through an internal `matmul_with`).
//! - SIMD code is chosen at run time (CPU features detected once and cached); nothing requires
//!   `target-cpu=native`, and non-x86_64 targets compile the scalar path only.
//! - Accumulation is in f32 and exact f32 semantics are kept: weights are widened exactly
//!   (bf16: `bits << 16`; f16: IEEE conversion; quantized blocks: GGML's dequantization, each
//!   value computed with one rounding at most; pre-quantized blocks: `scale · table[code]`, one
//!   rounding) and `x` is never rounded to a narrower type (except in
//!   [`matmul_q8_activations`], which says so).
//! - Results are deterministic: which code path and summation order produce an output element
//!   depends only on the SIMD level and on `m` (matvec vs GEMM), never on the thread count, the
//!   chunking or the element's position in a tile, so `matmul` equals `matmul_serial` bit for bit.

#![warn(unsafe_op_in_unsafe_fn)]

use std::marker::PhantomData;
use std::sync::OnceLock;

use half::{bf16, f16};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod bf16dot;
#[cfg(test)]
mod bf16dot_tests;
#[cfg(target_arch = "x86_64")]
mod bf16dot_x86;
pub mod cuda;
#[cfg(target_arch = "x86_64")]
mod gemm;
pub mod nvrtc;
pub mod prequant;
mod qdot;
#[cfg(test)]
mod qdot_tests;
#[cfg(target_arch = "x86_64")]
mod qdot_x86;
pub mod quant;
#[cfg(target_arch = "x86_64")]
mod quant_avx2;
#[cfg(target_arch = "x86_64")]
mod quant_avx512;
pub mod scalar;
#[cfg(test)]
mod tests;

pub use bf16dot::{bf16_activations_supported, matmul_bf16, matmul_bf16_par};
pub use prequant::{
    dequantize_row_f8, dequantize_row_fp4, dequantize_row_mxfp4, dequantize_row_nf4,
    dequantize_row_rounded4, e8m0_to_f32, BlockF8, BlockFp4, BlockMxfp4, BlockNf4, Round4,
    Rounded4, Table4, E4M3_TO_F32, FP4_TABLE, MXFP4_TABLE, NF4_TABLE, QK_B4, QK_F8, QK_MX,
};
pub use qdot::{
    matmul_q8, matmul_q8_activations, matmul_q8_par, q8_activations_supported, Q8Activations,
};
pub use quant::{BlockQ4K, BlockQ8_0};

/// A weight matrix [n, k], row-major, in its stored dtype.
///
/// The quantized variants hold GGML blocks ([`quant`]) or pre-quantized checkpoint blocks
/// ([`prequant`]): row `j` is blocks `j·k/B .. (j+1)·k/B` with `B` = 32 (`Q8_0`), 256 (`Q4K`),
/// 128 (`F8`), 64 (`Nf4`, `Fp4`) or 32 (`Mxfp4`), so `k` must be a multiple of `B`.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    /// GGML Q8_0 blocks, 32 weights each.
    Q8_0(&'a [BlockQ8_0]),
    /// GGML Q4_K super-blocks, 256 weights each.
    Q4K(&'a [BlockQ4K]),
    /// FP8 E4M3 blocks with an f32 scale, 128 weights each.
    F8(&'a [BlockF8]),
    /// bitsandbytes NF4 blocks with an f32 scale, 64 weights each.
    Nf4(&'a [BlockNf4]),
    /// bitsandbytes FP4 blocks with an f32 scale, 64 weights each.
    Fp4(&'a [BlockFp4]),
    /// bitsandbytes NF4 or FP4 blocks whose values are rounded to bf16 / f16 (the quant
    /// state's `dtype`), 64 weights each.
    Rounded4(Rounded4<'a>),
    /// OCP MX FP4 blocks with an E8M0 scale, 32 weights each.
    Mxfp4(&'a [BlockMxfp4]),
}

impl<'a> Weights<'a> {
    /// Number of weights (n·k): stored elements for f32/bf16/f16, blocks × the block size
    /// ([`Weights::block_size`]) for quantized weights. `matmul` checks it against n·k.
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
            Weights::F16(w) => w.len(),
            Weights::Q8_0(w) => w.len() * quant::QK8_0,
            Weights::Q4K(w) => w.len() * quant::QK_K,
            Weights::F8(w) => w.len() * QK_F8,
            Weights::Nf4(w) => w.len() * QK_B4,
            Weights::Fp4(w) => w.len() * QK_B4,
            Weights::Rounded4(r) => r.blocks.len() * QK_B4,
            Weights::Mxfp4(w) => w.len() * QK_MX,
        }
    }

    /// Weights per block: 1 for unquantized dtypes, 32 for `Q8_0`, 256 for `Q4K`, 128 for `F8`,
    /// 64 for `Nf4` and `Fp4`, 32 for `Mxfp4`. Row lengths must be multiples of it.
    pub fn block_size(&self) -> usize {
        match self {
            Weights::F32(_) | Weights::Bf16(_) | Weights::F16(_) => 1,
            Weights::Q8_0(_) => quant::QK8_0,
            Weights::Q4K(_) => quant::QK_K,
            Weights::F8(_) => QK_F8,
            Weights::Nf4(_) | Weights::Fp4(_) | Weights::Rounded4(_) => QK_B4,
            Weights::Mxfp4(_) => QK_MX,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `r0..r1` of a matrix with rows of length `k`.
    fn rows(self, r0: usize, r1: usize, k: usize) -> Weights<'a> {
        match self {
            Weights::F32(w) => Weights::F32(&w[r0 * k..r1 * k]),
            Weights::Bf16(w) => Weights::Bf16(&w[r0 * k..r1 * k]),
            Weights::F16(w) => Weights::F16(&w[r0 * k..r1 * k]),
            Weights::Q8_0(w) => {
                let b = k / quant::QK8_0;
                Weights::Q8_0(&w[r0 * b..r1 * b])
            }
            Weights::Q4K(w) => {
                let b = k / quant::QK_K;
                Weights::Q4K(&w[r0 * b..r1 * b])
            }
            Weights::F8(w) => {
                let b = k / QK_F8;
                Weights::F8(&w[r0 * b..r1 * b])
            }
            Weights::Nf4(w) => {
                let b = k / QK_B4;
                Weights::Nf4(&w[r0 * b..r1 * b])
            }
            Weights::Fp4(w) => {
                let b = k / QK_B4;
                Weights::Fp4(&w[r0 * b..r1 * b])
            }
            Weights::Rounded4(r) => {
                let b = k / QK_B4;
                Weights::Rounded4(Rounded4 {
                    blocks: &r.blocks[r0 * b..r1 * b],
                    ..r
                })
            }
            Weights::Mxfp4(w) => {
                let b = k / QK_MX;
                Weights::Mxfp4(&w[r0 * b..r1 * b])
            }
        }
    }

    /// The quantized view, if any.
    fn quantized(self) -> Option<quant::QWeights<'a>> {
        match self {
            Weights::Q8_0(w) => Some(quant::QWeights::Q8_0(w)),
            Weights::Q4K(w) => Some(quant::QWeights::Q4K(w)),
            Weights::F8(w) => Some(quant::QWeights::F8(w)),
            Weights::Nf4(w) => Some(quant::QWeights::Nf4(w)),
            Weights::Fp4(w) => Some(quant::QWeights::Fp4(w)),
            Weights::Rounded4(r) => Some(quant::QWeights::Rounded4(r)),
            Weights::Mxfp4(w) => Some(quant::QWeights::Mxfp4(w)),
            Weights::F32(_) | Weights::Bf16(_) | Weights::F16(_) => None,
        }
    }
}

/// A stored weight element that widens exactly to f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// Zero of this type (padding for ragged tails).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const ZERO: Self;
    fn widen(self) -> f32;
}

impl Elem for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    const ZERO: Self = bf16::ZERO;
    #[inline(always)]
    fn widen(self) -> f32 {
        // bf16 is the top half of an f32: widening is a shift, exact for every value incl. NaN.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Elem for f16 {
    const ZERO: Self = f16::ZERO;
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// SIMD level a kernel runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Scalar,
    /// AVX2 + FMA + F16C, 8 f32 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F + BW + VL, 16 f32 lanes (BW/VL for 16-bit masked loads of bf16/f16 tails),
    /// on top of the AVX2 level (the GEMM packing step runs at the AVX2 level).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the level (always re-checks the CPU; cheap, std caches it).
    fn supported(self) -> bool {
        match self {
            Level::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma")
                    && std::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                Level::Avx2.supported()
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
            }
        }
    }
}

/// Every level this build knows, best first.
const ALL_LEVELS: &[Level] = &[
    #[cfg(target_arch = "x86_64")]
    Level::Avx512,
    #[cfg(target_arch = "x86_64")]
    Level::Avx2,
    Level::Scalar,
];

/// Panics unless this CPU can run `level`: the check every forced level passes before any SIMD
/// code runs. The detected level is supported by construction, so it skips the CPU query.
fn assert_supported(level: Level) {
    assert!(
        level == self::level() || level.supported(),
        "SIMD level {level:?} not supported on this CPU"
    );
}

/// The best level this CPU supports, detected once.
fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        ALL_LEVELS
            .iter()
            .copied()
            .find(|l| l.supported())
            .unwrap_or(Level::Scalar)
    })
}

/// Levels this CPU can run, best first (tests force each one).
#[cfg(test)]
pub(crate) fn supported_levels() -> Vec<Level> {
    ALL_LEVELS
        .iter()
        .copied()
        .filter(|l| l.supported())
        .collect()
}

/// Which SIMD level was selected at run time ("avx512", "avx2" or "scalar"). There is no
/// "avx512bf16" level: `vdpbf16ps` rounds x to bf16, which would break exact f32 semantics.
pub fn simd_level() -> &'static str {
    level().name()
}

/// Calls with at most this many rows of `x` use the streaming matvec kernel (each weight row is
/// read once and all m dot products are taken from it); more rows use the packed, cache-blocked
/// GEMM, which reuses each widened weight tile across many rows. Decode batches sit below it.
pub const MATVEC_MAX_M: usize = 8;

/// Below this many multiply-adds (m·n·k) a call runs on the calling thread, and no parallel chunk
/// gets less: 2^18 FMAs take ~5 µs (GEMM) to ~25 µs (memory-bound matvec) on one core, more than
/// rayon's few-µs fork/join cost, so splitting smaller work gains nothing.
const PAR_MIN_WORK: usize = 1 << 18;

/// Chunks per thread in a parallel call: several, so that rayon's work stealing evens out
/// threads slowed by other processes (the split never changes results, see the crate doc).
const PAR_CHUNKS_PER_THREAD: usize = 4;

/// Column chunks handed to threads are multiples of this (the widest GEMM panel), so no thread
/// gets a sliver narrower than one tile.
const PAR_COL_ALIGN: usize = 32;

/// Row chunks (used only when n is too narrow to split) are multiples of this (the largest GEMM
/// row tile), for the same reason.
const PAR_ROW_ALIGN: usize = 8;

/// A mutable `[rows, cols]` block inside a row-major matrix with row stride `ld`.
///
/// Invariant: for every `i < rows`, the elements `ptr + i*ld .. ptr + i*ld + cols` lie inside
/// the `&'a mut [f32]` the block was carved from, and no other live `OutBlock` covers them
/// (blocks are only made by `new` and by the disjoint splits below).
pub(crate) struct OutBlock<'a> {
    ptr: *mut f32,
    ld: usize,
    rows: usize,
    cols: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: an OutBlock is a unique borrow of disjoint f32s, exactly like `&mut [f32]`, which is Send.
unsafe impl Send for OutBlock<'_> {}

impl<'a> OutBlock<'a> {
    pub(crate) fn new(out: &'a mut [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(out.len(), rows * cols);
        OutBlock {
            ptr: out.as_mut_ptr(),
            ld: cols,
            rows,
            cols,
            _borrow: PhantomData,
        }
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Row `i` of the block (`cols` elements).
    #[inline]
    pub(crate) fn row(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.rows);
        // SAFETY: i < rows, so by the type invariant these `cols` elements are in bounds and
        // borrowed uniquely by `self`; the returned borrow is tied to `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.ld), self.cols) }
    }

    /// Splits into columns `..at` and `at..`.
    fn split_cols(self, at: usize) -> (Self, Self) {
        assert!(at <= self.cols);
        let right = OutBlock {
            // wrapping_add: when at == cols the pointer may be one past a row's end and is never
            // dereferenced (cols == 0 there); otherwise it stays inside row 0.
            ptr: self.ptr.wrapping_add(at),
            cols: self.cols - at,
            ..self
        };
        (OutBlock { cols: at, ..self }, right)
    }

    /// Splits into rows `..at` and `at..`.
    fn split_rows(self, at: usize) -> (Self, Self) {
        assert!(at <= self.rows);
        let lower = OutBlock {
            // wrapping_add: with at == rows this can point past the borrowed slice; it is never
            // dereferenced because that block has zero rows.
            ptr: self.ptr.wrapping_add(at * self.ld),
            rows: self.rows - at,
            ..self
        };
        (OutBlock { rows: at, ..self }, lower)
    }
}

fn check_matmul(x: &[f32], m: usize, k: usize, w: &Weights<'_>, n: usize, out: &[f32]) {
    check_matmul_shapes("matmul", x.len(), m, k, w, n, out.len())
}

/// The shape checks of every matmul entry point (`what` names it in the panic message): x has
/// m·k elements, k is a multiple of the weights' block size, w holds n·k weights, out m·n.
pub(crate) fn check_matmul_shapes(
    what: &str,
    x_len: usize,
    m: usize,
    k: usize,
    w: &Weights<'_>,
    n: usize,
    out_len: usize,
) {
    let mk = m.checked_mul(k).expect("matmul: m*k overflows usize");
    let nk = n.checked_mul(k).expect("matmul: n*k overflows usize");
    let mn = m.checked_mul(n).expect("matmul: m*n overflows usize");
    assert!(
        x_len == mk,
        "{what}: x has {x_len} elements, expected m*k = {m}*{k}"
    );
    assert!(
        k.is_multiple_of(w.block_size()),
        "{what}: k = {k} is not a multiple of the weights' block size {}",
        w.block_size()
    );
    assert!(
        w.len() == nk,
        "{what}: w has {} elements, expected n*k = {n}*{k}",
        w.len()
    );
    assert!(
        out_len == mn,
        "{what}: out has {out_len} elements, expected m*n = {m}*{n}"
    );
}

/// out[m, n] = x[m, k] · w[n, k]ᵀ, f32 accumulation, overwrites `out`.
/// Large calls are split over the current rayon pool; the result does not depend on how.
/// Panics if slice lengths do not match m*k, n*k, m*n (for quantized weights: if k is not a
/// multiple of the block size or the block count is not n·k / block size).
pub fn matmul(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, out: &mut [f32]) {
    matmul_with(level(), true, x, m, k, w, n, out);
}

/// Same as [`matmul`] but single-threaded (for callers that parallelise at a higher level).
pub fn matmul_serial(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, out: &mut [f32]) {
    matmul_with(level(), false, x, m, k, w, n, out);
}

/// [`matmul`] at a given level (tests force each one); panics if the CPU cannot run it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_with(
    level: Level,
    parallel: bool,
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    out: &mut [f32],
) {
    check_matmul(x, m, k, &w, n, out);
    assert_supported(level);
    if k == 0 {
        out.fill(0.0);
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    // Decided once from the whole call, so every chunk runs the same path.
    let use_gemm = m > MATVEC_MAX_M;
    let block = OutBlock::new(out, m, n);
    let work = m.saturating_mul(n).saturating_mul(k);
    // n too narrow to split: only the GEMM path splits x rows (the matvec path's order does
    // not depend on m either, but decode batches are too small to be worth it).
    run_split(parallel, work, block, use_gemm, |i0, j0, out| {
        let (i1, j1) = (i0 + out.rows(), j0 + out.cols());
        run_block(
            level,
            use_gemm,
            &x[i0 * k..i1 * k],
            k,
            w.rows(j0, j1, k),
            out,
        )
    });
}

/// Runs `f(i0, j0, part)` over parts of `block` (part = rows `i0..`, columns `j0..` of it): the
/// one chunking rule every parallel kernel entry point shares. Serial when `parallel` is off,
/// the pool has one thread, or the work (`m·n·k` multiply-adds) is below two chunks of
/// `PAR_MIN_WORK`; otherwise a few chunks per thread (work stealing evens out threads slowed by
/// other processes), split over the output columns (= weight rows: each part streams its own
/// weight rows) in multiples of `PAR_COL_ALIGN`, or, when `n` is too narrow and `split_rows`
/// allows it, over the rows in multiples of `PAR_ROW_ALIGN`. Callers keep results independent
/// of the split (see the crate doc).
pub(crate) fn run_split<'a>(
    parallel: bool,
    work: usize,
    block: OutBlock<'a>,
    split_rows: bool,
    f: impl Fn(usize, usize, OutBlock<'a>) + Sync,
) {
    let (m, n) = (block.rows(), block.cols());
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let chunks = (threads * PAR_CHUNKS_PER_THREAD).min(work / PAR_MIN_WORK);
    if threads <= 1 || chunks <= 1 {
        return f(0, 0, block);
    }
    let mut tasks: Vec<(usize, usize, OutBlock<'a>)> = Vec::with_capacity(chunks);
    let cols_per = n.div_ceil(chunks).next_multiple_of(PAR_COL_ALIGN);
    let rows_per = m.div_ceil(chunks).next_multiple_of(PAR_ROW_ALIGN);
    if cols_per < n {
        let mut rest = block;
        let mut j0 = 0;
        while j0 < n {
            let j1 = (j0 + cols_per).min(n);
            let (head, tail) = rest.split_cols(j1 - j0);
            tasks.push((0, j0, head));
            rest = tail;
            j0 = j1;
        }
    } else if split_rows && rows_per < m {
        let mut rest = block;
        let mut i0 = 0;
        while i0 < m {
            let i1 = (i0 + rows_per).min(m);
            let (head, tail) = rest.split_rows(i1 - i0);
            tasks.push((i0, 0, head));
            rest = tail;
            i0 = i1;
        }
    } else {
        return f(0, 0, block);
    }
    tasks
        .into_par_iter()
        .for_each(|(i0, j0, out)| f(i0, j0, out));
}

/// Computes one output block: `out[rows, cols] = x[rows, k] · w[cols, k]ᵀ`.
fn run_block(level: Level, use_gemm: bool, x: &[f32], k: usize, w: Weights<'_>, out: OutBlock) {
    debug_assert_eq!(x.len(), out.rows() * k);
    debug_assert_eq!(w.len(), out.cols() * k);
    match w {
        Weights::F32(w) => run_block_t(level, use_gemm, x, k, w, out),
        Weights::Bf16(w) => {
            #[cfg(target_arch = "x86_64")]
            if level == Level::Avx512 && !use_gemm {
                let mut out = out;
                // SAFETY: matmul_with ran assert_supported(Level::Avx512) (avx512f/bw/vl).
                unsafe { avx512::matvec_bf16(x, k, w, &mut out) };
                return;
            }
            run_block_t(level, use_gemm, x, k, w, out)
        }
        Weights::F16(w) => run_block_t(level, use_gemm, x, k, w, out),
        Weights::Q8_0(_)
        | Weights::Q4K(_)
        | Weights::F8(_)
        | Weights::Nf4(_)
        | Weights::Fp4(_)
        | Weights::Rounded4(_)
        | Weights::Mxfp4(_) => {
            let q = w.quantized().expect("quantized variant");
            quant::run_block(level, use_gemm, x, k, q, out)
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) trait SimdElem: Elem + avx2::Load8 + avx512::Load16 {}
#[cfg(target_arch = "x86_64")]
impl<T: Elem + avx2::Load8 + avx512::Load16> SimdElem for T {}
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait SimdElem: Elem {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: Elem> SimdElem for T {}

#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn run_block_t<T: SimdElem>(
    level: Level,
    use_gemm: bool,
    x: &[f32],
    k: usize,
    w: &[T],
    mut out: OutBlock,
) {
    match level {
        Level::Scalar => scalar::matmul_block(x, k, w, &mut out),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            // SAFETY: matmul_with ran assert_supported(Level::Avx2) (avx2/fma/f16c).
            unsafe {
                if use_gemm {
                    avx2::gemm(x, k, w, &mut out)
                } else {
                    avx2::matvec(x, k, w, &mut out)
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => {
            // SAFETY: matmul_with ran assert_supported(Level::Avx512) (avx512f/bw/vl + AVX2 level).
            unsafe {
                if use_gemm {
                    avx512::gemm(x, k, w, &mut out)
                } else {
                    avx512::matvec(x, k, w, &mut out)
                }
            }
        }
    }
}

/// The shape checks of the strided kernels (`what` names the caller): `a` is `[m, a_cols]`;
/// the strided matrix has `rows` rows of `len` elements at stride `ld >= len`; `out` is
/// `[m, out_cols]`.
fn check_strided(
    what: &str,
    (a_len, m, a_cols): (usize, usize, usize),
    (w_len, rows, len, ld): (usize, usize, usize, usize),
    (out_len, out_cols): (usize, usize),
) {
    assert!(
        ld >= len,
        "{what}: row stride {ld} is shorter than the row length {len}"
    );
    assert_eq!(
        a_len,
        m * a_cols,
        "{what}: input has {a_len} elements, expected {m}*{a_cols}"
    );
    assert!(
        rows == 0 || w_len >= (rows - 1) * ld + len,
        "{what}: {rows} rows of {len} at stride {ld} need {} elements, got {w_len}",
        (rows - 1) * ld + len
    );
    assert_eq!(
        out_len,
        m * out_cols,
        "{what}: out has {out_len} elements, expected {m}*{out_cols}"
    );
}

/// `out[i, j] = x_i · w[j·ldw ..][..k]` for `i < m`, `j < n`: a matvec over rows of a wider f32
/// matrix (e.g. one head's keys in a KV cache laid out `[position, heads·head_dim]`), with no
/// copy. Single-threaded. At the AVX-512 level its summation order is the matvec kernel's, so
/// the result equals [`matmul_serial`] on a gathered copy of the rows (m <= 8) bit for bit; at
/// other levels each element is [`dot`]. Panics on inconsistent lengths.
pub fn dot_rows_strided(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    ldw: usize,
    n: usize,
    out: &mut [f32],
) {
    dot_rows_strided_with(level(), x, m, k, w, ldw, n, out)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_rows_strided_with(
    level: Level,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    ldw: usize,
    n: usize,
    out: &mut [f32],
) {
    check_strided(
        "dot_rows_strided",
        (x.len(), m, k),
        (w.len(), n, k, ldw),
        (out.len(), n),
    );
    assert_supported(level);
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && k > 0 {
        let mut block = OutBlock::new(out, m, n);
        // SAFETY: assert_supported(Level::Avx512) passed above (avx512f/bw/vl).
        unsafe { avx512::matvec_strided(x, k, w, ldw, &mut block) };
        return;
    }
    for (xr, or) in x.chunks_exact(k.max(1)).zip(out.chunks_exact_mut(n)) {
        for (j, o) in or.iter_mut().enumerate() {
            *o = dot_with(level, xr, &w[j * ldw..j * ldw + k]);
        }
    }
}

/// `out[i, ..d] = Σ_j p[i, j] · v[j·ldv ..][..d]` for `i < m` (`p` is `[m, n]`, `out` is
/// `[m, d]`, overwritten): the probability-weighted sum of value rows in attention, over rows of
/// a wider f32 matrix, with no copy. Every element takes one fused multiply-add per `j`, in
/// increasing `j`, starting from 0, at every level (so levels agree bit for bit).
/// Single-threaded. Panics on inconsistent lengths.
pub fn weighted_sum_strided(
    p: &[f32],
    m: usize,
    n: usize,
    v: &[f32],
    ldv: usize,
    d: usize,
    out: &mut [f32],
) {
    weighted_sum_strided_with(level(), p, m, n, v, ldv, d, out)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn weighted_sum_strided_with(
    level: Level,
    p: &[f32],
    m: usize,
    n: usize,
    v: &[f32],
    ldv: usize,
    d: usize,
    out: &mut [f32],
) {
    check_strided(
        "weighted_sum_strided",
        (p.len(), m, n),
        (v.len(), n, d, ldv),
        (out.len(), d),
    );
    assert_supported(level);
    if m == 0 || d == 0 {
        return;
    }
    if n == 0 {
        out.fill(0.0);
        return;
    }
    match level {
        Level::Scalar => scalar::weighted_sum_strided(p, n, v, ldv, d, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: assert_supported(Level::Avx2) passed above (avx2/fma/f16c).
        Level::Avx2 => unsafe { avx2::weighted_sum_strided(p, n, v, ldv, d, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: assert_supported(Level::Avx512) passed above (avx512f/bw/vl).
        Level::Avx512 => unsafe { avx512::weighted_sum_strided(p, n, v, ldv, d, out) },
    }
}

/// Dot product of two f32 slices of equal length (f32 accumulation). Panics if lengths differ.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(level(), a, b)
}

pub(crate) fn dot_with(level: Level, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    match level {
        Level::Scalar => scalar::dot(a, b),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            assert_supported(level);
            // SAFETY: the line above checked avx2/fma/f16c.
            unsafe { avx2::dot(a, b) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => {
            assert_supported(level);
            // SAFETY: the line above checked avx512f/bw/vl and avx2/fma/f16c.
            unsafe { avx512::dot(a, b) }
        }
    }
}

/// `out[i] += alpha * x[i]`. Panics if lengths differ.
pub fn axpy(alpha: f32, x: &[f32], out: &mut [f32]) {
    axpy_with(level(), alpha, x, out)
}

pub(crate) fn axpy_with(level: Level, alpha: f32, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "axpy: lengths differ");
    match level {
        Level::Scalar => scalar::axpy(alpha, x, out),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            assert_supported(level);
            // SAFETY: the line above checked avx2/fma/f16c.
            unsafe { avx2::axpy(alpha, x, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => {
            assert_supported(level);
            // SAFETY: the line above checked avx512f/bw/vl and avx2/fma/f16c.
            unsafe { avx512::axpy(alpha, x, out) }
        }
    }
}

/// Convert one row of stored weights to f32 (embedding lookups): `out.len()` is the row length
/// `k`, and the row is `w[row*k .. (row+1)*k]`. Widening is exact; quantized rows are
/// dequantized (exactly as [`quant::dequantize_row_q8_0`], [`quant::dequantize_row_q4_k`],
/// [`dequantize_row_f8`], [`dequantize_row_nf4`] or [`dequantize_row_fp4`]), and `k` must then
/// be a multiple of the block size. Panics if out of range.
pub fn row_to_f32(w: Weights<'_>, row: usize, k: usize, out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    assert_eq!(out.len(), k, "row_to_f32: out.len() must equal k");
    assert!(
        k.is_multiple_of(w.block_size()),
        "row_to_f32: k = {k} is not a multiple of the weights' block size {}",
        w.block_size()
    );
    let end = row
        .checked_add(1)
        .and_then(|r| r.checked_mul(k))
        .expect("row_to_f32: row*k overflows");
    assert!(
        end <= w.len(),
        "row_to_f32: row {row} of length {k} is outside weights of {} elements",
        w.len()
    );
    match w.rows(row, row + 1, k) {
        Weights::F32(r) => out.copy_from_slice(r),
        Weights::Bf16(r) => r.convert_to_f32_slice(out),
        Weights::F16(r) => r.convert_to_f32_slice(out),
        r @ (Weights::Q8_0(_)
        | Weights::Q4K(_)
        | Weights::F8(_)
        | Weights::Nf4(_)
        | Weights::Fp4(_)
        | Weights::Rounded4(_)
        | Weights::Mxfp4(_)) => {
            let q = r.quantized().expect("quantized variant");
            let blocks = k / r.block_size();
            quant::dequantize_with(level(), q, 0, blocks, out)
        }
    }
}
