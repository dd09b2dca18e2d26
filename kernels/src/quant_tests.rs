//! Unit tests of the quantized formats: layout, hand-computed values, quantization error, and
//! the SIMD dequantizers against the scalar ones (bit for bit) at every supported level.

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
