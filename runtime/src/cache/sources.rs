//! The identity of a cache's source: what a cache file records of each weight file it was built
//! from, how a start checks that record cheaply, and the sidecar that remembers a file found
//! unchanged after its metadata changed.
//!
//! A cache file records, per weight file (shard): its name, an xxh3-128 over all its bytes, and
//! its size, mtime, ctime (ns), inode and device as they were when the hash was taken. A start
//! stats every shard (no read): a shard whose stat equals the record is trusted. Any difference (a touch, a copy, a re-save in place) has the shard hashed
//! again, by positioned reads in bounded memory, shards in parallel: the same hash means the
//! bytes did not change (the new stat is remembered in the sidecar `<cache file>.sources.json`,
//! so the next start is cheap again); another hash means the cache is stale. The embedded model
//! (static bytes, no stat) is hashed directly.
//!
//! What must always hold:
//! - **A changed byte is never trusted.** Writing a file changes its mtime and ctime (ctime
//!   cannot be set by user programs), replacing it changes its inode: a stat equal to the
//!   record means the bytes the record hashed. A stat taken so soon after the file's last
//!   change that a later write could keep the same timestamps (within [`RACY_WINDOW_NS`]) is
//!   recorded as unknown (zeros, which no file has): such a file is hashed again at the next
//!   start, and its stat remembered once settled.
//! - **Deterministic.** The record holds no time of its own: the same bytes and settled stats
//!   give the same record, so a rebuild or a repair gives the same file.
//! - **The sidecar cannot vouch for other bytes.** It is written atomically, carries a checksum
//!   and the identity of the cache file it belongs to, and only maps a new stat to the hash the
//!   cache file itself records; a damaged, foreign or outdated sidecar is ignored.
//! - **Bounded memory.** Hashing holds one chunk per thread, whatever the shard's size.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::gguf::{Value, ValueType};
use crate::weights::{ModelFiles, WeightSet};

/// Bytes read per positioned read when hashing (one buffer per thread).
const HASH_CHUNK_BYTES: usize = 8 << 20;
/// Shards hashed at once: a few sequential streams keep a disk busy; more add only seeks.
const HASH_THREADS: usize = 4;
/// A file changed less than this long before its stat was taken may change again with the same
/// timestamps (coarse file-system clocks: a kernel tick, 2 s on FAT), so that stat is not
/// trusted; the file is hashed again at the next start.
pub(crate) const RACY_WINDOW_NS: i64 = 2_000_000_000;
/// Version of the sidecar's layout.
const SIDECAR_FORMAT: u32 = 1;
/// The stat recorded for an embedded file, or a file too recently changed to be trusted.
const UNKNOWN: Stat = Stat {
    size_bytes: 0,
    mtime_ns: 0,
    ctime_ns: 0,
    inode: 0,
    device: 0,
};

pub(crate) const KEY_FILES: &str = "moe.cache.source_files";
pub(crate) const KEY_XXH3_128: &str = "moe.cache.source_xxh3_128";
pub(crate) const KEY_SIZES: &str = "moe.cache.source_sizes";
pub(crate) const KEY_MTIMES_NS: &str = "moe.cache.source_mtimes_ns";
pub(crate) const KEY_CTIMES_NS: &str = "moe.cache.source_ctimes_ns";
pub(crate) const KEY_INODES: &str = "moe.cache.source_inodes";
pub(crate) const KEY_DEVICES: &str = "moe.cache.source_devices";

pub(crate) use crate::fsutil::FileStat as Stat;

/// One weight file as a cache file records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Record {
    pub name: String,
    /// xxh3-128 of every byte of the file, 32 hex digits.
    pub xxh3_128: String,
    /// The file's stat when it was hashed; zeros (unknown) for an embedded file or one
    /// changed too shortly before.
    pub stat: Stat,
}

impl Record {
    /// Whether a file whose stat is now `now` certainly holds the bytes this record hashed.
    fn vouches_for(&self, now: &Stat) -> bool {
        self.stat != UNKNOWN && *now == self.stat
    }
}

/// Where one weight file's bytes are.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    File { name: String, path: PathBuf },
    Embedded { name: String, bytes: &'static [u8] },
}

impl Source {
    pub fn name(&self) -> &str {
        match self {
            Source::File { name, .. } | Source::Embedded { name, .. } => name,
        }
    }

    /// The path used in messages.
    pub fn shown(&self) -> String {
        match self {
            Source::File { path, .. } => path.display().to_string(),
            Source::Embedded { name, .. } => format!("<embedded>/{name}"),
        }
    }
}

/// The weight files of a model, in the weight set's order.
pub(crate) fn sources_of(files: &ModelFiles, weights: &WeightSet) -> Vec<Source> {
    weights
        .files
        .iter()
        .map(|f| match files {
            ModelFiles::Dir(_) => Source::File {
                name: f.name.clone(),
                path: f.path.clone(),
            },
            ModelFiles::Embedded { files, .. } => Source::Embedded {
                name: f.name.clone(),
                bytes: files
                    .iter()
                    .find(|e| e.name == f.name)
                    .map_or(&[][..], |e| e.bytes),
            },
        })
        .collect()
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn hex128(h: u128) -> String {
    format!("{h:032x}")
}

/// Hashes one weight file (all its bytes), checking it did not change while being read, nor
/// since `expected` (its stat when the model was opened) when given. Stops early, with an
/// error, once `cancel` is set. The error is one line naming the file.
pub(crate) fn hash_one(
    src: &Source,
    expected: Option<&Stat>,
    cancel: &AtomicBool,
) -> Result<Record, String> {
    let (name, path) = match src {
        Source::Embedded { name, bytes } => {
            let mut h = Xxh3::new();
            h.update(bytes);
            return Ok(Record {
                name: name.clone(),
                xxh3_128: hex128(h.digest128()),
                stat: UNKNOWN,
            });
        }
        Source::File { name, path } => (name, path),
    };
    let shown = path.display();
    let hashed_at_ns = now_ns();
    let file = std::fs::File::open(path).map_err(|e| format!("{shown}: {e}"))?;
    let before = file
        .metadata()
        .map(|m| Stat::of_metadata(&m))
        .map_err(|e| format!("{shown}: {e}"))?;
    if expected.is_some_and(|s| *s != before) {
        return Err(format!(
            "{shown} changed since the model was opened (its size, times or inode differ); start again once it is complete"
        ));
    }
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; HASH_CHUNK_BYTES.min(before.size_bytes as usize).max(1)];
    let mut pos = 0u64;
    while pos < before.size_bytes {
        if cancel.load(Ordering::Relaxed) {
            return Err(format!("{shown}: hashing cancelled"));
        }
        let n = (before.size_bytes - pos).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], pos).map_err(|e| {
            format!("{shown}: reading {n} bytes at offset {pos} to hash it failed: {e}")
        })?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    let after = Stat::of(path).map_err(|e| format!("{shown}: {e}"))?;
    if after != before {
        return Err(format!(
            "{shown} changed while it was being read (its size, times or inode differ); start again once it is complete"
        ));
    }
    // A write in the same clock tick as the file's last change would leave its stat as is.
    let settled = before.mtime_ns.max(before.ctime_ns) <= hashed_at_ns - RACY_WINDOW_NS;
    Ok(Record {
        name: name.clone(),
        xxh3_128: hex128(h.digest128()),
        stat: if settled { before } else { UNKNOWN },
    })
}

/// Hashes the sources at `which` (indices), up to [`HASH_THREADS`] at once. `expected[i]`, when
/// given, is source `i`'s stat when the model was opened.
pub(crate) fn hash_many(
    sources: &[Source],
    which: &[usize],
    expected: &[Option<Stat>],
    cancel: &AtomicBool,
) -> Vec<Result<Record, String>> {
    let next = AtomicUsize::new(0);
    let threads = HASH_THREADS.min(which.len()).max(1);
    let slots: parking_lot::Mutex<Vec<Option<Result<Record, String>>>> =
        parking_lot::Mutex::new(vec![None; which.len()]);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = which.get(k) else { break };
                let r = hash_one(
                    &sources[i],
                    expected.get(i).and_then(Option::as_ref),
                    cancel,
                );
                slots.lock()[k] = Some(r);
            });
        }
    });
    slots
        .into_inner()
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("hashing did not run".into())))
        .collect()
}

/// The records as cache-file metadata (fixed-size encodings: a second call with other values
/// gives values of the same encoded lengths, so they can replace the first in place).
pub(crate) fn metadata(records: &[Record]) -> Vec<(String, Value)> {
    let u64s = |f: &dyn Fn(&Record) -> u64| {
        Value::Array(
            ValueType::U64,
            records.iter().map(|r| Value::U64(f(r))).collect(),
        )
    };
    let i64s = |f: &dyn Fn(&Record) -> i64| {
        Value::Array(
            ValueType::I64,
            records.iter().map(|r| Value::I64(f(r))).collect(),
        )
    };
    vec![
        (
            KEY_FILES.into(),
            Value::strings(records.iter().map(|r| r.name.clone())),
        ),
        (
            KEY_XXH3_128.into(),
            Value::strings(records.iter().map(|r| r.xxh3_128.clone())),
        ),
        (KEY_SIZES.into(), u64s(&|r| r.stat.size_bytes)),
        (KEY_MTIMES_NS.into(), i64s(&|r| r.stat.mtime_ns)),
        (KEY_CTIMES_NS.into(), i64s(&|r| r.stat.ctime_ns)),
        (KEY_INODES.into(), u64s(&|r| r.stat.inode)),
        (KEY_DEVICES.into(), u64s(&|r| r.stat.device)),
    ]
}

/// Placeholder records (the right names, zero hashes and stats) whose metadata has the encoded
/// length of the real ones.
pub(crate) fn placeholders(sources: &[Source]) -> Vec<Record> {
    sources
        .iter()
        .map(|s| Record {
            name: s.name().to_string(),
            xxh3_128: hex128(0),
            stat: UNKNOWN,
        })
        .collect()
}

/// The records a cache file's header holds, or why they cannot be read.
pub(crate) fn from_header(h: &crate::gguf::GgufFile) -> Result<Vec<Record>, String> {
    let arr = |key: &str| {
        h.get(key)
            .and_then(|v| v.as_array())
            .ok_or_else(|| format!("no `{key}` record of the source"))
    };
    let names = arr(KEY_FILES)?;
    let n = names.len();
    let strs = |key: &str| -> Result<Vec<String>, String> {
        let a = arr(key)?;
        let v: Vec<String> = a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        if v.len() != n {
            return Err(format!("`{key}` does not hold {n} strings"));
        }
        Ok(v)
    };
    let ints = |key: &str| -> Result<Vec<i128>, String> {
        let a = arr(key)?;
        let v: Vec<i128> = a
            .iter()
            .filter_map(|v| match *v {
                Value::U64(x) => Some(i128::from(x)),
                Value::I64(x) => Some(i128::from(x)),
                _ => None,
            })
            .collect();
        if v.len() != n {
            return Err(format!("`{key}` does not hold {n} integers"));
        }
        Ok(v)
    };
    let names = strs(KEY_FILES)?;
    let hashes = strs(KEY_XXH3_128)?;
    let (sizes, mtimes, ctimes) = (ints(KEY_SIZES)?, ints(KEY_MTIMES_NS)?, ints(KEY_CTIMES_NS)?);
    let (inodes, devices) = (ints(KEY_INODES)?, ints(KEY_DEVICES)?);
    Ok((0..n)
        .map(|i| Record {
            name: names[i].clone(),
            xxh3_128: hashes[i].clone(),
            stat: Stat {
                size_bytes: sizes[i] as u64,
                mtime_ns: mtimes[i] as i64,
                ctime_ns: ctimes[i] as i64,
                inode: inodes[i] as u64,
                device: devices[i] as u64,
            },
        })
        .collect())
}

/// The sidecar of a cache file: newer stats of weight files found unchanged by their hash.
#[derive(serde::Serialize, serde::Deserialize)]
struct SidecarBody {
    format: u32,
    /// The cache file's name and identity (the checksum of its header and checksum table).
    cache_file: String,
    cache_identity: String,
    sources: Vec<Record>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Sidecar {
    body: SidecarBody,
    /// xxh3-64 of the body's JSON, 16 hex digits.
    xxh3_64: String,
}

/// Where a cache file's sidecar lives.
pub(crate) fn sidecar_path(cache: &Path) -> PathBuf {
    super::with_suffix(cache, ".sources.json")
}

/// The sidecar's records for the cache file at `cache` with identity `identity`, each
/// checked against `recorded` (same name and hash); `None` when absent, damaged or foreign.
pub(crate) fn read_sidecar(
    cache: &Path,
    identity: u64,
    recorded: &[Record],
) -> Vec<Option<Record>> {
    let none = vec![None; recorded.len()];
    let path = sidecar_path(cache);
    let Ok(raw) = std::fs::read(&path) else {
        return none;
    };
    let parsed: Option<Sidecar> = serde_json::from_slice(&raw).ok();
    let valid = parsed.filter(|s| {
        let body = serde_json::to_vec(&s.body).unwrap_or_default();
        s.xxh3_64 == format!("{:016x}", xxh3_64(&body))
            && s.body.format == SIDECAR_FORMAT
            && s.body.cache_identity == format!("{identity:016x}")
            && Some(s.body.cache_file.as_str()) == cache.file_name().and_then(|n| n.to_str())
    });
    let Some(side) = valid else {
        tracing::warn!(
            "ignoring {}: damaged or written for another cache file",
            path.display()
        );
        return none;
    };
    recorded
        .iter()
        .map(|r| {
            side.body
                .sources
                .iter()
                .find(|s| s.name == r.name && s.xxh3_128 == r.xxh3_128)
                .cloned()
        })
        .collect()
}

/// Writes the sidecar of the cache file at `cache` (atomically).
pub(crate) fn write_sidecar(
    cache: &Path,
    identity: u64,
    records: &[Record],
) -> crate::error::Result<()> {
    let body = SidecarBody {
        format: SIDECAR_FORMAT,
        cache_file: cache
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        cache_identity: format!("{identity:016x}"),
        sources: records.to_vec(),
    };
    let json = serde_json::to_vec(&body).expect("plain data serializes");
    let side = Sidecar {
        xxh3_64: format!("{:016x}", xxh3_64(&json)),
        body,
    };
    let text = serde_json::to_vec_pretty(&side).expect("plain data serializes");
    crate::fsutil::write_atomic(&sidecar_path(cache), &text)
}

/// The outcome of checking a cache file's source record against the weight files as they are.
pub(crate) enum Check {
    /// Every file holds the bytes recorded; `hashed_bytes` had to be hashed to know it (0
    /// when every stat was vouched for).
    Current { hashed_bytes: u64 },
    /// This weight file's bytes differ from the record.
    Changed { file: String },
    /// A weight file could not be read or stat'ed.
    Unreadable(String),
}

/// Checks `sources` against `recorded` (same order, names checked by the caller): stats first
/// (`opened[i]`, the stat taken when the model was opened, when there is one; no other system
/// call), hashes only for the files whose stat no record vouches for; a file found unchanged by
/// its hash has its new stat saved in the sidecar.
pub(crate) fn check(
    cache: &Path,
    identity: u64,
    sources: &[Source],
    opened: &[Option<Stat>],
    recorded: &[Record],
) -> Check {
    let mut current: Vec<Record> = recorded.to_vec();
    let mut to_hash = Vec::new();
    let mut sizes = vec![0u64; sources.len()];
    // Files whose stat the cache file's record does not vouch for, with that stat.
    let mut moved = Vec::new();
    for (i, src) in sources.iter().enumerate() {
        match src {
            Source::Embedded { .. } => to_hash.push(i),
            Source::File { path, .. } => {
                let now = match opened
                    .get(i)
                    .copied()
                    .flatten()
                    .map_or_else(|| Stat::of(path), Ok)
                {
                    Ok(s) => s,
                    Err(e) => return Check::Unreadable(format!("{}: {e}", path.display())),
                };
                sizes[i] = now.size_bytes;
                if !recorded[i].vouches_for(&now) {
                    moved.push((i, now));
                }
            }
        }
    }
    // The sidecar is read only when a stat changed since the build.
    if !moved.is_empty() {
        let side = read_sidecar(cache, identity, recorded);
        for (i, now) in moved {
            match &side[i] {
                Some(r) if r.vouches_for(&now) => current[i] = r.clone(),
                _ => to_hash.push(i),
            }
        }
    }
    if to_hash.is_empty() {
        return Check::Current { hashed_bytes: 0 };
    }
    let files: Vec<&Source> = to_hash
        .iter()
        .map(|&i| &sources[i])
        .filter(|s| matches!(s, Source::File { .. }))
        .collect();
    if !files.is_empty() {
        tracing::info!(
            "quantized weight cache {}: {} weight file(s) changed size, times or inode since the cache was built ({}); hashing them to see whether their bytes changed",
            cache.display(),
            files.len(),
            files
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let t0 = std::time::Instant::now();
    let cancel = AtomicBool::new(false);
    let hashed = hash_many(sources, &to_hash, &[], &cancel);
    let mut hashed_bytes = 0u64;
    let mut refreshed = false;
    for (&i, r) in to_hash.iter().zip(hashed) {
        let r = match r {
            Ok(r) => r,
            Err(e) => return Check::Unreadable(e),
        };
        if r.xxh3_128 != recorded[i].xxh3_128 {
            return Check::Changed {
                file: sources[i].shown(),
            };
        }
        hashed_bytes += match &sources[i] {
            Source::Embedded { bytes, .. } => bytes.len() as u64,
            Source::File { .. } => sizes[i],
        };
        // A stat too recent to trust is not remembered: the next start hashes it again.
        if matches!(sources[i], Source::File { .. }) && r.stat != UNKNOWN {
            refreshed = true;
            current[i] = r;
        }
    }
    if refreshed {
        let secs = t0.elapsed().as_secs_f64();
        tracing::info!(
            "quantized weight cache {}: weight files unchanged ({:.2} GB hashed in {secs:.1} s); their new stats are remembered in {}",
            cache.display(),
            hashed_bytes as f64 / 1e9,
            sidecar_path(cache).display()
        );
        if let Err(e) = write_sidecar(cache, identity, &current) {
            tracing::warn!(
                "could not remember the checked weight files ({e}); the next start hashes them again"
            );
        }
    }
    Check::Current { hashed_bytes }
}
