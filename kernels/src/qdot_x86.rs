//! x86_64 kernels of the q8-activation path (`qdot`): AVX-512 VNNI and AVX2 matmul kernels
//! for Q8_0 and Q4_K weights, and the AVX2 activation quantizer. Each is the twin of a scalar
//! function in `qdot`, whose module doc defines the summation order these reproduce exactly.
//!
//! Shape: a kernel call takes a group of `MR <= 8` x rows (their accumulators stay in
//! registers) and streams the weight rows one after another, so every weight byte is loaded
//! once, in address order, and used for all `MR` rows. One row at a time is deliberate: on the
//! Zen 4 this was tuned on, a single core reads one sequential stream at ~27 GB/s but only
//! ~14-17 GB/s when 2-8 weight rows are interleaved (the hardware prefetcher loses the
//! pattern), and with the sign trick below no per-row work is shared between weight rows, so
//! interleaving them would buy nothing back. Where `MR >= 2` the kernels are compute-bound and
//! a software prefetch ahead of the stream helps ([`PREFETCH_BYTES`]).
//!
//! Integer dots, and why they are exact:
//! - Q8_0: `vpdpbusd` / `vpmaddubsw` multiply unsigned by signed bytes, so both use the sign
//!   trick: `|w|` (unsigned, `|−128| = 128` fits) times `x·sign(w)` (signed; activations hold
//!   `|x| <= 127`, so `−x` fits). `vpmaddubsw` adds byte-product pairs into saturating i16s:
//!   `2·128·127 = 32512 < 2^15`, no saturation; `vpmaddwd` by ones then gives the same i32
//!   4-byte sums that `vpdpbusd` gives directly (|sum| <= 4·128·127, no wrap).
//! - Q4_K (x: the super-block quants): the 4-bit weights are already unsigned. Per row and
//!   super-block, the 4 chunks of 64 weights (sub-blocks 2j, 2j + 1) go in pairs (2P, 2P + 1):
//!   VNNI: `vpdpbusd` gives each chunk's 4-byte sums (`|v| <= 4·15·127 = 7620 < 2^15`),
//!   `vpackssdw` packs the pair's two vectors to i16 without saturating (per 128-bit lane:
//!   4 sums of chunk 2P, then 4 of chunk 2P + 1), and `vpdpwssd` multiplies adjacent i16
//!   pairs by the sub-block scales (laid over the i16 lanes by `vpermw`) and adds them into
//!   the i32 lanes `I_l` (so lane `l` gets the 8-byte sums `dot8(s, h)` of `qdot`'s layout);
//!   AVX2: `vpmaddubsw` (pair sums `<= 2·15·127`), `vpmaddwd` by the sub-block's scale (i32
//!   4-byte sums times `sc_s`), then `vphaddd` of the two chunks gives the same lanes as the
//!   pack (per 128-bit lane: adjacent sums of the first vector, then of the second). Each
//!   `I_l` is below 2^21, so the single `vcvtdq2ps` per super-block and row is exact.
//!
//! The AVX2 kernels keep each 16-lane f32 accumulator as two 8-lane halves (lanes 0..8 and
//! 8..16), so their f32 operations are the VNNI kernels' lane for lane.
//!
//! Every function here requires the CPU features its `target_feature` names; the callers in
//! `qdot` check them (`Kernel::supported`) first.

use core::arch::x86_64::*;

use crate::qdot::{quantize_slice, unpack_scales_mins, Dst, Q8Activations, XRows};
use crate::quant::{BlockQ4K, BlockQ8_0, QK8_0, QK_K};

/// How far ahead of the weight stream the Q8_0 VNNI kernel prefetches when it runs `MR >= 2`
/// rows: measured on Zen 4, +10% at m = 4 (compute-bound, so the hardware prefetcher alone
/// lets DRAM idle); at m = 1 it cost a few percent, and it made no difference for Q4_K.
const PREFETCH_BYTES: usize = 2048;

/// Picks the kernel instance for the group's row count.
macro_rules! by_rows {
    ($rows:expr, $f:ident, $args:tt) => {
        match $rows {
            1 => $f::<1> $args,
            2 => $f::<2> $args,
            3 => $f::<3> $args,
            4 => $f::<4> $args,
            5 => $f::<5> $args,
            6 => $f::<6> $args,
            7 => $f::<7> $args,
            8 => $f::<8> $args,
            m => unreachable!("q8-activation kernel called with {m} rows"),
        }
    };
}

/// `((v0+v4) + (v2+v6)) + ((v1+v5) + (v3+v7))` (`qdot::hsum8`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum8(v: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
    _mm_cvtss_f32(s1)
}

/// `hsum8(lo_l + hi_l)`: `qdot::hsum16` of a 16-lane accumulator held as two halves.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum16_halves(lo: __m256, hi: __m256) -> f32 {
    hsum8(_mm256_add_ps(lo, hi))
}

/// `qdot::hsum16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
fn hsum16(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    hsum16_halves(lo, hi)
}

/// f16 bits -> f32 (exact, F16C).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Raw pointers to the 32-block quants and the scale lines of each row of a group (Q8_0).
struct RowPtrs<const MR: usize> {
    qs: [*const i8; MR],
    scales: [*const f32; MR],
}

impl<const MR: usize> RowPtrs<MR> {
    /// Pointers for x rows `x.x0 ..`; each row has `64 · lines` quants and `16 · lines` scale
    /// floats (64-byte aligned, see `Q8Activations`). Panics unless the group has `MR` rows.
    #[inline(always)]
    fn new(x: XRows<'_>) -> Self {
        assert!(x.rows == MR && x.x0 + MR <= x.xq.rows());
        RowPtrs {
            qs: std::array::from_fn(|r| x.xq.qs_row(x.x0 + r).as_ptr().cast()),
            scales: std::array::from_fn(|r| x.xq.scales_row(x.x0 + r).as_ptr().cast()),
        }
    }
}

/// Raw pointers to the super-block quants, scales `D_t` and block sums of each row of a
/// group (Q4_K).
struct SbPtrs<const MR: usize> {
    qs: [*const i8; MR],
    d: [*const f32; MR],
    sums: [*const f32; MR],
}

impl<const MR: usize> SbPtrs<MR> {
    /// Pointers for x rows `x.x0 ..`; each row has `k` quants (64-byte aligned lines),
    /// `k / 256` scales and `k / 32` sums. Panics unless the group has `MR` rows and the
    /// activations have super-blocks.
    #[inline(always)]
    fn new(x: XRows<'_>) -> Self {
        assert!(x.rows == MR && x.x0 + MR <= x.xq.rows());
        SbPtrs {
            qs: std::array::from_fn(|r| x.xq.sb_qs_row(x.x0 + r).as_ptr().cast()),
            d: std::array::from_fn(|r| x.xq.sb_d_row(x.x0 + r).as_ptr()),
            sums: std::array::from_fn(|r| x.xq.sb_sums_row(x.x0 + r).as_ptr()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantizer

/// Quantizes `x` (`[xq.rows(), xq.k()]`) into `xq`, bit for bit as `qdot::quantize_slice`
/// (32-blocks and, where `k % 256 == 0`, super-blocks).
///
/// # Safety
/// The CPU must support avx2/fma/f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_avx2(xq: &mut Q8Activations, x: &[f32]) {
    xq.fill(x, |x, q| quantize_slice_avx2(x, q));
}

/// `qdot::quantize_slice` for a multiple of 32 values: the same max (exact, in any order),
/// the same scalar `d` and `1/d`, the same product `x·(1/d)`, and its rounding half away from
/// zero as truncation plus `frac >= 0.5`. Slices with a non-finite value (vector max treats
/// NaN differently from `f32::max`) or an infinite `1/d` take the scalar function. Panics
/// unless the lengths are equal multiples of 32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_slice_avx2(x: &[f32], q: &mut [i8]) -> f32 {
    assert!(x.len() == q.len() && x.len().is_multiple_of(QK8_0));
    let sign = _mm256_set1_ps(-0.0);
    let inf = _mm256_set1_ps(f32::INFINITY);
    let mut finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    let mut m = _mm256_setzero_ps();
    for c in x.chunks_exact(8) {
        // SAFETY: `c` has 8 floats; unaligned load.
        let a = _mm256_andnot_ps(sign, unsafe { _mm256_loadu_ps(c.as_ptr()) });
        finite = _mm256_and_ps(finite, _mm256_cmp_ps::<_CMP_LT_OQ>(a, inf));
        m = _mm256_max_ps(m, a);
    }
    if _mm256_movemask_ps(finite) != 0xFF {
        return quantize_slice(x, q);
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    if id == f32::INFINITY {
        // Tiny slices (amax below ~3.7e-37): x·(1/d) is ±inf or NaN, which the scalar
        // function maps to ±127 / 0 through saturating casts.
        return quantize_slice(x, q);
    }
    let idv = _mm256_set1_ps(id);
    let half = _mm256_set1_ps(0.5);
    let one = _mm256_set1_ps(1.0);
    for (xc, qc) in x.chunks_exact(QK8_0).zip(q.chunks_exact_mut(QK8_0)) {
        // SAFETY: `xc` has 32 floats: 4 unaligned loads of 8.
        let v: [__m256; 4] =
            std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xc.as_ptr().add(8 * i)) });
        let r = v.map(|v| {
            let t = _mm256_mul_ps(v, idv);
            let a = _mm256_andnot_ps(sign, t);
            let tr = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(a);
            let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_sub_ps(a, tr), half), one);
            // r >= 0 is an integer <= 128, so OR-ing t's sign bit negates it exactly.
            let r = _mm256_or_ps(_mm256_add_ps(tr, up), _mm256_and_ps(t, sign));
            _mm256_cvtps_epi32(r)
        });
        // i32 -> i8 with saturation (values are within ±127 already); the packs interleave
        // 128-bit lanes, the permute restores element order.
        let p = _mm256_packs_epi16(
            _mm256_packs_epi32(r[0], r[1]),
            _mm256_packs_epi32(r[2], r[3]),
        );
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: `qc` has 32 bytes; unaligned store.
        unsafe { _mm256_storeu_si256(qc.as_mut_ptr().cast(), p) };
    }
    d
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI

/// Q8_0 weights, VNNI: `dst[r][c] = x_r · w_c` for the group's rows and every weight row `c` of
/// `w` (`k / 32` blocks each).
///
/// # Safety
/// The CPU must support avx512f/bw/vl/vnni and avx2/fma/f16c.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn q8_0_vnni(x: XRows<'_>, w: &[BlockQ8_0], dst: &mut Dst) {
    by_rows!(x.rows, q8_0_vnni_rows, (x, w, dst))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q8_0_vnni_rows<const MR: usize>(x: XRows<'_>, w: &[BlockQ8_0], dst: &mut Dst) {
    let bpr = x.xq.k() / QK8_0;
    assert!(bpr > 0 && bpr * QK8_0 == x.xq.k() && w.len().is_multiple_of(bpr));
    let rp = RowPtrs::<MR>::new(x);
    for (c, wr) in w.chunks_exact(bpr).enumerate() {
        let mut acc = [_mm512_setzero_ps(); MR];
        for p in 0..bpr / 2 {
            // SAFETY: 2p + 1 < bpr = wr.len().
            unsafe { q8_0_vnni_pair::<MR, true>(&mut acc, &rp, wr.as_ptr(), p) };
        }
        if bpr % 2 == 1 {
            // SAFETY: 2p = bpr - 1 < bpr.
            unsafe { q8_0_vnni_pair::<MR, false>(&mut acc, &rp, wr.as_ptr(), bpr / 2) };
        }
        for (r, a) in acc.iter().enumerate() {
            dst.set(r, c, hsum16(*a));
        }
    }
}

/// Blocks `2p` and, if `FULL`, `2p + 1` of a weight row against line `p` of the `MR` x rows:
/// lanes 0..8 take the even block, lanes 8..16 the odd one (without `FULL` those take
/// `fma(0, 0, acc) = acc`: the weight scale and the x scales are zero there, and an
/// accumulator that starts at +0.0 never holds −0.0).
///
/// # Safety
/// `w` points to a weight row with block `2p` (and `2p + 1` if `FULL`); `rp` comes from the
/// activations it multiplies, so line `p` exists in every row; the CPU supports the features
/// below.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0_vnni_pair<const MR: usize, const FULL: bool>(
    acc: &mut [__m512; MR],
    rp: &RowPtrs<MR>,
    w: *const BlockQ8_0,
    p: usize,
) {
    let zero = _mm512_setzero_si512();
    // SAFETY: blocks 2p (and 2p + 1 if FULL) exist (caller); `qs` is 32 bytes, read with
    // unaligned loads; the prefetch is only a hint and may point past the row.
    let (wq, d01) = unsafe {
        let b0 = w.add(2 * p);
        if MR >= 2 {
            _mm_prefetch::<_MM_HINT_T0>(b0.cast::<i8>().wrapping_add(PREFETCH_BYTES));
        }
        let lo = _mm256_loadu_si256((*b0).qs.as_ptr().cast());
        let (hi, dh) = if FULL {
            let b1 = b0.add(1);
            (
                _mm256_loadu_si256((*b1).qs.as_ptr().cast()),
                (*b1).d.to_bits(),
            )
        } else {
            (_mm256_setzero_si256(), 0)
        };
        let wq = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
        (wq, (*b0).d.to_bits() as u32 | (dh as u32) << 16)
    };
    let uw = _mm512_abs_epi8(wq);
    let neg = _mm512_movepi8_mask(wq);
    // [e_2p ×8, e_2p+1 ×8]: the weight scales over their block's lanes.
    let pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let e2 = _mm_cvtph_ps(_mm_cvtsi32_si128(d01 as i32));
    let dw = _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(e2));
    for (r, acc) in acc.iter_mut().enumerate() {
        // SAFETY: line p of row r: 64 quants and 16 scale floats, 64-byte aligned.
        let (xq, dx) = unsafe {
            (
                _mm512_load_si512(rp.qs[r].add(64 * p).cast()),
                _mm512_load_ps(rp.scales[r].add(16 * p)),
            )
        };
        let xs = _mm512_mask_sub_epi8(xq, neg, zero, xq);
        let s = _mm512_dpbusd_epi32(zero, uw, xs);
        // d_b·e_b: both f16 values, so the product is exact.
        let dd = _mm512_mul_ps(dx, dw);
        *acc = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(s), *acc);
    }
}

/// Q4_K weights, VNNI: as [`q8_0_vnni`] with `k / 256` super-blocks per weight row.
///
/// # Safety
/// The CPU must support avx512f/bw/vl/vnni and avx2/fma/f16c.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn q4k_vnni(x: XRows<'_>, w: &[BlockQ4K], dst: &mut Dst) {
    by_rows!(x.rows, q4k_vnni_rows, (x, w, dst))
}

/// The 8 six-bit sub-block scales of a super-block as i16 (lanes 0..8 of the result), its
/// scale `d` as f32 and the 8 mins `dmin·m_s` (exact products).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_scales(b: &BlockQ4K) -> (__m128i, f32, __m256) {
    let (sc, mn) = unpack_scales_mins(&b.scales);
    let sc16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64));
    let mn32 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(mn as i64)));
    let dmin = _mm256_set1_ps(widen(b.dmin.to_bits()));
    (sc16, widen(b.d.to_bits()), _mm256_mul_ps(dmin, mn32))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn q4k_vnni_rows<const MR: usize>(x: XRows<'_>, w: &[BlockQ4K], dst: &mut Dst) {
    let bpr = x.xq.k() / QK_K;
    assert!(bpr > 0 && bpr * QK_K == x.xq.k() && w.len().is_multiple_of(bpr));
    let rp = SbPtrs::<MR>::new(x);
    let low = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    // 16-bit shift counts: 0 in the low 256 bits (low nibbles: sub-block 2j), 4 in the high
    // 256 bits (high nibbles: sub-block 2j + 1) of a broadcast 32-byte chunk j of `qs`.
    let shifts = _mm512_inserti64x4::<1>(zero, _mm256_set1_epi16(4));
    // i16 scale selectors of chunk pair P: i16 lanes 2l, 2l + 1 take sub-block
    // 4P + 2·⌊(l % 4) / 2⌋ + ⌊l / 8⌋ (the module doc's lane layout, after the pack below).
    let sel: [__m512i; 2] = std::array::from_fn(|pp| {
        let idx: [i16; 32] = std::array::from_fn(|i| (4 * pp + 2 * ((i / 4) % 2) + i / 16) as i16);
        // SAFETY: `idx` is 64 bytes; unaligned load.
        unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) }
    });
    // Chunk j of `qs` as 64 unsigned nibbles: sub-block 2j in bytes 0..32, 2j + 1 in 32..64.
    let nibbles = |b: &BlockQ4K, j: usize| {
        // SAFETY: qs[32j .. 32j + 32] is inside the 128-byte qs (j < 4); unaligned.
        let q = unsafe { _mm256_loadu_si256(b.qs.as_ptr().add(32 * j).cast()) };
        _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(q), shifts), low)
    };
    for (c, wr) in w.chunks_exact(bpr).enumerate() {
        let mut acc = [_mm512_setzero_ps(); MR];
        let mut mins = [_mm256_setzero_ps(); MR];
        for (sb, b) in wr.iter().enumerate() {
            let (sc8, d, dm) = q4k_scales(b);
            let sc8 = _mm512_castsi128_si512(sc8);
            let mut isum = [zero; MR];
            for (pp, sel) in sel.iter().enumerate() {
                let (wa, wb) = (nibbles(b, 2 * pp), nibbles(b, 2 * pp + 1));
                let sc = _mm512_permutexvar_epi16(*sel, sc8);
                let line = 4 * sb + 2 * pp;
                for (r, isum) in isum.iter_mut().enumerate() {
                    // SAFETY: lines 4·sb + 2P and + 1 < k/64 = lines of row r; 64-byte aligned.
                    let (xa, xb) = unsafe {
                        let p = rp.qs[r].add(64 * line);
                        (
                            _mm512_load_si512(p.cast()),
                            _mm512_load_si512(p.add(64).cast()),
                        )
                    };
                    // 4-byte sums |v| <= 4·15·127 < 2^15: the pack to i16 does not saturate.
                    let va = _mm512_dpbusd_epi32(zero, wa, xa);
                    let vb = _mm512_dpbusd_epi32(zero, wb, xb);
                    let p = _mm512_packs_epi32(va, vb);
                    *isum = _mm512_dpwssd_epi32(*isum, p, sc);
                }
            }
            for r in 0..MR {
                // SAFETY: super-block sb's scale and its 8 block sums of row r exist.
                let (dx, xs) =
                    unsafe { (*rp.d[r].add(sb), _mm256_loadu_ps(rp.sums[r].add(8 * sb))) };
                // |isum| < 2^21: exact in f32.
                acc[r] =
                    _mm512_fmadd_ps(_mm512_set1_ps(d * dx), _mm512_cvtepi32_ps(isum[r]), acc[r]);
                mins[r] = _mm256_fmadd_ps(dm, xs, mins[r]);
            }
        }
        for r in 0..MR {
            dst.set(r, c, hsum16(acc[r]) - hsum8(mins[r]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2

/// Q8_0 weights, AVX2 (see [`q8_0_vnni`]).
///
/// # Safety
/// The CPU must support avx2/fma/f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q8_0_avx2(x: XRows<'_>, w: &[BlockQ8_0], dst: &mut Dst) {
    by_rows!(x.rows, q8_0_avx2_rows, (x, w, dst))
}

/// The exact i32 sums of 4 byte products `u·s` per lane (`u` unsigned, `s` signed; the 16-bit
/// pair sums must not saturate, see the module doc).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot4(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_avx2_rows<const MR: usize>(x: XRows<'_>, w: &[BlockQ8_0], dst: &mut Dst) {
    let bpr = x.xq.k() / QK8_0;
    assert!(bpr > 0 && bpr * QK8_0 == x.xq.k() && w.len().is_multiple_of(bpr));
    let rp = RowPtrs::<MR>::new(x);
    for (c, wr) in w.chunks_exact(bpr).enumerate() {
        // [r][half]: lanes 0..8 take even blocks, lanes 8..16 odd ones.
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for (b, wb) in wr.iter().enumerate() {
            let (p, h) = (b / 2, b % 2);
            // SAFETY: `qs` is 32 bytes; unaligned load.
            let wq = unsafe { _mm256_loadu_si256(wb.qs.as_ptr().cast()) };
            let uw = _mm256_sign_epi8(wq, wq);
            let dw = _mm256_set1_ps(widen(wb.d.to_bits()));
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: line p of row r: quants 64p + 32h .. + 32 and scale floats
                // 16p + 8h .. + 8, 32-byte aligned.
                let (xq, dx) = unsafe {
                    (
                        _mm256_load_si256(rp.qs[r].add(64 * p + 32 * h).cast()),
                        _mm256_load_ps(rp.scales[r].add(16 * p + 8 * h)),
                    )
                };
                let s = dot4(uw, _mm256_sign_epi8(xq, wq));
                let dd = _mm256_mul_ps(dx, dw);
                acc[h] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(s), acc[h]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            dst.set(r, c, hsum16_halves(a[0], a[1]));
        }
    }
}

/// Q4_K weights, AVX2 (see [`q4k_vnni`]).
///
/// # Safety
/// The CPU must support avx2/fma/f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q4k_avx2(x: XRows<'_>, w: &[BlockQ4K], dst: &mut Dst) {
    by_rows!(x.rows, q4k_avx2_rows, (x, w, dst))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_avx2_rows<const MR: usize>(x: XRows<'_>, w: &[BlockQ4K], dst: &mut Dst) {
    let bpr = x.xq.k() / QK_K;
    assert!(bpr > 0 && bpr * QK_K == x.xq.k() && w.len().is_multiple_of(bpr));
    let rp = SbPtrs::<MR>::new(x);
    let low = _mm256_set1_epi8(0x0F);
    let zero = _mm256_setzero_si256();
    for (c, wr) in w.chunks_exact(bpr).enumerate() {
        // [r][half]: the VNNI kernel's 16-lane accumulator in 8-lane halves.
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let mut mins = [_mm256_setzero_ps(); MR];
        for (sb, b) in wr.iter().enumerate() {
            let (sc8, d, dm) = q4k_scales(b);
            let mut sc = [0i16; 8];
            // SAFETY: `sc` is 16 bytes; unaligned store.
            unsafe { _mm_storeu_si128(sc.as_mut_ptr().cast(), sc8) };
            let mut isum = [[zero; 2]; MR];
            for pp in 0..2 {
                // Chunks 2P and 2P + 1 as unsigned nibbles: [chunk][half].
                let wq: [[__m256i; 2]; 2] = std::array::from_fn(|e| {
                    let j = 2 * pp + e;
                    // SAFETY: qs[32j .. 32j + 32] is inside the 128-byte qs (j < 4); unaligned.
                    let q = unsafe { _mm256_loadu_si256(b.qs.as_ptr().add(32 * j).cast()) };
                    [
                        _mm256_and_si256(q, low),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(q), low),
                    ]
                });
                for (r, isum) in isum.iter_mut().enumerate() {
                    for h in 0..2 {
                        // Half h of the 16 lanes: sub-blocks 4P + h (chunk 2P) and 4P + 2 + h
                        // (chunk 2P + 1), their 8-byte sums paired by the hadd.
                        let v: [__m256i; 2] = std::array::from_fn(|e| {
                            let line = 4 * sb + 2 * pp + e;
                            // SAFETY: line < lines of row r; half h: quants 64·line + 32h ..
                            // + 32, 32-byte aligned.
                            let xq = unsafe {
                                _mm256_load_si256(rp.qs[r].add(64 * line + 32 * h).cast())
                            };
                            // Pair sums |p| <= 2·15·127: no i16 saturation.
                            let p = _mm256_maddubs_epi16(wq[e][h], xq);
                            _mm256_madd_epi16(p, _mm256_set1_epi16(sc[4 * pp + 2 * e + h]))
                        });
                        isum[h] = _mm256_add_epi32(isum[h], _mm256_hadd_epi32(v[0], v[1]));
                    }
                }
            }
            for r in 0..MR {
                // SAFETY: super-block sb's scale and its 8 block sums of row r exist.
                let (dx, xs) =
                    unsafe { (*rp.d[r].add(sb), _mm256_loadu_ps(rp.sums[r].add(8 * sb))) };
                let dd = _mm256_set1_ps(d * dx);
                for h in 0..2 {
                    // |isum| < 2^21: exact in f32.
                    let v = _mm256_cvtepi32_ps(isum[r][h]);
                    acc[r][h] = _mm256_fmadd_ps(dd, v, acc[r][h]);
                }
                mins[r] = _mm256_fmadd_ps(dm, xs, mins[r]);
            }
        }
        for r in 0..MR {
            dst.set(r, c, hsum16_halves(acc[r][0], acc[r][1]) - hsum8(mins[r]));
        }
    }
}
