//! Pre-quantized checkpoint formats, dequantized exactly to f32: FP8 E4M3 with block scales
//! (`quant_method = "fp8"`, DeepSeek-V3 / Qwen3 FP8 releases) and bitsandbytes 4-bit (nf4 and
//! fp4, with or without double quantization).
//!
//! What must always hold: results are exact f32 (`f32(code) * f32(scale)`, one rounding at
//! most, the same as the formats' own definition); every function works on any range of rows
//! or elements of a tensor, so large tensors convert in bounded chunks; a bitsandbytes tensor's
//! code table is the one stored beside it (`quant_map`), never a built-in copy; bad shapes or
//! table sizes are errors naming what does not match, never a panic.
//!
//! Written here rather than taken from the `anamnesis` crate (0.7): it fixes FP8 blocks at
//! 128 x 128 whatever `weight_block_size` says, refuses bitsandbytes tensors whose last block
//! is partial, and returns whole tensors as new buffers where the cache build converts rows in
//! bounded chunks into its own memory.

use crate::error::{Error, Result};

/// f32 value of every FP8 E4M3 byte (`float8_e4m3fn`: bias 7, no infinities, `S.1111.111` NaN).
pub static E4M3: [f32; 256] = e4m3_table();

const fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut b = 0usize;
    while b < 256 {
        let sign = ((b >> 7) as u32) << 31;
        let exp = ((b >> 3) & 0xF) as u32;
        let man = (b & 7) as u32;
        let bits = if exp == 0xF && man == 7 {
            0x7FC0_0000 | sign
        } else if exp == 0 {
            // Subnormal: man / 8 * 2^-6, exactly representable in f32 as a normal number.
            if man == 0 {
                sign
            } else {
                // Normalise: the highest set bit of `man` becomes the implicit one.
                let lz = man.leading_zeros() - 29; // 0..=2 for man in 1..=7
                let e = 127 - 6 - 1 - lz; // 2^(-7 - lz)
                let m = (man << (lz + 1)) & 7;
                sign | (e << 23) | (m << 20)
            }
        } else {
            sign | ((exp + 127 - 7) << 23) | (man << 20)
        };
        t[b] = f32::from_bits(bits);
        b += 1;
    }
    t
}

/// An FP8 weight `[n, k]` with one scale per `block[0] x block[1]` block, `scales` row-major
/// over the grid `[ceil(n / block[0]), ceil(k / block[1])]` (edge blocks may be partial).
pub struct Fp8Blocks<'a> {
    pub codes: &'a [u8],
    pub n: usize,
    pub k: usize,
    pub scales: &'a [f32],
    pub block: [usize; 2],
}

impl Fp8Blocks<'_> {
    /// The scale grid's shape for this weight.
    pub fn grid(n: usize, k: usize, block: [usize; 2]) -> [usize; 2] {
        [n.div_ceil(block[0]), k.div_ceil(block[1])]
    }

    /// Checks sizes (called by constructors of real tensors; `what` names the tensor).
    pub fn check(&self, what: &str) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidRequest(format!("{what}: {why}")));
        if self.block[0] == 0 || self.block[1] == 0 {
            return bad(format!("block size {:?} has a zero side", self.block));
        }
        if self.codes.len() != self.n * self.k {
            return bad(format!(
                "{} FP8 bytes for shape [{}, {}]",
                self.codes.len(),
                self.n,
                self.k
            ));
        }
        let g = Self::grid(self.n, self.k, self.block);
        if self.scales.len() != g[0] * g[1] {
            return bad(format!(
                "{} scales, expected a [{}, {}] grid for shape [{}, {}] in {:?} blocks",
                self.scales.len(),
                g[0],
                g[1],
                self.n,
                self.k,
                self.block
            ));
        }
        Ok(())
    }

    /// Rows `rows` dequantized into `out` (`[rows.len(), k]`).
    pub fn rows_to_f32(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let [bn, bk] = self.block;
        let gk = self.k.div_ceil(bk);
        debug_assert_eq!(out.len(), rows.len() * self.k);
        for (r, o) in rows.zip(out.chunks_exact_mut(self.k)) {
            let srow = &self.scales[(r / bn) * gk..][..gk];
            let codes = &self.codes[r * self.k..][..self.k];
            for ((oc, cc), &s) in o.chunks_mut(bk).zip(codes.chunks(bk)).zip(srow) {
                for (x, &c) in oc.iter_mut().zip(cc) {
                    *x = E4M3[c as usize] * s;
                }
            }
        }
    }
}

/// A bitsandbytes 4-bit tensor: `numel` values in flat blocks of `blocksize`, two per byte
/// (element `2j` in the high nibble of byte `j`), each `quant_map[code] * absmax[block]`.
pub struct Bnb4<'a> {
    pub packed: &'a [u8],
    pub numel: usize,
    pub blocksize: usize,
    /// The 16-entry code table stored with the tensor (`quant_map`).
    pub quant_map: &'a [f32],
    /// One scale per block, already resolved (see [`Bnb4::nested_absmax`]).
    pub absmax: &'a [f32],
}

impl Bnb4<'_> {
    /// Checks sizes; `what` names the tensor.
    pub fn check(&self, what: &str) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidRequest(format!("{what}: {why}")));
        if self.blocksize == 0 {
            return bad("blocksize 0".into());
        }
        if self.packed.len() != self.numel.div_ceil(2) {
            return bad(format!(
                "{} packed bytes for {} values (expected {})",
                self.packed.len(),
                self.numel,
                self.numel.div_ceil(2)
            ));
        }
        if self.quant_map.len() != 16 {
            return bad(format!(
                "quant_map has {} entries, not 16",
                self.quant_map.len()
            ));
        }
        let blocks = self.numel.div_ceil(self.blocksize);
        if self.absmax.len() != blocks {
            return bad(format!(
                "{} absmax values for {blocks} blocks of {}",
                self.absmax.len(),
                self.blocksize
            ));
        }
        Ok(())
    }

    /// Elements `range` (of the flat tensor) dequantized into `out`.
    pub fn to_f32(&self, range: std::ops::Range<usize>, out: &mut [f32]) {
        debug_assert_eq!(out.len(), range.len());
        for (i, o) in range.zip(out.iter_mut()) {
            let byte = self.packed[i / 2];
            let code = if i % 2 == 0 { byte >> 4 } else { byte & 0xF };
            *o = self.quant_map[code as usize] * self.absmax[i / self.blocksize];
        }
    }

    /// Double quantization: the per-block scales are themselves 8-bit codes,
    /// `absmax[b] = nested_quant_map[codes[b]] * nested_absmax[b / nested_blocksize] + offset`.
    pub fn nested_absmax(
        codes: &[u8],
        nested_quant_map: &[f32],
        nested_absmax: &[f32],
        nested_blocksize: usize,
        offset: f32,
        what: &str,
    ) -> Result<Vec<f32>> {
        let bad = |why: String| Err(Error::InvalidRequest(format!("{what}: {why}")));
        if nested_quant_map.len() != 256 {
            return bad(format!(
                "nested_quant_map has {} entries, not 256",
                nested_quant_map.len()
            ));
        }
        if nested_blocksize == 0 || nested_absmax.len() != codes.len().div_ceil(nested_blocksize) {
            return bad(format!(
                "{} nested_absmax values for {} scales in blocks of {nested_blocksize}",
                nested_absmax.len(),
                codes.len()
            ));
        }
        Ok(codes
            .iter()
            .enumerate()
            .map(|(b, &c)| {
                nested_quant_map[c as usize] * nested_absmax[b / nested_blocksize] + offset
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_values() {
        let cases: [(u8, f32); 12] = [
            (0x00, 0.0),
            (0x38, 1.0),
            (0x3C, 1.5),
            (0x40, 2.0),
            (0x7E, 448.0),
            (0x08, 2f32.powi(-6)),
            (0x01, 2f32.powi(-9)),
            (0x02, 2f32.powi(-8)),
            (0x03, 3.0 * 2f32.powi(-9)),
            (0x07, 7.0 * 2f32.powi(-9)),
            (0xB8, -1.0),
            (0xFE, -448.0),
        ];
        for (b, v) in cases {
            assert_eq!(E4M3[b as usize], v, "{b:#04x}");
        }
        assert_eq!(E4M3[0x80].to_bits(), (-0.0f32).to_bits());
        assert!(E4M3[0x7F].is_nan() && E4M3[0xFF].is_nan());
        assert_eq!(E4M3.iter().filter(|v| v.is_nan()).count(), 2);
        // Every other value: (-1)^s * 2^(e-7) * (1 + m/8), or m/8 * 2^-6 when e = 0.
        for (b, &got) in E4M3.iter().enumerate() {
            let (s, e, m) = (b >> 7, (b >> 3) & 15, b & 7);
            if e == 15 && m == 7 {
                continue;
            }
            let mag = if e == 0 {
                m as f64 / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + m as f64 / 8.0) * 2f64.powi(e as i32 - 7)
            };
            let want = if s == 1 { -mag } else { mag };
            assert_eq!(got as f64, want, "{b:#04x}");
        }
    }

    #[test]
    fn fp8_blocks_scale_each_block_including_ragged_edges() {
        // [5, 7] in [2, 3] blocks: a [3, 3] grid whose last row and column are partial.
        let (n, k) = (5, 7);
        let codes: Vec<u8> = (0..n * k).map(|i| (i * 37 % 0x7E) as u8).collect();
        let grid = Fp8Blocks::grid(n, k, [2, 3]);
        assert_eq!(grid, [3, 3]);
        let scales: Vec<f32> = (0..9).map(|i| 0.5 + i as f32 * 0.25).collect();
        let w = Fp8Blocks {
            codes: &codes,
            n,
            k,
            scales: &scales,
            block: [2, 3],
        };
        w.check("w").unwrap();
        let mut all = vec![0f32; n * k];
        w.rows_to_f32(0..n, &mut all);
        for i in 0..n {
            for j in 0..k {
                let want = E4M3[codes[i * k + j] as usize] * scales[(i / 2) * 3 + j / 3];
                assert_eq!(all[i * k + j], want, "({i}, {j})");
            }
        }
        // Any row range gives the same rows.
        let mut part = vec![0f32; 2 * k];
        w.rows_to_f32(3..5, &mut part);
        assert_eq!(part, all[3 * k..]);
        // Wrong grids are named.
        let short = Fp8Blocks {
            scales: &scales[..8],
            ..w
        };
        let e = short.check("layer.weight").unwrap_err().to_string();
        assert!(
            e.contains("layer.weight") && e.contains("[3, 3] grid"),
            "{e}"
        );
    }

    /// bitsandbytes' NF4 code table (the one its quantizer stores as `quant_map`).
    const NF4: [f32; 16] = [
        -1.0,
        -0.696_192_8,
        -0.525_073_05,
        -0.394_917_5,
        -0.284_441_38,
        -0.184_773_43,
        -0.091_050_036,
        0.0,
        0.079_580_3,
        0.160_930_2,
        0.246_112_3,
        0.337_915_24,
        0.440_709_83,
        0.562_617,
        0.722_956_84,
        1.0,
    ];

    #[test]
    fn bnb4_high_nibble_first_flat_blocks_and_a_partial_tail() {
        // 11 values in blocks of 4: blocks [0..4), [4..8), [8..11).
        let packed = [0x0F, 0x7A, 0x31, 0xC5, 0x8E, 0x20];
        let absmax = [2.0, 0.5, 3.0];
        let t = Bnb4 {
            packed: &packed,
            numel: 11,
            blocksize: 4,
            quant_map: &NF4,
            absmax: &absmax,
        };
        t.check("w").unwrap();
        let codes = [0x0, 0xF, 0x7, 0xA, 0x3, 0x1, 0xC, 0x5, 0x8, 0xE, 0x2];
        let mut out = vec![0f32; 11];
        t.to_f32(0..11, &mut out);
        for (i, &c) in codes.iter().enumerate() {
            assert_eq!(out[i], NF4[c] * absmax[i / 4], "element {i}");
        }
        assert_eq!(out[0], -2.0);
        assert_eq!(out[1], 2.0);
        // A range that starts on an odd element reads the low nibble first.
        let mut mid = vec![0f32; 4];
        t.to_f32(5..9, &mut mid);
        assert_eq!(mid, out[5..9]);
        let bad = Bnb4 {
            absmax: &absmax[..2],
            ..t
        };
        assert!(bad.check("w").unwrap_err().to_string().contains("3 blocks"));
    }

    #[test]
    fn double_quantized_scales_add_the_offset() {
        let map: Vec<f32> = (0..256).map(|i| (i as f32 - 128.0) / 128.0).collect();
        let codes = [0u8, 128, 255, 64, 192];
        let nested = [0.5, 4.0];
        let got = Bnb4::nested_absmax(&codes, &map, &nested, 3, 0.25, "w").unwrap();
        let want: Vec<f32> = codes
            .iter()
            .enumerate()
            .map(|(b, &c)| map[c as usize] * nested[b / 3] + 0.25)
            .collect();
        assert_eq!(got, want);
        assert_eq!(got[1], 0.25);
        let e = Bnb4::nested_absmax(&codes, &map[..255], &nested, 3, 0.0, "x.weight")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.weight") && e.contains("255"), "{e}");
    }
}
