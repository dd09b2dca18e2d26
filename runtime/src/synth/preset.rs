//! Model presets: the dimensions of each synthetic model and the tensors they imply.

use super::SynthError;

/// Hub `model_type` of Qwen3-MoE (`Qwen3MoeForCausalLM`).
pub const QWEN3_MOE: &str = "qwen3_moe";
/// Hub `model_type` of Qwen3-Next (`Qwen3NextForCausalLM`).
pub const QWEN3_NEXT: &str = "qwen3_next";
/// Hub `model_type` of GLM-4.5 / GLM-4.5-Air (`Glm4MoeForCausalLM`).
pub const GLM4_MOE: &str = "glm4_moe";
/// Hub `model_type` of gpt-oss (`GptOssForCausalLM`).
pub const GPT_OSS: &str = "gpt_oss";
/// Hub `model_type` of DeepSeek-V3 / R1 (`DeepseekV3ForCausalLM`).
pub const DEEPSEEK_V3: &str = "deepseek_v3";

/// Dimensions of a synthetic model (names follow the Hub's `config.json`).
///
/// A preset belongs to one architecture ([`Preset::arch`]). Fields that only
/// `qwen3_next` uses (linear attention, shared expert, multi-token prediction) are 0 for
/// the others, whose `full_attention_interval` is 1 (every layer full attention); fields
/// of `glm4_moe` / `deepseek_v3` (leading dense layers, ungated shared experts, group
/// routing), of `deepseek_v3` alone (MLA ranks and head widths) and of `gpt_oss` alone
/// (sliding window) are 0 elsewhere.
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
    /// `rms_norm_eps` written to the config and the twin.
    pub rms_norm_eps: f64,
    /// Leading dense layers (`first_k_dense_replace`), MLP width `intermediate_size`
    /// (`glm4_moe`, `deepseek_v3`). `--layers N` keeps it below `N`, so a cut model has a
    /// sparse layer.
    pub first_k_dense_replace: usize,
    /// Ungated shared experts of width `n_shared_experts * moe_intermediate_size`
    /// (`glm4_moe`, `deepseek_v3`).
    pub n_shared_experts: usize,
    /// Router groups and the groups kept (`glm4_moe`, `deepseek_v3`).
    pub n_group: usize,
    pub topk_group: usize,
    /// `routed_scaling_factor` (`glm4_moe`, `deepseek_v3`; 0 elsewhere).
    pub routed_scaling_factor: f64,
    /// MLA (`deepseek_v3`): query latent width (0 writes one `q_proj`, as a null
    /// `q_lora_rank`), key/value latent width, and the per-head widths.
    pub q_lora_rank: usize,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Window of the sliding-attention layers (`gpt_oss`: the even ones).
    pub sliding_window: usize,
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
    rms_norm_eps: 1e-6,
    first_k_dense_replace: 0,
    n_shared_experts: 0,
    n_group: 0,
    topk_group: 0,
    routed_scaling_factor: 0.0,
    q_lora_rank: 0,
    kv_lora_rank: 0,
    qk_nope_head_dim: 0,
    qk_rope_head_dim: 0,
    v_head_dim: 0,
    sliding_window: 0,
};

/// `zai-org/GLM-4.5-Air`'s config (every preset of `glm4_moe` fills in its dimensions).
const GLM45_AIR: Preset = Preset {
    name: "glm45-air-shape",
    arch: GLM4_MOE,
    hidden_size: 4096,
    intermediate_size: 10944,
    moe_intermediate_size: 1408,
    num_hidden_layers: 46,
    num_attention_heads: 96,
    num_key_value_heads: 8,
    head_dim: 128,
    vocab_size: 151552,
    max_position_embeddings: 131072,
    num_experts: 128,
    num_experts_per_tok: 8,
    rope_theta: 1_000_000.0,
    default_shard_bytes: HUB_SHARD_BYTES,
    partial_rotary_factor: 0.5,
    rms_norm_eps: 1e-5,
    first_k_dense_replace: 1,
    n_shared_experts: 1,
    n_group: 1,
    topk_group: 1,
    routed_scaling_factor: 1.0,
    ..QWEN3_MOE_BASE
};

/// `openai/gpt-oss-20b`'s config.
const GPT_OSS_20B: Preset = Preset {
    name: "gpt-oss-20b-shape",
    arch: GPT_OSS,
    hidden_size: 2880,
    intermediate_size: 2880,
    moe_intermediate_size: 2880,
    num_hidden_layers: 24,
    num_attention_heads: 64,
    num_key_value_heads: 8,
    head_dim: 64,
    vocab_size: 201088,
    max_position_embeddings: 131072,
    num_experts: 32,
    num_experts_per_tok: 4,
    rope_theta: 150_000.0,
    default_shard_bytes: HUB_SHARD_BYTES,
    rms_norm_eps: 1e-5,
    sliding_window: 128,
    ..QWEN3_MOE_BASE
};

/// `deepseek-ai/DeepSeek-V3`'s config (bf16 instead of the release's FP8 blocks).
const DEEPSEEK_V3_671B: Preset = Preset {
    name: "deepseek-v3-shape",
    arch: DEEPSEEK_V3,
    hidden_size: 7168,
    intermediate_size: 18432,
    moe_intermediate_size: 2048,
    num_hidden_layers: 61,
    num_attention_heads: 128,
    num_key_value_heads: 128,
    // The runtime's head width for MLA is the rope width (`qk_rope_head_dim`).
    head_dim: 64,
    vocab_size: 129280,
    max_position_embeddings: 163840,
    num_experts: 256,
    num_experts_per_tok: 8,
    rope_theta: 10_000.0,
    default_shard_bytes: HUB_SHARD_BYTES,
    rms_norm_eps: 1e-6,
    first_k_dense_replace: 3,
    n_shared_experts: 1,
    n_group: 8,
    topk_group: 4,
    routed_scaling_factor: 2.5,
    q_lora_rank: 1536,
    kv_lora_rank: 512,
    qk_nope_head_dim: 128,
    qk_rope_head_dim: 64,
    v_head_dim: 128,
    ..QWEN3_MOE_BASE
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
        ..QWEN3_MOE_BASE
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
        ..QWEN3_MOE_BASE
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
        ..QWEN3_MOE_BASE
    },
    // GLM-4.5-Air's structure (a dense first layer, 128 experts top-8 with a shared
    // expert, sigmoid routing with a correction bias, q/k/v biases, half rotary) at test
    // size: ~1.2 MB of weights.
    Preset {
        name: "glm45-demo",
        hidden_size: 64,
        intermediate_size: 160,
        moe_intermediate_size: 32,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        vocab_size: 2048,
        max_position_embeddings: 4096,
        num_experts: 16,
        num_experts_per_tok: 4,
        n_group: 4,
        topk_group: 2,
        default_shard_bytes: 1 << 20,
        ..GLM45_AIR
    },
    // The released GLM-4.5-Air less its MTP layer: 46 layers, 106.85 B parameters, 214 GB.
    GLM45_AIR,
    // gpt-oss's structure (alternating sliding / full layers with sinks, biased router,
    // MXFP4 experts with biases) at test size.
    Preset {
        name: "gpt-oss-demo",
        hidden_size: 64,
        intermediate_size: 64,
        moe_intermediate_size: 64,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        vocab_size: 2048,
        max_position_embeddings: 4096,
        num_experts: 8,
        num_experts_per_tok: 2,
        sliding_window: 8,
        default_shard_bytes: 1 << 20,
        ..GPT_OSS_20B
    },
    // The released gpt-oss-20b: 24 layers x 32 MXFP4 experts, 20.91 B parameters, 13.8 GB.
    GPT_OSS_20B,
    // The released gpt-oss-120b: 36 layers x 128 experts, 116.83 B parameters, 65.2 GB.
    Preset {
        name: "gpt-oss-120b-shape",
        num_hidden_layers: 36,
        num_experts: 128,
        ..GPT_OSS_20B
    },
    // DeepSeek-V3's structure (MLA with a query latent, three dense layers, 8 groups of
    // experts, shared expert) at test size; `--layers 2` keeps one sparse layer.
    Preset {
        name: "deepseek-v3-demo",
        hidden_size: 64,
        intermediate_size: 160,
        moe_intermediate_size: 32,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 4,
        head_dim: 16,
        vocab_size: 2048,
        max_position_embeddings: 4096,
        num_experts: 16,
        num_experts_per_tok: 4,
        q_lora_rank: 48,
        kv_lora_rank: 32,
        qk_nope_head_dim: 32,
        qk_rope_head_dim: 16,
        // Unlike the release, v differs from nope: a k_b / v_b split that mixed them up
        // would show.
        v_head_dim: 24,
        default_shard_bytes: 1 << 20,
        ..DEEPSEEK_V3_671B
    },
    // The released DeepSeek-V3 in bf16 (less its MTP layer): 61 layers x 256 experts,
    // 671.03 B parameters, 1.34 TB.
    DEEPSEEK_V3_671B,
];

/// Names of all presets, each architecture's smallest first (`qwen3_moe`, `qwen3_next`,
/// `glm4_moe`, `gpt_oss`, `deepseek_v3`).
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
    /// Bytes uniform in `lo..=hi` (MXFP4 codes: all bytes; E8M0 scales: a narrow band of
    /// exponents).
    Bytes { lo: u8, hi: u8 },
    /// Zero-mean, roughly normal (Irwin-Hall of 4 uniforms) with this standard deviation.
    Normal { std: f32 },
}

/// How a tensor is stored in the safetensors files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dtype {
    BF16,
    /// f32 holding bf16 values exactly (`e_score_correction_bias`, stored f32 by the
    /// releases).
    F32,
    /// U8 MXFP4 codes: two 4-bit weights per byte (`*_blocks`).
    Mxfp4Codes,
    /// U8 E8M0 exponents, one per 32 weights (`*_scales`).
    E8m0Scales,
}

impl Dtype {
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::BF16 => 2,
            Dtype::F32 => 4,
            Dtype::Mxfp4Codes | Dtype::E8m0Scales => 1,
        }
    }

    pub fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::Mxfp4Codes | Dtype::E8m0Scales => "U8",
        }
    }

    /// How the writer emits its elements.
    pub(crate) fn out(self) -> super::writer::Out {
        use super::writer::Out;
        match self {
            Dtype::BF16 => Out::Bf16,
            Dtype::F32 => Out::F32,
            Dtype::Mxfp4Codes | Dtype::E8m0Scales => Out::U8,
        }
    }
}

/// One tensor of the checkpoint, in the order the model's `state_dict` lists it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorSpec {
    pub name: String,
    pub shape: Vec<u64>,
    pub init: Init,
    pub dtype: Dtype,
}

impl TensorSpec {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
    pub fn size_bytes(&self) -> u64 {
        self.numel() * self.dtype.bytes()
    }
    /// Model parameters this tensor holds: two per MXFP4 code byte, none for the scales.
    pub fn params(&self) -> u64 {
        match self.dtype {
            Dtype::Mxfp4Codes => 2 * self.numel(),
            Dtype::E8m0Scales => 0,
            Dtype::BF16 | Dtype::F32 => self.numel(),
        }
    }
}

/// Collects [`TensorSpec`]s.
struct Specs(Vec<TensorSpec>);

impl Specs {
    fn push(&mut self, name: String, shape: Vec<u64>, init: Init) {
        self.push_as(name, shape, init, Dtype::BF16);
    }

    fn push_as(&mut self, name: String, shape: Vec<u64>, init: Init, dtype: Dtype) {
        self.0.push(TensorSpec {
            name,
            shape,
            init,
            dtype,
        });
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

/// Weights per MXFP4 block (one E8M0 scale byte each).
pub(crate) const MXFP4_BLOCK: u64 = 32;

/// E8M0 scales for MXFP4 weights of fan-in `fan_in`: codes uniform over all 16 E2M1
/// values have RMS 2.93, so exponent `e = round(log2(1 / (sqrt(fan_in) * 2.93)))` gives
/// std ~1/sqrt(fan_in); the scales draw `e - 1` or `e` (biased by 127).
fn mxfp4_scales(fan_in: u64) -> Init {
    let e = (inv_sqrt(fan_in) / 2.93).log2().round() as i32;
    let hi = (127 + e).clamp(1, 254) as u8;
    Init::Bytes { lo: hi - 1, hi }
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

    /// Whether this preset writes one of the Qwen layouts (`qwen3_moe`, `qwen3_next`).
    fn is_qwen(&self) -> bool {
        self.arch == QWEN3_MOE || self.arch == QWEN3_NEXT
    }

    /// Whether decoder layer `layer` is sparse (an MoE block); the leading
    /// `first_k_dense_replace` layers are dense.
    pub fn is_sparse(&self, layer: usize) -> bool {
        layer >= self.first_k_dense_replace
    }

    /// Sparse decoder layers.
    pub fn sparse_layers(&self) -> usize {
        self.num_hidden_layers
            .saturating_sub(self.first_k_dense_replace)
    }

    /// Checks of the `glm4_moe`, `gpt_oss` and `deepseek_v3` fields (the ones an
    /// architecture does not use must be 0).
    fn validate_new_arch(&self) -> Result<(), SynthError> {
        let bad = |why: String| Err(SynthError::Invalid(format!("preset {}: {why}", self.name)));
        let group = [
            ("first_k_dense_replace", self.first_k_dense_replace),
            ("n_shared_experts", self.n_shared_experts),
            ("n_group", self.n_group),
            ("topk_group", self.topk_group),
        ];
        let mla = [
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
        ];
        let grouped = self.arch == GLM4_MOE || self.arch == DEEPSEEK_V3;
        for (what, v) in group {
            if !grouped && v != 0 {
                return bad(format!("{what} must be 0 for {}", self.arch));
            }
        }
        for (what, v) in mla.iter().chain([("q_lora_rank", self.q_lora_rank)].iter()) {
            if self.arch != DEEPSEEK_V3 && *v != 0 {
                return bad(format!("{what} must be 0 for {}", self.arch));
            }
        }
        if self.arch != GPT_OSS && self.sliding_window != 0 {
            return bad(format!("sliding_window must be 0 for {}", self.arch));
        }
        if grouped {
            for (what, v) in &group[2..] {
                if *v == 0 {
                    return bad(format!("{what} must be > 0 for {}", self.arch));
                }
            }
            if !self.num_experts.is_multiple_of(self.n_group) || self.topk_group > self.n_group {
                return bad(format!(
                    "num_experts {} must split into n_group {} groups, of which topk_group {} \
                     are kept",
                    self.num_experts, self.n_group, self.topk_group
                ));
            }
            if self.routed_scaling_factor.is_nan() || self.routed_scaling_factor <= 0.0 {
                return bad("routed_scaling_factor must be > 0".into());
            }
        }
        match self.arch {
            DEEPSEEK_V3 => {
                for (what, v) in mla {
                    if v == 0 {
                        return bad(format!("{what} must be > 0 for {DEEPSEEK_V3}"));
                    }
                }
                if self.head_dim != self.qk_rope_head_dim {
                    return bad(format!(
                        "head_dim {} must equal qk_rope_head_dim {} (the MLA rope width)",
                        self.head_dim, self.qk_rope_head_dim
                    ));
                }
                if self.num_key_value_heads != self.num_attention_heads {
                    return bad("num_key_value_heads must equal num_attention_heads".into());
                }
            }
            GPT_OSS => {
                if self.sliding_window == 0 {
                    return bad(format!("sliding_window must be > 0 for {GPT_OSS}"));
                }
                for (what, v) in [
                    ("hidden_size", self.hidden_size),
                    ("moe_intermediate_size", self.moe_intermediate_size),
                ] {
                    if !v.is_multiple_of(MXFP4_BLOCK as usize) {
                        return bad(format!(
                            "{what} {v} must be a multiple of {MXFP4_BLOCK} (MXFP4 blocks)"
                        ));
                    }
                }
            }
            GLM4_MOE => {
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
            _ => {}
        }
        Ok(())
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
            QWEN3_MOE | GLM4_MOE | GPT_OSS | DEEPSEEK_V3 => {
                if let Some((what, _)) = next_only.iter().find(|(_, v)| *v != 0) {
                    return bad(format!("{what} must be 0 for {}", self.arch));
                }
                let rotary = if self.arch == GLM4_MOE {
                    self.partial_rotary_factor
                } else {
                    1.0
                };
                if self.full_attention_interval != 1 || self.partial_rotary_factor != rotary {
                    return bad(format!(
                        "{} needs full_attention_interval 1 and partial_rotary_factor {rotary}",
                        self.arch
                    ));
                }
                self.validate_new_arch()?;
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
            let prefix = format!("model.layers.{l}");
            if self.is_qwen() {
                self.push_decoder(&mut out, &prefix, self.is_full_attention(l));
            } else {
                self.push_layer(&mut out, &prefix, l);
            }
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

    /// One decoder layer of `glm4_moe`, `gpt_oss` or `deepseek_v3` under `prefix`, in
    /// the class's `state_dict` order (attention, MLP, the two norms).
    ///
    /// Scales as [`Self::tensors`] says, plus: biases std 0.02, gpt-oss sinks std 0.5
    /// (logits of the order of the attention scores), router biases and
    /// `e_score_correction_bias` std 0.01 (they shift the choice, never dominate it),
    /// MXFP4 codes uniform over all 16 values (RMS 2.93) with E8M0 exponents chosen so the
    /// weights' std is about 1/sqrt(fan_in).
    fn push_layer(&self, out: &mut Specs, p: &str, layer: usize) {
        let h = self.hidden_size as u64;
        let heads = self.num_attention_heads as u64;
        let e = self.num_experts as u64;
        let i = self.moe_intermediate_size as u64;
        let bias = normal(0.02);
        let a = format!("{p}.self_attn");
        if self.arch == DEEPSEEK_V3 {
            let qk = (self.qk_nope_head_dim + self.qk_rope_head_dim) as u64;
            let kvl = self.kv_lora_rank as u64;
            if self.q_lora_rank > 0 {
                let ql = self.q_lora_rank as u64;
                out.push(
                    format!("{a}.q_a_proj.weight"),
                    vec![ql, h],
                    normal(inv_sqrt(h)),
                );
                out.push(format!("{a}.q_a_layernorm.weight"), vec![ql], Init::Ones);
                out.push(
                    format!("{a}.q_b_proj.weight"),
                    vec![heads * qk, ql],
                    normal(inv_sqrt(ql)),
                );
            } else {
                out.push(
                    format!("{a}.q_proj.weight"),
                    vec![heads * qk, h],
                    normal(inv_sqrt(h)),
                );
            }
            out.push(
                format!("{a}.kv_a_proj_with_mqa.weight"),
                vec![kvl + self.qk_rope_head_dim as u64, h],
                normal(inv_sqrt(h)),
            );
            out.push(format!("{a}.kv_a_layernorm.weight"), vec![kvl], Init::Ones);
            let v = self.v_head_dim as u64;
            out.push(
                format!("{a}.kv_b_proj.weight"),
                vec![heads * (self.qk_nope_head_dim as u64 + v), kvl],
                normal(inv_sqrt(kvl)),
            );
            out.push(
                format!("{a}.o_proj.weight"),
                vec![h, heads * v],
                normal(inv_sqrt(heads * v)),
            );
        } else {
            let hd = self.head_dim as u64;
            let q = heads * hd;
            let kv = self.num_key_value_heads as u64 * hd;
            for (proj, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                out.push(
                    format!("{a}.{proj}.weight"),
                    vec![rows, h],
                    normal(inv_sqrt(h)),
                );
                out.push(format!("{a}.{proj}.bias"), vec![rows], bias);
            }
            out.push(
                format!("{a}.o_proj.weight"),
                vec![h, q],
                normal(inv_sqrt(q)),
            );
            if self.arch == GPT_OSS {
                out.push(format!("{a}.o_proj.bias"), vec![h], bias);
                out.push(format!("{a}.sinks"), vec![heads], normal(0.5));
            }
        }
        let m = format!("{p}.mlp");
        if self.arch == GPT_OSS {
            out.push(
                format!("{m}.router.weight"),
                vec![e, h],
                normal(3.0 * inv_sqrt(h)),
            );
            out.push(format!("{m}.router.bias"), vec![e], normal(0.01));
            let x = format!("{m}.experts");
            for (proj, rows, cols) in [("gate_up_proj", 2 * i, h), ("down_proj", h, i)] {
                let blocks = cols / MXFP4_BLOCK;
                out.push_as(
                    format!("{x}.{proj}_blocks"),
                    vec![e, rows, blocks, MXFP4_BLOCK / 2],
                    Init::Bytes { lo: 0, hi: 255 },
                    Dtype::Mxfp4Codes,
                );
                out.push_as(
                    format!("{x}.{proj}_scales"),
                    vec![e, rows, blocks],
                    mxfp4_scales(cols),
                    Dtype::E8m0Scales,
                );
                out.push(format!("{x}.{proj}_bias"), vec![e, rows], bias);
            }
        } else if self.is_sparse(layer) {
            for x in 0..e {
                out.push_swiglu(&format!("{m}.experts.{x}"), h, i);
            }
            out.push(
                format!("{m}.gate.weight"),
                vec![e, h],
                normal(3.0 * inv_sqrt(h)),
            );
            out.push_as(
                format!("{m}.gate.e_score_correction_bias"),
                vec![e],
                normal(0.01),
                Dtype::F32,
            );
            if self.n_shared_experts > 0 {
                out.push_swiglu(
                    &format!("{m}.shared_experts"),
                    h,
                    i * self.n_shared_experts as u64,
                );
            }
        } else {
            out.push_swiglu(&m, h, self.intermediate_size as u64);
        }
        out.push(format!("{p}.input_layernorm.weight"), vec![h], Init::Ones);
        out.push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Init::Ones,
        );
    }

    /// Tensors and parameters of one decoder layer of `glm4_moe`, `gpt_oss` or
    /// `deepseek_v3` (closed forms of [`Self::push_layer`]), for a sparse and a dense
    /// layer.
    fn new_arch_layer_counts(&self) -> [(usize, u64); 2] {
        let h = self.hidden_size as u64;
        let heads = self.num_attention_heads as u64;
        let e = self.num_experts as u64;
        let i = self.moe_intermediate_size as u64;
        let (attn_t, attn_p) = if self.arch == DEEPSEEK_V3 {
            let qk = (self.qk_nope_head_dim + self.qk_rope_head_dim) as u64;
            let (kvl, ql) = (self.kv_lora_rank as u64, self.q_lora_rank as u64);
            let v = self.v_head_dim as u64;
            let (qt, qp) = if ql > 0 {
                (3, ql * h + ql + heads * qk * ql)
            } else {
                (1, heads * qk * h)
            };
            let kv = (kvl + self.qk_rope_head_dim as u64) * h
                + kvl
                + heads * (self.qk_nope_head_dim as u64 + v) * kvl
                + h * heads * v;
            (qt + 4, qp + kv)
        } else {
            let hd = self.head_dim as u64;
            let q = heads * hd;
            let kv = self.num_key_value_heads as u64 * hd;
            let base = q * h + q + 2 * (kv * h + kv) + h * q;
            if self.arch == GPT_OSS {
                (9, base + h + heads)
            } else {
                (7, base)
            }
        };
        let norms = (2, 2 * h);
        let (sparse_t, sparse_p) = if self.arch == GPT_OSS {
            // Router weight and bias; per projection codes (2 weights a byte), scales (no
            // parameters) and biases.
            (8, e * h + e + e * 2 * i * h + e * 2 * i + e * h * i + e * h)
        } else {
            let shared = if self.n_shared_experts > 0 {
                (3, 3 * h * i * self.n_shared_experts as u64)
            } else {
                (0, 0)
            };
            (
                3 * e as usize + 2 + shared.0,
                3 * e * i * h + e * h + e + shared.1,
            )
        };
        let dense = (3, 3 * h * self.intermediate_size as u64);
        [
            (attn_t + sparse_t + norms.0, attn_p + sparse_p + norms.1),
            (attn_t + dense.0 + norms.0, attn_p + dense.1 + norms.1),
        ]
    }

    /// Number of tensors (closed form; equals the length of [`Self::tensors`]).
    pub fn tensor_count(&self) -> usize {
        if !self.is_qwen() {
            let [sparse, dense] = self.new_arch_layer_counts();
            let n_dense = self.num_hidden_layers - self.sparse_layers();
            return 3 + self.sparse_layers() * sparse.0 + n_dense * dense.0;
        }
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

    /// Total parameter count (closed form; equals the sum of [`TensorSpec::params`] over
    /// [`Self::tensors`]: an MXFP4 code byte holds two parameters, its scales none).
    pub fn param_count(&self) -> u64 {
        if !self.is_qwen() {
            let [sparse, dense] = self.new_arch_layer_counts();
            let n_dense = (self.num_hidden_layers - self.sparse_layers()) as u64;
            let (h, v) = (self.hidden_size as u64, self.vocab_size as u64);
            return 2 * v * h + h + self.sparse_layers() as u64 * sparse.1 + n_dense * dense.1;
        }
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

    /// Bytes of tensor data (the index's `total_size`): bf16 but for the f32 and byte
    /// tensors the releases store.
    pub fn weight_bytes(&self) -> u64 {
        if self.is_qwen() {
            return self.param_count() * 2;
        }
        self.tensors().iter().map(TensorSpec::size_bytes).sum()
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
