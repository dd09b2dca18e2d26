//! DeepSeek-V3 / R1 and Kimi-K2 (`DeepseekV3ForCausalLM`): multi-head latent attention (see
//! `crate::mla`: a query latent unless `q_lora_rank` is null, one key/value latent, a shared rope
//! key, `qk_nope_head_dim` / `qk_rope_head_dim` / `v_head_dim` that differ, rope over adjacent
//! pairs when `rope_interleave`, YaRN whose `mscale_all_dim` also scales the softmax); the first
//! `first_k_dense_replace` layers dense, the rest sparse with an ungated shared expert
//! (`n_shared_experts` times the expert width) and GLM-4.5's sigmoid router (scores plus
//! `e_score_correction_bias` choose, group-limited by `n_group` / `topk_group`; the unbiased
//! scores weigh, renormalised when `norm_topk_prob`, times `routed_scaling_factor`).
//!
//! The release's multi-token-prediction layer (`model.layers.{num_hidden_layers}.*`) is not used.

use super::{Arch, GroupDefaults, NameScheme};
use crate::config::{CommonDefaults, MlaConfig, ModelConfig, RawConfig, RopeScaling};
use crate::error::{Error, Result};

pub static ARCH: Arch = Arch {
    model_type: "deepseek_v3",
    hf_classes: &["DeepseekV3ForCausalLM"],
    parse_config,
    names: &NAMES,
};

static NAMES: NameScheme = NameScheme {
    shared_expert: Some(("shared_experts", None)),
    ..NameScheme::HF_STANDARD
};

/// `DeepseekV3Config`'s defaults.
const DEFAULTS: CommonDefaults = CommonDefaults {
    num_heads: Some(128),
    num_kv_heads: Some(128),
    head_dim,
    vocab_size: Some(129280),
    max_position_embeddings: 4096,
    rms_norm_eps: 1e-6,
    rope_theta: 10000.0,
    attention_bias: Some(false),
    num_experts_keys: &["n_routed_experts"],
    num_experts: 256,
    top_k: 8,
    norm_topk_prob: Some(true),
};

/// `DeepseekV3Config`'s router defaults.
const ROUTER_DEFAULTS: GroupDefaults = GroupDefaults {
    n_group: 8,
    topk_group: 4,
    routed_scaling_factor: 2.5,
};

/// The rope width is the model's head width, as the class sets `head_dim = qk_rope_head_dim`.
fn head_dim(raw: &RawConfig, _hidden: usize, _heads: usize) -> Result<usize> {
    raw.usize_or(&["qk_rope_head_dim"], 64)
}

fn parse_config(raw: &RawConfig) -> Result<ModelConfig> {
    let base = ModelConfig::common(raw, ARCH.model_type, &DEFAULTS)?;
    let experts = base.router.num_experts;
    let moe_width = raw.usize_or(&["moe_intermediate_size"], 2048)?;
    let first_dense = raw.usize_or(&["first_k_dense_replace"], 3)?;
    let shared = raw.usize_or(&["n_shared_experts"], 1)?;
    // The reference code's names for the routing rule this class implements; another rule
    // (DeepSeek-V2's softmax, its greedy top-k) is a different model.
    for (key, want) in [("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")] {
        if let Some(got) = raw.opt_str(&[key])? {
            if got != want {
                return Err(Error::bad_config(
                    &raw.path,
                    format!(
                        "field `{key}` is \"{got}\": DeepseekV3ForCausalLM routes with \"{want}\""
                    ),
                ));
            }
        }
    }
    let mla = mla_config(raw, &base)?;
    Ok(ModelConfig {
        intermediate_size: raw.usize_or(&["intermediate_size"], 18432)?,
        moe_intermediate_size: moe_width,
        sparse_layers: (0..base.num_layers)
            .map(|l| l >= first_dense && experts > 0)
            .collect(),
        shared_expert_intermediate_size: moe_width * shared,
        router: super::biased_sigmoid_router(raw, base.router, ROUTER_DEFAULTS)?,
        mla: Some(mla),
        ..base
    })
}

/// The latent attention's dimensions and softmax scale.
fn mla_config(raw: &RawConfig, base: &ModelConfig) -> Result<MlaConfig> {
    let q_lora_rank = if raw.is_null("q_lora_rank") {
        None
    } else {
        Some(raw.usize_or(&["q_lora_rank"], 1536)?)
    };
    let nope = raw.usize_or(&["qk_nope_head_dim"], 128)?;
    let rope = raw.usize_or(&["qk_rope_head_dim"], 64)?;
    let qk = nope + rope;
    // transformers: `qk_head_dim ** -0.5`, times `yarn_get_mscale(factor, mscale_all_dim)²` for
    // a scaled rope with a non-zero `mscale_all_dim`; in f64, used as f32.
    let mut scale = (qk as f64).powf(-0.5);
    if let RopeScaling::Yarn {
        factor,
        mscale_all_dim: Some(all_dim),
        ..
    } = base.rope.scaling
    {
        if all_dim != 0.0 && factor > 1.0 {
            let m = 0.1 * all_dim * factor.ln() + 1.0;
            scale = scale * m * m;
        }
    }
    Ok(MlaConfig {
        q_lora_rank,
        kv_lora_rank: raw.usize_or(&["kv_lora_rank"], 512)?,
        qk_nope_head_dim: nope,
        qk_rope_head_dim: rope,
        v_head_dim: raw.usize_or(&["v_head_dim"], 128)?,
        rope_interleave: raw.bool_or(&["rope_interleave"], true)?,
        softmax_scale: scale as f32,
    })
}
