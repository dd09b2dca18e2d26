//! The streaming GGUF writer: header from the specs first, then tensor data in any
//! chunking, padding between tensors, atomic replace at [`GgufWriter::finish`].

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{
    align_up, GgmlType, GgufError, Value, ValueType, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC,
    VERSION,
};

/// One tensor to write: name, GGML dims (`ne[0]` innermost) and element type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dims: Vec<u64>, ty: GgmlType) -> Self {
        TensorSpec {
            name: name.into(),
            dims,
            ty,
        }
    }
}

/// Placement of one tensor in the data section.
#[derive(Debug, Clone)]
struct Slot {
    name: String,
    offset: u64,
    size: u64,
}

/// Writes one GGUF file. [`GgufWriter::create`] writes the header; then
/// [`GgufWriter::write`] takes the tensors' data in spec order, in chunks of any size
/// (a chunk may span tensors; padding is inserted); [`GgufWriter::finish`] checks every
/// byte arrived, fsyncs and renames the temp file into place. Dropping the writer
/// unfinished removes the temp file.
pub struct GgufWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    slots: Vec<Slot>,
    alignment: u64,
    data_start: u64,
    /// Bytes written into the data section so far (padding included).
    pos: u64,
    /// Index of the tensor receiving data.
    current: usize,
    /// The header as written (magic to the start of the data section).
    header: Vec<u8>,
    /// Bytes written to the file so far, header included.
    written: u64,
    /// Test hook: writes past this many bytes fail with an injected error.
    fail_after: Option<u64>,
    /// Each metadata value's key, type and byte range in the header (for
    /// [`GgufWriter::replace_metadata`]).
    values: Vec<(String, ValueType, std::ops::Range<usize>)>,
}

const ZEROS: [u8; 4096] = [0; 4096];

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_scalar(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(..) => unreachable!("arrays are checked to hold scalars or strings"),
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    if let Value::Array(elem, items) = v {
        out.extend_from_slice(&elem.id().to_le_bytes());
        out.extend_from_slice(&(items.len() as u64).to_le_bytes());
        for item in items {
            put_scalar(out, item);
        }
    } else {
        put_scalar(out, v);
    }
}

impl GgufWriter {
    /// Validates the specs, lays out the file and writes the header to a temp file
    /// next to `path`. `alignment` (a power of two; [`DEFAULT_ALIGNMENT`] is llama.cpp's
    /// default) aligns every tensor's data; when it is not the default the
    /// `general.alignment` key is added (or must already be there with that value).
    pub fn create(
        path: &Path,
        metadata: &[(String, Value)],
        tensors: &[TensorSpec],
        alignment: u64,
    ) -> Result<GgufWriter, GgufError> {
        let usage = |msg: String| GgufError::Usage {
            path: path.to_path_buf(),
            msg,
        };
        if alignment == 0 || !alignment.is_power_of_two() || alignment > u32::MAX as u64 {
            return Err(usage(format!(
                "alignment {alignment} is not a power of two that fits u32"
            )));
        }
        let mut kvs: Vec<(&str, Value)> = Vec::with_capacity(metadata.len() + 1);
        let mut keys = HashSet::new();
        for (k, v) in metadata {
            if !keys.insert(k.as_str()) {
                return Err(usage(format!("metadata key {k:?} given twice")));
            }
            if k == ALIGNMENT_KEY && *v != Value::U32(alignment as u32) {
                return Err(usage(format!(
                    "{ALIGNMENT_KEY} is {v:?} but the alignment is {alignment} (u32)"
                )));
            }
            if let Value::Array(elem, items) = v {
                if *elem == ValueType::Array {
                    return Err(usage(format!("metadata {k:?}: nested arrays unsupported")));
                }
                if let Some(bad) = items.iter().find(|i| i.value_type() != *elem) {
                    return Err(usage(format!(
                        "metadata {k:?}: array of {elem:?} holds {:?}",
                        bad.value_type()
                    )));
                }
            }
            kvs.push((k, v.clone()));
        }
        if alignment != DEFAULT_ALIGNMENT && !keys.contains(ALIGNMENT_KEY) {
            kvs.push((ALIGNMENT_KEY, Value::U32(alignment as u32)));
        }

        let mut names = HashSet::new();
        let mut slots = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        for t in tensors {
            if !names.insert(t.name.as_str()) {
                return Err(usage(format!("tensor {:?} given twice", t.name)));
            }
            if t.dims.contains(&0) {
                return Err(usage(format!("tensor {:?}: zero dimension", t.name)));
            }
            let size =
                t.ty.tensor_bytes(&t.dims)
                    .map_err(|m| usage(format!("tensor {:?}: {m}", t.name)))?;
            offset = align_up(offset, alignment).ok_or_else(|| usage("file too large".into()))?;
            slots.push(Slot {
                name: t.name.clone(),
                offset,
                size,
            });
            offset = offset
                .checked_add(size)
                .ok_or_else(|| usage("file too large".into()))?;
        }

        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        let mut values = Vec::with_capacity(kvs.len());
        for (k, v) in &kvs {
            put_str(&mut header, k);
            header.extend_from_slice(&v.value_type().id().to_le_bytes());
            let start = header.len();
            put_value(&mut header, v);
            values.push((k.to_string(), v.value_type(), start..header.len()));
        }
        for (t, s) in tensors.iter().zip(&slots) {
            put_str(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.ty.id().to_le_bytes());
            header.extend_from_slice(&s.offset.to_le_bytes());
        }
        let data_start = align_up(header.len() as u64, alignment).expect("small header");
        header.resize(data_start as usize, 0);

        let name = path
            .file_name()
            .ok_or_else(|| usage("path has no file name".into()))?;
        let mut tmp_name = name.to_os_string();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let file = File::create(&tmp).map_err(|source| GgufError::Io {
            op: "create",
            path: tmp.clone(),
            source,
        })?;
        let mut w = GgufWriter {
            path: path.to_path_buf(),
            tmp,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            slots,
            alignment,
            data_start,
            pos: 0,
            current: 0,
            header: Vec::new(),
            written: 0,
            fail_after: None,
            values,
        };
        w.raw(&header)?;
        w.header = header;
        Ok(w)
    }

    /// Final path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Absolute file offset of tensor `i`'s data.
    pub fn tensor_offset(&self, i: usize) -> u64 {
        self.data_start + self.slots[i].offset
    }

    /// Total file length once finished (header, data, trailing padding).
    pub fn file_len(&self) -> u64 {
        let end = self.slots.last().map_or(0, |s| s.offset + s.size);
        self.data_start + align_up(end, self.alignment).expect("checked at create")
    }

    /// The tensor that the next byte of [`Self::write`] belongs to, if any.
    pub fn current_tensor(&self) -> Option<&str> {
        self.slots.get(self.current).map(|s| s.name.as_str())
    }

    /// The header bytes (magic up to the data section, padding included).
    pub fn header_bytes(&self) -> &[u8] {
        &self.header
    }

    /// Replaces the value of metadata `key` in the header already written, for values known
    /// only once the data is written (a digest of what was read meanwhile). The new value must
    /// have the type and the encoded length of the one given at [`GgufWriter::create`]
    /// (same-length strings, same-length arrays), so no byte of the layout moves.
    pub fn replace_metadata(&mut self, key: &str, value: &Value) -> Result<(), GgufError> {
        let usage = |msg: String| GgufError::Usage {
            path: self.path.clone(),
            msg,
        };
        let Some((_, ty, range)) = self.values.iter().find(|(k, _, _)| k == key) else {
            return Err(usage(format!("metadata key {key:?} was not written")));
        };
        let mut bytes = Vec::with_capacity(range.len());
        if let Value::Array(elem, items) = value {
            if items
                .iter()
                .any(|i| i.value_type() != *elem || *elem == ValueType::Array)
            {
                return Err(usage(format!(
                    "metadata {key:?}: array items must all be scalars or strings of {elem:?}"
                )));
            }
        }
        put_value(&mut bytes, value);
        if value.value_type() != *ty || bytes.len() != range.len() {
            return Err(usage(format!(
                "metadata {key:?}: the new value ({:?}, {} bytes) must have the type and length of the one written ({ty:?}, {} bytes)",
                value.value_type(),
                bytes.len(),
                range.len()
            )));
        }
        let range = range.clone();
        let f = self.file.as_mut().expect("open until finish");
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source: io::Error| GgufError::Io { op, path, source }
        };
        // The header may still sit in the buffer: flush it, then write the value in place.
        f.flush().map_err(io("write", &self.tmp))?;
        use std::os::unix::fs::FileExt;
        f.get_ref()
            .write_all_at(&bytes, range.start as u64)
            .map_err(io("write", &self.tmp))?;
        self.header[range].copy_from_slice(&bytes);
        Ok(())
    }

    /// Fault injection for tests: every write that would take the file past `bytes` fails
    /// with an error whose message starts with "injected fault".
    #[doc(hidden)]
    pub fn fail_after(&mut self, bytes: u64) {
        self.fail_after = Some(bytes);
    }

    fn raw(&mut self, bytes: &[u8]) -> Result<(), GgufError> {
        let end = self.written + bytes.len() as u64;
        if self.fail_after.is_some_and(|limit| end > limit) {
            return Err(GgufError::Io {
                op: "write",
                path: self.tmp.clone(),
                source: io::Error::new(
                    io::ErrorKind::StorageFull,
                    "injected fault: no space left on device",
                ),
            });
        }
        let f = self.file.as_mut().expect("open until finish");
        f.write_all(bytes).map_err(|source| GgufError::Io {
            op: "write",
            path: self.tmp.clone(),
            source,
        })?;
        self.written = end;
        Ok(())
    }

    fn pad_to(&mut self, target: u64) -> Result<(), GgufError> {
        while self.pos < target {
            let n = (target - self.pos).min(ZEROS.len() as u64);
            self.raw(&ZEROS[..n as usize])?;
            self.pos += n;
        }
        Ok(())
    }

    /// Appends tensor data: the next bytes of the current tensor, continuing into the
    /// following tensors (spec order) when `data` is longer than what is left of it.
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), GgufError> {
        while !data.is_empty() {
            let Some(slot) = self.slots.get(self.current) else {
                return Err(GgufError::Usage {
                    path: self.path.clone(),
                    msg: format!("{} bytes more than the tensors hold", data.len()),
                });
            };
            let (start, end) = (slot.offset, slot.offset + slot.size);
            self.pad_to(start)?;
            let n = (end - self.pos).min(data.len() as u64) as usize;
            self.raw(&data[..n])?;
            self.pos += n as u64;
            data = &data[n..];
            if self.pos == end {
                self.current += 1;
            }
        }
        Ok(())
    }

    /// Checks all data arrived, pads the end, fsyncs, renames into place and fsyncs the
    /// folder. Returns the final path.
    pub fn finish(mut self) -> Result<PathBuf, GgufError> {
        if let Some(slot) = self.slots.get(self.current) {
            let got = self.pos.saturating_sub(slot.offset);
            return Err(GgufError::Usage {
                path: self.path.clone(),
                msg: format!(
                    "tensor {:?} incomplete: {got} of {} bytes written",
                    slot.name, slot.size
                ),
            });
        }
        let end = align_up(self.pos, self.alignment).expect("checked at create");
        self.pad_to(end)?;
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source: io::Error| GgufError::Io { op, path, source }
        };
        let file = self
            .file
            .take()
            .expect("open until finish")
            .into_inner()
            .map_err(|e| io("write", &self.tmp)(e.into_error()))?;
        file.sync_all().map_err(io("fsync", &self.tmp))?;
        drop(file);
        fs::rename(&self.tmp, &self.path).map_err(io("rename", &self.tmp))?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", &dir))?;
        Ok(self.path.clone())
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() || self.tmp.exists() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_replaced_in_place_reads_back_and_moves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.gguf");
        let meta = vec![
            ("a.hash".to_string(), Value::strings(["0000", "0000"])),
            (
                "a.sizes".to_string(),
                Value::Array(ValueType::U64, vec![Value::U64(0), Value::U64(0)]),
            ),
        ];
        let spec = TensorSpec::new("t", vec![8], GgmlType::F32);
        let mut w = GgufWriter::create(&path, &meta, &[spec], 32).unwrap();
        let len = w.header_bytes().len();
        w.write(&[7u8; 32]).unwrap();
        w.replace_metadata("a.hash", &Value::strings(["beef", "cafe"]))
            .unwrap();
        let sizes = Value::Array(ValueType::U64, vec![Value::U64(5), Value::U64(u64::MAX)]);
        w.replace_metadata("a.sizes", &sizes).unwrap();
        // Another length, another type or an unknown key is refused.
        assert!(w
            .replace_metadata("a.hash", &Value::strings(["beefy", "cafe"]))
            .is_err());
        assert!(w
            .replace_metadata("a.sizes", &Value::strings(["x"]))
            .is_err());
        assert!(w.replace_metadata("nope", &Value::U32(1)).is_err());
        assert_eq!(w.header_bytes().len(), len);
        let header = w.header_bytes().to_vec();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..len], &header[..]);
        let f = crate::gguf::GgufFile::open(&path).unwrap();
        let hashes: Vec<&str> = f
            .get("a.hash")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(hashes, ["beef", "cafe"]);
        assert_eq!(f.get("a.sizes"), Some(&sizes));
        assert_eq!(&bytes[f.tensors[0].offset as usize..][..32], &[7u8; 32]);
    }
}
