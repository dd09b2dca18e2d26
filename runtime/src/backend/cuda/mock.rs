//! The mock device: a [`Gpu`] whose memory is host memory and whose launches run the CPU twin of
//! the named kernel over the launch's argument list, so the whole CUDA path (allocation,
//! offsets, argument lists, copies, the order of operations) runs, and is checked against the
//! CPU backend, on machines without a GPU.
//!
//! Invariants: addresses are fake (they start far from zero and allocations are separated by
//! gaps), and every access through an address is checked to lie inside one live allocation, so
//! an offset or size error fails the launch (as a fatal device error) instead of reading
//! neighbouring data; every launch's arguments are checked against the parameter list the
//! kernel's source declares ([`super::signature`]); a twin computes exactly what the CPU
//! backend computes for the same inputs (it calls the same functions), so the CUDA backend on
//! this device equals the CPU backend bit for bit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use moe_kernels::Weights;
use parking_lot::Mutex;

use super::gpu::{DevPtr, Gpu, Grid, KArg};
use super::signature::{check_args, Param};
use crate::backend::cpu;
use crate::config::Rope;
use crate::error::{Error, Result};
use crate::weights::{typed_weights, Dtype};

/// First fake address (far from null and from host addresses a bug could pass instead).
const BASE_ADDRESS: u64 = 0x7e00_0000_0000;
/// Unmapped gap after every allocation, so an overrun does not land in the next one.
const GAP_BYTES: u64 = 4096;

/// The mock device (see the module doc).
pub struct MockGpu {
    mem: Mutex<Memory>,
    allocations: AtomicUsize,
    launches: Mutex<Vec<&'static str>>,
}

struct Memory {
    next: u64,
    /// Live allocations by base address: 8-byte words, so every typed view is aligned.
    blocks: BTreeMap<u64, (usize, Vec<u64>)>,
}

fn fault(reason: String) -> Error {
    Error::Device {
        reason: format!("mock device: {reason}"),
        fatal: true,
    }
}

impl Default for MockGpu {
    fn default() -> Self {
        MockGpu::new()
    }
}

impl MockGpu {
    pub fn new() -> MockGpu {
        MockGpu {
            mem: Mutex::new(Memory {
                next: BASE_ADDRESS,
                blocks: BTreeMap::new(),
            }),
            allocations: AtomicUsize::new(0),
            launches: Mutex::new(Vec::new()),
        }
    }

    /// Allocations live now.
    pub fn allocations(&self) -> usize {
        self.allocations.load(Ordering::Relaxed)
    }

    /// The kernels launched so far, in order.
    pub fn launched(&self) -> Vec<&'static str> {
        self.launches.lock().clone()
    }

    /// `len` bytes at `ptr`, which must lie inside one allocation.
    fn read(&self, ptr: DevPtr, len: usize) -> Result<Vec<u8>> {
        let mem = self.mem.lock();
        let (base, (size, words)) = mem
            .blocks
            .range(..=ptr)
            .next_back()
            .ok_or_else(|| fault(format!("read of {len} bytes at {ptr:#x}: no allocation")))?;
        let off = (ptr - base) as usize;
        if off + len > *size {
            return Err(fault(format!(
                "read of {len} bytes at {ptr:#x} passes the end of the {size}-byte allocation \
                 at {base:#x}"
            )));
        }
        Ok(bytemuck::cast_slice::<u64, u8>(words)[off..off + len].to_vec())
    }

    fn write(&self, ptr: DevPtr, src: &[u8]) -> Result<()> {
        let mut mem = self.mem.lock();
        let (base, (size, words)) = mem.blocks.range_mut(..=ptr).next_back().ok_or_else(|| {
            fault(format!(
                "write of {} bytes at {ptr:#x}: no allocation",
                src.len()
            ))
        })?;
        let off = (ptr - base) as usize;
        if off + src.len() > *size {
            return Err(fault(format!(
                "write of {} bytes at {ptr:#x} passes the end of the {size}-byte allocation at \
                 {base:#x}",
                src.len()
            )));
        }
        bytemuck::cast_slice_mut::<u64, u8>(words)[off..off + src.len()].copy_from_slice(src);
        Ok(())
    }

    fn read_f32(&self, ptr: DevPtr, n: usize) -> Result<Vec<f32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.read(ptr, n * 4)?))
    }

    fn read_u32(&self, ptr: DevPtr, n: usize) -> Result<Vec<u32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.read(ptr, n * 4)?))
    }

    fn write_f32(&self, ptr: DevPtr, v: &[f32]) -> Result<()> {
        self.write(ptr, bytemuck::cast_slice(v))
    }

    /// `n` elements of `dtype` at `ptr` as host words (aligned for any typed view).
    fn read_typed(&self, ptr: DevPtr, dtype: Dtype, n: usize) -> Result<Vec<u64>> {
        let bytes = self.read(ptr, dtype.bytes_for(n))?;
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
        Ok(words)
    }

    fn run_twin(&self, kernel: &'static str, grid: Grid, a: &Args<'_>) -> Result<()> {
        match kernel {
            "embed_f32" | "embed_bf16" | "embed_f16" => {
                let dtype = dtype_of(kernel);
                let (n_ids, vocab, width) = (a.u32(2) as usize, a.u32(3) as usize, a.u32(4));
                let width = width as usize;
                let ids = self.read_u32(a.ptr(1), n_ids)?;
                let mut out = vec![0f32; n_ids * width];
                for (row, &id) in out.chunks_exact_mut(width).zip(&ids) {
                    if (id as usize) < vocab {
                        let words = self.read_typed(
                            a.ptr(0) + dtype.bytes_for(id as usize * width) as u64,
                            dtype,
                            width,
                        )?;
                        let w = typed_weights(
                            &bytemuck::cast_slice(&words)[..dtype.bytes_for(width)],
                            dtype,
                        );
                        moe_kernels::row_to_f32(w, 0, width, row);
                    }
                }
                self.write_f32(a.ptr(5), &out)
            }
            k if k.starts_with("dequant_") => {
                let dtype = dtype_of(k);
                let (block, _) = dtype.block().expect("a block format");
                let n = a.u64(1) as usize * block;
                let words = self.read_typed(a.ptr(0), dtype, n)?;
                let w = weights_of(&words, dtype, n);
                let mut out = vec![0f32; n];
                moe_kernels::row_to_f32(w, 0, n, &mut out);
                self.write_f32(a.ptr(2), &out)
            }
            k if k.starts_with("matvec_") => {
                let dtype = dtype_of(k);
                let (m, n, kk) = (a.u32(3) as usize, a.u32(4) as usize, a.u32(5) as usize);
                let x = self.read_f32(a.ptr(0), m * kk)?;
                let words = self.read_typed(a.ptr(1), dtype, n * kk)?;
                let w = weights_of(&words, dtype, n * kk);
                let mut out = vec![0f32; m * n];
                cpu::Input::new(&x, m, kk, crate::backend::Activations::F32, &[w])
                    .matmul(w, n, &mut out, true);
                self.write_f32(a.ptr(2), &out)
            }
            "rms_norm_f32" => {
                let (rows, width) = (a.u32(2) as usize, a.u32(3) as usize);
                let mut x = self.read_f32(a.ptr(0), rows * width)?;
                let w = self.read_f32(a.ptr(1), width)?;
                cpu::rms_norm_rows(&mut x, &w, width, a.f32(4));
                self.write_f32(a.ptr(0), &x)
            }
            "rope_f32" => {
                let rows = a.u32(4) as usize;
                let (qw, kw) = (a.u32(5) as usize, a.u32(6) as usize);
                let (head_dim, rot_dim) = (a.u32(7) as usize, a.u32(8) as usize);
                let rope = Rope {
                    inv_freq: self.read_f32(a.ptr(3), rot_dim / 2)?,
                    attention_scaling: a.f32(9),
                    rot_dim,
                };
                let pos = self.read_u32(a.ptr(2), rows)?;
                let mut q = self.read_f32(a.ptr(0), rows * qw)?;
                let mut k = self.read_f32(a.ptr(1), rows * kw)?;
                for (r, &p) in pos.iter().enumerate() {
                    cpu::rope_row(&rope, &mut q[r * qw..(r + 1) * qw], head_dim, p as usize);
                    cpu::rope_row(&rope, &mut k[r * kw..(r + 1) * kw], head_dim, p as usize);
                }
                self.write_f32(a.ptr(0), &q)?;
                self.write_f32(a.ptr(1), &k)
            }
            "add_f32" | "mul_sigmoid_f32" => {
                let n = a.u32(2) as usize;
                let mut x = self.read_f32(a.ptr(0), n)?;
                let y = self.read_f32(a.ptr(1), n)?;
                for (x, y) in x.iter_mut().zip(&y) {
                    if kernel == "add_f32" {
                        *x += y;
                    } else {
                        *x *= cpu::sigmoid(*y);
                    }
                }
                self.write_f32(a.ptr(0), &x)
            }
            "silu_mul_f32" | "glu_clamped_f32" => {
                let n = a.u32(2) as usize;
                let g = self.read_f32(a.ptr(0), n)?;
                let mut u = self.read_f32(a.ptr(1), n)?;
                let kind = if kernel == "silu_mul_f32" {
                    crate::backend::Glu::SwiGlu
                } else {
                    crate::backend::Glu::ClampedSwiGlu {
                        limit: a.f32(3),
                        alpha: a.f32(4),
                    }
                };
                cpu::glu(&g, &mut u, kind);
                self.write_f32(a.ptr(1), &u)
            }
            "add_gated_rows_f32" => {
                let (rows, width) = (a.u32(3) as usize, a.u32(4) as usize);
                let mut out = self.read_f32(a.ptr(0), rows * width)?;
                let y = self.read_f32(a.ptr(1), rows * width)?;
                let gate = self.read_f32(a.ptr(2), rows)?;
                cpu::add_gated_rows(&mut out, &y, &gate, width);
                self.write_f32(a.ptr(0), &out)
            }
            "add_rows_f32" => {
                let (rows, width) = (a.u32(2) as usize, a.u32(3) as usize);
                let mut x = self.read_f32(a.ptr(0), rows * width)?;
                let b = self.read_f32(a.ptr(1), width)?;
                cpu::add_bias_rows(&mut x, &b);
                self.write_f32(a.ptr(0), &x)
            }
            "clamp_f32" => {
                let n = a.u32(1) as usize;
                let mut x = self.read_f32(a.ptr(0), n)?;
                cpu::clamp(&mut x, a.f32(2));
                self.write_f32(a.ptr(0), &x)
            }
            "split_halves_f32" => {
                let (blocks, d) = (a.u32(3) as usize, a.u32(4) as usize);
                let x = self.read_f32(a.ptr(0), blocks * 2 * d)?;
                let (p, q) = cpu::split_halves(&x, d);
                self.write_f32(a.ptr(1), &p)?;
                self.write_f32(a.ptr(2), &q)
            }
            "gather_rows_f32" => {
                let (n, width) = (a.u32(2) as usize, a.u32(3) as usize);
                let rows = self.read_u32(a.ptr(1), n)?;
                let mut out = Vec::with_capacity(n * width);
                for &r in &rows {
                    out.extend(self.read_f32(a.ptr(0) + (r as usize * width * 4) as u64, width)?);
                }
                self.write_f32(a.ptr(4), &out)
            }
            "kv_store_f32" | "kv_store_bf16" | "kv_store_f16" => {
                let n = a.u64(2) as usize;
                let src = self.read_f32(a.ptr(0), n)?;
                let elem = match kernel {
                    "kv_store_f32" => crate::backend::KvElem::F32,
                    "kv_store_bf16" => crate::backend::KvElem::Bf16,
                    _ => crate::backend::KvElem::F16,
                };
                self.write(a.ptr(1), &cpu::attention::encode_kv(elem, &src))
            }
            "attention_decode_f32" | "attention_decode_bf16" | "attention_decode_f16" => {
                self.attention_twin(kernel, grid, a)
            }
            "moe_sum_f32" => {
                let (n, hidden) = (a.u32(4) as usize, a.u32(5) as usize);
                let rows = self.read_u32(a.ptr(1), n)?;
                let w = self.read_f32(a.ptr(2), n)?;
                let y = self.read_f32(a.ptr(3), n * hidden)?;
                for ((&r, &w), y) in rows.iter().zip(&w).zip(y.chunks_exact(hidden)) {
                    let at = a.ptr(0) + (r as usize * hidden * 4) as u64;
                    let mut o = self.read_f32(at, hidden)?;
                    for (o, y) in o.iter_mut().zip(y) {
                        *o += y * w;
                    }
                    self.write_f32(at, &o)?;
                }
                Ok(())
            }
            other => Err(fault(format!("no CPU twin for kernel `{other}`"))),
        }
    }

    /// Decode attention (one split): per row r and KV head, the twin of the CPU backend's
    /// attention over the cache rows the row's address and position name.
    fn attention_twin(&self, kernel: &str, grid: Grid, a: &Args<'_>) -> Result<()> {
        let rows = grid[0] as usize;
        let (window, nh, nkv, hd) = (
            a.u32(4) as usize,
            a.u32(5) as usize,
            a.u32(6) as usize,
            a.u32(7) as usize,
        );
        let (scale, splits) = (a.f32(8), a.u32(9));
        if splits != 1 || grid[2] != 1 || grid[1] as usize != nkv {
            return Err(fault(format!(
                "{kernel}: the twin runs one split (grid {grid:?}, splits {splits})"
            )));
        }
        let elem = match kernel {
            "attention_decode_f32" => crate::backend::KvElem::F32,
            "attention_decode_bf16" => crate::backend::KvElem::Bf16,
            _ => crate::backend::KvElem::F16,
        };
        let kvr = nkv * hd;
        let q = self.read_f32(a.ptr(0), rows * nh * hd)?;
        let kc: Vec<u64> = bytemuck::pod_collect_to_vec(&self.read(a.ptr(1), rows * 8)?);
        let vc: Vec<u64> = bytemuck::pod_collect_to_vec(&self.read(a.ptr(2), rows * 8)?);
        let pos = self.read_u32(a.ptr(3), rows)?;
        let mut out = vec![0f32; rows * nh * hd];
        let group = nh / nkv;
        let eb = elem.elem_bytes() as usize;
        for r in 0..rows {
            let p = pos[r] as usize;
            let first = if window > 0 {
                (p + 1).saturating_sub(window)
            } else {
                0
            };
            let n = p + 1 - first;
            let widen = |addr: u64| -> Result<Vec<f32>> {
                let bytes = self.read(addr + (first * kvr * eb) as u64, n * kvr * eb)?;
                Ok(cpu::attention::decode_kv(elem, &bytes))
            };
            let (ck, cv) = (widen(kc[r])?, widen(vc[r])?);
            for kvh in 0..nkv {
                let qg = &q[r * nh * hd + kvh * group * hd..][..group * hd];
                let o = &mut out[r * nh * hd + kvh * group * hd..][..group * hd];
                cpu::attention::attend_group(
                    qg,
                    group,
                    hd,
                    &ck[kvh * hd..],
                    &cv[kvh * hd..],
                    kvr,
                    n,
                    scale,
                    o,
                );
            }
        }
        self.write_f32(a.ptr(11), &out)
    }
}

/// The storage type a kernel's name ends in.
fn dtype_of(kernel: &str) -> Dtype {
    match kernel.rsplit('_').next().unwrap_or("") {
        "bf16" => Dtype::Bf16,
        "f16" => Dtype::F16,
        "0" => Dtype::Q8_0,
        "k" => Dtype::Q4K,
        "f8" => Dtype::F8B128,
        "nf4" => Dtype::Nf4,
        "fp4" => Dtype::Fp4,
        _ => Dtype::F32,
    }
}

fn weights_of(words: &[u64], dtype: Dtype, n: usize) -> Weights<'_> {
    typed_weights(
        &bytemuck::cast_slice::<u64, u8>(words)[..dtype.bytes_for(n)],
        dtype,
    )
}

/// A launch's arguments, their kinds already checked against the kernel's parameters.
struct Args<'a>(&'a [KArg]);

impl Args<'_> {
    fn ptr(&self, i: usize) -> DevPtr {
        match self.0[i] {
            KArg::Ptr(p) => p,
            _ => unreachable!("kinds checked against the signature"),
        }
    }
    fn u32(&self, i: usize) -> u32 {
        match self.0[i] {
            KArg::U32(v) => v,
            _ => unreachable!("kinds checked against the signature"),
        }
    }
    fn u64(&self, i: usize) -> u64 {
        match self.0[i] {
            KArg::U64(v) => v,
            _ => unreachable!("kinds checked against the signature"),
        }
    }
    fn f32(&self, i: usize) -> f32 {
        match self.0[i] {
            KArg::F32(v) => v,
            _ => unreachable!("kinds checked against the signature"),
        }
    }
}

impl Gpu for MockGpu {
    fn describe(&self) -> String {
        "mock CUDA device (host memory, CPU twins)".into()
    }

    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        let mut mem = self.mem.lock();
        let base = mem.next;
        mem.next += (bytes as u64).next_multiple_of(256) + GAP_BYTES;
        mem.blocks
            .insert(base, (bytes, vec![0u64; bytes.div_ceil(8)]));
        self.allocations.fetch_add(1, Ordering::Relaxed);
        Ok(base)
    }

    fn free(&self, ptr: DevPtr) {
        if self.mem.lock().blocks.remove(&ptr).is_some() {
            self.allocations.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.write(dst, src)
    }

    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        dst.copy_from_slice(&self.read(src, dst.len())?);
        Ok(())
    }

    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        let data = self.read(src, bytes)?;
        self.write(dst, &data)
    }

    fn zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        self.write(dst, &vec![0u8; bytes])
    }

    fn launch(&self, kernel: &'static str, grid: Grid, args: &[KArg]) -> Result<()> {
        let params: Vec<Param> = super::signature::of(kernel)
            .ok_or_else(|| fault(format!("no kernel named `{kernel}`")))?;
        check_args(kernel, &params, args).map_err(fault)?;
        if grid.contains(&0) {
            return Err(fault(format!("{kernel}: empty grid {grid:?}")));
        }
        self.launches.lock().push(kernel);
        self.run_twin(kernel, grid, &Args(args))
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
