//! GLM-4.5 / GLM-4.5-Air (`Glm4MoeForCausalLM`): GQA attention with q/k/v biases (never an o
//! bias), optional per-head q/k RMSNorm (`use_qk_norm`), partial rotary (half the head by
//! default); the first `first_k_dense_replace` layers dense, the rest sparse with an ungated
//! shared expert (`n_shared_experts` times the expert width) and a sigmoid router: scores plus
//! `e_score_correction_bias` choose (group-limited by `n_group` / `topk_group`), the unbiased
//! scores weigh, renormalised when `norm_topk_prob`, times `routed_scaling_factor`.
//!
//! The release's multi-token-prediction layer (`model.layers.{num_hidden_layers}.*`) is not used.

use super::{head_dim, Arch, GroupDefaults, NameScheme};
use crate::config::{CommonDefaults, ModelConfig, QkNorm, RawConfig, RopeConfig};
use crate::error::Result;

pub static ARCH: Arch = Arch {
    model_type: "glm4_moe",
    hf_classes: &["Glm4MoeForCausalLM"],
    parse_config,
    names: &NAMES,
};

static NAMES: NameScheme = NameScheme {
    shared_expert: Some(("shared_experts", None)),
    ..NameScheme::HF_STANDARD
};

/// `Glm4MoeConfig`'s defaults.
const DEFAULTS: CommonDefaults = CommonDefaults {
    num_heads: Some(96),
    num_kv_heads: Some(8),
    head_dim,
    vocab_size: Some(151552),
    max_position_embeddings: 131072,
    rms_norm_eps: 1e-5,
    rope_theta: 10000.0,
    attention_bias: Some(false),
    num_experts_keys: &["n_routed_experts", "num_local_experts"],
    num_experts: 128,
    top_k: 8,
    norm_topk_prob: Some(true),
};

/// `Glm4MoeConfig`'s router defaults: one group, no scaling.
const ROUTER_DEFAULTS: GroupDefaults = GroupDefaults {
    n_group: 1,
    topk_group: 1,
    routed_scaling_factor: 1.0,
};

/// `partial_rotary_factor` when the config gives none (the class sets it for compatibility).
const PARTIAL_ROTARY_FACTOR: f64 = 0.5;

fn parse_config(raw: &RawConfig) -> Result<ModelConfig> {
    let base = ModelConfig::common(raw, ARCH.model_type, &DEFAULTS)?;
    let experts = base.router.num_experts;
    let moe_width = raw.usize_or(&["moe_intermediate_size"], 1408)?;
    let first_dense = raw.usize_or(&["first_k_dense_replace"], 1)?;
    let shared = raw.usize_or(&["n_shared_experts"], 1)?;
    Ok(ModelConfig {
        intermediate_size: raw.usize_or(&["intermediate_size"], 10944)?,
        moe_intermediate_size: moe_width,
        rope: RopeConfig::parse_with(raw, DEFAULTS.rope_theta, PARTIAL_ROTARY_FACTOR)?,
        sparse_layers: (0..base.num_layers)
            .map(|l| l >= first_dense && experts > 0)
            .collect(),
        shared_expert_intermediate_size: moe_width * shared,
        o_bias: false,
        qk_norm: if raw.bool_or(&["use_qk_norm"], false)? {
            QkNorm::PerHead
        } else {
            QkNorm::None
        },
        router: super::biased_sigmoid_router(raw, base.router, ROUTER_DEFAULTS)?,
        ..base
    })
}
