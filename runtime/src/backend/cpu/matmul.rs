//! Matrix products on the CPU under an `activations` setting ([`Input`]).
//!
//! Invariants: every product goes through `moe_kernels`; `parallel` and serial give the same
//! result bit for bit; a weight the setting does not cover takes the exact f32 kernels.

use moe_kernels::Weights;

use crate::backend::Activations;

/// Rows of f32 activations on their way into one or more matmuls, under an `activations`
/// setting: `F32` always takes the exact f32 kernels; `Auto` is `Q8` for q8_0 / q4_k weights
/// and `Bf16` for bf16 weights; `Q8` quantizes the rows once (shared by
/// every q8_0 / q4_k weight they meet) for the integer-dot kernels, decode and prefill alike;
/// `Bf16` rounds them to bf16
/// for `vdpbf16ps` against bf16 weights where the CPU has it. Weights a setting does not cover
/// (and CPUs without the instructions) fall back to the f32 kernels.
pub struct Input<'a> {
    x: &'a [f32],
    m: usize,
    k: usize,
    act: Activations,
    q8: Option<moe_kernels::Q8Activations>,
}

impl<'a> Input<'a> {
    /// `x` is `[m, k]`; `ws` are the weights it will meet (to decide whether to quantize it).
    pub fn new(x: &'a [f32], m: usize, k: usize, act: Activations, ws: &[Weights<'_>]) -> Self {
        // Prefill batches take the integer kernels too: their row groups sweep each weight
        // chunk while it sits in L2, and unpacking q4_k / q8_0 blocks to f32 for the GEMM costs
        // more than the integer dots (bm3g, 2 threads: q4_k prefill +30% at 128 tokens, +17% at
        // 512; q8_0 +12% / +6%).
        let q8 = (act.integer() && ws.iter().any(moe_kernels::q8_activations_supported))
            .then(|| moe_kernels::Q8Activations::for_weights(x, m, k, ws));
        Input { x, m, k, act, q8 }
    }

    /// `out[m, n] = x · wᵀ` by the kernel the setting picks for `w`; `parallel` splits it over
    /// the current rayon pool (same result bit for bit either way).
    pub fn matmul(&self, w: Weights<'_>, n: usize, out: &mut [f32], parallel: bool) {
        let (x, m, k) = (self.x, self.m, self.k);
        match (self.act, w, &self.q8) {
            (_, _, Some(xq)) if xq.serves(&w) => {
                if parallel {
                    moe_kernels::matmul_q8_par(xq, w, n, out)
                } else {
                    moe_kernels::matmul_q8(xq, w, n, out)
                }
            }
            (act, Weights::Bf16(wb), _)
                if act.bf16() && moe_kernels::bf16_activations_supported() =>
            {
                if parallel {
                    moe_kernels::matmul_bf16_par(x, m, k, wb, n, out)
                } else {
                    moe_kernels::matmul_bf16(x, m, k, wb, n, out)
                }
            }
            _ if parallel => moe_kernels::matmul(x, m, k, w, n, out),
            _ => moe_kernels::matmul_serial(x, m, k, w, n, out),
        }
    }
}

/// Whether `act` takes a lower-precision kernel for weights of type `dtype` on this CPU.
pub fn activation_path_covers(act: Activations, dtype: crate::weights::Dtype) -> bool {
    use crate::weights::Dtype;
    (act.integer() && matches!(dtype, Dtype::Q8_0 | Dtype::Q4K))
        || (act.bf16() && dtype == Dtype::Bf16 && moe_kernels::bf16_activations_supported())
}

/// Whether this CPU has the bf16 dot-product instructions `activations = "bf16"` uses.
pub fn bf16_activations_supported() -> bool {
    moe_kernels::bf16_activations_supported()
}
