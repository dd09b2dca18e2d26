//! The persisted quantized weight cache: quantize a model once, map the result on every later
//! start.
//!
//! One file per model and quantization in `cache_dir`, a GGUF container (readable by any GGUF
//! reader; not a llama.cpp model) named `<model>.<fingerprint>.x-<expert types>.r-<resident
//! type>.v<format>.gguf`. The fingerprint covers the layout of the source: config.json, the
//! shard index and every weight file's name, size and header. The bytes are covered too: the
//! file records each weight file's xxh3-128 (taken alongside the build, by positioned reads)
//! and its size, mtime, ctime, inode and device (see `sources`). Every start stats the weight
//! files (no read); a file whose stat differs is hashed again: same bytes, its new stat is
//! remembered in a sidecar (`<file>.sources.json`) and nothing is rebuilt; other bytes, the
//! cache is stale and rebuilt (or refused, naming the file). The file holds every weight the
//! model reads through a view (resident weights first, then each expert's gate, up and down side
//! by side in each held type, so one expert in one type is one contiguous range), 256-byte
//! aligned, then a checksum table: one xxh3-64 per tensor and one over the header and the table.
//!
//! What must always hold:
//! - **Written once, atomically.** A build streams into a temporary file in `cache_dir`, fsyncs
//!   it, renames it into place and fsyncs the folder; a file that has its final name is never
//!   opened for writing again (a repair writes a new file and renames it over the old one). A
//!   build killed at any point leaves at most a temporary file (`<file>.tmp-<pid>`), which
//!   nothing reads and the next start using `cache_dir` removes, whatever model or quantization
//!   it was for. Builders of one file take an exclusive lock beside it (`<file>.lock`) before
//!   creating their temporary file, so two processes never build the same file at once (the
//!   second waits and maps the first one's result), and a temporary file whose lock is free
//!   has no live builder; one whose lock is held is never removed.
//! - **Never used for other bytes of the model.** A weight file is trusted without reading it
//!   only when its stat equals the one recorded with its hash (in the file, or in the verified
//!   sidecar); otherwise its hash decides. A file of an older format (without the record) is
//!   rebuilt. `moe-serve cache verify` hashes every weight file again and names a changed one.
//! - **Never used silently damaged.** Opening checks the header, the version, the fingerprint,
//!   the tensor list, the length and the checksum table; each tensor's checksum is checked the
//!   first time its bytes are used (resident weights at load, experts when first routed), never
//!   by re-reading the whole file at start. A damaged tensor is converted again from the source
//!   for this run and the file is repaired in the background (`cache_rebuild = true`, the
//!   default), or the run fails naming the file (`cache_rebuild = false`).
//! - **Deterministic.** The same source and settings give the same bytes at any thread count.
//! - **Bounded memory.** A build holds a few batches of output and releases source pages as it
//!   goes: its resident set does not grow with the model.

pub mod api;
mod build;
mod file;
mod sources;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rayon::prelude::*;
use xxhash_rust::xxh3::Xxh3;

pub use build::{BuildProgress, BuildReport, Entry, Role};
pub use file::CacheFile;

use crate::error::{Error, Result};
use crate::gguf::Value;
use crate::model::ModelWeights;
use crate::quantize::{resident_tensors, ExpertTypes, Quantization};
use crate::store::{ExpertCheck, ExpertLayout, ExpertWeights};
use crate::weights::{ModelFiles, WeightSet};

/// Version of the file layout; a file of another version is rebuilt (or refused).
pub const FORMAT_VERSION: u32 = 2;
/// Tensor alignment in the file: a multiple of every SIMD width and of the device copy
/// engine's preferred alignment (the whole file is mapped, so pages need no alignment).
pub const ALIGNMENT: u64 = 256;

pub(crate) const CHECKSUMS_TENSOR: &str = "moe.cache.checksums";
pub(crate) const KEY_VERSION: &str = "moe.cache.version";
pub(crate) const KEY_FINGERPRINT: &str = "moe.cache.fingerprint";
pub(crate) const KEY_SOURCE: &str = "moe.cache.source";
pub(crate) const KEY_EXPERT_TYPES: &str = "moe.cache.expert_types";
pub(crate) const KEY_RESIDENT_TYPE: &str = "moe.cache.resident_type";
pub(crate) const KEY_SOURCE_TYPES: &str = "moe.cache.source_types";
const ARCHITECTURE: &str = "moe-offload-cache";

/// The config spelling of a quantization.
pub fn quantization_name(q: Quantization) -> &'static str {
    match q {
        Quantization::None => "none",
        Quantization::Bf16 => "bf16",
        Quantization::Q8_0 => "q8_0",
        Quantization::Q4K => "q4_k",
    }
}

/// Why an existing cache file cannot be used as it is.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("absent")]
    Missing,
    #[error("not a readable cache file ({0})")]
    Unreadable(String),
    #[error("a GGUF file that is not a quantized weight cache")]
    Foreign,
    #[error("written by format version {found}, this build reads version {FORMAT_VERSION}")]
    Version { found: u64 },
    #[error("stale: written for another model or another version of it (fingerprint {found:?})")]
    Stale { found: String },
    #[error("stale: weight file {file} changed since the cache was built (its bytes differ)")]
    SourceChanged { file: String },
    #[error("written for other settings: {0}")]
    Layout(String),
    #[error("truncated or extended: {len} bytes, expected {expected}")]
    Length { len: u64, expected: u64 },
    #[error("header or checksum table damaged (checksum mismatch)")]
    HeaderChecksum,
    #[error("{0}")]
    Io(String),
}

/// How a model uses its cache (from the settings).
#[derive(Clone)]
pub struct CacheOptions {
    pub dir: PathBuf,
    /// Rebuild a damaged cache (or the damaged tensors); else fail naming the file.
    pub rebuild: bool,
    /// Called as a build progresses.
    pub progress: Option<ProgressSink>,
    /// Test hook: builds fail writing past this many bytes.
    pub fail_after_bytes: Option<u64>,
}

/// A progress callback for cache builds.
#[derive(Clone)]
pub struct ProgressSink(pub Arc<dyn Fn(BuildProgress) + Send + Sync>);

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressSink")
    }
}

/// Which model and settings a cache file is for.
#[derive(Clone, Debug)]
pub struct CacheKey {
    /// xxh3-128 of config.json, the shard index and the weight files' names, sizes and
    /// headers (hex). The weight files' bytes are checked through their recorded hashes.
    pub fingerprint: String,
    /// Expert types held, hot first.
    pub expert_types: Vec<Quantization>,
    pub resident: Quantization,
    /// The model's folder name, for people reading the folder.
    pub label: String,
    /// Where the model came from (its folder, or the embedded model's label).
    pub source: String,
    /// The weight files, in the weight set's order.
    pub(crate) sources: Vec<sources::Source>,
    /// Each weight file's stat when the model was opened (`None` when embedded or unreadable):
    /// a build fails if a file changed since, as its bytes may no longer be what was opened.
    pub(crate) opened: Vec<Option<sources::Stat>>,
}

impl CacheKey {
    pub fn new(
        files: &ModelFiles,
        config_json: &[u8],
        weights: &WeightSet,
        experts: &ExpertTypes,
        resident: Quantization,
    ) -> CacheKey {
        let label: String = match files.dir() {
            Some(d) => d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into()),
            None => files.label(),
        }
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect();
        let source = source_of(files);
        let sources = sources::sources_of(files, weights);
        let opened = sources
            .iter()
            .map(|s| match s {
                sources::Source::File { path, .. } => sources::Stat::of(path).ok(),
                sources::Source::Embedded { .. } => None,
            })
            .collect();
        let index = files
            .read_small("model.safetensors.index.json")
            .ok()
            .flatten();
        CacheKey {
            fingerprint: fingerprint(config_json, index.as_deref(), weights),
            sources,
            opened,
            expert_types: experts.held(),
            resident,
            label: if label.is_empty() {
                "model".into()
            } else {
                label
            },
            source,
        }
    }

    /// The file name in `cache_dir`.
    pub fn file_name(&self) -> String {
        let experts: Vec<&str> = self
            .expert_types
            .iter()
            .map(|q| quantization_name(*q))
            .collect();
        format!(
            "{}.{}.x-{}.r-{}.v{FORMAT_VERSION}.gguf",
            self.label,
            &self.fingerprint[..16],
            experts.join("+"),
            quantization_name(self.resident)
        )
    }

    fn metadata(&self, entries: &[Entry], records: &[sources::Record]) -> Vec<(String, Value)> {
        let mut out = vec![
            (
                "general.architecture".into(),
                Value::String(ARCHITECTURE.into()),
            ),
            (
                crate::gguf::ALIGNMENT_KEY.into(),
                Value::U32(ALIGNMENT as u32),
            ),
            (KEY_VERSION.into(), Value::U32(FORMAT_VERSION)),
            (
                KEY_FINGERPRINT.into(),
                Value::String(self.fingerprint.clone()),
            ),
            (KEY_SOURCE.into(), Value::String(self.source.clone())),
            (
                KEY_EXPERT_TYPES.into(),
                Value::strings(self.expert_types.iter().map(|q| quantization_name(*q))),
            ),
            (
                KEY_RESIDENT_TYPE.into(),
                Value::String(quantization_name(self.resident).into()),
            ),
            (
                KEY_SOURCE_TYPES.into(),
                Value::strings(entries.iter().map(|e| e.source.dtype.name())),
            ),
        ];
        out.extend(sources::metadata(records));
        out
    }
}

/// Where a model came from, as cache files record it: its absolute folder, or the embedded
/// model's label.
pub(crate) fn source_of(files: &ModelFiles) -> String {
    match files.dir() {
        Some(d) => std::path::absolute(d)
            .unwrap_or_else(|_| d.to_path_buf())
            .display()
            .to_string(),
        None => files.label(),
    }
}

/// xxh3-128 over config.json, the shard index (when there is one) and every weight file's
/// name, length and header (hex): the layout of the source. Its bytes are covered by the
/// content hashes a cache file records (see `sources`).
pub fn fingerprint(config_json: &[u8], index_json: Option<&[u8]>, weights: &WeightSet) -> String {
    let mut h = Xxh3::new();
    h.update(b"moe-offload source fingerprint 2\0");
    h.update(&(config_json.len() as u64).to_le_bytes());
    h.update(config_json);
    let index = index_json.unwrap_or_default();
    h.update(&(index.len() as u64).to_le_bytes());
    h.update(index);
    for f in &weights.files {
        h.update(&(f.name.len() as u64).to_le_bytes());
        h.update(f.name.as_bytes());
        h.update(&f.len_bytes().to_le_bytes());
        let head = f.header_bytes();
        h.update(&(head.len() as u64).to_le_bytes());
        h.update(head);
    }
    format!("{:032x}", h.digest128())
}

/// An exclusive lock on building one cache file (`<file>.lock`, flock: released when the
/// process ends, however it ends).
struct BuildLock(#[allow(dead_code)] File);

impl BuildLock {
    fn acquire(path: &Path) -> Result<BuildLock> {
        let lock_path = with_suffix(path, ".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| cannot_write(path, &e.to_string()))?;
        // Held for the life of `f`.
        if crate::fsutil::try_lock_exclusive(&f).is_err() {
            tracing::info!("waiting for another process building {}", path.display());
            // Blocks until the other builder's lock is released.
            crate::fsutil::lock_exclusive(&f).map_err(|e| Error::io(lock_path, e))?;
        }
        Ok(BuildLock(f))
    }
}

/// Removes the temporary files (`<file>.gguf.tmp-<pid>`) of builds whose builder is gone, for
/// any model and quantization, from `dir`; returns how many. A builder holds the build lock
/// (`<file>.gguf.lock`) from before it creates its temporary file until it renames or removes
/// it, so a temporary file whose lock is absent or can be taken has no live builder; the file
/// is removed while this process holds that lock, so no build can start meanwhile. A temporary
/// file whose lock is held (by another process, or another build in this one) is kept.
pub fn remove_orphaned_temporaries(dir: &Path) -> usize {
    crate::fsutil::remove_orphans(
        dir,
        |entry, name| {
            let (target, pid) = name.rsplit_once(".tmp-")?;
            if !target.ends_with(".gguf")
                || pid.is_empty()
                || !pid.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            let lock_path = dir.join(format!("{target}.lock"));
            let lock = match std::fs::OpenOptions::new().write(true).open(&lock_path) {
                Ok(f) => Some(f),
                // Builders take the lock before creating their temporary file: none is building.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(_) => return None,
            };
            if let Some(f) = &lock {
                // Released when `lock` is dropped, after the removal; held: a live build.
                crate::fsutil::try_lock_exclusive(f).ok()?;
            }
            let bytes = entry.metadata().map_or(0, |m| m.len());
            Some((lock, bytes))
        },
        |path, (_lock, bytes)| {
            tracing::info!(
                "removed {} ({:.2} GB), left by a cache build that did not finish",
                path.display(),
                bytes as f64 / 1e9
            );
        },
    )
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

pub(crate) fn cannot_write(path: &Path, why: &str) -> Error {
    let dir = path.parent().unwrap_or(Path::new("."));
    Error::cache(
        path,
        format!(
            "cannot write the cache: {why}; the model files are untouched (make room in {} or set cache_dir to a writable folder with space, or cache = false)",
            dir.display()
        ),
    )
}

impl Error {
    pub(crate) fn cache(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Cache {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Free bytes for an unprivileged writer on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct we pass; `c` is a valid NUL-terminated path.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return None;
        }
        Some(s.f_bavail as u64 * s.f_frsize as u64)
    }
}

/// Everything needed to open, build or repair one model's cache file.
pub struct CachePlan {
    pub key: CacheKey,
    pub path: PathBuf,
    pub entries: Vec<Entry>,
    specs: Vec<crate::gguf::TensorSpec>,
    options: CacheOptions,
    /// Bytes of weight files hashed by this plan's checks so far (stat changes; 0 when every
    /// start found its stats unchanged).
    hashed_bytes: std::sync::atomic::AtomicU64,
}

impl CachePlan {
    pub fn new(
        mw: &mut ModelWeights,
        key: CacheKey,
        experts: &ExpertTypes,
        options: CacheOptions,
    ) -> Result<CachePlan> {
        let entries = build::entries(mw, experts, key.resident);
        let path = options.dir.join(key.file_name());
        let specs = build::specs(&entries).map_err(|m| Error::cache(&path, m))?;
        Ok(CachePlan {
            key,
            path,
            entries,
            specs,
            options,
            hashed_bytes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Bytes of the file once built.
    pub fn file_bytes(&self) -> u64 {
        let mut end = 0u64;
        for s in &self.specs {
            end = crate::gguf::align_up(end, ALIGNMENT).unwrap_or(u64::MAX);
            end = end.saturating_add(s.ty.tensor_bytes(&s.dims).unwrap_or(0));
        }
        end
    }

    fn expected(&self) -> file::Expected<'_> {
        file::Expected {
            fingerprint: &self.key.fingerprint,
            specs: &self.specs,
        }
    }

    /// Opens the file and checks it was built from the model's current bytes: the header
    /// (see [`CacheFile`]), then every weight file's stat against the record, hashing only the
    /// files whose stat changed.
    pub fn open(&self) -> std::result::Result<CacheFile, Problem> {
        let f = self.open_header()?;
        self.check_sources(&f)?;
        Ok(f)
    }

    /// Bytes of weight files this plan hashed to check the cache against them.
    pub fn source_bytes_hashed(&self) -> u64 {
        self.hashed_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Opens the file and checks its header, not the source.
    pub(crate) fn open_header(&self) -> std::result::Result<CacheFile, Problem> {
        CacheFile::open(&self.path, Some(&self.expected()))
    }

    /// Whether `f` was built from the weight files as they are now (see `sources`).
    fn check_sources(&self, f: &CacheFile) -> std::result::Result<(), Problem> {
        let names_match = f.sources.len() == self.key.sources.len()
            && f.sources
                .iter()
                .zip(&self.key.sources)
                .all(|(r, s)| r.name == s.name());
        if !names_match {
            // The fingerprint covers the names, so only a damaged header gets here.
            return Err(Problem::Unreadable(
                "its record of the weight files does not match the model's".into(),
            ));
        }
        match sources::check(
            &self.path,
            f.identity,
            &self.key.sources,
            &self.key.opened,
            &f.sources,
        ) {
            sources::Check::Current { hashed_bytes } => {
                self.hashed_bytes
                    .fetch_add(hashed_bytes, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            sources::Check::Changed { file } => Err(Problem::SourceChanged { file }),
            sources::Check::Unreadable(why) => Err(Problem::Io(why)),
        }
    }

    /// Re-hashes every weight file (whatever its stat) and returns the names of those whose
    /// bytes differ from what `f` records, or the error reading one.
    pub(crate) fn changed_sources(&self, f: &CacheFile) -> Result<Vec<String>> {
        let all: Vec<usize> = (0..self.key.sources.len()).collect();
        let cancel = std::sync::atomic::AtomicBool::new(false);
        let hashed = sources::hash_many(&self.key.sources, &all, &[], &cancel);
        let mut changed = Vec::new();
        for (i, r) in hashed.into_iter().enumerate() {
            let r = r.map_err(|why| Error::cache(&self.path, why))?;
            let recorded = f.sources.iter().find(|x| x.name == r.name);
            if recorded.is_none_or(|x| x.xxh3_128 != r.xxh3_128) {
                changed.push(self.key.sources[i].shown());
            }
        }
        Ok(changed)
    }

    /// Opens the file, building it first when absent, and rebuilding it when unusable or
    /// built from other bytes of the model (or failing, with `rebuild = false`). `force`
    /// rebuilds even an intact file. Removes temporary files of dead builders in `cache_dir`
    /// first.
    pub fn open_or_build(&self, force: bool) -> Result<(CacheFile, Option<BuildReport>)> {
        remove_orphaned_temporaries(&self.options.dir);
        // The identity of a file found built from other bytes: not checked (hashed) again.
        let mut rejected = None;
        if !force {
            let problem = match self.open_header() {
                Ok(f) => match self.check_sources(&f) {
                    Ok(()) => return Ok((f, None)),
                    Err(p) => {
                        rejected = Some(f.identity);
                        p
                    }
                },
                Err(p) => p,
            };
            match problem {
                Problem::Missing => {}
                p if !self.options.rebuild => {
                    return Err(Error::cache(
                        &self.path,
                        format!(
                            "{p}; not rebuilt because cache_rebuild = false (run `moe-serve cache build`, or delete the file)"
                        ),
                    ))
                }
                p => tracing::warn!(
                    "quantized weight cache {}: {p}; rebuilding it from {}",
                    self.path.display(),
                    self.key.source
                ),
            }
        }
        std::fs::create_dir_all(&self.options.dir)
            .map_err(|e| cannot_write(&self.path, &format!("cannot create the folder: {e}")))?;
        let _lock = BuildLock::acquire(&self.path)?;
        if !force {
            // Another process may have built it while this one waited for the lock.
            if let Ok(f) = self.open_header() {
                if Some(f.identity) != rejected && self.check_sources(&f).is_ok() {
                    return Ok((f, None));
                }
            }
        }
        self.remove_leftovers();
        let need = self.file_bytes();
        if let Some(free) = free_bytes(&self.options.dir) {
            if free < need {
                return Err(cannot_write(
                    &self.path,
                    &format!(
                        "it needs {:.2} GB and {} has {:.2} GB free",
                        need as f64 / 1e9,
                        self.options.dir.display(),
                        free as f64 / 1e9
                    ),
                ));
            }
        }
        tracing::info!(
            "building the quantized weight cache {} ({:.2} GB) from {}",
            self.path.display(),
            need as f64 / 1e9,
            self.key.source
        );
        let report = self.write(None)?;
        // The build recorded the source it read: only the header needs checking.
        let f = self.open_header().map_err(|p| {
            Error::cache(
                &self.path,
                format!("the file just written does not read back: {p}"),
            )
        })?;
        Ok((f, Some(report)))
    }

    /// Writes the file (atomically). A fresh build hashes every weight file alongside and
    /// records the hashes; a repair (`donor`, checked against the source when opened) keeps
    /// the damaged file's record, so it gives the very bytes of the intact file.
    fn write(&self, donor: Option<(&CacheFile, &[bool])>) -> Result<BuildReport> {
        let progress = |p: BuildProgress| {
            if let Some(sink) = &self.options.progress {
                (sink.0)(p)
            }
        };
        let cancel = std::sync::atomic::AtomicBool::new(false);
        let all: Vec<usize> = (0..self.key.sources.len()).collect();
        let result = std::thread::scope(|scope| {
            let hashing = donor.is_none().then(|| {
                scope.spawn(|| {
                    sources::hash_many(&self.key.sources, &all, &self.key.opened, &cancel)
                })
            });
            let hashing = Mutex::new(hashing);
            let late = || -> Result<Vec<(String, Value)>> {
                let Some(h) = hashing.lock().take() else {
                    return Ok(Vec::new());
                };
                let records: Vec<sources::Record> = h
                    .join()
                    .map_err(|_| Error::cache(&self.path, "the source hashing thread panicked"))?
                    .into_iter()
                    .collect::<std::result::Result<_, String>>()
                    .map_err(|why| {
                        Error::cache(
                            &self.path,
                            format!("hashing the model's weight files: {why}"),
                        )
                    })?;
                Ok(sources::metadata(&records))
            };
            // A repair records the donor's source as it is; a fresh build records placeholders
            // of the same encoded length, replaced once the hashes are known.
            let records = match donor {
                Some((file, _)) => file.sources.clone(),
                None => sources::placeholders(&self.key.sources),
            };
            let r = build::build(build::BuildJob {
                path: &self.path,
                entries: &self.entries,
                metadata: self.key.metadata(&self.entries, &records),
                alignment: ALIGNMENT,
                donor,
                progress: &progress,
                fail_after: self.options.fail_after_bytes,
                late_metadata: Some(&late),
            });
            // A failed build stops the hashing at its next chunk.
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            r
        });
        if result.is_ok() {
            // The sidecar belonged to the file replaced (its identity no longer matches).
            let _ = std::fs::remove_file(sources::sidecar_path(&self.path));
        }
        result.map_err(|e| match e {
            Error::Cache { .. } => e,
            other => cannot_write(&self.path, &other.to_string()),
        })
    }

    /// Under the build lock: removes temporary files of killed builds of this file, and cache
    /// files of this same source whose fingerprint or version is no longer current.
    fn remove_leftovers(&self) {
        let Some(name) = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
        else {
            return;
        };
        let Ok(dir) = std::fs::read_dir(&self.options.dir) else {
            return;
        };
        let tmp_prefix = format!("{name}.tmp-");
        for entry in dir.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if file_name.starts_with(&tmp_prefix) {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            if file_name == name
                || !file_name.ends_with(".gguf")
                || !file_name.starts_with(&format!("{}.", self.key.label))
            {
                continue;
            }
            let Ok(h) = crate::gguf::GgufFile::open(&entry.path()) else {
                continue;
            };
            let same_source =
                h.get(KEY_SOURCE).and_then(|v| v.as_str()) == Some(self.key.source.as_str());
            let current = h.get(KEY_FINGERPRINT).and_then(|v| v.as_str())
                == Some(self.key.fingerprint.as_str())
                && h.get(KEY_VERSION).and_then(|v| v.as_u64()) == Some(FORMAT_VERSION.into());
            if same_source && !current {
                tracing::info!(
                    "removing stale quantized weight cache {} (its model changed since it was built)",
                    entry.path().display()
                );
                let _ = std::fs::remove_file(entry.path());
                let _ = std::fs::remove_file(with_suffix(&entry.path(), ".lock"));
                let _ = std::fs::remove_file(sources::sidecar_path(&entry.path()));
            }
        }
    }
}

/// A model's cache in use: the mapped file plus what is needed to replace damaged tensors.
pub struct CacheHandle {
    inner: Arc<Inner>,
}

struct Inner {
    plan: CachePlan,
    file: Arc<CacheFile>,
    /// Per layer, per expert: index of the entry of its first part in the type it uses (its
    /// parts follow in the layout's order), and its layout (to rebuild a damaged expert).
    expert_first: Vec<Vec<(usize, ExpertLayout)>>,
    /// The background repair started in this run (at most one: it checks every tensor).
    repair: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl CacheHandle {
    /// Maps the cache (building it if needed) and points every weight view of `mw` at it:
    /// resident weights are checked now, experts when first used (through [`ExpertCheck`]).
    pub fn attach(
        mw: &mut ModelWeights,
        plan: CachePlan,
        experts: &ExpertTypes,
    ) -> Result<(CacheHandle, Option<BuildReport>)> {
        let (file, report) = plan.open_or_build(false)?;
        let file = Arc::new(file);
        let by_name: HashMap<&str, usize> = plan
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.role == Role::Resident)
            .map(|(i, e)| (e.name.as_str(), i))
            .collect();
        let mut first: HashMap<(usize, usize, Quantization), usize> = HashMap::new();
        for (i, e) in plan.entries.iter().enumerate() {
            if let Role::Expert {
                layer,
                expert,
                part: 0,
                ty,
            } = e.role
            {
                first.insert((layer, expert, ty), i);
            }
        }
        // Resident weights: checked now, in parallel (the first forward reads them anyway).
        let resident: Vec<usize> = by_name.values().copied().collect();
        let damaged: Vec<usize> = resident
            .par_iter()
            .filter(|&&i| {
                let t = file.tensor_ref(i, &plan.entries[i]);
                !file.check(i, t.bytes())
            })
            .copied()
            .collect();
        let mut replaced: HashMap<usize, crate::weights::TensorRef> = HashMap::new();
        if !damaged.is_empty() {
            let names: Vec<&str> = damaged
                .iter()
                .map(|&i| plan.entries[i].name.as_str())
                .collect();
            if !plan.options.rebuild {
                return Err(Error::cache(
                    &plan.path,
                    format!(
                        "tensor(s) {} fail their checksum (the file is damaged); not rebuilt because cache_rebuild = false",
                        names.join(", ")
                    ),
                ));
            }
            tracing::warn!(
                "quantized weight cache {}: tensor(s) {} fail their checksum; converting them again from the source and repairing the file",
                plan.path.display(),
                names.join(", ")
            );
            for &i in &damaged {
                replaced.insert(i, convert_again(&plan.entries[i])?);
            }
        }
        for (t, _) in resident_tensors(mw) {
            let i = by_name[t.name.as_str()];
            *t = match replaced.get(&i) {
                Some(r) => r.clone(),
                None => file.tensor_ref(i, &plan.entries[i]),
            };
        }
        let mut expert_first = Vec::with_capacity(mw.experts.len());
        for (l, list) in mw.experts.iter_mut().enumerate() {
            let mut firsts = Vec::with_capacity(list.len());
            for (x, e) in list.iter_mut().enumerate() {
                let i = first[&(l, x, experts.of(l, x))];
                for (p, t) in e.parts.iter_mut().enumerate() {
                    *t = file.tensor_ref(i + p, &plan.entries[i + p]);
                }
                firsts.push((i, e.layout));
            }
            expert_first.push(firsts);
        }
        let handle = CacheHandle {
            inner: Arc::new(Inner {
                plan,
                file,
                expert_first,
                repair: Mutex::new(None),
            }),
        };
        if !damaged.is_empty() {
            handle.start_repair();
        }
        Ok((handle, report))
    }

    pub fn path(&self) -> &Path {
        &self.inner.plan.path
    }

    /// Starts the background repair, once per run: it checks every tensor, so damage found
    /// after it started is repaired too if it predates the check.
    fn start_repair(&self) {
        let mut repair = self.inner.repair.lock();
        if repair.is_some() {
            return;
        }
        let inner = self.inner.clone();
        *repair = Some(std::thread::spawn(move || {
            if let Err(e) = inner.repair() {
                tracing::warn!("{e}");
            }
        }));
    }

    /// Waits for a repair started in this run, if any, to finish.
    pub fn wait_for_repair(&self) {
        let h = self.inner.repair.lock().take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }
}

impl Inner {
    /// Writes a new file: intact tensors copied from the damaged one, the rest converted from
    /// the source; then renamed over it.
    fn repair(&self) -> Result<()> {
        let _lock = BuildLock::acquire(&self.plan.path)?;
        let intact = self.file.verify_all()?;
        let bad = intact.iter().filter(|ok| !**ok).count();
        let report = self.plan.write(Some((&self.file, &intact)))?;
        tracing::info!(
            "repaired quantized weight cache {}: {bad} tensor(s) converted again, {} copied",
            report.path.display(),
            report.reused_tensors
        );
        Ok(())
    }
}

/// Tensor `e` converted from the source into memory (a damaged tensor's replacement).
fn convert_again(e: &Entry) -> Result<crate::weights::TensorRef> {
    Ok(match e.source.quantize(e.to)? {
        Some(t) => t,
        None => e.source.clone().into_compute()?.to_owned_copy(),
    })
}

impl ExpertCheck for CacheHandle {
    fn check(&self, layer: usize, expert: usize, parts: &[&[u8]]) -> Result<Option<ExpertWeights>> {
        let inner = &self.inner;
        let (first, layout) = inner.expert_first[layer][expert];
        let bad: Vec<usize> = (0..parts.len())
            .filter(|&p| !inner.file.check(first + p, parts[p]))
            .map(|p| first + p)
            .collect();
        if bad.is_empty() {
            return Ok(None);
        }
        let names: Vec<&str> = bad
            .iter()
            .map(|&i| inner.plan.entries[i].name.as_str())
            .collect();
        if !inner.plan.options.rebuild {
            return Err(Error::cache(
                &inner.plan.path,
                format!(
                    "tensor(s) {} fail their checksum (the file is damaged); not rebuilt because cache_rebuild = false",
                    names.join(", ")
                ),
            ));
        }
        tracing::warn!(
            "quantized weight cache {}: tensor(s) {} fail their checksum; converting expert {expert} of layer {layer} again from the source and repairing the file",
            inner.plan.path.display(),
            names.join(", ")
        );
        let e = &inner.plan.entries;
        let rebuilt = ExpertWeights::new(
            layout,
            (first..first + parts.len())
                .map(|i| convert_again(&e[i]))
                .collect::<Result<_>>()?,
        );
        self.start_repair();
        Ok(Some(rebuilt))
    }
}
