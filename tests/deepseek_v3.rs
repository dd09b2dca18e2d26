//! DeepSeek-V3: the released FP8 checkpoint's config plans without its weights (latent KV cache
//! counted as the latent plus the rope key, FP8 blocks kept), and the shipped configuration for
//! a 768 GB CPU machine fits as its comments say. (Parity with transformers, cached decode
//! included, is in tests/parity.rs over the `deepseek_v3*` fixtures; refused inputs in
//! tests/bad_config.rs.)

mod common;

#[test]
fn deepseek_v3_plans_from_its_config_alone() {
    let cfg = "tests/fixtures/deepseek_v3_671b/config.json";
    let j = common::plan_json(&["--model", cfg, "--ram-budget", "700GiB"]);
    assert_eq!(j["arch"], "deepseek_v3");
    assert_eq!(j["from_config_only"], true);
    let s = &j["plan"]["sizes"];
    // 61 layers, the first 3 dense (`first_k_dense_replace`).
    assert_eq!(
        (s["moe_layers"].as_u64(), s["experts_per_layer"].as_u64()),
        (Some(58), Some(256))
    );
    assert_eq!(s["top_k"], 8);
    // gate, up and down of 2048 x 7168 FP8 values, kept as the release's blocks of 128 with an
    // f32 scale (132 bytes per 128 values).
    assert_eq!(s["expert_bytes"], 3 * 2048 * 7168 / 128 * 132);
    // The latent cache: 512 latent + 64 rope-key values per layer (f32 by default), not 128
    // heads of 192-wide keys and 128-wide values.
    assert_eq!(s["kv_bytes_per_token"], 61 * (512 + 64) * 4);
    // Dense part: embeddings and head in bf16 (2 x 129280 x 7168), 61 latent attention layers
    // in FP8 blocks (q_a 7168 x 1536, q_b 1536 x 24576, kv_a 7168 x 576, kv_b 512 x 32768,
    // o 16384 x 7168), 3 dense MLPs (3 x 7168 x 18432) and 58 shared experts (3 x 7168 x 2048)
    // in FP8, routers and norms: ~19.6 GB.
    let resident = s["resident_bytes"].as_u64().unwrap();
    assert!(
        (19_300_000_000..19_800_000_000).contains(&resident),
        "{resident}"
    );

    let toml = "configs/deepseek-v3-cpu-768gb.toml";
    let j = common::plan_json(&["--config", toml, "--model", cfg]);
    let p = &j["plan"];
    assert_eq!(p["device"], "cpu");
    assert_eq!(p["warnings"].as_array().map(Vec::len), Some(0), "{p}");
    // As the comments say: every expert in RAM, none read from files.
    assert_eq!(p["file_experts"], 0, "{p}");
    assert_eq!(p["ram_experts"], 58 * 256, "{p}");
    assert!(p["ram_used_bytes"].as_u64() <= p["ram_budget_bytes"].as_u64());
    // 32768 tokens of the bf16 latent cache.
    assert_eq!(p["kv_bytes"], 32768u64 * 61 * 576 * 2, "{p}");
}

#[test]
fn kimi_k2_plans_as_the_same_class_with_experts_beyond_ram() {
    // Kimi-K2 (`model_type` kimi_k2, class DeepseekV3ForCausalLM): 64 heads, 384 experts in one
    // group, one dense layer; 1.05 TB of FP8 experts.
    let cfg = "tests/fixtures/kimi_k2/config.json";
    let toml = "configs/deepseek-v3-cpu-768gb.toml";
    let j = common::plan_json(&["--config", toml, "--model", cfg]);
    assert_eq!(j["arch"], "deepseek_v3");
    let p = &j["plan"];
    let s = &p["sizes"];
    assert_eq!(
        (s["moe_layers"].as_u64(), s["experts_per_layer"].as_u64()),
        (Some(60), Some(384))
    );
    assert_eq!(s["kv_bytes_per_token"], 61 * 576 * 2);
    assert_eq!(
        s["total_expert_bytes"],
        60u64 * 384 * (3 * 2048 * 7168 / 128 * 132)
    );
    // On the 768 GB machine the experts that do not fit the RAM budget are read from files.
    assert_eq!(p["warnings"].as_array().map(Vec::len), Some(0), "{p}");
    let (ram, file) = (
        p["ram_experts"].as_u64().unwrap(),
        p["file_experts"].as_u64().unwrap(),
    );
    assert_eq!(ram + file, 60 * 384, "{p}");
    assert!(file > 0 && ram > 0, "{p}");
    assert!(p["ram_used_bytes"].as_u64() <= p["ram_budget_bytes"].as_u64());
}

#[test]
fn the_released_config_reads_as_the_reference_reads_it() {
    use moe_runtime::config::RawConfig;
    let path = common::fixtures().join("deepseek_v3_671b/config.json");
    let raw = RawConfig::parse(path.clone(), &std::fs::read(&path).unwrap()).unwrap();
    let cfg = (moe_runtime::arch::lookup(&raw).unwrap().parse_config)(&raw).unwrap();
    cfg.validate(&raw).unwrap();
    let m = cfg.mla.expect("latent attention");
    assert_eq!(
        (
            m.q_lora_rank,
            m.kv_lora_rank,
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim
        ),
        (Some(1536), 512, 128, 64, 128)
    );
    assert!(m.rope_interleave);
    // The model's head_dim is the rope width, as transformers sets it.
    assert_eq!(cfg.head_dim, 64);
    // 192^-1/2 times yarn_get_mscale(40, 1)^2 = (0.1 ln 40 + 1)^2.
    let mscale = 0.1 * 40f64.ln() + 1.0;
    let want = (192f64).powf(-0.5) * mscale * mscale;
    assert_eq!(m.softmax_scale, want as f32);
    // Group-limited sigmoid routing, 8 groups with 4 kept, scaled by 2.5.
    assert_eq!(cfg.router.groups, Some((8, 4)));
    assert_eq!(cfg.router.scale, 2.5);
    assert!(cfg.router.selection_bias);
    assert_eq!(cfg.kv_values_per_token(), 576);
}

#[test]
fn a_latent_cache_keeps_the_latent_and_the_rope_key_only() {
    use moe_runtime::{Logits, Model, Settings};
    let dir = common::fixtures().join("deepseek_v3").join("model");
    let model = Model::load(&Settings {
        model: Some(dir.to_string_lossy().into_owned()),
        threads: Some(2),
        cache_dir: Some(common::test_cache_dir()),
        ..Default::default()
    })
    .unwrap();
    let mut state = model.new_state();
    let ids: Vec<u32> = (5..13).collect();
    model.forward(&ids, &mut state, Logits::Last, None).unwrap();
    // 3 attention layers x 8 tokens x (latent 32 + rope key 8) f32 values; full heads would
    // keep 2 x 4 heads x 24 = 192 values per token and layer.
    assert_eq!(model.decoder.state_bytes(&state), 3 * 8 * (32 + 8) * 4);
}
