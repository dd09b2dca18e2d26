//! Side-by-side speed against llama.cpp on identical weights, in one run.
//!
//! For each weight type (bf16, q8_0, q4) it runs `moe-serve run` on the Hugging Face folder
//! (quantized at load) and llama.cpp's `llama-bench` on the GGUF twin written by
//! `moe-serve synth --gguf` (quantized by `llama-quantize` to Q8_0 / Q4_K_M, cached beside it),
//! and prints one table: prefill and decode tokens/s, weight bytes read per decoded token, the
//! GB/s that implies and its share of this machine's read bandwidth (measured here: the best of
//! several 2-thread streaming reads), time to first token and peak RSS.
//!
//! ```sh
//! cargo build --release
//! cargo bench --bench compare -- --model DIR --gguf FILE --llama-dir LLAMA_CPP/build/bin \
//!     [--types bf16,q8_0,q4] [--prompt 512] [--gen 128] [--threads 2] [--rounds 2]
//! ```
//! Each type gets our defaults (`activations = "auto"`), our exact path (`"f32"`) and
//! llama.cpp, alternated over `--rounds` rounds after one unmeasured run of ours (which builds
//! the quantized weight cache); the best round of each is reported, then the ratios.
//! A model whose experts are MXFP4 as released (gpt-oss: `quantization_config.quant_method =
//! "mxfp4"`) is compared as stored by default (`--types mxfp4`: ours at quantization `none`
//! against the twin's MXFP4 experts); `q8_0` / `q4` requantize the twin (`llama-quantize
//! --allow-requantize`). Prompt ids stay below the model's `vocab_size` (its last three ids,
//! the synthetic tokenizer's special tokens, excluded).
//! llama.cpp: `pip download --no-deps --no-binary llama-cpp-python llama-cpp-python -d DIR`,
//! unpack, then in `vendor/llama.cpp`: `cmake -B build -DCMAKE_BUILD_TYPE=Release
//! -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF` and
//! `cmake --build build -j2 --target llama-bench llama-quantize`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{
    arg, binary, cpu_model, llama_bench_args, llama_bench_speeds, run_args, run_measured,
    warm_page_cache,
};

/// Best of several 2-thread streaming reads over a buffer far larger than the caches, bytes/s.
fn read_bandwidth() -> f64 {
    const BYTES: usize = 1 << 30;
    let buf: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let (a, b) = buf.split_at(buf.len() / 2);
        // Eight independent lanes per thread: the adds vectorise, so the read, not the
        // arithmetic, is the limit.
        let read = |part: &[u64]| {
            let mut lanes = [0u64; 8];
            for c in part.chunks_exact(8) {
                for (l, v) in lanes.iter_mut().zip(c) {
                    *l = l.wrapping_add(*v);
                }
            }
            lanes.iter().fold(0u64, |x, &y| x.wrapping_add(y))
        };
        let sum = std::thread::scope(|s| {
            let h = s.spawn(|| read(a));
            let s2 = read(b);
            h.join().expect("reader").wrapping_add(s2)
        });
        std::hint::black_box(sum);
        best = best.max(BYTES as f64 / t.elapsed().as_secs_f64());
    }
    best
}

#[derive(Clone)]
struct Row {
    engine: String,
    prefill: f64,
    decode: f64,
    ttft_s: f64,
    peak_rss: u64,
}

/// The round with the fastest decode (prefill taken from its own best round).
fn best_of(rows: &[Row]) -> Option<Row> {
    let mut best = rows
        .iter()
        .max_by(|a, b| a.decode.total_cmp(&b.decode))?
        .clone();
    best.prefill = rows.iter().map(|r| r.prefill).fold(f64::NAN, f64::max);
    Some(best)
}

/// What the benchmark needs from the model's `config.json`.
struct ModelInfo {
    /// Prompt ids are taken modulo this: 30000, or less for a smaller vocabulary.
    id_modulus: usize,
    /// The experts are MXFP4 as stored (`quantization_config.quant_method = "mxfp4"`).
    mxfp4: bool,
}

/// Largest prompt-id modulus: the ids every earlier run used (vocabularies of 32000).
const ID_MODULUS: usize = 30000;

fn model_info(model: &str) -> ModelInfo {
    let cfg: serde_json::Value = std::fs::read(Path::new(model).join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let vocab = cfg["vocab_size"].as_u64().unwrap_or(u64::MAX) as usize;
    ModelInfo {
        // The synthetic tokenizer's three special tokens are the last ids.
        id_modulus: ID_MODULUS.min(vocab.saturating_sub(3)).max(1),
        mxfp4: cfg["quantization_config"]["quant_method"] == "mxfp4",
    }
}

#[allow(clippy::too_many_arguments)]
fn ours(
    model: &str,
    id_modulus: usize,
    quant: &str,
    activations: &str,
    prompt: usize,
    gen: usize,
    threads: &str,
) -> Result<Row, String> {
    warm_page_cache(Path::new(model));
    let args = run_args(
        model,
        prompt,
        id_modulus,
        gen,
        threads,
        &["--quantization", quant, "--activations", activations],
    );
    let (out, rss) = run_measured(Command::new(binary()).args(&args))?;
    let v: serde_json::Value = serde_json::from_str(out.trim()).map_err(|e| e.to_string())?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(Row {
        engine: match activations {
            "auto" => format!("moe-offload {quant} (defaults)"),
            "f32" => format!("moe-offload {quant}, f32 activations (exact)"),
            a => format!("moe-offload {quant}, {a} activations"),
        },
        prefill: f("prefill_tokens_per_s"),
        decode: f("decode_tokens_per_s"),
        ttft_s: (f("load_ms") + f("prefill_ms")) / 1e3,
        peak_rss: rss,
    })
}

fn llama(
    dir: &Path,
    gguf: &Path,
    label: &str,
    prompt: usize,
    gen: usize,
    threads: &str,
) -> Result<Row, String> {
    warm_page_cache(gguf);
    let args = llama_bench_args(gguf, threads, prompt, gen, 2);
    let (out, rss) = run_measured(Command::new(dir.join("llama-bench")).args(&args))?;
    let (pp, tg) = llama_bench_speeds(&out)?;
    Ok(Row {
        engine: format!("llama.cpp {label}"),
        prefill: pp,
        decode: tg,
        ttft_s: prompt as f64 / pp,
        peak_rss: rss,
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let (Some(model), Some(gguf), Some(llama_dir)) = (
        arg(&args, "--model"),
        arg(&args, "--gguf"),
        arg(&args, "--llama-dir"),
    ) else {
        eprintln!("usage: cargo bench --bench compare -- --model HF_DIR --gguf TWIN.gguf --llama-dir LLAMA_CPP/build/bin [--types bf16,q8_0,q4 (mxfp4 for MXFP4 experts)] [--prompt 512] [--gen 128] [--threads 2] [--rounds 2]");
        eprintln!("(build llama.cpp as this file's module doc says; write the twin with `moe-serve synth --gguf`)");
        return;
    };
    let llama_dir = PathBuf::from(llama_dir);
    if !llama_dir.join("llama-bench").is_file() || !llama_dir.join("llama-quantize").is_file() {
        eprintln!(
            "error: no llama-bench / llama-quantize in {}; build them as this benchmark's module doc says",
            llama_dir.display()
        );
        std::process::exit(1);
    }
    if !binary().is_file() {
        eprintln!("error: build the release binary first: cargo build --release");
        std::process::exit(1);
    }
    let info = model_info(&model);
    let native = if info.mxfp4 { "MXFP4" } else { "BF16" };
    let types = arg(&args, "--types").unwrap_or_else(|| {
        if info.mxfp4 {
            "mxfp4".into()
        } else {
            "bf16,q8_0,q4".into()
        }
    });
    let prompt: usize = arg(&args, "--prompt")
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let gen: usize = arg(&args, "--gen")
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let threads = arg(&args, "--threads").unwrap_or_else(|| "2".into());
    let gguf = PathBuf::from(gguf);

    let bw = read_bandwidth();
    let version = Command::new(llama_dir.join("llama-bench"))
        .arg("--version")
        .output()
        .map(|o| {
            // llama.cpp prints its version on stderr.
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text).trim().replace('\n', " ")
        })
        .unwrap_or_default();
    println!(
        "machine: {} ({} threads used); 2-thread streaming read: {:.1} GB/s (best of 5)",
        cpu_model(),
        threads,
        bw / 1e9
    );
    println!(
        "model: {model} / {}; prompt {prompt} tokens, decode {gen} tokens",
        gguf.display()
    );
    println!("peer: llama.cpp llama-bench {version} (-t {threads} -p {prompt} -n {gen} -r 2)");
    println!();
    println!(
        "(read bandwidth can drift with the host's other load: it is probed again before each"
    );
    println!("type's rows, and shares are of the best probe so far, the conservative choice)");
    println!();
    let rounds: usize = arg(&args, "--rounds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1);
    let mut ratios: Vec<String> = Vec::new();
    println!("| engine | prefill tok/s | decode tok/s | bytes/token | GB/s | read bw probe | share of read bw | TTFT s | peak RSS |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for t in types.split(',') {
        let (quant, peer_type) = match t {
            // As stored: bf16 weights, or MXFP4 experts as released.
            "bf16" | "mxfp4" => ("none", None),
            "q8_0" => ("q8_0", Some("Q8_0")),
            "q4" => ("q4_k", Some("Q4_K_M")),
            other => {
                println!("| {other}: unknown type (bf16, mxfp4, q8_0, q4) |");
                continue;
            }
        };
        let settings = moe_runtime::Settings {
            model: Some(model.clone()),
            quantization: quant.parse().expect("known quantization"),
            max_context: Some(prompt + gen + 1),
            ..Default::default()
        };
        let bytes = moe_runtime::plan_model(&settings)
            .map(|r| {
                let s = r.plan.sizes;
                s.resident_read_per_token_bytes + (s.top_k * s.moe_layers) as u64 * s.expert_bytes
            })
            .unwrap_or(0);
        let bw = read_bandwidth().max(bw);
        let print = |r: &Row, bytes: u64, rounds: &str| {
            let gbs = bytes as f64 * r.decode / 1e9;
            println!(
                "| {} | {:.1} | {:.2}{rounds} | {:.2} GB | {:.1} | {:.1} GB/s | {:.0}% | {:.2} | {:.2} GiB |",
                r.engine,
                r.prefill,
                r.decode,
                bytes as f64 / 1e9,
                gbs,
                bw / 1e9,
                100.0 * gbs * 1e9 / bw,
                r.ttft_s,
                r.peak_rss as f64 / (1u64 << 30) as f64
            )
        };
        let m = info.id_modulus;
        let peer_file = match peer_type {
            None => Ok(gguf.clone()),
            Some(pt) => {
                let f = gguf.with_extension(format!("{pt}.gguf"));
                if f.is_file() {
                    Ok(f)
                } else {
                    let mut cmd = Command::new(llama_dir.join("llama-quantize"));
                    if info.mxfp4 {
                        // The twin's experts are MXFP4 already: llama.cpp asks for this flag.
                        cmd.arg("--allow-requantize");
                    }
                    run_measured(cmd.args([
                        gguf.to_str().unwrap_or_default(),
                        f.to_str().unwrap_or_default(),
                        pt,
                    ]))
                    .map(|_| f)
                }
            }
        };
        // One unmeasured run first: it builds (or maps) the quantized weight cache and leaves it
        // in the page cache, as the measured runs of the other engine find their file.
        let _ = ours(&model, m, quant, "auto", prompt, 1, &threads);
        // Rounds alternate the engines so a drift in the host's load hits them alike; each
        // row reports its best round (the decode column lists every round).
        let mut rows: Vec<Vec<Row>> = vec![Vec::new(); 3];
        for _ in 0..rounds {
            // The defaults (the fast arithmetic for each type), then the exact f32 path.
            for (i, act) in ["auto", "f32"].into_iter().enumerate() {
                match ours(&model, m, quant, act, prompt, gen, &threads) {
                    Ok(r) => rows[i].push(r),
                    Err(e) => println!("| {t} {act}: error: {e} |"),
                }
            }
            match &peer_file {
                Ok(f) => match llama(
                    &llama_dir,
                    f,
                    peer_type.unwrap_or(native),
                    prompt,
                    gen,
                    &threads,
                ) {
                    Ok(r) => rows[2].push(r),
                    Err(e) => println!("| llama.cpp {t}: error: {e} |"),
                },
                Err(e) => println!("| llama-quantize {t}: error: {e} |"),
            }
        }
        let best: Vec<Option<Row>> = rows.iter().map(|r| best_of(r)).collect();
        for (r, all) in best.iter().zip(&rows) {
            if let Some(r) = r {
                let each: Vec<String> = all.iter().map(|x| format!("{:.1}", x.decode)).collect();
                print(r, bytes, &format!(" [{}]", each.join(" ")));
            }
        }
        if let (Some(d), Some(x), Some(p)) = (&best[0], &best[1], &best[2]) {
            ratios.push(format!(
                "{t}: defaults decode {:.2}x, prefill {:.2}x; exact (f32) decode {:.2}x, prefill {:.2}x",
                d.decode / p.decode,
                d.prefill / p.prefill,
                x.decode / p.decode,
                x.prefill / p.prefill
            ));
        }
    }
    println!();
    println!("Against llama.cpp in the same run (best round of {rounds} each):");
    for r in &ratios {
        println!("- {r}");
    }
}
