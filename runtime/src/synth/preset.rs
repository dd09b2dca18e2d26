//! Model presets: the dimensions of each synthetic model and the tensors they imply.

use super::SynthError;

/// Dimensions of a synthetic `qwen3_moe` model (names follow the Hub's `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// Preset name as given to [`preset`].
    pub name: &'static str,
    pub hidden_size: usize,
    /// Dense MLP width (written to the config; unused since every layer is sparse).
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Total token ids: byte tokens + merges + 3 special tokens.
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub rope_theta: f64,
    /// Shard size limit used when [`super::SynthOptions::shard_bytes`] is `None`.
    pub default_shard_bytes: u64,
}

/// The Hub's default `max_shard_size` ("5GB").
pub const HUB_SHARD_BYTES: u64 = 5_000_000_000;

const PRESETS: &[Preset] = &[
    Preset {
        name: "demo",
        hidden_size: 64,
        intermediate_size: 192,
        moe_intermediate_size: 64,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        vocab_size: 2048,
        max_position_embeddings: 4096,
        num_experts: 8,
        num_experts_per_tok: 2,
        rope_theta: 1_000_000.0,
        // ~1.4 MB of weights: a 1 MiB limit gives two shards.
        default_shard_bytes: 1 << 20,
    },
    Preset {
        name: "mini",
        hidden_size: 512,
        intermediate_size: 1536,
        moe_intermediate_size: 288,
        num_hidden_layers: 8,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        head_dim: 64,
        vocab_size: 32000,
        max_position_embeddings: 32768,
        num_experts: 32,
        num_experts_per_tok: 4,
        rope_theta: 1_000_000.0,
        default_shard_bytes: HUB_SHARD_BYTES,
    },
    Preset {
        name: "bench-m",
        hidden_size: 2048,
        intermediate_size: 6144,
        moe_intermediate_size: 768,
        num_hidden_layers: 24,
        num_attention_heads: 32,
        num_key_value_heads: 4,
        head_dim: 128,
        vocab_size: 32000,
        max_position_embeddings: 40960,
        num_experts: 64,
        num_experts_per_tok: 8,
        rope_theta: 1_000_000.0,
        default_shard_bytes: HUB_SHARD_BYTES,
    },
];

/// Names of all presets, smallest first.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).collect()
}

/// The preset called `name`, if any.
pub fn preset(name: &str) -> Option<Preset> {
    PRESETS.iter().find(|p| p.name == name).cloned()
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Init {
    /// Every element is 1.0 (RMSNorm weights).
    Ones,
    /// Zero-mean, roughly normal (Irwin-Hall of 4 uniforms) with this standard deviation.
    Normal { std: f32 },
}

/// One tensor of the checkpoint, in the order the model's `state_dict` lists it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorSpec {
    pub name: String,
    pub shape: Vec<u64>,
    pub init: Init,
}

impl TensorSpec {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
    pub fn size_bytes(&self) -> u64 {
        self.numel() * 2
    }
}

impl Preset {
    /// Checks the dimensions are self-consistent and usable.
    pub fn validate(&self) -> Result<(), SynthError> {
        let bad = |why: String| Err(SynthError::Invalid(format!("preset {}: {why}", self.name)));
        let dims = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
        ];
        for (what, v) in dims {
            if v == 0 {
                return bad(format!("{what} must be > 0"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.num_experts_per_tok > self.num_experts {
            return bad(format!(
                "num_experts_per_tok {} > num_experts {}",
                self.num_experts_per_tok, self.num_experts
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even (RoPE)", self.head_dim));
        }
        let min_vocab = super::tokenizer::BYTE_TOKENS + super::tokenizer::SPECIAL_TOKENS.len() + 1;
        if self.vocab_size < min_vocab {
            return bad(format!("vocab_size {} < {min_vocab}", self.vocab_size));
        }
        if self.vocab_size > u32::MAX as usize {
            return bad(format!("vocab_size {} too large", self.vocab_size));
        }
        Ok(())
    }

    /// Every tensor in `state_dict` order (embeddings, layers, final norm, lm_head).
    ///
    /// Scales: projections use std = 1/sqrt(fan_in) (0.022 at hidden 2048, larger for
    /// the tiny demo so its activations and logits are not flat), the router 3/sqrt(H)
    /// (router logits with std ~3, so the top-k choice varies from token to token),
    /// embeddings 0.04, lm_head 2/sqrt(H) (logits with std ~2), norms 1.0.
    pub(crate) fn tensors(&self) -> Vec<TensorSpec> {
        let h = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        let hd = self.head_dim as u64;
        let q = self.num_attention_heads as u64 * hd;
        let kv = self.num_key_value_heads as u64 * hd;
        let e = self.num_experts;
        let i = self.moe_intermediate_size as u64;
        let inv_sqrt = |n: u64| 1.0 / (n as f32).sqrt();
        let normal = |std: f32| Init::Normal { std };

        let mut out = Vec::with_capacity(3 + self.num_hidden_layers * (11 + 3 * e));
        let mut push = |name: String, shape: Vec<u64>, init: Init| {
            out.push(TensorSpec { name, shape, init });
        };
        push("model.embed_tokens.weight".into(), vec![v, h], normal(0.04));
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            push(
                format!("{p}.self_attn.q_proj.weight"),
                vec![q, h],
                normal(inv_sqrt(h)),
            );
            push(
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv, h],
                normal(inv_sqrt(h)),
            );
            push(
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv, h],
                normal(inv_sqrt(h)),
            );
            push(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, q],
                normal(inv_sqrt(q)),
            );
            push(format!("{p}.self_attn.q_norm.weight"), vec![hd], Init::Ones);
            push(format!("{p}.self_attn.k_norm.weight"), vec![hd], Init::Ones);
            push(
                format!("{p}.mlp.gate.weight"),
                vec![e as u64, h],
                normal(3.0 * inv_sqrt(h)),
            );
            for x in 0..e {
                let ep = format!("{p}.mlp.experts.{x}");
                push(
                    format!("{ep}.gate_proj.weight"),
                    vec![i, h],
                    normal(inv_sqrt(h)),
                );
                push(
                    format!("{ep}.up_proj.weight"),
                    vec![i, h],
                    normal(inv_sqrt(h)),
                );
                push(
                    format!("{ep}.down_proj.weight"),
                    vec![h, i],
                    normal(inv_sqrt(i)),
                );
            }
            push(format!("{p}.input_layernorm.weight"), vec![h], Init::Ones);
            push(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                Init::Ones,
            );
        }
        push("model.norm.weight".into(), vec![h], Init::Ones);
        push(
            "lm_head.weight".into(),
            vec![v, h],
            normal(2.0 * inv_sqrt(h)),
        );
        out
    }

    /// Total parameter count (closed form; equals the sum over [`Self::tensors`]).
    pub fn param_count(&self) -> u64 {
        let h = self.hidden_size as u64;
        let hd = self.head_dim as u64;
        let q = self.num_attention_heads as u64 * hd;
        let kv = self.num_key_value_heads as u64 * hd;
        let e = self.num_experts as u64;
        let i = self.moe_intermediate_size as u64;
        let v = self.vocab_size as u64;
        let attn = 2 * q * h + 2 * kv * h + 2 * hd;
        let moe = e * h + e * 3 * i * h;
        let per_layer = attn + moe + 2 * h;
        2 * v * h + h + self.num_hidden_layers as u64 * per_layer
    }

    /// Bytes of tensor data in bf16 (the index's `total_size`).
    pub fn weight_bytes(&self) -> u64 {
        self.param_count() * 2
    }

    /// Token ids of the three special tokens (they are the last three ids).
    pub fn special_ids(&self) -> SpecialIds {
        let v = self.vocab_size as u32;
        SpecialIds {
            endoftext: v - 3,
            im_start: v - 2,
            im_end: v - 1,
        }
    }
}

/// Ids of the special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub endoftext: u32,
    pub im_start: u32,
    pub im_end: u32,
}
