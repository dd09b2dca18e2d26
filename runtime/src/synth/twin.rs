//! The GGUF twin: the same weights as the Hugging Face files, in llama.cpp's
//! `qwen3moe` layout as its HF converter (`convert_hf_to_gguf.py`) writes it. Written
//! for `qwen3_moe` presets only ([`super::synth_gguf`] refuses `qwen3_next`).
//!
//! - Names: `token_embd`, `output_norm`, `output`, `blk.{l}.attn_{norm,q,k,v,output,
//!   q_norm,k_norm}`, `blk.{l}.ffn_{norm,gate_inp,gate_exps,up_exps,down_exps}`.
//! - Dims are the torch shape reversed (GGML order); the experts of a layer are stacked
//!   along a new outermost dimension (torch `[E, I, H]` -> dims `[H, I, E]`), expert `e`
//!   being slice `e`. No q/k permutation (the converter permutes only for llama).
//! - 1-D tensors (norms) and the router are F32, exactly the bf16 values widened; all
//!   else BF16, bit-identical to the HF files (each element is regenerated from the HF
//!   tensor name and index).

use std::collections::HashMap;

use crate::gguf::{GgmlType, TensorSpec as GgufTensor, Value, ValueType};

use super::preset::{Preset, TensorSpec};
use super::tokenizer::{build_bpe, CHAT_TEMPLATE, SPECIAL_TOKENS};

/// llama.cpp's architecture name.
pub(crate) const ARCH: &str = "qwen3moe";
/// The Hub architecture (`model_type`) the twin is written for; the only one.
pub(crate) const HF_ARCH: &str = super::preset::QWEN3_MOE;
/// `LLAMA_FTYPE_MOSTLY_BF16`.
const FILE_TYPE_BF16: u32 = 32;
/// `GGML_QNT_VERSION`.
const QUANT_VERSION: u32 = 2;
/// llama.cpp's token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;

/// One GGUF tensor and the HF tensors (indices into the preset's specs) whose data,
/// concatenated, is its data.
pub(crate) struct TwinTensor {
    pub spec: GgufTensor,
    pub sources: Vec<usize>,
}

/// The twin's tensors in write order: `token_embd`, the layers, `output_norm`, `output`.
pub(crate) fn twin_tensors(p: &Preset, specs: &[TensorSpec]) -> Vec<TwinTensor> {
    debug_assert_eq!(p.arch, HF_ARCH, "the twin layout is qwen3moe's");
    let index: HashMap<&str, usize> = specs
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let src = |name: &str| *index.get(name).expect("preset names every tensor");
    let mut out = Vec::new();
    let mut push = |name: String, sources: Vec<usize>, force_f32: bool| {
        let shape = &specs[sources[0]].shape;
        debug_assert!(sources.iter().all(|&s| specs[s].shape == *shape));
        let mut dims: Vec<u64> = shape.iter().rev().copied().collect();
        if sources.len() > 1 {
            dims.push(sources.len() as u64);
        }
        let ty = if force_f32 || shape.len() == 1 {
            GgmlType::F32
        } else {
            GgmlType::BF16
        };
        out.push(TwinTensor {
            spec: GgufTensor::new(name, dims, ty),
            sources,
        });
    };
    push(
        "token_embd.weight".into(),
        vec![src("model.embed_tokens.weight")],
        false,
    );
    for l in 0..p.num_hidden_layers {
        let hf = |s: &str| src(&format!("model.layers.{l}.{s}"));
        let blk = |s: &str| format!("blk.{l}.{s}.weight");
        push(blk("attn_norm"), vec![hf("input_layernorm.weight")], false);
        push(blk("attn_q"), vec![hf("self_attn.q_proj.weight")], false);
        push(blk("attn_k"), vec![hf("self_attn.k_proj.weight")], false);
        push(blk("attn_v"), vec![hf("self_attn.v_proj.weight")], false);
        push(
            blk("attn_output"),
            vec![hf("self_attn.o_proj.weight")],
            false,
        );
        push(
            blk("attn_q_norm"),
            vec![hf("self_attn.q_norm.weight")],
            false,
        );
        push(
            blk("attn_k_norm"),
            vec![hf("self_attn.k_norm.weight")],
            false,
        );
        push(
            blk("ffn_norm"),
            vec![hf("post_attention_layernorm.weight")],
            false,
        );
        push(blk("ffn_gate_inp"), vec![hf("mlp.gate.weight")], true);
        for (gg, proj) in [
            ("ffn_gate_exps", "gate_proj"),
            ("ffn_up_exps", "up_proj"),
            ("ffn_down_exps", "down_proj"),
        ] {
            let experts = (0..p.num_experts)
                .map(|e| hf(&format!("mlp.experts.{e}.{proj}.weight")))
                .collect();
            push(blk(gg), experts, false);
        }
    }
    push(
        "output_norm.weight".into(),
        vec![src("model.norm.weight")],
        false,
    );
    push("output.weight".into(), vec![src("lm_head.weight")], false);
    out
}

/// The twin's metadata: architecture hyperparameters and the tokenizer, with the keys
/// and value types llama.cpp's converter writes.
pub(crate) fn twin_metadata(p: &Preset) -> Vec<(String, Value)> {
    let u32v = |x: usize| Value::U32(u32::try_from(x).expect("preset dims fit u32"));
    let a = |k: &str| format!("{ARCH}.{k}");
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
    vec![
        ("general.architecture".into(), Value::String(ARCH.into())),
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
        (a("attention.head_count_kv"), u32v(p.num_key_value_heads)),
        (a("rope.freq_base"), Value::F32(p.rope_theta as f32)),
        (
            a("attention.layer_norm_rms_epsilon"),
            Value::F32(super::hub::RMS_NORM_EPS as f32),
        ),
        (a("attention.key_length"), u32v(p.head_dim)),
        (a("attention.value_length"), u32v(p.head_dim)),
        (a("expert_count"), u32v(p.num_experts)),
        (a("expert_used_count"), u32v(p.num_experts_per_tok)),
        (
            a("expert_feed_forward_length"),
            u32v(p.moe_intermediate_size),
        ),
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
    ]
}
