//! The GPU check: what only a real CUDA device can prove about the CUDA backend, run on a GPU
//! machine by `scripts/gpu-check.sh` (the binary is built and carried by
//! `scripts/gpu-package.sh`).
//!
//! - Kernel parity: every kernel the backend launches, on ragged shapes with random inputs from
//!   a fixed seed, launched the same way (the same buffers uploaded, the same argument list) on
//!   the mock device (each kernel's CPU twin) and on the driver; results bit-exact where the
//!   kernel's source promises it (dequantization, embedding, KV stores, copies, adds, clamps,
//!   ordered expert sums, head splits and joins, the transposed per-head products), else
//!   within the named tolerances below. What must hold: every
//!   kernel of `moe_kernels::cuda::SOURCES` has a case here or is listed in [`NOT_COVERED`]
//!   with why (a new kernel without either fails the harness test, on every machine).
//! - Every fixture with `device = "cuda"`: greedy tokens identical to the transformers
//!   reference and to the CPU backend, logits within [`CUDA_LOGIT_TOL`] of both.
//! - Eviction churn: a fixture with `[experts] slots_per_layer` = its top_k gives the CPU's
//!   greedy tokens.
//!
//! Without a usable device (`moe_runtime::backend::cuda::usable(0)` fails) each GPU test prints
//! why and passes, unless `MOE_GPU_REQUIRED=1` (the GPU check sets it), where it fails. The
//! harness itself (every case's buffers and argument list, the comparison) runs everywhere:
//! mock against mock must agree bit for bit, and a corrupted result must be reported.
//! Each comparison prints one `gpu-metric {json}` line that the GPU check collects.

mod common;

use std::sync::Arc;

use half::{bf16, f16};
use moe_kernels::quant::{quantize_row_q4_k, quantize_row_q8_0, BlockQ4K, BlockQ8_0, QK8_0, QK_K};
use moe_runtime::backend::cuda::driver::DriverGpu;
use moe_runtime::backend::cuda::mock::MockGpu;
use moe_runtime::backend::cuda::{usable, CudaDevice, DevPtr, Gpu, Grid, KArg};
use moe_runtime::backend::DeviceKind;
use moe_runtime::sampler::argmax;
use moe_runtime::{Logits, Model, Settings};

/// Matvec outputs, relative to the launch's largest output: f32 sums of k products in two
/// different orders differ by about sqrt(k)·2^-24 of the partial sums (≈3e-6 at k = 4096);
/// 1e-4 leaves 30x for the worst of thousands of outputs, while a wrong index, stride or
/// widening is off by order 1.
const MATVEC_REL_TOL: f32 = 1e-4;
/// RMSNorm outputs, relative to each value: one sum of up to ~2k positive squares in another
/// order moves the row's scale by a few sqrt(width)·2^-24 (≈3e-6); the products are exact.
const NORM_REL_TOL: f32 = 5e-5;
/// Decode attention outputs, relative to the launch's largest output: the device's expf is
/// within 2 ulp, its dot products and its online softmax sum in another order than the twin's
/// two passes; each is ~1e-6 of the output scale.
const ATTENTION_REL_TOL: f32 = 1e-4;
/// RoPE outputs, relative to the launch's largest output: cos / sin in double, rounded to f32,
/// may land one f32 ulp (6e-8) apart where the device's double result straddles a rounding
/// boundary, and each output is two products of such values.
const ROPE_REL_TOL: f32 = 1e-6;
/// expf-based elementwise kernels (SiLU, clamped SwiGLU, sigmoid gates), in ulps of each value:
/// the device's expf is within 2 ulp, Rust's within 1, and the sigmoid's add and divide carry
/// that into the result with at most one more rounding each.
const EXPF_MAX_ULPS: u32 = 6;
/// `add_gated_rows_f32`, relative to the launch's largest output: the gate's sigmoid carries
/// the expf difference (≤ EXPF_MAX_ULPS) into a product that is then added, where cancellation
/// turns ulps of a term into an absolute error bounded by the terms' size.
const GATED_ADD_REL_TOL: f32 = 1e-6;
/// Gated DeltaNet outputs and states over a run of tokens, relative to the launch's largest
/// value: each step's decay expf(g) is within 2 ulp of the twin's and the products and sums run
/// in the twin's order, so a step differs by a few ulps; the carried state adds the steps'
/// differences (shrunk by the decays), so the bound grows with the steps (37 in the cases) but
/// stays far below a wrong index or order (order 1).
const DELTANET_REL_TOL: f32 = 1e-4;
/// Fixture logits on the GPU against transformers and against the CPU backend: the CPU meets
/// 1e-4 against transformers (tests/parity.rs); the GPU's reduction orders differ from both by
/// the same few ulps per operation, so twice that bar bounds both comparisons.
const CUDA_LOGIT_TOL: f32 = 2e-4;

/// Seed of every random input.
const SEED: u64 = 0x6770_755f_6368_6b31;

// ---------------------------------------------------------------------------------------------
// Devices.

/// The probed device, or None after printing why the GPU tests are skipped (a failure instead
/// when `MOE_GPU_REQUIRED=1`, as the GPU check sets it).
fn usable_device() -> Option<CudaDevice> {
    let required = std::env::var("MOE_GPU_REQUIRED").is_ok_and(|v| v == "1");
    match usable(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(
                !required,
                "MOE_GPU_REQUIRED=1 but no usable CUDA device: {e}"
            );
            eprintln!("skipped: no usable CUDA device here ({e})");
            None
        }
    }
}

/// The driver device (see [`usable_device`]).
fn driver() -> Option<Arc<dyn Gpu>> {
    let dev = usable_device()?;
    eprintln!(
        "gpu-metric {{\"device\":\"{}\",\"compute_capability\":\"{}.{}\",\"total_bytes\":{},\
         \"free_bytes\":{}}}",
        dev.name,
        dev.compute_capability.0,
        dev.compute_capability.1,
        dev.total_bytes,
        dev.free_bytes
    );
    let gpu = DriverGpu::open(&dev, &common::test_cache_dir())
        .unwrap_or_else(|e| panic!("opening {}: {e}", dev.name));
    Some(Arc::new(gpu))
}

// ---------------------------------------------------------------------------------------------
// Launch cases: buffers, an argument list, and which buffers to compare how.

/// One device buffer's initial contents.
enum Buf {
    Bytes(Vec<u8>),
    /// A table of device addresses (u64): buffer index and byte offset, resolved per device.
    Addrs(Vec<(usize, usize)>),
    /// A table of u64 words, each a device address (resolved per device) or a number.
    Table(Vec<W>),
}

/// One word of a [`Buf::Table`].
#[derive(Clone, Copy)]
enum W {
    Addr(usize, usize),
    Val(u64),
}

/// One kernel argument.
#[derive(Clone, Copy)]
enum A {
    Buf(usize),
    At(usize, usize),
    Null,
    U32(u32),
    U64(u64),
    F32(f32),
}

/// How a result buffer is compared.
#[derive(Clone, Copy, Debug)]
enum Cmp {
    /// Bit for bit.
    Exact,
    /// f32 values: |a - b| <= tol * max |b| over the buffer.
    Norm(f32),
    /// f32 values: |a - b| <= tol * |b|.
    Rel(f32),
    /// f32 values: at most this many ulps apart (any NaN equals any NaN).
    Ulps(u32),
}

struct Case {
    name: String,
    kernel: &'static str,
    grid: Grid,
    bufs: Vec<Buf>,
    args: Vec<A>,
    checks: Vec<(usize, Cmp)>,
}

/// Runs `case` on `gpu` and returns the checked buffers' bytes (every buffer is freed).
fn execute(gpu: &dyn Gpu, case: &Case) -> Result<Vec<Vec<u8>>, String> {
    let sizes: Vec<usize> = case
        .bufs
        .iter()
        .map(|b| match b {
            Buf::Bytes(v) => v.len(),
            Buf::Addrs(a) => a.len() * 8,
            Buf::Table(t) => t.len() * 8,
        })
        .collect();
    let mut ptrs: Vec<DevPtr> = Vec::new();
    let result = (|| -> moe_runtime::Result<Vec<Vec<u8>>> {
        for &s in &sizes {
            ptrs.push(gpu.alloc(s.max(1))?);
        }
        for (i, b) in case.bufs.iter().enumerate() {
            let bytes = match b {
                Buf::Bytes(v) => v.clone(),
                Buf::Addrs(a) => a
                    .iter()
                    .flat_map(|&(j, off)| (ptrs[j] + off as u64).to_le_bytes())
                    .collect(),
                Buf::Table(t) => t
                    .iter()
                    .flat_map(|w| match *w {
                        W::Addr(j, off) => (ptrs[j] + off as u64).to_le_bytes(),
                        W::Val(v) => v.to_le_bytes(),
                    })
                    .collect(),
            };
            if !bytes.is_empty() {
                gpu.htod(ptrs[i], &bytes)?;
            }
        }
        let args: Vec<KArg> = case
            .args
            .iter()
            .map(|a| match *a {
                A::Buf(i) => KArg::Ptr(ptrs[i]),
                A::At(i, off) => KArg::Ptr(ptrs[i] + off as u64),
                A::Null => KArg::Ptr(0),
                A::U32(v) => KArg::U32(v),
                A::U64(v) => KArg::U64(v),
                A::F32(v) => KArg::F32(v),
            })
            .collect();
        gpu.launch(case.kernel, case.grid, &args)?;
        gpu.synchronize()?;
        let mut out = Vec::new();
        for &(i, _) in &case.checks {
            let mut v = vec![0u8; sizes[i]];
            gpu.dtoh(ptrs[i], &mut v)?;
            out.push(v);
        }
        Ok(out)
    })();
    for p in ptrs {
        gpu.free(p);
    }
    result.map_err(|e| format!("{}: {e}", case.name))
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Distance in ulps between two f32 values (signed zeros are 0 apart; NaN never reaches it).
fn ulps(a: f32, b: f32) -> u32 {
    let key = |x: f32| {
        let i = x.to_bits() as i32;
        if i < 0 {
            -i64::from(i & 0x7FFF_FFFF)
        } else {
            i64::from(i)
        }
    };
    (key(a) - key(b)).unsigned_abs().min(u64::from(u32::MAX)) as u32
}

/// Compares `got` (device) to `want` (twin); Ok(largest error in the comparison's unit) or the
/// first mismatch.
fn compare(cmp: Cmp, want: &[u8], got: &[u8]) -> Result<f64, String> {
    if want.len() != got.len() {
        return Err(format!("{} bytes, expected {}", got.len(), want.len()));
    }
    match cmp {
        Cmp::Exact => match want.iter().zip(got).position(|(a, b)| a != b) {
            None => Ok(0.0),
            Some(i) => {
                let w = i / 4 * 4;
                let word = |v: &[u8]| {
                    v.get(w..w + 4)
                        .map_or(0, |c| u32::from_le_bytes(c.try_into().unwrap()))
                };
                Err(format!(
                    "byte {i} differs (word {:#010x}, expected {:#010x})",
                    word(got),
                    word(want)
                ))
            }
        },
        Cmp::Norm(tol) | Cmp::Rel(tol) => {
            let (w, g) = (f32s(want), f32s(got));
            let scale = w
                .iter()
                .filter(|x| x.is_finite())
                .fold(0f32, |m, x| m.max(x.abs()));
            let mut worst = 0f64;
            for (i, (&a, &b)) in w.iter().zip(&g).enumerate() {
                if a.is_nan() && b.is_nan() || a == b {
                    continue;
                }
                let denom = match cmp {
                    Cmp::Norm(_) => scale,
                    _ => a.abs(),
                }
                .max(f32::MIN_POSITIVE);
                let err = f64::from((a - b).abs()) / f64::from(denom);
                if !err.is_finite() || err > f64::from(tol) {
                    return Err(format!(
                        "value {i} is {b:e}, expected {a:e} (relative error {err:e} > {tol:e})"
                    ));
                }
                worst = worst.max(err);
            }
            Ok(worst)
        }
        Cmp::Ulps(max) => {
            let (w, g) = (f32s(want), f32s(got));
            let mut worst = 0u32;
            for (i, (&a, &b)) in w.iter().zip(&g).enumerate() {
                if a.is_nan() && b.is_nan() {
                    continue;
                }
                let d = if a.is_nan() || b.is_nan() {
                    u32::MAX
                } else {
                    ulps(a, b)
                };
                if d > max {
                    return Err(format!(
                        "value {i} is {b:e}, expected {a:e} ({d} ulps > {max})"
                    ));
                }
                worst = worst.max(d);
            }
            Ok(f64::from(worst))
        }
    }
}

/// Runs every case on `twin` and `device` and compares; the list of failures, and with `report`
/// one `gpu-metric` line per case. `corrupt` changes the device's results first (the harness's
/// own test: a wrong result must be reported).
fn run_cases(
    twin: &dyn Gpu,
    device: &dyn Gpu,
    cases: &[Case],
    report: bool,
    corrupt: Option<Corruption>,
) -> Vec<String> {
    let mut failures = Vec::new();
    for case in cases {
        let outcome = execute(twin, case)
            .map_err(|e| format!("twin: {e}"))
            .and_then(|want| {
                let mut got = execute(device, case).map_err(|e| format!("device: {e}"))?;
                if let Some(how) = corrupt {
                    got.iter_mut().for_each(|g| tamper(how, g));
                }
                let mut worst = Vec::new();
                for (k, &(buf, cmp)) in case.checks.iter().enumerate() {
                    let err = compare(cmp, &want[k], &got[k])
                        .map_err(|e| format!("buffer {buf} ({cmp:?}): {e}"))?;
                    worst.push((cmp, err));
                }
                Ok(worst)
            });
        if !report {
            if let Err(e) = outcome {
                failures.push(format!("{}: {e}", case.name));
            }
            continue;
        }
        match outcome {
            Ok(worst) => {
                for (cmp, err) in worst {
                    let (unit, bound) = match cmp {
                        Cmp::Exact => ("bits", 0.0),
                        Cmp::Norm(t) => ("rel_to_max", f64::from(t)),
                        Cmp::Rel(t) => ("rel", f64::from(t)),
                        Cmp::Ulps(u) => ("ulps", f64::from(u)),
                    };
                    eprintln!(
                        "gpu-metric {{\"on\":\"{}\",\"kernel\":\"{}\",\"case\":\"{}\",\
                         \"unit\":\"{unit}\",\"max_err\":{err:e},\"bound\":{bound:e}}}",
                        device.describe(),
                        case.kernel,
                        case.name
                    );
                }
            }
            Err(e) => {
                eprintln!(
                    "gpu-metric {{\"on\":\"{}\",\"kernel\":\"{}\",\"case\":\"{}\",\
                     \"failed\":true}}",
                    device.describe(),
                    case.kernel,
                    case.name
                );
                failures.push(format!("{}: {e}", case.name));
            }
        }
    }
    failures
}

// ---------------------------------------------------------------------------------------------
// Inputs.

/// splitmix64: a small deterministic generator (no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * scale).collect()
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n)) as u32
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn le_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn le_u32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn le_bf16(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
        .collect()
}

fn le_f16(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
        .collect()
}

fn q8_0_bytes(src: &[f32]) -> Vec<u8> {
    let mut blocks = vec![
        BlockQ8_0 {
            d: f16::ZERO,
            qs: [0; QK8_0],
        };
        src.len() / QK8_0
    ];
    quantize_row_q8_0(src, &mut blocks);
    blocks
        .iter()
        .flat_map(|b| {
            let mut v = b.d.to_bits().to_le_bytes().to_vec();
            v.extend(b.qs.iter().map(|&q| q as u8));
            v
        })
        .collect()
}

fn q4_k_bytes(src: &[f32]) -> Vec<u8> {
    let mut blocks = vec![
        BlockQ4K {
            d: f16::ZERO,
            dmin: f16::ZERO,
            scales: [0; 12],
            qs: [0; QK_K / 2],
        };
        src.len() / QK_K
    ];
    quantize_row_q4_k(src, &mut blocks);
    blocks
        .iter()
        .flat_map(|b| {
            let mut v = b.d.to_bits().to_le_bytes().to_vec();
            v.extend(b.dmin.to_bits().to_le_bytes());
            v.extend(b.scales);
            v.extend(b.qs);
            v
        })
        .collect()
}

/// Blocks of an f32 scale then `codes` code bytes (FP8 E4M3 x 128: 128 bytes; NF4 / FP4 x 64:
/// 32 bytes): random codes, positive and negative scales; `nan_codes` keeps the E4M3 NaN codes
/// (0x7F, 0xFF), otherwise they are replaced.
fn scaled_blocks(rng: &mut Rng, blocks: usize, codes: usize, nan_codes: bool) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..blocks {
        let d = rng.unit() * 0.05 + if rng.below(2) == 0 { 0.06 } else { -0.06 };
        v.extend(d.to_le_bytes());
        for c in rng.bytes(codes) {
            v.push(if !nan_codes && c & 0x7F == 0x7F {
                c ^ 1
            } else {
                c
            });
        }
    }
    v
}

/// Values that exercise rounding: NaN payloads, infinities, signed zeros, subnormals, exact
/// bf16 / f16 ties and the f16 overflow edge.
fn edge_values() -> Vec<f32> {
    let bits: [u32; 22] = [
        0x7FC0_0001, // quiet NaN with payload
        0xFFA0_0000, // signalling NaN, negative
        0x7F80_0001, // smallest signalling NaN payload
        0x7F80_0000, // +inf
        0xFF80_0000, // -inf
        0x8000_0000, // -0.0
        0x0000_0001, // smallest subnormal
        0x807F_FFFF, // largest negative subnormal
        0x3F80_8000, // bf16 tie, round to even (down)
        0x3F81_8000, // bf16 tie, round to even (up)
        0x3F80_8001, // just above a bf16 tie
        0x7F7F_FFFF, // f32::MAX (bf16 rounds to inf)
        0x477F_E000, // 65504: largest f16
        0x477F_EFFF, // just below the f16 overflow tie
        0x477F_F000, // 65520: f16 tie to infinity
        0x3380_0000, // 2^-24: smallest f16 subnormal
        0x3300_0000, // 2^-25: f16 tie to zero
        0x3300_0001, // just above 2^-25: rounds up to 2^-24
        0x387F_C000, // just below 2^-14, f16 subnormal rounding
        0x3F80_1000, // f16 tie at 1 + 2^-11 (to even: down)
        0x3F80_3000, // f16 tie (to even: up)
        0xC2F6_E979, // -123.456
    ];
    bits.iter().map(|&b| f32::from_bits(b)).collect()
}

fn blocks_for(n: usize) -> u32 {
    n.div_ceil(256).max(1) as u32
}

// ---------------------------------------------------------------------------------------------
// The cases.

/// Every kernel of `moe_kernels::cuda::SOURCES` the backend launches has cases below; these
/// do not, with why.
const NOT_COVERED: &[(&str, &str)] = &[];

fn cases() -> Vec<Case> {
    let mut rng = Rng(SEED);
    let mut v = Vec::new();
    embed_cases(&mut rng, &mut v);
    dequant_cases(&mut rng, &mut v);
    matvec_cases(&mut rng, &mut v);
    grouped_matvec_cases(&mut rng, &mut v);
    norm_and_rope_cases(&mut rng, &mut v);
    elementwise_cases(&mut rng, &mut v);
    kv_store_cases(&mut rng, &mut v);
    attention_cases(&mut rng, &mut v);
    latent_attention_cases(&mut rng, &mut v);
    head_matmul_cases(&mut rng, &mut v);
    moe_cases(&mut rng, &mut v);
    moe_sum_rows_cases(&mut rng, &mut v);
    route_cases(&mut rng, &mut v);
    deltanet_cases(&mut rng, &mut v);
    v
}

fn embed_cases(rng: &mut Rng, v: &mut Vec<Case>) {
    let (vocab, width) = (37usize, 300usize);
    // Token 37 is past the vocabulary: a row of zeros.
    let ids = [3u32, 36, 0, 37, 12, 3];
    for (kernel, table) in [
        ("embed_f32", le_f32(&rng.vec(vocab * width, 2.0))),
        ("embed_bf16", {
            let mut t = le_bf16(&rng.vec(vocab * width, 2.0));
            // NaN and infinity bits widen exactly too.
            t[0..2].copy_from_slice(&0x7FC1u16.to_le_bytes());
            t[2..4].copy_from_slice(&0xFF80u16.to_le_bytes());
            t
        }),
        ("embed_f16", {
            let mut vals = rng.vec(vocab * width, 2.0);
            // f16 subnormals, infinities and the largest value.
            vals[..4].copy_from_slice(&[6e-8, -3e-6, f32::INFINITY, 65504.0]);
            le_f16(&vals)
        }),
    ] {
        v.push(Case {
            name: format!("{kernel} vocab {vocab} width {width}"),
            kernel,
            grid: [ids.len() as u32, blocks_for(width), 1],
            bufs: vec![
                Buf::Bytes(table),
                Buf::Bytes(le_u32(&ids)),
                Buf::Bytes(vec![0xAB; ids.len() * width * 4]),
            ],
            args: vec![
                A::Buf(0),
                A::Buf(1),
                A::U32(ids.len() as u32),
                A::U32(vocab as u32),
                A::U32(width as u32),
                A::Buf(2),
            ],
            checks: vec![(2, Cmp::Exact)],
        });
    }
}

/// Weight bytes of `rows` x `k` in `kernel`'s format and the values per block.
fn weight_bytes(rng: &mut Rng, suffix: &str, rows: usize, k: usize, nan_codes: bool) -> Vec<u8> {
    let n = rows * k;
    match suffix {
        "f32" => le_f32(&rng.vec(n, 1.0)),
        "bf16" => le_bf16(&rng.vec(n, 1.0)),
        "f16" => le_f16(&rng.vec(n, 1.0)),
        "q8_0" => q8_0_bytes(&rng.vec(n, 1.0)),
        "q4_k" => q4_k_bytes(&rng.vec(n, 1.0)),
        "f8" => scaled_blocks(rng, n / 128, 128, nan_codes),
        "mxfp4" => mxfp4_blocks(rng, n / 32),
        _ => scaled_blocks(rng, n / 64, 32, false),
    }
}

/// MXFP4 blocks: an E8M0 scale byte (2^-9 .. 2^-1, the range of trained weights, and 0, the
/// subnormal 2^-127) then 16 bytes of random codes (every code, both nibbles, -0 included).
fn mxfp4_blocks(rng: &mut Rng, blocks: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for b in 0..blocks {
        v.push(if b % 7 == 3 {
            0
        } else {
            118 + rng.below(9) as u8
        });
        v.extend(rng.bytes(16));
    }
    v
}

fn block_of(suffix: &str) -> (usize, usize) {
    match suffix {
        "q8_0" => (32, 34),
        "q4_k" => (256, 144),
        "f8" => (128, 132),
        "nf4" | "fp4" | "nf4bf16" | "nf4f16" | "fp4bf16" | "fp4f16" => (64, 36),
        "mxfp4" => (32, 17),
        "bf16" | "f16" => (1, 2),
        _ => (1, 4),
    }
}

/// Widening-exact special values at the start of a bf16 / f16 weight (NaN and infinities for
/// bf16, whose widening is a shift; subnormals, infinity and the largest value for f16, whose
/// NaN payloads the widening does not promise to keep).
fn with_specials(suffix: &str, mut w: Vec<u8>) -> Vec<u8> {
    let specials: &[u16] = match suffix {
        "bf16" => &[0x7FC1, 0xFF80, 0x0001, 0x8000],
        "f16" => &[0x0001, 0x83FF, 0x7C00, 0xFBFF],
        _ => &[],
    };
    for (i, b) in specials.iter().enumerate() {
        w[2 * i..2 * i + 2].copy_from_slice(&b.to_le_bytes());
    }
    w
}

fn dequant_cases(rng: &mut Rng, v: &mut Vec<Case>) {
    // bf16 / f16 "blocks" are single values (the argument counts values).
    for (kernel, suffix, n_blocks) in [
        ("dequant_q8_0", "q8_0", 37usize),
        ("dequant_q4_k", "q4_k", 7),
        ("dequant_f8", "f8", 9),
        ("dequant_nf4", "nf4", 11),
        ("dequant_fp4", "fp4", 13),
        ("dequant_nf4bf16", "nf4bf16", 11),
        ("dequant_nf4f16", "nf4f16", 9),
        ("dequant_fp4bf16", "fp4bf16", 13),
        ("dequant_fp4f16", "fp4f16", 7),
        ("dequant_mxfp4", "mxfp4", 15),
        ("dequant_bf16", "bf16", 1001),
        ("dequant_f16", "f16", 999),
    ] {
        let (block, block_bytes) = block_of(suffix);
        let w = with_specials(suffix, weight_bytes(rng, suffix, n_blocks, block, true));
        let values = n_blocks * block;
        v.push(Case {
            name: format!("{kernel} {n_blocks} blocks"),
            kernel,
            grid: [blocks_for(values), 1, 1],
            bufs: vec![Buf::Bytes(w), Buf::Bytes(vec![0; values * 4])],
            args: vec![A::Buf(0), A::U64(n_blocks as u64), A::Buf(1)],
            checks: vec![(1, Cmp::Exact)],
        });
        // From the third block on (a row of an embedding table, a slice of an expert), with
        // one block of threads striding over the rest.
        let rest = n_blocks - 3;
        v.push(Case {
            name: format!("{kernel} {rest} blocks at block 3, one thread block"),
            kernel,
            grid: [1, 1, 1],
            bufs: vec![
                Buf::Bytes(weight_bytes(rng, suffix, n_blocks, block, true)),
                Buf::Bytes(vec![0; rest * block * 4]),
            ],
            args: vec![A::At(0, 3 * block_bytes), A::U64(rest as u64), A::Buf(1)],
            checks: vec![(1, Cmp::Exact)],
        });
    }
}

fn matvec_cases(rng: &mut Rng, v: &mut Vec<Case>) {
    // (kernel, format, activation rows, outputs, inputs): outputs never a multiple of 8; for
    // f32 / bf16 / f16 inputs both on and off the 16-byte load path; for the block formats
    // whole blocks that are not multiples of 256 where the format allows.
    let shapes: &[(&'static str, &str, usize, usize, usize)] = &[
        ("matvec_f32", "f32", 1, 37, 1027),
        ("matvec_f32", "f32", 11, 45, 1024),
        ("matvec_bf16", "bf16", 3, 29, 4104),
        ("matvec_bf16", "bf16", 8, 41, 1001),
        ("matvec_f16", "f16", 1, 33, 998),
        ("matvec_f16", "f16", 9, 39, 1016),
        ("matvec_q8_0", "q8_0", 1, 37, 928),
        ("matvec_q8_0", "q8_0", 11, 45, 2080),
        ("matvec_q4_k", "q4_k", 1, 37, 768),
        ("matvec_q4_k", "q4_k", 10, 21, 1280),
        ("matvec_f8", "f8", 1, 37, 640),
        ("matvec_f8", "f8", 9, 27, 1152),
        ("matvec_nf4", "nf4", 1, 37, 832),
        ("matvec_nf4", "nf4", 12, 19, 448),
        ("matvec_fp4", "fp4", 1, 37, 832),
        ("matvec_fp4", "fp4", 7, 43, 1088),
        ("matvec_nf4bf16", "nf4bf16", 1, 37, 832),
        ("matvec_nf4f16", "nf4f16", 5, 19, 448),
        ("matvec_fp4bf16", "fp4bf16", 8, 29, 576),
        ("matvec_fp4f16", "fp4f16", 1, 43, 1088),
        ("matvec_mxfp4", "mxfp4", 1, 37, 2880),
        ("matvec_mxfp4", "mxfp4", 9, 29, 736),
    ];
    for &(kernel, suffix, m, n, k) in shapes {
        v.push(Case {
            name: format!("{kernel} m {m} n {n} k {k}"),
            kernel,
            grid: [n.div_ceil(8) as u32, 1, 1],
            bufs: vec![
                Buf::Bytes(le_f32(&rng.vec(m * k, 1.0))),
                Buf::Bytes(weight_bytes(rng, suffix, n, k, false)),
                Buf::Bytes(vec![0; m * n * 4]),
            ],
            args: vec![
                A::Buf(0),
                A::Buf(1),
                A::Buf(2),
                A::U32(m as u32),
                A::U32(n as u32),
                A::U32(k as u32),
            ],
            checks: vec![(2, Cmp::Norm(MATVEC_REL_TOL))],
        });
    }
}

/// Grouped matvecs: per weight type, three experts' weights (own buffers) with 1, 3 and 8
/// activation rows, one launch; each entry equals the single-weight kernel's result.
fn grouped_matvec_cases(rng: &mut Rng, v: &mut Vec<Case>) {
    let shapes: &[(&'static str, &str, usize, usize)] = &[
        ("matvec_grouped_f32", "f32", 37, 1027),
        ("matvec_grouped_bf16", "bf16", 29, 1001),
        ("matvec_grouped_f16", "f16", 33, 1016),
        ("matvec_grouped_q8_0", "q8_0", 37, 928),
        ("matvec_grouped_q4_k", "q4_k", 21, 1280),
        ("matvec_grouped_f8", "f8", 27, 1152),
        ("matvec_grouped_nf4", "nf4", 19, 448),
        ("matvec_grouped_fp4", "fp4", 43, 1088),
        ("matvec_grouped_nf4bf16", "nf4bf16", 19, 448),
        ("matvec_grouped_nf4f16", "nf4f16", 21, 320),
        ("matvec_grouped_fp4bf16", "fp4bf16", 23, 576),
        ("matvec_grouped_fp4f16", "fp4f16", 43, 1088),
        ("matvec_grouped_mxfp4", "mxfp4", 45, 1120),
    ];
    let rows = [1usize, 3, 8];
    let total: usize = rows.iter().sum();
    for &(kernel, suffix, n, k) in shapes {
        // Buffers: 0 the table, 1 x, 2 out, 3.. the weights.
        let mut table = Vec::new();
        let mut at = 0;
        for (e, &m) in rows.iter().enumerate() {
            table.extend([
                W::Addr(3 + e, 0),
                W::Addr(1, at * k * 4),
                W::Addr(2, at * n * 4),
                W::Val(m as u64),
            ]);
            at += m;
        }
        let mut bufs = vec![
            Buf::Table(table),
            Buf::Bytes(le_f32(&rng.vec(total * k, 1.0))),
            Buf::Bytes(vec![0; total * n * 4]),
        ];
        for _ in &rows {
            bufs.push(Buf::Bytes(weight_bytes(rng, suffix, n, k, false)));
        }
        v.push(Case {
            name: format!("{kernel} rows {rows:?} n {n} k {k}"),
            kernel,
            grid: [n.div_ceil(8) as u32, rows.len() as u32, 1],
            bufs,
            args: vec![
                A::Buf(0),
                A::Buf(1),
                A::Buf(2),
                A::U32(n as u32),
                A::U32(k as u32),
            ],
            checks: vec![(2, Cmp::Norm(MATVEC_REL_TOL))],
        });
    }
}

/// One RoPE launch's shape.
struct RopeShape {
    positions: &'static [u32],
    q_heads: usize,
    k_heads: usize,
    head_dim: usize,
    rot_dim: usize,
    theta: f32,
    scaling: f32,
    /// Pairs (2i, 2i + 1) (DeepSeek-V3) instead of (i, i + rot_dim / 2).
    interleaved: bool,
}

fn norm_and_rope_cases(rng: &mut Rng, v: &mut Vec<Case>) {
    for (rows, width) in [(5usize, 2051usize), (3, 64)] {
        let mut x = Vec::new();
        for r in 0..rows {
            // Rows of very different scales.
            x.extend(rng.vec(width, [1e-3, 1.0, 100.0][r % 3]));
        }
        v.push(Case {
            name: format!("rms_norm_f32 {rows} x {width}"),
            kernel: "rms_norm_f32",
            grid: [rows as u32, 1, 1],
            bufs: vec![
                Buf::Bytes(le_f32(&x)),
                Buf::Bytes(le_f32(&rng.vec(width, 1.5))),
            ],
            args: vec![
                A::Buf(0),
                A::Buf(1),
                A::U32(rows as u32),
                A::U32(width as u32),
                A::F32(1e-6),
            ],
            checks: vec![(0, Cmp::Rel(NORM_REL_TOL))],
        });
    }
    // Partial rotary with the angles in shared memory, and a rot_dim past the shared table
    // (per-thread angles).
    let shapes = [
        RopeShape {
            positions: &[0, 1, 777, 40_000],
            q_heads: 4,
            k_heads: 2,
            head_dim: 128,
            rot_dim: 64,
            theta: 1e6,
            scaling: 1.0,
            interleaved: false,
        },
        RopeShape {
            positions: &[5, 123_456],
            q_heads: 2,
            k_heads: 1,
            head_dim: 600,
            rot_dim: 600,
            theta: 1e4,
            scaling: 0.87,
            interleaved: false,
        },
        // Interleaved pairs over a partial rotary (DeepSeek-V3's 64 rope values of 192).
        RopeShape {
            positions: &[0, 3, 4095, 70_000],
            q_heads: 3,
            k_heads: 1,
            head_dim: 192,
            rot_dim: 64,
            theta: 1e4,
            scaling: 1.3,
            interleaved: true,
        },
    ];
    for sh in shapes {
        let (pos, qh, kh, hd, rot) = (
            sh.positions,
            sh.q_heads,
            sh.k_heads,
            sh.head_dim,
            sh.rot_dim,
        );
        let (theta, scaling, interleaved) = (sh.theta, sh.scaling, sh.interleaved);
        let rows = pos.len();
        let inv_freq: Vec<f32> = (0..rot / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f32 / rot as f32))
            .collect();
        v.push(Case {
            name: format!("rope_f32 head_dim {hd} rot_dim {rot} interleaved {interleaved}"),
            kernel: "rope_f32",
            grid: [rows as u32, 1, 1],
            bufs: vec![
                Buf::Bytes(le_f32(&rng.vec(rows * qh * hd, 3.0))),
                Buf::Bytes(le_f32(&rng.vec(rows * kh * hd, 3.0))),
                Buf::Bytes(le_u32(pos)),
                Buf::Bytes(le_f32(&inv_freq)),
            ],
            args: vec![
                A::Buf(0),
                A::Buf(1),
                A::Buf(2),
                A::Buf(3),
                A::U32(rows as u32),
                A::U32((qh * hd) as u32),
                A::U32((kh * hd) as u32),
                A::U32(hd as u32),
                A::U32(rot as u32),
                A::F32(scaling),
                A::U32(u32::from(interleaved)),
            ],
            checks: vec![(0, Cmp::Norm(ROPE_REL_TOL)), (1, Cmp::Norm(ROPE_REL_TOL))],
        });
    }
}

fn elementwise_cases(rng: &mut Rng, v: &mut Vec<Case>) {
    // Finite values with subnormals and signed zeros (a NaN's payload after an add is not part
    // of the contract; flushing subnormals would be).
    let finite = |rng: &mut Rng, n: usize| {
        let mut x = rng.vec(n, 10.0);
        x[..4].copy_from_slice(&[1e-40, -1e-41, -0.0, 0.0]);
        x
    };
    let n = 10_007;
    v.push(Case {
        name: format!("add_f32 {n}, 3 blocks striding"),
        kernel: "add_f32",
        grid: [3, 1, 1],
        bufs: vec![
            Buf::Bytes(le_f32(&finite(rng, n))),
            Buf::Bytes(le_f32(&finite(rng, n))),
        ],
        args: vec![A::Buf(0), A::Buf(1), A::U32(n as u32)],
        checks: vec![(0, Cmp::Exact)],
    });
    // The expf-based kernels, over a wide range with NaN and infinities in the inputs.
    let wide = |rng: &mut Rng, n: usize| {
        let mut x = rng.vec(n, 30.0);
        x[..5].copy_from_slice(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 100.0]);
        x
    };
    let n = 5003;
    v.push(Case {
        name: format!("silu_mul_f32 {n}"),
        kernel: "silu_mul_f32",
        grid: [blocks_for(n), 1, 1],
        bufs: vec![
            Buf::Bytes(le_f32(&wide(rng, n))),
            Buf::Bytes(le_f32(&rng.vec(n, 4.0))),
        ],
        args: vec![A::Buf(0), A::Buf(1), A::U32(n as u32)],
        checks: vec![(1, Cmp::Ulps(EXPF_MAX_ULPS))],
    });
    let mut u = rng.vec(n, 12.0);
    u[7] = f32::NAN;
    v.push(Case {
        name: format!("glu_clamped_f32 {n}"),
        kernel: "glu_clamped_f32",
        grid: [blocks_for(n), 1, 1],
        bufs: vec![Buf::Bytes(le_f32(&wide(rng, n))), Buf::Bytes(le_f32(&u))],
        args: vec![
            A::Buf(0),
            A::Buf(1),
            A::U32(n as u32),
            A::F32(7.0),
            A::F32(1.702),
        ],
        checks: vec![(1, Cmp::Ulps(EXPF_MAX_ULPS))],
    });
    v.push(Case {
        name: format!("mul_sigmoid_f32 {n}"),
        kernel: "mul_sigmoid_f32",
        grid: [blocks_for(n), 1, 1],
        bufs: vec![
            Buf::Bytes(le_f32(&rng.vec(n, 4.0))),
            Buf::Bytes(le_f32(&wide(rng, n))),
        ],
        args: vec![A::Buf(0), A::Buf(1), A::U32(n as u32)],
        checks: vec![(0, Cmp::Ulps(EXPF_MAX_ULPS))],
    });
    let (rows, width) = (6usize, 700usize);
    v.push(Case {
        name: format!("add_gated_rows_f32 {rows} x {width}"),
        kernel: "add_gated_rows_f32",
        grid: [rows as u32, blocks_for(width), 1],
        bufs: vec![
            Buf::Bytes(le_f32(&rng.vec(rows * width, 3.0))),
            Buf::Bytes(le_f32(&rng.vec(rows * width, 3.0))),
            Buf::Bytes(le_f32(&rng.vec(rows, 6.0))),
        ],
        args: vec![
            A::Buf(0),
            A::Buf(1),
            A::Buf(2),
            A::U32(rows as u32),
            A::U32(width as u32),
        ],
        checks: vec![(0, Cmp::Norm(GATED_ADD_REL_TOL))],
    });
    let (rows, width) = (7usize, 300usize);
    v.push(Case {
        name: format!("add_rows_f32 {rows} x {width}"),
        kernel: "add_rows_f32",
        grid: [rows as u32, blocks_for(width), 1],
        bufs: vec![
            Buf::Bytes(le_f32(&finite(rng, rows * width))),
            Buf::Bytes(le_f32(&finite(rng, width))),
        ],
        args: vec![
            A::Buf(0),
            A::Buf(1),
            A::U32(rows as u32),
            A::U32(width as u32),
        ],
        checks: vec![(0, Cmp::Exact)],
    });
    let mut x = rng.vec(1001, 8.0);
    x[..6].copy_from_slice(&[
        f32::NAN,
        f32::from_bits(0xFFC0_1234),
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        3.5,
    ]);
    v.push(Case {
        name: "clamp_f32 1001, 2 blocks striding".into(),
        kernel: "clamp_f32",
        grid: [2, 1, 1],
        bufs: vec![Buf::Bytes(le_f32(&x))],
        args: vec![A::Buf(0), A::U32(1001), A::F32(3.5)],
        checks: vec![(0, Cmp::Exact)],
    });
    let (blocks, d) = (9usize, 300usize);
    for kernel in ["split_halves_f32", "split_pairs_f32"] {
        v.push(Case {
            name: format!("{kernel} {blocks} x 2 x {d}"),
            kernel,
            grid: [blocks as u32, blocks_for(d), 1],
            bufs: vec![
                Buf::Bytes(le_f32(&wide(rng, blocks * 2 * d))),
                Buf::Bytes(vec![0; blocks * d * 4]),
                Buf::Bytes(vec![0; blocks * d * 4]),
            ],
            args: vec![
                A::Buf(0),
                A::Buf(1),
                A::Buf(2),
                A::U32(blocks as u32),
                A::U32(d as u32),
            ],
            checks: vec![(1, Cmp::Exact), (2, Cmp::Exact)],
        });
    }
    // MLA's heads (nope 128 | rope 64) and a ragged split past one block of threads.
    for (blocks, a, b) in [(7usize, 128usize, 64usize), (5, 3, 290)] {
        let x = wide(rng, blocks * (a + b));
        v.push(Case {
            name: format!("split_heads_f32 {blocks} x ({a} | {b})"),
            kernel: "split_heads_f32",
            grid: [blocks as u32, blocks_for(a + b), 1],
            bufs: vec![
                Buf::Bytes(le_f32(&x)),
                Buf::Bytes(vec![0; blocks * a * 4]),
                Buf::Bytes(vec![0; blocks * b * 4]),
            ],
            args: vec![
                A::Buf(0),
                A::Buf(1),
                A::Buf(2),
                A::U32(blocks as u32),
                A::U32(a as u32),
                A::U32(b as u32),
            ],
            checks: vec![(1, Cmp::Exact), (2, Cmp::Exact)],
        });
        v.push(Case {
            name: format!("join_heads_f32 {blocks} x ({a} | {b})"),
            kernel: "join_heads_f32",
            grid: [blocks as u32, blocks_for(a + b), 1],
            bufs: vec![
                Buf::Bytes(le_f32(&wide(rng, blocks * a))),
                Buf::Bytes(le_f32(&wide(rng, blocks * b))),
                Buf::Bytes(vec![0; blocks * (a + b) * 4]),
            ],
            args: vec![
                A::Buf(0),
                A::Buf(1),
                A::Buf(2),
                A::U32(blocks as u32),
                A::U32(a as u32),
                A::U32(b as u32),
            ],
            checks: vec![(2, Cmp::Exact)],
        });
    }
    let (total, width) = (13usize, 333usize);
    let rows = [12u32, 0, 5, 5, 7];
    v.push(Case {
        name: format!("gather_rows_f32 {} of {total} x {width}", rows.len()),
        kernel: "gather_rows_f32",
        grid: [rows.len() as u32, blocks_for(width), 1],
        bufs: vec![
            Buf::Bytes(le_f32(&wide(rng, total * width))),
            Buf::Bytes(le_u32(&rows)),
            Buf::Bytes(vec![0; rows.len() * width * 4]),
        ],
        args: vec![
            A::Buf(0),
            A::Buf(1),
            A::U32(rows.len() as u32),
            A::U32(width as u32),
            A::Buf(2),
        ],
        checks: vec![(2, Cmp::Exact)],
    });
}

fn kv_store_cases(rng: &mut Rng, v: &mut Vec<Case>) {
    let n = 4099usize;
    let mut src = rng.vec(n, 50.0);
    let edges = edge_values();
    src[..edges.len()].copy_from_slice(&edges);
    // Tiny values around the f16 subnormal range.
    for x in &mut src[edges.len()..200] {
        *x *= 1e-6;
    }
    for (kernel, elem_bytes) in [
        ("kv_store_f32", 4usize),
        ("kv_store_bf16", 2),
        ("kv_store_f16", 2),
    ] {
        // Stored after 3 existing positions' worth of values; the rest of the cache must keep
        // its bytes.
        let skip = 3usize;
        v.push(Case {
            name: format!("{kernel} {n} values at element {skip}"),
            kernel,
            grid: [blocks_for(n), 1, 1],
            bufs: vec![
                Buf::Bytes(le_f32(&src)),
                Buf::Bytes(rng.bytes((n + skip + 5) * elem_bytes)),
            ],
            args: vec![A::Buf(0), A::At(1, skip * elem_bytes), A::U64(n as u64)],
            checks: vec![(1, Cmp::Exact)],
        });
    }
}

fn attention_cases(rng: &mut Rng, v: &mut Vec<Case>) {
    // Two sequences' caches (300 and 45 positions), three rows: the first sequence's last
    // position, one of its earlier positions (a prefill row), the second's last; grouped
    // query attention with 4 query heads per KV head.
    let (nh, nkv) = (8usize, 2usize);
    let (len_a, len_b) = (300usize, 45usize);
    let pos = [299u32, 150, 44];
    // With sinks (one logit per head, gpt-oss) in two of them.
    for (kernel, hd, window, with_sinks) in [
        ("attention_decode_f32", 72usize, 0u32, false),
        ("attention_decode_bf16", 128, 0, true),
        ("attention_decode_f16", 256, 100, true),
    ] {
        let kvr = nkv * hd;
        let enc = |vals: Vec<f32>| match kernel {
            "attention_decode_f32" => le_f32(&vals),
            "attention_decode_bf16" => le_bf16(&vals),
            _ => le_f16(&vals),
        };
        let mut bufs = vec![
            Buf::Bytes(le_f32(&rng.vec(pos.len() * nh * hd, 0.6))), // 0: q
            Buf::Bytes(enc(rng.vec(len_a * kvr, 1.0))),             // 1: k, sequence a
            Buf::Bytes(enc(rng.vec(len_a * kvr, 2.0))),             // 2: v, sequence a
            Buf::Bytes(enc(rng.vec(len_b * kvr, 1.0))),             // 3: k, sequence b
            Buf::Bytes(enc(rng.vec(len_b * kvr, 2.0))),             // 4: v, sequence b
            Buf::Addrs(vec![(1, 0), (1, 0), (3, 0)]),               // 5: k per row
            Buf::Addrs(vec![(2, 0), (2, 0), (4, 0)]),               // 6: v per row
            Buf::Bytes(le_u32(&pos)),                               // 7
            Buf::Bytes(vec![0; pos.len() * nh * hd * 4]),           // 8: out
        ];
        let sinks = if with_sinks {
            bufs.push(Buf::Bytes(le_f32(&rng.vec(nh, 3.0)))); // 9: sinks
            A::Buf(9)
        } else {
            A::Null
        };
        v.push(Case {
            name: format!("{kernel} head_dim {hd} window {window} sinks {with_sinks}"),
            kernel,
            grid: [pos.len() as u32, nkv as u32, 1],
            bufs,
            args: vec![
                A::Buf(0),
                A::Buf(5),
                A::Buf(6),
                A::Buf(7),
                A::U32(window),
                A::U32(nh as u32),
                A::U32(nkv as u32),
                A::U32(hd as u32),
                A::F32((hd as f32).powf(-0.5)),
                A::U32(1),
                A::Null,
                A::Buf(8),
                sinks,
            ],
            checks: vec![(8, Cmp::Norm(ATTENTION_REL_TOL))],
        });
    }
    // Long contexts: the positions split over 3 blocks per (row, KV head), each writing its
    // softmax state, then merged in ascending order.
    let (hd, splits, len) = (64usize, 3usize, 1400usize);
    let kvr = nkv * hd;
    let pos = [1399u32, 700];
    let rows = pos.len();
    let state = rows * nh * splits * (hd + 2);
    v.push(Case {
        name: format!("attention_decode_f32 {splits} splits over {len} positions"),
        kernel: "attention_decode_f32",
        grid: [rows as u32, nkv as u32, splits as u32],
        bufs: vec![
            Buf::Bytes(le_f32(&rng.vec(rows * nh * hd, 0.6))),
            Buf::Bytes(le_f32(&rng.vec(len * kvr, 1.0))),
            Buf::Bytes(le_f32(&rng.vec(len * kvr, 2.0))),
            Buf::Addrs(vec![(1, 0), (1, 0)]),
            Buf::Addrs(vec![(2, 0), (2, 0)]),
            Buf::Bytes(le_u32(&pos)),
            Buf::Bytes(vec![0; state * 4]),
            Buf::Bytes(vec![0; rows * nh * hd * 4]),
        ],
        args: vec![
            A::Buf(0),
            A::Buf(3),
            A::Buf(4),
            A::Buf(5),
            A::U32(0),
            A::U32(nh as u32),
            A::U32(nkv as u32),
            A::U32(hd as u32),
            A::F32((hd as f32).powf(-0.5)),
            A::U32(splits as u32),
            A::Buf(6),
            A::Buf(7),
            A::Null,
        ],
        checks: vec![(6, Cmp::Norm(ATTENTION_REL_TOL))],
    });
    // The merge alone, over states with a wide range of maxima and one empty split.
    let mut part = Vec::with_capacity(state);
    for i in 0..rows * nh {
        for z in 0..splits {
            if z == 2 && i % 3 == 0 {
                part.push(f32::NEG_INFINITY);
                part.push(0.0);
                part.extend(std::iter::repeat_n(0.0, hd));
            } else {
                part.push(rng.vec(1, 8.0)[0]);
                part.push(1.0 + rng.vec(1, 0.5)[0].abs() * 100.0);
                part.extend(rng.vec(hd, 50.0));
            }
        }
    }
    // Without and with sinks (joining after the splits).
    let sinks = rng.vec(nh, 8.0);
    for with_sinks in [false, true] {
        v.push(Case {
            name: format!("attention_merge_f32 {splits} splits sinks {with_sinks}"),
            kernel: "attention_merge_f32",
            grid: [rows as u32, nh as u32, 1],
            bufs: vec![
                Buf::Bytes(le_f32(&part)),
                Buf::Bytes(vec![0; rows * nh * hd * 4]),
                Buf::Bytes(le_f32(&sinks)),
            ],
            args: vec![
                A::Buf(0),
                A::U32(splits as u32),
                A::U32(nh as u32),
                A::U32(hd as u32),
                A::Buf(1),
                if with_sinks { A::Buf(2) } else { A::Null },
            ],
            checks: vec![(1, Cmp::Norm(ATTENTION_REL_TOL))],
        });
    }
}

fn latent_attention_cases(rng: &mut Rng, v: &mut Vec<Case>) {
    // DeepSeek-V3's latent widths (576-wide keys whose first 512 values are the values), 5
    // query heads (the last block has one idle head) over one latent KV head; two sequences'
    // key caches (300 and 45 positions) and three rows as in the standard cases.
    let (nh, nkv, hd, vd) = (5usize, 1usize, 576usize, 512usize);
    let heads_per_block = 2u32;
    let (len_a, len_b) = (300usize, 45usize);
    let pos = [299u32, 150, 44];
    let rows = pos.len();
    let grid_y = (nh as u32).div_ceil(heads_per_block);
    for (kernel, window, with_sinks) in [
        ("attention_latent_f32", 0u32, false),
        ("attention_latent_bf16", 0, true),
        ("attention_latent_f16", 100, true),
    ] {
        let enc = |vals: Vec<f32>| match kernel {
            "attention_latent_f32" => le_f32(&vals),
            "attention_latent_bf16" => le_bf16(&vals),
            _ => le_f16(&vals),
        };
        let mut bufs = vec![
            Buf::Bytes(le_f32(&rng.vec(rows * nh * hd, 0.1))), // 0: q
            Buf::Bytes(enc(rng.vec(len_a * nkv * hd, 1.0))),   // 1: keys, sequence a
            Buf::Bytes(enc(rng.vec(len_b * nkv * hd, 1.0))),   // 2: keys, sequence b
            Buf::Addrs(vec![(1, 0), (1, 0), (2, 0)]),          // 3: keys per row
            Buf::Bytes(le_u32(&pos)),                          // 4
            Buf::Bytes(vec![0; rows * nh * vd * 4]),           // 5: out
        ];
        let sinks = if with_sinks {
            bufs.push(Buf::Bytes(le_f32(&rng.vec(nh, 3.0)))); // 6: sinks
            A::Buf(6)
        } else {
            A::Null
        };
        v.push(Case {
            name: format!(
                "{kernel} head_dim {hd} value_dim {vd} window {window} sinks {with_sinks}"
            ),
            kernel,
            grid: [rows as u32, grid_y, 1],
            bufs,
            args: vec![
                A::Buf(0),
                A::Buf(3),
                A::Buf(4),
                A::U32(window),
                A::U32(nh as u32),
                A::U32(nkv as u32),
                A::U32(hd as u32),
                A::U32(vd as u32),
                A::F32(0.0417),
                A::U32(1),
                A::Null,
                A::Buf(5),
                sinks,
            ],
            checks: vec![(5, Cmp::Norm(ATTENTION_REL_TOL))],
        });
    }
    // A long latent context: 3 splits' states, then their merge over 512-wide values (two
    // elements per thread).
    let (splits, len) = (3usize, 1400usize);
    let pos = [1399u32, 700];
    let rows = pos.len();
    let state = rows * nh * splits * (vd + 2);
    v.push(Case {
        name: format!("attention_latent_bf16 {splits} splits over {len} positions"),
        kernel: "attention_latent_bf16",
        grid: [rows as u32, grid_y, splits as u32],
        bufs: vec![
            Buf::Bytes(le_f32(&rng.vec(rows * nh * hd, 0.1))),
            Buf::Bytes(le_bf16(&rng.vec(len * nkv * hd, 1.0))),
            Buf::Addrs(vec![(1, 0), (1, 0)]),
            Buf::Bytes(le_u32(&pos)),
            Buf::Bytes(vec![0; state * 4]),
            Buf::Bytes(vec![0; rows * nh * vd * 4]),
        ],
        args: vec![
            A::Buf(0),
            A::Buf(2),
            A::Buf(3),
            A::U32(0),
            A::U32(nh as u32),
            A::U32(nkv as u32),
            A::U32(hd as u32),
            A::U32(vd as u32),
            A::F32(0.0417),
            A::U32(splits as u32),
            A::Buf(4),
            A::Buf(5),
            A::Null,
        ],
        checks: vec![(4, Cmp::Norm(ATTENTION_REL_TOL))],
    });
    let mut part = Vec::with_capacity(state);
    for i in 0..rows * nh {
        for z in 0..splits {
            if z == 1 && i % 4 == 0 {
                part.push(f32::NEG_INFINITY);
                part.push(0.0);
                part.extend(std::iter::repeat_n(0.0, vd));
            } else {
                part.push(rng.vec(1, 8.0)[0]);
                part.push(1.0 + rng.vec(1, 0.5)[0].abs() * 100.0);
                part.extend(rng.vec(vd, 50.0));
            }
        }
    }
    v.push(Case {
        name: format!("attention_merge_f32 {splits} splits of {vd}-wide values, sinks"),
        kernel: "attention_merge_f32",
        grid: [rows as u32, nh as u32, 1],
        bufs: vec![
            Buf::Bytes(le_f32(&part)),
            Buf::Bytes(vec![0; rows * nh * vd * 4]),
            Buf::Bytes(le_f32(&rng.vec(nh, 8.0))),
        ],
        args: vec![
            A::Buf(0),
            A::U32(splits as u32),
            A::U32(nh as u32),
            A::U32(vd as u32),
            A::Buf(1),
            A::Buf(2),
        ],
        checks: vec![(1, Cmp::Norm(ATTENTION_REL_TOL))],
    });
}

fn head_matmul_cases(rng: &mut Rng, v: &mut Vec<Case>) {
    // kv_b_proj in small: 5 heads of 20 rows in a [100, 256] weight, each head's rows 8..20
    // (offset 8, len 12) used; this launch takes heads 1..4 (h0 = 1, its weight pointer at head
    // 1's rows) of 11 activation rows (two blocks of 8 rows on z); the output's other heads
    // keep their bytes.
    let (heads, h0, launched, stride, offset, len, cols, rows) = (
        5usize, 1usize, 3usize, 20usize, 8usize, 12usize, 256usize, 11usize,
    );
    for (kernel, suffix) in [
        ("head_matmul_t_f32", "f32"),
        ("head_matmul_t_bf16", "bf16"),
        ("head_matmul_t_f16", "f16"),
        ("head_matmul_t_f8", "f8"),
        ("head_matmul_t_q8_0", "q8_0"),
    ] {
        let (block, block_bytes) = block_of(suffix);
        let w = weight_bytes(rng, suffix, heads * stride, cols, false);
        let w_at = h0 * stride * cols / block * block_bytes;
        v.push(Case {
            name: format!(
                "{kernel} heads {h0}..{} of {heads}, rows {offset}..+{len} of {stride}, {rows} \
                 rows",
                h0 + launched
            ),
            kernel,
            grid: [blocks_for(cols), launched as u32, rows.div_ceil(8) as u32],
            bufs: vec![
                Buf::Bytes(le_f32(&rng.vec(rows * heads * len, 1.0))),
                Buf::Bytes(w),
                Buf::Bytes(le_f32(&rng.vec(rows * heads * cols, 1.0))),
            ],
            args: vec![
                A::Buf(0),
                A::At(1, w_at),
                A::Buf(2),
                A::U32(rows as u32),
                A::U32(heads as u32),
                A::U32(h0 as u32),
                A::U32(stride as u32),
                A::U32(offset as u32),
                A::U32(len as u32),
                A::U32(cols as u32),
            ],
            // The sum runs in the twin's order, each step rounded once: exact.
            checks: vec![(2, Cmp::Exact)],
        });
    }
}

fn moe_cases(rng: &mut Rng, v: &mut Vec<Case>) {
    let (rows, hidden) = (10usize, 700usize);
    let routed = [7u32, 2, 9, 0];
    let n = routed.len();
    v.push(Case {
        name: format!("moe_sum_f32 {n} of {rows} rows x {hidden}"),
        kernel: "moe_sum_f32",
        grid: [blocks_for(hidden), n as u32, 1],
        bufs: vec![
            Buf::Bytes(le_f32(&rng.vec(rows * hidden, 2.0))),
            Buf::Bytes(le_u32(&routed)),
            Buf::Bytes(le_f32(&rng.vec(n, 1.0))),
            Buf::Bytes(le_f32(&rng.vec(n * hidden, 3.0))),
        ],
        args: vec![
            A::Buf(0),
            A::Buf(1),
            A::Buf(2),
            A::Buf(3),
            A::U32(n as u32),
            A::U32(hidden as u32),
        ],
        checks: vec![(0, Cmp::Exact)],
    });
}

/// The layer's ordered expert sum: 6 token rows, 5 expert rows, rows listing 0 to 2 entries.
fn moe_sum_rows_cases(rng: &mut Rng, v: &mut Vec<Case>) {
    let (rows, hidden) = (6usize, 700usize);
    let lists: [&[u32]; 6] = [&[0, 3], &[], &[1], &[4, 2, 0], &[3], &[]];
    let mut start = vec![0u32];
    let mut entries = Vec::new();
    for l in lists {
        entries.extend_from_slice(l);
        start.push(entries.len() as u32);
    }
    let n_y = 5;
    v.push(Case {
        name: format!("moe_sum_rows_f32 {rows} rows x {hidden}, {n_y} expert rows"),
        kernel: "moe_sum_rows_f32",
        grid: [rows as u32, blocks_for(hidden), 1],
        bufs: vec![
            Buf::Bytes(le_f32(&rng.vec(rows * hidden, 2.0))),
            Buf::Bytes(le_u32(&start)),
            Buf::Bytes(le_u32(&entries)),
            Buf::Bytes(le_f32(&rng.vec(n_y, 1.0))),
            Buf::Bytes(le_f32(&rng.vec(n_y * hidden, 3.0))),
        ],
        args: vec![
            A::Buf(0),
            A::Buf(1),
            A::Buf(2),
            A::Buf(3),
            A::Buf(4),
            A::U32(rows as u32),
            A::U32(hidden as u32),
        ],
        checks: vec![(0, Cmp::Exact)],
    });
}

fn route_cases(rng: &mut Rng, v: &mut Vec<Case>) {
    // (experts, k, renormalize, scale, selection bias): Mixtral's and Qwen3's shapes, a
    // 512-expert one, the kernel's limits, and ragged counts past a warp and a block.
    let shapes = [
        (8usize, 2usize, true, 1.0f32, false),
        (60, 4, false, 1.0, true),
        (128, 8, true, 1.0, false),
        (300, 7, false, 2.5, true),
        (512, 10, true, 1.0, false),
        (1024, 32, true, 0.75, true),
    ];
    for (e, k, renorm, scale, with_bias) in shapes {
        let rows = 5usize;
        let mut logits = rng.vec(rows * e, 4.0);
        // Exact ties (the lower index wins on both), signed zeros, and a row with an -inf.
        logits[1] = logits[0];
        logits[e + 2] = 0.0;
        logits[e + 3] = -0.0;
        logits[2 * e + 1] = f32::NEG_INFINITY;
        let mut bufs = vec![
            Buf::Bytes(le_f32(&logits)),
            Buf::Bytes(vec![0u8; rows * k * 4]),
            Buf::Bytes(vec![0u8; rows * k * 4]),
        ];
        let bias = if with_bias {
            bufs.push(Buf::Bytes(le_f32(&rng.vec(e, 0.05))));
            A::Buf(3)
        } else {
            A::Null
        };
        v.push(Case {
            name: format!(
                "route_softmax_topk_f32 {rows} rows x {e} experts, top {k}, renormalize \
                 {renorm}, scale {scale}, bias {with_bias}"
            ),
            kernel: "route_softmax_topk_f32",
            grid: [rows as u32, 1, 1],
            bufs,
            args: vec![
                A::Buf(0),
                bias,
                A::U32(e as u32),
                A::U32(k as u32),
                A::U32(u32::from(renorm)),
                A::F32(scale),
                A::Buf(1),
                A::Buf(2),
            ],
            // The same experts in the same order; weights within a few ulps (the device's
            // expf and its tree-ordered sum against the twin's sequential one).
            checks: vec![(1, Cmp::Exact), (2, Cmp::Ulps(16))],
        });
    }
}

fn deltanet_cases(rng: &mut Rng, v: &mut Vec<Case>) {
    // Qwen3-Next's layout at small, ragged sizes: 2 key heads, 8 value heads (group 4).
    let (rows, nk, nv, dk, dv) = (3usize, 2usize, 8usize, 24usize, 40usize);
    let group = nv / nk;
    let per_k = 2 * dk + 2 * group * dv;
    let conv_dim = 2 * nk * dk + nv * dv;
    let mut ba = rng.vec(rows * 2 * nv, 8.0);
    // a + dt_bias past softplus's linear threshold (20) and far below it.
    ba[group] = 40.0;
    ba[group + 1] = -60.0;
    let neg_a: Vec<f32> = (0..nv).map(|_| -(rng.unit() + 1.5)).collect();
    v.push(Case {
        name: format!("deltanet_split_f32 {rows} rows, {nk} key / {nv} value heads"),
        kernel: "deltanet_split_f32",
        grid: [rows as u32, blocks_for(nk * per_k), 1],
        bufs: vec![
            Buf::Bytes(le_f32(&rng.vec(rows * nk * per_k, 3.0))),
            Buf::Bytes(le_f32(&ba)),
            Buf::Bytes(le_f32(&neg_a)),
            Buf::Bytes(le_f32(&rng.vec(nv, 1.0))),
            Buf::Bytes(vec![0; rows * conv_dim * 4]),
            Buf::Bytes(vec![0; rows * nv * dv * 4]),
            Buf::Bytes(vec![0; rows * nv * 4]),
            Buf::Bytes(vec![0; rows * nv * 4]),
        ],
        args: vec![
            A::Buf(0),
            A::Buf(1),
            A::Buf(2),
            A::Buf(3),
            A::U32(rows as u32),
            A::U32(nk as u32),
            A::U32(nv as u32),
            A::U32(dk as u32),
            A::U32(dv as u32),
            A::Buf(4),
            A::Buf(5),
            A::Buf(6),
            A::Buf(7),
        ],
        checks: vec![
            (4, Cmp::Exact),
            (5, Cmp::Exact),
            (6, Cmp::Ulps(EXPF_MAX_ULPS)),
            (7, Cmp::Ulps(EXPF_MAX_ULPS)),
        ],
    });
    for (k_dim, extra) in [(dk, 0usize), (128, 40)] {
        let stride = 2 * nk * k_dim + extra;
        let mut x = Vec::new();
        for r in 0..rows {
            x.extend(rng.vec(stride, [0.01, 1.0, 30.0][r % 3]));
        }
        v.push(Case {
            name: format!("l2norm_heads_f32 {rows} rows, {nk} heads of {k_dim}"),
            kernel: "l2norm_heads_f32",
            grid: [rows as u32, 2 * nk as u32, 1],
            bufs: vec![Buf::Bytes(le_f32(&x))],
            args: vec![
                A::Buf(0),
                A::U32(rows as u32),
                A::U32(stride as u32),
                A::U32(nk as u32),
                A::U32(k_dim as u32),
                A::F32((k_dim as f32).powf(-0.5)),
            ],
            checks: vec![(0, Cmp::Rel(NORM_REL_TOL))],
        });
    }
    // One sequence's tokens through the convolution and the delta rule, each token after the
    // last, the state carried (the recurrent form): 300 channels, 4 taps, 37 tokens.
    let (c, taps, toks) = (300usize, 4usize, 37usize);
    v.push(Case {
        name: format!("conv1d_silu_seq_f32 {toks} tokens, {c} channels, {taps} taps"),
        kernel: "conv1d_silu_seq_f32",
        grid: [blocks_for(c), 1, 1],
        bufs: vec![
            Buf::Bytes(le_f32(&rng.vec(toks * c, 3.0))),
            Buf::Bytes(le_f32(&rng.vec(c * taps, 1.0))),
            Buf::Bytes(le_f32(&rng.vec((taps - 1) * c, 3.0))),
            Buf::Bytes(vec![0; toks * c * 4]),
        ],
        args: vec![
            A::Buf(0),
            A::Buf(1),
            A::Buf(2),
            A::U32(toks as u32),
            A::U32(c as u32),
            A::U32(taps as u32),
            A::Buf(3),
        ],
        checks: vec![(2, Cmp::Exact), (3, Cmp::Ulps(EXPF_MAX_ULPS))],
    });
    let g: Vec<f32> = (0..toks * nv).map(|_| -(rng.unit() + 1.0) * 2.0).collect();
    let beta: Vec<f32> = (0..toks * nv).map(|_| (rng.unit() + 1.0) / 2.0).collect();
    v.push(Case {
        name: format!("gated_delta_seq_f32 {toks} tokens, {nv} value heads, {dk} x {dv}"),
        kernel: "gated_delta_seq_f32",
        grid: [blocks_for(nv * dv), 1, 1],
        bufs: vec![
            Buf::Bytes(le_f32(&rng.vec(toks * conv_dim, 0.3))),
            Buf::Bytes(le_f32(&g)),
            Buf::Bytes(le_f32(&beta)),
            Buf::Bytes(le_f32(&rng.vec(nv * dk * dv, 1.0))),
            Buf::Bytes(vec![0; toks * nv * dv * 4]),
        ],
        args: vec![
            A::Buf(0),
            A::U32(conv_dim as u32),
            A::Buf(1),
            A::Buf(2),
            A::Buf(3),
            A::U32(toks as u32),
            A::U32(nk as u32),
            A::U32(nv as u32),
            A::U32(dk as u32),
            A::U32(dv as u32),
            A::Buf(4),
        ],
        checks: vec![
            (3, Cmp::Norm(DELTANET_REL_TOL)),
            (4, Cmp::Norm(DELTANET_REL_TOL)),
        ],
    });
    let n = 3001;
    let mut z = rng.vec(n, 30.0);
    z[..3].copy_from_slice(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
    v.push(Case {
        name: format!("mul_silu_f32 {n}"),
        kernel: "mul_silu_f32",
        grid: [blocks_for(n), 1, 1],
        bufs: vec![Buf::Bytes(le_f32(&rng.vec(n, 4.0))), Buf::Bytes(le_f32(&z))],
        args: vec![A::Buf(0), A::Buf(1), A::U32(n as u32)],
        checks: vec![(0, Cmp::Ulps(EXPF_MAX_ULPS))],
    });
}

// ---------------------------------------------------------------------------------------------
// The harness, checked everywhere.

#[test]
fn the_parity_cases_cover_every_launched_kernel_and_run_on_the_mock() {
    let cases = cases();
    let covered: std::collections::BTreeSet<&str> = cases.iter().map(|c| c.kernel).collect();
    for src in moe_kernels::cuda::SOURCES {
        for &k in src.kernels {
            let skipped = NOT_COVERED.iter().any(|(n, _)| *n == k);
            assert!(
                covered.contains(k) != skipped,
                "kernel {k} ({}): {}",
                src.file,
                if skipped {
                    "has cases but is listed in NOT_COVERED"
                } else {
                    "has no parity case in tests/gpu.rs; add one or list it in NOT_COVERED"
                }
            );
        }
    }
    // Mock against mock: every launch is accepted (argument kinds, bounds of every access)
    // and gives the same bits.
    let failures = run_cases(&MockGpu::new(), &MockGpu::new(), &cases, false, None);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// How [`tamper`] changes one value of a result.
#[derive(Clone, Copy)]
enum Corruption {
    /// The lowest bit flipped: one ulp for an f32.
    OneUlp,
    /// Multiplied by 1.5.
    Scale,
}

/// Changes the last finite non-zero f32 word of a result buffer (the first byte where there is
/// none), as a wrong device result would.
fn tamper(how: Corruption, dst: &mut [u8]) {
    let word = |d: &[u8], i: usize| f32::from_le_bytes(d[i * 4..i * 4 + 4].try_into().unwrap());
    let at = (0..dst.len() / 4).rev().find(|&i| {
        let x = word(dst, i);
        x.is_finite() && x != 0.0
    });
    match at {
        Some(i) => {
            let x = word(dst, i);
            let y = match how {
                Corruption::OneUlp => f32::from_bits(x.to_bits() ^ 1),
                Corruption::Scale => x * 1.5,
            };
            dst[i * 4..i * 4 + 4].copy_from_slice(&y.to_le_bytes());
        }
        None => dst[0] ^= 1,
    }
}

#[test]
fn the_parity_harness_reports_wrong_results() {
    let cases = cases();
    // One ulp: a case with a bit-exact buffer fails, the tolerances accept it.
    let mock = MockGpu::new();
    let failures = run_cases(&mock, &mock, &cases, false, Some(Corruption::OneUlp));
    for c in &cases {
        let exact = c.checks.iter().any(|(_, cmp)| matches!(cmp, Cmp::Exact));
        let failed = failures
            .iter()
            .any(|f| f.starts_with(&format!("{}:", c.name)));
        assert_eq!(
            exact, failed,
            "{}: one ulp off, failures {failures:?}",
            c.name
        );
    }
    // A value off by half of itself: every comparison fails.
    let failures = run_cases(&mock, &mock, &cases, false, Some(Corruption::Scale));
    assert_eq!(failures.len(), cases.len(), "{failures:?}");
    // The comparison itself: NaN equals NaN only where NaN is expected, ulps are counted
    // across zero.
    let b = |v: &[f32]| le_f32(v);
    assert!(compare(Cmp::Ulps(0), &b(&[f32::NAN]), &b(&[-f32::NAN])).is_ok());
    assert!(compare(Cmp::Ulps(9), &b(&[1.0]), &b(&[f32::NAN])).is_err());
    assert_eq!(ulps(f32::from_bits(1), -f32::from_bits(1)), 2);
    assert!(compare(Cmp::Rel(1e-3), &b(&[2.0]), &b(&[2.001])).is_ok());
    assert!(compare(Cmp::Rel(1e-3), &b(&[2.0]), &b(&[2.01])).is_err());
    assert!(compare(Cmp::Norm(1e-3), &b(&[100.0, 0.0]), &b(&[100.0, 0.05])).is_ok());
}

// ---------------------------------------------------------------------------------------------
// On the GPU.

#[test]
fn kernels_on_the_gpu_match_their_cpu_twins() {
    let Some(gpu) = driver() else { return };
    let cases = cases();
    let failures = run_cases(&MockGpu::new(), gpu.as_ref(), &cases, true, None);
    assert!(
        failures.is_empty(),
        "{} of {} kernel cases differ from the CPU twins:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn settings(dir: &std::path::Path, device: DeviceKind) -> Settings {
    Settings {
        model: Some(dir.join("model").to_string_lossy().into_owned()),
        threads: Some(4),
        cache_dir: Some(common::test_cache_dir()),
        state_dir: Some(common::test_cache_dir().join("state")),
        device,
        ..Default::default()
    }
}

fn load(dir: &std::path::Path, s: &Settings) -> Model {
    Model::load(s).unwrap_or_else(|e| panic!("{} on {:?}: {e}", dir.display(), s.device))
}

fn ids_of(r: &common::Reference, name: &str) -> Vec<u32> {
    r.i64(name).iter().map(|&x| x as u32).collect()
}

#[test]
fn every_fixture_on_the_gpu_matches_transformers_and_the_cpu() {
    if usable_device().is_none() {
        return;
    }
    let mut failures = Vec::new();
    let variants = common::variants();
    assert!(variants.len() >= 8, "expected every fixture variant");
    for v in &variants {
        let cpu = load(&v.dir, &settings(&v.dir, DeviceKind::Cpu));
        let gpu = load(&v.dir, &settings(&v.dir, DeviceKind::Cuda));
        assert_eq!(gpu.decoder.backend_name(), "cuda", "{}", v.name);
        let r = common::Reference::open(&v.dir.join("reference.safetensors"));
        for p in ["short", "long"] {
            let ids = ids_of(&r, &format!("{p}.input_ids"));
            let logits = common::prefill_logits(&gpu, &ids);
            let vs_ref = common::max_abs_diff(&logits, &r.f32(&format!("{p}.logits")));
            let vs_cpu = common::max_abs_diff(&logits, &common::prefill_logits(&cpu, &ids));
            eprintln!(
                "gpu-metric {{\"fixture\":\"{}\",\"prompt\":\"{p}\",\"logits_err_vs_transformers\":\
                 {vs_ref:e},\"logits_err_vs_cpu\":{vs_cpu:e},\"bound\":{CUDA_LOGIT_TOL:e}}}",
                v.name
            );
            if vs_ref.is_nan() || vs_ref > CUDA_LOGIT_TOL {
                failures.push(format!(
                    "{} {p}: logits {vs_ref:e} from transformers (> {CUDA_LOGIT_TOL:e})",
                    v.name
                ));
            }
            if vs_cpu.is_nan() || vs_cpu > CUDA_LOGIT_TOL {
                failures.push(format!(
                    "{} {p}: logits {vs_cpu:e} from the CPU backend (> {CUDA_LOGIT_TOL:e})",
                    v.name
                ));
            }
            // Greedy with the KV cache, one token at a time, against the reference.
            let want = ids_of(&r, &format!("{p}.greedy"));
            let mut state = gpu.new_state();
            let mut next = gpu.forward(&ids, &mut state, Logits::Last, None).unwrap();
            let mut got = Vec::new();
            for _ in 0..want.len() {
                let tok = argmax(&next);
                got.push(tok);
                next = gpu.forward(&[tok], &mut state, Logits::Last, None).unwrap();
            }
            if got != want {
                failures.push(format!(
                    "{} {p}: greedy {got:?} != transformers {want:?}",
                    v.name
                ));
            }
            // The public generate() path, against the CPU backend's.
            let n = want.len().max(8);
            let (a, b) = (
                common::greedy_generate(&cpu, &ids, n),
                common::greedy_generate(&gpu, &ids, n),
            );
            if a != b {
                failures.push(format!("{} {p}: generate() {b:?} != CPU {a:?}", v.name));
            }
        }
        if let Some(d) = gpu.decoder.cuda() {
            eprintln!(
                "gpu-metric {{\"fixture\":\"{}\",\"peak_vram_bytes\":{}}}",
                v.name,
                d.backend.vram_usage().peak_live_bytes
            );
        }
    }
    assert!(
        failures.is_empty(),
        "GPU parity failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn eviction_churn_on_the_gpu_gives_the_cpu_tokens() {
    if usable_device().is_none() {
        return;
    }
    for name in ["qwen3_moe", "mixtral", "qwen3_next"] {
        let dir = common::fixtures().join(name);
        let cpu = load(&dir, &settings(&dir, DeviceKind::Cpu));
        let top_k = cpu.config.router.top_k;
        let mut s = settings(&dir, DeviceKind::Cuda);
        // As few slots as one token routes to: nearly every token evicts.
        s.experts.slots_per_layer = Some(top_k);
        s.experts.prefetch = true;
        let gpu = load(&dir, &s);
        assert_eq!(gpu.plan.slots_per_layer, top_k, "{name}: the plan's slots");
        let r = common::Reference::open(&dir.join("reference.safetensors"));
        for p in ["short", "long"] {
            let ids = ids_of(&r, &format!("{p}.input_ids"));
            let (a, b) = (
                common::greedy_generate(&cpu, &ids, 24),
                common::greedy_generate(&gpu, &ids, 24),
            );
            assert_eq!(
                a, b,
                "{name} {p}: greedy tokens with {top_k} slots per layer"
            );
        }
        let st = gpu.decoder.store().stats();
        eprintln!(
            "gpu-metric {{\"churn\":\"{name}\",\"slots_per_layer\":{top_k},\"hits\":{},\
             \"misses\":{},\"bytes_moved\":{}}}",
            st.hits, st.misses, st.bytes_moved
        );
    }
}
