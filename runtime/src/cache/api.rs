//! The cache commands' work on a cache file (`moe-serve cache build|verify|info|clear`):
//! building or checking one from its [`CachePlan`], describing one from its header, removing a
//! folder's files. Locating and opening the model is [`crate::open::cache_cmd`]'s; nothing here
//! knows the settings or the engine.

use std::path::{Path, PathBuf};

use super::{
    BuildReport, CacheFile, CachePlan, Problem, KEY_EXPERT_TYPES, KEY_FINGERPRINT,
    KEY_RESIDENT_TYPE, KEY_SOURCE, KEY_SOURCE_TYPES, KEY_VERSION,
};
use crate::error::{Error, Result};

/// What `build` did.
#[derive(Clone, Debug)]
pub struct BuildOutcome {
    pub path: PathBuf,
    pub file_bytes: u64,
    /// `None` when an intact file was already there.
    pub report: Option<BuildReport>,
}

/// Builds the cache `plan` describes, unless an intact one exists (`force` rebuilds it
/// anyway).
pub fn build_plan(plan: &CachePlan, force: bool) -> Result<BuildOutcome> {
    let (file, report) = plan.open_or_build(force)?;
    Ok(BuildOutcome {
        path: plan.path.clone(),
        file_bytes: file.file_bytes(),
        report,
    })
}

/// What `verify` found.
#[derive(Clone, Debug)]
pub struct VerifyReport {
    pub path: PathBuf,
    /// Why the file cannot be used at all (absent, truncated, stale...), if so.
    pub problem: Option<String>,
    pub tensors: usize,
    /// Tensors whose checksum fails.
    pub damaged: Vec<String>,
    /// Weight files whose bytes differ from what the cache was built from (the cache is
    /// stale; `problem` says so too, naming the first).
    pub changed_sources: Vec<String>,
    pub file_bytes: u64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problem.is_none() && self.damaged.is_empty() && self.changed_sources.is_empty()
    }
}

/// Reads the whole cache file `plan` describes and checks every checksum, and hashes every
/// weight file of the model again to check the cache was built from its bytes.
pub fn verify_plan(plan: &CachePlan) -> Result<VerifyReport> {
    let mut report = VerifyReport {
        path: plan.path.clone(),
        problem: None,
        tensors: plan.entries.len(),
        damaged: Vec::new(),
        changed_sources: Vec::new(),
        file_bytes: 0,
    };
    match plan.open_header() {
        Err(p) => report.problem = Some(p.to_string()),
        Ok(file) => {
            report.changed_sources = plan.changed_sources(&file)?;
            if let Some(first) = report.changed_sources.first() {
                let more = report.changed_sources.len() - 1;
                report.problem = Some(format!(
                    "{}{}",
                    Problem::SourceChanged {
                        file: first.clone()
                    },
                    if more > 0 {
                        format!(" (and {more} more weight file(s))")
                    } else {
                        String::new()
                    }
                ));
            }
            report.file_bytes = file.file_bytes();
            let intact = file.verify_all()?;
            report.damaged = intact
                .iter()
                .zip(&plan.entries)
                .filter(|(ok, _)| !**ok)
                .map(|(_, e)| e.name.clone())
                .collect();
        }
    }
    Ok(report)
}

/// One tensor of a cache file, as `info` lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TensorRow {
    pub name: String,
    /// GGML type name (`Q8_0`, `BF16`, ...).
    pub dtype: String,
    /// Shape, outermost first (as the source stores it).
    pub shape: Vec<u64>,
    /// Absolute offset of the data in the file.
    pub offset: u64,
    pub bytes: u64,
    /// The source's dtype.
    pub source_dtype: String,
    /// Stored in its source type (not quantized).
    pub kept: bool,
}

/// What `info` shows of a cache file.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CacheInfo {
    pub path: PathBuf,
    pub file_bytes: u64,
    pub version: u64,
    pub fingerprint: String,
    pub source: String,
    pub expert_types: Vec<String>,
    pub resident_type: String,
    pub tensors: Vec<TensorRow>,
}

/// Describes a cache file from its header (reads no tensor data).
pub fn info(path: &Path) -> Result<CacheInfo> {
    let file = CacheFile::open(path, None).map_err(|p| match p {
        Problem::Missing => Error::cache(path, "not built yet (run `moe-serve cache build`)"),
        p => Error::cache(path, p.to_string()),
    })?;
    let sources = file.meta_strings(KEY_SOURCE_TYPES);
    let tensors = file.header.tensors[..file.len()]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let source_dtype = sources.get(i).cloned().unwrap_or_default();
            TensorRow {
                name: t.name.clone(),
                dtype: t.ty.name().to_string(),
                shape: t.dims.iter().rev().copied().collect(),
                offset: t.offset,
                bytes: t.size,
                kept: source_dtype == t.ty.name(),
                source_dtype,
            }
        })
        .collect();
    Ok(CacheInfo {
        path: path.to_path_buf(),
        file_bytes: file.file_bytes(),
        version: file
            .header
            .get(KEY_VERSION)
            .and_then(|v| v.as_u64())
            .unwrap_or(0),
        fingerprint: file.meta_str(KEY_FINGERPRINT).unwrap_or("").to_string(),
        source: file.meta_str(KEY_SOURCE).unwrap_or("").to_string(),
        expert_types: file.meta_strings(KEY_EXPERT_TYPES),
        resident_type: file.meta_str(KEY_RESIDENT_TYPE).unwrap_or("").to_string(),
        tensors,
    })
}

/// Removes the cache files in `dir` built from `source` (every quantization, fingerprint and
/// version built from that folder), or with `None` every cache file in `dir`, with their lock
/// and temporary files. Returns each removed cache file and its size.
pub fn clear_dir(dir: &Path, source: Option<&str>) -> Result<Vec<(PathBuf, u64)>> {
    let dir = dir.to_path_buf();
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
            continue;
        }
        let Ok(h) = crate::gguf::GgufFile::open(&path) else {
            continue;
        };
        if h.get(KEY_VERSION).is_none() {
            continue; // not one of ours
        }
        let matches = match source {
            None => true,
            Some(s) => h.get(KEY_SOURCE).and_then(|v| v.as_str()) == Some(s),
        };
        if !matches {
            continue;
        }
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        let _ = std::fs::remove_file(super::with_suffix(&path, ".lock"));
        let _ = std::fs::remove_file(super::sources::sidecar_path(&path));
        removed.push((path, h.file_len));
    }
    // Temporary files of interrupted builds: of any file whose builder is gone, and of the
    // removed files.
    super::remove_orphaned_temporaries(&dir);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if removed.iter().any(|(p, _)| {
                p.file_name()
                    .is_some_and(|f| name.starts_with(&format!("{}.tmp-", f.to_string_lossy())))
            }) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(removed)
}
