//! OLMoE (`OlmoeForCausalLM`): attention with RMSNorm over the full q and k projection widths
//! (before the per-head split), optional `clip_qkv` clamping after the norms, and a sparse MoE
//! block in every layer.

use super::{head_dim, Arch, NameScheme};
use crate::config::{CommonDefaults, ModelConfig, QkNorm, RawConfig};
use crate::error::Result;

pub static ARCH: Arch = Arch {
    model_type: "olmoe",
    hf_classes: &["OlmoeForCausalLM"],
    parse_config,
    names: &NameScheme::HF_STANDARD,
};

/// `OlmoeConfig`'s defaults.
const DEFAULTS: CommonDefaults = CommonDefaults {
    num_heads: None,
    num_kv_heads: None,
    head_dim,
    vocab_size: None,
    max_position_embeddings: 4096,
    rms_norm_eps: 1e-5,
    rope_theta: 10000.0,
    attention_bias: Some(false),
    num_experts_keys: &["num_experts", "num_local_experts"],
    num_experts: 64,
    top_k: 8,
    norm_topk_prob: Some(false),
};

fn parse_config(raw: &RawConfig) -> Result<ModelConfig> {
    let base = ModelConfig::common(raw, ARCH.model_type, &DEFAULTS)?;
    Ok(ModelConfig {
        // OLMoE's experts use `intermediate_size`.
        moe_intermediate_size: raw.usize_or(&["intermediate_size"], 2048)?,
        qk_norm: QkNorm::FullWidth,
        clip_qkv: raw.opt_f64(&["clip_qkv"])?.map(|c| c as f32),
        ..base
    })
}
