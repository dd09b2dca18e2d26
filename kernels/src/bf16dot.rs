//! Matmul with bf16-rounded activations ("bf16 activations") for bf16 weights: the opt-in
//! speed path for prefill on CPUs with AVX512_BF16, whose `vdpbf16ps` takes 32 bf16 products
//! per instruction, twice the f32 FMA rate. It is less exact than [`crate::matmul`]: x is
//! rounded to bf16 (round to nearest even, once per call) and the dot products flush
//! denormals, as the instruction does.
//!
//! This module owns the public entry points ([`matmul_bf16`], [`matmul_bf16_par`],
//! [`bf16_activations_supported`]), the rounding of x, the run-time kernel choice, the
//! parallel split and the scalar twin ([`dot_scalar`]), which defines the results. The SIMD
//! kernels live in `bf16dot_x86`.
//!
//! # Rounding of x
//! Every x row is rounded element by element as `half::bf16::from_f32` does ([`round_bf16`]:
//! round to nearest even; NaN stays NaN, quietened) and zero padded to `kp = k` rounded up to a multiple of 32
//! ([`PackedX`]). Weight rows are read as stored; elements past `k` count as +0.
//!
//! # Summation order (one output element; [`dot_scalar`] is the definition)
//! 16 f32 lanes `A_0..A_16` start at +0.0. For chunks `c = 0 .. kp/32` in increasing order,
//! for every lane `l`, with `p = 32c + 2l` (x and w padded with zeros to `kp`):
//! `A_l = step(A_l, x[p+1], w[p+1])`, then `A_l = step(A_l, x[p], w[p])` (odd element first,
//! as Intel's pseudo-code for `vdpbf16ps` orders it), where
//! `step(a, u, v) = ftz(fma(daz(u), daz(v), daz(a)))`: one fused multiply-add rounded to
//! nearest even (a bf16 × bf16 product is exact in f32 anyway), input denormals read as zero
//! of the same sign (DAZ), a denormal result flushed to zero of the same sign (FTZ). The
//! result is `hsum16(A)`, ordinary f32 additions in a fixed tree:
//! `s8_i = A_i + A_{i+8}`, `s4_i = s8_i + s8_{i+4}`, `s2_i = s4_i + s4_{i+2}`, `s2_0 + s2_1`.
//!
//! The order depends on nothing but `k`: not on `m` (the decode kernel and the GEMM tile agree),
//! the tile an element falls in, the split or the thread count, so every kernel equals the twin
//! and [`matmul_bf16_par`] equals [`matmul_bf16`] bit for bit.
//!
//! What must hold: the SIMD kernels run exactly these steps (one `vdpbf16ps` per chunk and
//! element, chunks in increasing order, into one accumulator per element, then `hsum16`), read
//! x only through [`PackedX`] (whose zero padding makes the last chunk whole) and read no weight
//! past `k` (masked loads). Overflow follows from the steps (an infinity stays, inf − inf is
//! NaN); NaN payloads are not specified, only that a NaN comes out.

use std::sync::OnceLock;

use half::bf16;

use crate::{OutBlock, Weights};

/// bf16 elements per chunk: one 512-bit vector, 16 lanes × one (even, odd) pair.
pub(crate) const CHUNK: usize = 32;

/// x rounded to bf16, rows of `kp = k` rounded up to [`CHUNK`], zero padded.
pub(crate) struct PackedX {
    m: usize,
    kp: usize,
    data: Vec<bf16>,
}

impl PackedX {
    /// Rounds the `m` rows of `x` (`[m, k]`, `x.len() == m·k`) to bf16 (see the module doc).
    pub(crate) fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(x.len(), m * k);
        let kp = k.next_multiple_of(CHUNK);
        let mut data = vec![bf16::ZERO; m * kp];
        if k > 0 {
            for (dst, src) in data.chunks_exact_mut(kp).zip(x.chunks_exact(k)) {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = round_bf16(s);
                }
            }
        }
        PackedX { m, kp, data }
    }

    /// Rows (`m`).
    pub(crate) fn rows(&self) -> usize {
        self.m
    }

    /// Padded row length (`k` rounded up to a multiple of [`CHUNK`]).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn kp(&self) -> usize {
        self.kp
    }

    /// Rows `i0..` as one slice (row stride [`PackedX::kp`]).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) fn rows_from(&self, i0: usize) -> &[bf16] {
        &self.data[i0 * self.kp..]
    }

    /// Row `i`, `kp` elements.
    pub(crate) fn row(&self, i: usize) -> &[bf16] {
        &self.data[i * self.kp..(i + 1) * self.kp]
    }
}

/// `half::bf16::from_f32` (round to nearest even; a NaN keeps its sign and top payload bits and
/// is quietened), written without branches so that the packing loop vectorizes.
#[inline]
pub(crate) fn round_bf16(v: f32) -> bf16 {
    let x = v.to_bits();
    // Adding 0x7FFF plus the kept lsb carries into the kept bits exactly when the dropped half
    // is above a tie, or a tie with an odd lsb; the largest finite values round to infinity.
    let rne = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
    let nan = (x >> 16) | 0x0040;
    let is_nan = x & 0x7FFF_FFFF > 0x7F80_0000;
    bf16::from_bits((if is_nan { nan } else { rne }) as u16)
}

/// Which kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// The scalar twin (the definition; runs everywhere, slowly).
    Scalar,
    /// AVX-512 F/BW/VL + BF16: `vdpbf16ps`, 16 f32 lanes.
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
}

/// Every kernel this build knows, best first.
const ALL_KERNELS: &[Kernel] = &[
    #[cfg(target_arch = "x86_64")]
    Kernel::Avx512Bf16,
    Kernel::Scalar,
];

impl Kernel {
    /// Whether this CPU can run the kernel.
    pub(crate) fn supported(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Bf16 => {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512bf16")
            }
        }
    }
}

/// The best kernel this CPU runs, detected once.
fn kernel() -> Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        ALL_KERNELS
            .iter()
            .copied()
            .find(|k| k.supported())
            .unwrap_or(Kernel::Scalar)
    })
}

/// Kernels this CPU can run, best first (tests force each one).
#[cfg(test)]
pub(crate) fn supported_kernels() -> Vec<Kernel> {
    ALL_KERNELS
        .iter()
        .copied()
        .filter(|k| k.supported())
        .collect()
}

/// Whether this CPU has AVX512_BF16 (with AVX-512 F/BW/VL), i.e. whether [`matmul_bf16`] runs
/// its fast kernel. Elsewhere the functions still work (they run the scalar twin, with the same
/// bits, far slower than the f32 [`crate::matmul`]), so callers should take the f32 path then.
pub fn bf16_activations_supported() -> bool {
    kernel() != Kernel::Scalar
}

/// `out[m, n] = bf16(x)[m, k] · w[n, k]ᵀ`: x rounded to bf16 once, `vdpbf16ps` dot products in
/// the order of the module doc, f32 results (overwrites `out`). Single-threaded. Any `k` (a
/// ragged tail is zero padded), any `m`, any `n`. Panics unless `x.len() == m·k`,
/// `w.len() == n·k` and `out.len() == m·n`.
pub fn matmul_bf16(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize, out: &mut [f32]) {
    matmul_bf16_with(kernel(), false, x, m, k, w, n, out)
}

/// [`matmul_bf16`] with the output columns (weight rows) split over the current rayon pool when
/// the call is large enough (output rows when `n` is too narrow); equals [`matmul_bf16`] bit
/// for bit.
pub fn matmul_bf16_par(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize, out: &mut [f32]) {
    matmul_bf16_with(kernel(), true, x, m, k, w, n, out)
}

/// [`matmul_bf16`] / [`matmul_bf16_par`] with a forced kernel (tests force each one).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_bf16_with(
    kern: Kernel,
    parallel: bool,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    out: &mut [f32],
) {
    crate::check_matmul_shapes(
        "matmul_bf16",
        x.len(),
        m,
        k,
        &Weights::Bf16(w),
        n,
        out.len(),
    );
    assert!(
        kern.supported(),
        "bf16-activation kernel {kern:?} not supported on this CPU"
    );
    if k == 0 {
        out.fill(0.0);
        return;
    }
    if m == 0 || n == 0 {
        return;
    }
    let xb = PackedX::new(x, m, k);
    let block = OutBlock::new(out, m, n);
    let work = m.saturating_mul(n).saturating_mul(k);
    let xb = &xb;
    crate::run_split(parallel, work, block, true, |i0, j0, out| {
        let j1 = j0 + out.cols();
        run_block(kern, xb, i0, k, &w[j0 * k..j1 * k], out)
    });
}

/// Computes one output block: `out[rows, cols]` from x rows `i0..i0 + rows` and the `cols`
/// weight rows in `w`.
fn run_block(kern: Kernel, xb: &PackedX, i0: usize, k: usize, w: &[bf16], mut out: OutBlock) {
    assert!(i0 + out.rows() <= xb.rows() && w.len() == out.cols() * k);
    match kern {
        Kernel::Scalar => {
            for r in 0..out.rows() {
                let xr = xb.row(i0 + r);
                let dst = out.row(r);
                for (j, o) in dst.iter_mut().enumerate() {
                    *o = dot_scalar(xr, &w[j * k..(j + 1) * k]);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 => {
            // SAFETY: matmul_bf16_with asserted Kernel::Avx512Bf16.supported()
            // (avx512f/bw/vl/bf16).
            unsafe { crate::bf16dot_x86::matmul_block(xb, i0, k, w, &mut out) }
        }
    }
}

/// Reads a denormal as zero of the same sign (DAZ).
#[inline]
fn daz(v: f32) -> f32 {
    if v.is_subnormal() {
        0f32.copysign(v)
    } else {
        v
    }
}

/// One `vdpbf16ps` lane step: `ftz(fma(daz(u), daz(v), daz(acc)))` (FTZ is the same function).
#[inline]
pub(crate) fn dp_step(acc: f32, u: bf16, v: bf16) -> f32 {
    daz(daz(u.to_f32()).mul_add(daz(v.to_f32()), daz(acc)))
}

/// The fixed reduction of the 16 lanes (see the module doc).
#[inline]
pub(crate) fn hsum16(a: &[f32; 16]) -> f32 {
    let s8: [f32; 8] = std::array::from_fn(|i| a[i] + a[i + 8]);
    let s4: [f32; 4] = std::array::from_fn(|i| s8[i] + s8[i + 4]);
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    s2[0] + s2[1]
}

/// The scalar twin: one output element, `x` a [`PackedX`] row (`kp` elements, zero padded),
/// `w` one weight row of `k <= kp` elements, `kp - k < 32`. Defines the results (module doc).
pub(crate) fn dot_scalar(x: &[bf16], w: &[bf16]) -> f32 {
    let kp = x.len();
    assert!(kp.is_multiple_of(CHUNK) && w.len() <= kp && kp - w.len() < CHUNK);
    let wat = |p: usize| w.get(p).copied().unwrap_or(bf16::ZERO);
    let mut lanes = [0f32; 16];
    for c in (0..kp).step_by(CHUNK) {
        for (l, a) in lanes.iter_mut().enumerate() {
            let p = c + 2 * l;
            *a = dp_step(*a, x[p + 1], wat(p + 1));
            *a = dp_step(*a, x[p], wat(p));
        }
    }
    hsum16(&lanes)
}
