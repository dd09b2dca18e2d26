//! Mixtral (`MixtralForCausalLM`): GQA attention with optional sliding window, and a sparse MoE
//! block in every layer whose top-k softmax weights are always renormalised.
//!
//! Hub checkpoints name the block `block_sparse_moe` with experts `w1` (gate), `w3` (up) and
//! `w2` (down); transformers 5 names it `mlp` with fused `gate_up_proj` / `down_proj`.

use super::{head_dim, Arch, NameScheme};
use crate::config::{CommonDefaults, ModelConfig, RawConfig};
use crate::error::Result;

pub static ARCH: Arch = Arch {
    model_type: "mixtral",
    hf_classes: &["MixtralForCausalLM"],
    parse_config,
    names: &NAMES,
};

static NAMES: NameScheme = NameScheme {
    moe_modules: &["block_sparse_moe", "mlp"],
    expert_proj: ["w1", "w3", "w2"],
    ..NameScheme::HF_STANDARD
};

/// `MixtralConfig`'s defaults.
const DEFAULTS: CommonDefaults = CommonDefaults {
    num_heads: None,
    num_kv_heads: None,
    head_dim,
    vocab_size: None,
    max_position_embeddings: 4096 * 32,
    rms_norm_eps: 1e-5,
    rope_theta: 1e6,
    attention_bias: None,
    num_experts_keys: &["num_local_experts", "num_experts"],
    num_experts: 8,
    top_k: 2,
    // Mixtral always renormalises its top-k weights.
    norm_topk_prob: None,
};

fn parse_config(raw: &RawConfig) -> Result<ModelConfig> {
    let base = ModelConfig::common(raw, ARCH.model_type, &DEFAULTS)?;
    let window = raw.opt_usize(&["sliding_window"])?.filter(|&w| w > 0);
    Ok(ModelConfig {
        // Mixtral's experts use `intermediate_size`.
        moe_intermediate_size: raw.usize(&["intermediate_size"])?,
        sliding_window: vec![window; base.num_layers],
        ..base
    })
}
