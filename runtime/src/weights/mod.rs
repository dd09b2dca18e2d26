//! The only module that reads model files.
//!
//! A model is a [`ModelFiles`]: a folder as downloaded from the Hub, or the embedded demo model.
//! Weight files are safetensors, opened by mmap and never copied: a [`TensorRef`] is a view into
//! the mapped bytes in the tensor's own dtype.
//!
//! Invariants:
//! - Opening reads headers and small JSON files only (and, for bitsandbytes 4-bit weights, their
//!   code tables and quant state: a few hundred bytes each). Nothing here allocates in
//!   proportion to the total weights; tensor bytes are touched only when the compute reads them.
//! - A pre-quantized weight (FP8 codes with block scales, bitsandbytes 4-bit, MXFP4) is a view of
//!   its stored codes with a [`crate::weights::prequant::Source`]; it is converted before compute
//!   reads it. An MXFP4 weight `X` is stored as `X_blocks` + `X_scales` and opened under the
//!   name `X` ([`WeightSet::contains`] and [`WeightSet::get`] resolve the pair), in its logical
//!   shape (`[experts, n, k]` for gpt-oss's fused experts; `index` / `narrow` give each
//!   expert's rows).
//! - Every tensor is bounds-checked against its file when the header is parsed: offsets inside the
//!   data region, byte length equal to `numel * dtype size`.
//! - A safetensors file opens only if the official `safetensors` library would open it: header
//!   length within its limit, the header a JSON object (space padding allowed) with an optional
//!   `__metadata__` object of strings, and the tensors' `data_offsets`, in offset order, tiling
//!   the data region from byte 0 to the end of the file with no gap, overlap or trailing byte
//!   (so a wrong header length cannot shift every tensor). Each refusal names the file, the
//!   tensor and the byte ranges.
//! - With a `model.safetensors.index.json`, exactly the shards it names are opened, every shard it
//!   names must exist, and every tensor it maps must be in that shard's header.

pub mod prequant;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use moe_kernels::Weights;

use crate::error::{Error, Result};

/// Largest safetensors header accepted: the official library's limit, so that every file it
/// opens opens here and none it refuses does (headers of 75k-tensor checkpoints are a few MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Element types found in safetensors files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    U16,
    U32,
    U64,
    Bool,
    F8E4M3,
    F8E5M2,
    /// GGML Q8_0 blocks (32 weights in 34 bytes); produced by quantizing at load.
    Q8_0,
    /// GGML Q4_K super-blocks (256 weights in 144 bytes); produced by quantizing at load.
    Q4K,
    /// FP8 E4M3 codes in blocks of 128 with an f32 scale (132 bytes): an FP8 checkpoint's
    /// weights repacked without loss.
    F8B128,
    /// bitsandbytes NF4 codes in blocks of 64 with an f32 scale (36 bytes), repacked without loss.
    Nf4,
    /// bitsandbytes FP4 codes in blocks of 64 with an f32 scale (36 bytes), repacked without loss.
    Fp4,
    /// [`Dtype::Nf4`] blocks whose values bitsandbytes rounds to bf16 (its quant state's
    /// `dtype`), as the kernels then do: the same 36 bytes.
    Nf4Bf16,
    /// [`Dtype::Nf4`] blocks whose values are rounded to f16.
    Nf4F16,
    /// [`Dtype::Fp4`] blocks whose values are rounded to bf16.
    Fp4Bf16,
    /// [`Dtype::Fp4`] blocks whose values are rounded to f16.
    Fp4F16,
    /// OCP MX FP4 (MXFP4) codes in blocks of 32 with an E8M0 scale byte (17 bytes): a
    /// checkpoint's `*_blocks` / `*_scales` pair repacked without loss.
    Mxfp4,
}

impl Dtype {
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::Bf16,
            "F64" => Dtype::F64,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "I16" => Dtype::I16,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "U16" => Dtype::U16,
            "U32" => Dtype::U32,
            "U64" => Dtype::U64,
            "BOOL" => Dtype::Bool,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::F8E5M2,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
            Dtype::F16 | Dtype::Bf16 | Dtype::I16 | Dtype::U16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            // Block types have no per-element size; they never come from a safetensors header.
            Dtype::Q8_0
            | Dtype::Q4K
            | Dtype::F8B128
            | Dtype::Nf4
            | Dtype::Fp4
            | Dtype::Nf4Bf16
            | Dtype::Nf4F16
            | Dtype::Fp4Bf16
            | Dtype::Fp4F16
            | Dtype::Mxfp4 => 0,
        }
    }

    /// For block types: (weights per block, bytes per block).
    pub fn block(self) -> Option<(usize, usize)> {
        use std::mem::size_of;
        Some(match self {
            Dtype::Q8_0 => (
                moe_kernels::quant::QK8_0,
                size_of::<moe_kernels::BlockQ8_0>(),
            ),
            Dtype::Q4K => (moe_kernels::quant::QK_K, size_of::<moe_kernels::BlockQ4K>()),
            Dtype::F8B128 => (moe_kernels::QK_F8, size_of::<moe_kernels::BlockF8>()),
            Dtype::Nf4 => (moe_kernels::QK_B4, size_of::<moe_kernels::BlockNf4>()),
            Dtype::Fp4 => (moe_kernels::QK_B4, size_of::<moe_kernels::BlockFp4>()),
            Dtype::Nf4Bf16 | Dtype::Nf4F16 | Dtype::Fp4Bf16 | Dtype::Fp4F16 => {
                (moe_kernels::QK_B4, size_of::<moe_kernels::BlockNf4>())
            }
            Dtype::Mxfp4 => (moe_kernels::QK_MX, size_of::<moe_kernels::BlockMxfp4>()),
            _ => return None,
        })
    }

    /// Bytes of `n` weights in this type (`n` a multiple of the block size for block types).
    pub fn bytes_for(self, n: usize) -> usize {
        match self.block() {
            Some((w, b)) => n / w * b,
            None => n * self.size_bytes(),
        }
    }

    /// For the rounded bitsandbytes block types: their code table and rounding.
    pub fn rounded4(self) -> Option<(moe_kernels::Table4, moe_kernels::Round4)> {
        use moe_kernels::{Round4, Table4};
        Some(match self {
            Dtype::Nf4Bf16 => (Table4::Nf4, Round4::Bf16),
            Dtype::Nf4F16 => (Table4::Nf4, Round4::F16),
            Dtype::Fp4Bf16 => (Table4::Fp4, Round4::Bf16),
            Dtype::Fp4F16 => (Table4::Fp4, Round4::F16),
            _ => return None,
        })
    }

    /// The safetensors spelling.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::Bf16 => "BF16",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::U16 => "U16",
            Dtype::U32 => "U32",
            Dtype::U64 => "U64",
            Dtype::Bool => "BOOL",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::Q8_0 => "Q8_0",
            Dtype::Q4K => "Q4_K",
            Dtype::F8B128 => "F8_E4M3_B128",
            Dtype::Nf4 => "NF4_B64",
            Dtype::Fp4 => "FP4_B64",
            Dtype::Nf4Bf16 => "NF4_B64_BF16",
            Dtype::Nf4F16 => "NF4_B64_F16",
            Dtype::Fp4Bf16 => "FP4_B64_BF16",
            Dtype::Fp4F16 => "FP4_B64_F16",
            Dtype::Mxfp4 => "MXFP4_B32",
        }
    }
}

/// Bytes of one file: a read-only mapping, or static bytes compiled into the binary.
pub enum Storage {
    /// A mapped file, with the open file for positioned reads that bypass the mapping. The
    /// guard's registration comes first, so it is dropped before the mapping is unmapped.
    Mmap {
        guard: crate::mapguard::Registration,
        map: memmap2::Mmap,
        file: File,
    },
    Static(&'static [u8]),
    /// An 8-byte aligned copy (`len` bytes used).
    Words {
        words: Vec<u64>,
        len: usize,
    },
    Empty,
    /// No bytes at all: sizes only, for planning from a bare config.json.
    Virtual,
}

impl Storage {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap { map, .. } => map,
            Storage::Static(s) => s,
            // `len` never exceeds the words' byte length (set by the only constructor above).
            Storage::Words { words, len } => &bytemuck::cast_slice::<u64, u8>(words)[..*len],
            Storage::Empty | Storage::Virtual => &[],
        }
    }
}

/// One file of the embedded demo model.
pub struct EmbeddedFile {
    pub name: &'static str,
    pub bytes: &'static [u8],
}

/// Where a model's files come from.
#[derive(Clone)]
pub enum ModelFiles {
    Dir(PathBuf),
    Embedded {
        label: &'static str,
        files: &'static [EmbeddedFile],
    },
}

impl ModelFiles {
    /// A short human-readable name: the folder, or the embedded model's label.
    pub fn label(&self) -> String {
        match self {
            ModelFiles::Dir(p) => p.display().to_string(),
            ModelFiles::Embedded { label, .. } => format!("<{label}>"),
        }
    }

    /// The path used in messages about file `name`.
    pub fn path_of(&self, name: &str) -> PathBuf {
        match self {
            ModelFiles::Dir(p) => p.join(name),
            ModelFiles::Embedded { label, .. } => PathBuf::from(format!("<{label}>/{name}")),
        }
    }

    /// The folder, for a model on disk.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            ModelFiles::Dir(p) => Some(p),
            ModelFiles::Embedded { .. } => None,
        }
    }

    pub fn exists(&self, name: &str) -> bool {
        match self {
            ModelFiles::Dir(p) => p.join(name).is_file(),
            ModelFiles::Embedded { files, .. } => files.iter().any(|f| f.name == name),
        }
    }

    /// Reads a small file (JSON, template) whole; `Ok(None)` when it does not exist.
    pub fn read_small(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self {
            ModelFiles::Dir(p) => {
                let path = p.join(name);
                match std::fs::read(&path) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Error::io(path, e)),
                }
            }
            ModelFiles::Embedded { files, .. } => Ok(files
                .iter()
                .find(|f| f.name == name)
                .map(|f| f.bytes.to_vec())),
        }
    }

    /// Maps a (large) file without reading it.
    fn map(&self, name: &str) -> Result<Storage> {
        match self {
            ModelFiles::Dir(p) => map_path(&p.join(name)),
            ModelFiles::Embedded { files, .. } => files
                .iter()
                .find(|f| f.name == name)
                .map(|f| Storage::Static(f.bytes))
                .ok_or_else(|| Error::io(self.path_of(name), std::io::ErrorKind::NotFound.into())),
        }
    }
}

/// Maps a file read-only (empty files as [`Storage::Empty`]), with the open file kept for
/// positioned reads.
pub(crate) fn map_path(path: &Path) -> Result<Storage> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Ok(Storage::Empty);
    }
    // SAFETY: read-only private mapping. Model files are treated as immutable while open, and
    // cache files are only ever replaced by rename, never written in place; a file truncated or
    // rewritten under us anyway is caught by `mapguard` (reads past its end get zeros instead
    // of SIGBUS, and the model fails naming the file), registered here.
    let map = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
    let guard = crate::mapguard::register(&map, &file, path);
    Ok(Storage::Mmap { guard, map, file })
}

impl Storage {
    /// Reads `dst.len()` bytes at `offset` without mapping them into this process (positioned
    /// reads for files; a copy otherwise). The caller keeps `offset + dst.len()` in bounds.
    pub(crate) fn read_at(&self, offset: u64, dst: &mut [u8]) -> std::io::Result<()> {
        match self {
            Storage::Mmap { file, .. } => {
                use std::os::unix::fs::FileExt;
                file.read_exact_at(dst, offset)
            }
            other => {
                let b = other.bytes();
                let start = offset as usize;
                match b.get(start..start + dst.len()) {
                    Some(src) => {
                        dst.copy_from_slice(src);
                        Ok(())
                    }
                    None => Err(std::io::ErrorKind::UnexpectedEof.into()),
                }
            }
        }
    }
}

/// Header entry of one tensor, bounds-checked.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn size_bytes(&self) -> usize {
        self.end - self.start
    }
}

/// One opened safetensors file.
pub struct SafetensorsFile {
    pub name: String,
    pub path: PathBuf,
    storage: Arc<Storage>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl SafetensorsFile {
    /// Maps `name` and parses + bounds-checks its header. Reads nothing else.
    pub fn open(files: &ModelFiles, name: &str) -> Result<SafetensorsFile> {
        let path = files.path_of(name);
        let storage = files.map(name)?;
        let tensors = parse_header(storage.bytes(), &path)?;
        Ok(SafetensorsFile {
            name: name.to_string(),
            path,
            storage: Arc::new(storage),
            tensors,
        })
    }

    /// The file's header: the 8-byte length and the JSON table (what a fingerprint covers).
    pub fn header_bytes(&self) -> &[u8] {
        let b = self.storage.bytes();
        let len = u64::from_le_bytes(b[..8].try_into().expect("checked at open")) as usize;
        &b[..8 + len]
    }

    /// The file's length in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.storage.bytes().len() as u64
    }
}

/// Parses a safetensors header from the start of `bytes` (the whole file) and checks it as the
/// official `safetensors` library does: the length within bounds, the header a JSON object
/// (trailing spaces allowed as padding) of tensor entries and an optional `__metadata__` object
/// of strings, each tensor's byte length equal to its element count times its dtype size, and
/// the tensors' `data_offsets`, in offset order, tiling the data region from 0 to its very end
/// with no gap, overlap or trailing byte.
fn parse_header(bytes: &[u8], path: &Path) -> Result<BTreeMap<String, TensorInfo>> {
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(Error::bad_file(
            path,
            format!("truncated safetensors file: {file_len} bytes, no header"),
        ));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_BYTES {
        return Err(Error::bad_file(
            path,
            format!(
                "safetensors header length {header_len} is over the format's limit of {MAX_HEADER_BYTES} bytes: corrupt or not a safetensors file"
            ),
        ));
    }
    if 8 + header_len > file_len {
        return Err(Error::bad_file(
            path,
            format!(
                "safetensors header length {header_len} runs past the file ({file_len} bytes): truncated or not a safetensors file"
            ),
        ));
    }
    let data_start = 8 + header_len as usize;
    let data_len = bytes.len() - data_start;
    // Fast path: a typed parse straight into entries (a header of tens of thousands of tensors,
    // as in a 512-expert checkpoint, parses several times faster than through `Value`s). A
    // header whose JSON it rejects goes through the general parse below, which names what is
    // wrong; both check every entry with `tensor_info` and the layout with `check_layout`.
    let entries = match serde_json::from_slice::<TypedHeader>(&bytes[8..data_start]) {
        Ok(TypedHeader(entries)) => entries
            .into_iter()
            .map(|(name, t)| {
                let info = tensor_info(
                    &name,
                    &t.dtype,
                    t.shape,
                    t.data_offsets,
                    data_start,
                    data_len,
                    path,
                )?;
                Ok((name, info))
            })
            .collect::<Result<Vec<_>>>()?,
        Err(_) => parse_header_general(bytes, data_start, path)?,
    };
    check_layout(entries, data_start, data_len, header_len, path)
}

/// Checks that the tensors, taken in `data_offsets` order, tile the data region exactly (the
/// first at 0, each starting where the previous one ends, the last ending at the end of the
/// file) and that no name appears twice; returns them by name. Zero-sized tensors may share an
/// offset with their neighbours, as in the official library.
fn check_layout(
    entries: Vec<(String, TensorInfo)>,
    data_start: usize,
    data_len: usize,
    header_len: u64,
    path: &Path,
) -> Result<BTreeMap<String, TensorInfo>> {
    let mut tensors = BTreeMap::new();
    for (name, info) in entries {
        if tensors.contains_key(&name) {
            return Err(Error::bad_file(
                path,
                format!("tensor `{name}` appears twice in the header"),
            ));
        }
        tensors.insert(name, info);
    }
    // Offsets relative to the data region, as the header writes them.
    let rel = |t: &TensorInfo| (t.start - data_start, t.end - data_start);
    let mut order: Vec<(&String, (usize, usize))> =
        tensors.iter().map(|(n, t)| (n, rel(t))).collect();
    order.sort_by_key(|&(_, r)| r);
    let mut at = 0usize;
    let mut prev: Option<(&String, (usize, usize))> = None;
    for &(name, (b, e)) in &order {
        if b != at {
            let why = match prev {
                None => format!(
                    "tensor `{name}` has data_offsets [{b}, {e}], but the first tensor must start at 0: bytes [0, {b}) of the data region belong to no tensor"
                ),
                Some((pn, (pb, pe))) if b > at => format!(
                    "tensors `{pn}` [{pb}, {pe}] and `{name}` [{b}, {e}] leave a gap: bytes [{pe}, {b}) of the data region belong to no tensor"
                ),
                Some((pn, (pb, pe))) => format!(
                    "tensors `{pn}` [{pb}, {pe}] and `{name}` [{b}, {e}] overlap: `{name}` starts at byte {b}, before `{pn}` ends at {pe}"
                ),
            };
            return Err(Error::bad_file(
                path,
                format!("{why} (data_offsets must tile the data region with no gap or overlap)"),
            ));
        }
        at = e;
        prev = Some((name, (b, e)));
    }
    if at != data_len {
        let extra = data_len - at;
        let last = match prev {
            Some((n, _)) => format!("the last tensor `{n}` ends at byte {at}"),
            None => "there are no tensors".to_string(),
        };
        return Err(Error::bad_file(
            path,
            format!(
                "the data region is {data_len} bytes but {last}: {extra} trailing bytes, or a wrong header length ({header_len} bytes)"
            ),
        ));
    }
    Ok(tensors)
}

/// One tensor's header entry, checked: a known dtype, offsets inside the data region, and as
/// many bytes as the shape and dtype need.
fn tensor_info(
    name: &str,
    dtype_s: &str,
    shape: Vec<usize>,
    [b, e]: [u64; 2],
    data_start: usize,
    data_len: usize,
    path: &Path,
) -> Result<TensorInfo> {
    let bad = |why: String| Error::bad_file(path, format!("tensor `{name}`: {why}"));
    let dtype = Dtype::parse(dtype_s).ok_or_else(|| bad(format!("unknown dtype {dtype_s}")))?;
    if b > e {
        return Err(bad(format!(
            "data_offsets [{b}, {e}] end before they begin"
        )));
    }
    if e > data_len as u64 {
        return Err(bad(format!(
            "data_offsets [{b}, {e}] run past the data region ({data_len} bytes): file truncated or corrupt"
        )));
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad("shape overflows".into()))?;
    let expect = numel
        .checked_mul(dtype.size_bytes())
        .ok_or_else(|| bad("shape overflows".into()))?;
    if (e - b) as usize != expect {
        return Err(bad(format!(
            "{} bytes for shape {shape:?} of {dtype_s}, expected {expect}",
            e - b
        )));
    }
    Ok(TensorInfo {
        dtype,
        shape,
        start: data_start + b as usize,
        end: data_start + e as usize,
    })
}

/// One header entry as the typed fast path reads it.
#[derive(serde::Deserialize)]
struct TypedEntry<'a> {
    #[serde(borrow)]
    dtype: std::borrow::Cow<'a, str>,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// The header's tensor entries in file order (`__metadata__` checked to be an object of
/// strings, as the official library requires, then skipped).
struct TypedHeader<'a>(Vec<(String, TypedEntry<'a>)>);

impl<'de> serde::Deserialize<'de> for TypedHeader<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = TypedHeader<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a safetensors header object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(key) = map.next_key::<String>()? {
                    if key == METADATA_KEY {
                        map.next_value::<Option<Pairs<String>>>()?;
                    } else {
                        out.push((key, map.next_value()?));
                    }
                }
                Ok(TypedHeader(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// The free-form string map a safetensors header may carry beside its tensors.
const METADATA_KEY: &str = "__metadata__";

/// A JSON object as its (key, value) pairs in file order, duplicates kept (so they can be
/// refused by name rather than silently collapsed).
struct Pairs<V>(Vec<(String, V)>);

/// A JSON object of strings (the shard index's `weight_map`).
type StringPairs = Pairs<String>;

impl<'de, V: serde::Deserialize<'de>> serde::Deserialize<'de> for Pairs<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = Pairs<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(kv) = map.next_entry()? {
                    out.push(kv);
                }
                Ok(Pairs(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// The general header parse: every entry checked field by field, errors naming the tensor.
/// Returns the entries in file order (the layout is checked by the caller).
fn parse_header_general(
    bytes: &[u8],
    data_start: usize,
    path: &Path,
) -> Result<Vec<(String, TensorInfo)>> {
    let Pairs(header) = serde_json::from_slice::<Pairs<serde_json::Value>>(&bytes[8..data_start])
        .map_err(|e| {
        Error::bad_file(
            path,
            format!("safetensors header is not a valid JSON object: {e}"),
        )
    })?;
    let data_len = bytes.len() - data_start;
    let mut tensors = Vec::with_capacity(header.len());
    for (name, entry) in header {
        if name == METADATA_KEY {
            let strings = match &entry {
                serde_json::Value::Null => true,
                serde_json::Value::Object(m) => m.values().all(serde_json::Value::is_string),
                _ => false,
            };
            if !strings {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "`{METADATA_KEY}` in the safetensors header is not an object of strings"
                    ),
                ));
            }
            continue;
        }
        let bad = |why: String| Error::bad_file(path, format!("tensor `{name}`: {why}"));
        let obj = entry
            .as_object()
            .ok_or_else(|| bad("header entry is not an object".into()))?;
        let dtype_s = obj
            .get("dtype")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("no dtype".into()))?;
        let shape: Vec<usize> = obj
            .get("shape")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad("no shape".into()))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of non-negative integers".into()))?;
        let offs: Vec<u64> = obj
            .get("data_offsets")
            .and_then(|v| v.as_array())
            .and_then(|a| a.iter().map(|d| d.as_u64()).collect::<Option<Vec<_>>>())
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad("data_offsets is not [begin, end]".into()))?;
        let info = tensor_info(
            &name,
            dtype_s,
            shape,
            [offs[0], offs[1]],
            data_start,
            data_len,
            path,
        )?;
        tensors.push((name, info));
    }
    Ok(tensors)
}

/// A zero-copy view of one tensor (or a slice of its leading dimension).
#[derive(Clone)]
pub struct TensorRef {
    pub name: String,
    pub path: Arc<PathBuf>,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    storage: Arc<Storage>,
    start: usize,
    end: usize,
    /// Set for a weight stored pre-quantized (FP8, bitsandbytes 4-bit): `dtype` and the bytes
    /// are the stored codes, `shape` the weight's, and the source says how codes become values.
    /// Such a tensor is converted before any compute reads it.
    prequant: Option<Prequant>,
}

/// A pre-quantized tensor's description and the first row this view starts at.
#[derive(Clone)]
struct Prequant {
    src: Arc<crate::weights::prequant::Source>,
    row0: usize,
}

impl std::fmt::Debug for TensorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?} {}", self.name, self.shape, self.dtype.name())
    }
}

impl TensorRef {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn size_bytes(&self) -> usize {
        self.end - self.start
    }

    /// The raw bytes (empty for a size-only tensor of a planned model).
    pub fn bytes(&self) -> &[u8] {
        match *self.storage {
            Storage::Virtual => &[],
            _ => &self.storage.bytes()[self.start..self.end],
        }
    }

    /// Drops this process's mapping of the tensor's file pages (whole pages inside its byte
    /// range only, so neighbours keep theirs): for source tensors that quantization replaced, so
    /// their pages stop counting in the resident set. The page cache keeps the data; a later
    /// read maps it in again. A no-op for anything but a mapped file.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Storage::Mmap { map, .. } = &*self.storage {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
            let base = map.as_ptr() as usize;
            let start = (base + self.start).next_multiple_of(page);
            let end = (base + self.end) / page * page;
            if end > start {
                // SAFETY: [start, end) lies inside the read-only file mapping `map`, which
                // outlives this call. MADV_DONTNEED on a file mapping only drops page-table
                // entries: later reads fault the same file contents back in, so every slice
                // into the mapping stays valid and keeps its bytes.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
                }
            }
        }
    }

    /// True for size-only tensors (planning without weight files).
    pub fn is_virtual(&self) -> bool {
        matches!(*self.storage, Storage::Virtual)
    }

    /// Copies the tensor's bytes into `dst` (`dst.len() == size_bytes()`). Mapped files are read
    /// with positioned reads, so the copy does not map the source pages into this process
    /// (they stay out of its resident set; only the page cache holds them).
    pub fn read_into(&self, dst: &mut [u8]) -> Result<()> {
        assert_eq!(dst.len(), self.size_bytes(), "read_into: destination size");
        if self.is_virtual() {
            return Err(Error::bad_file(
                (*self.path).clone(),
                format!(
                    "tensor `{}` has no data (planned without weights)",
                    self.name
                ),
            ));
        }
        self.storage
            .read_at(self.start as u64, dst)
            .map_err(|e| crate::mapguard::read_failed(&self.path, e))
    }

    /// Element `i` of the leading dimension, as its own tensor (a view, no copy).
    pub fn index(&self, i: usize) -> TensorRef {
        self.narrow(i, 1).squeeze_first()
    }

    /// Rows `[first, first + count)` of the leading dimension (a view, no copy).
    pub fn narrow(&self, first: usize, count: usize) -> TensorRef {
        assert!(first + count <= self.shape[0], "narrow out of range");
        let mut shape = self.shape.clone();
        shape[0] = count;
        let name = format!("{}[{first}..{}]", self.name, first + count);
        if let Some(p) = &self.prequant {
            // Stored codes need not be whole bytes per row (4-bit, odd k): offsets come from
            // the source, relative to where this view's bytes start. The source's rows are
            // the last dimension's: one element of the leading dimension of `[E, n, k]` is n.
            let per: usize = self.shape[1..self.shape.len().saturating_sub(1)]
                .iter()
                .product();
            let here = p.src.byte_range(p.row0, p.row0).start;
            let r0 = p.row0 + first * per;
            let want = p.src.byte_range(r0, r0 + count * per);
            return TensorRef {
                name,
                shape,
                start: self.start + (want.start - here),
                end: self.start + (want.end - here),
                prequant: Some(Prequant {
                    src: p.src.clone(),
                    row0: r0,
                }),
                ..self.clone()
            };
        }
        let row_bytes = self.size_bytes() / self.shape[0].max(1);
        TensorRef {
            name,
            path: self.path.clone(),
            dtype: self.dtype,
            shape,
            storage: self.storage.clone(),
            start: self.start + first * row_bytes,
            end: self.start + (first + count) * row_bytes,
            prequant: None,
        }
    }

    /// The same bytes as a 1-D tensor of all its elements (to take element ranges with
    /// [`TensorRef::narrow`]).
    pub(crate) fn flat(mut self) -> TensorRef {
        self.shape = vec![self.numel()];
        self
    }

    /// These stored codes as the pre-quantized weight `src` describes, of shape `shape`.
    pub(crate) fn with_source(
        mut self,
        src: Arc<crate::weights::prequant::Source>,
        shape: Vec<usize>,
    ) -> TensorRef {
        self.shape = shape;
        self.prequant = Some(Prequant { src, row0: 0 });
        self
    }

    /// Bytes of the tensors that describe a pre-quantized weight's codes (scales, tables), read
    /// only while converting it; 0 for any other tensor.
    pub fn prequant_aux_bytes(&self) -> u64 {
        self.prequant.as_ref().map_or(0, |p| p.src.aux_bytes())
    }

    /// Whether this is a pre-quantized weight still in its stored form.
    pub fn is_prequant(&self) -> bool {
        self.prequant.is_some()
    }

    /// For a pre-quantized weight: the type that holds it without loss (its own blocks
    /// repacked, or f32).
    pub fn lossless_dtype(&self) -> Option<Dtype> {
        self.prequant.as_ref().map(|p| p.src.lossless())
    }

    fn squeeze_first(mut self) -> TensorRef {
        self.shape.remove(0);
        self
    }

    /// Ensures the view is usable as typed compute weights: f32/bf16/f16 and aligned to the
    /// element size. A misaligned tensor (legal in safetensors, rare in practice) is copied once.
    pub fn into_compute(self) -> Result<TensorRef> {
        if self.prequant.is_some() {
            // Converted (to its lossless type or the requested quantization) before use.
            return Ok(self);
        }
        match self.dtype {
            Dtype::F32
            | Dtype::Bf16
            | Dtype::F16
            | Dtype::Q8_0
            | Dtype::Q4K
            | Dtype::F8B128
            | Dtype::Nf4
            | Dtype::Fp4
            | Dtype::Nf4Bf16
            | Dtype::Nf4F16
            | Dtype::Fp4Bf16
            | Dtype::Fp4F16
            | Dtype::Mxfp4 => {}
            other => {
                return Err(Error::UnsupportedDtype {
                    name: self.name,
                    path: (*self.path).clone(),
                    dtype: other.name().to_string(),
                })
            }
        }
        let align = match self.dtype.block() {
            Some(_) => 4,
            None => self.dtype.size_bytes(),
        };
        if self.is_virtual() || (self.bytes().as_ptr() as usize).is_multiple_of(align) {
            return Ok(self);
        }
        tracing::warn!(tensor = %self.name, "tensor is not aligned to its element size; copying it");
        Ok(self.to_owned_copy())
    }

    /// The same tensor copied into memory this process owns (8-byte aligned, huge pages
    /// advised when large), e.g. to keep hot weights off the page cache's small pages.
    pub fn to_owned_copy(&self) -> TensorRef {
        let owned: Result<TensorRef> = self.owned_as(self.dtype, false, |dst| {
            dst.copy_from_slice(self.bytes());
            Ok(())
        });
        owned.expect("a copy cannot fail")
    }

    /// The same tensor read into memory this process owns with positioned reads (large
    /// sequential reads, no page faults through the mapping, nothing left mapped afterwards).
    pub fn read_copy(&self) -> Result<TensorRef> {
        self.owned_as(self.dtype, false, |dst| self.read_into(dst))
    }

    /// This tensor (name, shape) as `dtype` in a buffer this process owns, `fill` writing its
    /// bytes: 8-byte aligned (enough for every float dtype and block type), huge pages advised
    /// when large. The byte length is `dtype`'s for the shape (the stored one for `self.dtype`).
    /// An owned tensor of `dtype` whose bytes `fill` writes: a copy of the stored bytes, or
    /// with `converts` a conversion (its result is plain values, even in the stored type, as a
    /// transposed float weight's is).
    fn owned_as(
        &self,
        dtype: Dtype,
        converts: bool,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<TensorRef> {
        let n = if !converts {
            self.size_bytes()
        } else {
            self.converted_row_bytes(dtype)
                .expect("a conversion that applies")
                * self.shape[0]
        };
        let mut words = crate::mem::zeroed_words(n.div_ceil(8));
        fill(&mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..n])?;
        Ok(TensorRef {
            dtype,
            storage: Arc::new(Storage::Words { words, len: n }),
            start: 0,
            end: n,
            // A copy of stored codes is still pre-quantized; a conversion is not.
            prequant: if converts {
                None
            } else {
                self.prequant.clone()
            },
            ..self.clone()
        })
    }

    /// Typed view for the kernels. Only valid after [`TensorRef::into_compute`], and never on
    /// a pre-quantized weight still in its stored form (loading converts every one).
    pub fn weights(&self) -> Weights<'_> {
        assert!(
            self.prequant.is_none(),
            "weights() on `{}` before its pre-quantized form was converted",
            self.name
        );
        typed_weights(self.bytes(), self.dtype)
    }

    /// Bytes of one row of this 2-D weight once converted to `to`, or `None` when `to` changes
    /// nothing (same type, not 2-D, no data) or the row length does not fit `to`'s block size
    /// (the caller keeps the source type).
    pub fn converted_row_bytes(&self, to: Dtype) -> Option<usize> {
        let (block, block_bytes) = match to {
            Dtype::Q8_0 | Dtype::Q4K => to.block()?,
            Dtype::Bf16 => (1, 2),
            // A pre-quantized weight also converts to f32, to f16 (bitsandbytes values rounded
            // to f16 are held by it exactly) and to its own lossless blocks.
            Dtype::F32 if self.prequant.is_some() => (1, 4),
            Dtype::F16 if self.prequant.is_some() => (1, 2),
            Dtype::F8B128
            | Dtype::Nf4
            | Dtype::Fp4
            | Dtype::Nf4Bf16
            | Dtype::Nf4F16
            | Dtype::Fp4Bf16
            | Dtype::Fp4F16
            | Dtype::Mxfp4
                if self.lossless_dtype() == Some(to) =>
            {
                to.block()?
            }
            _ => return None,
        };
        // (A pre-quantized weight stored in a float type, such as a transposed one, still
        // converts to that type.)
        if (self.dtype == to && self.prequant.is_none())
            || self.shape.len() != 2
            || self.is_virtual()
        {
            return None;
        }
        let k = self.shape[1];
        if k == 0 || !k.is_multiple_of(block) {
            return None;
        }
        Some(k / block * block_bytes)
    }

    /// Converts every row of this 2-D weight to `to` into `dst` (rows in order, each
    /// [`Self::converted_row_bytes`] long), rows in parallel; the bytes do not depend on the
    /// thread count. Panics when `to` does not apply or `dst` has the wrong length (callers
    /// check [`Self::converted_row_bytes`] first).
    pub fn convert_into(&self, to: Dtype, dst: &mut [u8]) -> Result<()> {
        self.convert_into_measured(to, dst, None)
    }

    /// [`TensorRef::convert_into`], adding to `error` what converting a pre-quantized weight
    /// to another type than its lossless one changes (each row decoded back and compared with
    /// its exact values).
    pub fn convert_into_measured(
        &self,
        to: Dtype,
        dst: &mut [u8],
        error: Option<&crate::weights::prequant::ConversionError>,
    ) -> Result<()> {
        use rayon::prelude::*;
        let row_bytes = self
            .converted_row_bytes(to)
            .expect("convert_into: conversion does not apply");
        let (n, k) = (self.shape[0], self.shape[1]);
        assert_eq!(dst.len(), n * row_bytes, "convert_into: destination size");
        if let Some(p) = &self.prequant {
            let (src, r0) = (&p.src, p.row0);
            let res = src.resolve(r0, r0 + n)?;
            let codes = self.bytes();
            src.check_codes(codes, r0)?;
            // The lossless block form is a copy of codes and scales; anything else goes
            // through the exact f32 values.
            let repack = Some(to) == self.lossless_dtype() && to.block().is_some();
            let lossless = Some(to) == self.lossless_dtype();
            let error = error.filter(|_| !repack && !lossless && to != Dtype::F32);
            dst.par_chunks_mut(row_bytes).enumerate().for_each_init(
                || (vec![0f32; k], vec![0f32; k]),
                |(row, back), (r, dst)| {
                    if repack {
                        src.pack_row(&res, codes, r0, r0 + r, dst);
                        return;
                    }
                    src.row_to_f32(&res, codes, r0, r0 + r, row);
                    encode_row(row, to, dst);
                    if let Some(error) = error {
                        decode_row(dst, to, back);
                        error.add(row, back);
                    }
                },
            );
            return Ok(());
        }
        let src = self.clone().into_compute()?;
        dst.par_chunks_mut(row_bytes).enumerate().for_each_init(
            || vec![0f32; k],
            |row, (r, dst)| {
                moe_kernels::row_to_f32(src.weights(), r, k, row);
                encode_row(row, to, dst);
            },
        );
        Ok(())
    }

    /// A quantized copy of a 2-D weight `[n, k]` (owned, 8-byte aligned), or `None` when the row
    /// length is not a multiple of the block size (the caller keeps the source type).
    /// Rows are quantized in parallel; the result does not depend on the thread count.
    pub fn quantize(&self, to: Dtype) -> Result<Option<TensorRef>> {
        self.quantize_measured(to, None)
    }

    /// [`TensorRef::quantize`] adding the error of a pre-quantized weight's conversion to
    /// `error` (see [`TensorRef::convert_into_measured`]).
    pub fn quantize_measured(
        &self,
        to: Dtype,
        error: Option<&crate::weights::prequant::ConversionError>,
    ) -> Result<Option<TensorRef>> {
        if self.converted_row_bytes(to).is_none() {
            return Ok(None);
        }
        self.owned_as(to, true, |dst| self.convert_into_measured(to, dst, error))
            .map(Some)
    }

    /// A view of `[start, end)` of `storage` as a tensor (for files this crate wrote itself,
    /// e.g. the quantized cache, whose extents the caller has checked against the file).
    pub(crate) fn in_storage(
        name: String,
        path: Arc<PathBuf>,
        dtype: Dtype,
        shape: Vec<usize>,
        storage: Arc<Storage>,
        start: usize,
        end: usize,
    ) -> TensorRef {
        assert!(
            start <= end && end <= storage.bytes().len(),
            "in_storage: extent"
        );
        TensorRef {
            name,
            path,
            dtype,
            shape,
            storage,
            start,
            end,
            prequant: None,
        }
    }

    /// The whole tensor converted to f32 (for small tensors: norms, biases).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        if self.is_virtual() {
            return Ok(vec![0.0; self.numel()]);
        }
        if self.prequant.is_some() && self.shape.len() >= 2 {
            // Rows of the last dimension, whatever the leading ones.
            let k = self.shape[self.shape.len() - 1];
            let mut rows = self.clone();
            rows.shape = vec![self.numel() / k.max(1), k];
            let mut out = vec![0u8; self.numel() * 4];
            rows.convert_into(Dtype::F32, &mut out)?;
            return Ok(out
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect());
        }
        let t = self.clone().into_compute()?;
        let n = t.numel();
        let mut out = vec![0f32; n];
        if n > 0 {
            moe_kernels::row_to_f32(t.weights(), 0, n, &mut out);
        }
        Ok(out)
    }
}

/// One row of f32 values written as `to` (f32, bf16, q8_0 or q4_k) into `dst`.
fn encode_row(row: &[f32], to: Dtype, dst: &mut [u8]) {
    let k = row.len();
    match to {
        Dtype::F32 => {
            for (d, x) in dst.chunks_exact_mut(4).zip(row) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
        Dtype::Bf16 => {
            for (d, x) in dst.chunks_exact_mut(2).zip(row) {
                d.copy_from_slice(&bf16::from_f32(*x).to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (d, x) in dst.chunks_exact_mut(2).zip(row) {
                d.copy_from_slice(&half::f16::from_f32(*x).to_le_bytes());
            }
        }
        Dtype::Q8_0 => {
            let mut blocks = vec![
                moe_kernels::BlockQ8_0 {
                    d: f16::ZERO,
                    qs: [0; 32]
                };
                k / 32
            ];
            moe_kernels::quant::quantize_row_q8_0(row, &mut blocks);
            dst.copy_from_slice(block_bytes(&blocks));
        }
        Dtype::Q4K => {
            let mut blocks = vec![
                moe_kernels::BlockQ4K {
                    d: f16::ZERO,
                    dmin: f16::ZERO,
                    scales: [0; 12],
                    qs: [0; 128]
                };
                k / 256
            ];
            moe_kernels::quant::quantize_row_q4_k(row, &mut blocks);
            dst.copy_from_slice(block_bytes(&blocks));
        }
        other => unreachable!("encode_row to {other:?}"),
    }
}

/// One row written by [`encode_row`] read back as f32 (bf16, q8_0, q4_k).
fn decode_row(bytes: &[u8], dtype: Dtype, out: &mut [f32]) {
    let k = out.len();
    let w = match dtype {
        Dtype::Bf16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
            return;
        }
        Dtype::Q8_0 => Weights::Q8_0(blocks_of(bytes)),
        Dtype::Q4K => Weights::Q4K(blocks_of(bytes)),
        other => unreachable!("decode_row from {other:?}"),
    };
    moe_kernels::row_to_f32(w, 0, k, out);
}

/// Stored bytes of a compute dtype as the kernels' typed view. Panics on bytes misaligned for
/// the type or not a whole number of elements (into_compute and the expert buffers guarantee
/// both), and on a dtype the kernels do not take.
pub(crate) fn typed_weights(b: &[u8], dtype: Dtype) -> Weights<'_> {
    match dtype {
        Dtype::F32 => Weights::F32(bytemuck::cast_slice::<u8, f32>(b)),
        Dtype::Bf16 => Weights::Bf16(bytemuck::cast_slice::<u8, bf16>(b)),
        Dtype::F16 => Weights::F16(bytemuck::cast_slice::<u8, f16>(b)),
        Dtype::Q8_0 => Weights::Q8_0(blocks_of::<moe_kernels::BlockQ8_0>(b)),
        Dtype::Q4K => Weights::Q4K(blocks_of::<moe_kernels::BlockQ4K>(b)),
        Dtype::F8B128 => Weights::F8(blocks_of::<moe_kernels::BlockF8>(b)),
        Dtype::Nf4 => Weights::Nf4(blocks_of::<moe_kernels::BlockNf4>(b)),
        Dtype::Fp4 => Weights::Fp4(blocks_of::<moe_kernels::BlockFp4>(b)),
        Dtype::Nf4Bf16 | Dtype::Nf4F16 | Dtype::Fp4Bf16 | Dtype::Fp4F16 => {
            let (table, round) = dtype.rounded4().expect("a rounded 4-bit dtype");
            Weights::Rounded4(moe_kernels::Rounded4 {
                blocks: blocks_of::<moe_kernels::BlockNf4>(b),
                table,
                round,
            })
        }
        Dtype::Mxfp4 => Weights::Mxfp4(blocks_of::<moe_kernels::BlockMxfp4>(b)),
        other => unreachable!("{other:?} is not a compute dtype (into_compute checks the dtype)"),
    }
}

/// The GGML-style weight blocks of moe-kernels, which are read from and written to raw bytes.
///
/// They cannot be `bytemuck::Pod` (a foreign trait on types of another crate), so this marker
/// lists them and [`blocks_of`] / [`block_bytes`] keep the two casts bytemuck would do.
///
/// # Safety
/// An implementor is `repr(C)`, has no padding bytes, and is valid for every bit pattern.
unsafe trait RawBlock: Copy {}

// Each block's size is the sum of its fields' sizes, so none has padding.
const _: () = assert!(std::mem::size_of::<moe_kernels::BlockQ8_0>() == 2 + 32);
const _: () = assert!(std::mem::size_of::<moe_kernels::BlockQ4K>() == 2 + 2 + 12 + 128);
const _: () = assert!(std::mem::size_of::<moe_kernels::BlockF8>() == 4 + 128);
const _: () = assert!(std::mem::size_of::<moe_kernels::BlockNf4>() == 4 + 32);
const _: () = assert!(std::mem::size_of::<moe_kernels::BlockFp4>() == 4 + 32);
const _: () = assert!(std::mem::size_of::<moe_kernels::BlockMxfp4>() == 1 + 16);

// SAFETY (all six): repr(C) structs of f16 / f32 / u8 scales and integer arrays; the assertions
// above prove there is no padding, and every bit pattern of f16, f32 and integers is valid.
unsafe impl RawBlock for moe_kernels::BlockQ8_0 {}
// SAFETY: as above.
unsafe impl RawBlock for moe_kernels::BlockQ4K {}
// SAFETY: as above.
unsafe impl RawBlock for moe_kernels::BlockF8 {}
// SAFETY: as above.
unsafe impl RawBlock for moe_kernels::BlockNf4 {}
// SAFETY: as above.
unsafe impl RawBlock for moe_kernels::BlockFp4 {}
// SAFETY: as above.
unsafe impl RawBlock for moe_kernels::BlockMxfp4 {}

/// Bytes viewed as blocks; panics on misaligned bytes or a partial block, as
/// `bytemuck::cast_slice` does (into_compute guarantees alignment and whole blocks).
fn blocks_of<T: RawBlock>(b: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    assert!(
        (b.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
            && b.len().is_multiple_of(size),
        "blocks_of on misaligned bytes (into_compute guarantees alignment)"
    );
    // SAFETY: alignment and length were checked just above; `T: RawBlock` is valid for every
    // bit pattern; the lifetime is tied to `b`.
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<T>(), b.len() / size) }
}

/// The bytes of a slice of blocks.
fn block_bytes<T: RawBlock>(blocks: &[T]) -> &[u8] {
    // SAFETY: `T: RawBlock` has no padding, so every byte of an initialised block is
    // initialised; u8 has alignment 1; the lifetime is tied to `blocks`.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
    }
}

/// All weight files of a model, with a name -> file map.
pub struct WeightSet {
    pub files: Vec<SafetensorsFile>,
    /// Planning without weight files: every requested tensor exists, with this dtype, no bytes.
    virtual_dtype: Option<Dtype>,
    by_name: HashMap<String, usize>,
    /// Names handed out through [`WeightSet::get`] (to report unused tensors), and their
    /// bytes (each counted once).
    used: parking_lot::Mutex<(HashSet<String>, u64)>,
    /// Sizes of the size-only tensors handed out by a virtual set.
    virtual_sizes: parking_lot::Mutex<HashMap<String, u64>>,
    label: String,
    prequant: Option<crate::weights::prequant::PrequantConfig>,
}

impl WeightSet {
    /// Opens `model.safetensors.index.json` and the shards it names, or `model.safetensors`.
    pub fn open(files: &ModelFiles) -> Result<WeightSet> {
        const INDEX: &str = "model.safetensors.index.json";
        const SINGLE: &str = "model.safetensors";
        let mut opened = Vec::new();
        let mut by_name = HashMap::new();
        if let Some(raw) = files.read_small(INDEX)? {
            let index_path = files.path_of(INDEX);
            // Typed first (fast on ~76k entries); anything it rejects is parsed again as
            // `Value`s so the error names the problem.
            #[derive(serde::Deserialize)]
            struct TypedIndex {
                weight_map: StringPairs,
            }
            let entries: Vec<(String, String)> = match serde_json::from_slice::<TypedIndex>(&raw) {
                Ok(t) => t.weight_map.0,
                Err(_) => {
                    let v: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| {
                        Error::bad_file(&index_path, format!("not valid JSON: {e}"))
                    })?;
                    let map = v
                        .get("weight_map")
                        .and_then(|m| m.as_object())
                        .ok_or_else(|| Error::bad_file(&index_path, "no `weight_map` object"))?;
                    map.iter()
                        .map(|(tensor, shard)| {
                            let shard = shard.as_str().ok_or_else(|| {
                                Error::bad_file(
                                    &index_path,
                                    format!("weight_map[`{tensor}`] is not a string"),
                                )
                            })?;
                            Ok((tensor.clone(), shard.to_string()))
                        })
                        .collect::<Result<_>>()?
                }
            };
            // Shards in name order for deterministic file numbering.
            let mut shard_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (tensor, shard) in entries {
                if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
                    return Err(Error::bad_file(
                        &index_path,
                        format!("shard name `{shard}` is not a plain file name"),
                    ));
                }
                shard_of.entry(shard).or_default().push(tensor);
            }
            for (shard, names) in shard_of {
                if !files.exists(&shard) {
                    return Err(Error::MissingShard {
                        index: index_path.clone(),
                        shard,
                    });
                }
                let f = SafetensorsFile::open(files, &shard)?;
                for n in &names {
                    if !f.tensors.contains_key(n) {
                        return Err(Error::bad_file(
                            &index_path,
                            format!(
                                "maps tensor `{n}` to `{shard}`, but that shard's header does not contain it"
                            ),
                        ));
                    }
                }
                let idx = opened.len();
                for n in names {
                    by_name.insert(n, idx);
                }
                opened.push(f);
            }
        } else if files.exists(SINGLE) {
            let f = SafetensorsFile::open(files, SINGLE)?;
            for n in f.tensors.keys() {
                by_name.insert(n.clone(), 0);
            }
            opened.push(f);
        } else {
            let hint = if files.exists("pytorch_model.bin")
                || files.exists("pytorch_model.bin.index.json")
            {
                " (only PyTorch .bin weights found; safetensors are required)"
            } else {
                ""
            };
            return Err(Error::ModelNotFound {
                spec: files.label(),
                reason: format!("no {SINGLE} or {INDEX}{hint}"),
            });
        }
        Ok(WeightSet {
            virtual_dtype: None,
            files: opened,
            by_name,
            used: parking_lot::Mutex::new((HashSet::new(), 0)),
            virtual_sizes: parking_lot::Mutex::new(HashMap::new()),
            label: files.label(),
            prequant: None,
        })
    }

    /// A weight set with no files: `get` hands out size-only tensors of `dtype` with the shape
    /// asked for, so a model can be planned from its config.json alone. `contains` is false for
    /// every name (architectures then pick their Hub-layout names).
    pub fn virtual_set(dtype: Dtype, label: impl Into<String>) -> WeightSet {
        WeightSet {
            files: Vec::new(),
            virtual_dtype: Some(dtype),
            by_name: HashMap::new(),
            used: parking_lot::Mutex::new((HashSet::new(), 0)),
            virtual_sizes: parking_lot::Mutex::new(HashMap::new()),
            label: label.into(),
            prequant: None,
        }
    }

    pub fn is_virtual(&self) -> bool {
        self.virtual_dtype.is_some()
    }

    /// Where the weights come from (the model folder, or the embedded demo's name).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether tensor `name` exists: stored under that name, or as an MXFP4 pair
    /// (`<name>_blocks` with `<name>_scales`), which [`WeightSet::get`] opens as one weight.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name) || self.is_mxfp4_pair(name)
    }

    /// Whether `name` is not stored itself but as MXFP4 codes `<name>_blocks` (its scales are
    /// checked when it is opened).
    fn is_mxfp4_pair(&self, name: &str) -> bool {
        !self.by_name.contains_key(name) && self.by_name.contains_key(&format!("{name}_blocks"))
    }

    /// Bytes of the tensors handed out so far (each counted once).
    pub fn used_bytes(&self) -> u64 {
        if self.is_virtual() {
            return self.virtual_sizes.lock().values().sum();
        }
        self.used.lock().1
    }

    /// Header info of a tensor, without marking it used.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name
            .get(name)
            .and_then(|&i| self.files[i].tensors.get(name))
    }

    /// A view of tensor `name`, checked against `shape` when given.
    pub fn get(&self, name: &str, shape: Option<&[usize]>) -> Result<TensorRef> {
        if let Some(dtype) = self.virtual_dtype {
            let shape = shape.map(<[usize]>::to_vec).unwrap_or_default();
            let dtype = self.virtual_prequant(name, &shape).unwrap_or(dtype);
            let size = dtype.bytes_for(shape.iter().product::<usize>());
            self.virtual_sizes
                .lock()
                .insert(name.to_string(), size as u64);
            return Ok(TensorRef {
                name: name.to_string(),
                path: Arc::new(PathBuf::from(&self.label)),
                dtype,
                shape,
                storage: Arc::new(Storage::Virtual),
                start: 0,
                end: size,
                prequant: None,
            });
        }
        if self.is_mxfp4_pair(name) {
            return crate::weights::prequant::open_mxfp4(self, name, shape, self.prequant.as_ref());
        }
        let &fi = self.by_name.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            files: self.label.clone(),
        })?;
        let file = &self.files[fi];
        let info = &file.tensors[name];
        let prequant = info.dtype == Dtype::F8E4M3
            || (info.dtype == Dtype::U8 && self.by_name.contains_key(&format!("{name}.absmax")));
        if let (Some(shape), false) = (shape, prequant) {
            if info.shape != shape {
                return Err(Error::ShapeMismatch {
                    name: name.to_string(),
                    path: file.path.clone(),
                    expected: shape.to_vec(),
                    found: info.shape.clone(),
                });
            }
        }
        let mut used = self.used.lock();
        if used.0.insert(name.to_string()) {
            used.1 += info.size_bytes() as u64;
        }
        drop(used);
        let t = TensorRef {
            name: name.to_string(),
            path: Arc::new(file.path.clone()),
            dtype: info.dtype,
            shape: info.shape.clone(),
            storage: file.storage.clone(),
            start: info.start,
            end: info.end,
            prequant: None,
        };
        if prequant {
            return crate::weights::prequant::open(self, name, shape, t, self.prequant.as_ref());
        }
        Ok(t)
    }

    /// Planning a pre-quantized checkpoint from its config alone: the type a decoder-layer
    /// projection `name` of `shape` takes once loaded (its lossless form, as a real load
    /// converts it), or None for tensors such checkpoints keep as stored (embeddings, norms,
    /// routers and gates, the head, `modules_to_not_convert`).
    fn virtual_prequant(&self, name: &str, shape: &[usize]) -> Option<Dtype> {
        let config = self.prequant.as_ref()?;
        if let crate::weights::prequant::PrequantConfig::Mxfp4 { not_convert } = config {
            // gpt-oss names its expert weights without `.weight` (`experts.gate_up_proj`,
            // stored as `_blocks` / `_scales`); everything else stays as stored.
            let last = name.rsplit('.').next()?;
            let k = *shape.last()?;
            let listed = not_convert
                .iter()
                .any(|p| crate::weights::prequant::module_matches(p, name));
            let mx = name.contains(".experts.")
                && last.ends_with("_proj")
                && shape.len() >= 2
                && k.is_multiple_of(moe_kernels::QK_MX)
                && !listed;
            return mx.then_some(Dtype::Mxfp4);
        }
        let module = name.strip_suffix(".weight")?;
        let last = module.rsplit('.').next()?;
        // `*_proj`, MLA's `kv_a_proj_with_mqa` and the DeltaNet's fused `in_proj_qkvz` (its
        // small `in_proj_ba` is kept exact, as releases keep it).
        let projection =
            last.ends_with("_proj") || last == "kv_a_proj_with_mqa" || last == "in_proj_qkvz";
        if shape.len() != 2 || !module.contains(".layers.") || !projection {
            return None;
        }
        let k = shape[1];
        match config {
            crate::weights::prequant::PrequantConfig::Fp8 { block, not_convert } => {
                let listed = not_convert
                    .iter()
                    .any(|m| module == m || module.ends_with(&format!(".{m}")));
                if listed {
                    return None;
                }
                let bk = block.map_or(k, |b| b[1]);
                let (w, _) = Dtype::F8B128.block()?;
                Some(if k.is_multiple_of(w) && bk.is_multiple_of(w) {
                    Dtype::F8B128
                } else {
                    Dtype::F32
                })
            }
            crate::weights::prequant::PrequantConfig::Mxfp4 { .. } => None,
            crate::weights::prequant::PrequantConfig::Bnb4 { quant_type, .. } => {
                let (w, _) = Dtype::Nf4.block()?;
                Some(if !k.is_multiple_of(w) {
                    Dtype::F32
                } else if *quant_type == crate::weights::prequant::Code4::Nf4 {
                    Dtype::Nf4
                } else {
                    Dtype::Fp4
                })
            }
        }
    }

    /// The pre-quantized format named by `quantization_config`, for logs.
    pub fn prequant_label(&self) -> String {
        self.prequant
            .as_ref()
            .map_or_else(|| "no quantization_config".into(), |p| p.label())
    }

    /// What `quantization_config` says about pre-quantized weights (read by [`WeightSet::get`]).
    pub fn set_prequant(&mut self, config: Option<crate::weights::prequant::PrequantConfig>) {
        self.prequant = config;
    }

    /// Float weight `name` stored input-major (`[E, k, rows]`) as the out-major weight of
    /// `shape` = `[E, rows, k]` the kernels read: loading transposes each matrix (values
    /// unchanged; see `prequant::open_transposed`). A set built from `config.json` alone has
    /// the sizes only.
    pub fn transposed(&self, name: &str, shape: &[usize]) -> Result<TensorRef> {
        if self.is_virtual() {
            return self.compute(name, shape);
        }
        crate::weights::prequant::open_transposed(self, name, shape)
    }

    /// Like [`WeightSet::get`] but for float weights used in compute (dtype + alignment checked).
    pub fn compute(&self, name: &str, shape: &[usize]) -> Result<TensorRef> {
        self.get(name, Some(shape))?.into_compute()
    }

    /// Names present in the files but never requested, sorted.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock();
        let mut v: Vec<String> = self
            .by_name
            .keys()
            .filter(|n| !used.0.contains(*n))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Total bytes of all tensors in the set.
    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| f.tensors.values())
            .map(|t| t.size_bytes() as u64)
            .sum()
    }
}

/// Serialises tensors as a safetensors file image (header padded so data is 8-byte aligned).
/// Each entry is (name, dtype, shape, little-endian bytes).
pub fn safetensors_bytes(tensors: &[(&str, Dtype, &[usize], &[u8])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in tensors {
        debug_assert_eq!(
            bytes.len(),
            shape.iter().product::<usize>() * dtype.size_bytes()
        );
        header.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": dtype.name(),
                "shape": shape,
                "data_offsets": [offset, offset + bytes.len()],
            }),
        );
        offset += bytes.len();
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_views_read_the_stored_bytes() {
        // Eight-byte aligned storage, as into_compute and the expert buffers give.
        let words_for = |bytes: &[u8]| {
            let mut words = vec![0u64; bytes.len().div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
            words
        };
        let floats = [1.5f32, -2.0, 0.25, 7.0];
        let bytes: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
        let words = words_for(&bytes);
        let view = &bytemuck::cast_slice::<u64, u8>(&words)[..bytes.len()];
        assert!(matches!(typed_weights(view, Dtype::F32), Weights::F32(w) if w == floats));
        let halves: Vec<bf16> = floats.iter().map(|&f| bf16::from_f32(f)).collect();
        let bytes: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
        let words = words_for(&bytes);
        let view = &bytemuck::cast_slice::<u64, u8>(&words)[..bytes.len()];
        assert!(matches!(typed_weights(view, Dtype::Bf16), Weights::Bf16(w) if w == halves));

        // Blocks written as bytes read back as the same blocks, in the layout GGML stores.
        let row: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin()).collect();
        for dtype in [Dtype::Q8_0, Dtype::Q4K] {
            let n = dtype.bytes_for(row.len());
            let mut bytes = vec![0u8; n];
            encode_row(&row, dtype, &mut bytes);
            let words = words_for(&bytes);
            let view = &bytemuck::cast_slice::<u64, u8>(&words)[..n];
            match typed_weights(view, dtype) {
                Weights::Q8_0(blocks) => {
                    assert_eq!(blocks.len(), 16);
                    assert_eq!(block_bytes(blocks), &bytes[..]);
                    assert_eq!(blocks[0].d.to_le_bytes(), [bytes[0], bytes[1]]);
                    assert_eq!(blocks[1].qs[0] as u8, bytes[34 + 2]);
                }
                Weights::Q4K(blocks) => {
                    assert_eq!(blocks.len(), 2);
                    assert_eq!(block_bytes(blocks), &bytes[..]);
                    assert_eq!(blocks[1].qs[127], bytes[144 + 4 + 12 + 127]);
                }
                _ => panic!("{dtype:?} viewed as another type"),
            }
            let mut back = vec![0f32; row.len()];
            decode_row(view, dtype, &mut back);
            let mut direct = vec![0f32; row.len()];
            moe_kernels::row_to_f32(typed_weights(view, dtype), 0, row.len(), &mut direct);
            assert_eq!(back, direct);
        }
    }

    #[test]
    #[should_panic(expected = "misaligned")]
    fn typed_views_refuse_misaligned_blocks() {
        let words = [0u64; 10];
        let bytes = bytemuck::cast_slice::<u64, u8>(&words);
        // Block types align to 2 (Q8_0): an odd offset cannot be viewed.
        let _ = typed_weights(&bytes[1..35], Dtype::Q8_0);
    }

    fn write_st(path: &Path, header: &str, data_len: usize) {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.resize(b.len() + data_len, 0);
        std::fs::write(path, b).unwrap();
    }

    #[test]
    fn parses_and_bounds_checks() {
        let dir = tempfile::tempdir().unwrap();
        let files = ModelFiles::Dir(dir.path().to_path_buf());
        let h = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"__metadata__":{"format":"pt"}}"#;
        write_st(&dir.path().join("model.safetensors"), h, 16);
        let ws = WeightSet::open(&files).unwrap();
        let t = ws.compute("a", &[2, 2]).unwrap();
        assert_eq!(t.numel(), 4);
        assert!(matches!(
            ws.get("a", Some(&[4])),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            ws.get("b", None),
            Err(Error::MissingTensor { .. })
        ));

        // Offsets past the end of the file.
        write_st(&dir.path().join("model.safetensors"), h, 8);
        let err = WeightSet::open(&files).err().unwrap().to_string();
        assert!(err.contains("run past the data region"), "{err}");
        // Header length past the end.
        std::fs::write(dir.path().join("model.safetensors"), 1000u64.to_le_bytes()).unwrap();
        let err = WeightSet::open(&files).err().unwrap().to_string();
        assert!(err.contains("header length"), "{err}");
        // Byte count not matching the shape.
        let h2 = r#"{"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,4]}}"#;
        write_st(&dir.path().join("model.safetensors"), h2, 4);
        let err = WeightSet::open(&files).err().unwrap().to_string();
        assert!(err.contains("expected 6"), "{err}");
    }

    #[test]
    fn serialised_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let vals: Vec<u8> = [1.5f32, -2.0, 3.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let img =
            safetensors_bytes(&[("x", Dtype::F32, &[3], &vals), ("e", Dtype::I64, &[0], &[])]);
        std::fs::write(dir.path().join("model.safetensors"), img).unwrap();
        let ws = WeightSet::open(&ModelFiles::Dir(dir.path().to_path_buf())).unwrap();
        assert_eq!(
            ws.compute("x", &[3]).unwrap().to_f32_vec().unwrap(),
            vec![1.5, -2.0, 3.25]
        );
        assert_eq!(ws.info("e").unwrap().dtype, Dtype::I64);
    }

    /// The error (as its one-line message) of parsing a file of `header` and `data_len` bytes.
    /// A safetensors image of `header` followed by `data_len` zero bytes.
    fn image(header: &str, data_len: usize) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.resize(b.len() + data_len, 0);
        b
    }

    fn refusal(header: &str, data_len: usize) -> String {
        let err = parse_header(&image(header, data_len), Path::new("m.safetensors"))
            .expect_err("refused")
            .to_string();
        assert!(err.starts_with("m.safetensors: "), "{err}");
        assert!(!err.contains('\n'), "{err}");
        err
    }

    fn accepted(header: &str, data_len: usize) -> BTreeMap<String, TensorInfo> {
        parse_header(&image(header, data_len), Path::new("m.safetensors")).unwrap()
    }

    #[test]
    fn overlapping_tensors_are_refused() {
        let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
        let err = refusal(h, 24);
        assert!(err.contains("`a` [0, 16] and `b` [8, 24] overlap"), "{err}");
        // The same range twice (two names on the same bytes).
        let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let err = refusal(h, 16);
        assert!(err.contains("overlap"), "{err}");
        // A zero-sized tensor inside another one.
        let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"z":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}}"#;
        let err = refusal(h, 16);
        assert!(
            err.contains("`z` starts at byte 8, before `a` ends at 16"),
            "{err}"
        );
    }

    #[test]
    fn gaps_and_trailing_bytes_are_refused() {
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#;
        let err = refusal(h, 20);
        assert!(err.contains("leave a gap: bytes [8, 12)"), "{err}");
        let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[4,20]}}"#;
        let err = refusal(h, 20);
        assert!(
            err.contains("tensor `a`") && err.contains("[0, 4)"),
            "{err}"
        );
        let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let err = refusal(h, 20);
        assert!(
            err.contains(
                "data region is 20 bytes but the last tensor `a` ends at byte 16: 4 trailing bytes"
            ),
            "{err}"
        );
        let err = refusal(r#"{"__metadata__":{"format":"pt"}}"#, 3);
        assert!(err.contains("no tensors"), "{err}");
    }

    #[test]
    fn header_length_one_byte_off_is_refused() {
        // A padded header, as every writer makes it: one byte short still parses as JSON (one
        // space less) but would shift every tensor by a byte.
        let vals: Vec<u8> = (0..16).collect();
        let mut img = safetensors_bytes(&[
            ("a", Dtype::F32, &[2], &vals[..8]),
            ("b", Dtype::F32, &[2], &vals[8..]),
        ]);
        assert!(parse_header(&img, Path::new("m.safetensors")).is_ok());
        let n = u64::from_le_bytes(img[..8].try_into().unwrap());
        assert_eq!(img[8 + n as usize - 1], b' ', "padded");
        img[..8].copy_from_slice(&(n - 1).to_le_bytes());
        let err = parse_header(&img, Path::new("m.safetensors"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("1 trailing bytes, or a wrong header length"),
            "{err}"
        );
        // One byte long: the data region is a byte short of the last tensor.
        img[..8].copy_from_slice(&(n + 1).to_le_bytes());
        assert!(parse_header(&img, Path::new("m.safetensors")).is_err());
    }

    #[test]
    fn header_limits_metadata_and_duplicates_follow_the_format() {
        // Over the format's header limit (refused before looking at the file length).
        let mut b = 150_000_000u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        let err = parse_header(&b, Path::new("m.safetensors"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("over the format's limit"), "{err}");
        // `__metadata__` must be an object of strings.
        let h =
            r#"{"__metadata__":{"format":1},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let err = refusal(h, 1);
        assert!(err.contains("not an object of strings"), "{err}");
        // A name twice.
        let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let err = refusal(h, 2);
        assert!(err.contains("tensor `a` appears twice"), "{err}");
        // Offsets that end before they begin.
        let h = r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[1,0]}}"#;
        let err = refusal(h, 1);
        assert!(err.contains("end before they begin"), "{err}");
    }

    #[test]
    fn any_entry_order_and_empty_tensors_are_accepted() {
        // Entries in any order (the official library sorts by offsets); zero-sized tensors
        // share an offset with their neighbours; trailing spaces pad the header; metadata null.
        let h = r#"{"b":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]},"e":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"z":{"dtype":"I64","shape":[0],"data_offsets":[8,8]},"__metadata__":null}    "#;
        let t = accepted(h, 8);
        assert_eq!(t.len(), 4);
        let data_start = 8 + h.len();
        assert_eq!((t["b"].start - data_start, t["b"].end - data_start), (4, 8));
        assert!(accepted("{}", 0).is_empty());
    }

    /// Every checkpoint the project ships or writes still opens under the strict checks: the
    /// test fixtures (written by the official library), the demo model, and `synth` output.
    #[test]
    fn fixtures_demo_and_synth_models_open() {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "safetensors") {
                    out.push(p);
                }
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut found = Vec::new();
        walk(&root.join("../tests/fixtures"), &mut found);
        walk(&root.join("demo"), &mut found);
        assert!(found.len() > 20, "{found:?}");
        for p in &found {
            let files = ModelFiles::Dir(p.parent().unwrap().to_path_buf());
            let name = p.file_name().unwrap().to_str().unwrap();
            SafetensorsFile::open(&files, name).unwrap_or_else(|e| panic!("{e}"));
        }
        WeightSet::open(&crate::demo::files()).unwrap();
        for (arch, preset) in [("qwen3_moe", "demo"), ("qwen3_next", "next-demo")] {
            let dir = tempfile::tempdir().unwrap();
            let opts = crate::synth::SynthOptions {
                arch: arch.into(),
                preset: preset.into(),
                layers: Some(2),
                seed: 1,
                out: dir.path().to_path_buf(),
                // Small shards, so several files (and the index) are checked.
                shard_bytes: Some(256 << 10),
                overwrite: false,
            };
            crate::synth::synth(&opts, &mut |_, _| {}).unwrap();
            let ws = WeightSet::open(&ModelFiles::Dir(dir.path().to_path_buf())).unwrap();
            assert!(ws.files.len() > 1, "{arch}: {} shards", ws.files.len());
        }
    }

    #[test]
    fn index_must_match_shards() {
        let dir = tempfile::tempdir().unwrap();
        let files = ModelFiles::Dir(dir.path().to_path_buf());
        let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        write_st(&dir.path().join("s1.safetensors"), h, 4);
        let idx = dir.path().join("model.safetensors.index.json");
        std::fs::write(
            &idx,
            r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#,
        )
        .unwrap();
        assert!(matches!(
            WeightSet::open(&files),
            Err(Error::MissingShard { .. })
        ));
        std::fs::write(
            &idx,
            r#"{"weight_map":{"a":"s1.safetensors","b":"s1.safetensors"}}"#,
        )
        .unwrap();
        let err = WeightSet::open(&files).err().unwrap().to_string();
        assert!(err.contains("does not contain"), "{err}");
        std::fs::write(&idx, r#"{"weight_map":{"a":"s1.safetensors"}}"#).unwrap();
        let ws = WeightSet::open(&files).unwrap();
        assert!(ws.contains("a"));
        assert_eq!(ws.unused(), vec!["a".to_string()]);
    }
}
