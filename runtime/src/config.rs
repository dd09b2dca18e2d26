//! Hugging Face `config.json` / `generation_config.json`, read leniently.
//!
//! [`RawConfig`] gives typed, null-tolerant access to the JSON with the field name in every error;
//! each architecture file turns it into the normalised [`ModelConfig`] the layers are built from.
//! [`ModelConfig::common`] reads the fields every architecture shares, once, with the class
//! defaults the architecture gives in [`CommonDefaults`]; the architecture file then states only
//! what differs (its own fields, aliases and transformers' class defaults).
//!
//! Invariants: an absent or `null` optional field takes the transformers class default; a missing
//! required field is an error naming it; both config styles (the Hub's `rope_theta`/`rope_scaling`/
//! `torch_dtype` and transformers 5's `rope_parameters`/`dtype`) give the same `ModelConfig`; a
//! field every architecture has is read in [`ModelConfig::common`] alone, and a new
//! `ModelConfig` field gets its neutral value there. The context-length rule
//! ([`context_tokens`]) lives here, below the run configuration and the opening path that both
//! apply it.

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A named bound on one size field of config.json.
#[derive(Clone, Copy, Debug)]
pub struct SizeLimit {
    /// The JSON keys it bounds (aliases included).
    pub keys: &'static [&'static str],
    /// Largest accepted value.
    pub max: usize,
    /// Name of the limit in messages.
    pub name: &'static str,
}

// The limits sit 8x or more above the largest released model in each dimension (Qwen3-Next-80B:
// 48 layers, 512 experts; DeepSeek-V3 / Kimi-K2: 61 layers, 256-384 experts, hidden 7168, vocab
// 163,840; Llama-style vocab 256k; contexts up to 10M tokens) and far below sizes whose per-layer
// or per-expert bookkeeping alone would exhaust memory.
/// Decoder layers (largest released MoE: 94).
pub const MAX_LAYERS: usize = 1024;
/// Model width (largest released: 16,384).
pub const MAX_HIDDEN_SIZE: usize = 131_072;
/// Attention heads, query or key/value (largest released: 128).
pub const MAX_HEADS: usize = 2048;
/// Width of one attention head (largest released: 256).
pub const MAX_HEAD_DIM: usize = 4096;
/// Routed experts per layer (largest released: 512).
pub const MAX_EXPERTS: usize = 16_384;
/// Experts over all layers (largest released: 61 x 384 = 23,424): each one is a set of tensor
/// views built at open, so this bounds the memory of opening a config alone.
pub const MAX_TOTAL_EXPERTS: usize = 262_144;
/// Any MLP or expert width (largest released: 53,248).
pub const MAX_INTERMEDIATE_SIZE: usize = 1 << 20;
/// Vocabulary entries (largest released: 262,144).
pub const MAX_VOCAB_SIZE: usize = 1 << 23;
/// Positions, context and window lengths (largest released: 10M).
pub const MAX_POSITIONS: usize = 1 << 28;
/// Taps of the linear-attention convolution (released: 4).
pub const MAX_CONV_KERNEL: usize = 1024;

/// Default context cap when none is set: long enough for real prompts, small enough that the
/// KV cache of a big model stays modest.
pub const DEFAULT_MAX_CONTEXT_TOKENS: usize = 4096;

/// The longest sequence a model is run with: `max_context` when set, else
/// min(`max_position_embeddings`, [`DEFAULT_MAX_CONTEXT_TOKENS`]) (at least 1). The one rule
/// behind `Settings::max_context_for` and `RunConfig::max_context_for`.
pub fn context_tokens(max_context: Option<usize>, max_position_embeddings: usize) -> usize {
    max_context.unwrap_or_else(|| max_position_embeddings.clamp(1, DEFAULT_MAX_CONTEXT_TOKENS))
}

/// Every size field of the configs and its limit, checked as the field is read.
pub static SIZE_LIMITS: &[SizeLimit] = &[
    SizeLimit {
        keys: &["num_hidden_layers"],
        max: MAX_LAYERS,
        name: "MAX_LAYERS",
    },
    SizeLimit {
        keys: &["hidden_size"],
        max: MAX_HIDDEN_SIZE,
        name: "MAX_HIDDEN_SIZE",
    },
    SizeLimit {
        keys: &[
            "num_attention_heads",
            "num_key_value_heads",
            "linear_num_key_heads",
            "linear_num_value_heads",
        ],
        max: MAX_HEADS,
        name: "MAX_HEADS",
    },
    SizeLimit {
        keys: &["head_dim", "linear_key_head_dim", "linear_value_head_dim"],
        max: MAX_HEAD_DIM,
        name: "MAX_HEAD_DIM",
    },
    SizeLimit {
        keys: &[
            "num_experts",
            "num_local_experts",
            "n_routed_experts",
            "num_experts_per_tok",
        ],
        max: MAX_EXPERTS,
        name: "MAX_EXPERTS",
    },
    SizeLimit {
        keys: &[
            "intermediate_size",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
        ],
        max: MAX_INTERMEDIATE_SIZE,
        name: "MAX_INTERMEDIATE_SIZE",
    },
    SizeLimit {
        keys: &["vocab_size"],
        max: MAX_VOCAB_SIZE,
        name: "MAX_VOCAB_SIZE",
    },
    SizeLimit {
        keys: &[
            "max_position_embeddings",
            "original_max_position_embeddings",
            "sliding_window",
            "max_window_layers",
            "max_new_tokens",
        ],
        max: MAX_POSITIONS,
        name: "MAX_POSITIONS",
    },
    SizeLimit {
        keys: &["linear_conv_kernel_dim"],
        max: MAX_CONV_KERNEL,
        name: "MAX_CONV_KERNEL",
    },
];

/// The limit on size field `key`, if it is one.
pub fn size_limit(key: &str) -> Option<&'static SizeLimit> {
    SIZE_LIMITS.iter().find(|l| l.keys.contains(&key))
}

/// Typed access to one JSON config file.
#[derive(Clone, Debug)]
pub struct RawConfig {
    pub path: PathBuf,
    pub map: Map<String, Value>,
    /// Where `map` sits in the file (`"rope_scaling."` for a nested object, else empty): errors
    /// name fields with it.
    pub scope: String,
}

impl RawConfig {
    pub fn parse(path: PathBuf, bytes: &[u8]) -> Result<RawConfig> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            // Python's json writes NaN and Infinity, which JSON has no numbers for.
            let text = String::from_utf8_lossy(bytes);
            let hint = if ["NaN", "Infinity"].iter().any(|w| text.contains(w)) {
                " (NaN and Infinity are not numbers in JSON; every value must be finite)"
            } else {
                ""
            };
            Error::bad_config(&path, format!("not valid JSON: {e}{hint}"))
        })?;
        match v {
            Value::Object(map) => Ok(RawConfig {
                path,
                map,
                scope: String::new(),
            }),
            _ => Err(Error::bad_config(&path, "top level is not a JSON object")),
        }
    }

    /// The value of the first present, non-null key among `keys`.
    pub fn value(&self, keys: &[&str]) -> Option<&Value> {
        self.entry(keys).map(|(_, v)| v)
    }

    /// Whether `key` is present with the value null (which some fields use to switch a part
    /// off, as `q_lora_rank` does, where absent means the class default).
    pub fn is_null(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(Value::is_null)
    }

    /// The first present, non-null key among `keys` and its value.
    fn entry<'k>(&self, keys: &[&'k str]) -> Option<(&'k str, &Value)> {
        keys.iter()
            .filter_map(|k| self.map.get(*k).map(|v| (*k, v)))
            .find(|(_, v)| !v.is_null())
    }

    fn wrong(&self, key: &str, what: &str) -> Error {
        Error::bad_config(
            &self.path,
            format!("field `{}{key}` must be {what}", self.scope),
        )
    }

    fn missing(&self, keys: &[&str]) -> Error {
        Error::MissingField {
            path: self.path.clone(),
            field: keys
                .iter()
                .map(|k| format!("{}{k}", self.scope))
                .collect::<Vec<_>>()
                .join("` or `"),
        }
    }

    /// A non-negative integer; a size field (see [`SIZE_LIMITS`]) above its limit is an error
    /// naming the field, its value and the limit.
    pub fn opt_usize(&self, keys: &[&str]) -> Result<Option<usize>> {
        let Some((key, v)) = self.entry(keys) else {
            return Ok(None);
        };
        let u = v
            .as_u64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64)
                    .map(|f| f as u64)
            })
            .ok_or_else(|| self.wrong(key, "a non-negative integer"))?;
        if let Some(limit) = size_limit(key) {
            if u > limit.max as u64 {
                return Err(Error::bad_config(
                    &self.path,
                    format!(
                        "field `{}{key}` is {u}, above the limit of {} ({}); no real model \
                         is this large, so the file is likely damaged",
                        self.scope, limit.max, limit.name
                    ),
                ));
            }
        }
        usize::try_from(u)
            .map(Some)
            .map_err(|_| self.wrong(key, "an integer this machine can address"))
    }

    pub fn usize(&self, keys: &[&str]) -> Result<usize> {
        self.opt_usize(keys)?.ok_or_else(|| self.missing(keys))
    }

    pub fn usize_or(&self, keys: &[&str], default: usize) -> Result<usize> {
        Ok(self.opt_usize(keys)?.unwrap_or(default))
    }

    /// A finite number.
    pub fn opt_f64(&self, keys: &[&str]) -> Result<Option<f64>> {
        match self.entry(keys) {
            None => Ok(None),
            Some((key, v)) => v
                .as_f64()
                .filter(|f| f.is_finite())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a finite number")),
        }
    }

    /// A finite number above 0 (absent: `None`).
    pub fn opt_positive_f64(&self, keys: &[&str]) -> Result<Option<f64>> {
        match self.opt_f64(keys)? {
            Some(x) if x <= 0.0 => Err(self.wrong(
                self.entry(keys).map_or(keys[0], |(k, _)| k),
                &format!("a finite number above 0 (got {x})"),
            )),
            x => Ok(x),
        }
    }

    pub fn f64_or(&self, keys: &[&str], default: f64) -> Result<f64> {
        Ok(self.opt_f64(keys)?.unwrap_or(default))
    }

    pub fn bool_or(&self, keys: &[&str], default: bool) -> Result<bool> {
        match self.value(keys) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.wrong(keys[0], "true or false")),
        }
    }

    pub fn opt_str(&self, keys: &[&str]) -> Result<Option<&str>> {
        match self.value(keys) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong(keys[0], "a string")),
        }
    }

    /// A list of integers (absent or null -> empty).
    pub fn usize_list(&self, keys: &[&str]) -> Result<Vec<usize>> {
        match self.value(keys) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().and_then(|u| usize::try_from(u).ok()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| self.wrong(keys[0], "a list of integers")),
            Some(_) => Err(self.wrong(keys[0], "a list of integers")),
        }
    }

    /// A list of strings (absent or null -> None).
    pub fn opt_str_list(&self, keys: &[&str]) -> Result<Option<Vec<String>>> {
        match self.value(keys) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| self.wrong(keys[0], "a list of strings")),
            Some(_) => Err(self.wrong(keys[0], "a list of strings")),
        }
    }

    /// Token ids that may be an int or a list of ints (`eos_token_id`), each below 2^32.
    pub fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let id = |x: &Value| x.as_u64().and_then(|u| u32::try_from(u).ok());
        let what = "a token id (0 to 4294967295) or a list of them";
        match self.value(&[key]) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(id)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| self.wrong(key, what)),
            Some(v) => id(v).map(|u| vec![u]).ok_or_else(|| self.wrong(key, what)),
        }
    }

    /// The architecture name: `architectures[0]`, else `model_type`.
    pub fn model_type(&self) -> Option<String> {
        self.map
            .get("model_type")
            .and_then(|v| v.as_str())
            .map(str::to_string)
    }

    pub fn architectures(&self) -> Vec<String> {
        self.map
            .get("architectures")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Rotary position embedding variants (transformers' `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    /// NTK-aware dynamic scaling; identical to `Default` up to `max_position_embeddings`.
    Dynamic {
        factor: f64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        attention_factor: Option<f64>,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
    /// Fraction of the head dimension that is rotated.
    pub partial_rotary_factor: f64,
}

impl RopeConfig {
    /// Dimensions of a `head_dim`-wide head that are rotated (transformers:
    /// `int(head_dim * partial_rotary_factor)`).
    pub fn rotary_dim(&self, head_dim: usize) -> usize {
        ((head_dim as f64) * self.partial_rotary_factor) as usize
    }

    /// Reads rope settings in either style: `rope_parameters` (transformers 5) or `rope_theta` +
    /// `rope_scaling` (the Hub's). `default_theta` is the class default when none is given.
    pub fn parse(raw: &RawConfig, default_theta: f64) -> Result<RopeConfig> {
        Self::parse_with(raw, default_theta, 1.0)
    }

    /// [`RopeConfig::parse`] for a class whose `partial_rotary_factor` defaults to
    /// `default_partial` (GLM-4.5: 0.5) rather than 1.
    pub fn parse_with(
        raw: &RawConfig,
        default_theta: f64,
        default_partial: f64,
    ) -> Result<RopeConfig> {
        let params = raw.entry(&["rope_parameters", "rope_scaling"]);
        let mut scope = params.map_or("rope_parameters", |(k, _)| k).to_string();
        let mut obj = match params.map(|(_, v)| v.clone()) {
            None => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(raw.wrong(&scope, "an object")),
        };
        // Per-layer-type nesting (`{"full_attention": {...}}`): all our architectures use one.
        if let Some(Value::Object(inner)) = obj.get("full_attention").cloned() {
            obj = inner;
            scope.push_str(".full_attention");
        }
        let sub = RawConfig {
            path: raw.path.clone(),
            map: obj,
            scope: format!("{scope}."),
        };
        // Where a key is found decides which name an error gives it.
        let theta = match sub.opt_positive_f64(&["rope_theta"])? {
            Some(t) => t,
            None => match raw.opt_positive_f64(&["rope_theta"])? {
                Some(t) => t,
                None => default_theta,
            },
        };
        let partial_rotary_factor = match sub.opt_f64(&["partial_rotary_factor"])? {
            Some(p) => p,
            None => raw.f64_or(&["partial_rotary_factor"], default_partial)?,
        };
        if !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
            return Err(raw.wrong(
                "partial_rotary_factor",
                &format!(
                    "a fraction of the head dimension above 0 and at most 1 (got \
                     {partial_rotary_factor})"
                ),
            ));
        }
        let kind = sub
            .opt_str(&["rope_type", "type"])?
            .unwrap_or("default")
            .to_string();
        let max_pos = raw.opt_usize(&["max_position_embeddings"])?;
        let orig = |sub: &RawConfig| -> Result<usize> {
            let o = match sub.opt_usize(&["original_max_position_embeddings"])? {
                Some(o) => o,
                None => match raw.opt_usize(&["original_max_position_embeddings"])? {
                    Some(o) => o,
                    None => max_pos.ok_or_else(|| raw.missing(&["max_position_embeddings"]))?,
                },
            };
            if o == 0 {
                return Err(sub.wrong(
                    "original_max_position_embeddings",
                    "above 0 (it, or max_position_embeddings it defaults to, is 0)",
                ));
            }
            Ok(o)
        };
        // Every scaling factor divides or scales the frequencies: 0, negative or non-finite
        // would turn them into NaN or infinity.
        let factor = |sub: &RawConfig| -> Result<f64> {
            sub.opt_positive_f64(&["factor"])?
                .ok_or_else(|| sub.missing(&["factor"]))
        };
        // YaRN's betas: absent or 0 take the default; a negative one has no logarithm.
        let beta = |sub: &RawConfig, key: &str, default: f64| -> Result<f64> {
            match sub.opt_f64(&[key])? {
                None | Some(0.0) => Ok(default),
                Some(b) if b > 0.0 => Ok(b),
                Some(b) => Err(sub.wrong(key, &format!("a finite number above 0 (got {b})"))),
            }
        };
        let scaling = match kind.as_str() {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: factor(&sub)?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: factor(&sub)?,
            },
            "yarn" => {
                let original = orig(&sub)?;
                let factor = match sub.opt_positive_f64(&["factor"])? {
                    Some(f) => f,
                    None => max_pos.unwrap_or(original) as f64 / original as f64,
                };
                if factor <= 0.0 {
                    return Err(sub.wrong("factor", "a finite number above 0"));
                }
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    attention_factor: sub.opt_positive_f64(&["attention_factor"])?,
                    // transformers: `get("beta_fast") or 32` (0 also means the default)
                    beta_fast: beta(&sub, "beta_fast", 32.0)?,
                    beta_slow: beta(&sub, "beta_slow", 1.0)?,
                    mscale: sub.opt_f64(&["mscale"])?,
                    mscale_all_dim: sub.opt_f64(&["mscale_all_dim"])?,
                    truncate: sub.bool_or(&["truncate"], true)?,
                }
            }
            "llama3" => {
                let low_freq_factor = sub.opt_positive_f64(&["low_freq_factor"])?.unwrap_or(1.0);
                let high_freq_factor = sub.opt_positive_f64(&["high_freq_factor"])?.unwrap_or(4.0);
                if high_freq_factor <= low_freq_factor {
                    return Err(sub.wrong(
                        "high_freq_factor",
                        &format!(
                            "above low_freq_factor {low_freq_factor} (got {high_freq_factor})"
                        ),
                    ));
                }
                RopeScaling::Llama3 {
                    factor: factor(&sub)?,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: orig(&sub)?,
                }
            }
            other => {
                return Err(Error::bad_config(
                    &raw.path,
                    format!(
                    "rope type `{other}` is not supported (default, linear, dynamic, yarn, llama3)"
                ),
                ))
            }
        };
        Ok(RopeConfig {
            theta,
            scaling,
            partial_rotary_factor,
        })
    }
}

/// How q and k are normalised before rotary embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// RMSNorm over each head's `head_dim` (Qwen3).
    PerHead,
    /// RMSNorm over the full projection width (OLMoE).
    FullWidth,
}

/// The token mixer of one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MixerKind {
    /// Softmax self-attention over a KV cache.
    Attention,
    /// Gated DeltaNet linear attention over a fixed-size recurrent state (Qwen3-Next).
    LinearAttention,
}

/// Dimensions of gated DeltaNet linear-attention layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearAttentionConfig {
    pub num_key_heads: usize,
    pub num_value_heads: usize,
    pub key_head_dim: usize,
    pub value_head_dim: usize,
    /// Taps of the depthwise causal convolution over q, k and v.
    pub conv_kernel: usize,
}

impl LinearAttentionConfig {
    /// Channels of the convolution: q and k (all key heads) then v (all value heads).
    pub fn conv_dim(&self) -> usize {
        2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim
    }

    /// f32 values of one layer's per-sequence state: the convolution's last `conv_kernel - 1`
    /// input rows and one `[key_head_dim, value_head_dim]` matrix per value head.
    pub fn state_floats(&self) -> usize {
        (self.conv_kernel.saturating_sub(1)) * self.conv_dim()
            + self.num_value_heads * self.key_head_dim * self.value_head_dim
    }
}

/// How router logits become scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// Softmax over all experts, then selection (Mixtral, Qwen, OLMoE).
    Softmax,
    /// Selection on the raw logits, then softmax over the selected ones (gpt-oss).
    TopKThenSoftmax,
    /// `sigmoid(logit)` per expert (DeepSeek-V3, GLM-4.5).
    Sigmoid,
}

/// Routing rule of a sparse MoE layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Renormalise the top-k probabilities to sum to 1.
    pub norm_topk_prob: bool,
    /// How logits become scores (softmax unless the architecture says otherwise).
    pub scoring: Scoring,
    /// Group-limited selection `(n_group, topk_group)`; None: every expert competes.
    pub groups: Option<(usize, usize)>,
    /// Multiplies the final weights (`routed_scaling_factor`; 1 otherwise).
    pub scale: f32,
    /// The router carries a per-expert selection bias (`e_score_correction_bias`), added to the
    /// scores when choosing experts only.
    pub selection_bias: bool,
    /// The router projection has a bias (gpt-oss).
    pub bias: bool,
}

/// How an architecture stores and activates its experts (the expert store's layout is built
/// from it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ExpertForm {
    /// Gate, up and down (or transformers 5's fused gate_up, gate rows first), SwiGLU, no biases.
    SwiGlu,
    /// gpt-oss: one gate_up whose rows alternate gate and up, biases on gate_up and down, and
    /// the clamped SwiGLU (`swiglu_limit`, `swiglu_alpha`).
    InterleavedClamped { limit: f32, alpha: f32 },
}

/// Multi-head latent attention (DeepSeek-V2 / V3, Kimi-K2): queries through an optional latent
/// (`q_a_proj` → `q_a_layernorm` → `q_b_proj`, else one `q_proj`), keys and values through one
/// shared latent (`kv_a_proj_with_mqa` → `kv_a_layernorm`, expanded per head by `kv_b_proj`),
/// a rope key shared by every head, and head widths that differ. The model's `head_dim` is the
/// rope width (as transformers sets it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MlaConfig {
    /// Width of the query latent; None: queries come from one `q_proj`.
    pub q_lora_rank: Option<usize>,
    /// Width of the key/value latent the cache keeps.
    pub kv_lora_rank: usize,
    /// Per-head query / key width without rope.
    pub qk_nope_head_dim: usize,
    /// Per-head query / key width with rope (the one shared rope key is this wide).
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Rope turns adjacent pairs (`rope_interleave`).
    pub rope_interleave: bool,
    /// The softmax scale: `(qk_nope_head_dim + qk_rope_head_dim)^-1/2`, times YaRN's
    /// `mscale(factor, mscale_all_dim)²` when the rope is YaRN with `mscale_all_dim`.
    pub softmax_scale: f32,
}

impl MlaConfig {
    /// Values one attention layer caches per token: the latent and the rope key.
    pub fn cached_values(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }
}

/// The normalised description every architecture file produces.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Registry name of the architecture (`model_type`).
    pub arch: &'static str,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Dense MLP width (dense layers among sparse ones); 0 if none.
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    pub router: RouterConfig,
    /// Per layer: is the FFN a sparse MoE block?
    pub sparse_layers: Vec<bool>,
    /// Qwen2-MoE's always-on shared expert width (0 if none).
    pub shared_expert_intermediate_size: usize,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    pub clip_qkv: Option<f32>,
    /// Per layer: attention window in tokens (None = full causal).
    pub sliding_window: Vec<Option<usize>>,
    /// Per layer: its token mixer.
    pub mixers: Vec<MixerKind>,
    /// Dimensions of the linear-attention layers (Some when any layer is one).
    pub linear_attention: Option<LinearAttentionConfig>,
    /// Full attention's `q_proj` also yields a per-head output gate: the attention output is
    /// multiplied by `sigmoid(gate)` before `o_proj` (Qwen3-Next).
    pub attn_output_gate: bool,
    /// RMSNorm weights are stored zero-centred: the norm scales by `1 + w` (Qwen3-Next).
    pub norm_zero_centred: bool,
    /// Attention layers carry one learned sink logit per head (`self_attn.sinks`, gpt-oss).
    pub attention_sinks: bool,
    /// Attention layers are multi-head latent attention with these dimensions.
    pub mla: Option<MlaConfig>,
    /// How the experts are stored and activated.
    pub expert_form: ExpertForm,
    pub hidden_act: String,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// An architecture's class defaults for the fields every architecture shares (transformers'
/// `*Config.__init__` defaults), the input of [`ModelConfig::common`].
#[derive(Clone, Copy, Debug)]
pub struct CommonDefaults {
    /// `num_attention_heads` when absent; `None`: the field is required.
    pub num_heads: Option<usize>,
    /// `num_key_value_heads` when absent; `None`: `num_attention_heads` (no grouping).
    pub num_kv_heads: Option<usize>,
    /// The class's rule for `head_dim` given the raw config, `hidden_size` and the head count
    /// (most derive it as hidden / heads when absent; some have a fixed default).
    pub head_dim: fn(&RawConfig, usize, usize) -> Result<usize>,
    /// `vocab_size` when absent; `None`: the field is required.
    pub vocab_size: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    /// `rope_theta` when neither style of rope settings gives one.
    pub rope_theta: f64,
    /// `Some(default)`: q, k, v and o biases all follow `attention_bias`; `None`: the class has
    /// no such field and no attention bias unless the architecture sets one.
    pub attention_bias: Option<bool>,
    /// Keys of the routed expert count, the class's own name first (a config may carry both).
    pub num_experts_keys: &'static [&'static str],
    pub num_experts: usize,
    /// `num_experts_per_tok` when absent.
    pub top_k: usize,
    /// `norm_topk_prob` when absent; `None`: the class always renormalises and has no such field.
    pub norm_topk_prob: Option<bool>,
}

impl ModelConfig {
    /// The fields every architecture shares, read once from `raw` with the class defaults `d`;
    /// the architecture-specific ones take their neutral values (a MoE block in every layer,
    /// softmax attention everywhere over the full causal context, no shared expert, no dense MLP
    /// width, no expert width, no q/k norm, no clamp, no linear attention, no output gate, plain
    /// norms). Architecture files override what differs with `ModelConfig { .., ..base }`; a new
    /// field gets its neutral value here.
    pub fn common(raw: &RawConfig, arch: &'static str, d: &CommonDefaults) -> Result<ModelConfig> {
        let hidden_size = raw.usize(&["hidden_size"])?;
        let num_layers = raw.usize(&["num_hidden_layers"])?;
        let num_heads = match d.num_heads {
            Some(n) => raw.usize_or(&["num_attention_heads"], n)?,
            None => raw.usize(&["num_attention_heads"])?,
        };
        let num_kv_heads = raw.usize_or(
            &["num_key_value_heads"],
            d.num_kv_heads.unwrap_or(num_heads),
        )?;
        let head_dim = (d.head_dim)(raw, hidden_size, num_heads)?;
        let vocab_size = match d.vocab_size {
            Some(n) => raw.usize_or(&["vocab_size"], n)?,
            None => raw.usize(&["vocab_size"])?,
        };
        let max_position_embeddings =
            raw.usize_or(&["max_position_embeddings"], d.max_position_embeddings)?;
        let rms_norm_eps = raw.f64_or(&["rms_norm_eps"], d.rms_norm_eps)?;
        let rope = RopeConfig::parse(raw, d.rope_theta)?;
        let tie_word_embeddings = raw.bool_or(&["tie_word_embeddings"], false)?;
        let router = RouterConfig {
            num_experts: raw.usize_or(d.num_experts_keys, d.num_experts)?,
            top_k: raw.usize_or(&["num_experts_per_tok"], d.top_k)?,
            norm_topk_prob: match d.norm_topk_prob {
                Some(b) => raw.bool_or(&["norm_topk_prob"], b)?,
                None => true,
            },
            scoring: Scoring::Softmax,
            groups: None,
            scale: 1.0,
            selection_bias: false,
            bias: false,
        };
        let bias = match d.attention_bias {
            Some(b) => raw.bool_or(&["attention_bias"], b)?,
            None => false,
        };
        Ok(ModelConfig {
            arch,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            intermediate_size: 0,
            moe_intermediate_size: 0,
            max_position_embeddings,
            rms_norm_eps,
            rope,
            tie_word_embeddings,
            router,
            sparse_layers: vec![true; num_layers],
            shared_expert_intermediate_size: 0,
            qkv_bias: bias,
            o_bias: bias,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            sliding_window: vec![None; num_layers],
            mixers: vec![MixerKind::Attention; num_layers],
            linear_attention: None,
            attn_output_gate: false,
            norm_zero_centred: false,
            attention_sinks: false,
            mla: None,
            expert_form: ExpertForm::SwiGlu,
            hidden_act: raw.opt_str(&["hidden_act"])?.unwrap_or("silu").to_string(),
            bos_token_id: raw.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: raw.token_ids("eos_token_id")?,
        })
    }

    /// Values one attention layer keeps per token in its KV cache: the latent and the rope key
    /// (latent attention), else a key and a value per KV head.
    pub fn kv_values_per_token(&self) -> usize {
        match &self.mla {
            Some(m) => m.cached_values(),
            None => 2 * self.num_kv_heads * self.head_dim,
        }
    }

    /// Checks the invariants layers rely on; errors name the offending field.
    /// (`quantization_config` is the pre-quantized formats' own, checked by
    /// `prequant::PrequantConfig::parse`, which the opening path calls before this.)
    pub fn validate(&self, raw: &RawConfig) -> Result<()> {
        let bad = |field: &str, why: String| {
            Err(Error::bad_config(
                &raw.path,
                format!("field `{field}`: {why}"),
            ))
        };
        if self.hidden_size == 0 || self.num_layers == 0 || self.vocab_size == 0 {
            return bad(
                "hidden_size/num_hidden_layers/vocab_size",
                "must be > 0".into(),
            );
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_kv_heads, self.num_heads
                ),
            );
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            // Latent attention's head_dim is its rope width.
            let field = if self.mla.is_some() {
                "qk_rope_head_dim"
            } else {
                "head_dim"
            };
            return bad(field, format!("{} must be even and > 0", self.head_dim));
        }
        // Fields read from the file were bounded as they were read; class defaults and
        // derived values are bounded here, before any layer is built from them.
        for (field, value, limit) in [
            ("num_hidden_layers", self.num_layers, MAX_LAYERS),
            ("hidden_size", self.hidden_size, MAX_HIDDEN_SIZE),
            ("num_attention_heads", self.num_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_kv_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            ("vocab_size", self.vocab_size, MAX_VOCAB_SIZE),
            (
                "intermediate_size",
                self.intermediate_size,
                MAX_INTERMEDIATE_SIZE,
            ),
            (
                "moe_intermediate_size",
                self.moe_intermediate_size,
                MAX_INTERMEDIATE_SIZE,
            ),
            (
                "shared_expert_intermediate_size",
                self.shared_expert_intermediate_size,
                MAX_INTERMEDIATE_SIZE,
            ),
            ("num_experts", self.router.num_experts, MAX_EXPERTS),
            ("num_experts_per_tok", self.router.top_k, MAX_EXPERTS),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_POSITIONS,
            ),
        ] {
            if value > limit {
                return bad(field, format!("{value} is above the limit of {limit}"));
            }
        }
        let sparse = self.sparse_layers.iter().filter(|&&s| s).count();
        if sparse.saturating_mul(self.router.num_experts) > MAX_TOTAL_EXPERTS {
            return bad(
                "num_experts",
                format!(
                    "{} experts in each of {sparse} sparse layers is {} in all, above the limit \
                     of {MAX_TOTAL_EXPERTS} (MAX_TOTAL_EXPERTS)",
                    self.router.num_experts,
                    sparse.saturating_mul(self.router.num_experts)
                ),
            );
        }
        if self.sparse_layers.len() != self.num_layers
            || self.sliding_window.len() != self.num_layers
        {
            return bad(
                "num_hidden_layers",
                format!(
                    "{} layers, but {} sparse-layer and {} window entries",
                    self.num_layers,
                    self.sparse_layers.len(),
                    self.sliding_window.len()
                ),
            );
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(
                "rms_norm_eps",
                format!(
                    "must be a finite number, 0 or more (got {})",
                    self.rms_norm_eps
                ),
            );
        }
        if let Some(c) = self.clip_qkv {
            if !(c.is_finite() && c > 0.0) {
                return bad(
                    "clip_qkv",
                    format!("must be a finite number above 0 (got {c})"),
                );
            }
        }
        if self.mixers.contains(&MixerKind::Attention) {
            let rot = self.rope.rotary_dim(self.head_dim);
            if rot == 0 || !rot.is_multiple_of(2) || rot > self.head_dim {
                return bad(
                    "partial_rotary_factor",
                    format!(
                        "{} of head_dim {} rotates {rot} dimensions; it must be an even \
                         number from 2 to head_dim",
                        self.rope.partial_rotary_factor, self.head_dim
                    ),
                );
            }
            if !Rope::new(&self.rope, self.head_dim).is_finite() {
                return bad(
                    "rope_theta/rope_scaling",
                    format!(
                        "rope_theta {} with {:?} gives non-finite rotary frequencies",
                        self.rope.theta, self.rope.scaling
                    ),
                );
            }
        }
        if let Some(m) = &self.mla {
            for (field, value) in [
                ("kv_lora_rank", m.kv_lora_rank),
                ("qk_nope_head_dim", m.qk_nope_head_dim),
                ("qk_rope_head_dim", m.qk_rope_head_dim),
                ("v_head_dim", m.v_head_dim),
                ("q_lora_rank", m.q_lora_rank.unwrap_or(1)),
            ] {
                if value == 0 || value > MAX_HEAD_DIM {
                    return bad(
                        field,
                        format!("{value} must be from 1 to {MAX_HEAD_DIM} (MAX_HEAD_DIM)"),
                    );
                }
            }
            if m.qk_rope_head_dim != self.head_dim || self.rope.partial_rotary_factor != 1.0 {
                return bad(
                    "qk_rope_head_dim",
                    format!(
                        "latent attention rotates all {} rope values of a head; head_dim {} \
                         with partial_rotary_factor {} disagrees",
                        m.qk_rope_head_dim, self.head_dim, self.rope.partial_rotary_factor
                    ),
                );
            }
            if !(m.softmax_scale.is_finite() && m.softmax_scale > 0.0) {
                return bad(
                    "rope_scaling.mscale_all_dim",
                    format!(
                        "gives the softmax scale {}: it must be a finite number above 0",
                        m.softmax_scale
                    ),
                );
            }
        }
        if self.sparse_layers.iter().any(|&s| s) {
            let r = self.router;
            if r.top_k == 0 || r.top_k > r.num_experts {
                return bad(
                    "num_experts_per_tok",
                    format!("{} must be in 1..={}", r.top_k, r.num_experts),
                );
            }
            if self.moe_intermediate_size == 0 {
                return bad("moe_intermediate_size", "must be > 0".into());
            }
        }
        if self.sparse_layers.iter().any(|&s| !s) && self.intermediate_size == 0 {
            return bad("intermediate_size", "must be > 0 for dense layers".into());
        }
        if self.mixers.len() != self.num_layers {
            return bad(
                "layer_types",
                format!(
                    "{} entries for {} layers",
                    self.mixers.len(),
                    self.num_layers
                ),
            );
        }
        if self.mixers.contains(&MixerKind::LinearAttention) {
            let Some(la) = self.linear_attention else {
                return bad(
                    "layer_types",
                    "names linear_attention layers but the linear_* dimensions are missing".into(),
                );
            };
            if la.num_key_heads == 0
                || la.num_value_heads == 0
                || la.key_head_dim == 0
                || la.value_head_dim == 0
                || la.conv_kernel == 0
            {
                return bad(
                    "linear_num_key_heads/linear_num_value_heads/linear_key_head_dim/linear_value_head_dim/linear_conv_kernel_dim",
                    "must all be > 0".into(),
                );
            }
            if !la.num_value_heads.is_multiple_of(la.num_key_heads) {
                return bad(
                    "linear_num_value_heads",
                    format!(
                        "{} is not a multiple of linear_num_key_heads {}",
                        la.num_value_heads, la.num_key_heads
                    ),
                );
            }
        }
        if self.hidden_act != "silu" && self.hidden_act != "swish" {
            return bad(
                "hidden_act",
                format!("`{}` is not supported (silu)", self.hidden_act),
            );
        }
        Ok(())
    }
}

/// `generation_config.json`: sampling defaults and extra EOS ids.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads the file; sampling values outside the ranges requests accept are refused here,
    /// naming the field, rather than failing every request later.
    pub fn parse(raw: &RawConfig) -> Result<GenerationConfig> {
        let in_range = |key: &str, ok: fn(f64) -> bool, range: &str| -> Result<Option<f64>> {
            match raw.opt_f64(&[key])? {
                Some(x) if !ok(x) => Err(raw.wrong(key, &format!("{range} (got {x})"))),
                x => Ok(x),
            }
        };
        Ok(GenerationConfig {
            do_sample: raw
                .value(&["do_sample"])
                .map(|v| {
                    v.as_bool()
                        .ok_or_else(|| raw.wrong("do_sample", "true or false"))
                })
                .transpose()?,
            temperature: in_range("temperature", |t| t >= 0.0, "a finite number, 0 or more")?,
            top_p: in_range("top_p", |p| p > 0.0 && p <= 1.0, "above 0 and at most 1")?,
            top_k: raw.opt_usize(&["top_k"])?,
            min_p: in_range("min_p", |p| (0.0..=1.0).contains(&p), "from 0 to 1")?,
            eos_token_ids: raw.token_ids("eos_token_id")?,
            bos_token_id: raw.token_ids("bos_token_id")?.first().copied(),
            max_new_tokens: raw.opt_usize(&["max_new_tokens"])?,
        })
    }
}

/// Rotary position embedding (rotate-half convention) with transformers' scaling variants.
pub struct Rope {
    /// Inverse frequencies, `rot_dim / 2` of them.
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin (YaRN's attention factor; 1 otherwise).
    pub attention_scaling: f32,
    /// Leading values of each head that rotate (the rest pass through).
    pub rot_dim: usize,
    /// Pairs are adjacent values `(2i, 2i + 1)` rather than the two halves `(i, i + rot_dim /
    /// 2)` (DeepSeek's `rope_interleave`); frequency `i` turns pair `i` either way.
    pub interleaved: bool,
}

impl Rope {
    /// `cfg` has passed [`ModelConfig::validate`]: the rotated width is even and
    /// at most `head_dim`, and every factor is finite and above 0.
    pub fn new(cfg: &RopeConfig, head_dim: usize) -> Rope {
        let dim = cfg.rotary_dim(head_dim).min(head_dim);
        let base = cfg.theta;
        // Exponents are formed in f32 as transformers does (`arange(0, dim, 2).float() / dim`).
        let pos_freq: Vec<f64> = (0..dim / 2)
            .map(|i| base.powf(((2 * i) as f32 / dim as f32) as f64))
            .collect();
        let mut attention_scaling = 1.0f64;
        let inv: Vec<f64> = match &cfg.scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => {
                pos_freq.iter().map(|p| 1.0 / p).collect()
            }
            RopeScaling::Linear { factor } => pos_freq.iter().map(|p| 1.0 / p / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                pos_freq
                    .iter()
                    .map(|p| {
                        let f = 1.0 / p;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                attention_scaling = match attention_factor {
                    Some(a) => *a,
                    None => match (mscale, mscale_all_dim) {
                        (Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                            get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                        }
                        _ => get_mscale(*factor, 1.0),
                    },
                };
                let orig = *original_max_position_embeddings as f64;
                let d = dim as f64;
                let corr = |rot: f64| {
                    (d * (orig / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(d - 1.0);
                if low == high {
                    high += 0.001; // transformers: "Prevent singularity"
                }
                pos_freq
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrap_factor = 1.0 - ramp;
                        let interp = 1.0 / (factor * p);
                        let extrap = 1.0 / p;
                        interp * (1.0 - extrap_factor) + extrap * extrap_factor
                    })
                    .collect()
            }
        };
        Rope {
            inv_freq: inv.iter().map(|&f| f as f32).collect(),
            attention_scaling: attention_scaling as f32,
            rot_dim: dim,
            interleaved: false,
        }
    }

    /// Whether every frequency and the attention scaling are finite (a config check: a
    /// non-finite one would turn every attention output into NaN).
    pub fn is_finite(&self) -> bool {
        self.attention_scaling.is_finite() && self.inv_freq.iter().all(|f| f.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> RawConfig {
        RawConfig::parse(PathBuf::from("config.json"), s.as_bytes()).unwrap()
    }

    #[test]
    fn both_rope_styles_agree() {
        let hub =
            raw(r#"{"rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}"#);
        let t5 = raw(
            r#"{"rope_parameters": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}}"#,
        );
        let a = RopeConfig::parse(&hub, 10000.0).unwrap();
        let b = RopeConfig::parse(&t5, 10000.0).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.theta, 5000.0);
        assert_eq!(a.scaling, RopeScaling::Linear { factor: 2.0 });
        let none = RopeConfig::parse(&raw(r#"{"rope_scaling": null}"#), 1e6).unwrap();
        assert_eq!(none.theta, 1e6);
        assert_eq!(none.scaling, RopeScaling::Default);
    }

    #[test]
    fn errors_name_the_field() {
        let r = raw(r#"{"hidden_size": "big", "x": null}"#);
        let e = r.usize(&["hidden_size"]).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let e = r.usize(&["num_hidden_layers"]).unwrap_err().to_string();
        assert!(
            e.contains("missing required field `num_hidden_layers`"),
            "{e}"
        );
        assert_eq!(r.usize_or(&["x"], 7).unwrap(), 7);
        let e = RopeConfig::parse(&raw(r#"{"rope_scaling": {"type": "weird"}}"#), 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("weird"), "{e}");
        assert!(RawConfig::parse(PathBuf::from("c.json"), b"[1,2]").is_err());
        assert!(RawConfig::parse(PathBuf::from("c.json"), b"{garbage").is_err());
    }

    #[test]
    fn pre_quantized_formats_are_read_or_refused_naming_the_method() {
        use crate::weights::prequant::{Code4, PrequantConfig};
        let base = r#""architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "vocab_size": 16"#;
        for (q, named) in [
            (r#"{"quant_method": "gptq", "bits": 4}"#, "`gptq`"),
            (r#"{"quant_method": "awq"}"#, "`awq`"),
            (
                r#"{"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}"#,
                "fp8 in format `e5m2`",
            ),
            (
                r#"{"quant_method": "bitsandbytes", "load_in_8bit": true}"#,
                "bitsandbytes 8-bit",
            ),
            (
                r#"{"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "int4"}"#,
                "bitsandbytes 4-bit `int4`",
            ),
            (r#"{"bits": 4}"#, "(no quant_method)"),
        ] {
            let r = raw(&format!(r#"{{{base}, "quantization_config": {q}}}"#));
            let arch = crate::arch::lookup(&r).unwrap();
            let cfg = (arch.parse_config)(&r).unwrap();
            // The model's own fields are fine; the format is refused by its own parser.
            cfg.validate(&r).unwrap();
            let e = PrequantConfig::parse(&r).unwrap_err().to_string();
            assert!(
                e.contains("quantization_config")
                    && e.contains(named)
                    && e.contains("FP8 E4M3")
                    && e.contains("bitsandbytes 4-bit")
                    && e.contains("q8_0"),
                "{e}"
            );
        }
        for (q, want) in [
            (
                r#"{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 64],
                    "modules_to_not_convert": ["lm_head", "mlp.gate"]}"#,
                PrequantConfig::Fp8 {
                    block: Some([128, 64]),
                    not_convert: vec!["lm_head".into(), "mlp.gate".into()],
                },
            ),
            (
                r#"{"quant_method": "fp8"}"#,
                PrequantConfig::Fp8 {
                    block: None,
                    not_convert: vec![],
                },
            ),
            (
                r#"{"quant_method": "bitsandbytes", "load_in_4bit": true, "load_in_8bit": false,
                    "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true}"#,
                PrequantConfig::Bnb4 {
                    quant_type: Code4::Nf4,
                    double_quant: true,
                },
            ),
            (
                r#"{"quant_method": "bitsandbytes", "load_in_4bit": true}"#,
                PrequantConfig::Bnb4 {
                    quant_type: Code4::Fp4,
                    double_quant: false,
                },
            ),
        ] {
            let r = raw(&format!(r#"{{{base}, "quantization_config": {q}}}"#));
            let arch = crate::arch::lookup(&r).unwrap();
            (arch.parse_config)(&r).unwrap().validate(&r).unwrap();
            assert_eq!(PrequantConfig::parse(&r).unwrap(), Some(want));
        }
        let e = PrequantConfig::parse(&raw(&format!(
            r#"{{{base}, "quantization_config": {{"quant_method": "fp8", "weight_block_size": [128]}}}}"#
        )))
        .unwrap_err()
        .to_string();
        assert!(e.contains("weight_block_size"), "{e}");
        let r = raw(&format!(r#"{{{base}, "quantization_config": null}}"#));
        let arch = crate::arch::lookup(&r).unwrap();
        (arch.parse_config)(&r).unwrap().validate(&r).unwrap();
        assert_eq!(PrequantConfig::parse(&r).unwrap(), None);
    }

    /// Parses a fixture's config.json through the registry, with the file's JSON beside it.
    fn fixture(rel: &str) -> (ModelConfig, Value) {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(rel);
        let bytes = std::fs::read(&path).unwrap();
        let r = RawConfig::parse(path, &bytes).unwrap();
        let cfg = (crate::arch::lookup(&r).unwrap().parse_config)(&r).unwrap();
        cfg.validate(&r).unwrap();
        (cfg, serde_json::from_slice(&bytes).unwrap())
    }

    fn u(j: &Value, key: &str) -> usize {
        j[key].as_u64().unwrap_or_else(|| panic!("{key}")) as usize
    }

    /// What one fixture's fields must be where the two architectures read them differently.
    struct Differs {
        head_dim: usize,
        rope: RopeConfig,
        biases: (bool, bool),
        qk_norm: QkNorm,
        mixers: Vec<MixerKind>,
        linear_attention: Option<LinearAttentionConfig>,
        gate_and_zero_centred: (bool, bool),
        bos_eos: (Option<u32>, Vec<u32>),
    }

    /// Every field of `cfg` against the file `j` (the fields both architectures read the same
    /// way) and `want` (the others). The destructuring names every field: a new one fails to
    /// compile here until it is checked.
    fn check_every_field(cfg: ModelConfig, j: &Value, want: Differs) {
        let ModelConfig {
            arch,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            intermediate_size,
            moe_intermediate_size,
            max_position_embeddings,
            rms_norm_eps,
            rope,
            tie_word_embeddings,
            router,
            sparse_layers,
            shared_expert_intermediate_size,
            qkv_bias,
            o_bias,
            qk_norm,
            clip_qkv,
            sliding_window,
            mixers,
            linear_attention,
            attn_output_gate,
            norm_zero_centred,
            attention_sinks,
            mla,
            expert_form,
            hidden_act,
            bos_token_id,
            eos_token_ids,
        } = cfg;
        let layers = u(j, "num_hidden_layers");
        assert_eq!(arch, j["model_type"].as_str().unwrap());
        assert_eq!(hidden_size, u(j, "hidden_size"));
        assert_eq!(num_layers, layers);
        assert_eq!(num_heads, u(j, "num_attention_heads"));
        assert_eq!(num_kv_heads, u(j, "num_key_value_heads"));
        assert_eq!(head_dim, want.head_dim);
        assert_eq!(vocab_size, u(j, "vocab_size"));
        assert_eq!(intermediate_size, u(j, "intermediate_size"));
        assert_eq!(moe_intermediate_size, u(j, "moe_intermediate_size"));
        assert_eq!(max_position_embeddings, u(j, "max_position_embeddings"));
        assert_eq!(rms_norm_eps, j["rms_norm_eps"].as_f64().unwrap());
        assert_eq!(rope, want.rope);
        assert_eq!(
            tie_word_embeddings,
            j["tie_word_embeddings"].as_bool().unwrap()
        );
        assert_eq!(
            router,
            RouterConfig {
                num_experts: u(j, "num_experts"),
                top_k: u(j, "num_experts_per_tok"),
                norm_topk_prob: j["norm_topk_prob"].as_bool().unwrap(),
                scoring: Scoring::Softmax,
                groups: None,
                scale: 1.0,
                selection_bias: false,
                bias: false,
            }
        );
        // decoder_sparse_step 1 and no mlp_only_layers: every layer is sparse.
        assert_eq!(
            (u(j, "decoder_sparse_step"), &j["mlp_only_layers"]),
            (1, &Value::Array(vec![]))
        );
        assert_eq!(sparse_layers, vec![true; layers]);
        assert_eq!(
            shared_expert_intermediate_size,
            u(j, "shared_expert_intermediate_size")
        );
        assert_eq!((qkv_bias, o_bias), want.biases);
        assert_eq!(qk_norm, want.qk_norm);
        assert_eq!(clip_qkv, None);
        // Neither uses a sliding window (Qwen2-MoE gives one, but `use_sliding_window` is off).
        assert_ne!(j["use_sliding_window"], Value::Bool(true));
        assert_eq!(sliding_window, vec![None; layers]);
        assert_eq!(mixers, want.mixers);
        assert_eq!(linear_attention, want.linear_attention);
        assert_eq!(
            (attn_output_gate, norm_zero_centred),
            want.gate_and_zero_centred
        );
        assert!(!attention_sinks);
        assert_eq!(mla, None);
        assert_eq!(expert_form, ExpertForm::SwiGlu);
        assert_eq!(hidden_act, j["hidden_act"].as_str().unwrap());
        assert_eq!((bos_token_id, eos_token_ids), want.bos_eos);
    }

    /// Every field of the parsed config, against the file's values (and the class default where
    /// the file has none), for an attention-only and a hybrid architecture.
    #[test]
    fn every_field_matches_the_file() {
        let (cfg, j) = fixture("qwen2_moe/model/config.json");
        let layers = u(&j, "num_hidden_layers");
        assert!(j.get("head_dim").is_none());
        // Qwen2MoeConfig: `qkv_bias` defaults to true; there is no o bias.
        assert!(j.get("qkv_bias").is_none());
        assert!(j["bos_token_id"].is_null() && j["eos_token_id"].is_null());
        let want = Differs {
            head_dim: u(&j, "hidden_size") / u(&j, "num_attention_heads"),
            rope: RopeConfig {
                theta: j["rope_theta"].as_f64().unwrap(),
                scaling: RopeScaling::Linear {
                    factor: j["rope_scaling"]["factor"].as_f64().unwrap(),
                },
                partial_rotary_factor: 1.0,
            },
            biases: (true, false),
            qk_norm: QkNorm::None,
            mixers: vec![MixerKind::Attention; layers],
            linear_attention: None,
            gate_and_zero_centred: (false, false),
            bos_eos: (None, vec![]),
        };
        check_every_field(cfg, &j, want);

        let (cfg, j) = fixture("qwen3_next_80b/config.json");
        let layers = u(&j, "num_hidden_layers");
        assert!(j["rope_scaling"].is_null());
        let bias = j["attention_bias"].as_bool().unwrap();
        // Layer `l` is full attention when `(l + 1) % full_attention_interval == 0`.
        let interval = u(&j, "full_attention_interval");
        let want = Differs {
            head_dim: u(&j, "head_dim"),
            rope: RopeConfig {
                theta: j["rope_theta"].as_f64().unwrap(),
                scaling: RopeScaling::Default,
                partial_rotary_factor: j["partial_rotary_factor"].as_f64().unwrap(),
            },
            biases: (bias, bias),
            qk_norm: QkNorm::PerHead,
            mixers: (0..layers)
                .map(|l| {
                    if (l + 1) % interval == 0 {
                        MixerKind::Attention
                    } else {
                        MixerKind::LinearAttention
                    }
                })
                .collect(),
            linear_attention: Some(LinearAttentionConfig {
                num_key_heads: u(&j, "linear_num_key_heads"),
                num_value_heads: u(&j, "linear_num_value_heads"),
                key_head_dim: u(&j, "linear_key_head_dim"),
                value_head_dim: u(&j, "linear_value_head_dim"),
                conv_kernel: u(&j, "linear_conv_kernel_dim"),
            }),
            gate_and_zero_centred: (true, true),
            bos_eos: (
                Some(u(&j, "bos_token_id") as u32),
                vec![u(&j, "eos_token_id") as u32],
            ),
        };
        check_every_field(cfg, &j, want);
    }

    #[test]
    fn context_defaults_to_the_cap_or_the_model() {
        assert_eq!(context_tokens(None, 1 << 20), DEFAULT_MAX_CONTEXT_TOKENS);
        assert_eq!(context_tokens(None, 512), 512);
        assert_eq!(context_tokens(None, 0), 1);
        assert_eq!(context_tokens(Some(7), 512), 7);
    }

    #[test]
    fn eos_int_or_list() {
        assert_eq!(
            raw(r#"{"eos_token_id": 5}"#)
                .token_ids("eos_token_id")
                .unwrap(),
            vec![5]
        );
        assert_eq!(
            raw(r#"{"eos_token_id": [5, 6]}"#)
                .token_ids("eos_token_id")
                .unwrap(),
            vec![5, 6]
        );
        assert!(raw(r#"{"eos_token_id": null}"#)
            .token_ids("eos_token_id")
            .unwrap()
            .is_empty());
    }
}
