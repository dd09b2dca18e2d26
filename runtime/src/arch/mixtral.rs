//! Mixtral (`MixtralForCausalLM`): GQA attention with optional sliding window, and a sparse MoE
//! block in every layer whose top-k softmax weights are always renormalised.
//!
//! Hub checkpoints name the block `block_sparse_moe` with experts `w1` (gate), `w3` (up) and
//! `w2` (down); transformers 5 names it `mlp` with fused `gate_up_proj` / `down_proj`.

use super::{head_dim, Arch, NameScheme};
use crate::config::{MixerKind, ModelConfig, QkNorm, RawConfig, RopeConfig, RouterConfig};
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

fn parse_config(raw: &RawConfig) -> Result<ModelConfig> {
    let hidden = raw.usize(&["hidden_size"])?;
    let layers = raw.usize(&["num_hidden_layers"])?;
    let heads = raw.usize(&["num_attention_heads"])?;
    let window = raw.opt_usize(&["sliding_window"])?;
    Ok(ModelConfig {
        arch: ARCH.model_type,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: raw.usize_or(&["num_key_value_heads"], heads)?,
        head_dim: head_dim(raw, hidden, heads)?,
        vocab_size: raw.usize(&["vocab_size"])?,
        intermediate_size: 0,
        // Mixtral's experts use `intermediate_size`.
        moe_intermediate_size: raw.usize(&["intermediate_size"])?,
        max_position_embeddings: raw.usize_or(&["max_position_embeddings"], 4096 * 32)?,
        rms_norm_eps: raw.f64_or(&["rms_norm_eps"], 1e-5)?,
        rope: RopeConfig::parse(raw, 1e6)?,
        tie_word_embeddings: raw.bool_or(&["tie_word_embeddings"], false)?,
        router: RouterConfig {
            num_experts: raw.usize_or(&["num_local_experts", "num_experts"], 8)?,
            top_k: raw.usize_or(&["num_experts_per_tok"], 2)?,
            norm_topk_prob: true,
        },
        sparse_layers: vec![true; layers],
        shared_expert_intermediate_size: 0,
        qkv_bias: false,
        o_bias: false,
        qk_norm: QkNorm::None,
        clip_qkv: None,
        sliding_window: vec![window.filter(|&w| w > 0); layers],
        mixers: vec![MixerKind::Attention; layers],
        linear_attention: None,
        attn_output_gate: false,
        norm_zero_centred: false,
        hidden_act: raw.opt_str(&["hidden_act"])?.unwrap_or("silu").to_string(),
        bos_token_id: raw.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: raw.token_ids("eos_token_id")?,
    })
}
