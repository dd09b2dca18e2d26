//! Unit tests of the quantized formats: layout, hand-computed values, quantization error, the
//! SIMD dequantizers against the scalar ones (bit for bit) at every supported level, and the
//! quantizers against their previous implementations (Q8_0 bit for bit, Q4_K by reconstruction
//! error) and across levels (bit for bit).

use std::mem::{align_of, offset_of, size_of};

use half::f16;

use super::*;
use crate::supported_levels;

use crate::tests::Rng;

fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn block_layouts_match_ggml() {
    assert_eq!(size_of::<BlockQ8_0>(), 34);
    assert_eq!(align_of::<BlockQ8_0>(), 2);
    assert_eq!(offset_of!(BlockQ8_0, d), 0);
    assert_eq!(offset_of!(BlockQ8_0, qs), 2);
    assert_eq!(size_of::<BlockQ4K>(), 144);
    assert_eq!(align_of::<BlockQ4K>(), 2);
    assert_eq!(offset_of!(BlockQ4K, d), 0);
    assert_eq!(offset_of!(BlockQ4K, dmin), 2);
    assert_eq!(offset_of!(BlockQ4K, scales), 4);
    assert_eq!(offset_of!(BlockQ4K, qs), 16);
}

#[test]
fn q4k_scale_packing_matches_hand_packed_bytes() {
    // Sub-blocks 4..8 use values >= 16 so their high bits land in the top 2 bits of bytes 0..8.
    let sc = [1, 2, 3, 4, 21, 38, 55, 63];
    let m = [5, 6, 7, 8, 25, 42, 59, 16];
    // Written by hand from the format: bytes 0..4 = sc[s] | (sc[s+4] >> 4) << 6, bytes 4..8 =
    // m[s] | (m[s+4] >> 4) << 6, bytes 8..12 = (sc[s+4] & 15) | (m[s+4] & 15) << 4.
    let want = [
        0x41, 0x82, 0xC3, 0xC4, 0x45, 0x86, 0xC7, 0x48, 0x95, 0xA6, 0xB7, 0x0F,
    ];
    assert_eq!(BlockQ4K::pack_scales_mins(&sc, &m), want);
    let b = BlockQ4K {
        d: f16::ONE,
        dmin: f16::ONE,
        scales: want,
        qs: [0; 128],
    };
    for s in 0..8 {
        assert_eq!(b.scale_min(s), (sc[s], m[s]), "sub-block {s}");
    }
}

#[test]
fn q4k_hand_packed_block_dequantizes_to_hand_values() {
    // d = 0.5, dmin = 0.25 (exact in f16); quant of weight e is q(e) = (7e + 3) % 16.
    let sc: [u8; 8] = [1, 63, 17, 32, 5, 48, 33, 60];
    let m: [u8; 8] = [0, 1, 62, 16, 31, 47, 2, 63];
    let q = |e: usize| ((7 * e + 3) % 16) as u8;
    let mut qs = [0u8; 128];
    for (i, byte) in qs.iter_mut().enumerate() {
        // Byte i of chunk j = i / 32: low nibble weight 64j + i%32, high nibble 64j + 32 + i%32.
        let (j, l) = (i / 32, i % 32);
        *byte = q(64 * j + l) | (q(64 * j + 32 + l) << 4);
    }
    let b = BlockQ4K {
        d: f16::from_f32(0.5),
        dmin: f16::from_f32(0.25),
        scales: BlockQ4K::pack_scales_mins(&sc, &m),
        qs,
    };
    let mut y = [f32::NAN; 256];
    dequantize_row_q4_k(&[b], &mut y);
    for (e, &v) in y.iter().enumerate() {
        let s = e / 32;
        let want = 0.5 * sc[s] as f64 * q(e) as f64 - 0.25 * m[s] as f64;
        assert_eq!(v as f64, want, "weight {e}");
    }
}

#[test]
fn q4k_nibble_order_low_then_high_half() {
    // Only qs[0] = 0x21 and qs[33] = 0x40 are set, scale 1, min 0: weight 0 = 1 (low nibble of
    // byte 0), weight 32 = 2 (its high nibble), weight 65 = 0 and weight 97 = 4 (byte 33 is
    // chunk 1, l = 1). An interleaved order would put the 2 at weight 1.
    let mut qs = [0u8; 128];
    qs[0] = 0x21;
    qs[33] = 0x40;
    let b = BlockQ4K {
        d: f16::ONE,
        dmin: f16::ZERO,
        scales: BlockQ4K::pack_scales_mins(&[1; 8], &[0; 8]),
        qs,
    };
    let mut y = [f32::NAN; 256];
    dequantize_row_q4_k(&[b], &mut y);
    for (e, &v) in y.iter().enumerate() {
        let want = match e {
            0 => 1.0,
            32 => 2.0,
            97 => 4.0,
            _ => 0.0,
        };
        assert_eq!(v, want, "weight {e}");
    }
}

#[test]
fn q8_0_representable_block_round_trips_exactly() {
    // Values i/2 for i in -127..=127 (and the amax 63.5 present) give d = 0.5 exactly.
    let x: Vec<f32> = (0..32).map(|i| ((i * 8) as f32 - 127.0) / 2.0).collect();
    let mut x = x;
    x[5] = 63.5;
    let mut b = [BlockQ8_0 {
        d: f16::ZERO,
        qs: [0; 32],
    }];
    quantize_row_q8_0(&x, &mut b);
    assert_eq!(b[0].d, f16::from_f32(0.5));
    for (q, v) in b[0].qs.iter().zip(&x) {
        assert_eq!(*q as f32, v * 2.0);
    }
    let mut y = [0f32; 32];
    dequantize_row_q8_0(&b, &mut y);
    assert_eq!(y.to_vec(), x);
}

#[test]
fn q8_0_error_is_at_most_half_a_step() {
    let mut rng = Rng(21);
    let mut x = rng.gauss_vec(32 * 64);
    x[32..64].fill(0.0); // an all-zero block: d = 0, no NaN
    x[64] = 1e4; // one outlier block
    let mut b = vec![
        BlockQ8_0 {
            d: f16::ZERO,
            qs: [0; 32]
        };
        64
    ];
    quantize_row_q8_0(&x, &mut b);
    let mut y = vec![f32::NAN; x.len()];
    dequantize_row_q8_0(&b, &mut y);
    for (blk, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
        // ggml rounds with the f32 d, then stores d as f16: the bound is half a step plus the
        // scale's f16 rounding times the largest quant.
        let d32 = xs.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
        let d16 = b[blk].d.to_f32();
        let bound = 0.5 * d16 + 127.0 * (d32 - d16).abs() + 1e-6 * d32;
        for (v, w) in xs.iter().zip(ys) {
            assert!(
                (v - w).abs() <= bound,
                "block {blk}: {v} -> {w}, bound {bound}"
            );
        }
    }
    assert!(y[32..64].iter().all(|&v| v == 0.0));
    let r = rel_rms(&x, &y);
    eprintln!("q8_0 relative RMS error {r:.5}");
    assert!(r < 0.01, "q8_0 relative RMS error {r}");
}

#[test]
fn q4k_gaussian_error_is_small() {
    // A 4-bit code has 16 levels over about ±2.5σ per sub-block: uniform rounding over steps of
    // ~0.3σ alone gives ~9% relative RMS error, and the least-squares (scale, min) search brings it
    // lower. (A relative RMS of ~2% is not reachable with 4 bits.) Measured: see the assert.
    let mut rng = Rng(22);
    let n = 256 * 64;
    let x = rng.gauss_vec(n);
    let mut b = vec![
        BlockQ4K {
            d: f16::ZERO,
            dmin: f16::ZERO,
            scales: [0; 12],
            qs: [0; 128]
        };
        n / 256
    ];
    quantize_row_q4_k(&x, &mut b);
    let mut y = vec![f32::NAN; n];
    dequantize_row_q4_k(&b, &mut y);
    let r = rel_rms(&x, &y);
    // Naive min/max 4-bit quantization per 32 (same format, no search) for comparison.
    let mut naive = vec![0f32; n];
    for (xs, ys) in x.chunks(32).zip(naive.chunks_mut(32)) {
        let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let s = (hi - lo) / 15.0;
        for (o, v) in ys.iter_mut().zip(xs) {
            *o = ((v - lo) / s).round() * s + lo;
        }
    }
    let rn = rel_rms(&x, &naive);
    eprintln!("q4_k relative RMS error {r:.4} (naive min/max {rn:.4})");
    assert!(r < 0.08, "q4_k relative RMS error {r} (naive {rn})");
    assert!(r < rn, "search ({r}) should beat naive min/max ({rn})");

    // Every weight is within ~half a quantization step of its sub-block unless it was clamped:
    // check that through the identity y = d1*q - m1 for every weight of every block.
    for (blk, bl) in b.iter().enumerate() {
        for s in 0..8 {
            let (d1, m1) = bl.sub_scale_min(s);
            for e in 32 * s..32 * s + 32 {
                let v = x[256 * blk + e];
                let q = ((v + m1) / d1).round();
                if (0.0..=15.0).contains(&q) {
                    let err = (v - y[256 * blk + e]).abs();
                    assert!(
                        err <= 0.5 * d1 * 1.0001 + 1e-6,
                        "block {blk} weight {e}: {err}"
                    );
                }
            }
        }
    }
}

#[test]
fn zero_and_constant_rows_quantize_cleanly() {
    let mut b = [BlockQ4K {
        d: f16::ONE,
        dmin: f16::ONE,
        scales: [7; 12],
        qs: [9; 128],
    }];
    let mut y = [f32::NAN; 256];
    quantize_row_q4_k(&[0.0; 256], &mut b);
    dequantize_row_q4_k(&b, &mut y);
    assert!(y.iter().all(|&v| v == 0.0));
    // A negative constant is represented by the min alone.
    quantize_row_q4_k(&[-2.0; 256], &mut b);
    dequantize_row_q4_k(&b, &mut y);
    assert!(y.iter().all(|&v| (v + 2.0).abs() < 0.01), "{:?}", &y[..4]);
}

#[test]
#[should_panic(expected = "length mismatch")]
fn q4k_quantize_rejects_ragged_row() {
    let mut b = [BlockQ4K {
        d: f16::ZERO,
        dmin: f16::ZERO,
        scales: [0; 12],
        qs: [0; 128],
    }];
    quantize_row_q4_k(&[0.0; 255], &mut b);
}

#[test]
#[should_panic(expected = "length mismatch")]
fn q8_0_dequantize_rejects_wrong_output_length() {
    let b = [BlockQ8_0 {
        d: f16::ONE,
        qs: [0; 32],
    }];
    dequantize_row_q8_0(&b, &mut [0.0; 31]);
}

fn random_q8_0(rng: &mut Rng, n: usize) -> Vec<BlockQ8_0> {
    (0..n)
        .map(|_| {
            let mut qs = [0i8; 32];
            for q in &mut qs {
                *q = rng.next_u64() as i8; // includes -128, which ggml never writes
            }
            BlockQ8_0 { d: rng.f16(), qs }
        })
        .collect()
}

fn random_q4k(rng: &mut Rng, n: usize) -> Vec<BlockQ4K> {
    (0..n)
        .map(|_| {
            let mut b = BlockQ4K {
                d: rng.f16(),
                dmin: rng.f16(),
                scales: [0; 12],
                qs: [0; 128],
            };
            for v in b.scales.iter_mut().chain(&mut b.qs) {
                *v = rng.next_u64() as u8;
            }
            b
        })
        .collect()
}

#[test]
fn simd_dequantizers_equal_scalar_bitwise() {
    let mut rng = Rng(23);
    for nb in [1, 2, 3, 7, 16] {
        let q8 = random_q8_0(&mut rng, nb);
        let q4 = random_q4k(&mut rng, nb);
        let mut want8 = vec![0f32; nb * 32];
        let mut want4 = vec![0f32; nb * 256];
        dequantize_row_q8_0(&q8, &mut want8);
        dequantize_row_q4_k(&q4, &mut want4);
        for level in supported_levels() {
            let mut got8 = vec![f32::NAN; nb * 32];
            let mut got4 = vec![f32::NAN; nb * 256];
            dequantize_with(level, QWeights::Q8_0(&q8), 0, nb, &mut got8);
            dequantize_with(level, QWeights::Q4K(&q4), 0, nb, &mut got4);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got8), bits(&want8), "{level:?} q8_0 nb={nb}");
            assert_eq!(bits(&got4), bits(&want4), "{level:?} q4_k nb={nb}");
            // A sub-range of blocks.
            if nb > 2 {
                let mut part = vec![f32::NAN; 256];
                dequantize_with(level, QWeights::Q4K(&q4), 1, 2, &mut part);
                assert_eq!(
                    bits(&part),
                    bits(&want4[256..512]),
                    "{level:?} q4_k block 1"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The quantizers against the previous (reference) implementations, and across SIMD levels.

/// The previous Q8_0 quantizer, kept as the reference: GGML's `quantize_row_q8_0_ref` with
/// `f32::round` (halves away from zero).
fn reference_quantize_row_q8_0(src: &[f32], dst: &mut [BlockQ8_0]) {
    for (x, b) in src.chunks_exact(QK8_0).zip(dst) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
    }
}

/// The previous Q4_K sub-block fit, kept as the reference the faster search is measured
/// against: GGML's `make_qkx2_quants` scheme evaluated one grid spacing at a time, scoring the
/// plain min/max grid first and each candidate's error in a second pass over the weights.
fn reference_fit_scale_min(
    x: &[f32],
    w: &[f32],
    nmax: u8,
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: usize,
) -> (f32, f32) {
    let nearest = |v: f32| v.round_ties_even() as i32;
    let n = x.len();
    let mut lo = x.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    lo = lo.min(0.0);
    if hi <= lo {
        l_out.fill(0);
        return (0.0, -lo);
    }
    let nm = nmax as f32;
    let sum_w: f32 = w.iter().sum();
    let sum_x: f32 = x.iter().zip(w).map(|(a, b)| a * b).sum();
    let err = |scale: f32, min: f32, l: &[u8]| -> f32 {
        x.iter()
            .zip(w)
            .zip(l)
            .map(|((&v, &wt), &q)| {
                let d = scale * q as f32 + min - v;
                wt * d * d
            })
            .sum()
    };
    let iscale = nm / (hi - lo);
    let mut best_scale = 1.0 / iscale;
    let mut best_min = lo;
    for (o, &v) in l_out.iter_mut().zip(x) {
        *o = nearest(iscale * (v - lo)).clamp(0, nmax as i32) as u8;
    }
    let mut best_err = err(best_scale, best_min, l_out);
    let mut laux = vec![0u8; n];
    for step in 0..=nstep {
        let iscale = (rmin + rdelta * step as f32 + nm) / (hi - lo);
        let (mut sl, mut sl2, mut sxl) = (0f32, 0f32, 0f32);
        for ((o, &v), &wt) in laux.iter_mut().zip(x).zip(w) {
            let q = nearest(iscale * (v - lo)).clamp(0, nmax as i32);
            *o = q as u8;
            let qf = q as f32;
            sl += wt * qf;
            sl2 += wt * qf * qf;
            sxl += wt * qf * v;
        }
        let det = sum_w * sl2 - sl * sl;
        if det > 0.0 {
            let mut scale = (sum_w * sxl - sum_x * sl) / det;
            let mut min = (sl2 * sum_x - sl * sxl) / det;
            if min > 0.0 {
                min = 0.0;
                scale = sxl / sl2;
            }
            let e = err(scale, min, &laux);
            if e < best_err {
                best_err = e;
                best_scale = scale;
                best_min = min;
                l_out.copy_from_slice(&laux);
            }
        }
    }
    (best_scale, -best_min)
}

/// The previous Q4_K quantizer (the reference): the fit above per sub-block, then the same
/// 6-bit scale/min quantization and re-rounding against the stored values.
fn reference_quantize_row_q4_k(src: &[f32], dst: &mut [BlockQ4K]) {
    let nearest = |v: f32| v.round_ties_even() as i32;
    let mut l = [0u8; QK_K];
    let mut wts = [0f32; 32];
    for (x, b) in src.chunks_exact(QK_K).zip(dst) {
        let mut scales = [0f32; 8];
        let mut mins = [0f32; 8];
        for s in 0..8 {
            let xs = &x[32 * s..32 * s + 32];
            let rms = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
            for (wt, v) in wts.iter_mut().zip(xs) {
                *wt = rms + v.abs();
            }
            (scales[s], mins[s]) =
                reference_fit_scale_min(xs, &wts, 15, &mut l[32 * s..32 * s + 32], -1.0, 0.1, 20);
        }
        let max_scale = scales.iter().copied().fold(0f32, f32::max);
        let max_min = mins.iter().copied().fold(0f32, f32::max);
        let inv_scale = if max_scale > 0.0 {
            63.0 / max_scale
        } else {
            0.0
        };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let mut ls = [0u8; 8];
        let mut lm = [0u8; 8];
        for s in 0..8 {
            ls[s] = nearest(inv_scale * scales[s]).clamp(0, 63) as u8;
            lm[s] = nearest(inv_min * mins[s]).clamp(0, 63) as u8;
        }
        b.scales = BlockQ4K::pack_scales_mins(&ls, &lm);
        b.d = f16::from_f32(max_scale / 63.0);
        b.dmin = f16::from_f32(max_min / 63.0);
        for s in 0..8 {
            let (d, m) = b.sub_scale_min(s);
            if d == 0.0 {
                continue;
            }
            for (q, &v) in l[32 * s..32 * s + 32].iter_mut().zip(&x[32 * s..]) {
                *q = nearest((v + m) / d).clamp(0, 15) as u8;
            }
        }
        for j in 0..4 {
            for i in 0..32 {
                b.qs[32 * j + i] = l[64 * j + i] | (l[64 * j + 32 + i] << 4);
            }
        }
    }
}

fn q4k_zeroed(n: usize) -> Vec<BlockQ4K> {
    vec![
        BlockQ4K {
            d: f16::ZERO,
            dmin: f16::ZERO,
            scales: [0; 12],
            qs: [0; 128],
        };
        n
    ]
}

fn q8_zeroed(n: usize) -> Vec<BlockQ8_0> {
    vec![
        BlockQ8_0 {
            d: f16::ZERO,
            qs: [0; 32],
        };
        n
    ]
}

/// Relative RMS reconstruction error of a Q4_K quantizer on `x`.
fn q4k_rel_rms(x: &[f32], quantize: fn(&[f32], &mut [BlockQ4K])) -> f64 {
    let mut b = q4k_zeroed(x.len() / QK_K);
    quantize(x, &mut b);
    let mut y = vec![f32::NAN; x.len()];
    dequantize_row_q4_k(&b, &mut y);
    rel_rms(x, &y)
}

/// Weight rows of several shapes: uniform, Gaussian, Gaussian with a per-sub-block spread (as
/// trained weights have), heavy-tailed (Laplace, with rare outliers), and shifted to one sign
/// (exercises the mins).
fn quality_rows(rng: &mut Rng, n: usize) -> Vec<(&'static str, Vec<f32>)> {
    let uniform: Vec<f32> = (0..n).map(|_| (2.0 * rng.unit() - 1.0) as f32).collect();
    let gauss = rng.gauss_vec(n);
    let mut spread = rng.gauss_vec(n);
    for sb in spread.chunks_mut(32) {
        let s = (4.0 * rng.unit()).exp() as f32 * 1e-3;
        sb.iter_mut().for_each(|v| *v *= s);
    }
    let laplace: Vec<f32> = (0..n)
        .map(|_| {
            let u = rng.unit() - 0.5;
            let v = -u.signum() * (1.0 - 2.0 * u.abs()).ln() * 0.02;
            (if rng.next_u64().is_multiple_of(997) {
                v * 30.0
            } else {
                v
            }) as f32
        })
        .collect();
    let shifted: Vec<f32> = rng.gauss_vec(n).iter().map(|v| v * 0.1 + 0.5).collect();
    vec![
        ("uniform", uniform),
        ("gaussian", gauss),
        ("gaussian, per-sub-block spread", spread),
        ("laplace + outliers", laplace),
        ("shifted gaussian", shifted),
    ]
}

#[test]
fn q4k_error_is_no_worse_than_the_reference_quantizer() {
    let mut rng = Rng(51);
    for (name, x) in quality_rows(&mut rng, QK_K * 512) {
        let new = q4k_rel_rms(&x, quantize_row_q4_k);
        let old = q4k_rel_rms(&x, reference_quantize_row_q4_k);
        eprintln!("q4_k {name}: relative RMS error {new:.6} (reference {old:.6})");
        assert!(
            new <= old * 1.02,
            "{name}: relative RMS error {new} vs reference {old}"
        );
    }
}

#[test]
fn q4k_quantizer_is_level_independent_and_groups_do_not_interact() {
    let mut rng = Rng(52);
    // 1..=5 super-blocks (odd counts leave the AVX-512 path a partial group), with zero,
    // constant, tiny and huge sub-blocks mixed in.
    for nb in 1..=5 {
        let mut x = rng.gauss_vec(QK_K * nb);
        x[32..64].fill(0.0);
        if nb > 1 {
            x[300..332].fill(-3.0);
            x[QK_K * nb - 32..].iter_mut().for_each(|v| *v *= 1e-30);
        }
        x[5] = 1e20;
        let mut want = q4k_zeroed(nb);
        quantize_row_q4_k_with(Level::Scalar, &x, &mut want);
        for level in supported_levels() {
            let mut got = q4k_zeroed(nb);
            quantize_row_q4_k_with(level, &x, &mut got);
            assert_eq!(got, want, "{level:?} nb={nb}");
        }
        let mut public = q4k_zeroed(nb);
        quantize_row_q4_k(&x, &mut public);
        assert_eq!(public, want, "public nb={nb}");
        // Each super-block alone gives the same block as inside the row.
        for (i, (xs, b)) in x.chunks(QK_K).zip(&want).enumerate() {
            let mut one = q4k_zeroed(1);
            quantize_row_q4_k(xs, &mut one);
            assert_eq!(&one[0], b, "nb={nb} block {i}");
        }
    }
}

#[test]
fn q4k_quantizer_output_is_valid_ggml() {
    // Sub-block scales and mins are 6-bit by construction (pack_scales_mins asserts it); here:
    // d and dmin are finite and non-negative, every dequantized weight lies within its
    // sub-block's [−min, −min + 15·scale], and quants only differ from the nearest level by
    // clamping (checked by q4k_gaussian_error_is_small on Gaussian rows; here on all shapes).
    let mut rng = Rng(53);
    for (name, x) in quality_rows(&mut rng, QK_K * 64) {
        let mut b = q4k_zeroed(64);
        quantize_row_q4_k(&x, &mut b);
        let mut y = vec![f32::NAN; x.len()];
        dequantize_row_q4_k(&b, &mut y);
        for (i, bl) in b.iter().enumerate() {
            let (d, dmin) = (bl.d.to_f32(), bl.dmin.to_f32());
            assert!(d.is_finite() && d >= 0.0, "{name} block {i}: d = {d}");
            assert!(
                dmin.is_finite() && dmin >= 0.0,
                "{name} block {i}: dmin = {dmin}"
            );
            for s in 0..8 {
                let (sc, m) = bl.sub_scale_min(s);
                for e in 32 * s..32 * s + 32 {
                    let (v, r) = (x[256 * i + e], y[256 * i + e]);
                    assert!(
                        r >= -m && r <= -m + 15.0 * sc,
                        "{name} block {i} weight {e}"
                    );
                    if sc > 0.0 {
                        let q = ((v + m) / sc).round_ties_even();
                        if (0.0..=15.0).contains(&q) {
                            assert!(
                                (v - r).abs() <= 0.5 * sc * 1.0001 + 1e-6 * sc.max(m),
                                "{name} block {i} weight {e}: {v} -> {r}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn q8_0_quantizer_equals_the_reference_bitwise_at_every_level() {
    let mut rng = Rng(54);
    let nb = 67;
    let mut x = rng.gauss_vec(QK8_0 * nb);
    // Ties: a block whose amax is 127 gives d = 1 and id = 1, so k + 0.5 is an exact half.
    for (i, v) in x[..32].iter_mut().enumerate() {
        *v = i as f32 * 4.0 - 64.5;
    }
    x[31] = 127.0;
    // More ties at d = 0.5: values k/2 + 1/4 → quants k + 0.5.
    for (i, v) in x[32..64].iter_mut().enumerate() {
        *v = (i as f32 * 8.0 - 127.0) / 2.0 + 0.25;
    }
    x[63] = 63.5;
    x[64..96].fill(0.0);
    x[96..128].fill(-2.5);
    x[128] = 3e38;
    x[160] = 1e-40; // subnormal amax
    x[192..224].iter_mut().for_each(|v| *v *= 1e-6);
    let mut want = q8_zeroed(nb);
    reference_quantize_row_q8_0(&x, &mut want);
    for level in supported_levels() {
        let mut got = q8_zeroed(nb);
        quantize_row_q8_0_with(level, &x, &mut got);
        assert_eq!(got, want, "{level:?}");
    }
    let mut public = q8_zeroed(nb);
    quantize_row_q8_0(&x, &mut public);
    assert_eq!(public, want);
}
