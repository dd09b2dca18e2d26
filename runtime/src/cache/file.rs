//! An opened cache file: its header checked against what the model expects, its bytes mapped,
//! and each tensor's checksum checked the first time its bytes are used.
//!
//! Opening reads the header and the checksum table only (never the tensors): the table's own
//! checksum covers the header bytes too, so a damaged header or table is caught at open, and a
//! damaged tensor when it is first read.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rayon::prelude::*;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use super::build::{table_checksum, Entry};
use super::sources::Record;
use super::{Problem, CHECKSUMS_TENSOR, FORMAT_VERSION, KEY_FINGERPRINT, KEY_VERSION};
use crate::error::{Error, Result};
use crate::gguf::{GgmlType, GgufFile, TensorSpec};
use crate::weights::{map_path, Storage, TensorRef};

/// Bytes read per positioned read when a whole tensor is checked (bounded memory).
const VERIFY_CHUNK_BYTES: usize = 8 << 20;

/// What the model expects of its cache file.
pub(crate) struct Expected<'a> {
    pub fingerprint: &'a str,
    pub specs: &'a [TensorSpec],
}

/// A cache file, opened and checked (see the module docs).
pub struct CacheFile {
    pub path: PathBuf,
    storage: Arc<Storage>,
    pub(crate) header: GgufFile,
    /// Absolute (offset, size) of every tensor but the checksum table.
    extents: Vec<(u64, u64)>,
    checksums: Vec<u64>,
    verified: Vec<AtomicBool>,
    /// The checksum of the header and the checksum table: differs between any two files that
    /// differ in their header (which records the source) or in any tensor's checksum.
    pub(crate) identity: u64,
    /// What the header records of each weight file the cache was built from.
    pub(crate) sources: Vec<Record>,
}

impl std::fmt::Debug for CacheFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CacheFile({}, {} tensors)",
            self.path.display(),
            self.len()
        )
    }
}

impl CacheFile {
    /// Reads and checks the header (and, with `expect`, that it is this model's cache with
    /// these settings) and the checksum table. Reads no tensor data.
    pub(crate) fn open(
        path: &Path,
        expect: Option<&Expected<'_>>,
    ) -> std::result::Result<CacheFile, Problem> {
        if !path.exists() {
            return Err(Problem::Missing);
        }
        let header = GgufFile::open(path).map_err(|e| match e {
            crate::gguf::GgufError::Format { msg, .. } => Problem::Unreadable(msg),
            other => Problem::Io(other.to_string()),
        })?;
        match header.get(KEY_VERSION).and_then(|v| v.as_u64()) {
            None => return Err(Problem::Foreign),
            Some(v) if v != u64::from(FORMAT_VERSION) => return Err(Problem::Version { found: v }),
            Some(_) => {}
        }
        let n = header.tensors.len();
        let table = header
            .tensors
            .last()
            .filter(|t| t.name == CHECKSUMS_TENSOR && t.ty == GgmlType::I64 && t.dims == [n as u64])
            .ok_or_else(|| Problem::Unreadable("no checksum table".into()))?
            .clone();
        if let Some(expect) = expect {
            let found = header
                .get(KEY_FINGERPRINT)
                .and_then(|v| v.as_str())
                .unwrap_or("");
            if found != expect.fingerprint {
                return Err(Problem::Stale {
                    found: found.to_string(),
                });
            }
            if expect.specs.len() != n {
                return Err(Problem::Layout(format!(
                    "{} tensors, the model needs {}",
                    n,
                    expect.specs.len()
                )));
            }
            for (t, s) in header.tensors.iter().zip(expect.specs) {
                if t.name != s.name || t.dims != s.dims || t.ty != s.ty {
                    return Err(Problem::Layout(format!(
                        "tensor `{}` is {} {:?}, the model needs `{}` {} {:?}",
                        t.name,
                        t.ty.name(),
                        t.dims,
                        s.name,
                        s.ty.name(),
                        s.dims
                    )));
                }
            }
        }
        let expected_len = crate::gguf::align_up(table.offset + table.size, header.alignment)
            .ok_or_else(|| Problem::Unreadable("file too large".into()))?;
        if header.file_len != expected_len {
            return Err(Problem::Length {
                len: header.file_len,
                expected: expected_len,
            });
        }
        let storage = Arc::new(map_path(path).map_err(|e| Problem::Io(e.to_string()))?);
        let mut head = vec![0u8; header.data_offset as usize];
        storage
            .read_at(0, &mut head)
            .map_err(|e| Problem::Io(e.to_string()))?;
        let mut raw = vec![0u8; table.size as usize];
        storage
            .read_at(table.offset, &mut raw)
            .map_err(|e| Problem::Io(e.to_string()))?;
        let mut checksums: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let stored_table_sum = checksums.pop().expect("n >= 1");
        if table_checksum(&head, &checksums) != stored_table_sum {
            return Err(Problem::HeaderChecksum);
        }
        let sources = super::sources::from_header(&header).map_err(Problem::Unreadable)?;
        let extents = header.tensors[..n - 1]
            .iter()
            .map(|t| (t.offset, t.size))
            .collect();
        Ok(CacheFile {
            path: path.to_path_buf(),
            storage,
            verified: (0..n - 1).map(|_| AtomicBool::new(false)).collect(),
            header,
            extents,
            checksums,
            identity: stored_table_sum,
            sources,
        })
    }

    /// Number of tensors (the checksum table not counted).
    pub fn len(&self) -> usize {
        self.extents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Bytes of the file.
    pub fn file_bytes(&self) -> u64 {
        self.header.file_len
    }

    /// Tensor `i` as a view into the mapped file, named and shaped as `entry` (its source).
    pub(crate) fn tensor_ref(&self, i: usize, entry: &Entry) -> TensorRef {
        let (offset, size) = self.extents[i];
        TensorRef::in_storage(
            entry.source.name.clone(),
            Arc::new(self.path.clone()),
            entry.to,
            entry.source.shape.clone(),
            self.storage.clone(),
            offset as usize,
            (offset + size) as usize,
        )
    }

    /// Whether tensor `i`'s bytes were already found intact.
    pub(crate) fn is_verified(&self, i: usize) -> bool {
        self.verified[i].load(Ordering::Acquire)
    }

    /// Checks `bytes` (tensor `i` as read) against its checksum; remembers success.
    pub(crate) fn check(&self, i: usize, bytes: &[u8]) -> bool {
        if self.is_verified(i) {
            return true;
        }
        let ok = bytes.len() as u64 == self.extents[i].1 && xxh3_64(bytes) == self.checksums[i];
        if ok {
            self.verified[i].store(true, Ordering::Release);
        }
        ok
    }

    /// Reads `len` bytes of tensor `i` starting `offset` bytes in (positioned reads: the pages
    /// do not enter this process's resident set).
    pub(crate) fn read_range(&self, i: usize, offset: usize, len: usize) -> Result<Vec<u8>> {
        let (start, size) = self.extents[i];
        assert!(
            offset + len <= size as usize,
            "read_range out of the tensor"
        );
        let mut out = vec![0u8; len];
        self.storage
            .read_at(start + offset as u64, &mut out)
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(out)
    }

    /// Checks tensor `i` by reading it in bounded chunks (no mapping).
    fn verify_tensor(&self, i: usize) -> Result<bool> {
        if self.is_verified(i) {
            return Ok(true);
        }
        let (start, size) = self.extents[i];
        let mut h = Xxh3::new();
        let mut buf = vec![0u8; VERIFY_CHUNK_BYTES.min(size as usize)];
        let mut pos = 0u64;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            self.storage
                .read_at(start + pos, &mut buf[..n])
                .map_err(|e| Error::io(&self.path, e))?;
            h.update(&buf[..n]);
            pos += n as u64;
        }
        let ok = h.digest() == self.checksums[i];
        if ok {
            self.verified[i].store(true, Ordering::Release);
        }
        Ok(ok)
    }

    /// Checks every tensor (all cores); returns, per tensor, whether it is intact.
    pub(crate) fn verify_all(&self) -> Result<Vec<bool>> {
        (0..self.len())
            .into_par_iter()
            .map(|i| self.verify_tensor(i))
            .collect()
    }

    /// A metadata string.
    pub(crate) fn meta_str(&self, key: &str) -> Option<&str> {
        self.header.get(key).and_then(|v| v.as_str())
    }

    /// A metadata array of strings.
    pub(crate) fn meta_strings(&self, key: &str) -> Vec<String> {
        self.header
            .get(key)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}
