//! Tests of the bf16-activation path (`bf16dot`, `bf16dot_x86`): every kernel the CPU runs,
//! forced one by one, equals the scalar twin bit for bit (ragged k, m = 1..20, n not a
//! multiple of the tile, denormals, signed zeros, infinities, NaN); the twin's lane step is
//! `vdpbf16ps` itself where the CPU has it; the parallel split equals the serial call on 1, 2
//! and 3 threads; the error against the f32 `matmul` stays within a measured bound;
//! degenerate shapes and wrong lengths behave as documented.

use half::bf16;

use crate::bf16dot::{
    dot_scalar, dp_step, matmul_bf16_with, round_bf16, supported_kernels, Kernel, PackedX,
};
use crate::tests::Rng;
use crate::{matmul, matmul_bf16, matmul_bf16_par, Weights, PAR_MIN_WORK};

/// Bits with every NaN made the same, so "both NaN" compares equal.
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter()
        .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
        .collect()
}

fn run(kern: Kernel, parallel: bool, x: &[f32], m: usize, k: usize, w: &[bf16]) -> Vec<f32> {
    let n = w.len() / k.max(1);
    let mut out = vec![f32::NAN; m * n];
    matmul_bf16_with(kern, parallel, x, m, k, w, n, &mut out);
    out
}

/// The twin's result, element by element, straight from the definition.
fn twin(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize) -> Vec<f32> {
    let xb = PackedX::new(x, m, k);
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = dot_scalar(xb.row(i), &w[j * k..(j + 1) * k]);
        }
    }
    out
}

/// Uniform in `0..n`.
fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

fn weights(vals: &[f32]) -> Vec<bf16> {
    vals.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// Special values: denormals (f32 and bf16), signed zeros, infinities, NaN, huge and tiny.
fn special(rng: &mut Rng) -> f32 {
    const S: [f32; 12] = [
        0.0,
        -0.0,
        1e-40,
        -3e-39,
        1.1754942e-38,
        f32::MIN_POSITIVE,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        3e38,
        -1e-30,
        1e30,
    ];
    S[below(rng, S.len())]
}

#[test]
fn every_kernel_equals_the_twin_on_random_ragged_shapes() {
    let mut rng = Rng(0xbf16);
    for kern in supported_kernels() {
        for &k in &[1usize, 2, 3, 17, 31, 32, 33, 64, 95, 130, 257, 600] {
            for m in 1..=20 {
                let n = [1usize, 3, 5, 7, 9, 13][(m + k) % 6];
                let x = rng.gauss_vec(m * k);
                let w = weights(&rng.gauss_vec(n * k));
                let want = twin(&x, m, k, &w, n);
                let got = run(kern, false, &x, m, k, &w);
                assert_eq!(bits(&got), bits(&want), "{kern:?} m={m} n={n} k={k}");
            }
        }
    }
}

#[test]
fn every_kernel_equals_the_twin_on_special_values() {
    let mut rng = Rng(0xdead);
    for kern in supported_kernels() {
        for &k in &[5usize, 32, 47, 96] {
            for m in [1usize, 2, 7, 9, 13] {
                let n = 11;
                for density in [2usize, 8, 64] {
                    // Mostly ordinary values, every `density`-th one special; products that
                    // underflow to denormals come from scaled rows.
                    let scale = |rng: &mut Rng, i: usize| {
                        if i.is_multiple_of(density) {
                            special(rng)
                        } else {
                            rng.gauss() * [1.0, 1e-19, 1e-20, 1e19][below(rng, 4)]
                        }
                    };
                    let x: Vec<f32> = (0..m * k).map(|i| scale(&mut rng, i)).collect();
                    let wv: Vec<f32> = (0..n * k).map(|i| scale(&mut rng, i + 1)).collect();
                    let w = weights(&wv);
                    let want = twin(&x, m, k, &w, n);
                    let got = run(kern, false, &x, m, k, &w);
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{kern:?} m={m} k={k} density={density}"
                    );
                }
            }
        }
    }
}

/// Many lanes of tiny products: sums that land in the denormal range are flushed (FTZ), inputs
/// that are denormal read as zero (DAZ), and the twin says so.
#[test]
fn the_twin_flushes_denormals() {
    let tiny = bf16::from_f32(1e-20);
    // 1e-20 · 1e-20 = 1e-40 is a denormal: flushed to +0.
    assert_eq!(dp_step(0.0, tiny, tiny).to_bits(), 0);
    assert_eq!(dp_step(0.0, tiny, -tiny).to_bits(), (-0f32).to_bits());
    // A denormal input reads as zero.
    let den = bf16::from_bits(0x0001);
    assert_eq!(dp_step(1.0, den, bf16::from_f32(1e30)), 1.0);
    // An exact product added with one rounding.
    let (a, b) = (
        bf16::from_f32(1.0 + 1.0 / 128.0),
        bf16::from_f32(1.0 + 1.0 / 128.0),
    );
    let exact = (1.0f64 + 1.0 / 128.0).powi(2);
    assert_eq!(dp_step(0.0, a, b) as f64, exact);
    for kern in supported_kernels() {
        let x = vec![1e-20f32; 64];
        let w = weights(&[1e-20f32; 64]);
        assert_eq!(run(kern, false, &x, 1, 64, &w)[0].to_bits(), 0, "{kern:?}");
    }
}

/// The packing's rounding is `half::bf16::from_f32`, on a sweep over all f32 bit patterns
/// (every 97th, plus the neighbourhoods of ties, the largest finite values and NaNs).
#[test]
fn rounding_of_x_is_halfs_round_to_nearest_even() {
    let check = |b: u32| {
        let v = f32::from_bits(b);
        assert_eq!(
            round_bf16(v).to_bits(),
            bf16::from_f32(v).to_bits(),
            "bits {b:#010x}"
        );
    };
    for b in (0..=u32::MAX).step_by(97) {
        check(b);
    }
    for hi in [
        0u32, 1, 0x3F80, 0x3F81, 0x7F7F, 0x7F80, 0x7FBF, 0x7FC0, 0x8001, 0xFF7F, 0xFF80,
    ] {
        for lo in [0u32, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
            check(hi << 16 | lo);
        }
    }
}

#[test]
fn par_equals_serial_on_one_two_and_three_threads() {
    let mut rng = Rng(7);
    // Shapes large enough to split (m·n·k well above PAR_MIN_WORK), narrow n (row split),
    // decode batches and ragged everything.
    let shapes = [
        (64usize, 200usize, 96usize),
        (3, 1000, 300),
        (1, 2100, 257),
        (40, 5, 4000),
        (9, 129, 513),
    ];
    for &(m, n, k) in &shapes {
        assert!(m * n * k >= 2 * PAR_MIN_WORK, "too small to split");
        let x = rng.gauss_vec(m * k);
        let w = weights(&rng.gauss_vec(n * k));
        let mut want = vec![0f32; m * n];
        matmul_bf16(&x, m, k, &w, n, &mut want);
        for kern in supported_kernels() {
            let serial = run(kern, false, &x, m, k, &w);
            assert_eq!(
                bits(&serial),
                bits(&want),
                "{kern:?} vs default m={m} n={n} k={k}"
            );
        }
        for threads in 1..=3 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut got = vec![0f32; m * n];
            pool.install(|| matmul_bf16_par(&x, m, k, &w, n, &mut got));
            assert_eq!(
                bits(&got),
                bits(&want),
                "threads={threads} m={m} n={n} k={k}"
            );
            for kern in supported_kernels() {
                let got = pool.install(|| run(kern, true, &x, m, k, &w));
                assert_eq!(bits(&got), bits(&want), "{kern:?} threads={threads}");
            }
        }
    }
}

/// Relative L2 error of `got` against `want`.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Rounding x to bf16 (8 significant bits, relative error <= 2^-9 per element) is the whole
/// error on Gaussian data: measured relative L2 error 1.66e-3 to 1.74e-3 against the f32
/// `matmul` on these and larger shapes (m up to 64, k up to 4096). The bound is ~2.4× that.
#[test]
fn error_against_the_f32_matmul_is_bounded() {
    let mut rng = Rng(11);
    for &(m, n, k) in &[(1usize, 64usize, 2048usize), (16, 48, 768), (33, 40, 1000)] {
        let x = rng.gauss_vec(m * k);
        let w = weights(&rng.gauss_vec(n * k));
        let mut want = vec![0f32; m * n];
        matmul(&x, m, k, Weights::Bf16(&w), n, &mut want);
        let mut got = vec![0f32; m * n];
        matmul_bf16(&x, m, k, &w, n, &mut got);
        let err = rel_l2(&got, &want);
        assert!(err < 4e-3, "m={m} n={n} k={k}: relative L2 error {err:e}");
        assert!(
            err > 1e-5,
            "m={m} n={n} k={k}: x was not rounded? error {err:e}"
        );
    }
}

#[test]
fn degenerate_shapes() {
    for kern in supported_kernels() {
        // k = 0: every output is an empty sum, 0.
        let mut out = vec![f32::NAN; 6];
        matmul_bf16_with(kern, false, &[], 2, 0, &[], 3, &mut out);
        assert!(out.iter().all(|&v| v.to_bits() == 0), "{kern:?}");
        // m = 0 or n = 0: nothing to write.
        matmul_bf16_with(kern, true, &[], 0, 5, &weights(&[1.0; 10]), 2, &mut []);
        matmul_bf16_with(kern, true, &[1.0; 5], 1, 5, &[], 0, &mut []);
        // 1 × 1 × 1.
        let mut out = [0f32];
        matmul_bf16_with(kern, false, &[3.0], 1, 1, &weights(&[-2.0]), 1, &mut out);
        assert_eq!(out[0], -6.0, "{kern:?}");
        // x is rounded to bf16 (nearest even): 1 + 2^-8 is a tie, rounds to 1.
        matmul_bf16_with(
            kern,
            false,
            &[1.0 + 1.0 / 256.0],
            1,
            1,
            &weights(&[1.0]),
            1,
            &mut out,
        );
        assert_eq!(out[0], 1.0, "{kern:?}");
    }
}

#[test]
#[should_panic(expected = "matmul_bf16: x has 5 elements, expected m*k = 2*3")]
fn wrong_x_length_panics() {
    let mut out = [0f32; 4];
    matmul_bf16(&[0.0; 5], 2, 3, &weights(&[0.0; 6]), 2, &mut out);
}

#[test]
#[should_panic(expected = "matmul_bf16: w has 5 elements, expected n*k = 2*3")]
fn wrong_w_length_panics() {
    let mut out = [0f32; 4];
    matmul_bf16_par(&[0.0; 6], 2, 3, &weights(&[0.0; 5]), 2, &mut out);
}

#[test]
#[should_panic(expected = "matmul_bf16: out has 3 elements, expected m*n = 2*2")]
fn wrong_out_length_panics() {
    let mut out = [0f32; 3];
    matmul_bf16(&[0.0; 6], 2, 3, &weights(&[0.0; 6]), 2, &mut out);
}

/// Where the CPU has `vdpbf16ps`, one instruction on chosen lanes equals two twin steps (odd
/// element first), including the flush of denormal results and reads of denormal inputs.
#[cfg(target_arch = "x86_64")]
#[test]
fn the_lane_step_is_the_instruction() {
    if !Kernel::Avx512Bf16.supported() {
        return;
    }
    let mut rng = Rng(3);
    let vals = |rng: &mut Rng| -> bf16 {
        if below(rng, 4) == 0 {
            bf16::from_f32(special(rng))
        } else {
            bf16::from_f32(rng.gauss() * [1.0, 1e-20, 1e20, 1e-38][below(rng, 4)])
        }
    };
    for _ in 0..2000 {
        let acc: [f32; 16] = std::array::from_fn(|_| {
            let v = vals(&mut rng).to_f32();
            if v.is_subnormal() {
                0.0
            } else {
                v
            }
        });
        let a: [bf16; 32] = std::array::from_fn(|_| vals(&mut rng));
        let b: [bf16; 32] = std::array::from_fn(|_| vals(&mut rng));
        // SAFETY: avx512f/bw/vl/bf16 checked above.
        let got = unsafe { dpbf16(acc, a, b) };
        for l in 0..16 {
            let want = dp_step(
                dp_step(acc[l], a[2 * l + 1], b[2 * l + 1]),
                a[2 * l],
                b[2 * l],
            );
            assert_eq!(
                bits(&[got[l]]),
                bits(&[want]),
                "acc {:e} a ({:e}, {:e}) b ({:e}, {:e})",
                acc[l],
                a[2 * l],
                a[2 * l + 1],
                b[2 * l],
                b[2 * l + 1]
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
fn dpbf16(acc: [f32; 16], a: [bf16; 32], b: [bf16; 32]) -> [f32; 16] {
    use core::arch::x86_64::{__m512, __m512bh, _mm512_dpbf16_ps, _mm512_loadu_ps};
    // SAFETY: the arrays are plain data of the vectors' sizes (64 bytes each).
    unsafe {
        let s = _mm512_loadu_ps(acc.as_ptr());
        let va = core::mem::transmute::<[bf16; 32], __m512bh>(a);
        let vb = core::mem::transmute::<[bf16; 32], __m512bh>(b);
        core::mem::transmute::<__m512, [f32; 16]>(_mm512_dpbf16_ps(s, va, vb))
    }
}
