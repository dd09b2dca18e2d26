//! Scalar reference twins of the SIMD kernels (also the fallback on CPUs without AVX2 and on
//! non-x86_64 targets). Plain Rust, no `unsafe`.
//!
//! Summation order of every dot product here: 8 running sums, element `p` goes to sum `p % 8`
//! in increasing `p`, then `((s0+s4)+(s1+s5)) + ((s2+s6)+(s3+s7))`. The independent sums let the
//! compiler vectorise the fallback without reassociating anything.

use crate::{check_matmul, quant, Elem, Level, OutBlock, Weights};

/// Running sums per dot product (see the module doc).
const LANES: usize = 8;

/// Dot product of `x` and a stored weight row, in the order described in the module doc.
#[inline]
pub(crate) fn dot_row<T: Elem>(x: &[f32], w: &[T]) -> f32 {
    assert_eq!(x.len(), w.len());
    let mut acc = [0f32; LANES];
    let xc = x.chunks_exact(LANES);
    let wc = w.chunks_exact(LANES);
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (a, b) in xc.zip(wc) {
        for l in 0..LANES {
            acc[l] += a[l] * b[l].widen();
        }
    }
    for (l, (a, b)) in xr.iter().zip(wr).enumerate() {
        acc[l] += a * b.widen();
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// out[m, n] = x[m, k] · w[n, k]ᵀ, f32 accumulation, overwrites `out` (single-threaded).
/// Panics if slice lengths do not match m*k, n*k, m*n.
pub fn matmul(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, out: &mut [f32]) {
    check_matmul(x, m, k, &w, n, out);
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let mut block = OutBlock::new(out, m, n);
    match w {
        Weights::F32(w) => matmul_block(x, k, w, &mut block),
        Weights::Bf16(w) => matmul_block(x, k, w, &mut block),
        Weights::F16(w) => matmul_block(x, k, w, &mut block),
        // One weight row at a time: dequantized (scalar), then `matmul_block` on it.
        Weights::Q8_0(_)
        | Weights::Q4K(_)
        | Weights::F8(_)
        | Weights::Nf4(_)
        | Weights::Fp4(_)
        | Weights::Rounded4(_)
        | Weights::Mxfp4(_) => {
            let q = w.quantized().expect("quantized variant");
            quant::run_block(Level::Scalar, false, x, k, q, block)
        }
    }
}

/// `out[rows, cols] = x[rows, k] · w[cols, k]ᵀ`; `k > 0`.
pub(crate) fn matmul_block<T: Elem>(x: &[f32], k: usize, w: &[T], out: &mut OutBlock) {
    assert_eq!(x.len(), out.rows() * k);
    assert_eq!(w.len(), out.cols() * k);
    // Weight row outermost: each row is read from memory once and reused for all x rows.
    for (j, wr) in w.chunks_exact(k).enumerate() {
        for (i, xr) in x.chunks_exact(k).enumerate() {
            out.row(i)[j] = dot_row(xr, wr);
        }
    }
}

/// Dot product of two f32 slices of equal length (f32 accumulation). Panics if lengths differ.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    dot_row(a, b)
}

/// `out[i] += alpha * x[i]` (one multiply and one add, each rounded). Panics if lengths differ.
pub fn axpy(alpha: f32, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "axpy: lengths differ");
    for (o, &v) in out.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

/// `out[i][..d] = Σ_j p[i][j] · v[j·ldv ..][..d]`: one fused multiply-add per `j`, in
/// increasing `j`, from 0 (the order every level keeps).
pub(crate) fn weighted_sum_strided(
    p: &[f32],
    n: usize,
    v: &[f32],
    ldv: usize,
    d: usize,
    out: &mut [f32],
) {
    for (pr, or) in p.chunks_exact(n.max(1)).zip(out.chunks_exact_mut(d.max(1))) {
        or.fill(0.0);
        for (j, &pj) in pr.iter().enumerate().take(n) {
            for (o, &x) in or.iter_mut().zip(&v[j * ldv..j * ldv + d]) {
                *o = pj.mul_add(x, *o);
            }
        }
    }
}
