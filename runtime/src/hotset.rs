//! Expert popularity remembered across runs (the hot set), kept in `state_dir`.
//!
//! After a run the store's per-expert token counts are merged into
//! `<state_dir>/hotset/<fingerprint>.json`; the next start loads the hottest experts first (and
//! pins them under the `pinned-lru` policy). The fingerprint covers config.json and every weight
//! file's name, size and header, so a changed model never reuses another's hot set.
//!
//! Invariants: a stale (other fingerprint or shape) or corrupt file is ignored with a warning and
//! replaced on the next save; files are written atomically; old counts decay so the hot set
//! follows the workload.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::weights::WeightSet;

const VERSION: u64 = 1;

/// Weight of the remembered counts when a run's counts are merged in: halves each run, so a
/// workload change shows within a few runs.
const DECAY: f64 = 0.5;

/// FNV-1a, 64 bit: stable across platforms and releases (unlike std's hasher).
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A fingerprint of a model: config.json plus every weight file's name, size and tensor table.
pub fn fingerprint(config_json: &[u8], weights: &WeightSet) -> String {
    let mut h = fnv1a(0xcbf2_9ce4_8422_2325, config_json);
    for f in &weights.files {
        h = fnv1a(h, f.name.as_bytes());
        for (name, t) in &f.tensors {
            h = fnv1a(h, name.as_bytes());
            h = fnv1a(h, &(t.start as u64).to_le_bytes());
            h = fnv1a(h, &(t.end as u64).to_le_bytes());
        }
    }
    format!("{h:016x}")
}

/// Where the hot set of a model with this fingerprint lives.
pub fn path(state_dir: &Path, fingerprint: &str) -> PathBuf {
    state_dir.join("hotset").join(format!("{fingerprint}.json"))
}

/// Reads the remembered counts; None (with a warning) when absent, stale or corrupt.
pub fn load(path: &Path, fingerprint: &str, experts_per_layer: &[usize]) -> Option<Vec<Vec<u64>>> {
    let bytes = std::fs::read(path).ok()?;
    let warn = |why: &str| {
        tracing::warn!("ignoring hot-set file {}: {why}", path.display());
        None
    };
    let v: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(_) => return warn("not valid JSON"),
    };
    if v["version"].as_u64() != Some(VERSION) || v["fingerprint"].as_str() != Some(fingerprint) {
        return warn("written for another model or version");
    }
    let Some(layers) = v["counts"].as_array() else {
        return warn("no counts");
    };
    if layers.len() != experts_per_layer.len() {
        return warn("layer count differs");
    }
    let mut out = Vec::with_capacity(layers.len());
    for (l, n) in layers.iter().zip(experts_per_layer) {
        let counts: Option<Vec<u64>> = l
            .as_array()
            .map(|a| a.iter().map(|c| c.as_u64()).collect::<Option<Vec<u64>>>())
            .unwrap_or(None);
        match counts {
            Some(c) if c.len() == *n => out.push(c),
            _ => return warn("expert counts do not match the model"),
        }
    }
    Some(out)
}

/// Merges this run's counts into the remembered ones (decayed) and writes the file atomically.
pub fn save(
    path: &Path,
    fingerprint: &str,
    old: Option<&[Vec<u64>]>,
    run: &[Vec<u64>],
) -> Result<()> {
    let merged: Vec<Vec<u64>> = run
        .iter()
        .enumerate()
        .map(|(l, layer)| {
            layer
                .iter()
                .enumerate()
                .map(|(e, &c)| {
                    let prev = old
                        .and_then(|o| o.get(l))
                        .and_then(|o| o.get(e))
                        .copied()
                        .unwrap_or(0);
                    (prev as f64 * DECAY).round() as u64 + c
                })
                .collect()
        })
        .collect();
    let v = serde_json::json!({"version": VERSION, "fingerprint": fingerprint, "counts": merged});
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
    }
    crate::fsutil::write_atomic(path, v.to_string().as_bytes())
}

/// (layer, expert) pairs by descending count; experts never used are left out.
pub fn ranking(counts: &[Vec<u64>]) -> Vec<(usize, usize)> {
    let mut all: Vec<(u64, usize, usize)> = counts
        .iter()
        .enumerate()
        .flat_map(|(l, c)| c.iter().enumerate().map(move |(e, &n)| (n, l, e)))
        .filter(|&(n, _, _)| n > 0)
        .collect();
    all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    all.into_iter().map(|(_, l, e)| (l, e)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_decay_and_stale_files() {
        let d = tempfile::tempdir().unwrap();
        let p = path(d.path(), "abc");
        assert!(load(&p, "abc", &[2, 2]).is_none());
        save(&p, "abc", None, &[vec![4, 0], vec![1, 9]]).unwrap();
        let c = load(&p, "abc", &[2, 2]).unwrap();
        assert_eq!(c, vec![vec![4, 0], vec![1, 9]]);
        assert_eq!(ranking(&c), vec![(1, 1), (0, 0), (1, 0)]);
        save(&p, "abc", Some(&c), &[vec![0, 2], vec![0, 0]]).unwrap();
        assert_eq!(
            load(&p, "abc", &[2, 2]).unwrap(),
            vec![vec![2, 2], vec![1, 5]]
        );
        // Another model, another shape, garbage: ignored.
        assert!(load(&p, "other", &[2, 2]).is_none());
        assert!(load(&p, "abc", &[2, 3]).is_none());
        std::fs::write(&p, b"{garbage").unwrap();
        assert!(load(&p, "abc", &[2, 2]).is_none());
    }
}
