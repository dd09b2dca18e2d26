//! Helpers shared by the benchmark binaries.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The CPU's model name (Linux), for the machine line every benchmark prints.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The value after `name` on the command line.
#[allow(dead_code)]
pub fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// Runs a command, returning its stdout, whether it succeeded, and its peak RSS in bytes.
pub fn run_measured(cmd: &mut Command) -> Result<(String, u64), String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .map_err(|e| e.to_string())?;
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut err)
        .map_err(|e| e.to_string())?;
    let mut status = 0i32;
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: wait4 on our own child's pid writes its exit status and resource usage into the
    // two valid pointers; the child has not been waited for yet (std's Child is never waited).
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, ru.as_mut_ptr()) };
    if r < 0 {
        return Err("wait4 failed".into());
    }
    // SAFETY: filled by the successful wait4 above (zeroed before in any case).
    let maxrss_kb = unsafe { ru.assume_init() }.ru_maxrss as u64;
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(err.lines().last().unwrap_or("failed").to_string());
    }
    Ok((out, maxrss_kb * 1024))
}

/// Reads a model file, or every file of a model folder, once, so each engine starts with its
/// weights in the page cache (the HF folder and the GGUF files together exceed RAM on small
/// machines, so each run would otherwise read part of its weights from disk while timed).
pub fn warm_page_cache(path: &Path) {
    let mut buf = vec![0u8; 8 << 20];
    for f in files_of(path) {
        if let Ok(mut f) = std::fs::File::open(f) {
            while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
        }
    }
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/moe-serve")
}

/// `path` itself, or every entry of it when it is a folder.
fn files_of(path: &Path) -> Vec<PathBuf> {
    if path.is_dir() {
        std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    } else {
        vec![path.to_path_buf()]
    }
}

/// Drops `path` (a file, or every file of a folder) from the page cache.
pub fn evict(path: &Path) {
    for f in files_of(path) {
        if let Ok(file) = std::fs::File::open(&f) {
            use std::os::unix::io::AsRawFd;
            // SAFETY: advice on a descriptor we own; no memory is touched.
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}
