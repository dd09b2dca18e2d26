//! `moe-serve run` / `plan` with a TOML run configuration (`--config`), flag overrides, the
//! simulated device, the routing trace and bad configuration input, through the real binary.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{bin, copy_model, fixtures, root, Reference};

/// Runs `moe-serve` from the repository root, isolated from the user's Hub cache, with a fresh
/// state folder (so no hot set or profile of an earlier run changes the plan or the counters).
fn moe(args: &[&str]) -> Output {
    let state = tempfile::tempdir().unwrap();
    Command::new(bin())
        .args(args)
        .current_dir(root())
        .env("HF_HUB_CACHE", "/nonexistent-hub-cache")
        .env("XDG_STATE_HOME", state.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("spawn moe-serve")
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A successful command whose stdout is exactly one JSON line.
fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status,
        stderr_of(out)
    );
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stdout must be exactly one JSON line: {stdout:?}"
    );
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {}", lines[0]))
}

/// A failing command: non-zero exit, exactly one line on stderr, starting with `error:`,
/// containing every needle, no panic.
fn assert_clean_error(out: &Output, needles: &[&str]) {
    let stderr = stderr_of(out);
    assert!(
        !out.status.success(),
        "expected failure, got success; stdout: {}, stderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("internal error"),
        "panic reached the user: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one stderr line expected: {stderr:?}"
    );
    assert!(
        lines[0].starts_with("error: "),
        "not an error line: {stderr:?}"
    );
    for n in needles {
        assert!(lines[0].contains(n), "error line lacks `{n}`: {}", lines[0]);
    }
}

fn fixture_model(name: &str) -> PathBuf {
    fixtures().join(name).join("model")
}

/// `top_k` and `moe_layers` of a fixture variant, from tests/fixtures/index.json.
fn variant_routing(name: &str) -> (usize, Vec<usize>) {
    let text = std::fs::read_to_string(fixtures().join("index.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let e = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in index.json"));
    let top_k = e["top_k"].as_u64().unwrap() as usize;
    let layers = e["moe_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    (top_k, layers)
}

/// Experts per MoE layer from a fixture's config.json (either spelling).
fn num_experts(model: &Path) -> u64 {
    let text = std::fs::read_to_string(model.join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["num_experts"]
        .as_u64()
        .or_else(|| v["num_local_experts"].as_u64())
        .expect("num_experts or num_local_experts")
}

/// A temp folder holding `model/` (a copy of a fixture model) and config files written next to it.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn with_fixture(name: &str) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        let copy = copy_model(&fixture_model(name));
        let dst = dir.path().join("model");
        std::fs::create_dir(&dst).unwrap();
        for e in std::fs::read_dir(copy.path()).unwrap() {
            let e = e.unwrap();
            std::fs::rename(e.path(), dst.join(e.file_name())).unwrap();
        }
        Workspace { dir }
    }

    fn model(&self) -> PathBuf {
        self.dir.path().join("model")
    }

    /// Writes `body` to `<workspace>/<name>` and returns its path as a string.
    fn config(&self, name: &str, body: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_string()
    }
}

fn ids_arg(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn u64s(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// `run --config CFG` on prompt 1,2,3,4, four greedy tokens past EOS, as JSON.
fn run_four_greedy(cfg: &str) -> serde_json::Value {
    json_of(&moe(&[
        "run",
        "--config",
        cfg,
        "--prompt-ids",
        "1,2,3,4",
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]))
}

#[test]
fn run_with_config_file_reports_experts_rss_and_device() {
    let ws = Workspace::with_fixture("qwen3_moe");
    let cfg = ws.config(
        "run.toml",
        "model = \"./model\"\ndevice = \"cpu\"\nthreads = 1\nmax_context = 64\n",
    );
    let v = run_four_greedy(&cfg);
    assert_eq!(v["arch"], "qwen3_moe");
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["threads"], 1, "threads from the file");
    assert_eq!(v["prompt_tokens"], 4);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 4);
    // The relative path resolved from the file's folder, not the working folder.
    let label = v["model"].as_str().unwrap();
    assert!(
        label.contains(ws.dir.path().file_name().unwrap().to_str().unwrap()),
        "model label {label} is not the workspace copy"
    );
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);

    let ex = &v["experts"];
    assert!(ex.is_object(), "experts: {ex}");
    for k in [
        "hits",
        "misses",
        "prefetch_hits",
        "prefetch_wasted",
        "bytes_moved",
    ] {
        assert!(ex[k].is_u64(), "experts.{k} is not a count: {ex}");
    }
    // The measured speeds the copy-or-compute choice uses: experts ran on the host, and there
    // is no device tier to copy to.
    assert!(
        ex["host_compute_bytes_per_s"].as_f64().unwrap() > 0.0,
        "{ex}"
    );
    assert!(ex["copy_bytes_per_s"].is_null(), "{ex}");
    assert!(ex["stall_ms"].as_f64().unwrap() >= 0.0);
    let per_layer = ex["per_layer"].as_array().expect("per_layer array");
    assert!(!per_layer.is_empty());
    // Totals are the sums of the per-layer counters.
    for k in ["hits", "misses", "prefetch_hits", "prefetch_wasted"] {
        let sum: u64 = per_layer.iter().map(|l| l[k].as_u64().unwrap()).sum();
        assert_eq!(ex[k].as_u64().unwrap(), sum, "experts.{k}");
    }
    // Every routed expert of 4 prompt + 3 fed-back tokens was either a hit or a miss.
    let (top_k, moe_layers) = variant_routing("qwen3_moe");
    let uses = ex["hits"].as_u64().unwrap() + ex["misses"].as_u64().unwrap();
    assert!(uses > 0, "no expert use counted: {ex}");
    assert!(
        uses <= (moe_layers.len() * top_k * 7) as u64,
        "more expert uses than routed: {uses}"
    );
}

/// The shipped GPU configurations plan for their cards on a machine without a GPU (their
/// `vram_budget` says what card), as their comments say: Qwen3-30B-A3B from its config.json.
#[test]
fn gpu_configs_plan_for_their_cards_as_their_comments_say() {
    let model = "tests/fixtures/qwen3_30b_a3b/config.json";
    for (toml, slots, vram) in [
        ("configs/gpu-8gb-ram-64gb.toml", 8, 7u64 << 30),
        ("configs/gpu-24gb.toml", 37, 22 << 30),
    ] {
        let v = json_of(&moe(&[
            "plan", "--config", toml, "--model", model, "--json",
        ]));
        let p = &v["plan"];
        assert_eq!(p["device"], "cuda", "{toml}: {p}");
        assert_eq!(p["slots_per_layer"], slots, "{toml}: {p}");
        assert_eq!(p["vram_budget_bytes"], vram, "{toml}: {p}");
        assert!(
            p["vram_used_bytes"].as_u64().unwrap() <= vram,
            "{toml}: {p}"
        );
        assert_eq!(
            p["warnings"].as_array().map(Vec::len),
            Some(0),
            "{toml}: {p}"
        );
        // The link rate the estimates assume is shown (the `[sim]` default until measured).
        assert_eq!(p["link_bytes_per_s"].as_f64(), Some(25e9), "{toml}: {p}");
        let text =
            String::from_utf8(moe(&["plan", "--config", toml, "--model", model]).stdout).unwrap();
        assert!(text.contains("link: 25.0 GB/s host to device"), "{text}");
    }
    // Without vram_budget and without a GPU there is no card to plan for: say what to set.
    let out = moe(&["plan", "--model", model, "--device", "cuda"]);
    assert_clean_error(&out, &["cuda"]);
}

/// `device = "auto"` takes the GPU only when the CUDA backend opens; otherwise it computes on
/// the CPU, reports `cpu`, and gives the CPU's tokens.
#[test]
fn auto_device_falls_back_to_the_cpu_with_the_same_tokens() {
    let ws = Workspace::with_fixture("qwen3_moe");
    let run = |device: &str| {
        let cfg = ws.config(
            &format!("{device}.toml"),
            &format!("model = \"./model\"\ndevice = \"{device}\"\nmax_context = 64\n"),
        );
        run_four_greedy(&cfg)
    };
    let (auto, cpu) = (run("auto"), run("cpu"));
    assert_eq!(auto["device"], "cpu", "{auto}");
    assert_eq!(auto["tokens"], cpu["tokens"]);
}

#[test]
fn flags_override_the_config_file() {
    let ws = Workspace::with_fixture("qwen3_moe");
    let cfg = ws.config(
        "small.toml",
        "model = \"model\"\nmax_context = 8\nthreads = 2\n",
    );
    let twenty: Vec<u64> = (1..=20).collect();
    let ids = ids_arg(&twenty);
    let base = [
        "run",
        "--config",
        &cfg,
        "--prompt-ids",
        &ids,
        "--max-tokens",
        "2",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ];

    // The file's max_context = 8 refuses a 20-token prompt...
    assert_clean_error(&moe(&base), &["context", "max_context is 8"]);

    // ...and the flag lifts it; --threads overrides the file's threads too.
    let mut args = base.to_vec();
    args.extend(["--max-context", "64", "--threads", "1"]);
    let v = json_of(&moe(&args));
    assert_eq!(v["prompt_tokens"], 20);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 2);
    assert_eq!(v["threads"], 1);

    // --model replaces the file's model: another architecture answers.
    let olmoe = fixture_model("olmoe");
    let mut args = base.to_vec();
    args.extend(["--max-context", "64", "--model", olmoe.to_str().unwrap()]);
    let v = json_of(&moe(&args));
    assert_eq!(v["arch"], "olmoe");

    // A file whose model does not exist still works when --model replaces it.
    let missing = ws.config("missing.toml", "model = \"./not-here\"\n");
    let m = ws.model();
    let v = json_of(&moe(&[
        "run",
        "--config",
        &missing,
        "--model",
        m.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--max-tokens",
        "1",
        "--json",
    ]));
    assert_eq!(v["arch"], "qwen3_moe");
}

#[test]
fn plan_of_the_sim_demo_example() {
    let out = moe(&["plan", "--config", "configs/sim-demo.toml"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines().any(|l| l == "device: sim"),
        "no `device: sim` line: {text}"
    );
    assert!(text.contains("4 slots per layer"), "{text}");
    assert!(text.starts_with("model: "), "{text}");

    let v = json_of(&moe(&[
        "plan",
        "--config",
        "configs/sim-demo.toml",
        "--json",
    ]));
    assert_eq!(v["from_config_only"], false);
    assert_eq!(v["arch"], "qwen3_moe");
    let p = &v["plan"];
    assert_eq!(p["device"], "sim");
    assert_eq!(p["slots_per_layer"], 4, "slots_per_layer from the file");
    let s = &p["sizes"];
    let moe_layers = s["moe_layers"].as_u64().unwrap();
    let per_layer = s["experts_per_layer"].as_u64().unwrap();
    assert_eq!(p["device_experts"].as_u64().unwrap(), 4 * moe_layers);
    let ram = p["ram_experts"].as_u64().expect("plan.ram_experts");
    let files = p["file_experts"].as_u64().unwrap();
    assert_eq!(ram + files, moe_layers * per_layer);
    assert_eq!(p["vram_budget_bytes"], 4u64 << 20);
    assert_eq!(p["ram_budget_bytes"], 256u64 << 20);
    assert_eq!(p["ram_budget_auto"], false);
    let low = p["decode_tokens_per_s_low"].as_f64().unwrap();
    let high = p["decode_tokens_per_s_high"].as_f64().unwrap();
    assert!(low > 0.0 && low <= high, "decode {low}..{high}");
}

#[test]
fn plan_from_a_bare_config_json_matches_the_full_folder() {
    let model = fixture_model("qwen3_moe");
    let plan = |spec: &str| {
        json_of(&moe(&[
            "plan",
            "--model",
            spec,
            "--ram-budget",
            "1GiB",
            "--max-context",
            "128",
            "--json",
        ]))
    };
    let full = plan(model.to_str().unwrap());
    assert_eq!(full["from_config_only"], false);
    // A folder with only config.json (no weights downloaded yet), and that file by its path
    // under another name.
    let only = tempfile::tempdir().unwrap();
    std::fs::copy(model.join("config.json"), only.path().join("config.json")).unwrap();
    std::fs::copy(model.join("config.json"), only.path().join("my-model.json")).unwrap();
    for spec in [only.path().to_path_buf(), only.path().join("my-model.json")] {
        let v = plan(spec.to_str().unwrap());
        assert_eq!(v["from_config_only"], true, "{}", spec.display());
        assert_eq!(
            v["plan"]["sizes"],
            full["plan"]["sizes"],
            "{}",
            spec.display()
        );
    }

    // The sizes themselves, from config.json: 4 layers x 8 experts of 3 f32 matrices
    // 64 x 32, top-3.
    let s = &full["plan"]["sizes"];
    let expert = 3 * 64 * 32 * 4u64;
    assert_eq!(s["expert_bytes"], expert);
    assert_eq!(s["total_expert_bytes"], 4 * 8 * expert);
    assert_eq!(s["moe_layers"], 4);
    assert_eq!(s["experts_per_layer"], 8);
    assert_eq!(s["top_k"], 3);
    assert!(s["resident_bytes"].as_u64().unwrap() > 0);
    // Weights on disk = resident + experts (the fixture holds no unused tensors).
    let on_disk: u64 = std::fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let weights = s["resident_bytes"].as_u64().unwrap() + 4 * 8 * expert;
    assert!(
        weights <= on_disk && on_disk - weights < 64 << 10,
        "sizes {weights} vs {on_disk} bytes of safetensors"
    );

    // The config.json file of the full folder, named by its path: planned from the file alone
    // (so the sizes above also prove the config-only arithmetic on the same model).
    let bare = plan(model.join("config.json").to_str().unwrap());
    assert_eq!(bare["arch"], "qwen3_moe");
    assert_eq!(bare["plan"]["sizes"], full["plan"]["sizes"]);
    assert_eq!(
        bare["from_config_only"], true,
        "plan --model <folder with weights>/config.json read the weight headers"
    );
}

#[test]
fn bad_configuration_is_a_one_line_error() {
    let ws = Workspace::with_fixture("qwen3_moe");
    let good = "model = \"./model\"\nmax_context = 64\n";
    // (file body, extra flags, needles): each fails the same way under `plan` and `run`.
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "model = \"./model\"\nbogus = 1\n",
            &[],
            &["bad.toml", "bogus"],
        ),
        (
            "model = \"./model\"\n[experts]\nslot_per_layer = 2\n",
            &[],
            &["bad.toml", "experts.slot_per_layer"],
        ),
        (
            "model = \"./model\"\nram_budget = \"12 GX\"\n",
            &[],
            &["bad.toml", "ram_budget", "12 GX"],
        ),
        (
            "device = \"cpu\"\n",
            &[],
            &["bad.toml", "model", "required"],
        ),
        ("model = \"./no-such-model\"\n", &[], &["no-such-model"]),
        (good, &["--ram-budget", "1KiB"], &["ram_budget", "needed"]),
        // Flags obey the rules of the keys they set, and the error names the flag.
        (
            good,
            &["--threads", "0"],
            &["command line", "--threads", "at least 1"],
        ),
        (
            good,
            &["--max-context", "1"],
            &["command line", "--max-context", "at least 2"],
        ),
        (good, &["--model", " "], &["--model", "must not be empty"]),
        // Without a usable GPU and CUDA backend: one line naming what is missing and the fix.
        (
            "model = \"./model\"\ndevice = \"cuda\"\n",
            &[],
            &["cuda backend unavailable", "device = \"cpu\""],
        ),
        (
            "model = \"./model\"\ndevice = \"sim\"\n",
            &[],
            &["sim", "vram_budget"],
        ),
        (
            "model = \"./model\"\ndevice = \"sim\"\nvram_budget = \"4MiB\"\nmax_context = 64\n\
             [experts]\nslots_per_layer = 1000\n",
            &[],
            &["slots_per_layer", "1000", "vram_budget"],
        ),
    ];
    for &(body, flags, needles) in cases {
        let cfg = ws.config("bad.toml", body);
        for cmd in ["plan", "run"] {
            let mut args = vec![cmd, "--config", &cfg];
            args.extend_from_slice(flags);
            if cmd == "run" {
                args.extend(["--prompt-ids", "1,2", "--max-tokens", "1", "--json"]);
            }
            let out = moe(&args);
            assert!(
                out.stdout.is_empty(),
                "{cmd} {body:?}: stdout on error: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            assert_clean_error(&out, needles);
        }
    }

    // A malformed size flag is refused by the argument parser, naming the value.
    let cfg = ws.config("good.toml", good);
    let out = moe(&["plan", "--config", &cfg, "--ram-budget", "12XB"]);
    let stderr = stderr_of(&out);
    assert!(!out.status.success(), "12XB accepted");
    assert!(stderr.contains("12XB"), "{stderr}");
    assert!(stderr.contains("--ram-budget"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn sim_device_gives_the_cpu_tokens_and_counts_misses() {
    let dir = fixtures().join("qwen3_moe");
    let r = Reference::open(&dir.join("reference.safetensors"));
    let prompt: Vec<u64> = r.i64("short.input_ids").iter().map(|&x| x as u64).collect();
    let greedy: Vec<u64> = r
        .i64("short.greedy")
        .iter()
        .take(6)
        .map(|&x| x as u64)
        .collect();
    let model = dir.join("model");
    let ids = ids_arg(&prompt);
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            &ids,
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            "--ignore-eos",
            "--max-context",
            "64",
            "--json",
        ];
        args.extend_from_slice(extra);
        json_of(&moe(&args))
    };
    let cpu = gen(&["--device", "cpu"]);
    let sim = gen(&["--device", "sim", "--vram-budget", "64MiB"]);
    assert_eq!(cpu["device"], "cpu");
    assert_eq!(sim["device"], "sim");
    assert_eq!(u64s(&cpu["tokens"]), greedy, "cpu vs transformers");
    assert_eq!(u64s(&sim["tokens"]), greedy, "sim vs transformers");
    assert!(
        sim["experts"]["misses"].as_u64().unwrap() > 0,
        "a cold device must miss: {}",
        sim["experts"]
    );
    assert!(sim["experts"]["bytes_moved"].as_u64().unwrap() > 0);

    // Fewer device slots than top_k (evictions every token), from a config file: same tokens.
    let ws = tempfile::tempdir().unwrap();
    let cfg = ws.path().join("tight.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndevice = \"sim\"\nvram_budget = \"64MiB\"\n[experts]\nslots_per_layer = 2\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    let tight = gen(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(tight["device"], "sim");
    assert_eq!(u64s(&tight["tokens"]), greedy, "2-slot sim vs transformers");
    let ex = &tight["experts"];
    assert!(
        ex["misses"].as_u64().unwrap() > sim["experts"]["misses"].as_u64().unwrap(),
        "2 slots must miss more than 8: {ex}"
    );
}

#[test]
fn trace_has_one_record_per_moe_layer_and_fed_token() {
    for (name, prompt, max_tokens) in [("qwen3_moe", 5usize, 4usize), ("qwen3_moe_t5", 3, 3)] {
        let (top_k, moe_layers) = variant_routing(name);
        let model = fixture_model(name);
        let n_experts = num_experts(&model);
        let tmp = tempfile::tempdir().unwrap();
        let trace = tmp.path().join("trace.jsonl");
        let ids: Vec<u64> = (1..=prompt as u64).collect();
        let v = json_of(&moe(&[
            "run",
            "--model",
            model.to_str().unwrap(),
            "--prompt-ids",
            &ids_arg(&ids),
            "--max-tokens",
            &max_tokens.to_string(),
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
            "--trace",
            trace.to_str().unwrap(),
        ]));
        let generated = v["tokens"].as_array().unwrap().len();
        assert_eq!(generated, max_tokens);
        let fed = prompt + generated - 1;

        let text = std::fs::read_to_string(&trace).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), moe_layers.len() * fed, "{name}: {text}");
        let mut seen = BTreeSet::new();
        for line in &lines {
            let r: serde_json::Value = serde_json::from_str(line).unwrap();
            let layer = r["layer"].as_u64().unwrap() as usize;
            let token = r["token"].as_u64().unwrap() as usize;
            let experts = u64s(&r["experts"]);
            assert!(moe_layers.contains(&layer), "{name}: layer {layer}: {line}");
            assert!(token < fed, "{name}: token {token}: {line}");
            assert_eq!(experts.len(), top_k, "{name}: {line}");
            let distinct: BTreeSet<u64> = experts.iter().copied().collect();
            assert_eq!(distinct.len(), top_k, "{name}: repeated expert: {line}");
            assert!(
                experts.iter().all(|&e| e < n_experts),
                "{name}: expert id out of range: {line}"
            );
            assert!(seen.insert((layer, token)), "{name}: duplicate {line}");
        }
    }

    // The prompt positions route as transformers does.
    let dir = fixtures().join("qwen3_moe");
    let r = Reference::open(&dir.join("reference.safetensors"));
    let prompt: Vec<u64> = r.i64("short.input_ids").iter().map(|&x| x as u64).collect();
    let tmp = tempfile::tempdir().unwrap();
    let trace = tmp.path().join("trace.jsonl");
    let model = dir.join("model");
    json_of(&moe(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        &ids_arg(&prompt),
        "--max-tokens",
        "1",
        "--json",
        "--trace",
        trace.to_str().unwrap(),
    ]));
    let (top_k, moe_layers) = variant_routing("qwen3_moe");
    let text = std::fs::read_to_string(&trace).unwrap();
    assert_eq!(text.lines().count(), moe_layers.len() * prompt.len());
    for line in text.lines() {
        let rec: serde_json::Value = serde_json::from_str(line).unwrap();
        let layer = rec["layer"].as_u64().unwrap() as usize;
        let token = rec["token"].as_u64().unwrap() as usize;
        let got: BTreeSet<u64> = u64s(&rec["experts"]).into_iter().collect();
        let want: BTreeSet<u64> = r.i64(&format!("short.router.{layer}.indices"))
            [token * top_k..(token + 1) * top_k]
            .iter()
            .map(|&x| x as u64)
            .collect();
        assert_eq!(got, want, "layer {layer} token {token}");
    }
}
