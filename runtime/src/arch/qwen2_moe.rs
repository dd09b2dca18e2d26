//! Qwen2-MoE (`Qwen2MoeForCausalLM`): attention with q/k/v biases, sparse blocks where
//! `decoder_sparse_step` / `mlp_only_layers` say, and in each sparse block an always-on shared
//! expert scaled by `sigmoid(shared_expert_gate(x))`.

use super::{head_dim, qwen_sparse_layers, Arch, NameScheme};
use crate::config::{CommonDefaults, ModelConfig, RawConfig};
use crate::error::Result;

pub static ARCH: Arch = Arch {
    model_type: "qwen2_moe",
    hf_classes: &["Qwen2MoeForCausalLM"],
    parse_config,
    names: &NAMES,
};

static NAMES: NameScheme = NameScheme {
    shared_expert: Some(("shared_expert", Some("shared_expert_gate"))),
    ..NameScheme::HF_STANDARD
};

/// `Qwen2MoeConfig`'s defaults.
const DEFAULTS: CommonDefaults = CommonDefaults {
    num_heads: None,
    num_kv_heads: None,
    head_dim,
    vocab_size: None,
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    rope_theta: 10000.0,
    // Qwen2-MoE names its q/k/v bias `qkv_bias` and has no o bias.
    attention_bias: None,
    num_experts_keys: &["num_experts", "num_local_experts"],
    num_experts: 60,
    top_k: 4,
    norm_topk_prob: Some(false),
};

fn parse_config(raw: &RawConfig) -> Result<ModelConfig> {
    let base = ModelConfig::common(raw, ARCH.model_type, &DEFAULTS)?;
    let layers = base.num_layers;
    // Qwen2MoeConfig: `sliding_window` is 0 (off) unless `use_sliding_window`; layer types come
    // from `layer_types`, else from its rule over `max_window_layers`.
    let use_sw = raw.bool_or(&["use_sliding_window"], false)?;
    let window = if use_sw {
        raw.opt_usize(&["sliding_window"])?.filter(|&w| w > 0)
    } else {
        None
    };
    let max_window_layers = raw.usize_or(&["max_window_layers"], 28)?;
    let sliding = match super::layer_windows(raw, layers, window)? {
        Some(windows) => windows,
        None => (0..layers)
            .map(|i| {
                if (i + 1) % 2 == 1 && i < max_window_layers && use_sw {
                    window
                } else {
                    None
                }
            })
            .collect(),
    };
    Ok(ModelConfig {
        intermediate_size: raw.usize_or(&["intermediate_size"], 5632)?,
        moe_intermediate_size: raw.usize_or(&["moe_intermediate_size"], 1408)?,
        sparse_layers: qwen_sparse_layers(raw, layers, base.router.num_experts)?,
        shared_expert_intermediate_size: raw
            .usize_or(&["shared_expert_intermediate_size"], 5632)?,
        qkv_bias: raw.bool_or(&["qkv_bias"], true)?,
        sliding_window: sliding,
        ..base
    })
}
