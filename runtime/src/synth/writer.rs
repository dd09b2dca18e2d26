//! Safetensors shards: planning, headers, and streamed deterministic data (bf16, f32
//! holding bf16 values, bytes; GGUF twins also MXFP4 blocks).
//!
//! Every element's value is a pure function of (seed, tensor name, element index), so
//! the bytes do not depend on chunking or on the number of threads. Data is generated
//! in chunks of [`CHUNK_ELEMS`] elements, a batch of chunks at a time on the rayon pool,
//! and handed to one writer thread; at most [`BUFFERS`] batch buffers exist at once.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rayon::prelude::*;

use super::preset::{Init, TensorSpec};
use super::SynthError;

/// Elements per generation chunk (256 KiB of bf16).
pub(crate) const CHUNK_ELEMS: u64 = 1 << 17;
/// Chunks per batch per rayon thread (1 MiB of data per thread per batch).
const CHUNKS_PER_THREAD: usize = 4;
/// Batch buffers alive at once: one being generated, one queued, one being written.
const BUFFERS: usize = 3;

/// Tensors of one shard file, in the order the Hub's `split_torch_state_dict_into_shards`
/// assigns them (state_dict order, a new shard when the next tensor would pass the
/// limit; a tensor larger than the limit gets a shard of its own).
pub(crate) fn plan_shards(specs: &[TensorSpec], limit_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards = Vec::new();
    let mut current = Vec::new();
    let mut current_bytes = 0u64;
    for (i, t) in specs.iter().enumerate() {
        let size = t.size_bytes();
        if size > limit_bytes {
            shards.push(vec![i]);
            continue;
        }
        if current_bytes + size > limit_bytes && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(i);
        current_bytes += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// Hub shard file name, e.g. `model-00001-of-00003.safetensors`.
pub(crate) fn shard_name(index: usize, count: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", index + 1, count)
}

/// A shard's tensors in data order (sorted by name, as `safetensors` writes them) and
/// its header bytes: 8-byte little-endian length, then JSON padded with spaces so the
/// data starts 8-byte aligned.
pub(crate) struct ShardLayout {
    pub order: Vec<usize>,
    pub header: Vec<u8>,
    pub data_bytes: u64,
}

pub(crate) fn shard_layout(specs: &[TensorSpec], tensors: &[usize]) -> ShardLayout {
    let mut order = tensors.to_vec();
    order.sort_by(|&a, &b| specs[a].name.cmp(&specs[b].name));
    let mut json = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0u64;
    for &i in &order {
        let t = &specs[i];
        let shape: Vec<String> = t.shape.iter().map(u64::to_string).collect();
        let end = offset + t.size_bytes();
        json.push_str(&format!(
            r#",{}:{{"dtype":"{}","shape":[{}],"data_offsets":[{offset},{end}]}}"#,
            serde_json::to_string(&t.name).expect("string"),
            t.dtype.safetensors_name(),
            shape.join(",")
        ));
        offset = end;
    }
    json.push('}');
    while (8 + json.len()) % 8 != 0 {
        json.push(' ');
    }
    let mut header = Vec::with_capacity(8 + json.len());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(json.as_bytes());
    ShardLayout {
        order,
        header,
        data_bytes: offset,
    }
}

/// wyrand's increment and mixing constant.
const WY_INC: u64 = 0xA076_1D64_78BD_642F;
const WY_XOR: u64 = 0xE703_7ED1_A0B4_28DB;

/// wyrand output for counter value `s` (one 64x64->128 multiply).
#[inline(always)]
fn wyrand(s: u64) -> u64 {
    let t = (s as u128).wrapping_mul((s ^ WY_XOR) as u128);
    (t >> 64) as u64 ^ t as u64
}

/// SplitMix64's finalizer.
#[inline(always)]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Per-tensor stream key from the run seed and the tensor name (FNV-1a), so a tensor
/// has the same values whatever else the model contains (e.g. with `layers` changed).
pub(crate) fn tensor_key(seed: u64, name: &str) -> u64 {
    let mut h = 0xCBF2_9CE4_8422_2325u64;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix64(mix64(seed ^ 0x5EED_0000_0000_0000).wrapping_add(mix64(h)))
}

/// f32 -> bf16 bits, round to nearest even (inputs are finite).
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// Fills `out` (little-endian bf16) with elements `start..start + out.len()/2` of a tensor.
pub(crate) fn fill(key: u64, init: Init, start: u64, out: &mut [u8]) {
    match init {
        Init::Ones => {
            let one = bf16_bits(1.0).to_le_bytes();
            for e in out.chunks_exact_mut(2) {
                e.copy_from_slice(&one);
            }
        }
        Init::Zeros => out.fill(0),
        Init::Bytes { .. } => {
            // Byte tensors are written by `fill_u8`; as bf16 they read as small integers.
            for (k, e) in out.chunks_exact_mut(2).enumerate() {
                let v = element_u8(key, init, start + k as u64);
                e.copy_from_slice(&bf16_bits(f32::from(v)).to_le_bytes());
            }
        }
        Init::Normal { std } => {
            // Irwin-Hall(4) of 16-bit uniforms: mean 4 * 32767.5, variance 4 * (65536^2 - 1) / 12.
            let scale = std * (3.0f32).sqrt() / 65536.0;
            // Element i uses counter key + (i + 1) * WY_INC: values depend only on (key, i).
            let mut state = key.wrapping_add(start.wrapping_mul(WY_INC));
            for e in out.chunks_exact_mut(2) {
                state = state.wrapping_add(WY_INC);
                let r = wyrand(state);
                let s = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
                let x = (s as f32 - 131_070.0) * scale;
                e.copy_from_slice(&bf16_bits(x).to_le_bytes());
            }
        }
    }
}

/// Where a chunk's elements come from: the tensor with stream `key` and values `init`,
/// element `j` of the output being element `map.source(j)` of the tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Source {
    pub key: u64,
    pub init: Init,
    pub map: Affine,
}

/// An index map from an output position to a source element: `j` is split as
/// `(a, b, c)` over `dims` (`c` fastest) and maps to
/// `base + a * strides[0] + b * strides[1] + c * strides[2]`. It expresses the reshapes
/// the GGUF converter does: identity, row selection (de-interleaving), splits and
/// transposes of a 3-D view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Affine {
    pub dims: [u64; 3],
    pub strides: [u64; 3],
    pub base: u64,
}

impl Affine {
    /// The identity over `n` elements.
    pub(crate) fn identity(n: u64) -> Self {
        Affine {
            dims: [1, 1, n],
            strides: [0, 0, 1],
            base: 0,
        }
    }

    /// Output positions this map covers.
    pub(crate) fn len(&self) -> u64 {
        self.dims.iter().product()
    }

    fn is_identity(&self) -> bool {
        self.base == 0 && self.strides[2] == 1 && self.dims[0] == 1 && self.dims[1] == 1
    }

    #[inline(always)]
    pub(crate) fn source(&self, j: u64) -> u64 {
        let c = j % self.dims[2];
        let ab = j / self.dims[2];
        let b = ab % self.dims[1];
        let a = ab / self.dims[1];
        self.base + a * self.strides[0] + b * self.strides[1] + c * self.strides[2]
    }
}

/// How a chunk's elements are written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Out {
    /// Little-endian bf16.
    Bf16,
    /// Little-endian f32 holding exactly the bf16 values.
    F32,
    /// One byte per element (`Init::Bytes` tensors).
    U8,
    /// GGML `block_mxfp4`s: one output position is one block of 32 weights, the scale
    /// byte from `scales` (element `j` of it) then the 16 code bytes of source block `j`
    /// (bytes `16j..16j+16` of the codes tensor) with the nibbles reordered (see
    /// [`mxfp4_ggml_qs`]).
    Mxfp4 { scales: Source },
}

impl Out {
    fn unit_bytes(self) -> u64 {
        match self {
            Out::Bf16 => 2,
            Out::F32 => 4,
            Out::U8 => 1,
            Out::Mxfp4 { .. } => 17,
        }
    }
}

/// `len` output positions from position `start` of one source.
#[derive(Clone, Copy)]
pub(crate) struct Chunk {
    src: Source,
    start: u64,
    len: u64,
    out: Out,
}

impl Chunk {
    fn bytes(&self) -> u64 {
        self.len * self.out.unit_bytes()
    }

    fn fill(&self, out: &mut [u8]) {
        let (key, init, map) = (self.src.key, self.src.init, self.src.map);
        match self.out {
            Out::Bf16 if map.is_identity() => fill(key, init, self.start, out),
            Out::F32 if map.is_identity() => fill_f32(key, init, self.start, out),
            Out::U8 if map.is_identity() => fill_u8(key, init, self.start, out),
            Out::Bf16 => {
                for (k, e) in out.chunks_exact_mut(2).enumerate() {
                    let i = map.source(self.start + k as u64);
                    e.copy_from_slice(&element_bf16(key, init, i).to_le_bytes());
                }
            }
            Out::F32 => {
                for (k, e) in out.chunks_exact_mut(4).enumerate() {
                    let i = map.source(self.start + k as u64);
                    let bits = u32::from(element_bf16(key, init, i)) << 16;
                    e.copy_from_slice(&bits.to_le_bytes());
                }
            }
            Out::U8 => {
                for (k, e) in out.iter_mut().enumerate() {
                    *e = element_u8(key, init, map.source(self.start + k as u64));
                }
            }
            Out::Mxfp4 { scales } => {
                for (k, blk) in out.chunks_exact_mut(17).enumerate() {
                    let j = self.start + k as u64;
                    let s = map.source(j);
                    blk[0] = element_u8(scales.key, scales.init, scales.map.source(j));
                    let mut codes = [0u8; 16];
                    for (n, c) in codes.iter_mut().enumerate() {
                        *c = element_u8(key, init, 16 * s + n as u64);
                    }
                    blk[1..].copy_from_slice(&mxfp4_ggml_qs(&codes));
                }
            }
        }
    }
}

/// A checkpoint's MXFP4 code bytes (element `2n` in the low nibble of byte `n`, `2n+1`
/// in its high nibble) in GGML's `block_mxfp4.qs` order (byte `n` holds element `n` low
/// and element `n + 16` high), as llama.cpp's converter (`transform_nibble_layout`)
/// reorders them.
pub(crate) fn mxfp4_ggml_qs(codes: &[u8; 16]) -> [u8; 16] {
    let elem = |e: usize| {
        let b = codes[e / 2];
        if e.is_multiple_of(2) {
            b & 0x0F
        } else {
            b >> 4
        }
    };
    let mut qs = [0u8; 16];
    for (n, q) in qs.iter_mut().enumerate() {
        *q = elem(n) | (elem(n + 16) << 4);
    }
    qs
}

/// Appends the chunks covering all `src.map.len()` output positions of one source.
pub(crate) fn push_chunks(out: &mut Vec<Chunk>, src: Source, data: Out) {
    let total = src.map.len();
    // MXFP4 positions are 32-weight blocks: fewer per chunk keeps chunks about as large.
    let per_chunk = match data {
        Out::Mxfp4 { .. } => CHUNK_ELEMS / 8,
        _ => CHUNK_ELEMS,
    };
    let mut start = 0;
    while start < total {
        let len = per_chunk.min(total - start);
        out.push(Chunk {
            src,
            start,
            len,
            out: data,
        });
        start += len;
    }
}

/// Like [`fill`], but little-endian f32 holding exactly the bf16 values.
pub(crate) fn fill_f32(key: u64, init: Init, start: u64, out: &mut [u8]) {
    const BLOCK: usize = 1024;
    let mut bf = [0u8; 2 * BLOCK];
    for (b, dst) in out.chunks_mut(4 * BLOCK).enumerate() {
        let n = dst.len() / 4;
        let src = &mut bf[..2 * n];
        fill(key, init, start + (b * BLOCK) as u64, src);
        for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(2)) {
            let bits = u32::from(u16::from_le_bytes([s[0], s[1]])) << 16;
            d.copy_from_slice(&bits.to_le_bytes());
        }
    }
}

/// Fills `out` (one byte per element) with elements `start..start + out.len()`.
pub(crate) fn fill_u8(key: u64, init: Init, start: u64, out: &mut [u8]) {
    for (k, e) in out.iter_mut().enumerate() {
        *e = element_u8(key, init, start + k as u64);
    }
}

/// Element `i` of a tensor as bf16 bits: the value [`fill`] writes at that index.
#[inline(always)]
pub(crate) fn element_bf16(key: u64, init: Init, i: u64) -> u16 {
    let mut b = [0u8; 2];
    fill(key, init, i, &mut b);
    u16::from_le_bytes(b)
}

/// Element `i` of a byte tensor: uniform in `lo..=hi` for `Init::Bytes` (other inits
/// give their bf16 value's low byte; no byte tensor uses them).
#[inline(always)]
pub(crate) fn element_u8(key: u64, init: Init, i: u64) -> u8 {
    match init {
        Init::Bytes { lo, hi } => {
            let r = wyrand(key.wrapping_add(i.wrapping_add(1).wrapping_mul(WY_INC)));
            let span = u64::from(hi - lo) + 1;
            lo + (((r >> 32) * span) >> 32) as u8
        }
        _ => element_bf16(key, init, i) as u8,
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SynthError + 'a {
    move |source| SynthError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Temporary name for `name` inside `dir`.
pub(crate) fn tmp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `dir/name` atomically (temp file, fsync, rename).
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, SynthError> {
    let tmp = tmp_path(dir, name);
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        Ok(())
    })();
    finish(result, &tmp, &dir.join(name))
}

fn finish(result: Result<(), SynthError>, tmp: &Path, dst: &Path) -> Result<PathBuf, SynthError> {
    match result.and_then(|()| fs::rename(tmp, dst).map_err(io_err("rename", tmp))) {
        Ok(()) => Ok(dst.to_path_buf()),
        Err(e) => {
            let _ = fs::remove_file(tmp);
            Err(e)
        }
    }
}

/// Streams one shard to `dir/name` atomically; calls `progress(bytes)` as data lands.
pub(crate) fn write_shard(
    dir: &Path,
    name: &str,
    specs: &[TensorSpec],
    keys: &[u64],
    layout: &ShardLayout,
    progress: &mut dyn FnMut(u64),
) -> Result<PathBuf, SynthError> {
    let tmp = tmp_path(dir, name);
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&layout.header).map_err(io_err("write", &tmp))?;
        let f =
            stream_data(f, specs, keys, &layout.order, progress).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        Ok(())
    })();
    finish(result, &tmp, &dir.join(name))
}

fn stream_data(
    mut file: File,
    specs: &[TensorSpec],
    keys: &[u64],
    order: &[usize],
    progress: &mut dyn FnMut(u64),
) -> io::Result<File> {
    let mut chunks = Vec::new();
    for &t in order {
        let src = Source {
            key: keys[t],
            init: specs[t].init,
            map: Affine::identity(specs[t].numel()),
        };
        push_chunks(&mut chunks, src, specs[t].dtype.out());
    }
    stream_chunks(&chunks, |b: &[u8]| file.write_all(b), progress)?;
    Ok(file)
}

/// Generates `chunks` in order and hands the bytes to `sink` (on a writer thread), in
/// batches of about 1 MiB per rayon thread; calls `progress(bytes)` as batches land.
pub(crate) fn stream_chunks<E: Send>(
    chunks: &[Chunk],
    mut sink: impl FnMut(&[u8]) -> Result<(), E> + Send,
    progress: &mut dyn FnMut(u64),
) -> Result<(), E> {
    let batch_bytes =
        (rayon::current_num_threads().max(1) * CHUNKS_PER_THREAD) as u64 * CHUNK_ELEMS * 2;
    // Batches of consecutive chunks, each about `batch_bytes` long.
    let mut batches: Vec<&[Chunk]> = Vec::new();
    let (mut first, mut bytes) = (0, 0u64);
    for (i, c) in chunks.iter().enumerate() {
        bytes += c.bytes();
        if bytes >= batch_bytes {
            batches.push(&chunks[first..=i]);
            (first, bytes) = (i + 1, 0);
        }
    }
    if first < chunks.len() {
        batches.push(&chunks[first..]);
    }

    let (to_writer, from_main) = mpsc::sync_channel::<Vec<u8>>(1);
    let (to_main, from_writer) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<(), E> {
            for buf in from_main {
                sink(&buf)?;
                if to_main.send(buf).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let mut allocated = 0;
        for batch in &batches {
            let mut buf = match from_writer.try_recv() {
                Ok(b) => {
                    progress(b.len() as u64);
                    b
                }
                Err(_) if allocated < BUFFERS => {
                    allocated += 1;
                    Vec::new()
                }
                Err(_) => match from_writer.recv() {
                    Ok(b) => {
                        progress(b.len() as u64);
                        b
                    }
                    Err(_) => break, // writer stopped: its error is reported below
                },
            };
            let len: u64 = batch.iter().map(Chunk::bytes).sum();
            buf.clear();
            buf.resize(len as usize, 0);
            let mut parts = Vec::with_capacity(batch.len());
            let mut rest = buf.as_mut_slice();
            for c in batch.iter() {
                let (head, tail) = rest.split_at_mut(c.bytes() as usize);
                parts.push((c, head));
                rest = tail;
            }
            parts.into_par_iter().for_each(|(c, out)| c.fill(out));
            if to_writer.send(buf).is_err() {
                break;
            }
        }
        drop(to_writer);
        writer.join().expect("writer thread panicked")?;
        for b in from_writer.try_iter() {
            progress(b.len() as u64);
        }
        Ok(())
    })
}
