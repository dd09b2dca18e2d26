//! `moe-serve calibrate`: measures the bandwidths the planner's estimates use and saves them as
//! `<state_dir>/profile.json`. The planner only reads that file; it never measures.
//!
//! On a machine with a usable CUDA device it also measures host-to-device copies, from pinned
//! memory (the expert copy path) and from pageable memory; the CUDA plan then assumes the
//! pinned rate for the link.
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
/// Bytes of one host-to-device copy test: many experts' worth, past the copy engine's start-up.
const LINK_BYTES: usize = 256 << 20;

/// Host-to-device copy speeds on `gpu` over `bytes`: (from pinned memory on the copy stream,
/// timed by events; from pageable memory, synchronous, timed on the host), bytes/s.
pub fn measure_link(
    gpu: &std::sync::Arc<dyn crate::backend::cuda::Gpu>,
    bytes: usize,
) -> Result<(f64, f64)> {
    use crate::backend::cuda::gpu::{Event, HostBuf, Stream};
    let dst = gpu.alloc(bytes)?;
    let measured = (|| -> Result<(f64, f64)> {
        let src: Vec<u8> = (0..bytes).map(|i| (i * 31 % 251) as u8).collect();
        let pinned = HostBuf::new(gpu, bytes)?;
        gpu.host_write(pinned.id(), &src)?;
        let (mut best_pinned, mut best_pageable) = (f64::MAX, f64::MAX);
        for _ in 0..PASSES {
            let start = Event::record(gpu, Stream::Copy)?;
            let t = Instant::now();
            gpu.copy_async(dst, pinned.id(), bytes)?;
            let end = Event::record(gpu, Stream::Copy)?;
            end.sync()?;
            let by_events = f64::from(gpu.elapsed_ms(start.id(), end.id())?) / 1e3;
            // A reading below the events' resolution: the host clock stands in.
            let s = if by_events > 0.0 {
                by_events
            } else {
                t.elapsed().as_secs_f64()
            };
            best_pinned = best_pinned.min(s);
            let t = Instant::now();
            gpu.htod(dst, &src)?;
            gpu.synchronize()?;
            best_pageable = best_pageable.min(t.elapsed().as_secs_f64());
        }
        let rate = |s: f64| bytes as f64 / s.max(1e-9);
        Ok((rate(best_pinned), rate(best_pageable)))
    })();
    gpu.free(dst);
    measured
}

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
    // The link, where a GPU is usable (no GPU is not an error: the plan keeps its stated link).
    let link = match crate::backend::cuda::usable(0) {
        Ok(dev) => {
            let gpu: std::sync::Arc<dyn crate::backend::cuda::Gpu> = std::sync::Arc::new(
                crate::backend::cuda::driver::DriverGpu::open(&dev, state_dir)?,
            );
            Some(measure_link(&gpu, LINK_BYTES)?)
        }
        Err(e) => {
            tracing::info!("no host-to-device measurement: {e}");
            None
        }
    };
    let profile = Profile {
        ram_compute_bytes_per_s: ram,
        file_read_bytes_per_s: file,
        device_compute_bytes_per_s: Profile::default().device_compute_bytes_per_s,
        link_pinned_bytes_per_s: link.map(|l| l.0),
        link_pageable_bytes_per_s: link.map(|l| l.1),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_measurement_copies_and_reports_both_paths() {
        let mock = std::sync::Arc::new(crate::backend::cuda::mock::MockGpu::new());
        let gpu: std::sync::Arc<dyn crate::backend::cuda::Gpu> = mock.clone();
        let (pinned, pageable) = measure_link(&gpu, 1 << 20).unwrap();
        // Timed by the copy stream's events: the mock's modelled link.
        let link = crate::backend::cuda::mock::MOCK_LINK_BYTES_PER_S;
        assert!((pinned / link - 1.0).abs() < 1e-3, "{pinned} vs {link}");
        assert!(pageable.is_finite() && pageable > 0.0, "{pageable}");
        assert_eq!(mock.allocations(), 0, "the test buffer is freed");
    }
}
