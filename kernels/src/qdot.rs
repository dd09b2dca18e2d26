//! Integer-dot matmul with q8-quantized activations for Q8_0 weights
//! ([`matmul_q8_activations`]): a faster, less exact alternative to the f32-activation path.
//!
//! Each row of x is quantized to Q8_0 exactly like weights ([`quantize_row_q8_0`]), and every
//! block pair contributes `(d_x·d_w) · Σ qx·qw` with the integer sums exact. This rounds x to
//! 8 bits, so results differ from `matmul` (the test measures by how much); use it only where
//! that is acceptable.
//!
//! Summation order (shared by the scalar twin and the SIMD kernels, so they agree bit for bit):
//! 8 lanes; lane `l` of block `b` is the exact integer `s = Σ_{i=4l}^{4l+3} qx_i·qw_i`, and
//! `acc_l = acc_l + (d_x·d_w)·(s as f32)` (a rounded multiply, then a rounded add) for blocks in
//! increasing order; then `((acc0+acc4)+(acc2+acc6)) + ((acc1+acc5)+(acc3+acc7))`, the order of
//! `avx2::hsum`. Activations never hold −128 (the quantizer clamps to ±127), which keeps the
//! SIMD 16-bit pair sums from saturating even for weights of −128.

use half::f16;

use crate::quant::{quantize_row_q8_0, BlockQ8_0, QK8_0};
use crate::Level;

/// Dot product of two Q8_0 rows in the module's order (the scalar twin).
pub(crate) fn dot_q8_scalar(a: &[BlockQ8_0], b: &[BlockQ8_0]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    for (x, y) in a.iter().zip(b) {
        let d = x.d.to_f32() * y.d.to_f32();
        for (l, a) in acc.iter_mut().enumerate() {
            let s: i32 = (4 * l..4 * l + 4)
                .map(|i| x.qs[i] as i32 * y.qs[i] as i32)
                .sum();
            *a += d * s as f32;
        }
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
}

/// `out[m, n] = q8(x)[m, k] · dequantize(w)[n, k]ᵀ` with x rows quantized to Q8_0 and integer
/// block dots (see the module doc). Single-threaded (callers parallelise over calls or split
/// `w` by rows themselves). Panics unless `k` is a multiple of 32 and the lengths are `m·k`,
/// `n·k/32` blocks and `m·n`.
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

/// [`matmul_q8_activations`] at a given level (tests force each one).
pub(crate) fn matmul_q8_activations_with(
    level: Level,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[BlockQ8_0],
    n: usize,
    out: &mut [f32],
) {
    crate::check_matmul(x, m, k, &crate::Weights::Q8_0(w), n, out);
    crate::assert_supported(level);
    let bpr = k / QK8_0;
    let mut xq = vec![
        BlockQ8_0 {
            d: f16::ZERO,
            qs: [0; QK8_0]
        };
        m * bpr
    ];
    if bpr > 0 {
        for (xr, qr) in x.chunks_exact(k).zip(xq.chunks_exact_mut(bpr)) {
            quantize_row_q8_0(xr, qr);
        }
    }
    #[cfg(target_arch = "x86_64")]
    let vnni = level == Level::Avx512 && std::is_x86_feature_detected!("avx512vnni");
    // Weight row outermost: each is read from memory once; the quantized x stays in cache.
    // SIMD levels take up to `ROWS` x rows per pass over a weight row (independent chains).
    for j in 0..n {
        let wr = &w[j * bpr..(j + 1) * bpr];
        let mut i = 0;
        while i < m {
            let rows = if level == Level::Scalar {
                1
            } else {
                ROWS.min(m - i)
            };
            let mut xs: [&[BlockQ8_0]; ROWS] = [&[]; ROWS];
            for (r, xr) in xs.iter_mut().enumerate().take(rows) {
                *xr = &xq[(i + r) * bpr..(i + r + 1) * bpr];
            }
            let mut res = [0f32; ROWS];
            match level {
                Level::Scalar => res[0] = dot_q8_scalar(xs[0], wr),
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 | Level::Avx512 => {
                    if rows == ROWS {
                        // SAFETY: see `simd_rows`.
                        res = unsafe { simd_rows::<ROWS>(vnni, xs, wr) };
                    } else {
                        for r in 0..rows {
                            // SAFETY: see `simd_rows`.
                            res[r] = unsafe { simd_rows::<1>(vnni, [xs[r]], wr)[0] };
                        }
                    }
                }
            }
            for (r, v) in res.iter().enumerate().take(rows) {
                out[(i + r) * n + j] = *v;
            }
            i += rows;
        }
    }
}

/// x rows per SIMD pass over a weight row.
const ROWS: usize = 4;

/// Dispatches to the VNNI or the AVX2 kernel.
///
/// # Safety
/// The CPU must support avx2/fma/f16c (both SIMD levels include them, checked by the caller's
/// `assert_supported`), and if `vnni` also avx512f/vl/vnni (`vnni` is only set at the Avx512
/// level after detecting avx512vnni).
#[cfg(target_arch = "x86_64")]
unsafe fn simd_rows<const R: usize>(
    vnni: bool,
    xs: [&[BlockQ8_0]; R],
    w: &[BlockQ8_0],
) -> [f32; R] {
    // SAFETY: forwarded from the caller.
    unsafe {
        if vnni {
            x86::dot_q8_vnni::<R>(xs, w)
        } else {
            x86::dot_q8_avx2::<R>(xs, w)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use crate::avx2::hsum;
    use crate::quant::BlockQ8_0;

    /// `d_x · d_w` with F16C (both widenings exact, one rounded product as in the twin).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scale(x: &BlockQ8_0, y: &BlockQ8_0) -> __m256 {
        let h = _mm_cvtph_ps(_mm_cvtsi32_si128(
            (x.d.to_bits() as u32 | ((y.d.to_bits() as u32) << 16)) as i32,
        ));
        let p = _mm_mul_ss(h, _mm_movehdup_ps(h));
        _mm256_broadcastss_ps(p)
    }

    /// Loads the 32 quants of a block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load(b: &BlockQ8_0) -> __m256i {
        // SAFETY: qs is a 32-byte array; unaligned load.
        unsafe { _mm256_loadu_si256(b.qs.as_ptr().cast()) }
    }

    /// Dot products of `R` Q8_0 rows `xs` with `w`. Per block, `|w|` (unsigned bytes) times
    /// `x·sign(w)` (signed bytes) gives the byte products `qx·qw`; pair sums fit i16 since
    /// `|qx| <= 127` and `|qw| <= 128`.
    ///
    /// # Safety
    /// The CPU must support avx2/fma/f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_avx2<const R: usize>(
        xs: [&[BlockQ8_0]; R],
        w: &[BlockQ8_0],
    ) -> [f32; R] {
        assert!(xs.iter().all(|x| x.len() == w.len()));
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, y) in w.iter().enumerate() {
            let qy = load(y);
            let ua = _mm256_sign_epi8(qy, qy);
            for (a, x) in acc.iter_mut().zip(&xs) {
                let x = &x[b];
                let sb = _mm256_sign_epi8(load(x), qy);
                let s = _mm256_madd_epi16(_mm256_maddubs_epi16(ua, sb), ones);
                *a = _mm256_add_ps(*a, _mm256_mul_ps(scale(x, y), _mm256_cvtepi32_ps(s)));
            }
        }
        acc.map(|a| hsum(a))
    }

    /// [`dot_q8_avx2`] with `vpdpbusd` (lane l: the exact i32 sum of byte products 4l..4l+4,
    /// as `madd(maddubs)` gives without saturation).
    ///
    /// # Safety
    /// The CPU must support avx2/fma/f16c and avx512f/vl/vnni.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn dot_q8_vnni<const R: usize>(
        xs: [&[BlockQ8_0]; R],
        w: &[BlockQ8_0],
    ) -> [f32; R] {
        assert!(xs.iter().all(|x| x.len() == w.len()));
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, y) in w.iter().enumerate() {
            let qy = load(y);
            let ua = _mm256_sign_epi8(qy, qy);
            for (a, x) in acc.iter_mut().zip(&xs) {
                let x = &x[b];
                let sb = _mm256_sign_epi8(load(x), qy);
                let s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ua, sb);
                *a = _mm256_add_ps(*a, _mm256_mul_ps(scale(x, y), _mm256_cvtepi32_ps(s)));
            }
        }
        acc.map(|a| hsum(a))
    }
}
