//! Gated DeltaNet linear attention (Qwen3-Next's linear-attention layers): the layer
//! ([`GatedDeltaNet`]) with its weights and shape. The short causal convolution and the gated
//! delta rule (recurrent for decode, chunked for prefill) are the backend's `delta_net` op
//! (`backend/cpu/deltanet.rs` on the CPU).
//!
//! Invariants: a sequence's whole past is one fixed-size recurrent state (the backend's
//! `Recurrent`), so unlike a KV cache it cannot be cut back to an earlier length: callers
//! snapshot it where they may need to roll back; the projections run over all rows of a batch
//! together, the recurrence per sequence.

use crate::backend::{Backend, DeltaNetParams, Host};
use crate::config::LinearAttentionConfig;
use crate::error::Result;
use crate::layers::{Linear, RmsNorm};
use crate::weights::WeightSet;

/// Qwen3-Next's gated DeltaNet layer: `in_proj_qkvz` and `in_proj_ba` over the input, a causal
/// depthwise convolution with SiLU over q, k, v, l2-normalised q and k, the gated delta rule per
/// value head (value heads are grouped over key heads), an RMSNorm of each head's output gated
/// by `silu(z)`, then `out_proj`.
pub struct GatedDeltaNet<B: Backend = Host> {
    /// `[nk * (2 dk + 2 (nv / nk) dv), hidden]`: per key head, its q, k, then the v and z of
    /// its value heads (the checkpoint's interleaved order).
    pub in_proj_qkvz: Linear<B>,
    /// `[nk * 2 (nv / nk), hidden]`: per key head, the b then the a of its value heads.
    pub in_proj_ba: Linear<B>,
    /// `[conv_dim, kernel]` over the channels `q (nk dk) | k (nk dk) | v (nv dv)`.
    pub conv_weight: B::Vector,
    /// `-exp(A_log)` per value head.
    pub neg_a: B::Vector,
    pub dt_bias: B::Vector,
    /// Over each head's `dv` outputs; its weight is used as stored (not zero-centred).
    pub norm: RmsNorm<B>,
    pub out_proj: Linear<B>,
    pub dims: LinearAttentionConfig,
}

impl GatedDeltaNet<Host> {
    /// Loads the layer under `prefix` (`model.layers.{l}.linear_attn`).
    pub fn load(
        w: &WeightSet,
        prefix: &str,
        hidden: usize,
        dims: LinearAttentionConfig,
        eps: f64,
    ) -> Result<GatedDeltaNet> {
        let LinearAttentionConfig {
            num_key_heads: nk,
            num_value_heads: nv,
            key_head_dim: dk,
            value_head_dim: dv,
            conv_kernel: kernel,
        } = dims;
        let conv_dim = dims.conv_dim();
        let a_log = w.compute(&format!("{prefix}.A_log"), &[nv])?.to_f32_vec()?;
        Ok(GatedDeltaNet {
            in_proj_qkvz: Linear::load(
                w,
                &format!("{prefix}.in_proj_qkvz"),
                hidden,
                2 * nk * dk + 2 * nv * dv,
                false,
            )?,
            in_proj_ba: Linear::load(w, &format!("{prefix}.in_proj_ba"), hidden, 2 * nv, false)?,
            conv_weight: w
                .compute(&format!("{prefix}.conv1d.weight"), &[conv_dim, 1, kernel])?
                .to_f32_vec()?,
            neg_a: a_log.iter().map(|a| -a.exp()).collect(),
            dt_bias: w
                .compute(&format!("{prefix}.dt_bias"), &[nv])?
                .to_f32_vec()?,
            norm: RmsNorm::load(w, &format!("{prefix}.norm.weight"), dv, eps)?,
            out_proj: Linear::load(w, &format!("{prefix}.out_proj"), nv * dv, hidden, false)?,
            dims,
        })
    }

    /// The same layer on backend `b`.
    pub fn upload<B: Backend>(self, b: &B) -> Result<GatedDeltaNet<B>> {
        Ok(GatedDeltaNet {
            in_proj_qkvz: self.in_proj_qkvz.upload(b)?,
            in_proj_ba: self.in_proj_ba.upload(b)?,
            conv_weight: b.upload_vector(self.conv_weight)?,
            neg_a: b.upload_vector(self.neg_a)?,
            dt_bias: b.upload_vector(self.dt_bias)?,
            norm: self.norm.upload(b)?,
            out_proj: self.out_proj.upload(b)?,
            dims: self.dims,
        })
    }
}

impl<B: Backend> GatedDeltaNet<B> {
    /// A fresh (all-zero) state for one sequence.
    pub fn new_state(&self, b: &B) -> B::Recurrent {
        let d = self.dims;
        b.recurrent_new(
            (d.conv_kernel - 1) * d.conv_dim(),
            d.num_value_heads * d.key_head_dim * d.value_head_dim,
        )
    }

    /// Several sequences at once, like [`crate::layers::Attention::forward_batch`]: `x` holds
    /// `lens[s]` rows of sequence `s` after those before it, each continuing `states[s]`. The
    /// projections run over all rows together; the convolution and the recurrence per sequence
    /// (a single new token takes the recurrent form, more take the chunked one).
    pub fn forward_batch(
        &self,
        b: &B,
        x: &B::Act,
        lens: &[usize],
        states: &mut [&mut B::Recurrent],
    ) -> B::Act {
        let t: usize = lens.iter().sum();
        let qkvz = self.in_proj_qkvz.forward(b, x, t);
        let ba = self.in_proj_ba.forward(b, x, t);
        let p = DeltaNetParams {
            dims: self.dims,
            conv_weight: &self.conv_weight,
            neg_a: &self.neg_a,
            dt_bias: &self.dt_bias,
            norm: &self.norm.weight,
            norm_eps: self.norm.eps,
        };
        let core = b.delta_net(&qkvz, &ba, &p, lens, states);
        self.out_proj.forward(b, &core, t)
    }
}
