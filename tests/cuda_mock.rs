//! The CUDA path on the mock device (host memory, each kernel launch running its CPU twin):
//! every fixture, loaded with `device = "cuda"` onto the mock, gives the CPU backend's logits
//! and tokens bit for bit, prefill, decode and batched, within the planned VRAM budget.

mod common;

use moe_runtime::backend::cuda::mock::MockGpu;
use moe_runtime::backend::{AnyBackend, Cuda, DeviceKind, KvElem};
use moe_runtime::dispatch::Segment;
use moe_runtime::{Logits, Model, Settings};

const VRAM_BUDGET_BYTES: u64 = 1 << 30;

fn settings(dir: &std::path::Path, device: DeviceKind, kv: KvElem) -> Settings {
    Settings {
        model: Some(dir.join("model").to_string_lossy().into_owned()),
        threads: Some(2),
        cache_dir: Some(common::test_cache_dir()),
        state_dir: Some(common::test_cache_dir().join("state")),
        device,
        vram_budget: (device == DeviceKind::Cuda).then_some(VRAM_BUDGET_BYTES),
        kv_dtype: kv,
        // The mock device computes in f32: the CPU side on the exact path too.
        activations: moe_runtime::runconfig::Activations::F32,
        ..Default::default()
    }
}

fn pair(dir: &std::path::Path, kv: KvElem) -> (Model, Model) {
    let cpu = Model::load(&settings(dir, DeviceKind::Cpu, kv))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let cuda = Model::load_on(
        &settings(dir, DeviceKind::Cuda, kv),
        AnyBackend::Cuda(Cuda::mock(u64::MAX)),
    )
    .unwrap_or_else(|e| panic!("{} on the mock device: {e}", dir.display()));
    assert_eq!(cuda.decoder.backend_name(), "cuda");
    (cpu, cuda)
}

/// The model in `dir` loaded onto a fresh mock device, after `n` greedy tokens of the first
/// prompt; the mock keeps the launch log.
fn generate_on_mock(
    dir: &std::path::Path,
    kv: KvElem,
    n: usize,
) -> (Model, std::sync::Arc<MockGpu>) {
    let mock = std::sync::Arc::new(MockGpu::new());
    let cuda = Model::load_on(
        &settings(dir, DeviceKind::Cuda, kv),
        AnyBackend::Cuda(Cuda::on(mock.clone(), u64::MAX)),
    )
    .unwrap();
    let ids = prompts(&cuda).remove(0);
    common::greedy_generate(&cuda, &ids, n);
    (cuda, mock)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn prompts(m: &Model) -> Vec<Vec<u32>> {
    let vocab = m.config.vocab_size as u32;
    vec![
        (0..7).map(|i| (i * 37 + 11) % vocab).collect(),
        (0..19).map(|i| (i * 53 + 5) % vocab).collect(),
        // Long enough for the prefill GEMM path.
        (0..41).map(|i| (i * 29 + 17) % vocab).collect(),
    ]
}

#[test]
fn every_fixture_on_the_mock_device_equals_the_cpu_bit_for_bit() {
    for v in common::variants() {
        let (cpu, cuda) = pair(&v.dir, KvElem::F32);
        for ids in prompts(&cpu) {
            let a = common::prefill_logits(&cpu, &ids);
            let b = common::prefill_logits(&cuda, &ids);
            assert!(bits(&a) == bits(&b), "{}: prefill logits differ", v.name);
            let ga = common::greedy_generate(&cpu, &ids, 6);
            let gb = common::greedy_generate(&cuda, &ids, 6);
            assert_eq!(ga, gb, "{}: greedy tokens differ", v.name);
        }
        let cuda_dec = cuda.decoder.cuda().expect("on CUDA");
        let usage = cuda_dec.backend.vram_usage();
        assert!(
            usage.peak_live_bytes > 0 && usage.held_bytes <= VRAM_BUDGET_BYTES,
            "{}: {usage:?}",
            v.name
        );
        eprintln!("{}: peak VRAM {} bytes", v.name, usage.peak_live_bytes);
    }
}

#[test]
fn batched_steps_and_two_byte_kv_caches_match_the_cpu() {
    // deepseek_v3: latent attention over a keys-only cache.
    for name in ["qwen3_moe", "mixtral_swa", "qwen3_next", "deepseek_v3"] {
        let dir = common::fixtures().join(name);
        for kv in [KvElem::F32, KvElem::Bf16, KvElem::F16] {
            let (cpu, cuda) = pair(&dir, kv);
            let ps = prompts(&cpu);
            let run = |m: &Model| -> Vec<Vec<u32>> {
                let mut states: Vec<_> = ps.iter().map(|_| m.new_state()).collect();
                let mut out = Vec::new();
                // Prefill both as one batch, then three decode steps together.
                let mut segs: Vec<Segment<'_>> = states
                    .iter_mut()
                    .zip(&ps)
                    .map(|(state, p)| Segment {
                        tokens: p,
                        state,
                        logits: Some(Logits::Last),
                    })
                    .collect();
                let mut logits = m.forward_batch(&mut segs).unwrap();
                for step in 0..3u32 {
                    out.extend(logits.iter().map(|l| bits(l.as_ref().unwrap())));
                    let next: Vec<[u32; 1]> = (0..ps.len() as u32)
                        .map(|i| [(step * 31 + i * 7 + 3) % m.config.vocab_size as u32])
                        .collect();
                    let mut segs: Vec<Segment<'_>> = states
                        .iter_mut()
                        .zip(&next)
                        .map(|(state, t)| Segment {
                            tokens: t,
                            state,
                            logits: Some(Logits::Last),
                        })
                        .collect();
                    logits = m.forward_batch(&mut segs).unwrap();
                }
                out
            };
            assert!(
                run(&cpu) == run(&cuda),
                "{name} kv {kv:?}: batched logits differ"
            );
        }
    }
}

#[test]
fn the_mock_runs_the_kernels_and_a_too_small_budget_fails_cleanly() {
    let dir = common::fixtures().join("qwen3_moe");
    let (cuda, mock) = generate_on_mock(&dir, KvElem::Bf16, 2);
    let launched = mock.launched();
    for k in [
        "embed_f32",
        "rms_norm_f32",
        "rope_f32",
        "kv_store_bf16",
        "attention_decode_bf16",
        "add_f32",
        "route_softmax_topk_f32",
    ] {
        assert!(launched.contains(&k), "{k} was not launched: {launched:?}");
    }
    assert!(launched.iter().any(|k| k.starts_with("matvec_")));
    // The 41-token prompt's projections and head went through the GEMM.
    common::prefill_logits(&cuda, &prompts(&cuda)[2]);
    assert!(
        mock.launched().contains(&"gemm"),
        "no GEMM for a long prefill"
    );
    // Experts ran in VRAM slots, a decode step's as one group: rows gathered, the grouped
    // matvecs, one ordered sum.
    for k in ["gather_rows_f32", "matvec_grouped_f32", "moe_sum_rows_f32"] {
        assert!(launched.contains(&k), "{k} was not launched");
    }
    let stats = cuda.decoder.store().stats();
    assert!(
        stats.hits + stats.misses > 0
            && stats
                .per_layer
                .iter()
                .map(|l| l.bytes_to_device)
                .sum::<u64>()
                > 0,
        "{stats:?}"
    );
    let live = mock.allocations();
    drop(cuda);
    assert!(
        live > 0 && mock.allocations() == 0,
        "every device buffer is freed"
    );
    // A budget below the resident set is refused by the planner before loading.
    let mut s = settings(&dir, DeviceKind::Cuda, KvElem::F32);
    s.vram_budget = Some(4096);
    let e = Model::load_on(&s, AnyBackend::Cuda(Cuda::mock(u64::MAX)))
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("vram_budget"), "{e}");
}

#[test]
fn eviction_churn_with_as_many_slots_as_top_k_matches_the_cpu() {
    for name in [
        "qwen3_moe",
        "mixtral",
        "qwen3_next",
        "qwen3_moe_bnb",
        "olmoe",
    ] {
        let dir = common::fixtures().join(name);
        let cpu = Model::load(&settings(&dir, DeviceKind::Cpu, KvElem::F32)).unwrap();
        let top_k = cpu.config.router.top_k;
        let mut s = settings(&dir, DeviceKind::Cuda, KvElem::F32);
        s.experts.slots_per_layer = Some(top_k);
        s.experts.prefetch = true;
        let cuda = Model::load_on(&s, AnyBackend::Cuda(Cuda::mock(u64::MAX))).unwrap();
        for ids in prompts(&cpu) {
            let a = common::greedy_generate(&cpu, &ids, 8);
            let b = common::greedy_generate(&cuda, &ids, 8);
            assert_eq!(a, b, "{name}: greedy tokens differ under churn");
            assert!(
                bits(&common::prefill_logits(&cpu, &ids))
                    == bits(&common::prefill_logits(&cuda, &ids)),
                "{name}: prefill logits differ under churn"
            );
        }
        let st = cuda.decoder.store().stats();
        assert!(
            st.misses > 0 && st.per_layer.iter().map(|l| l.bytes_to_device).sum::<u64>() > 0,
            "{name}: {st:?}"
        );
        let in_place: u64 = st.per_layer.iter().map(|l| l.computed_in_place).sum();
        eprintln!(
            "{name}: {} hits, {} misses, {in_place} computed in place",
            st.hits, st.misses
        );
    }
}

#[test]
fn deltanet_decode_steps_run_as_kernels_on_the_device() {
    let dir = common::fixtures().join("qwen3_next");
    let (_cuda, mock) = generate_on_mock(&dir, KvElem::F32, 3);
    let launched = mock.launched();
    for k in [
        "deltanet_split_f32",
        "conv1d_silu_seq_f32",
        "l2norm_heads_f32",
        "gated_delta_seq_f32",
        "mul_silu_f32",
    ] {
        assert!(launched.contains(&k), "{k} was not launched");
    }
}

#[test]
fn gpt_oss_experts_run_in_vram_slots_with_their_biases_and_interleaved_rows() {
    let dir = common::fixtures().join("gpt_oss");
    let (cuda, mock) = generate_on_mock(&dir, KvElem::F32, 3);
    let launched = mock.launched();
    // MXFP4 experts in slots: the grouped decode matvec, the f32 biases added to their rows,
    // gate and up taken from alternating rows, the clamped SwiGLU; and the attention sinks.
    for k in [
        "matvec_grouped_mxfp4",
        "add_rows_f32",
        "split_pairs_f32",
        "glu_clamped_f32",
        "attention_decode_f32",
    ] {
        assert!(launched.contains(&k), "{k} was not launched");
    }
    let stats = cuda.decoder.store().stats();
    let to_device: u64 = stats.per_layer.iter().map(|l| l.bytes_to_device).sum();
    assert!(to_device > 0 && stats.hits > 0, "{stats:?}");
    // And the tokens are the CPU's.
    let cpu = Model::load(&settings(&dir, DeviceKind::Cpu, KvElem::F32)).unwrap();
    let ids = prompts(&cpu).remove(0);
    assert_eq!(
        common::greedy_generate(&cpu, &ids, 6),
        common::greedy_generate(&cuda, &ids, 6)
    );
}

#[test]
fn deepseek_v3_latent_attention_runs_as_kernels_on_the_device() {
    // MLA: q and the compressed KV split into their nope / rope parts, the interleaved rope,
    // kv_b_proj's key and value blocks as per-head products, the query and key joined, and
    // attention over the latent cache (keys only, values read from them).
    for (name, kv) in [
        ("deepseek_v3", KvElem::Bf16),
        ("deepseek_v3_no_qlora", KvElem::F32),
    ] {
        let dir = common::fixtures().join(name);
        let (cuda, mock) = generate_on_mock(&dir, kv, 3);
        let launched = mock.launched();
        let latent = if kv == KvElem::Bf16 {
            "attention_latent_bf16"
        } else {
            "attention_latent_f32"
        };
        for k in [
            "split_heads_f32",
            "join_heads_f32",
            "rope_f32",
            "head_matmul_t_f32",
            "matvec_grouped_f32",
            latent,
        ] {
            assert!(launched.contains(&k), "{name}: {k} was not launched");
        }
        assert!(
            !launched.iter().any(|k| k.starts_with("attention_decode_")),
            "{name}: the standard attention kernel ran"
        );
        let cpu = Model::load(&settings(&dir, DeviceKind::Cpu, kv)).unwrap();
        let ids = prompts(&cpu).remove(1);
        assert_eq!(
            common::greedy_generate(&cpu, &ids, 6),
            common::greedy_generate(&cuda, &ids, 6),
            "{name}: greedy tokens differ"
        );
    }
}
