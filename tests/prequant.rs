//! Pre-quantized checkpoints (FP8 block-scaled, bitsandbytes 4-bit) end to end: the known
//! values of each format, the cache round trip (built once without loss, mapped after, the
//! same logits and tokens as converting in RAM), conversion to a requested quantization with
//! its error reported, and the `cache build` command. Parity against transformers runs in
//! `tests/parity.rs` over the same fixtures.

mod common;

use std::os::unix::fs::MetadataExt;

use common::{cache_settings as settings, max_abs_diff, prefill_logits, variants, Reference};
use moe_runtime::prequant::PrequantConfig;
use moe_runtime::runconfig::Quantization;
use moe_runtime::weights::{ModelFiles, WeightSet};
use moe_runtime::{Model, Settings};

/// The fixtures stored pre-quantized (generate.py's FP8 and bitsandbytes variants).
fn prequant_variants() -> Vec<common::Variant> {
    let v: Vec<_> = variants()
        .into_iter()
        .filter(|v| v.name.contains("fp8") || v.name.contains("bnb"))
        .collect();
    assert!(
        v.len() >= 6,
        "pre-quantized fixtures missing from index.json"
    );
    v
}

#[test]
fn known_values_of_each_format_dequantize_exactly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        common::fixtures().join("prequant_known.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut ws = WeightSet::open(&ModelFiles::Dir(dir.path().to_path_buf())).unwrap();
    ws.set_prequant(Some(PrequantConfig::Fp8 {
        block: Some([128, 128]),
        not_convert: vec![],
    }));
    for name in ["fp8", "nf4", "fp4"] {
        let t = ws.get(&format!("{name}.weight"), None).unwrap();
        assert!(t.is_prequant(), "{name}");
        let got = t.to_f32_vec().unwrap();
        let want = ws
            .get(&format!("{name}.expected"), None)
            .unwrap()
            .to_f32_vec()
            .unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differ, 0,
            "{name}: {differ} values differ from the exact ones"
        );
    }
}

#[test]
fn cache_round_trip_keeps_every_value_and_token() {
    for v in prequant_variants() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Reference::open(&v.dir.join("reference.safetensors"));
        let ids: Vec<u32> = r.i64("short.input_ids").iter().map(|&x| x as u32).collect();
        let want_greedy: Vec<u32> = r.i64("short.greedy").iter().map(|&x| x as u32).collect();
        let model_dir = v.dir.join("model");
        let s = settings(&model_dir, Quantization::None, tmp.path());

        let first = Model::load(&s).unwrap_or_else(|e| panic!("{}: {e}", v.name));
        let report = first
            .cache_build_report()
            .unwrap_or_else(|| panic!("{}: the first load built no cache", v.name));
        assert!(
            report.prequant_error.is_none(),
            "{}: kept without loss, yet an error was measured",
            v.name
        );
        let path = first.cache_path().unwrap().to_path_buf();
        let meta = std::fs::metadata(&path).unwrap();
        let second = Model::load(&s).unwrap();
        assert!(second.cache_build_report().is_none(), "{}", v.name);
        let again = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.ino(), meta.mtime_nsec()),
            (again.ino(), again.mtime_nsec()),
            "{}: the cache was rewritten",
            v.name
        );
        let in_ram = Model::load(&Settings {
            cache: false,
            ..s.clone()
        })
        .unwrap();
        assert!(in_ram.cache_path().is_none());

        let want = prefill_logits(&in_ram, &ids);
        assert!(
            max_abs_diff(&want, &r.f32("short.logits")) <= 1e-4,
            "{}: parity",
            v.name
        );
        for m in [&first, &second] {
            assert_eq!(
                max_abs_diff(&prefill_logits(m, &ids), &want),
                0.0,
                "{}: cached weights differ from the conversion in RAM",
                v.name
            );
            assert_eq!(
                common::greedy_generate(m, &ids, want_greedy.len()),
                want_greedy,
                "{}: greedy tokens",
                v.name
            );
        }
    }
}

#[test]
fn a_requested_quantization_converts_the_exact_values_and_reports_its_error() {
    for name in ["qwen3_moe_fp8", "qwen3_moe_bnb"] {
        let dir = common::fixtures().join(name);
        let tmp = tempfile::tempdir().unwrap();
        let r = Reference::open(&dir.join("reference.safetensors"));
        let ids: Vec<u32> = r.i64("short.input_ids").iter().map(|&x| x as u32).collect();
        let s = settings(&dir.join("model"), Quantization::Q8_0, tmp.path());
        let cached = Model::load(&s).unwrap();
        let e = cached
            .cache_build_report()
            .and_then(|r| r.prequant_error)
            .unwrap_or_else(|| panic!("{name}: no conversion error reported"));
        assert!(
            e.values > 0 && e.rel_rms > 0.0 && e.rel_rms < 0.02 && e.max_abs > 0.0,
            "{name}: {e}"
        );
        // The same conversion in RAM gives the same weights.
        let in_ram = Model::load(&Settings {
            cache: false,
            ..s.clone()
        })
        .unwrap();
        assert_eq!(
            max_abs_diff(
                &prefill_logits(&cached, &ids),
                &prefill_logits(&in_ram, &ids)
            ),
            0.0,
            "{name}"
        );
        // The weights really changed (how close the logits stay: tests/quant.rs, every fixture).
        let err = max_abs_diff(&prefill_logits(&in_ram, &ids), &r.f32("short.logits"));
        assert!(err > 1e-3, "{name}: q8_0 changed nothing ({err})");
    }
}

#[test]
fn cache_build_accepts_a_pre_quantized_model_as_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixtures().join("qwen3_next_fp8").join("model");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moe-serve"))
        .args(["cache", "build", "--model"])
        .arg(&model)
        .arg("--cache-dir")
        .arg(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("built "), "{stdout}");
    let files: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "gguf"))
        .collect();
    assert_eq!(files.len(), 1, "{stdout}");
}

#[test]
fn the_fp8_80b_release_plans_from_its_config_alone_at_its_stored_size() {
    let plan = |cfg: &str| {
        let cfg = common::root().join(cfg);
        let j = common::moe_json(&[
            "plan",
            "--model",
            cfg.to_str().unwrap(),
            "--ram-budget",
            "200GiB",
            "--json",
        ]);
        j["plan"]["sizes"].clone()
    };
    let fp8 = plan("tests/fixtures/qwen3_next_80b_fp8/config.json");
    let bf16 = plan("tests/fixtures/qwen3_next_80b/config.json");
    // Every expert projection has rows of whole 128-blocks: one FP8 byte per weight plus one
    // f32 scale per 128 (the form loading keeps them in, without loss).
    assert_eq!(fp8["expert_bytes"], 3 * 512 * 2048 / 128 * 132);
    assert_eq!(bf16["expert_bytes"], 3 * 512 * 2048 * 2);
    // Attention and linear-attention projections shrink too; embeddings, head, norms, routers
    // and gates stay bf16.
    let (r8, r16) = (
        fp8["resident_bytes"].as_u64().unwrap(),
        bf16["resident_bytes"].as_u64().unwrap(),
    );
    let embed_and_head = 2 * 151_936 * 2048 * 2;
    assert!(r8 < r16 && r8 > embed_and_head, "{r8} vs {r16}");
    assert!(
        (r16 - r8) as f64 > 0.4 * (r16 - embed_and_head) as f64,
        "{r8} vs {r16}"
    );
}

#[test]
fn run_json_reports_the_stored_format_and_a_conversion_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixtures().join("qwen3_moe_bnb").join("model");
    let run = |q: &str| {
        common::moe_json(&[
            "run",
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "1",
            "--quantization",
            q,
            "--cache-dir",
            tmp.path().to_str().unwrap(),
            "--json",
        ])
    };
    let stored = run("none");
    let p = &stored["prequant"];
    assert!(p["format"].as_str().unwrap().contains("nf4"), "{stored}");
    // q/k/v/o, 8 experts x 3 and the router in each of 4 layers.
    assert_eq!(p["tensors"], 4 * (4 + 8 * 3 + 1), "{stored}");
    assert!(p["conversion_error"].is_null(), "{stored}");
    let q8 = run("q8_0");
    let e = &q8["prequant"]["conversion_error"];
    assert!(e["rel_rms"].as_f64().unwrap() > 0.0, "{q8}");
    // A plain checkpoint has none.
    let plain = common::fixtures().join("qwen3_moe").join("model");
    let j = common::moe_json(&[
        "run",
        "--model",
        plain.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--max-tokens",
        "1",
        "--json",
    ]);
    assert!(j["prequant"].is_null(), "{j}");
}
