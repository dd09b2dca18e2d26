//! Hugging Face `config.json` / `generation_config.json`, read leniently.
//!
//! [`RawConfig`] gives typed, null-tolerant access to the JSON with the field name in every error;
//! each architecture file turns it into the normalised [`ModelConfig`] the layers are built from
//! (it alone knows its field names, aliases and transformers' class defaults).
//!
//! Invariants: an absent or `null` optional field takes the transformers class default; a missing
//! required field is an error naming it; both config styles (the Hub's `rope_theta`/`rope_scaling`/
//! `torch_dtype` and transformers 5's `rope_parameters`/`dtype`) give the same `ModelConfig`.

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
            None => raw.f64_or(&["partial_rotary_factor"], 1.0)?,
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

/// Routing rule of a sparse MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouterConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Renormalise the top-k probabilities to sum to 1.
    pub norm_topk_prob: bool,
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
    pub hidden_act: String,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Checks the invariants layers rely on; errors name the offending field.
    pub fn validate(&self, raw: &RawConfig) -> Result<()> {
        // Refuses a pre-quantized format this build cannot read, naming it.
        crate::prequant::PrequantConfig::parse(raw)?;
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
            return bad(
                "head_dim",
                format!("{} must be even and > 0", self.head_dim),
            );
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
            if !crate::layers::Rope::new(&self.rope, self.head_dim).is_finite() {
                return bad(
                    "rope_theta/rope_scaling",
                    format!(
                        "rope_theta {} with {:?} gives non-finite rotary frequencies",
                        self.rope.theta, self.rope.scaling
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
        use crate::prequant::{Code4, PrequantConfig};
        let base = r#""architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "vocab_size": 16"#;
        for (q, named) in [
            (r#"{"quant_method": "gptq", "bits": 4}"#, "`gptq`"),
            (r#"{"quant_method": "awq"}"#, "`awq`"),
            (r#"{"quant_method": "mxfp4"}"#, "`mxfp4`"),
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
            let e = cfg.validate(&r).unwrap_err().to_string();
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
