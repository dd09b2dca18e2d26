//! Both engines inside the same memory cap: a model larger than the memory it may use.
//!
//! For each cap (a fraction of the model's size on disk) it runs `moe-serve run` with
//! `ram_budget` = cap − 256 MiB and llama.cpp's `llama-bench` on the GGUF twin (its mmap, its
//! defaults), each as the only process of one cgroup memory limit (cgroup v1
//! `memory.limit_in_bytes`, or v2 `memory.max`) with the page cache dropped before the run, so
//! every weight byte that does not fit comes from the disk. It reports prefill and decode
//! tokens/s, peak RSS, and the bytes read from the disk (the run's `read_bytes`) in all and per
//! token (prompt and generated tokens together).
//!
//! ```sh
//! cargo build --release
//! cargo bench --bench capped -- --model DIR --gguf TWIN.gguf --llama-dir LLAMA_CPP/build/bin \
//!     --cgroup /sys/fs/cgroup/memory/moecap [--fractions 0.25,0.5,0.75] [--prompt 128] \
//!     [--gen 32] [--threads 2]
//! ```
//! Needs root (the cgroup and `drop_caches`); the cgroup folder is created when missing. The
//! model is compared as stored (bf16 weights and the bf16 twin); llama.cpp is built as
//! `benches/compare.rs` says.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    arg, binary, cpu_model, llama_bench_args, llama_bench_speeds, run_args, run_measured,
    weights_size,
};

/// Headroom between the cap and our `ram_budget`: the runtime, allocator and thread stacks.
const HEADROOM_BYTES: u64 = 256 << 20;

struct Capped {
    stdout: String,
    peak_rss: u64,
    read_bytes: u64,
}

/// A cgroup memory limit: v1 (`memory.limit_in_bytes`, memsw kept equal) or v2 (`memory.max`).
fn set_limit(cg: &Path, limit: u64) -> Result<(), String> {
    std::fs::create_dir_all(cg).map_err(|e| format!("{}: {e}", cg.display()))?;
    let v2 = cg.join("memory.max");
    if v2.exists() {
        let _ = std::fs::write(cg.join("memory.swap.max"), "0");
        return std::fs::write(&v2, limit.to_string())
            .map_err(|e| format!("{}: {e}", v2.display()));
    }
    // v1 wants memory <= memory+swap at every step: raise memsw first when growing, lower it
    // last when shrinking (each write may fail; the final state counts).
    let memsw = cg.join("memory.memsw.limit_in_bytes");
    let _ = std::fs::write(&memsw, limit.to_string());
    std::fs::write(cg.join("memory.limit_in_bytes"), limit.to_string())
        .map_err(|e| format!("{}: {e}", cg.display()))?;
    let _ = std::fs::write(&memsw, limit.to_string());
    Ok(())
}

/// Runs `program args` as the only process of `cg` under `limit` bytes, page cache dropped
/// first; its stdout, peak RSS and the bytes it read from the disk.
fn run_capped(cg: &Path, limit: u64, program: &Path, args: &[String]) -> Result<Capped, String> {
    set_limit(cg, limit)?;
    let io = tempfile_path("io");
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    // The shell joins the cgroup, drops the page cache, runs the program, then reports its own
    // I/O counters, which include those of the child it waited for.
    let script = format!(
        "echo $$ > '{cg}/cgroup.procs' && sync && echo 3 > /proc/sys/vm/drop_caches || exit 9; \
         '{prog}' {args}; rc=$?; cat /proc/$$/io > '{io}'; exit $rc",
        cg = cg.display(),
        prog = program.display(),
        args = quoted.join(" "),
        io = io.display()
    );
    let (stdout, peak_rss) = run_measured(Command::new("sh").arg("-c").arg(script))?;
    let text = std::fs::read_to_string(&io).unwrap_or_default();
    let _ = std::fs::remove_file(&io);
    let read_bytes = text
        .lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(Capped {
        stdout,
        peak_rss,
        read_bytes,
    })
}

fn tempfile_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("moe-capped-{}-{what}", std::process::id()))
}

struct Row {
    prefill: f64,
    decode: f64,
    peak_rss: u64,
    read_bytes: u64,
}

#[allow(clippy::too_many_arguments)]
fn ours(
    cg: &Path,
    limit: u64,
    model: &str,
    prompt: usize,
    gen: usize,
    threads: &str,
) -> Result<Row, String> {
    let budget = limit.saturating_sub(HEADROOM_BYTES).to_string();
    let args = run_args(
        model,
        prompt,
        30000,
        gen,
        threads,
        &["--ram-budget", &budget],
    );
    let r = run_capped(cg, limit, &binary(), &args)?;
    let v: serde_json::Value =
        serde_json::from_str(r.stdout.trim()).map_err(|e| format!("moe-serve output: {e}"))?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(Row {
        prefill: f("prefill_tokens_per_s"),
        decode: f("decode_tokens_per_s"),
        peak_rss: r.peak_rss,
        read_bytes: r.read_bytes,
    })
}

fn llama(
    cg: &Path,
    limit: u64,
    dir: &Path,
    gguf: &Path,
    prompt: usize,
    gen: usize,
    threads: &str,
) -> Result<Row, String> {
    let args = llama_bench_args(gguf, threads, prompt, gen, 1);
    let r = run_capped(cg, limit, &dir.join("llama-bench"), &args)?;
    let (pp, tg) = llama_bench_speeds(&r.stdout)?;
    Ok(Row {
        prefill: pp,
        decode: tg,
        peak_rss: r.peak_rss,
        read_bytes: r.read_bytes,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let (Some(model), Some(gguf), Some(llama_dir), Some(cg)) = (
        arg(&args, "--model"),
        arg(&args, "--gguf"),
        arg(&args, "--llama-dir"),
        arg(&args, "--cgroup"),
    ) else {
        eprintln!(
            "usage: cargo bench --bench capped -- --model HF_DIR --gguf TWIN.gguf --llama-dir \
             LLAMA_CPP/build/bin --cgroup /sys/fs/cgroup/memory/NAME [--fractions 0.25,0.5,0.75] \
             [--prompt 128] [--gen 32] [--threads 2]"
        );
        return;
    };
    if !binary().is_file() {
        eprintln!("error: build the release binary first: cargo build --release");
        std::process::exit(1);
    }
    let (cg, llama_dir, gguf) = (
        PathBuf::from(cg),
        PathBuf::from(llama_dir),
        PathBuf::from(gguf),
    );
    let fractions: Vec<f64> = arg(&args, "--fractions")
        .unwrap_or_else(|| "0.25,0.5,0.75".into())
        .split(',')
        .filter_map(|f| f.trim().parse().ok())
        .collect();
    let num = |name: &str, default: usize| {
        arg(&args, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (prompt, gen) = (num("--prompt", 128), num("--gen", 32));
    let threads = arg(&args, "--threads").unwrap_or_else(|| "2".into());
    let size = weights_size(Path::new(&model));
    println!("machine: {} ({threads} threads used)", cpu_model());
    println!(
        "model: {model} ({:.2} GB of weights) / {} ({:.2} GB); prompt {prompt} tokens, decode {gen} tokens",
        size as f64 / 1e9,
        gguf.display(),
        weights_size(&gguf) as f64 / 1e9
    );
    println!(
        "each run alone in cgroup {} at the cap, page cache dropped first; ours with ram_budget = cap - 256 MiB",
        cg.display()
    );
    println!();
    println!("| cap | engine | prefill tok/s | decode tok/s | peak RSS | read from disk | read per token |");
    println!("|---|---|---|---|---|---|---|");
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut ratios = Vec::new();
    for frac in fractions {
        let limit = (size as f64 * frac) as u64;
        let cap = format!("{:.0}% ({:.2} GiB)", frac * 100.0, gib(limit));
        let a = ours(&cg, limit, &model, prompt, gen, &threads);
        let b = llama(&cg, limit, &llama_dir, &gguf, prompt, gen, &threads);
        for (name, r) in [("moe-offload bf16 (defaults)", &a), ("llama.cpp BF16", &b)] {
            match r {
                Ok(r) => println!(
                    "| {cap} | {name} | {:.1} | {:.2} | {:.2} GiB | {:.2} GB | {:.1} MB |",
                    r.prefill,
                    r.decode,
                    gib(r.peak_rss),
                    r.read_bytes as f64 / 1e9,
                    r.read_bytes as f64 / 1e6 / (prompt + gen) as f64
                ),
                Err(e) => println!("| {cap} | {name} | error: {} |", e.replace('|', "/")),
            }
        }
        if let (Ok(a), Ok(b)) = (&a, &b) {
            ratios.push(format!(
                "{cap}: decode {:.2}x, prefill {:.2}x",
                a.decode / b.decode,
                a.prefill / b.prefill
            ));
        }
    }
    println!();
    println!("Ours against llama.cpp under the same cap:");
    for r in ratios {
        println!("- {r}");
    }
}
