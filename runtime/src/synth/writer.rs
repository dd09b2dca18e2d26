//! Safetensors shards: planning, headers, and streamed deterministic bf16 data.
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
            r#",{}:{{"dtype":"BF16","shape":[{}],"data_offsets":[{offset},{end}]}}"#,
            serde_json::to_string(&t.name).expect("string"),
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

/// `len` elements of one tensor from element `start`, written as bf16 or (exactly
/// widened) f32.
#[derive(Clone, Copy)]
pub(crate) struct Chunk {
    key: u64,
    init: Init,
    start: u64,
    len: u64,
    f32: bool,
}

impl Chunk {
    fn bytes(&self) -> u64 {
        self.len * if self.f32 { 4 } else { 2 }
    }
}

/// Appends the chunks covering all `numel` elements of the tensor with stream `key`.
pub(crate) fn push_chunks(out: &mut Vec<Chunk>, key: u64, init: Init, numel: u64, f32: bool) {
    let mut start = 0;
    while start < numel {
        let len = CHUNK_ELEMS.min(numel - start);
        out.push(Chunk {
            key,
            init,
            start,
            len,
            f32,
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
        push_chunks(&mut chunks, keys[t], specs[t].init, specs[t].numel(), false);
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
            parts.into_par_iter().for_each(|(c, out)| {
                if c.f32 {
                    fill_f32(c.key, c.init, c.start, out)
                } else {
                    fill(c.key, c.init, c.start, out)
                }
            });
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
