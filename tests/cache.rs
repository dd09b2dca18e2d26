//! The quantized weight cache through the library API, on the transformers fixtures: weights
//! mapped from the cache compute exactly what the same quantization made at load computes,
//! `quantization = "none"` never touches a cache, and per-expert precision tiers follow the
//! recorded popularity without ever rebuilding the file.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::{cache_settings as settings, max_abs_diff, prefill_logits, variants, Reference};
use moe_runtime::runconfig::{ExpertsConfig, Quantization};
use moe_runtime::{GenerateParams, Logits, Model, Prompt, Settings};

fn greedy(model: &Model, ids: &[u32], n: usize) -> Vec<u32> {
    let params = GenerateParams {
        max_tokens: Some(n),
        temperature: Some(0.0),
        ignore_eos: true,
        ..Default::default()
    };
    let mut g = model
        .generate(
            &Prompt::Ids(ids.to_vec()),
            &params,
            moe_runtime::CancelToken::new(),
        )
        .unwrap();
    for t in g.by_ref() {
        t.unwrap();
    }
    g.generated().to_vec()
}

fn cache_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn cached_weights_compute_exactly_what_quantization_at_load_computes() {
    for v in variants() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Reference::open(&v.dir.join("reference.safetensors"));
        let ids: Vec<u32> = r.i64("short.input_ids").iter().map(|&x| x as u32).collect();
        let model_dir = v.dir.join("model");
        let s = settings(&model_dir, Quantization::Q8_0, tmp.path());
        let at_load = Model::load(&Settings {
            cache: false,
            ..s.clone()
        })
        .unwrap();
        assert!(at_load.cache_path().is_none());
        assert!(
            cache_files(tmp.path()).is_empty(),
            "cache = false wrote a file"
        );
        let first = Model::load(&s).unwrap();
        let path = first.cache_path().expect("a cache is used").to_path_buf();
        assert_eq!(cache_files(tmp.path()), vec![path.clone()]);
        let meta = std::fs::metadata(&path).unwrap();
        let second = Model::load(&s).unwrap();
        let again = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.ino(), meta.mtime_nsec()),
            (again.ino(), again.mtime_nsec())
        );

        let want = prefill_logits(&at_load, &ids);
        for m in [&first, &second] {
            assert_eq!(
                max_abs_diff(&prefill_logits(m, &ids), &want),
                0.0,
                "{}: cached q8_0 differs from q8_0 at load",
                v.name
            );
        }
        assert_eq!(
            greedy(&second, &ids, 6),
            greedy(&at_load, &ids, 6),
            "{}",
            v.name
        );
    }
}

#[test]
fn no_quantization_uses_no_cache_and_keeps_parity() {
    let v = &variants()[0];
    let tmp = tempfile::tempdir().unwrap();
    let r = Reference::open(&v.dir.join("reference.safetensors"));
    let ids: Vec<u32> = r.i64("short.input_ids").iter().map(|&x| x as u32).collect();
    let m = Model::load(&settings(
        &v.dir.join("model"),
        Quantization::None,
        tmp.path(),
    ))
    .unwrap();
    assert!(m.cache_path().is_none());
    let got = prefill_logits(&m, &ids);
    assert!(max_abs_diff(&got, &r.f32("short.logits")) <= 1e-4);
    assert!(cache_files(tmp.path()).is_empty());
}

#[test]
fn precision_tiers_follow_the_hot_set_without_rebuilding_the_cache() {
    let v = &variants()[0];
    let tmp = tempfile::tempdir().unwrap();
    let r = Reference::open(&v.dir.join("reference.safetensors"));
    let ids: Vec<u32> = r.i64("short.input_ids").iter().map(|&x| x as u32).collect();
    let reference = r.f32("short.logits");
    let model_dir = v.dir.join("model");
    // Hot experts exact (stored type), the rest q8_0.
    let tiered = Settings {
        experts: ExpertsConfig {
            hot_quantization: Some(Quantization::None),
            cold_quantization: Some(Quantization::Q8_0),
            hot_fraction: 0.5,
            ..Default::default()
        },
        ..settings(&model_dir, Quantization::Q8_0, tmp.path())
    };
    let uniform = Model::load(&settings(&model_dir, Quantization::Q8_0, tmp.path())).unwrap();
    let uniform_logits = prefill_logits(&uniform, &ids);

    // No popularity recorded yet: every expert is cold, i.e. uniform q8_0.
    let cold = Model::load(&tiered).unwrap();
    let path = cold.cache_path().unwrap().to_path_buf();
    assert_eq!(
        max_abs_diff(&prefill_logits(&cold, &ids), &uniform_logits),
        0.0
    );
    greedy(&cold, &ids, 8);
    cold.save_hot_set().unwrap();
    let meta = std::fs::metadata(&path).unwrap();

    // With a hot set, half the experts are exact: closer to the reference than uniform q8_0,
    // and the same cache file is mapped, untouched.
    let warm = Model::load(&tiered).unwrap();
    assert_eq!(warm.cache_path().unwrap(), path);
    let again = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (meta.ino(), meta.mtime_nsec()),
        (again.ino(), again.mtime_nsec())
    );
    let tiered_logits = prefill_logits(&warm, &ids);
    assert!(
        max_abs_diff(&tiered_logits, &uniform_logits) > 0.0,
        "tiers changed nothing"
    );
    let (e_tiered, e_uniform) = (
        max_abs_diff(&tiered_logits, &reference),
        max_abs_diff(&uniform_logits, &reference),
    );
    assert!(
        e_tiered < e_uniform,
        "hot experts exact should be closer to the reference: {e_tiered} vs {e_uniform}"
    );
}

/// Flips the middle byte of every cache tensor whose name starts with `prefix`.
fn damage(path: &Path, prefix: &str) -> usize {
    let h = moe_runtime::gguf::GgufFile::open(path).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    let mut n = 0;
    for t in h.tensors.iter().filter(|t| t.name.starts_with(prefix)) {
        bytes[(t.offset + t.size / 2) as usize] ^= 0x55;
        n += 1;
    }
    // Replace the file (as a disk error would leave it), not the mapped inode of a live model.
    let tmp = path.with_extension("damaged");
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    n
}

#[test]
fn damaged_experts_are_never_used_silently() {
    let v = &variants()[0];
    let tmp = tempfile::tempdir().unwrap();
    let r = Reference::open(&v.dir.join("reference.safetensors"));
    let ids: Vec<u32> = r.i64("short.input_ids").iter().map(|&x| x as u32).collect();
    let s = settings(&v.dir.join("model"), Quantization::Q8_0, tmp.path());
    let clean = Model::load(&s).unwrap();
    let path = clean.cache_path().unwrap().to_path_buf();
    let clean_tokens = greedy(&clean, &ids, 8);
    let clean_bytes = std::fs::read(&path).unwrap();
    drop(clean);

    // Every expert of the first sparse layer: whichever the prompt routes to is damaged.
    let layer = v.moe_layers[0];
    assert!(damage(&path, &format!("moe.layers.{layer}.experts.")) > 0);

    // cache_rebuild = false: the first use of a damaged expert fails, naming the file.
    let strict = Model::load(&Settings {
        cache_rebuild: false,
        ..s.clone()
    })
    .unwrap();
    let mut st = strict.new_state();
    let err = strict
        .forward(&ids, &mut st, Logits::Last, None)
        .expect_err("a damaged expert was used")
        .to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("checksum"),
        "{err}"
    );
    drop(strict);

    // Default: the damaged experts are converted again from the source (same tokens), and the
    // file is repaired in the background to the clean bytes.
    let healed = Model::load(&s).unwrap();
    assert_eq!(greedy(&healed, &ids, 8), clean_tokens);
    healed.wait_for_cache_repair();
    assert!(
        std::fs::read(&path).unwrap() == clean_bytes,
        "file not repaired"
    );
}
