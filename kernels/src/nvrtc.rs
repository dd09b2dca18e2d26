//! NVRTC driven from Rust: the probe (library, symbols, version, one trivial compile) and the
//! compile of a [`CudaSource`] to a CUBIN or PTX with the program log, for the NVRTC gate
//! (`tests/nvrtc_gate.rs`) and the runtime's compiled-kernel cache.
//!
//! NVRTC is loaded at run time (cudarc's dynamic loading), so nothing here is needed to build.
//! Invariants: [`probe`] succeeds before any other function is called (cudarc's lazy loader
//! panics on a missing library or symbol; the probe checks both first); a failure is a string
//! that names what is missing or the compiler's log.

use std::ffi::{c_char, CString};

use cudarc::nvrtc::{result, sys};

use crate::cuda::{cubin_options, CudaSource, TARGET_ARCHS};

/// The NVRTC entry points used here; each is looked up before the first call, because a
/// missing symbol panics inside cudarc's lazy loader.
const SYMBOLS: &[&str] = &[
    "nvrtcVersion",
    "nvrtcCreateProgram",
    "nvrtcCompileProgram",
    "nvrtcDestroyProgram",
    "nvrtcGetProgramLogSize",
    "nvrtcGetProgramLog",
    "nvrtcGetPTXSize",
    "nvrtcGetPTX",
    "nvrtcGetCUBINSize",
    "nvrtcGetCUBIN",
];

/// Checks that NVRTC can be used, returning its (major, minor) version or why not.
pub fn probe() -> Result<(i32, i32), String> {
    // SAFETY: only tries to dlopen cudarc's candidate library names; calls nothing in them.
    if !unsafe { sys::is_culib_present() } {
        return Err("the NVRTC library (libnvrtc.so.13) is not on the library search path".into());
    }
    // SAFETY: the library was just found under the same candidate names, so `culib` loads it
    // instead of panicking; `get` only resolves a symbol, the dummy signature is never called.
    let lib = unsafe { sys::culib() };
    for s in SYMBOLS {
        // SAFETY: as above: the symbol is resolved, not called.
        unsafe { lib.get::<unsafe extern "C" fn()>(s.as_bytes()) }
            .map_err(|e| format!("the NVRTC library lacks symbol {s} ({e}); it is too old"))?;
    }
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: the symbol exists (checked above); both pointers are valid for writes.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| format!("nvrtcVersion failed: {e:?}"))?;
    // A trivial compile loads libnvrtc-builtins, which ships beside libnvrtc and can be missing.
    let probe = CudaSource {
        file: "probe.cu",
        source: "extern \"C\" __global__ void probe() {}",
        kernels: &["probe"],
    };
    let out = compile(&probe, &cubin_options(TARGET_ARCHS[0]), Output::Cubin);
    if let Err(e) = out.result {
        return Err(format!(
            "NVRTC {major}.{minor} loads but cannot compile an empty kernel ({e}); is \
             libnvrtc-builtins.so.{major}.{minor} beside it?"
        ));
    }
    Ok((major, minor))
}

/// What a compile produces.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Output {
    Cubin,
    Ptx,
}

/// One compile: the program log, and the CUBIN or PTX bytes or the error.
pub struct Compiled {
    pub log: String,
    pub result: Result<Vec<u8>, String>,
}

/// Compiles `src` with `options` (the log is returned even when the compile fails).
pub fn compile(src: &CudaSource, options: &[String], output: Output) -> Compiled {
    let text = match CString::new(src.program()) {
        Ok(t) => t,
        Err(_) => {
            return Compiled {
                log: String::new(),
                result: Err(format!("kernels/cuda/{} contains a NUL byte", src.file)),
            }
        }
    };
    let name = CString::new(src.file).expect("file names have no NUL");
    let prog = match result::create_program(&text, Some(&name)) {
        Ok(p) => p,
        Err(e) => {
            return Compiled {
                log: String::new(),
                result: Err(format!("nvrtcCreateProgram failed: {e:?}")),
            }
        }
    };
    // SAFETY: `prog` was created above and is destroyed only at the end of this function;
    // `text` and `name` outlive it.
    let compiled = unsafe { result::compile_program(prog, options) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(prog) }
        .map(|l| c_chars_to_string(&l))
        .unwrap_or_else(|e| format!("(no program log: {e:?})"));
    let result = match compiled {
        Err(e) => Err(format!("compile error {e:?}")),
        Ok(()) => match output {
            // SAFETY: as above; the program compiled.
            Output::Ptx => unsafe { result::get_ptx(prog) }
                .map(|p| c_chars_to_string(&p).into_bytes())
                .map_err(|e| format!("nvrtcGetPTX failed: {e:?}")),
            // SAFETY: as above; the program compiled.
            Output::Cubin => unsafe { cubin(prog) },
        },
    };
    // SAFETY: `prog` is live and not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    Compiled { log, result }
}

/// The CUBIN of a compiled program (cudarc's safe API returns PTX only).
///
/// # Safety
/// `prog` must be a live program that compiled for a real architecture (`-arch=sm_XX`).
unsafe fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    let mut size = 0usize;
    // SAFETY: the caller guarantees `prog`; `size` is valid for writes.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBINSize failed: {e:?}"))?;
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds the `size` bytes NVRTC reported for this program.
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBIN failed: {e:?}"))?;
    if buf.is_empty() {
        return Err("NVRTC returned an empty CUBIN".into());
    }
    Ok(buf)
}

fn c_chars_to_string(c: &[c_char]) -> String {
    let bytes: Vec<u8> = c
        .iter()
        .take_while(|&&b| b != 0)
        .map(|&b| b as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A CUBIN of `src` compiled with `options` (from [`crate::cuda::cubin_options`]), or the
/// compile error with its log (for the runtime's kernel cache).
pub fn compile_cubin(src: &CudaSource, options: &[String]) -> Result<Vec<u8>, String> {
    let c = compile(src, options, Output::Cubin);
    c.result.map_err(|e| format!("{e}\n{}", c.log))
}
