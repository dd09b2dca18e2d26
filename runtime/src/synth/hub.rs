//! The Hub's JSON side files: `config.json`, `generation_config.json`,
//! `model.safetensors.index.json`. Keys are written sorted, as `transformers`
//! writes them (`sort_keys=True`), independent of serde_json's `preserve_order`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::preset::{Preset, QWEN3_MOE, QWEN3_NEXT};

/// The transformers release whose layout the `qwen3_moe` files follow.
const TRANSFORMERS_VERSION: &str = "4.51.0";
/// The transformers release the Qwen3-Next Hub files name (`qwen3_next`).
const TRANSFORMERS_VERSION_NEXT: &str = "4.57.0.dev0";

/// `rms_norm_eps` of every preset.
pub(crate) const RMS_NORM_EPS: f64 = 1e-6;

fn transformers_version(p: &Preset) -> &'static str {
    if p.arch == QWEN3_NEXT {
        TRANSFORMERS_VERSION_NEXT
    } else {
        TRANSFORMERS_VERSION
    }
}

fn sorted(pairs: Vec<(&str, Value)>) -> BTreeMap<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn pretty<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).expect("JSON of plain maps cannot fail");
    s.push('\n');
    s.into_bytes()
}

/// `config.json` for the preset's architecture: the keys both share, then each one's own
/// (written sorted either way).
pub(crate) fn config_json(p: &Preset) -> Vec<u8> {
    let ids = p.special_ids();
    let mut pairs = vec![
        ("attention_bias", json!(false)),
        ("attention_dropout", json!(0.0)),
        ("bos_token_id", json!(ids.endoftext)),
        ("decoder_sparse_step", json!(1)),
        ("eos_token_id", json!(ids.im_end)),
        ("head_dim", json!(p.head_dim)),
        ("hidden_act", json!("silu")),
        ("hidden_size", json!(p.hidden_size)),
        ("initializer_range", json!(0.02)),
        ("intermediate_size", json!(p.intermediate_size)),
        ("max_position_embeddings", json!(p.max_position_embeddings)),
        ("mlp_only_layers", json!([])),
        ("moe_intermediate_size", json!(p.moe_intermediate_size)),
        ("norm_topk_prob", json!(true)),
        ("num_attention_heads", json!(p.num_attention_heads)),
        ("num_experts", json!(p.num_experts)),
        ("num_experts_per_tok", json!(p.num_experts_per_tok)),
        ("num_hidden_layers", json!(p.num_hidden_layers)),
        ("num_key_value_heads", json!(p.num_key_value_heads)),
        ("output_router_logits", json!(false)),
        ("rms_norm_eps", json!(RMS_NORM_EPS)),
        ("rope_scaling", Value::Null),
        ("rope_theta", json!(p.rope_theta)),
        ("router_aux_loss_coef", json!(0.001)),
        ("tie_word_embeddings", json!(false)),
        ("torch_dtype", json!("bfloat16")),
        ("use_cache", json!(true)),
        ("use_sliding_window", json!(false)),
        ("vocab_size", json!(p.vocab_size)),
    ];
    if p.arch == QWEN3_NEXT {
        // The keys of the `Qwen/Qwen3-Next-80B-A3B-Instruct` release.
        pairs.extend([
            ("architectures", json!(["Qwen3NextForCausalLM"])),
            ("full_attention_interval", json!(p.full_attention_interval)),
            ("linear_conv_kernel_dim", json!(p.linear_conv_kernel_dim)),
            ("linear_key_head_dim", json!(p.linear_key_head_dim)),
            ("linear_num_key_heads", json!(p.linear_num_key_heads)),
            ("linear_num_value_heads", json!(p.linear_num_value_heads)),
            ("linear_value_head_dim", json!(p.linear_value_head_dim)),
            ("model_type", json!(QWEN3_NEXT)),
            ("partial_rotary_factor", json!(p.partial_rotary_factor)),
            (
                "shared_expert_intermediate_size",
                json!(p.shared_expert_intermediate_size),
            ),
            ("transformers_version", json!(TRANSFORMERS_VERSION_NEXT)),
        ]);
    } else {
        pairs.extend([
            ("architectures", json!(["Qwen3MoeForCausalLM"])),
            ("max_window_layers", json!(p.num_hidden_layers)),
            ("model_type", json!(QWEN3_MOE)),
            ("sliding_window", Value::Null),
            ("transformers_version", json!(TRANSFORMERS_VERSION)),
        ]);
    }
    pretty(&sorted(pairs))
}

/// `generation_config.json`: sampling defaults and both stop tokens.
pub(crate) fn generation_config_json(p: &Preset) -> Vec<u8> {
    let ids = p.special_ids();
    pretty(&sorted(vec![
        ("bos_token_id", json!(ids.endoftext)),
        ("do_sample", json!(true)),
        ("eos_token_id", json!([ids.im_end, ids.endoftext])),
        ("pad_token_id", json!(ids.endoftext)),
        ("temperature", json!(0.7)),
        ("top_k", json!(40)),
        ("top_p", json!(0.9)),
        ("transformers_version", json!(transformers_version(p))),
    ]))
}

/// `model.safetensors.index.json`: tensor name -> shard file name.
pub(crate) fn index_json(total_size: u64, weight_map: &BTreeMap<String, String>) -> Vec<u8> {
    let mut metadata = BTreeMap::new();
    metadata.insert("total_size", total_size);
    // Serialized through a struct so key order never depends on serde_json features.
    #[derive(serde::Serialize)]
    struct Index<'a> {
        metadata: &'a BTreeMap<&'static str, u64>,
        weight_map: &'a BTreeMap<String, String>,
    }
    pretty(&Index {
        metadata: &metadata,
        weight_map,
    })
}
