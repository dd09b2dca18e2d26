//! `moe-serve calibrate`: measures the bandwidths the planner's estimates use and saves them as
//! `<state_dir>/profile.json`. The planner only reads that file; it never measures.
//!
//! Invariants: the file read measurement reads bytes that are not in the page cache (the test file
//! is written, synced and then dropped from the cache), so it reflects the disk, not RAM; the
//! profile is written atomically.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use half::bf16;

use crate::error::{Error, Result};
use crate::plan::Profile;

/// Bytes streamed per compute pass: well past any cache, as expert weights are.
const COMPUTE_BYTES: usize = 256 << 20;
/// Bytes of the file-read test: large enough to average over many expert-sized reads.
const FILE_BYTES: usize = 256 << 20;
/// One read: about one expert of a 30B-class MoE.
const READ_CHUNK_BYTES: usize = 8 << 20;
/// Repetitions; the best is kept (the least disturbed by other work).
const PASSES: usize = 3;

/// Host compute speed over bf16 weights (matvec, all threads of the current pool), bytes/s.
pub fn measure_ram_compute() -> f64 {
    let k = 4096;
    let n = COMPUTE_BYTES / 2 / k;
    let w: Vec<bf16> = (0..n * k)
        .map(|i| bf16::from_f32(((i * 2654435761) % 1000) as f32 * 1e-3 - 0.5))
        .collect();
    let x: Vec<f32> = (0..k).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut out = vec![0f32; n];
    let mut best = f64::MAX;
    for _ in 0..PASSES {
        let t = Instant::now();
        moe_kernels::matmul(&x, 1, k, moe_kernels::Weights::Bf16(&w), n, &mut out);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&out);
    (n * k * 2) as f64 / best
}

/// Cold sequential read speed of files in `dir` (expert-sized positioned reads), bytes/s.
pub fn measure_file_read(dir: &Path) -> Result<f64> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(format!(".calibrate-{}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<f64> {
        let mut f = std::fs::File::create(&path)?;
        let chunk: Vec<u8> = (0..READ_CHUNK_BYTES)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        for _ in 0..FILE_BYTES / READ_CHUNK_BYTES {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        drop(f);
        let f = std::fs::File::open(&path)?;
        let mut buf = vec![0u8; READ_CHUNK_BYTES];
        let mut best = f64::MAX;
        for _ in 0..PASSES {
            drop_from_cache(&f);
            let t = Instant::now();
            for i in 0..FILE_BYTES / READ_CHUNK_BYTES {
                f.read_exact_at(&mut buf, (i * READ_CHUNK_BYTES) as u64)?;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        std::hint::black_box(&buf);
        Ok(FILE_BYTES as f64 / best)
    })();
    let _ = std::fs::remove_file(&path);
    result.map_err(|e| Error::io(&path, e))
}

fn drop_from_cache(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open for the
    // duration of the call. DONTNEED on clean pages just drops them from the page cache.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Measures and saves the profile in `state_dir`; returns it.
pub fn calibrate(state_dir: &Path, model_dir: Option<&Path>) -> Result<Profile> {
    let ram = measure_ram_compute();
    // Measure where the model lives when known (that is the disk experts come from).
    let file = measure_file_read(model_dir.unwrap_or(state_dir))?;
    let profile = Profile {
        ram_compute_bytes_per_s: ram,
        file_read_bytes_per_s: file,
        device_compute_bytes_per_s: Profile::default().device_compute_bytes_per_s,
        source: format!(
            "calibrated {}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ),
    };
    std::fs::create_dir_all(state_dir).map_err(|e| Error::io(state_dir, e))?;
    let text = serde_json::to_string_pretty(&profile).expect("profile serialises");
    crate::fsutil::write_atomic(&state_dir.join("profile.json"), text.as_bytes())?;
    Ok(profile)
}
