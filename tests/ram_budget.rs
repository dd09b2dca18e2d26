//! The RAM budget is a hard cap on the CPU: a synthetic model several times larger than its
//! budget runs in a child process with peak RSS (VmHWM, file-backed pages included) within the
//! budget plus the fixed 256 MiB overhead, and impossible budgets are refused at once.

mod common;

use std::process::Command;
use std::time::Instant;

use common::{bin, moe_json, synth_model};

const OVERHEAD_BYTES: u64 = 256 << 20;

#[test]
fn peak_rss_stays_within_the_ram_budget_and_impossible_budgets_are_refused_fast() {
    let dir = tempfile::tempdir().unwrap();
    // bench-m's shape with two layers: 1.55 GB of bf16 weights, 64 experts of 9.4 MB per layer.
    let model = synth_model(dir.path(), "m", &["--preset", "bench-m", "--layers", "2"]);
    let m = model.to_str().unwrap();
    // 128 prompt tokens route to (nearly) every expert of both layers.
    let prompt: Vec<String> = (0..128)
        .map(|i| ((i * 7919 + 11) % 32000).to_string())
        .collect();
    let prompt = prompt.join(",");
    let common = [
        "--prompt-ids",
        &prompt,
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--temperature",
        "0",
        "--max-context",
        "256",
        "--json",
        "--threads",
        "2",
    ];

    let budget: u64 = 420 << 20;
    let budget_arg = format!("{}", budget);
    let mut args = vec!["run", "--model", m, "--ram-budget", &budget_arg];
    args.extend_from_slice(&common);
    let capped = moe_json(&args);
    let peak = capped["peak_rss_bytes"].as_u64().unwrap();
    eprintln!(
        "peak RSS with a {budget} byte budget: {peak}; experts: {}",
        capped["experts"]
    );
    assert!(
        peak <= budget + OVERHEAD_BYTES,
        "peak RSS {peak} exceeds budget {budget} + 256 MiB"
    );
    assert!(capped["experts"]["misses"].as_u64().unwrap() > 0);

    // The same run without a budget maps every touched expert: the cap above is what kept RSS
    // down, not the workload.
    let mut args = vec!["run", "--model", m];
    args.extend_from_slice(&common);
    let free = moe_json(&args);
    let free_peak = free["peak_rss_bytes"].as_u64().unwrap();
    eprintln!("peak RSS without a budget: {free_peak}");
    assert!(
        free_peak > budget + OVERHEAD_BYTES,
        "the workload does not need the cap ({free_peak})"
    );
    assert_eq!(
        capped["tokens"], free["tokens"],
        "budgets must not change results"
    );

    // A budget below the resident set is refused before loading, in well under a second.
    let t0 = Instant::now();
    let out = Command::new(bin())
        .args([
            "run",
            "--model",
            m,
            "--ram-budget",
            "64MiB",
            "--prompt-ids",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("ram_budget 64.00 MiB") && stderr.contains("needed"),
        "{stderr}"
    );
    assert!(secs < 1.0, "refusal took {secs} s");
}
