//! Time to ready at scale: from process start to the first prefill of a model with many
//! tensors (Qwen3-Next's 48 layers x 512 experts, ~76k tensors), warm (weights in the page
//! cache) and cold (model files evicted first), with the memory it takes.
//!
//! Each run is one `moe-serve run --json --max-tokens 1` child process on a short prompt: the
//! wall time from spawn to exit covers opening every shard header, building the model and its
//! expert store, planning, and the prefill that yields the first token. The JSON's `load_ms`
//! and `prefill_ms` split it; peak RSS comes from the kernel (`wait4`). RSS divided by the
//! tensor count bounds the per-tensor bookkeeping (weights are mapped, not copied). With
//! `--llama-dir DIR --gguf FILE` it times llama.cpp's `llama-server` on the same weights
//! (converted by its `convert_hf_to_gguf.py`) the same way: spawn to the first token.
//!
//! ```sh
//! cargo build --release
//! cargo bench --bench ready -- --model DIR [--runs 5] [--prompt-tokens 16] [--cold-runs 3]
//!     [--llama-dir LLAMA_CPP/build/bin --gguf FILE] [--also PATH]
//!     [-- EXTRA RUN FLAGS, e.g. --quantization q8_0 --cache-dir DIR]
//! ```
//! `--also PATH` (a file or folder, e.g. the quantized cache's folder) is warmed and evicted
//! together with the model, so "cold" means cold for the files the run really reads.
//! Without `--model` it prints its usage and exits successfully (so `cargo bench` passes).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{arg, binary, cpu_model, evict, llama_ttft, median, run_measured, warm_page_cache};

const USAGE: &str = "usage: cargo bench --bench ready -- --model DIR [--runs 5] \
[--cold-runs 3] [--prompt-tokens 16] [--llama-dir DIR --gguf FILE] [--also PATH] [-- EXTRA RUN FLAGS]";

struct Sample {
    wall_s: f64,
    load_ms: f64,
    prefill_ms: f64,
    load_rss: u64,
    peak_rss: u64,
}

fn one_run(model: &Path, ids: &str, extra: &[String]) -> Sample {
    let mut cmd = Command::new(binary());
    cmd.args([
        "run",
        "--json",
        "--max-tokens",
        "1",
        "--prompt-ids",
        ids,
        "--model",
    ])
    .arg(model)
    .args(extra);
    let t = Instant::now();
    let (out, peak) = run_measured(&mut cmd).unwrap_or_else(|e| panic!("moe-serve run: {e}"));
    let wall_s = t.elapsed().as_secs_f64();
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("run --json output");
    Sample {
        wall_s,
        load_ms: j["load_ms"].as_f64().unwrap_or(0.0),
        prefill_ms: j["prefill_ms"].as_f64().unwrap_or(0.0),
        load_rss: j["load_rss_bytes"].as_u64().unwrap_or(0),
        peak_rss: peak,
    }
}

fn report(label: &str, s: &[Sample]) {
    let m = |f: &dyn Fn(&Sample) -> f64| median(s.iter().map(f).collect());
    println!(
        "{label:<5} runs {:>2} | start->first token {:>6.2} s (min {:.2}) | load {:>6.0} ms | \
         prefill {:>5.0} ms | load RSS {:>6.1} MiB | peak RSS {:>6.1} MiB",
        s.len(),
        m(&|x| x.wall_s),
        s.iter().map(|x| x.wall_s).fold(f64::INFINITY, f64::min),
        m(&|x| x.load_ms),
        m(&|x| x.prefill_ms),
        m(&|x| x.load_rss as f64) / (1 << 20) as f64,
        m(&|x| x.peak_rss as f64) / (1 << 20) as f64,
    );
}

/// Tensor count and shard count from the index (or the single file's header).
fn tensor_count(model: &Path) -> (usize, usize) {
    let index = model.join("model.safetensors.index.json");
    if let Ok(bytes) = std::fs::read(&index) {
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("index JSON");
        let map = v["weight_map"].as_object().expect("weight_map");
        let mut shards: Vec<&str> = map.values().filter_map(|s| s.as_str()).collect();
        shards.sort_unstable();
        shards.dedup();
        return (map.len(), shards.len());
    }
    (0, 1)
}

fn main() {
    let all: Vec<String> = std::env::args().collect();
    let (args, extra) = match all.iter().skip(1).position(|a| a == "--") {
        Some(i) => (all[..i + 1].to_vec(), all[i + 2..].to_vec()),
        None => (all.clone(), Vec::new()),
    };
    // `cargo bench` appends `--bench` to the arguments: it is not a run flag.
    let extra: Vec<String> = extra.into_iter().filter(|a| a != "--bench").collect();
    let Some(model) = arg(&args, "--model").map(PathBuf::from) else {
        println!("{USAGE}");
        return;
    };
    assert!(
        binary().exists(),
        "build the release binary first: cargo build --release"
    );
    let runs: usize = arg(&args, "--runs").map_or(5, |s| s.parse().expect("--runs"));
    let cold_runs: usize = arg(&args, "--cold-runs").map_or(3, |s| s.parse().expect("--cold-runs"));
    let n: usize =
        arg(&args, "--prompt-tokens").map_or(16, |s| s.parse().expect("--prompt-tokens"));
    let ids: Vec<String> = (0..n)
        .map(|i| ((i * 37 + 11) % 1000 + 3).to_string())
        .collect();
    let ids = ids.join(",");
    let (tensors, shards) = tensor_count(&model);
    println!(
        "machine: {} ({} cores)",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "model: {} ({tensors} tensors in {shards} shards), prompt {n} tokens, extra flags {:?}",
        model.display(),
        extra
    );
    let mut paths = vec![model.clone()];
    paths.extend(arg(&args, "--also").map(PathBuf::from));
    let warm_all = || paths.iter().for_each(|p| warm_page_cache(p));
    // One untimed run (writes a quantized cache if the flags ask for one, fills the page cache).
    warm_all();
    let _ = one_run(&model, &ids, &extra);
    let warm: Vec<Sample> = (0..runs)
        .map(|_| {
            warm_all();
            one_run(&model, &ids, &extra)
        })
        .collect();
    report("warm", &warm);
    let cold: Vec<Sample> = (0..cold_runs)
        .map(|_| {
            paths.iter().for_each(|p| evict(p));
            one_run(&model, &ids, &extra)
        })
        .collect();
    if !cold.is_empty() {
        report("cold", &cold);
    }
    if let (Some(dir), Some(gguf)) = (arg(&args, "--llama-dir"), arg(&args, "--gguf")) {
        let (dir, gguf) = (PathBuf::from(dir), PathBuf::from(gguf));
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let time = |cold: bool| {
            if cold {
                evict(&gguf);
            } else {
                warm_page_cache(&gguf);
            }
            llama_ttft(&dir, &gguf, threads, &ids).expect("llama-server")
        };
        let _ = time(false);
        let warm: Vec<f64> = (0..runs).map(|_| time(false)).collect();
        let cold: Vec<f64> = (0..cold_runs).map(|_| time(true)).collect();
        println!(
            "llama-server on {}: start->first token warm {:.2} s, cold {}",
            gguf.display(),
            median(warm),
            if cold.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2} s", median(cold))
            }
        );
    }
    if tensors > 0 {
        let rss = median(warm.iter().map(|s| s.load_rss as f64).collect());
        println!(
            "load RSS per tensor: {:.0} bytes (upper bound on per-tensor bookkeeping: it includes \
             the resident weights and the runtime itself)",
            rss / tensors as f64
        );
    }
}
