//! Parity with transformers: every fixture variant's prefill logits, per-layer hidden states,
//! router choices and greedy continuation (prefill + cached decode) against the references
//! written by tests/fixtures/generate.py.

mod common;

use common::{greedy_generate, max_abs_diff, variants, Reference};
use moe_runtime::sampler::argmax;
use moe_runtime::{Logits, Model, Settings, Trace};

/// f32 logits tolerance from the project's quality bar.
const LOGIT_TOL: f32 = 1e-4;

fn load(dir: &std::path::Path) -> Model {
    Model::load(&Settings {
        model: Some(dir.join("model").to_string_lossy().into_owned()),
        threads: Some(2),
        max_context: None,
        cache_dir: Some(common::test_cache_dir()),
        // Parity with transformers is checked on the exact path.
        activations: moe_runtime::runconfig::Activations::F32,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn check_variant(v: &common::Variant) -> Vec<String> {
    let mut failures = Vec::new();
    let model = load(&v.dir);
    let r = Reference::open(&v.dir.join("reference.safetensors"));
    let vocab = model.config.vocab_size;
    let hidden = model.config.hidden_size;
    for p in ["short", "long"] {
        let ids: Vec<u32> = r
            .i64(&format!("{p}.input_ids"))
            .iter()
            .map(|&x| x as u32)
            .collect();
        let t = ids.len();

        // Prefill: logits, hidden states, routing.
        let mut state = model.new_state();
        let mut trace = Trace::default();
        let logits = model
            .forward(&ids, &mut state, Logits::All, Some(&mut trace))
            .unwrap();
        let ref_logits = r.f32(&format!("{p}.logits"));
        assert_eq!(ref_logits.len(), t * vocab);
        let err = max_abs_diff(&logits, &ref_logits);
        eprintln!("{} {p}: logits max abs err {err:.2e}", v.name);
        if err > LOGIT_TOL {
            failures.push(format!(
                "{} {p}: logits max abs err {err:e} > {LOGIT_TOL:e}",
                v.name
            ));
        }
        for l in 0..model.config.num_layers {
            let name = format!("{p}.hidden.{l}");
            if !r.has(&name) {
                continue;
            }
            let rh = r.f32(&name);
            let scale = rh.iter().fold(1.0f32, |m, x| m.max(x.abs()));
            let err = max_abs_diff(&trace.hidden[l], &rh);
            if err > LOGIT_TOL * scale {
                failures.push(format!(
                    "{} {p}: layer {l} hidden max abs err {err:e} (scale {scale})",
                    v.name
                ));
            }
            assert_eq!(rh.len(), t * hidden);
        }
        for &l in &v.moe_layers {
            let routing = trace.routing[l]
                .as_ref()
                .unwrap_or_else(|| panic!("{}: layer {l} should be sparse", v.name));
            let ref_idx: Vec<u32> = r
                .i64(&format!("{p}.router.{l}.indices"))
                .iter()
                .map(|&x| x as u32)
                .collect();
            if routing.indices != ref_idx {
                failures.push(format!("{} {p}: layer {l} router indices differ", v.name));
            }
            let ref_w = r.f32(&format!("{p}.router.{l}.weights"));
            let err = max_abs_diff(&routing.weights, &ref_w);
            if err > 1e-5 {
                failures.push(format!(
                    "{} {p}: layer {l} router weights err {err:e}",
                    v.name
                ));
            }
        }
        for l in 0..model.config.num_layers {
            if !v.moe_layers.contains(&l) && trace.routing[l].is_some() {
                failures.push(format!("{} {p}: layer {l} should be dense", v.name));
            }
        }

        // Greedy with the KV cache: prefill once, then one token at a time.
        let want: Vec<u32> = r
            .i64(&format!("{p}.greedy"))
            .iter()
            .map(|&x| x as u32)
            .collect();
        let mut state = model.new_state();
        let mut next = model.forward(&ids, &mut state, Logits::Last, None).unwrap();
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let tok = argmax(&next);
            got.push(tok);
            next = model
                .forward(&[tok], &mut state, Logits::Last, None)
                .unwrap();
        }
        if got != want {
            failures.push(format!(
                "{} {p}: greedy {got:?} != reference {want:?}",
                v.name
            ));
        }

        // The public generate() path gives the same tokens.
        let gen = greedy_generate(&model, &ids, want.len());
        if gen != want {
            failures.push(format!(
                "{} {p}: generate() {gen:?} != reference {want:?}",
                v.name
            ));
        }
    }
    failures
}

#[test]
fn all_variants_match_transformers() {
    let vs = variants();
    assert!(
        vs.len() >= 8,
        "expected every fixture variant, found {}",
        vs.len()
    );
    let failures: Vec<String> = vs.iter().flat_map(check_variant).collect();
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn fixtures_cover_every_architecture() {
    let archs: std::collections::BTreeSet<&'static str> = variants()
        .iter()
        .map(|v| load(&v.dir).config.arch)
        .collect();
    for a in moe_runtime::arch::ARCHITECTURES {
        assert!(
            archs.contains(a.model_type),
            "no fixture for {}: every registered architecture needs one",
            a.model_type
        );
    }
}

/// Loads a fixture with the given tier settings and checks logits and greedy tokens against the
/// reference (short and long prompts).
fn check_with_tiers(v: &common::Variant, tweak: impl Fn(&mut Settings, &moe_runtime::plan::Plan)) {
    let model_dir = v.dir.join("model").to_string_lossy().into_owned();
    let state = tempfile::tempdir().unwrap();
    let mut settings = Settings {
        model: Some(model_dir),
        threads: Some(2),
        // A fresh state folder: no hot set from other runs.
        state_dir: Some(state.path().to_path_buf()),
        cache_dir: Some(common::test_cache_dir()),
        activations: moe_runtime::runconfig::Activations::F32,
        ..Default::default()
    };
    let base = moe_runtime::plan_model(&settings).unwrap().plan;
    tweak(&mut settings, &base);
    let model = Model::load(&settings).unwrap_or_else(|e| panic!("{}: {e}", v.name));
    let r = Reference::open(&v.dir.join("reference.safetensors"));
    for p in ["short", "long"] {
        let ids: Vec<u32> = r
            .i64(&format!("{p}.input_ids"))
            .iter()
            .map(|&x| x as u32)
            .collect();
        let mut state = model.new_state();
        let logits = model.forward(&ids, &mut state, Logits::All, None).unwrap();
        let err = max_abs_diff(&logits, &r.f32(&format!("{p}.logits")));
        assert!(
            err <= LOGIT_TOL,
            "{} {p}: logits err {err:e} with tiers",
            v.name
        );
        let want: Vec<u32> = r
            .i64(&format!("{p}.greedy"))
            .iter()
            .map(|&x| x as u32)
            .collect();
        let got = greedy_generate(&model, &ids, want.len());
        assert_eq!(got, want, "{} {p}: greedy with tiers", v.name);
    }
    let stats = model.decoder.store().stats();
    assert!(
        stats.misses > 0 && stats.hits > 0 && stats.bytes_moved > 0,
        "{}: the tiers were not exercised: {stats:?}",
        v.name
    );
    assert!(
        model.plan.file_experts > 0 || model.plan.slots_per_layer == 2,
        "{}: neither file reads nor device slots in the plan",
        v.name
    );
}

#[test]
fn parity_holds_on_sim_with_two_slots_and_prefetch() {
    for v in variants() {
        check_with_tiers(&v, |s, _| {
            s.device = moe_runtime::runconfig::DeviceKind::Sim;
            s.vram_budget = Some(1 << 30);
            s.experts.slots_per_layer = Some(2);
            s.experts.prefetch = true;
            // A link fast enough that copying beats computing in place: slots are used.
            s.sim.link_gb_per_s = 1000.0;
            s.sim.copy_latency_us = 0.0;
        });
    }
}

#[test]
fn parity_holds_on_cpu_with_a_ram_budget_that_forces_file_reads() {
    for v in variants() {
        check_with_tiers(&v, |s, plan| {
            // Room for the resident set, KV cache, expert buffers and three pooled experts.
            let sizes = &plan.sizes;
            s.ram_budget = Some(
                sizes.resident_bytes
                    + plan.kv_bytes
                    + plan.transient_bytes
                    + 3 * sizes.expert_bytes,
            );
            s.experts.prefetch = true;
        });
    }
}

/// The thread count never changes a result: prefill and cached decode logits with 1 and 2
/// compute threads agree bit for bit (decode runs experts side by side on 2 threads).
#[test]
fn logits_do_not_depend_on_thread_count() {
    for v in variants() {
        let run = |threads: usize| {
            let model = Model::load(&Settings {
                model: Some(v.dir.join("model").to_string_lossy().into_owned()),
                threads: Some(threads),
                cache_dir: Some(common::test_cache_dir()),
                activations: moe_runtime::runconfig::Activations::F32,
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
            let r = Reference::open(&v.dir.join("reference.safetensors"));
            let ids: Vec<u32> = r.i64("long.input_ids").iter().map(|&x| x as u32).collect();
            let mut state = model.new_state();
            let mut all = model.forward(&ids, &mut state, Logits::All, None).unwrap();
            let mut next = argmax(&all[all.len() - model.config.vocab_size..]) as u32;
            for _ in 0..4 {
                let l = model
                    .forward(&[next], &mut state, Logits::All, None)
                    .unwrap();
                next = argmax(&l) as u32;
                all.extend(l);
            }
            all
        };
        let (one, two) = (run(1), run(2));
        assert_eq!(one.len(), two.len());
        let same = one
            .iter()
            .zip(&two)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{}: logits differ between 1 and 2 threads", v.name);
    }
}
