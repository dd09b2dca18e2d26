//! `synth`: writes random-weight Mixture-of-Experts checkpoints in exact Hugging Face
//! Hub layout, so the runtime (and `transformers`) open them as if downloaded.
//!
//! This module owns the synthetic-model writer only; it depends on nothing else in the
//! crate but the GGUF writer. For architectures `qwen3_moe` (`Qwen3MoeForCausalLM`),
//! `qwen3_next` (`Qwen3NextForCausalLM`), `glm4_moe` (`Glm4MoeForCausalLM`), `gpt_oss`
//! (`GptOssForCausalLM`) and `deepseek_v3` (`DeepseekV3ForCausalLM`) it writes into one
//! folder: `config.json`, `generation_config.json`, `model-0000i-of-0000N.safetensors`
//! shards, `model.safetensors.index.json` (always, even for one shard), `tokenizer.json`
//! (byte-level BPE) and `tokenizer_config.json` (ChatML template).
//!
//! Each preset belongs to one architecture (`demo`, `mini`, `bench-m`: `qwen3_moe`;
//! `next-demo`, `next-shape`, `next-bench`: `qwen3_next`; `glm45-demo`,
//! `glm45-air-shape`: `glm4_moe`; `gpt-oss-demo`, `gpt-oss-20b-shape`,
//! `gpt-oss-120b-shape`: `gpt_oss`; `deepseek-v3-demo`, `deepseek-v3-shape`:
//! `deepseek_v3`); asking for a preset with another architecture is an error. The
//! `*-shape` presets are the releases' dimensions (cut them with `layers`, which keeps at
//! least one sparse layer). A `qwen3_next` checkpoint has, like the
//! `Qwen/Qwen3-Next-80B-A3B` release, linear-attention (Gated DeltaNet) layers with every
//! `full_attention_interval`-th layer full (gated) attention, per-expert tensors plus a
//! shared expert in every MoE block, zero-centred RMSNorm weights (zeros: scale 1), and
//! the release's multi-token-prediction tensors `mtp.*` (which the runtime ignores). The
//! GLM-4.5-Air, gpt-oss and DeepSeek-V3 checkpoints are the releases' tensors less their
//! multi-token-prediction layer (`num_nextn_predict_layers` 0): GLM's and DeepSeek's
//! dense leading layers, per-expert bf16 tensors, ungated shared experts and f32
//! `e_score_correction_bias`; GLM's q/k/v biases; gpt-oss's sinks, biases and MXFP4
//! experts (`*_blocks` / `*_scales` U8, `quantization_config` mxfp4); DeepSeek's latent
//! attention in bf16.
//!
//! What must always hold:
//! - Tensor names, shapes and dtypes are exactly the Hub releases' (bf16; f32 for
//!   `e_score_correction_bias`; U8 for MXFP4 codes and scales); the index maps every
//!   tensor to the shard holding it and `total_size` is the sum of tensor data bytes; in
//!   each shard the `data_offsets` tile the data region exactly.
//! - The closed forms [`Preset::param_count`] and [`Preset::tensor_count`] equal the
//!   tensor list's sums for every preset and layer count (an MXFP4 code byte holds two
//!   parameters, a scale byte none).
//! - Output is a pure function of (arch, preset, layers, seed, shard limit): the same
//!   inputs give byte-identical files whatever the thread count.
//! - Memory stays bounded: tensor data is generated and written in chunks (a few MiB
//!   per rayon thread), never a whole tensor at once.
//! - Every file is written atomically (`NAME.tmp-<pid>`, fsync, rename), then the folder
//!   is fsynced; `config.json` is written last, so a folder with it is complete.
//! - A non-empty output folder is never written into unless `overwrite` is set.
//! - [`synth_gguf`] writes the same weights (bit-identical, through the converter's
//!   reshapes) as one GGUF file in llama.cpp's `qwen3moe`, `glm4moe`, `gpt-oss` or
//!   `deepseek2` layout (see `twin.rs`), streamed through [`crate::gguf::GgufWriter`]
//!   with the same bounded memory, atomically. For `qwen3_next` it is refused (no file is
//!   written).
//! - The tokenizer has exactly `vocab_size` ids: 256 byte tokens, merges (each joining
//!   two earlier tokens into a new one), then `<|endoftext|>`, `<|im_start|>`,
//!   `<|im_end|>`.

mod hub;
mod preset;
mod tokenizer;
mod twin;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use preset::TensorSpec;
pub use preset::{
    preset, preset_names, preset_names_for, Preset, SpecialIds, DEEPSEEK_V3, GLM4_MOE, GPT_OSS,
    HUB_SHARD_BYTES, QWEN3_MOE, QWEN3_NEXT,
};

/// Architectures `synth` can write (Hub `model_type` names).
pub const ARCHS: &[&str] = &[QWEN3_MOE, QWEN3_NEXT, GLM4_MOE, GPT_OSS, DEEPSEEK_V3];

/// What to write and where.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Hub `model_type`, one of [`ARCHS`]; must be the preset's.
    pub arch: String,
    /// Preset name, see [`preset_names`] and [`preset_names_for`].
    pub preset: String,
    /// Overrides the preset's layer count.
    pub layers: Option<usize>,
    /// Seed for all weights.
    pub seed: u64,
    /// Output folder (created if missing).
    pub out: PathBuf,
    /// Shard size limit in bytes of tensor data; default: the preset's (5 GB, Hub style).
    pub shard_bytes: Option<u64>,
    /// Allow writing into a non-empty folder (replacing model files there).
    pub overwrite: bool,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthReport {
    /// Every file written, in write order.
    pub files: Vec<PathBuf>,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of parameters.
    pub params: u64,
    /// Bytes of tensor data (the index's `total_size`).
    pub weight_bytes: u64,
}

/// Errors from [`synth`].
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown architecture {got:?}; supported: {}", ARCHS.join(", "))]
    UnknownArch { got: String },
    #[error("unknown preset {got:?}; available: {}", preset_names().join(", "))]
    UnknownPreset { got: String },
    /// The preset belongs to another architecture than the one asked for.
    #[error(
        "preset {preset} is a {preset_arch} preset; pass --arch {preset_arch} (or one of the \
         {arch} presets: {})",
        preset_names_for(arch).join(", ")
    )]
    WrongArch {
        preset: String,
        preset_arch: &'static str,
        arch: String,
    },
    #[error("invalid synth options: {0}")]
    Invalid(String),
    #[error("output folder {} is not empty (pass overwrite to replace the model files in it)", .0.display())]
    NotEmpty(PathBuf),
    #[error("{} exists (pass overwrite to replace it)", .0.display())]
    Exists(PathBuf),
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The preset `opts` asks for, with `layers` applied and checked.
pub fn resolve_preset(opts: &SynthOptions) -> Result<Preset, SynthError> {
    if !ARCHS.contains(&opts.arch.as_str()) {
        return Err(SynthError::UnknownArch {
            got: opts.arch.clone(),
        });
    }
    let mut p = preset(&opts.preset).ok_or_else(|| SynthError::UnknownPreset {
        got: opts.preset.clone(),
    })?;
    if p.arch != opts.arch {
        return Err(SynthError::WrongArch {
            preset: opts.preset.clone(),
            preset_arch: p.arch,
            arch: opts.arch.clone(),
        });
    }
    if let Some(layers) = opts.layers {
        if layers == 0 {
            return Err(SynthError::Invalid("layers must be at least 1".into()));
        }
        p.num_hidden_layers = layers;
        // A cut model keeps at least one sparse layer (DeepSeek-V3's three dense layers
        // would otherwise fill a `--layers 2` model).
        p.first_k_dense_replace = p.first_k_dense_replace.min(layers - 1);
    }
    p.validate()?;
    Ok(p)
}

/// Writes the model described by `opts`; `progress(written, total)` reports bytes of
/// tensor data (the same totals as [`SynthReport::weight_bytes`]).
pub fn synth(
    opts: &SynthOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SynthReport, SynthError> {
    let p = resolve_preset(opts)?;
    let shard_limit = opts.shard_bytes.unwrap_or(p.default_shard_bytes);
    if shard_limit == 0 {
        return Err(SynthError::Invalid("shard_bytes must be > 0".into()));
    }
    let dir = opts.out.as_path();
    prepare_dir(dir, opts.overwrite)?;

    let specs = p.tensors();
    let weight_bytes: u64 = specs.iter().map(TensorSpec::size_bytes).sum();
    let params: u64 = specs.iter().map(TensorSpec::params).sum();
    debug_assert_eq!(params, p.param_count());
    let keys: Vec<u64> = specs
        .iter()
        .map(|t| writer::tensor_key(opts.seed, &t.name))
        .collect();
    let shards = writer::plan_shards(&specs, shard_limit);

    let mut files = Vec::new();
    let mut weight_map = BTreeMap::new();
    let mut written = 0u64;
    progress(0, weight_bytes);
    for (i, tensors) in shards.iter().enumerate() {
        let name = writer::shard_name(i, shards.len());
        let layout = writer::shard_layout(&specs, tensors);
        for &t in tensors {
            weight_map.insert(specs[t].name.clone(), name.clone());
        }
        let path = writer::write_shard(dir, &name, &specs, &keys, &layout, &mut |n| {
            written += n;
            progress(written, weight_bytes);
        })?;
        tracing::info!(file = %path.display(), bytes = layout.data_bytes, "synth: wrote shard");
        files.push(path);
    }
    // Side files after the weights; config.json last, so its presence means complete.
    let side_files = [
        (
            "model.safetensors.index.json",
            hub::index_json(weight_bytes, &weight_map),
        ),
        ("tokenizer.json", tokenizer::tokenizer_json(&p)),
        (
            "tokenizer_config.json",
            tokenizer::tokenizer_config_json(&p),
        ),
        ("generation_config.json", hub::generation_config_json(&p)),
        ("config.json", hub::config_json(&p)),
    ];
    for (name, bytes) in side_files {
        files.push(writer::write_atomic(dir, name, &bytes)?);
    }
    if opts.overwrite {
        remove_stale_weights(dir, &files)?;
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| SynthError::Io {
            op: "fsync",
            path: dir.to_path_buf(),
            source,
        })?;
    Ok(SynthReport {
        files,
        tensors: specs.len(),
        params,
        weight_bytes,
    })
}

/// Writes the GGUF twin of the model `opts` describes to the file `path` (llama.cpp
/// architecture `qwen3moe`, `glm4moe`, `gpt-oss` or `deepseek2`: BF16 with F32 norms,
/// biases and router, gpt-oss's experts MXFP4; the same weights, bit for bit, as
/// [`synth`] writes for the same options). Uses `arch`, `preset`, `layers`,
/// `seed` and `overwrite` (replace an existing file) from `opts`; `out` and
/// `shard_bytes` are ignored. The parent folder is created if missing. A `qwen3_next`
/// model gives [`SynthError::Invalid`] (convert its folder with llama.cpp's
/// `convert_hf_to_gguf.py` instead).
/// `progress(written, total)` reports bytes of tensor data; the report's `weight_bytes`
/// is the GGUF's tensor data bytes (F32 tensors count 4 bytes per element).
pub fn synth_gguf(
    opts: &SynthOptions,
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SynthReport, SynthError> {
    let p = resolve_preset(opts)?;
    if twin::gguf_arch(p.arch).is_none() {
        return Err(SynthError::Invalid(format!(
            "the GGUF twin is written for {} only; convert a {} folder with llama.cpp's \
             convert_hf_to_gguf.py",
            twin::TWIN_ARCHS.join(", "),
            p.arch
        )));
    }
    if path.exists() && !opts.overwrite {
        return Err(SynthError::Exists(path.to_path_buf()));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|source| SynthError::Io {
            op: "create folder",
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let specs = p.tensors();
    let tensors = twin::twin_tensors(&p, &specs);
    let mut chunks = Vec::new();
    let source = |s: usize, map: writer::Affine| writer::Source {
        key: writer::tensor_key(opts.seed, &specs[s].name),
        init: specs[s].init,
        map,
    };
    for t in &tensors {
        for part in &t.parts {
            let out = match (t.spec.ty, part.scales) {
                (crate::gguf::GgmlType::F32, None) => writer::Out::F32,
                (crate::gguf::GgmlType::BF16, None) => writer::Out::Bf16,
                (crate::gguf::GgmlType::Mxfp4, Some(scales)) => writer::Out::Mxfp4 {
                    scales: source(scales, part.map),
                },
                (ty, _) => unreachable!("twin tensors are F32, BF16 or MXFP4, not {ty:?}"),
            };
            writer::push_chunks(&mut chunks, source(part.source, part.map), out);
        }
    }
    let gg_specs: Vec<_> = tensors.iter().map(|t| t.spec.clone()).collect();
    let mut w = crate::gguf::GgufWriter::create(
        path,
        &twin::twin_metadata(&p),
        &gg_specs,
        crate::gguf::DEFAULT_ALIGNMENT,
    )?;
    let params: u64 = specs.iter().map(TensorSpec::params).sum();
    let weight_bytes: u64 = gg_specs
        .iter()
        .map(|t| t.ty.tensor_bytes(&t.dims).expect("valid twin dims"))
        .sum();
    let mut written = 0u64;
    progress(0, weight_bytes);
    writer::stream_chunks(&chunks, |b: &[u8]| w.write(b), &mut |n| {
        written += n;
        progress(written, weight_bytes);
    })?;
    let path = w.finish()?;
    tracing::info!(file = %path.display(), bytes = weight_bytes, "synth: wrote GGUF");
    Ok(SynthReport {
        files: vec![path],
        tensors: gg_specs.len(),
        params,
        weight_bytes,
    })
}

fn prepare_dir(dir: &Path, overwrite: bool) -> Result<(), SynthError> {
    let io = |op: &'static str| {
        move |source| SynthError::Io {
            op,
            path: dir.to_path_buf(),
            source,
        }
    };
    fs::create_dir_all(dir).map_err(io("create folder"))?;
    let mut entries = fs::read_dir(dir).map_err(io("read folder"))?;
    if entries.next().is_some() && !overwrite {
        return Err(SynthError::NotEmpty(dir.to_path_buf()));
    }
    Ok(())
}

/// After an overwrite, removes weight files of an earlier model that the new one does
/// not use (`model.safetensors`, `model-*-of-*.safetensors`), since a loader would
/// otherwise pick them up, and temp files (`NAME.tmp-<pid>`) that an interrupted run
/// left for one of the names written here. Other files are left alone.
fn remove_stale_weights(dir: &Path, keep: &[PathBuf]) -> Result<(), SynthError> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Io { op, path, source }
    };
    for entry in fs::read_dir(dir).map_err(io("read folder", dir))? {
        let path = entry.map_err(io("read folder", dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let is_shard =
            |n: &str| n.starts_with("model-") && n.contains("-of-") && n.ends_with(".safetensors");
        let stale_tmp = name.rsplit_once(".tmp-").is_some_and(|(base, pid)| {
            pid.bytes().all(|b| b.is_ascii_digit())
                && (is_shard(base)
                    || keep
                        .iter()
                        .any(|k| k.file_name().is_some_and(|k| k == base)))
        });
        let stale_weights = is_shard(name) || name == "model.safetensors";
        if (stale_weights || stale_tmp) && !keep.contains(&path) {
            fs::remove_file(&path).map_err(io("remove stale", &path))?;
        }
    }
    Ok(())
}
