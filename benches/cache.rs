//! The quantized weight cache on a real-size model, against llama.cpp in the same run.
//!
//! For each type: builds the cache with `moe-serve cache build` (time, GB/s of source read,
//! peak RSS of the build), then measures time to first token from process start with the
//! cache warm (in the page cache) and cold (the cache and model files evicted with
//! `posix_fadvise(DONTNEED)`), and the same for llama.cpp's `llama-server` loading the GGUF of
//! the same type (spawn, wait for `/health`, one completion of one token). It also measures the
//! disk's sequential read rate on the evicted cache file, so the cold load time (process start
//! to ready, from `run --json`'s `load_ms`) can be read against the bound "resident set / read
//! rate"; the cold first token adds the experts the prompt routes to. With `--tiers HOT:COLD` it then compares decode speed of
//! uniform types and per-expert tiers (the hot set learned from a warm-up run).
//!
//! ```sh
//! cargo build --release
//! cargo bench --bench cache -- --model DIR --cache-dir DIR [--types q8_0,q4_k]
//!     [--activations f32,q8] [--llama-dir LLAMA_CPP/build/bin --gguf q8_0=FILE
//!     --gguf q4_k=FILE] [--runs 3] [--tiers q8_0:q4_k] [--gen 64] [--reuse]
//! ```
//! Without `--model` it prints its usage and exits successfully (so `cargo bench` passes).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{arg, binary, cpu_model, evict, llama_ttft, median, run_measured, warm_page_cache};

const USAGE: &str = "usage: cargo bench --bench cache -- --model DIR --cache-dir DIR \
[--types q8_0,q4_k] [--activations f32,q8] [--llama-dir DIR --gguf TYPE=FILE ...] [--runs 3] [--tiers HOT:COLD] [--gen 64] [--reuse]";

/// Sequential read rate of `path` from disk (evicted first), bytes/s.
fn disk_read_rate(path: &Path) -> f64 {
    evict(path);
    let t = Instant::now();
    let mut f = std::fs::File::open(path).expect("open");
    let mut buf = vec![0u8; 8 << 20];
    let mut n = 0u64;
    while let Ok(k) = f.read(&mut buf) {
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

const PROMPT: &str = "11,7930,15849,23768,31687,7606,15525,23444";

/// Process start to first token of `moe-serve run`, and its load time (process start to ready
/// is about that plus process start-up), seconds.
fn ours_ttft(model: &str, quant: &str, act: &str, cache_dir: &Path) -> Result<(f64, f64), String> {
    let t = Instant::now();
    let (out, _) = run_measured(Command::new(binary()).args([
        "run",
        "--model",
        model,
        "--quantization",
        quant,
        "--activations",
        act,
        "--cache-dir",
        &cache_dir.to_string_lossy(),
        "--prompt-ids",
        PROMPT,
        "--max-tokens",
        "1",
        "--temperature",
        "0",
        "--json",
    ]))?;
    let secs = t.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    Ok((secs, v["load_ms"].as_f64().unwrap_or(f64::NAN) / 1e3))
}

/// Decode tokens/s of `moe-serve run --config FILE`.
fn decode_tps(config: &Path, gen: usize) -> Result<f64, String> {
    let (out, _) = run_measured(Command::new(binary()).args([
        "run",
        "--config",
        &config.to_string_lossy(),
        "--prompt-ids",
        PROMPT,
        "--max-tokens",
        &gen.to_string(),
        "--ignore-eos",
        "--temperature",
        "0",
        "--json",
    ]))?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    Ok(v["decode_tokens_per_s"].as_f64().unwrap_or(0.0))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let (Some(model), Some(cache_dir)) = (arg(&args, "--model"), arg(&args, "--cache-dir")) else {
        eprintln!("{USAGE}");
        eprintln!("(measures the quantized weight cache; needs --model and --cache-dir)");
        return;
    };
    let cache_dir = PathBuf::from(cache_dir);
    let types: Vec<String> = arg(&args, "--types")
        .unwrap_or_else(|| "q8_0,q4_k".into())
        .split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    let activations: Vec<String> = arg(&args, "--activations")
        .unwrap_or_else(|| "f32".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let runs: usize = arg(&args, "--runs")
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let gen: usize = arg(&args, "--gen")
        .and_then(|r| r.parse().ok())
        .unwrap_or(64);
    // Keep an intact cache instead of building it again (no build columns then).
    let reuse = args.iter().any(|a| a == "--reuse");
    let llama_dir = arg(&args, "--llama-dir").map(PathBuf::from);
    let ggufs: Vec<(String, PathBuf)> = args
        .windows(2)
        .filter(|w| w[0] == "--gguf")
        .filter_map(|w| w[1].split_once('=').map(|(t, f)| (t.to_string(), f.into())))
        .collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    if !binary().exists() {
        eprintln!(
            "error: {} not found: run `cargo build --release` first",
            binary().display()
        );
        std::process::exit(1);
    }
    println!("machine: {} ({threads} threads)", cpu_model());
    println!("model: {model}; cache folder: {}", cache_dir.display());
    println!(
        "time to first token = process start to the first generated token (prompt of 8 ids), \
         median of {runs}; cold = cache (or GGUF) and model files evicted from the page cache"
    );
    println!();
    println!("| type | engine | build s | build GB/s of source | build peak RSS GB | file GB | TTFT warm s | TTFT cold s | cold load s | resident GB / disk GB/s = bound s |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for ty in &types {
        // Build from scratch, source in the page cache (the rate measures the conversion).
        let settings = moe_runtime::Settings {
            model: Some(model.clone()),
            quantization: ty.parse().expect("type"),
            cache_dir: Some(cache_dir.clone()),
            ..Default::default()
        };
        let plan = moe_runtime::open::cache_cmd::plan_for(&settings).expect("plan");
        let build = if reuse && plan.open().is_ok() {
            None
        } else {
            let _ = moe_runtime::open::cache_cmd::clear(&settings, false);
            warm_page_cache(Path::new(&model));
            let t = Instant::now();
            let build = run_measured(Command::new(binary()).args([
                "cache",
                "build",
                "--model",
                &model,
                "--quantization",
                ty,
                "--cache-dir",
                &cache_dir.to_string_lossy(),
            ]));
            match build {
                Ok((_, peak)) => Some((t.elapsed().as_secs_f64(), peak)),
                Err(e) => {
                    eprintln!("error: cache build {ty}: {e}");
                    continue;
                }
            }
        };
        let info = moe_runtime::cache::api::info(&plan.path).expect("info");
        let source_bytes = common::weights_size(Path::new(&model));
        let resident: u64 = info
            .tensors
            .iter()
            .filter(|t| !t.name.starts_with("moe.layers."))
            .map(|t| t.bytes)
            .sum();
        let disk = disk_read_rate(&plan.path);
        for (i, act) in activations.iter().enumerate() {
            let warm: Vec<(f64, f64)> = (0..runs)
                .map(|_| {
                    warm_page_cache(&plan.path);
                    ours_ttft(&model, ty, act, &cache_dir).expect("run")
                })
                .collect();
            let cold: Vec<(f64, f64)> = (0..runs)
                .map(|_| {
                    evict(&plan.path);
                    evict(Path::new(&model));
                    ours_ttft(&model, ty, act, &cache_dir).expect("run")
                })
                .collect();
            let build_cols = match build {
                Some((build_s, peak)) if i == 0 => format!(
                    "{build_s:.1} | {:.2} | {:.2}",
                    source_bytes as f64 / 1e9 / build_s,
                    peak as f64 / 1e9
                ),
                _ => "- | - | -".into(),
            };
            println!(
                "| {ty} | moe-serve, {act} activations | {build_cols} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} = {:.2} |",
                info.file_bytes as f64 / 1e9,
                median(warm.iter().map(|r| r.0).collect()),
                median(cold.iter().map(|r| r.0).collect()),
                median(cold.iter().map(|r| r.1).collect()),
                resident as f64 / 1e9,
                disk / 1e9,
                resident as f64 / disk
            );
        }
        let gguf = ggufs.iter().find(|(t, _)| t == ty).map(|(_, f)| f);
        if let (Some(dir), Some(gguf)) = (&llama_dir, gguf) {
            let warm: Vec<f64> = (0..runs)
                .map(|_| {
                    warm_page_cache(gguf);
                    llama_ttft(dir, gguf, threads, PROMPT).expect("llama-server")
                })
                .collect();
            let cold: Vec<f64> = (0..runs)
                .map(|_| {
                    evict(gguf);
                    llama_ttft(dir, gguf, threads, PROMPT).expect("llama-server")
                })
                .collect();
            let size = std::fs::metadata(gguf).map_or(0, |m| m.len());
            println!(
                "| {ty} | llama.cpp ({}) | - | - | - | {:.2} | {:.2} | {:.2} | - | |",
                gguf.file_name().unwrap_or_default().to_string_lossy(),
                size as f64 / 1e9,
                median(warm),
                median(cold)
            );
        }
    }

    let Some(tiers) = arg(&args, "--tiers") else {
        return;
    };
    let (hot, cold) = tiers.split_once(':').expect("--tiers HOT:COLD");
    println!();
    println!("decode tokens/s ({gen} tokens after the 8-id prompt, {threads} threads; tiers: hot set learned from a warm-up run of the same command):");
    println!();
    println!("| experts | decode tok/s |");
    println!("|---|---|");
    let tmp = std::env::temp_dir().join(format!("moe-cache-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp folder");
    let write_config = |name: &str, extra: &str| -> PathBuf {
        let p = tmp.join(format!("{name}.toml"));
        let text = format!(
            "model = {model:?}\ncache_dir = {:?}\nstate_dir = {:?}\n{extra}",
            cache_dir.to_string_lossy(),
            tmp.join(format!("state-{name}")).to_string_lossy()
        );
        std::fs::write(&p, text).expect("config");
        p
    };
    for (label, config) in [
        (format!("uniform {hot}"), write_config("hot", &format!("quantization = {hot:?}\n"))),
        (format!("uniform {cold}"), write_config("cold", &format!("quantization = {cold:?}\n"))),
        (
            format!("tiers {hot} hot (25 % of experts) / {cold} cold"),
            write_config(
                "tiers",
                &format!("quantization = {cold:?}\n[experts]\nhot_quantization = {hot:?}\ncold_quantization = {cold:?}\n"),
            ),
        ),
    ] {
        // A warm-up run records popularity (and builds the cache if needed), then one measured.
        if let Err(e) = decode_tps(&config, gen) {
            eprintln!("error: {label}: {e}");
            continue;
        }
        match decode_tps(&config, gen) {
            Ok(tps) => println!("| {label} | {tps:.2} |"),
            Err(e) => eprintln!("error: {label}: {e}"),
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
