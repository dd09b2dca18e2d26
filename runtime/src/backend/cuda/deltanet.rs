//! The gated DeltaNet on the device ([`Cuda::delta_net_seq`]): the input split, per sequence the
//! convolution and the delta rule over its new tokens one after another (the recurrent form) on
//! its state in VRAM, the q/k normalisation, the per-head norm and the output gate. For one
//! token per sequence (decode) that is the CPU's computation exactly; for a long prefill chunk
//! it is within rounding of the CPU's chunked form.
//!
//! Invariants: every kernel's twin is the CPU code the CPU backend runs for a one-token step
//! (`cpu::deltanet::{split_inputs, causal_conv1d_silu, normalize_qk, recurrent, mul_silu}`),
//! so the step equals the CPU's bit for bit on the mock device; a sequence's state buffers are
//! read and written by its own launches only.

use super::{col_blocks, stride_blocks, u32_of, Cuda, DevBuf, DevRecurrent, KArg};
use crate::backend::{Backend, DeltaNetParams};

/// Longest convolution the DeltaNet kernel keeps in registers (`CONV_MAX_KERNEL`).
pub(super) const CONV_MAX_KERNEL: usize = 8;
/// Tokens of one sequence from which a DeltaNet prefill chunk runs the recurrent form on the
/// device instead of the CPU's chunked form over a host copy of the state (moving the state
/// costs more than computing it there past a few dozen tokens).
pub(super) const DEVICE_PREFILL_MIN_TOKENS: usize = 64;

/// Largest key head the q/k normalisation kernel takes (one block of threads per head).
pub(super) const L2NORM_MAX_HEAD_DIM: usize = 256;

impl Cuda {
    /// The new tokens of every sequence (one each, or at least [`DEVICE_PREFILL_MIN_TOKENS`]),
    /// each sequence's convolution and delta rule over its tokens in order by one launch.
    pub(super) fn delta_net_seq(
        &self,
        qkvz: &DevBuf,
        ba: &DevBuf,
        p: &DeltaNetParams<'_, Cuda>,
        lens: &[usize],
        states: &mut [&mut DevRecurrent],
    ) -> DevBuf {
        let d = p.dims;
        let (nk, nv, dk, dv) = heads(&d);
        let (conv_dim, value_dim) = (d.conv_dim(), nv * dv);
        let t: usize = lens.iter().sum();
        let (mixed, z, beta, g) = self.delta_inputs(qkvz, ba, p, t);
        let conv = self.f32_buf(t * conv_dim);
        let mut row0 = 0;
        for (&n, st) in lens.iter().zip(states.iter()) {
            self.launch(
                "conv1d_silu_seq_f32",
                [col_blocks(conv_dim), 1, 1],
                &[
                    KArg::Ptr(mixed.at(row0 * conv_dim * 4)),
                    p.conv_weight.buf.arg(),
                    st.conv.arg(),
                    KArg::U32(u32_of(n)),
                    KArg::U32(u32_of(conv_dim)),
                    KArg::U32(u32_of(d.conv_kernel)),
                    KArg::Ptr(conv.at(row0 * conv_dim * 4)),
                ],
            );
            row0 += n;
        }
        self.delta_normalize(&conv, p, t);
        let mut core = self.f32_buf(t * value_dim);
        let mut row0 = 0;
        for (&n, st) in lens.iter().zip(states.iter()) {
            self.launch(
                "gated_delta_seq_f32",
                [col_blocks(value_dim), 1, 1],
                &[
                    KArg::Ptr(conv.at(row0 * conv_dim * 4)),
                    KArg::U32(u32_of(conv_dim)),
                    KArg::Ptr(g.at(row0 * nv * 4)),
                    KArg::Ptr(beta.at(row0 * nv * 4)),
                    st.ssm.arg(),
                    KArg::U32(u32_of(n)),
                    KArg::U32(u32_of(nk)),
                    KArg::U32(u32_of(nv)),
                    KArg::U32(u32_of(dk)),
                    KArg::U32(u32_of(dv)),
                    KArg::Ptr(core.at(row0 * value_dim * 4)),
                ],
            );
            row0 += n;
        }
        self.delta_gate(&mut core, &z, p);
        core
    }
}

impl Cuda {
    /// The input split for `t` rows: (mixed, z, beta, g).
    fn delta_inputs(
        &self,
        qkvz: &DevBuf,
        ba: &DevBuf,
        p: &DeltaNetParams<'_, Cuda>,
        t: usize,
    ) -> (DevBuf, DevBuf, DevBuf, DevBuf) {
        let d = p.dims;
        let (nk, nv, dk, dv) = heads(&d);
        let (conv_dim, value_dim) = (d.conv_dim(), nv * dv);
        let per_row = nk * (2 * dk + 2 * (nv / nk) * dv);
        let (mixed, z) = (self.f32_buf(t * conv_dim), self.f32_buf(t * value_dim));
        let (beta, g) = (self.f32_buf(t * nv), self.f32_buf(t * nv));
        self.launch(
            "deltanet_split_f32",
            [u32_of(t), col_blocks(per_row.max(nv)), 1],
            &[
                qkvz.arg(),
                ba.arg(),
                p.neg_a.buf.arg(),
                p.dt_bias.buf.arg(),
                KArg::U32(u32_of(t)),
                KArg::U32(u32_of(nk)),
                KArg::U32(u32_of(nv)),
                KArg::U32(u32_of(dk)),
                KArg::U32(u32_of(dv)),
                mixed.arg(),
                z.arg(),
                beta.arg(),
                g.arg(),
            ],
        );
        (mixed, z, beta, g)
    }

    /// The q/k normalisation of the convolution's `t` output rows.
    fn delta_normalize(&self, conv: &DevBuf, p: &DeltaNetParams<'_, Cuda>, t: usize) {
        let d = p.dims;
        let (nk, dk) = (d.num_key_heads, d.key_head_dim);
        self.launch(
            "l2norm_heads_f32",
            [u32_of(t), u32_of(2 * nk), 1],
            &[
                conv.arg(),
                KArg::U32(u32_of(t)),
                KArg::U32(u32_of(d.conv_dim())),
                KArg::U32(u32_of(nk)),
                KArg::U32(u32_of(dk)),
                KArg::F32((dk as f32).powf(-0.5)),
            ],
        );
    }

    /// The per-head norm of the core output, then its gate by `z`.
    fn delta_gate(&self, core: &mut DevBuf, z: &DevBuf, p: &DeltaNetParams<'_, Cuda>) {
        self.rms_norm(core, p.norm, p.dims.value_head_dim, p.norm_eps);
        let total = Self::n_f32(core);
        self.launch(
            "mul_silu_f32",
            [stride_blocks(total), 1, 1],
            &[core.arg(), z.arg(), KArg::U32(u32_of(total))],
        );
    }
}

/// Key heads, value heads, key head width, value head width.
fn heads(d: &crate::config::LinearAttentionConfig) -> (usize, usize, usize, usize) {
    (
        d.num_key_heads,
        d.num_value_heads,
        d.key_head_dim,
        d.value_head_dim,
    )
}
