//! OLMoE (`OlmoeForCausalLM`): attention with RMSNorm over the full q and k projection widths
//! (before the per-head split), optional `clip_qkv` clamping after the norms, and a sparse MoE
//! block in every layer.

use super::{head_dim, Arch, NameScheme};
use crate::config::{MixerKind, ModelConfig, QkNorm, RawConfig, RopeConfig, RouterConfig};
use crate::error::Result;

pub static ARCH: Arch = Arch {
    model_type: "olmoe",
    hf_classes: &["OlmoeForCausalLM"],
    parse_config,
    names: &NameScheme::HF_STANDARD,
};

fn parse_config(raw: &RawConfig) -> Result<ModelConfig> {
    let hidden = raw.usize(&["hidden_size"])?;
    let layers = raw.usize(&["num_hidden_layers"])?;
    let heads = raw.usize(&["num_attention_heads"])?;
    let bias = raw.bool_or(&["attention_bias"], false)?;
    Ok(ModelConfig {
        arch: ARCH.model_type,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: raw.usize_or(&["num_key_value_heads"], heads)?,
        head_dim: head_dim(raw, hidden, heads)?,
        vocab_size: raw.usize(&["vocab_size"])?,
        intermediate_size: 0,
        moe_intermediate_size: raw.usize_or(&["intermediate_size"], 2048)?,
        max_position_embeddings: raw.usize_or(&["max_position_embeddings"], 4096)?,
        rms_norm_eps: raw.f64_or(&["rms_norm_eps"], 1e-5)?,
        rope: RopeConfig::parse(raw, 10000.0)?,
        tie_word_embeddings: raw.bool_or(&["tie_word_embeddings"], false)?,
        router: RouterConfig {
            num_experts: raw.usize_or(&["num_experts", "num_local_experts"], 64)?,
            top_k: raw.usize_or(&["num_experts_per_tok"], 8)?,
            norm_topk_prob: raw.bool_or(&["norm_topk_prob"], false)?,
        },
        sparse_layers: vec![true; layers],
        shared_expert_intermediate_size: 0,
        qkv_bias: bias,
        o_bias: bias,
        qk_norm: QkNorm::FullWidth,
        clip_qkv: raw.opt_f64(&["clip_qkv"])?.map(|c| c as f32),
        sliding_window: vec![None; layers],
        mixers: vec![MixerKind::Attention; layers],
        linear_attention: None,
        attn_output_gate: false,
        norm_zero_centred: false,
        hidden_act: raw.opt_str(&["hidden_act"])?.unwrap_or("silu").to_string(),
        bos_token_id: raw.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: raw.token_ids("eos_token_id")?,
    })
}
