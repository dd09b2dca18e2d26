//! Tests of the q8-activation path (`qdot`, `qdot_x86`): every kernel the CPU runs, forced one
//! by one, equals the scalar twin bit for bit (ragged n, m = 1..8 and beyond, odd block counts,
//! extreme quants and scales); the parallel split equals the serial call; a row's result does
//! not depend on the rows beside it; the activation quantizers (32-blocks and Q4_K's
//! 256-element super-blocks) store what the module doc says; the twins compute what the
//! module doc says (vs an f64 reference on the dequantized operands); and the error against
//! the f32-activation path stays within a measured bound.

use half::f16;

use crate::qdot::{
    dot_q4k_scalar, dot_q8_0_scalar, matmul_q8_with, quantize_slice, supported_kernels,
    unpack_scales_mins, Kernel,
};
use crate::quant::{
    dequantize_row_q4_k, dequantize_row_q8_0, quantize_row_q4_k, quantize_row_q8_0, QK8_0, QK_K,
};
use crate::tests::Rng;
use crate::{
    matmul, matmul_q8, matmul_q8_activations, matmul_q8_par, q8_activations_supported, BlockQ4K,
    BlockQ8_0, Q8Activations, Weights, PAR_MIN_WORK,
};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Owned quantized weights of either type.
enum Qw {
    Q8(Vec<BlockQ8_0>),
    Q4(Vec<BlockQ4K>),
}

impl Qw {
    fn view(&self) -> Weights<'_> {
        match self {
            Qw::Q8(b) => Weights::Q8_0(b),
            Qw::Q4(b) => Weights::Q4K(b),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Qw::Q8(_) => "Q8_0",
            Qw::Q4(_) => "Q4K",
        }
    }

    /// Random raw blocks: every quant value (Q8_0 includes −128, which the quantizer never
    /// writes), random f16 scales of either sign, random 6-bit scale/min bytes.
    fn random(rng: &mut Rng, q4: bool, n: usize, k: usize) -> Qw {
        if q4 {
            Qw::Q4(
                (0..n * k / QK_K)
                    .map(|_| BlockQ4K {
                        d: rng.f16(),
                        dmin: rng.f16(),
                        scales: std::array::from_fn(|_| rng.next_u64() as u8),
                        qs: std::array::from_fn(|_| rng.next_u64() as u8),
                    })
                    .collect(),
            )
        } else {
            Qw::Q8(
                (0..n * k / QK8_0)
                    .map(|i| BlockQ8_0 {
                        d: rng.f16(),
                        qs: std::array::from_fn(|p| {
                            if i % 5 == 0 {
                                [-128, 127, -127, 0][(i + p) % 4]
                            } else {
                                rng.next_u64() as i8
                            }
                        }),
                    })
                    .collect(),
            )
        }
    }

    /// `vals` ([n, k]) quantized the way models are.
    fn quantized(vals: &[f32], q4: bool) -> Qw {
        if q4 {
            let mut b = vec![
                BlockQ4K {
                    d: f16::ZERO,
                    dmin: f16::ZERO,
                    scales: [0; 12],
                    qs: [0; 128]
                };
                vals.len() / QK_K
            ];
            quantize_row_q4_k(vals, &mut b);
            Qw::Q4(b)
        } else {
            let mut b = vec![
                BlockQ8_0 {
                    d: f16::ZERO,
                    qs: [0; 32]
                };
                vals.len() / QK8_0
            ];
            quantize_row_q8_0(vals, &mut b);
            Qw::Q8(b)
        }
    }

    fn dequantized(&self) -> Vec<f32> {
        match self {
            Qw::Q8(b) => {
                let mut out = vec![0f32; b.len() * QK8_0];
                dequantize_row_q8_0(b, &mut out);
                out
            }
            Qw::Q4(b) => {
                let mut out = vec![0f32; b.len() * QK_K];
                dequantize_row_q4_k(b, &mut out);
                out
            }
        }
    }
}

/// x rows with varied magnitudes per block, some all-zero blocks (scale 0) and some tiny ones.
fn activations(rng: &mut Rng, m: usize, k: usize) -> Vec<f32> {
    let mut x = rng.gauss_vec(m * k);
    for (b, blk) in x.chunks_exact_mut(QK8_0).enumerate() {
        let scale = match b % 7 {
            0 => 0.0,
            1 => 1e-6,
            2 => 300.0,
            _ => 1.0 + (b % 3) as f32,
        };
        blk.iter_mut().for_each(|v| *v *= scale);
    }
    x
}

fn run(kern: Kernel, parallel: bool, xq: &Q8Activations, w: &Qw, n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; xq.rows() * n];
    matmul_q8_with(kern, parallel, xq, w.view(), n, &mut out);
    out
}

#[test]
fn activation_quantizer_matches_quantize_row_q8_0() {
    let mut rng = Rng(50);
    let k = 32 * 41;
    let mut x = rng.gauss_vec(k);
    // Ties: with amax = 127 the scale is 1 and x·(1/d) lands exactly on halves.
    for (p, v) in x[..64].iter_mut().enumerate() {
        *v = if p % 32 == 0 {
            127.0
        } else {
            (p as f32 - 40.0) + 0.5
        };
    }
    x[64..96].fill(0.0);
    x[96] = -3.0e38;
    x[130] = f32::NAN;
    x[170] = f32::INFINITY;
    x[200] = f32::NEG_INFINITY;
    x[201] = f32::NAN;
    // A tiny block, where x·(1/d) overflows to ±inf (and 0·inf is NaN).
    for (p, v) in x[224..256].iter_mut().enumerate() {
        *v = 1e-38 * (p as f32 - 15.5);
    }
    x[240] = 0.0;
    let mut want = vec![
        BlockQ8_0 {
            d: f16::ZERO,
            qs: [0; 32]
        };
        k / QK8_0
    ];
    quantize_row_q8_0(&x, &mut want);
    let xq = Q8Activations::new(&x, 1, k);
    let qs = xq.qs_bytes(0);
    for (b, wb) in want.iter().enumerate() {
        let mut q = [0i8; 32];
        let d = f16::from_f32(quantize_slice(&x[32 * b..32 * b + 32], &mut q));
        assert_eq!(d.to_bits(), wb.d.to_bits(), "block {b} scale");
        // Equal but for the ±127 clamp (−128 only where the f16 scale is 0).
        let want_q = wb.qs.map(|v| v.max(-127));
        assert!(
            wb.qs == want_q || wb.d.to_bits() == 0,
            "block {b}: −128 with a scale"
        );
        assert_eq!(q, want_q, "block {b} quants");
        assert_eq!(&qs[32 * b..32 * b + 32], &want_q[..], "block {b} stored");
    }
    // Padding past k (41 blocks: half a line) is zero.
    assert!(qs[k..].iter().all(|&v| v == 0));
    assert!(xq.qs_bytes(0).iter().all(|&v| v != -128));
}

#[test]
fn simd_activation_quantizers_equal_scalar_bitwise() {
    let mut rng = Rng(57);
    let (m, k) = (3, 32 * 48);
    let mut x = activations(&mut rng, m, k);
    // Ties at every magnitude (amax = 127 makes the scale exactly 1), and blocks with
    // infinities and NaN (the SIMD quantizer hands those to the scalar one).
    for (p, v) in x[..64].iter_mut().enumerate() {
        *v = if p % 32 == 0 { 127.0 } else { p as f32 - 64.5 };
    }
    x[100] = f32::INFINITY;
    x[200] = f32::NAN;
    x[300] = f32::NEG_INFINITY;
    x[301] = f32::NAN;
    // Tiny blocks: 1/d overflows to infinity for amax below ~3.7e-37, not above.
    for (b, scale) in [(12, 1e-38f32), (13, 1e-37), (14, 1e-44), (15, 4e-37)] {
        for (p, v) in x[32 * b..32 * b + 32].iter_mut().enumerate() {
            *v = scale * (p as f32 - 15.5);
        }
    }
    x[32 * 16..32 * 17].fill(0.0);
    x[32 * 16 + 3] = -1e-38;
    let want = Q8Activations::new_with(Kernel::Scalar, &x, m, k);
    for kern in supported_kernels() {
        let got = Q8Activations::new_with(kern, &x, m, k);
        for i in 0..m {
            assert_eq!(got.qs_bytes(i), want.qs_bytes(i), "{kern:?} row {i} quants");
            assert_eq!(
                got.sb_qs_bytes(i),
                want.sb_qs_bytes(i),
                "{kern:?} super-block quants"
            );
            assert_eq!(
                bits(got.sb_d_row(i)),
                bits(want.sb_d_row(i)),
                "{kern:?} D_t"
            );
            assert_eq!(
                bits(got.sb_sums_row(i)),
                bits(want.sb_sums_row(i)),
                "{kern:?} sums"
            );
            let lines = |a: &Q8Activations| -> Vec<u32> {
                a.scales_row(i)
                    .iter()
                    .flat_map(|l| l.0.map(f32::to_bits))
                    .collect()
            };
            assert_eq!(lines(&got), lines(&want), "{kern:?} scale lines");
        }
    }
}

#[test]
fn super_block_quantizer_matches_definition() {
    // Q4_K's activations: per 256 values `D = amax / 127` (f32), `q = round(x·(1/D))` half
    // away from zero, clamped to ±127, and per 32 of them `D · Σq` rounded once.
    let mut rng = Rng(60);
    let (m, k) = (2, 256 * 5);
    let mut x = activations(&mut rng, m, k);
    // Ties (amax = 127: D = 1), an all-zero super-block, a tiny one, one huge value.
    for (p, v) in x[..256].iter_mut().enumerate() {
        *v = if p == 7 {
            -127.0
        } else {
            (p % 200) as f32 - 99.5
        };
    }
    x[256..512].fill(0.0);
    for (p, v) in x[512..768].iter_mut().enumerate() {
        *v = 1e-38 * (p as f32 - 127.5);
    }
    x[1000] = 3.0e38;
    for kern in supported_kernels() {
        let xq = Q8Activations::new_with(kern, &x, m, k);
        for i in 0..m {
            let (qs, d, sums) = (xq.sb_qs_bytes(i), xq.sb_d_row(i), xq.sb_sums_row(i));
            assert_eq!((qs.len(), d.len(), sums.len()), (k, k / 256, k / 32));
            for t in 0..k / 256 {
                let xs = &x[i * k + 256 * t..i * k + 256 * (t + 1)];
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                assert_eq!(d[t].to_bits(), (amax / 127.0).to_bits(), "row {i} D_{t}");
                let id = if d[t] != 0.0 { 1.0 / d[t] } else { 0.0 };
                for (p, &v) in xs.iter().enumerate() {
                    let want = ((v * id).round() as i32).clamp(-127, 127) as i8;
                    assert_eq!(qs[256 * t + p], want, "row {i} super-block {t} quant {p}");
                }
                let mut q = [0i8; 256];
                assert_eq!(quantize_slice(xs, &mut q).to_bits(), d[t].to_bits());
                assert_eq!(&qs[256 * t..256 * (t + 1)], &q[..]);
                for s in 0..8 {
                    let sum: i32 = q[32 * s..32 * s + 32].iter().map(|&v| v as i32).sum();
                    let want = d[t] * sum as f32;
                    assert_eq!(sums[8 * t + s].to_bits(), want.to_bits(), "sum {t}.{s}");
                }
            }
            assert!(qs.iter().all(|&v| v != -128));
        }
    }
}

#[test]
#[should_panic(expected = "no super-block quants")]
fn super_blocks_need_k_multiple_of_256() {
    Q8Activations::new(&[1.0; 128], 1, 128).sb_d_row(0);
}

#[test]
fn unpack_scales_mins_matches_scale_min() {
    let mut rng = Rng(51);
    for _ in 0..2000 {
        let b = BlockQ4K {
            d: f16::ONE,
            dmin: f16::ONE,
            scales: std::array::from_fn(|_| rng.next_u64() as u8),
            qs: [0; 128],
        };
        let (sc, mn) = unpack_scales_mins(&b.scales);
        for s in 0..8 {
            let (want_sc, want_m) = b.scale_min(s);
            assert_eq!(
                (sc >> (8 * s)) as u8,
                want_sc,
                "scale {s} of {:?}",
                b.scales
            );
            assert_eq!((mn >> (8 * s)) as u8, want_m, "min {s} of {:?}", b.scales);
        }
    }
}

/// Every kernel vs the scalar twin, bit for bit, on one shape.
fn check_kernels(rng: &mut Rng, m: usize, n: usize, k: usize, q4: bool) {
    let x = activations(rng, m, k);
    let xq = Q8Activations::new(&x, m, k);
    let w = Qw::random(rng, q4, n, k);
    let want = run(Kernel::Scalar, false, &xq, &w, n);
    assert!(want.iter().all(|v| v.is_finite()), "finite results");
    for kern in supported_kernels() {
        let got = run(kern, false, &xq, &w, n);
        assert_eq!(
            bits(&got),
            bits(&want),
            "{kern:?} {} m={m} n={n} k={k}",
            w.name()
        );
    }
    let mut public = vec![f32::NAN; m * n];
    matmul_q8(&xq, w.view(), n, &mut public);
    assert_eq!(
        bits(&public),
        bits(&want),
        "public {} m={m} n={n}",
        w.name()
    );
}

#[test]
fn simd_kernels_equal_scalar_twin_bitwise() {
    let ns = [1, 2, 3, 5, 7, 9, 13, 37];
    let mut rng = Rng(52);
    let mut t = 0;
    for m in 1..=8 {
        // Q8_0: odd block counts (a half-filled last pair) and a long row.
        for &k in &[32, 64, 96, 224, 2048 + 32] {
            check_kernels(&mut rng, m, ns[t % ns.len()], k, false);
            t += 1;
        }
        for &k in &[256, 768, 2048] {
            check_kernels(&mut rng, m, ns[t % ns.len()], k, true);
            t += 1;
        }
    }
    // More than one row group, and more than one column chunk for them.
    for &(m, n) in &[(9, 70), (17, 5), (12, 131)] {
        check_kernels(&mut rng, m, n, 512, false);
        check_kernels(&mut rng, m, n, 512, true);
    }
}

#[test]
fn q4k_kernels_equal_scalar_twin_on_ragged_and_extreme_inputs() {
    let mut rng = Rng(61);
    // Random ragged shapes, k a multiple of 256 (up to 16 super-blocks).
    for _ in 0..24 {
        let m = 1 + rng.next_u64() as usize % 21;
        let n = 1 + rng.next_u64() as usize % 67;
        let k = 256 * (1 + rng.next_u64() as usize % 16);
        check_kernels(&mut rng, m, n, k, true);
    }
    // Extremes: every nibble 15, every 6-bit scale and min 63, x quants all ±127 (the largest
    // integer sums, |I_l| = 4·63·4·15·127 per lane), huge and tiny scales, zero rows.
    for &(m, n, k) in &[(1, 3, 256), (5, 9, 4096), (11, 2, 768)] {
        let mut x: Vec<f32> = (0..m * k)
            .map(|p| match (p / k) % 4 {
                0 => 1.0,
                1 => -1.0,
                2 => 0.0,
                _ => {
                    if p % 3 == 0 {
                        -7.0
                    } else {
                        7.0
                    }
                }
            })
            .collect();
        x[..k.min(300)].iter_mut().for_each(|v| *v = 1e30);
        let xq = Q8Activations::new(&x, m, k);
        for (d, dmin) in [
            (f16::MAX, f16::MAX),
            (f16::from_f32(-1.0), f16::from_f32(0.5)),
            (f16::from_bits(1), f16::from_bits(0x8001)),
            (f16::ZERO, f16::ONE),
        ] {
            let blocks = vec![
                BlockQ4K {
                    d,
                    dmin,
                    scales: [0xFF; 12],
                    qs: [0xFF; 128],
                };
                n * k / QK_K
            ];
            let w = Qw::Q4(blocks);
            let want = run(Kernel::Scalar, false, &xq, &w, n);
            for kern in supported_kernels() {
                let got = run(kern, false, &xq, &w, n);
                assert_eq!(bits(&got), bits(&want), "{kern:?} m={m} n={n} k={k} d={d}");
            }
        }
        // Zero rows give exactly zero for finite weights.
        let w = Qw::random(&mut rng, true, n, k);
        let out = run(Kernel::Scalar, false, &xq, &w, n);
        for i in (0..m).filter(|i| i % 4 == 2) {
            assert!(
                out[i * n..(i + 1) * n].iter().all(|&v| v == 0.0),
                "zero row {i}"
            );
        }
        for kern in supported_kernels() {
            assert_eq!(bits(&run(kern, false, &xq, &w, n)), bits(&out), "{kern:?}");
        }
    }
}

#[test]
fn row_results_do_not_depend_on_the_group() {
    // A row's result is the same whether it comes alone (m = 1) or among 37 rows.
    let mut rng = Rng(62);
    let (m, n, k) = (37, 19, 1024);
    let x = activations(&mut rng, m, k);
    let all = Q8Activations::new(&x, m, k);
    for q4 in [false, true] {
        let w = Qw::random(&mut rng, q4, n, k);
        for kern in supported_kernels() {
            let big = run(kern, false, &all, &w, n);
            for i in 0..m {
                let one = Q8Activations::new_with(kern, &x[i * k..(i + 1) * k], 1, k);
                let got = run(kern, false, &one, &w, n);
                assert_eq!(
                    bits(&got),
                    bits(&big[i * n..(i + 1) * n]),
                    "{kern:?} {} row {i}",
                    w.name()
                );
            }
        }
    }
}

#[test]
fn parallel_equals_serial_bitwise() {
    let mut rng = Rng(53);
    let pools: Vec<rayon::ThreadPool> = [1, 2, 3]
        .iter()
        .map(|&t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        })
        .collect();
    for &(m, n, k, q4) in &[
        (1, 1100, 1024, false),
        (4, 400, 768, false),
        (1, 1100, 1024, true),
        (3, 501, 768, true),
        (11, 97, 2048, true),
    ] {
        assert!(m * n * k >= 4 * PAR_MIN_WORK);
        let x = rng.gauss_vec(m * k);
        let xq = Q8Activations::new(&x, m, k);
        let w = Qw::random(&mut rng, q4, n, k);
        let mut serial = vec![f32::NAN; m * n];
        matmul_q8(&xq, w.view(), n, &mut serial);
        for pool in &pools {
            let mut got = vec![f32::NAN; m * n];
            pool.install(|| matmul_q8_par(&xq, w.view(), n, &mut got));
            assert_eq!(
                bits(&got),
                bits(&serial),
                "{} m={m} n={n} k={k}: {} threads",
                w.name(),
                pool.current_num_threads()
            );
            for kern in supported_kernels() {
                let got = pool.install(|| run(kern, true, &xq, &w, n));
                let want = run(kern, false, &xq, &w, n);
                assert_eq!(bits(&got), bits(&want), "{kern:?} {} m={m}", w.name());
            }
        }
    }
}

#[test]
fn scalar_twins_match_reference_on_dequantized_operands() {
    // The twins compute q8(x) · dequantize(w) up to f32 rounding: within 1e-6 of
    // sqrt(k)·‖x‖·‖w‖ of the exact f64 result on the dequantized operands (x: the 32-blocks
    // for Q8_0, the super-blocks `q·D_t` for Q4_K).
    let mut rng = Rng(54);
    let (m, n, k) = (3, 7, 1024);
    let x = activations(&mut rng, m, k);
    let xq = Q8Activations::new(&x, m, k);
    let mut xd = vec![0f32; m * k];
    let mut xd_sb = vec![0f32; m * k];
    for i in 0..m {
        let (q, d) = (xq.sb_qs_bytes(i), xq.sb_d_row(i));
        for (p, v) in xd_sb[i * k..(i + 1) * k].iter_mut().enumerate() {
            *v = q[p] as f32 * d[p / 256];
        }
        let mut blocks = vec![
            BlockQ8_0 {
                d: f16::ZERO,
                qs: [0; 32]
            };
            k / QK8_0
        ];
        quantize_row_q8_0(&x[i * k..(i + 1) * k], &mut blocks);
        dequantize_row_q8_0(&blocks, &mut xd[i * k..(i + 1) * k]);
    }
    for q4 in [false, true] {
        let w = Qw::quantized(&rng.gauss_vec(n * k), q4);
        let wd = w.dequantized();
        let xd = if q4 { &xd_sb } else { &xd };
        for i in 0..m {
            for j in 0..n {
                let (xr, wr) = (&xd[i * k..(i + 1) * k], &wd[j * k..(j + 1) * k]);
                let want: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let norm = |v: &[f32]| v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
                let tol = 1e-6 * (k as f64).sqrt() * norm(xr) * norm(wr);
                let got = match &w {
                    Qw::Q8(b) => dot_q8_0_scalar(&xq, i, &b[j * k / 32..(j + 1) * k / 32]),
                    Qw::Q4(b) => dot_q4k_scalar(&xq, i, &b[j * k / 256..(j + 1) * k / 256]),
                } as f64;
                assert!(
                    (got - want).abs() <= tol,
                    "{} ({i}, {j}): got {got}, want {want}, tolerance {tol:e}",
                    w.name()
                );
            }
        }
    }
}

/// Relative L2 (Frobenius) difference between the q8-activation and the f32-activation results.
fn rel_l2(exact: &[f32], approx: &[f32]) -> f64 {
    let num: f64 = exact
        .iter()
        .zip(approx)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = exact.iter().map(|a| (*a as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn error_vs_f32_activation_path_is_bounded() {
    // Gaussian x and model-like quantized weights. Rounding x to 8 bits per 32-block (step
    // amax/127, amax ≈ 2.2σ) gives a per-element RMS error of ~0.5% of σ, and the relative L2
    // error of the outputs lands there too: observed 5.0e-3 .. 6.1e-3 (Q8_0) for m = 1, 4, 8.
    // Q4_K's 256-element super-blocks have amax ≈ 2.9σ, so ~1.3x that: observed
    // 6.3e-3 .. 7.0e-3 for m = 1, 4, 8. Asserted with a >= 2x margin.
    const BOUND: f64 = 1.5e-2;
    let mut rng = Rng(55);
    let (n, k) = (96, 2048);
    for q4 in [false, true] {
        let w = Qw::quantized(&rng.gauss_vec(n * k), q4);
        for m in [1, 4, 8] {
            let x = rng.gauss_vec(m * k);
            let mut exact = vec![0f32; m * n];
            matmul(&x, m, k, w.view(), n, &mut exact);
            let mut approx = vec![0f32; m * n];
            matmul_q8(&Q8Activations::new(&x, m, k), w.view(), n, &mut approx);
            let rel = rel_l2(&exact, &approx);
            eprintln!(
                "q8 activations {} m={m}: relative L2 error vs f32 path {rel:.2e}",
                w.name()
            );
            assert!(rel < BOUND, "{} m={m}: relative L2 error {rel}", w.name());
        }
    }
}

#[test]
fn wrapper_equals_matmul_q8() {
    let mut rng = Rng(56);
    let (m, n, k) = (3, 17, 320);
    let x = rng.gauss_vec(m * k);
    let w = Qw::quantized(&rng.gauss_vec(n * k), false);
    let Qw::Q8(blocks) = &w else { unreachable!() };
    let mut a = vec![f32::NAN; m * n];
    matmul_q8_activations(&x, m, k, blocks, n, &mut a);
    let mut b = vec![f32::NAN; m * n];
    matmul_q8(&Q8Activations::new(&x, m, k), w.view(), n, &mut b);
    assert_eq!(bits(&a), bits(&b));
}

#[test]
fn supported_weights() {
    let q8 = [BlockQ8_0 {
        d: f16::ZERO,
        qs: [0; 32],
    }];
    assert!(q8_activations_supported(&Weights::Q8_0(&q8)));
    assert!(q8_activations_supported(&Weights::Q4K(&[])));
    assert!(!q8_activations_supported(&Weights::F32(&[])));
    assert!(!q8_activations_supported(&Weights::Bf16(&[])));
    assert!(!q8_activations_supported(&Weights::F16(&[])));
    let xq = Q8Activations::new(&[0.5; 64], 2, 32);
    assert_eq!((xq.rows(), xq.k()), (2, 32));
}

#[test]
fn degenerate_shapes() {
    let xq = Q8Activations::new(&[], 0, 64);
    matmul_q8(&xq, Weights::Q8_0(&[]), 0, &mut []);
    let xq = Q8Activations::new(&[], 3, 0);
    let mut out = [1f32; 6];
    matmul_q8(&xq, Weights::Q4K(&[]), 2, &mut out);
    assert_eq!(out, [0.0; 6]);
    let xq = Q8Activations::new(&[1.0; 256], 1, 256);
    matmul_q8_par(&xq, Weights::Q4K(&[]), 0, &mut []);
}

#[test]
#[should_panic(expected = "unsupported weights (F32)")]
fn rejects_unsupported_weights() {
    let xq = Q8Activations::new(&[0.0; 32], 1, 32);
    let mut out = [0f32; 1];
    matmul_q8(&xq, Weights::F32(&[0.0; 32]), 1, &mut out);
}

#[test]
#[should_panic(expected = "unsupported weights (Bf16)")]
fn parallel_rejects_unsupported_weights() {
    let xq = Q8Activations::new(&[0.0; 32], 1, 32);
    let mut out = [0f32; 1];
    matmul_q8_par(&xq, Weights::Bf16(&[half::bf16::ZERO; 32]), 1, &mut out);
}

#[test]
#[should_panic(expected = "not a multiple of the weights' block size 256")]
fn rejects_q4k_with_k_not_multiple_of_256() {
    let xq = Q8Activations::new(&[0.0; 128], 1, 128);
    let mut out = [0f32; 2];
    matmul_q8(&xq, Weights::Q4K(&[]), 2, &mut out);
}

#[test]
#[should_panic(expected = "expected n*k")]
fn rejects_wrong_block_count() {
    let xq = Q8Activations::new(&[0.0; 64], 1, 64);
    let q8 = [BlockQ8_0 {
        d: f16::ZERO,
        qs: [0; 32],
    }; 3];
    let mut out = [0f32; 2];
    matmul_q8(&xq, Weights::Q8_0(&q8), 2, &mut out);
}

#[test]
#[should_panic(expected = "expected m*n")]
fn rejects_wrong_out_len() {
    let xq = Q8Activations::new(&[0.0; 64], 2, 32);
    let q8 = [BlockQ8_0 {
        d: f16::ZERO,
        qs: [0; 32],
    }; 3];
    let mut out = [0f32; 5];
    matmul_q8(&xq, Weights::Q8_0(&q8), 3, &mut out);
}

#[test]
#[should_panic(expected = "is not a multiple of 32")]
fn activations_reject_ragged_k() {
    Q8Activations::new(&[0.0; 40], 1, 40);
}

#[test]
fn q4k_super_block_error_vs_exact_product_is_bounded() {
    // The Q4_K path (x quantized per 256 values) against the exact f32 product with the
    // dequantized weights (the f32-activation path), on inputs harder than plain Gaussians:
    // rows whose scale varies by 10x between 32-blocks, so some blocks use only a few of the
    // 255 levels of their super-block's step. Per element the rounding error is uniform with
    // RMS step/sqrt(12) = amax/(127·sqrt(12)); relative to the RMS of x that is ~1% here,
    // and the outputs' relative L2 error follows it: observed 1.09e-2 .. 1.16e-2
    // (m = 1, 16, 64). Asserted at 2.5e-2 (> 2x margin).
    const BOUND: f64 = 2.5e-2;
    let mut rng = Rng(63);
    let (n, k) = (64, 2048);
    let w = Qw::quantized(&rng.gauss_vec(n * k), true);
    for m in [1, 16, 64] {
        let mut x = rng.gauss_vec(m * k);
        for (b, blk) in x.chunks_exact_mut(QK8_0).enumerate() {
            let s = [1.0, 0.3, 3.0, 0.1, 1.0, 2.0, 0.5, 1.5][b % 8];
            blk.iter_mut().for_each(|v| *v *= s);
        }
        let mut exact = vec![0f32; m * n];
        matmul(&x, m, k, w.view(), n, &mut exact);
        let mut approx = vec![0f32; m * n];
        matmul_q8(&Q8Activations::new(&x, m, k), w.view(), n, &mut approx);
        let rel = rel_l2(&exact, &approx);
        eprintln!("q4k super-block activations m={m}: relative L2 error vs f32 path {rel:.2e}");
        assert!(rel < BOUND, "m={m}: relative L2 error {rel}");
    }
}

/// `for_weights` quantizes only what the weights take, serves exactly those, and gives the same
/// bits as `new` for them.
#[test]
fn activations_for_weights_quantize_only_what_they_serve() {
    let mut rng = Rng(11);
    let (m, n, k) = (3, 5, 512);
    let x = activations(&mut rng, m, k);
    let q8 = Qw::random(&mut rng, false, n, k);
    let q4 = Qw::random(&mut rng, true, n, k);
    let both = Q8Activations::new(&x, m, k);
    for (ws, serves_q8, serves_q4) in [
        (vec![q8.view()], true, false),
        (vec![q4.view()], false, true),
        (vec![q8.view(), q4.view()], true, true),
    ] {
        let xq = Q8Activations::for_weights(&x, m, k, &ws);
        assert_eq!(xq.serves(&q8.view()), serves_q8);
        assert_eq!(xq.serves(&q4.view()), serves_q4);
        for (w, serves) in [(&q8, serves_q8), (&q4, serves_q4)] {
            if serves {
                let mut a = vec![0f32; m * n];
                let mut b = vec![0f32; m * n];
                matmul_q8(&xq, w.view(), n, &mut a);
                matmul_q8(&both, w.view(), n, &mut b);
                assert_eq!(bits(&a), bits(&b), "{}", w.name());
            }
        }
    }
    // A weight the activations were not quantized for is refused with a message.
    let xq = Q8Activations::for_weights(&x, m, k, &[q4.view()]);
    let refused = std::panic::catch_unwind(|| {
        let mut out = vec![0f32; m * n];
        matmul_q8(&xq, q8.view(), n, &mut out);
    });
    assert!(refused.is_err());
}
