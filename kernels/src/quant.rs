//! Quantized weight blocks in GGML's exact byte layouts (`Q8_0`, `Q4_K`), their quantizers and
//! dequantizers, and the matmul driver for quantized weights.
//!
//! This module owns the block types ([`BlockQ8_0`], [`BlockQ4K`]), the quantizers, the reference
//! (scalar) dequantizers and the SIMD dequantizers (AVX2, AVX-512) that are their twins. Each
//! quantizer is one plain-Rust body (no libm calls, no float-to-int casts, fixed summation
//! order) compiled once per SIMD level, where it vectorizes; Q4_K fits 8 or 16 sub-blocks side
//! by side, one per lane, which makes quantizing at load cheap next to reading the weights.
//! A quantized matrix `[n, k]` is `n` rows of `k / 32` (`Q8_0`) or `k / 256` (`Q4_K`) blocks,
//! row-major, exactly as GGML stores a tensor, so the blocks can be written to GGUF unchanged.
//!
//! What must hold:
//! - The layouts are GGML's: `#[repr(C)]` with sizes pinned by const asserts (34 and 144 bytes),
//!   little-endian f16 scales first, then the packed scales / quants in GGML's order.
//! - Dequantization is exact and identical at every level: every dequantized value is
//!   `d·q` (Q8_0, an exact f32 product of an f16 and an i8) or `(d·sc)·q − dmin·m` (Q4_K; both
//!   products are exact in f32, only the subtraction rounds), so the SIMD dequantizers equal the
//!   scalar ones bit for bit (tested).
//! - Quantization is deterministic and identical at every level, bit for bit (tested): Q8_0 is
//!   GGML's reference quantizer exactly; Q4_K follows GGML's reference scheme, and its
//!   reconstruction error is tested against the previous, one-candidate-at-a-time search.
//! - Matmul keeps f32 activations and f32 accumulation: weight rows are dequantized into an f32
//!   scratch buffer and multiplied with the crate's f32 kernels at the same level. The result is
//!   therefore exactly `x · dequantize(W)ᵀ` as the f32 kernels compute it (same summation order,
//!   same matvec/GEMM choice by `m`), and deterministic across thread counts like them.
//!
//! The matmul driver here (`QWeights`, `dequantize_with`, `run_block`) also runs the blocks of
//! pre-quantized checkpoints (FP8 E4M3, bitsandbytes NF4 / FP4), which [`crate::prequant`] owns
//! together with their dequantizers; the same invariants hold for them.

use std::cell::RefCell;

use half::f16;

use crate::prequant::{
    dequantize_row_f8, dequantize_row_fp4, dequantize_row_mxfp4, dequantize_row_nf4, BlockF8,
    BlockFp4, BlockMxfp4, BlockNf4, QK_B4, QK_F8, QK_MX,
};
use crate::{scalar, Level, OutBlock};

/// Weights per `Q8_0` block.
pub const QK8_0: usize = 32;
/// Weights per `Q4_K` super-block (8 sub-blocks of 32).
pub const QK_K: usize = 256;

/// GGML `block_q8_0`: 32 weights `d · qs[i]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Quants, weight `i` is `d · qs[i]`.
    pub qs: [i8; QK8_0],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

/// GGML `block_q4_K`: 256 weights in 8 sub-blocks of 32. Sub-block `s` has a 6-bit scale `sc`
/// and a 6-bit min `m` (packed in `scales`, see [`BlockQ4K::scale_min`]); its weights are
/// `(d·sc)·q − dmin·m` with 4-bit `q`. Quants: for chunk `j` in `0..4`, byte `qs[32j + l]` holds
/// weight `64j + l` in its low nibble and weight `64j + 32 + l` in its high nibble.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockQ4K {
    /// Super-block scale of the sub-block scales.
    pub d: f16,
    /// Super-block scale of the sub-block mins.
    pub dmin: f16,
    /// 8 six-bit scales and 8 six-bit mins, packed as GGML's `get_scale_min_k4` reads them.
    pub scales: [u8; 12],
    /// 4-bit quants, see the type doc for the nibble order.
    pub qs: [u8; QK_K / 2],
}

const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

impl BlockQ4K {
    /// Six-bit (scale, min) of sub-block `s` (`0..8`), unpacked as GGML does: for `s < 4` the
    /// low 6 bits of `scales[s]` and `scales[s + 4]`; for `s >= 4` the low / high nibble of
    /// `scales[s + 4]` with the top 2 bits of `scales[s - 4]` / `scales[s]` as bits 4..6.
    #[inline]
    pub fn scale_min(&self, s: usize) -> (u8, u8) {
        let q = &self.scales;
        if s < 4 {
            (q[s] & 63, q[s + 4] & 63)
        } else {
            (
                (q[s + 4] & 0x0F) | ((q[s - 4] >> 6) << 4),
                (q[s + 4] >> 4) | ((q[s] >> 6) << 4),
            )
        }
    }

    /// Packs eight 6-bit (scale, min) pairs into the 12-byte layout [`Self::scale_min`] reads.
    /// Panics if a value exceeds 63.
    pub fn pack_scales_mins(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
        assert!(sc.iter().chain(m).all(|&v| v < 64), "6-bit values only");
        let mut q = [0u8; 12];
        for s in 0..4 {
            q[s] = sc[s] | ((sc[s + 4] >> 4) << 6);
            q[s + 4] = m[s] | ((m[s + 4] >> 4) << 6);
            q[s + 8] = (sc[s + 4] & 0x0F) | ((m[s + 4] & 0x0F) << 4);
        }
        q
    }

    /// The f32 (scale, min) of sub-block `s`: `(d·sc, dmin·m)`, both exact.
    #[inline]
    fn sub_scale_min(&self, s: usize) -> (f32, f32) {
        let (sc, m) = self.scale_min(s);
        (self.d.to_f32() * sc as f32, self.dmin.to_f32() * m as f32)
    }

    /// All 8 sub-block (scale, min) pairs given `d` and `dmin` already widened to f32 (the
    /// SIMD paths widen them with F16C); equal to [`Self::sub_scale_min`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn sub_scales_mins(&self, d: f32, dmin: f32) -> ([f32; 8], [f32; 8]) {
        let mut ds = [0f32; 8];
        let mut ms = [0f32; 8];
        for s in 0..8 {
            let (sc, m) = self.scale_min(s);
            ds[s] = d * sc as f32;
            ms[s] = dmin * m as f32;
        }
        (ds, ms)
    }
}

/// Quantizes `src` into Q8_0 blocks exactly as GGML's reference quantizer does:
/// `d = amax / 127`, `q = round(x / d)` (computed as `x · (1/d)`, halves away from zero), with
/// `d` stored as f16. Runs at the best SIMD level this CPU has; every level computes the same
/// blocks bit for bit (the code is one body, written without libm calls so that it vectorizes).
/// Panics unless `src.len() == 32 · dst.len()`.
pub fn quantize_row_q8_0(src: &[f32], dst: &mut [BlockQ8_0]) {
    quantize_row_q8_0_with(crate::level(), src, dst)
}

/// [`quantize_row_q8_0`] at a given SIMD level (tests force each one).
pub(crate) fn quantize_row_q8_0_with(level: Level, src: &[f32], dst: &mut [BlockQ8_0]) {
    assert_eq!(
        src.len(),
        dst.len() * QK8_0,
        "quantize_row_q8_0: length mismatch"
    );
    crate::assert_supported(level);
    match level {
        Level::Scalar => q8_0_blocks(src, dst),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            // SAFETY: assert_supported checked avx2/fma/f16c.
            unsafe { x86::quantize_q8_0_avx2(src, dst) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => {
            // SAFETY: assert_supported checked avx512f/bw/vl.
            unsafe { x86::quantize_q8_0_avx512(src, dst) }
        }
    }
}

/// The body of [`quantize_row_q8_0`], inlined into each level's entry point.
#[inline(always)]
fn q8_0_blocks(src: &[f32], dst: &mut [BlockQ8_0]) {
    for (x, b) in src.chunks_exact(QK8_0).zip(dst) {
        let x: &[f32; QK8_0] = x.try_into().expect("chunks_exact gives whole blocks");
        let d = max_abs32(x) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = round_half_away(v * id).clamp(-128, 127) as i8;
        }
    }
}

/// `t.round() as i32` (halves away from zero; NaN gives 0) for `|t| <= 256`, saturating at
/// ±256 beyond: the same value as `f32::round` wherever the caller's clamp to `i8` can tell,
/// without the libm call `round` becomes on baseline x86_64 and without a float-to-int cast
/// (which does not vectorize), so the loop calling it vectorizes.
#[inline(always)]
fn round_half_away(t: f32) -> i32 {
    let a = t.abs();
    // NaN fails both comparisons and becomes 0.
    let a = if a < 256.0 {
        a
    } else if a >= 256.0 {
        256.0
    } else {
        0.0
    };
    // Nearest with halves to even, as a float `n` and as an integer `r` (the low bits of the
    // biased sum, see ROUND_MAGIC); `a − n` is exact, and exactly 0.5 only at a half that went
    // down to the even neighbour, which away-from-zero rounding takes up instead.
    let y = a + ROUND_MAGIC;
    let n = y - ROUND_MAGIC;
    let mut r = y.to_bits().wrapping_sub(ROUND_MAGIC.to_bits()) as i32;
    if a - n == 0.5 {
        r += 1;
    }
    if t < 0.0 {
        -r
    } else {
        r
    }
}

/// Largest `|x_i|` (NaNs ignored, 0 for none), as `fold(0, f32::max)` gives it; max is exact,
/// so the lane order does not matter.
#[inline(always)]
fn max_abs32(x: &[f32; 32]) -> f32 {
    let mut m = [0f32; 16];
    for c in 0..2 {
        for (mi, &v) in m.iter_mut().zip(&x[16 * c..16 * c + 16]) {
            let a = v.abs();
            *mi = if a > *mi { a } else { *mi };
        }
    }
    max_tree16(m)
}

/// Largest of 16 non-NaN values.
#[inline(always)]
fn max_tree16(mut m: [f32; 16]) -> f32 {
    for half in [8, 4, 2, 1] {
        for i in 0..half {
            m[i] = if m[i + half] > m[i] {
                m[i + half]
            } else {
                m[i]
            };
        }
    }
    m[0]
}

/// Dequantizes Q8_0 blocks: `dst[32b + i] = d_b · qs_b[i]`. Panics unless
/// `dst.len() == 32 · src.len()`.
pub fn dequantize_row_q8_0(src: &[BlockQ8_0], dst: &mut [f32]) {
    assert_eq!(
        dst.len(),
        src.len() * QK8_0,
        "dequantize_row_q8_0: length mismatch"
    );
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK8_0)) {
        let d = b.d.to_f32();
        for (o, &q) in y.iter_mut().zip(&b.qs) {
            *o = d * q as f32;
        }
    }
}

/// Dequantizes Q4_K super-blocks: sub-block `s` gives `(d·sc)·q − dmin·m`, in GGML's order.
/// Panics unless `dst.len() == 256 · src.len()`.
pub fn dequantize_row_q4_k(src: &[BlockQ4K], dst: &mut [f32]) {
    assert_eq!(
        dst.len(),
        src.len() * QK_K,
        "dequantize_row_q4_k: length mismatch"
    );
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        for j in 0..4 {
            let q = &b.qs[32 * j..32 * j + 32];
            let (d1, m1) = b.sub_scale_min(2 * j);
            let (d2, m2) = b.sub_scale_min(2 * j + 1);
            let (lo, hi) = y[64 * j..64 * j + 64].split_at_mut(32);
            for ((l, h), &v) in lo.iter_mut().zip(hi).zip(q) {
                *l = d1 * (v & 0x0F) as f32 - m1;
                *h = d2 * (v >> 4) as f32 - m2;
            }
        }
    }
}

/// `1.5 · 2^23`: for `0 <= t < 2^22`, `(t + ROUND_MAGIC) − ROUND_MAGIC` is `t` rounded to the
/// nearest integer, halves to even (the sum lands where the f32 spacing is 1; the subtraction is
/// exact), and that integer is also the sum's bits minus `ROUND_MAGIC`'s. GGML's `nearest_int`
/// trick: unlike `round_ties_even` it needs no SSE4.1 (without it, a libm call) and vectorizes
/// at every level.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Largest 4-bit quant.
const Q4_MAX: f32 = 15.0;

/// Grid spacings the (scale, min) search tries: GGML's `make_qkx2_quants` grid for Q4_K,
/// `Q4_MAX + rmin + rdelta · step` steps over the range with `rmin = −1`, `rdelta = 0.1`.
const Q4K_STEPS: usize = 21;

/// Grid spacings evaluated per pass over a sub-block's weights: 3 × 3 independent accumulator
/// chains hide the f32 add latency; more would spill the AVX2 registers.
const Q4K_STEPS_PER_PASS: usize = 3;

const _: () = assert!(Q4K_STEPS.is_multiple_of(Q4K_STEPS_PER_PASS));

/// Weighted least-squares fit of `L` sub-blocks of 32 weights side by side, one per lane
/// (`x[i][lane]` is weight `i` of that sub-block): `x ≈ scale·q + min` with `q` in `0..=15`,
/// `min <= 0`, weights `w_i = rms(x) + |x_i|`. Returns per lane `(scale, −min)` (the min as the
/// non-negative offset Q4_K stores).
///
/// The method of GGML's `make_qkx2_quants` (written afresh): for every grid spacing
/// `(Q4_MAX + rmin + rdelta·step) / (max − min(x, 0))` round the weights onto the grid starting
/// at `min(x, 0)`, solve the 2×2 weighted least-squares problem for (scale, min) in closed form
/// (clamping the min to 0 if it comes out positive), and keep the first fit with the smallest
/// weighted squared error. Every lane runs that search serially, in the same order at every
/// SIMD width, so the result does not depend on the lane count or the level. Two shortcuts:
/// the error comes from the weighted sums the fit already has (`Σw(s·q + m − x)²` expanded), not
/// from a second pass over the weights; and GGML's separately scored plain min/max grid is only
/// the fallback, since the step with offset 0 rounds exactly like it and its least-squares
/// (scale, min) never does worse.
#[inline(always)]
fn fit_q4k_lanes<const L: usize>(x: &[[f32; L]; 32]) -> ([f32; L], [f32; L]) {
    const P: usize = Q4K_STEPS_PER_PASS;
    let mut sumsq = [0f32; L];
    for xi in x {
        for l in 0..L {
            sumsq[l] += xi[l] * xi[l];
        }
    }
    let mut rms = [0f32; L];
    for l in 0..L {
        rms[l] = (sumsq[l] / 32.0).sqrt();
    }
    let mut w = [[0f32; L]; 32];
    let (mut sum_w, mut sum_x, mut sum_x2) = ([0f32; L], [0f32; L], [0f32; L]);
    let (mut lo, mut hi) = ([f32::INFINITY; L], [f32::NEG_INFINITY; L]);
    for (xi, wi) in x.iter().zip(&mut w) {
        for l in 0..L {
            let v = xi[l];
            let wt = rms[l] + v.abs();
            wi[l] = wt;
            sum_w[l] += wt;
            sum_x[l] += v * wt;
            sum_x2[l] += wt * v * v;
            // NaNs fail the comparisons and are skipped, as `fold(.., f32::min)` skips them.
            lo[l] = if v < lo[l] { v } else { lo[l] };
            hi[l] = if v > hi[l] { v } else { hi[l] };
        }
    }
    let mut range = [0f32; L];
    for l in 0..L {
        lo[l] = if lo[l] < 0.0 { lo[l] } else { 0.0 };
        range[l] = hi[l] - lo[l];
    }
    let mut xl = [[0f32; L]; 32];
    for (d, xi) in xl.iter_mut().zip(x) {
        for l in 0..L {
            // x − lo >= 0 exactly, so every rounded value below is >= 0.
            d[l] = xi[l] - lo[l];
        }
    }
    // Fallback: the plain min/max grid.
    let mut best_err = [f32::INFINITY; L];
    let mut best_scale = [0f32; L];
    let mut best_min = lo;
    for l in 0..L {
        best_scale[l] = range[l] / Q4_MAX;
    }
    for pass in 0..Q4K_STEPS / P {
        let mut iscale = [[0f32; L]; P];
        for (c, is) in iscale.iter_mut().enumerate() {
            // GGML's f32 arithmetic for the step: rmin + rdelta·step, then + nmax.
            let offset = -1.0 + 0.1 * (pass * P + c) as f32;
            for l in 0..L {
                is[l] = (offset + Q4_MAX) / range[l];
            }
        }
        // Σw·q, Σw·q², Σw·q·x per step and lane.
        let (mut sl, mut sl2, mut sxl) = ([[0f32; L]; P], [[0f32; L]; P], [[0f32; L]; P]);
        for i in 0..32 {
            for c in 0..P {
                for l in 0..L {
                    let q = (iscale[c][l] * xl[i][l] + ROUND_MAGIC) - ROUND_MAGIC;
                    let q = if q < Q4_MAX { q } else { Q4_MAX };
                    let wq = w[i][l] * q;
                    sl[c][l] += wq;
                    sl2[c][l] += wq * q;
                    sxl[c][l] += wq * x[i][l];
                }
            }
        }
        for c in 0..P {
            for l in 0..L {
                let (sl, sl2, sxl) = (sl[c][l], sl2[c][l], sxl[c][l]);
                let det = sum_w[l] * sl2 - sl * sl;
                let mut s = (sum_w[l] * sxl - sum_x[l] * sl) / det;
                let mut m = (sl2 * sum_x[l] - sl * sxl) / det;
                if m > 0.0 {
                    m = 0.0;
                    s = sxl / sl2;
                }
                let e = sum_x2[l] + s * s * sl2 + m * m * sum_w[l] + 2.0 * s * m * sl
                    - 2.0 * s * sxl
                    - 2.0 * m * sum_x[l];
                // det <= 0 (all weights on one level) never wins; nor does a NaN error.
                if det > 0.0 && e < best_err[l] {
                    best_err[l] = e;
                    best_scale[l] = s;
                    best_min[l] = m;
                }
            }
        }
    }
    let mut min = [0f32; L];
    for l in 0..L {
        if hi[l] > lo[l] {
            min[l] = -best_min[l];
        } else {
            // Constant (or empty) sub-block: the min alone.
            best_scale[l] = 0.0;
            min[l] = -lo[l];
        }
    }
    (best_scale, min)
}

/// Quantizes `src` into Q4_K super-blocks.
///
/// Method (GGML's `quantize_row_q4_K_ref` scheme, own code): per 32-weight sub-block, a weighted
/// least-squares search for (scale, min) (`fit_q4k_lanes`: weights `rms(x) + |x_i|`, 21 grid
/// spacings, sub-blocks side by side in SIMD lanes); the 8 scales and 8 mins are then quantized
/// to 6 bits against super-block scales `d = max_scale / 63`, `dmin = max_min / 63` (f16), and
/// finally every weight is re-rounded against the *stored* sub-block scale and min, so the
/// quants fit what dequantization computes. Runs at the best SIMD level this CPU has; every
/// level computes the same blocks bit for bit (one body, per-lane serial sums, no fused
/// multiply-adds). Panics unless `src.len() == 256 · dst.len()`.
pub fn quantize_row_q4_k(src: &[f32], dst: &mut [BlockQ4K]) {
    quantize_row_q4_k_with(crate::level(), src, dst)
}

/// [`quantize_row_q4_k`] at a given SIMD level (tests force each one).
pub(crate) fn quantize_row_q4_k_with(level: Level, src: &[f32], dst: &mut [BlockQ4K]) {
    assert_eq!(
        src.len(),
        dst.len() * QK_K,
        "quantize_row_q4_k: length mismatch"
    );
    crate::assert_supported(level);
    match level {
        Level::Scalar => q4_k_blocks::<8>(src, dst),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            // SAFETY: assert_supported checked avx2/fma/f16c.
            unsafe { x86::quantize_q4_k_avx2(src, dst) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => {
            // SAFETY: assert_supported checked avx512f/bw/vl.
            unsafe { x86::quantize_q4_k_avx512(src, dst) }
        }
    }
}

/// The body of [`quantize_row_q4_k`], inlined into each level's entry point: `L / 8`
/// super-blocks at a time (`L` a multiple of 8, one sub-block per lane).
#[inline(always)]
fn q4_k_blocks<const L: usize>(src: &[f32], dst: &mut [BlockQ4K]) {
    let per_group = L / 8;
    let mut xt = [[0f32; L]; 32];
    for (xs, bs) in src.chunks(QK_K * per_group).zip(dst.chunks_mut(per_group)) {
        // Transpose: lane l gets sub-block l; lanes past the row's end (its last, partial
        // group) get zeros, whose fit is discarded.
        if xs.len() < QK_K * per_group {
            xt = [[0f32; L]; 32];
        }
        for (l, sb) in xs.chunks_exact(32).enumerate() {
            for (row, &v) in xt.iter_mut().zip(sb) {
                row[l] = v;
            }
        }
        let (scales, mins) = fit_q4k_lanes(&xt);
        for (g, (x, b)) in xs.chunks_exact(QK_K).zip(bs).enumerate() {
            let scales: &[f32; 8] = scales[8 * g..8 * g + 8].try_into().expect("8 sub-blocks");
            let mins: &[f32; 8] = mins[8 * g..8 * g + 8].try_into().expect("8 sub-blocks");
            finish_block_q4k(x, scales, mins, b);
        }
    }
}

/// Quantizes a super-block's fitted sub-block scales and mins to 6 bits, stores them with the
/// f16 super-block scales, and rounds every weight against the stored values.
#[inline(always)]
fn finish_block_q4k(x: &[f32], scales: &[f32; 8], mins: &[f32; 8], b: &mut BlockQ4K) {
    let max_scale = scales.iter().copied().fold(0f32, f32::max);
    let max_min = mins.iter().copied().fold(0f32, f32::max);
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for s in 0..8 {
        ls[s] = round_to_level(inv_scale * scales[s], 63.0);
        lm[s] = round_to_level(inv_min * mins[s], 63.0);
    }
    b.scales = BlockQ4K::pack_scales_mins(&ls, &lm);
    b.d = f16::from_f32(max_scale / 63.0);
    b.dmin = f16::from_f32(max_min / 63.0);
    let mut l = [0u8; QK_K];
    for s in 0..8 {
        let (d, m) = b.sub_scale_min(s);
        let ls = &mut l[32 * s..32 * s + 32];
        if d == 0.0 {
            // Every weight of the sub-block dequantizes to −m whatever its quant.
            ls.fill(0);
            continue;
        }
        for (q, &v) in ls.iter_mut().zip(&x[32 * s..32 * s + 32]) {
            *q = round_to_level((v + m) / d, Q4_MAX);
        }
    }
    for j in 0..4 {
        for i in 0..32 {
            b.qs[32 * j + i] = l[64 * j + i] | (l[64 * j + 32 + i] << 4);
        }
    }
}

/// `t` rounded to the nearest integer (halves to even) and clamped to `0..=top` (NaN gives 0):
/// `(t.round_ties_even() as i32).clamp(0, top)`, clamping first so that the rounding trick's range
/// always holds.
#[inline(always)]
fn round_to_level(t: f32, top: f32) -> u8 {
    let t = if t > 0.0 { t } else { 0.0 };
    let t = if t < top { t } else { top };
    // The integer is in the low bits of the biased sum (see ROUND_MAGIC); no float-to-int
    // cast, which would not vectorize.
    (t + ROUND_MAGIC)
        .to_bits()
        .wrapping_sub(ROUND_MAGIC.to_bits()) as u8
}

/// A quantized weight matrix (the quantized variants of [`crate::Weights`]).
#[derive(Clone, Copy)]
pub(crate) enum QWeights<'a> {
    Q8_0(&'a [BlockQ8_0]),
    Q4K(&'a [BlockQ4K]),
    F8(&'a [BlockF8]),
    Nf4(&'a [BlockNf4]),
    Fp4(&'a [BlockFp4]),
    Rounded4(crate::prequant::Rounded4<'a>),
    Mxfp4(&'a [BlockMxfp4]),
}

impl QWeights<'_> {
    /// Weights per block.
    fn block(self) -> usize {
        match self {
            QWeights::Q8_0(_) => QK8_0,
            QWeights::Q4K(_) => QK_K,
            QWeights::F8(_) => QK_F8,
            QWeights::Nf4(_) | QWeights::Fp4(_) | QWeights::Rounded4(_) => QK_B4,
            QWeights::Mxfp4(_) => QK_MX,
        }
    }
}

/// Dequantizes blocks `b0..b1` of `w` into `out` (`(b1 - b0) · block` values) at `level`.
pub(crate) fn dequantize_with(
    level: Level,
    w: QWeights<'_>,
    b0: usize,
    b1: usize,
    out: &mut [f32],
) {
    crate::assert_supported(level);
    if let QWeights::Rounded4(r) = w {
        let part = crate::prequant::Rounded4 {
            blocks: &r.blocks[b0..b1],
            ..r
        };
        return match level {
            Level::Scalar => crate::prequant::dequantize_row_rounded4(part, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: assert_supported checked avx2/fma/f16c.
            Level::Avx2 => crate::prequant::with_rounded4!(part, |b| unsafe {
                crate::quant_avx2::dequantize(b, out)
            }),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: assert_supported checked avx512f/bw/vl (and the AVX2 level's f16c).
            Level::Avx512 => crate::prequant::with_rounded4!(part, |b| unsafe {
                crate::quant_avx512::dequantize(b, out)
            }),
        };
    }
    match (level, w) {
        (Level::Scalar, QWeights::Q8_0(w)) => dequantize_row_q8_0(&w[b0..b1], out),
        (Level::Scalar, QWeights::Q4K(w)) => dequantize_row_q4_k(&w[b0..b1], out),
        (Level::Scalar, QWeights::F8(w)) => dequantize_row_f8(&w[b0..b1], out),
        (Level::Scalar, QWeights::Nf4(w)) => dequantize_row_nf4(&w[b0..b1], out),
        (Level::Scalar, QWeights::Fp4(w)) => dequantize_row_fp4(&w[b0..b1], out),
        (Level::Scalar, QWeights::Mxfp4(w)) => dequantize_row_mxfp4(&w[b0..b1], out),
        (_, QWeights::Rounded4(_)) => unreachable!("handled above"),
        #[cfg(target_arch = "x86_64")]
        (Level::Avx2, QWeights::Q8_0(w)) => {
            // SAFETY: assert_supported checked avx2/fma/f16c.
            unsafe { x86::dequant_q8_0_avx2(&w[b0..b1], out) }
        }
        #[cfg(target_arch = "x86_64")]
        (Level::Avx2, QWeights::Q4K(w)) => {
            // SAFETY: assert_supported checked avx2/fma/f16c.
            unsafe { x86::dequant_q4_k_avx2(&w[b0..b1], out) }
        }
        #[cfg(target_arch = "x86_64")]
        (Level::Avx2, QWeights::F8(w)) => {
            // SAFETY: assert_supported checked avx2/fma/f16c.
            unsafe { crate::quant_avx2::dequantize(&w[b0..b1], out) }
        }
        #[cfg(target_arch = "x86_64")]
        (Level::Avx2, QWeights::Nf4(w)) => {
            // SAFETY: assert_supported checked avx2/fma/f16c.
            unsafe { crate::quant_avx2::dequantize(&w[b0..b1], out) }
        }
        #[cfg(target_arch = "x86_64")]
        (Level::Avx2, QWeights::Fp4(w)) => {
            // SAFETY: assert_supported checked avx2/fma/f16c.
            unsafe { crate::quant_avx2::dequantize(&w[b0..b1], out) }
        }
        #[cfg(target_arch = "x86_64")]
        (Level::Avx2, QWeights::Mxfp4(w)) => {
            // SAFETY: assert_supported checked avx2/fma/f16c.
            unsafe { crate::quant_avx2::dequantize(&w[b0..b1], out) }
        }
        #[cfg(target_arch = "x86_64")]
        (Level::Avx512, QWeights::Q8_0(w)) => {
            // SAFETY: assert_supported checked avx512f/bw/vl (and the AVX2 level).
            unsafe { x86::dequant_q8_0_avx512(&w[b0..b1], out) }
        }
        #[cfg(target_arch = "x86_64")]
        (Level::Avx512, QWeights::Q4K(w)) => {
            // SAFETY: assert_supported checked avx512f/bw/vl (and the AVX2 level).
            unsafe { x86::dequant_q4_k_avx512(&w[b0..b1], out) }
        }
        #[cfg(target_arch = "x86_64")]
        (Level::Avx512, QWeights::F8(w)) => {
            // SAFETY: assert_supported checked avx512f/bw/vl (and the AVX2 level's f16c).
            unsafe { crate::quant_avx512::dequantize(&w[b0..b1], out) }
        }
        #[cfg(target_arch = "x86_64")]
        (Level::Avx512, QWeights::Nf4(w)) => {
            // SAFETY: assert_supported checked avx512f/bw/vl (and the AVX2 level's f16c).
            unsafe { crate::quant_avx512::dequantize(&w[b0..b1], out) }
        }
        #[cfg(target_arch = "x86_64")]
        (Level::Avx512, QWeights::Fp4(w)) => {
            // SAFETY: assert_supported checked avx512f/bw/vl (and the AVX2 level's f16c).
            unsafe { crate::quant_avx512::dequantize(&w[b0..b1], out) }
        }
        #[cfg(target_arch = "x86_64")]
        (Level::Avx512, QWeights::Mxfp4(w)) => {
            // SAFETY: assert_supported checked avx512f/bw/vl (and the AVX2 level's f16c).
            unsafe { crate::quant_avx512::dequantize(&w[b0..b1], out) }
        }
    }
}

/// Dequantized f32 values per GEMM chunk (1 MiB, at least 32 whole rows): the GEMM packs and
/// reuses each chunk across all rows of x, so the extra dequantize pass costs ~1/m per FMA.
const GEMM_CHUNK_FLOATS: usize = 256 * 1024;

thread_local! {
    /// Per-thread scratch for dequantized weight rows, reused across calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Computes one output block for quantized weights: `out[rows, cols] = x[rows, k] · W[cols, k]ᵀ`
/// with `W = dequantize(w)`; `k > 0` is a multiple of the block size and `w` holds exactly
/// `cols` rows. SIMD matvec (`m <= MATVEC_MAX_M`) dequantizes in registers (`quant_avx512`,
/// `quant_avx2`) in the f32 matvec kernels' summation order; SIMD GEMM dequantizes chunks of
/// weight rows into f32 scratch and runs the f32 GEMM of the same level on them; the scalar
/// level dequantizes one row at a time for `scalar::matmul_block`. Either way the result
/// equals the same level's f32 kernel on `dequantize(w)` bit for bit.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(crate) fn run_block(
    level: Level,
    use_gemm: bool,
    x: &[f32],
    k: usize,
    w: QWeights<'_>,
    out: OutBlock,
) {
    let bpr = k / w.block();
    assert!(k > 0 && bpr * w.block() == k);
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && !use_gemm {
        crate::assert_supported(level);
        let mut out = out;
        // SAFETY: the Avx512 level (checked on the line above) includes the AVX2 level's f16c.
        unsafe {
            match w {
                QWeights::Q8_0(w) => crate::quant_avx512::matvec(x, k, w, &mut out),
                QWeights::Q4K(w) => crate::quant_avx512::matvec(x, k, w, &mut out),
                QWeights::F8(w) => crate::quant_avx512::matvec(x, k, w, &mut out),
                QWeights::Nf4(w) => crate::quant_avx512::matvec(x, k, w, &mut out),
                QWeights::Fp4(w) => crate::quant_avx512::matvec(x, k, w, &mut out),
                QWeights::Rounded4(r) => crate::prequant::with_rounded4!(r, |b| {
                    crate::quant_avx512::matvec(x, k, b, &mut out)
                }),
                QWeights::Mxfp4(w) => crate::quant_avx512::matvec(x, k, w, &mut out),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx2 && !use_gemm {
        crate::assert_supported(level);
        let mut out = out;
        // SAFETY: the line above checked avx2/fma/f16c.
        unsafe {
            match w {
                QWeights::Q8_0(w) => crate::quant_avx2::matvec(x, k, w, &mut out),
                QWeights::Q4K(w) => crate::quant_avx2::matvec(x, k, w, &mut out),
                QWeights::F8(w) => crate::quant_avx2::matvec(x, k, w, &mut out),
                QWeights::Nf4(w) => crate::quant_avx2::matvec(x, k, w, &mut out),
                QWeights::Fp4(w) => crate::quant_avx2::matvec(x, k, w, &mut out),
                QWeights::Rounded4(r) => crate::prequant::with_rounded4!(r, |b| {
                    crate::quant_avx2::matvec(x, k, b, &mut out)
                }),
                QWeights::Mxfp4(w) => crate::quant_avx2::matvec(x, k, w, &mut out),
            }
        }
        return;
    }
    // Left: the scalar level (one row at a time, as `scalar::matmul_block` reads them) and the
    // SIMD GEMM path.
    debug_assert!(level == Level::Scalar || use_gemm);
    let n = out.cols();
    let chunk_rows = if level == Level::Scalar {
        1
    } else {
        (GEMM_CHUNK_FLOATS / k).next_multiple_of(32).max(32)
    };
    SCRATCH.with(|s| {
        let mut buf = s.borrow_mut();
        let need = chunk_rows.min(n) * k;
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let mut rest = out;
        let mut j0 = 0;
        while j0 < n {
            let j1 = (j0 + chunk_rows).min(n);
            let (mut head, tail) = rest.split_cols(j1 - j0);
            let wf = &mut buf[..(j1 - j0) * k];
            dequantize_with(level, w, j0 * bpr, j1 * bpr, wf);
            let wf = &*wf;
            match level {
                Level::Scalar => scalar::matmul_block(x, k, wf, &mut head),
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 => {
                    // SAFETY: dequantize_with ran assert_supported(Level::Avx2).
                    unsafe { crate::avx2::gemm(x, k, wf, &mut head) }
                }
                #[cfg(target_arch = "x86_64")]
                Level::Avx512 => {
                    // SAFETY: dequantize_with ran assert_supported(Level::Avx512).
                    unsafe { crate::avx512::gemm(x, k, wf, &mut head) }
                }
            }
            rest = tail;
            j0 = j1;
        }
    });
}

/// SIMD twins of [`dequantize_row_q8_0`] and [`dequantize_row_q4_k`] (each computes the same
/// exact products and the same single rounding per value, so results are bit-identical), and
/// the quantizers' shared bodies compiled for each SIMD level.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use half::f16;

    use super::{BlockQ4K, BlockQ8_0, QK8_0, QK_K};

    /// [`super::quantize_row_q8_0`]'s body compiled for AVX2 (the same operations, vectorized).
    ///
    /// # Safety
    /// The CPU must support avx2/fma/f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q8_0_avx2(src: &[f32], dst: &mut [BlockQ8_0]) {
        super::q8_0_blocks(src, dst)
    }

    /// [`super::quantize_row_q8_0`]'s body compiled for AVX-512.
    ///
    /// # Safety
    /// The CPU must support avx512f/bw/vl.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn quantize_q8_0_avx512(src: &[f32], dst: &mut [BlockQ8_0]) {
        super::q8_0_blocks(src, dst)
    }

    /// [`super::quantize_row_q4_k`]'s body compiled for AVX2 (the same operations, vectorized;
    /// no FMA contraction, so the results equal the scalar level's bit for bit).
    ///
    /// # Safety
    /// The CPU must support avx2/fma/f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_q4_k_avx2(src: &[f32], dst: &mut [BlockQ4K]) {
        super::q4_k_blocks::<8>(src, dst)
    }

    /// [`super::quantize_row_q4_k`]'s body compiled for AVX-512: 16 sub-blocks (two
    /// super-blocks) side by side fill one register per value.
    ///
    /// # Safety
    /// The CPU must support avx512f/bw/vl.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn quantize_q4_k_avx512(src: &[f32], dst: &mut [BlockQ4K]) {
        super::q4_k_blocks::<16>(src, dst)
    }

    /// f16 -> f32 with F16C (exact, like `f16::to_f32`, without its run-time dispatch).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn widen_f16c(h: f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
    }

    /// f16 -> f32 in all 16 lanes (AVX-512 F).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn widen_f16_512(h: f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_set1_epi16(h.to_bits() as i16))
    }

    /// f16 -> f32 scalar at the AVX-512 level.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn widen_f16_512s(h: f16) -> f32 {
        _mm512_cvtss_f32(widen_f16_512(h))
    }

    /// # Safety
    /// The CPU must support avx2/fma/f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequant_q8_0_avx2(src: &[BlockQ8_0], dst: &mut [f32]) {
        assert_eq!(dst.len(), src.len() * QK8_0);
        for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK8_0)) {
            let d = _mm256_set1_ps(widen_f16c(b.d));
            let (qp, yp) = (b.qs.as_ptr(), y.as_mut_ptr());
            for c in 0..4 {
                // SAFETY: qs has 32 bytes, this reads bytes 8c..8c+8; y has 32 floats and this
                // writes 8c..8c+8. Unaligned load/store instructions.
                unsafe {
                    let q = _mm_loadl_epi64(qp.add(8 * c).cast());
                    let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                    _mm256_storeu_ps(yp.add(8 * c), _mm256_mul_ps(d, v));
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support avx2/fma/f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequant_q4_k_avx2(src: &[BlockQ4K], dst: &mut [f32]) {
        assert_eq!(dst.len(), src.len() * QK_K);
        let low = _mm256_set1_epi32(0x0F);
        for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
            let yp = y.as_mut_ptr();
            let (ds, ms) = b.sub_scales_mins(widen_f16c(b.d), widen_f16c(b.dmin));
            for j in 0..4 {
                let (d1, m1, d2, m2) = (ds[2 * j], ms[2 * j], ds[2 * j + 1], ms[2 * j + 1]);
                let (d1, m1, d2, m2) = (
                    _mm256_set1_ps(d1),
                    _mm256_set1_ps(m1),
                    _mm256_set1_ps(d2),
                    _mm256_set1_ps(m2),
                );
                for c in 0..4 {
                    // SAFETY: reads qs[32j + 8c .. +8] (< 128) and writes y[64j + 8c .. +8] and
                    // y[64j + 32 + 8c .. +8] (< 256); unaligned instructions.
                    unsafe {
                        let q = _mm_loadl_epi64(b.qs.as_ptr().add(32 * j + 8 * c).cast());
                        let v = _mm256_cvtepu8_epi32(q);
                        let lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, low));
                        let hi = _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(v));
                        // fmsub rounds once; d·q is exact, so this equals (d·q) − m rounded.
                        _mm256_storeu_ps(yp.add(64 * j + 8 * c), _mm256_fmsub_ps(d1, lo, m1));
                        _mm256_storeu_ps(yp.add(64 * j + 32 + 8 * c), _mm256_fmsub_ps(d2, hi, m2));
                    }
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support avx512f/bw/vl.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn dequant_q8_0_avx512(src: &[BlockQ8_0], dst: &mut [f32]) {
        assert_eq!(dst.len(), src.len() * QK8_0);
        for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK8_0)) {
            let d = widen_f16_512(b.d);
            let (qp, yp) = (b.qs.as_ptr(), y.as_mut_ptr());
            for c in 0..2 {
                // SAFETY: reads qs[16c..16c+16] (of 32) and writes y[16c..16c+16] (of 32).
                unsafe {
                    let q = _mm_loadu_si128(qp.add(16 * c).cast());
                    let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
                    _mm512_storeu_ps(yp.add(16 * c), _mm512_mul_ps(d, v));
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support avx512f/bw/vl.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn dequant_q4_k_avx512(src: &[BlockQ4K], dst: &mut [f32]) {
        assert_eq!(dst.len(), src.len() * QK_K);
        let low = _mm512_set1_epi32(0x0F);
        for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
            let yp = y.as_mut_ptr();
            let (ds, ms) = b.sub_scales_mins(widen_f16_512s(b.d), widen_f16_512s(b.dmin));
            for j in 0..4 {
                let (d1, m1, d2, m2) = (ds[2 * j], ms[2 * j], ds[2 * j + 1], ms[2 * j + 1]);
                let (d1, m1, d2, m2) = (
                    _mm512_set1_ps(d1),
                    _mm512_set1_ps(m1),
                    _mm512_set1_ps(d2),
                    _mm512_set1_ps(m2),
                );
                for c in 0..2 {
                    // SAFETY: reads qs[32j + 16c .. +16] (< 128) and writes y[64j + 16c .. +16]
                    // and y[64j + 32 + 16c .. +16] (< 256); unaligned instructions.
                    unsafe {
                        let q = _mm_loadu_si128(b.qs.as_ptr().add(32 * j + 16 * c).cast());
                        let v = _mm512_cvtepu8_epi32(q);
                        let lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
                        let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v));
                        // fmsub rounds once; d·q is exact, so this equals (d·q) − m rounded.
                        _mm512_storeu_ps(yp.add(64 * j + 16 * c), _mm512_fmsub_ps(d1, lo, m1));
                        _mm512_storeu_ps(yp.add(64 * j + 32 + 16 * c), _mm512_fmsub_ps(d2, hi, m2));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "quant_tests.rs"]
mod tests;
