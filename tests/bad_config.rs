//! Bad configuration values and non-finite numbers: every absurd size, impossible rotary
//! fraction, non-finite or out-of-range float, oversized thread count and unwritable output is
//! refused with one line naming the field (or file) within seconds, with a non-zero exit and no
//! panic; logits that are NaN or infinite fail the request instead of becoming a token. Every
//! fixture and the released models' configs still pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{copy_model, fixtures, greedy_request, Sandbox};
use moe_runtime::batch::{BatchConfig, Batcher, Event};
use moe_runtime::config::RawConfig;
use moe_runtime::{CancelToken, Error, GenerateParams, Model, Prompt, Settings};
use serde_json::{json, Value};

/// How long a refusal may take in the debug build (the brief says a second or two; the margin
/// is for a loaded CI machine).
const REFUSAL_LIMIT: Duration = Duration::from_secs(5);

/// A copy of fixture `name`'s model folder with `edit` applied to its config.json.
fn edited(name: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> tempfile::TempDir {
    let dir = copy_model(&fixtures().join(name).join("model"));
    edit_json(&dir.path().join("config.json"), edit);
    dir
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// What a finished `moe-serve` child gave.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs `moe-serve ARGS` (stdout to `stdout`, or captured), killing it after 60 s.
fn moe(args: &[&str], stdout: Option<Stdio>) -> Outcome {
    let sandbox = Sandbox::new();
    let t0 = Instant::now();
    let mut child = sandbox
        .command()
        .args(args)
        .stdout(stdout.unwrap_or_else(Stdio::piped))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read stderr on a thread so a chatty child cannot block on a full pipe.
    let err = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || std::io::read_to_string(err).unwrap_or_default());
    let out = child.stdout.take();
    let out = std::thread::spawn(move || {
        out.map(|o| std::io::read_to_string(o).unwrap_or_default())
            .unwrap_or_default()
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = t0.elapsed();
    Outcome {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        elapsed,
    }
}

/// `moe-serve run` on `model` must fail fast with one error line holding every needle.
fn refused(model: &Path, needles: &[&str]) {
    let m = model.to_string_lossy();
    let o = moe(
        &[
            "run",
            "--model",
            &m,
            "--prompt-ids",
            "1,2",
            "--max-tokens",
            "2",
            "--json",
        ],
        None,
    );
    let what = format!("{needles:?}: exit {:?}, stderr: {}", o.code, o.stderr);
    assert_eq!(o.code, Some(1), "{what}");
    assert!(o.elapsed < REFUSAL_LIMIT, "took {:?}: {what}", o.elapsed);
    let lines: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(lines.len(), 1, "{what}");
    assert!(!o.stderr.contains("internal error"), "{what}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` missing: {what}");
    }
}

fn set(key: &'static str, v: Value) -> impl FnOnce(&mut serde_json::Map<String, Value>) {
    move |c| {
        c.insert(key.to_string(), v);
    }
}

#[test]
fn absurd_sizes_are_refused_before_any_allocation() {
    for (fixture, key, value, limit) in [
        (
            "qwen3_moe",
            "num_hidden_layers",
            json!(100_000_000u64),
            "MAX_LAYERS",
        ),
        ("qwen3_moe", "num_hidden_layers", json!(1e18), "MAX_LAYERS"),
        (
            "qwen3_moe",
            "hidden_size",
            json!(1u64 << 40),
            "MAX_HIDDEN_SIZE",
        ),
        (
            "qwen3_moe",
            "num_attention_heads",
            json!(1u64 << 33),
            "MAX_HEADS",
        ),
        (
            "qwen3_moe",
            "head_dim",
            json!(1_000_000_000u64),
            "MAX_HEAD_DIM",
        ),
        (
            "qwen3_moe",
            "num_experts",
            json!(1_000_000_000u64),
            "MAX_EXPERTS",
        ),
        (
            "qwen3_moe",
            "num_experts_per_tok",
            json!(1u64 << 62),
            "MAX_EXPERTS",
        ),
        (
            "qwen3_moe",
            "moe_intermediate_size",
            json!(1u64 << 50),
            "MAX_INTERMEDIATE_SIZE",
        ),
        ("qwen3_moe", "vocab_size", json!(u64::MAX), "MAX_VOCAB_SIZE"),
        (
            "qwen3_moe",
            "max_position_embeddings",
            json!(1u64 << 60),
            "MAX_POSITIONS",
        ),
        (
            "mixtral",
            "num_local_experts",
            json!(1u64 << 40),
            "MAX_EXPERTS",
        ),
        (
            "mixtral",
            "sliding_window",
            json!(1u64 << 40),
            "MAX_POSITIONS",
        ),
        (
            "qwen3_next",
            "num_hidden_layers",
            json!(100_000_000u64),
            "MAX_LAYERS",
        ),
        (
            "qwen3_next",
            "linear_num_value_heads",
            json!(1u64 << 40),
            "MAX_HEADS",
        ),
        (
            "qwen3_next",
            "linear_key_head_dim",
            json!(1u64 << 40),
            "MAX_HEAD_DIM",
        ),
        (
            "qwen3_next",
            "linear_conv_kernel_dim",
            json!(1u64 << 40),
            "MAX_CONV_KERNEL",
        ),
    ] {
        let dir = edited(fixture, set(key, value));
        refused(dir.path(), &["config.json", &format!("`{key}`"), limit]);
    }
    // Under every per-field limit, but the experts over all layers are too many to open.
    let dir = edited("qwen3_moe", |c| {
        c.insert("num_hidden_layers".into(), json!(1000));
        c.insert("num_experts".into(), json!(16000));
    });
    refused(dir.path(), &["`num_experts`", "MAX_TOTAL_EXPERTS"]);
    // The planner reads a bare config.json the same way.
    let dir = edited("qwen3_moe", set("num_hidden_layers", json!(100_000_000u64)));
    let cfg = dir.path().join("config.json");
    let o = moe(&["plan", "--model", &cfg.to_string_lossy()], None);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(o.elapsed < REFUSAL_LIMIT, "{:?}", o.elapsed);
    assert!(
        o.stderr.contains("`num_hidden_layers` is 100000000") && o.stderr.contains("MAX_LAYERS"),
        "{}",
        o.stderr
    );
}

#[test]
fn inconsistent_sizes_are_named_not_panics() {
    let dir = edited("qwen3_moe", set("num_experts_per_tok", json!(9)));
    refused(dir.path(), &["`num_experts_per_tok`", "1..=8"]);
    let dir = edited("qwen3_moe", set("num_key_value_heads", json!(3)));
    refused(dir.path(), &["`num_key_value_heads`", "does not divide"]);
    let dir = edited("qwen3_next", set("linear_num_value_heads", json!(5)));
    refused(dir.path(), &["`linear_num_value_heads`"]);
    let dir = edited("qwen3_moe", set("eos_token_id", json!(1u64 << 33)));
    refused(dir.path(), &["`eos_token_id`"]);
}

#[test]
fn a_group_limited_router_that_cannot_choose_top_k_is_named() {
    // glm4_moe_groups: 16 experts, top-4.
    for (key, value, needles) in [
        ("n_group", json!(3), &["`n_group`", "16 routed experts"][..]),
        ("n_group", json!(0), &["`n_group`"][..]),
        (
            "topk_group",
            json!(5),
            &["`topk_group`", "`n_group` (4)"][..],
        ),
        // One kept group of 4 experts holds exactly top-4; top-5 cannot be chosen.
        ("topk_group", json!(1), &[][..]),
        (
            "routed_scaling_factor",
            json!(-1.0),
            &["`routed_scaling_factor`"][..],
        ),
    ] {
        let dir = edited("glm4_moe_groups", set(key, value.clone()));
        if needles.is_empty() {
            edit_json(
                &dir.path().join("config.json"),
                set("num_experts_per_tok", json!(5)),
            );
            refused(
                dir.path(),
                &["`num_experts_per_tok` is 5", "hold only 4 experts"],
            );
        } else {
            refused(dir.path(), needles);
        }
    }
}

#[test]
fn a_missing_selection_bias_is_named() {
    let dir = copy_model(&fixtures().join("glm4_moe").join("model"));
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let gone = "model.layers.2.mlp.gate.e_score_correction_bias";
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != gone)
        .collect();
    assert_eq!(kept.len() + 1, st.len());
    let out = safetensors::serialize(kept, &None).unwrap();
    std::fs::write(&file, out).unwrap();
    refused(dir.path(), &[gone]);
}

/// A copy of fixture `name`'s single-file model with its tensors passed through `edit`.
fn with_tensors(
    name: &str,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) -> tempfile::TempDir {
    let dir = copy_model(&fixtures().join(name).join("model"));
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut all);
    let views: Vec<_> = all
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(&file, safetensors::serialize(views, &None).unwrap()).unwrap();
    dir
}

#[test]
fn gpt_oss_inputs_that_do_not_fit_are_named() {
    // A layer's attention sinks missing.
    let dir = with_tensors("gpt_oss", |t| {
        t.retain(|(n, ..)| n != "model.layers.1.self_attn.sinks")
    });
    refused(dir.path(), &["model.layers.1.self_attn.sinks"]);
    // `layer_types` of the wrong length, or naming a kind gpt-oss has not.
    let dir = edited(
        "gpt_oss",
        set(
            "layer_types",
            json!(["sliding_attention", "full_attention"]),
        ),
    );
    refused(dir.path(), &["`layer_types`", "2 entries for 3 layers"]);
    let dir = edited(
        "gpt_oss",
        set(
            "layer_types",
            json!(["sliding_attention", "linear_attention", "full_attention"]),
        ),
    );
    refused(
        dir.path(),
        &["`layer_types`", "`linear_attention`", "layer 1"],
    );
    // A dequantized export's gate_up (stored input-major, [E, H, 2I]) of the wrong size.
    let dir = with_tensors("gpt_oss", |t| {
        t.retain(|(n, ..)| !n.starts_with("model.layers.0.mlp.experts.gate_up_proj_"));
        let (e, h, i2) = (8usize, 48usize, 64usize);
        t.push((
            "model.layers.0.mlp.experts.gate_up_proj".into(),
            safetensors::Dtype::F32,
            vec![e, h, i2],
            vec![0u8; e * h * i2 * 4],
        ));
        t.push((
            "model.layers.0.mlp.experts.gate_up_proj_bias".into(),
            safetensors::Dtype::F32,
            vec![e, i2],
            vec![0u8; e * i2 * 4],
        ));
    });
    refused(
        dir.path(),
        &[
            "model.layers.0.mlp.experts.gate_up_proj",
            "[8, 64, 64]",
            "[8, 48, 64]",
        ],
    );
}

#[test]
fn deepseek_v3_inputs_that_do_not_fit_are_named() {
    // Latent widths that disagree with the tensors: the first tensor they size is named with
    // both shapes.
    let dir = edited("deepseek_v3_no_qlora", set("kv_lora_rank", json!(24)));
    refused(
        dir.path(),
        &[
            "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
            "[32, 64]",
            "[40, 64]",
        ],
    );
    let dir = edited("deepseek_v3_no_qlora", set("v_head_dim", json!(16)));
    refused(
        dir.path(),
        &[
            "model.layers.0.self_attn.kv_b_proj.weight",
            "[112, 32]",
            "[128, 32]",
        ],
    );
    // A query latent the checkpoint does not have (its q_proj is direct).
    let dir = edited("deepseek_v3_no_qlora", set("q_lora_rank", json!(24)));
    refused(dir.path(), &["model.layers.0.self_attn.q_a_proj.weight"]);
    // The rope width must be even (it is the model's head_dim).
    let dir = edited("deepseek_v3_no_qlora", set("qk_rope_head_dim", json!(7)));
    refused(dir.path(), &["`qk_rope_head_dim`", "7 must be even"]);
    let dir = edited("deepseek_v3_no_qlora", set("kv_lora_rank", json!(0)));
    refused(dir.path(), &["`kv_lora_rank`"]);
    // Another routing rule is another model.
    let dir = edited(
        "deepseek_v3_no_qlora",
        set("scoring_func", json!("softmax")),
    );
    refused(
        dir.path(),
        &["`scoring_func`", "\"softmax\"", "\"sigmoid\""],
    );
    let dir = edited("deepseek_v3_no_qlora", set("topk_method", json!("greedy")));
    refused(dir.path(), &["`topk_method`", "\"noaux_tc\""]);
    // A layer's shared-key norm missing.
    let dir = with_tensors("deepseek_v3_no_qlora", |t| {
        t.retain(|(n, ..)| n != "model.layers.2.self_attn.kv_a_layernorm.weight")
    });
    refused(
        dir.path(),
        &["model.layers.2.self_attn.kv_a_layernorm.weight"],
    );
}

#[test]
fn a_gguf_file_as_the_model_says_what_to_pass_instead() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model-Q4_K_M.gguf");
    std::fs::write(&file, b"GGUF").unwrap();
    refused(
        &file,
        &["GGUF files are not opened", "Hugging Face model folder"],
    );
}

#[test]
fn rotary_fractions_must_rotate_an_even_part_of_the_head() {
    // qwen3_next's fixture: head_dim 16.
    for (factor, needle) in [
        (json!(3), "at most 1 (got 3)"),
        (json!(1e9), "at most 1 (got 1000000000)"),
        (json!(0), "above 0"),
        (json!(-0.5), "above 0"),
        (json!(0.1875), "rotates 3 dimensions"),
        (json!(0.0625), "rotates 1 dimensions"),
    ] {
        let dir = edited("qwen3_next", set("partial_rotary_factor", factor));
        refused(dir.path(), &["`partial_rotary_factor`", needle]);
    }
    let dir = edited(
        "qwen3_next",
        set(
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 2.5}),
        ),
    );
    refused(dir.path(), &["`partial_rotary_factor`", "got 2.5"]);
    let dir = edited("qwen3_moe", set("partial_rotary_factor", json!(7)));
    refused(dir.path(), &["`partial_rotary_factor`"]);
}

#[test]
fn non_finite_and_out_of_range_floats_are_refused_naming_the_field() {
    for (key, value, needle) in [
        ("rope_theta", json!(0.0), "`rope_theta`"),
        ("rope_theta", json!(-10000.0), "`rope_theta`"),
        ("rms_norm_eps", json!(-1e-6), "`rms_norm_eps`"),
        (
            "rope_scaling",
            json!({"type": "linear", "factor": 0.0}),
            "`rope_scaling.factor`",
        ),
        (
            "rope_scaling",
            json!({"type": "dynamic", "factor": -2.0}),
            "`rope_scaling.factor`",
        ),
        (
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 0.0, "original_max_position_embeddings": 64}),
            "`rope_scaling.factor`",
        ),
        (
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}),
            "`rope_scaling.original_max_position_embeddings`",
        ),
        (
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 2.0, "beta_fast": -1.0}),
            "`rope_scaling.beta_fast`",
        ),
        (
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
            "`rope_scaling.high_freq_factor`",
        ),
        (
            "rope_parameters",
            json!({"rope_type": "linear", "rope_theta": -1.0, "factor": 2.0}),
            "`rope_parameters.rope_theta`",
        ),
    ] {
        let dir = edited("qwen3_moe", set(key, value.clone()));
        refused(dir.path(), &["config.json", needle]);
    }
    // Python's json writes NaN / Infinity, which JSON has no numbers for.
    let dir = copy_model(&fixtures().join("qwen3_moe/model"));
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace("\"rope_theta\": 1000000.0", "\"rope_theta\": NaN");
    std::fs::write(&cfg, text).unwrap();
    refused(dir.path(), &["config.json", "NaN and Infinity"]);
    // generation_config.json's sampling values.
    for (key, value) in [
        ("temperature", json!(-1.0)),
        ("top_p", json!(2.0)),
        ("top_p", json!(0.0)),
        ("min_p", json!(-0.5)),
    ] {
        let dir = copy_model(&fixtures().join("qwen3_moe/model"));
        edit_json(&dir.path().join("generation_config.json"), set(key, value));
        refused(dir.path(), &["generation_config.json", &format!("`{key}`")]);
    }
}

#[test]
fn threads_are_bounded_and_capped_at_the_cores() {
    let model = fixtures().join("qwen3_moe/model");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!("model = {:?}\nthreads = 100000\n", model.to_string_lossy()),
    )
    .unwrap();
    let o = moe(
        &[
            "run",
            "--config",
            &cfg.to_string_lossy(),
            "--prompt-ids",
            "1,2",
        ],
        None,
    );
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(o.elapsed < REFUSAL_LIMIT, "{:?}", o.elapsed);
    assert!(
        o.stderr.contains("threads") && o.stderr.contains("at most 4096 (got 100000"),
        "{}",
        o.stderr
    );
    // A flag above the cores runs, on the cores, with one warning naming both numbers.
    let cores = std::thread::available_parallelism().unwrap().get();
    let m = model.to_string_lossy();
    let o = moe(
        &[
            "run",
            "--model",
            &m,
            "--prompt-ids",
            "1,2",
            "--max-tokens",
            "2",
            "--threads",
            "100000",
            "--json",
        ],
        None,
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.elapsed < Duration::from_secs(30), "{:?}", o.elapsed);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["threads"], cores, "{}", o.stdout);
    assert_eq!(
        o.stderr
            .matches(&format!("threads = 100000 is more than the {cores} cores"))
            .count(),
        1,
        "{}",
        o.stderr
    );
}

#[test]
fn unwritable_output_is_one_error_line_and_a_failure() {
    if !Path::new("/dev/full").exists() {
        return;
    }
    let m = fixtures().join("qwen3_moe/model");
    let m = m.to_string_lossy();
    for json in [true, false] {
        let mut args = vec![
            "run",
            "--model",
            &m,
            "--prompt-ids",
            "1,2",
            "--max-tokens",
            "3",
        ];
        if json {
            args.push("--json");
        }
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let o = moe(&args, Some(Stdio::from(full)));
        assert_eq!(o.code, Some(1), "json {json}: {}", o.stderr);
        assert!(
            o.stderr.contains("error: cannot write the output:") && !o.stderr.contains("internal"),
            "json {json}: {}",
            o.stderr
        );
    }
    let cfg = fixtures().join("qwen3_next_80b/config.json");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = moe(
        &["plan", "--model", &cfg.to_string_lossy(), "--json"],
        Some(Stdio::from(full)),
    );
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("cannot write the output"), "{}", o.stderr);
}

/// Overwrites `tensor` (f32) of a safetensors model folder with `value`, elements `[from, to)`.
fn poison(dir: &Path, tensor: &str, from: usize, to: Option<usize>, value: f32) {
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().and_then(|x| x.to_str()) != Some("safetensors") {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let Some(t) = header.get(tensor) else {
            continue;
        };
        assert_eq!(t["dtype"], "F32");
        let start = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize;
        let end = 8 + n + t["data_offsets"][1].as_u64().unwrap() as usize;
        let (a, b) = (start + 4 * from, to.map_or(end, |t| start + 4 * t));
        for c in bytes[a..b].chunks_exact_mut(4) {
            c.copy_from_slice(&value.to_le_bytes());
        }
        std::fs::write(&path, bytes).unwrap();
        return;
    }
    panic!("no tensor {tensor} in {}", dir.display());
}

fn settings(model: &Path, cache: &Path) -> Settings {
    Settings {
        model: Some(model.to_string_lossy().into_owned()),
        cache_dir: Some(cache.to_path_buf()),
        state_dir: Some(cache.join("state")),
        ..Settings::default()
    }
}

#[test]
fn non_finite_logits_fail_the_request_instead_of_becoming_a_token() {
    let dir = copy_model(&fixtures().join("qwen3_moe/model"));
    poison(dir.path(), "model.norm.weight", 0, None, f32::NAN);
    let cache = tempfile::tempdir().unwrap();
    let model = Model::load(&settings(dir.path(), cache.path())).unwrap();
    for temperature in [0.0, 0.8] {
        let params = GenerateParams {
            max_tokens: Some(4),
            temperature: Some(temperature),
            seed: Some(1),
            ignore_eos: true,
            ..Default::default()
        };
        let mut g = model
            .generate(&Prompt::Ids(vec![1, 2, 3]), &params, CancelToken::new())
            .unwrap();
        match g.next() {
            Some(Err(e @ Error::NonFiniteLogits { step: 0, .. })) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("non-finite logits at step 0") && msg.contains("corrupt"),
                    "{msg}"
                );
            }
            other => panic!("temperature {temperature}: {other:?}"),
        }
        assert!(g.generated().is_empty());
        assert!(g.next().is_none(), "the generation ends after the error");
    }
    // The CLI exits non-zero with that line.
    let m = dir.path().to_string_lossy();
    let o = moe(&["run", "--model", &m, "--prompt-ids", "1,2,3"], None);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr
            .contains("error: the model produced non-finite logits at step 0"),
        "{}",
        o.stderr
    );
}

#[test]
fn the_batcher_fails_only_the_sequence_whose_logits_are_not_finite() {
    // One embedding row is NaN: only prompts holding that token reach NaN logits.
    const BAD: u32 = 7;
    let dir = copy_model(&fixtures().join("qwen3_moe/model"));
    let hidden = 64;
    poison(
        dir.path(),
        "model.embed_tokens.weight",
        BAD as usize * hidden,
        Some((BAD as usize + 1) * hidden),
        f32::NAN,
    );
    let cache = tempfile::tempdir().unwrap();
    let model = Arc::new(Model::load(&settings(dir.path(), cache.path())).unwrap());
    let b = Batcher::start(model.clone(), BatchConfig::for_model(&model, 4));
    let submit = |prompt: Vec<u32>| {
        let (tx, rx) = crossbeam_channel::unbounded();
        b.submit(prompt, greedy_request(4), Box::new(tx)).unwrap();
        rx
    };
    let bad = submit(vec![1, BAD, 3]);
    let good = submit(vec![1, 2, 3]);
    let end = |rx: crossbeam_channel::Receiver<Event>| -> (usize, Result<(), String>) {
        let mut tokens = 0;
        loop {
            match rx
                .recv_timeout(Duration::from_secs(60))
                .expect("an end event")
            {
                Event::Token(_) => tokens += 1,
                Event::Done { .. } => return (tokens, Ok(())),
                Event::Failed(m) => return (tokens, Err(m.to_string())),
            }
        }
    };
    let (n, r) = end(bad);
    let msg = r.expect_err("the NaN sequence fails");
    assert_eq!(n, 0, "no token from NaN logits");
    assert!(msg.contains("non-finite logits at step 0"), "{msg}");
    let (n, r) = end(good);
    assert_eq!((n, r), (4, Ok(())), "the other sequence is unaffected");
    assert_eq!(greedy_tokens(&model, &[1, 2, 3]).len(), 4);
}

fn greedy_tokens(model: &Model, ids: &[u32]) -> Vec<u32> {
    common::greedy_generate(model, ids, 4)
}

#[test]
fn every_fixture_and_released_config_passes_the_limits() {
    let mut configs: Vec<PathBuf> = common::variants()
        .iter()
        .map(|v| v.dir.join("model/config.json"))
        .collect();
    configs.push(fixtures().join("qwen3_next_80b/config.json"));
    configs.push(fixtures().join("qwen3_next_80b_fp8/config.json"));
    configs.push(fixtures().join("glm45_air/config.json"));
    configs.push(fixtures().join("gpt_oss_120b/config.json"));
    configs.push(fixtures().join("gpt_oss_20b/config.json"));
    configs.push(fixtures().join("deepseek_v3_671b/config.json"));
    configs.push(fixtures().join("kimi_k2/config.json"));
    for path in configs {
        let raw = RawConfig::parse(path.clone(), &std::fs::read(&path).unwrap()).unwrap();
        let arch = moe_runtime::arch::lookup(&raw).unwrap();
        let cfg = (arch.parse_config)(&raw).unwrap_or_else(|e| panic!("{e}"));
        cfg.validate(&raw).unwrap_or_else(|e| panic!("{e}"));
    }
    // Released shapes at their largest, well inside the limits.
    let raw = RawConfig::parse(
        "config.json".into(),
        br#"{"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 7168,
            "num_hidden_layers": 94, "num_attention_heads": 128, "num_key_value_heads": 8,
            "head_dim": 128, "vocab_size": 262144, "num_experts": 512,
            "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
            "intermediate_size": 53248, "max_position_embeddings": 10485760,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                             "original_max_position_embeddings": 262144}}"#,
    )
    .unwrap();
    let arch = moe_runtime::arch::lookup(&raw).unwrap();
    (arch.parse_config)(&raw).unwrap().validate(&raw).unwrap();
}
