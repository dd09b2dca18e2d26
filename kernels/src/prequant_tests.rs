//! Unit tests of the pre-quantized formats: layouts, the code tables against independent
//! definitions, the scalar dequantizers against the direct formula, the SIMD dequantizers
//! against the scalar ones (bit for bit, every code) at every supported level, matmul against
//! the same level's f32 kernel on the dequantized weights (bit for bit) and an f64 reference,
//! `row_to_f32`, and the q8-activation path's refusal.

use std::mem::{align_of, offset_of, size_of};

use super::*;
use crate::quant::{dequantize_with, QWeights};
use crate::tests::Rng;
use crate::{
    matmul, matmul_q8, matmul_q8_par, matmul_serial, matmul_with, q8_activations_supported,
    row_to_f32, scalar, supported_levels, Q8Activations, Weights, MATVEC_MAX_M,
};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The E4M3 value of `code` from the format's definition, computed in f64 with `powi` (NaN for
/// the two NaN codes, whose sign the callers check separately).
fn e4m3_reference(code: u8) -> f64 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((code >> 3) & 0xF) as i32;
    let m = (code & 7) as f64;
    if e == 15 && code & 7 == 7 {
        f64::NAN
    } else if e == 0 {
        sign * (m / 8.0) * 2f64.powi(-6)
    } else {
        sign * (1.0 + m / 8.0) * 2f64.powi(e - 7)
    }
}

/// The f32 bits the table must hold for NaN code `code`: a quiet NaN with the code's sign.
fn e4m3_nan_bits(code: u8) -> u32 {
    0x7FC0_0000 | ((code as u32 & 0x80) << 24)
}

/// bitsandbytes' NF4 values as its source writes them (decimal, converted to float32 by torch).
fn nf4_reference() -> [f32; 16] {
    [
        -1.0f64,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
    .map(|v| v as f32)
}

/// bitsandbytes' FP4 values: sign bit 3, magnitude `[0, 1/16, 8, 12, 4, 6, 2, 3][c & 7] / 12`
/// (the E2M1 grid normalised to 1), and code 8 (−0) stored as +0.0.
fn fp4_reference() -> [f32; 16] {
    let mag = [0.0f32, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0];
    std::array::from_fn(|c| {
        let v = mag[c & 7] / 12.0;
        if c & 8 != 0 && v != 0.0 {
            -v
        } else {
            v
        }
    })
}

#[test]
fn block_layouts_are_pinned() {
    assert_eq!(size_of::<BlockF8>(), 132);
    assert_eq!(align_of::<BlockF8>(), 4);
    assert_eq!(offset_of!(BlockF8, d), 0);
    assert_eq!(offset_of!(BlockF8, qs), 4);
    assert_eq!(size_of::<BlockNf4>(), 36);
    assert_eq!(align_of::<BlockNf4>(), 4);
    assert_eq!(offset_of!(BlockNf4, d), 0);
    assert_eq!(offset_of!(BlockNf4, qs), 4);
    assert_eq!(size_of::<BlockFp4>(), 36);
    assert_eq!(align_of::<BlockFp4>(), 4);
    assert_eq!(offset_of!(BlockFp4, qs), 4);
    assert_eq!(size_of::<BlockMxfp4>(), 17);
    assert_eq!(align_of::<BlockMxfp4>(), 1);
    assert_eq!(offset_of!(BlockMxfp4, e), 0);
    assert_eq!(offset_of!(BlockMxfp4, qs), 1);
    assert_eq!((QK_F8, QK_B4, QK_MX), (128, 64, 32));
}

#[test]
fn e4m3_table_matches_the_format_definition_for_all_codes() {
    for c in 0..=255u8 {
        let got = E4M3_TO_F32[c as usize];
        let want = e4m3_reference(c);
        if want.is_nan() {
            assert_eq!(got.to_bits(), e4m3_nan_bits(c), "code {c:#04x}");
        } else {
            // Every E4M3 value is exact in f32 (and in f64), so the conversion is exact.
            assert_eq!(want as f32 as f64, want, "code {c:#04x}: not exact");
            assert_eq!(got.to_bits(), (want as f32).to_bits(), "code {c:#04x}");
        }
    }
    // Spot values, written by hand from the format.
    let t = |c: usize| E4M3_TO_F32[c];
    assert_eq!(t(0x00).to_bits(), 0);
    assert_eq!(t(0x80).to_bits(), 0x8000_0000, "-0.0");
    assert_eq!(t(0x7F).to_bits(), 0x7FC0_0000);
    assert_eq!(t(0xFF).to_bits(), 0xFFC0_0000);
    assert_eq!(E4M3_TO_F32.iter().filter(|v| v.is_nan()).count(), 2);
    assert_eq!(t(0x7E), 448.0);
    assert_eq!(t(0xFE), -448.0);
    assert_eq!(t(0x38), 1.0);
    assert_eq!(t(0xB8), -1.0);
    assert_eq!(t(0x01), 1.0 / 512.0, "smallest subnormal 2^-9");
    assert_eq!(t(0x07), 7.0 / 512.0, "largest subnormal");
    assert_eq!(t(0x87), -7.0 / 512.0);
    assert_eq!(t(0x08), 1.0 / 64.0, "smallest normal 2^-6");
    assert_eq!(t(0x3F), 1.875);
    let finite_max = E4M3_TO_F32
        .iter()
        .filter(|v| !v.is_nan())
        .fold(0f32, |a, v| a.max(v.abs()));
    assert_eq!(finite_max, 448.0);
    // Non-negative codes are ordered like their values.
    for c in 1..0x7F {
        assert!(t(c) > t(c - 1), "code {c:#04x}");
        assert_eq!(t(c | 0x80), -t(c), "code {c:#04x}");
    }
}

#[test]
fn four_bit_tables_match_bitsandbytes() {
    assert_eq!(bits(&NF4_TABLE), bits(&nf4_reference()));
    assert_eq!(bits(&FP4_TABLE), bits(&fp4_reference()));
    // The NF4 map: ascending from -1 to 1 with an exact zero at code 7.
    assert_eq!(
        (NF4_TABLE[0], NF4_TABLE[7].to_bits(), NF4_TABLE[15]),
        (-1.0, 0, 1.0)
    );
    assert!(NF4_TABLE.windows(2).all(|p| p[0] < p[1]));
    // FP4: code 8 is +0.0 (not -0.0); codes 9..16 negate codes 1..8.
    assert_eq!(FP4_TABLE[8].to_bits(), 0);
    for c in 1..8 {
        assert_eq!(FP4_TABLE[c + 8], -FP4_TABLE[c], "code {c}");
    }
    assert_eq!(FP4_TABLE[3], 1.0);
    assert_eq!(
        <BlockNf4 as Code4>::TABLE.map(f32::to_bits),
        NF4_TABLE.map(f32::to_bits)
    );
    assert_eq!(
        <BlockFp4 as Code4>::TABLE.map(f32::to_bits),
        FP4_TABLE.map(f32::to_bits)
    );
}

/// A scale: ordinary values most of the time, else any finite f32 (either sign, from
/// subnormal to near f32::MAX), or a signed zero.
fn random_scale(rng: &mut Rng) -> f32 {
    match rng.next_u64() % 8 {
        0 => loop {
            let v = f32::from_bits(rng.next_u64() as u32);
            if v.is_finite() {
                break v;
            }
        },
        1 => [0.0, -0.0, 1e-45, -3e-39, 1e-30, -2e30, 3e38, -1.0][(rng.next_u64() % 8) as usize],
        _ => rng.gauss() * 1e-2,
    }
}

/// Random FP8 blocks; blocks 0 and 1 (where present) hold codes 0..128 and 128..256, so every
/// code occurs. `nan`: whether the two NaN codes may occur (otherwise they become ±448).
fn random_f8(rng: &mut Rng, nb: usize, nan: bool) -> Vec<BlockF8> {
    (0..nb)
        .map(|b| {
            let mut qs = [0u8; QK_F8];
            for (i, q) in qs.iter_mut().enumerate() {
                *q = if b < 2 {
                    (128 * b + i) as u8
                } else {
                    rng.next_u64() as u8
                };
                if !nan && *q & 0x7F == 0x7F {
                    *q -= 1;
                }
            }
            BlockF8 {
                d: random_scale(rng),
                qs,
            }
        })
        .collect()
}

/// Random 4-bit (scale, codes) pairs; pair 0 holds every code in both nibble positions.
fn random_b4(rng: &mut Rng, nb: usize) -> Vec<(f32, [u8; QK_B4 / 2])> {
    (0..nb)
        .map(|b| {
            let mut qs = [0u8; QK_B4 / 2];
            for (j, q) in qs.iter_mut().enumerate() {
                *q = if b == 0 {
                    // 0x00, 0x11, .., 0xFF, then 0x0F, 0x1E, .., 0xF0.
                    if j < 16 {
                        (17 * j) as u8
                    } else {
                        ((j - 16) << 4 | (31 - j)) as u8
                    }
                } else {
                    rng.next_u64() as u8
                };
            }
            (random_scale(rng), qs)
        })
        .collect()
}

fn nf4_blocks(p: &[(f32, [u8; 32])]) -> Vec<BlockNf4> {
    p.iter().map(|&(d, qs)| BlockNf4 { d, qs }).collect()
}

fn fp4_blocks(p: &[(f32, [u8; 32])]) -> Vec<BlockFp4> {
    p.iter().map(|&(d, qs)| BlockFp4 { d, qs }).collect()
}

/// `d · v` rounded once to f32 (the f64 product of two f32s is exact).
fn product(d: f32, v: f64) -> f32 {
    (d as f64 * v) as f32
}

#[test]
fn scalar_f8_dequantizer_matches_the_formula() {
    let mut rng = Rng(61);
    let blocks = random_f8(&mut rng, 40, true);
    let mut y = vec![f32::NAN; blocks.len() * QK_F8];
    dequantize_row_f8(&blocks, &mut y);
    for (b, blk) in blocks.iter().enumerate() {
        for (i, &q) in blk.qs.iter().enumerate() {
            let got = y[QK_F8 * b + i];
            let v = e4m3_reference(q);
            if v.is_nan() {
                // A finite scale keeps the code's NaN as it is.
                assert_eq!(got.to_bits(), e4m3_nan_bits(q), "block {b} weight {i}");
            } else {
                let want = product(blk.d, v);
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "block {b} weight {i}: d = {:e}, code {q:#04x}: {got:e} vs {want:e}",
                    blk.d
                );
            }
        }
    }
}

#[test]
fn scalar_four_bit_dequantizers_match_the_formula() {
    let mut rng = Rng(62);
    let parts = random_b4(&mut rng, 40);
    let mut nf = vec![f32::NAN; parts.len() * QK_B4];
    let mut fp = vec![f32::NAN; parts.len() * QK_B4];
    dequantize_row_nf4(&nf4_blocks(&parts), &mut nf);
    dequantize_row_fp4(&fp4_blocks(&parts), &mut fp);
    let (nf_ref, fp_ref) = (nf4_reference(), fp4_reference());
    for (b, (d, qs)) in parts.iter().enumerate() {
        for e in 0..QK_B4 {
            // Weight 2j: high nibble of byte j; weight 2j + 1: its low nibble.
            let byte = qs[e / 2];
            let code = if e % 2 == 0 { byte >> 4 } else { byte & 0xF } as usize;
            let (want_n, want_f) = (
                product(*d, nf_ref[code] as f64),
                product(*d, fp_ref[code] as f64),
            );
            let at = QK_B4 * b + e;
            assert_eq!(
                nf[at].to_bits(),
                want_n.to_bits(),
                "nf4 block {b} weight {e}"
            );
            assert_eq!(
                fp[at].to_bits(),
                want_f.to_bits(),
                "fp4 block {b} weight {e}"
            );
        }
    }
}

#[test]
fn four_bit_nibble_order_is_high_then_low() {
    // Byte 0 = 0x1E: weight 0 takes code 1, weight 1 code 14; every other byte is code 0.
    let mut qs = [0u8; 32];
    qs[0] = 0x1E;
    qs[5] = 0xF0; // weight 10: code 15, weight 11: code 0
    let mut y = [f32::NAN; 64];
    dequantize_row_nf4(&[BlockNf4 { d: 2.0, qs }], &mut y);
    for (e, &v) in y.iter().enumerate() {
        let code = match e {
            0 => 1,
            1 => 14,
            10 => 15,
            _ => 0,
        };
        assert_eq!(v, 2.0 * NF4_TABLE[code], "nf4 weight {e}");
    }
    dequantize_row_fp4(&[BlockFp4 { d: -4.0, qs }], &mut y);
    assert_eq!(y[0], -4.0 * FP4_TABLE[1]);
    // FP4[14] = -2/12; scaling by 4 is exact, giving FP4[2] = 8/12.
    assert_eq!(y[1], FP4_TABLE[2], "-4 · FP4[14] = 2/3");
    assert_eq!(y[10], 1.0, "-4 · FP4[15] = -4 · -1/4");
    assert_eq!(y[11].to_bits(), 0x8000_0000, "-4 · +0.0 = -0.0");
}

#[test]
#[should_panic(expected = "dequantize_row_fp4: length mismatch")]
fn four_bit_dequantize_rejects_wrong_output_length() {
    let b = [BlockFp4 {
        d: 1.0,
        qs: [0; 32],
    }];
    dequantize_row_fp4(&b, &mut [0.0; 63]);
}

#[test]
#[should_panic(expected = "dequantize_row_f8: length mismatch")]
fn f8_dequantize_rejects_wrong_output_length() {
    let b = [BlockF8 {
        d: 1.0,
        qs: [0; 128],
    }];
    dequantize_row_f8(&b, &mut [0.0; 256]);
}

#[test]
fn simd_dequantizers_equal_scalar_bitwise_for_every_code() {
    let mut rng = Rng(63);
    for nb in [1, 2, 3, 7, 16] {
        let f8 = random_f8(&mut rng, nb, true);
        let parts = random_b4(&mut rng, nb);
        let (nf, fp) = (nf4_blocks(&parts), fp4_blocks(&parts));
        let mut want8 = vec![0f32; nb * QK_F8];
        let mut want_n = vec![0f32; nb * QK_B4];
        let mut want_f = vec![0f32; nb * QK_B4];
        dequantize_row_f8(&f8, &mut want8);
        dequantize_row_nf4(&nf, &mut want_n);
        dequantize_row_fp4(&fp, &mut want_f);
        for level in supported_levels() {
            let mut got8 = vec![f32::NAN; nb * QK_F8];
            let mut got_n = vec![f32::NAN; nb * QK_B4];
            let mut got_f = vec![f32::NAN; nb * QK_B4];
            dequantize_with(level, QWeights::F8(&f8), 0, nb, &mut got8);
            dequantize_with(level, QWeights::Nf4(&nf), 0, nb, &mut got_n);
            dequantize_with(level, QWeights::Fp4(&fp), 0, nb, &mut got_f);
            assert_eq!(bits(&got8), bits(&want8), "{level:?} f8 nb={nb}");
            assert_eq!(bits(&got_n), bits(&want_n), "{level:?} nf4 nb={nb}");
            assert_eq!(bits(&got_f), bits(&want_f), "{level:?} fp4 nb={nb}");
            if nb > 2 {
                // A sub-range of blocks.
                let mut part8 = vec![f32::NAN; 2 * QK_F8];
                dequantize_with(level, QWeights::F8(&f8), 1, 3, &mut part8);
                assert_eq!(
                    bits(&part8),
                    bits(&want8[QK_F8..3 * QK_F8]),
                    "{level:?} f8 blocks 1..3"
                );
                let mut part4 = vec![f32::NAN; QK_B4];
                dequantize_with(level, QWeights::Fp4(&fp), 2, 3, &mut part4);
                assert_eq!(
                    bits(&part4),
                    bits(&want_f[2 * QK_B4..3 * QK_B4]),
                    "{level:?} fp4 block 2"
                );
            }
        }
    }
}

/// Blocks without NaN codes take the SIMD levels' fast decoding (codes read as scaled f16):
/// every other code, at scales from subnormal to where `d · 2^8` overflows (the exact
/// fallback), gives the scalar values bit for bit, through the dequantizer and the matvec.
#[test]
fn nan_free_f8_blocks_decode_exactly_at_every_scale() {
    let codes: Vec<u8> = (0u8..=255).filter(|c| c & 0x7F != 0x7F).collect();
    for d in [
        1.0f32,
        -2.5e-3,
        3.0e-39,
        1.0e-45,
        7.0e30,
        f32::MAX / 300.0,
        f32::MAX / 2.0,
        -f32::MAX,
        0.0,
    ] {
        let blocks: Vec<BlockF8> = codes
            .chunks(QK_F8)
            .map(|c| {
                let mut qs = [0u8; QK_F8];
                qs[..c.len()].copy_from_slice(c);
                BlockF8 { d, qs }
            })
            .collect();
        let n = blocks.len() * QK_F8;
        let mut want = vec![0f32; n];
        dequantize_row_f8(&blocks, &mut want);
        let x: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { 1.0 } else { 0.0 }).collect();
        for level in supported_levels() {
            let mut got = vec![f32::NAN; n];
            dequantize_with(level, QWeights::F8(&blocks), 0, blocks.len(), &mut got);
            assert_eq!(bits(&got), bits(&want), "{level:?} d = {d:e}");
        }
        // One row of all the blocks against its dequantized f32 row, at the running level.
        let w = Weights::F8(&blocks);
        let (mut a, mut b) = ([0f32; 1], [0f32; 1]);
        crate::matmul(&x, 1, n, w, 1, &mut a);
        crate::matmul(&x, 1, n, Weights::F32(&want), 1, &mut b);
        assert_eq!(a[0].to_bits(), b[0].to_bits(), "matvec d = {d:e}");
    }
}

#[test]
fn simd_f8_decoding_equals_the_table_for_every_code_and_scale_one() {
    // With d = 1 the dequantized values are the table itself: every code, both NaNs included.
    let blocks: Vec<BlockF8> = (0..2)
        .map(|b| BlockF8 {
            d: 1.0,
            qs: std::array::from_fn(|i| (128 * b + i) as u8),
        })
        .collect();
    for level in supported_levels() {
        let mut got = vec![f32::NAN; 256];
        dequantize_with(level, QWeights::F8(&blocks), 0, 2, &mut got);
        assert_eq!(bits(&got), bits(&E4M3_TO_F32), "{level:?}");
    }
}

// ---- Matmul ----

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pt {
    F8,
    Nf4,
    Fp4,
    Mxfp4,
}

const FORMATS: [Pt; 4] = [Pt::F8, Pt::Nf4, Pt::Fp4, Pt::Mxfp4];

impl Pt {
    fn block(self) -> usize {
        match self {
            Pt::F8 => QK_F8,
            Pt::Nf4 | Pt::Fp4 => QK_B4,
            Pt::Mxfp4 => QK_MX,
        }
    }
}

/// Random pre-quantized weights `[n, k]` (finite codes, ordinary scales), with their
/// dequantized f32 values.
struct OwnedP {
    pt: Pt,
    f8: Vec<BlockF8>,
    nf4: Vec<BlockNf4>,
    fp4: Vec<BlockFp4>,
    mx: Vec<BlockMxfp4>,
    deq: Vec<f32>,
}

impl OwnedP {
    fn random(rng: &mut Rng, pt: Pt, n: usize, k: usize) -> OwnedP {
        let nb = n * k / pt.block();
        let mut w = OwnedP {
            pt,
            f8: Vec::new(),
            nf4: Vec::new(),
            fp4: Vec::new(),
            mx: Vec::new(),
            deq: vec![f32::NAN; n * k],
        };
        // Scales around 2^-8 of either sign: ordinary weights, no overflow.
        let scale = |rng: &mut Rng| rng.gauss() * 4e-3;
        match pt {
            Pt::F8 => {
                w.f8 = random_f8(rng, nb, false);
                w.f8.iter_mut().for_each(|b| b.d = scale(rng));
                dequantize_row_f8(&w.f8, &mut w.deq);
            }
            Pt::Nf4 | Pt::Fp4 => {
                let mut parts = random_b4(rng, nb);
                parts.iter_mut().for_each(|p| p.0 = scale(rng));
                w.nf4 = nf4_blocks(&parts);
                w.fp4 = fp4_blocks(&parts);
                if pt == Pt::Nf4 {
                    dequantize_row_nf4(&w.nf4, &mut w.deq);
                } else {
                    dequantize_row_fp4(&w.fp4, &mut w.deq);
                }
            }
            Pt::Mxfp4 => {
                // Scales 2^-12 .. 2^-4: ordinary weights (codes up to ±6), no overflow.
                w.mx = random_mx(rng, nb, 115..=123);
                dequantize_row_mxfp4(&w.mx, &mut w.deq);
            }
        }
        w
    }

    fn view(&self) -> Weights<'_> {
        match self.pt {
            Pt::F8 => Weights::F8(&self.f8),
            Pt::Nf4 => Weights::Nf4(&self.nf4),
            Pt::Fp4 => Weights::Fp4(&self.fp4),
            Pt::Mxfp4 => Weights::Mxfp4(&self.mx),
        }
    }
}

/// Every element within `1e-6 · sqrt(k) · ‖x_i‖ · ‖w_j‖` of the f64 product (the tolerance of
/// the crate's other matmul tests: summation-order noise passes, a wrong or missing term fails).
fn assert_matches_reference(got: &[f32], x: &[f32], w: &[f32], m: usize, n: usize, k: usize) {
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        let nx: f64 = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        for j in 0..n {
            let wr = &w[j * k..(j + 1) * k];
            let r: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            let nw: f64 = wr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            let tol = 1e-6 * (k as f64).sqrt() * nx * nw;
            let g = got[i * n + j] as f64;
            assert!(
                (g - r).abs() <= tol,
                "({i}, {j}) of m={m} n={n} k={k}: {g} vs {r} (tol {tol:e})"
            );
        }
    }
}

/// One shape, one format: the scalar level and every SIMD level (serial and split over the
/// pool) equal the same level's f32 kernel on the dequantized weights bit for bit; the scalar
/// result is also checked against an f64 reference.
fn check_shape(rng: &mut Rng, m: usize, n: usize, k: usize, pt: Pt) {
    let x = rng.gauss_vec(m * k);
    let w = OwnedP::random(rng, pt, n, k);
    let tag = format!("{pt:?} m={m} n={n} k={k}");

    let mut scalar_q = vec![f32::NAN; m * n];
    scalar::matmul(&x, m, k, w.view(), n, &mut scalar_q);
    let mut scalar_f = vec![f32::NAN; m * n];
    scalar::matmul(&x, m, k, Weights::F32(&w.deq), n, &mut scalar_f);
    assert_eq!(bits(&scalar_q), bits(&scalar_f), "scalar {tag}");
    assert_matches_reference(&scalar_q, &x, &w.deq, m, n, k);

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
            assert_eq!(
                bits(&got),
                bits(&f32_level),
                "{level:?} parallel={parallel} {tag}: differs from the f32 kernel"
            );
        }
    }

    // The public entry points run the detected level.
    let mut f32_best = vec![f32::NAN; m * n];
    matmul_with(
        crate::level(),
        false,
        &x,
        m,
        k,
        Weights::F32(&w.deq),
        n,
        &mut f32_best,
    );
    let (mut a, mut b) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
    matmul(&x, m, k, w.view(), n, &mut a);
    matmul_serial(&x, m, k, w.view(), n, &mut b);
    assert_eq!(bits(&a), bits(&f32_best), "matmul {tag}");
    assert_eq!(bits(&b), bits(&f32_best), "matmul_serial {tag}");
}

#[test]
fn matmul_equals_the_f32_kernel_on_dequantized_weights() {
    // m = 1..=8 runs the matvec kernels, m > 8 the GEMM; odd n leaves ragged column tiles.
    let ms: Vec<usize> = (1..=MATVEC_MAX_M).chain([9, 17, 33]).collect();
    let ns = [1, 3, 5, 7, 9, 25, 33, 65];
    let mut rng = Rng(64);
    let mut t = 0;
    for &m in &ms {
        for pt in FORMATS {
            let ks: &[usize] = match pt {
                Pt::F8 => &[128, 256, 384, 1024],
                Pt::Nf4 | Pt::Fp4 => &[64, 128, 192, 320, 1024],
                // 32 and 96: rows of one and of an odd number of blocks.
                Pt::Mxfp4 => &[32, 96, 160, 2880],
            };
            for &k in ks {
                check_shape(&mut rng, m, ns[t % ns.len()], k, pt);
                t += 1;
            }
        }
    }
}

#[test]
fn matmul_large_shapes_and_thread_counts() {
    // Several GEMM scratch chunks (k = 1024: 256 rows per chunk) and calls large enough to be
    // split over the pool; every pool size gives the serial result.
    let mut rng = Rng(65);
    let pools: Vec<rayon::ThreadPool> = [1, 3]
        .iter()
        .map(|&t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
        })
        .collect();
    for pt in FORMATS {
        for &(m, n, k) in &[(3, 701, 1024), (12, 301, 1024), (1, 517, 2048)] {
            check_shape(&mut rng, m, n, k, pt);
            let x = rng.gauss_vec(m * k);
            let w = OwnedP::random(&mut rng, pt, n, k);
            for level in supported_levels() {
                let mut serial = vec![f32::NAN; m * n];
                matmul_with(level, false, &x, m, k, w.view(), n, &mut serial);
                for pool in &pools {
                    let mut got = vec![f32::NAN; m * n];
                    pool.install(|| matmul_with(level, true, &x, m, k, w.view(), n, &mut got));
                    assert_eq!(
                        bits(&got),
                        bits(&serial),
                        "{level:?} {pt:?} m={m} n={n} k={k}: {} threads",
                        pool.current_num_threads()
                    );
                }
            }
        }
    }
}

#[test]
fn f8_nan_code_poisons_only_its_output_column() {
    let (m, n, k) = (3, 5, 256);
    let mut rng = Rng(66);
    let x = rng.gauss_vec(m * k);
    let mut w = OwnedP::random(&mut rng, Pt::F8, n, k);
    // Weight row 2, element 130 (block 1 of the row) is the negative NaN code.
    w.f8[2 * (k / QK_F8) + 1].qs[2] = 0xFF;
    for m in [m, 10] {
        let x = &x[..m.min(3) * k].repeat(m.div_ceil(3))[..m * k];
        for level in supported_levels() {
            let mut got = vec![0f32; m * n];
            matmul_with(level, false, x, m, k, w.view(), n, &mut got);
            for i in 0..m {
                for j in 0..n {
                    let v = got[i * n + j];
                    assert_eq!(v.is_nan(), j == 2, "{level:?} m={m} ({i}, {j}) = {v}");
                }
            }
        }
    }
}

#[test]
fn row_to_f32_dequantizes_prequantized_rows() {
    let mut rng = Rng(67);
    let (rows, k) = (3, 256);
    for pt in FORMATS {
        let w = OwnedP::random(&mut rng, pt, rows, k);
        assert_eq!(w.view().len(), rows * k);
        assert_eq!(w.view().block_size(), pt.block());
        for row in 0..rows {
            let mut out = vec![f32::NAN; k];
            row_to_f32(w.view(), row, k, &mut out);
            assert_eq!(
                bits(&out),
                bits(&w.deq[row * k..(row + 1) * k]),
                "{pt:?} row {row}"
            );
        }
    }
}

#[test]
fn weights_len_and_block_size() {
    let f8 = [BlockF8 {
        d: 1.0,
        qs: [0; 128],
    }; 3];
    let b4 = [BlockNf4 {
        d: 1.0,
        qs: [0; 32],
    }; 5];
    assert_eq!(Weights::F8(&f8).len(), 384);
    assert_eq!(Weights::F8(&f8).block_size(), 128);
    assert_eq!(Weights::Nf4(&b4).len(), 320);
    assert_eq!(Weights::Nf4(&b4).block_size(), 64);
    assert!(Weights::Fp4(&[]).is_empty());
    assert_eq!(Weights::Fp4(&[]).block_size(), 64);
}

#[test]
#[should_panic(expected = "k = 64 is not a multiple of the weights' block size 128")]
fn matmul_rejects_k_not_a_multiple_of_the_f8_block() {
    let f8 = [BlockF8 {
        d: 1.0,
        qs: [0; 128],
    }];
    let mut out = [0f32; 2];
    matmul(&[0.0; 64], 1, 64, Weights::F8(&f8), 2, &mut out);
}

#[test]
#[should_panic(expected = "k = 96 is not a multiple of the weights' block size 64")]
fn matmul_rejects_k_not_a_multiple_of_the_four_bit_block() {
    let b4 = [BlockFp4 {
        d: 1.0,
        qs: [0; 32],
    }; 3];
    let mut out = [0f32; 2];
    matmul(&[0.0; 96], 1, 96, Weights::Fp4(&b4), 2, &mut out);
}

// ---- No q8-activation path ----

#[test]
fn q8_activations_are_not_supported_for_prequantized_weights() {
    let f8 = [BlockF8 {
        d: 1.0,
        qs: [0; 128],
    }];
    let nf = [BlockNf4 {
        d: 1.0,
        qs: [0; 32],
    }];
    let fp = [BlockFp4 {
        d: 1.0,
        qs: [0; 32],
    }];
    assert!(!q8_activations_supported(&Weights::F8(&f8)));
    assert!(!q8_activations_supported(&Weights::Nf4(&nf)));
    assert!(!q8_activations_supported(&Weights::Fp4(&fp)));
    // The supported ones still are (the check is not simply false).
    assert!(q8_activations_supported(&Weights::Q8_0(&[])));
}

#[test]
#[should_panic(expected = "matmul_q8: unsupported weights (F8)")]
fn matmul_q8_refuses_f8_weights() {
    let xq = Q8Activations::new(&[0.5; 128], 1, 128);
    let f8 = [BlockF8 {
        d: 1.0,
        qs: [0; 128],
    }];
    matmul_q8(&xq, Weights::F8(&f8), 1, &mut [0.0]);
}

#[test]
#[should_panic(expected = "matmul_q8: unsupported weights (Nf4)")]
fn matmul_q8_par_refuses_nf4_weights() {
    let xq = Q8Activations::new(&[0.5; 64], 1, 64);
    let nf = [BlockNf4 {
        d: 1.0,
        qs: [0; 32],
    }];
    matmul_q8_par(&xq, Weights::Nf4(&nf), 1, &mut [0.0]);
}

#[test]
#[should_panic(expected = "matmul_q8: unsupported weights (Fp4)")]
fn matmul_q8_refuses_fp4_weights() {
    let xq = Q8Activations::new(&[0.5; 64], 1, 64);
    let fp = [BlockFp4 {
        d: 1.0,
        qs: [0; 32],
    }];
    matmul_q8(&xq, Weights::Fp4(&fp), 1, &mut [0.0]);
}

// ---- MXFP4 ----

/// Random MXFP4 blocks with scale bytes drawn from `scales`; block 0 holds every code in both
/// nibble positions (bytes 0x01, 0x23, .., 0xEF, then 0x10, 0x32, .., 0xFE).
fn random_mx(rng: &mut Rng, nb: usize, scales: std::ops::RangeInclusive<u8>) -> Vec<BlockMxfp4> {
    let span = (*scales.end() - *scales.start()) as u64 + 1;
    (0..nb)
        .map(|b| BlockMxfp4 {
            e: *scales.start() + (rng.next_u64() % span) as u8,
            qs: std::array::from_fn(|j| {
                if b == 0 {
                    let (lo, hi) = ((2 * j) % 16, (2 * j + 1) % 16);
                    if j < 8 {
                        (hi << 4 | lo) as u8
                    } else {
                        (lo << 4 | hi) as u8
                    }
                } else {
                    rng.next_u64() as u8
                }
            }),
        })
        .collect()
}

/// The E2M1 value of `code` from the format's definition (sign bit 3, exponent bits 2..1 with
/// bias 1, mantissa bit 0; exponent 0 is subnormal: `m/2`), in f64.
fn e2m1_reference(code: u8) -> f64 {
    let sign = if code & 8 != 0 { -1.0 } else { 1.0 };
    let e = ((code >> 1) & 3) as i32;
    let m = (code & 1) as f64;
    if e == 0 {
        sign * m / 2.0
    } else {
        sign * (1.0 + m / 2.0) * 2f64.powi(e - 1)
    }
}

#[test]
fn mxfp4_tables_match_the_format_definition() {
    for c in 0..16u8 {
        let want = e2m1_reference(c);
        assert_eq!(MXFP4_TABLE[c as usize] as f64, want, "code {c}");
        assert_eq!(
            MXFP4_TABLE[c as usize].is_sign_negative(),
            c & 8 != 0,
            "code {c}: sign (code 8 is -0.0)"
        );
    }
    for e in 0..=254u8 {
        let want = 2f64.powi(e as i32 - 127);
        assert_eq!(e8m0_to_f32(e) as f64, want, "scale byte {e}");
    }
    assert_eq!(e8m0_to_f32(0).to_bits(), 0x0040_0000, "2^-127 is subnormal");
    assert_eq!(e8m0_to_f32(127), 1.0);
    assert_eq!(e8m0_to_f32(255).to_bits(), 0x7FC0_0000, "255 is NaN");
}

#[test]
fn mxfp4_dequantizes_hand_computed_values() {
    // Block 0, scale byte 128 (2^1): byte 0 = 0x7A: weight 0 is code 0xA (-1) -> -2, weight 1
    // code 7 (6) -> 12; byte 1 = 0x81: weight 2 code 1 (0.5) -> 1, weight 3 code 8 (-0) -> -0;
    // byte 15 = 0xF3: weight 30 code 3 (1.5) -> 3, weight 31 code 0xF (-6) -> -12.
    let mut qs = [0u8; 16];
    qs[0] = 0x7A;
    qs[1] = 0x81;
    qs[15] = 0xF3;
    // Block 1, scale byte 124 (2^-3 = 0.125): byte 4 = 0x5C: weight 8 code 0xC (-2) -> -0.25,
    // weight 9 code 5 (3) -> 0.375.
    let mut qs1 = [0u8; 16];
    qs1[4] = 0x5C;
    // Block 2, scale byte 0 (2^-127): byte 0 = 0x91: weight 0 code 1 (0.5) -> 2^-128, weight 1
    // code 9 (-0.5) -> -2^-128 (f32 subnormals, bits 0x00200000).
    let mut qs2 = [0u8; 16];
    qs2[0] = 0x91;
    let blocks = [
        BlockMxfp4 { e: 128, qs },
        BlockMxfp4 { e: 124, qs: qs1 },
        BlockMxfp4 { e: 0, qs: qs2 },
    ];
    let mut want = [0f32; 96];
    want[0] = -2.0;
    want[1] = 12.0;
    want[2] = 1.0;
    want[3] = -0.0;
    want[30] = 3.0;
    want[31] = -12.0;
    want[32 + 8] = -0.25;
    want[32 + 9] = 0.375;
    want[64] = f32::from_bits(0x0020_0000);
    want[65] = f32::from_bits(0x8020_0000);
    for level in supported_levels() {
        let mut got = [f32::NAN; 96];
        dequantize_with(level, QWeights::Mxfp4(&blocks), 0, 3, &mut got);
        assert_eq!(bits(&got), bits(&want), "{level:?}");
    }
    let mut got = [f32::NAN; 96];
    dequantize_row_mxfp4(&blocks, &mut got);
    assert_eq!(bits(&got), bits(&want), "dequantize_row_mxfp4");
    // Row 1 of a [3, 32] matrix, and the sums of each row: -2 + 12 + 1 - 0 + 3 - 12 = 2,
    // -0.25 + 0.375 = 0.125 and 2^-128 - 2^-128 = 0.
    let mut row = [f32::NAN; 32];
    row_to_f32(Weights::Mxfp4(&blocks), 1, 32, &mut row);
    assert_eq!(bits(&row), bits(&want[32..64]));
    let mut out = [f32::NAN; 3];
    matmul(&[1.0; 32], 1, 32, Weights::Mxfp4(&blocks), 3, &mut out);
    assert_eq!(out, [2.0, 0.125, 0.0]);
}

#[test]
fn mxfp4_scalar_dequantizer_matches_the_formula_at_every_scale() {
    let mut rng = Rng(68);
    let blocks = random_mx(&mut rng, 300, 0..=254);
    let mut y = vec![f32::NAN; blocks.len() * QK_MX];
    dequantize_row_mxfp4(&blocks, &mut y);
    for (b, blk) in blocks.iter().enumerate() {
        let s = 2f64.powi(blk.e as i32 - 127);
        for e in 0..QK_MX {
            let byte = blk.qs[e / 2];
            let code = if e % 2 == 0 { byte & 0xF } else { byte >> 4 };
            // Exact in f64; the f32 result is exact or overflows to ±inf (e >= 254).
            let want = (s * e2m1_reference(code)) as f32;
            let got = y[b * QK_MX + e];
            assert_eq!(got.to_bits(), want.to_bits(), "block {b} weight {e}");
            if want.is_finite() {
                assert_eq!(got as f64, s * e2m1_reference(code), "not exact");
            }
        }
    }
}

#[test]
fn mxfp4_simd_dequantizers_equal_scalar_for_every_code_and_scale() {
    // Every scale byte but 255, each with every code in both nibble positions (block 0 of
    // random_mx's pattern) and random bytes.
    let mut rng = Rng(69);
    let mut blocks = Vec::new();
    for e in 0..=254u8 {
        let mut two = random_mx(&mut rng, 2, e..=e);
        blocks.append(&mut two);
    }
    for nb in [1, 2, 3, 7, blocks.len()] {
        let src = &blocks[blocks.len() - nb..];
        let mut want = vec![0f32; nb * QK_MX];
        dequantize_row_mxfp4(src, &mut want);
        for level in supported_levels() {
            let mut got = vec![f32::NAN; nb * QK_MX];
            dequantize_with(level, QWeights::Mxfp4(src), 0, nb, &mut got);
            assert_eq!(bits(&got), bits(&want), "{level:?} nb={nb}");
            if nb > 2 {
                let mut part = vec![f32::NAN; QK_MX];
                dequantize_with(level, QWeights::Mxfp4(src), 2, 3, &mut part);
                assert_eq!(
                    bits(&part),
                    bits(&want[2 * QK_MX..3 * QK_MX]),
                    "{level:?} block 2"
                );
            }
        }
    }
}

#[test]
fn mxfp4_matvec_equals_scalar_at_every_scale_and_ragged_rows() {
    // Rows of every scale byte but 255 (overflowing products included), ragged row counts:
    // each SIMD level equals its f32 kernel on the dequantized rows and the scalar level.
    let mut rng = Rng(70);
    let k = 96;
    for n in [1, 3, 5, 13, 85] {
        let nb = n * k / QK_MX;
        // Large scale bytes give ±inf weights and inf / NaN sums: the same bits at every
        // level, since each level runs its f32 kernel's operations on the same values.
        let w: Vec<BlockMxfp4> = random_mx(&mut rng, nb, 0..=254);
        let mut deq = vec![0f32; n * k];
        dequantize_row_mxfp4(&w, &mut deq);
        for m in [1, 2, 5, 8, 11] {
            let x = rng.gauss_vec(m * k);
            let mut scalar_q = vec![f32::NAN; m * n];
            scalar::matmul(&x, m, k, Weights::Mxfp4(&w), n, &mut scalar_q);
            let mut scalar_f = vec![f32::NAN; m * n];
            scalar::matmul(&x, m, k, Weights::F32(&deq), n, &mut scalar_f);
            assert_eq!(bits(&scalar_q), bits(&scalar_f), "scalar m={m} n={n}");
            for level in supported_levels() {
                let mut want = vec![f32::NAN; m * n];
                matmul_with(level, false, &x, m, k, Weights::F32(&deq), n, &mut want);
                let mut got = vec![f32::NAN; m * n];
                matmul_with(level, false, &x, m, k, Weights::Mxfp4(&w), n, &mut got);
                assert_eq!(bits(&got), bits(&want), "{level:?} m={m} n={n}");
            }
        }
    }
}

#[test]
#[should_panic(expected = "dequantize_row_mxfp4: length mismatch")]
fn mxfp4_dequantize_rejects_wrong_output_length() {
    let b = [BlockMxfp4 {
        e: 127,
        qs: [0; 16],
    }];
    dequantize_row_mxfp4(&b, &mut [0.0; 64]);
}

#[test]
#[should_panic(expected = "k = 48 is not a multiple of the weights' block size 32")]
fn matmul_rejects_k_not_a_multiple_of_the_mxfp4_block() {
    let b = [BlockMxfp4 {
        e: 127,
        qs: [0; 16],
    }; 3];
    let mut out = [0f32; 2];
    matmul(&[0.0; 48], 1, 48, Weights::Mxfp4(&b), 2, &mut out);
}

#[test]
#[should_panic(expected = "matmul_q8: unsupported weights (Mxfp4)")]
fn matmul_q8_refuses_mxfp4_weights() {
    let xq = Q8Activations::new(&[0.5; 32], 1, 32);
    let b = [BlockMxfp4 {
        e: 127,
        qs: [0; 16],
    }];
    assert!(!q8_activations_supported(&Weights::Mxfp4(&b)));
    matmul_q8(&xq, Weights::Mxfp4(&b), 1, &mut [0.0]);
}

/// Every rounding of every table: the scalar dequantizer gives `round(d · table[code])` as
/// computed here from the independent tables and the `half` crate's conversions, the SIMD
/// dequantizers the same bits at every level, and the rounding is seen (most values change).
/// Scales run from where f16 values are subnormal to where they overflow to infinity.
#[test]
fn rounded_four_bit_values_are_the_product_rounded_at_every_level() {
    let mut rng = Rng(65);
    let scales = [1e-7f32, 3.1e-5, 0.0123, -0.7, 17.25, 1.5e4, 1e5];
    for (table, reference) in [
        (Table4::Nf4, nf4_reference()),
        (Table4::Fp4, fp4_reference()),
    ] {
        for round in [Round4::Bf16, Round4::F16] {
            let mut parts = random_b4(&mut rng, scales.len());
            for (p, &s) in parts.iter_mut().zip(&scales) {
                p.0 = s;
            }
            let blocks = nf4_blocks(&parts);
            let w = Rounded4 {
                blocks: &blocks,
                table,
                round,
            };
            let mut want = Vec::new();
            let mut changed = 0;
            for &(d, qs) in &parts {
                for q in qs {
                    for code in [q >> 4, q & 0x0F] {
                        let exact = product(d, reference[code as usize] as f64);
                        let r = match round {
                            Round4::Bf16 => half::bf16::from_f32(exact).to_f32(),
                            Round4::F16 => half::f16::from_f32(exact).to_f32(),
                        };
                        changed += usize::from(r.to_bits() != exact.to_bits());
                        want.push(r);
                    }
                }
            }
            assert!(
                changed > want.len() / 2,
                "{table:?} {round:?}: {changed} changed"
            );
            let mut got = vec![f32::NAN; want.len()];
            dequantize_row_rounded4(w, &mut got);
            assert_eq!(bits(&got), bits(&want), "{table:?} {round:?} scalar");
            for level in supported_levels() {
                let mut got = vec![f32::NAN; want.len()];
                dequantize_with(level, QWeights::Rounded4(w), 0, blocks.len(), &mut got);
                assert_eq!(bits(&got), bits(&want), "{table:?} {round:?} {level:?}");
                // A sub-range of blocks.
                let mut part = vec![f32::NAN; 2 * QK_B4];
                dequantize_with(level, QWeights::Rounded4(w), 3, 5, &mut part);
                assert_eq!(bits(&part), bits(&want[3 * QK_B4..5 * QK_B4]), "{level:?}");
            }
            let mut row = vec![0f32; 2 * QK_B4];
            row_to_f32(Weights::Rounded4(w), 1, 2 * QK_B4, &mut row);
            assert_eq!(bits(&row), bits(&want[2 * QK_B4..4 * QK_B4]), "row_to_f32");
        }
    }
}

/// Matmul on rounded 4-bit weights equals the same level's f32 kernel on their values bit for
/// bit (matvec and GEMM, serial and split), and the scalar level an f64 reference.
#[test]
fn rounded_four_bit_matmul_equals_the_f32_kernel_on_its_values() {
    let mut rng = Rng(66);
    for (m, n, k) in [(1, 5, 64), (3, 7, 192), (8, 9, 320), (17, 33, 128)] {
        for (table, round) in [
            (Table4::Nf4, Round4::Bf16),
            (Table4::Fp4, Round4::F16),
            (Table4::Nf4, Round4::F16),
            (Table4::Fp4, Round4::Bf16),
        ] {
            let mut parts = random_b4(&mut rng, n * k / QK_B4);
            parts.iter_mut().for_each(|p| p.0 = rng.gauss() * 4e-3);
            let blocks = nf4_blocks(&parts);
            let w = Weights::Rounded4(Rounded4 {
                blocks: &blocks,
                table,
                round,
            });
            let mut deq = vec![0f32; n * k];
            for r in 0..n {
                row_to_f32(w, r, k, &mut deq[r * k..(r + 1) * k]);
            }
            let x = rng.gauss_vec(m * k);
            let tag = format!("{table:?} {round:?} m={m} n={n} k={k}");
            let mut got = vec![f32::NAN; m * n];
            scalar::matmul(&x, m, k, w, n, &mut got);
            let mut want = vec![f32::NAN; m * n];
            scalar::matmul(&x, m, k, Weights::F32(&deq), n, &mut want);
            assert_eq!(bits(&got), bits(&want), "scalar {tag}");
            assert_matches_reference(&got, &x, &deq, m, n, k);
            for level in supported_levels() {
                let mut f32_level = vec![f32::NAN; m * n];
                matmul_with(
                    level,
                    false,
                    &x,
                    m,
                    k,
                    Weights::F32(&deq),
                    n,
                    &mut f32_level,
                );
                for parallel in [false, true] {
                    let mut got = vec![f32::NAN; m * n];
                    matmul_with(level, parallel, &x, m, k, w, n, &mut got);
                    assert_eq!(bits(&got), bits(&f32_level), "{level:?} {parallel} {tag}");
                }
            }
        }
    }
}

/// Exact ties round to even at every level: NF4 code 15 is 1.0, so a block of it with scale
/// `1 + 2^-8` (a bf16 tie, even below) gives 1.0 and `1 + 3 · 2^-8` (odd below) gives
/// `1 + 4 · 2^-8`; for f16 the same at `2^-11`.
#[test]
fn rounded_four_bit_ties_go_to_even() {
    assert_eq!(nf4_reference()[15], 1.0);
    for (round, ulp) in [(Round4::Bf16, 2f32.powi(-7)), (Round4::F16, 2f32.powi(-10))] {
        let half_ulp = ulp / 2.0;
        let cases = [
            (1.0 + half_ulp, 1.0),
            (1.0 + 3.0 * half_ulp, 1.0 + 2.0 * ulp),
            (-(1.0 + half_ulp), -1.0),
        ];
        let blocks: Vec<BlockNf4> = cases
            .iter()
            .map(|&(d, _)| BlockNf4 { d, qs: [0xFF; 32] })
            .collect();
        let w = Rounded4 {
            blocks: &blocks,
            table: Table4::Nf4,
            round,
        };
        let want: Vec<f32> = cases
            .iter()
            .flat_map(|&(_, v)| std::iter::repeat_n(v, QK_B4))
            .collect();
        let mut got = vec![f32::NAN; want.len()];
        dequantize_row_rounded4(w, &mut got);
        assert_eq!(bits(&got), bits(&want), "{round:?} scalar");
        for level in supported_levels() {
            let mut got = vec![f32::NAN; want.len()];
            dequantize_with(level, QWeights::Rounded4(w), 0, blocks.len(), &mut got);
            assert_eq!(bits(&got), bits(&want), "{round:?} {level:?}");
        }
    }
}
