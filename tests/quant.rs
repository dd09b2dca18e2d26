//! Quantization at load: quality against the transformers reference on every fixture (max and
//! mean logit error, KL divergence of the next-token distributions), q8_0 keeping the greedy
//! tokens wherever the reference's margin exceeds the quantization error, and budgets planned
//! with quantized sizes. (The fixtures' rows are shorter than Q4_K's 256-weight blocks, so q4_k
//! takes q8_0 here, as it does for any row that is not whole blocks; its own quality is
//! measured on larger models.)

mod common;

use common::{max_abs_diff, variants, Reference};
use moe_runtime::runconfig::Quantization;
use moe_runtime::{Logits, Model, Settings};

/// One cache folder for this test process (never the per-user one).
fn cache_dir() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
        .path()
        .to_path_buf()
}

fn load(dir: &std::path::Path, q: Quantization) -> Model {
    Model::load(&Settings {
        model: Some(dir.join("model").to_string_lossy().into_owned()),
        quantization: q,
        cache_dir: Some(cache_dir()),
        // The weight types' own error, on the exact path (the activation paths are checked
        // on their own below).
        activations: moe_runtime::runconfig::Activations::F32,
        ..Default::default()
    })
    .unwrap()
}

/// Mean over rows of KL(p_ref || p) of softmax distributions.
fn mean_kl(reference: &[f32], got: &[f32], vocab: usize) -> f64 {
    let softmax = |r: &[f32]| {
        let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = r.iter().map(|&x| (x as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|x| x / s).collect::<Vec<f64>>()
    };
    let rows = reference.len() / vocab;
    let mut kl = 0.0;
    for (a, b) in reference.chunks(vocab).zip(got.chunks(vocab)) {
        let (p, q) = (softmax(a), softmax(b));
        kl += p
            .iter()
            .zip(&q)
            .map(|(p, q)| {
                if *p > 0.0 {
                    p * (p / q.max(1e-30)).ln()
                } else {
                    0.0
                }
            })
            .sum::<f64>();
    }
    kl / rows as f64
}

/// Teacher-forces the reference continuation through the f32 and the quantized model; at every
/// step whose f32 top-1/top-2 margin exceeds twice the quantized model's logit error there, the
/// quantized model must pick the reference token. Returns how many steps were checked.
fn greedy_kept_where_margins_allow(
    v: &common::Variant,
    q: &Model,
    prompt: &[u32],
    want: &[u32],
) -> usize {
    let exact = load(&v.dir, Quantization::None);
    let vocab = exact.config.vocab_size;
    let seq: Vec<u32> = prompt.iter().chain(want).copied().collect();
    let run = |m: &Model| {
        let mut st = m.new_state();
        m.forward(&seq, &mut st, Logits::All, None).unwrap()
    };
    let (le, lq) = (run(&exact), run(q));
    let mut checked = 0;
    for (i, &tok) in want.iter().enumerate() {
        let p = prompt.len() - 1 + i;
        let (re, rq) = (
            &le[p * vocab..(p + 1) * vocab],
            &lq[p * vocab..(p + 1) * vocab],
        );
        assert_eq!(
            moe_runtime::sampler::argmax(re),
            tok,
            "{}: f32 path",
            v.name
        );
        let mut sorted = re.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let margin = sorted[0] - sorted[1];
        let err = max_abs_diff(re, rq);
        if margin > 2.0 * err {
            checked += 1;
            assert_eq!(
                moe_runtime::sampler::argmax(rq),
                tok,
                "{} step {i}: margin {margin} > 2 x err {err} but the q8_0 token differs",
                v.name
            );
        }
    }
    checked
}

#[test]
fn quantized_logits_stay_close_and_q8_0_keeps_greedy_tokens() {
    let mut checked = 0;
    for v in variants() {
        let r = Reference::open(&v.dir.join("reference.safetensors"));
        let ids: Vec<u32> = r.i64("short.input_ids").iter().map(|&x| x as u32).collect();
        let want: Vec<u32> = r.i64("short.greedy").iter().map(|&x| x as u32).collect();
        let reference = r.f32("short.logits");
        for q in [Quantization::Bf16, Quantization::Q8_0, Quantization::Q4K] {
            let model = load(&v.dir, q);
            let vocab = model.config.vocab_size;
            let mut st = model.new_state();
            let logits = model.forward(&ids, &mut st, Logits::All, None).unwrap();
            let max_err = max_abs_diff(&logits, &reference);
            let mean_err = logits
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs() as f64)
                .sum::<f64>()
                / logits.len() as f64;
            let kl = mean_kl(&reference, &logits, vocab);
            eprintln!(
                "{} {q:?}: max {max_err:.2e} mean {mean_err:.2e} KL {kl:.2e}",
                v.name
            );
            assert!(kl < 0.05, "{} {q:?}: KL {kl}", v.name);
            if q == Quantization::Q8_0 {
                checked += greedy_kept_where_margins_allow(&v, &model, &ids, &want);
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} greedy steps had a clear margin"
    );
}

#[test]
fn quantized_sizes_are_planned_before_loading() {
    let dir = common::fixtures().join("qwen3_moe");
    let plan = |q| {
        moe_runtime::plan_model(&Settings {
            model: Some(dir.join("model").to_string_lossy().into_owned()),
            quantization: q,
            ..Default::default()
        })
        .unwrap()
        .plan
    };
    let (f32p, q8p) = (plan(Quantization::None), plan(Quantization::Q8_0));
    // f32 weights with rows of 32-multiples: 4 bytes -> 34/32 bytes per weight.
    assert_eq!(
        q8p.sizes.total_expert_bytes * 128,
        f32p.sizes.total_expert_bytes * 34
    );
    assert!(q8p.sizes.resident_bytes < f32p.sizes.resident_bytes);
    // Quantized at load (no cache), experts live in RAM: a budget without room for them is
    // refused. From the cache they are mapped like any weight file, so the same budget plans.
    let tight = |cache: bool| {
        moe_runtime::plan_model(&Settings {
            model: Some(dir.join("model").to_string_lossy().into_owned()),
            quantization: Quantization::Q8_0,
            ram_budget: Some(q8p.sizes.resident_bytes + q8p.kv_bytes + q8p.transient_bytes + 1000),
            cache,
            ..Default::default()
        })
    };
    let e = tight(false).err().expect("refused").to_string();
    assert!(e.contains("quantized experts are held in RAM"), "{e}");
    let p = tight(true).expect("experts served from the cache file");
    assert!(p.plan.file_experts > 0, "{:?}", p.plan);
}

/// The lower-precision activation paths: `activations = "q8"` on q8_0 weights and `"bf16"` on
/// bf16 weights. Decode steps (one token at a time) stay close to the reference on every
/// fixture, and the setting really changes the arithmetic (its logits differ from the f32
/// path's) wherever the CPU has the instructions.
#[test]
fn lower_precision_activations_stay_close_and_take_effect() {
    use moe_runtime::runconfig::Activations;
    for (quantization, act) in [
        (Quantization::Q8_0, Activations::Q8),
        (Quantization::Bf16, Activations::Bf16),
    ] {
        for v in variants() {
            let r = Reference::open(&v.dir.join("reference.safetensors"));
            let ids: Vec<u32> = r.i64("short.input_ids").iter().map(|&x| x as u32).collect();
            let reference = r.f32("short.logits");
            let step_by_step = |activations: Activations| {
                let model = Model::load(&Settings {
                    model: Some(v.dir.join("model").to_string_lossy().into_owned()),
                    quantization,
                    activations,
                    cache_dir: Some(cache_dir()),
                    ..Default::default()
                })
                .unwrap();
                let mut st = model.new_state();
                let mut all = Vec::new();
                for &t in &ids {
                    all.extend(model.forward(&[t], &mut st, Logits::All, None).unwrap());
                }
                (all, model.config.vocab_size)
            };
            let ((exact_act, vocab), (low, _)) =
                (step_by_step(Activations::F32), step_by_step(act));
            let kl = mean_kl(&reference, &low, vocab);
            let max_err = max_abs_diff(&low, &reference);
            eprintln!(
                "{} {quantization:?} + {act:?} activations: max {max_err:.2e} KL {kl:.2e}",
                v.name
            );
            // A bitsandbytes checkpoint's 4-bit values quantized again to q8_0 (16 levels per
            // block scaled by absmax do not sit on q8_0's grid) add both errors: a looser bound.
            // The fixtures' routing margins are only required to exceed 1e-3 in f32: DeepSeek-V3's
            // group-limited sigmoid routing (under q8) and qwen3_next_bnb (under bf16) have a
            // position or two where lower-precision activations cross one, and the logits there
            // jump by ~2 (the other positions stay within ~0.3): looser bounds for them too.
            let bound = if v.name.contains("bnb") {
                0.2
            } else if v.name.starts_with("deepseek") {
                0.1
            } else {
                0.05
            };
            assert!(kl < bound, "{} {act:?}: KL {kl}", v.name);
            let has_kernels = match act {
                Activations::Bf16 => moe_kernels::bf16_activations_supported(),
                _ => true,
            };
            if has_kernels {
                assert!(
                    max_abs_diff(&low, &exact_act) > 0.0,
                    "{}: {act:?} activations changed nothing",
                    v.name
                );
            }
        }
    }
}
