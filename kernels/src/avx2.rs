//! AVX2 + FMA + F16C kernels, 8 f32 lanes. Each has a twin in `scalar` and is tested against
//! it. Ragged tails are copied into a zero-padded 8-element buffer and loaded from there.
//!
//! Matvec summation order for one output element: lane `l` of one accumulator takes element
//! `p` with `p % 8 == l` in increasing `p` (FMA), then `hsum` reduces the lanes in a fixed order.
//! It does not depend on the tile shape, so every element of a call sums alike.

use core::arch::x86_64::*;

use half::{bf16, f16};

use crate::gemm::{self, Micro, Tile};
use crate::{Elem, OutBlock};

/// f32 lanes per vector.
const W: usize = 8;

/// A stored dtype that loads as 8 f32 lanes.
pub(crate) trait Load8: Elem {
    /// Loads 8 consecutive elements widened to f32.
    ///
    /// # Safety
    /// `p` must be valid for reading 8 elements, and the CPU must support avx2/fma/f16c.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Load8 for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable elements.
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Load8 for bf16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bf16s (16 bytes); loadu has no alignment need.
        let v = unsafe { _mm_loadu_si128(p.cast()) };
        // bf16 -> f32 is exact: zero-extend each 16-bit value and shift it into the high half.
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
    }
}

impl Load8 for f16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable f16s (16 bytes); loadu has no alignment need.
        let v = unsafe { _mm_loadu_si128(p.cast()) };
        _mm256_cvtph_ps(v)
    }
}

/// Loads a ragged tail (`s.len() < 8`) zero-padded to 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_tail<T: Load8>(s: &[T]) -> __m256 {
    let mut buf = [T::ZERO; W];
    buf[..s.len()].copy_from_slice(s);
    // SAFETY: buf holds 8 elements.
    unsafe { T::load8(buf.as_ptr()) }
}

/// Sum of the 8 lanes in a fixed order: halves, then pairs.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum(v: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
    _mm_cvtss_f32(s1)
}

/// Transposes an 8×8 block: lane `l` of output `p` is lane `p` of input `l`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

/// The GEMM packing step (shared by the AVX2 and AVX-512 levels): widens columns `pc..pc+kc`
/// of the weight rows in `w` (row length `k`) into `nr`-wide k-major panels,
/// `panel[p * nr + c] = w[jp * nr + c][pc + p]`, with zero columns past the last row. Works in
/// 8×8 register transposes; ragged edges go element by element.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn pack_panels<T: Load8>(
    w: &[T],
    k: usize,
    pc: usize,
    kc: usize,
    nr: usize,
    pack: &mut [f32],
) {
    assert!(nr.is_multiple_of(W) && pc + kc <= k && pack.len().is_multiple_of(kc * nr));
    let rows = w.len() / k;
    let kc8 = kc / W * W;
    for (jp, panel) in pack.chunks_exact_mut(kc * nr).enumerate() {
        for c0 in (0..nr).step_by(W) {
            let j0 = jp * nr + c0;
            if j0 + W <= rows {
                // Rows j0..j0+8, from column pc: row i's block is src[i*k ..][..kc].
                let src = &w[j0 * k + pc..(j0 + W - 1) * k + pc + kc];
                for p0 in (0..kc8).step_by(W) {
                    let mut r = [_mm256_setzero_ps(); W];
                    for (i, v) in r.iter_mut().enumerate() {
                        // SAFETY: i*k + p0 + 8 <= 7k + kc8 <= src.len().
                        *v = unsafe { T::load8(src.as_ptr().add(i * k + p0)) };
                    }
                    for (p, v) in transpose8(r).iter().enumerate() {
                        // SAFETY: (p0+p)*nr + c0 + 8 <= (kc-1)*nr + nr = panel.len().
                        unsafe { _mm256_storeu_ps(panel.as_mut_ptr().add((p0 + p) * nr + c0), *v) };
                    }
                }
                for p in kc8..kc {
                    for i in 0..W {
                        panel[p * nr + c0 + i] = src[i * k + p].widen();
                    }
                }
            } else {
                for i in 0..W {
                    let j = j0 + i;
                    for p in 0..kc {
                        panel[p * nr + c0 + i] = if j < rows {
                            w[j * k + pc + p].widen()
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// Streaming matvec for `out.rows() <= MATVEC_MAX_M`: each weight row is read from memory
/// once and all the x rows' dot products are taken from it while it is in registers or L1.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn matvec<T: Load8>(x: &[f32], k: usize, w: &[T], out: &mut OutBlock) {
    // Tiles: MA (+ MB) x rows × NR weight rows. A tile holds MR·NR accumulators + NR weight
    // vectors + 1 x vector in the 16 ymm registers; above 4 rows, x is split into two row
    // groups that take turns on the same NR weight rows (re-read from L1, not memory).
    match out.rows() {
        1 => matvec_rows::<T, 6, 1, 0>(x, k, w, out),
        2 => matvec_rows::<T, 4, 2, 0>(x, k, w, out),
        3 => matvec_rows::<T, 3, 3, 0>(x, k, w, out),
        4 => matvec_rows::<T, 3, 4, 0>(x, k, w, out),
        5 => matvec_rows::<T, 3, 3, 2>(x, k, w, out),
        6 => matvec_rows::<T, 3, 3, 3>(x, k, w, out),
        7 => matvec_rows::<T, 3, 4, 3>(x, k, w, out),
        8 => matvec_rows::<T, 3, 4, 4>(x, k, w, out),
        m => unreachable!("matvec called with {m} rows"),
    }
}

/// All columns for `MA + MB` x rows, `NR` weight rows at a time (then one at a time).
#[target_feature(enable = "avx2,fma,f16c")]
fn matvec_rows<T: Load8, const NR: usize, const MA: usize, const MB: usize>(
    x: &[f32],
    k: usize,
    w: &[T],
    out: &mut OutBlock,
) {
    assert_eq!(x.len(), (MA + MB) * k);
    assert_eq!(w.len(), out.cols() * k);
    let (xa, xb) = x.split_at(MA * k);
    let nc = out.cols();
    let mut j = 0;
    while j + NR <= nc {
        let wj = &w[j * k..(j + NR) * k];
        dot_tile::<T, MA, NR>(xa, k, wj, 0, j, out);
        if MB > 0 {
            dot_tile::<T, MB, NR>(xb, k, wj, MA, j, out);
        }
        j += NR;
    }
    while j < nc {
        let wj = &w[j * k..(j + 1) * k];
        dot_tile::<T, MA, 1>(xa, k, wj, 0, j, out);
        if MB > 0 {
            dot_tile::<T, MB, 1>(xb, k, wj, MA, j, out);
        }
        j += 1;
    }
}

/// `out[i0 + r][j0 + c] = x_r · w_c` for `r < MR`, `c < NR` (`x` is `MR` rows, `w` is `NR`
/// rows).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_tile<T: Load8, const MR: usize, const NR: usize>(
    x: &[f32],
    k: usize,
    w: &[T],
    i0: usize,
    j0: usize,
    out: &mut OutBlock,
) {
    assert!(x.len() == MR * k && w.len() == NR * k);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let mut wv = [_mm256_setzero_ps(); NR];
    let mut p = 0;
    // SAFETY: x is MR rows and w is NR rows of length k (asserted above), and every load reads
    // p..p+8 with p + 8 <= k, i.e. offsets r*k + (< k) with r < MR or c*k + (< k) with c < NR.
    unsafe {
        while p + W <= k {
            for (c, v) in wv.iter_mut().enumerate() {
                *v = T::load8(wp.add(c * k + p));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(r * k + p));
                for (a, v) in a.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, *v, *a);
                }
            }
            p += W;
        }
    }
    if p < k {
        for (c, v) in wv.iter_mut().enumerate() {
            *v = load_tail(&w[c * k + p..(c + 1) * k]);
        }
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = load_tail(&x[r * k + p..(r + 1) * k]);
            for (a, v) in a.iter_mut().zip(&wv) {
                *a = _mm256_fmadd_ps(xv, *v, *a);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        let row = &mut out.row(i0 + r)[j0..j0 + NR];
        for (o, a) in row.iter_mut().zip(a) {
            *o = hsum(*a);
        }
    }
}

/// GEMM register tile: 6 rows × 16 columns = 12 ymm accumulators, + 2 panel vectors + 1
/// broadcast = 15 of the 16 registers.
struct Micro2;

impl Micro for Micro2 {
    const MR: usize = 6;
    const NR: usize = 2 * W;

    unsafe fn run(tile: &Tile, out: &mut OutBlock) {
        // SAFETY (all arms): the caller guarantees avx2/fma/f16c.
        unsafe {
            match tile.rows {
                1 => micro::<1>(tile, out),
                2 => micro::<2>(tile, out),
                3 => micro::<3>(tile, out),
                4 => micro::<4>(tile, out),
                5 => micro::<5>(tile, out),
                6 => micro::<6>(tile, out),
                r => unreachable!("micro-kernel tile with {r} rows"),
            }
        }
    }
}

/// One `R × 16` tile: each element is one FMA chain over the tile's k block (see `gemm`).
#[target_feature(enable = "avx2,fma,f16c")]
fn micro<const R: usize>(t: &Tile, out: &mut OutBlock) {
    t.check::<Micro2>(out);
    assert_eq!(t.rows, R);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    if !t.first {
        for (r, a) in acc.iter_mut().enumerate() {
            let mut buf = [0f32; 2 * W];
            buf[..t.cols].copy_from_slice(&out.row(t.i0 + r)[t.j0..t.j0 + t.cols]);
            // SAFETY: buf holds 16 elements.
            unsafe {
                a[0] = _mm256_loadu_ps(buf.as_ptr());
                a[1] = _mm256_loadu_ps(buf.as_ptr().add(W));
            }
        }
    }
    let (xp, bp) = (t.x.as_ptr(), t.panel.as_ptr());
    // SAFETY: t.check asserted x.len() >= (R-1)*ldx + kc and panel.len() >= kc*16, so
    // x[r*ldx + p] (r < R, p < kc) and panel[p*16 .. p*16 + 16] are in bounds.
    unsafe {
        for p in 0..t.kc {
            let b0 = _mm256_loadu_ps(bp.add(p * 2 * W));
            let b1 = _mm256_loadu_ps(bp.add(p * 2 * W + W));
            for (r, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_set1_ps(*xp.add(r * t.ldx + p));
                a[0] = _mm256_fmadd_ps(xv, b0, a[0]);
                a[1] = _mm256_fmadd_ps(xv, b1, a[1]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        let mut buf = [0f32; 2 * W];
        // SAFETY: buf holds 16 elements.
        unsafe {
            _mm256_storeu_ps(buf.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(buf.as_mut_ptr().add(W), a[1]);
        }
        out.row(t.i0 + r)[t.j0..t.j0 + t.cols].copy_from_slice(&buf[..t.cols]);
    }
}

/// Packed, cache-blocked GEMM (see `gemm`).
///
/// # Safety
/// The CPU must support avx2/fma/f16c.
pub(crate) unsafe fn gemm<T: Load8>(x: &[f32], k: usize, w: &[T], out: &mut OutBlock) {
    // SAFETY: forwarded from the caller.
    unsafe { gemm::gemm::<T, Micro2>(x, k, w, out) }
}

/// Dot product: 4 accumulators over 32-element steps, then 8-element steps and a zero-padded
/// tail into the first, combined as `(a0 + a1) + (a2 + a3)` and `hsum`med. Fixed order for a
/// length.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let n = a.len();
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut p = 0;
    // SAFETY: every load reads p..p+8 (or p..p+32 in the unrolled loop) only when that end is
    // <= n; both slices have length n.
    unsafe {
        while p + 4 * W <= n {
            for (u, s) in acc.iter_mut().enumerate() {
                let q = p + u * W;
                *s = _mm256_fmadd_ps(_mm256_loadu_ps(ap.add(q)), _mm256_loadu_ps(bp.add(q)), *s);
            }
            p += 4 * W;
        }
        while p + W <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(ap.add(p)),
                _mm256_loadu_ps(bp.add(p)),
                acc[0],
            );
            p += W;
        }
    }
    if p < n {
        acc[0] = _mm256_fmadd_ps(load_tail(&a[p..]), load_tail(&b[p..]), acc[0]);
    }
    hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ))
}

/// `out[i][..d] = Σ_j p[i][j] · v[j·ldv ..][..d]`, one FMA per `j` in increasing `j` from 0
/// (see `avx512::weighted_sum_strided`); 8-lane chunks, the tail element by element with the
/// same fused operation.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let full = d / W * W;
    for i in 0..m {
        let pr = &p[i * n..(i + 1) * n];
        let or = &mut out[i * d..(i + 1) * d];
        let mut c0 = 0;
        while c0 < full {
            let mut acc = _mm256_setzero_ps();
            for (j, &pj) in pr.iter().enumerate() {
                // SAFETY: c0 + 8 <= d and row j holds d elements from j·ldv (asserted above).
                let vv = unsafe { _mm256_loadu_ps(v.as_ptr().add(j * ldv + c0)) };
                acc = _mm256_fmadd_ps(_mm256_set1_ps(pj), vv, acc);
            }
            // SAFETY: c0 + 8 <= d = the row's length.
            unsafe { _mm256_storeu_ps(or.as_mut_ptr().add(c0), acc) };
            c0 += W;
        }
        for (c, o) in or.iter_mut().enumerate().skip(full) {
            let mut a = 0f32;
            for (j, &pj) in pr.iter().enumerate() {
                // fmaf is a single FMA instruction with the fma feature enabled here.
                a = pj.mul_add(v[j * ldv + c], a);
            }
            *o = a;
        }
    }
}

/// `out[i] = fma(alpha, x[i], out[i])`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn axpy(alpha: f32, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    let n = x.len();
    let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
    let av = _mm256_set1_ps(alpha);
    let mut p = 0;
    // SAFETY: every access covers p..p+8 <= n; both slices have length n and `out` is
    // borrowed mutably.
    unsafe {
        while p + W <= n {
            let v = _mm256_fmadd_ps(av, _mm256_loadu_ps(xp.add(p)), _mm256_loadu_ps(op.add(p)));
            _mm256_storeu_ps(op.add(p), v);
            p += W;
        }
    }
    for (o, &v) in out[p..].iter_mut().zip(&x[p..]) {
        *o = alpha.mul_add(v, *o);
    }
}
