//! Every SIMD level the CPU supports, forced one by one, against the scalar twins and against an
//! f64 reference computed here from the widened stored weights.

use half::{bf16, f16};

use crate::{
    axpy_with, dot_with, matmul, matmul_serial, matmul_with, row_to_f32, scalar, simd_level,
    supported_levels, Weights, ALL_LEVELS, MATVEC_MAX_M, PAR_MIN_WORK,
};

/// Allowed error per output element, relative to sqrt(k)·‖x_i‖·‖w_j‖. f32 summation in any
/// order stays ~20× below this on the data used here, while dropping or doubling a single term
/// (|x_p·w_p| ~ ‖x‖‖w‖/k) exceeds it for every k below ~10^5.
const TOL_REL: f64 = 1e-6;

/// splitmix64: a small deterministic generator so failures reproduce (shared by the quantized
/// format tests).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.sym()).collect()
    }

    /// Uniform in (0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub(crate) fn gauss(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }

    pub(crate) fn gauss_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.gauss()).collect()
    }

    /// A finite f16 with a random exponent in a moderate range, either sign.
    pub(crate) fn f16(&mut self) -> f16 {
        let bits = self.next_u64() as u16;
        // Exponent field 1..=20 (2^-14 .. 2^5), random mantissa and sign.
        let exp = 1 + (bits >> 10) % 20;
        f16::from_bits((bits & 0x83FF) | (exp << 10))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dt {
    F32,
    Bf16,
    F16,
}

const DTYPES: [Dt; 3] = [Dt::F32, Dt::Bf16, Dt::F16];

/// Weights in a stored dtype, owned.
enum Owned {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Owned {
    fn new(vals: &[f32], dt: Dt) -> Owned {
        match dt {
            Dt::F32 => Owned::F32(vals.to_vec()),
            Dt::Bf16 => Owned::Bf16(vals.iter().map(|&v| bf16::from_f32(v)).collect()),
            Dt::F16 => Owned::F16(vals.iter().map(|&v| f16::from_f32(v)).collect()),
        }
    }

    fn view(&self) -> Weights<'_> {
        match self {
            Owned::F32(w) => Weights::F32(w),
            Owned::Bf16(w) => Weights::Bf16(w),
            Owned::F16(w) => Weights::F16(w),
        }
    }

    /// The stored values as f64, converted by `half` (independently of the crate's widening).
    fn widened(&self) -> Vec<f64> {
        match self {
            Owned::F32(w) => w.iter().map(|&v| v as f64).collect(),
            Owned::Bf16(w) => w.iter().map(|v| v.to_f64()).collect(),
            Owned::F16(w) => w.iter().map(|v| v.to_f64()).collect(),
        }
    }
}

/// f64 reference product and the per-element tolerance.
struct Reference {
    want: Vec<f64>,
    tol: Vec<f64>,
}

fn reference(x: &[f32], m: usize, k: usize, w: &[f64], n: usize) -> Reference {
    let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|a| a * a).sum::<f64>().sqrt();
    let xn: Vec<f64> = (0..m)
        .map(|i| norm(&mut x[i * k..(i + 1) * k].iter().map(|&a| a as f64)))
        .collect();
    let wn: Vec<f64> = (0..n)
        .map(|j| norm(&mut w[j * k..(j + 1) * k].iter().copied()))
        .collect();
    let mut want = vec![0f64; m * n];
    let mut tol = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            want[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p]).sum();
            tol[i * n + j] = TOL_REL * (k as f64).sqrt() * xn[i] * wn[j];
        }
    }
    Reference { want, tol }
}

/// Asserts `got` is within tolerance of `r`; NaN (e.g. an element never written) fails.
fn assert_close(got: &[f32], r: &Reference, what: &str) {
    assert_eq!(got.len(), r.want.len(), "{what}: length");
    for (idx, (&g, (&w, &t))) in got.iter().zip(r.want.iter().zip(&r.tol)).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= t,
            "{what}: element {idx}: got {g}, want {w}, error {err:e} > tolerance {t:e}"
        );
    }
}

/// Asserts two f32 results agree within the reference's tolerance (twice: both may err).
fn assert_pair_close(a: &[f32], b: &[f32], r: &Reference, what: &str) {
    for (idx, ((&a, &b), &t)) in a.iter().zip(b).zip(&r.tol).enumerate() {
        let d = (a as f64 - b as f64).abs();
        assert!(
            d <= 2.0 * t,
            "{what}: element {idx}: {a} vs {b}, difference {d:e} > {:e}",
            2.0 * t
        );
    }
}

/// Checks one shape for one dtype: scalar twin vs f64, and every level (serial and parallel)
/// vs f64 and vs the scalar twin.
fn check_shape(rng: &mut Rng, m: usize, n: usize, k: usize, dt: Dt) {
    let x = rng.vec(m * k);
    let w = Owned::new(&rng.vec(n * k), dt);
    let r = reference(&x, m, k, &w.widened(), n);
    let tag = format!("m={m} n={n} k={k} {dt:?}");

    let mut want_scalar = vec![f32::NAN; m * n];
    scalar::matmul(&x, m, k, w.view(), n, &mut want_scalar);
    assert_close(&want_scalar, &r, &format!("scalar {tag}"));

    for level in supported_levels() {
        for parallel in [false, true] {
            let mut got = vec![f32::NAN; m * n];
            matmul_with(level, parallel, &x, m, k, w.view(), n, &mut got);
            let what = format!("{level:?} parallel={parallel} {tag}");
            assert_close(&got, &r, &what);
            assert_pair_close(&got, &want_scalar, &r, &what);
        }
    }
}

#[test]
fn matmul_ragged_shapes_match_reference() {
    let ms = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 17];
    let ns = [1, 2, 3, 4, 5, 7, 9, 16, 17, 31, 33, 65];
    let ks = [
        1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 100, 255, 257, 1000, 1029,
    ];
    let mut rng = Rng(1);
    for dt in DTYPES {
        let mut t = 0;
        for &m in &ms {
            for &k in &ks {
                let n = ns[t % ns.len()];
                t += 1;
                check_shape(&mut rng, m, n, k, dt);
            }
        }
    }
}

#[test]
fn matmul_random_shapes_match_reference() {
    let mut rng = Rng(2);
    for _ in 0..60 {
        let m = 1 + rng.below(40);
        let n = 1 + rng.below(80);
        let k = 1 + rng.below(1100);
        let dt = DTYPES[rng.below(3)];
        check_shape(&mut rng, m, n, k, dt);
    }
}

#[test]
fn matmul_crosses_gemm_cache_blocks() {
    // n > NC (256) and k > KC (256) exercise several packed blocks, ragged at both ends; the
    // first shape also needs every row tile size of both GEMM kernels (8 and 6 rows).
    let mut rng = Rng(3);
    for dt in DTYPES {
        check_shape(&mut rng, 23, 300, 600, dt);
        check_shape(&mut rng, MATVEC_MAX_M + 1, 257, 513, dt);
        check_shape(&mut rng, 3, 600, 4100, dt);
    }
}

#[test]
fn matmul_same_sign_data_matches_reference() {
    // All-positive terms make partial sums grow linearly: the hardest case for f32 summation.
    let mut rng = Rng(4);
    for &(m, n, k) in &[(1, 5, 3000), (4, 9, 1000), (20, 40, 2000)] {
        let x: Vec<f32> = rng.vec(m * k).iter().map(|v| v.abs()).collect();
        let wv: Vec<f32> = rng.vec(n * k).iter().map(|v| v.abs()).collect();
        for dt in DTYPES {
            let w = Owned::new(&wv, dt);
            let r = reference(&x, m, k, &w.widened(), n);
            for level in supported_levels() {
                let mut got = vec![f32::NAN; m * n];
                matmul_with(level, true, &x, m, k, w.view(), n, &mut got);
                assert_close(&got, &r, &format!("{level:?} {dt:?} m={m} n={n} k={k}"));
            }
        }
    }
}

#[test]
fn matmul_result_is_independent_of_thread_count() {
    // Shapes above PAR_MIN_WORK so pools of 2+ threads really split: matvec and GEMM split by
    // columns, and a narrow-n GEMM split by rows.
    let shapes = [
        (1, 1100, 1000),
        (3, 700, 700),
        (40, 300, 300),
        (200, 5, 1100),
    ];
    let mut rng = Rng(5);
    let pools: Vec<rayon::ThreadPool> = [1, 2, 3, 4]
        .iter()
        .map(|&t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        })
        .collect();
    for &(m, n, k) in &shapes {
        assert!(
            m * n * k >= 4 * PAR_MIN_WORK,
            "shape too small to be split 4 ways"
        );
        let x = rng.vec(m * k);
        let wv = rng.vec(n * k);
        for dt in DTYPES {
            let w = Owned::new(&wv, dt);
            let r = reference(&x, m, k, &w.widened(), n);
            for level in supported_levels() {
                let mut serial = vec![f32::NAN; m * n];
                matmul_with(level, false, &x, m, k, w.view(), n, &mut serial);
                assert_close(&serial, &r, &format!("{level:?} {dt:?} serial"));
                for pool in &pools {
                    let mut got = vec![f32::NAN; m * n];
                    pool.install(|| matmul_with(level, true, &x, m, k, w.view(), n, &mut got));
                    let same = got
                        .iter()
                        .zip(&serial)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{level:?} {dt:?} m={m} n={n} k={k}: {} threads differ from serial",
                        pool.current_num_threads()
                    );
                }
            }
        }
    }
}

#[test]
fn public_matmul_equals_matmul_serial_bitwise() {
    let mut rng = Rng(6);
    for &(m, n, k) in &[(1, 4096, 256), (16, 512, 512), (2, 3, 5)] {
        let x = rng.vec(m * k);
        let w = Owned::new(&rng.vec(n * k), Dt::Bf16);
        let r = reference(&x, m, k, &w.widened(), n);
        let mut a = vec![f32::NAN; m * n];
        let mut b = vec![f32::NAN; m * n];
        matmul(&x, m, k, w.view(), n, &mut a);
        matmul_serial(&x, m, k, w.view(), n, &mut b);
        assert_close(&a, &r, "matmul");
        assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

#[test]
fn non_finite_values_stay_in_their_row_and_column() {
    // A NaN weight poisons only its output column and an inf input only its output row: tiles,
    // padding and masked tails must not leak values between elements.
    let mut rng = Rng(7);
    for &(m, n, k) in &[(3, 37, 45), (13, 70, 300)] {
        let (bad_i, bad_j) = (m / 2, n - 2);
        let mut x = rng.vec(m * k);
        x[bad_i * k + k - 1] = f32::INFINITY;
        let mut wv = rng.vec(n * k);
        wv[bad_j * k + k / 3] = f32::NAN;
        for dt in DTYPES {
            let w = Owned::new(&wv, dt);
            for level in supported_levels() {
                let mut got = vec![0f32; m * n];
                matmul_with(level, true, &x, m, k, w.view(), n, &mut got);
                for i in 0..m {
                    for j in 0..n {
                        let v = got[i * n + j];
                        let ok = if j == bad_j {
                            v.is_nan()
                        } else if i == bad_i {
                            v.is_infinite() || v.is_nan()
                        } else {
                            v.is_finite()
                        };
                        assert!(
                            ok,
                            "{level:?} {dt:?} m={m} n={n} k={k}: out[{i}][{j}] = {v}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn degenerate_shapes() {
    for level in supported_levels() {
        // k == 0: every output is an empty sum.
        let mut out = vec![f32::NAN; 6];
        matmul_with(level, true, &[], 2, 0, Weights::Bf16(&[]), 3, &mut out);
        assert!(out.iter().all(|&v| v == 0.0), "{level:?}: k=0 gave {out:?}");
        // m == 0 or n == 0: nothing to write, must not panic.
        matmul_with(level, true, &[], 0, 4, Weights::F32(&[1.0; 8]), 2, &mut []);
        matmul_with(level, true, &[1.0; 8], 2, 4, Weights::F16(&[]), 0, &mut []);
    }
    let mut out = vec![f32::NAN; 2];
    scalar::matmul(&[], 2, 0, Weights::F32(&[]), 1, &mut out);
    assert_eq!(out, [0.0, 0.0]);
}

#[test]
#[should_panic(expected = "x has")]
fn matmul_rejects_wrong_x_length() {
    matmul(&[0.0; 5], 2, 3, Weights::F32(&[0.0; 6]), 2, &mut [0.0; 4]);
}

#[test]
#[should_panic(expected = "w has")]
fn matmul_rejects_wrong_w_length() {
    matmul(
        &[0.0; 6],
        2,
        3,
        Weights::Bf16(&[bf16::ZERO; 5]),
        2,
        &mut [0.0; 4],
    );
}

#[test]
#[should_panic(expected = "out has")]
fn matmul_serial_rejects_wrong_out_length() {
    matmul_serial(
        &[0.0; 6],
        2,
        3,
        Weights::F16(&[f16::ZERO; 6]),
        2,
        &mut [0.0; 5],
    );
}

#[test]
#[should_panic(expected = "out has")]
fn scalar_matmul_rejects_wrong_out_length() {
    scalar::matmul(&[0.0; 6], 2, 3, Weights::F32(&[0.0; 6]), 2, &mut [0.0; 3]);
}

#[test]
fn dot_matches_scalar_and_reference() {
    let mut rng = Rng(8);
    let lens = (0..=70).chain([127, 128, 129, 1000, 1031, 4099]);
    for len in lens {
        let a = rng.vec(len);
        let b = rng.vec(len);
        let want: f64 = a.iter().zip(&b).map(|(&a, &b)| a as f64 * b as f64).sum();
        let na: f64 = a.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let tol = TOL_REL * (len as f64).sqrt() * na * nb;
        let s = scalar::dot(&a, &b);
        assert!(
            (s as f64 - want).abs() <= tol,
            "scalar dot len={len}: {s} vs {want}"
        );
        for level in supported_levels() {
            let got = dot_with(level, &a, &b);
            assert!(
                (got as f64 - want).abs() <= tol && (got as f64 - s as f64).abs() <= 2.0 * tol,
                "{level:?} dot len={len}: {got}, scalar {s}, f64 {want}"
            );
        }
    }
    assert_eq!(crate::dot(&[2.0, 3.0], &[5.0, 7.0]), 31.0);
}

#[test]
#[should_panic(expected = "lengths differ")]
fn dot_rejects_length_mismatch() {
    crate::dot(&[1.0; 3], &[1.0; 4]);
}

#[test]
fn axpy_matches_scalar_and_reference() {
    let mut rng = Rng(9);
    for len in (0..=40).chain([63, 64, 65, 1000, 1031]) {
        let x = rng.vec(len);
        let base = rng.vec(len);
        let alpha = rng.sym() * 3.0;
        let mut s = base.clone();
        scalar::axpy(alpha, &x, &mut s);
        for level in supported_levels() {
            let mut got = base.clone();
            axpy_with(level, alpha, &x, &mut got);
            for i in 0..len {
                let want = base[i] as f64 + alpha as f64 * x[i] as f64;
                // One f32 rounding (fused) or two (scalar): within 2 ulp of the operands' scale.
                let tol = 2.0 * f32::EPSILON as f64 * (base[i].abs() + (alpha * x[i]).abs()) as f64;
                assert!(
                    (got[i] as f64 - want).abs() <= tol && (s[i] as f64 - want).abs() <= tol,
                    "{level:?} axpy len={len} i={i}: {} / scalar {} vs {want}",
                    got[i],
                    s[i]
                );
            }
        }
    }
}

#[test]
#[should_panic(expected = "lengths differ")]
fn axpy_rejects_length_mismatch() {
    crate::axpy(1.0, &[1.0; 3], &mut [0.0; 2]);
}

#[test]
fn row_to_f32_widens_exactly() {
    let mut rng = Rng(10);
    let (rows, k) = (5, 37);
    let vals = rng.vec(rows * k);
    for dt in DTYPES {
        let w = Owned::new(&vals, dt);
        let wide = w.widened();
        for row in 0..rows {
            let mut out = vec![f32::NAN; k];
            row_to_f32(w.view(), row, k, &mut out);
            for (p, &v) in out.iter().enumerate() {
                assert_eq!(v as f64, wide[row * k + p], "{dt:?} row {row} col {p}");
            }
        }
    }
    // Special values survive: infinities, NaN, negative zero, subnormals.
    let specials = [f32::INFINITY, f32::NEG_INFINITY, -0.0, 1e-40, f32::NAN];
    let b: Vec<bf16> = specials.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut out = [0f32; 5];
    row_to_f32(Weights::Bf16(&b), 0, 5, &mut out);
    assert_eq!(out[..2], [f32::INFINITY, f32::NEG_INFINITY]);
    assert!(out[2] == 0.0 && out[2].is_sign_negative());
    assert_eq!(out[3], bf16::from_f32(1e-40).to_f32());
    assert!(out[4].is_nan());
}

#[test]
#[should_panic(expected = "outside weights")]
fn row_to_f32_rejects_row_out_of_range() {
    let mut out = [0f32; 3];
    row_to_f32(Weights::F32(&[0.0; 6]), 2, 3, &mut out);
}

#[test]
fn weights_len() {
    let w = [bf16::ONE; 6];
    assert_eq!(Weights::Bf16(&w).len(), 6);
    assert!(!Weights::Bf16(&w).is_empty());
    assert!(Weights::F16(&[]).is_empty());
    assert_eq!(Weights::F32(&[1.0; 3]).len(), 3);
}

#[test]
fn simd_level_is_the_best_supported() {
    #[cfg(target_arch = "x86_64")]
    let expected = {
        use std::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma") && has!("f16c");
        if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
            "avx512"
        } else if avx2 {
            "avx2"
        } else {
            "scalar"
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let expected = "scalar";
    assert_eq!(simd_level(), expected);
    assert_eq!(supported_levels()[0].name(), expected);
    if supported_levels().len() < ALL_LEVELS.len() {
        eprintln!(
            "note: this CPU runs only {:?}; other levels are untested here",
            supported_levels()
        );
    }
}

// ---- Quantized weights (Q8_0, Q4_K) ----

#[derive(Clone, Copy, Debug, PartialEq)]
enum Qt {
    Q8_0,
    Q4K,
}

/// Quantized weights, owned, with their dequantized f32 values.
struct OwnedQ {
    q8: Vec<crate::BlockQ8_0>,
    q4: Vec<crate::BlockQ4K>,
    qt: Qt,
    deq: Vec<f32>,
}

impl OwnedQ {
    fn new(vals: &[f32], qt: Qt) -> OwnedQ {
        use crate::quant::*;
        let mut deq = vec![f32::NAN; vals.len()];
        let (mut q8, mut q4) = (Vec::new(), Vec::new());
        match qt {
            Qt::Q8_0 => {
                q8 = vec![
                    BlockQ8_0 {
                        d: f16::ZERO,
                        qs: [0; 32]
                    };
                    vals.len() / QK8_0
                ];
                quantize_row_q8_0(vals, &mut q8);
                dequantize_row_q8_0(&q8, &mut deq);
            }
            Qt::Q4K => {
                q4 = vec![
                    BlockQ4K {
                        d: f16::ZERO,
                        dmin: f16::ZERO,
                        scales: [0; 12],
                        qs: [0; 128]
                    };
                    vals.len() / QK_K
                ];
                quantize_row_q4_k(vals, &mut q4);
                dequantize_row_q4_k(&q4, &mut deq);
            }
        }
        OwnedQ { q8, q4, qt, deq }
    }

    fn view(&self) -> Weights<'_> {
        match self.qt {
            Qt::Q8_0 => Weights::Q8_0(&self.q8),
            Qt::Q4K => Weights::Q4K(&self.q4),
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// One shape, one format: the scalar twin vs an f64 reference on the dequantized weights, and
/// every level (serial and parallel) vs the reference, vs the scalar twin, and bit for bit vs
/// the same level's f32 kernel on the dequantized weights (the result is exactly
/// `x · dequantize(W)ᵀ` in the f32 kernels' summation order).
fn check_quant_shape(rng: &mut Rng, m: usize, n: usize, k: usize, qt: Qt) {
    let x = rng.vec(m * k);
    let w = OwnedQ::new(&rng.vec(n * k), qt);
    let wide: Vec<f64> = w.deq.iter().map(|&v| v as f64).collect();
    let r = reference(&x, m, k, &wide, n);
    let tag = format!("m={m} n={n} k={k} {qt:?}");

    let mut want_scalar = vec![f32::NAN; m * n];
    scalar::matmul(&x, m, k, w.view(), n, &mut want_scalar);
    assert_close(&want_scalar, &r, &format!("scalar {tag}"));
    let mut f32_scalar = vec![f32::NAN; m * n];
    scalar::matmul(&x, m, k, Weights::F32(&w.deq), n, &mut f32_scalar);
    assert_eq!(
        bits(&want_scalar),
        bits(&f32_scalar),
        "scalar vs f32 scalar {tag}"
    );

    for level in supported_levels() {
        let mut f32_level = vec![f32::NAN; m * n];
        matmul_with(
            level,
            false,
            &x,
            m,
            k,
            Weights::F32(&w.deq),
            n,
            &mut f32_level,
        );
        for parallel in [false, true] {
            let mut got = vec![f32::NAN; m * n];
            matmul_with(level, parallel, &x, m, k, w.view(), n, &mut got);
            let what = format!("{level:?} parallel={parallel} {tag}");
            assert_close(&got, &r, &what);
            assert_pair_close(&got, &want_scalar, &r, &what);
            assert_eq!(
                bits(&got),
                bits(&f32_level),
                "{what}: differs from f32 kernel"
            );
        }
    }
}

#[test]
fn quantized_matmul_matches_scalar_and_reference() {
    let ms = [1, 2, 3, 7, 8, 9, 17];
    let ns = [1, 3, 5, 7, 9, 25, 33, 65];
    let mut rng = Rng(30);
    let mut t = 0;
    for &m in &ms {
        for &k in &[32, 64, 96, 256, 288, 2048] {
            check_quant_shape(&mut rng, m, ns[t % ns.len()], k, Qt::Q8_0);
            t += 1;
        }
        for &k in &[256, 512, 2048] {
            check_quant_shape(&mut rng, m, ns[t % ns.len()], k, Qt::Q4K);
            t += 1;
        }
    }
}

#[test]
fn quantized_matmul_large_k_and_n() {
    // k = 4096 + 256 (several scratch chunks per call, ragged last chunk) and n odd above one
    // GEMM chunk.
    let mut rng = Rng(31);
    for qt in [Qt::Q8_0, Qt::Q4K] {
        for &(m, n) in &[(1, 37), (3, 29), (9, 67), (17, 5)] {
            check_quant_shape(&mut rng, m, n, 4096 + 256, qt);
        }
        check_quant_shape(&mut rng, 12, 101, 256, qt);
        check_quant_shape(&mut rng, 2, 1001, 256, qt);
    }
}

#[test]
fn quantized_matmul_is_independent_of_thread_count() {
    let shapes = [
        (1, 1100, 1024),
        (3, 700, 768),
        (40, 300, 512),
        (200, 5, 1280),
    ];
    let mut rng = Rng(32);
    let pools: Vec<rayon::ThreadPool> = [1, 2, 3]
        .iter()
        .map(|&t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        })
        .collect();
    for &(m, n, k) in &shapes {
        assert!(m * n * k >= 4 * PAR_MIN_WORK);
        let x = rng.vec(m * k);
        let wv = rng.vec(n * k);
        for qt in [Qt::Q8_0, Qt::Q4K] {
            let w = OwnedQ::new(&wv, qt);
            for level in supported_levels() {
                let mut serial = vec![f32::NAN; m * n];
                matmul_with(level, false, &x, m, k, w.view(), n, &mut serial);
                for pool in &pools {
                    let mut got = vec![f32::NAN; m * n];
                    pool.install(|| matmul_with(level, true, &x, m, k, w.view(), n, &mut got));
                    assert_eq!(
                        bits(&got),
                        bits(&serial),
                        "{level:?} {qt:?} m={m} n={n} k={k}: {} threads",
                        pool.current_num_threads()
                    );
                }
            }
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul(&x, m, k, w.view(), n, &mut a);
            matmul_serial(&x, m, k, w.view(), n, &mut b);
            assert_eq!(bits(&a), bits(&b), "{qt:?} matmul vs matmul_serial");
        }
    }
}

#[test]
fn quantized_row_to_f32_dequantizes() {
    let mut rng = Rng(33);
    for (qt, k) in [(Qt::Q8_0, 96), (Qt::Q4K, 512)] {
        let rows = 3;
        let w = OwnedQ::new(&rng.vec(rows * k), qt);
        assert_eq!(w.view().len(), rows * k);
        for row in 0..rows {
            let mut out = vec![f32::NAN; k];
            row_to_f32(w.view(), row, k, &mut out);
            assert_eq!(
                bits(&out),
                bits(&w.deq[row * k..(row + 1) * k]),
                "{qt:?} {row}"
            );
        }
    }
}

#[test]
fn quantized_weights_len_and_block_size() {
    let q8 = [crate::BlockQ8_0 {
        d: f16::ZERO,
        qs: [0; 32],
    }; 3];
    assert_eq!(Weights::Q8_0(&q8).len(), 96);
    assert_eq!(Weights::Q8_0(&q8).block_size(), 32);
    assert!(Weights::Q4K(&[]).is_empty());
    assert_eq!(Weights::Q4K(&[]).block_size(), 256);
    assert_eq!(Weights::F16(&[]).block_size(), 1);
}

#[test]
#[should_panic(expected = "not a multiple of the weights' block size")]
fn quantized_matmul_rejects_ragged_k() {
    // n = 3, k = 48: 144 weights would fill 4.5 blocks; k itself is rejected.
    let q8 = [crate::BlockQ8_0 {
        d: f16::ZERO,
        qs: [0; 32],
    }; 9];
    let mut out = [0f32; 6];
    matmul(&[0.0; 96], 2, 48, Weights::Q8_0(&q8), 3, &mut out);
}

#[test]
#[should_panic(expected = "expected n*k")]
fn quantized_matmul_rejects_wrong_block_count() {
    let q8 = [crate::BlockQ8_0 {
        d: f16::ZERO,
        qs: [0; 32],
    }; 3];
    let mut out = [0f32; 2];
    matmul(&[0.0; 64], 1, 64, Weights::Q8_0(&q8), 2, &mut out);
}

#[test]
fn quantized_degenerate_shapes() {
    let mut out = [1f32; 0];
    matmul(&[], 0, 32, Weights::Q8_0(&[]), 0, &mut out);
    let mut out = [1f32; 3];
    scalar::matmul(&[], 3, 0, Weights::Q4K(&[]), 1, &mut out);
    assert_eq!(out, [0.0; 3]);
}

// ---- Integer-dot path with q8 activations ----

#[test]
fn q8_activations_simd_equals_scalar_twin_bitwise() {
    use crate::qdot::matmul_q8_activations_with;
    use crate::Level;
    let mut rng = Rng(40);
    let shapes = [
        (1, 7, 32),
        (2, 9, 256),
        (3, 5, 2048),
        (7, 3, 4352),
        (9, 11, 96),
        (17, 3, 512),
        (1, 33, 4352),
    ];
    for &(m, n, k) in &shapes {
        let x = rng.vec(m * k);
        let mut w = OwnedQ::new(&rng.vec(n * k), Qt::Q8_0);
        // Extreme weights too, including -128 (never written by the quantizer).
        for (i, b) in w.q8.iter_mut().enumerate().filter(|(i, _)| i % 3 == 0) {
            for (p, q) in b.qs.iter_mut().enumerate() {
                *q = [-128, 127, -127, 0][(i + p) % 4];
            }
        }
        let mut want = vec![f32::NAN; m * n];
        matmul_q8_activations_with(Level::Scalar, &x, m, k, &w.q8, n, &mut want);
        for level in supported_levels() {
            let mut got = vec![f32::NAN; m * n];
            matmul_q8_activations_with(level, &x, m, k, &w.q8, n, &mut got);
            assert_eq!(bits(&got), bits(&want), "{level:?} m={m} n={n} k={k}");
        }
        let mut public = vec![f32::NAN; m * n];
        crate::matmul_q8_activations(&x, m, k, &w.q8, n, &mut public);
        assert_eq!(bits(&public), bits(&want), "public m={m} n={n} k={k}");
    }
}

#[test]
fn q8_activations_scalar_twin_matches_reference_on_quantized_x() {
    use crate::quant::{dequantize_row_q8_0, quantize_row_q8_0};
    let mut rng = Rng(41);
    let (m, n, k) = (3, 5, 512);
    let x = rng.vec(m * k);
    let w = OwnedQ::new(&rng.vec(n * k), Qt::Q8_0);
    // The reference: exact products of the dequantized q8(x) and dequantize(w).
    let mut xq = vec![
        crate::BlockQ8_0 {
            d: f16::ZERO,
            qs: [0; 32]
        };
        m * k / 32
    ];
    quantize_row_q8_0(&x, &mut xq);
    let mut xd = vec![0f32; m * k];
    dequantize_row_q8_0(&xq, &mut xd);
    let wide: Vec<f64> = w.deq.iter().map(|&v| v as f64).collect();
    let r = reference(&xd, m, k, &wide, n);
    let mut got = vec![f32::NAN; m * n];
    crate::qdot::matmul_q8_activations_with(crate::Level::Scalar, &x, m, k, &w.q8, n, &mut got);
    assert_close(&got, &r, "q8 activations scalar");
}

#[test]
fn q8_activations_error_vs_f32_path_is_small() {
    let mut rng = Rng(42);
    let (m, n, k) = (4, 64, 4096);
    let x = rng.vec(m * k);
    let w = OwnedQ::new(&rng.vec(n * k), Qt::Q8_0);
    let mut exact = vec![0f32; m * n];
    let mut approx = vec![0f32; m * n];
    matmul(&x, m, k, w.view(), n, &mut exact);
    crate::matmul_q8_activations(&x, m, k, &w.q8, n, &mut approx);
    let num: f64 = exact
        .iter()
        .zip(&approx)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = exact.iter().map(|a| (*a as f64).powi(2)).sum();
    let rel = (num / den).sqrt();
    eprintln!("q8-activation path: relative RMS difference from the f32 path {rel:.2e}");
    // Rounding x to 8 bits (≈0.6% RMS per element on uniform data) averages out in the sums.
    assert!(rel < 5e-3, "relative RMS difference {rel}");
}

#[test]
#[should_panic(expected = "not a multiple of the weights' block size")]
fn q8_activations_rejects_ragged_k() {
    let mut out = [0f32; 1];
    crate::matmul_q8_activations(&[0.0; 40], 1, 40, &[], 0, &mut out[..0]);
}

/// Strided dot rows: at every level within tolerance of the f64 reference; at the AVX-512 level
/// equal bit for bit to the matvec kernel on a gathered copy of the rows.
#[test]
fn dot_rows_strided_matches_reference_and_gathered_matvec() {
    let mut rng = Rng(41);
    for &(m, k, n, pad) in &[
        (1, 128, 37, 384),
        (8, 128, 300, 0),
        (3, 70, 9, 5),
        (5, 16, 1, 3),
    ] {
        let ldw = k + pad;
        let x = rng.vec(m * k);
        let w = rng.vec((n - 1) * ldw + k);
        let gathered: Vec<f32> = (0..n)
            .flat_map(|j| w[j * ldw..j * ldw + k].to_vec())
            .collect();
        let wf: Vec<f64> = gathered.iter().map(|&v| v as f64).collect();
        let r = reference(&x, m, k, &wf, n);
        for level in supported_levels() {
            let mut got = vec![f32::NAN; m * n];
            crate::dot_rows_strided_with(level, &x, m, k, &w, ldw, n, &mut got);
            assert_close(&got, &r, &format!("dot_rows_strided {level:?} {m}x{k}x{n}"));
            #[cfg(target_arch = "x86_64")]
            if level == crate::Level::Avx512 {
                let mut want = vec![0f32; m * n];
                matmul_with(
                    level,
                    false,
                    &x,
                    m,
                    k,
                    Weights::F32(&gathered),
                    n,
                    &mut want,
                );
                assert_eq!(bits(&got), bits(&want), "gathered matvec {m}x{k}x{n}");
            }
        }
    }
}

/// Strided weighted sums: every level equals the scalar twin bit for bit (one FMA per term in
/// the same order) and the f64 reference within tolerance; ragged widths and strides.
#[test]
fn weighted_sum_strided_matches_twin_and_reference() {
    let mut rng = Rng(43);
    for &(m, n, d, pad) in &[
        (1, 37, 128, 384),
        (8, 300, 128, 0),
        (5, 9, 70, 3),
        (2, 1, 5, 0),
    ] {
        let ldv = d + pad;
        let p = rng.vec(m * n);
        let v = rng.vec((n - 1) * ldv + d);
        let mut want = vec![f32::NAN; m * d];
        scalar::weighted_sum_strided(&p, n, &v, ldv, d, &mut want);
        for i in 0..m {
            for c in 0..d {
                let exact: f64 = (0..n)
                    .map(|j| p[i * n + j] as f64 * v[j * ldv + c] as f64)
                    .sum();
                let scale: f64 = (0..n)
                    .map(|j| (p[i * n + j] * v[j * ldv + c]).abs() as f64)
                    .sum();
                let err = (want[i * d + c] as f64 - exact).abs();
                assert!(
                    err <= 1e-6 * scale.max(1e-30) * (n as f64).sqrt() + 1e-30,
                    "twin error {err:e}"
                );
            }
        }
        for level in supported_levels() {
            let mut got = vec![f32::NAN; m * d];
            crate::weighted_sum_strided_with(level, &p, m, n, &v, ldv, d, &mut got);
            assert_eq!(
                bits(&got),
                bits(&want),
                "weighted_sum_strided {level:?} {m}x{n}x{d}"
            );
        }
    }
}

#[test]
#[should_panic(expected = "row stride")]
fn dot_rows_strided_rejects_short_stride() {
    let mut out = vec![0f32; 2];
    crate::dot_rows_strided(&[0.0; 4], 1, 4, &[0.0; 8], 3, 2, &mut out);
}

#[test]
#[should_panic(expected = "need")]
fn weighted_sum_strided_rejects_short_values() {
    let mut out = vec![0f32; 4];
    crate::weighted_sum_strided(&[0.0; 2], 1, 2, &[0.0; 6], 4, 4, &mut out);
}
