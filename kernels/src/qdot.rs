//! Integer-dot matmul with q8-quantized activations ("q8 activations"), for Q8_0 and Q4_K
//! weights: the speed path behind a setting, a faster and less exact alternative to the
//! f32-activation [`crate::matmul`].
//!
//! This module owns [`Q8Activations`] (x rows quantized once, reusable for every weight matrix
//! that multiplies the same x, e.g. an expert's gate and up projections), the public entry
//! points ([`matmul_q8`], [`matmul_q8_par`], [`matmul_q8_activations`],
//! [`q8_activations_supported`]), the run-time kernel choice, the parallel split, and the scalar
//! twins that define the results. The SIMD kernels live in `qdot_x86` (AVX-512 VNNI and AVX2).
//!
//! # Activations
//! One quantizer, [`quantize_slice`]: over a span of x, `d = amax / 127` (f32) and
//! `q = round(x · (1/d))`, half away from zero, clamped to ±127. Each row of x is quantized
//! twice:
//! - **32-blocks, for Q8_0 weights**: `d_b` stored rounded to f16, which makes the blocks bit
//!   for bit GGML's Q8_0 ([`crate::quant::quantize_row_q8_0`]). Stored per row: the quants
//!   (row stride `k` rounded up to 64 bytes, zero padded, 64-byte aligned) and the scales
//!   repeated over 8 lanes per block (16 f32 per block pair, zero for a missing odd block: what
//!   the 512-bit kernels multiply with).
//! - **256-element super-blocks, for Q4_K weights** (only when `k % 256 == 0`), llama.cpp's
//!   Q8_K idea: one scale `D_t` per super-block `t`, kept in f32 (not rounded to f16, so tiny
//!   activations keep their precision), the quants (same layout as above), and per 32-block
//!   `b` of the super-block quants `xs_b = D_t · Σ q` (the integer sum is exact in f32, the
//!   product rounds once). The step is coarser than per-32 scales (the super-block's amax),
//!   which a test bounds; in exchange the whole super-block accumulates in integers.
//!
//! # Summation order (one output element; the scalar twins are the definition)
//! Integer dot products are exact, so only the f32 steps below are ordered. "fma" is a fused
//! multiply-add (one rounding). A 16-lane f32 accumulator `A` (and for Q4_K an 8-lane `M`)
//! starts at +0.0.
//! - **Q8_0** (`d_b` of x, `e_b` of the weights, both f16 so `d_b·e_b` is exact in f32;
//!   `isum(b, g)` the exact sum of the 4 products `qx·qw` of bytes `4g .. 4g+4` of block `b`):
//!   for blocks `b` in increasing order, lanes `l = 8·(b % 2) + g`, `g < 8`:
//!   `A_l = fma(d_b·e_b, isum(b, g) as f32, A_l)`. Even blocks feed lanes 0..8, odd blocks
//!   lanes 8..16 (a missing last odd block feeds nothing). Result: `hsum16(A)`.
//! - **Q4_K** (super-block `t` with f16 `d`, `dmin` and 6-bit `sc_s`, `m_s`, sub-block `s`
//!   holding x's 32-block `b = 8t + s`): first the exact integer lanes
//!   `I_l = Σ_s sc_s · dot8(s, h)` (i32), where `dot8(s, h)` is the exact sum of the 8
//!   products `qx·qw` of bytes `8h .. 8h+8` of sub-block `s`, and each (s, h) feeds one lane:
//!   with `r = s % 4`, `l = 4·(2·(r % 2) + h / 2) + 2·(r / 2) + h % 2` (each lane takes two
//!   (s, h) pairs: sub-blocks `s` and `s + 4`; this is where the kernels' pack-then-scale
//!   puts them). `|I_l| <= 2·8·63·15·127 < 2^21`, so `I_l as f32` is exact. Then, for
//!   super-blocks in increasing order: `A_l = fma(d·D_t, I_l as f32, A_l)` for all 16 lanes
//!   (`d·D_t` rounds once), then `M_s = fma(dmin·m_s, xs_b, M_s)` for `s = 0..8`
//!   (`dmin·m_s` exact). Result: `hsum16(A) − hsum8(M)`. One f32 step per 256 weights and
//!   row (plus the mins).
//! - `hsum16(v) = hsum8(v_l + v_{l+8})` and `hsum8(v) = ((v0+v4) + (v2+v6)) + ((v1+v5) +
//!   (v3+v7))`.
//!
//! The order depends on nothing but the data: not on the kernel, the row group, the thread
//! count or the split, so every SIMD kernel equals its scalar twin, [`matmul_q8_par`]
//! equals [`matmul_q8`], and a row's result is the same whatever rows share its call, bit for
//! bit (tested at every kernel the CPU runs).
//!
//! What must hold: the SIMD kernels compute exactly these integer sums and f32 operations (the
//! integer tricks they use change how `isum` / `I_l` is computed, never its value, and no
//! 16-bit intermediate may saturate: see `qdot_x86`); the SIMD activation quantizer equals
//! [`quantize_slice`] bit for bit on both spans; every kernel reads x only through
//! [`Q8Activations`]'s accessors, whose lengths the kernels assert.

use std::sync::OnceLock;

use half::f16;

use crate::quant::{BlockQ4K, BlockQ8_0, QK8_0, QK_K};
use crate::{Level, OutBlock, Weights};

/// Bytes of x quants per 64-byte line: one block pair, the unit the 512-bit kernels load.
const LINE: usize = 64;

/// One line of x quants (two 32-quant blocks), aligned so 512-bit loads never split a line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct QLine(pub(crate) [i8; LINE]);

/// The scales of one block pair, each repeated over its 8 lanes (see the module doc).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct ScaleLine(pub(crate) [f32; 16]);

/// Rows of x (`[m, k]`) quantized to Q8_0-style 32-blocks once, for [`matmul_q8`] and
/// [`matmul_q8_par`] on Q8_0 or Q4_K weights (layout: see the module doc).
pub struct Q8Activations {
    m: usize,
    k: usize,
    /// Lines per row (`k / 64` rounded up).
    lines: usize,
    /// The 32-blocks were quantized (`qs`, `scales`).
    has_blocks: bool,
    /// The super-blocks were quantized (`sb_*`; `k % 256 == 0`).
    has_super_blocks: bool,
    /// Quants, `lines` per row, zero past `k`; empty without the 32-blocks.
    qs: Vec<QLine>,
    /// Block scales as f32, `lines` per row, zero past the last block.
    scales: Vec<ScaleLine>,
    /// Super-block quants (Q4_K), `lines` per row; empty unless `k % 256 == 0`.
    sb_qs: Vec<QLine>,
    /// Super-block scales `D_t` (f32), `k / 256` per row; empty unless `k % 256 == 0`.
    sb_d: Vec<f32>,
    /// `D_t · Σ q` per 32-block of the super-block quants, `k / 32` per row; empty unless
    /// `k % 256 == 0`.
    sb_sums: Vec<f32>,
}

impl Q8Activations {
    /// Quantizes the `m` rows of `x` (`[m, k]`, row-major). Panics unless `x.len() == m·k` and
    /// `k` is a multiple of 32 (Q4_K weights further need a multiple of 256, checked by the
    /// matmul).
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        Self::new_with(kernel(), x, m, k)
    }

    /// [`Q8Activations::new`] with only the quantization the weights `ws` take: the 32-blocks
    /// when one is Q8_0, the super-blocks when one is Q4_K (each costs a pass over x and its
    /// memory). Check [`Q8Activations::serves`] before multiplying by another weight.
    pub fn for_weights(x: &[f32], m: usize, k: usize, ws: &[Weights<'_>]) -> Self {
        let blocks = ws.iter().any(|w| matches!(w, Weights::Q8_0(_)));
        let super_blocks = ws.iter().any(|w| matches!(w, Weights::Q4K(_)));
        Self::build(kernel(), x, m, k, blocks, super_blocks)
    }

    /// Whether these activations hold the quantization `w` needs (Q8_0: the 32-blocks, Q4_K:
    /// the super-blocks); false for every other weight type.
    pub fn serves(&self, w: &Weights<'_>) -> bool {
        match w {
            Weights::Q8_0(_) => self.has_blocks || self.m == 0,
            Weights::Q4K(_) => self.has_super_blocks || self.m == 0,
            _ => false,
        }
    }

    /// [`Q8Activations::new`] with the quantizer of a given kernel (tests force each one; all
    /// give the same bits).
    pub(crate) fn new_with(kern: Kernel, x: &[f32], m: usize, k: usize) -> Self {
        Self::build(kern, x, m, k, true, true)
    }

    /// Quantizes into the 32-blocks (`blocks`) and, when `k % 256 == 0`, the super-blocks
    /// (`super_blocks`).
    fn build(
        kern: Kernel,
        x: &[f32],
        m: usize,
        k: usize,
        blocks: bool,
        super_blocks: bool,
    ) -> Self {
        let mk = m
            .checked_mul(k)
            .expect("Q8Activations::new: m*k overflows usize");
        assert!(
            x.len() == mk,
            "Q8Activations::new: x has {} elements, expected m*k = {m}*{k}",
            x.len()
        );
        assert!(
            k.is_multiple_of(QK8_0),
            "Q8Activations::new: k = {k} is not a multiple of {QK8_0}"
        );
        let nb = k / QK8_0;
        let lines = k.div_ceil(LINE);
        let mut xq = Q8Activations {
            m,
            k,
            lines,
            has_blocks: blocks,
            has_super_blocks: super_blocks && k.is_multiple_of(QK_K),
            qs: Vec::new(),
            scales: Vec::new(),
            sb_qs: Vec::new(),
            sb_d: Vec::new(),
            sb_sums: Vec::new(),
        };
        if blocks {
            xq.qs = vec![QLine([0; LINE]); m * lines];
            xq.scales = vec![ScaleLine([0.0; 16]); m * lines];
        }
        if xq.has_super_blocks {
            xq.sb_qs = vec![QLine([0; LINE]); m * lines];
            xq.sb_d = vec![0f32; m * (k / QK_K)];
            xq.sb_sums = vec![0f32; m * nb];
        }
        match kern {
            Kernel::Scalar => xq.fill(x, quantize_slice),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 | Kernel::Vnni => {
                assert!(
                    kern.supported(),
                    "q8-activation kernel {kern:?} not supported"
                );
                // SAFETY: both kernels' CPU features include avx2/fma/f16c (checked above).
                unsafe { crate::qdot_x86::quantize_avx2(&mut xq, x) }
            }
        }
        xq
    }

    /// Quantizes every 32-block and super-block of `x` with `quant` (a twin of
    /// [`quantize_slice`]) and stores them in the layout of the module doc.
    #[inline(always)]
    pub(crate) fn fill(&mut self, x: &[f32], quant: impl Fn(&[f32], &mut [i8]) -> f32) {
        let (k, nb, lines) = (self.k, self.k / QK8_0, self.lines);
        let rows = if self.has_blocks { self.m } else { 0 };
        for i in 0..rows {
            let xr = &x[i * k..(i + 1) * k];
            for (b, xb) in xr.chunks_exact(QK8_0).enumerate() {
                let mut q = [0i8; QK8_0];
                let dh = f16::from_f32(quant(xb, &mut q));
                let (line, half) = (i * lines + b / 2, b % 2);
                self.qs[line].0[32 * half..32 * half + 32].copy_from_slice(&q);
                self.scales[line].0[8 * half..8 * half + 8].fill(dh.to_f32());
            }
        }
        if !self.has_super_blocks {
            return;
        }
        let nsb = k / QK_K;
        for i in 0..self.m {
            let xr = &x[i * k..(i + 1) * k];
            for (t, xs) in xr.chunks_exact(QK_K).enumerate() {
                let mut q = [0i8; QK_K];
                let d = quant(xs, &mut q);
                self.sb_d[i * nsb + t] = d;
                for (l, ql) in q.chunks_exact(LINE).enumerate() {
                    self.sb_qs[i * lines + 4 * t + l].0.copy_from_slice(ql);
                }
                for (s, qb) in q.chunks_exact(QK8_0).enumerate() {
                    let sum: i32 = qb.iter().map(|&v| v as i32).sum();
                    // |sum| <= 32·127 is exact in f32; the product rounds once.
                    self.sb_sums[i * nb + 8 * t + s] = d * sum as f32;
                }
            }
        }
    }

    /// Rows of x (`m`).
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Row length (`k`).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Quant lines of row `i` (`k` quants, then zeros up to a whole line). Panics when the
    /// 32-blocks were not quantized.
    pub(crate) fn qs_row(&self, i: usize) -> &[QLine] {
        assert!(
            self.has_blocks,
            "Q8Activations: no 32-block quants (built for Q4_K only)"
        );
        &self.qs[i * self.lines..(i + 1) * self.lines]
    }

    /// The quants of row `i` as bytes (`64 · lines` of them).
    pub(crate) fn qs_bytes(&self, i: usize) -> &[i8] {
        let row = self.qs_row(i);
        // SAFETY: QLine is repr(C) around [i8; 64] with size 64 (no padding), so `row.len()`
        // lines are `64 · row.len()` contiguous, initialized i8s borrowed from `self`.
        unsafe { std::slice::from_raw_parts(row.as_ptr().cast::<i8>(), row.len() * LINE) }
    }

    /// Scale lines of row `i`.
    pub(crate) fn scales_row(&self, i: usize) -> &[ScaleLine] {
        assert!(
            self.has_blocks,
            "Q8Activations: no 32-block scales (built for Q4_K only)"
        );
        &self.scales[i * self.lines..(i + 1) * self.lines]
    }

    /// Panics unless the super-block quantization exists (`k % 256 == 0`).
    fn assert_sb(&self) {
        assert!(
            self.has_super_blocks || self.m == 0,
            "Q8Activations: no super-block quants (k = {} is not a multiple of {QK_K}, or they \
             were not asked for)",
            self.k
        );
    }

    /// Super-block quant lines of row `i` (`k` quants, `k % 256 == 0`).
    pub(crate) fn sb_qs_row(&self, i: usize) -> &[QLine] {
        self.assert_sb();
        &self.sb_qs[i * self.lines..(i + 1) * self.lines]
    }

    /// The super-block quants of row `i` as bytes (`k` of them).
    pub(crate) fn sb_qs_bytes(&self, i: usize) -> &[i8] {
        let row = self.sb_qs_row(i);
        // SAFETY: as in `qs_bytes`: `row.len()` 64-byte lines without padding, borrowed from
        // `self`.
        unsafe { std::slice::from_raw_parts(row.as_ptr().cast::<i8>(), row.len() * LINE) }
    }

    /// Super-block scales `D_t` of row `i` (`k / 256`).
    pub(crate) fn sb_d_row(&self, i: usize) -> &[f32] {
        self.assert_sb();
        let nsb = self.k / QK_K;
        &self.sb_d[i * nsb..(i + 1) * nsb]
    }

    /// Super-block block sums `D_t · Σ q` of row `i` (`k / 32`, 8 per super-block).
    pub(crate) fn sb_sums_row(&self, i: usize) -> &[f32] {
        self.assert_sb();
        let nb = self.k / QK8_0;
        &self.sb_sums[i * nb..(i + 1) * nb]
    }
}

/// The activation quantizer: `d = amax / 127` over `x` (f32, not rounded) and
/// `q = round(x · (1/d))` (half away from zero) clamped to ±127, written to `q`; returns `d`.
/// Used on 32-blocks (which then store `d` rounded to f16) and on Q4_K's 256-element
/// super-blocks (which keep `d` in f32). On a 32-block with `d` rounded to f16 it is bit for
/// bit [`crate::quant::quantize_row_q8_0`] (`round` there is half away from zero; here the
/// same rounding without a libm call), except that quants are clamped to ±127: −128 only
/// arises when `x·(1/d)` overflows (`amax` below ~3.7e-37, whose f16 scale is then 0, so no
/// result changes), and the kernels' integer tricks rely on `|q| <= 127`. A test compares the
/// two on random, tie-heavy, tiny and non-finite data. Panics unless the lengths are equal.
#[inline]
pub(crate) fn quantize_slice(x: &[f32], q: &mut [i8]) -> f32 {
    assert_eq!(x.len(), q.len());
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        let t = v * id;
        let a = t.abs();
        // Truncation, saturating, NaN -> 0: as `round() as i8` treats NaN and infinities.
        let mut r = a as i32;
        if a - r as f32 >= 0.5 {
            r = r.saturating_add(1);
        }
        *q = (if t < 0.0 { -r } else { r }).clamp(-127, 127) as i8;
    }
    d
}

/// Which q8-activation kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// The scalar twins (the definition).
    Scalar,
    /// AVX2 + FMA + F16C: `maddubs` / `madd` with the sign trick, 2 × 8 f32 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F/BW/VL + VNNI: `vpdpbusd` (sign trick for Q8_0, unsigned nibbles for Q4_K),
    /// 16 f32 lanes.
    #[cfg(target_arch = "x86_64")]
    Vnni,
}

/// Every kernel this build knows, best first.
#[cfg(test)]
const ALL_KERNELS: &[Kernel] = &[
    #[cfg(target_arch = "x86_64")]
    Kernel::Vnni,
    #[cfg(target_arch = "x86_64")]
    Kernel::Avx2,
    Kernel::Scalar,
];

impl Kernel {
    /// The kernel a SIMD level runs: the AVX-512 level uses VNNI where the CPU has it and the
    /// AVX2 kernel otherwise.
    fn for_level(level: Level) -> Kernel {
        match level {
            Level::Scalar => Kernel::Scalar,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => Kernel::Avx2,
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => {
                if Kernel::Vnni.supported() {
                    Kernel::Vnni
                } else {
                    Kernel::Avx2
                }
            }
        }
    }

    /// Whether this CPU can run the kernel.
    fn supported(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => Level::Avx2.supported(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => {
                Level::Avx512.supported() && std::is_x86_feature_detected!("avx512vnni")
            }
        }
    }
}

/// The best kernel this CPU runs, detected once.
fn kernel() -> Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    *KERNEL.get_or_init(|| Kernel::for_level(crate::level()))
}

/// Kernels this CPU can run, best first (tests force each one).
#[cfg(test)]
pub(crate) fn supported_kernels() -> Vec<Kernel> {
    ALL_KERNELS
        .iter()
        .copied()
        .filter(|k| k.supported())
        .collect()
}

/// Whether [`matmul_q8`] / [`matmul_q8_par`] take these weights: Q8_0 and Q4_K (not f32, bf16,
/// f16, nor the pre-quantized FP8 / NF4 / FP4 blocks).
pub fn q8_activations_supported(w: &Weights<'_>) -> bool {
    matches!(w, Weights::Q8_0(_) | Weights::Q4K(_))
}

/// `out[m, n] = q8(x)[m, k] · dequantize(w)[n, k]ᵀ` with integer block dots (see the module doc
/// for what is rounded and in which order). Single-threaded. `xq` holds the `m` rows of x.
/// Panics if `w` is not Q8_0 or Q4_K ("unsupported weights"), if `k` is not a multiple of the
/// weights' block size, or unless `w` holds `n·k` weights and `out.len() == m·n`.
pub fn matmul_q8(xq: &Q8Activations, w: Weights<'_>, n: usize, out: &mut [f32]) {
    matmul_q8_with(kernel(), false, xq, w, n, out)
}

/// [`matmul_q8`] with the output columns (weight rows) split over the current rayon pool when
/// the call is large enough; the result equals [`matmul_q8`] bit for bit.
pub fn matmul_q8_par(xq: &Q8Activations, w: Weights<'_>, n: usize, out: &mut [f32]) {
    matmul_q8_with(kernel(), true, xq, w, n, out)
}

/// A weight matrix this module takes.
#[derive(Clone, Copy)]
pub(crate) enum QW<'a> {
    Q8_0(&'a [BlockQ8_0]),
    Q4K(&'a [BlockQ4K]),
}

impl<'a> QW<'a> {
    /// Rows `j0..j1` of a matrix with `bpr` blocks per row.
    fn rows(self, j0: usize, j1: usize, bpr: usize) -> QW<'a> {
        match self {
            QW::Q8_0(w) => QW::Q8_0(&w[j0 * bpr..j1 * bpr]),
            QW::Q4K(w) => QW::Q4K(&w[j0 * bpr..j1 * bpr]),
        }
    }
}

/// [`matmul_q8`] / [`matmul_q8_par`] with a forced kernel (tests force each one).
pub(crate) fn matmul_q8_with(
    kern: Kernel,
    parallel: bool,
    xq: &Q8Activations,
    w: Weights<'_>,
    n: usize,
    out: &mut [f32],
) {
    let (m, k) = (xq.rows(), xq.k());
    let qw = match w {
        Weights::Q8_0(b) => QW::Q8_0(b),
        Weights::Q4K(b) => QW::Q4K(b),
        other => panic!(
            "matmul_q8: unsupported weights ({}); the q8-activation path takes Q8_0 and Q4K \
             weights only (check q8_activations_supported)",
            match other {
                Weights::F32(_) => "F32",
                Weights::Bf16(_) => "Bf16",
                Weights::F16(_) => "F16",
                Weights::F8(_) => "F8",
                Weights::Nf4(_) => "Nf4",
                Weights::Fp4(_) => "Fp4",
                Weights::Rounded4(_) => "Rounded4",
                Weights::Mxfp4(_) => "Mxfp4",
                Weights::Q8_0(_) | Weights::Q4K(_) => unreachable!(),
            }
        ),
    };
    crate::check_matmul_shapes("matmul_q8", m * k, m, k, &w, n, out.len());
    assert!(
        xq.serves(&w),
        "matmul_q8: these activations were quantized for other weights (see \
         Q8Activations::for_weights / serves)"
    );
    assert!(
        kern.supported(),
        "q8-activation kernel {kern:?} not supported on this CPU"
    );
    if k == 0 {
        out.fill(0.0);
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    let bpr = k / w.block_size();
    let block = OutBlock::new(out, m, n);
    let work = m.saturating_mul(n).saturating_mul(k);
    // Columns only: every part takes all x rows (a row split would need row offsets into xq).
    crate::run_split(parallel, work, block, false, |_, j0, out| {
        let j1 = j0 + out.cols();
        run_block(kern, xq, qw.rows(j0, j1, bpr), bpr, out)
    });
}

/// x rows per kernel call: the register tiles hold at most this many rows of accumulators.
const GROUP_ROWS: usize = 8;

/// Weight rows per column chunk when x has more than [`GROUP_ROWS`] rows: the chunk (at most
/// 64 × 2.2 KiB for k = 2048 Q8_0) stays in L2 while every row group sweeps over it, so the
/// weights still come from DRAM once.
const CHUNK_COLS: usize = 64;

/// Computes one output block: `out[m, cols]` for all rows of x and the `cols` weight rows in
/// `w` (`bpr` blocks each).
fn run_block(kern: Kernel, xq: &Q8Activations, w: QW<'_>, bpr: usize, mut out: OutBlock) {
    let (m, n) = (out.rows(), out.cols());
    let cols_chunk = if m <= GROUP_ROWS { n } else { CHUNK_COLS };
    let mut j0 = 0;
    while j0 < n {
        let j1 = (j0 + cols_chunk).min(n);
        let wc = w.rows(j0, j1, bpr);
        let mut r0 = 0;
        while r0 < m {
            let rows = GROUP_ROWS.min(m - r0);
            let dst = Dst {
                out: &mut out,
                r0,
                c0: j0,
            };
            let x = XRows { xq, x0: r0, rows };
            run_group(kern, x, wc, dst);
            r0 += rows;
        }
        j0 = j1;
    }
}

/// Rows `x0 .. x0 + rows` of the quantized activations (`rows <= GROUP_ROWS`).
#[derive(Clone, Copy)]
pub(crate) struct XRows<'a> {
    pub(crate) xq: &'a Q8Activations,
    pub(crate) x0: usize,
    pub(crate) rows: usize,
}

/// Where a group's results go: x row `x0 + r`, weight row `c` land in
/// `out.row(r0 + r)[c0 + c]`.
pub(crate) struct Dst<'o, 'b> {
    pub(crate) out: &'o mut OutBlock<'b>,
    pub(crate) r0: usize,
    pub(crate) c0: usize,
}

impl Dst<'_, '_> {
    #[inline]
    pub(crate) fn set(&mut self, r: usize, c: usize, v: f32) {
        self.out.row(self.r0 + r)[self.c0 + c] = v;
    }
}

/// One row group against the weight rows in `w`.
fn run_group(kern: Kernel, x: XRows<'_>, w: QW<'_>, mut dst: Dst) {
    match kern {
        Kernel::Scalar => {
            let nc = match w {
                QW::Q8_0(b) => b.len(),
                QW::Q4K(b) => b.len(),
            };
            let bpr = match w {
                QW::Q8_0(_) => x.xq.k() / QK8_0,
                QW::Q4K(_) => x.xq.k() / QK_K,
            };
            for c in 0..nc / bpr {
                for r in 0..x.rows {
                    let i = x.x0 + r;
                    let v = match w {
                        QW::Q8_0(b) => dot_q8_0_scalar(x.xq, i, &b[c * bpr..(c + 1) * bpr]),
                        QW::Q4K(b) => dot_q4k_scalar(x.xq, i, &b[c * bpr..(c + 1) * bpr]),
                    };
                    dst.set(r, c, v);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => {
            // SAFETY: matmul_q8_with asserted Kernel::Avx2.supported() (avx2/fma/f16c).
            unsafe {
                match w {
                    QW::Q8_0(b) => crate::qdot_x86::q8_0_avx2(x, b, &mut dst),
                    QW::Q4K(b) => crate::qdot_x86::q4k_avx2(x, b, &mut dst),
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Vnni => {
            // SAFETY: matmul_q8_with asserted Kernel::Vnni.supported() (avx512f/bw/vl/vnni and
            // the AVX2 level).
            unsafe {
                match w {
                    QW::Q8_0(b) => crate::qdot_x86::q8_0_vnni(x, b, &mut dst),
                    QW::Q4K(b) => crate::qdot_x86::q4k_vnni(x, b, &mut dst),
                }
            }
        }
    }
}

/// The 8 six-bit scales and 8 six-bit mins of a Q4_K super-block, one byte each (sub-block
/// `s` in byte `s`), as [`BlockQ4K::scale_min`] unpacks them, with word-wide bit operations.
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn unpack_scales_mins(q: &[u8; 12]) -> (u64, u64) {
    let word = |i: usize| u32::from_le_bytes([q[i], q[i + 1], q[i + 2], q[i + 3]]);
    let (a, b, c) = (word(0), word(4), word(8));
    // s < 4: low 6 bits of bytes s (scales) and s + 4 (mins).
    let (sc_lo, m_lo) = (a & 0x3F3F_3F3F, b & 0x3F3F_3F3F);
    // s >= 4: a nibble of byte s + 4, plus the top 2 bits of byte s - 4 (scales) or s (mins)
    // as bits 4..6.
    let sc_hi = (c & 0x0F0F_0F0F) | (((a >> 6) & 0x0303_0303) << 4);
    let m_hi = ((c >> 4) & 0x0F0F_0F0F) | (((b >> 6) & 0x0303_0303) << 4);
    (
        sc_lo as u64 | (sc_hi as u64) << 32,
        m_lo as u64 | (m_hi as u64) << 32,
    )
}

/// `((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7))`.
#[inline]
pub(crate) fn hsum8(v: &[f32; 8]) -> f32 {
    let s: [f32; 4] = std::array::from_fn(|l| v[l] + v[l + 4]);
    (s[0] + s[2]) + (s[1] + s[3])
}

/// `hsum8` of `v_l + v_{l+8}`.
#[inline]
pub(crate) fn hsum16(v: &[f32; 16]) -> f32 {
    hsum8(&std::array::from_fn(|l| v[l] + v[l + 8]))
}

/// The exact `Σ_{t<4} x[4g+t]·w[4g+t]` for `g < 8`, the integer unit of every kernel.
#[inline]
fn isums(x: &[i8], w: impl Fn(usize) -> i32) -> [i32; 8] {
    std::array::from_fn(|g| (4 * g..4 * g + 4).map(|t| x[t] as i32 * w(t)).sum())
}

/// Scalar twin for Q8_0 weights: x row `i` · one weight row (`k / 32` blocks), in the module's
/// order.
pub(crate) fn dot_q8_0_scalar(xq: &Q8Activations, i: usize, w: &[BlockQ8_0]) -> f32 {
    assert_eq!(w.len() * QK8_0, xq.k());
    let (qs, sc) = (xq.qs_bytes(i), xq.scales_row(i));
    let mut acc = [0f32; 16];
    for (b, wb) in w.iter().enumerate() {
        let half = b % 2;
        // Both f16 values: the product is exact.
        let dd = sc[b / 2].0[8 * half] * wb.d.to_f32();
        let s = isums(&qs[32 * b..32 * b + 32], |t| wb.qs[t] as i32);
        for (a, s) in acc[8 * half..8 * half + 8].iter_mut().zip(s) {
            *a = dd.mul_add(s as f32, *a);
        }
    }
    hsum16(&acc)
}

/// Scalar twin for Q4_K weights: x row `i` (its super-block quants) · one weight row
/// (`k / 256` super-blocks), in the module's order.
pub(crate) fn dot_q4k_scalar(xq: &Q8Activations, i: usize, w: &[BlockQ4K]) -> f32 {
    assert_eq!(w.len() * QK_K, xq.k());
    let (qs, dx, sums) = (xq.sb_qs_bytes(i), xq.sb_d_row(i), xq.sb_sums_row(i));
    let mut acc = [0f32; 16];
    let mut mins = [0f32; 8];
    for (t, wb) in w.iter().enumerate() {
        // I_l: exact, |I_l| <= 2·8·63·15·127 < 2^21 (lane layout: see the module doc).
        let mut isum = [0i32; 16];
        for s in 0..8 {
            let b = 8 * t + s;
            let (scale, _) = wb.scale_min(s);
            let q = &wb.qs[32 * (s / 2)..32 * (s / 2) + 32];
            let sh = 4 * (s % 2);
            let xb = &qs[32 * b..32 * b + 32];
            let r = s % 4;
            for h in 0..4 {
                let d8: i32 = (8 * h..8 * h + 8)
                    .map(|u| xb[u] as i32 * ((q[u] >> sh) & 0x0F) as i32)
                    .sum();
                let l = 4 * (2 * (r % 2) + h / 2) + 2 * (r / 2) + h % 2;
                isum[l] += scale as i32 * d8;
            }
        }
        // One rounding: an f16 value times an f32.
        let dd = wb.d.to_f32() * dx[t];
        for (a, v) in acc.iter_mut().zip(isum) {
            *a = dd.mul_add(v as f32, *a);
        }
        let dmin = wb.dmin.to_f32();
        for (s, mn) in mins.iter_mut().enumerate() {
            let (_, m) = wb.scale_min(s);
            *mn = (dmin * m as f32).mul_add(sums[8 * t + s], *mn);
        }
    }
    hsum16(&acc) - hsum8(&mins)
}

/// `out[m, n] = q8(x)[m, k] · dequantize(w)[n, k]ᵀ` for Q8_0 weights: [`Q8Activations::new`]
/// then [`matmul_q8`]. Single-threaded. Panics unless `k` is a multiple of 32 and the lengths
/// are `m·k`, `n·k/32` blocks and `m·n`.
pub fn matmul_q8_activations(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[BlockQ8_0],
    n: usize,
    out: &mut [f32],
) {
    matmul_q8_activations_with(crate::level(), x, m, k, w, n, out)
}

/// [`matmul_q8_activations`] at a given level (tests force each one): the level's kernel.
pub(crate) fn matmul_q8_activations_with(
    level: Level,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[BlockQ8_0],
    n: usize,
    out: &mut [f32],
) {
    crate::check_matmul(x, m, k, &Weights::Q8_0(w), n, out);
    crate::assert_supported(level);
    let xq = Q8Activations::new(x, m, k);
    matmul_q8_with(
        Kernel::for_level(level),
        false,
        &xq,
        Weights::Q8_0(w),
        n,
        out,
    );
}
