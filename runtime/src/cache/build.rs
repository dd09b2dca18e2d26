//! What a cache file holds ([`Entry`], in file order) and the streaming build that writes it.
//!
//! The build never holds more than a few batches of output: tensors are cut into row chunks,
//! each batch of chunks is converted on all cores, and a writer thread hashes and appends the
//! previous batch meanwhile. The source is read with positioned reads (never through the
//! mapping), so the resident set stays bounded whatever the model's size.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use xxhash_rust::xxh3::Xxh3;

use super::file::CacheFile;
use super::{cannot_write, CHECKSUMS_TENSOR};
use crate::error::Error;
use crate::gguf::{GgmlType, GgufWriter, TensorSpec, Value};
use crate::model::ModelWeights;
use crate::quantize::Quantization;
use crate::quantize::{expert_part_target, resident_target, resident_tensors, ExpertTypes};
use crate::store::PartRole;
use crate::weights::{Dtype, TensorRef};

/// Output bytes per converted chunk: small enough that a batch of them stays far below the
/// build's memory cap, large enough that per-chunk overhead is noise.
const CHUNK_BYTES: usize = 4 << 20;
/// Output bytes per batch (converted in parallel, then handed to the writer thread).
const BATCH_BYTES: usize = 64 << 20;
/// Batches queued for the writer beyond the one it is writing: one is enough to overlap
/// conversion with writing; more would only add memory.
const QUEUED_BATCHES: usize = 1;

/// What one tensor of a cache file is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// A weight outside the experts (attention, embeddings, routers, head...).
    Resident,
    /// Part `part` (its index in the expert layout's order: 0 gate, 1 up, 2 down for the
    /// separate layout) of expert `expert` of `layer`, in type `ty`.
    Expert {
        layer: usize,
        expert: usize,
        part: usize,
        ty: Quantization,
    },
}

/// One tensor of a cache file: where its bytes come from and what type they take.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    /// The source tensor (a view into the model's files).
    pub source: TensorRef,
    /// The type it is stored in (the source's own when it keeps its type).
    pub to: Dtype,
    pub role: Role,
}

impl Entry {
    /// Whether the tensor is stored in its source type.
    pub fn kept(&self) -> bool {
        self.to == self.source.dtype
    }

    /// GGML dims (innermost first).
    pub fn dims(&self) -> Vec<u64> {
        self.source.shape.iter().rev().map(|&d| d as u64).collect()
    }

    /// Bytes in the cache.
    pub fn size_bytes(&self) -> usize {
        match self.source.converted_row_bytes(self.to) {
            Some(row) => row * self.source.shape[0],
            None => self.source.size_bytes(),
        }
    }

    /// Output bytes of one row (leading dimension), or the whole tensor when not 2-D.
    fn out_row_bytes(&self) -> (usize, usize) {
        match self.source.converted_row_bytes(self.to) {
            Some(row) => (self.source.shape[0], row),
            None if self.source.shape.len() == 2 && self.source.shape[0] > 0 => (
                self.source.shape[0],
                self.source.size_bytes() / self.source.shape[0],
            ),
            None => (1, self.source.size_bytes()),
        }
    }

    /// The stored bytes of rows `[first, first + count)`, converted from the source.
    fn produce(
        &self,
        first: usize,
        count: usize,
        whole: bool,
        error: &crate::weights::prequant::ConversionError,
    ) -> crate::error::Result<Vec<u8>> {
        let view = if whole {
            self.source.clone()
        } else {
            self.source.narrow(first, count)
        };
        // Positioned reads, not the mapping: large sequential reads and no source pages left
        // in this process's resident set.
        Ok(match view.converted_row_bytes(self.to) {
            Some(row) => {
                let mut out = vec![0u8; row * count];
                view.read_copy()?
                    .convert_into_measured(self.to, &mut out, Some(error))?;
                out
            }
            None => {
                let mut out = vec![0u8; view.size_bytes()];
                view.read_into(&mut out)?;
                out
            }
        })
    }
}

/// The GGML type of a stored dtype.
pub(crate) fn ggml_type(d: Dtype) -> Option<GgmlType> {
    Some(match d {
        Dtype::F32 => GgmlType::F32,
        Dtype::F16 => GgmlType::F16,
        Dtype::Bf16 => GgmlType::BF16,
        Dtype::Q8_0 => GgmlType::Q8_0,
        Dtype::Q4K => GgmlType::Q4_K,
        Dtype::F8B128 => GgmlType::MoeF8B128,
        Dtype::Nf4 => GgmlType::MoeNf4B64,
        Dtype::Fp4 => GgmlType::MoeFp4B64,
        Dtype::Nf4Bf16 => GgmlType::MoeNf4B64Bf16,
        Dtype::Nf4F16 => GgmlType::MoeNf4B64F16,
        Dtype::Fp4Bf16 => GgmlType::MoeFp4B64Bf16,
        Dtype::Fp4F16 => GgmlType::MoeFp4B64F16,
        Dtype::Mxfp4 => GgmlType::MoeMxfp4B32,
        _ => return None,
    })
}

/// The name of expert tensors in a cache file (`gate`, `up`, `down` for the separate layout,
/// as every cache file written so far holds).
fn expert_name(layer: usize, expert: usize, role: PartRole, ty: Quantization) -> String {
    format!(
        "moe.layers.{layer}.experts.{expert}.{}.{}",
        role.name(),
        super::quantization_name(ty)
    )
}

/// Every tensor a cache for this model and these types holds, in file order: the resident
/// weights in model order (a tied head once), then layer by layer, expert by expert, each
/// held type's parts side by side in the layout's order (one expert in one type is one
/// contiguous range; biases keep their stored type).
pub fn entries(mw: &mut ModelWeights, experts: &ExpertTypes, resident: Quantization) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (t, role) in resident_tensors(mw) {
        if !seen.insert(t.name.clone()) {
            continue;
        }
        let to = resident_target(t, role, resident);
        out.push(Entry {
            name: t.name.clone(),
            source: t.clone(),
            to,
            role: Role::Resident,
        });
    }
    let held = experts.held();
    for (layer, list) in mw.experts.iter().enumerate() {
        for (expert, e) in list.iter().enumerate() {
            for &ty in &held {
                for (part, (role, t)) in e.with_roles().enumerate() {
                    out.push(Entry {
                        name: expert_name(layer, expert, role, ty),
                        source: t.clone(),
                        to: expert_part_target(t, role, ty),
                        role: Role::Expert {
                            layer,
                            expert,
                            part,
                            ty,
                        },
                    });
                }
            }
        }
    }
    out
}

/// The tensor specs of a cache file: the entries, then the checksum table.
pub(crate) fn specs(entries: &[Entry]) -> Result<Vec<TensorSpec>, String> {
    let mut specs = Vec::with_capacity(entries.len() + 1);
    for e in entries {
        let ty = ggml_type(e.to).ok_or_else(|| {
            format!(
                "tensor `{}` has dtype {}, which the cache cannot hold",
                e.name,
                e.to.name()
            )
        })?;
        specs.push(TensorSpec::new(e.name.clone(), e.dims(), ty));
    }
    specs.push(TensorSpec::new(
        CHECKSUMS_TENSOR,
        vec![entries.len() as u64 + 1],
        GgmlType::I64,
    ));
    Ok(specs)
}

/// The checksum of the header and the table: the last entry of the checksum tensor.
pub(crate) fn table_checksum(header: &[u8], sums: &[u64]) -> u64 {
    let mut h = Xxh3::new();
    h.update(header);
    for s in sums {
        h.update(&s.to_le_bytes());
    }
    h.digest()
}

/// Progress of a build: bytes of source read so far and in all.
#[derive(Clone, Copy, Debug)]
pub struct BuildProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// What a build did.
#[derive(Clone, Debug)]
pub struct BuildReport {
    pub path: std::path::PathBuf,
    pub file_bytes: u64,
    /// Source bytes read (converted or copied).
    pub source_bytes: u64,
    pub elapsed: Duration,
    /// Tensors copied from an intact older file instead of converted again (repairs).
    pub reused_tensors: usize,
    /// Tensors converted from the source.
    pub converted_tensors: usize,
    /// What converting pre-quantized weights to the cache's quantization changed against
    /// their exact values (None when they were kept without loss, or there were none).
    pub prequant_error: Option<crate::weights::prequant::ErrorSummary>,
}

/// Where a tensor's bytes come from in a build.
enum From<'a> {
    Source,
    /// An intact tensor of the file being repaired.
    Donor(&'a CacheFile, usize),
}

/// One piece of a batch: rows of one entry.
struct Piece {
    entry: usize,
    first: usize,
    count: usize,
    whole: bool,
}

pub(crate) struct BuildJob<'a> {
    pub path: &'a Path,
    pub entries: &'a [Entry],
    pub metadata: Vec<(String, Value)>,
    pub alignment: u64,
    /// The file being repaired: its intact tensors are copied, the rest converted.
    pub donor: Option<(&'a CacheFile, &'a [bool])>,
    pub progress: &'a (dyn Fn(BuildProgress) + Sync),
    /// Test hook: fail writes past this many bytes.
    pub fail_after: Option<u64>,
    /// Metadata known only once the data is written (the source's hashes, taken alongside
    /// the build): each replaces the value of its key in `metadata`, at the same encoded
    /// length, before the checksum table (which covers the header) is computed.
    pub late_metadata: Option<&'a LateMetadata<'a>>,
}

/// A source of metadata known only once a build's data is written.
pub(crate) type LateMetadata<'a> =
    dyn Fn() -> crate::error::Result<Vec<(String, Value)>> + Sync + 'a;

/// Writes a cache file (atomically: temp file, fsync, rename, fsync of the folder).
pub(crate) fn build(job: BuildJob<'_>) -> crate::error::Result<BuildReport> {
    let t0 = Instant::now();
    let entries = job.entries;
    let specs = specs(entries).map_err(|msg| Error::cache(job.path, msg))?;
    let mut writer = GgufWriter::create(job.path, &job.metadata, &specs, job.alignment)
        .map_err(|e| cannot_write(job.path, &e.to_string()))?;
    if let Some(limit) = job.fail_after {
        writer.fail_after(limit);
    }
    let file_bytes = writer.file_len();

    let sources: Vec<From<'_>> = (0..entries.len())
        .map(|i| match job.donor {
            Some((file, intact)) if intact[i] => From::Donor(file, i),
            _ => From::Source,
        })
        .collect();
    let total: u64 = entries.iter().map(|e| e.source.size_bytes() as u64).sum();
    let done = AtomicU64::new(0);
    let error = crate::weights::prequant::ConversionError::default();

    // Pieces in file order, grouped into batches of about BATCH_BYTES of output.
    let mut batches: Vec<Vec<Piece>> = vec![Vec::new()];
    let mut batch_bytes = 0usize;
    for (i, e) in entries.iter().enumerate() {
        let (rows, row_bytes) = e.out_row_bytes();
        let whole = rows <= 1;
        let per_chunk = if whole {
            rows.max(1)
        } else {
            (CHUNK_BYTES / row_bytes.max(1)).clamp(1, rows)
        };
        let mut first = 0;
        while first < rows.max(1) {
            let count = per_chunk.min(rows.max(1) - first);
            batches.last_mut().expect("non-empty").push(Piece {
                entry: i,
                first,
                count,
                whole,
            });
            batch_bytes += count * row_bytes;
            first += count;
            if batch_bytes >= BATCH_BYTES {
                batches.push(Vec::new());
                batch_bytes = 0;
            }
        }
    }

    let (tx, rx) = crossbeam_channel::bounded::<Vec<(usize, Vec<u8>)>>(QUEUED_BATCHES);
    let path = job.path;
    let result = std::thread::scope(|scope| {
        let writer_thread = scope.spawn(move || -> crate::error::Result<(GgufWriter, Vec<u64>)> {
            let mut sums = vec![0u64; entries.len()];
            let mut hasher = Xxh3::new();
            let mut current = 0usize;
            for batch in rx {
                for (entry, bytes) in batch {
                    while current < entry {
                        sums[current] = hasher.digest();
                        hasher.reset();
                        current += 1;
                    }
                    hasher.update(&bytes);
                    writer
                        .write(&bytes)
                        .map_err(|e| cannot_write(path, &e.to_string()))?;
                }
            }
            while current < entries.len() {
                sums[current] = hasher.digest();
                hasher.reset();
                current += 1;
            }
            Ok((writer, sums))
        });
        let mut produce_error = None;
        for batch in &batches {
            let out: Vec<crate::error::Result<(usize, Vec<u8>)>> = batch
                .par_iter()
                .with_max_len(1)
                .map(|p| {
                    let e = &entries[p.entry];
                    let bytes = match sources[p.entry] {
                        From::Source => e.produce(p.first, p.count, p.whole, &error)?,
                        From::Donor(file, i) => {
                            let (_, row_bytes) = e.out_row_bytes();
                            if p.whole {
                                file.read_range(i, 0, e.size_bytes())?
                            } else {
                                file.read_range(i, p.first * row_bytes, p.count * row_bytes)?
                            }
                        }
                    };
                    let src = if p.whole {
                        e.source.size_bytes()
                    } else {
                        e.source.size_bytes() / e.source.shape[0].max(1) * p.count
                    };
                    done.fetch_add(src as u64, Ordering::Relaxed);
                    Ok((p.entry, bytes))
                })
                .collect();
            let out: crate::error::Result<Vec<_>> = out.into_iter().collect();
            match out {
                Ok(out) => {
                    if tx.send(out).is_err() {
                        break; // the writer failed; its error is reported below
                    }
                }
                Err(e) => {
                    produce_error = Some(e);
                    break;
                }
            }
            (job.progress)(BuildProgress {
                done_bytes: done.load(Ordering::Relaxed),
                total_bytes: total,
            });
        }
        drop(tx);
        let written = writer_thread.join().expect("cache writer thread panicked");
        if let Some(e) = produce_error {
            return Err(Error::cache(
                path,
                format!("reading the source failed: {e}"),
            ));
        }
        written
    });
    let (mut writer, mut sums) = result?;
    if let Some(late) = job.late_metadata {
        for (key, value) in late()? {
            writer
                .replace_metadata(&key, &value)
                .map_err(|e| cannot_write(path, &e.to_string()))?;
        }
    }
    let table = table_checksum(writer.header_bytes(), &sums);
    sums.push(table);
    let table_bytes: Vec<u8> = sums.iter().flat_map(|s| s.to_le_bytes()).collect();
    writer
        .write(&table_bytes)
        .map_err(|e| cannot_write(path, &e.to_string()))?;
    writer
        .finish()
        .map_err(|e| cannot_write(path, &e.to_string()))?;
    let reused = sources
        .iter()
        .filter(|s| matches!(s, From::Donor(..)))
        .count();
    Ok(BuildReport {
        path: path.to_path_buf(),
        file_bytes,
        source_bytes: total,
        elapsed: t0.elapsed(),
        reused_tensors: reused,
        converted_tensors: entries.len() - reused,
        prequant_error: error.summary(),
    })
}

#[cfg(test)]
mod layout_tests {
    use std::sync::Arc;

    use super::*;
    use crate::weights::Storage;

    fn zeros(name: &str, shape: &[usize]) -> TensorRef {
        let len = shape.iter().product::<usize>() * 4;
        TensorRef::in_storage(
            name.into(),
            Arc::new("/models/t/experts.safetensors".into()),
            Dtype::F32,
            shape.to_vec(),
            Arc::new(Storage::Words {
                words: vec![0; len.div_ceil(8)],
                len,
            }),
            0,
            len,
        )
    }

    #[test]
    fn separate_parts_keep_their_names_and_biases_keep_their_type() {
        // The names every cache file written so far holds.
        for (role, name) in [
            (PartRole::Gate, "gate"),
            (PartRole::Up, "up"),
            (PartRole::Down, "down"),
        ] {
            assert_eq!(
                expert_name(3, 7, role, Quantization::Q8_0),
                format!("moe.layers.3.experts.7.{name}.q8_0")
            );
        }
        assert_eq!(
            expert_name(0, 1, PartRole::GateUpBias, Quantization::Q4K),
            "moe.layers.0.experts.1.gate_up_bias.q4_k"
        );
        let matrix = zeros("e.gate_up", &[64, 256]);
        let bias = zeros("e.gate_up_bias", &[64]);
        for q in [Quantization::Bf16, Quantization::Q8_0, Quantization::Q4K] {
            assert_ne!(expert_part_target(&matrix, PartRole::GateUp, q), Dtype::F32);
            assert_eq!(
                expert_part_target(&bias, PartRole::GateUpBias, q),
                Dtype::F32
            );
        }
    }
}
