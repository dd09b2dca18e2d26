//! Quality of quantization at load, measured against the f32-compute reference path.
//!
//! Loads the model with `quantization = "none"` (weights as stored, f32 activations and
//! accumulation: the reference), runs one prefill over a fixed prompt and keeps the logits of
//! every position; then, one model at a time (each is dropped before the next loads, so a model
//! that barely fits RAM once still works), loads it with each requested quantization, runs the
//! same prompt, and prints one markdown table row per type: max and mean absolute logit error,
//! mean KL(p_ref || p_q) of the next-token distributions over positions, and top-1 agreement
//! (with the reference logits' spread and top-1 margin, to read the errors against).
//!
//! ```sh
//! cargo bench --bench quality -- --model DIR [--tokens 128] [--types bf16,q8_0,q4_k]
//!     [--activations f32,q8,bf16,auto] [--resident TYPE] [--threads N] [--cache-dir DIR]
//!     [--tiers HOT:COLD] [--hot-fraction 0.25] [--also DIR,DIR [--also-types none,q8_0]]
//! ```
//! `--also` adds rows for other checkpoints of the same model (e.g. its FP8 or bitsandbytes
//! 4-bit release, same architecture and vocabulary) against the same reference, each loaded
//! with every `--also-types` type (default `none`: as stored, a pre-quantized checkpoint
//! dequantized exactly), with the load time (it maps, or first builds, the cache).
//! `--tiers` adds a row for per-expert precision tiers (`[experts] hot_quantization` /
//! `cold_quantization`): the model is loaded once with the tiers and no recorded popularity,
//! runs a warm-up prompt of other ids (its routing is the trace the hot set is learned from),
//! saves that popularity in a temporary state folder, and is loaded again, so the measured
//! prompt runs with the hot set a previous run left, as in use. Quantized loads map the
//! quantized weight cache in `--cache-dir` (default: the per-user cache folder).
//! `--activations` lists the activation types to measure each type with (`q8` rows for q8_0
//! and q4_k, `bf16` rows for none and bf16: the weights each path covers; `auto`, the default
//! setting, for every type). The reference and rows without an activation column are `f32`.
//! `--resident` sets `resident_quantization` for the quantized loads (default: as the type
//! measured). The prompt is `--tokens` ids spread over the vocabulary (deterministic), so every
//! run on the same model compares the same positions. Without `--model` it prints its usage
//! and exits successfully (so a plain `cargo bench` passes).

mod common;

use std::process::exit;
use std::time::Instant;

use common::cpu_model;
use moe_runtime::runconfig::{Activations, Quantization};
use moe_runtime::{Logits, Model, Settings};

const USAGE: &str = "usage: cargo bench --bench quality -- --model DIR [--tokens N (128)] \
[--types bf16,q8_0,q4_k] [--activations f32,q8,bf16,auto] [--resident none|bf16|q8_0|q4_k] [--threads N] \
[--cache-dir DIR] [--tiers HOT:COLD] [--hot-fraction F (0.25)] [--also DIR,DIR] \
[--also-types none,q8_0]";

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T>
where
    T::Err: std::fmt::Display,
{
    common::arg(args, name).map(|v| {
        v.parse().unwrap_or_else(|e| {
            eprintln!("error: {name} {v}: {e}\n{USAGE}");
            exit(2)
        })
    })
}

fn name(q: Quantization) -> &'static str {
    match q {
        Quantization::None => "none",
        Quantization::Bf16 => "bf16",
        Quantization::Q8_0 => "q8_0",
        Quantization::Q4K => "q4_k",
    }
}

/// The prompt: `n` ids spread over the vocabulary (a prime stride, as the other benches use).
fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 11) % vocab) as u32).collect()
}

/// Loads the model, runs the prompt through one prefill and returns the logits of every
/// position (`[tokens, vocab]`), the vocabulary size, the load time in seconds, and the model
/// (for the caller to describe, then drop before the next load).
fn logits(settings: &Settings, tokens: usize) -> (Vec<f32>, usize, f64, Model) {
    let t0 = Instant::now();
    let model = Model::load(settings).unwrap_or_else(|e| {
        eprintln!("error: loading with {:?}: {e}", settings.quantization);
        exit(1)
    });
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = model.config.vocab_size;
    let ids = prompt(tokens, vocab);
    let mut state = model.new_state();
    let out = model
        .forward(&ids, &mut state, Logits::All, None)
        .unwrap_or_else(|e| {
            eprintln!("error: forward with {:?}: {e}", settings.quantization);
            exit(1)
        });
    assert_eq!(out.len(), tokens * vocab, "logits for every position");
    (out, vocab, load_s, model)
}

/// log-softmax of one row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// Errors of `got` against `reference` (both `[positions, vocab]`).
struct Quality {
    max_abs: f64,
    mean_abs: f64,
    mean_kl: f64,
    top1_pct: f64,
}

fn compare(reference: &[f32], got: &[f32], vocab: usize) -> Quality {
    let (mut max_abs, mut sum_abs, mut sum_kl, mut agree) = (0f64, 0f64, 0f64, 0usize);
    let rows = reference.len() / vocab;
    for (r, g) in reference.chunks(vocab).zip(got.chunks(vocab)) {
        for (&a, &b) in r.iter().zip(g) {
            let d = (a as f64 - b as f64).abs();
            max_abs = max_abs.max(d);
            sum_abs += d;
        }
        let (lp, lq) = (log_softmax(r), log_softmax(g));
        sum_kl += lp
            .iter()
            .zip(&lq)
            .map(|(&p, &q)| p.exp() * (p - q))
            .sum::<f64>();
        if moe_runtime::sampler::argmax(r) == moe_runtime::sampler::argmax(g) {
            agree += 1;
        }
    }
    Quality {
        max_abs,
        mean_abs: sum_abs / reference.len() as f64,
        mean_kl: sum_kl / rows as f64,
        top1_pct: 100.0 * agree as f64 / rows as f64,
    }
}

/// Scale of the reference logits, to read the errors against: their standard deviation over
/// all positions and the median top-1 − top-2 margin per position.
fn reference_scale(reference: &[f32], vocab: usize) -> (f64, f64) {
    let n = reference.len() as f64;
    let mean = reference.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = reference
        .iter()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let mut margins: Vec<f64> = reference
        .chunks(vocab)
        .map(|r| {
            let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for &x in r {
                if x > a {
                    (a, b) = (x, a);
                } else if x > b {
                    b = x;
                }
            }
            (a - b) as f64
        })
        .collect();
    margins.sort_by(f64::total_cmp);
    (var.sqrt(), margins[margins.len() / 2])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes for test names.
    }
    let Some(model) = common::arg(&args, "--model") else {
        eprintln!("{USAGE}");
        eprintln!("(measures quantization at load against the f32 reference; needs --model)");
        return;
    };
    let tokens: usize = arg(&args, "--tokens").unwrap_or(128);
    if tokens == 0 {
        eprintln!("error: --tokens must be at least 1\n{USAGE}");
        exit(2);
    }
    let types: Vec<Quantization> = common::arg(&args, "--types")
        .unwrap_or_else(|| "bf16,q8_0,q4_k".into())
        .split(',')
        .map(|t| {
            t.trim().parse().unwrap_or_else(|e| {
                eprintln!("error: --types: {e}\n{USAGE}");
                exit(2)
            })
        })
        .collect();
    let activations: Vec<Activations> = common::arg(&args, "--activations")
        .unwrap_or_else(|| "f32".into())
        .split(',')
        .map(|t| {
            t.trim().parse().unwrap_or_else(|e| {
                eprintln!("error: --activations: {e}\n{USAGE}");
                exit(2)
            })
        })
        .collect();
    let resident: Option<Quantization> = arg(&args, "--resident");
    let base = Settings {
        model: Some(model.clone()),
        threads: arg(&args, "--threads"),
        max_context: Some(tokens + 1),
        cache_dir: common::arg(&args, "--cache-dir").map(Into::into),
        // The reference and the rows without an activation column are the exact path.
        activations: Activations::F32,
        ..Settings::default()
    };
    let tiers: Option<(Quantization, Quantization)> = common::arg(&args, "--tiers").map(|t| {
        let parsed = t
            .split_once(':')
            .and_then(|(h, c)| Some((h.parse().ok()?, c.parse().ok()?)));
        parsed.unwrap_or_else(|| {
            eprintln!("error: --tiers {t}: expected HOT:COLD, e.g. q8_0:q4_k\n{USAGE}");
            exit(2)
        })
    });
    let hot_fraction: f64 = arg(&args, "--hot-fraction").unwrap_or(0.25);
    let also: Vec<String> = common::arg(&args, "--also")
        .map(|a| a.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let also_types: Vec<Quantization> = common::arg(&args, "--also-types")
        .unwrap_or_else(|| "none".into())
        .split(',')
        .map(|t| {
            t.trim().parse().unwrap_or_else(|e| {
                eprintln!("error: --also-types: {e}\n{USAGE}");
                exit(2)
            })
        })
        .collect();

    let (reference, vocab, ref_load_s, m) = logits(&base, tokens);
    println!(
        "machine: {} ({} threads used), kernels: {}",
        cpu_model(),
        m.threads(),
        moe_kernels::simd_level()
    );
    println!(
        "model: {} ({}, {} layers, {} experts top-{}, vocab {vocab})",
        m.files.label(),
        m.config.arch,
        m.config.num_layers,
        m.config.router.num_experts,
        m.config.router.top_k,
    );
    println!(
        "settings: prompt {tokens} token ids (i·7919 + 11 mod vocab), one prefill, logits of \
         every position; reference: quantization none (weights as stored, f32 compute), loaded \
         in {ref_load_s:.2} s; quantized loads: resident_quantization {}; other settings default",
        resident.map_or("as the type measured", name)
    );
    drop(m);
    let (std, margin) = reference_scale(&reference, vocab);
    println!("reference logits: std {std:.3}, median top-1 − top-2 margin {margin:.3}");
    println!();
    println!(
        "| type | max abs logit err | mean abs logit err | mean KL(ref‖q) | top-1 agree | load s |"
    );
    println!("|---|---|---|---|---|---|");
    for q in types {
        for &a in &activations {
            let covered = match a {
                Activations::F32 | Activations::Auto => true,
                Activations::Q8 => matches!(q, Quantization::Q8_0 | Quantization::Q4K),
                Activations::Bf16 => matches!(q, Quantization::None | Quantization::Bf16),
            };
            if !covered {
                continue;
            }
            let settings = Settings {
                quantization: q,
                resident_quantization: resident,
                activations: a,
                ..base.clone()
            };
            let (got, v, load_s, m) = logits(&settings, tokens);
            drop(m);
            assert_eq!(v, vocab, "same model");
            let r = compare(&reference, &got, vocab);
            let label = match a {
                Activations::F32 => name(q).to_string(),
                Activations::Auto => format!("{}, auto (default)", name(q)),
                Activations::Q8 => format!("{}, q8 activations", name(q)),
                Activations::Bf16 => format!("{}, bf16 activations", name(q)),
            };
            println!(
                "| {label} | {:.3e} | {:.3e} | {:.3e} | {:.1} % | {load_s:.2} |",
                r.max_abs, r.mean_abs, r.mean_kl, r.top1_pct
            );
        }
    }
    for dir in &also {
        for &q in &also_types {
            let settings = Settings {
                model: Some(dir.clone()),
                quantization: q,
                resident_quantization: resident,
                ..base.clone()
            };
            let (got, v, load_s, m) = logits(&settings, tokens);
            drop(m);
            if v != vocab {
                eprintln!("error: {dir} has vocabulary {v}, the reference {vocab}");
                exit(1);
            }
            let r = compare(&reference, &got, vocab);
            println!(
                "| {dir}, {} | {:.3e} | {:.3e} | {:.3e} | {:.1} % | {load_s:.2} |",
                if q == Quantization::None {
                    "as stored"
                } else {
                    name(q)
                },
                r.max_abs,
                r.mean_abs,
                r.mean_kl,
                r.top1_pct
            );
        }
    }
    if let Some((hot, cold)) = tiers {
        let state = std::env::temp_dir().join(format!("moe-quality-state-{}", std::process::id()));
        let settings = Settings {
            quantization: cold,
            resident_quantization: resident,
            state_dir: Some(state.clone()),
            experts: moe_runtime::runconfig::ExpertsConfig {
                hot_quantization: Some(hot),
                cold_quantization: Some(cold),
                hot_fraction,
                ..Default::default()
            },
            ..base.clone()
        };
        // Learn the hot set from a warm-up prompt of other ids (a different stride).
        let warm = Model::load(&settings).unwrap_or_else(|e| {
            eprintln!("error: loading with tiers: {e}");
            exit(1)
        });
        let ids: Vec<u32> = (0..tokens)
            .map(|i| ((i * 104_729 + 3) % vocab) as u32)
            .collect();
        let mut st = warm.new_state();
        warm.forward(&ids, &mut st, Logits::Last, None)
            .unwrap_or_else(|e| {
                eprintln!("error: warm-up forward: {e}");
                exit(1)
            });
        warm.save_hot_set().unwrap_or_else(|e| {
            eprintln!("error: saving the hot set: {e}");
            exit(1)
        });
        drop(warm);
        let (got, _, load_s, m) = logits(&settings, tokens);
        drop(m);
        let _ = std::fs::remove_dir_all(&state);
        let r = compare(&reference, &got, vocab);
        println!(
            "| tiers {} hot / {} cold, hot {:.0} % of experts | {:.3e} | {:.3e} | {:.3e} | {:.1} % | {load_s:.2} |",
            name(hot),
            name(cold),
            hot_fraction * 100.0,
            r.max_abs,
            r.mean_abs,
            r.mean_kl,
            r.top1_pct
        );
    }
}
