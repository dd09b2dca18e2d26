//! `gguf`: the GGUF v3 container (llama.cpp's model file format): a streaming writer
//! and a header reader.
//!
//! Layout (all little-endian): magic `GGUF`, version `u32` (3), tensor count `u64`,
//! metadata KV count `u64`, the metadata KVs (key string, value type `u32`, value),
//! the tensor infos (name, `n_dims: u32`, `ne: [u64; n_dims]`, type `u32`, offset `u64`
//! relative to the data section), zero padding up to the alignment, then the data
//! section, every tensor starting at an offset that is a multiple of the alignment.
//! Strings are a `u64` byte length then UTF-8 bytes; arrays are an element type `u32`,
//! a `u64` count, then the elements.
//!
//! Dimensions are in GGML order: `ne[0]` is the innermost (contiguous) dimension, so a
//! torch tensor of shape `[a, b, c]` has dims `[c, b, a]`.
//!
//! What must always hold:
//! - The writer never holds tensor data: the whole header is computed from the tensor
//!   specs first, then data is streamed in (any chunking), padding inserted between
//!   tensors; the file is written atomically (temp file in the same folder, fsync,
//!   rename, fsync of the folder) and a writer dropped before [`GgufWriter::finish`]
//!   leaves nothing behind.
//! - The reader reads the header only, with every count, length, dimension and tensor
//!   extent checked against the file length, and names, strings, arrays and counts against
//!   fixed limits, before use; a bad file is an error naming the file, never a panic or an
//!   allocation sized by untrusted input (`tests/fuzz_parsers.rs` fuzzes it).

mod reader;
mod writer;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use reader::GgufFile;
pub use writer::{GgufWriter, TensorSpec};

/// `GGUF` as it appears at the start of the file.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The format version written (and the only one read).
pub const VERSION: u32 = 3;
/// Alignment used when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Key holding the alignment when it is not the default.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// GGML's maximum number of dimensions.
pub const MAX_DIMS: usize = 4;

/// Errors from reading or writing GGUF files; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a valid GGUF file: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("GGUF writer for {}: {msg}", path.display())]
    Usage { path: PathBuf, msg: String },
}

/// GGML tensor element types (the ids llama.cpp's `ggml_type` uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    /// This runtime's own block types (ids no GGML release uses; only our quantized cache holds
    /// them, for pre-quantized checkpoints kept without loss): FP8 E4M3 x 128 + f32 scale.
    MoeF8B128,
    /// bitsandbytes NF4 x 64 + f32 scale (see [`GgmlType::MoeF8B128`]).
    MoeNf4B64,
    /// bitsandbytes FP4 x 64 + f32 scale (see [`GgmlType::MoeF8B128`]).
    MoeFp4B64,
    /// [`GgmlType::MoeNf4B64`] blocks whose values are rounded to bf16 (a bitsandbytes quant
    /// state's `dtype`); the same bytes.
    MoeNf4B64Bf16,
    /// [`GgmlType::MoeNf4B64`] blocks whose values are rounded to f16.
    MoeNf4B64F16,
    /// [`GgmlType::MoeFp4B64`] blocks whose values are rounded to bf16.
    MoeFp4B64Bf16,
    /// [`GgmlType::MoeFp4B64`] blocks whose values are rounded to f16.
    MoeFp4B64F16,
    /// MXFP4: an E8M0 scale byte + 32 E2M1 codes, low nibble first, as checkpoints store them
    /// (17 bytes; GGML's own MXFP4 orders the nibbles differently, so this is not its id 39).
    MoeMxfp4B32,
    /// GGML's MXFP4 (id 39, llama.cpp's `block_mxfp4`): an E8M0 scale byte, then 16 bytes
    /// whose low nibbles are elements 0..16 and high nibbles elements 16..32 (as `Q4_0`).
    Mxfp4,
}

impl GgmlType {
    const ALL: [GgmlType; 29] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::BF16,
        GgmlType::MoeF8B128,
        GgmlType::MoeNf4B64,
        GgmlType::MoeFp4B64,
        GgmlType::MoeNf4B64Bf16,
        GgmlType::MoeNf4B64F16,
        GgmlType::MoeFp4B64Bf16,
        GgmlType::MoeFp4B64F16,
        GgmlType::MoeMxfp4B32,
        GgmlType::Mxfp4,
    ];

    /// The `ggml_type` id.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
            Mxfp4 => 39,
            MoeF8B128 => 1000,
            MoeNf4B64 => 1001,
            MoeFp4B64 => 1002,
            MoeMxfp4B32 => 1003,
            MoeNf4B64Bf16 => 1004,
            MoeNf4B64F16 => 1005,
            MoeFp4B64Bf16 => 1006,
            MoeFp4B64F16 => 1007,
        }
    }

    /// The type with `ggml_type` id `id`, if known.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// GGML's name for the type (`F32`, `Q4_K`, `BF16`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            BF16 => "BF16",
            Mxfp4 => "MXFP4",
            MoeF8B128 => "MOE_F8_E4M3_B128",
            MoeNf4B64 => "MOE_NF4_B64",
            MoeFp4B64 => "MOE_FP4_B64",
            MoeMxfp4B32 => "MOE_MXFP4_B32",
            MoeNf4B64Bf16 => "MOE_NF4_B64_BF16",
            MoeNf4B64F16 => "MOE_NF4_B64_F16",
            MoeFp4B64Bf16 => "MOE_FP4_B64_BF16",
            MoeFp4B64F16 => "MOE_FP4_B64_F16",
        }
    }

    /// Elements per block (1 for plain types, 32 for `Q*_0/1`, 256 for k-quants).
    pub fn block_size(self) -> u64 {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | I8 | I16 | I32 | I64 | F64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | MoeMxfp4B32 | Mxfp4 => 32,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K => 256,
            MoeF8B128 => 128,
            MoeNf4B64 | MoeFp4B64 | MoeNf4B64Bf16 | MoeNf4B64F16 | MoeFp4B64Bf16 | MoeFp4B64F16 => {
                64
            }
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        use GgmlType::*;
        match self {
            I8 => 1,
            F16 | BF16 | I16 => 2,
            F32 | I32 => 4,
            I64 | F64 => 8,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2_K => 84,
            Q3_K => 110,
            Q4_K => 144,
            Q5_K => 176,
            Q6_K => 210,
            Q8_K => 292,
            MoeF8B128 => 132,
            MoeNf4B64 | MoeFp4B64 | MoeNf4B64Bf16 | MoeNf4B64F16 | MoeFp4B64Bf16 | MoeFp4B64F16 => {
                36
            }
            MoeMxfp4B32 | Mxfp4 => 17,
        }
    }

    /// Bytes of a tensor with these GGML dims, or a reason it is not representable
    /// (`ne[0]` not a multiple of the block size, a zero-or-more-than-4 dims, overflow).
    pub fn tensor_bytes(self, dims: &[u64]) -> Result<u64, String> {
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(format!("{} dims (1 to {MAX_DIMS} allowed)", dims.len()));
        }
        if !dims[0].is_multiple_of(self.block_size()) {
            return Err(format!(
                "ne[0] = {} is not a multiple of {}'s block size {}",
                dims[0],
                self.name(),
                self.block_size()
            ));
        }
        let numel = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("dims {dims:?} overflow"))?;
        (numel / self.block_size())
            .checked_mul(self.block_bytes())
            .ok_or_else(|| format!("dims {dims:?} overflow"))
    }
}

/// Metadata value types (GGUF's `gguf_type` ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    pub fn id(self) -> u32 {
        self as u32
    }

    pub fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        [
            U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64,
        ]
        .get(id as usize)
        .copied()
    }

    /// Encoded size of a scalar of this type (`None` for strings and arrays).
    pub(crate) fn scalar_bytes(self) -> Option<u64> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }
}

/// A metadata value. Arrays hold scalars or strings of one type (`elem`), never arrays.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// An array of strings.
    pub fn strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Value {
        Value::Array(
            ValueType::String,
            items.into_iter().map(|s| Value::String(s.into())).collect(),
        )
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any unsigned or non-negative signed integer as `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, items) => Some(items),
            _ => None,
        }
    }
}

/// `x` rounded up to a multiple of `align` (`align` > 0).
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    x.checked_add(align - 1).map(|v| v / align * align)
}
