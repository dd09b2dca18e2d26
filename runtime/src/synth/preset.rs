//! Model presets: the dimensions of each synthetic model and the tensors they imply.

use super::SynthError;

/// Hub `model_type` of Qwen3-MoE (`Qwen3MoeForCausalLM`).
pub const QWEN3_MOE: &str = "qwen3_moe";
/// Hub `model_type` of Qwen3-Next (`Qwen3NextForCausalLM`).
pub const QWEN3_NEXT: &str = "qwen3_next";

/// Dimensions of a synthetic model (names follow the Hub's `config.json`).
///
/// A preset belongs to one architecture ([`Preset::arch`]). Fields that only
/// `qwen3_next` uses (linear attention, shared expert, multi-token prediction) are 0 for
/// `qwen3_moe`, whose `full_attention_interval` is 1 (every layer full attention) and
/// `partial_rotary_factor` 1.0.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// Preset name as given to [`preset`].
    pub name: &'static str,
    /// Hub `model_type` this preset writes: [`QWEN3_MOE`] or [`QWEN3_NEXT`].
    pub arch: &'static str,
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
    /// Layer `l` is full attention when `(l + 1) % full_attention_interval == 0`, else
    /// linear attention (Gated DeltaNet); 1 for `qwen3_moe`.
    pub full_attention_interval: usize,
    /// Fraction of `head_dim` that RoPE rotates (`qwen3_next`: 0.25; `qwen3_moe`: 1.0).
    pub partial_rotary_factor: f64,
    /// Linear-attention key heads (`qwen3_next` only, else 0).
    pub linear_num_key_heads: usize,
    /// Linear-attention value heads, a multiple of the key heads (`qwen3_next` only).
    pub linear_num_value_heads: usize,
    pub linear_key_head_dim: usize,
    pub linear_value_head_dim: usize,
    /// Width of the causal depthwise convolution (`qwen3_next` only).
    pub linear_conv_kernel_dim: usize,
    /// Width of the shared expert of every MoE block (`qwen3_next` only, else 0).
    pub shared_expert_intermediate_size: usize,
    /// Multi-token-prediction layers written as `mtp.*` tensors, as the Qwen3-Next
    /// release ships them (the runtime ignores them); 0 for `qwen3_moe`.
    pub mtp_layers: usize,
}

/// The Hub's default `max_shard_size` ("5GB").
pub const HUB_SHARD_BYTES: u64 = 5_000_000_000;

/// The `qwen3_next`-only fields of a `qwen3_moe` preset (dimensions are filled in).
const QWEN3_MOE_BASE: Preset = Preset {
    name: "",
    arch: QWEN3_MOE,
    hidden_size: 0,
    intermediate_size: 0,
    moe_intermediate_size: 0,
    num_hidden_layers: 0,
    num_attention_heads: 0,
    num_key_value_heads: 0,
    head_dim: 0,
    vocab_size: 0,
    max_position_embeddings: 0,
    num_experts: 0,
    num_experts_per_tok: 0,
    rope_theta: 0.0,
    default_shard_bytes: 0,
    full_attention_interval: 1,
    partial_rotary_factor: 1.0,
    linear_num_key_heads: 0,
    linear_num_value_heads: 0,
    linear_key_head_dim: 0,
    linear_value_head_dim: 0,
    linear_conv_kernel_dim: 0,
    shared_expert_intermediate_size: 0,
    mtp_layers: 0,
};

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
        ..QWEN3_MOE_BASE
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
        ..QWEN3_MOE_BASE
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
        ..QWEN3_MOE_BASE
    },
    // Tiny Qwen3-Next for tests: 3 linear-attention layers and 1 full-attention layer.
    Preset {
        name: "next-demo",
        arch: QWEN3_NEXT,
        hidden_size: 64,
        intermediate_size: 128,
        moe_intermediate_size: 32,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        vocab_size: 2048,
        max_position_embeddings: 4096,
        num_experts: 16,
        num_experts_per_tok: 4,
        rope_theta: 10_000_000.0,
        // ~1.8 MB of weights: a 1 MiB limit gives two shards.
        default_shard_bytes: 1 << 20,
        full_attention_interval: 4,
        partial_rotary_factor: 0.25,
        linear_num_key_heads: 2,
        linear_num_value_heads: 4,
        linear_key_head_dim: 16,
        linear_value_head_dim: 16,
        linear_conv_kernel_dim: 4,
        shared_expert_intermediate_size: 64,
        mtp_layers: 1,
    },
    // The layer and expert structure of Qwen3-Next-80B-A3B (48 layers, 36 linear + 12
    // full, 512 experts, top-10, shared expert, one MTP layer), with the release's tensor
    // names and count (75,944 tensors) but small dimensions: ~162 MB, which the 4 MB
    // default limit splits into 41 shards, as many as the release has.
    Preset {
        name: "next-shape",
        arch: QWEN3_NEXT,
        hidden_size: 64,
        intermediate_size: 128,
        moe_intermediate_size: 16,
        num_hidden_layers: 48,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        vocab_size: 2048,
        max_position_embeddings: 4096,
        num_experts: 512,
        num_experts_per_tok: 10,
        rope_theta: 10_000_000.0,
        default_shard_bytes: 4_000_000,
        full_attention_interval: 4,
        partial_rotary_factor: 0.25,
        linear_num_key_heads: 4,
        linear_num_value_heads: 8,
        linear_key_head_dim: 16,
        linear_value_head_dim: 16,
        linear_conv_kernel_dim: 4,
        shared_expert_intermediate_size: 32,
        mtp_layers: 1,
    },
    // next-shape's structure at benchmark size: ~12.6 GB of weights.
    Preset {
        name: "next-bench",
        arch: QWEN3_NEXT,
        hidden_size: 512,
        intermediate_size: 1536,
        moe_intermediate_size: 160,
        num_hidden_layers: 48,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        head_dim: 128,
        vocab_size: 32000,
        max_position_embeddings: 32768,
        num_experts: 512,
        num_experts_per_tok: 10,
        rope_theta: 10_000_000.0,
        default_shard_bytes: HUB_SHARD_BYTES,
        full_attention_interval: 4,
        partial_rotary_factor: 0.25,
        linear_num_key_heads: 4,
        linear_num_value_heads: 8,
        linear_key_head_dim: 64,
        linear_value_head_dim: 64,
        linear_conv_kernel_dim: 4,
        shared_expert_intermediate_size: 512,
        mtp_layers: 1,
    },
];

/// Names of all presets, each architecture's smallest first (`qwen3_moe`, then
/// `qwen3_next`).
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).collect()
}

/// Names of the presets of architecture `arch` (a Hub `model_type`), smallest first.
pub fn preset_names_for(arch: &str) -> Vec<&'static str> {
    PRESETS
        .iter()
        .filter(|p| p.arch == arch)
        .map(|p| p.name)
        .collect()
}

/// The preset called `name`, if any (of any architecture).
pub fn preset(name: &str) -> Option<Preset> {
    PRESETS.iter().find(|p| p.name == name).cloned()
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Init {
    /// Every element is 1.0 (RMSNorm weights that compute `w * x`).
    Ones,
    /// Every element is 0.0 (zero-centred RMSNorm weights, computing `x * (1 + w)`).
    Zeros,
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

/// Collects [`TensorSpec`]s.
struct Specs(Vec<TensorSpec>);

impl Specs {
    fn push(&mut self, name: String, shape: Vec<u64>, init: Init) {
        self.0.push(TensorSpec { name, shape, init });
    }

    /// A SwiGLU MLP under `prefix` (an expert or the shared expert): gate, up `[inter, h]`,
    /// down `[h, inter]`, each with std 1/sqrt(fan_in).
    fn push_swiglu(&mut self, prefix: &str, h: u64, inter: u64) {
        for proj in ["gate_proj", "up_proj"] {
            self.push(
                format!("{prefix}.{proj}.weight"),
                vec![inter, h],
                normal(inv_sqrt(h)),
            );
        }
        self.push(
            format!("{prefix}.down_proj.weight"),
            vec![h, inter],
            normal(inv_sqrt(inter)),
        );
    }
}

fn normal(std: f32) -> Init {
    Init::Normal { std }
}

fn inv_sqrt(n: u64) -> f32 {
    1.0 / (n as f32).sqrt()
}

impl Preset {
    /// Whether this preset writes `qwen3_next`.
    fn is_next(&self) -> bool {
        self.arch == QWEN3_NEXT
    }

    /// Whether decoder layer `layer` uses full (softmax) attention; the others of a
    /// `qwen3_next` model use linear attention (Gated DeltaNet).
    pub fn is_full_attention(&self, layer: usize) -> bool {
        (layer + 1).is_multiple_of(self.full_attention_interval)
    }

    /// Number of full-attention decoder layers (all of them for `qwen3_moe`).
    pub fn full_attention_layers(&self) -> usize {
        self.num_hidden_layers / self.full_attention_interval
    }

    /// Number of linear-attention decoder layers (0 for `qwen3_moe`).
    pub fn linear_attention_layers(&self) -> usize {
        self.num_hidden_layers - self.full_attention_layers()
    }

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
            ("full_attention_interval", self.full_attention_interval),
        ];
        for (what, v) in dims {
            if v == 0 {
                return bad(format!("{what} must be > 0"));
            }
        }
        let next_only = [
            ("linear_num_key_heads", self.linear_num_key_heads),
            ("linear_num_value_heads", self.linear_num_value_heads),
            ("linear_key_head_dim", self.linear_key_head_dim),
            ("linear_value_head_dim", self.linear_value_head_dim),
            ("linear_conv_kernel_dim", self.linear_conv_kernel_dim),
            (
                "shared_expert_intermediate_size",
                self.shared_expert_intermediate_size,
            ),
            ("mtp_layers", self.mtp_layers),
        ];
        match self.arch {
            QWEN3_MOE => {
                if let Some((what, _)) = next_only.iter().find(|(_, v)| *v != 0) {
                    return bad(format!("{what} must be 0 for {QWEN3_MOE}"));
                }
                if self.full_attention_interval != 1 || self.partial_rotary_factor != 1.0 {
                    return bad(format!(
                        "{QWEN3_MOE} needs full_attention_interval 1 and partial_rotary_factor 1.0"
                    ));
                }
            }
            QWEN3_NEXT => {
                // mtp_layers may be 0 (a checkpoint without multi-token prediction).
                for (what, v) in &next_only[..next_only.len() - 1] {
                    if *v == 0 {
                        return bad(format!("{what} must be > 0 for {QWEN3_NEXT}"));
                    }
                }
                if !self
                    .linear_num_value_heads
                    .is_multiple_of(self.linear_num_key_heads)
                {
                    return bad(format!(
                        "linear_num_value_heads {} is not a multiple of linear_num_key_heads {}",
                        self.linear_num_value_heads, self.linear_num_key_heads
                    ));
                }
                let rotary = self.head_dim as f64 * self.partial_rotary_factor;
                if !(self.partial_rotary_factor > 0.0 && self.partial_rotary_factor <= 1.0)
                    || rotary.fract() != 0.0
                    || !(rotary as usize).is_multiple_of(2)
                {
                    return bad(format!(
                        "head_dim {} * partial_rotary_factor {} must be a positive even integer",
                        self.head_dim, self.partial_rotary_factor
                    ));
                }
            }
            other => return bad(format!("unknown architecture {other:?}")),
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

    /// Every tensor in `state_dict` order: embeddings, the decoder layers, final norm,
    /// lm_head, then (`qwen3_next`) the multi-token-prediction tensors `mtp.*`.
    ///
    /// Scales: projections use std = 1/sqrt(fan_in) (0.022 at hidden 2048, larger for
    /// the tiny demo so its activations and logits are not flat), the router 3/sqrt(H)
    /// (router logits with std ~3, so the top-k choice varies from token to token),
    /// embeddings 0.04, lm_head 2/sqrt(H) (logits with std ~2). RMSNorm weights give
    /// scale 1: ones for `qwen3_moe`; zeros for `qwen3_next`, whose norms compute
    /// `x * (1 + w)` (except the linear attention's gated norm, `w * x`: ones).
    /// Linear attention: `dt_bias` ones, `A_log` std 0.5 (so `exp(A_log)` ~ 1 and the
    /// decays are moderate), conv1d 1/sqrt(kernel); the shared expert's gate 1/sqrt(H).
    pub(crate) fn tensors(&self) -> Vec<TensorSpec> {
        let h = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        let mut out = Specs(Vec::with_capacity(self.tensor_count()));
        out.push("model.embed_tokens.weight".into(), vec![v, h], normal(0.04));
        for l in 0..self.num_hidden_layers {
            self.push_decoder(
                &mut out,
                &format!("model.layers.{l}"),
                self.is_full_attention(l),
            );
        }
        out.push("model.norm.weight".into(), vec![h], self.norm_init());
        out.push(
            "lm_head.weight".into(),
            vec![v, h],
            normal(2.0 * inv_sqrt(h)),
        );
        if self.mtp_layers > 0 {
            // The release's MTP module: fc over [embedding; hidden], then full-attention
            // decoder layers, then a norm.
            out.push(
                "mtp.fc.weight".into(),
                vec![h, 2 * h],
                normal(inv_sqrt(2 * h)),
            );
            for k in 0..self.mtp_layers {
                self.push_decoder(&mut out, &format!("mtp.layers.{k}"), true);
            }
            for n in ["norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden"] {
                out.push(format!("mtp.{n}.weight"), vec![h], self.norm_init());
            }
        }
        debug_assert_eq!(out.0.len(), self.tensor_count());
        out.0
    }

    /// Init of the RMSNorm weights (scale 1 in either convention).
    fn norm_init(&self) -> Init {
        if self.is_next() {
            Init::Zeros
        } else {
            Init::Ones
        }
    }

    /// One decoder layer under `prefix` (`model.layers.{l}` or `mtp.layers.{k}`).
    fn push_decoder(&self, out: &mut Specs, prefix: &str, full_attention: bool) {
        let p = prefix;
        let h = self.hidden_size as u64;
        let hd = self.head_dim as u64;
        let q = self.num_attention_heads as u64 * hd;
        let kv = self.num_key_value_heads as u64 * hd;
        let e = self.num_experts;
        let i = self.moe_intermediate_size as u64;
        let norm = self.norm_init();
        if full_attention {
            // Qwen3-Next's q_proj also yields the output gate: twice as many rows.
            let q_rows = if self.is_next() { 2 * q } else { q };
            out.push(
                format!("{p}.self_attn.q_proj.weight"),
                vec![q_rows, h],
                normal(inv_sqrt(h)),
            );
            out.push(
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv, h],
                normal(inv_sqrt(h)),
            );
            out.push(
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv, h],
                normal(inv_sqrt(h)),
            );
            out.push(
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, q],
                normal(inv_sqrt(q)),
            );
            out.push(format!("{p}.self_attn.q_norm.weight"), vec![hd], norm);
            out.push(format!("{p}.self_attn.k_norm.weight"), vec![hd], norm);
        } else {
            // Gated DeltaNet; torch's state_dict lists a module's own parameters
            // (dt_bias, A_log) before its submodules'.
            let nk = self.linear_num_key_heads as u64;
            let nv = self.linear_num_value_heads as u64;
            let dk = self.linear_key_head_dim as u64;
            let dv = self.linear_value_head_dim as u64;
            let kernel = self.linear_conv_kernel_dim as u64;
            let conv_dim = 2 * nk * dk + nv * dv;
            let a = format!("{p}.linear_attn");
            out.push(format!("{a}.dt_bias"), vec![nv], Init::Ones);
            out.push(format!("{a}.A_log"), vec![nv], normal(0.5));
            out.push(
                format!("{a}.conv1d.weight"),
                vec![conv_dim, 1, kernel],
                normal(inv_sqrt(kernel)),
            );
            out.push(
                format!("{a}.in_proj_qkvz.weight"),
                vec![conv_dim + nv * dv, h],
                normal(inv_sqrt(h)),
            );
            out.push(
                format!("{a}.in_proj_ba.weight"),
                vec![2 * nv, h],
                normal(inv_sqrt(h)),
            );
            out.push(format!("{a}.norm.weight"), vec![dv], Init::Ones);
            out.push(
                format!("{a}.out_proj.weight"),
                vec![h, nv * dv],
                normal(inv_sqrt(nv * dv)),
            );
        }
        out.push(
            format!("{p}.mlp.gate.weight"),
            vec![e as u64, h],
            normal(3.0 * inv_sqrt(h)),
        );
        for x in 0..e {
            out.push_swiglu(&format!("{p}.mlp.experts.{x}"), h, i);
        }
        if self.shared_expert_intermediate_size > 0 {
            let s = self.shared_expert_intermediate_size as u64;
            out.push_swiglu(&format!("{p}.mlp.shared_expert"), h, s);
            out.push(
                format!("{p}.mlp.shared_expert_gate.weight"),
                vec![1, h],
                normal(inv_sqrt(h)),
            );
        }
        out.push(format!("{p}.input_layernorm.weight"), vec![h], norm);
        out.push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            norm,
        );
    }

    /// Number of tensors (closed form; equals the length of [`Self::tensors`]).
    pub fn tensor_count(&self) -> usize {
        let shared = if self.shared_expert_intermediate_size > 0 {
            4
        } else {
            0
        };
        let mlp = 1 + 3 * self.num_experts + shared + 2;
        let full = 6 + mlp;
        let linear = 7 + mlp;
        let mtp = if self.mtp_layers > 0 {
            4 + self.mtp_layers * full
        } else {
            0
        };
        3 + self.full_attention_layers() * full + self.linear_attention_layers() * linear + mtp
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
        let s = self.shared_expert_intermediate_size as u64;
        let q_rows = if self.is_next() { 2 * q } else { q };
        let full_attn = q_rows * h + 2 * kv * h + h * q + 2 * hd;
        let (nk, nv) = (
            self.linear_num_key_heads as u64,
            self.linear_num_value_heads as u64,
        );
        let (dk, dv) = (
            self.linear_key_head_dim as u64,
            self.linear_value_head_dim as u64,
        );
        let conv_dim = 2 * nk * dk + nv * dv;
        let linear_attn = 2 * nv
            + conv_dim * self.linear_conv_kernel_dim as u64
            + (conv_dim + nv * dv) * h
            + 2 * nv * h
            + dv
            + h * nv * dv;
        let shared = if s > 0 { 3 * s * h + h } else { 0 };
        let moe = e * h + e * 3 * i * h + shared;
        let full_layer = full_attn + moe + 2 * h;
        let linear_layer = linear_attn + moe + 2 * h;
        let mtp = if self.mtp_layers > 0 {
            2 * h * h + self.mtp_layers as u64 * full_layer + 3 * h
        } else {
            0
        };
        2 * v * h
            + h
            + self.full_attention_layers() as u64 * full_layer
            + self.linear_attention_layers() as u64 * linear_layer
            + mtp
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
