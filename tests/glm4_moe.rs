//! GLM-4.5: the released GLM-4.5-Air's config plans without its weights, and the shipped
//! configuration for a 24 GB GPU with 64 GB of RAM fits as its comments say. (Parity with
//! transformers, cached decode included, is in tests/parity.rs over the `glm4_moe*` fixtures.)

mod common;

#[test]
fn glm45_air_plans_from_its_config_alone() {
    let cfg = "tests/fixtures/glm45_air/config.json";
    let j = common::plan_json(&["--model", cfg, "--ram-budget", "20GiB"]);
    assert_eq!(j["arch"], "glm4_moe");
    assert_eq!(j["from_config_only"], true);
    let s = &j["plan"]["sizes"];
    // 46 layers, the first dense (`first_k_dense_replace` 1).
    assert_eq!(
        (s["moe_layers"].as_u64(), s["experts_per_layer"].as_u64()),
        (Some(45), Some(128))
    );
    assert_eq!(s["top_k"], 8);
    // gate, up and down of 1408 x 4096 bf16 values per expert.
    assert_eq!(s["expert_bytes"], 1408 * 4096 * 3 * 2);
    // Every layer keeps K and V of 8 heads x 128 (f32 by default).
    assert_eq!(s["kv_bytes_per_token"], 46 * 2 * 8 * 128 * 4);
    // Dense part in bf16: embeddings and head (2 x 151552 x 4096), 46 attention layers
    // (q and o 4096 x 12288, k and v 4096 x 1024, q/k/v biases), the dense layer-0 MLP
    // (3 x 4096 x 10944), 45 shared experts (3 x 4096 x 1408), routers and norms: ~14.4 GB.
    let resident = s["resident_bytes"].as_u64().unwrap();
    assert!(
        (14_200_000_000..14_600_000_000).contains(&resident),
        "{resident}"
    );

    // The shipped configuration plans for its card on a machine without one, and as `sim`.
    let toml = "configs/glm45-air-gpu-24gb-ram-64gb.toml";
    for device in ["cuda", "sim"] {
        let j = common::plan_json(&["--config", toml, "--model", cfg, "--device", device]);
        let p = &j["plan"];
        assert_eq!(p["device"], device);
        assert_eq!(p["warnings"].as_array().map(Vec::len), Some(0), "{p}");
        // As the comments say: 21 slots per layer, 4762 experts in RAM, the rest from files;
        // experts of 12.03 MiB: gate and up in q4_k, down (rows of 1408) in q8_0.
        // (`sim` reserves no GEMM scratch, so it fits one slot more.)
        let slots = p["slots_per_layer"].as_u64().unwrap();
        assert!(
            slots == 21 || (device == "sim" && slots == 22),
            "{device}: {p}"
        );
        assert_eq!(p["file_experts"], 5760 - 4762, "{p}");
        let q4k_rows = 2 * 1408 * 4096 / 256 * 144;
        let q8_rows = 4096 * 1408 / 32 * 34;
        assert_eq!(p["sizes"]["expert_bytes"], q4k_rows + q8_rows, "{p}");
        assert!(p["ram_used_bytes"].as_u64() <= p["ram_budget_bytes"].as_u64());
        assert!(p["vram_used_bytes"].as_u64() <= p["vram_budget_bytes"].as_u64());
    }
}
