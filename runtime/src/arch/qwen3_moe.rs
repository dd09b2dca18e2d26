//! Qwen3-MoE (`Qwen3MoeForCausalLM`): GQA attention with per-head q/k RMSNorm before rotary,
//! sparse blocks where `decoder_sparse_step` / `mlp_only_layers` say (dense SwiGLU elsewhere),
//! top-k renormalisation when `norm_topk_prob`.

use super::{head_dim, qwen_sparse_layers, Arch, NameScheme};
use crate::config::{MixerKind, ModelConfig, QkNorm, RawConfig, RopeConfig, RouterConfig};
use crate::error::Result;

pub static ARCH: Arch = Arch {
    model_type: "qwen3_moe",
    hf_classes: &["Qwen3MoeForCausalLM"],
    parse_config,
    names: &NameScheme::HF_STANDARD,
};

fn parse_config(raw: &RawConfig) -> Result<ModelConfig> {
    let hidden = raw.usize(&["hidden_size"])?;
    let layers = raw.usize(&["num_hidden_layers"])?;
    let heads = raw.usize(&["num_attention_heads"])?;
    let num_experts = raw.usize_or(&["num_experts", "num_local_experts"], 128)?;
    // Qwen3MoeConfig: `sliding_window` only counts when `use_sliding_window`, for every layer.
    let window = if raw.bool_or(&["use_sliding_window"], false)? {
        raw.opt_usize(&["sliding_window"])?.filter(|&w| w > 0)
    } else {
        None
    };
    Ok(ModelConfig {
        arch: ARCH.model_type,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: raw.usize_or(&["num_key_value_heads"], 4)?,
        head_dim: head_dim(raw, hidden, heads)?,
        vocab_size: raw.usize(&["vocab_size"])?,
        intermediate_size: raw.usize_or(&["intermediate_size"], 6144)?,
        moe_intermediate_size: raw.usize_or(&["moe_intermediate_size"], 768)?,
        max_position_embeddings: raw.usize_or(&["max_position_embeddings"], 32768)?,
        rms_norm_eps: raw.f64_or(&["rms_norm_eps"], 1e-6)?,
        rope: RopeConfig::parse(raw, 10000.0)?,
        tie_word_embeddings: raw.bool_or(&["tie_word_embeddings"], false)?,
        router: RouterConfig {
            num_experts,
            top_k: raw.usize_or(&["num_experts_per_tok"], 8)?,
            norm_topk_prob: raw.bool_or(&["norm_topk_prob"], false)?,
        },
        sparse_layers: qwen_sparse_layers(raw, layers, num_experts)?,
        shared_expert_intermediate_size: 0,
        qkv_bias: raw.bool_or(&["attention_bias"], false)?,
        o_bias: raw.bool_or(&["attention_bias"], false)?,
        qk_norm: QkNorm::PerHead,
        clip_qkv: None,
        sliding_window: vec![window; layers],
        mixers: vec![MixerKind::Attention; layers],
        linear_attention: None,
        attn_output_gate: false,
        norm_zero_centred: false,
        hidden_act: raw.opt_str(&["hidden_act"])?.unwrap_or("silu").to_string(),
        bos_token_id: raw.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: raw.token_ids("eos_token_id")?,
    })
}
