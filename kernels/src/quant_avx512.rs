//! AVX-512 fused dequantize-and-dot matvec for quantized weights (`m <= MATVEC_MAX_M`).
//!
//! Each weight row is streamed once: 32 weights at a time are dequantized into two zmm
//! registers (exactly the values `quant::dequantize_row_*` produce) and multiplied with all `m`
//! x rows while they are in registers, so no f32 copy of the weights is ever written.
//!
//! Summation order: accumulator `(r, c)` takes `x[r][p..p+16] · w[c][p..p+16]` by FMA for
//! `p = 0, 16, 32, ..` in increasing order and is reduced with `avx512::hsum`, which is exactly
//! what `avx512::matvec` does on the dequantized f32 row (k is a multiple of 32, so it has no
//! tail). The result therefore equals the f32 kernel on `dequantize(W)` bit for bit (tested).

use core::arch::x86_64::*;

use crate::avx512::hsum;
use crate::quant::{BlockQ4K, BlockQ8_0, QK8_0, QK_K};
use crate::OutBlock;

/// A quantized block type whose rows dequantize in groups of 32 weights.
pub(crate) trait Group32: Copy {
    /// Weights per block (a multiple of 32).
    const BLOCK: usize;

    /// Weights `32i .. 32i + 32` of block `blk` of the row whose blocks start at `row`, as two
    /// f32 vectors; `i < BLOCK / 32`.
    ///
    /// # Safety
    /// `row` must point to at least `blk + 1` readable blocks; the CPU must support
    /// avx512f/bw/vl and f16c.
    unsafe fn group(row: *const Self, blk: usize, i: usize) -> (__m512, __m512);
}

/// f16 bits -> f32 (exact, F16C).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
fn widen(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

impl Group32 for BlockQ8_0 {
    const BLOCK: usize = QK8_0;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn group(row: *const Self, blk: usize, i: usize) -> (__m512, __m512) {
        debug_assert_eq!(i, 0);
        // SAFETY: block blk is readable (caller); qs is 32 bytes, read with one unaligned load.
        let b = unsafe { &*row.add(blk) };
        let d = _mm512_set1_ps(widen(b.d.to_bits()));
        // SAFETY: as above.
        let q = unsafe { _mm256_loadu_si256(b.qs.as_ptr().cast()) };
        let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
        let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(q)));
        // d·q is exact in f32 (11-bit × 8-bit significands), as in the scalar dequantizer.
        (_mm512_mul_ps(d, lo), _mm512_mul_ps(d, hi))
    }
}

impl Group32 for BlockQ4K {
    const BLOCK: usize = QK_K;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn group(row: *const Self, blk: usize, i: usize) -> (__m512, __m512) {
        debug_assert!(i < 8);
        // SAFETY: block blk is readable (caller).
        let b = unsafe { &*row.add(blk) };
        let s = i;
        let (sc, m) = b.scale_min(s);
        let d1 = _mm512_set1_ps(widen(b.d.to_bits()) * sc as f32);
        let m1 = _mm512_set1_ps(widen(b.dmin.to_bits()) * m as f32);
        // Sub-block s lives in the low (even s) or high (odd s) nibbles of qs[32·(s/2)..][..32].
        // SAFETY: 32 * (s / 2) + 32 <= 128 bytes of qs; unaligned load.
        let q = unsafe { _mm256_loadu_si256(b.qs.as_ptr().add(32 * (s / 2)).cast()) };
        let q = if s.is_multiple_of(2) {
            _mm256_and_si256(q, _mm256_set1_epi8(0x0F))
        } else {
            _mm256_and_si256(_mm256_srli_epi16::<4>(q), _mm256_set1_epi8(0x0F))
        };
        let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(q)));
        let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256::<1>(q)));
        // (d·sc)·q is exact, so the single rounding of fmsub equals the scalar `d1 * q - m1`.
        (_mm512_fmsub_ps(d1, lo, m1), _mm512_fmsub_ps(d1, hi, m1))
    }
}

/// `out[rows, cols] = x[rows, k] · dequantize(w)ᵀ` for `rows <= 8`; `w` is `cols` rows of
/// `k / Q::BLOCK` blocks, `k > 0` a multiple of `Q::BLOCK`.
///
/// # Safety
/// The CPU must support avx512f/bw/vl and f16c.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(crate) unsafe fn matvec<Q: Group32>(x: &[f32], k: usize, w: &[Q], out: &mut OutBlock) {
    // Same tile shapes as `avx512::matvec` (registers: MR·NR accumulators + 2·NR weights + 2 x).
    match out.rows() {
        1 => matvec_rows::<Q, 1, 8>(x, k, w, out),
        2 => matvec_rows::<Q, 2, 6>(x, k, w, out),
        3 => matvec_rows::<Q, 3, 6>(x, k, w, out),
        4 => matvec_rows::<Q, 4, 4>(x, k, w, out),
        5 => matvec_rows::<Q, 5, 4>(x, k, w, out),
        6 => matvec_rows::<Q, 6, 3>(x, k, w, out),
        7 => matvec_rows::<Q, 7, 3>(x, k, w, out),
        8 => matvec_rows::<Q, 8, 2>(x, k, w, out),
        m => unreachable!("quantized matvec called with {m} rows"),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
fn matvec_rows<Q: Group32, const MR: usize, const NR: usize>(
    x: &[f32],
    k: usize,
    w: &[Q],
    out: &mut OutBlock,
) {
    let bpr = k / Q::BLOCK;
    assert!(k > 0 && bpr * Q::BLOCK == k);
    assert_eq!(x.len(), MR * k);
    assert_eq!(w.len(), out.cols() * bpr);
    let nc = out.cols();
    let mut j = 0;
    while j + NR <= nc {
        dot_tile::<Q, MR, NR>(x, k, &w[j * bpr..(j + NR) * bpr], j, out);
        j += NR;
    }
    while j < nc {
        dot_tile::<Q, MR, 1>(x, k, &w[j * bpr..(j + 1) * bpr], j, out);
        j += 1;
    }
}

/// `out[r][j0 + c] = x_r · dequantize(w_c)` for `r < MR`, `c < NR`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
fn dot_tile<Q: Group32, const MR: usize, const NR: usize>(
    x: &[f32],
    k: usize,
    w: &[Q],
    j0: usize,
    out: &mut OutBlock,
) {
    let bpr = k / Q::BLOCK;
    assert!(bpr * Q::BLOCK == k && x.len() == MR * k && w.len() == NR * bpr);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let mut wv = [(_mm512_setzero_ps(), _mm512_setzero_ps()); NR];
    // Blocks outer, groups inner: the inner loop has a constant trip count, so it unrolls
    // and each block's scales are unpacked with constant indices.
    for blk in 0..bpr {
        for i in 0..Q::BLOCK / 32 {
            let g = blk * (Q::BLOCK / 32) + i;
            // SAFETY: row c's blocks are w[c*bpr .. (c+1)*bpr] (c < NR, asserted) and blk < bpr;
            // i < BLOCK/32 as group requires; g = blk·BLOCK/32 + i < k/32. x loads read x[r*k + 32g .. + 32] with
            // r < MR and 32g + 32 <= k: inside x (asserted length MR*k).
            unsafe {
                for (c, v) in wv.iter_mut().enumerate() {
                    *v = Q::group(wp.add(c * bpr), blk, i);
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let x0 = _mm512_loadu_ps(xp.add(r * k + 32 * g));
                    let x1 = _mm512_loadu_ps(xp.add(r * k + 32 * g + 16));
                    for (a, v) in a.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(x0, v.0, *a);
                        *a = _mm512_fmadd_ps(x1, v.1, *a);
                    }
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
