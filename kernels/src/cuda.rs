//! The CUDA kernel sources: header-free CUDA C in `kernels/cuda/*.cu`, compiled at run time by
//! NVRTC, and the compile contract every caller and the NVRTC gate (`tests/nvrtc_gate.rs`)
//! share.
//!
//! This module owns the registry of sources ([`SOURCES`]: file, text, `extern "C"` entry
//! points), the NVRTC options used for every compile ([`cubin_options`], [`ptx_options`]), the
//! target architectures ([`TARGET_ARCHS`]), the register budget per thread
//! ([`REGISTER_BUDGET_PER_THREAD`]), the highest PTX ISA the CUDA 13.0 driver loads
//! ([`MAX_PTX_ISA`]) and the block size every kernel is launched with ([`BLOCK_THREADS`]).
//! It compiles nothing and depends on no CUDA library: the runtime compiles, the gate checks.
//!
//! What must always hold:
//! - Every source is self-contained (no `#include`: NVRTC ships no CUDA headers) and every name
//!   in a [`CudaSource::kernels`] list is an `extern "C" __global__` function of that source
//!   (unit-tested below), so the runtime can look kernels up by these names.
//! - Every kernel names its CPU twin in a comment above it; the twin is the reference its GPU
//!   result is checked against. Dequantization is bit-exact with the twin; reductions use a
//!   fixed order (no atomics in sums), so results on the GPU are deterministic.
//! - Helpers shared by several sources (f16 widening, the warp sum, the E4M3 decode, the
//!   NF4 / FP4 code tables and the MXFP4 E2M1 / E8M0 decodes) live once in `common.cu`,
//!   [`PRELUDE`], which every program starts with ([`CudaSource::program`]: a source cannot
//!   include another). A unit test keeps the code tables equal to
//!   [`crate::prequant::NF4_TABLE`] and [`crate::prequant::FP4_TABLE`] bit for bit; E4M3 codes
//!   are decoded arithmetically as [`crate::prequant::E4M3_TO_F32`] documents, E2M1 codes and
//!   E8M0 scales as `common.cu` documents ([`crate::prequant::MXFP4_TABLE`],
//!   [`crate::prequant::e8m0_to_f32`]).
//! - The options never enable fast math (`--use_fast_math`, `--ftz`, `--prec-div=false`,
//!   `--prec-sqrt=false`): exact widening and round-to-nearest arithmetic are part of the
//!   contract with the twins.
//! - Every kernel compiles for every [`TARGET_ARCHS`] entry with no spills and at most
//!   [`REGISTER_BUDGET_PER_THREAD`] registers, to PTX of ISA at most [`MAX_PTX_ISA`] (the NVRTC
//!   gate fails otherwise, naming the kernel and architecture).
//!
//! Launch shapes (grids of one to three dimensions: rows, heads, splits) and what the host must
//! check before a launch are stated in each source's header comment; every kernel is written
//! for blocks of [`BLOCK_THREADS`] threads (`__launch_bounds__(256)`).

/// One `.cu` source and the entry points it defines.
#[derive(Clone, Copy, Debug)]
pub struct CudaSource {
    /// File name under `kernels/cuda/` (also the NVRTC program name, so logs name it).
    pub file: &'static str,
    /// The CUDA C text.
    pub source: &'static str,
    /// Its `extern "C" __global__` entry points.
    pub kernels: &'static [&'static str],
}

/// Device helpers every program starts with (`kernels/cuda/common.cu`; no entry points).
pub const PRELUDE: &str = include_str!("../cuda/common.cu");

impl CudaSource {
    /// The text NVRTC compiles: [`PRELUDE`], then the source.
    pub fn program(&self) -> String {
        format!("{PRELUDE}\n{}", self.source)
    }
}

/// Every kernel source, with its entry points.
pub const SOURCES: &[CudaSource] = &[
    CudaSource {
        file: "embed.cu",
        source: include_str!("../cuda/embed.cu"),
        kernels: &["embed_f32", "embed_bf16", "embed_f16"],
    },
    CudaSource {
        file: "norm.cu",
        source: include_str!("../cuda/norm.cu"),
        kernels: &["rms_norm_f32"],
    },
    CudaSource {
        file: "rope.cu",
        source: include_str!("../cuda/rope.cu"),
        kernels: &["rope_f32"],
    },
    CudaSource {
        file: "elementwise.cu",
        source: include_str!("../cuda/elementwise.cu"),
        kernels: &[
            "add_f32",
            "silu_mul_f32",
            "glu_clamped_f32",
            "mul_sigmoid_f32",
            "add_gated_rows_f32",
            "add_rows_f32",
            "clamp_f32",
            "split_halves_f32",
            "split_heads_f32",
            "join_heads_f32",
            "split_pairs_f32",
            "gather_rows_f32",
        ],
    },
    CudaSource {
        file: "matvec.cu",
        source: include_str!("../cuda/matvec.cu"),
        kernels: &[
            "matvec_f32",
            "matvec_bf16",
            "matvec_f16",
            "matvec_q8_0",
            "matvec_q4_k",
            "matvec_f8",
            "matvec_nf4",
            "matvec_fp4",
            "matvec_nf4bf16",
            "matvec_nf4f16",
            "matvec_fp4bf16",
            "matvec_fp4f16",
            "matvec_mxfp4",
            "matvec_grouped_f32",
            "matvec_grouped_bf16",
            "matvec_grouped_f16",
            "matvec_grouped_q8_0",
            "matvec_grouped_q4_k",
            "matvec_grouped_f8",
            "matvec_grouped_nf4",
            "matvec_grouped_fp4",
            "matvec_grouped_nf4bf16",
            "matvec_grouped_nf4f16",
            "matvec_grouped_fp4bf16",
            "matvec_grouped_fp4f16",
            "matvec_grouped_mxfp4",
        ],
    },
    CudaSource {
        file: "dequant.cu",
        source: include_str!("../cuda/dequant.cu"),
        kernels: &[
            "dequant_q8_0",
            "dequant_q4_k",
            "dequant_f8",
            "dequant_nf4",
            "dequant_fp4",
            "dequant_nf4bf16",
            "dequant_nf4f16",
            "dequant_fp4bf16",
            "dequant_fp4f16",
            "dequant_mxfp4",
            "dequant_bf16",
            "dequant_f16",
        ],
    },
    CudaSource {
        file: "head_matmul.cu",
        source: include_str!("../cuda/head_matmul.cu"),
        kernels: &[
            "head_matmul_t_f32",
            "head_matmul_t_bf16",
            "head_matmul_t_f16",
            "head_matmul_t_f8",
            "head_matmul_t_q8_0",
        ],
    },
    CudaSource {
        file: "attention.cu",
        source: include_str!("../cuda/attention.cu"),
        kernels: &[
            "attention_decode_f32",
            "attention_decode_bf16",
            "attention_decode_f16",
            "attention_merge_f32",
            "attention_latent_f32",
            "attention_latent_bf16",
            "attention_latent_f16",
        ],
    },
    CudaSource {
        file: "route.cu",
        source: include_str!("../cuda/route.cu"),
        kernels: &["route_softmax_topk_f32"],
    },
    CudaSource {
        file: "moe_sum.cu",
        source: include_str!("../cuda/moe_sum.cu"),
        kernels: &["moe_sum_f32", "moe_sum_rows_f32"],
    },
    CudaSource {
        file: "deltanet.cu",
        source: include_str!("../cuda/deltanet.cu"),
        kernels: &[
            "deltanet_split_f32",
            "l2norm_heads_f32",
            "mul_silu_f32",
            "conv1d_silu_seq_f32",
            "gated_delta_seq_f32",
        ],
    },
    CudaSource {
        file: "kv.cu",
        source: include_str!("../cuda/kv.cu"),
        kernels: &["kv_store_f32", "kv_store_bf16", "kv_store_f16"],
    },
];

/// Compute capabilities every kernel is compiled and gated for (major · 10 + minor): Ampere
/// (sm_80 A100, sm_86 consumer), Ada (sm_89) and Hopper (sm_90). CUDA 13 has no target below
/// sm_75, and sm_75 lacks the bf16 hardware later kernels will use.
pub const TARGET_ARCHS: &[u32] = &[80, 86, 89, 90];

/// Threads per block every kernel is written and launched for (`__launch_bounds__(256)`): 8
/// warps, enough to hide latency, small enough for several resident blocks per SM; fixed so that
/// block reductions sum in one order.
pub const BLOCK_THREADS: u32 = 256;

/// Registers per thread a kernel may use: 64 keeps 4 blocks of [`BLOCK_THREADS`] (1 024
/// threads) resident per SM on every target (65 536 registers per SM), enough occupancy for
/// memory-bound decode kernels.
pub const REGISTER_BUDGET_PER_THREAD: u32 = 64;

/// Highest PTX ISA version (major, minor) the CUDA 13.0 driver (r580) loads; newer NVRTC
/// releases emit newer PTX, which is why NVRTC is pinned to 13.0.
pub const MAX_PTX_ISA: (u32, u32) = (9, 0);

/// Options every compile uses, before the architecture: device code by default (no
/// `__device__` on helpers needed), C++17, and no fast-math option (see the module doc).
pub const COMMON_OPTIONS: &[&str] = &["-default-device", "--std=c++17"];

/// NVRTC options to compile for a real architecture (`cc` as in [`TARGET_ARCHS`]), giving a
/// CUBIN that the driver loads without JIT.
pub fn cubin_options(cc: u32) -> Vec<String> {
    let mut o: Vec<String> = COMMON_OPTIONS.iter().map(|s| s.to_string()).collect();
    o.push(format!("-arch=sm_{cc}"));
    o
}

/// NVRTC options to compile PTX for a virtual architecture (`cc` as in [`TARGET_ARCHS`]): the
/// portable form, JIT-compiled by the driver for newer GPUs.
pub fn ptx_options(cc: u32) -> Vec<String> {
    let mut o: Vec<String> = COMMON_OPTIONS.iter().map(|s| s.to_string()).collect();
    o.push(format!("-arch=compute_{cc}"));
    o
}

/// The source defining kernel `name`, if any.
pub fn source_of(name: &str) -> Option<&'static CudaSource> {
    SOURCES.iter().find(|s| s.kernels.contains(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of the `extern "C" __global__` functions `src` defines, read as the sources
    /// write them: `extern "C" __global__ void [__launch_bounds__(...)] name(`.
    fn global_kernels(src: &str) -> Vec<&str> {
        let mut names = Vec::new();
        for (at, _) in src.match_indices("extern \"C\" __global__") {
            let mut rest = src[at + "extern \"C\" __global__".len()..].trim_start();
            rest = rest.strip_prefix("void").unwrap_or(rest).trim_start();
            if let Some(r) = rest.strip_prefix("__launch_bounds__") {
                rest = r.split_once(')').map_or("", |(_, r)| r).trim_start();
            }
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if rest[end..].trim_start().starts_with('(') && end > 0 {
                names.push(&rest[..end]);
            }
        }
        names
    }

    fn defines_kernel(src: &str, name: &str) -> bool {
        global_kernels(src).contains(&name)
    }

    #[test]
    fn every_listed_kernel_is_an_extern_c_global_of_its_source() {
        for s in SOURCES {
            assert!(!s.kernels.is_empty(), "{} lists no kernels", s.file);
            for k in s.kernels {
                assert!(
                    defines_kernel(s.source, k),
                    "kernels/cuda/{}: no `extern \"C\" __global__` function `{k}`",
                    s.file
                );
            }
        }
    }

    #[test]
    fn no_source_includes_a_header() {
        for (file, text) in SOURCES
            .iter()
            .map(|s| (s.file, s.source))
            .chain([("common.cu", PRELUDE)])
        {
            assert!(
                !text.lines().any(|l| l.trim_start().starts_with("#include")),
                "kernels/cuda/{file}: has an #include (NVRTC ships no CUDA headers)"
            );
        }
        assert!(
            global_kernels(PRELUDE).is_empty(),
            "common.cu has entry points"
        );
    }

    #[test]
    fn every_global_kernel_is_listed() {
        for s in SOURCES {
            for k in global_kernels(s.source) {
                assert!(
                    s.kernels.contains(&k),
                    "kernels/cuda/{}: `{k}` is not listed in SOURCES",
                    s.file
                );
            }
        }
    }

    #[test]
    fn kernel_names_are_unique_and_resolve() {
        let mut all: Vec<&str> = SOURCES
            .iter()
            .flat_map(|s| s.kernels.iter().copied())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a kernel name is listed twice");
        for k in all {
            assert!(source_of(k).is_some_and(|s| s.kernels.contains(&k)));
        }
        assert!(source_of("no_such_kernel").is_none());
    }

    #[test]
    fn detector_rejects_names_not_defined() {
        let src = "extern \"C\" __global__ void __launch_bounds__(256)\nfoo(int x) {}\n\
                   __global__ void bar() {}\n";
        assert!(defines_kernel(src, "foo"));
        assert!(!defines_kernel(src, "bar"), "bar is not extern \"C\"");
        assert!(!defines_kernel(src, "baz"));
    }

    /// The `unsigned` constants of the array `name` in `src` (`__constant__ unsigned
    /// NAME[16] = {0x...u, ...};`), or why they cannot be read.
    fn constant_table(src: &str, name: &str) -> Result<Vec<u32>, String> {
        let head = format!("{name}[16] = {{");
        let at = src.find(&head).ok_or_else(|| format!("no `{head}`"))?;
        let body = src[at + head.len()..]
            .split('}')
            .next()
            .ok_or_else(|| format!("`{name}` is not closed"))?;
        body.split(',')
            .map(|v| {
                let v = v.trim().trim_end_matches('u');
                let hex = v
                    .strip_prefix("0x")
                    .ok_or_else(|| format!("`{v}` is not hex"))?;
                u32::from_str_radix(hex, 16).map_err(|e| format!("`{v}`: {e}"))
            })
            .collect()
    }

    #[test]
    fn four_bit_code_tables_in_the_sources_equal_the_cpu_tables() {
        let tables = [
            ("NF4_BITS", &crate::prequant::NF4_TABLE),
            ("FP4_BITS", &crate::prequant::FP4_TABLE),
        ];
        for (name, table) in tables {
            let got = constant_table(PRELUDE, name)
                .unwrap_or_else(|e| panic!("kernels/cuda/common.cu: {name}: {e}"));
            let want: Vec<u32> = table.iter().map(|v| v.to_bits()).collect();
            assert_eq!(
                got, want,
                "kernels/cuda/common.cu: {name} differs from moe_kernels::prequant's table; \
                 copy the bits from kernels/src/prequant.rs"
            );
        }
        // No source keeps a copy of its own.
        for s in SOURCES {
            for (name, _) in tables {
                assert!(
                    constant_table(s.source, name).is_err(),
                    "{}: {name}",
                    s.file
                );
            }
        }
        assert!(constant_table("unsigned X[16] = {0x1u, 0xzz};", "X").is_err());
    }

    #[test]
    fn options_have_no_fast_math_and_name_the_arch() {
        for &cc in TARGET_ARCHS {
            for (o, arch) in [
                (cubin_options(cc), format!("-arch=sm_{cc}")),
                (ptx_options(cc), format!("-arch=compute_{cc}")),
            ] {
                assert!(o.contains(&arch));
                assert!(o.iter().any(|s| s == "-default-device"));
                assert!(!o.iter().any(|s| s.contains("fast") || s.contains("ftz")));
            }
        }
    }
}
