//! Helpers shared by the benchmark binaries.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The CPU's model name (Linux), for the machine line every benchmark prints.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The value after `name` on the command line.
#[allow(dead_code)]
pub fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Runs a command, returning its stdout, whether it succeeded, and its peak RSS in bytes.
pub fn run_measured(cmd: &mut Command) -> Result<(String, u64), String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .map_err(|e| e.to_string())?;
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut err)
        .map_err(|e| e.to_string())?;
    let mut status = 0i32;
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: wait4 on our own child's pid writes its exit status and resource usage into the
    // two valid pointers; the child has not been waited for yet (std's Child is never waited).
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, ru.as_mut_ptr()) };
    if r < 0 {
        return Err("wait4 failed".into());
    }
    // SAFETY: filled by the successful wait4 above (zeroed before in any case).
    let maxrss_kb = unsafe { ru.assume_init() }.ru_maxrss as u64;
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(err.lines().last().unwrap_or("failed").to_string());
    }
    Ok((out, maxrss_kb * 1024))
}

/// Reads a model file, or every file of a model folder, once, so each engine starts with its
/// weights in the page cache (the HF folder and the GGUF files together exceed RAM on small
/// machines, so each run would otherwise read part of its weights from disk while timed).
pub fn warm_page_cache(path: &Path) {
    let mut buf = vec![0u8; 8 << 20];
    for f in files_of(path) {
        if let Ok(mut f) = std::fs::File::open(f) {
            while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
        }
    }
}

/// The `moe-serve` under test: `target/release/moe-serve`, or `$MOE_SERVE_BIN` when set (a
/// smoke run with a debug build; its timings are not the release build's).
pub fn binary() -> PathBuf {
    match std::env::var_os("MOE_SERVE_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/moe-serve"),
    }
}

/// `path` itself, or every entry of it when it is a folder.
fn files_of(path: &Path) -> Vec<PathBuf> {
    if path.is_dir() {
        std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    } else {
        vec![path.to_path_buf()]
    }
}

/// Drops `path` (a file, or every file of a folder) from the page cache.
pub fn evict(path: &Path) {
    for f in files_of(path) {
        if let Ok(file) = std::fs::File::open(&f) {
            use std::os::unix::io::AsRawFd;
            // SAFETY: advice on a descriptor we own; no memory is touched.
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

/// The middle value (upper middle for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Process start to first token of `llama-server` on `gguf` (spawn, wait for `/health`, one
/// completion of one token for `prompt`, comma-separated ids), seconds.
pub fn llama_ttft(
    llama_dir: &Path,
    gguf: &Path,
    threads: usize,
    prompt: &str,
) -> Result<f64, String> {
    const PORT: u16 = 18931;
    let t = Instant::now();
    let mut child = Command::new(llama_dir.join("llama-server"))
        .args([
            "-m",
            &gguf.to_string_lossy(),
            "--port",
            &PORT.to_string(),
            "-c",
            "512",
            "-t",
            &threads.to_string(),
            "--no-webui",
            "--no-warmup",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let request = |method: &str, path: &str, body: &str| -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", PORT)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    let result = loop {
        if let Some(r) = request("GET", "/health", "") {
            if r.starts_with("HTTP/1.1 200") {
                let body =
                    format!("{{\"prompt\": [{prompt}], \"n_predict\": 1, \"temperature\": 0}}");
                break match request("POST", "/completion", &body) {
                    Some(r) if r.starts_with("HTTP/1.1 200") => Ok(t.elapsed().as_secs_f64()),
                    other => Err(format!("completion failed: {other:?}")),
                };
            }
        }
        if t.elapsed() > Duration::from_secs(300) {
            break Err("llama-server not ready after 300 s".into());
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!("llama-server exited: {status}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Prefill and decode tokens/s from `llama-bench -o json` output (its `pp` and `tg` tests).
pub fn llama_bench_speeds(json: &str) -> Result<(f64, f64), String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("llama-bench output: {e}"))?;
    let (mut pp, mut tg) = (f64::NAN, f64::NAN);
    for r in v.as_array().into_iter().flatten() {
        let ts = r["avg_ts"].as_f64().unwrap_or(f64::NAN);
        if r["n_prompt"].as_u64().unwrap_or(0) > 0 {
            pp = ts;
        } else {
            tg = ts;
        }
    }
    Ok((pp, tg))
}

/// Bytes of a model's weights: the `.safetensors` files of a folder, or one file's size.
pub fn weights_size(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    } else {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }
}

/// The arguments of one measured `moe-serve run`: `prompt` deterministic prompt ids below
/// `id_modulus`, `gen` greedy tokens past EOS, JSON out, a context just long enough, then
/// `extra` (quantization, activations, budgets).
pub fn run_args(
    model: &str,
    prompt: usize,
    id_modulus: usize,
    gen: usize,
    threads: &str,
    extra: &[&str],
) -> Vec<String> {
    let ids: Vec<String> = (0..prompt)
        .map(|i| ((i * 7919 + 11) % id_modulus.max(1)).to_string())
        .collect();
    let mut args: Vec<String> = [
        "run",
        "--model",
        model,
        "--prompt-ids",
        &ids.join(","),
        "--max-tokens",
        &gen.to_string(),
        "--ignore-eos",
        "--temperature",
        "0",
        "--json",
        "--threads",
        threads,
        "--max-context",
        &(prompt + gen + 1).to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The arguments of one `llama-bench` run on `gguf`: `prompt` tokens of prefill and `gen` of
/// decode, `reps` repetitions each, JSON out.
pub fn llama_bench_args(
    gguf: &Path,
    threads: &str,
    prompt: usize,
    gen: usize,
    reps: usize,
) -> Vec<String> {
    [
        "-m",
        gguf.to_str().unwrap_or_default(),
        "-t",
        threads,
        "-p",
        &prompt.to_string(),
        "-n",
        &gen.to_string(),
        "-r",
        &reps.to_string(),
        "-o",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
