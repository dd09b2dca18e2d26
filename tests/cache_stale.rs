//! The quantized weight cache follows the model's bytes, through the real `moe-serve` binary: a
//! model re-saved in place with the same layout (other weights, same names, sizes and headers)
//! is never served from the old cache, and `cache verify` names the changed file; a touched but
//! identical file is hashed once and never rebuilds the cache; a build killed with SIGKILL
//! leaves no temporary file past the next start that uses the cache folder, for any model or
//! quantization, while a live build's temporary file is kept.
//!
//! Every test has its own temporary folder holding the models, the cache folder and the
//! per-user folders, so nothing touches the real ones.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{cache_of, stderr, stdout, tokens, Sandbox};

/// Longer than the window in which a just-changed file's stat is not trusted (2 s).
const SETTLE: Duration = Duration::from_millis(2_200);

impl Sandbox {
    /// A start of another model at another quantization (another file name) in the cache
    /// folder: a `run` of 2 tokens at q4_k without a model; it must succeed.
    fn start_other_model(&self) {
        let o = self
            .command_for(
                &["run"],
                None,
                "q4_k",
                &["--prompt-ids", "1,2,3", "--max-tokens", "2"],
            )
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }

    /// A greedy `run --json` of 12 tokens past end-of-sequence at q8_0, with `RUST_LOG`.
    fn generate(&self, model: &Path, extra: &[&str], log: &str) -> Output {
        let args = [
            "--prompt-ids",
            "1,2,3,4,5,6,7,8",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ];
        self.command_for(&["run"], Some(model), "q8_0", &args)
            .args(extra)
            .env("RUST_LOG", log)
            .output()
            .unwrap()
    }
}

/// The JSON line of a successful `run --json`.
fn json_line(o: &Output) -> Value {
    assert!(o.status.success(), "exit {:?}: {}", o.status, stderr(o));
    let out = stdout(o);
    serde_json::from_str(out.lines().last().expect("one JSON line")).unwrap()
}

/// The weight files of a model folder, sorted.
fn shards(model: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(model)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no weight file in {}", model.display());
    v
}

/// Inode and mtime of a file: equal before and after means it was neither replaced nor
/// rewritten.
fn ident(p: &Path) -> (u64, i64, i64) {
    let m = std::fs::metadata(p).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec())
}

#[test]
fn a_model_re_synthesized_in_place_is_served_with_its_new_weights() {
    let sb = Sandbox::new();
    let model = sb.synth("m", "demo", &[]);
    let old = json_line(&sb.generate(&model, &[], "warn"));
    let file = cache_of(&old);
    let old_cache_ident = ident(&file);

    // Other weights, same layout: only the bytes of the weight file differ.
    sb.synth("m", "demo", &["--seed", "1", "--overwrite"]);

    // `cache verify` on the old cache names the changed weight file and fails.
    let o = sb
        .command_for(&["cache", "verify"], Some(&model), "q8_0", &[])
        .output()
        .unwrap();
    let report = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{report} / {}", stderr(&o));
    let first = shards(&model)[0].to_string_lossy().into_owned();
    assert!(
        report.contains(&first) && report.contains("changed"),
        "the changed weight file is not named: {report}"
    );

    let new_out = sb.generate(&model, &[], "warn");
    let new = json_line(&new_out);
    let err = stderr(&new_out);
    assert!(
        err.contains("changed since the cache was built") && err.contains(&first),
        "the rebuild does not say which file changed: {err}"
    );
    assert_eq!(cache_of(&new), file, "same layout, same file name");
    assert_ne!(ident(&file), old_cache_ident, "the stale cache was kept");
    let uncached = json_line(&sb.generate(&model, &["--no-cache"], "warn"));
    assert!(uncached["cache"].is_null());
    assert_eq!(tokens(&new), tokens(&uncached), "served from a stale cache");
    assert_ne!(
        tokens(&new),
        tokens(&old),
        "the two seeds give the same tokens"
    );

    // The rebuilt cache verifies.
    let o = sb
        .command_for(&["cache", "verify"], Some(&model), "q8_0", &[])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stdout(&o));
}

#[test]
fn a_touched_weight_file_is_hashed_once_and_the_cache_is_kept() {
    let sb = Sandbox::new();
    let model = sb.synth("m", "demo", &[]);
    std::thread::sleep(SETTLE);
    let log = "moe_runtime::cache=info";
    let first = json_line(&sb.generate(&model, &[], log));
    let file = cache_of(&first);
    let built = ident(&file);

    // An unchanged start reads no weight file to check the cache.
    let o = sb.generate(&model, &[], log);
    assert!(!stderr(&o).contains("hashing"), "{}", stderr(&o));

    // touch: new mtime and ctime, same bytes.
    let shard = shards(&model).pop().unwrap();
    let name = shard.file_name().unwrap().to_string_lossy().into_owned();
    assert!(Command::new("touch")
        .arg(&shard)
        .status()
        .unwrap()
        .success());
    std::thread::sleep(SETTLE);
    let o = sb.generate(&model, &[], log);
    let err = stderr(&o);
    assert!(
        err.contains("hashing them") && err.contains(&format!("({name})")),
        "the touched file was not checked: {err}"
    );
    assert!(!err.contains("rebuilding"), "{err}");
    assert_eq!(tokens(&json_line(&o)), tokens(&first));
    assert_eq!(
        ident(&file),
        built,
        "the cache file was rebuilt or rewritten"
    );
    let sidecar = PathBuf::from(format!("{}.sources.json", file.display()));
    let remembered = ident(&sidecar);

    // The next start trusts the remembered stat: it hashes nothing and writes nothing.
    let o = sb.generate(&model, &[], log);
    let err = stderr(&o);
    assert!(
        !err.contains("hashing"),
        "the second start hashed again: {err}"
    );
    assert_eq!(ident(&sidecar), remembered);
    assert_eq!(ident(&file), built);
    assert!(sb.temp_files().is_empty(), "{:?}", sb.listing());
}

#[test]
fn a_killed_build_leaves_no_temporary_file_past_the_next_start() {
    let sb = Sandbox::new();
    // ~300 MB of bf16 weights: the q8_0 build takes a second or more.
    let model = sb.synth("mini", "mini", &[]);
    let (killed, _, _) =
        sb.kill_build_midway(|| sb.command_for(&["cache", "build"], Some(&model), "q8_0", &[]));
    assert_eq!(sb.temp_files(), vec![killed.clone()]);

    // A live build of yet another file: the test holds its lock, as a builder does.
    let live_name = "other.0123456789abcdef.x-q4_k.r-q4_k.v2.gguf";
    let live = sb
        .cache_dir()
        .join(format!("{live_name}.tmp-{}", std::process::id()));
    std::fs::write(&live, b"GGUF partial").unwrap();
    let lock = std::fs::File::create(sb.cache_dir().join(format!("{live_name}.lock"))).unwrap();
    moe_runtime::fsutil::lock_exclusive(&lock).unwrap();

    // A start of another model at another quantization (another file name) in the same folder.
    sb.start_other_model();
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        sb.temp_files(),
        vec![name(&live)],
        "the killed build's temporary file outlived the start"
    );

    // Once that builder is gone too, the next start removes its file as well.
    drop(lock);
    sb.start_other_model();
    assert!(sb.temp_files().is_empty(), "{:?}", sb.listing());
}
