//! The bundled demo model: a few-MB random-weight Qwen3-MoE (written by `synth --preset demo`)
//! compiled into the binary, so `moe-serve run` works with no model on disk.
//!
//! Invariant: every embedded file starts 64-byte aligned, so tensor views into it are as aligned
//! as views into a page-aligned mmap.

use crate::weights::ModelFiles;

/// Forces the alignment of the bytes it wraps.
#[repr(C, align(64))]
struct Aligned<T: ?Sized>(T);

include!(concat!(env!("OUT_DIR"), "/demo_files.rs"));

/// The demo model's files.
pub fn files() -> ModelFiles {
    ModelFiles::Embedded {
        label: "demo",
        files: DEMO_FILES,
    }
}
