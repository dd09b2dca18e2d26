//! Pre-quantized checkpoints: FP8 E4M3 with block scales (`quant_method = "fp8"`, DeepSeek-V3
//! / Qwen3 FP8 releases), bitsandbytes 4-bit (nf4 and fp4, with or without double
//! quantization) and OCP MX FP4 (`quant_method = "mxfp4"`, gpt-oss: `<name>_blocks` U8 codes
//! `[.., n, k/32, 16]` with `<name>_scales` U8 E8M0 exponents `[.., n, k/32]`).
//! [`PrequantConfig`] reads `quantization_config` (and refuses every other method); [`open`]
//! and [`open_mxfp4`] turn a stored weight and the tensors beside it into a [`Source`], which
//! [`crate::weights::TensorRef`] carries until loading converts it: repacked into the kernels'
//! blocks ([`Source::pack_row`]) or dequantized ([`Source::row_to_f32`]).
//!
//! What must always hold: values are exact f32 (`f32(code) * f32(scale)`, one rounding at
//! most, the same as the formats' own definition), and the repacked blocks hold the same codes
//! and scales, so they dequantize to the same values bit for bit; every conversion works on any
//! range of rows (starting mid-byte for 4-bit codes), reading only the scales those rows use,
//! so large tensors convert in bounded chunks; a bitsandbytes weight's code table is the one
//! stored beside it (`quant_map`; the built-in tables only name it when equal bit for bit), and
//! its values are rounded to its quant state's `dtype` as bitsandbytes' `dequantize_4bit` does
//! (bf16 or f16, to nearest even; the lossless type is then the blocks marked with that rounding,
//! which the kernels apply after the multiply, or without whole blocks bf16 / f16, which hold
//! the rounded values exactly);
//! inconsistent shapes, grids, tables or quant states are errors naming the tensor, never a
//! panic; no conversion yields a NaN or an infinity: code tables are checked at open, and the
//! scales and codes a conversion reads are checked as it reads them (a non-finite scale, one
//! whose product with the largest code overflows f32 (for MXFP4: scale bytes 253 to 255, 255
//! being NaN in the MX spec), or an FP8 NaN code is an error naming the tensor), so opening
//! still reads headers and small tables only. A weight of more than two dimensions (MXFP4's
//! `[experts, n, k]`) is one source of `experts · n` rows of `k`: indexing its leading
//! dimension gives each expert's 2-D weight. [`Fp8Blocks`] and [`Bnb4`] are the plain slice
//! dequantizers the tests hold the rest to.
//!
//! Written here rather than taken from the `anamnesis` crate (0.7): it fixes FP8 blocks at
//! 128 x 128 whatever `weight_block_size` says, refuses bitsandbytes tensors whose last block
//! is partial, and returns whole tensors as new buffers where the cache build converts rows in
//! bounded chunks into its own memory.

use std::sync::Arc;

use crate::config::RawConfig;
use crate::error::{Error, Result};
use crate::weights::{Dtype, TensorRef, WeightSet};
use moe_kernels::e8m0_to_f32 as e8m0;

/// f32 value of every FP8 E4M3 byte (the kernels' table, checked there against the format).
pub use moe_kernels::E4M3_TO_F32 as E4M3;

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
        let bad = |reason: String| bad_tensor(what, reason);
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

/// A malformed stored tensor `name` (a file fault, not a request's).
fn bad_tensor<T>(name: &str, reason: String) -> Result<T> {
    Err(Error::BadTensor {
        name: name.to_string(),
        reason,
    })
}

impl Bnb4<'_> {
    /// Checks sizes; `what` names the tensor.
    pub fn check(&self, what: &str) -> Result<()> {
        let bad = |reason: String| bad_tensor(what, reason);
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
        let bad = |reason: String| bad_tensor(what, reason);
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

/// What `quantization_config` says about a checkpoint stored pre-quantized (the formats this
/// runtime reads; every other method is refused by [`PrequantConfig::parse`]).
#[derive(Clone, Debug, PartialEq)]
pub enum PrequantConfig {
    /// `quant_method = "fp8"`: `X.weight` in F8_E4M3 with `X.weight_scale_inv` per block.
    Fp8 {
        /// `weight_block_size` `[rows, cols]`; absent means one scale per tensor.
        block: Option<[usize; 2]>,
        /// `modules_to_not_convert`: modules kept in their stored dtype.
        not_convert: Vec<String>,
    },
    /// `quant_method = "bitsandbytes"` with `load_in_4bit`.
    Bnb4 {
        quant_type: Code4,
        double_quant: bool,
    },
    /// `quant_method = "mxfp4"`: `X_blocks` (U8, two E2M1 codes a byte) with `X_scales` (U8
    /// E8M0 exponents, one per 32 values).
    Mxfp4 {
        /// `modules_to_not_convert`: module patterns kept in their stored float dtype (`*`
        /// stands for one dotted name part, as in `model.layers.*.self_attn`).
        not_convert: Vec<String>,
    },
}

/// Whether module `module` (a dotted name) falls under `pattern` of `modules_to_not_convert`:
/// the pattern equals the module, one of its leading parts (`model.layers.0.self_attn` covers
/// `model.layers.0.self_attn.q_proj`) or a trailing one (`lm_head`, `mlp.gate`), `*` matching
/// exactly one part.
pub fn module_matches(pattern: &str, module: &str) -> bool {
    let pat: Vec<&str> = pattern.split('.').collect();
    let parts: Vec<&str> = module.split('.').collect();
    let eq = |p: &[&str], m: &[&str]| p.iter().zip(m).all(|(p, m)| *p == "*" || p == m);
    if pat.len() > parts.len() {
        return false;
    }
    (0..=parts.len() - pat.len()).any(|at| eq(&pat, &parts[at..at + pat.len()]))
}

/// The two bitsandbytes 4-bit code tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code4 {
    Nf4,
    Fp4,
}

impl Code4 {
    /// bitsandbytes' table (the one its quantizer stores as `quant_map`).
    pub fn table(self) -> &'static [f32; 16] {
        match self {
            Code4::Nf4 => &moe_kernels::NF4_TABLE,
            Code4::Fp4 => &moe_kernels::FP4_TABLE,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Code4::Nf4 => "nf4",
            Code4::Fp4 => "fp4",
        }
    }
}

/// The formats this build reads, for error messages.
const SUPPORTED: &str = "unquantized checkpoints (f32, bf16, f16), FP8 E4M3 with block scales \
    (quant_method \"fp8\"), bitsandbytes 4-bit (nf4 / fp4, with or without double \
    quantization), MXFP4 (quant_method \"mxfp4\"); or quantize here with quantization = \
    \"q8_0\" or \"q4_k\" (cached after the first start)";

impl PrequantConfig {
    /// Reads `quantization_config` (None when the checkpoint is not stored pre-quantized);
    /// a method this build cannot read is an error naming it and what is supported.
    pub fn parse(raw: &RawConfig) -> Result<Option<PrequantConfig>> {
        let Some(q) = raw.value(&["quantization_config"]) else {
            return Ok(None);
        };
        let bad = |why: String| {
            Err(Error::bad_config(
                &raw.path,
                format!("field `quantization_config`: {why}"),
            ))
        };
        let Some(q) = q.as_object() else {
            return bad("not a JSON object".into());
        };
        let method = q
            .get("quant_method")
            .and_then(|m| m.as_str())
            .unwrap_or("(no quant_method)");
        let flag = |k: &str| q.get(k).and_then(|b| b.as_bool()) == Some(true);
        let refuse = |detail: String| {
            bad(format!(
                "the weights are stored pre-quantized ({detail}), which this build does not \
                 read; supported: {SUPPORTED}"
            ))
        };
        match method {
            "fp8" => {
                if let Some(fmt) = q.get("fmt").and_then(|f| f.as_str()) {
                    if fmt != "e4m3" {
                        return refuse(format!("fp8 in format `{fmt}`"));
                    }
                }
                let block = match q.get("weight_block_size") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(v) => {
                        let b: Option<Vec<usize>> = v.as_array().and_then(|a| {
                            a.iter().map(|x| x.as_u64().map(|u| u as usize)).collect()
                        });
                        match b.as_deref() {
                            Some(&[r, c]) if r > 0 && c > 0 => Some([r, c]),
                            _ => {
                                return bad(format!(
                                    "`weight_block_size` must be two positive integers, found {v}"
                                ))
                            }
                        }
                    }
                };
                let not_convert = match not_convert(q) {
                    Some(list) => list,
                    None => return bad("`modules_to_not_convert` must be a list of strings".into()),
                };
                Ok(Some(PrequantConfig::Fp8 { block, not_convert }))
            }
            "mxfp4" => match not_convert(q) {
                Some(not_convert) => Ok(Some(PrequantConfig::Mxfp4 { not_convert })),
                None => bad("`modules_to_not_convert` must be a list of strings".into()),
            },
            "bitsandbytes" if flag("load_in_8bit") => refuse("bitsandbytes 8-bit".into()),
            "bitsandbytes" => {
                let t = q
                    .get("bnb_4bit_quant_type")
                    .and_then(|t| t.as_str())
                    .unwrap_or("fp4");
                if !flag("load_in_4bit") {
                    return refuse(format!(
                        "bitsandbytes without load_in_4bit (quant type `{t}`)"
                    ));
                }
                let quant_type = match t {
                    "nf4" => Code4::Nf4,
                    "fp4" => Code4::Fp4,
                    other => return refuse(format!("bitsandbytes 4-bit `{other}`")),
                };
                Ok(Some(PrequantConfig::Bnb4 {
                    quant_type,
                    double_quant: flag("bnb_4bit_use_double_quant"),
                }))
            }
            other => refuse(format!("`{other}`")),
        }
    }

    /// A short description for logs: `fp8 e4m3, 128x128 blocks`, `bitsandbytes nf4, double quant`.
    pub fn label(&self) -> String {
        match self {
            PrequantConfig::Mxfp4 { .. } => "mxfp4, e8m0 scales per 32".into(),
            PrequantConfig::Fp8 { block: Some(b), .. } => {
                format!("fp8 e4m3, {}x{} blocks", b[0], b[1])
            }
            PrequantConfig::Fp8 { block: None, .. } => "fp8 e4m3, one scale per tensor".into(),
            PrequantConfig::Bnb4 {
                quant_type,
                double_quant,
            } => format!(
                "bitsandbytes {}{}",
                quant_type.name(),
                if *double_quant { ", double quant" } else { "" }
            ),
        }
    }
}

/// `modules_to_not_convert` as a list of strings (empty when absent or null), or None when it
/// is something else.
fn not_convert(q: &serde_json::Map<String, serde_json::Value>) -> Option<Vec<String>> {
    match q.get("modules_to_not_convert") {
        None | Some(serde_json::Value::Null) => Some(Vec::new()),
        Some(v) => v.as_array().and_then(|a| {
            a.iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        }),
    }
}

/// A stored pre-quantized 2-D weight `[n, k]` and what turns its codes into values: the scales
/// and tables are views into the checkpoint, read only for the rows being converted.
pub struct Source {
    pub n: usize,
    pub k: usize,
    kind: Kind,
    /// The stored weight's name and file, for errors.
    name: String,
    path: Arc<std::path::PathBuf>,
}

/// Largest magnitude of an FP8 E4M3 code: a scale times it must stay finite.
const E4M3_MAX: f32 = 448.0;

/// Whether FP8 E4M3 byte `b` is one of the format's two NaN codes (0x7F, 0xFF).
pub fn is_e4m3_nan(b: u8) -> bool {
    b & 0x7F == 0x7F
}

/// The first scale of `scales` that is not finite or whose product with `largest_code` (the
/// largest code magnitude it multiplies) overflows f32, as `(index, value)`.
fn bad_scale(scales: &[f32], largest_code: f32) -> Option<(usize, f32)> {
    scales
        .iter()
        .position(|s| !(s * largest_code).is_finite())
        .map(|i| (i, scales[i]))
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Fp8 { block, .. } => {
                write!(f, "fp8 [{}, {}] in {block:?} blocks", self.n, self.k)
            }
            Kind::Bnb4 { blocksize, .. } => {
                write!(f, "bnb4 [{}, {}] in blocks of {blocksize}", self.n, self.k)
            }
            Kind::Mxfp4 { .. } => write!(f, "mxfp4 [{}, {}]", self.n, self.k),
            Kind::Transposed { dtype, rows } => write!(
                f,
                "{} [{}, {}] stored input-major in matrices of {rows} rows",
                dtype.name(),
                self.n,
                self.k
            ),
        }
    }
}

enum Kind {
    Fp8 {
        /// `[ceil(n / block[0]), ceil(k / block[1])]`, any float dtype.
        scales: TensorRef,
        block: [usize; 2],
    },
    Bnb4 {
        blocksize: usize,
        quant_map: [f32; 16],
        /// The built-in table `quant_map` equals bit for bit, if any.
        table: Option<Code4>,
        absmax: Absmax,
        /// Bytes of the code tables and the quant state in the files.
        extra_bytes: usize,
        /// The quant state's `dtype`: bitsandbytes rounds each `quant_map[code] · absmax` to it.
        round: StateDtype,
    },
    Mxfp4 {
        /// U8 E8M0 exponents, flat: `n · k / 32`, row-major like the codes.
        scales: TensorRef,
    },
    /// Float matrices stored input-major: `[E, k, rows]` holding the `[E · rows, k]` weight
    /// (gpt-oss's dequantized export, as transformers holds experts in memory). Values are as
    /// stored; loading transposes them, nothing else.
    Transposed {
        dtype: Dtype,
        /// Rows of each stored matrix (its last dimension).
        rows: usize,
    },
}

enum Absmax {
    /// One float per block.
    Plain(TensorRef),
    /// Double quantization: 8-bit codes into `map`, scaled per `nested_blocksize` codes.
    Nested {
        codes: TensorRef,
        map: Box<[f32; 256]>,
        nested: TensorRef,
        nested_blocksize: usize,
        offset: f32,
    },
}

/// The dtype a bitsandbytes quant state names (`"dtype"`): the type `dequantize_4bit` returns,
/// each value computed in f32 then rounded to it (to nearest, ties to even).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateDtype {
    F32,
    Bf16,
    F16,
}

impl StateDtype {
    /// Reads the quant state's `dtype` (`bfloat16`, `float16` or `float32`, as bitsandbytes
    /// writes `str(torch_dtype)` without `torch.`); absent means float32.
    fn parse(v: Option<&serde_json::Value>) -> std::result::Result<StateDtype, String> {
        let Some(v) = v else {
            return Ok(StateDtype::F32);
        };
        match v.as_str().map(|s| s.strip_prefix("torch.").unwrap_or(s)) {
            Some("float32") => Ok(StateDtype::F32),
            Some("bfloat16") => Ok(StateDtype::Bf16),
            Some("float16") => Ok(StateDtype::F16),
            _ => Err(format!(
                "`dtype` is {v}, expected \"bfloat16\", \"float16\" or \"float32\""
            )),
        }
    }

    /// `v` rounded to this dtype, as an f32 (exact for every value of it): the kernels'
    /// rounding ([`moe_kernels::Round4::apply`]), so conversions and compute agree bit for bit.
    #[inline]
    fn round(self, v: f32) -> f32 {
        match self {
            StateDtype::F32 => v,
            StateDtype::Bf16 => moe_kernels::Round4::Bf16.apply(v),
            StateDtype::F16 => moe_kernels::Round4::F16.apply(v),
        }
    }
}

/// The scales a row range needs, read once per conversion.
pub struct Resolved {
    /// First scale-grid row (FP8) or first block (bnb, MXFP4) held in `scales`.
    first: usize,
    scales: Vec<f32>,
    /// MXFP4: the E8M0 bytes `scales` holds the values of (empty for the other formats).
    exps: Vec<u8>,
}

/// Lossless block types of the kernels: FP8 blocks of 128 with an f32 scale, 4-bit blocks of 64.
const F8_BLOCK: usize = moe_kernels::QK_F8;
const B4_BLOCK: usize = moe_kernels::QK_B4;
const MX_BLOCK: usize = moe_kernels::QK_MX;
/// Largest magnitude of an FP4 E2M1 code: a scale times it must stay finite.
const E2M1_MAX: f32 = 6.0;

impl Source {
    /// Bytes of the tensors beside the codes (scales, code tables, quant state) in the files.
    pub fn aux_bytes(&self) -> u64 {
        let t = match &self.kind {
            Kind::Fp8 { scales, .. } | Kind::Mxfp4 { scales } => scales.size_bytes(),
            Kind::Transposed { .. } => 0,
            Kind::Bnb4 {
                absmax,
                extra_bytes,
                ..
            } => {
                extra_bytes
                    + match absmax {
                        Absmax::Plain(a) => a.size_bytes(),
                        Absmax::Nested { codes, nested, .. } => {
                            codes.size_bytes() + nested.size_bytes()
                        }
                    }
            }
        };
        t as u64
    }

    /// The bytes of the stored codes that rows `[r0, r1)` occupy.
    pub fn byte_range(&self, r0: usize, r1: usize) -> std::ops::Range<usize> {
        match self.kind {
            Kind::Fp8 { .. } => r0 * self.k..r1 * self.k,
            Kind::Bnb4 { .. } => (r0 * self.k) / 2..(r1 * self.k).div_ceil(2),
            // k is a multiple of 32 (checked at open): whole bytes per row.
            Kind::Mxfp4 { .. } => r0 * self.k / 2..r1 * self.k / 2,
            // A row is a column of its matrix: rows read the whole matrices holding them.
            Kind::Transposed { dtype, rows } => {
                let matrix = self.k * rows * dtype.bytes_for(1);
                let start = r0 / rows * matrix;
                if r1 <= r0 {
                    start..start
                } else {
                    start..((r1 - 1) / rows + 1) * matrix
                }
            }
        }
    }

    /// The type that holds this weight without any loss and the kernels compute with: the
    /// format's own blocks when rows fall on whole blocks, f32 otherwise.
    pub fn lossless(&self) -> Dtype {
        match &self.kind {
            Kind::Fp8 { block, .. } => {
                if self.k.is_multiple_of(F8_BLOCK) && block[1].is_multiple_of(F8_BLOCK) {
                    Dtype::F8B128
                } else {
                    Dtype::F32
                }
            }
            // The blocks as stored, read with the quant state's rounding; without blocks, a
            // float type that holds the rounded values exactly.
            Kind::Bnb4 {
                blocksize,
                table,
                round,
                ..
            } => match table {
                Some(t)
                    if self.k.is_multiple_of(B4_BLOCK) && blocksize.is_multiple_of(B4_BLOCK) =>
                {
                    match (t, round) {
                        (Code4::Nf4, StateDtype::F32) => Dtype::Nf4,
                        (Code4::Fp4, StateDtype::F32) => Dtype::Fp4,
                        (Code4::Nf4, StateDtype::Bf16) => Dtype::Nf4Bf16,
                        (Code4::Nf4, StateDtype::F16) => Dtype::Nf4F16,
                        (Code4::Fp4, StateDtype::Bf16) => Dtype::Fp4Bf16,
                        (Code4::Fp4, StateDtype::F16) => Dtype::Fp4F16,
                    }
                }
                _ => match round {
                    StateDtype::F32 => Dtype::F32,
                    StateDtype::Bf16 => Dtype::Bf16,
                    StateDtype::F16 => Dtype::F16,
                },
            },
            // Rows are whole blocks of 32 (checked at open).
            Kind::Mxfp4 { .. } => Dtype::Mxfp4,
            // f16 values are held exactly in f32 (no f16 conversion exists).
            Kind::Transposed { dtype, .. } => match dtype {
                Dtype::Bf16 => Dtype::Bf16,
                _ => Dtype::F32,
            },
        }
    }

    /// Refuses codes no value exists for (FP8 E4M3 NaN codes), naming the tensor; `codes` are
    /// stored bytes of this weight starting at `byte_range(base, _).start`.
    pub fn check_codes(&self, codes: &[u8], base: usize) -> Result<()> {
        if !matches!(self.kind, Kind::Fp8 { .. }) {
            return Ok(()); // 4-bit codes index a checked 16-entry table: all have values.
        }
        // Every code of every converted weight passes here, before its rows convert: chunks
        // in parallel, each scanned without an early exit (which the compiler vectorizes).
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        let Some(c) = codes
            .par_chunks(CHUNK)
            .position_first(|c| c.iter().fold(false, |nan, &b| nan | is_e4m3_nan(b)))
        else {
            return Ok(());
        };
        let i = c * CHUNK
            + codes[c * CHUNK..]
                .iter()
                .position(|&b| is_e4m3_nan(b))
                .unwrap();
        let e = self.byte_range(base, base).start + i;
        Err(Error::bad_file(
            &*self.path,
            format!(
                "tensor `{}`: FP8 E4M3 code {:#04x} at row {}, column {} is NaN; the \
                 checkpoint is damaged (re-download it)",
                self.name,
                codes[i],
                e / self.k.max(1),
                e % self.k.max(1)
            ),
        ))
    }

    /// Reads the scales rows `[r0, r1)` use; a scale that is not finite, or that overflows
    /// f32 times the largest code, is an error naming its tensor.
    pub fn resolve(&self, r0: usize, r1: usize) -> Result<Resolved> {
        let res = self.resolve_unchecked(r0, r1)?;
        let (largest, tensor, path) = match &self.kind {
            Kind::Fp8 { scales, .. } => (E4M3_MAX, &scales.name, &scales.path),
            Kind::Mxfp4 { scales } => {
                if let Some(i) = res
                    .exps
                    .iter()
                    .position(|&e| !(e8m0(e) * E2M1_MAX).is_finite())
                {
                    let e = res.exps[i];
                    let idx = res.first + i;
                    let per_row = self.k / MX_BLOCK;
                    return Err(Error::bad_file(
                        &*scales.path,
                        format!(
                            "tensor `{}`: E8M0 scale byte {e} (row {}, block {} of the weight) \
                             is not a usable scale: {}; the checkpoint is damaged (re-download it)",
                            scales.name,
                            idx / per_row,
                            idx % per_row,
                            if e == 255 {
                                "255 is NaN in the MX format".to_string()
                            } else {
                                format!(
                                    "2^{} times the largest code {E2M1_MAX} overflows f32",
                                    e as i32 - 127
                                )
                            }
                        ),
                    ));
                }
                return Ok(res);
            }
            Kind::Transposed { .. } => return Ok(res),
            Kind::Bnb4 {
                quant_map, absmax, ..
            } => {
                let t = match absmax {
                    Absmax::Plain(t) => t,
                    Absmax::Nested { nested, .. } => nested,
                };
                let largest = quant_map.iter().fold(0f32, |m, q| m.max(q.abs()));
                (largest.max(f32::MIN_POSITIVE), &t.name, &t.path)
            }
        };
        if let Some((i, v)) = bad_scale(&res.scales, largest) {
            return Err(Error::bad_file(
                &**path,
                format!(
                    "tensor `{tensor}`: scale {v} (number {} of the weight's scales) is not a \
                     usable scale: {}; the checkpoint is damaged (re-download it)",
                    res.first + i,
                    if v.is_finite() {
                        format!("times the largest code {largest} it overflows f32")
                    } else {
                        "it is not finite".to_string()
                    }
                ),
            ));
        }
        Ok(res)
    }

    fn resolve_unchecked(&self, r0: usize, r1: usize) -> Result<Resolved> {
        if r0 >= r1 {
            return Ok(Resolved {
                first: 0,
                scales: Vec::new(),
                exps: Vec::new(),
            });
        }
        match &self.kind {
            Kind::Transposed { .. } => Ok(Resolved {
                first: 0,
                scales: Vec::new(),
                exps: Vec::new(),
            }),
            Kind::Mxfp4 { scales } => {
                let per_row = self.k / MX_BLOCK;
                let b0 = r0 * per_row;
                let exps = scales
                    .narrow(b0, (r1 - r0) * per_row)
                    .read_copy()?
                    .bytes()
                    .to_vec();
                Ok(Resolved {
                    first: b0,
                    scales: exps.iter().map(|&e| e8m0(e)).collect(),
                    exps,
                })
            }
            Kind::Fp8 { scales, block } => {
                let (g0, g1) = (r0 / block[0], (r1 - 1) / block[0] + 1);
                let view = if scales.shape.len() == 2 {
                    scales.narrow(g0, g1 - g0)
                } else {
                    scales.clone()
                };
                Ok(Resolved {
                    first: g0,
                    scales: view.to_f32_vec()?,
                    exps: Vec::new(),
                })
            }
            Kind::Bnb4 {
                blocksize, absmax, ..
            } => {
                let (b0, b1) = (r0 * self.k / blocksize, (r1 * self.k).div_ceil(*blocksize));
                let scales = match absmax {
                    Absmax::Plain(t) => t.narrow(b0, b1 - b0).to_f32_vec()?,
                    Absmax::Nested {
                        codes,
                        map,
                        nested,
                        nested_blocksize,
                        offset,
                    } => {
                        let c = codes.narrow(b0, b1 - b0).read_copy()?;
                        let (n0, n1) = (b0 / nested_blocksize, (b1 - 1) / nested_blocksize + 1);
                        let nest = nested.narrow(n0, n1 - n0).to_f32_vec()?;
                        c.bytes()
                            .iter()
                            .enumerate()
                            .map(|(i, &code)| {
                                let b = b0 + i;
                                map[code as usize] * nest[b / nested_blocksize - n0] + *offset
                            })
                            .collect()
                    }
                };
                Ok(Resolved {
                    first: b0,
                    scales,
                    exps: Vec::new(),
                })
            }
        }
    }

    /// Row `r` of an FP8 weight in `block` blocks: its scales (one per column block) and its
    /// codes (`codes` starting `skip` bytes into the tensor).
    fn fp8_row<'a>(
        &self,
        block: [usize; 2],
        res: &'a Resolved,
        codes: &'a [u8],
        skip: usize,
        r: usize,
    ) -> (&'a [f32], &'a [u8]) {
        let gk = self.k.div_ceil(block[1]);
        (
            &res.scales[(r / block[0] - res.first) * gk..][..gk],
            &codes[r * self.k - skip..][..self.k],
        )
    }

    /// Row `r` (of the whole tensor) as f32 into `out` (`k` values); `codes` are the stored
    /// bytes starting at `byte_range(base, _).start`, `res` resolved for a range holding `r`.
    pub fn row_to_f32(&self, res: &Resolved, codes: &[u8], base: usize, r: usize, out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.k);
        let skip = self.byte_range(base, base).start;
        match &self.kind {
            Kind::Fp8 { block, .. } => {
                let (srow, c) = self.fp8_row(*block, res, codes, skip, r);
                for ((o, c), &s) in out.chunks_mut(block[1]).zip(c.chunks(block[1])).zip(srow) {
                    for (x, &b) in o.iter_mut().zip(c) {
                        *x = E4M3[b as usize] * s;
                    }
                }
            }
            Kind::Bnb4 {
                blocksize,
                quant_map,
                round,
                ..
            } => {
                let e0 = r * self.k;
                for (j, x) in out.iter_mut().enumerate() {
                    let e = e0 + j;
                    let byte = codes[e / 2 - skip];
                    let code = if e.is_multiple_of(2) {
                        byte >> 4
                    } else {
                        byte & 0xF
                    };
                    *x = round
                        .round(quant_map[code as usize] * res.scales[e / blocksize - res.first]);
                }
            }
            Kind::Mxfp4 { .. } => {
                let per_row = self.k / MX_BLOCK;
                let srow = &res.scales[r * per_row - res.first..][..per_row];
                let c = &codes[r * self.k / 2 - skip..][..self.k / 2];
                for ((o, c), &s) in out
                    .chunks_exact_mut(MX_BLOCK)
                    .zip(c.chunks_exact(MX_BLOCK / 2))
                    .zip(srow)
                {
                    // Value 2i is the low nibble of byte i, value 2i + 1 the high one.
                    for (x, &b) in o.chunks_exact_mut(2).zip(c) {
                        x[0] = moe_kernels::MXFP4_TABLE[(b & 0xF) as usize] * s;
                        x[1] = moe_kernels::MXFP4_TABLE[(b >> 4) as usize] * s;
                    }
                }
            }
            Kind::Transposed { dtype, rows } => {
                // Row r is column r % rows of matrix r / rows: element i at (i, r % rows).
                let eb = dtype.bytes_for(1);
                let at = (r / rows * self.k * rows + r % rows) * eb - skip;
                for (i, x) in out.iter_mut().enumerate() {
                    let b = &codes[at + i * rows * eb..][..eb];
                    *x = match dtype {
                        Dtype::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                        Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                        _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    };
                }
            }
        }
    }

    /// Row `r` repacked into the lossless block type ([`Source::lossless`], not f32): the same
    /// codes and scales, no value changes. Arguments as for [`Source::row_to_f32`].
    pub fn pack_row(&self, res: &Resolved, codes: &[u8], base: usize, r: usize, dst: &mut [u8]) {
        let skip = self.byte_range(base, base).start;
        match &self.kind {
            Kind::Fp8 { block, .. } => {
                let (srow, c) = self.fp8_row(*block, res, codes, skip, r);
                let out = F8_BLOCK + 4;
                for (b, (d, q)) in dst
                    .chunks_exact_mut(out)
                    .zip(c.chunks_exact(F8_BLOCK))
                    .enumerate()
                {
                    let s = srow[b * F8_BLOCK / block[1]];
                    d[..4].copy_from_slice(&s.to_le_bytes());
                    d[4..].copy_from_slice(q);
                }
            }
            Kind::Bnb4 { blocksize, .. } => {
                let e0 = r * self.k;
                let out = B4_BLOCK / 2 + 4;
                for (b, d) in dst.chunks_exact_mut(out).enumerate() {
                    let e = e0 + b * B4_BLOCK;
                    let s = res.scales[e / blocksize - res.first];
                    d[..4].copy_from_slice(&s.to_le_bytes());
                    d[4..].copy_from_slice(&codes[e / 2 - skip..][..B4_BLOCK / 2]);
                }
            }
            Kind::Mxfp4 { .. } => {
                // The kernels' block is the checkpoint's bytes: the scale byte, then the codes.
                let per_row = self.k / MX_BLOCK;
                let exps = &res.exps[r * per_row - res.first..][..per_row];
                let c = &codes[r * self.k / 2 - skip..][..self.k / 2];
                for ((d, q), &e) in dst
                    .chunks_exact_mut(MX_BLOCK / 2 + 1)
                    .zip(c.chunks_exact(MX_BLOCK / 2))
                    .zip(exps)
                {
                    d[0] = e;
                    d[1..].copy_from_slice(q);
                }
            }
            // Its lossless type has no blocks: conversions go through f32 (exact).
            Kind::Transposed { .. } => unreachable!("a float weight is never repacked"),
        }
    }
}

/// Opens tensor `name` (already known to be stored pre-quantized: F8_E4M3, or U8 with an
/// `.absmax` beside it) with the tensors that describe it, all checked against each other.
/// `shape` is the logical shape the model expects.
pub(crate) fn open(
    ws: &WeightSet,
    name: &str,
    shape: Option<&[usize]>,
    codes: TensorRef,
    config: Option<&PrequantConfig>,
) -> Result<TensorRef> {
    let path = (*codes.path).clone();
    let bad = |why: String| Err(Error::bad_file(&path, format!("tensor `{name}`: {why}")));
    if codes.dtype == Dtype::F8E4M3 {
        if codes.shape.len() != 2 {
            return bad(format!(
                "FP8 weights must be 2-D, found shape {:?}",
                codes.shape
            ));
        }
        let (n, k) = (codes.shape[0], codes.shape[1]);
        expect_shape(name, &path, shape, &codes.shape)?;
        let scale_name = format!("{name}_scale_inv");
        if !ws.contains(&scale_name) {
            return bad(format!(
                "stored as F8_E4M3 but `{scale_name}` (its block scales) is missing"
            ));
        }
        let scales = ws.get(&scale_name, None)?;
        if !matches!(scales.dtype, Dtype::F32 | Dtype::Bf16 | Dtype::F16) {
            return bad(format!(
                "`{scale_name}` has dtype {}, expected a float type",
                scales.dtype.name()
            ));
        }
        // The file decides what is quantized (`modules_to_not_convert` only says what the
        // writer skipped): an F8_E4M3 weight with its scales is read as one.
        let block = match config {
            Some(PrequantConfig::Fp8 { block, .. }) => *block,
            _ => None,
        };
        let block = match block {
            Some(b) => b,
            None if scales.numel() == 1 => [n.max(1), k.max(1)],
            None => {
                return bad(format!(
                    "has a {:?} scale grid but `quantization_config` gives no \
                     `weight_block_size`",
                    scales.shape
                ))
            }
        };
        let grid = Fp8Blocks::grid(n, k, block);
        let ok = if scales.shape.len() == 2 {
            scales.shape == grid
        } else {
            scales.numel() == 1 && grid == [1, 1]
        };
        if !ok {
            return bad(format!(
                "`{scale_name}` has shape {:?}; [{n}, {k}] in {block:?} blocks needs {grid:?}",
                scales.shape
            ));
        }
        let src = Source {
            n,
            k,
            kind: Kind::Fp8 { scales, block },
            name: name.to_string(),
            path: codes.path.clone(),
        };
        return Ok(codes.with_source(Arc::new(src), vec![n, k]));
    }

    // bitsandbytes 4-bit.
    let part = |suffix: &str| format!("{name}.{suffix}");
    let state_name = [
        "quant_state.bitsandbytes__nf4",
        "quant_state.bitsandbytes__fp4",
    ]
    .iter()
    .map(|s| part(s))
    .find(|n| ws.contains(n));
    let Some(state_name) = state_name else {
        return bad(format!(
            "stored as bitsandbytes 4-bit (`{}` exists) but `{}` is missing",
            part("absmax"),
            part("quant_state.bitsandbytes__nf4")
        ));
    };
    let state_bytes = ws.get(&state_name, None)?.read_copy()?;
    let state: serde_json::Value = serde_json::from_slice(state_bytes.bytes())
        .map_err(|e| Error::bad_file(&path, format!("`{state_name}` is not valid JSON: {e}")))?;
    let field_usize = |k: &str| state.get(k).and_then(|v| v.as_u64()).map(|u| u as usize);
    let Some(blocksize) = field_usize("blocksize").filter(|&b| b > 0) else {
        return bad(format!("`{state_name}` has no positive `blocksize`"));
    };
    let round = StateDtype::parse(state.get("dtype"))
        .map_err(|why| Error::bad_file(&path, format!("tensor `{name}`: `{state_name}`: {why}")))?;
    let logical: Option<Vec<usize>> = state.get("shape").and_then(|s| {
        s.as_array()?
            .iter()
            .map(|x| x.as_u64().map(|u| u as usize))
            .collect()
    });
    let Some(logical) = logical.filter(|s| s.len() == 2) else {
        return bad(format!(
            "`{state_name}` must give a 2-D `shape`, found {}",
            state.get("shape").map_or("none".into(), |s| s.to_string())
        ));
    };
    expect_shape(name, &path, shape, &logical)?;
    let (n, k) = (logical[0], logical[1]);
    let numel = n * k;
    if codes.size_bytes() != numel.div_ceil(2) {
        return bad(format!(
            "{} packed bytes for shape [{n}, {k}] (expected {})",
            codes.size_bytes(),
            numel.div_ceil(2)
        ));
    }
    let small_f32 = |suffix: &str, len: usize| -> Result<Vec<f32>> {
        let t = ws.get(&part(suffix), None)?;
        if !matches!(t.dtype, Dtype::F32 | Dtype::Bf16 | Dtype::F16) || t.numel() != len {
            return Err(Error::bad_file(
                &path,
                format!(
                    "tensor `{}`: {} {:?}, expected {len} float values",
                    part(suffix),
                    t.dtype.name(),
                    t.shape
                ),
            ));
        }
        t.read_copy()?.to_f32_vec()
    };
    // The code tables are small and read here: every value of them must be finite.
    let finite_table = |suffix: &str, t: &[f32]| -> Result<()> {
        match t.iter().position(|v| !v.is_finite()) {
            None => Ok(()),
            Some(i) => Err(Error::bad_file(
                &path,
                format!(
                    "tensor `{}`: entry {i} is {}, not a finite value; the checkpoint is \
                     damaged (re-download it)",
                    part(suffix),
                    t[i]
                ),
            )),
        }
    };
    let qm = small_f32("quant_map", 16)?;
    finite_table("quant_map", &qm)?;
    let mut quant_map = [0f32; 16];
    quant_map.copy_from_slice(&qm);
    let table = [Code4::Nf4, Code4::Fp4].into_iter().find(|c| {
        c.table()
            .iter()
            .zip(&quant_map)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    });
    let blocks = numel.div_ceil(blocksize);
    let absmax_t = ws.get(&part("absmax"), None)?;
    if absmax_t.numel() != blocks {
        return bad(format!(
            "`{}` holds {} values for {blocks} blocks of {blocksize}",
            part("absmax"),
            absmax_t.numel()
        ));
    }
    let absmax = if ws.contains(&part("nested_absmax")) {
        if absmax_t.dtype != Dtype::U8 {
            return bad(format!(
                "double-quantized, but `{}` is {} rather than U8 codes",
                part("absmax"),
                absmax_t.dtype.name()
            ));
        }
        let Some(nested_blocksize) = field_usize("nested_blocksize").filter(|&b| b > 0) else {
            return bad(format!("`{state_name}` has no positive `nested_blocksize`"));
        };
        let offset = state
            .get("nested_offset")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0) as f32;
        if !offset.is_finite() {
            return bad(format!(
                "`{state_name}` has a `nested_offset` that is not a finite f32"
            ));
        }
        let m = small_f32("nested_quant_map", 256)?;
        finite_table("nested_quant_map", &m)?;
        let mut map = Box::new([0f32; 256]);
        map.copy_from_slice(&m);
        let nested = ws.get(&part("nested_absmax"), None)?;
        if !matches!(nested.dtype, Dtype::F32 | Dtype::Bf16 | Dtype::F16)
            || nested.numel() != blocks.div_ceil(nested_blocksize)
        {
            return bad(format!(
                "`{}` is {} {:?}, expected {} float values",
                part("nested_absmax"),
                nested.dtype.name(),
                nested.shape,
                blocks.div_ceil(nested_blocksize)
            ));
        }
        Absmax::Nested {
            codes: absmax_t.flat(),
            map,
            nested: nested.flat(),
            nested_blocksize,
            offset,
        }
    } else {
        if !matches!(absmax_t.dtype, Dtype::F32 | Dtype::Bf16 | Dtype::F16) {
            return bad(format!(
                "`{}` is {}, expected a float type (or U8 codes with `{}`)",
                part("absmax"),
                absmax_t.dtype.name(),
                part("nested_absmax")
            ));
        }
        Absmax::Plain(absmax_t.flat())
    };
    let src = Source {
        name: name.to_string(),
        path: codes.path.clone(),
        n,
        k,
        kind: Kind::Bnb4 {
            blocksize,
            quant_map,
            table,
            absmax,
            extra_bytes: [
                "quant_map",
                "nested_quant_map",
                &state_name[name.len() + 1..],
            ]
            .iter()
            .filter_map(|suffix| ws.info(&part(suffix)))
            .map(|i| i.size_bytes())
            .sum(),
            round,
        },
    };
    Ok(codes.with_source(Arc::new(src), logical))
}

/// `found` against the logical shape the model expects (`shape`, when given): a mismatch is an
/// error naming the tensor and both shapes.
fn expect_shape(
    name: &str,
    path: &std::path::Path,
    shape: Option<&[usize]>,
    found: &[usize],
) -> Result<()> {
    match shape {
        Some(s) if s != found => Err(Error::ShapeMismatch {
            name: name.to_string(),
            path: path.to_path_buf(),
            expected: s.to_vec(),
            found: found.to_vec(),
        }),
        _ => Ok(()),
    }
}

/// Opens the MXFP4 weight `name` of logical shape `[.., n, k]` from `<name>_blocks` (U8
/// `[.., n, k/32, 16]`) and `<name>_scales` (U8 `[.., n, k/32]`), checked against each other and
/// against `shape` (the logical shape the model expects) when given. The result is one
/// [`TensorRef`] of the logical shape that indexes and narrows like any other weight; both
/// stored tensors count as used.
pub(crate) fn open_mxfp4(
    ws: &WeightSet,
    name: &str,
    shape: Option<&[usize]>,
    config: Option<&PrequantConfig>,
) -> Result<TensorRef> {
    let blocks_name = format!("{name}_blocks");
    let scales_name = format!("{name}_scales");
    let blocks = ws.get(&blocks_name, None)?;
    let path = (*blocks.path).clone();
    let bad = |why: String| {
        Err(Error::bad_file(
            &path,
            format!("tensor `{blocks_name}`: {why}"),
        ))
    };
    if let Some(PrequantConfig::Mxfp4 { not_convert }) = config {
        if let Some(p) = not_convert.iter().find(|p| module_matches(p, name)) {
            return bad(format!(
                "stored as MXFP4, but `quantization_config.modules_to_not_convert` lists `{p}`, \
                 which covers `{name}`; config.json and the weights disagree"
            ));
        }
    }
    let bs = blocks.shape.clone();
    if blocks.dtype != Dtype::U8 || bs.len() < 3 || bs[bs.len() - 1] != MX_BLOCK / 2 {
        return bad(format!(
            "MXFP4 codes must be U8 of shape [.., n, k/32, 16], found {} {bs:?}",
            blocks.dtype.name()
        ));
    }
    let grid = &bs[..bs.len() - 1];
    let mut logical = grid.to_vec();
    *logical.last_mut().expect("3-D or more") *= MX_BLOCK;
    expect_shape(name, &path, shape, &logical)?;
    if !ws.contains(&scales_name) {
        return bad(format!(
            "stored as MXFP4 but `{scales_name}` (its E8M0 scales) is missing"
        ));
    }
    let scales = ws.get(&scales_name, None)?;
    if scales.dtype != Dtype::U8 || scales.shape != grid {
        return Err(Error::bad_file(
            &*scales.path,
            format!(
                "tensor `{scales_name}`: {} {:?}, expected U8 {grid:?} (one E8M0 scale per 32 \
                 values of `{blocks_name}` {bs:?})",
                scales.dtype.name(),
                scales.shape
            ),
        ));
    }
    let k = logical[logical.len() - 1];
    let n = logical[..logical.len() - 1].iter().product();
    let src = Source {
        n,
        k,
        kind: Kind::Mxfp4 {
            scales: scales.flat(),
        },
        name: name.to_string(),
        path: blocks.path.clone(),
    };
    Ok(blocks.with_source(Arc::new(src), logical))
}

/// Opens float tensor `name`, stored input-major `[E, k, rows]`, as the weight of logical shape
/// `shape` = `[E, rows, k]` (out-major, as the kernels read it): loading transposes each
/// matrix, values unchanged. A stored shape other than `shape` with its last two dimensions
/// swapped is a shape error naming the tensor.
pub(crate) fn open_transposed(ws: &WeightSet, name: &str, shape: &[usize]) -> Result<TensorRef> {
    let stored = ws.get(name, None)?;
    let &[e, rows, k] = shape else {
        return Err(Error::Internal(format!(
            "a transposed weight is 3-D, `{name}` was asked as {shape:?}"
        )));
    };
    expect_shape(name, &stored.path, Some(&[e, k, rows]), &stored.shape)?;
    if !matches!(stored.dtype, Dtype::F32 | Dtype::Bf16 | Dtype::F16) {
        return Err(Error::bad_file(
            &*stored.path,
            format!(
                "tensor `{name}`: {} where a float weight (f32, bf16 or f16) is expected",
                stored.dtype.name()
            ),
        ));
    }
    let src = Source {
        n: e * rows,
        k,
        kind: Kind::Transposed {
            dtype: stored.dtype,
            rows,
        },
        name: name.to_string(),
        path: stored.path.clone(),
    };
    Ok(stored.with_source(Arc::new(src), shape.to_vec()))
}

/// The error a conversion of pre-quantized weights to another type adds, against their exact
/// values, summed over every converted value (shared by the threads converting).
#[derive(Debug, Default)]
pub struct ConversionError {
    /// f64 bits of the sum of squared errors.
    sq_err: std::sync::atomic::AtomicU64,
    /// f64 bits of the sum of squared exact values.
    sq_ref: std::sync::atomic::AtomicU64,
    /// f32 bits of the largest absolute error.
    max_abs: std::sync::atomic::AtomicU32,
    values: std::sync::atomic::AtomicU64,
}

/// What [`ConversionError`] measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ErrorSummary {
    /// sqrt(sum err² / sum exact²).
    pub rel_rms: f64,
    pub max_abs: f32,
    pub values: u64,
}

impl std::fmt::Display for ErrorSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "relative RMS error {:.3} %, max abs error {:.3e} over {} values",
            self.rel_rms * 100.0,
            self.max_abs,
            self.values
        )
    }
}

impl ConversionError {
    /// Adds one row: its exact values and what the conversion gives back.
    pub fn add(&self, exact: &[f32], got: &[f32]) {
        use std::sync::atomic::Ordering::Relaxed;
        let (mut e2, mut r2, mut mx) = (0f64, 0f64, 0f32);
        for (&a, &b) in exact.iter().zip(got) {
            let d = a - b;
            e2 += d as f64 * d as f64;
            r2 += a as f64 * a as f64;
            mx = mx.max(d.abs());
        }
        let add = |cell: &std::sync::atomic::AtomicU64, v: f64| {
            let _ = cell.fetch_update(Relaxed, Relaxed, |b| {
                Some((f64::from_bits(b) + v).to_bits())
            });
        };
        add(&self.sq_err, e2);
        add(&self.sq_ref, r2);
        // Non-negative f32s order like their bits.
        self.max_abs.fetch_max(mx.to_bits(), Relaxed);
        self.values.fetch_add(exact.len() as u64, Relaxed);
    }

    /// The totals, or None when nothing was added.
    pub fn summary(&self) -> Option<ErrorSummary> {
        use std::sync::atomic::Ordering::Relaxed;
        let values = self.values.load(Relaxed);
        (values > 0).then(|| {
            let (e2, r2) = (
                f64::from_bits(self.sq_err.load(Relaxed)),
                f64::from_bits(self.sq_ref.load(Relaxed)),
            );
            ErrorSummary {
                rel_rms: if r2 > 0.0 { (e2 / r2).sqrt() } else { 0.0 },
                max_abs: f32::from_bits(self.max_abs.load(Relaxed)),
                values,
            }
        })
    }
}

#[cfg(test)]
#[path = "prequant_tests.rs"]
mod source_tests;

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn malformed_prequant_tensors_are_tensor_errors_not_request_errors() {
        let codes = [0u8; 6];
        let scales = [1.0f32; 2];
        let fp8 = Fp8Blocks {
            codes: &codes,
            n: 2,
            k: 3,
            scales: &scales,
            block: [0, 3],
        };
        let absmax = [1.0f32];
        let bnb = Bnb4 {
            packed: &codes,
            numel: 12,
            blocksize: 4,
            quant_map: &NF4,
            absmax: &absmax,
        };
        let nested = Bnb4::nested_absmax(&codes, &NF4, &[1.0], 3, 0.0, "n.weight").unwrap_err();
        for (e, tensor) in [
            (fp8.check("f.weight").unwrap_err(), "f.weight"),
            (bnb.check("b.weight").unwrap_err(), "b.weight"),
            (nested, "n.weight"),
        ] {
            assert!(!e.is_request_error(), "{e}");
            match &e {
                Error::BadTensor { name, reason } => {
                    assert_eq!(name, tensor);
                    assert!(!reason.is_empty());
                    assert!(e.to_string().starts_with(&format!("tensor `{tensor}`: ")));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    use moe_kernels::NF4_TABLE as NF4;

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
