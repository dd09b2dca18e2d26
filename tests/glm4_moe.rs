//! GLM-4.5: the released GLM-4.5-Air's config plans without its weights, and the shipped
//! configuration for a 24 GB GPU with 64 GB of RAM fits as its comments say. (Parity with
//! transformers, cached decode included, is in tests/parity.rs over the `glm4_moe*` fixtures.)

mod common;

/// `moe-serve plan ARGS --json`, paths relative to the repository root.
fn plan_json(args: &[&str]) -> serde_json::Value {
    let root = common::root();
    let abs: Vec<String> = args
        .iter()
        .map(|a| {
            if a.starts_with("configs/") || a.starts_with("tests/") {
                root.join(a).to_string_lossy().into_owned()
            } else {
                a.to_string()
            }
        })
        .collect();
    let mut all: Vec<&str> = vec!["plan"];
    all.extend(abs.iter().map(String::as_str));
    all.push("--json");
    common::moe_json(&all)
}

#[test]
fn glm45_air_plans_from_its_config_alone() {
    let cfg = "tests/fixtures/glm45_air/config.json";
    let j = plan_json(&["--model", cfg, "--ram-budget", "20GiB"]);
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
        let j = plan_json(&["--config", toml, "--model", cfg, "--device", device]);
        let p = &j["plan"];
        assert_eq!(p["device"], device);
        assert_eq!(p["warnings"].as_array().map(Vec::len), Some(0), "{p}");
        // As the comments say: 15 slots per layer, 3332 experts in RAM, the rest from files.
        assert_eq!(p["slots_per_layer"], 15, "{p}");
        assert_eq!(p["file_experts"], 5760 - 3332, "{p}");
        assert!(p["ram_used_bytes"].as_u64() <= p["ram_budget_bytes"].as_u64());
        assert!(p["vram_used_bytes"].as_u64() <= p["vram_budget_bytes"].as_u64());
    }
}
