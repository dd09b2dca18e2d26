//! AVX2 fused dequantize-and-dot matvec for quantized weights (`m <= MATVEC_MAX_M`).
//!
//! Each weight row is streamed once: 16 weights at a time are dequantized into two ymm
//! registers (exactly the values `quant::dequantize_row_*` produce) and multiplied with all `m`
//! x rows while they are in registers; no f32 copy of the weights is written.
//!
//! Summation order: accumulator `(r, c)` takes `x[r][p..p+8] · w[c][p..p+8]` by FMA for
//! `p = 0, 8, 16, ..` in increasing order and is reduced with `avx2::hsum`, exactly as
//! `avx2::matvec` does on the dequantized f32 row (k is a multiple of 32, so it has no tail):
//! the result equals the f32 kernel on `dequantize(W)` bit for bit (tested).
//!
//! The group decoders of the pre-quantized blocks (FP8 E4M3, NF4, FP4, MXFP4) also serve their
//! dequantizer at this level ([`dequantize`]), so the values the matvec multiplies are the
//! values tested against the scalar dequantizers.

use core::arch::x86_64::*;

use crate::avx2::hsum;
use crate::prequant::{
    e8m0_to_f32, BlockF8, BlockFp4, BlockMxfp4, BlockNf4, Code4, Round4, RoundMark, RoundedBlock,
    TableMark, MXFP4_TABLE, QK_B4, QK_F8, QK_MX,
};
use crate::quant::{BlockQ4K, BlockQ8_0, QK8_0, QK_K};
use crate::OutBlock;

/// A quantized block type whose rows dequantize in groups of 16 weights.
pub(crate) trait Group16: Copy {
    /// Weights per block (a multiple of 32).
    const BLOCK: usize;

    /// Weights `16i .. 16i + 16` of block `blk` of the row whose blocks start at `row`, as two
    /// f32 vectors; `i < BLOCK / 16`.
    ///
    /// # Safety
    /// `row` must point to at least `blk + 1` readable blocks; the CPU must support
    /// avx2/fma/f16c.
    unsafe fn half(row: *const Self, blk: usize, i: usize) -> (__m256, __m256);
}

/// f16 bits -> f32 (exact, F16C).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

impl Group16 for BlockQ8_0 {
    const BLOCK: usize = QK8_0;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half(row: *const Self, blk: usize, i: usize) -> (__m256, __m256) {
        debug_assert!(i < 2);
        // SAFETY: block blk is readable (caller); bytes 16i .. 16i + 16 of its 32-byte qs.
        let (b, q) = unsafe {
            let b = &*row.add(blk);
            (b, _mm_loadu_si128(b.qs.as_ptr().add(16 * i).cast()))
        };
        let d = _mm256_set1_ps(widen(b.d.to_bits()));
        let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
        let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(q, q)));
        // d·q is exact in f32 (11-bit × 8-bit significands), as in the scalar dequantizer.
        (_mm256_mul_ps(d, lo), _mm256_mul_ps(d, hi))
    }
}

impl Group16 for BlockQ4K {
    const BLOCK: usize = QK_K;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half(row: *const Self, blk: usize, i: usize) -> (__m256, __m256) {
        debug_assert!(i < 16);
        // SAFETY: block blk is readable (caller).
        let b = unsafe { &*row.add(blk) };
        let (s, h) = (i / 2, i % 2); // sub-block, half of it
        let (sc, m) = b.scale_min(s);
        let d1 = _mm256_set1_ps(widen(b.d.to_bits()) * sc as f32);
        let m1 = _mm256_set1_ps(widen(b.dmin.to_bits()) * m as f32);
        // Sub-block s lives in the low (even s) or high (odd s) nibbles of qs[32·(s/2)..][..32];
        // this half is its bytes 16h .. 16h + 16.
        // SAFETY: 32·(s/2) + 16h + 16 <= 128 bytes of qs; unaligned load.
        let q = unsafe { _mm_loadu_si128(b.qs.as_ptr().add(32 * (s / 2) + 16 * h).cast()) };
        let q = if s.is_multiple_of(2) {
            _mm_and_si128(q, _mm_set1_epi8(0x0F))
        } else {
            _mm_and_si128(_mm_srli_epi16::<4>(q), _mm_set1_epi8(0x0F))
        };
        let lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
        let hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(q, q)));
        // (d·sc)·q is exact, so the single rounding of fmsub equals the scalar `d1 * q - m1`.
        (_mm256_fmsub_ps(d1, lo, m1), _mm256_fmsub_ps(d1, hi, m1))
    }
}

/// E4M3 codes (one per 32-bit lane, `0..=255`) to their f32 values, bit for bit
/// `prequant::E4M3_TO_F32` (the arithmetic decoding its doc describes; no gather).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn e4m3_to_f32(c: __m256i) -> __m256 {
    let v = _mm256_and_si256(c, _mm256_set1_epi32(0x7F));
    // Normal (v >= 8): exponent rebiased from 7 to 127, mantissa to the top of f32's.
    let normal = _mm256_add_epi32(_mm256_slli_epi32::<20>(v), _mm256_set1_epi32(120 << 23));
    // Subnormal (v < 8): v/8 · 2^-6 = v · 2^-9, exact.
    let sub = _mm256_castps_si256(_mm256_mul_ps(
        _mm256_cvtepi32_ps(v),
        _mm256_set1_ps(1.0 / 512.0),
    ));
    let mag = _mm256_blendv_epi8(normal, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(8), v));
    let nan = _mm256_cmpeq_epi32(v, _mm256_set1_epi32(0x7F));
    let mag = _mm256_blendv_epi8(mag, _mm256_set1_epi32(0x7FC0_0000), nan);
    let sign = _mm256_slli_epi32::<24>(_mm256_and_si256(c, _mm256_set1_epi32(0x80)));
    _mm256_castsi256_ps(_mm256_or_si256(mag, sign))
}

impl Group16 for BlockF8 {
    const BLOCK: usize = QK_F8;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half(row: *const Self, blk: usize, i: usize) -> (__m256, __m256) {
        debug_assert!(i < QK_F8 / 16);
        // SAFETY: block blk is readable (caller); bytes 16i .. 16i + 16 of its 128-byte qs.
        let (b, q) = unsafe {
            let b = &*row.add(blk);
            (b, _mm_loadu_si128(b.qs.as_ptr().add(16 * i).cast()))
        };
        // Fast path (every real block): no NaN code among the 16 and a scale that survives
        // `· 2^8`; see `e4m3_scaled`: (v · 2^-8) · (d · 2^8) rounds as v · d does.
        let seven = _mm_set1_epi8(0x7F);
        let nan = _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_and_si128(q, seven), seven));
        let scaled = b.d * 256.0;
        if nan == 0 && scaled.is_finite() {
            let d = _mm256_set1_ps(scaled);
            let (lo, hi) = e4m3_scaled(q);
            return (_mm256_mul_ps(d, lo), _mm256_mul_ps(d, hi));
        }
        let d = _mm256_set1_ps(b.d);
        let lo = e4m3_to_f32(_mm256_cvtepu8_epi32(q));
        let hi = e4m3_to_f32(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(q, q)));
        // One rounding, as the scalar `d * E4M3_TO_F32[q]`.
        (_mm256_mul_ps(d, lo), _mm256_mul_ps(d, hi))
    }
}

/// 16 non-NaN E4M3 codes to f32 values · 2^-8, exactly, as two vectors of 8: `code << 7`
/// puts the 4 exponent and 3 mantissa bits where f16 keeps its exponent's low bits and
/// mantissa's top bits (f16's bias 15 is E4M3's 7 plus 8; E4M3 subnormals land on f16
/// subnormals), the sign moves from bit 14 to bit 15, and vcvtph2ps widens exactly.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn e4m3_scaled(q: __m128i) -> (__m256, __m256) {
    let v = _mm256_slli_epi16::<7>(_mm256_cvtepu8_epi16(q));
    let bits = _mm256_add_epi16(v, _mm256_and_si256(v, _mm256_set1_epi16(0x4000)));
    (
        _mm256_cvtph_ps(_mm256_castsi256_si128(bits)),
        _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(bits)),
    )
}

/// `table[idx]` per lane for 4-bit indices (`0..16` in each 32-bit lane), the table given as
/// its halves `table[..8]` and `table[8..]`: both halves are permuted by the low 3 bits and bit 3
/// picks one (no gather).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lookup16(idx: __m256i, lo: __m256, hi: __m256) -> __m256 {
    let a = _mm256_permutevar8x32_ps(lo, idx);
    let b = _mm256_permutevar8x32_ps(hi, idx);
    // blendv reads the sign bit: move bit 3 there.
    _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx)))
}

/// [`Group16::half`] of a bitsandbytes 4-bit block: weights `16i .. 16i + 16` are the 16
/// nibbles of bytes `8i .. 8i + 8`, high nibble first.
///
/// # Safety
/// As [`Group16::half`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_b4<B: Code4>(row: *const B, blk: usize, i: usize) -> (__m256, __m256) {
    debug_assert!(i < QK_B4 / 16);
    // SAFETY: block blk is readable (caller); bytes 8i .. 8i + 8 of its 32 code bytes.
    let (b, q) = unsafe {
        let b = &*row.add(blk);
        (b, _mm_loadl_epi64(b.codes().as_ptr().add(8 * i).cast()))
    };
    let nib = _mm_set1_epi8(0x0F);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), nib);
    let lo = _mm_and_si128(q, nib);
    // Weight 2j is the high nibble of byte j, weight 2j + 1 its low nibble.
    let codes = _mm_unpacklo_epi8(hi, lo);
    let table = B::TABLE;
    // SAFETY: table has 16 floats; these read 0..8 and 8..16.
    let (t_lo, t_hi) = unsafe {
        (
            _mm256_loadu_ps(table.as_ptr()),
            _mm256_loadu_ps(table.as_ptr().add(8)),
        )
    };
    let v0 = lookup16(_mm256_cvtepu8_epi32(codes), t_lo, t_hi);
    let v1 = lookup16(
        _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(codes, codes)),
        t_lo,
        t_hi,
    );
    let d = _mm256_set1_ps(b.scale());
    // One rounding, as the scalar `d * TABLE[code]` (then the block type's own, if any).
    let (w0, w1) = (_mm256_mul_ps(d, v0), _mm256_mul_ps(d, v1));
    match B::ROUND {
        None => (w0, w1),
        Some(r) => (round4(w0, r), round4(w1, r)),
    }
}

/// `v` rounded to bf16 or f16 (to nearest, ties to even) and widened back, as
/// [`Round4::apply`] does per value. bf16: add `0x7FFF` plus the kept part's lowest bit, then
/// clear the low 16 bits (values here are finite; an overflow rounds to infinity, as the scalar
/// does); f16: the F16C conversion there and back.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn round4(v: __m256, r: Round4) -> __m256 {
    match r {
        Round4::Bf16 => {
            let bits = _mm256_castps_si256(v);
            let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
            let up = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
            _mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32(-65536)))
        }
        Round4::F16 => _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)),
    }
}

impl<T: TableMark, R: RoundMark> Group16 for RoundedBlock<T, R> {
    const BLOCK: usize = QK_B4;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half(row: *const Self, blk: usize, i: usize) -> (__m256, __m256) {
        // SAFETY: the caller's contract is half_b4's.
        unsafe { half_b4(row, blk, i) }
    }
}

impl Group16 for BlockNf4 {
    const BLOCK: usize = QK_B4;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half(row: *const Self, blk: usize, i: usize) -> (__m256, __m256) {
        // SAFETY: the caller's contract is half_b4's.
        unsafe { half_b4(row, blk, i) }
    }
}

impl Group16 for BlockFp4 {
    const BLOCK: usize = QK_B4;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half(row: *const Self, blk: usize, i: usize) -> (__m256, __m256) {
        // SAFETY: the caller's contract is half_b4's.
        unsafe { half_b4(row, blk, i) }
    }
}

/// Weights `16i .. 16i + 16` of an MXFP4 block are the 16 nibbles of bytes `8i .. 8i + 8`, low
/// nibble first, looked up in [`MXFP4_TABLE`] by in-register permutes and multiplied by the
/// block's power-of-two scale.
impl Group16 for BlockMxfp4 {
    const BLOCK: usize = QK_MX;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half(row: *const Self, blk: usize, i: usize) -> (__m256, __m256) {
        debug_assert!(i < QK_MX / 16);
        // SAFETY: block blk is readable (caller); bytes 8i .. 8i + 8 of its 16 code bytes.
        let (b, q) = unsafe {
            let b = &*row.add(blk);
            (b, _mm_loadl_epi64(b.qs.as_ptr().add(8 * i).cast()))
        };
        let nib = _mm_set1_epi8(0x0F);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), nib);
        let lo = _mm_and_si128(q, nib);
        // Weight 2j is the low nibble of byte j, weight 2j + 1 its high nibble.
        let codes = _mm_unpacklo_epi8(lo, hi);
        // SAFETY: the table has 16 floats; these read 0..8 and 8..16.
        let (t_lo, t_hi) = unsafe {
            (
                _mm256_loadu_ps(MXFP4_TABLE.as_ptr()),
                _mm256_loadu_ps(MXFP4_TABLE.as_ptr().add(8)),
            )
        };
        let v0 = lookup16(_mm256_cvtepu8_epi32(codes), t_lo, t_hi);
        let v1 = lookup16(
            _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(codes, codes)),
            t_lo,
            t_hi,
        );
        let d = _mm256_set1_ps(e8m0_to_f32(b.e));
        // One rounding (none unless it overflows), as the scalar `d * TABLE[code]`.
        (_mm256_mul_ps(d, v0), _mm256_mul_ps(d, v1))
    }
}

/// Dequantizes whole blocks with the group decoder the matvec uses: `dst[Q::BLOCK·b + e]` is
/// weight `e` of block `b`. Panics unless `dst.len() == Q::BLOCK · src.len()`.
///
/// # Safety
/// The CPU must support avx2/fma/f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequantize<Q: Group16>(src: &[Q], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * Q::BLOCK);
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    for blk in 0..src.len() {
        for i in 0..Q::BLOCK / 16 {
            // SAFETY: blk < src.len(), so the block is readable, and i < BLOCK/16 as half
            // requires; the stores write dst[BLOCK·blk + 16i .. + 16], inside dst (asserted
            // length); unaligned instructions.
            unsafe {
                let (a, b) = Q::half(sp, blk, i);
                let o = dp.add(blk * Q::BLOCK + 16 * i);
                _mm256_storeu_ps(o, a);
                _mm256_storeu_ps(o.add(8), b);
            }
        }
    }
}

/// `out[rows, cols] = x[rows, k] · dequantize(w)ᵀ` for `rows <= 8`; `w` is `cols` rows of
/// `k / Q::BLOCK` blocks, `k > 0` a multiple of `Q::BLOCK`.
///
/// # Safety
/// The CPU must support avx2/fma/f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn matvec<Q: Group16>(x: &[f32], k: usize, w: &[Q], out: &mut OutBlock) {
    // Registers: MR·NR accumulators + 2·NR weight vectors + 1 x vector within 16 ymm.
    match out.rows() {
        1 => matvec_rows::<Q, 1, 4>(x, k, w, out),
        2 => matvec_rows::<Q, 2, 3>(x, k, w, out),
        3 => matvec_rows::<Q, 3, 2>(x, k, w, out),
        4 => matvec_rows::<Q, 4, 2>(x, k, w, out),
        5 => matvec_rows::<Q, 5, 2>(x, k, w, out),
        6 => matvec_rows::<Q, 6, 1>(x, k, w, out),
        7 => matvec_rows::<Q, 7, 1>(x, k, w, out),
        8 => matvec_rows::<Q, 8, 1>(x, k, w, out),
        m => unreachable!("quantized matvec called with {m} rows"),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn matvec_rows<Q: Group16, const MR: usize, const NR: usize>(
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
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_tile<Q: Group16, const MR: usize, const NR: usize>(
    x: &[f32],
    k: usize,
    w: &[Q],
    j0: usize,
    out: &mut OutBlock,
) {
    let bpr = k / Q::BLOCK;
    assert!(bpr * Q::BLOCK == k && x.len() == MR * k && w.len() == NR * bpr);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let mut wv = [(_mm256_setzero_ps(), _mm256_setzero_ps()); NR];
    // Blocks outer, groups inner: the inner loop has a constant trip count, so it unrolls
    // and each block's scales are unpacked with constant indices.
    for blk in 0..bpr {
        for i in 0..Q::BLOCK / 16 {
            let h = blk * (Q::BLOCK / 16) + i;
            // SAFETY: row c's blocks are w[c*bpr .. (c+1)*bpr] (c < NR, asserted) and blk < bpr;
            // i < BLOCK/16 as half requires; h = blk·BLOCK/16 + i < k/16. x loads read x[r*k + 16h .. + 16] with
            // r < MR and 16h + 16 <= k: inside x (asserted length MR*k).
            unsafe {
                for (c, v) in wv.iter_mut().enumerate() {
                    *v = Q::half(wp.add(c * bpr), blk, i);
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let x0 = _mm256_loadu_ps(xp.add(r * k + 16 * h));
                    let x1 = _mm256_loadu_ps(xp.add(r * k + 16 * h + 8));
                    for (a, v) in a.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(x0, v.0, *a);
                        *a = _mm256_fmadd_ps(x1, v.1, *a);
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
