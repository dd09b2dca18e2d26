//! The Hub's JSON side files: `config.json`, `generation_config.json`,
//! `model.safetensors.index.json`. Keys are written sorted, as `transformers`
//! writes them (`sort_keys=True`), independent of serde_json's `preserve_order`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::preset::{Preset, DEEPSEEK_V3, GLM4_MOE, GPT_OSS, QWEN3_MOE, QWEN3_NEXT};

/// The transformers release whose layout the `qwen3_moe` files follow.
const TRANSFORMERS_VERSION: &str = "4.51.0";
/// The transformers release the Qwen3-Next Hub files name (`qwen3_next`).
const TRANSFORMERS_VERSION_NEXT: &str = "4.57.0.dev0";
/// The transformers releases the GLM-4.5-Air, gpt-oss and DeepSeek-V3 Hub files name.
const TRANSFORMERS_VERSION_GLM: &str = "4.54.0";
const TRANSFORMERS_VERSION_GPT_OSS: &str = "4.55.0.dev0";
const TRANSFORMERS_VERSION_DEEPSEEK: &str = "4.33.1";

/// `rms_norm_eps` of every preset.
pub(crate) const RMS_NORM_EPS: f64 = 1e-6;

fn transformers_version(p: &Preset) -> &'static str {
    match p.arch {
        QWEN3_NEXT => TRANSFORMERS_VERSION_NEXT,
        GLM4_MOE => TRANSFORMERS_VERSION_GLM,
        GPT_OSS => TRANSFORMERS_VERSION_GPT_OSS,
        DEEPSEEK_V3 => TRANSFORMERS_VERSION_DEEPSEEK,
        _ => TRANSFORMERS_VERSION,
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
    match p.arch {
        GLM4_MOE => return pretty(&sorted(glm4_moe_config(p))),
        GPT_OSS => return pretty(&sorted(gpt_oss_config(p))),
        DEEPSEEK_V3 => return pretty(&sorted(deepseek_v3_config(p))),
        _ => {}
    }
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

/// The keys of the `zai-org/GLM-4.5-Air` release. `num_nextn_predict_layers` is 0: the
/// release's multi-token-prediction layer is not written (neither the runtime nor
/// llama.cpp's default path uses it).
fn glm4_moe_config(p: &Preset) -> Vec<(&'static str, Value)> {
    let ids = p.special_ids();
    vec![
        ("architectures", json!(["Glm4MoeForCausalLM"])),
        ("attention_bias", json!(true)),
        ("attention_dropout", json!(0.0)),
        ("eos_token_id", json!([ids.im_end, ids.endoftext])),
        ("first_k_dense_replace", json!(p.first_k_dense_replace)),
        ("head_dim", json!(p.head_dim)),
        ("hidden_act", json!("silu")),
        ("hidden_size", json!(p.hidden_size)),
        ("initializer_range", json!(0.02)),
        ("intermediate_size", json!(p.intermediate_size)),
        ("max_position_embeddings", json!(p.max_position_embeddings)),
        ("model_type", json!(GLM4_MOE)),
        ("moe_intermediate_size", json!(p.moe_intermediate_size)),
        ("n_group", json!(p.n_group)),
        ("n_routed_experts", json!(p.num_experts)),
        ("n_shared_experts", json!(p.n_shared_experts)),
        ("norm_topk_prob", json!(true)),
        ("num_attention_heads", json!(p.num_attention_heads)),
        ("num_experts_per_tok", json!(p.num_experts_per_tok)),
        ("num_hidden_layers", json!(p.num_hidden_layers)),
        ("num_key_value_heads", json!(p.num_key_value_heads)),
        ("num_nextn_predict_layers", json!(0)),
        ("pad_token_id", json!(ids.endoftext)),
        ("partial_rotary_factor", json!(p.partial_rotary_factor)),
        ("rms_norm_eps", json!(p.rms_norm_eps)),
        ("rope_scaling", Value::Null),
        ("rope_theta", json!(p.rope_theta)),
        ("routed_scaling_factor", json!(p.routed_scaling_factor)),
        ("tie_word_embeddings", json!(false)),
        ("topk_group", json!(p.topk_group)),
        ("torch_dtype", json!("bfloat16")),
        ("transformers_version", json!(TRANSFORMERS_VERSION_GLM)),
        ("use_cache", json!(true)),
        ("use_qk_norm", json!(false)),
        ("vocab_size", json!(p.vocab_size)),
    ]
}

/// The keys of the `openai/gpt-oss-20b` / `-120b` releases, MXFP4 experts included.
fn gpt_oss_config(p: &Preset) -> Vec<(&'static str, Value)> {
    let ids = p.special_ids();
    let layer_types: Vec<&str> = (0..p.num_hidden_layers)
        .map(|l| {
            if l % 2 == 0 {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    vec![
        ("architectures", json!(["GptOssForCausalLM"])),
        ("attention_bias", json!(true)),
        ("attention_dropout", json!(0.0)),
        ("eos_token_id", json!(ids.im_end)),
        ("experts_per_token", json!(p.num_experts_per_tok)),
        ("head_dim", json!(p.head_dim)),
        ("hidden_act", json!("silu")),
        ("hidden_size", json!(p.hidden_size)),
        ("initial_context_length", json!(4096)),
        ("initializer_range", json!(0.02)),
        ("intermediate_size", json!(p.moe_intermediate_size)),
        ("layer_types", json!(layer_types)),
        ("max_position_embeddings", json!(p.max_position_embeddings)),
        ("model_type", json!(GPT_OSS)),
        ("num_attention_heads", json!(p.num_attention_heads)),
        ("num_experts_per_tok", json!(p.num_experts_per_tok)),
        ("num_hidden_layers", json!(p.num_hidden_layers)),
        ("num_key_value_heads", json!(p.num_key_value_heads)),
        ("num_local_experts", json!(p.num_experts)),
        ("output_router_logits", json!(false)),
        ("pad_token_id", json!(ids.endoftext)),
        (
            "quantization_config",
            json!({
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head"
                ],
                "quant_method": "mxfp4"
            }),
        ),
        ("rms_norm_eps", json!(p.rms_norm_eps)),
        (
            "rope_scaling",
            json!({
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "rope_type": "yarn",
                "truncate": false
            }),
        ),
        ("rope_theta", json!(p.rope_theta)),
        ("router_aux_loss_coef", json!(0.9)),
        ("sliding_window", json!(p.sliding_window)),
        ("swiglu_limit", json!(7.0)),
        ("tie_word_embeddings", json!(false)),
        ("transformers_version", json!(TRANSFORMERS_VERSION_GPT_OSS)),
        ("use_cache", json!(true)),
        ("vocab_size", json!(p.vocab_size)),
    ]
}

/// The keys of the `deepseek-ai/DeepSeek-V3` release, less `auto_map` (no remote code is
/// shipped) and `quantization_config` (the weights are bf16); `num_nextn_predict_layers`
/// is 0 (the multi-token-prediction layer is not written).
fn deepseek_v3_config(p: &Preset) -> Vec<(&'static str, Value)> {
    let ids = p.special_ids();
    let q_lora = if p.q_lora_rank > 0 {
        json!(p.q_lora_rank)
    } else {
        Value::Null
    };
    vec![
        ("architectures", json!(["DeepseekV3ForCausalLM"])),
        ("attention_bias", json!(false)),
        ("attention_dropout", json!(0.0)),
        ("aux_loss_alpha", json!(0.001)),
        ("bos_token_id", json!(ids.endoftext)),
        ("eos_token_id", json!(ids.im_end)),
        ("ep_size", json!(1)),
        ("first_k_dense_replace", json!(p.first_k_dense_replace)),
        ("hidden_act", json!("silu")),
        ("hidden_size", json!(p.hidden_size)),
        ("initializer_range", json!(0.02)),
        ("intermediate_size", json!(p.intermediate_size)),
        ("kv_lora_rank", json!(p.kv_lora_rank)),
        ("max_position_embeddings", json!(p.max_position_embeddings)),
        ("model_type", json!(DEEPSEEK_V3)),
        ("moe_intermediate_size", json!(p.moe_intermediate_size)),
        ("moe_layer_freq", json!(1)),
        ("n_group", json!(p.n_group)),
        ("n_routed_experts", json!(p.num_experts)),
        ("n_shared_experts", json!(p.n_shared_experts)),
        ("norm_topk_prob", json!(true)),
        ("num_attention_heads", json!(p.num_attention_heads)),
        ("num_experts_per_tok", json!(p.num_experts_per_tok)),
        ("num_hidden_layers", json!(p.num_hidden_layers)),
        ("num_key_value_heads", json!(p.num_key_value_heads)),
        ("num_nextn_predict_layers", json!(0)),
        ("pretraining_tp", json!(1)),
        ("q_lora_rank", q_lora),
        ("qk_nope_head_dim", json!(p.qk_nope_head_dim)),
        ("qk_rope_head_dim", json!(p.qk_rope_head_dim)),
        ("rms_norm_eps", json!(p.rms_norm_eps)),
        (
            "rope_scaling",
            json!({
                "beta_fast": 32,
                "beta_slow": 1,
                "factor": 40,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096,
                "type": "yarn"
            }),
        ),
        ("rope_theta", json!(p.rope_theta)),
        ("routed_scaling_factor", json!(p.routed_scaling_factor)),
        ("scoring_func", json!("sigmoid")),
        ("seq_aux", json!(true)),
        ("tie_word_embeddings", json!(false)),
        ("topk_group", json!(p.topk_group)),
        ("topk_method", json!("noaux_tc")),
        ("torch_dtype", json!("bfloat16")),
        ("transformers_version", json!(TRANSFORMERS_VERSION_DEEPSEEK)),
        ("use_cache", json!(true)),
        ("v_head_dim", json!(p.v_head_dim)),
        ("vocab_size", json!(p.vocab_size)),
    ]
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
