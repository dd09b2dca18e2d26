//! Tests of the quantized weight cache: determinism, crash and fault safety, and detection of
//! every kind of damaged file, on the embedded demo model.

use std::path::{Path, PathBuf};

use super::*;
use crate::open::Settings;
use crate::quantize::ExpertTypes;
use crate::runconfig::Quantization;
use crate::weights::{ModelFiles, WeightSet};

/// The demo model's cache plan for `q` in `dir`.
fn demo_plan(dir: &Path, q: Quantization, rebuild: bool) -> CachePlan {
    plan_of(&crate::demo::files(), q, dir, rebuild)
}

/// The cache plan of the model `files` for `q` in `dir`.
fn plan_of(files: &ModelFiles, q: Quantization, dir: &Path, rebuild: bool) -> CachePlan {
    let cfg = files.read_small("config.json").unwrap().unwrap();
    let raw = crate::config::RawConfig::parse(files.path_of("config.json"), &cfg).unwrap();
    let arch = crate::arch::lookup(&raw).unwrap();
    let config = (arch.parse_config)(&raw).unwrap();
    let weights = WeightSet::open(files).unwrap();
    let mut mw = crate::arch::build_decoder(&config, &weights, arch.names).unwrap();
    let types = ExpertTypes::Uniform(q);
    let key = CacheKey::new(files, &cfg, &weights, &types, q);
    CachePlan::new(
        &mut mw,
        key,
        &types,
        CacheOptions {
            dir: dir.to_path_buf(),
            rebuild,
            progress: None,
            fail_after_bytes: None,
        },
    )
    .unwrap()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn build_in(dir: &Path) -> (CachePlan, PathBuf) {
    let plan = demo_plan(dir, Quantization::Q8_0, true);
    let (_, report) = plan.open_or_build(false).unwrap();
    assert!(report.is_some(), "first open builds");
    let path = plan.path.clone();
    (plan, path)
}

#[test]
fn rebuilds_are_byte_identical_at_any_thread_count() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let four = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let (_, pa) = one.install(|| build_in(a.path()));
    let (_, pb) = four.install(|| build_in(b.path()));
    let (x, y) = (std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
    assert!(x.len() > 100_000, "the demo cache holds the model");
    assert!(x == y, "cache bytes depend on the thread count");
    // The name carries the fingerprint, the types and the format version.
    let name = pa.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.ends_with(".x-q8_0.r-q8_0.v2.gguf"), "{name}");
}

#[test]
fn second_open_reuses_the_file_and_expert_ranges_are_contiguous() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, path) = build_in(dir.path());
    let before = std::fs::metadata(&path).unwrap();
    let (file, report) = plan.open_or_build(false).unwrap();
    assert!(report.is_none(), "an intact file is reused");
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!(before.modified().unwrap(), after.modified().unwrap());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(before.ino(), after.ino(), "the file was replaced");
    // Gate, up and down of one expert lie back to back (padding only to the alignment).
    let tensors = &file.header.tensors;
    for (i, e) in plan.entries.iter().enumerate() {
        if let Role::Expert { part: 1 | 2, .. } = e.role {
            let prev = &tensors[i - 1];
            let gap = tensors[i].offset - (prev.offset + prev.size);
            assert!(gap < ALIGNMENT, "{}: gap {gap}", e.name);
        }
    }
    // Every tensor is aligned, and every expert tensor is q8_0 (the demo's rows fit 32).
    assert!(tensors.iter().all(|t| t.offset % ALIGNMENT == 0));
    assert!(plan
        .entries
        .iter()
        .filter(|e| matches!(e.role, Role::Expert { .. }))
        .all(|e| e.to == crate::weights::Dtype::Q8_0));
}

#[test]
fn an_injected_write_failure_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut plan = demo_plan(dir.path(), Quantization::Q8_0, true);
    plan.options.fail_after_bytes = Some(200_000);
    let err = plan.open_or_build(false).unwrap_err().to_string();
    assert!(
        err.contains("injected fault"),
        "the fault did not fire: {err}"
    );
    assert!(err.contains(&plan.path.display().to_string()), "{err}");
    assert!(err.contains("cache_dir"), "no remedy in: {err}");
    let left: Vec<String> = files_in(dir.path())
        .into_iter()
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // The next build (no fault) succeeds.
    plan.options.fail_after_bytes = None;
    assert!(plan.open_or_build(false).unwrap().1.is_some());
}

#[test]
fn a_killed_build_leaves_only_a_temporary_file_that_the_next_build_removes() {
    let dir = tempfile::tempdir().unwrap();
    let plan = demo_plan(dir.path(), Quantization::Q8_0, true);
    // What a build killed mid-way leaves: a partial temporary file of another process.
    let tmp = with_suffix(&plan.path, ".tmp-999999");
    std::fs::write(&tmp, b"GGUF partial").unwrap();
    assert_eq!(plan.open().unwrap_err(), Problem::Missing);
    plan.open_or_build(false).unwrap();
    assert!(!tmp.exists(), "stale temporary file kept");
}

/// Builds, damages the file with `damage`, and returns the problem opening reports.
fn problem_after(damage: impl FnOnce(&Path, &CachePlan)) -> Problem {
    let dir = tempfile::tempdir().unwrap();
    let (plan, path) = build_in(dir.path());
    damage(&path, &plan);
    plan.open().expect_err("a damaged file opened")
}

fn flip_byte(path: &Path, at: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[at as usize] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

#[test]
fn truncated_extended_and_header_damaged_files_are_detected_at_open() {
    let p = problem_after(|path, _| {
        let len = std::fs::metadata(path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(len / 2).unwrap();
    });
    assert!(matches!(p, Problem::Unreadable(_)), "{p:?}");
    let p = problem_after(|path, _| {
        let len = std::fs::metadata(path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(len + 4096).unwrap();
    });
    assert!(matches!(p, Problem::Length { .. }), "{p:?}");
    // A byte inside a tensor's shape in the header: caught by the layout check or the
    // header checksum, never used.
    let p = problem_after(|path, plan| {
        let name = plan.entries[3].name.as_bytes();
        let b = std::fs::read(path).unwrap();
        let at = b.windows(name.len()).position(|w| w == name).unwrap();
        flip_byte(path, (at + name.len() + 4) as u64);
    });
    assert!(
        matches!(
            p,
            Problem::Layout(_) | Problem::HeaderChecksum | Problem::Unreadable(_)
        ),
        "{p:?}"
    );
    // A byte of the checksum table itself.
    let p = problem_after(|path, _| {
        let table = CacheFile::open(path, None)
            .unwrap()
            .header
            .tensors
            .last()
            .unwrap()
            .offset;
        flip_byte(path, table + 3);
    });
    assert!(matches!(p, Problem::HeaderChecksum), "{p:?}");
}

#[test]
fn wrong_version_stale_and_foreign_files_are_detected() {
    let p = problem_after(|path, _| {
        let key = KEY_VERSION.as_bytes();
        let b = std::fs::read(path).unwrap();
        let at = b.windows(key.len()).position(|w| w == key).unwrap();
        // key, then value type u32, then the u32 version.
        flip_byte(path, (at + key.len() + 4) as u64);
    });
    assert!(matches!(p, Problem::Version { .. }), "{p:?}");

    // Another model's cache under this model's name.
    let dir = tempfile::tempdir().unwrap();
    let mut plan = demo_plan(dir.path(), Quantization::Q8_0, true);
    plan.key.fingerprint = format!("{:032x}", 7);
    plan.open_or_build(false).unwrap();
    let real = demo_plan(dir.path(), Quantization::Q8_0, true);
    std::fs::rename(&plan.path, &real.path).unwrap();
    assert!(matches!(real.open(), Err(Problem::Stale { .. })));
    // With cache_rebuild = false that is an error naming the file ...
    let strict = demo_plan(dir.path(), Quantization::Q8_0, false);
    let err = strict.open_or_build(false).unwrap_err().to_string();
    assert!(
        err.contains("stale") && err.contains("cache_rebuild = false"),
        "{err}"
    );
    assert!(err.contains(&real.path.display().to_string()), "{err}");
    // ... and by default it is rebuilt.
    assert!(real.open_or_build(false).unwrap().1.is_some());
    assert!(real.open().is_ok());

    // A GGUF file that is not a cache.
    let foreign = tempfile::tempdir().unwrap();
    let plan = demo_plan(foreign.path(), Quantization::Q8_0, true);
    let spec = crate::gguf::TensorSpec::new("x", vec![32], crate::gguf::GgmlType::F32);
    let mut w = crate::gguf::GgufWriter::create(&plan.path, &[], &[spec], 32).unwrap();
    w.write(&[0u8; 128]).unwrap();
    w.finish().unwrap();
    assert_eq!(plan.open().err(), Some(Problem::Foreign));
    // Not GGUF at all.
    std::fs::write(&plan.path, b"not a gguf file at all, just text").unwrap();
    assert!(matches!(plan.open(), Err(Problem::Unreadable(_))));
}

#[test]
fn a_flipped_tensor_byte_is_found_by_its_checksum_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, path) = build_in(dir.path());
    let good = std::fs::read(&path).unwrap();
    let file = plan.open().unwrap();
    // An expert's down projection, in the middle of the file.
    let i = plan
        .entries
        .iter()
        .position(|e| {
            matches!(
                e.role,
                Role::Expert {
                    layer: 2,
                    expert: 3,
                    part: 2,
                    ..
                }
            )
        })
        .unwrap();
    let t = file.header.tensors[i].clone();
    drop(file);
    flip_byte(&path, t.offset + t.size / 2);
    // Opening reads no tensor data, so it succeeds; the tensor's check fails.
    let file = plan.open().unwrap();
    let intact = file.verify_all().unwrap();
    assert_eq!(
        intact
            .iter()
            .enumerate()
            .filter(|(_, ok)| !**ok)
            .map(|(j, _)| j)
            .collect::<Vec<_>>(),
        vec![i]
    );
    // A repair copies the intact tensors and converts the damaged one again: the original
    // bytes come back.
    let report = plan.write(Some((&file, &intact))).unwrap();
    assert_eq!(report.converted_tensors, 1);
    assert_eq!(std::fs::read(&path).unwrap(), good);
}

#[test]
fn concurrent_builders_of_one_file_build_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let reports: Vec<bool> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let plan = demo_plan(dir.path(), Quantization::Q8_0, true);
                    plan.open_or_build(false).unwrap().1.is_some()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(reports.iter().filter(|b| **b).count(), 1, "{reports:?}");
    let plan = demo_plan(dir.path(), Quantization::Q8_0, true);
    assert!(plan.open().is_ok());
}

#[test]
fn stale_caches_of_the_same_source_are_removed_when_a_new_one_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let mut old = demo_plan(dir.path(), Quantization::Q8_0, true);
    old.key.fingerprint = format!("{:032x}", 42);
    old.path = dir.path().join(old.key.file_name());
    old.open_or_build(false).unwrap();
    assert!(old.path.exists());
    let (_, new) = build_in(dir.path());
    assert!(new.exists());
    assert!(!old.path.exists(), "stale cache of the same source kept");
}

#[test]
fn settings_resolve_the_cache_folder() {
    let s = Settings {
        cache_dir: Some(PathBuf::from("/tmp/x")),
        ..Settings::default()
    };
    assert_eq!(s.cache_options().dir, PathBuf::from("/tmp/x"));
    let q = Settings {
        quantization: Quantization::Q8_0,
        ..Settings::default()
    };
    assert!(q.uses_cache(&ExpertTypes::Uniform(Quantization::Q8_0)));
    let none = Settings::default();
    assert!(!none.uses_cache(&ExpertTypes::Uniform(Quantization::None)));
    let off = Settings { cache: false, ..q };
    assert!(!off.uses_cache(&ExpertTypes::Uniform(Quantization::Q8_0)));
}

/// A random-weight demo model on disk (`seed`), written over `dir`'s files when present; with
/// `shard_bytes`, in several shards.
fn synth_on_disk(dir: &Path, seed: u64, shard_bytes: Option<u64>) {
    let o = crate::synth::SynthOptions {
        arch: "qwen3_moe".into(),
        preset: "demo".into(),
        layers: None,
        seed,
        out: dir.to_path_buf(),
        shard_bytes,
        overwrite: true,
    };
    crate::synth::synth(&o, &mut |_, _| {}).unwrap();
}

/// The cache plan of the model in `model` for q8_0 in `cache`.
fn disk_plan(model: &Path, cache: &Path, rebuild: bool) -> CachePlan {
    let files = ModelFiles::Dir(model.to_path_buf());
    plan_of(&files, Quantization::Q8_0, cache, rebuild)
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
    v
}

/// Waits until a file changed now is older than the window in which its stat is not trusted.
fn let_stats_settle() {
    std::thread::sleep(std::time::Duration::from_nanos(
        sources::RACY_WINDOW_NS as u64 + 100_000_000,
    ));
}

#[test]
fn a_model_re_saved_in_place_with_the_same_layout_is_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, cache) = (tmp.path().join("m"), tmp.path().join("cache"));
    // Small shards, so that one changed file among several is named.
    synth_on_disk(&model, 0, Some(1 << 20));
    let files = shards(&model);
    assert!(files.len() >= 2, "{files:?}");
    let plan = disk_plan(&model, &cache, true);
    assert!(plan.open_or_build(false).unwrap().1.is_some());
    let built = plan.open_header().unwrap();
    assert_eq!(built.sources.len(), files.len());
    assert!(plan.changed_sources(&built).unwrap().is_empty());

    // Other weights, same layout: the fingerprint (config, names, sizes, headers) is the same.
    synth_on_disk(&model, 1, Some(1 << 20));
    let again = disk_plan(&model, &cache, true);
    assert_eq!(again.key.fingerprint, plan.key.fingerprint);
    assert_eq!(again.path, plan.path);
    match again.open() {
        Err(Problem::SourceChanged { file }) => {
            assert!(
                files.iter().any(|f| file == f.display().to_string()),
                "{file}"
            )
        }
        other => panic!("a re-saved model's cache was trusted: {other:?}"),
    }
    // `cache verify` hashes every shard: all of them changed.
    let changed = again.changed_sources(&built).unwrap();
    assert_eq!(changed.len(), files.len(), "{changed:?}");
    // cache_rebuild = false refuses, naming the file and the changed shard.
    let strict = disk_plan(&model, &cache, false);
    let err = strict.open_or_build(false).unwrap_err().to_string();
    assert!(
        err.contains(&plan.path.display().to_string())
            && err.contains("changed since the cache was built")
            && err.contains(".safetensors")
            && err.contains("cache_rebuild = false"),
        "{err}"
    );
    // By default it is rebuilt from the new bytes, under the same name.
    let (f, report) = again.open_or_build(false).unwrap();
    assert!(report.is_some(), "not rebuilt");
    assert_ne!(f.identity, built.identity);
    assert!(again.changed_sources(&f).unwrap().is_empty());
    let fresh = tempfile::tempdir().unwrap();
    let direct = disk_plan(&model, fresh.path(), true);
    direct.open_or_build(false).unwrap();
    let bytes = |p: &Path| std::fs::read(p).unwrap();
    let tensors_of = |p: &Path| {
        let f = CacheFile::open(p, None).unwrap();
        // Every tensor, and every tensor's checksum (the table's last entry covers the
        // header, which records when and what was hashed).
        let first = f.header.tensors[0].offset as usize;
        let table = f.header.tensors.last().unwrap();
        let end = (table.offset + table.size - 8) as usize;
        bytes(p)[first..end].to_vec()
    };
    assert!(
        tensors_of(&again.path) == tensors_of(&direct.path),
        "the rebuilt cache differs from one built from scratch"
    );
}

#[test]
fn a_touched_file_is_hashed_once_and_never_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, cache) = (tmp.path().join("m"), tmp.path().join("cache"));
    synth_on_disk(&model, 0, None);
    let_stats_settle();
    let plan = disk_plan(&model, &cache, true);
    plan.open_or_build(false).unwrap();
    use std::os::unix::fs::MetadataExt;
    let ident = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.ino(), m.mtime(), m.mtime_nsec())
    };
    let before = ident(&plan.path);
    // Nothing changed: the stats vouch for every file, nothing is read.
    let p = disk_plan(&model, &cache, true);
    assert!(p.open_or_build(false).unwrap().1.is_none());
    assert_eq!(p.source_bytes_hashed(), 0, "an unchanged start hashed");

    // A touch: new mtime and ctime, same bytes.
    let shard = &shards(&model)[0];
    std::fs::File::options()
        .write(true)
        .open(shard)
        .unwrap()
        .set_modified(std::time::SystemTime::now())
        .unwrap();
    let_stats_settle();
    let p = disk_plan(&model, &cache, true);
    assert!(p.open_or_build(false).unwrap().1.is_none(), "rebuilt");
    let size = std::fs::metadata(shard).unwrap().len();
    assert_eq!(p.source_bytes_hashed(), size, "the touched file is hashed");
    assert_eq!(ident(&plan.path), before, "the cache file was rewritten");
    let sidecar = sources::sidecar_path(&plan.path);
    assert!(sidecar.is_file(), "the new stat is not remembered");
    let side_before = ident(&sidecar);
    // The next start trusts the remembered stat: no hashing, no write.
    let p = disk_plan(&model, &cache, true);
    assert!(p.open_or_build(false).unwrap().1.is_none());
    assert_eq!(p.source_bytes_hashed(), 0, "the second start hashed again");
    assert_eq!(ident(&sidecar), side_before);

    // A damaged sidecar vouches for nothing: the file is hashed again (and it is rewritten).
    let mut text = std::fs::read_to_string(&sidecar).unwrap();
    text = text.replacen("\"inode\": ", "\"inode\": 1", 1);
    std::fs::write(&sidecar, text).unwrap();
    let p = disk_plan(&model, &cache, true);
    assert!(p.open_or_build(false).unwrap().1.is_none());
    assert_eq!(p.source_bytes_hashed(), size);
    // A sidecar cannot vouch for other bytes: change the shard's bytes keeping its size; the
    // sidecar's stat no longer matches, the hash differs, and the cache is rebuilt.
    let mut b = std::fs::read(shard).unwrap();
    let n = b.len();
    b[n - 3] ^= 0x01;
    std::fs::write(shard, &b).unwrap();
    let p = disk_plan(&model, &cache, true);
    assert!(p.open_or_build(false).unwrap().1.is_some(), "not rebuilt");
    assert!(!sidecar.exists(), "the replaced file's sidecar was kept");
}

#[test]
fn a_file_of_the_previous_format_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, path) = build_in(dir.path());
    // The same file as the previous format would have named it, version 1, no source record
    // (unreadable to this build either way: the version is checked first).
    let key = KEY_VERSION.as_bytes();
    let mut b = std::fs::read(&path).unwrap();
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    b[at..at + 4].copy_from_slice(&1u32.to_le_bytes());
    let old = dir
        .path()
        .join(plan.key.file_name().replace(".v2.gguf", ".v1.gguf"));
    std::fs::write(&old, &b).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        CacheFile::open(&old, None),
        Err(Problem::Version { found: 1 })
    ));
    let plan = demo_plan(dir.path(), Quantization::Q8_0, true);
    assert!(plan.open_or_build(false).unwrap().1.is_some());
    assert!(!old.exists(), "the previous format's file was kept");
}

#[test]
fn the_embedded_model_is_checked_by_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, _) = build_in(dir.path());
    let f = plan.open().unwrap();
    assert!(!f.sources.is_empty());
    assert!(f
        .sources
        .iter()
        .all(|r| r.xxh3_128 != format!("{:032x}", 0)));
    assert!(plan.changed_sources(&f).unwrap().is_empty());
    // Another model's bytes under the same names: stale.
    let mut other = demo_plan(dir.path(), Quantization::Q8_0, true);
    for s in &mut other.key.sources {
        if let sources::Source::Embedded { bytes, .. } = s {
            *bytes = b"other bytes";
        }
    }
    assert!(matches!(other.open(), Err(Problem::SourceChanged { .. })));
}

/// A temporary file of a build of `name`, as a builder with pid `pid` leaves it.
fn temp_of(dir: &Path, name: &str, pid: u32) -> PathBuf {
    let p = dir.join(format!("{name}.tmp-{pid}"));
    std::fs::write(&p, b"GGUF partial").unwrap();
    p
}

#[test]
fn every_start_removes_temporaries_of_dead_builders_of_any_file_and_keeps_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let plan = demo_plan(dir.path(), Quantization::Q8_0, true);
    // Killed builds of other files (another quantization, another model): one never got a
    // lock file left, one left its lock file (unlocked since the builder died).
    let gone = temp_of(dir.path(), "other.0123.x-q4_k.r-q4_k.v2.gguf", 999_999_999);
    let unlocked = temp_of(dir.path(), "other.0123.x-bf16.r-bf16.v1.gguf", 999_999_998);
    std::fs::write(
        dir.path().join("other.0123.x-bf16.r-bf16.v1.gguf.lock"),
        b"",
    )
    .unwrap();
    // A live build of another file: its builder holds the lock.
    let live_name = "live.4567.x-q8_0.r-q8_0.v2.gguf";
    let live = temp_of(dir.path(), live_name, 999_999_997);
    let lock = std::fs::File::create(dir.path().join(format!("{live_name}.lock"))).unwrap();
    crate::fsutil::lock_exclusive(&lock).unwrap();
    // Not ours: never touched.
    let foreign = temp_of(dir.path(), "notes.txt", 1);
    plan.open_or_build(false).unwrap();
    assert!(
        !gone.exists() && !unlocked.exists(),
        "{:?}",
        files_in(dir.path())
    );
    assert!(live.exists(), "a live build's temporary file was removed");
    assert!(foreign.exists());
    drop(lock);
    assert_eq!(remove_orphaned_temporaries(dir.path()), 1);
    assert!(!live.exists());
}

/// FP4 E2M1 values as the OCP MX spec lists them (written out here, not taken from the
/// kernels).
const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Random MXFP4 codes and scales for a weight `[e, n, k]`, with its exact f32 values.
fn mxfp4_weight(seed: &mut u64, e: usize, n: usize, k: usize) -> (Vec<u8>, Vec<u8>, Vec<f32>) {
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    let blocks: Vec<u8> = (0..e * n * k / 2).map(|_| next() as u8).collect();
    // Scales 2^-7 .. 2^-4: weights of the size a trained layer has.
    let scales: Vec<u8> = (0..e * n * k / 32)
        .map(|_| 120 + (next() % 4) as u8)
        .collect();
    let mut exact = Vec::with_capacity(e * n * k);
    for (b, &s) in blocks.chunks_exact(16).zip(&scales) {
        let scale = 2f32.powi(s as i32 - 127);
        for &byte in b {
            exact.push(E2M1[(byte & 0xF) as usize] * scale);
            exact.push(E2M1[(byte >> 4) as usize] * scale);
        }
    }
    (blocks, scales, exact)
}

/// Two copies of a random two-layer demo model whose experts are stored fused
/// (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]): in `mx` as MXFP4 pairs with an
/// mxfp4 `quantization_config` (gpt-oss's `modules_to_not_convert`), in `exact` as the same
/// values in f32.
fn mxfp4_twins(mx: &Path, exact: &Path) {
    let src = tempfile::tempdir().unwrap();
    let o = crate::synth::SynthOptions {
        arch: "qwen3_moe".into(),
        preset: "demo".into(),
        layers: Some(2),
        seed: 3,
        out: src.path().to_path_buf(),
        shard_bytes: None,
        overwrite: true,
    };
    crate::synth::synth(&o, &mut |_, _| {}).unwrap();
    let ws = WeightSet::open(&ModelFiles::Dir(src.path().to_path_buf())).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.path().join("config.json")).unwrap()).unwrap();
    let u = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (layers, h, inter, e) = (
        u("num_hidden_layers"),
        u("hidden_size"),
        u("moe_intermediate_size"),
        u("num_experts"),
    );
    use crate::weights::Dtype;
    // (name, dtype, shape, bytes) of each model.
    let mut kept: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for f in &ws.files {
        for name in f.tensors.keys() {
            if !name.contains(".mlp.experts.") {
                let t = ws.get(name, None).unwrap();
                kept.push((name.clone(), t.dtype, t.shape.clone(), t.bytes().to_vec()));
            }
        }
    }
    let (mut mx_t, mut exact_t) = (kept.clone(), kept);
    let mut seed = 0x2545_F491_4F6C_DD1D;
    for l in 0..layers {
        for (part, n, k) in [("gate_up_proj", 2 * inter, h), ("down_proj", h, inter)] {
            let name = format!("model.layers.{l}.mlp.experts.{part}");
            let (blocks, scales, values) = mxfp4_weight(&mut seed, e, n, k);
            mx_t.push((
                format!("{name}_blocks"),
                Dtype::U8,
                vec![e, n, k / 32, 16],
                blocks,
            ));
            mx_t.push((
                format!("{name}_scales"),
                Dtype::U8,
                vec![e, n, k / 32],
                scales,
            ));
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            exact_t.push((name, Dtype::F32, vec![e, n, k], bytes));
        }
    }
    for (dir, tensors, quant) in [(mx, mx_t, true), (exact, exact_t, false)] {
        std::fs::create_dir_all(dir).unwrap();
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            std::fs::copy(src.path().join(f), dir.join(f)).unwrap();
        }
        let mut c = cfg.clone();
        if quant {
            c["quantization_config"] = serde_json::json!({
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.gate",
                    "model.embed_tokens", "lm_head"],
            });
        }
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let refs: Vec<(&str, Dtype, &[usize], &[u8])> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice()))
            .collect();
        std::fs::write(
            dir.join("model.safetensors"),
            crate::weights::safetensors_bytes(&refs),
        )
        .unwrap();
    }
}

#[test]
fn mxfp4_experts_are_cached_without_loss_and_compute_as_their_exact_values() {
    let tmp = tempfile::tempdir().unwrap();
    let (mx, exact, cache) = (
        tmp.path().join("mx"),
        tmp.path().join("exact"),
        tmp.path().join("cache"),
    );
    mxfp4_twins(&mx, &exact);
    let settings = |model: &Path, cached: bool| Settings {
        model: Some(model.to_string_lossy().into_owned()),
        quantization: Quantization::None,
        cache: cached,
        cache_dir: Some(cache.clone()),
        state_dir: Some(cache.join("state")),
        // Bit-for-bit against the f32 twin and the mock device: the exact path.
        activations: crate::backend::Activations::F32,
        ..Default::default()
    };
    let logits = |m: &crate::Model, ids: &[u32]| {
        let mut st = m.new_state();
        m.forward(ids, &mut st, crate::Logits::All, None).unwrap()
    };
    let ids = [5u32, 17, 300, 2047, 9, 1000, 77];
    let want = logits(&crate::Model::load(&settings(&exact, false)).unwrap(), &ids);
    assert!(want.iter().all(|v| v.is_finite()));

    let first = crate::Model::load(&settings(&mx, true)).unwrap();
    let report = first.cache_build_report().expect("the first load builds");
    assert!(report.prequant_error.is_none(), "kept without loss");
    let path = first.cache_path().unwrap().to_path_buf();
    // Every expert matrix is held in the 17-byte MXFP4 blocks.
    let plan = plan_of(
        &ModelFiles::Dir(mx.clone()),
        Quantization::None,
        &cache,
        false,
    );
    let experts: Vec<_> = plan
        .entries
        .iter()
        .filter(|e| matches!(e.role, Role::Expert { .. }))
        .collect();
    assert_eq!(experts.len(), 2 * 8 * 3);
    assert!(experts
        .iter()
        .all(|e| e.to == crate::weights::Dtype::Mxfp4 && e.size_bytes() == 64 * 64 / 32 * 17));
    let second = crate::Model::load(&settings(&mx, true)).unwrap();
    assert!(second.cache_build_report().is_none(), "the cache is reused");
    assert_eq!(second.cache_path(), Some(path.as_path()));
    let in_ram = crate::Model::load(&settings(&mx, false)).unwrap();
    // The CUDA backend on the mock device (each launch running its CPU twin): the MXFP4
    // kernels are the ones launched, and give the CPU's logits.
    let mock = std::sync::Arc::new(crate::backend::cuda::mock::MockGpu::new());
    let on_mock = crate::Model::load_on(
        &Settings {
            device: crate::backend::DeviceKind::Cuda,
            vram_budget: Some(1 << 30),
            ..settings(&mx, true)
        },
        crate::backend::AnyBackend::Cuda(crate::backend::cuda::Cuda::on(mock.clone(), u64::MAX)),
    )
    .unwrap();
    for (m, what) in [
        (&first, "built"),
        (&second, "mapped"),
        (&in_ram, "in RAM"),
        (&on_mock, "on the CUDA mock"),
    ] {
        let got = logits(m, &ids);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: MXFP4 experts differ from their exact f32 values"
        );
    }
    let mut st = on_mock.new_state();
    on_mock
        .forward(&ids[..1], &mut st, crate::Logits::Last, None)
        .unwrap();
    let launched = mock.launched();
    assert!(
        launched
            .iter()
            .any(|k| k.ends_with("_mxfp4") && k.starts_with("matvec_")),
        "{launched:?}"
    );
}
