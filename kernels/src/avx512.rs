//! AVX-512 (F + BW + VL) kernels, 16 f32 lanes. Each has a twin in `scalar` and is tested
//! against it. Ragged tails use masked loads/stores (BW + VL for the 16-bit ones), which never
//! touch masked-off elements.
//!
//! Matvec summation order for one output element: element `p` goes by FMA, in increasing `p`,
//! to lane `p % 16` of accumulator `(p / 16) % 4`; then `hsum((a0 + a1) + (a2 + a3))`. It
//! depends on nothing but `k`, so every element of every matvec call (any m <= 8) sums alike.

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

/// Independent accumulators per output element in the matvec kernels (see the module doc).
pub(crate) const ACC: usize = 4;

/// Most x rows one pass over a weight row serves; more rows take further passes over the same
/// row, which by then is in L1 (a row is at most a few KiB).
pub(crate) const MV_ROWS: usize = 4;

/// Streaming matvec for `out.rows() <= MATVEC_MAX_M`: weight rows are read one at a time, in
/// order, so the whole call is one sequential stream (the hardware prefetcher keeps far more
/// bytes in flight for one stream than for several interleaved rows), and every x row's dot
/// product is taken from it while it is in registers or L1.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn matvec<T: Load16>(x: &[f32], k: usize, w: &[T], out: &mut OutBlock) {
    let m = out.rows();
    assert!(
        (1..=crate::MATVEC_MAX_M).contains(&m),
        "matvec called with {m} rows"
    );
    assert_eq!(w.len(), out.cols() * k);
    matvec_strided(x, k, w, k, out);
}

/// [`matvec`] over rows `j` at `w[j·ldw ..][..k]` (rows of a wider matrix, e.g. one head of a
/// KV cache), for any number of x rows (taken four at a time). Same summation order as
/// [`matvec`], so a gathered copy of the rows gives the same result bit for bit.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn matvec_strided<T: Load16>(
    x: &[f32],
    k: usize,
    w: &[T],
    ldw: usize,
    out: &mut OutBlock,
) {
    let m = out.rows();
    assert_eq!(x.len(), m * k);
    for j in 0..out.cols() {
        let wr = &w[j * ldw..j * ldw + k];
        let mut r0 = 0;
        while r0 < m {
            let r1 = (r0 + MV_ROWS).min(m);
            let xs = &x[r0 * k..r1 * k];
            match r1 - r0 {
                1 => dot_rows::<T, 1>(xs, k, wr, r0, j, out),
                2 => dot_rows::<T, 2>(xs, k, wr, r0, j, out),
                3 => dot_rows::<T, 3>(xs, k, wr, r0, j, out),
                _ => dot_rows::<T, 4>(xs, k, wr, r0, j, out),
            }
            r0 = r1;
        }
    }
}

/// `out[i][..d] = Σ_j p[i][j] · v[j·ldv ..][..d]` (`p` is `[m, n]`, `out` `[m, d]`): for every
/// element one FMA per `j`, in increasing `j`, starting from 0 (the scalar twin's order).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn weighted_sum_strided(
    p: &[f32],
    n: usize,
    v: &[f32],
    ldv: usize,
    d: usize,
    out: &mut [f32],
) {
    let m = out.len() / d.max(1);
    assert!(p.len() == m * n && out.len() == m * d);
    assert!(n == 0 || v.len() >= (n - 1) * ldv + d);
    let mut i0 = 0;
    while i0 < m {
        let rows = (m - i0).min(MV_ROWS);
        let mut c0 = 0;
        while c0 < d {
            let (m0, m1) = (
                tail_mask((d - c0).min(W)),
                tail_mask((d - c0).saturating_sub(W).min(W)),
            );
            let mut acc = [[_mm512_setzero_ps(); 2]; MV_ROWS];
            for j in 0..n {
                let vp = v[j * ldv + c0..].as_ptr();
                // SAFETY: row j holds d elements from j·ldv (asserted above); the masks cover
                // lanes c0 .. min(c0 + 32, d) only, so no element past the row is read.
                let (v0, v1) = unsafe {
                    (
                        _mm512_maskz_loadu_ps(m0, vp),
                        _mm512_maskz_loadu_ps(m1, vp.wrapping_add(W)),
                    )
                };
                for (r, a) in acc.iter_mut().enumerate().take(rows) {
                    let pb = _mm512_set1_ps(p[(i0 + r) * n + j]);
                    a[0] = _mm512_fmadd_ps(pb, v0, a[0]);
                    a[1] = _mm512_fmadd_ps(pb, v1, a[1]);
                }
            }
            for (r, a) in acc.iter().enumerate().take(rows) {
                let op = out[(i0 + r) * d + c0..].as_mut_ptr();
                // SAFETY: out row i0 + r has d elements; the masks cover lanes c0 .. d only.
                unsafe {
                    _mm512_mask_storeu_ps(op, m0, a[0]);
                    _mm512_mask_storeu_ps(op.wrapping_add(W), m1, a[1]);
                }
            }
            c0 += 2 * W;
        }
        i0 += rows;
    }
}

/// `out[r0 + r][j] = x_r · w` for `r < MR` (`x` is `MR` rows, `w` one row of length `k`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn dot_rows<T: Load16, const MR: usize>(
    x: &[f32],
    k: usize,
    w: &[T],
    r0: usize,
    j: usize,
    out: &mut OutBlock,
) {
    assert!(x.len() == MR * k && w.len() == k);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); ACC]; MR];
    let mut p = 0;
    // SAFETY: x is MR rows and w one row of length k (asserted above). Full loads read
    // p..p+16 (p + 16 <= k, or p + 64 <= k in the unrolled loop); the tail reads only lanes
    // p..k through the mask. Every offset is r*k + (< k) with r < MR (x) or < k (w): in bounds.
    unsafe {
        while p + ACC * W <= k {
            for u in 0..ACC {
                let wv = T::load16(wp.add(p + u * W));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(xp.add(r * k + p + u * W));
                    a[u] = _mm512_fmadd_ps(xv, wv, a[u]);
                }
            }
            p += ACC * W;
        }
        let mut u = 0;
        while p + W <= k {
            let wv = T::load16(wp.add(p));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(xp.add(r * k + p));
                a[u] = _mm512_fmadd_ps(xv, wv, a[u]);
            }
            p += W;
            u += 1;
        }
        if p < k {
            let mask = tail_mask(k - p);
            let wv = T::load16_masked(wp.add(p), mask);
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(r * k + p));
                a[u] = _mm512_fmadd_ps(xv, wv, a[u]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        out.row(r0 + r)[j] = reduce_acc(a);
    }
}

thread_local! {
    /// x rows with each 32-element chunk reordered evens-then-odds (`matvec_bf16`).
    static PAIRED_X: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`matvec`] for bf16 weights, cheaper per weight: 32 weights are one 64-byte load, whose
/// 32-bit lanes hold (even, odd) pairs: the even weight widens by a left shift, the odd one by
/// masking off the low half, against x reordered once per call (evens then odds per chunk).
///
/// Summation order (its own, for bf16 at this level): for `p < 32·⌊k/32⌋`, element
/// `p = 32c + 2l + e` (e = 0 even, 1 odd) goes by FMA to lane `l` of accumulator `(2c + e) % 4`,
/// in increasing `c`; the rest (`k % 32` elements) as in [`matvec`]: element `p` to lane
/// `p % 16` of accumulator `(p / 16) % 4`; then `reduce_acc`. It depends only on `k`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn matvec_bf16(x: &[f32], k: usize, w: &[bf16], out: &mut OutBlock) {
    let m = out.rows();
    assert!(
        (1..=crate::MATVEC_MAX_M).contains(&m),
        "matvec called with {m} rows"
    );
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), out.cols() * k);
    let kp = k / 32 * 32;
    PAIRED_X.with(|buf| {
        let mut xs = buf.borrow_mut();
        xs.clear();
        xs.extend_from_slice(x);
        for (row, src) in xs.chunks_exact_mut(k).zip(x.chunks_exact(k)) {
            for (dst, src) in row[..kp]
                .chunks_exact_mut(32)
                .zip(src[..kp].chunks_exact(32))
            {
                for l in 0..16 {
                    dst[l] = src[2 * l];
                    dst[16 + l] = src[2 * l + 1];
                }
            }
        }
        let xs = &xs[..];
        for j in 0..out.cols() {
            let wr = &w[j * k..(j + 1) * k];
            let mut r0 = 0;
            while r0 < m {
                let r1 = (r0 + MV_ROWS).min(m);
                let xr = &xs[r0 * k..r1 * k];
                match r1 - r0 {
                    1 => dot_rows_bf16::<1>(xr, k, wr, r0, j, out),
                    2 => dot_rows_bf16::<2>(xr, k, wr, r0, j, out),
                    3 => dot_rows_bf16::<3>(xr, k, wr, r0, j, out),
                    _ => dot_rows_bf16::<4>(xr, k, wr, r0, j, out),
                }
                r0 = r1;
            }
        }
    });
}

/// `out[r0 + r][j] = x_r · w` for `r < MR`, `x` reordered as `matvec_bf16` says.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn dot_rows_bf16<const MR: usize>(
    x: &[f32],
    k: usize,
    w: &[bf16],
    r0: usize,
    j: usize,
    out: &mut OutBlock,
) {
    assert!(x.len() == MR * k && w.len() == k);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let mut acc = [[_mm512_setzero_ps(); ACC]; MR];
    let mut p = 0;
    // SAFETY: x is MR rows and w one row of length k (asserted above). The paired loops read
    // p..p+32 (or p..p+64) only when that end is <= k; the tail reads p..p+16 <= k or masked
    // lanes p..k only. Every offset is r*k + (< k) (x, r < MR) or < k (w): in bounds.
    unsafe {
        while p + 2 * 32 <= k {
            for h in 0..2 {
                let q = p + 32 * h;
                let v = _mm512_loadu_si512(wp.add(q).cast());
                let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                let odd = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xe = _mm512_loadu_ps(xp.add(r * k + q));
                    let xo = _mm512_loadu_ps(xp.add(r * k + q + W));
                    a[2 * h] = _mm512_fmadd_ps(xe, even, a[2 * h]);
                    a[2 * h + 1] = _mm512_fmadd_ps(xo, odd, a[2 * h + 1]);
                }
            }
            p += 2 * 32;
        }
        if p + 32 <= k {
            let v = _mm512_loadu_si512(wp.add(p).cast());
            let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
            let odd = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
            for (r, a) in acc.iter_mut().enumerate() {
                let xe = _mm512_loadu_ps(xp.add(r * k + p));
                let xo = _mm512_loadu_ps(xp.add(r * k + p + W));
                a[0] = _mm512_fmadd_ps(xe, even, a[0]);
                a[1] = _mm512_fmadd_ps(xo, odd, a[1]);
            }
            p += 32;
        }
        // Unpaired tail (< 32 elements), in `matvec`'s order.
        while p + W <= k {
            let u = (p / W) % ACC;
            let wv = bf16::load16(wp.add(p));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(xp.add(r * k + p));
                a[u] = _mm512_fmadd_ps(xv, wv, a[u]);
            }
            p += W;
        }
        if p < k {
            let u = (p / W) % ACC;
            let mask = tail_mask(k - p);
            let wv = bf16::load16_masked(wp.add(p), mask);
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_maskz_loadu_ps(mask, xp.add(r * k + p));
                a[u] = _mm512_fmadd_ps(xv, wv, a[u]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        out.row(r0 + r)[j] = reduce_acc(a);
    }
}

/// The fixed reduction of a matvec element's accumulators: `hsum((a0 + a1) + (a2 + a3))`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn reduce_acc(a: &[__m512; ACC]) -> f32 {
    hsum(_mm512_add_ps(
        _mm512_add_ps(a[0], a[1]),
        _mm512_add_ps(a[2], a[3]),
    ))
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
