//! Serving under concurrency: time to first token and tokens/s at 1, 4 and 16 concurrent
//! streaming clients, `moe-serve serve` against llama.cpp's `llama-server` on the same weights,
//! driven by the same client code in one run.
//!
//! Each client sends `--requests` streaming `/v1/completions` requests one after another, each a
//! distinct prompt of `--prompt-tokens` token ids with `max_tokens` new tokens and `ignore_eos`
//! (so every request generates exactly that many). Time to first token is from sending the
//! request to the first streamed token; tokens/s is all generated tokens over the wall time of
//! the level. Both servers get slots for the largest client count (`--max-batch` / `-np`).
//!
//! ```text
//! cargo build --release
//! cargo bench --bench serve -- --model /work/models/bench-m --quantization q8_0 \
//!     --cache-dir /work/cachebench --gguf /work/models/bench-m.Q8_0.gguf \
//!     --llama-dir LLAMA/build/bin [--clients 1,4,16] [--requests 2] [--prompt-tokens 64] \
//!     [--max-tokens 32] [--threads N] [--activations q8] [--json-out FILE]
//! ```

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{arg, binary, cpu_model, warm_page_cache};
use serde_json::{json, Value};

const USAGE: &str = "cargo bench --bench serve -- --model DIR --quantization q8_0 --cache-dir DIR \
--gguf FILE --llama-dir DIR [--clients 1,4,16] [--requests 2] [--prompt-tokens 64] \
[--max-tokens 32] [--threads N] [--activations q8] [--json-out FILE]";

struct Workload {
    clients: Vec<usize>,
    requests: usize,
    prompt_tokens: usize,
    max_tokens: usize,
}

/// One level's result.
#[derive(Debug, Clone)]
struct Level {
    clients: usize,
    ttft: Vec<f64>,
    /// Per request: seconds per token after the first.
    tpot: Vec<f64>,
    tokens: usize,
    wall: f64,
    errors: usize,
}

impl Level {
    fn ttft_p50(&self) -> f64 {
        percentile(&self.ttft, 0.5)
    }
    fn ttft_p90(&self) -> f64 {
        percentile(&self.ttft, 0.9)
    }
    fn tpot_p50(&self) -> f64 {
        percentile(&self.tpot, 0.5)
    }
    fn tps(&self) -> f64 {
        self.tokens as f64 / self.wall
    }
}

fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// A prompt of `n` token ids, distinct per (client, request) from the first token on, so no
/// server can reuse another request's KV cache.
fn prompt(client: usize, request: usize, n: usize, vocab: usize) -> Vec<u32> {
    let mut x = (client as u64 * 7919 + request as u64 * 104_729 + 1) * 2_654_435_761;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (vocab as u64 - 10)) as u32 + 5
        })
        .collect()
}

/// One streaming request: (seconds to the first token, seconds to the last) or an error.
fn stream_one(
    http: &reqwest::blocking::Client,
    url: &str,
    body: &Value,
) -> Result<(f64, f64), String> {
    let t0 = Instant::now();
    let r = http
        .post(url)
        .json(body)
        .send()
        .map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("status {}", r.status()));
    }
    let mut first = None;
    for line in BufReader::new(r).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
        if v["choices"][0]["text"].is_string() || v["content"].is_string() {
            first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        }
    }
    Ok((
        first.ok_or("no token streamed")?,
        t0.elapsed().as_secs_f64(),
    ))
}

fn run_level(base: &str, model: &str, w: &Workload, clients: usize, vocab: usize) -> Level {
    let url = format!("{base}/v1/completions");
    let t0 = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let url = url.clone();
            let model = model.to_string();
            let (requests, pt, mt) = (w.requests, w.prompt_tokens, w.max_tokens);
            std::thread::spawn(move || {
                // A new connection per request: no client may reuse one a server has closed.
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(1800))
                    .pool_max_idle_per_host(0)
                    .build()
                    .expect("http client");
                (0..requests)
                    .map(|r| {
                        let body = json!({
                            "model": model,
                            "prompt": prompt(c, r, pt, vocab),
                            "max_tokens": mt,
                            "temperature": 0,
                            "ignore_eos": true,
                            "stream": true,
                        });
                        stream_one(&http, &url, &body)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut level = Level {
        clients,
        ttft: Vec::new(),
        tpot: Vec::new(),
        tokens: 0,
        wall: 0.0,
        errors: 0,
    };
    for h in handles {
        for r in h.join().expect("client thread") {
            match r {
                Ok((ttft, last)) => {
                    level.ttft.push(ttft);
                    level
                        .tpot
                        .push((last - ttft) / (w.max_tokens.max(2) - 1) as f64);
                    // ignore_eos: every request generates exactly max_tokens.
                    level.tokens += w.max_tokens;
                }
                Err(e) => {
                    eprintln!("  request failed: {e}");
                    level.errors += 1;
                }
            }
        }
    }
    level.wall = t0.elapsed().as_secs_f64();
    level
}

fn wait_health(base: &str, child: &mut Child, what: &str) -> Result<(), String> {
    let http = reqwest::blocking::Client::new();
    let t0 = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/health")).send() {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("{what} exited: {st}"));
        }
        if t0.elapsed() > Duration::from_secs(900) {
            return Err(format!("{what} not ready after 900 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn bench_server(
    name: &str,
    mut child: Child,
    base: &str,
    model: &str,
    w: &Workload,
    vocab: usize,
) -> Vec<Level> {
    let result = wait_health(base, &mut child, name).map(|()| {
        // Warm-up: one short request (first-touch of weights, thread pools).
        let http = reqwest::blocking::Client::new();
        let body = json!({"model": model, "prompt": prompt(999, 0, 8, vocab), "max_tokens": 4,
                          "temperature": 0, "ignore_eos": true, "stream": true});
        let _ = stream_one(&http, &format!("{base}/v1/completions"), &body);
        w.clients
            .iter()
            .map(|&c| {
                let l = run_level(base, model, w, c, vocab);
                eprintln!(
                    "  {name:<12} clients {:>2}: TTFT p50 {:.2} s p90 {:.2} s, {:.0} ms/token per stream, {:.2} tok/s ({} errors)",
                    c,
                    l.ttft_p50(),
                    l.ttft_p90(),
                    l.tpot_p50() * 1e3,
                    l.tps(),
                    l.errors
                );
                l
            })
            .collect()
    });
    let _ = child.kill();
    let _ = child.wait();
    result.unwrap_or_else(|e| panic!("{e}"))
}

fn vocab_of(model: &Path) -> usize {
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).expect("config.json"))
            .expect("config.json parses");
    cfg["vocab_size"].as_u64().expect("vocab_size") as usize
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
        eprintln!("{USAGE}");
        eprintln!("(measures serving under concurrency; needs --model, --gguf and --llama-dir)");
        return;
    };
    let model = PathBuf::from(model);
    let w = Workload {
        clients: arg(&args, "--clients")
            .unwrap_or_else(|| "1,4,16".into())
            .split(',')
            .map(|c| c.parse().expect("--clients: numbers"))
            .collect(),
        requests: arg(&args, "--requests").map_or(2, |v| v.parse().expect("--requests")),
        prompt_tokens: arg(&args, "--prompt-tokens").map_or(64, |v| v.parse().expect("number")),
        max_tokens: arg(&args, "--max-tokens").map_or(32, |v| v.parse().expect("number")),
    };
    let threads = arg(&args, "--threads").unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .to_string()
    });
    let quant = arg(&args, "--quantization").unwrap_or_else(|| "q8_0".into());
    let slots = *w.clients.iter().max().expect("at least one client count");
    let ctx = w.prompt_tokens + w.max_tokens + 16;
    let vocab = vocab_of(&model);
    println!(
        "machine: {} ({} threads); model {}; {} clients x {} requests, {} prompt tokens, {} new",
        cpu_model(),
        threads,
        model.display(),
        w.clients
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        w.requests,
        w.prompt_tokens,
        w.max_tokens
    );

    // moe-serve: with a cache folder it maps the cache file, so that is what is warmed (warming
    // the bf16 source too would push the cache file out of the page cache on a small machine).
    match arg(&args, "--cache-dir") {
        Some(dir) => {
            let tag = format!(".x-{quant}.");
            for e in std::fs::read_dir(&dir).expect("--cache-dir").flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.contains(&tag) && name.ends_with(".gguf") {
                    warm_page_cache(&e.path());
                }
            }
        }
        None => warm_page_cache(&model),
    }
    let port = 18941;
    let mut cmd = Command::new(binary());
    cmd.args(["serve", "--model"])
        .arg(&model)
        .args(["--port", &port.to_string()])
        .args(["--max-batch", &slots.to_string()])
        .args(["--max-queue", "256"])
        .args(["--max-context", &ctx.to_string()])
        .args(["--threads", &threads])
        .args(["--quantization", &quant])
        .args(["--model-name", "bench"]);
    if let Some(dir) = arg(&args, "--cache-dir") {
        cmd.args(["--cache-dir", &dir]);
    }
    if let Some(a) = arg(&args, "--activations") {
        cmd.args(["--activations", &a]);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moe-serve (cargo build --release first)");
    let ours = bench_server(
        "moe-serve",
        child,
        &format!("http://127.0.0.1:{port}"),
        "bench",
        &w,
        vocab,
    );

    // llama-server on the same weights.
    let gguf = PathBuf::from(gguf);
    warm_page_cache(&gguf);
    let port = 18942;
    let child = Command::new(Path::new(&llama_dir).join("llama-server"))
        .arg("-m")
        .arg(&gguf)
        .args(["--port", &port.to_string()])
        .args(["-np", &slots.to_string()])
        .args(["-c", &(ctx * slots).to_string()])
        .args(["-t", &threads])
        .args(["--no-webui", "--cont-batching"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start llama-server");
    let peer = bench_server(
        "llama-server",
        child,
        &format!("http://127.0.0.1:{port}"),
        "bench",
        &w,
        vocab,
    );

    println!(
        "| clients | moe-serve TTFT p50 / p90 (s) | llama-server TTFT p50 / p90 (s) | moe-serve ms/token per stream | llama-server ms/token per stream | moe-serve tok/s | llama-server tok/s | tok/s ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (a, b) in ours.iter().zip(&peer) {
        println!(
            "| {} | {:.2} / {:.2} | {:.2} / {:.2} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
            a.clients,
            a.ttft_p50(),
            a.ttft_p90(),
            b.ttft_p50(),
            b.ttft_p90(),
            a.tpot_p50() * 1e3,
            b.tpot_p50() * 1e3,
            a.tps(),
            b.tps(),
            a.tps() / b.tps()
        );
        rows.push(json!({
            "clients": a.clients,
            "moe_serve": {"ttft_p50": a.ttft_p50(), "ttft_p90": a.ttft_p90(), "tpot_p50": a.tpot_p50(), "tokens_per_s": a.tps(), "errors": a.errors},
            "llama_server": {"ttft_p50": b.ttft_p50(), "ttft_p90": b.ttft_p90(), "tpot_p50": b.tpot_p50(), "tokens_per_s": b.tps(), "errors": b.errors},
        }));
    }
    if let Some(path) = arg(&args, "--json-out") {
        std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap()).expect("write json");
    }
}
