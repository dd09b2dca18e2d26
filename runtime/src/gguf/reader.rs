//! The GGUF header reader: metadata and tensor infos, every length checked against the
//! file before it is used.
//!
//! What must always hold: every count and length read from the file is checked against the
//! bytes left in the file and against a fixed limit before anything is allocated for it, so
//! a damaged or hostile header costs at most a small multiple of its own size in memory and
//! time, and ends in a [`GgufError::Format`] naming the file, never a panic.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{
    align_up, GgmlType, GgufError, Value, ValueType, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC,
    MAX_DIMS, VERSION,
};

/// One tensor's info as stored in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// GGML dims, `ne[0]` innermost.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Absolute file offset of the data.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

/// A parsed GGUF header.
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: u64,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    pub file_len: u64,
}

/// Most items reserved up front from a count read from the file (the rest grow as
/// they are read), so a lying count cannot make a large allocation.
const PREALLOC: u64 = 1 << 12;

/// Longest metadata key or tensor name: real ones are dotted paths of under 100 bytes
/// (GGML itself stops at 64), so anything longer is damage, refused before it is read.
const MAX_NAME_BYTES: u64 = 4096;
/// Longest metadata string: the longest real ones (chat templates) are tens of KB.
const MAX_STRING_BYTES: u64 = 64 << 20;
/// Most elements of one metadata array: the largest real ones (a tokenizer's vocabulary or
/// merges) have a few hundred thousand.
const MAX_ARRAY_ITEMS: u64 = 1 << 24;
/// Most metadata entries: real files have tens to a few hundred.
const MAX_METADATA: u64 = 1 << 16;
/// Most tensors: the largest checkpoints (512 experts x 48 layers x 3 projections, each a
/// tensor in our cache) have under 100k.
const MAX_TENSORS: u64 = 1 << 22;

struct Cursor<'a, R> {
    r: R,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl<R: Read> Cursor<'_, R> {
    fn bad(&self, msg: String) -> GgufError {
        GgufError::Format {
            path: self.path.to_path_buf(),
            msg,
        }
    }

    /// Errors unless `n` more bytes exist.
    fn need(&self, n: u64, what: &str) -> Result<(), GgufError> {
        if self.len.saturating_sub(self.pos) < n {
            return Err(self.bad(format!(
                "truncated: {what} needs {n} bytes at offset {}, file is {} bytes",
                self.pos, self.len
            )));
        }
        Ok(())
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>, GgufError> {
        self.need(n, what)?;
        let mut buf = vec![0u8; n as usize];
        self.r
            .read_exact(&mut buf)
            .map_err(|source| GgufError::Io {
                op: "read",
                path: self.path.to_path_buf(),
                source,
            })?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let v = self.bytes(N as u64, what)?;
        Ok(v.try_into().expect("length N"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A string of at most `max` bytes.
    fn string_max(&mut self, max: u64, what: &str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        if n > max {
            return Err(self.bad(format!(
                "{what}: length {n} at offset {} is over the limit of {max} bytes",
                self.pos - 8
            )));
        }
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|_| self.bad(format!("{what} is not UTF-8")))
    }

    fn scalar(&mut self, ty: ValueType, what: &str) -> Result<Value, GgufError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::Bool => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.bad(format!("{what}: bool byte {b}"))),
            },
            ValueType::String => Value::String(self.string_max(MAX_STRING_BYTES, what)?),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Array => return Err(self.bad(format!("{what}: nested array"))),
        })
    }

    fn value_type(&mut self, what: &str) -> Result<ValueType, GgufError> {
        let id = self.u32(what)?;
        ValueType::from_id(id).ok_or_else(|| self.bad(format!("{what}: unknown value type {id}")))
    }

    fn value(&mut self, what: &str) -> Result<Value, GgufError> {
        let ty = self.value_type(what)?;
        if ty != ValueType::Array {
            return self.scalar(ty, what);
        }
        let elem = self.value_type(what)?;
        let count = self.u64(what)?;
        if count > MAX_ARRAY_ITEMS {
            return Err(self.bad(format!(
                "{what}: array of {count} items is over the limit of {MAX_ARRAY_ITEMS}"
            )));
        }
        // Smallest encoding of one element: scalars their size, strings their length.
        let min = elem.scalar_bytes().unwrap_or(8);
        self.need(count.saturating_mul(min), what)?;
        let mut items = Vec::with_capacity(count.min(PREALLOC) as usize);
        for _ in 0..count {
            items.push(self.scalar(elem, what)?);
        }
        Ok(Value::Array(elem, items))
    }
}

impl GgufFile {
    /// Reads and checks the header of the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |op: &'static str| {
            move |source| GgufError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        };
        let file = File::open(path).map_err(io("open"))?;
        let len = file.metadata().map_err(io("stat"))?.len();
        Self::read_header(BufReader::with_capacity(1 << 16, file), len, path)
    }

    /// Reads and checks the header of a whole GGUF file held in `bytes` (`path` names it in
    /// errors); the same checks as [`GgufFile::open`].
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<GgufFile, GgufError> {
        Self::read_header(bytes, bytes.len() as u64, path)
    }

    /// The header parse over `r`, the start of a file of `len` bytes.
    fn read_header<R: Read>(r: R, len: u64, path: &Path) -> Result<GgufFile, GgufError> {
        let mut c = Cursor {
            r,
            pos: 0,
            len,
            path,
        };
        let magic: [u8; 4] = c.array("magic")?;
        if magic != MAGIC {
            return Err(c.bad(format!("bad magic {magic:02x?} (expected \"GGUF\")")));
        }
        let version = c.u32("version")?;
        if version != VERSION {
            return Err(c.bad(format!("version {version} unsupported (only {VERSION})")));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        if n_tensors > MAX_TENSORS || n_kv > MAX_METADATA {
            return Err(c.bad(format!(
                "{n_tensors} tensors and {n_kv} metadata entries: over the limits of {MAX_TENSORS} and {MAX_METADATA}"
            )));
        }
        // Each KV takes at least 13 bytes (key length, type, one byte); each tensor info
        // at least 32 (name length, n_dims, one dim, type, offset).
        c.need(n_kv.saturating_mul(13), "metadata")?;

        let mut metadata = Vec::with_capacity(n_kv.min(PREALLOC) as usize);
        let mut keys = HashSet::new();
        for i in 0..n_kv {
            let key = c.string_max(MAX_NAME_BYTES, &format!("metadata key #{i}"))?;
            let v = c.value(&format!("metadata {key:?}"))?;
            if !keys.insert(key.clone()) {
                return Err(c.bad(format!("metadata key {key:?} appears twice")));
            }
            metadata.push((key, v));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            None => DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) if a.is_power_of_two() => u64::from(*a),
            Some((_, v)) => {
                return Err(c.bad(format!(
                    "{ALIGNMENT_KEY} is {v:?}, expected a power of two (u32)"
                )))
            }
        };

        c.need(n_tensors.saturating_mul(32), "tensor infos")?;
        let mut tensors = Vec::with_capacity(n_tensors.min(PREALLOC) as usize);
        let mut names = HashSet::new();
        for i in 0..n_tensors {
            let name = c.string_max(MAX_NAME_BYTES, &format!("tensor #{i} name"))?;
            let what = format!("tensor {name:?}");
            let n_dims = c.u32(&what)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.bad(format!("{what}: {n_dims} dims (1 to {MAX_DIMS} allowed)")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64(&what)?);
            }
            let id = c.u32(&what)?;
            let ty = GgmlType::from_id(id)
                .ok_or_else(|| c.bad(format!("{what}: unknown ggml type {id}")))?;
            let size = ty
                .tensor_bytes(&dims)
                .map_err(|m| c.bad(format!("{what}: {m}")))?;
            let offset = c.u64(&what)?;
            if !offset.is_multiple_of(alignment) {
                return Err(c.bad(format!(
                    "{what}: offset {offset} not a multiple of the alignment {alignment}"
                )));
            }
            if !names.insert(name.clone()) {
                return Err(c.bad(format!("{what} appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                size,
            });
        }
        let data_offset = align_up(c.pos, alignment).expect("pos <= file length");
        let mut extents = Vec::with_capacity(tensors.len());
        for t in &mut tensors {
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.size));
            match (start, end) {
                (Some(s), Some(e)) if e <= len => {
                    t.offset = s;
                    extents.push((s, e, t.name.as_str()));
                }
                _ => {
                    return Err(c.bad(format!(
                        "tensor {:?}: data at offset {} + {} bytes passes the end of the file ({} bytes)",
                        t.name, t.offset, t.size, len
                    )))
                }
            }
        }
        extents.sort_unstable();
        for w in extents.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(c.bad(format!("tensors {:?} and {:?} overlap", w[0].2, w[1].2)));
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            alignment,
            metadata,
            tensors,
            data_offset,
            file_len: len,
        })
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads `len` bytes of tensor `name`'s data starting `start` bytes into it.
    pub fn read_tensor_range(
        &self,
        name: &str,
        start: u64,
        len: u64,
    ) -> Result<Vec<u8>, GgufError> {
        let bad = |msg: String| GgufError::Format {
            path: self.path.clone(),
            msg,
        };
        let t = self
            .tensor(name)
            .ok_or_else(|| bad(format!("no tensor {name:?}")))?;
        if start.checked_add(len).is_none_or(|e| e > t.size) {
            return Err(bad(format!(
                "range {start}+{len} outside tensor {name:?} ({} bytes)",
                t.size
            )));
        }
        let io = |op: &'static str| {
            move |source| GgufError::Io {
                op,
                path: self.path.clone(),
                source,
            }
        };
        let mut f = File::open(&self.path).map_err(io("open"))?;
        f.seek(SeekFrom::Start(t.offset + start))
            .map_err(io("seek"))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf).map_err(io("read"))?;
        Ok(buf)
    }

    /// Reads all of tensor `name`'s data.
    pub fn read_tensor(&self, name: &str) -> Result<Vec<u8>, GgufError> {
        let size = self.tensor(name).map_or(0, |t| t.size);
        self.read_tensor_range(name, 0, size)
    }
}
