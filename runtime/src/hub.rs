//! Finding a model: a folder, or a Hub id resolved offline in the local Hugging Face cache.
//!
//! Invariant: never any network access. A Hub id (`org/name`) resolves to
//! `<hub cache>/models--org--name/snapshots/<commit of refs/main>/`, where the hub cache is
//! `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The hub cache folder from the environment, as `huggingface_hub` computes it.
pub fn hub_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p).join("hub"));
    }
    let home = std::env::var_os("HOME").filter(|p| !p.is_empty())?;
    Some(PathBuf::from(home).join(".cache/huggingface/hub"))
}

/// Resolves `spec` (a folder or a Hub id) to a folder holding `config.json`.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_dir() {
        if !p.join("config.json").is_file() {
            return Err(Error::ModelNotFound {
                spec: spec.into(),
                reason: "the folder has no config.json".into(),
            });
        }
        return Ok(p.to_path_buf());
    }
    let gguf = p
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if gguf {
        return Err(Error::ModelNotFound {
            spec: spec.into(),
            reason: "GGUF files are not opened: pass the Hugging Face model folder it was made \
                     from (config.json with its safetensors) or its Hub id; `quantization` then \
                     makes and keeps this runtime's own quantized expert cache"
                .into(),
        });
    }
    if !looks_like_hub_id(spec) {
        return Err(Error::ModelNotFound {
            spec: spec.into(),
            reason: "no such folder".into(),
        });
    }
    let cache = hub_cache_dir().ok_or_else(|| Error::ModelNotFound {
        spec: spec.into(),
        reason: "no Hugging Face cache folder (set HF_HOME or HF_HUB_CACHE)".into(),
    })?;
    resolve_in_cache(spec, &cache)
}

/// Whether `spec` has the shape of a Hub id (`org/name`); [`resolve`] takes a folder first.
pub fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|s| !s.is_empty() && !s.starts_with('.') && !s.contains('\\'))
}

/// Resolves a Hub id in a given cache folder.
pub fn resolve_in_cache(id: &str, cache: &Path) -> Result<PathBuf> {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    let not_found = |reason: String| Error::ModelNotFound {
        spec: id.into(),
        reason,
    };
    if !repo.is_dir() {
        return Err(not_found(format!(
            "not a folder and not in the local Hugging Face cache ({} does not exist; download it first, nothing is fetched)",
            repo.display()
        )));
    }
    let snapshots = repo.join("snapshots");
    let commit = match std::fs::read_to_string(repo.join("refs/main")) {
        Ok(c) => c.trim().to_string(),
        Err(_) => {
            // No refs/main (e.g. downloaded by revision): accept a single snapshot.
            let entries: Vec<PathBuf> = std::fs::read_dir(&snapshots)
                .map_err(|e| not_found(format!("{}: {e}", snapshots.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            match entries.as_slice() {
                [one] => return check_snapshot(id, one.clone()),
                _ => {
                    return Err(not_found(format!(
                        "{} has no refs/main and {} snapshots",
                        repo.display(),
                        entries.len()
                    )))
                }
            }
        }
    };
    if commit.is_empty() || commit.contains('/') || commit.contains("..") {
        return Err(not_found(format!(
            "{} is not a commit hash",
            repo.join("refs/main").display()
        )));
    }
    check_snapshot(id, snapshots.join(commit))
}

fn check_snapshot(id: &str, dir: PathBuf) -> Result<PathBuf> {
    if !dir.join("config.json").is_file() {
        return Err(Error::ModelNotFound {
            spec: id.into(),
            reason: format!("snapshot {} has no config.json", dir.display()),
        });
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_refs_main_and_reports_missing() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--Org--Tiny-MoE");
        let snap = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(
            resolve_in_cache("Org/Tiny-MoE", cache.path()).unwrap(),
            snap
        );
        let e = resolve_in_cache("Org/Other", cache.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Org/Other") && e.contains("not in the local Hugging Face cache"),
            "{e}"
        );
        assert!(looks_like_hub_id("Qwen/Qwen3-30B-A3B"));
        assert!(!looks_like_hub_id("./x"));
        assert!(!looks_like_hub_id("a/b/c"));
    }
}
