//! Qwen3-Next (`Qwen3NextForCausalLM`): a hybrid of gated DeltaNet linear attention and gated
//! full attention (three linear layers per full one in the released models), each followed by
//! a sparse MoE block with `num_experts_per_tok` of `num_experts` routed experts plus an
//! always-on shared expert scaled by `sigmoid(shared_expert_gate(x))`.
//!
//! Full attention: `q_proj` yields a query and an output gate per head, per-head q/k RMSNorm,
//! rotary embedding on the first `partial_rotary_factor` of each head, output multiplied by
//! `sigmoid(gate)`. Every RMSNorm but the linear layers' gated one is zero-centred (`1 + w`).
//!
//! Layer kinds come from `layer_types` (transformers 5) or, in the Hub's configs, from
//! `full_attention_interval` (layer `l` is full attention when `(l + 1) % interval == 0`).
//! The release's multi-token-prediction tensors (`mtp.*`) are not used.

use super::{qwen_sparse_layers, Arch, NameScheme};
use crate::config::{
    CommonDefaults, LinearAttentionConfig, MixerKind, ModelConfig, QkNorm, RawConfig,
};
use crate::error::{Error, Result};

pub static ARCH: Arch = Arch {
    model_type: "qwen3_next",
    hf_classes: &["Qwen3NextForCausalLM"],
    parse_config,
    names: &NAMES,
};

static NAMES: NameScheme = NameScheme {
    shared_expert: Some(("shared_expert", Some("shared_expert_gate"))),
    ..NameScheme::HF_STANDARD
};

/// `Qwen3NextConfig`'s default when neither `rope_parameters` nor the top level gives one.
const DEFAULT_PARTIAL_ROTARY: f64 = 0.25;

/// `Qwen3NextConfig`'s defaults.
const DEFAULTS: CommonDefaults = CommonDefaults {
    num_heads: Some(16),
    num_kv_heads: Some(2),
    // Qwen3NextConfig's head_dim defaults to 256, not hidden / heads.
    head_dim: |raw, _, _| raw.usize_or(&["head_dim"], 256),
    vocab_size: Some(151936),
    max_position_embeddings: 32768,
    rms_norm_eps: 1e-6,
    rope_theta: 10000.0,
    attention_bias: Some(false),
    num_experts_keys: &["num_experts", "num_local_experts"],
    num_experts: 512,
    top_k: 10,
    norm_topk_prob: Some(true),
};

fn parse_config(raw: &RawConfig) -> Result<ModelConfig> {
    let mut base = ModelConfig::common(raw, ARCH.model_type, &DEFAULTS)?;
    if !partial_rotary_given(raw) {
        base.rope.partial_rotary_factor = DEFAULT_PARTIAL_ROTARY;
    }
    Ok(ModelConfig {
        intermediate_size: raw.usize_or(&["intermediate_size"], 5632)?,
        moe_intermediate_size: raw.usize_or(&["moe_intermediate_size"], 512)?,
        sparse_layers: qwen_sparse_layers(raw, base.num_layers, base.router.num_experts)?,
        shared_expert_intermediate_size: raw.usize_or(&["shared_expert_intermediate_size"], 512)?,
        qk_norm: QkNorm::PerHead,
        mixers: layer_kinds(raw, base.num_layers)?,
        linear_attention: Some(LinearAttentionConfig {
            num_key_heads: raw.usize_or(&["linear_num_key_heads"], 16)?,
            num_value_heads: raw.usize_or(&["linear_num_value_heads"], 32)?,
            key_head_dim: raw.usize_or(&["linear_key_head_dim"], 128)?,
            value_head_dim: raw.usize_or(&["linear_value_head_dim"], 128)?,
            conv_kernel: raw.usize_or(&["linear_conv_kernel_dim"], 4)?,
        }),
        attn_output_gate: true,
        norm_zero_centred: true,
        ..base
    })
}

/// Whether the config sets `partial_rotary_factor` (top level or inside `rope_parameters`).
fn partial_rotary_given(raw: &RawConfig) -> bool {
    let inside = |key: &str| {
        raw.value(&[key]).is_some_and(|p| {
            p.get("partial_rotary_factor").is_some_and(|v| !v.is_null())
                || p.get("full_attention")
                    .and_then(|f| f.get("partial_rotary_factor"))
                    .is_some_and(|v| !v.is_null())
        })
    };
    raw.value(&["partial_rotary_factor"]).is_some()
        || inside("rope_parameters")
        || inside("rope_scaling")
}

/// Per layer: `layer_types` if given, else the `full_attention_interval` rule (default 4).
fn layer_kinds(raw: &RawConfig, layers: usize) -> Result<Vec<MixerKind>> {
    if let Some(types) = super::layer_types(raw, layers)? {
        return types
            .iter()
            .enumerate()
            .map(|(l, t)| match t.as_str() {
                "linear_attention" => Ok(MixerKind::LinearAttention),
                "full_attention" => Ok(MixerKind::Attention),
                other => Err(Error::bad_config(
                    &raw.path,
                    format!(
                        "field `layer_types`[{l}] is `{other}` (expected `linear_attention` or \
                         `full_attention`)"
                    ),
                )),
            })
            .collect();
    }
    let interval = raw.usize_or(&["full_attention_interval"], 4)?;
    if interval == 0 {
        return Err(Error::bad_config(
            &raw.path,
            "field `full_attention_interval` must be > 0",
        ));
    }
    Ok((0..layers)
        .map(|l| {
            if (l + 1) % interval == 0 {
                MixerKind::Attention
            } else {
                MixerKind::LinearAttention
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn raw(s: &str) -> RawConfig {
        RawConfig::parse(PathBuf::from("config.json"), s.as_bytes()).unwrap()
    }

    #[test]
    fn both_layer_type_styles_agree() {
        use MixerKind::{Attention as F, LinearAttention as L};
        let hub =
            raw(r#"{"hidden_size": 8, "num_hidden_layers": 8, "full_attention_interval": 4}"#);
        let t5 = raw(
            r#"{"hidden_size": 8, "num_hidden_layers": 8, "layer_types": ["linear_attention",
            "linear_attention", "linear_attention", "full_attention", "linear_attention",
            "linear_attention", "linear_attention", "full_attention"]}"#,
        );
        let a = parse_config(&hub).unwrap();
        let b = parse_config(&t5).unwrap();
        assert_eq!(a.mixers, vec![L, L, L, F, L, L, L, F]);
        assert_eq!(a.mixers, b.mixers);
        // Defaults are the released model's.
        assert_eq!(a.rope.partial_rotary_factor, 0.25);
        assert_eq!(a.head_dim, 256);
        assert_eq!((a.router.num_experts, a.router.top_k), (512, 10));
        let bad = raw(
            r#"{"hidden_size": 8, "num_hidden_layers": 2, "layer_types": ["linear_attention"]}"#,
        );
        let e = parse_config(&bad).unwrap_err().to_string();
        assert!(
            e.contains("layer_types") && e.contains("1 entries for 2"),
            "{e}"
        );
        let bad = raw(
            r#"{"hidden_size": 8, "num_hidden_layers": 1, "layer_types": ["sliding_attention"]}"#,
        );
        let e = parse_config(&bad).unwrap_err().to_string();
        assert!(e.contains("sliding_attention"), "{e}");
    }

    #[test]
    fn partial_rotary_from_either_place() {
        let top =
            raw(r#"{"hidden_size": 8, "num_hidden_layers": 1, "partial_rotary_factor": 0.5}"#);
        assert_eq!(parse_config(&top).unwrap().rope.partial_rotary_factor, 0.5);
        let t5 = raw(
            r#"{"hidden_size": 8, "num_hidden_layers": 1, "rope_parameters": {"rope_type":
            "default", "rope_theta": 5.0, "partial_rotary_factor": 1.0}}"#,
        );
        let c = parse_config(&t5).unwrap();
        assert_eq!((c.rope.partial_rotary_factor, c.rope.theta), (1.0, 5.0));
    }
}
