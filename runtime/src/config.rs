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

/// Typed access to one JSON config file.
#[derive(Clone, Debug)]
pub struct RawConfig {
    pub path: PathBuf,
    pub map: Map<String, Value>,
}

impl RawConfig {
    pub fn parse(path: PathBuf, bytes: &[u8]) -> Result<RawConfig> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::bad_config(&path, format!("not valid JSON: {e}")))?;
        match v {
            Value::Object(map) => Ok(RawConfig { path, map }),
            _ => Err(Error::bad_config(&path, "top level is not a JSON object")),
        }
    }

    /// The value of the first present, non-null key among `keys`.
    pub fn value(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter()
            .filter_map(|k| self.map.get(*k))
            .find(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, what: &str) -> Error {
        Error::bad_config(&self.path, format!("field `{key}` must be {what}"))
    }

    fn missing(&self, keys: &[&str]) -> Error {
        Error::MissingField {
            path: self.path.clone(),
            field: keys.join("` or `"),
        }
    }

    pub fn opt_usize(&self, keys: &[&str]) -> Result<Option<usize>> {
        match self.value(keys) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                        .map(|f| f as u64)
                })
                .map(|u| Some(u as usize))
                .ok_or_else(|| self.wrong(keys[0], "a non-negative integer")),
        }
    }

    pub fn usize(&self, keys: &[&str]) -> Result<usize> {
        self.opt_usize(keys)?.ok_or_else(|| self.missing(keys))
    }

    pub fn usize_or(&self, keys: &[&str], default: usize) -> Result<usize> {
        Ok(self.opt_usize(keys)?.unwrap_or(default))
    }

    pub fn opt_f64(&self, keys: &[&str]) -> Result<Option<f64>> {
        match self.value(keys) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(keys[0], "a number")),
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
                .map(|x| x.as_u64().map(|u| u as usize))
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

    /// Token ids that may be an int or a list of ints (`eos_token_id`).
    pub fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.value(&[key]) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|u| u as u32))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| self.wrong(key, "an integer or a list of integers")),
            Some(v) => v
                .as_u64()
                .map(|u| vec![u as u32])
                .ok_or_else(|| self.wrong(key, "an integer or a list of integers")),
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
    /// Reads rope settings in either style: `rope_parameters` (transformers 5) or `rope_theta` +
    /// `rope_scaling` (the Hub's). `default_theta` is the class default when none is given.
    pub fn parse(raw: &RawConfig, default_theta: f64) -> Result<RopeConfig> {
        let params = raw
            .value(&["rope_parameters"])
            .or_else(|| raw.value(&["rope_scaling"]))
            .cloned();
        let mut obj = match params {
            None => Map::new(),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(raw.wrong("rope_parameters", "an object")),
        };
        // Per-layer-type nesting (`{"full_attention": {...}}`): all our architectures use one.
        if let Some(Value::Object(inner)) = obj.get("full_attention").cloned() {
            obj = inner;
        }
        let sub = RawConfig {
            path: raw.path.clone(),
            map: obj,
        };
        let theta = match sub.opt_f64(&["rope_theta"])? {
            Some(t) => t,
            None => raw.f64_or(&["rope_theta"], default_theta)?,
        };
        let partial_rotary_factor = match sub.opt_f64(&["partial_rotary_factor"])? {
            Some(p) => p,
            None => raw.f64_or(&["partial_rotary_factor"], 1.0)?,
        };
        let kind = sub
            .opt_str(&["rope_type", "type"])?
            .unwrap_or("default")
            .to_string();
        let max_pos = raw.opt_usize(&["max_position_embeddings"])?;
        let orig = |sub: &RawConfig| -> Result<usize> {
            match sub.opt_usize(&["original_max_position_embeddings"])? {
                Some(o) => Ok(o),
                None => match raw.opt_usize(&["original_max_position_embeddings"])? {
                    Some(o) => Ok(o),
                    None => max_pos.ok_or_else(|| raw.missing(&["max_position_embeddings"])),
                },
            }
        };
        let scaling = match kind.as_str() {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: sub
                    .opt_f64(&["factor"])?
                    .ok_or_else(|| sub.missing(&["rope_scaling.factor"]))?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: sub
                    .opt_f64(&["factor"])?
                    .ok_or_else(|| sub.missing(&["rope_scaling.factor"]))?,
            },
            "yarn" => {
                let original = orig(&sub)?;
                let factor = match sub.opt_f64(&["factor"])? {
                    Some(f) => f,
                    None => max_pos.unwrap_or(original) as f64 / original as f64,
                };
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    attention_factor: sub.opt_f64(&["attention_factor"])?,
                    // transformers: `get("beta_fast") or 32` (0 also means the default)
                    beta_fast: sub
                        .opt_f64(&["beta_fast"])?
                        .filter(|b| *b != 0.0)
                        .unwrap_or(32.0),
                    beta_slow: sub
                        .opt_f64(&["beta_slow"])?
                        .filter(|b| *b != 0.0)
                        .unwrap_or(1.0),
                    mscale: sub.opt_f64(&["mscale"])?,
                    mscale_all_dim: sub.opt_f64(&["mscale_all_dim"])?,
                    truncate: sub.bool_or(&["truncate"], true)?,
                }
            }
            "llama3" => RopeScaling::Llama3 {
                factor: sub
                    .opt_f64(&["factor"])?
                    .ok_or_else(|| sub.missing(&["rope_scaling.factor"]))?,
                low_freq_factor: sub.f64_or(&["low_freq_factor"], 1.0)?,
                high_freq_factor: sub.f64_or(&["high_freq_factor"], 4.0)?,
                original_max_position_embeddings: orig(&sub)?,
            },
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
    pub fn parse(raw: &RawConfig) -> Result<GenerationConfig> {
        Ok(GenerationConfig {
            do_sample: raw
                .value(&["do_sample"])
                .map(|v| {
                    v.as_bool()
                        .ok_or_else(|| raw.wrong("do_sample", "true or false"))
                })
                .transpose()?,
            temperature: raw.opt_f64(&["temperature"])?,
            top_p: raw.opt_f64(&["top_p"])?,
            top_k: raw.opt_usize(&["top_k"])?,
            min_p: raw.opt_f64(&["min_p"])?,
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
