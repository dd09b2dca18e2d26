//! Blocks of pre-quantized checkpoints, multiplied as stored: FP8 E4M3 with one f32 scale per 128
//! weights ([`BlockF8`]) and bitsandbytes 4-bit codes with one f32 scale (bitsandbytes' absmax)
//! per 64 weights, NF4 ([`BlockNf4`]) or FP4 ([`BlockFp4`]), and OCP MX FP4 (MXFP4, as gpt-oss
//! ships its experts: FP4 E2M1 codes with one E8M0 power-of-two scale per 32 weights,
//! [`BlockMxfp4`]).
//!
//! This module owns the block types, their code tables ([`E4M3_TO_F32`], [`NF4_TABLE`],
//! [`FP4_TABLE`], [`MXFP4_TABLE`], [`e8m0_to_f32`]) and the reference (scalar) dequantizers. Their SIMD twins decode in registers
//! beside the GGML formats' (`quant_avx2::Group16`, `quant_avx512::Group32`); those decoders also
//! serve the SIMD dequantizers, and matmul runs through `quant::run_block` exactly as for
//! [`crate::quant`]'s blocks. A matrix `[n, k]` is `n` rows of `k / 128` (FP8) or `k / 64`
//! (NF4 / FP4) blocks, row-major, so `k` must be a multiple of the block size. There is no
//! quantizer: the blocks come from checkpoints, and the loader fills them.
//!
//! What must hold:
//! - Layouts: `#[repr(C)]`, the f32 scale `d` first, then the codes; sizes and alignment pinned
//!   by const asserts (132 and 36 bytes, align 4). MXFP4 keeps the checkpoint's bytes as they
//!   are: the E8M0 scale byte `e`, then the 16 code bytes of `*_blocks` (17 bytes, align 1), so
//!   the loader copies and never converts.
//! - Every weight is `d · TABLE[code]`: one f32 multiply, the only rounding. The tables are
//!   exact: E4M3 values are f32 numbers, and the NF4 / FP4 tables are bitsandbytes 0.50's
//!   float32 constants bit for bit. Codes 0x7F and 0xFF of E4M3 are NaN: the quiet NaN
//!   0x7FC00000 with the code's sign bit, which the product keeps for a finite `d` (the NaN's
//!   bits are not specified when `d` itself is NaN). An MXFP4 weight is
//!   `e8m0_to_f32(e) · MXFP4_TABLE[code]`: the scale is a power of two (`2^(e - 127)`, the f32
//!   subnormal 2^-127 for `e = 0`) and the table's values have at most 2 significant bits, so
//!   the product is exact unless it overflows (`e >= 254` with |code value| >= 2 gives ±inf, as
//!   `torch.ldexp` does); `e = 255` is NaN in the MX spec and here (loaders refuse it).
//! - The SIMD decoders use no gathers: E4M3 is decoded arithmetically (see [`E4M3_TO_F32`]) and
//!   4-bit codes by in-register permutes of the 16-entry table. They equal the scalar
//!   dequantizers bit for bit for every code, NaN codes included, at every level (tested).
//! - bitsandbytes rounds each dequantized 4-bit value to its quant state's `dtype` (bf16 or f16,
//!   to nearest even) before use. Such weights keep their blocks (same layout) and are read
//!   through [`Rounded4`]: every weight is `round(d · TABLE[code])`, the multiply and then that
//!   one rounding, in every decoder.
//! - Matmul keeps f32 activations and f32 accumulation: the result equals the same level's f32
//!   kernel on the dequantized weights bit for bit (tested), as for the GGML formats. These
//!   types have no q8-activation path ([`crate::q8_activations_supported`] is false for them)
//!   nor a bf16-activation one (that path takes bf16 weights only).

/// Weights per FP8 block.
pub const QK_F8: usize = 128;
/// Weights per bitsandbytes 4-bit block (NF4 and FP4).
pub const QK_B4: usize = 64;
/// Weights per MXFP4 block (the OCP MX block size).
pub const QK_MX: usize = 32;

/// FP8 E4M3 (`float8_e4m3fn`) weights with one f32 scale per 128: weight `i` is
/// `d · E4M3_TO_F32[qs[i]]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockF8 {
    /// Scale (the checkpoint's per-block scale, e.g. `weight_scale_inv`).
    pub d: f32,
    /// E4M3 codes, one per weight, in weight order.
    pub qs: [u8; QK_F8],
}

const _: () = assert!(std::mem::size_of::<BlockF8>() == 132);
const _: () = assert!(std::mem::align_of::<BlockF8>() == 4);

/// bitsandbytes NF4 weights with one f32 scale (absmax) per 64: weight `2j` is
/// `d · NF4_TABLE[qs[j] >> 4]`, weight `2j + 1` is `d · NF4_TABLE[qs[j] & 0xF]` (high nibble
/// first, as bitsandbytes packs them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockNf4 {
    /// Scale (bitsandbytes' absmax of the block).
    pub d: f32,
    /// Two codes per byte, high nibble first.
    pub qs: [u8; QK_B4 / 2],
}

const _: () = assert!(std::mem::size_of::<BlockNf4>() == 36);
const _: () = assert!(std::mem::align_of::<BlockNf4>() == 4);

/// bitsandbytes FP4 weights: the layout of [`BlockNf4`] with [`FP4_TABLE`] as the code table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockFp4 {
    /// Scale (bitsandbytes' absmax of the block).
    pub d: f32,
    /// Two codes per byte, high nibble first.
    pub qs: [u8; QK_B4 / 2],
}

const _: () = assert!(std::mem::size_of::<BlockFp4>() == 36);
const _: () = assert!(std::mem::align_of::<BlockFp4>() == 4);

/// OCP MX FP4 (MXFP4) weights: 32 FP4 E2M1 codes sharing one E8M0 scale. Weight `2j` is
/// `e8m0_to_f32(e) · MXFP4_TABLE[qs[j] & 0xF]`, weight `2j + 1` is
/// `e8m0_to_f32(e) · MXFP4_TABLE[qs[j] >> 4]` (low nibble first, as `*_blocks` tensors pack
/// them). The layout is the checkpoint's bytes: one scale byte of `*_scales`, then one 16-byte
/// row of `*_blocks`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockMxfp4 {
    /// E8M0 scale: the block's scale is `2^(e - 127)`; 255 is NaN.
    pub e: u8,
    /// Two codes per byte, low nibble first.
    pub qs: [u8; QK_MX / 2],
}

const _: () = assert!(std::mem::size_of::<BlockMxfp4>() == 17);
const _: () = assert!(std::mem::align_of::<BlockMxfp4>() == 1);

/// f32 value of every FP4 E2M1 code (OCP MX spec: sign bit 3, 2 exponent bits with bias 1, one
/// mantissa bit): `[0, 0.5, 1, 1.5, 2, 3, 4, 6]` and their negatives; code 8 is -0.0.
pub static MXFP4_TABLE: [f32; 16] = MXFP4;

const MXFP4: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The value of an E8M0 scale byte: `2^(e - 127)` exactly (`e = 0` is the f32 subnormal
/// 2^-127, bits 0x00400000), and NaN (0x7FC00000) for `e = 255`.
#[inline]
pub const fn e8m0_to_f32(e: u8) -> f32 {
    // Biased exponent e with a zero mantissa is 2^(e - 127); the mantissa's top bit turns
    // e = 0 into the subnormal 2^-127 and e = 255 (infinity) into the quiet NaN. No branch:
    // the matvec converts one scale per 32 weights.
    let edge = (e == 0) | (e == 255);
    f32::from_bits(((e as u32) << 23) | ((edge as u32) << 22))
}

/// f32 value of every E4M3 code (`float8_e4m3fn`: sign, 4 exponent bits with bias 7, 3 mantissa
/// bits; no infinities; exponent 0 holds the subnormals `m/8 · 2^-6`; codes 0x7F and 0xFF are
/// NaN, here 0x7FC00000 / 0xFFC00000).
///
/// The SIMD decoders compute the same bits arithmetically from `v = code & 0x7F`: for `v >= 8`
/// the f32 bits are `(v << 20) + (120 << 23)` (exponent rebiased from 7 to 127, mantissa moved
/// to the top); for `v < 8`, `v · 2^-9` (exact); for `v == 0x7F`, 0x7FC00000; then the sign bit
/// `(code & 0x80) << 24` is ORed in.
pub static E4M3_TO_F32: [f32; 256] = e4m3_table();

/// Builds [`E4M3_TO_F32`] from the format's definition.
const fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut c = 0usize;
    while c < 256 {
        let sign = ((c >> 7) as u32) << 31;
        let exp = ((c >> 3) & 0xF) as u32;
        let man = (c & 7) as u32;
        let bits = if exp == 0xF && man == 7 {
            0x7FC0_0000 | sign
        } else if exp == 0 {
            // Subnormal: man/8 · 2^-6, a normal f32 (or zero).
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
        t[c] = f32::from_bits(bits);
        c += 1;
    }
    t
}

/// bitsandbytes 0.50's NF4 code values as f32 bits (`quant_map` of a `nf4` tensor).
const NF4_BITS: [u32; 16] = [
    0xbf80_0000,
    0xbf32_39b1,
    0xbf06_6b30,
    0xbeca_32a0,
    0xbe91_a24d,
    0xbe3d_353f,
    0xbdba_7871,
    0x0000_0000,
    0x3da2_faff,
    0x3e24_cae3,
    0x3e7c_04dd,
    0x3ead_033a,
    0x3ee1_a4b8,
    0x3f10_07ab,
    0x3f39_13b3,
    0x3f80_0000,
];

/// bitsandbytes 0.50's FP4 code values as f32 bits (`quant_map` of a `fp4` tensor): sign bit 3,
/// magnitudes `[0, 1/16, 8, 12, 4, 6, 2, 3] / 12`; code 8 is +0.0.
const FP4_BITS: [u32; 16] = [
    0x0000_0000,
    0x3baa_aaab,
    0x3f2a_aaab,
    0x3f80_0000,
    0x3eaa_aaab,
    0x3f00_0000,
    0x3e2a_aaab,
    0x3e80_0000,
    0x0000_0000,
    0xbbaa_aaab,
    0xbf2a_aaab,
    0xbf80_0000,
    0xbeaa_aaab,
    0xbf00_0000,
    0xbe2a_aaab,
    0xbe80_0000,
];

const fn table16(bits: [u32; 16]) -> [f32; 16] {
    let mut t = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = f32::from_bits(bits[i]);
        i += 1;
    }
    t
}

const NF4: [f32; 16] = table16(NF4_BITS);
const FP4: [f32; 16] = table16(FP4_BITS);

/// f32 value of every NF4 code (bitsandbytes 0.50, bit for bit).
pub static NF4_TABLE: [f32; 16] = NF4;
/// f32 value of every FP4 code (bitsandbytes 0.50, bit for bit; code 8 is +0.0).
pub static FP4_TABLE: [f32; 16] = FP4;

/// The type a bitsandbytes quant state names (`dtype`) when it is not float32: each dequantized
/// value `absmax · table[code]` (f32) is rounded to it, to nearest with ties to even.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Round4 {
    Bf16,
    F16,
}

impl Round4 {
    /// `v` rounded to this type, as an f32 (exact: every bf16 / f16 value is an f32).
    #[inline(always)]
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Round4::Bf16 => half::bf16::from_f32(v).to_f32(),
            Round4::F16 => half::f16::from_f32(v).to_f32(),
        }
    }
}

/// The code table of a bitsandbytes 4-bit block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table4 {
    Nf4,
    Fp4,
}

/// bitsandbytes 4-bit blocks whose values are rounded to `round` after the multiply: the
/// layout of [`BlockNf4`] whatever the table (`table` names it).
#[derive(Clone, Copy, Debug)]
pub struct Rounded4<'a> {
    pub blocks: &'a [BlockNf4],
    pub table: Table4,
    pub round: Round4,
}

/// A code table as a type (for [`RoundedBlock`]).
pub(crate) trait TableMark: Copy + 'static {
    const TABLE: [f32; 16];
}
/// A rounding as a type (for [`RoundedBlock`]).
pub(crate) trait RoundMark: Copy + 'static {
    const ROUND: Round4;
}
#[derive(Clone, Copy)]
pub(crate) struct Nf4Table;
#[derive(Clone, Copy)]
pub(crate) struct Fp4Table;
#[derive(Clone, Copy)]
pub(crate) struct ToBf16;
#[derive(Clone, Copy)]
pub(crate) struct ToF16;
impl TableMark for Nf4Table {
    const TABLE: [f32; 16] = NF4;
}
impl TableMark for Fp4Table {
    const TABLE: [f32; 16] = FP4;
}
impl RoundMark for ToBf16 {
    const ROUND: Round4 = Round4::Bf16;
}
impl RoundMark for ToF16 {
    const ROUND: Round4 = Round4::F16;
}

/// A [`BlockNf4`]-layout block read with table `T` and rounding `R`: the monomorphic form of
/// [`Rounded4`] that the decoders are generic over.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub(crate) struct RoundedBlock<T, R>(BlockNf4, std::marker::PhantomData<(T, R)>);

impl<T: TableMark, R: RoundMark> Code4 for RoundedBlock<T, R> {
    const TABLE: [f32; 16] = T::TABLE;
    const ROUND: Option<Round4> = Some(R::ROUND);
    #[inline(always)]
    fn scale(&self) -> f32 {
        self.0.d
    }
    #[inline(always)]
    fn codes(&self) -> &[u8; QK_B4 / 2] {
        &self.0.qs
    }
}

/// `blocks` as [`RoundedBlock`]s.
pub(crate) fn as_rounded<T, R>(blocks: &[BlockNf4]) -> &[RoundedBlock<T, R>] {
    // SAFETY: RoundedBlock<T, R> is repr(transparent) over BlockNf4 (its other field is a
    // zero-sized PhantomData), so the two slices have the same layout, length and lifetime.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast(), blocks.len()) }
}

/// Runs `$body` with `$b` bound to `$w`'s blocks as the [`RoundedBlock`] type of its table and
/// rounding (one monomorphic instance per pair).
macro_rules! with_rounded4 {
    ($w:expr, |$b:ident| $body:expr) => {{
        use $crate::prequant::{as_rounded, Fp4Table, Nf4Table, Round4, Table4, ToBf16, ToF16};
        let w: $crate::prequant::Rounded4<'_> = $w;
        match (w.table, w.round) {
            (Table4::Nf4, Round4::Bf16) => {
                let $b = as_rounded::<Nf4Table, ToBf16>(w.blocks);
                $body
            }
            (Table4::Nf4, Round4::F16) => {
                let $b = as_rounded::<Nf4Table, ToF16>(w.blocks);
                $body
            }
            (Table4::Fp4, Round4::Bf16) => {
                let $b = as_rounded::<Fp4Table, ToBf16>(w.blocks);
                $body
            }
            (Table4::Fp4, Round4::F16) => {
                let $b = as_rounded::<Fp4Table, ToF16>(w.blocks);
                $body
            }
        }
    }};
}
pub(crate) use with_rounded4;

/// Dequantizes rounded 4-bit blocks: `round(d_b · TABLE[code])` in the order of
/// [`dequantize_row_nf4`]. Panics unless `dst.len() == 64 · w.blocks.len()`.
pub fn dequantize_row_rounded4(w: Rounded4<'_>, dst: &mut [f32]) {
    with_rounded4!(w, |b| dequantize_b4("dequantize_row_rounded4", b, dst))
}

/// A bitsandbytes 4-bit block type ([`BlockNf4`], [`BlockFp4`], [`RoundedBlock`]): the same
/// layout, its own code table and rounding. Keeps the dequantizers and the SIMD decoders
/// generic over them.
pub(crate) trait Code4: Copy {
    /// The f32 value of every code.
    const TABLE: [f32; 16];
    /// The type each `d · TABLE[code]` is rounded to after the multiply (None: kept in f32).
    const ROUND: Option<Round4> = None;
    /// The block's scale.
    fn scale(&self) -> f32;
    /// The 32 code bytes, two codes each, high nibble first.
    fn codes(&self) -> &[u8; QK_B4 / 2];
}

impl Code4 for BlockNf4 {
    const TABLE: [f32; 16] = NF4;
    #[inline(always)]
    fn scale(&self) -> f32 {
        self.d
    }
    #[inline(always)]
    fn codes(&self) -> &[u8; QK_B4 / 2] {
        &self.qs
    }
}

impl Code4 for BlockFp4 {
    const TABLE: [f32; 16] = FP4;
    #[inline(always)]
    fn scale(&self) -> f32 {
        self.d
    }
    #[inline(always)]
    fn codes(&self) -> &[u8; QK_B4 / 2] {
        &self.qs
    }
}

/// Dequantizes FP8 blocks: `dst[128b + i] = d_b · E4M3_TO_F32[qs_b[i]]`. Panics unless
/// `dst.len() == 128 · src.len()`.
pub fn dequantize_row_f8(src: &[BlockF8], dst: &mut [f32]) {
    assert_eq!(
        dst.len(),
        src.len() * QK_F8,
        "dequantize_row_f8: length mismatch"
    );
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK_F8)) {
        for (o, &q) in y.iter_mut().zip(&b.qs) {
            *o = b.d * E4M3_TO_F32[q as usize];
        }
    }
}

/// Dequantizes NF4 blocks: `dst[64b + 2j] = d_b · NF4_TABLE[qs_b[j] >> 4]`,
/// `dst[64b + 2j + 1] = d_b · NF4_TABLE[qs_b[j] & 0xF]`. Panics unless
/// `dst.len() == 64 · src.len()`.
pub fn dequantize_row_nf4(src: &[BlockNf4], dst: &mut [f32]) {
    dequantize_b4("dequantize_row_nf4", src, dst)
}

/// Dequantizes FP4 blocks as [`dequantize_row_nf4`] does NF4 ones, with [`FP4_TABLE`].
/// Panics unless `dst.len() == 64 · src.len()`.
pub fn dequantize_row_fp4(src: &[BlockFp4], dst: &mut [f32]) {
    dequantize_b4("dequantize_row_fp4", src, dst)
}

/// Dequantizes MXFP4 blocks: `dst[32b + 2j] = s_b · MXFP4_TABLE[qs_b[j] & 0xF]`,
/// `dst[32b + 2j + 1] = s_b · MXFP4_TABLE[qs_b[j] >> 4]` with `s_b = e8m0_to_f32(e_b)`. Panics
/// unless `dst.len() == 32 · src.len()`.
pub fn dequantize_row_mxfp4(src: &[BlockMxfp4], dst: &mut [f32]) {
    assert_eq!(
        dst.len(),
        src.len() * QK_MX,
        "dequantize_row_mxfp4: length mismatch"
    );
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK_MX)) {
        let d = e8m0_to_f32(b.e);
        for (o, &q) in y.chunks_exact_mut(2).zip(&b.qs) {
            o[0] = d * MXFP4[(q & 0x0F) as usize];
            o[1] = d * MXFP4[(q >> 4) as usize];
        }
    }
}

/// The body of the 4-bit dequantizers (`what` names the caller in the panic message).
fn dequantize_b4<B: Code4>(what: &str, src: &[B], dst: &mut [f32]) {
    assert_eq!(dst.len(), src.len() * QK_B4, "{what}: length mismatch");
    for (b, y) in src.iter().zip(dst.chunks_exact_mut(QK_B4)) {
        let d = b.scale();
        let value = |code: u8| {
            let v = d * B::TABLE[code as usize];
            B::ROUND.map_or(v, |r| r.apply(v))
        };
        for (o, &q) in y.chunks_exact_mut(2).zip(b.codes()) {
            o[0] = value(q >> 4);
            o[1] = value(q & 0x0F);
        }
    }
}

#[cfg(test)]
#[path = "prequant_tests.rs"]
mod tests;
