//! Architecture registry and the shared composition helpers architecture files use.
//!
//! One file per architecture: it parses its own `config.json` fields (names, aliases, class
//! defaults) into a [`ModelConfig`] and maps Hugging Face tensor names to layer roles, once, in
//! its [`NameScheme`]. Adding an architecture is one file plus one line in [`ARCHITECTURES`].
//!
//! Invariants: architecture files compose layers and never name a device or a kernel; expert
//! tensors go to the expert store, never into a layer struct; every tensor an architecture needs
//! is requested through the [`WeightSet`] (so unused tensors can be reported and missing ones are
//! errors naming the tensor).

mod deepseek_v3;
mod glm4_moe;
mod gpt_oss;
mod mixtral;
mod olmoe;
mod qwen2_moe;
mod qwen3_moe;
mod qwen3_next;

use crate::backend::Glu;
use crate::backend::RouterRule;
use crate::config::{ExpertForm, MixerKind, ModelConfig, QkNorm, RawConfig, RouterConfig, Scoring};
use crate::deltanet::GatedDeltaNet;
use crate::error::{Error, Result};
use crate::layers::{Attention, Linear, Mlp, QkNormLayer, RmsNorm, Rope};
use crate::mla::LatentAttention;
use crate::model::{DecoderLayer, Ffn, Mixer, ModelWeights};
use crate::moe::{MoeBlock, Router, SharedExpert};
use crate::store::{ExpertLayout, ExpertWeights, GateUp};
use crate::weights::{TensorRef, WeightSet};

/// A class's defaults for the group-limited router's fields.
#[derive(Clone, Copy, Debug)]
pub struct GroupDefaults {
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f64,
}

/// One supported architecture.
pub struct Arch {
    /// `model_type` in config.json; also the registry name.
    pub model_type: &'static str,
    /// `architectures[0]` class names that select it.
    pub hf_classes: &'static [&'static str],
    pub parse_config: fn(&RawConfig) -> Result<ModelConfig>,
    /// Tensor naming of this architecture.
    pub names: &'static NameScheme,
}

/// The registry: one line per architecture.
pub static ARCHITECTURES: &[&Arch] = &[
    &mixtral::ARCH,
    &qwen3_moe::ARCH,
    &qwen2_moe::ARCH,
    &olmoe::ARCH,
    &qwen3_next::ARCH,
    &glm4_moe::ARCH,
    &gpt_oss::ARCH,
    &deepseek_v3::ARCH,
];

/// Finds the architecture of a config: by `architectures[0]`, else by `model_type`.
pub fn lookup(raw: &RawConfig) -> Result<&'static Arch> {
    let classes = raw.architectures();
    let model_type = raw.model_type();
    for a in ARCHITECTURES {
        if classes.iter().any(|c| a.hf_classes.contains(&c.as_str()))
            || model_type.as_deref() == Some(a.model_type)
        {
            return Ok(a);
        }
    }
    let name = classes
        .first()
        .cloned()
        .or(model_type)
        .unwrap_or_else(|| "(config.json has neither `architectures` nor `model_type`)".into());
    Err(Error::UnknownArchitecture {
        name,
        supported: ARCHITECTURES
            .iter()
            .map(|a| a.model_type)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Hugging Face tensor names of a standard pre-norm decoder with MoE feed-forward blocks.
/// `{l}` in a template is the layer index.
pub struct NameScheme {
    pub embed: &'static str,
    pub final_norm: &'static str,
    /// Output projection module (its `.weight`).
    pub lm_head: &'static str,
    pub layer_prefix: &'static str,
    pub input_norm: &'static str,
    pub post_attention_norm: &'static str,
    /// Attention module under the layer prefix.
    pub attn: &'static str,
    /// Linear-attention module under the layer prefix (Qwen3-Next's gated DeltaNet).
    pub linear_attn: &'static str,
    pub q_norm: &'static str,
    pub k_norm: &'static str,
    /// Candidate MoE module names under the layer prefix, tried in order (checkpoints differ).
    pub moe_modules: &'static [&'static str],
    /// Router projection under the MoE module.
    pub router: &'static str,
    /// Per-expert projection names: gate, up, down (`{moe}.experts.{e}.{name}.weight`).
    pub expert_proj: [&'static str; 3],
    /// Dense MLP module and its projection names: gate, up, down.
    pub dense_mlp: &'static str,
    pub dense_proj: [&'static str; 3],
    /// Shared expert module and its sigmoid gate (Qwen2-MoE; None: ungated, as GLM-4.5's and
    /// DeepSeek-V3's `shared_experts`), under the MoE module.
    pub shared_expert: Option<(&'static str, Option<&'static str>)>,
}

impl NameScheme {
    /// The names most Hugging Face decoders use (`model.layers.{l}.self_attn.q_proj`, ...);
    /// architecture files override what differs.
    pub const HF_STANDARD: NameScheme = NameScheme {
        embed: "model.embed_tokens.weight",
        final_norm: "model.norm.weight",
        lm_head: "lm_head",
        layer_prefix: "model.layers",
        input_norm: "input_layernorm.weight",
        post_attention_norm: "post_attention_layernorm.weight",
        attn: "self_attn",
        linear_attn: "linear_attn",
        q_norm: "q_norm.weight",
        k_norm: "k_norm.weight",
        moe_modules: &["mlp"],
        router: "gate",
        expert_proj: ["gate_proj", "up_proj", "down_proj"],
        dense_mlp: "mlp",
        dense_proj: ["gate_proj", "up_proj", "down_proj"],
        shared_expert: None,
    };
}

/// Builds the whole decoder from a config and the tensors, following `names`.
pub fn build_decoder(cfg: &ModelConfig, w: &WeightSet, names: &NameScheme) -> Result<ModelWeights> {
    let h = cfg.hidden_size;
    let embed = w.compute(names.embed, &[cfg.vocab_size, h])?;
    // Tied embeddings: transformers uses the embedding matrix as the output projection (a
    // stored `lm_head.weight`, if any, is then unused and reported as such).
    let lm_head = if cfg.tie_word_embeddings {
        Linear::from_view(embed.clone())
    } else {
        Linear::load(w, names.lm_head, h, cfg.vocab_size, false)?
    };
    // Zero-centred checkpoints store `w` for a norm that scales by `1 + w`.
    let load_norm = |name: &str, dim: usize| {
        if cfg.norm_zero_centred {
            RmsNorm::load_zero_centred(w, name, dim, cfg.rms_norm_eps)
        } else {
            RmsNorm::load(w, name, dim, cfg.rms_norm_eps)
        }
    };
    let norm = load_norm(names.final_norm, h)?;
    let mut layers = Vec::with_capacity(cfg.num_layers);
    let mut experts = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let p = format!("{}.{l}", names.layer_prefix);
        check_mixer_tensors(cfg, w, names, &p, l)?;
        let mixer = match cfg.mixers[l] {
            MixerKind::Attention => match cfg.mla {
                Some(dims) => Mixer::Latent(LatentAttention::load(
                    cfg,
                    dims,
                    w,
                    &format!("{p}.{}", names.attn),
                )?),
                None => Mixer::Attention(load_attention(cfg, w, names, &p, l, &load_norm)?),
            },
            MixerKind::LinearAttention => {
                let dims = cfg.linear_attention.ok_or_else(|| {
                    Error::bad_config(
                        std::path::Path::new(w.label()).join("config.json"),
                        format!(
                            "layer {l} is linear attention but no linear_* dimensions are given"
                        ),
                    )
                })?;
                Mixer::Linear(GatedDeltaNet::load(
                    w,
                    &format!("{p}.{}", names.linear_attn),
                    h,
                    dims,
                    cfg.rms_norm_eps,
                )?)
            }
        };
        let (ffn, layer_experts) = if cfg.sparse_layers[l] {
            let (block, ex) = load_moe(cfg, w, names, &p, l)?;
            (Ffn::Moe(block), ex)
        } else {
            let mlp = Mlp::load(
                w,
                &format!("{p}.{}", names.dense_mlp),
                h,
                cfg.intermediate_size,
                names.dense_proj,
            )?;
            (Ffn::Dense(mlp), Vec::new())
        };
        layers.push(DecoderLayer {
            input_norm: load_norm(&format!("{p}.{}", names.input_norm), h)?,
            mixer,
            post_norm: load_norm(&format!("{p}.{}", names.post_attention_norm), h)?,
            ffn,
        });
        experts.push(layer_experts);
    }
    Ok(ModelWeights {
        embed,
        layers,
        norm,
        lm_head,
        experts,
    })
}

/// Softmax attention of layer `l` (`{prefix}.{names.attn}`).
fn load_attention(
    cfg: &ModelConfig,
    w: &WeightSet,
    names: &NameScheme,
    layer_prefix: &str,
    l: usize,
    load_norm: &dyn Fn(&str, usize) -> Result<RmsNorm>,
) -> Result<Attention> {
    let h = cfg.hidden_size;
    let a = format!("{layer_prefix}.{}", names.attn);
    let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let qk_norm = match cfg.qk_norm {
        QkNorm::None => QkNormLayer::None,
        QkNorm::PerHead => QkNormLayer::PerHead {
            q: load_norm(&format!("{a}.{}", names.q_norm), hd)?,
            k: load_norm(&format!("{a}.{}", names.k_norm), hd)?,
        },
        QkNorm::FullWidth => QkNormLayer::FullWidth {
            q: load_norm(&format!("{a}.{}", names.q_norm), nh * hd)?,
            k: load_norm(&format!("{a}.{}", names.k_norm), nkv * hd)?,
        },
    };
    // With an output gate, q_proj yields a query and a gate per head.
    let q_out = if cfg.attn_output_gate {
        2 * nh * hd
    } else {
        nh * hd
    };
    Ok(Attention {
        q_proj: Linear::load(w, &format!("{a}.q_proj"), h, q_out, cfg.qkv_bias)?,
        k_proj: Linear::load(w, &format!("{a}.k_proj"), h, nkv * hd, cfg.qkv_bias)?,
        v_proj: Linear::load(w, &format!("{a}.v_proj"), h, nkv * hd, cfg.qkv_bias)?,
        o_proj: Linear::load(w, &format!("{a}.o_proj"), nh * hd, h, cfg.o_bias)?,
        qk_norm,
        clip_qkv: cfg.clip_qkv,
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
        sliding_window: cfg.sliding_window.get(l).copied().flatten(),
        rope: Rope::new(&cfg.rope, cfg.head_dim),
        output_gate: cfg.attn_output_gate,
        sinks: if cfg.attention_sinks {
            Some(w.compute(&format!("{a}.sinks"), &[nh])?.to_f32_vec()?)
        } else {
            None
        },
    })
}

/// In hybrid models, the mixer the config gives layer `l` must be the one its tensors are for:
/// a disagreement (a wrong `layer_types` or `full_attention_interval`) is named as such rather
/// than as a missing tensor.
fn check_mixer_tensors(
    cfg: &ModelConfig,
    w: &WeightSet,
    names: &NameScheme,
    layer_prefix: &str,
    l: usize,
) -> Result<()> {
    if w.is_virtual() || cfg.linear_attention.is_none() {
        return Ok(());
    }
    let attn = format!("{layer_prefix}.{}.q_proj.weight", names.attn);
    let linear = format!("{layer_prefix}.{}.in_proj_qkvz.weight", names.linear_attn);
    let (said, found) = match cfg.mixers[l] {
        MixerKind::Attention if !w.contains(&attn) && w.contains(&linear) => {
            ("full_attention", linear)
        }
        MixerKind::LinearAttention if !w.contains(&linear) && w.contains(&attn) => {
            ("linear_attention", attn)
        }
        _ => return Ok(()),
    };
    Err(Error::bad_config(
        std::path::Path::new(w.label()).join("config.json"),
        format!(
            "layer {l} is {said} by `layer_types` / `full_attention_interval`, but the \
             checkpoint holds `{found}` there: the config does not match the weights"
        ),
    ))
}

/// Loads a sparse block's router (+ shared expert) and its experts, per-expert or fused layout.
fn load_moe(
    cfg: &ModelConfig,
    w: &WeightSet,
    names: &NameScheme,
    layer_prefix: &str,
    layer: usize,
) -> Result<(MoeBlock, Vec<ExpertWeights>)> {
    let h = cfg.hidden_size;
    let e_count = cfg.router.num_experts;
    let inter = cfg.moe_intermediate_size;
    // The first candidate module whose router exists (Hub vs transformers 5 names).
    let module = names
        .moe_modules
        .iter()
        .map(|m| format!("{layer_prefix}.{m}"))
        .find(|m| w.contains(&format!("{m}.{}.weight", names.router)))
        .unwrap_or_else(|| format!("{layer_prefix}.{}", names.moe_modules[0]));
    let router_name = format!("{module}.{}", names.router);
    let selection_bias = if cfg.router.selection_bias {
        let name = format!("{router_name}.e_score_correction_bias");
        Some(w.compute(&name, &[e_count])?.to_f32_vec()?)
    } else {
        None
    };
    let router = Router {
        gate: Linear::load(w, &router_name, h, e_count, cfg.router.bias)?,
        rule: RouterRule::from(&cfg.router),
        selection_bias,
    };
    let [g, u, d] = names.expert_proj;
    let fused_gate_up = format!("{module}.experts.gate_up_proj");
    let experts = if let ExpertForm::InterleavedClamped { limit, alpha } = cfg.expert_form {
        // gpt-oss: gate_up [E, 2I, H] with alternating gate / up rows, down [E, H, I], and
        // their biases [E, 2I] / [E, H].
        let layout = ExpertLayout {
            hidden: h,
            inter,
            gate_up: GateUp::FusedInterleaved,
            bias: true,
            glu: Glu::ClampedSwiGlu { limit, alpha },
        };
        let gate_up = released_expert(w, &fused_gate_up, [e_count, 2 * inter, h])?;
        let down = released_expert(
            w,
            &format!("{module}.experts.down_proj"),
            [e_count, h, inter],
        )?;
        let gate_up_bias = w.compute(&format!("{fused_gate_up}_bias"), &[e_count, 2 * inter])?;
        let down_bias = w.compute(&format!("{module}.experts.down_proj_bias"), &[e_count, h])?;
        (0..e_count)
            .map(|e| {
                ExpertWeights::new(
                    layout,
                    vec![
                        gate_up.index(e),
                        down.index(e),
                        gate_up_bias.index(e),
                        down_bias.index(e),
                    ],
                )
            })
            .collect()
    } else if w.contains(&fused_gate_up) {
        // Separate gate, up and down, no biases, SwiGLU (the fused checkpoint layout is split
        // into two row views, so nothing else moves).
        let layout = ExpertLayout::swiglu(h, inter);
        // transformers 5 layout: gate_up [E, 2I, H] (gate rows first), down [E, H, I].
        let gate_up = w.compute(&fused_gate_up, &[e_count, 2 * inter, h])?;
        let down = w.compute(&format!("{module}.experts.down_proj"), &[e_count, h, inter])?;
        (0..e_count)
            .map(|e| {
                let gu = gate_up.index(e);
                ExpertWeights::new(
                    layout,
                    vec![gu.narrow(0, inter), gu.narrow(inter, inter), down.index(e)],
                )
            })
            .collect()
    } else {
        let layout = ExpertLayout::swiglu(h, inter);
        (0..e_count)
            .map(|e| {
                let p = format!("{module}.experts.{e}");
                Ok(ExpertWeights::new(
                    layout,
                    vec![
                        w.compute(&format!("{p}.{g}.weight"), &[inter, h])?,
                        w.compute(&format!("{p}.{u}.weight"), &[inter, h])?,
                        w.compute(&format!("{p}.{d}.weight"), &[h, inter])?,
                    ],
                ))
            })
            .collect::<Result<Vec<_>>>()?
    };
    let shared = match names.shared_expert {
        Some((mlp_name, gate_name)) if cfg.shared_expert_intermediate_size > 0 => {
            Some(SharedExpert {
                mlp: Mlp::load(
                    w,
                    &format!("{module}.{mlp_name}"),
                    h,
                    cfg.shared_expert_intermediate_size,
                    names.dense_proj,
                )?,
                gate: gate_name
                    .map(|g| Linear::load(w, &format!("{module}.{g}"), h, 1, false))
                    .transpose()?,
            })
        }
        _ => None,
    };
    Ok((
        MoeBlock {
            layer,
            router,
            shared,
        },
        experts,
    ))
}

/// One of gpt-oss's expert weights as `shape` (`[E, rows, K]`, out-major): the release stores
/// it as an MXFP4 pair (`<name>_blocks` / `<name>_scales`), opened by the weights layer; a
/// dequantized export stores a float tensor input-major (`[E, K, rows]`, as transformers holds
/// it in memory), which loading transposes.
fn released_expert(w: &WeightSet, name: &str, shape: [usize; 3]) -> Result<TensorRef> {
    if !w.contains(&format!("{name}_blocks")) && w.contains(name) {
        return w.transposed(name, &shape);
    }
    w.compute(name, &shape)
}

/// Which layers are sparse under Qwen's rule: not in `mlp_only_layers` and
/// `(l + 1) % decoder_sparse_step == 0` (with at least one expert).
pub fn qwen_sparse_layers(
    raw: &RawConfig,
    num_layers: usize,
    num_experts: usize,
) -> Result<Vec<bool>> {
    let step = raw.usize_or(&["decoder_sparse_step"], 1)?;
    let mlp_only = raw.usize_list(&["mlp_only_layers"])?;
    Ok((0..num_layers)
        .map(|l| !mlp_only.contains(&l) && num_experts > 0 && step > 0 && (l + 1) % step == 0)
        .collect())
}

/// The sigmoid router GLM-4.5 and DeepSeek-V3 share: scores are `sigmoid(logit)`, experts are
/// chosen by score plus the router's `e_score_correction_bias` among the best `topk_group` of
/// `n_group` groups, and the chosen scores (renormalised when `norm_topk_prob`) are multiplied by
/// `routed_scaling_factor`. `base` holds the expert count, top-k and renormalisation; `defaults`
/// the class's values for the fields a config leaves out.
pub fn biased_sigmoid_router(
    raw: &RawConfig,
    base: RouterConfig,
    defaults: GroupDefaults,
) -> Result<RouterConfig> {
    let (e, k) = (base.num_experts, base.top_k);
    let n_group = raw.usize_or(&["n_group"], defaults.n_group)?;
    let topk_group = raw.usize_or(&["topk_group"], defaults.topk_group)?;
    let scale = raw.f64_or(&["routed_scaling_factor"], defaults.routed_scaling_factor)?;
    let bad = |reason: String| Err(Error::bad_config(&raw.path, reason));
    if n_group == 0 || !e.is_multiple_of(n_group) {
        return bad(format!(
            "field `n_group` is {n_group}: it must divide the {e} routed experts into equal groups"
        ));
    }
    if topk_group == 0 || topk_group > n_group {
        return bad(format!(
            "field `topk_group` is {topk_group}: it must be between 1 and `n_group` ({n_group})"
        ));
    }
    let eligible = topk_group * (e / n_group);
    if k > eligible {
        return bad(format!(
            "field `num_experts_per_tok` is {k}, but the {topk_group} kept groups of `topk_group` \
             hold only {eligible} experts"
        ));
    }
    if !(scale.is_finite() && scale > 0.0) {
        return bad(format!(
            "field `routed_scaling_factor` is {scale}: it must be a positive number"
        ));
    }
    Ok(RouterConfig {
        scoring: Scoring::Sigmoid,
        groups: (n_group > 1 && topk_group < n_group).then_some((n_group, topk_group)),
        scale: scale as f32,
        selection_bias: true,
        ..base
    })
}

/// `layer_types` if the config gives it, one entry per layer (another count is an error naming
/// the field).
pub fn layer_types(raw: &RawConfig, layers: usize) -> Result<Option<Vec<String>>> {
    let Some(types) = raw.opt_str_list(&["layer_types"])? else {
        return Ok(None);
    };
    if types.len() != layers {
        return Err(Error::bad_config(
            &raw.path,
            format!(
                "field `layer_types` has {} entries for {layers} layers",
                types.len()
            ),
        ));
    }
    Ok(Some(types))
}

/// Per-layer attention windows from `layer_types` (`sliding_attention` takes `window`,
/// `full_attention` none), or None when the config has no `layer_types`. A list of the wrong
/// length or naming another kind is an error naming the field.
pub fn layer_windows(
    raw: &RawConfig,
    layers: usize,
    window: Option<usize>,
) -> Result<Option<Vec<Option<usize>>>> {
    let Some(types) = layer_types(raw, layers)? else {
        return Ok(None);
    };
    types
        .iter()
        .enumerate()
        .map(|(l, t)| match t.as_str() {
            "sliding_attention" => Ok(window),
            "full_attention" => Ok(None),
            other => Err(Error::bad_config(
                &raw.path,
                format!(
                    "field `layer_types` names `{other}` for layer {l}: the layers of this \
                     architecture are `sliding_attention` or `full_attention`"
                ),
            )),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// `head_dim` if given (not null), else hidden / heads.
pub fn head_dim(raw: &RawConfig, hidden: usize, heads: usize) -> Result<usize> {
    match raw.opt_usize(&["head_dim"])? {
        Some(d) => Ok(d),
        None if heads > 0 && hidden.is_multiple_of(heads) => Ok(hidden / heads),
        None => Err(Error::bad_config(
            &raw.path,
            format!("hidden_size {hidden} is not divisible by num_attention_heads {heads} and no head_dim is given"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn raw(s: &str) -> RawConfig {
        RawConfig::parse(PathBuf::from("config.json"), s.as_bytes()).unwrap()
    }

    #[test]
    fn lookup_by_class_or_type_and_unknown() {
        assert_eq!(
            lookup(&raw(r#"{"architectures": ["MixtralForCausalLM"]}"#))
                .unwrap()
                .model_type,
            "mixtral"
        );
        assert_eq!(
            lookup(&raw(r#"{"model_type": "olmoe"}"#))
                .unwrap()
                .model_type,
            "olmoe"
        );
        let e = lookup(&raw(
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#,
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("LlamaForCausalLM") && e.contains("qwen3_moe"),
            "{e}"
        );
    }

    #[test]
    fn sparse_rule() {
        let r = raw(r#"{"decoder_sparse_step": 2, "mlp_only_layers": [3]}"#);
        assert_eq!(
            qwen_sparse_layers(&r, 4, 8).unwrap(),
            vec![false, true, false, false]
        );
        let r = raw(r#"{"mlp_only_layers": null}"#);
        assert_eq!(qwen_sparse_layers(&r, 2, 8).unwrap(), vec![true, true]);
    }
}
