//! Qwen3-Next beyond logit parity (tests/parity.rs covers that): checkpoints that do not match
//! their config fail at open time with an error naming the problem; the release's `mtp.*`
//! tensors are ignored with one warning; the batch scheduler reuses and rolls back recurrent
//! state correctly; and the real 80B model plans from its config.json alone, in every shipped
//! configuration.

mod common;

use std::path::Path;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use moe_runtime::batch::{BatchConfig, Batcher, Event, RequestParams};
use moe_runtime::{Model, Settings};

fn fixture(name: &str) -> std::path::PathBuf {
    common::fixtures().join(name).join("model")
}

fn load(dir: &Path, max_batch: usize) -> moe_runtime::Result<Model> {
    Model::load(&Settings {
        model: Some(dir.to_string_lossy().into_owned()),
        threads: Some(2),
        max_batch: Some(max_batch),
        ..Default::default()
    })
}

fn open_error(dir: &Path) -> String {
    match load(dir, 1) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[test]
fn a_missing_linear_attention_tensor_is_named_at_open() {
    let dir = common::copy_model(&fixture("qwen3_next"));
    let gone = "model.layers.1.linear_attn.A_log";
    edit_json(&dir.path().join("model.safetensors.index.json"), |v| {
        let map = v["weight_map"].as_object_mut().unwrap();
        assert!(map.remove(gone).is_some(), "fixture lacks {gone}");
    });
    let e = open_error(dir.path());
    assert!(e.contains(gone) && e.contains("missing tensor"), "{e}");
}

#[test]
fn a_conv_kernel_of_the_wrong_size_is_named_at_open() {
    let dir = common::copy_model(&fixture("qwen3_next"));
    edit_json(&dir.path().join("config.json"), |v| {
        assert_eq!(v["linear_conv_kernel_dim"], 4);
        v["linear_conv_kernel_dim"] = 3.into();
    });
    let e = open_error(dir.path());
    assert!(
        e.contains("linear_attn.conv1d.weight") && e.contains(", 1, 4]") && e.contains(", 1, 3]"),
        "{e}"
    );
}

#[test]
fn layer_kinds_that_disagree_with_the_tensors_are_named_at_open() {
    // Hub style: an interval of 2 makes layer 1 full attention; the checkpoint has a linear one.
    let dir = common::copy_model(&fixture("qwen3_next"));
    edit_json(&dir.path().join("config.json"), |v| {
        assert_eq!(v["full_attention_interval"], 4);
        v["full_attention_interval"] = 2.into();
    });
    let e = open_error(dir.path());
    assert!(
        e.contains("layer 1 is full_attention")
            && e.contains("model.layers.1.linear_attn.in_proj_qkvz.weight")
            && e.contains("does not match"),
        "{e}"
    );
    // transformers 5 style: the list swapped.
    let dir = common::copy_model(&fixture("qwen3_next_t5"));
    edit_json(&dir.path().join("config.json"), |v| {
        let types = v["layer_types"].as_array_mut().unwrap();
        assert_eq!(types[0], "linear_attention");
        for t in types.iter_mut() {
            *t = if *t == "linear_attention" {
                "full_attention".into()
            } else {
                "linear_attention".into()
            };
        }
    });
    let e = open_error(dir.path());
    assert!(
        e.contains("layer 0 is full_attention") && e.contains("linear_attn"),
        "{e}"
    );
    // A list of the wrong length.
    let dir = common::copy_model(&fixture("qwen3_next_t5"));
    edit_json(&dir.path().join("config.json"), |v| {
        v["layer_types"].as_array_mut().unwrap().pop();
    });
    let e = open_error(dir.path());
    assert!(
        e.contains("layer_types") && e.contains("entries for"),
        "{e}"
    );
}

#[test]
fn the_multi_token_prediction_tensors_get_one_warning() {
    let dir = fixture("qwen3_next");
    let out = std::process::Command::new(common::bin())
        .args(["run", "--model"])
        .arg(&dir)
        .args(["--prompt-ids", "1,2,3", "--max-tokens", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("mtp") || l.contains("does not use"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("multi-token-prediction") && lines[0].contains("(e.g. `mtp."),
        "{}",
        lines[0]
    );
}

/// Generated ids and the usage's cached token count, or the failure message.
fn collect(rx: Receiver<Event>) -> (Vec<u32>, Result<usize, String>) {
    let mut ids = Vec::new();
    for ev in rx.iter() {
        match ev {
            Event::Token(t) => ids.push(t.id),
            Event::Done { usage, .. } => return (ids, Ok(usage.cached_tokens)),
            Event::Failed(m) => return (ids, Err(m.to_string())),
        }
    }
    (ids, Err("channel closed".into()))
}

fn submit(b: &Batcher, prompt: Vec<u32>, params: RequestParams) -> Receiver<Event> {
    let (tx, rx) = crossbeam_channel::unbounded();
    b.submit(prompt, params, Box::new(tx))
        .unwrap_or_else(|_| panic!("refused"));
    rx
}

#[test]
fn the_scheduler_reuses_whole_recurrent_prefixes_and_never_cuts_one() {
    for name in ["qwen3_next", "qwen3_next_t5"] {
        let model = Arc::new(load(&fixture(name), 4).unwrap());
        assert!(!model.decoder.can_truncate());
        let first: Vec<u32> = (0..30).map(|i| (i * 7 % 200 + 3) as u32).collect();
        let want_first = common::greedy_generate(&model, &first, 6);
        // A second turn: the whole first exchange, then more (its recurrent state is reusable).
        let mut second = first.clone();
        second.extend_from_slice(&want_first[..5]);
        second.extend([17, 18, 19]);
        // A prompt that shares only part of the first one (a cut recurrent state is unusable).
        let mut third = first[..20].to_vec();
        third.extend([40, 41]);
        let want_second = common::greedy_generate(&model, &second, 6);
        let want_third = common::greedy_generate(&model, &third, 6);
        let mut cfg = BatchConfig::for_model(&model, 8);
        cfg.prefill_chunk = 7;
        let b = Batcher::start(model.clone(), cfg);
        let (ids, cached) = collect(submit(&b, first.clone(), common::greedy_request(6)));
        assert_eq!(ids, want_first, "{name}");
        assert_eq!(cached, Ok(0));
        let (ids, cached) = collect(submit(&b, second.clone(), common::greedy_request(6)));
        assert_eq!(ids, want_second, "{name}");
        // Prompt plus the 5 generated tokens that were fed back: all of it was reused.
        assert_eq!(cached, Ok(first.len() + 5), "{name}");
        let (ids, cached) = collect(submit(&b, third.clone(), common::greedy_request(6)));
        assert_eq!(ids, want_third, "{name}");
        assert_eq!(
            cached,
            Ok(0),
            "{name}: a partial recurrent prefix was reused"
        );
    }
}

#[test]
fn a_failed_step_restores_recurrent_state_before_the_retry() {
    let model = Arc::new(load(&fixture("qwen3_next"), 4).unwrap());
    let mut cfg = BatchConfig::for_model(&model, 8);
    // The fault fires after the batched forward pass has advanced every state: only a restore
    // of the recurrent state (a KV cache would just be cut) lets the retry give the solo tokens.
    cfg.fault_panic_token = Some(250);
    cfg.prefill_chunk = 5;
    let b = Batcher::start(model.clone(), cfg);
    let good: Vec<Vec<u32>> = vec![(1..13).collect(), vec![9, 8, 7, 6, 5, 4, 3]];
    let expected: Vec<_> = good
        .iter()
        .map(|p| common::greedy_generate(&model, p, 8))
        .collect();
    // The good ones first: the bad one then joins a step in which they decode.
    let rxs: Vec<_> = good
        .iter()
        .map(|p| submit(&b, p.clone(), common::greedy_request(8)))
        .collect();
    let rx_bad = submit(
        &b,
        vec![5, 250, 6, 7, 8, 9, 10, 11],
        common::greedy_request(8),
    );
    let (_, bad) = collect(rx_bad);
    assert!(bad.unwrap_err().contains("internal error"));
    for (rx, want) in rxs.into_iter().zip(&expected) {
        let (ids, end) = collect(rx);
        assert_eq!(&ids, want);
        assert!(end.is_ok());
    }
}

#[test]
fn the_real_80b_model_plans_from_its_config_alone() {
    let cfg = "tests/fixtures/qwen3_next_80b/config.json";
    let j = common::plan_json(&["--model", cfg, "--ram-budget", "20GiB"]);
    assert_eq!(j["arch"], "qwen3_next");
    assert_eq!(j["from_config_only"], true);
    let s = &j["plan"]["sizes"];
    assert_eq!(
        (s["moe_layers"].as_u64(), s["experts_per_layer"].as_u64()),
        (Some(48), Some(512))
    );
    assert_eq!(s["top_k"], 10);
    // 512 x 2048 x 3 bf16 values per expert.
    assert_eq!(s["expert_bytes"], 512 * 2048 * 3 * 2);
    // 12 full-attention layers keep KV (2 heads x 256, f32); 36 linear layers a fixed state:
    // 3 conv rows of 8192 channels + 32 heads x 128 x 128, f32.
    assert_eq!(s["kv_bytes_per_token"], 12 * 2 * 2 * 256 * 4);
    assert_eq!(
        s["state_bytes_per_sequence"],
        36 * (3 * 8192 + 32 * 128 * 128) * 4
    );
    // Dense part: embeddings + head (2 x 151936 x 2048) and the 48 mixers, routers and shared
    // experts: ~4.7 GB in bf16.
    let resident = s["resident_bytes"].as_u64().unwrap();
    assert!(
        (4_500_000_000..4_900_000_000).contains(&resident),
        "{resident}"
    );

    // Every shipped configuration fits as its comments say.
    // The GPU ones plan for their card (`vram_budget`) on a machine without one, and as `sim`.
    for (toml, device, from_files) in [
        (
            "configs/qwen3-next-80b-gpu-8gb-ram-64gb.toml",
            "cuda",
            false,
        ),
        ("configs/qwen3-next-80b-gpu-8gb-ram-64gb.toml", "sim", false),
        (
            "configs/qwen3-next-80b-gpu-24gb-ram-32gb.toml",
            "cuda",
            true,
        ),
        ("configs/qwen3-next-80b-gpu-24gb-ram-32gb.toml", "sim", true),
        ("configs/qwen3-next-80b-cpu-64gb.toml", "cpu", false),
    ] {
        let j = common::plan_json(&["--config", toml, "--model", cfg, "--device", device]);
        assert_eq!(j["plan"]["device"], device, "{toml}");
        let p = &j["plan"];
        assert_eq!(
            p["warnings"].as_array().map(Vec::len),
            Some(0),
            "{toml}: {p}"
        );
        let file_experts = p["file_experts"].as_u64().unwrap();
        assert_eq!(file_experts > 0, from_files, "{toml}: {p}");
        assert!(p["ram_used_bytes"].as_u64() <= p["ram_budget_bytes"].as_u64());
        if device != "cpu" {
            assert!(p["slots_per_layer"].as_u64().unwrap() >= 40, "{toml}: {p}");
            assert!(p["vram_used_bytes"].as_u64() <= p["vram_budget_bytes"].as_u64());
        }
    }
}

#[test]
fn synthetic_qwen3_next_models_open_and_generate() {
    let dir = tempfile::tempdir().unwrap();
    for (name, args) in [
        (
            "next-demo",
            vec!["--arch", "qwen3_next", "--preset", "next-demo"],
        ),
        // The release's layer and expert counts, cut to 4 layers: 7755 tensors in 5 shards.
        (
            "next-shape4",
            vec![
                "--arch",
                "qwen3_next",
                "--preset",
                "next-shape",
                "--layers",
                "4",
            ],
        ),
    ] {
        let path = common::synth_model(dir.path(), name, &args);
        let model = load(&path, 1).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(model.config.arch, "qwen3_next");
        assert!(!model.decoder.can_truncate());
        // Only the multi-token-prediction tensors go unused.
        assert!(!model.unused_tensors.is_empty());
        assert!(
            model.unused_tensors.iter().all(|n| n.starts_with("mtp.")),
            "{name}: {:?}",
            &model.unused_tensors[..3.min(model.unused_tensors.len())]
        );
        let ids = common::greedy_generate(&model, &[5, 6, 7, 8, 9], 6);
        assert_eq!(ids.len(), 6, "{name}");
        // Prefill + cached decode agree with a fresh prefill over the whole sequence.
        let mut all = vec![5, 6, 7, 8, 9];
        all.extend_from_slice(&ids[..5]);
        let mut st = model.new_state();
        let logits = model
            .forward(&all, &mut st, moe_runtime::Logits::Last, None)
            .unwrap();
        assert_eq!(moe_runtime::sampler::argmax(&logits), ids[5], "{name}");
    }
}
