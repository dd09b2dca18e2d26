//! Multi-head latent attention (DeepSeek-V2 / V3, Kimi-K2), computed in its absorbed form over
//! a latent KV cache.
//!
//! transformers expands the cached latent `c` into per-head keys and values with `kv_b_proj`
//! (`k_nope_h = W_UK_h · c`, `v_h = W_UV_h · c`) at every step. Here the expansion is folded
//! into the query and the output instead: `q_nope_h · (W_UK_h · c) = (W_UK_hᵀ · q_nope_h) · c`
//! and `Σ p · v_h = W_UV_h · (Σ p · c)`. Attention is then multi-query attention with one key
//! head `[c | k_pe]` (`kv_lora_rank + qk_rope_head_dim` wide) whose values are its leading
//! `kv_lora_rank` values, and the cache keeps just that row per token.
//!
//! Invariants: the KV cache holds one row of [`MlaConfig::cached_values`] values per token and
//! nothing else; `kv_b_proj` is read only as per-head row blocks ([`Backend::head_matmul`]), in
//! whatever type it is held; scores are scaled by [`MlaConfig::softmax_scale`] (YaRN's mscale
//! included); q and the shared key rotate over their rope part only, in the checkpoint's pair
//! order (`rope_interleave`).

use crate::backend::{AttnShape, Backend, HeadBlocks, Host};
use crate::config::{MlaConfig, ModelConfig};
use crate::error::Result;
use crate::layers::{Linear, RmsNorm, Rope};
use crate::weights::WeightSet;

/// `q_a_layernorm` and `kv_a_layernorm` are built with the norm class's default epsilon, not
/// the config's `rms_norm_eps` (transformers and the reference code alike).
const LATENT_NORM_EPS: f64 = 1e-6;

/// How queries are projected.
pub enum QueryProj<B: Backend = Host> {
    /// One `q_proj` (`q_lora_rank` null).
    Direct(Linear<B>),
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
    Latent {
        down: Linear<B>,
        norm: RmsNorm<B>,
        up: Linear<B>,
    },
}

/// One multi-head latent attention layer.
pub struct LatentAttention<B: Backend = Host> {
    pub q: QueryProj<B>,
    /// `kv_a_proj_with_mqa`: the latent, then the shared rope key.
    pub kv_a: Linear<B>,
    /// `kv_a_layernorm` over the latent.
    pub kv_norm: RmsNorm<B>,
    /// `kv_b_proj`: per head, `qk_nope_head_dim` key rows then `v_head_dim` value rows over the
    /// latent.
    pub kv_b: Linear<B>,
    pub o_proj: Linear<B>,
    pub dims: MlaConfig,
    pub num_heads: usize,
    /// Over `qk_rope_head_dim` values, in the checkpoint's pair order.
    pub rope: Rope,
}

impl LatentAttention<Host> {
    /// Loads the attention module `prefix` (`model.layers.{l}.self_attn`).
    pub fn load(cfg: &ModelConfig, dims: MlaConfig, w: &WeightSet, prefix: &str) -> Result<Self> {
        let (h, nh) = (cfg.hidden_size, cfg.num_heads);
        let bias = cfg.qkv_bias;
        let qk = dims.qk_nope_head_dim + dims.qk_rope_head_dim;
        let q = match dims.q_lora_rank {
            None => QueryProj::Direct(Linear::load(
                w,
                &format!("{prefix}.q_proj"),
                h,
                nh * qk,
                false,
            )?),
            Some(rank) => QueryProj::Latent {
                down: Linear::load(w, &format!("{prefix}.q_a_proj"), h, rank, bias)?,
                norm: RmsNorm::load(
                    w,
                    &format!("{prefix}.q_a_layernorm.weight"),
                    rank,
                    LATENT_NORM_EPS,
                )?,
                up: Linear::load(w, &format!("{prefix}.q_b_proj"), rank, nh * qk, false)?,
            },
        };
        let latent = dims.kv_lora_rank;
        let mut rope = Rope::new(&cfg.rope, dims.qk_rope_head_dim);
        rope.interleaved = dims.rope_interleave;
        Ok(LatentAttention {
            q,
            kv_a: Linear::load(
                w,
                &format!("{prefix}.kv_a_proj_with_mqa"),
                h,
                dims.cached_values(),
                bias,
            )?,
            kv_norm: RmsNorm::load(
                w,
                &format!("{prefix}.kv_a_layernorm.weight"),
                latent,
                LATENT_NORM_EPS,
            )?,
            kv_b: Linear::load(
                w,
                &format!("{prefix}.kv_b_proj"),
                latent,
                nh * (dims.qk_nope_head_dim + dims.v_head_dim),
                false,
            )?,
            o_proj: Linear::load(
                w,
                &format!("{prefix}.o_proj"),
                nh * dims.v_head_dim,
                h,
                bias,
            )?,
            dims,
            num_heads: nh,
            rope,
        })
    }

    /// The same layer on backend `b`.
    pub fn upload<B: Backend>(self, b: &B) -> Result<LatentAttention<B>> {
        Ok(LatentAttention {
            q: match self.q {
                QueryProj::Direct(p) => QueryProj::Direct(p.upload(b)?),
                QueryProj::Latent { down, norm, up } => QueryProj::Latent {
                    down: down.upload(b)?,
                    norm: norm.upload(b)?,
                    up: up.upload(b)?,
                },
            },
            kv_a: self.kv_a.upload(b)?,
            kv_norm: self.kv_norm.upload(b)?,
            kv_b: self.kv_b.upload(b)?,
            o_proj: self.o_proj.upload(b)?,
            dims: self.dims,
            num_heads: self.num_heads,
            rope: self.rope,
        })
    }

    /// Every projection, in model order (for the quantizer and the cache).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out: Vec<&mut Linear> = match &mut self.q {
            QueryProj::Direct(p) => vec![p],
            QueryProj::Latent { down, up, .. } => vec![down, up],
        };
        out.extend([&mut self.kv_a, &mut self.kv_b, &mut self.o_proj]);
        out
    }
}

impl<B: Backend> LatentAttention<B> {
    /// Values per position in the KV cache.
    pub fn kv_row(&self) -> usize {
        self.dims.cached_values()
    }

    /// Several sequences at once, as [`crate::layers::Attention::forward_batch`]: `x` holds
    /// `lens[s]` rows of sequence `s` after those of the sequences before it, each continuing
    /// its own latent cache `caches[s]`.
    pub fn forward_batch(
        &self,
        b: &B,
        x: &B::Act,
        lens: &[usize],
        caches: &mut [&mut B::Kv],
    ) -> B::Act {
        debug_assert_eq!(lens.len(), caches.len());
        let d = self.dims;
        let (nope, rope_dim, latent) = (d.qk_nope_head_dim, d.qk_rope_head_dim, d.kv_lora_rank);
        let t: usize = lens.iter().sum();
        let q = match &self.q {
            QueryProj::Direct(p) => p.forward(b, x, t),
            QueryProj::Latent { down, norm, up } => {
                let mut qa = down.forward(b, x, t);
                norm.forward_inplace(b, &mut qa);
                up.forward(b, &qa, t)
            }
        };
        let (q_nope, mut q_pe) = b.split_heads(&q, nope, rope_dim);
        let compressed = self.kv_a.forward(b, x, t);
        let (mut c, mut k_pe) = b.split_heads(&compressed, latent, rope_dim);
        self.kv_norm.forward_inplace(b, &mut c);
        let mut positions = Vec::with_capacity(t);
        for (&n, cache) in lens.iter().zip(caches.iter()) {
            let len = b.kv_len(cache);
            positions.extend(len..len + n);
        }
        b.rope(&mut q_pe, &mut k_pe, rope_dim, &positions, &self.rope);
        // Per head, kv_b_proj's rows are `nope` key rows then `v_head_dim` value rows.
        let block = |offset, len| HeadBlocks {
            heads: self.num_heads,
            stride: nope + d.v_head_dim,
            offset,
            len,
            cols: latent,
        };
        // The query in latent space: W_UKᵀ · q_nope per head.
        let q_latent = b.head_matmul(&q_nope, t, &self.kv_b.weight, &block(0, nope), true);
        let query = b.join_heads(&q_latent, &q_pe, latent, rope_dim);
        let key = b.join_heads(&c, &k_pe, latent, rope_dim);
        let shape = AttnShape {
            num_heads: self.num_heads,
            num_kv_heads: 1,
            head_dim: latent + rope_dim,
            value_dim: latent,
            scale: d.softmax_scale,
            sliding_window: None,
        };
        let mixed = b.attend(&query, &key, None, lens, caches, &shape, None);
        // Back from latent space: W_UV · (Σ p · c) per head.
        let values = b.head_matmul(
            &mixed,
            t,
            &self.kv_b.weight,
            &block(nope, d.v_head_dim),
            false,
        );
        self.o_proj.forward(b, &values, t)
    }
}
