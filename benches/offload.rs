//! Offload benchmark: decode speed and memory of one model under RAM budgets on `cpu`, and hit
//! rate, prefetch precision/recall and stall share on `sim` with device slots for a share of the
//! experts. Each configuration runs `moe-serve run` in a child process (optionally inside a
//! cgroup-v1 memory limit of budget + 256 MiB, so the page cache cannot hide disk reads).
//!
//! `cargo bench --bench offload -- --model DIR [--budgets 4GiB,6GiB,12GiB]
//! [--slot-shares 0.1,0.25,0.5] [--vram-budgets 8GiB] [--link-gb-per-s 25] [--prompt-tokens 32]
//! [--decode-tokens 16] [--cgroup /sys/fs/cgroup/memory/NAME] [-- EXTRA RUN FLAGS]` (build the
//! release binary first: `cargo build --release`). `--vram-budgets` runs `sim` with the slots the
//! memory plan derives from each budget; flags after `--` go to every run (e.g. `--quantization
//! q8_0 --cache-dir DIR`).

mod common;
use common::{arg, cpu_model};
use std::path::PathBuf;
use std::process::Command;

fn binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let release = root.join("target/release/moe-serve");
    if release.exists() {
        release
    } else {
        root.join("target/debug/moe-serve")
    }
}

/// Runs `moe-serve run` with `extra` args, inside `cgroup` when given (limit set first).
fn run(
    model: &str,
    extra: &[String],
    prompt: &str,
    decode: usize,
    cgroup: Option<(&str, u64)>,
) -> Result<serde_json::Value, String> {
    let bin = binary();
    let mut cmd_args: Vec<String> = vec![
        "run".into(),
        "--model".into(),
        model.into(),
        "--prompt-ids".into(),
        prompt.into(),
        "--max-tokens".into(),
        decode.to_string(),
        "--ignore-eos".into(),
        "--temperature".into(),
        "0".into(),
        "--max-context".into(),
        "512".into(),
        "--json".into(),
    ];
    cmd_args.extend_from_slice(extra);
    let out = match cgroup {
        Some((cg, limit)) => {
            // cgroup v1 wants memory <= memory+swap at every step: raise memsw first when
            // growing, lower it last when shrinking (each write may fail; the final state counts).
            let memsw = format!("{cg}/memory.memsw.limit_in_bytes");
            let _ = std::fs::write(&memsw, limit.to_string());
            std::fs::write(format!("{cg}/memory.limit_in_bytes"), limit.to_string())
                .map_err(|e| format!("{cg}: {e}"))?;
            let _ = std::fs::write(&memsw, limit.to_string());
            let quoted: Vec<String> = cmd_args.iter().map(|a| format!("'{a}'")).collect();
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "echo $$ > {cg}/cgroup.procs && sync && echo 1 > /proc/sys/vm/drop_caches; exec '{}' {}",
                    bin.display(),
                    quoted.join(" ")
                ))
                .output()
        }
        None => Command::new(&bin).args(&cmd_args).output(),
    }
    .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

fn f(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64().unwrap_or(f64::NAN)
}

fn main() {
    let all: Vec<String> = std::env::args().collect();
    let (args, passed) = match all.iter().skip(1).position(|a| a == "--") {
        Some(i) => (all[..i + 1].to_vec(), all[i + 2..].to_vec()),
        None => (all.clone(), Vec::new()),
    };
    // `cargo bench` appends `--bench` to the arguments: it is not a run flag.
    let passed: Vec<String> = passed.into_iter().filter(|a| a != "--bench").collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let Some(model) = arg(&args, "--model") else {
        eprintln!("usage: cargo bench --bench offload -- --model DIR [...]");
        return;
    };
    let budgets = arg(&args, "--budgets").unwrap_or_else(|| "4GiB,6GiB,12GiB".into());
    let shares = arg(&args, "--slot-shares").unwrap_or_else(|| "0.1,0.25,0.5".into());
    let vram_budgets = arg(&args, "--vram-budgets").unwrap_or_default();
    let link = arg(&args, "--link-gb-per-s").unwrap_or_else(|| "25".into());
    let prompt_tokens: usize = arg(&args, "--prompt-tokens")
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let decode: usize = arg(&args, "--decode-tokens")
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let cgroup = arg(&args, "--cgroup");
    // Ids spread over the model's vocabulary (capped at 30000 to keep earlier runs' prompts).
    let vocab = std::fs::read(std::path::Path::new(&model).join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["vocab_size"].as_u64())
        .map_or(30000, |v| (v as usize).min(30000));
    let prompt: Vec<String> = (0..prompt_tokens)
        .map(|i| ((i * 7919 + 11) % vocab).to_string())
        .collect();
    let prompt = prompt.join(",");

    println!(
        "machine: {} ({} cores)",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "model: {model}; prompt {prompt_tokens} tokens, decode {decode} tokens, greedy; binary {}",
        binary().display()
    );
    println!(
        "cgroup memory limit (budget + 256 MiB, page cache dropped first): {}",
        cgroup
            .as_deref()
            .unwrap_or("none (the page cache may hold the model)")
    );
    println!();
    println!("| device | budget | slots/layer | decode tok/s | prefill tok/s | peak RSS | major faults | hit rate | prefetch precision | prefetch recall | stall share |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let row = |label: &str, budget: &str, slots: &str, v: &serde_json::Value| {
        let hits = f(v, &["experts", "hits"]);
        let misses = f(v, &["experts", "misses"]);
        let decode_ms = f(v, &["decode_ms"]) + f(v, &["prefill_ms"]);
        println!(
            "| {label} | {budget} | {slots} | {:.2} | {:.1} | {:.2} GiB | {} | {:.1}% | {:.2} | {:.2} | {:.1}% |",
            f(v, &["decode_tokens_per_s"]),
            f(v, &["prefill_tokens_per_s"]),
            f(v, &["peak_rss_bytes"]) / (1u64 << 30) as f64,
            v["major_page_faults"],
            100.0 * hits / (hits + misses),
            f(v, &["experts", "prefetch_precision"]),
            f(v, &["experts", "prefetch_recall"]),
            100.0 * f(v, &["experts", "stall_ms"]) / decode_ms,
        );
    };
    for b in budgets.split(',') {
        let bytes = moe_runtime::runconfig::ByteSize::parse(b)
            .expect("budget")
            .0;
        let cg = cgroup.as_deref().map(|c| (c, bytes + (256 << 20)));
        let mut extra = vec!["--ram-budget".to_string(), b.to_string()];
        extra.extend_from_slice(&passed);
        match run(&model, &extra, &prompt, decode, cg) {
            Ok(v) => row("cpu", b, "-", &v),
            Err(e) => println!("| cpu | {b} | - | error: {e} |"),
        }
    }
    // Device slots as a share of experts per layer, through a generated config file.
    let mut settings = moe_runtime::Settings {
        model: Some(model.clone()),
        max_context: Some(512),
        ..Default::default()
    };
    if let Some(q) = arg(&passed, "--quantization") {
        settings.quantization = q.parse().expect("--quantization");
    }
    let plan = match moe_runtime::plan_model(&settings) {
        Ok(p) => p.plan,
        Err(e) => {
            println!("plan failed: {e}");
            return;
        }
    };
    let dir = std::env::temp_dir().join(format!("moe-offload-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for s in shares.split(',').filter(|s| !s.is_empty()) {
        let share: f64 = s.parse().expect("share");
        let slots = ((plan.sizes.experts_per_layer as f64 * share).round() as usize).max(1);
        let vram = plan.sizes.resident_bytes
            + plan.kv_bytes
            + (slots * plan.sizes.moe_layers) as u64 * plan.sizes.expert_bytes
            + (64 << 20);
        let cfg = dir.join(format!("sim-{slots}.toml"));
        let abs_model = std::path::absolute(&model).unwrap_or_else(|_| PathBuf::from(&model));
        std::fs::write(
            &cfg,
            format!(
                "model = {:?}\ndevice = \"sim\"\nvram_budget = {vram}\nmax_context = 512\n[experts]\nslots_per_layer = {slots}\nprefetch = true\n[sim]\nlink_gb_per_s = {link}\n",
                abs_model.display().to_string()
            ),
        )
        .expect("config");
        let mut extra = vec!["--config".to_string(), cfg.display().to_string()];
        extra.extend_from_slice(&passed);
        match run(&model, &extra, &prompt, decode, None) {
            Ok(v) => row(
                &format!("sim {link} GB/s"),
                &format!("vram {:.2} GiB", vram as f64 / (1u64 << 30) as f64),
                &format!("{slots} ({:.0}%)", share * 100.0),
                &v,
            ),
            Err(e) => println!("| sim | - | {slots} | error: {e} |"),
        }
    }
    // Device budgets as a user would give them: the plan derives the slots.
    for b in vram_budgets.split(',').filter(|s| !s.is_empty()) {
        let abs_model = std::path::absolute(&model).unwrap_or_else(|_| PathBuf::from(&model));
        let cfg = dir.join(format!("sim-{b}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "model = {:?}\ndevice = \"sim\"\nvram_budget = {b:?}\nmax_context = 512\n[experts]\nprefetch = true\n[sim]\nlink_gb_per_s = {link}\n",
                abs_model.display().to_string()
            ),
        )
        .expect("config");
        let mut extra = vec!["--config".to_string(), cfg.display().to_string()];
        extra.extend_from_slice(&passed);
        let mut sim = settings.clone();
        sim.device = moe_runtime::runconfig::DeviceKind::Sim;
        sim.vram_budget = Some(
            moe_runtime::runconfig::ByteSize::parse(b)
                .expect("vram budget")
                .0,
        );
        let slots = moe_runtime::plan_model(&sim)
            .map(|p| p.plan.slots_per_layer.to_string())
            .unwrap_or_else(|e| format!("plan failed: {e}"));
        match run(&model, &extra, &prompt, decode, None) {
            Ok(v) => row(
                &format!("sim {link} GB/s"),
                &format!("vram {b}"),
                &slots,
                &v,
            ),
            Err(e) => println!("| sim | vram {b} | - | error: {e} |"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
