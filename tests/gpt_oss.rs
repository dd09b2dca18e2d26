//! gpt-oss: the released gpt-oss-120b and gpt-oss-20b configs plan without their weights (the
//! experts counted in their MXFP4 form), and the shipped configurations fit as their comments
//! say. (Parity with transformers, on the MXFP4 checkpoint, is in tests/parity.rs.)

mod common;

/// Bytes of one expert in MXFP4: gate_up 5760 x 2880 and down 2880 x 2880 at 17 bytes per 32
/// values, and their biases (5760 + 2880 values, bf16).
const EXPERT_BYTES: u64 = (5760 * 2880 + 2880 * 2880) / 32 * 17 + (5760 + 2880) * 2;

#[test]
fn the_released_configs_plan_from_the_config_alone() {
    for (dir, layers, experts) in [("gpt_oss_120b", 36u64, 128u64), ("gpt_oss_20b", 24, 32)] {
        let cfg = format!("tests/fixtures/{dir}/config.json");
        let j = common::plan_json(&["--model", &cfg, "--ram-budget", "20GiB"]);
        assert_eq!(j["arch"], "gpt_oss");
        assert_eq!(j["from_config_only"], true);
        let s = &j["plan"]["sizes"];
        assert_eq!(
            (s["moe_layers"].as_u64(), s["experts_per_layer"].as_u64()),
            (Some(layers), Some(experts))
        );
        assert_eq!(s["top_k"], 4);
        assert_eq!(s["expert_bytes"], EXPERT_BYTES, "{dir}");
        // Every layer keeps K and V of 8 heads x 64 (f32 by default).
        assert_eq!(s["kv_bytes_per_token"], layers * 2 * 8 * 64 * 4);
        // Dense part in bf16: embeddings and head (2 x 201088 x 2880) and per layer q and o
        // (2880 x 4096), k and v (2880 x 512) with their biases, sinks, router, norms.
        let resident = s["resident_bytes"].as_u64().unwrap();
        let per_layer = 2 * (2 * 2880 * 4096 + 2 * 2880 * 512) + 2 * 128 * 2880;
        let want = 2 * 2 * 201088 * 2880 + layers * per_layer;
        assert!(
            resident.abs_diff(want) < want / 50,
            "{dir}: {resident} vs ~{want}"
        );
    }

    // Every shipped configuration fits as its comments say.
    for (toml, dir, device, in_ram, slots) in [
        (
            "configs/gpt-oss-120b-gpu-8gb-ram-64gb.toml",
            "gpt_oss_120b",
            "cuda",
            4538,
            Some(8),
        ),
        (
            "configs/gpt-oss-120b-gpu-8gb-ram-64gb.toml",
            "gpt_oss_120b",
            "sim",
            4538,
            Some(8),
        ),
        (
            "configs/gpt-oss-120b-cpu-64gb.toml",
            "gpt_oss_120b",
            "cpu",
            4303,
            None,
        ),
        (
            "configs/gpt-oss-20b-cpu-16gb.toml",
            "gpt_oss_20b",
            "cpu",
            768,
            None,
        ),
    ] {
        let cfg = format!("tests/fixtures/{dir}/config.json");
        let j = common::plan_json(&["--config", toml, "--model", &cfg, "--device", device]);
        let p = &j["plan"];
        assert_eq!(p["device"], device, "{toml}");
        assert_eq!(
            p["warnings"].as_array().map(Vec::len),
            Some(0),
            "{toml}: {p}"
        );
        let total = j["plan"]["sizes"]["moe_layers"].as_u64().unwrap()
            * j["plan"]["sizes"]["experts_per_layer"].as_u64().unwrap();
        assert_eq!(p["file_experts"], total - in_ram, "{toml}: {p}");
        assert!(p["ram_used_bytes"].as_u64() <= p["ram_budget_bytes"].as_u64());
        if let Some(slots) = slots {
            assert_eq!(p["slots_per_layer"], slots, "{toml}: {p}");
            assert!(p["vram_used_bytes"].as_u64() <= p["vram_budget_bytes"].as_u64());
        }
    }
}
