//! Single-thread kernel throughput: the per-core figures the README quotes.
//!
//! Decode (m = 1): weight bytes streamed per second from DRAM through each matvec path (the
//! weights, 64 expert-shaped `[768, 2048]` matrices per type, are far larger than the caches and
//! are swept in order, as a decode step does). Prefill: GFLOP/s of `m = 64` matmuls over one
//! expert-shaped matrix (in cache), f32 activations against bf16 activations.
//!
//! ```sh
//! cargo bench --bench kernels [-- --runs 5]
//! ```

mod common;

use std::time::Instant;

use half::bf16;
use moe_kernels::quant::{quantize_row_q4_k, quantize_row_q8_0};
use moe_kernels::{BlockF8, BlockFp4, BlockNf4, BlockQ4K, BlockQ8_0, Q8Activations, Weights};
use moe_kernels::{QK_B4, QK_F8};

const N: usize = 768;
const K: usize = 2048;
const MATS: usize = 64;

/// A deterministic weight in [-0.05, 0.05).
fn weight(i: usize) -> f32 {
    let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    (h as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
}

/// A deterministic code byte: pre-quantized blocks hold arbitrary codes, since their matvec
/// throughput does not depend on the values.
fn code_byte(i: usize) -> u8 {
    ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// Best of `runs` sweeps of `f` over all matrices, weight bytes per second.
fn stream(runs: usize, bytes: usize, mut f: impl FnMut(usize)) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            for j in 0..MATS {
                f(j);
            }
            bytes as f64 / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes for test names.
    }
    let runs: usize = common::arg(&args, "--runs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let per = N * K;
    let src: Vec<f32> = (0..MATS * per).map(weight).collect();
    let wb: Vec<bf16> = src.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut w8 = vec![
        BlockQ8_0 {
            d: half::f16::ZERO,
            qs: [0; 32]
        };
        MATS * per / 32
    ];
    let mut w4 = vec![
        BlockQ4K {
            d: half::f16::ZERO,
            dmin: half::f16::ZERO,
            scales: [0; 12],
            qs: [0; 128],
        };
        MATS * per / 256
    ];
    for (r, row) in src.chunks_exact(K).enumerate() {
        quantize_row_q8_0(row, &mut w8[r * K / 32..(r + 1) * K / 32]);
        quantize_row_q4_k(row, &mut w4[r * K / 256..(r + 1) * K / 256]);
    }
    drop(src);
    let wf8: Vec<BlockF8> = (0..MATS * per / QK_F8)
        .map(|b| BlockF8 {
            d: 1e-3,
            qs: std::array::from_fn(|i| {
                let c = code_byte(b * QK_F8 + i);
                // Not the NaN codes 0x7F / 0xFF.
                if c & 0x7F == 0x7F {
                    c - 1
                } else {
                    c
                }
            }),
        })
        .collect();
    let wnf4: Vec<BlockNf4> = (0..MATS * per / QK_B4)
        .map(|b| BlockNf4 {
            d: 0.05,
            qs: std::array::from_fn(|j| code_byte(b * QK_B4 / 2 + j)),
        })
        .collect();
    let wfp4: Vec<BlockFp4> = wnf4.iter().map(|b| BlockFp4 { d: b.d, qs: b.qs }).collect();
    let x: Vec<f32> = (0..64 * K).map(|i| weight(i * 7 + 3) * 10.0).collect();
    let x1 = &x[..K];
    let mut out = vec![0f32; 64 * N];

    println!(
        "machine: {}, kernels: {}, bf16 activations: {}; one thread",
        common::cpu_model(),
        moe_kernels::simd_level(),
        moe_kernels::bf16_activations_supported()
    );
    println!("decode: m = 1 over {MATS} matrices [{N}, {K}] per type (from DRAM), best of {runs}");
    println!();
    println!("| path | GB/s of weights |");
    println!("|---|---|");
    let o = &mut out[..N];
    let gbs = |v: f64| v / 1e9;
    let b = stream(runs, wb.len() * 2, |j| {
        let w = Weights::Bf16(&wb[j * per..(j + 1) * per]);
        moe_kernels::matmul_serial(x1, 1, K, w, N, o)
    });
    println!("| bf16, f32 activations | {:.1} |", gbs(b));
    let b = stream(runs, wb.len() * 2, |j| {
        moe_kernels::matmul_bf16(x1, 1, K, &wb[j * per..(j + 1) * per], N, o)
    });
    println!("| bf16, bf16 activations | {:.1} |", gbs(b));
    let bytes8 = w8.len() * std::mem::size_of::<BlockQ8_0>();
    let b = stream(runs, bytes8, |j| {
        let w = Weights::Q8_0(&w8[j * per / 32..(j + 1) * per / 32]);
        moe_kernels::matmul_serial(x1, 1, K, w, N, o)
    });
    println!("| q8_0, f32 activations | {:.1} |", gbs(b));
    let xq = Q8Activations::new(x1, 1, K);
    let b = stream(runs, bytes8, |j| {
        let w = Weights::Q8_0(&w8[j * per / 32..(j + 1) * per / 32]);
        moe_kernels::matmul_q8(&xq, w, N, o)
    });
    println!("| q8_0, q8 activations | {:.1} |", gbs(b));
    let bytes4 = w4.len() * std::mem::size_of::<BlockQ4K>();
    let b = stream(runs, bytes4, |j| {
        let w = Weights::Q4K(&w4[j * per / 256..(j + 1) * per / 256]);
        moe_kernels::matmul_serial(x1, 1, K, w, N, o)
    });
    println!("| q4_k, f32 activations | {:.1} |", gbs(b));
    let b = stream(runs, bytes4, |j| {
        let w = Weights::Q4K(&w4[j * per / 256..(j + 1) * per / 256]);
        moe_kernels::matmul_q8(&xq, w, N, o)
    });
    println!("| q4_k, q8 activations | {:.1} |", gbs(b));
    let b = stream(runs, wf8.len() * std::mem::size_of::<BlockF8>(), |j| {
        let w = Weights::F8(&wf8[j * per / QK_F8..(j + 1) * per / QK_F8]);
        moe_kernels::matmul_serial(x1, 1, K, w, N, o)
    });
    println!("| fp8 e4m3, f32 activations | {:.1} |", gbs(b));
    let bytes_b4 = wnf4.len() * std::mem::size_of::<BlockNf4>();
    let b = stream(runs, bytes_b4, |j| {
        let w = Weights::Nf4(&wnf4[j * per / QK_B4..(j + 1) * per / QK_B4]);
        moe_kernels::matmul_serial(x1, 1, K, w, N, o)
    });
    println!("| nf4, f32 activations | {:.1} |", gbs(b));
    let b = stream(runs, bytes_b4, |j| {
        let w = Weights::Fp4(&wfp4[j * per / QK_B4..(j + 1) * per / QK_B4]);
        moe_kernels::matmul_serial(x1, 1, K, w, N, o)
    });
    println!("| fp4, f32 activations | {:.1} |", gbs(b));

    println!();
    println!("prefill: m = 64 rows x one [{N}, {K}] bf16 matrix (in cache), best of {runs}");
    println!();
    println!("| path | GFLOP/s |");
    println!("|---|---|");
    let w = &wb[..per];
    let flops = 2.0 * (64 * N * K) as f64;
    let gemm = |f: &mut dyn FnMut()| {
        f();
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                flops / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    };
    let f32_gemm =
        gemm(&mut || moe_kernels::matmul_serial(&x, 64, K, Weights::Bf16(w), N, &mut out));
    println!("| bf16 weights, f32 activations | {f32_gemm:.1} |");
    let bf16_gemm = gemm(&mut || moe_kernels::matmul_bf16(&x, 64, K, w, N, &mut out));
    println!("| bf16 weights, bf16 activations | {bf16_gemm:.1} |");
}
