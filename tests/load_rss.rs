//! Opening a model reads headers only: the resident set right after loading a sharded
//! synthetic model of a few hundred MB stays far below the weights' size (checked in a child
//! process, the real binary).

mod common;

use std::process::Command;

use common::{bin, synth_model};

#[test]
fn opening_a_sharded_model_reads_headers_only() {
    let dir = tempfile::tempdir().unwrap();
    let model = synth_model(
        dir.path(),
        "mini",
        &[
            "--arch",
            "qwen3_moe",
            "--preset",
            "mini",
            "--shard-bytes",
            "100000000",
        ],
    );
    let weight_bytes: u64 = std::fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        weight_bytes > 200_000_000,
        "mini preset is only {weight_bytes} bytes"
    );
    let shards = std::fs::read_dir(&model)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|e| e == "safetensors")
        })
        .count();
    assert!(
        shards >= 2,
        "expected a sharded model, got {shards} file(s)"
    );

    // RSS counts only pages this process touched, so a header-only open stays small whatever the
    // page cache holds. The baseline (binary, embedded demo, a 32k-entry tokenizer) is ~40 MB.
    let out = Command::new(bin())
        .args(["run", "--model"])
        .arg(&model)
        .args([
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "1",
            "--json",
            "--threads",
            "1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let load_rss = v["load_rss_bytes"]
        .as_u64()
        .expect("load_rss_bytes reported");
    eprintln!("weights {weight_bytes} bytes, RSS after load {load_rss} bytes");
    assert!(
        load_rss < weight_bytes / 4,
        "RSS after load {load_rss} is not far below the weights' {weight_bytes} bytes"
    );
    // The measurement does see weight pages once the compute touches them.
    let final_rss = v["rss_bytes"].as_u64().unwrap();
    assert!(
        final_rss > load_rss + weight_bytes / 8,
        "RSS after one token ({final_rss}) should include the touched weights (load {load_rss})"
    );
    assert_eq!(v["tokens"].as_array().unwrap().len(), 1);
}
