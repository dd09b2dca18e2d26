//! The `moe-serve run` contract and bad-input behaviour, through the real binary.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{bin, copy_model, fixtures, max_abs_diff, Reference};

/// `moe-serve` with its per-user cache folder in `cache_home` (a temporary folder of the
/// test): no spawned binary ever writes a quantized weight cache into the real per-user cache.
fn moe_serve(cache_home: &Path) -> Command {
    let mut c = Command::new(bin());
    c.env("XDG_CACHE_HOME", cache_home);
    c
}

fn run(args: &[&str]) -> Output {
    // A fresh state folder: no hot set from other runs; a fresh cache folder: no quantized
    // weights from other runs (and none written outside the test).
    let state = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    moe_serve(cache.path())
        .args(args)
        .env("HF_HUB_CACHE", "/nonexistent-hub-cache")
        .env("XDG_STATE_HOME", state.path())
        .output()
        .expect("spawn moe-serve")
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stdout must be exactly one JSON line: {stdout:?}"
    );
    serde_json::from_str(lines[0]).unwrap()
}

/// A failing run: non-zero exit, one line on stderr containing every `needles`, no panic.
fn assert_clean_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected, stderr: {stderr}");
    assert!(
        !stderr.contains("panicked"),
        "panic reached the user: {stderr}"
    );
    assert!(
        !stderr.contains("internal error"),
        "internal error: {stderr}"
    );
    for n in needles {
        assert!(lines[0].contains(n), "error line lacks `{n}`: {}", lines[0]);
    }
}

fn fixture_model(name: &str) -> std::path::PathBuf {
    fixtures().join(name).join("model")
}

#[test]
fn demo_model_runs_with_json_contract() {
    let out = run(&[
        "run",
        "--prompt",
        "Hello there",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]);
    let v = json_of(&out);
    let tokens = v["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 6);
    assert!(v["text"].is_string());
    assert!(v["prompt_tokens"].as_u64().unwrap() >= 2);
    assert_eq!(v["finish_reason"], "length");
    for k in ["load_ms", "prefill_tokens_per_s", "decode_tokens_per_s"] {
        assert!(v[k].as_f64().unwrap() >= 0.0, "{k}");
    }
    // Nothing quantized: no quantized weight cache.
    assert!(v.get("cache").is_some_and(|c| c.is_null()), "{v}");
    // Greedy is deterministic.
    let again = json_of(&run(&[
        "run",
        "--prompt",
        "Hello there",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]));
    assert_eq!(v["tokens"], again["tokens"]);
}

#[test]
fn demo_streams_text_to_stdout_and_timings_to_stderr() {
    let out = run(&[
        "run",
        "--prompt",
        "Hi",
        "--chat",
        "--max-tokens",
        "4",
        "--seed",
        "7",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tok/s"), "{stderr}");
    // Same seed, same sampled tokens.
    let seeded = [
        "run",
        "--prompt",
        "Hi",
        "--max-tokens",
        "8",
        "--seed",
        "7",
        "--temperature",
        "0.9",
        "--ignore-eos",
        "--json",
    ];
    let (a, b) = (json_of(&run(&seeded)), json_of(&run(&seeded)));
    assert_eq!(a["tokens"], b["tokens"]);
}

#[test]
fn logits_out_matches_reference() {
    let dir = fixtures().join("qwen3_moe");
    let r = Reference::open(&dir.join("reference.safetensors"));
    let ids: Vec<String> = r
        .i64("short.input_ids")
        .iter()
        .map(|x| x.to_string())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("logits.safetensors");
    let model = dir.join("model");
    let v = json_of(&run(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        &ids.join(","),
        "--max-tokens",
        "3",
        "--temperature",
        "0",
        "--json",
        "--logits-out",
        out_file.to_str().unwrap(),
    ]));
    assert_eq!(v["prompt_tokens"].as_u64().unwrap() as usize, ids.len());
    let got = Reference::open(&out_file);
    let vocab = got.shape("logits")[1];
    assert_eq!(got.shape("logits"), vec![ids.len(), vocab]);
    let err = max_abs_diff(&got.f32("logits"), &r.f32("short.logits"));
    assert!(err <= 1e-4, "logits err {err}");
    let greedy: Vec<u64> = r
        .i64("short.greedy")
        .iter()
        .take(3)
        .map(|&x| x as u64)
        .collect();
    let tokens: Vec<u64> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(tokens, greedy);
}

fn corrupt_and_run(setup: impl FnOnce(&Path), needles: &[&str]) {
    let tmp = copy_model(&fixture_model("qwen3_moe"));
    setup(tmp.path());
    let out = run(&[
        "run",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "2",
        "--json",
    ]);
    assert_clean_error(&out, needles);
}

fn first_shard(dir: &Path) -> std::path::PathBuf {
    let mut shards: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    shards.sort();
    shards[0].clone()
}

#[test]
fn truncated_shard_is_a_clear_error() {
    corrupt_and_run(
        |d| {
            let s = first_shard(d);
            let len = std::fs::metadata(&s).unwrap().len();
            let f = std::fs::OpenOptions::new().write(true).open(&s).unwrap();
            f.set_len(len / 2).unwrap();
        },
        &["safetensors", "truncated"],
    );
}

#[test]
fn header_offsets_past_file_are_a_clear_error() {
    corrupt_and_run(
        |d| {
            let s = first_shard(d);
            let mut b = std::fs::read(&s).unwrap();
            b.truncate(b.len() - 4);
            std::fs::write(&s, b).unwrap();
        },
        &["run past the data region"],
    );
}

/// Rewrites one tensor's header entry in whichever shard holds it.
fn edit_header(dir: &Path, tensor: &str, edit: impl Fn(&mut serde_json::Value)) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let b = std::fs::read(&p).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let mut h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
        if h.get(tensor).is_none() {
            continue;
        }
        edit(h.get_mut(tensor).unwrap());
        let mut hs = serde_json::to_vec(&h).unwrap();
        hs.resize(n.max(hs.len()), b' ');
        assert_eq!(hs.len(), n, "edited header must keep its length");
        let mut out = b[..8].to_vec();
        out.extend_from_slice(&hs);
        out.extend_from_slice(&b[8 + n..]);
        std::fs::write(&p, out).unwrap();
        return;
    }
    panic!("{tensor} not found");
}

#[test]
fn wrong_shape_is_a_clear_error() {
    corrupt_and_run(
        |d| {
            edit_header(d, "model.layers.0.self_attn.o_proj.weight", |t| {
                let s = t["shape"].as_array().unwrap().clone();
                let (a, b) = (s[0].as_u64().unwrap(), s[1].as_u64().unwrap());
                t["shape"] = serde_json::json!([b, a]);
            })
        },
        &["model.layers.0.self_attn.o_proj.weight", "shape"],
    );
}

#[test]
fn wrong_dtype_is_a_clear_error() {
    corrupt_and_run(
        |d| {
            edit_header(d, "model.layers.0.self_attn.o_proj.weight", |t| {
                t["dtype"] = serde_json::json!("I32");
            })
        },
        &["model.layers.0.self_attn.o_proj.weight", "I32"],
    );
}

#[test]
fn missing_shard_is_a_clear_error() {
    corrupt_and_run(
        |d| std::fs::remove_file(first_shard(d)).unwrap(),
        &["model.safetensors.index.json", "does not exist"],
    );
}

#[test]
fn garbage_config_is_a_clear_error() {
    corrupt_and_run(
        |d| std::fs::write(d.join("config.json"), "{not json").unwrap(),
        &["config.json", "not valid JSON"],
    );
}

#[test]
fn missing_config_field_names_it() {
    corrupt_and_run(
        |d| {
            let p = d.join("config.json");
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            v.as_object_mut().unwrap().remove("hidden_size");
            std::fs::write(&p, v.to_string()).unwrap();
        },
        &["hidden_size"],
    );
}

#[test]
fn unknown_architecture_is_a_clear_error() {
    corrupt_and_run(
        |d| {
            let p = d.join("config.json");
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            v["architectures"] = serde_json::json!(["FancyNewMoeForCausalLM"]);
            v["model_type"] = serde_json::json!("fancy_moe");
            std::fs::write(&p, v.to_string()).unwrap();
        },
        &["FancyNewMoeForCausalLM", "unsupported architecture"],
    );
}

#[test]
fn hub_id_not_in_cache_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    let out = moe_serve(&cache.path().join("xdg-cache"))
        .args([
            "run",
            "--model",
            "Qwen/Qwen3-30B-A3B",
            "--prompt-ids",
            "1",
            "--json",
        ])
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    assert_clean_error(
        &out,
        &["Qwen/Qwen3-30B-A3B", "not in the local Hugging Face cache"],
    );
}

#[test]
fn hub_id_resolves_from_local_cache() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--tiny--qwen3-moe");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for e in std::fs::read_dir(fixture_model("qwen3_moe")).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), snap.join(e.file_name())).unwrap();
    }
    let out = moe_serve(&cache.path().join("xdg-cache"))
        .args([
            "run",
            "--model",
            "tiny/qwen3-moe",
            "--prompt-ids",
            "1,2",
            "--max-tokens",
            "2",
            "--json",
        ])
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    let v = json_of(&out);
    assert_eq!(v["arch"], "qwen3_moe");
}

#[test]
fn prompt_ids_outside_vocab_are_a_clear_error() {
    let m = fixture_model("qwen3_moe");
    let out = run(&[
        "run",
        "--model",
        m.to_str().unwrap(),
        "--prompt-ids",
        "1,99999999",
        "--json",
    ]);
    assert_clean_error(&out, &["99999999", "vocab"]);
}

#[test]
fn stop_strings_and_penalties_are_checked_and_cut_the_text() {
    for (flag, value, needle) in [
        ("--presence-penalty", "2.5", "presence_penalty"),
        ("--frequency-penalty", "-3", "frequency_penalty"),
        ("--stop", "", "stop"),
    ] {
        let out = run(&[
            "run",
            "--prompt",
            "Hello there",
            "--max-tokens",
            "4",
            flag,
            value,
            "--json",
        ]);
        assert_clean_error(&out, &[needle]);
    }
    let greedy = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--prompt",
            "Hello there",
            "--max-tokens",
            "16",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ];
        args.extend_from_slice(extra);
        json_of(&run(&args))
    };
    let full = greedy(&["--frequency-penalty", "-0.5", "--presence-penalty", "0.25"]);
    let text = full["text"].as_str().unwrap();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 6, "{text:?}");
    let stop: String = chars[4..6].iter().collect();
    let cut = greedy(&[
        "--frequency-penalty",
        "-0.5",
        "--presence-penalty",
        "0.25",
        "--stop",
        "no such text",
        "--stop",
        &stop,
    ]);
    assert_eq!(
        cut["text"],
        text[..text.find(&stop).unwrap()],
        "stop {stop:?}"
    );
    assert_eq!(cut["finish_reason"], "stop");
    let n = cut["tokens"].as_array().unwrap().len();
    assert_eq!(
        cut["tokens"].as_array().unwrap()[..],
        full["tokens"].as_array().unwrap()[..n]
    );
    assert_ne!(full["tokens"], greedy(&[])["tokens"], "the penalties apply");
}

#[test]
fn prompt_longer_than_context_is_a_clear_error() {
    let m = fixture_model("qwen3_moe");
    let ids = vec!["1"; 40].join(",");
    let out = run(&[
        "run",
        "--model",
        m.to_str().unwrap(),
        "--prompt-ids",
        &ids,
        "--max-context",
        "16",
        "--json",
    ]);
    assert_clean_error(&out, &["context", "16"]);
}

#[test]
fn generation_stops_at_context_with_length() {
    let m = fixture_model("qwen3_moe");
    let v = json_of(&run(&[
        "run",
        "--model",
        m.to_str().unwrap(),
        "--prompt-ids",
        "1,2,3,4",
        "--max-context",
        "8",
        "--max-tokens",
        "50",
        "--ignore-eos",
        "--temperature",
        "0",
        "--json",
    ]));
    assert_eq!(v["finish_reason"], "length");
    // Prompt plus generated tokens fill the context exactly.
    assert_eq!(v["tokens"].as_array().unwrap().len(), 4);
}

#[test]
fn missing_folder_is_a_clear_error() {
    let out = run(&["run", "--model", "/no/such/model/dir", "--prompt-ids", "1"]);
    assert_clean_error(&out, &["/no/such/model/dir"]);
}

#[test]
fn unused_tensors_get_one_warning_and_are_ignored() {
    let tmp = copy_model(&fixture_model("olmoe"));
    // Append an extra `mtp.*` tensor, as real checkpoints carry, by rewriting the single file.
    let p = tmp.path().join("model.safetensors");
    let b = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let data_len = (b.len() - 8 - n) as u64;
    for (i, name) in ["mtp.0.proj.weight", "mtp.0.norm.weight"]
        .iter()
        .enumerate()
    {
        let start = data_len + 16 * i as u64;
        h[*name] =
            serde_json::json!({"dtype": "F32", "shape": [4], "data_offsets": [start, start + 16]});
    }
    let mut hs = serde_json::to_vec(&h).unwrap();
    while !(8 + hs.len()).is_multiple_of(8) {
        hs.push(b' ');
    }
    let mut out = (hs.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&hs);
    out.extend_from_slice(&b[8 + n..]);
    out.extend_from_slice(&[0u8; 32]);
    std::fs::write(&p, out).unwrap();

    let out = run(&[
        "run",
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--max-tokens",
        "2",
        "--json",
    ]);
    let v = json_of(&out);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("does not use"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("2 tensor(s)") && warnings[0].contains("mtp.0"),
        "{stderr}"
    );
}

#[test]
fn hot_set_is_remembered_and_placed_first_on_the_next_start() {
    let state = tempfile::tempdir().unwrap();
    let xdg_cache = state.path().join("xdg-cache");
    let m = fixture_model("qwen3_moe");
    let run_once = || {
        let out = moe_serve(&xdg_cache)
            .args([
                "run",
                "--model",
                m.to_str().unwrap(),
                "--prompt-ids",
                "5",
                "--max-tokens",
                "1",
                "--temperature",
                "0",
            ])
            .args(["--device", "sim", "--vram-budget", "64MiB", "--json"])
            .env("XDG_STATE_HOME", state.path())
            .output()
            .unwrap();
        json_of(&out)
    };
    let first = run_once();
    let layer0 = |v: &serde_json::Value| v["experts"]["per_layer"][0]["hits"].as_u64().unwrap();
    assert_eq!(layer0(&first), 0, "nothing is resident on a cold start");
    let files: Vec<_> = std::fs::read_dir(state.path().join("moe-offload/hotset"))
        .unwrap()
        .collect();
    assert_eq!(files.len(), 1, "one hot-set file per model");
    let second = run_once();
    assert!(
        layer0(&second) > 0,
        "the hottest experts are loaded at start: {}",
        second["experts"]
    );
    assert_eq!(first["tokens"], second["tokens"]);

    // A corrupt hot-set file is ignored with a warning, and replaced.
    let f = files[0].as_ref().unwrap().path();
    std::fs::write(&f, b"{not json").unwrap();
    let out = moe_serve(&xdg_cache)
        .args([
            "run",
            "--model",
            m.to_str().unwrap(),
            "--prompt-ids",
            "5",
            "--max-tokens",
            "1",
            "--temperature",
            "0",
            "--json",
        ])
        .env("XDG_STATE_HOME", state.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    json_of(&out);
    assert!(stderr.contains("ignoring hot-set file"), "{stderr}");
    assert!(serde_json::from_slice::<serde_json::Value>(&std::fs::read(&f).unwrap()).is_ok());
}

/// `--activations` is reported in the JSON output, and a setting that covers none of the
/// model's weights says so on stderr instead of silently doing nothing.
#[test]
fn activations_flag_is_reported_and_a_useless_one_warns() {
    let args = |act: &'static str, quant: &'static str| {
        [
            "run",
            "--prompt-ids",
            "1,2",
            "--max-tokens",
            "2",
            "--json",
            "--activations",
            act,
            "--quantization",
            quant,
        ]
    };
    let useless = run(&args("q8", "none"));
    assert!(useless.status.success());
    assert_eq!(json_of(&useless)["activations"], "q8");
    let err = String::from_utf8_lossy(&useless.stderr);
    assert!(
        err.contains("changes nothing") && err.contains("quantization"),
        "no warning for q8 activations without quantized weights: {err}"
    );
    let useful = run(&args("q8", "q8_0"));
    assert!(useful.status.success());
    let err = String::from_utf8_lossy(&useful.stderr);
    assert!(!err.contains("changes nothing"), "spurious warning: {err}");
    let bad = run(&args("q4", "none"));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not an activation type"));
}

#[test]
fn a_pre_quantized_checkpoint_is_refused_at_open_naming_its_method() {
    let tmp = common::copy_model(&common::fixtures().join("qwen3_moe").join("model"));
    let cfg = tmp.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v["quantization_config"] = serde_json::json!({"quant_method": "gptq", "bits": 4});
    std::fs::write(&cfg, serde_json::to_vec(&v).unwrap()).unwrap();
    let model = tmp.path().to_str().unwrap();
    for args in [
        vec![
            "run",
            "--model",
            model,
            "--prompt-ids",
            "1,2",
            "--max-tokens",
            "1",
        ],
        vec!["plan", "--model", model],
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("quantization_config")
                && stderr.contains("`gptq`")
                && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}

/// `run --json-schema` constrains the demo model's random output to JSON valid against the
/// schema (given inline or as a file), `--grammar` to a Lark grammar; a bad schema is one error
/// line naming the flag.
#[test]
fn run_follows_a_json_schema_or_a_grammar() {
    let schema = r#"{"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"], "additionalProperties": false}"#;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("schema.json");
    std::fs::write(&file, schema).unwrap();
    for spec in [schema, file.to_str().unwrap()] {
        let v = json_of(&run(&[
            "run",
            "--prompt",
            "Count:",
            "--max-tokens",
            "40",
            "--seed",
            "4",
            "--temperature",
            "0.9",
            "--json-schema",
            spec,
            "--json",
        ]));
        assert_eq!(v["finish_reason"], "stop", "{v}");
        let out: serde_json::Value = serde_json::from_str(v["text"].as_str().unwrap()).unwrap();
        assert!((1..=9).contains(&out["n"].as_i64().unwrap()), "{v}");
    }
    let lark = dir.path().join("g.lark");
    std::fs::write(&lark, "start: \"yes\" | \"no\"\n").unwrap();
    let v = json_of(&run(&[
        "run",
        "--prompt",
        "Well?",
        "--max-tokens",
        "10",
        "--grammar",
        lark.to_str().unwrap(),
        "--ignore-eos",
        "--json",
    ]));
    assert!(v["text"] == "yes" || v["text"] == "no", "{v}");
    assert_clean_error(
        &run(&["run", "--prompt", "x", "--json-schema", "{not json"]),
        &["--json-schema", "not JSON"],
    );
}
