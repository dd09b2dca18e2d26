//! Qwen2-MoE (`Qwen2MoeForCausalLM`): attention with q/k/v biases, sparse blocks where
//! `decoder_sparse_step` / `mlp_only_layers` say, and in each sparse block an always-on shared
//! expert scaled by `sigmoid(shared_expert_gate(x))`.

use super::{head_dim, qwen_sparse_layers, Arch, NameScheme};
use crate::config::{MixerKind, ModelConfig, QkNorm, RawConfig, RopeConfig, RouterConfig};
use crate::error::{Error, Result};

pub static ARCH: Arch = Arch {
    model_type: "qwen2_moe",
    hf_classes: &["Qwen2MoeForCausalLM"],
    parse_config,
    names: &NAMES,
};

static NAMES: NameScheme = NameScheme {
    shared_expert: Some(("shared_expert", "shared_expert_gate")),
    ..NameScheme::HF_STANDARD
};

fn parse_config(raw: &RawConfig) -> Result<ModelConfig> {
    let hidden = raw.usize(&["hidden_size"])?;
    let layers = raw.usize(&["num_hidden_layers"])?;
    let heads = raw.usize(&["num_attention_heads"])?;
    let num_experts = raw.usize_or(&["num_experts", "num_local_experts"], 60)?;
    // Qwen2MoeConfig: `sliding_window` is 0 (off) unless `use_sliding_window`; layer types come
    // from `layer_types`, else from its rule over `max_window_layers`.
    let use_sw = raw.bool_or(&["use_sliding_window"], false)?;
    let window = if use_sw {
        raw.opt_usize(&["sliding_window"])?.filter(|&w| w > 0)
    } else {
        None
    };
    let max_window_layers = raw.usize_or(&["max_window_layers"], 28)?;
    let sliding = match raw.opt_str_list(&["layer_types"])? {
        Some(types) => {
            if types.len() != layers {
                return Err(Error::bad_config(
                    &raw.path,
                    format!(
                        "field `layer_types` has {} entries for {layers} layers",
                        types.len()
                    ),
                ));
            }
            types
                .iter()
                .map(|t| {
                    if t == "sliding_attention" {
                        window
                    } else {
                        None
                    }
                })
                .collect()
        }
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
        arch: ARCH.model_type,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: raw.usize_or(&["num_key_value_heads"], heads)?,
        head_dim: head_dim(raw, hidden, heads)?,
        vocab_size: raw.usize(&["vocab_size"])?,
        intermediate_size: raw.usize_or(&["intermediate_size"], 5632)?,
        moe_intermediate_size: raw.usize_or(&["moe_intermediate_size"], 1408)?,
        max_position_embeddings: raw.usize_or(&["max_position_embeddings"], 32768)?,
        rms_norm_eps: raw.f64_or(&["rms_norm_eps"], 1e-6)?,
        rope: RopeConfig::parse(raw, 10000.0)?,
        tie_word_embeddings: raw.bool_or(&["tie_word_embeddings"], false)?,
        router: RouterConfig {
            num_experts,
            top_k: raw.usize_or(&["num_experts_per_tok"], 4)?,
            norm_topk_prob: raw.bool_or(&["norm_topk_prob"], false)?,
        },
        sparse_layers: qwen_sparse_layers(raw, layers, num_experts)?,
        shared_expert_intermediate_size: raw
            .usize_or(&["shared_expert_intermediate_size"], 5632)?,
        qkv_bias: raw.bool_or(&["qkv_bias"], true)?,
        o_bias: false,
        qk_norm: QkNorm::None,
        clip_qkv: None,
        sliding_window: sliding,
        mixers: vec![MixerKind::Attention; layers],
        linear_attention: None,
        attn_output_gate: false,
        norm_zero_centred: false,
        hidden_act: raw.opt_str(&["hidden_act"])?.unwrap_or("silu").to_string(),
        bos_token_id: raw.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: raw.token_ids("eos_token_id")?,
    })
}
