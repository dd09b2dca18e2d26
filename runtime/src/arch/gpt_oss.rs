//! gpt-oss (`GptOssForCausalLM`): GQA attention with q/k/v/o biases and a learned sink logit per
//! head (`self_attn.sinks`), sliding-window and full layers as `layer_types` says (alternating
//! by default), YaRN rope; in every layer a router with a bias whose top-k logits are
//! soft-maxed, and experts stored as one `gate_up_proj` whose rows alternate gate and up, with
//! biases, under the clamped SwiGLU (`(up + 1) * gate * sigmoid(alpha * gate)`, gate at most
//! `swiglu_limit`, up within it).
//!
//! The release stores the experts as MXFP4 (`*_blocks` / `*_scales`), opened by the weights
//! layer as `[E, 2I, H]` / `[E, H, I]` weights.

use super::{Arch, NameScheme};
use crate::config::{
    CommonDefaults, ExpertForm, ModelConfig, RawConfig, RopeConfig, RopeScaling, Scoring,
};
use crate::error::{Error, Result};

pub static ARCH: Arch = Arch {
    model_type: "gpt_oss",
    hf_classes: &["GptOssForCausalLM"],
    parse_config,
    names: &NAMES,
};

static NAMES: NameScheme = NameScheme {
    router: "router",
    ..NameScheme::HF_STANDARD
};

/// `GptOssConfig`'s defaults.
const DEFAULTS: CommonDefaults = CommonDefaults {
    num_heads: Some(64),
    num_kv_heads: Some(8),
    head_dim,
    vocab_size: Some(201088),
    max_position_embeddings: 131072,
    rms_norm_eps: 1e-5,
    rope_theta: 150000.0,
    attention_bias: Some(true),
    num_experts_keys: &["num_local_experts", "num_experts"],
    num_experts: 128,
    top_k: 4,
    norm_topk_prob: None,
};

/// The class's `head_dim` (64) when the config gives none: not hidden / heads.
fn head_dim(raw: &RawConfig, _hidden: usize, _heads: usize) -> Result<usize> {
    Ok(raw.opt_usize(&["head_dim"])?.unwrap_or(64))
}

fn parse_config(raw: &RawConfig) -> Result<ModelConfig> {
    let base = ModelConfig::common(raw, ARCH.model_type, &DEFAULTS)?;
    let layers = base.num_layers;
    let window = Some(raw.usize_or(&["sliding_window"], 128)?).filter(|&w| w > 0);
    let sliding = match super::layer_windows(raw, layers, window)? {
        Some(windows) => windows,
        // The class's default: even layers sliding, odd ones full.
        None => (0..layers).map(|l| window.filter(|_| l % 2 == 0)).collect(),
    };
    let limit = raw.f64_or(&["swiglu_limit"], 7.0)?;
    let alpha = raw.f64_or(&["swiglu_alpha"], 1.702)?;
    for (key, v) in [("swiglu_limit", limit), ("swiglu_alpha", alpha)] {
        if !(v.is_finite() && v > 0.0) {
            return Err(Error::bad_config(
                &raw.path,
                format!("field `{key}` is {v}: it must be a positive number"),
            ));
        }
    }
    Ok(ModelConfig {
        moe_intermediate_size: raw.usize_or(&["intermediate_size"], 2880)?,
        rope: rope(raw, base.rope.clone()),
        router: crate::config::RouterConfig {
            scoring: Scoring::TopKThenSoftmax,
            norm_topk_prob: false,
            bias: true,
            ..base.router
        },
        sliding_window: sliding,
        attention_sinks: true,
        expert_form: ExpertForm::InterleavedClamped {
            limit: limit as f32,
            alpha: alpha as f32,
        },
        ..base
    })
}

/// `parsed` (the config's rope settings as read for every architecture) when the config gives
/// rope settings; without any, the class's YaRN (factor 32 over 4096 positions, betas 32 / 1,
/// not truncated) over the same theta.
fn rope(raw: &RawConfig, parsed: RopeConfig) -> RopeConfig {
    if raw.value(&["rope_parameters", "rope_scaling"]).is_some() {
        return parsed;
    }
    RopeConfig {
        scaling: RopeScaling::Yarn {
            factor: 32.0,
            original_max_position_embeddings: 4096,
            attention_factor: None,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            truncate: false,
        },
        ..parsed
    }
}
