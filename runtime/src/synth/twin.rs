//! The GGUF twin: the same weights as the Hugging Face files, in the llama.cpp layout
//! its HF converter (`convert_hf_to_gguf.py`, `--outtype bf16`) writes: `qwen3moe`
//! (`qwen3_moe`), `glm4moe` (`glm4_moe`), `gpt-oss` (`gpt_oss`) and `deepseek2`
//! (`deepseek_v3`). [`super::synth_gguf`] refuses `qwen3_next`.
//!
//! What must always hold:
//! - Names, dims, types and metadata keys are the converter's: dims are the torch shape
//!   reversed (GGML order); the per-expert tensors of a layer are stacked along a new
//!   outermost dimension (torch `[E, I, H]` -> dims `[H, I, E]`, expert `e` being slice
//!   `e`); no q/k permutation (the converter permutes only for llama).
//! - Types follow the converter's rule: F32 for 1-D tensors, `*_norm.weight`, the router
//!   (`ffn_gate_inp.weight`) and every tensor not named `*.weight` (biases,
//!   `exp_probs_b.bias`), each exactly the bf16 value widened; MXFP4 for gpt-oss's experts;
//!   BF16 for the rest.
//! - Every element is bit-identical to the HF files (regenerated from the HF tensor name
//!   and index), through the converter's reshapes: gpt-oss's fused `gate_up_proj` split
//!   into its even (gate) and odd (up) rows, its MXFP4 code bytes reordered into GGML's
//!   nibble order with the scale byte in front of each block; DeepSeek-V3's `kv_b_proj`
//!   split per head into `attn_k_b` (the nope rows, transposed) and `attn_v_b`.
//! - Not written: the releases' multi-token-prediction layers (neither file has them).

use std::collections::HashMap;

use crate::gguf::{GgmlType, TensorSpec as GgufTensor, Value, ValueType};

use super::preset::{Preset, TensorSpec, DEEPSEEK_V3, GLM4_MOE, GPT_OSS, QWEN3_MOE};
use super::tokenizer::{build_bpe, CHAT_TEMPLATE, SPECIAL_TOKENS};
use super::writer::Affine;

/// `LLAMA_FTYPE_MOSTLY_BF16`.
const FILE_TYPE_BF16: u32 = 32;
/// `GGML_QNT_VERSION`.
const QUANT_VERSION: u32 = 2;
/// llama.cpp's token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
/// `LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID`.
const GATING_SIGMOID: u32 = 2;

/// The Hub architectures the twin is written for.
pub(crate) const TWIN_ARCHS: [&str; 4] = [QWEN3_MOE, GLM4_MOE, GPT_OSS, DEEPSEEK_V3];

/// llama.cpp's architecture name for a Hub `model_type`, if the twin is written for it.
pub(crate) fn gguf_arch(hf_arch: &str) -> Option<&'static str> {
    match hf_arch {
        QWEN3_MOE => Some("qwen3moe"),
        GLM4_MOE => Some("glm4moe"),
        GPT_OSS => Some("gpt-oss"),
        DEEPSEEK_V3 => Some("deepseek2"),
        _ => None,
    }
}

/// A run of a GGUF tensor's data: HF tensor `source` (an index into the preset's specs)
/// read through `map`; for MXFP4 data `map` counts 32-weight blocks and `scales` is the
/// HF `*_scales` tensor read through the same map.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Part {
    pub source: usize,
    pub map: Affine,
    pub scales: Option<usize>,
}

/// One GGUF tensor and the parts whose data, concatenated, is its data.
pub(crate) struct TwinTensor {
    pub spec: GgufTensor,
    pub parts: Vec<Part>,
}

/// The converter's type for a GGUF tensor `name` with `n_dims` torch dims (non-MXFP4).
fn twin_type(name: &str, n_dims: usize) -> GgmlType {
    if n_dims <= 1
        || name.ends_with("_norm.weight")
        || name.ends_with("ffn_gate_inp.weight")
        || !name.ends_with(".weight")
    {
        GgmlType::F32
    } else {
        GgmlType::BF16
    }
}

/// Collects the twin's tensors.
struct Twin<'a> {
    specs: &'a [TensorSpec],
    index: HashMap<&'a str, usize>,
    out: Vec<TwinTensor>,
}

impl<'a> Twin<'a> {
    fn src(&self, name: &str) -> usize {
        *self.index.get(name).expect("preset names every tensor")
    }

    /// `gguf` from `parts`, with torch shape `shape` and the converter's type rule.
    fn push(&mut self, gguf: String, shape: Vec<u64>, parts: Vec<Part>) {
        let ty = twin_type(&gguf, shape.len());
        self.push_typed(gguf, shape, parts, ty);
    }

    fn push_typed(&mut self, gguf: String, shape: Vec<u64>, parts: Vec<Part>, ty: GgmlType) {
        let dims: Vec<u64> = shape.iter().rev().copied().collect();
        debug_assert_eq!(
            parts.iter().map(|p| p.map.len()).sum::<u64>() * ty.block_size(),
            dims.iter().product::<u64>(),
            "{gguf}: parts cover the tensor"
        );
        self.out.push(TwinTensor {
            spec: GgufTensor::new(gguf, dims, ty),
            parts,
        });
    }

    /// `gguf` holding HF tensor `hf` as it is.
    fn one(&mut self, gguf: &str, hf: &str) {
        let s = self.src(hf);
        let shape = self.specs[s].shape.clone();
        let part = Part {
            source: s,
            map: Affine::identity(self.specs[s].numel()),
            scales: None,
        };
        self.push(gguf.to_string(), shape, vec![part]);
    }

    /// `gguf` stacking the HF tensors `hf` (all of one shape) along a new outer dim.
    fn stack(&mut self, gguf: &str, hf: &[String]) {
        let srcs: Vec<usize> = hf.iter().map(|n| self.src(n)).collect();
        let shape = &self.specs[srcs[0]].shape;
        debug_assert!(srcs.iter().all(|&s| self.specs[s].shape == *shape));
        let mut full = vec![srcs.len() as u64];
        full.extend_from_slice(shape);
        let parts = srcs
            .iter()
            .map(|&s| Part {
                source: s,
                map: Affine::identity(self.specs[s].numel()),
                scales: None,
            })
            .collect();
        self.push(gguf.to_string(), full, parts);
    }

    /// One part reading HF tensor `hf` through `map`.
    fn part(&self, hf: &str, map: Affine) -> Vec<Part> {
        vec![Part {
            source: self.src(hf),
            map,
            scales: None,
        }]
    }
}

/// The twin's tensors in write order: `token_embd`, the layers, `output_norm`, `output`.
pub(crate) fn twin_tensors(p: &Preset, specs: &[TensorSpec]) -> Vec<TwinTensor> {
    let mut t = Twin {
        specs,
        index: specs
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect(),
        out: Vec::new(),
    };
    t.one("token_embd.weight", "model.embed_tokens.weight");
    for l in 0..p.num_hidden_layers {
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        let blk = |s: &str| format!("blk.{l}.{s}");
        t.one(&blk("attn_norm.weight"), &hf("input_layernorm.weight"));
        match p.arch {
            QWEN3_MOE => {
                for (gg, proj) in [
                    ("attn_q", "q_proj"),
                    ("attn_k", "k_proj"),
                    ("attn_v", "v_proj"),
                    ("attn_output", "o_proj"),
                    ("attn_q_norm", "q_norm"),
                    ("attn_k_norm", "k_norm"),
                ] {
                    t.one(
                        &blk(&format!("{gg}.weight")),
                        &hf(&format!("self_attn.{proj}.weight")),
                    );
                }
                t.one(
                    &blk("ffn_norm.weight"),
                    &hf("post_attention_layernorm.weight"),
                );
            }
            DEEPSEEK_V3 => {
                mla_tensors(&mut t, p, l);
                t.one(
                    &blk("ffn_norm.weight"),
                    &hf("post_attention_layernorm.weight"),
                );
            }
            _ => {
                // glm4moe and gpt-oss: q/k/v with biases, the post-attention norm named so.
                for (gg, proj) in [
                    ("attn_q", "q_proj"),
                    ("attn_k", "k_proj"),
                    ("attn_v", "v_proj"),
                ] {
                    t.one(
                        &blk(&format!("{gg}.weight")),
                        &hf(&format!("self_attn.{proj}.weight")),
                    );
                    t.one(
                        &blk(&format!("{gg}.bias")),
                        &hf(&format!("self_attn.{proj}.bias")),
                    );
                }
                t.one(&blk("attn_output.weight"), &hf("self_attn.o_proj.weight"));
                if p.arch == GPT_OSS {
                    t.one(&blk("attn_output.bias"), &hf("self_attn.o_proj.bias"));
                    t.one(&blk("attn_sinks.weight"), &hf("self_attn.sinks"));
                }
                t.one(
                    &blk("post_attention_norm.weight"),
                    &hf("post_attention_layernorm.weight"),
                );
            }
        }
        if p.arch == GPT_OSS {
            gpt_oss_experts(&mut t, p, l);
        } else if p.is_sparse(l) {
            t.one(&blk("ffn_gate_inp.weight"), &hf("mlp.gate.weight"));
            if p.arch != QWEN3_MOE {
                t.one(
                    &blk("exp_probs_b.bias"),
                    &hf("mlp.gate.e_score_correction_bias"),
                );
            }
            for (gg, proj) in [
                ("ffn_gate_exps", "gate_proj"),
                ("ffn_up_exps", "up_proj"),
                ("ffn_down_exps", "down_proj"),
            ] {
                let experts: Vec<String> = (0..p.num_experts)
                    .map(|e| hf(&format!("mlp.experts.{e}.{proj}.weight")))
                    .collect();
                t.stack(&blk(&format!("{gg}.weight")), &experts);
            }
            if p.n_shared_experts > 0 {
                for (gg, proj) in [
                    ("ffn_gate_shexp", "gate_proj"),
                    ("ffn_up_shexp", "up_proj"),
                    ("ffn_down_shexp", "down_proj"),
                ] {
                    t.one(
                        &blk(&format!("{gg}.weight")),
                        &hf(&format!("mlp.shared_experts.{proj}.weight")),
                    );
                }
            }
        } else {
            for (gg, proj) in [
                ("ffn_gate", "gate_proj"),
                ("ffn_up", "up_proj"),
                ("ffn_down", "down_proj"),
            ] {
                t.one(
                    &blk(&format!("{gg}.weight")),
                    &hf(&format!("mlp.{proj}.weight")),
                );
            }
        }
    }
    t.one("output_norm.weight", "model.norm.weight");
    t.one("output.weight", "lm_head.weight");
    t.out
}

/// DeepSeek-V3's latent attention: `kv_b_proj` `[heads * (nope + v), kv_lora]` is split
/// per head into `attn_k_b` (torch `[heads, kv_lora, nope]`: the nope rows transposed)
/// and `attn_v_b` (torch `[heads, v, kv_lora]`).
fn mla_tensors(t: &mut Twin, p: &Preset, l: usize) {
    let hf = |s: &str| format!("model.layers.{l}.self_attn.{s}");
    let blk = |s: &str| format!("blk.{l}.{s}");
    if p.q_lora_rank > 0 {
        t.one(&blk("attn_q_a.weight"), &hf("q_a_proj.weight"));
        t.one(&blk("attn_q_a_norm.weight"), &hf("q_a_layernorm.weight"));
        t.one(&blk("attn_q_b.weight"), &hf("q_b_proj.weight"));
    } else {
        t.one(&blk("attn_q.weight"), &hf("q_proj.weight"));
    }
    t.one(
        &blk("attn_kv_a_mqa.weight"),
        &hf("kv_a_proj_with_mqa.weight"),
    );
    t.one(&blk("attn_kv_a_norm.weight"), &hf("kv_a_layernorm.weight"));
    let heads = p.num_attention_heads as u64;
    let (nope, v, kvl) = (
        p.qk_nope_head_dim as u64,
        p.v_head_dim as u64,
        p.kv_lora_rank as u64,
    );
    let head = (nope + v) * kvl;
    let kv_b = hf("kv_b_proj.weight");
    // k_b[h, r, c] = kv_b[h * (nope + v) + c, r]
    let k_b = Affine {
        dims: [heads, kvl, nope],
        strides: [head, 1, kvl],
        base: 0,
    };
    // v_b[h, r, c] = kv_b[h * (nope + v) + nope + r, c]
    let v_b = Affine {
        dims: [heads, v, kvl],
        strides: [head, kvl, 1],
        base: nope * kvl,
    };
    let parts = t.part(&kv_b, k_b);
    t.push(blk("attn_k_b.weight"), vec![heads, kvl, nope], parts);
    let parts = t.part(&kv_b, v_b);
    t.push(blk("attn_v_b.weight"), vec![heads, v, kvl], parts);
    t.one(&blk("attn_output.weight"), &hf("o_proj.weight"));
}

/// gpt-oss's router and experts: the fused `gate_up_proj` (rows alternating gate, up)
/// split into `ffn_gate_exps` / `ffn_up_exps`, MXFP4 blocks repacked as GGML's, biases F32.
fn gpt_oss_experts(t: &mut Twin, p: &Preset, l: usize) {
    let hf = |s: &str| format!("model.layers.{l}.mlp.{s}");
    let blk = |s: &str| format!("blk.{l}.{s}");
    t.one(&blk("ffn_gate_inp.weight"), &hf("router.weight"));
    t.one(&blk("ffn_gate_inp.bias"), &hf("router.bias"));
    let (e, h, i) = (
        p.num_experts as u64,
        p.hidden_size as u64,
        p.moe_intermediate_size as u64,
    );
    let blocks_h = h / super::preset::MXFP4_BLOCK;
    let blocks_i = i / super::preset::MXFP4_BLOCK;
    for (gg, half) in [("ffn_gate_exps", 0), ("ffn_up_exps", 1)] {
        // Block (e, r, b) of the half is block (e, 2r + half, b) of gate_up_proj.
        let map = Affine {
            dims: [e, i, blocks_h],
            strides: [2 * i * blocks_h, 2 * blocks_h, 1],
            base: half * blocks_h,
        };
        let part = Part {
            source: t.src(&hf("experts.gate_up_proj_blocks")),
            map,
            scales: Some(t.src(&hf("experts.gate_up_proj_scales"))),
        };
        t.push_typed(
            blk(&format!("{gg}.weight")),
            vec![e, i, h],
            vec![part],
            GgmlType::Mxfp4,
        );
        // Bias element (e, r) is gate_up_proj_bias (e, 2r + half).
        let map = Affine {
            dims: [1, e, i],
            strides: [0, 2 * i, 2],
            base: half,
        };
        let parts = t.part(&hf("experts.gate_up_proj_bias"), map);
        t.push(blk(&format!("{gg}.bias")), vec![e, i], parts);
    }
    let part = Part {
        source: t.src(&hf("experts.down_proj_blocks")),
        map: Affine::identity(e * h * blocks_i),
        scales: Some(t.src(&hf("experts.down_proj_scales"))),
    };
    t.push_typed(
        blk("ffn_down_exps.weight"),
        vec![e, h, i],
        vec![part],
        GgmlType::Mxfp4,
    );
    t.one(&blk("ffn_down_exps.bias"), &hf("experts.down_proj_bias"));
}

/// The twin's metadata: architecture hyperparameters and the tokenizer, with the keys
/// and value types llama.cpp's converter writes.
pub(crate) fn twin_metadata(p: &Preset) -> Vec<(String, Value)> {
    let u32v = |x: usize| Value::U32(u32::try_from(x).expect("preset dims fit u32"));
    let arch = gguf_arch(p.arch).expect("the twin is written for this architecture");
    let a = |k: &str| format!("{arch}.{k}");
    let ids = p.special_ids();
    let bpe = build_bpe(p.vocab_size - SPECIAL_TOKENS.len());
    let merges: Vec<String> = bpe
        .merges
        .iter()
        .map(|&(x, y)| format!("{} {}", bpe.tokens[x as usize], bpe.tokens[y as usize]))
        .collect();
    let n_normal = bpe.tokens.len();
    let mut tokens = bpe.tokens;
    tokens.extend(SPECIAL_TOKENS.iter().map(|s| s.to_string()));
    let token_type = (0..tokens.len())
        .map(|i| {
            Value::I32(if i < n_normal {
                TOKEN_NORMAL
            } else {
                TOKEN_CONTROL
            })
        })
        .collect();
    let mut kv: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String("model".into())),
        (
            "general.name".into(),
            Value::String(format!("synth-{}", p.name)),
        ),
        ("general.file_type".into(), Value::U32(FILE_TYPE_BF16)),
        (
            "general.quantization_version".into(),
            Value::U32(QUANT_VERSION),
        ),
        (a("block_count"), u32v(p.num_hidden_layers)),
        (a("context_length"), u32v(p.max_position_embeddings)),
        (a("embedding_length"), u32v(p.hidden_size)),
        (a("feed_forward_length"), u32v(p.intermediate_size)),
        (a("attention.head_count"), u32v(p.num_attention_heads)),
        // MLA is written as MQA over the latent (the converter sets 1 kv head).
        (
            a("attention.head_count_kv"),
            u32v(if p.arch == DEEPSEEK_V3 {
                1
            } else {
                p.num_key_value_heads
            }),
        ),
    ];
    // The converter's rope scaling keys (`rope_scaling` of the config the twin mirrors).
    let yarn = match p.arch {
        GPT_OSS => Some((32.0f32, 4096usize)),
        DEEPSEEK_V3 => Some((40.0, 4096)),
        _ => None,
    };
    if let Some((factor, original)) = yarn {
        kv.extend([
            (a("rope.scaling.type"), Value::String("yarn".into())),
            (a("rope.scaling.factor"), Value::F32(factor)),
            (a("rope.scaling.original_context_length"), u32v(original)),
            (a("rope.scaling.yarn_beta_fast"), Value::F32(32.0)),
            (a("rope.scaling.yarn_beta_slow"), Value::F32(1.0)),
        ]);
    }
    let eps = if p.arch == QWEN3_MOE {
        super::hub::RMS_NORM_EPS
    } else {
        p.rms_norm_eps
    };
    kv.extend([
        (a("rope.freq_base"), Value::F32(p.rope_theta as f32)),
        (
            a("attention.layer_norm_rms_epsilon"),
            Value::F32(eps as f32),
        ),
    ]);
    if p.arch != DEEPSEEK_V3 {
        kv.extend([
            (a("attention.key_length"), u32v(p.head_dim)),
            (a("attention.value_length"), u32v(p.head_dim)),
        ]);
    }
    kv.extend([
        (a("expert_count"), u32v(p.num_experts)),
        (a("expert_used_count"), u32v(p.num_experts_per_tok)),
    ]);
    if p.n_group > 0 {
        kv.extend([
            (a("expert_group_count"), u32v(p.n_group)),
            (a("expert_group_used_count"), u32v(p.topk_group)),
        ]);
    }
    if p.arch == DEEPSEEK_V3 {
        // The class's `scoring_func`.
        kv.push((a("expert_gating_func"), Value::U32(GATING_SIGMOID)));
    }
    match p.arch {
        GLM4_MOE => kv.extend([
            (
                a("rope.dimension_count"),
                u32v((p.head_dim as f64 * p.partial_rotary_factor) as usize),
            ),
            (
                a("expert_feed_forward_length"),
                u32v(p.moe_intermediate_size),
            ),
            (a("expert_shared_count"), u32v(p.n_shared_experts)),
            (
                a("leading_dense_block_count"),
                u32v(p.first_k_dense_replace),
            ),
            (a("expert_gating_func"), Value::U32(GATING_SIGMOID)),
            (
                a("expert_weights_scale"),
                Value::F32(p.routed_scaling_factor as f32),
            ),
            (a("expert_weights_norm"), Value::Bool(true)),
            (a("nextn_predict_layers"), u32v(0)),
        ]),
        GPT_OSS => kv.extend([
            (a("attention.sliding_window"), u32v(p.sliding_window)),
            (
                a("expert_feed_forward_length"),
                u32v(p.moe_intermediate_size),
            ),
        ]),
        DEEPSEEK_V3 => {
            kv.push((
                a("leading_dense_block_count"),
                u32v(p.first_k_dense_replace),
            ));
            kv.push((a("vocab_size"), u32v(p.vocab_size)));
            if p.q_lora_rank > 0 {
                kv.push((a("attention.q_lora_rank"), u32v(p.q_lora_rank)));
            }
            kv.extend([
                (a("attention.kv_lora_rank"), u32v(p.kv_lora_rank)),
                (
                    a("attention.key_length"),
                    u32v(p.kv_lora_rank + p.qk_rope_head_dim),
                ),
                (a("attention.value_length"), u32v(p.kv_lora_rank)),
                (
                    a("attention.key_length_mla"),
                    u32v(p.qk_nope_head_dim + p.qk_rope_head_dim),
                ),
                (a("attention.value_length_mla"), u32v(p.v_head_dim)),
                (
                    a("expert_feed_forward_length"),
                    u32v(p.moe_intermediate_size),
                ),
                (a("expert_shared_count"), u32v(p.n_shared_experts)),
                (
                    a("expert_weights_scale"),
                    Value::F32(p.routed_scaling_factor as f32),
                ),
                (a("expert_weights_norm"), Value::Bool(true)),
                (a("rope.dimension_count"), u32v(p.qk_rope_head_dim)),
                // `0.1 * mscale_all_dim` (1.0), as the converter writes it.
                (a("rope.scaling.yarn_log_multiplier"), Value::F32(0.1)),
            ]);
        }
        _ => kv.push((
            a("expert_feed_forward_length"),
            u32v(p.moe_intermediate_size),
        )),
    }
    kv.extend([
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
        ("tokenizer.ggml.tokens".into(), Value::strings(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(ValueType::I32, token_type),
        ),
        ("tokenizer.ggml.merges".into(), Value::strings(merges)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(ids.im_end)),
        (
            "tokenizer.ggml.padding_token_id".into(),
            Value::U32(ids.endoftext),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(ids.endoftext),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHAT_TEMPLATE.into()),
        ),
    ]);
    debug_assert_eq!(
        kv.iter()
            .map(|(k, _)| k)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        kv.len(),
        "each key once"
    );
    kv
}
