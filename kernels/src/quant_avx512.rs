//! AVX-512 fused dequantize-and-dot matvec for quantized weights (`m <= MATVEC_MAX_M`).
//!
//! Each weight row is streamed once: 32 weights at a time are dequantized into two zmm
//! registers (exactly the values `quant::dequantize_row_*` produce) and multiplied with all `m`
//! x rows while they are in registers, so no f32 copy of the weights is ever written.
//!
//! Summation order: `x[r][p..p+16] · w[c][p..p+16]` goes by FMA into accumulator `(p/16) % 4`
//! of element `(r, c)` for `p = 0, 16, 32, ..` in increasing order, reduced with
//! `avx512::reduce_acc`: exactly what `avx512::matvec` does on the dequantized f32 row (k is a
//! multiple of 32, so it has no tail). The result therefore equals the f32 kernel on `dequantize(W)` bit for bit (tested).
//!
//! The group decoders of the pre-quantized blocks (FP8 E4M3, NF4, FP4, MXFP4) also serve their
//! dequantizer at this level ([`dequantize`]), so the values the matvec multiplies are the
//! values tested against the scalar dequantizers.

use core::arch::x86_64::*;

use crate::avx512::{reduce_acc, ACC, MV_ROWS};
use crate::prequant::{
    e8m0_to_f32, BlockF8, BlockFp4, BlockMxfp4, BlockNf4, Code4, Round4, RoundMark, RoundedBlock,
    TableMark, MXFP4_TABLE, QK_B4, QK_F8, QK_MX,
};
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

/// E4M3 codes (one per 32-bit lane, `0..=255`) to their f32 values, bit for bit
/// `prequant::E4M3_TO_F32` (the arithmetic decoding its doc describes; no gather).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
fn e4m3_to_f32(c: __m512i) -> __m512 {
    let v = _mm512_and_si512(c, _mm512_set1_epi32(0x7F));
    // Normal (v >= 8): exponent rebiased from 7 to 127, mantissa to the top of f32's.
    let normal = _mm512_add_epi32(_mm512_slli_epi32::<20>(v), _mm512_set1_epi32(120 << 23));
    // Subnormal (v < 8): v/8 · 2^-6 = v · 2^-9, exact.
    let sub = _mm512_castps_si512(_mm512_mul_ps(
        _mm512_cvtepi32_ps(v),
        _mm512_set1_ps(1.0 / 512.0),
    ));
    let is_sub = _mm512_cmplt_epi32_mask(v, _mm512_set1_epi32(8));
    let mag = _mm512_mask_blend_epi32(is_sub, normal, sub);
    let is_nan = _mm512_cmpeq_epi32_mask(v, _mm512_set1_epi32(0x7F));
    let mag = _mm512_mask_blend_epi32(is_nan, mag, _mm512_set1_epi32(0x7FC0_0000));
    let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(c, _mm512_set1_epi32(0x80)));
    _mm512_castsi512_ps(_mm512_or_si512(mag, sign))
}

impl Group32 for BlockF8 {
    const BLOCK: usize = QK_F8;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn group(row: *const Self, blk: usize, i: usize) -> (__m512, __m512) {
        debug_assert!(i < QK_F8 / 32);
        // SAFETY: block blk is readable (caller); bytes 32i .. 32i + 32 of its 128-byte qs,
        // one unaligned load.
        let (b, q) = unsafe {
            let b = &*row.add(blk);
            (b, _mm256_loadu_si256(b.qs.as_ptr().add(32 * i).cast()))
        };
        // Fast path: no NaN code among the 32 and a scale that survives `· 2^8` (every real
        // block): each code read as f16 bits is its value · 2^-8, widened exactly by vcvtph2ps,
        // and (v · 2^-8) · (d · 2^8) is the same real product as v · d, so its one rounding
        // gives the same f32.
        let seven = _mm256_set1_epi8(0x7F);
        let nan = _mm256_cmpeq_epi8_mask(_mm256_and_si256(q, seven), seven);
        let scaled = b.d * 256.0;
        if nan == 0 && scaled.is_finite() {
            let d = _mm512_set1_ps(scaled);
            let lo = e4m3_scaled(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(q)));
            let hi = e4m3_scaled(_mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(q)));
            return (_mm512_mul_ps(d, lo), _mm512_mul_ps(d, hi));
        }
        let d = _mm512_set1_ps(b.d);
        let lo = e4m3_to_f32(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(q)));
        let hi = e4m3_to_f32(_mm512_cvtepu8_epi32(_mm256_extracti128_si256::<1>(q)));
        // One rounding, as the scalar `d * E4M3_TO_F32[q]`.
        (_mm512_mul_ps(d, lo), _mm512_mul_ps(d, hi))
    }
}

/// Non-NaN E4M3 codes (one per 16-bit lane) to f32 values · 2^-8, exactly: `code << 7` puts
/// the 4 exponent and 3 mantissa bits where f16 keeps its exponent's low bits and mantissa's
/// top bits (f16's bias 15 is E4M3's 7 plus 8; E4M3 subnormals land on f16 subnormals), the
/// sign moves from bit 14 to bit 15, and vcvtph2ps widens exactly.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
fn e4m3_scaled(c: __m256i) -> __m512 {
    let v = _mm256_slli_epi16::<7>(c);
    let bits = _mm256_add_epi16(v, _mm256_and_si256(v, _mm256_set1_epi16(0x4000)));
    _mm512_cvtph_ps(bits)
}

/// [`Group32::group`] of a bitsandbytes 4-bit block: weights `32i .. 32i + 32` are the 32
/// nibbles of bytes `16i .. 16i + 16`, high nibble first, looked up with one in-register
/// permute of the 16-entry table per 16 weights (no gather).
///
/// # Safety
/// As [`Group32::group`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn group_b4<B: Code4>(row: *const B, blk: usize, i: usize) -> (__m512, __m512) {
    debug_assert!(i < QK_B4 / 32);
    // SAFETY: block blk is readable (caller); bytes 16i .. 16i + 16 of its 32 code bytes.
    let (b, q) = unsafe {
        let b = &*row.add(blk);
        (b, _mm_loadu_si128(b.codes().as_ptr().add(16 * i).cast()))
    };
    let nib = _mm_set1_epi8(0x0F);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), nib);
    let lo = _mm_and_si128(q, nib);
    // Weight 2j is the high nibble of byte j, weight 2j + 1 its low nibble.
    let (c0, c1) = (_mm_unpacklo_epi8(hi, lo), _mm_unpackhi_epi8(hi, lo));
    let table = B::TABLE;
    // SAFETY: table has 16 floats, read with one unaligned load.
    let t = unsafe { _mm512_loadu_ps(table.as_ptr()) };
    // permutexvar reads the low 4 bits of each index: the code.
    let v0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c0), t);
    let v1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c1), t);
    let d = _mm512_set1_ps(b.scale());
    // One rounding, as the scalar `d * TABLE[code]` (then the block type's own, if any).
    let (w0, w1) = (_mm512_mul_ps(d, v0), _mm512_mul_ps(d, v1));
    match B::ROUND {
        None => (w0, w1),
        Some(r) => (round4(w0, r), round4(w1, r)),
    }
}

/// `v` rounded to bf16 or f16 (to nearest, ties to even) and widened back, as
/// [`Round4::apply`] does per value (see `quant_avx2::round4`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
fn round4(v: __m512, r: Round4) -> __m512 {
    match r {
        Round4::Bf16 => {
            let bits = _mm512_castps_si512(v);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let up = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
            _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(-65536)))
        }
        Round4::F16 => _mm512_cvtph_ps(_mm512_cvtps_ph::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(v)),
    }
}

impl<T: TableMark, R: RoundMark> Group32 for RoundedBlock<T, R> {
    const BLOCK: usize = QK_B4;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn group(row: *const Self, blk: usize, i: usize) -> (__m512, __m512) {
        // SAFETY: the caller's contract is group_b4's.
        unsafe { group_b4(row, blk, i) }
    }
}

impl Group32 for BlockNf4 {
    const BLOCK: usize = QK_B4;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn group(row: *const Self, blk: usize, i: usize) -> (__m512, __m512) {
        // SAFETY: the caller's contract is group_b4's.
        unsafe { group_b4(row, blk, i) }
    }
}

impl Group32 for BlockFp4 {
    const BLOCK: usize = QK_B4;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn group(row: *const Self, blk: usize, i: usize) -> (__m512, __m512) {
        // SAFETY: the caller's contract is group_b4's.
        unsafe { group_b4(row, blk, i) }
    }
}

/// An MXFP4 block is one group: its 32 weights are the nibbles of its 16 code bytes, low nibble
/// first, looked up with one in-register permute of [`MXFP4_TABLE`] per 16 weights (no gather)
/// and multiplied by the block's power-of-two scale.
impl Group32 for BlockMxfp4 {
    const BLOCK: usize = QK_MX;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn group(row: *const Self, blk: usize, i: usize) -> (__m512, __m512) {
        debug_assert_eq!(i, 0);
        // SAFETY: block blk is readable (caller); its 16 code bytes, one unaligned load.
        let (b, q) = unsafe {
            let b = &*row.add(blk);
            (b, _mm_loadu_si128(b.qs.as_ptr().cast()))
        };
        let nib = _mm_set1_epi8(0x0F);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), nib);
        let lo = _mm_and_si128(q, nib);
        // Weight 2j is the low nibble of byte j, weight 2j + 1 its high nibble.
        let (c0, c1) = (_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi));
        // SAFETY: the table has 16 floats, read with one unaligned load.
        let t = unsafe { _mm512_loadu_ps(MXFP4_TABLE.as_ptr()) };
        // permutexvar reads the low 4 bits of each index: the code.
        let v0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c0), t);
        let v1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c1), t);
        let d = _mm512_set1_ps(e8m0_to_f32(b.e));
        // One rounding (none unless it overflows), as the scalar `d * TABLE[code]`.
        (_mm512_mul_ps(d, v0), _mm512_mul_ps(d, v1))
    }
}

/// Dequantizes whole blocks with the group decoder the matvec uses: `dst[Q::BLOCK·b + e]` is
/// weight `e` of block `b`. Panics unless `dst.len() == Q::BLOCK · src.len()`.
///
/// # Safety
/// The CPU must support avx512f/bw/vl and f16c.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(crate) unsafe fn dequantize<Q: Group32>(src: &[Q], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * Q::BLOCK);
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    for blk in 0..src.len() {
        for i in 0..Q::BLOCK / 32 {
            // SAFETY: blk < src.len(), so the block is readable, and i < BLOCK/32 as group
            // requires; the stores write dst[BLOCK·blk + 32i .. + 32], inside dst (asserted
            // length); unaligned instructions.
            unsafe {
                let (a, b) = Q::group(sp, blk, i);
                let o = dp.add(blk * Q::BLOCK + 32 * i);
                _mm512_storeu_ps(o, a);
                _mm512_storeu_ps(o.add(16), b);
            }
        }
    }
}

/// `out[rows, cols] = x[rows, k] · dequantize(w)ᵀ` for `rows <= 8`; `w` is `cols` rows of
/// `k / Q::BLOCK` blocks, `k > 0` a multiple of `Q::BLOCK`. Weight rows are streamed one at a
/// time, in order (one sequential stream), as `avx512::matvec` does.
///
/// # Safety
/// The CPU must support avx512f/bw/vl and f16c.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(crate) unsafe fn matvec<Q: Group32>(x: &[f32], k: usize, w: &[Q], out: &mut OutBlock) {
    let m = out.rows();
    let bpr = k / Q::BLOCK;
    assert!(
        (1..=crate::MATVEC_MAX_M).contains(&m),
        "matvec called with {m} rows"
    );
    assert!(k > 0 && bpr * Q::BLOCK == k);
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), out.cols() * bpr);
    for j in 0..out.cols() {
        let wr = &w[j * bpr..(j + 1) * bpr];
        let mut r0 = 0;
        while r0 < m {
            let r1 = (r0 + MV_ROWS).min(m);
            let xs = &x[r0 * k..r1 * k];
            match r1 - r0 {
                1 => dot_rows::<Q, 1>(xs, k, wr, r0, j, out),
                2 => dot_rows::<Q, 2>(xs, k, wr, r0, j, out),
                3 => dot_rows::<Q, 3>(xs, k, wr, r0, j, out),
                _ => dot_rows::<Q, 4>(xs, k, wr, r0, j, out),
            }
            r0 = r1;
        }
    }
}

/// `out[r0 + r][j] = x_r · dequantize(w)` for `r < MR` (`w` is one row of blocks).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
fn dot_rows<Q: Group32, const MR: usize>(
    x: &[f32],
    k: usize,
    w: &[Q],
    r0: usize,
    j: usize,
    out: &mut OutBlock,
) {
    let bpr = k / Q::BLOCK;
    assert!(bpr * Q::BLOCK == k && x.len() == MR * k && w.len() == bpr);
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); ACC]; MR];
    // Blocks outer, groups inner: the inner loop has a constant trip count, so it unrolls
    // and each block's scales are unpacked with constant indices. Group g covers elements
    // 32g .. 32g + 32, i.e. 16-lane chunks 2g and 2g + 1: accumulators (2g) % 4 and (2g + 1) % 4,
    // that is 0 and 1 for an even g, 2 and 3 for an odd one. Both cases are written with literal
    // indices (for one-group blocks, Q8_0 and MXFP4, g's parity is only known at run time, and
    // an array indexed by a run-time value would live in memory instead of registers).
    const _: () = assert!(ACC == 4);
    for blk in 0..bpr {
        for i in 0..Q::BLOCK / 32 {
            let g = blk * (Q::BLOCK / 32) + i;
            // SAFETY: w is one row of bpr blocks (asserted) and blk < bpr; i < BLOCK/32 as
            // group requires; g = blk·BLOCK/32 + i < k/32. x loads read x[r*k + 32g .. + 32]
            // with r < MR and 32g + 32 <= k: inside x (asserted length MR*k).
            unsafe {
                let v = Q::group(wp, blk, i);
                for (r, a) in acc.iter_mut().enumerate() {
                    let x0 = _mm512_loadu_ps(xp.add(r * k + 32 * g));
                    let x1 = _mm512_loadu_ps(xp.add(r * k + 32 * g + 16));
                    if g.is_multiple_of(2) {
                        a[0] = _mm512_fmadd_ps(x0, v.0, a[0]);
                        a[1] = _mm512_fmadd_ps(x1, v.1, a[1]);
                    } else {
                        a[2] = _mm512_fmadd_ps(x0, v.0, a[2]);
                        a[3] = _mm512_fmadd_ps(x1, v.1, a[3]);
                    }
                }
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        out.row(r0 + r)[j] = reduce_acc(a);
    }
}
