//! Qwen3-MoE (`Qwen3MoeForCausalLM`): GQA attention with per-head q/k RMSNorm before rotary,
//! sparse blocks where `decoder_sparse_step` / `mlp_only_layers` say (dense SwiGLU elsewhere),
//! top-k renormalisation when `norm_topk_prob`.

use super::{head_dim, qwen_sparse_layers, Arch, NameScheme};
use crate::config::{CommonDefaults, ModelConfig, QkNorm, RawConfig};
use crate::error::Result;

pub static ARCH: Arch = Arch {
    model_type: "qwen3_moe",
    hf_classes: &["Qwen3MoeForCausalLM"],
    parse_config,
    names: &NameScheme::HF_STANDARD,
};

/// `Qwen3MoeConfig`'s defaults.
const DEFAULTS: CommonDefaults = CommonDefaults {
    num_heads: None,
    num_kv_heads: Some(4),
    head_dim,
    vocab_size: None,
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    rope_theta: 10000.0,
    attention_bias: Some(false),
    num_experts_keys: &["num_experts", "num_local_experts"],
    num_experts: 128,
    top_k: 8,
    norm_topk_prob: Some(false),
};

fn parse_config(raw: &RawConfig) -> Result<ModelConfig> {
    let base = ModelConfig::common(raw, ARCH.model_type, &DEFAULTS)?;
    // Qwen3MoeConfig: `sliding_window` only counts when `use_sliding_window`, for every layer.
    let window = if raw.bool_or(&["use_sliding_window"], false)? {
        raw.opt_usize(&["sliding_window"])?.filter(|&w| w > 0)
    } else {
        None
    };
    Ok(ModelConfig {
        intermediate_size: raw.usize_or(&["intermediate_size"], 6144)?,
        moe_intermediate_size: raw.usize_or(&["moe_intermediate_size"], 768)?,
        sparse_layers: qwen_sparse_layers(raw, base.num_layers, base.router.num_experts)?,
        qk_norm: QkNorm::PerHead,
        sliding_window: vec![window; base.num_layers],
        ..base
    })
}
