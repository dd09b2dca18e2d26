//! AVX-512 (F + BW + VL) kernels, 16 f32 lanes. Each has a twin in `scalar` and is tested
//! against it. Ragged tails use masked loads/stores (BW + VL for the 16-bit ones), which never
//! touch masked-off elements.
//!
//! Matvec summation order for one output element: lane `l` of one accumulator takes element
//! `p` with `p % 16 == l` in increasing `p` (FMA), then `hsum` reduces the lanes in a fixed
//! order. It does not depend on the tile shape, so every element of a call sums alike.

use core::arch::x86_64::*;

use half::{bf16, f16};

use crate::gemm::{self, Micro, Tile};
use crate::{Elem, OutBlock};

/// f32 lanes per vector.
const W: usize = 16;

/// Mask with the low `n` lanes set, `n <= 16`.
#[inline(always)]
fn tail_mask(n: usize) -> __mmask16 {
    debug_assert!(n <= W);
    ((1u32 << n) - 1) as __mmask16
}

/// A stored dtype that loads as 16 f32 lanes.
pub(crate) trait Load16: Elem {
    /// Loads 16 consecutive elements widened to f32.
    ///
    /// # Safety
    /// `p` must be valid for reading 16 elements, and the CPU must support avx512f/bw/vl.
    unsafe fn load16(p: *const Self) -> __m512;

    /// Loads the lanes set in `mask` (zero elsewhere); masked-off elements are not read.
    ///
    /// # Safety
    /// `p + i` must be readable for every lane `i` set in `mask`; the CPU must support
    /// avx512f/bw/vl.
    unsafe fn load16_masked(p: *const Self, mask: __mmask16) -> __m512;
}

impl Load16 for f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees 16 readable elements.
        unsafe { _mm512_loadu_ps(p) }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16_masked(p: *const f32, mask: __mmask16) -> __m512 {
        // SAFETY: the caller guarantees every masked-in element is readable.
        unsafe { _mm512_maskz_loadu_ps(mask, p) }
    }
}

impl Load16 for bf16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const bf16) -> __m512 {
        // SAFETY: the caller guarantees 16 readable bf16s (32 bytes); loadu has no alignment need.
        let v = unsafe { _mm256_loadu_si256(p.cast()) };
        // bf16 -> f32 is exact: zero-extend each 16-bit value and shift it into the high half.
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16_masked(p: *const bf16, mask: __mmask16) -> __m512 {
        // SAFETY: the caller guarantees every masked-in element is readable.
        let v = unsafe { _mm256_maskz_loadu_epi16(mask, p.cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    }
}

impl Load16 for f16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const f16) -> __m512 {
        // SAFETY: the caller guarantees 16 readable f16s (32 bytes); loadu has no alignment need.
        let v = unsafe { _mm256_loadu_si256(p.cast()) };
        _mm512_cvtph_ps(v)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16_masked(p: *const f16, mask: __mmask16) -> __m512 {
        // SAFETY: the caller guarantees every masked-in element is readable.
        let v = unsafe { _mm256_maskz_loadu_epi16(mask, p.cast()) };
        _mm512_cvtph_ps(v)
    }
}

/// Sum of the 16 lanes in a fixed order: halves, then quarters, then pairs.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn hsum(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let s8 = _mm256_add_ps(lo, hi);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
    _mm_cvtss_f32(s1)
}

/// Streaming matvec for `out.rows() <= MATVEC_MAX_M`: each weight row is read once and all the
/// x rows' dot products are taken from it while it is in registers.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn matvec<T: Load16>(x: &[f32], k: usize, w: &[T], out: &mut OutBlock) {
    // Tiles: MR x rows × NR weight rows, MR·NR accumulators + NR weight vectors + 1 x vector
    // within the 32 zmm registers.
    match out.rows() {
        1 => matvec_rows::<T, 1, 8>(x, k, w, out),
        2 => matvec_rows::<T, 2, 6>(x, k, w, out),
        3 => matvec_rows::<T, 3, 6>(x, k, w, out),
        4 => matvec_rows::<T, 4, 6>(x, k, w, out),
        5 => matvec_rows::<T, 5, 4>(x, k, w, out),
        6 => matvec_rows::<T, 6, 4>(x, k, w, out),
        7 => matvec_rows::<T, 7, 3>(x, k, w, out),
        8 => matvec_rows::<T, 8, 3>(x, k, w, out),
        m => unreachable!("matvec called with {m} rows"),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn matvec_rows<T: Load16, const MR: usize, const NR: usize>(
    x: &[f32],
    k: usize,
    w: &[T],
    out: &mut OutBlock,
) {
    assert_eq!(x.len(), MR * k);
    assert_eq!(w.len(), out.cols() * k);
    let nc = out.cols();
    let mut j = 0;
    while j + NR <= nc {
        dot_tile::<T, MR, NR>(x, k, &w[j * k..(j + NR) * k], j, out);
        j += NR;
    }
    while j < nc {
        dot_tile::<T, MR, 1>(x, k, &w[j * k..(j + 1) * k], j, out);
        j += 1;
    }
}

/// `out[r][j0 + c] = x_r · w_c` for `r < MR`, `c < NR` (`x` is `MR` rows, `w` is `NR` rows).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn dot_tile<T: Load16, const MR: usize, const NR: usize>(
    x: &[f32],
    k: usize,
    w: &[T],
    j0: usize,
    out: &mut OutBlock,
) {
    assert!(x.len() == MR * k && w.len() == NR * k);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let mut wv = [_mm512_setzero_ps(); NR];
    let mut p = 0;
    // SAFETY: x is MR rows and w is NR rows of length k (asserted above). Full loads read
    // p..p+16 with p + 16 <= k; the tail reads only lanes p..k through the mask. Every offset is
    // therefore r*k + (< k) with r < MR (x) or c*k + (< k) with c < NR (w): in bounds.
    unsafe {
        while p + W <= k {
            for (c, v) in wv.iter_mut().enumerate() {
                *v = T::load16(wp.add(c * k + p));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(xp.add(r * k + p));
                for (a, v) in a.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *v, *a);
                }
            }
            p += W;
        }
        if p < k {
            let mask = tail_mask(k - p);
            for (c, v) in wv.iter_mut().enumerate() {
                *v = T::load16_masked(wp.add(c * k + p), mask);
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(r * k + p));
                for (a, v) in a.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *v, *a);
                }
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        let row = &mut out.row(r)[j0..j0 + NR];
        for (o, a) in row.iter_mut().zip(a) {
            *o = hsum(*a);
        }
    }
}

/// GEMM register tile: 8 rows × 32 columns = 16 zmm accumulators, + 2 panel vectors + 1
/// broadcast, leaving registers spare.
struct Micro512;

impl Micro for Micro512 {
    const MR: usize = 8;
    const NR: usize = 2 * W;

    unsafe fn run(tile: &Tile, out: &mut OutBlock) {
        // SAFETY (all arms): the caller guarantees avx512f/bw/vl.
        unsafe {
            match tile.rows {
                1 => micro::<1>(tile, out),
                2 => micro::<2>(tile, out),
                3 => micro::<3>(tile, out),
                4 => micro::<4>(tile, out),
                5 => micro::<5>(tile, out),
                6 => micro::<6>(tile, out),
                7 => micro::<7>(tile, out),
                8 => micro::<8>(tile, out),
                r => unreachable!("micro-kernel tile with {r} rows"),
            }
        }
    }
}

/// One `R × 32` tile: each element is one FMA chain over the tile's k block (see `gemm`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn micro<const R: usize>(t: &Tile, out: &mut OutBlock) {
    t.check::<Micro512>(out);
    assert_eq!(t.rows, R);
    let (m0, m1) = (
        tail_mask(t.cols.min(W)),
        tail_mask(t.cols.saturating_sub(W)),
    );
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    if !t.first {
        for (r, a) in acc.iter_mut().enumerate() {
            let dst = &out.row(t.i0 + r)[t.j0..t.j0 + t.cols];
            let d = dst.as_ptr();
            // SAFETY: m0 covers lanes < min(cols, 16) of dst and m1 lanes < cols - 16 of
            // dst[16..]; masked-off lanes are not read, so only elements of dst are read.
            unsafe {
                a[0] = _mm512_maskz_loadu_ps(m0, d);
                a[1] = _mm512_maskz_loadu_ps(m1, d.wrapping_add(W));
            }
        }
    }
    let (xp, bp) = (t.x.as_ptr(), t.panel.as_ptr());
    // SAFETY: t.check asserted x.len() >= (R-1)*ldx + kc and panel.len() >= kc*32, so
    // x[r*ldx + p] (r < R, p < kc) and panel[p*32 .. p*32 + 32] are in bounds.
    unsafe {
        for p in 0..t.kc {
            let b0 = _mm512_loadu_ps(bp.add(p * 2 * W));
            let b1 = _mm512_loadu_ps(bp.add(p * 2 * W + W));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*xp.add(r * t.ldx + p));
                a[0] = _mm512_fmadd_ps(xv, b0, a[0]);
                a[1] = _mm512_fmadd_ps(xv, b1, a[1]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        let dst = &mut out.row(t.i0 + r)[t.j0..t.j0 + t.cols];
        let d = dst.as_mut_ptr();
        // SAFETY: as for the loads above, the masks only cover elements of dst.
        unsafe {
            _mm512_mask_storeu_ps(d, m0, a[0]);
            _mm512_mask_storeu_ps(d.wrapping_add(W), m1, a[1]);
        }
    }
}

/// Packed, cache-blocked GEMM (see `gemm`).
///
/// # Safety
/// The CPU must support avx512f/bw/vl and avx2/fma/f16c (packing runs at the AVX2 level).
pub(crate) unsafe fn gemm<T: crate::avx2::Load8>(x: &[f32], k: usize, w: &[T], out: &mut OutBlock) {
    // SAFETY: forwarded from the caller.
    unsafe { gemm::gemm::<T, Micro512>(x, k, w, out) }
}

/// Dot product: 4 accumulators over 64-element steps, then 16-element steps and a masked tail
/// into the first, combined as `(a0 + a1) + (a2 + a3)` and `hsum`med. Fixed order for a length.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let n = a.len();
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut p = 0;
    // SAFETY: unmasked loads read p..p+16 (or p..p+64 in the unrolled loop) only when that end
    // is <= n; the tail mask covers only p..n. Both slices have length n.
    unsafe {
        while p + 4 * W <= n {
            for (u, s) in acc.iter_mut().enumerate() {
                let q = p + u * W;
                *s = _mm512_fmadd_ps(_mm512_loadu_ps(ap.add(q)), _mm512_loadu_ps(bp.add(q)), *s);
            }
            p += 4 * W;
        }
        while p + W <= n {
            acc[0] = _mm512_fmadd_ps(
                _mm512_loadu_ps(ap.add(p)),
                _mm512_loadu_ps(bp.add(p)),
                acc[0],
            );
            p += W;
        }
        if p < n {
            let m = tail_mask(n - p);
            let (va, vb) = (
                _mm512_maskz_loadu_ps(m, ap.add(p)),
                _mm512_maskz_loadu_ps(m, bp.add(p)),
            );
            acc[0] = _mm512_fmadd_ps(va, vb, acc[0]);
        }
    }
    hsum(_mm512_add_ps(
        _mm512_add_ps(acc[0], acc[1]),
        _mm512_add_ps(acc[2], acc[3]),
    ))
}

/// `out[i] = fma(alpha, x[i], out[i])`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn axpy(alpha: f32, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    let n = x.len();
    let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
    let av = _mm512_set1_ps(alpha);
    let mut p = 0;
    // SAFETY: unmasked accesses cover p..p+16 <= n; the tail mask covers only p..n; both slices
    // have length n and `out` is borrowed mutably.
    unsafe {
        while p + W <= n {
            let v = _mm512_fmadd_ps(av, _mm512_loadu_ps(xp.add(p)), _mm512_loadu_ps(op.add(p)));
            _mm512_storeu_ps(op.add(p), v);
            p += W;
        }
        if p < n {
            let m = tail_mask(n - p);
            let v = _mm512_fmadd_ps(
                av,
                _mm512_maskz_loadu_ps(m, xp.add(p)),
                _mm512_maskz_loadu_ps(m, op.add(p)),
            );
            _mm512_mask_storeu_ps(op.add(p), m, v);
        }
    }
}
