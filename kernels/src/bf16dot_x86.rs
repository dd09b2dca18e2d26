//! AVX-512 BF16 kernels of the bf16-activation path (`bf16dot`, whose module doc defines the
//! order they keep and whose `dot_scalar` is their twin).
//!
//! One register tile computes `R × C` output elements as inner products: per 32-element chunk
//! it loads `R` x vectors and `C` weight vectors (32 bf16 each: 16 (even, odd) pairs, the
//! layout `vdpbf16ps` wants, which a row-major weight row already has, so weights are never
//! packed or converted) and issues `R·C` `vdpbf16ps`, one per element into that element's own
//! accumulator; at the end each accumulator is reduced by `hsum16`. Chunks run in increasing
//! order, so every element is the twin's chain whatever the tile shape.
//! - Decode, one x row: a `1 × 1` tile per weight row, rows in order: the call reads the
//!   weights as one sequential stream, each weight vector once (x, a few KiB, stays in L1).
//! - Decode, 2..=`MATVEC_MAX_M` x rows ([`decode_blocked`]): groups of 8 consecutive weight
//!   rows (one contiguous region) in k blocks, so the x block stays in L1 (whole x rows of
//!   several rows would not: every weight vector would then wait on L2), `R × 2` tiles whose
//!   accumulators are carried from block to block; each weight vector is still read once.
//! - Prefill: `MR × NR` tiles over column blocks of [`nc_cols`] weight rows (kept in L2), x
//!   row strips (in L1) swept over each block: 2 loads per 4 `vdpbf16ps`.
//!
//! What must hold: x comes from a `PackedX` (rows padded with zeros to a whole chunk, so x
//! loads are never masked); weight loads past `k` are masked off (zero, never read).

use core::arch::x86_64::*;

use half::bf16;

use crate::bf16dot::{PackedX, CHUNK};
use crate::OutBlock;

/// Rows of x per prefill tile.
const MR: usize = 4;
/// Weight rows (output columns) per prefill tile: 4 × 4 = 16 accumulators + 4 weight vectors
/// + 1 x vector fit the 32 zmm registers, with 2 loads per 4 dot instructions.
const NR: usize = 4;

/// Weight bytes per prefill column block: resident in L2 (1 MiB on Zen 4) next to the x rows
/// streamed past it.
const BLOCK_BYTES: usize = 256 << 10;

/// Weight rows per prefill column block for rows of `k` elements (a multiple of `NR`).
fn nc_cols(k: usize) -> usize {
    (BLOCK_BYTES / (2 * k.max(1))).max(NR) / NR * NR
}

/// Reinterprets 32 packed 16-bit values as bf16 lanes.
#[inline(always)]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: both are plain 512-bit vectors of the same size; every bit pattern is a valid
    // value of either.
    unsafe { core::mem::transmute::<__m512i, __m512bh>(v) }
}

/// `hsum16` of the module doc `bf16dot`: halves, then quarters, then pairs.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn hsum16(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let s8 = _mm256_add_ps(lo, hi);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
    _mm_cvtss_f32(s1)
}

/// Continues `R × C` dot products over chunks `p0 .. p1` (`p0` a multiple of 32, `p1 <= k`):
/// x rows `x[r·ldx ..]` (padded rows of `ldx = k` rounded up to 32) with weight rows
/// `w[c·k ..][..k]`, one `vdpbf16ps` per chunk into `acc[r][c]`, chunks in increasing order.
/// (The CPU features are the caller's to guarantee, as for every function of this module.)
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
fn dots<const R: usize, const C: usize>(
    x: &[bf16],
    ldx: usize,
    w: &[bf16],
    k: usize,
    p0: usize,
    p1: usize,
    acc: &mut [[__m512; C]; R],
) {
    assert!(k > 0 && ldx == k.next_multiple_of(CHUNK));
    assert!(x.len() >= (R - 1) * ldx + ldx && w.len() >= C * k);
    assert!(p0.is_multiple_of(CHUNK) && p0 <= p1 && p1 <= k);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let full = (p1 / CHUNK * CHUNK).max(p0);
    let mut p = p0;
    // SAFETY: x loads read x[r·ldx + p ..][..32] with p + 32 <= ldx (p < p1 <= k <= ldx, p and
    // ldx multiples of 32), inside x (asserted above). Weight loads read w[c·k + p ..][..32]
    // with p + 32 <= k in the loop, and in the tail only the lanes below k - p (mask): inside w.
    unsafe {
        while p < full {
            let mut wv = [_mm512_setzero_si512(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(wp.add(c * k + p).cast());
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = bh(_mm512_loadu_si512(xp.add(r * ldx + p).cast()));
                for (a, &v) in a.iter_mut().zip(&wv) {
                    *a = _mm512_dpbf16_ps(*a, xv, bh(v));
                }
            }
            p += CHUNK;
        }
        if p < p1 {
            let mask: __mmask32 = (1u32 << (k - p)) - 1;
            let mut wv = [_mm512_setzero_si512(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_epi16(mask, wp.add(c * k + p).cast());
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = bh(_mm512_loadu_si512(xp.add(r * ldx + p).cast()));
                for (a, &v) in a.iter_mut().zip(&wv) {
                    *a = _mm512_dpbf16_ps(*a, xv, bh(v));
                }
            }
        }
    }
}

/// Writes `hsum16(acc[r][c])` to `out.row(i0 + r)[j0 + c]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn store<const R: usize, const C: usize>(
    acc: &[[__m512; C]; R],
    out: &mut OutBlock,
    i0: usize,
    j0: usize,
) {
    for (r, a) in acc.iter().enumerate() {
        let dst = &mut out.row(i0 + r)[j0..j0 + C];
        for (d, &v) in dst.iter_mut().zip(a) {
            *d = hsum16(v);
        }
    }
}

/// `R × C` whole dot products (see [`dots`]), written to `out.row(i0 + r)[j0 + c]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
fn tile<const R: usize, const C: usize>(
    x: &[bf16],
    ldx: usize,
    w: &[bf16],
    k: usize,
    out: &mut OutBlock,
    i0: usize,
    j0: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    dots::<R, C>(x, ldx, w, k, 0, k, &mut acc);
    store::<R, C>(&acc, out, i0, j0);
}

/// Decode with `R >= 2` x rows: groups of [`DEC_COLS`] weight rows, taken in k blocks of
/// [`DEC_KB`] (the x block, `R` × 1 KiB, stays in L1 while the group's rows pass; whole x rows
/// would not once `R · k` passes ~16 K elements), two weight rows per register tile; ragged
/// last rows one at a time. The chains stay per element and in chunk order (`dots`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn decode_blocked<const R: usize>(
    x: &[bf16],
    ldx: usize,
    w: &[bf16],
    k: usize,
    out: &mut OutBlock,
) {
    let n = out.cols();
    let groups = n / DEC_COLS;
    for g in 0..groups {
        let j0 = g * DEC_COLS;
        let wg = &w[j0 * k..(j0 + DEC_COLS) * k];
        let mut acc = [[[_mm512_setzero_ps(); 2]; R]; DEC_COLS / 2];
        for p0 in (0..k).step_by(DEC_KB) {
            let p1 = (p0 + DEC_KB).min(k);
            for (c, a) in acc.iter_mut().enumerate() {
                dots::<R, 2>(x, ldx, &wg[2 * c * k..], k, p0, p1, a);
            }
        }
        for (c, a) in acc.iter().enumerate() {
            store::<R, 2>(a, out, 0, j0 + 2 * c);
        }
    }
    for j in groups * DEC_COLS..n {
        tile::<R, 1>(x, ldx, &w[j * k..(j + 1) * k], k, out, 0, j);
    }
}

/// Weight rows per decode group: 8 rows of a k block are read side by side (8 short
/// sequential runs inside one contiguous region of `8 · k` weights).
const DEC_COLS: usize = 8;

/// Elements per decode k block: 512 bf16 = 1 KiB per x row, 8 KiB for 8 rows, in L1.
const DEC_KB: usize = 512;

/// `out[rows, cols] = xb[i0 .. i0 + rows] · w[cols, k]ᵀ` in the order of `bf16dot`'s doc.
///
/// # Safety
/// The CPU must support avx512f/bw/vl/bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) fn matmul_block(xb: &PackedX, i0: usize, k: usize, w: &[bf16], out: &mut OutBlock) {
    let (m, n) = (out.rows(), out.cols());
    assert!(k > 0 && xb.kp() == k.next_multiple_of(CHUNK));
    assert!(i0 + m <= xb.rows() && w.len() == n * k);
    let ldx = xb.kp();
    if (2..=crate::MATVEC_MAX_M).contains(&m) {
        let x = xb.rows_from(i0);
        match m {
            2 => decode_blocked::<2>(x, ldx, w, k, out),
            3 => decode_blocked::<3>(x, ldx, w, k, out),
            4 => decode_blocked::<4>(x, ldx, w, k, out),
            5 => decode_blocked::<5>(x, ldx, w, k, out),
            6 => decode_blocked::<6>(x, ldx, w, k, out),
            7 => decode_blocked::<7>(x, ldx, w, k, out),
            _ => decode_blocked::<8>(x, ldx, w, k, out),
        }
        return;
    }
    if m == 1 {
        let x = xb.rows_from(i0);
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            tile::<1, 1>(x, ldx, wr, k, out, 0, j);
        }
        return;
    }
    let nc = nc_cols(k);
    for jc in (0..n).step_by(nc) {
        let jend = (jc + nc).min(n);
        for r0 in (0..m).step_by(MR) {
            let rows = MR.min(m - r0);
            let x = xb.rows_from(i0 + r0);
            for j0 in (jc..jend).step_by(NR) {
                let cols = NR.min(jend - j0);
                let wt = &w[j0 * k..(j0 + cols) * k];
                macro_rules! run {
                    ($($r:literal, $c:literal);*) => {
                        match (rows, cols) {
                            $(($r, $c) => tile::<$r, $c>(x, ldx, wt, k, out, r0, j0),)*
                            _ => unreachable!("tile {rows} x {cols}"),
                        }
                    };
                }
                run!(4, 4; 4, 3; 4, 2; 4, 1; 3, 4; 3, 3; 3, 2; 3, 1;
                     2, 4; 2, 3; 2, 2; 2, 1; 1, 4; 1, 3; 1, 2; 1, 1);
            }
        }
    }
}
