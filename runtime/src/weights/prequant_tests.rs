//! Pre-quantized weights opened from real safetensors files: every conversion (f32, lossless
//! repacking, any row range) against the slice dequantizers [`Fp8Blocks`] / [`Bnb4`], and the
//! errors a damaged or inconsistent checkpoint gets.

use super::*;
use crate::weights::{safetensors_bytes, ModelFiles};
use half::bf16;

/// A small deterministic generator (xorshift), enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Uniform in [lo, hi).
    fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Opens a one-file model holding `tensors` with `config` as its `quantization_config`.
fn open_set(
    tensors: &[(&str, Dtype, &[usize], &[u8])],
    config: Option<PrequantConfig>,
) -> (tempfile::TempDir, WeightSet) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        safetensors_bytes(tensors),
    )
    .unwrap();
    let mut ws = WeightSet::open(&ModelFiles::Dir(dir.path().to_path_buf())).unwrap();
    ws.set_prequant(config);
    (dir, ws)
}

fn to_f32(t: &TensorRef) -> Vec<f32> {
    let mut out = vec![0u8; t.numel() * 4];
    t.convert_into(Dtype::F32, &mut out).unwrap();
    out.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// FP8 codes without the two NaN codes (real checkpoints hold none).
fn fp8_codes(rng: &mut Rng, n: usize) -> Vec<u8> {
    rng.bytes(n)
        .into_iter()
        .map(|b| if b & 0x7F == 0x7F { b - 1 } else { b })
        .collect()
}

#[test]
fn fp8_ragged_grid_in_bf16_converts_exactly_over_any_row_range() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (n, k, block) = (200, 300, [128, 128]);
    let codes = fp8_codes(&mut rng, n * k);
    let grid = Fp8Blocks::grid(n, k, block);
    assert_eq!(grid, [2, 3]);
    let scales: Vec<bf16> = (0..6)
        .map(|_| bf16::from_f32(rng.f32(1e-4, 3e-2)))
        .collect();
    let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
    let (_dir, ws) = open_set(
        &[
            ("w.weight", Dtype::F8E4M3, &[n, k], &codes),
            ("w.weight_scale_inv", Dtype::Bf16, &grid, &scale_bytes),
        ],
        Some(PrequantConfig::Fp8 {
            block: Some(block),
            not_convert: vec![],
        }),
    );
    let t = ws.get("w.weight", Some(&[n, k])).unwrap();
    assert!(t.is_prequant());
    // k = 300 is not a multiple of 128: no lossless block form, f32 it is.
    assert_eq!(t.lossless_dtype(), Some(Dtype::F32));
    let s32: Vec<f32> = scales.iter().map(|s| s.to_f32()).collect();
    let reference = Fp8Blocks {
        codes: &codes,
        n,
        k,
        scales: &s32,
        block,
    };
    reference.check("w").unwrap();
    let mut want = vec![0f32; n * k];
    reference.rows_to_f32(0..n, &mut want);
    assert!(same_bits(&to_f32(&t), &want));
    assert!(same_bits(&t.to_f32_vec().unwrap(), &want));
    // A range crossing the row-block edge at 128, also as an owned copy.
    let part = t.narrow(57, 100);
    assert!(same_bits(&to_f32(&part), &want[57 * k..157 * k]));
    assert!(same_bits(
        &to_f32(&part.read_copy().unwrap()),
        &want[57 * k..157 * k]
    ));
    // Requested quantizations apply to the exact values.
    assert_eq!(t.converted_row_bytes(Dtype::Bf16), Some(k * 2));
    assert_eq!(t.converted_row_bytes(Dtype::Q8_0), None); // 300 % 32 != 0
    let mut b = vec![0u8; n * k * 2];
    t.convert_into(Dtype::Bf16, &mut b).unwrap();
    for (i, w) in want.iter().enumerate() {
        assert_eq!(
            bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]),
            bf16::from_f32(*w)
        );
    }
}

#[test]
fn fp8_whole_blocks_repack_without_loss() {
    let mut rng = Rng(7);
    let (n, k, block) = (130, 256, [128, 128]);
    let codes = fp8_codes(&mut rng, n * k);
    let grid = Fp8Blocks::grid(n, k, block);
    let scales: Vec<f32> = (0..grid[0] * grid[1])
        .map(|_| rng.f32(-0.05, 0.05))
        .collect();
    let (_dir, ws) = open_set(
        &[
            ("w.weight", Dtype::F8E4M3, &[n, k], &codes),
            ("w.weight_scale_inv", Dtype::F32, &grid, &f32_bytes(&scales)),
        ],
        Some(PrequantConfig::Fp8 {
            block: Some(block),
            not_convert: vec![],
        }),
    );
    let t = ws.get("w.weight", Some(&[n, k])).unwrap();
    assert_eq!(t.lossless_dtype(), Some(Dtype::F8B128));
    let mut want = vec![0f32; n * k];
    Fp8Blocks {
        codes: &codes,
        n,
        k,
        scales: &scales,
        block,
    }
    .rows_to_f32(0..n, &mut want);
    for (first, count) in [(0, n), (100, 30), (129, 1)] {
        let view = t.narrow(first, count);
        let packed = view.quantize(Dtype::F8B128).unwrap().unwrap();
        assert_eq!(packed.dtype, Dtype::F8B128);
        assert!(!packed.is_prequant());
        let mut row = vec![0f32; k];
        for r in 0..count {
            moe_kernels::row_to_f32(packed.weights(), r, k, &mut row);
            assert!(
                same_bits(&row, &want[(first + r) * k..][..k]),
                "row {}",
                first + r
            );
        }
    }
}

/// bitsandbytes parts of one weight: (suffix, dtype, shape, bytes).
type Parts = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

/// A bitsandbytes 4-bit weight `[n, k]` with random codes and scales and a bfloat16 quant
/// state (as bitsandbytes writes a bf16 model's), stored as bitsandbytes writes it; returns its
/// parts and the exact values.
fn bnb_weight(
    rng: &mut Rng,
    n: usize,
    k: usize,
    blocksize: usize,
    quant_map: &[f32; 16],
    double: bool,
) -> (Parts, Vec<f32>) {
    bnb_weight_as(rng, n, k, blocksize, quant_map, double, "bfloat16")
}

/// [`bnb_weight`] with the quant state's `dtype` given: the exact values are
/// `quant_map[code] · absmax` in f32 rounded to it (to nearest even), as bitsandbytes'
/// `dequantize_4bit` returns them.
fn bnb_weight_as(
    rng: &mut Rng,
    n: usize,
    k: usize,
    blocksize: usize,
    quant_map: &[f32; 16],
    double: bool,
    dtype: &str,
) -> (Parts, Vec<f32>) {
    let numel = n * k;
    let packed = rng.bytes(numel.div_ceil(2));
    let blocks = numel.div_ceil(blocksize);
    let mut parts: Parts = vec![
        (
            "".into(),
            Dtype::U8,
            vec![numel.div_ceil(2), 1],
            packed.clone(),
        ),
        (
            ".quant_map".into(),
            Dtype::F32,
            vec![16],
            f32_bytes(quant_map),
        ),
    ];
    let kind = if std::ptr::eq(quant_map, &moe_kernels::FP4_TABLE) {
        "fp4"
    } else {
        "nf4"
    };
    let mut state = serde_json::json!({
        "quant_type": kind, "blocksize": blocksize, "dtype": dtype, "shape": [n, k],
    });
    let absmax: Vec<f32> = if double {
        let nested_bs = 3;
        let codes = rng.bytes(blocks);
        let map: Vec<f32> = (0..256).map(|i| (i as f32 - 127.5) / 127.5).collect();
        let nested: Vec<f32> = (0..blocks.div_ceil(nested_bs))
            .map(|_| rng.f32(0.01, 0.2))
            .collect();
        let offset = 0.0625f32;
        state["nested_blocksize"] = nested_bs.into();
        state["nested_offset"] = offset.into();
        parts.push((".absmax".into(), Dtype::U8, vec![blocks], codes.clone()));
        parts.push((
            ".nested_quant_map".into(),
            Dtype::F32,
            vec![256],
            f32_bytes(&map),
        ));
        parts.push((
            ".nested_absmax".into(),
            Dtype::F32,
            vec![nested.len()],
            f32_bytes(&nested),
        ));
        Bnb4::nested_absmax(&codes, &map, &nested, nested_bs, offset, "w").unwrap()
    } else {
        let a: Vec<f32> = (0..blocks).map(|_| rng.f32(0.01, 2.0)).collect();
        parts.push((".absmax".into(), Dtype::F32, vec![blocks], f32_bytes(&a)));
        a
    };
    let json = state.to_string().into_bytes();
    parts.push((
        format!(".quant_state.bitsandbytes__{kind}"),
        Dtype::U8,
        vec![json.len()],
        json,
    ));
    let reference = Bnb4 {
        packed: &packed,
        numel,
        blocksize,
        quant_map,
        absmax: &absmax,
    };
    reference.check("w").unwrap();
    let mut want = vec![0f32; numel];
    reference.to_f32(0..numel, &mut want);
    for w in &mut want {
        *w = match dtype {
            "bfloat16" => bf16::from_f32(*w).to_f32(),
            "float16" => half::f16::from_f32(*w).to_f32(),
            "float32" => *w,
            other => panic!("dtype {other}"),
        };
    }
    (parts, want)
}

fn open_bnb(
    parts: &Parts,
    rename: impl Fn(&str) -> Option<String>,
) -> (tempfile::TempDir, WeightSet) {
    let named: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = parts
        .iter()
        .filter_map(|(s, d, sh, b)| {
            rename(&format!("w.weight{s}")).map(|n| (n, *d, sh.clone(), b.clone()))
        })
        .collect();
    let refs: Vec<(&str, Dtype, &[usize], &[u8])> = named
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), *d, s.as_slice(), b.as_slice()))
        .collect();
    open_set(
        &refs,
        Some(PrequantConfig::Bnb4 {
            quant_type: Code4::Nf4,
            double_quant: true,
        }),
    )
}

#[test]
fn bnb4_flat_blocks_across_rows_odd_rows_and_double_quant_convert_exactly() {
    let mut rng = Rng(42);
    for (n, k, table, double) in [
        (7, 100, &moe_kernels::NF4_TABLE, true),
        (5, 99, &moe_kernels::FP4_TABLE, false),
    ] {
        let (parts, want) = bnb_weight_as(&mut rng, n, k, 64, table, double, "float32");
        let (_dir, ws) = open_bnb(&parts, |n| Some(n.to_string()));
        let t = ws.get("w.weight", Some(&[n, k])).unwrap();
        assert!(t.is_prequant());
        assert_eq!(t.shape, [n, k]);
        // Blocks of 64 cross rows of 100 / 99: no lossless block form.
        assert_eq!(t.lossless_dtype(), Some(Dtype::F32));
        assert!(same_bits(&to_f32(&t), &want), "[{n}, {k}]");
        // Views starting on odd elements (row 1 of 99) and mid-block.
        for (first, count) in [(1, 2), (3, n - 3), (n - 1, 1)] {
            let v = t.narrow(first, count);
            assert!(
                same_bits(&to_f32(&v), &want[first * k..(first + count) * k]),
                "[{n}, {k}] rows {first}+{count}"
            );
            assert!(same_bits(
                &to_f32(&v.read_copy().unwrap()),
                &want[first * k..(first + count) * k]
            ));
        }
        // Nothing of the weight is reported unused.
        assert!(ws.unused().is_empty(), "{:?}", ws.unused());
    }
}

#[test]
fn bnb4_rows_on_whole_blocks_repack_without_loss_unless_the_table_is_foreign() {
    let mut rng = Rng(99);
    for (table, dtype) in [
        (&moe_kernels::NF4_TABLE, Dtype::Nf4),
        (&moe_kernels::FP4_TABLE, Dtype::Fp4),
    ] {
        for double in [false, true] {
            let (n, k) = (6, 192);
            let (parts, want) = bnb_weight_as(&mut rng, n, k, 128, table, double, "float32");
            let (_dir, ws) = open_bnb(&parts, |n| Some(n.to_string()));
            let t = ws.get("w.weight", Some(&[n, k])).unwrap();
            assert_eq!(t.lossless_dtype(), Some(dtype));
            for (first, count) in [(0, n), (1, 4)] {
                let packed = t.narrow(first, count).quantize(dtype).unwrap().unwrap();
                let mut row = vec![0f32; k];
                for r in 0..count {
                    moe_kernels::row_to_f32(packed.weights(), r, k, &mut row);
                    assert!(same_bits(&row, &want[(first + r) * k..][..k]));
                }
            }
        }
    }
    // A table that is neither bitsandbytes' NF4 nor FP4 is used as stored, in f32.
    let mut custom = moe_kernels::NF4_TABLE;
    custom[3] = 0.123;
    let (parts, want) = bnb_weight_as(&mut rng, 2, 64, 64, &custom, false, "float32");
    let (_dir, ws) = open_bnb(&parts, |n| Some(n.to_string()));
    let t = ws.get("w.weight", Some(&[2, 64])).unwrap();
    assert_eq!(t.lossless_dtype(), Some(Dtype::F32));
    assert!(same_bits(&to_f32(&t), &want));
}

fn err_of(r: Result<TensorRef>) -> String {
    r.map(|_| ()).unwrap_err().to_string()
}

#[test]
fn inconsistent_pre_quantized_tensors_are_named_errors() {
    let codes = vec![0x38u8; 4 * 8];
    let fp8 = |scale_shape: &[usize], block: Option<[usize; 2]>, with_scale: bool| {
        let scales = vec![0u8; scale_shape.iter().product::<usize>() * 4];
        let mut t: Vec<(&str, Dtype, &[usize], &[u8])> =
            vec![("w.weight", Dtype::F8E4M3, &[4, 8], &codes)];
        if with_scale {
            t.push(("w.weight_scale_inv", Dtype::F32, scale_shape, &scales));
        }
        let (dir, ws) = open_set(
            &t,
            Some(PrequantConfig::Fp8 {
                block,
                not_convert: vec![],
            }),
        );
        let e = err_of(ws.get("w.weight", Some(&[4, 8])));
        drop(dir);
        e
    };
    let e = fp8(&[1, 1], Some([2, 4]), false);
    assert!(
        e.contains("`w.weight`") && e.contains("w.weight_scale_inv") && e.contains("missing"),
        "{e}"
    );
    let e = fp8(&[2, 1], Some([2, 4]), true);
    assert!(e.contains("[2, 1]") && e.contains("[2, 2]"), "{e}");
    let e = fp8(&[2, 2], None, true);
    assert!(e.contains("weight_block_size"), "{e}");
    // One scale for the whole tensor needs no block size.
    let scales = f32_bytes(&[0.5]);
    let (_dir, ws) = open_set(
        &[
            ("w.weight", Dtype::F8E4M3, &[4, 8], &codes),
            ("w.weight_scale_inv", Dtype::F32, &[1], &scales),
        ],
        Some(PrequantConfig::Fp8 {
            block: None,
            not_convert: vec![],
        }),
    );
    let t = ws.get("w.weight", Some(&[4, 8])).unwrap();
    assert!(t.to_f32_vec().unwrap().iter().all(|&v| v == 0.5));
    let e = err_of(ws.get("w.weight", Some(&[8, 4])));
    assert!(e.contains("[8, 4]") && e.contains("[4, 8]"), "{e}");

    let mut rng = Rng(5);
    let (parts, _) = bnb_weight(&mut rng, 4, 64, 64, &moe_kernels::NF4_TABLE, true);
    let (_d, ws) = open_bnb(&parts, |n| (!n.contains("quant_state")).then(|| n.into()));
    let e = err_of(ws.get("w.weight", Some(&[4, 64])));
    assert!(
        e.contains("`w.weight`") && e.contains("quant_state.bitsandbytes__nf4"),
        "{e}"
    );
    let (_d, ws) = open_bnb(&parts, |n| Some(n.into()));
    let e = err_of(ws.get("w.weight", Some(&[64, 4])));
    assert!(e.contains("[64, 4]") && e.contains("[4, 64]"), "{e}");
    // Too few scales, and a nested table of the wrong size.
    let mut short = parts.clone();
    for p in &mut short {
        if p.0 == ".absmax" {
            p.2 = vec![3];
            p.3.truncate(3);
        }
    }
    let (_d, ws) = open_bnb(&short, |n| Some(n.into()));
    let e = err_of(ws.get("w.weight", None));
    assert!(
        e.contains("w.weight.absmax") && e.contains("4 blocks"),
        "{e}"
    );
    let mut bad_map = parts.clone();
    for p in &mut bad_map {
        if p.0 == ".nested_quant_map" {
            p.2 = vec![255];
            p.3.truncate(255 * 4);
        }
    }
    let (_d, ws) = open_bnb(&bad_map, |n| Some(n.into()));
    let e = err_of(ws.get("w.weight", None));
    assert!(e.contains("nested_quant_map") && e.contains("256"), "{e}");
}

/// Converting `t` to f32, as every load and cache build does, as an error line.
fn convert_err(t: &TensorRef) -> String {
    let mut out = vec![0u8; t.numel() * 4];
    t.convert_into(Dtype::F32, &mut out)
        .unwrap_err()
        .to_string()
}

#[test]
fn non_finite_or_overflowing_fp8_scales_and_nan_codes_are_refused_naming_the_tensor() {
    let mut rng = Rng(11);
    let (n, k, block) = (130, 256, [128, 128]);
    let good_codes = fp8_codes(&mut rng, n * k);
    let grid = Fp8Blocks::grid(n, k, block);
    let cfg = || {
        Some(PrequantConfig::Fp8 {
            block: Some(block),
            not_convert: vec![],
        })
    };
    // 1e37 is finite, but 448 (the largest code) times it is not.
    for (bad, what) in [
        (f32::NAN, "not finite"),
        (f32::INFINITY, "not finite"),
        (-f32::INFINITY, "not finite"),
        (1e37, "overflows f32"),
    ] {
        let mut scales: Vec<f32> = (0..grid[0] * grid[1]).map(|_| 0.01).collect();
        scales[3] = bad;
        let (_dir, ws) = open_set(
            &[
                ("w.weight", Dtype::F8E4M3, &[n, k], &good_codes),
                ("w.weight_scale_inv", Dtype::F32, &grid, &f32_bytes(&scales)),
            ],
            cfg(),
        );
        // Opening reads headers only: the scales are checked where a conversion reads them.
        let t = ws.get("w.weight", Some(&[n, k])).unwrap();
        for e in [
            convert_err(&t),
            t.quantize(Dtype::F8B128)
                .map(|_| ())
                .unwrap_err()
                .to_string(),
            t.to_f32_vec().map(|_| ()).unwrap_err().to_string(),
        ] {
            assert!(
                e.contains("`w.weight_scale_inv`") && e.contains(what) && e.contains("number 3"),
                "{bad}: {e}"
            );
        }
        // Rows that do not use the bad scale (grid row 0 holds scales 0 and 1) convert.
        let mut out = vec![0u8; 128 * k * 4];
        t.narrow(0, 128).convert_into(Dtype::F32, &mut out).unwrap();
    }
    // The two NaN codes of E4M3, anywhere in the weight.
    let scales = f32_bytes(&vec![0.01f32; grid[0] * grid[1]]);
    for (at, code) in [(0usize, 0x7Fu8), (129 * k + 255, 0xFF)] {
        let mut codes = good_codes.clone();
        codes[at] = code;
        let (_dir, ws) = open_set(
            &[
                ("w.weight", Dtype::F8E4M3, &[n, k], &codes),
                ("w.weight_scale_inv", Dtype::F32, &grid, &scales),
            ],
            cfg(),
        );
        let t = ws.get("w.weight", Some(&[n, k])).unwrap();
        let want = format!("row {}, column {}", at / k, at % k);
        for e in [
            convert_err(&t),
            t.quantize(Dtype::F8B128)
                .map(|_| ())
                .unwrap_err()
                .to_string(),
            t.narrow(at / k, 1)
                .quantize(Dtype::Q8_0)
                .map(|_| ())
                .unwrap_err()
                .to_string(),
        ] {
            assert!(
                e.contains("`w.weight`") && e.contains("is NaN") && e.contains(&want),
                "{code:#x}: {e}"
            );
        }
    }
}

#[test]
fn non_finite_bitsandbytes_scales_and_tables_are_refused_naming_the_tensor() {
    let set_f32 = |parts: &Parts, suffix: &str, i: usize, v: f32| -> Parts {
        let mut p = parts.clone();
        for part in &mut p {
            if part.0 == suffix {
                part.3[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        p
    };
    let mut rng = Rng(13);
    // Plain absmax: checked when a conversion reads it.
    let (plain, _) = bnb_weight(&mut rng, 4, 64, 64, &moe_kernels::FP4_TABLE, false);
    for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let (_d, ws) = open_bnb(&set_f32(&plain, ".absmax", 2, v), |n| Some(n.into()));
        let t = ws.get("w.weight", Some(&[4, 64])).unwrap();
        let e = convert_err(&t);
        assert!(
            e.contains("`w.weight.absmax`") && e.contains("number 2"),
            "{v}: {e}"
        );
    }
    // Double quantization: the nested scales combine into a non-finite one.
    let (double, _) = bnb_weight(&mut rng, 4, 64, 64, &moe_kernels::NF4_TABLE, true);
    let (_d, ws) = open_bnb(&set_f32(&double, ".nested_absmax", 0, f32::NAN), |n| {
        Some(n.into())
    });
    let t = ws.get("w.weight", Some(&[4, 64])).unwrap();
    let e = convert_err(&t);
    assert!(e.contains("`w.weight.nested_absmax`"), "{e}");
    // Code tables are small and read at open.
    for (suffix, i) in [(".quant_map", 5), (".nested_quant_map", 200)] {
        let (_d, ws) = open_bnb(&set_f32(&double, suffix, i, f32::NAN), |n| Some(n.into()));
        let e = err_of(ws.get("w.weight", Some(&[4, 64])));
        assert!(
            e.contains(&format!("`w.weight{suffix}`")) && e.contains(&format!("entry {i}")),
            "{e}"
        );
    }
}

// ---- MXFP4 ----

/// FP4 E2M1 values as the OCP MX spec lists them (written out here, not taken from the
/// kernels).
const E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The exact values of MXFP4 `blocks` (`[.., k/32, 16]` bytes) with `scales` (one E8M0 byte
/// per 32 values): value `2i` of a block is the low nibble of byte `i`, scaled by
/// `2^(s - 127)` (computed with `powi`, in f64).
fn mxfp4_reference(blocks: &[u8], scales: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(blocks.len() * 2);
    for (b, &s) in blocks.chunks_exact(16).zip(scales) {
        let scale = 2f64.powi(s as i32 - 127);
        for &byte in b {
            for code in [byte & 0xF, byte >> 4] {
                out.push((E2M1[code as usize] as f64 * scale) as f32);
            }
        }
    }
    out
}

const GATE_UP: &str = "model.layers.0.mlp.experts.gate_up_proj";

/// Opens a model holding `<GATE_UP>_blocks` / `_scales` as given, with an mxfp4
/// `quantization_config` listing `not_convert`.
fn open_mx(
    blocks: (&[usize], &[u8]),
    scales: Option<(&[usize], &[u8])>,
    not_convert: &[&str],
) -> (tempfile::TempDir, WeightSet) {
    let (bn, sn) = (format!("{GATE_UP}_blocks"), format!("{GATE_UP}_scales"));
    let mut t: Vec<(&str, Dtype, &[usize], &[u8])> = vec![(&bn, Dtype::U8, blocks.0, blocks.1)];
    if let Some((shape, bytes)) = scales {
        t.push((&sn, Dtype::U8, shape, bytes));
    }
    open_set(
        &t,
        Some(PrequantConfig::Mxfp4 {
            not_convert: not_convert.iter().map(|s| s.to_string()).collect(),
        }),
    )
}

#[test]
fn mxfp4_pair_opens_as_one_weight_with_hand_computed_values() {
    // [E = 2, n = 3, k = 64]: blocks [2, 3, 2, 16], scales [2, 3, 2]; zero codes except below.
    let mut blocks = vec![0u8; 2 * 3 * 2 * 16];
    let mut scales = vec![127u8; 2 * 3 * 2];
    // Expert 1, row 2, block 1 (values 32..64 of the row): scale 2^(125 - 127) = 0.25.
    let (e, r, b) = (1, 2, 1);
    let blk = (e * 3 + r) * 2 + b;
    scales[blk] = 125;
    blocks[blk * 16] = 0x7A; // value 32: code 0xA (-1) -> -0.25; value 33: code 7 (6) -> 1.5
    blocks[blk * 16 + 15] = 0x81; // value 62: code 1 (0.5) -> 0.125; value 63: code 8 -> -0
                                  // Expert 0, row 0, block 0 at scale byte 0 (2^-127): value 1 is code 0xF (-6) -> -6·2^-127.
    scales[0] = 0;
    blocks[0] = 0xF0;
    let (_dir, ws) = open_mx((&[2, 3, 2, 16], &blocks), Some((&[2, 3, 2], &scales)), &[]);
    assert!(ws.contains(GATE_UP));
    let t = ws.compute(GATE_UP, &[2, 3, 64]).unwrap();
    assert_eq!(t.shape, [2, 3, 64]);
    assert!(t.is_prequant());
    assert_eq!(t.lossless_dtype(), Some(Dtype::Mxfp4));
    // Both stored tensors are used, nothing else is.
    assert!(ws.unused().is_empty(), "{:?}", ws.unused());
    let row = to_f32(&t.index(1).narrow(2, 1));
    let mut want = vec![0f32; 64];
    want[32] = -0.25;
    want[33] = 1.5;
    want[62] = 0.125;
    want[63] = -0.0;
    assert!(same_bits(&row, &want), "{row:?}");
    let first = to_f32(&t.index(0).narrow(0, 1));
    assert_eq!(first[0].to_bits(), 0);
    assert_eq!(
        first[1].to_bits(),
        0x8140_0000,
        "-6 · 2^-127 = -1.5 · 2^-125"
    );
    assert_eq!(first[1], -6.0 * 2f32.powi(-127));
    // The whole tensor, any view, and the repacked blocks are the reference's values.
    let all = mxfp4_reference(&blocks, &scales);
    assert!(same_bits(&t.to_f32_vec().unwrap(), &all));
    assert!(same_bits(&to_f32(&t.index(1)), &all[3 * 64..]));
    let packed = t.index(1).quantize(Dtype::Mxfp4).unwrap().unwrap();
    assert_eq!(packed.dtype, Dtype::Mxfp4);
    assert_eq!(packed.size_bytes(), 3 * 2 * 17);
    let mut r2 = vec![0f32; 64];
    moe_kernels::row_to_f32(packed.weights(), 2, 64, &mut r2);
    assert!(same_bits(&r2, &want));
}

#[test]
fn mxfp4_experts_repack_without_loss_and_convert_over_any_row_range() {
    let mut rng = Rng(77);
    let (e_count, n, k) = (3, 5, 96);
    let g = k / 32;
    let blocks = rng.bytes(e_count * n * g * 16);
    // Every usable scale byte (0 ..= 252) appears.
    let scales: Vec<u8> = (0..e_count * n * g)
        .map(|i| {
            if i < 253 {
                i as u8
            } else {
                rng.next() as u8 % 253
            }
        })
        .collect();
    let all = mxfp4_reference(&blocks, &scales);
    let (_dir, ws) = open_mx(
        (&[e_count, n, g, 16], &blocks),
        Some((&[e_count, n, g], &scales)),
        &[
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "lm_head",
        ],
    );
    let t = ws.compute(GATE_UP, &[e_count, n, k]).unwrap();
    assert!(same_bits(
        &to_f32(&t.narrow(1, 2).index(1)),
        &all[2 * n * k..]
    ));
    for e in 0..e_count {
        let w = t.index(e);
        assert_eq!(w.shape, [n, k]);
        let base = e * n * k;
        assert!(same_bits(&to_f32(&w), &all[base..base + n * k]));
        for (first, count) in [(0, n), (1, 3), (n - 1, 1)] {
            let v = w.narrow(first, count);
            let want = &all[base + first * k..base + (first + count) * k];
            assert!(
                same_bits(&to_f32(&v), want),
                "expert {e} rows {first}+{count}"
            );
            assert!(same_bits(&to_f32(&v.read_copy().unwrap()), want));
            let packed = v.quantize(Dtype::Mxfp4).unwrap().unwrap();
            assert!(!packed.is_prequant());
            let mut row = vec![0f32; k];
            for r in 0..count {
                moe_kernels::row_to_f32(packed.weights(), r, k, &mut row);
                assert!(same_bits(&row, &want[r * k..][..k]), "expert {e} row {r}");
            }
            // Requested quantizations start from the exact values.
            let mut b = vec![0u8; count * k * 2];
            v.convert_into(Dtype::Bf16, &mut b).unwrap();
            for (i, x) in want.iter().enumerate() {
                assert_eq!(
                    bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]),
                    bf16::from_f32(*x)
                );
            }
        }
    }
}

#[test]
fn inconsistent_or_damaged_mxfp4_tensors_are_refused_naming_the_tensor() {
    let blocks = vec![0x21u8; 2 * 4 * 2 * 16];
    let scales = vec![120u8; 2 * 4 * 2];
    let shape = [2, 4, 64];
    // A missing `_scales`.
    let (_d, ws) = open_mx((&[2, 4, 2, 16], &blocks), None, &[]);
    let e = err_of(ws.get(GATE_UP, Some(&shape)));
    assert!(
        e.contains(&format!("`{GATE_UP}_blocks`"))
            && e.contains(&format!("`{GATE_UP}_scales`"))
            && e.contains("missing"),
        "{e}"
    );
    // Scales whose grid disagrees with the codes'.
    let (_d, ws) = open_mx((&[2, 4, 2, 16], &blocks), Some((&[2, 2, 4], &scales)), &[]);
    let e = err_of(ws.get(GATE_UP, Some(&shape)));
    assert!(
        e.contains(&format!("`{GATE_UP}_scales`"))
            && e.contains("[2, 2, 4]")
            && e.contains("[2, 4, 2]"),
        "{e}"
    );
    // Codes whose last dimension is not 16 bytes.
    let (_d, ws) = open_mx(
        (&[2, 4, 4, 8], &blocks),
        Some((&[2, 4, 4], &blocks[..32])),
        &[],
    );
    let e = err_of(ws.get(GATE_UP, Some(&shape)));
    assert!(
        e.contains(&format!("`{GATE_UP}_blocks`")) && e.contains("k/32, 16"),
        "{e}"
    );
    // A logical shape other than the model's.
    let (_d, ws) = open_mx((&[2, 4, 2, 16], &blocks), Some((&[2, 4, 2], &scales)), &[]);
    let e = err_of(ws.get(GATE_UP, Some(&[2, 4, 96])));
    assert!(
        e.contains(GATE_UP) && e.contains("[2, 4, 96]") && e.contains("[2, 4, 64]"),
        "{e}"
    );
    // A module `modules_to_not_convert` keeps unquantized, stored as MXFP4 all the same.
    let (_d, ws) = open_mx(
        (&[2, 4, 2, 16], &blocks),
        Some((&[2, 4, 2], &scales)),
        &["model.layers.*.mlp.experts"],
    );
    let e = err_of(ws.get(GATE_UP, Some(&shape)));
    assert!(
        e.contains("modules_to_not_convert") && e.contains("model.layers.*.mlp.experts"),
        "{e}"
    );
    // Scale bytes with no finite values: 255 (NaN in the format) and 253 / 254 (2^126 and
    // 2^127 times the largest code 6 overflow f32), found where a conversion reads them.
    for (bad, what) in [
        (255u8, "255 is NaN"),
        (254, "overflows f32"),
        (253, "overflows f32"),
    ] {
        let mut s = scales.clone();
        s[4 * 2 + 3] = bad; // expert 1, row 1, block 1
        let (_d, ws) = open_mx((&[2, 4, 2, 16], &blocks), Some((&[2, 4, 2], &s)), &[]);
        let t = ws.get(GATE_UP, Some(&shape)).unwrap();
        for e in [
            convert_err(&t.index(1)),
            t.index(1)
                .quantize(Dtype::Mxfp4)
                .map(|_| ())
                .unwrap_err()
                .to_string(),
            t.to_f32_vec().map(|_| ()).unwrap_err().to_string(),
        ] {
            assert!(
                e.contains(&format!("`{GATE_UP}_scales`"))
                    && e.contains(&format!("byte {bad}"))
                    && e.contains(what),
                "{bad}: {e}"
            );
        }
        // Expert 0 does not use it.
        t.index(0).quantize(Dtype::Mxfp4).unwrap().unwrap();
    }
    // 252 is the largest usable scale: 6 · 2^125 is finite, and exact.
    let mut s = scales.clone();
    s[0] = 252;
    let mut b = blocks.clone();
    b[0] = 0x07;
    let (_d, ws) = open_mx((&[2, 4, 2, 16], &b), Some((&[2, 4, 2], &s)), &[]);
    let v = ws.get(GATE_UP, Some(&shape)).unwrap().to_f32_vec().unwrap();
    assert_eq!(v[0], 6.0 * 2f32.powi(125));
}

#[test]
fn mxfp4_config_is_read_and_planned_from_config_alone() {
    let raw = |q: &str| {
        crate::config::RawConfig::parse(
            std::path::PathBuf::from("config.json"),
            format!(r#"{{"quantization_config": {q}}}"#).as_bytes(),
        )
        .unwrap()
    };
    let gpt_oss = r#"{"modules_to_not_convert": ["model.layers.*.self_attn",
        "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}"#;
    let cfg = PrequantConfig::parse(&raw(gpt_oss)).unwrap().unwrap();
    assert_eq!(
        cfg,
        PrequantConfig::Mxfp4 {
            not_convert: vec![
                "model.layers.*.self_attn".into(),
                "model.layers.*.mlp.router".into(),
                "model.embed_tokens".into(),
                "lm_head".into()
            ]
        }
    );
    assert!(cfg.label().contains("mxfp4"));
    let e = PrequantConfig::parse(&raw(
        r#"{"quant_method": "mxfp4", "modules_to_not_convert": 3}"#,
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("modules_to_not_convert"), "{e}");
    assert!(module_matches(
        "model.layers.*.self_attn",
        "model.layers.11.self_attn.q_proj"
    ));
    assert!(module_matches("lm_head", "lm_head"));
    assert!(!module_matches(
        "model.layers.*.mlp.router",
        "model.layers.0.mlp.experts.down_proj"
    ));
    assert!(!module_matches(
        "model.embed_tokens",
        "model.layers.0.mlp.experts.down_proj"
    ));
    // Planning from config.json: expert projections take the 17-byte blocks, the rest (the
    // router, attention) stays as stored.
    let mut ws = WeightSet::virtual_set(Dtype::Bf16, "plan");
    ws.set_prequant(Some(cfg));
    let t = ws.get(GATE_UP, Some(&[32, 5760, 2880])).unwrap();
    assert_eq!(t.dtype, Dtype::Mxfp4);
    assert_eq!(t.size_bytes(), 32 * 5760 * 2880 / 32 * 17);
    let r = ws
        .get("model.layers.0.mlp.router.weight", Some(&[32, 2880]))
        .unwrap();
    assert_eq!(r.dtype, Dtype::Bf16);
    let q = ws
        .get(
            "model.layers.0.self_attn.q_proj.weight",
            Some(&[4096, 2880]),
        )
        .unwrap();
    assert_eq!(q.dtype, Dtype::Bf16);
}

#[test]
fn an_input_major_float_weight_opens_transposed_and_converts_exactly() {
    // Stored [E = 2, k = 3, rows = 5] bf16; the weight is [2, 5, 3]: row (e, j) is column j of
    // matrix e. Values are distinct bf16 numbers.
    let (e_count, k, rows) = (2usize, 3usize, 5usize);
    let stored: Vec<f32> = (0..e_count * k * rows)
        .map(|i| (i as f32 - 7.0) * 0.375)
        .collect();
    let bytes: Vec<u8> = stored
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    let (_dir, ws) = open_set(&[(GATE_UP, Dtype::Bf16, &[e_count, k, rows], &bytes)], None);
    let t = ws.transposed(GATE_UP, &[e_count, rows, k]).unwrap();
    assert_eq!(t.shape, [e_count, rows, k]);
    assert_eq!(t.lossless_dtype(), Some(Dtype::Bf16));
    let want = |e: usize, j: usize| -> Vec<f32> {
        (0..k).map(|i| stored[(e * k + i) * rows + j]).collect()
    };
    // Every expert, every row range, as f32 and as bf16 (its lossless type).
    for e in 0..e_count {
        let m = t.index(e);
        let all: Vec<f32> = (0..rows).flat_map(|j| want(e, j)).collect();
        assert!(same_bits(&to_f32(&m), &all), "expert {e}");
        for (first, count) in [(0, 1), (1, 3), (4, 1)] {
            let got = to_f32(&m.narrow(first, count));
            let w: Vec<f32> = (first..first + count).flat_map(|j| want(e, j)).collect();
            assert!(same_bits(&got, &w), "expert {e} rows {first}+{count}");
        }
        let b = m.quantize(Dtype::Bf16).unwrap().expect("converts to bf16");
        assert_eq!(b.dtype, Dtype::Bf16);
        let mut back = vec![0f32; rows * k];
        moe_kernels::row_to_f32(b.weights(), 0, rows * k, &mut back);
        assert!(same_bits(&back, &all), "expert {e} in bf16");
    }
    // Any other stored shape is refused, naming the tensor and both shapes.
    let e = ws
        .transposed(GATE_UP, &[e_count, k, rows])
        .unwrap_err()
        .to_string();
    assert!(e.contains(GATE_UP) && e.contains("[2, 5, 3]"), "{e}");
}

#[test]
fn bitsandbytes_values_are_rounded_to_the_quant_state_dtype() {
    let mut rng = Rng(21);
    let (n, k) = (4, 128);
    for (dtype, table, lossless) in [
        ("bfloat16", &moe_kernels::NF4_TABLE, Dtype::Nf4Bf16),
        ("float16", &moe_kernels::NF4_TABLE, Dtype::Nf4F16),
        ("float32", &moe_kernels::NF4_TABLE, Dtype::Nf4),
        ("bfloat16", &moe_kernels::FP4_TABLE, Dtype::Fp4Bf16),
        ("float16", &moe_kernels::FP4_TABLE, Dtype::Fp4F16),
    ] {
        // The 4-bit blocks are kept (4.5 bits per weight), marked with the rounding.
        let (parts, want) = bnb_weight_as(&mut rng, n, k, 64, table, true, dtype);
        let (_d, ws) = open_bnb(&parts, |n| Some(n.into()));
        let t = ws.get("w.weight", Some(&[n, k])).unwrap();
        assert_eq!(t.lossless_dtype(), Some(lossless), "{dtype}");
        let got = to_f32(&t);
        assert!(same_bits(&got, &want), "{dtype}");
        // The loaded form holds exactly these values.
        let held = t.quantize(lossless).unwrap().unwrap();
        let mut row = vec![0f32; k];
        for r in 0..n {
            moe_kernels::row_to_f32(held.weights(), r, k, &mut row);
            assert!(same_bits(&row, &want[r * k..][..k]), "{dtype} row {r}");
        }
        assert_eq!(held.size_bytes(), n * k / 64 * 36, "{dtype}: 4-bit blocks");
        if dtype == "bfloat16" && lossless == Dtype::Nf4Bf16 {
            // Rounding changed values (so the test sees it), each to the nearest bf16.
            let mut exact = vec![0f32; n * k];
            let (p, _) = bnb_weight_as(
                &mut Rng(21),
                n,
                k,
                64,
                &moe_kernels::NF4_TABLE,
                true,
                "float32",
            );
            let (_d2, ws2) = open_bnb(&p, |n| Some(n.into()));
            exact.copy_from_slice(&to_f32(&ws2.get("w.weight", None).unwrap()));
            let changed = exact.iter().zip(&got).filter(|(a, b)| a != b).count();
            assert!(changed > n * k / 2, "{changed} of {} values rounded", n * k);
            for (e, g) in exact.iter().zip(&got) {
                assert_eq!(*g, bf16::from_f32(*e).to_f32());
                assert!((e - g).abs() <= e.abs() * 2f32.powi(-8));
            }
        }
    }
    // A table that is neither bitsandbytes' NF4 nor FP4 has no blocks: the rounded values are
    // held exactly by the type they were rounded to.
    let mut custom = moe_kernels::NF4_TABLE;
    custom[3] = 0.123;
    for (dtype, lossless) in [("bfloat16", Dtype::Bf16), ("float16", Dtype::F16)] {
        let (parts, want) = bnb_weight_as(&mut rng, 2, 64, 64, &custom, false, dtype);
        let (_d, ws) = open_bnb(&parts, |n| Some(n.into()));
        let t = ws.get("w.weight", Some(&[2, 64])).unwrap();
        assert_eq!(t.lossless_dtype(), Some(lossless), "{dtype}");
        let held = t.quantize(lossless).unwrap().unwrap();
        let mut row = vec![0f32; 64];
        for r in 0..2 {
            moe_kernels::row_to_f32(held.weights(), r, 64, &mut row);
            assert!(same_bits(&row, &want[r * 64..][..64]), "{dtype} row {r}");
        }
    }
    // A dtype bitsandbytes never writes is named.
    let (mut parts, _) = bnb_weight_as(
        &mut rng,
        2,
        64,
        64,
        &moe_kernels::NF4_TABLE,
        false,
        "float32",
    );
    for p in &mut parts {
        if p.0.contains("quant_state") {
            let mut v: serde_json::Value = serde_json::from_slice(&p.3).unwrap();
            v["dtype"] = "int8".into();
            p.3 = v.to_string().into_bytes();
            p.2 = vec![p.3.len()];
        }
    }
    let (_d, ws) = open_bnb(&parts, |n| Some(n.into()));
    let e = err_of(ws.get("w.weight", None));
    assert!(
        e.contains("quant_state.bitsandbytes__nf4") && e.contains("int8"),
        "{e}"
    );
}
