//! End-to-end prefill and decode speed of one model on this machine.
//!
//! `cargo bench --bench decode -- [--model DIR|HUB_ID] [--prompt-tokens N] [--decode-tokens N]
//! [--threads N] [--runs N]` (no `--model`: the bundled demo model). Prints the machine, the
//! model and the best of `--runs` runs. Comparisons with a peer engine belong in the same run.

mod common;
use common::cpu_model;
use std::time::Instant;

use moe_runtime::{Logits, Model, Settings};

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    common::arg(args, name).and_then(|v| v.parse().ok())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes for test names.
    }
    let prompt_tokens: usize = arg(&args, "--prompt-tokens").unwrap_or(64);
    let decode_tokens: usize = arg(&args, "--decode-tokens").unwrap_or(32);
    let runs: usize = arg(&args, "--runs").unwrap_or(3);
    let settings = Settings {
        model: arg(&args, "--model"),
        threads: arg(&args, "--threads"),
        max_context: Some(prompt_tokens + decode_tokens + 1),
        ..Settings::default()
    };
    let t0 = Instant::now();
    let model = Model::load(&settings).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    });
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = model.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..prompt_tokens as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let (mut best_prefill, mut best_decode) = (0f64, 0f64);
    for _ in 0..runs {
        let mut state = model.new_state();
        let t = Instant::now();
        let mut logits = model
            .forward(&prompt, &mut state, Logits::Last, None)
            .unwrap();
        let prefill = prompt_tokens as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..decode_tokens {
            let tok = moe_runtime::sampler::argmax(&logits);
            logits = model
                .forward(&[tok], &mut state, Logits::Last, None)
                .unwrap();
        }
        let decode = decode_tokens as f64 / t.elapsed().as_secs_f64();
        best_prefill = best_prefill.max(prefill);
        best_decode = best_decode.max(decode);
    }
    println!(
        "machine: {} ({} threads used), kernels: {}",
        cpu_model(),
        model.threads(),
        moe_kernels::simd_level()
    );
    println!(
        "model: {} ({}, {} layers, {} experts top-{}), load {:.3} s",
        model.files.label(),
        model.config.arch,
        model.config.num_layers,
        model.config.router.num_experts,
        model.config.router.top_k,
        load_s
    );
    println!(
        "prefill {prompt_tokens} tokens: {best_prefill:.1} tok/s | decode {decode_tokens} tokens: {best_decode:.2} tok/s (best of {runs})"
    );
}
