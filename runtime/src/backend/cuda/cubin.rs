//! CUDA kernels compiled at first use for a device's compute capability, the CUBIN kept in
//! `cache_dir/cuda/` under a name that holds the kernel file, the architecture, the NVRTC
//! version and a hash of the source and compile options, so a later start loads it instead of
//! compiling again.
//!
//! Invariants: a cached CUBIN is used only when its file starts with [`MAGIC`] and its checksum
//! matches the bytes after it; anything else (truncated, damaged, another format) is compiled
//! again and replaced, never loaded; files are written atomically (temp file, fsync, rename); a
//! cache that cannot be written costs a compile per start, never a failure.

use std::path::{Path, PathBuf};

use moe_kernels::cuda::{cubin_options, CudaSource};
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use crate::error::{Error, Result};

/// First bytes of a cached CUBIN file (the format version is its last digit).
pub const MAGIC: &[u8; 8] = b"MOECUBN1";

/// Compiles a source for a real architecture (`sm_XX`) with the given options, giving the CUBIN
/// or the compiler's log.
pub type Compile<'a> = &'a dyn Fn(&CudaSource, &[String]) -> std::result::Result<Vec<u8>, String>;

/// A CUBIN and where it came from.
#[derive(Debug, PartialEq, Eq)]
pub struct Cubin {
    pub bytes: Vec<u8>,
    /// Loaded from the cache (false: compiled by this call).
    pub cached: bool,
}

/// The compiled-kernel cache of one NVRTC version (see the module doc).
pub struct CubinCache {
    dir: PathBuf,
    nvrtc: (i32, i32),
}

impl CubinCache {
    /// The cache under `cache_dir/cuda/` for kernels compiled by NVRTC `nvrtc` (major, minor).
    pub fn new(cache_dir: &Path, nvrtc: (i32, i32)) -> CubinCache {
        CubinCache {
            dir: cache_dir.join("cuda"),
            nvrtc,
        }
    }

    /// The file that holds `src` compiled for `sm_{cc}`.
    pub fn path_for(&self, src: &CudaSource, cc: u32) -> PathBuf {
        let mut h = Xxh3::new();
        h.update(src.program().as_bytes());
        for o in cubin_options(cc) {
            h.update(&[0]);
            h.update(o.as_bytes());
        }
        let stem = src.file.trim_end_matches(".cu");
        let (major, minor) = self.nvrtc;
        self.dir.join(format!(
            "{stem}-sm{cc}-nvrtc{major}.{minor}-{:032x}.cubin",
            h.digest128()
        ))
    }

    /// `src` for `sm_{cc}`: the cached CUBIN when it is intact, else compiled by `compile` and
    /// cached (a damaged file is replaced, with one warning).
    pub fn get(&self, src: &CudaSource, cc: u32, compile: Compile<'_>) -> Result<Cubin> {
        let path = self.path_for(src, cc);
        match std::fs::read(&path) {
            Ok(file) => match unwrap_file(&file) {
                Some(bytes) => {
                    return Ok(Cubin {
                        bytes: bytes.to_vec(),
                        cached: true,
                    })
                }
                None => tracing::warn!(
                    "compiled kernel cache {} is damaged; compiling {} again",
                    path.display(),
                    src.file
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                "compiled kernel cache {} cannot be read ({e}); compiling {} again",
                path.display(),
                src.file
            ),
        }
        let bytes = compile(src, &cubin_options(cc)).map_err(|log| {
            let first = log.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            Error::BackendUnavailable {
                backend: "cuda".into(),
                reason: format!(
                    "kernels/cuda/{} does not compile for sm_{cc} with NVRTC {}.{}: {first}",
                    src.file, self.nvrtc.0, self.nvrtc.1
                ),
            }
        })?;
        let written = std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::io(&self.dir, e))
            .and_then(|()| crate::fsutil::write_atomic(&path, &wrap_file(&bytes)));
        if let Err(e) = written {
            tracing::warn!("compiled kernels are not cached ({e}); each start compiles them");
        }
        Ok(Cubin {
            bytes,
            cached: false,
        })
    }
}

/// The file's bytes: [`MAGIC`], the xxh3-128 of the CUBIN (little-endian), the CUBIN.
fn wrap_file(cubin: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAGIC.len() + 16 + cubin.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&xxh3_128(cubin).to_le_bytes());
    out.extend_from_slice(cubin);
    out
}

/// The CUBIN inside a cached file, when the file is intact.
fn unwrap_file(file: &[u8]) -> Option<&[u8]> {
    let rest = file.strip_prefix(MAGIC.as_slice())?;
    let (sum, cubin) = rest.split_at_checked(16)?;
    let sum = u128::from_le_bytes(sum.try_into().ok()?);
    (!cubin.is_empty() && xxh3_128(cubin) == sum).then_some(cubin)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    const SRC: CudaSource = CudaSource {
        file: "probe.cu",
        source: "extern \"C\" __global__ void probe() {}",
        kernels: &["probe"],
    };

    /// A compiler that records its calls and returns bytes naming the arch it was asked for.
    fn counting(
        calls: &Cell<usize>,
    ) -> impl Fn(&CudaSource, &[String]) -> std::result::Result<Vec<u8>, String> + '_ {
        move |src: &CudaSource, opts: &[String]| {
            calls.set(calls.get() + 1);
            let arch = opts
                .iter()
                .find(|o| o.starts_with("-arch="))
                .cloned()
                .unwrap();
            Ok(format!("cubin of {} for {arch}", src.file).into_bytes())
        }
    }

    #[test]
    fn compiles_once_per_arch_and_version_then_loads() {
        let dir = tempfile::tempdir().unwrap();
        let calls = Cell::new(0);
        let compile = counting(&calls);
        let cache = CubinCache::new(dir.path(), (13, 0));
        let first = cache.get(&SRC, 90, &compile).unwrap();
        assert!(!first.cached);
        assert_eq!(first.bytes, b"cubin of probe.cu for -arch=sm_90");
        let again = cache.get(&SRC, 90, &compile).unwrap();
        assert_eq!((again.cached, &again.bytes), (true, &first.bytes));
        assert_eq!(calls.get(), 1);
        // Another architecture, another NVRTC version or another source: compiled again.
        assert!(!cache.get(&SRC, 80, &compile).unwrap().cached);
        let newer = CubinCache::new(dir.path(), (13, 1));
        assert!(!newer.get(&SRC, 90, &compile).unwrap().cached);
        let edited = CudaSource {
            source: "extern \"C\" __global__ void probe() { }",
            ..SRC
        };
        assert!(!cache.get(&edited, 90, &compile).unwrap().cached);
        assert_eq!(calls.get(), 4);
        let name = cache.path_for(&SRC, 90);
        let name = name.file_name().unwrap().to_string_lossy();
        assert!(name.starts_with("probe-sm90-nvrtc13.0-") && name.ends_with(".cubin"));
    }

    #[test]
    fn a_damaged_file_is_compiled_again_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let calls = Cell::new(0);
        let compile = counting(&calls);
        let cache = CubinCache::new(dir.path(), (13, 0));
        let good = cache.get(&SRC, 86, &compile).unwrap().bytes;
        let path = cache.path_for(&SRC, 86);
        let intact = std::fs::read(&path).unwrap();
        // A flipped byte, a truncated file, an empty file, another format.
        let mut flipped = intact.clone();
        *flipped.last_mut().unwrap() ^= 1;
        for bad in [
            flipped,
            intact[..intact.len() - 3].to_vec(),
            vec![],
            b"ELF".to_vec(),
        ] {
            std::fs::write(&path, &bad).unwrap();
            let c = cache.get(&SRC, 86, &compile).unwrap();
            assert_eq!((c.cached, &c.bytes), (false, &good));
            assert_eq!(std::fs::read(&path).unwrap(), intact, "replaced");
        }
        assert_eq!(calls.get(), 5);
    }

    /// The real compiler where NVRTC is present (CI installs it): a kernel source compiles to an
    /// ELF CUBIN once, and the second request loads the same bytes from the cache.
    #[test]
    fn real_kernels_compile_once_then_load_where_nvrtc_is_present() {
        let version = match moe_kernels::nvrtc::probe() {
            Ok(v) => v,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let cache = CubinCache::new(dir.path(), version);
        let compile = |s: &CudaSource, o: &[String]| moe_kernels::nvrtc::compile_cubin(s, o);
        let src = &moe_kernels::cuda::SOURCES[0];
        let first = cache.get(src, 90, &compile).unwrap();
        assert!(!first.cached && first.bytes.starts_with(b"\x7fELF"));
        let again = cache.get(src, 90, &compile).unwrap();
        assert!(again.cached && again.bytes == first.bytes);
    }

    #[test]
    fn a_compile_error_names_the_file_and_arch_and_an_unwritable_cache_still_compiles() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CubinCache::new(dir.path(), (13, 0));
        let failing = |_: &CudaSource, _: &[String]| -> std::result::Result<Vec<u8>, String> {
            Err("\nprobe.cu(1): error: identifier \"x\" is undefined\n".into())
        };
        let e = cache.get(&SRC, 89, &failing).unwrap_err().to_string();
        assert!(
            e.contains("kernels/cuda/probe.cu") && e.contains("sm_89") && e.contains("undefined"),
            "{e}"
        );
        // The cache folder is a file: nothing can be written, the kernel still compiles.
        let blocked = dir.path().join("blocked");
        std::fs::write(&blocked, b"").unwrap();
        let calls = Cell::new(0);
        let compile = counting(&calls);
        let cache = CubinCache::new(&blocked, (13, 0));
        assert!(!cache.get(&SRC, 90, &compile).unwrap().cached);
        assert!(!cache.get(&SRC, 90, &compile).unwrap().cached);
        assert_eq!(calls.get(), 2);
    }
}
