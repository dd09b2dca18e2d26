//! The mock device: a [`Gpu`] whose memory is host memory and whose launches run the CPU twin of
//! the named kernel over the launch's argument list, so the whole CUDA path (allocation,
//! offsets, argument lists, copies, the order of operations) runs, and is checked against the
//! CPU backend, on machines without a GPU.
//!
//! The mock runs every operation at once, in issue order, but checks the ordering discipline a
//! real device needs between its two streams ([`Order`]): a kernel or compute-stream copy that
//! touches memory the copy stream wrote must come after an event of that copy was waited for
//! (by the compute stream or the host); a copy-stream write into memory a kernel used must come
//! after an event of that kernel was waited for; a pinned buffer must not be rewritten while a
//! copy from it may be in flight. A violation is a fatal device error naming the kernel or copy.
//! Copies on the copy stream advance a modelled clock that events read, so event timings of
//! copies are those of a link of [`MOCK_LINK_BYTES_PER_S`].
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

use std::collections::HashMap;

use super::gpu::{DevPtr, EventId, Gpu, Grid, HostId, KArg, Stream};
use super::signature::{check_args, Param};
use crate::backend::cpu;
use crate::config::Rope;
use crate::error::{Error, Result};
use crate::weights::{typed_weights, Dtype};

/// First fake address (far from null and from host addresses a bug could pass instead).
const BASE_ADDRESS: u64 = 0x7e00_0000_0000;
/// Unmapped gap after every allocation, so an overrun does not land in the next one.
const GAP_BYTES: u64 = 4096;

/// The modelled speed of copies on the copy stream (a PCIe 4.0 x16 link's order), which event
/// timings report (see [`Order`]).
pub const MOCK_LINK_BYTES_PER_S: f64 = 25e9;

/// The mock device (see the module doc).
pub struct MockGpu {
    mem: Mutex<Memory>,
    order: Mutex<Order>,
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
            order: Mutex::new(Order::default()),
            allocations: AtomicUsize::new(0),
            launches: Mutex::new(Vec::new()),
        }
    }

    /// The allocation holding `ptr` (its base address), if any.
    fn base_of(&self, ptr: DevPtr) -> Option<u64> {
        let mem = self.mem.lock();
        let (&base, (size, _)) = mem.blocks.range(..=ptr).next_back()?;
        (ptr < base + (*size).max(1) as u64).then_some(base)
    }

    /// Checks and records a compute-stream use of the allocations holding `ptrs`.
    fn compute_use(&self, what: &str, ptrs: &[DevPtr]) -> Result<()> {
        let bases: Vec<u64> = ptrs.iter().filter_map(|&p| self.base_of(p)).collect();
        let mut o = self.order.lock();
        for b in &bases {
            let written = o.allocs.get(b).map_or(0, |a| a.copy_write);
            if written > o.copy_visible {
                return Err(fault(format!(
                    "{what} uses memory at {b:#x} that copy #{written} on the copy stream writes, \
                     before an event after that copy was waited for"
                )));
            }
        }
        o.compute_seq += 1;
        let seq = o.compute_seq;
        for b in bases {
            o.allocs.entry(b).or_default().compute_use = seq;
        }
        Ok(())
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
                let block = dtype.block().map_or(1, |b| b.0);
                let n = a.u64(1) as usize * block;
                let words = self.read_typed(a.ptr(0), dtype, n)?;
                let w = weights_of(&words, dtype, n);
                let mut out = vec![0f32; n];
                moe_kernels::row_to_f32(w, 0, n, &mut out);
                self.write_f32(a.ptr(2), &out)
            }
            k if k.starts_with("head_matmul_t_") => {
                let dtype = dtype_of(k);
                let (rows, heads, h0) = (a.u32(3) as usize, a.u32(4) as usize, a.u32(5) as usize);
                let (stride, offset) = (a.u32(6) as usize, a.u32(7) as usize);
                let (len, cols) = (a.u32(8) as usize, a.u32(9) as usize);
                let launched = grid[1] as usize;
                if h0 + launched > heads {
                    return Err(fault(format!(
                        "{k}: heads {h0}..{} of {heads}",
                        h0 + launched
                    )));
                }
                let x = self.read_f32(a.ptr(0), rows * heads * len)?;
                // This launch's heads of every row, side by side.
                let xs: Vec<f32> = (0..rows)
                    .flat_map(|r| x[(r * heads + h0) * len..][..launched * len].to_vec())
                    .collect();
                let n_rows = (launched - 1) * stride + offset + len;
                let words = self.read_typed(a.ptr(1), dtype, n_rows * cols)?;
                let wt = weights_of(&words, dtype, n_rows * cols);
                let blocks = crate::backend::HeadBlocks {
                    heads: launched,
                    stride,
                    offset,
                    len,
                    cols,
                };
                let y = cpu::head_matmul_rows(&xs, rows, &blocks, true, |i, row| {
                    moe_kernels::row_to_f32(wt, i, cols, row)
                });
                let mut out = self.read_f32(a.ptr(2), rows * heads * cols)?;
                for r in 0..rows {
                    out[(r * heads + h0) * cols..][..launched * cols]
                        .copy_from_slice(&y[r * launched * cols..][..launched * cols]);
                }
                self.write_f32(a.ptr(2), &out)
            }
            k if k.starts_with("matvec_grouped_") => {
                let dtype = dtype_of(k);
                let entries = grid[1] as usize;
                let (n, kk) = (a.u32(3) as usize, a.u32(4) as usize);
                let table: Vec<u64> =
                    bytemuck::pod_collect_to_vec(&self.read(a.ptr(0), entries * 32)?);
                // The weights the table points to are read by this launch too.
                let ws: Vec<DevPtr> = table.chunks_exact(4).map(|e| e[0]).collect();
                self.compute_use(&format!("kernel {k} (its weights)"), &ws)?;
                for e in table.chunks_exact(4) {
                    let (w, xp, op, m) = (e[0], e[1], e[2], e[3] as usize);
                    if !(1..=8).contains(&m) {
                        return Err(fault(format!("{k}: an entry of {m} rows (1 to 8)")));
                    }
                    let x = self.read_f32(xp, m * kk)?;
                    let words = self.read_typed(w, dtype, n * kk)?;
                    let wt = weights_of(&words, dtype, n * kk);
                    let mut out = vec![0f32; m * n];
                    cpu::Input::new(&x, m, kk, crate::backend::Activations::F32, &[wt])
                        .matmul(wt, n, &mut out, true);
                    self.write_f32(op, &out)?;
                }
                Ok(())
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
            "route_softmax_topk_f32" => {
                let rows = grid[0] as usize;
                let (e, k) = (a.u32(2) as usize, a.u32(3) as usize);
                let logits = self.read_f32(a.ptr(0), rows * e)?;
                let bias = match a.ptr(1) {
                    0 => None,
                    p => Some(self.read_f32(p, e)?),
                };
                let rule = crate::backend::RouterRule {
                    num_experts: e,
                    top_k: k,
                    scoring: crate::backend::Scoring::Softmax,
                    renormalize: a.u32(4) != 0,
                    groups: None,
                    scale: a.f32(5),
                };
                let r = cpu::route::route(logits, &rule, bias.as_deref());
                self.write(a.ptr(6), bytemuck::cast_slice(&r.indices))?;
                self.write_f32(a.ptr(7), &r.weights)
            }
            "moe_sum_rows_f32" => {
                let (rows, hidden) = (a.u32(5) as usize, a.u32(6) as usize);
                let start = self.read_u32(a.ptr(1), rows + 1)?;
                let total = start[rows] as usize;
                let entries = self.read_u32(a.ptr(2), total)?;
                let n_y = entries.iter().map(|&i| i as usize + 1).max().unwrap_or(0);
                let w = self.read_f32(a.ptr(3), n_y)?;
                let y = self.read_f32(a.ptr(4), n_y * hidden)?;
                let mut out = self.read_f32(a.ptr(0), rows * hidden)?;
                for r in 0..rows {
                    let o = &mut out[r * hidden..(r + 1) * hidden];
                    for &i in &entries[start[r] as usize..start[r + 1] as usize] {
                        let i = i as usize;
                        for (o, y) in o.iter_mut().zip(&y[i * hidden..(i + 1) * hidden]) {
                            *o += y * w[i];
                        }
                    }
                }
                self.write_f32(a.ptr(0), &out)
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
                    interleaved: a.u32(10) != 0,
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
            "split_heads_f32" => {
                let (blocks, ha, hb) = (a.u32(3) as usize, a.u32(4) as usize, a.u32(5) as usize);
                let x = self.read_f32(a.ptr(0), blocks * (ha + hb))?;
                let (p, q) = cpu::split_heads(&x, ha, hb);
                // (An empty part is an empty buffer, which the kernel never writes.)
                for (at, part) in [(a.ptr(1), p), (a.ptr(2), q)] {
                    if !part.is_empty() {
                        self.write_f32(at, &part)?;
                    }
                }
                Ok(())
            }
            "join_heads_f32" => {
                let (blocks, ha, hb) = (a.u32(3) as usize, a.u32(4) as usize, a.u32(5) as usize);
                let x = self.read_f32(a.ptr(0), blocks * ha)?;
                let y = self.read_f32(a.ptr(1), blocks * hb)?;
                self.write_f32(a.ptr(2), &cpu::join_heads(&x, &y, ha, hb))
            }
            "conv1d_silu_seq_f32" => {
                let (n, c, k) = (a.u32(3) as usize, a.u32(4) as usize, a.u32(5) as usize);
                let w = self.read_f32(a.ptr(1), c * k)?;
                let mut st = self.read_f32(a.ptr(2), (k - 1) * c)?;
                let x = self.read_f32(a.ptr(0), n * c)?;
                let mut out = vec![0f32; n * c];
                cpu::deltanet::causal_conv1d_silu(&x, c, &w, k, &mut st, &mut out);
                self.write_f32(a.ptr(2), &st)?;
                self.write_f32(a.ptr(6), &out)
            }
            "gated_delta_seq_f32" => {
                let conv_dim = a.u32(1) as usize;
                let (n, nk, nv, dk, dv) = (
                    a.u32(5) as usize,
                    a.u32(6) as usize,
                    a.u32(7) as usize,
                    a.u32(8) as usize,
                    a.u32(9) as usize,
                );
                let qkv = self.read_f32(a.ptr(0), n * conv_dim)?;
                let g = self.read_f32(a.ptr(2), n * nv)?;
                let beta = self.read_f32(a.ptr(3), n * nv)?;
                let mut st = self.read_f32(a.ptr(4), nv * dk * dv)?;
                let mut out = vec![0f32; n * nv * dv];
                for vh in 0..nv {
                    let kh = vh / (nv / nk);
                    let col = |off: usize, d: usize| -> Vec<f32> {
                        (0..n)
                            .flat_map(|t| qkv[t * conv_dim + off..][..d].iter().copied())
                            .collect()
                    };
                    let (q, k, v) = (
                        col(kh * dk, dk),
                        col(nk * dk + kh * dk, dk),
                        col(2 * nk * dk + vh * dv, dv),
                    );
                    let gh: Vec<f32> = (0..n).map(|t| g[t * nv + vh]).collect();
                    let bh: Vec<f32> = (0..n).map(|t| beta[t * nv + vh]).collect();
                    let input = cpu::deltanet::HeadInput {
                        q: &q,
                        k: &k,
                        v: &v,
                        g: &gh,
                        beta: &bh,
                    };
                    let mut o = vec![0f32; n * dv];
                    let s = &mut st[vh * dk * dv..][..dk * dv];
                    cpu::deltanet::recurrent(&input, dk, dv, s, &mut o);
                    for t in 0..n {
                        out[t * nv * dv + vh * dv..][..dv].copy_from_slice(&o[t * dv..][..dv]);
                    }
                }
                self.write_f32(a.ptr(4), &st)?;
                self.write_f32(a.ptr(10), &out)
            }
            "deltanet_split_f32" => {
                let rows = a.u32(4) as usize;
                let dims = crate::config::LinearAttentionConfig {
                    num_key_heads: a.u32(5) as usize,
                    num_value_heads: a.u32(6) as usize,
                    key_head_dim: a.u32(7) as usize,
                    value_head_dim: a.u32(8) as usize,
                    conv_kernel: 0,
                };
                let (nk, nv) = (dims.num_key_heads, dims.num_value_heads);
                let (dk, dv) = (dims.key_head_dim, dims.value_head_dim);
                let per_k = 2 * dk + 2 * (nv / nk) * dv;
                let qkvz = self.read_f32(a.ptr(0), rows * nk * per_k)?;
                let ba = self.read_f32(a.ptr(1), rows * 2 * nv)?;
                let neg_a = self.read_f32(a.ptr(2), nv)?;
                let dt_bias = self.read_f32(a.ptr(3), nv)?;
                let (mixed, z, beta, g) =
                    cpu::deltanet::split_inputs(&qkvz, &ba, &neg_a, &dt_bias, &dims, rows);
                self.write_f32(a.ptr(9), &mixed)?;
                self.write_f32(a.ptr(10), &z)?;
                self.write_f32(a.ptr(11), &beta)?;
                self.write_f32(a.ptr(12), &g)
            }
            "l2norm_heads_f32" => {
                let (rows, stride) = (a.u32(1) as usize, a.u32(2) as usize);
                let (nk, dk) = (a.u32(3) as usize, a.u32(4) as usize);
                let mut x = self.read_f32(a.ptr(0), rows * stride)?;
                cpu::deltanet::normalize_qk(&mut x, stride, nk, dk, a.f32(5));
                self.write_f32(a.ptr(0), &x)
            }
            "mul_silu_f32" => {
                let n = a.u32(2) as usize;
                let mut x = self.read_f32(a.ptr(0), n)?;
                let z = self.read_f32(a.ptr(1), n)?;
                cpu::deltanet::mul_silu(&mut x, &z);
                self.write_f32(a.ptr(0), &x)
            }
            "split_pairs_f32" => {
                let (blocks, d) = (a.u32(3) as usize, a.u32(4) as usize);
                let x = self.read_f32(a.ptr(0), blocks * 2 * d)?;
                let (even, odd): (Vec<f32>, Vec<f32>) =
                    x.chunks_exact(2).map(|p| (p[0], p[1])).unzip();
                self.write_f32(a.ptr(1), &even)?;
                self.write_f32(a.ptr(2), &odd)
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
                self.attention_twin(kernel, grid, a, false)
            }
            "attention_latent_f32" | "attention_latent_bf16" | "attention_latent_f16" => {
                self.attention_twin(kernel, grid, a, true)
            }
            "attention_merge_f32" => {
                let (splits, nh, hd) = (a.u32(1) as usize, a.u32(2) as usize, a.u32(3) as usize);
                let rows = grid[0] as usize;
                if grid[1] as usize != nh {
                    return Err(fault(format!(
                        "attention_merge_f32: grid {grid:?}, {nh} heads"
                    )));
                }
                let part = self.read_f32(a.ptr(0), rows * nh * splits * (hd + 2))?;
                let sinks = match a.ptr(5) {
                    0 => None,
                    p => Some(self.read_f32(p, nh)?),
                };
                self.write_f32(a.ptr(4), &merge_states(&part, splits, hd, sinks.as_deref()))
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
    /// attention over the cache rows the row's address and position name; `latent`
    /// (`attention_latent_*`): no value cache, each head's values the leading `vd` values of
    /// its key row.
    fn attention_twin(&self, kernel: &str, grid: Grid, a: &Args<'_>, latent: bool) -> Result<()> {
        let rows = grid[0] as usize;
        // The latent kernels take no value addresses and one more width (vd) instead.
        let (window, nh, nkv, hd, vd) = if latent {
            (
                a.u32(3) as usize,
                a.u32(4) as usize,
                a.u32(5) as usize,
                a.u32(6) as usize,
                a.u32(7) as usize,
            )
        } else {
            let hd = a.u32(7) as usize;
            (
                a.u32(4) as usize,
                a.u32(5) as usize,
                a.u32(6) as usize,
                hd,
                hd,
            )
        };
        let (scale, splits) = (a.f32(8), a.u32(9) as usize);
        let heads_covered = if latent {
            grid[1] as usize * super::ATTENTION_LATENT_HEADS >= nh
                && (grid[1] as usize - 1) * super::ATTENTION_LATENT_HEADS < nh
        } else {
            grid[1] as usize == nkv
        };
        if splits == 0 || grid[2] as usize != splits || !heads_covered || nkv == 0 || vd > hd {
            return Err(fault(format!(
                "{kernel}: grid {grid:?} does not match {nh} heads, {nkv} KV heads, head_dim \
                 {hd}, value_dim {vd} and {splits} splits"
            )));
        }
        let elem = match kernel.rsplit('_').next() {
            Some("f32") => crate::backend::KvElem::F32,
            Some("bf16") => crate::backend::KvElem::Bf16,
            _ => crate::backend::KvElem::F16,
        };
        let kvr = nkv * hd;
        let q = self.read_f32(a.ptr(0), rows * nh * hd)?;
        let kc: Vec<u64> = bytemuck::pod_collect_to_vec(&self.read(a.ptr(1), rows * 8)?);
        let vc: Vec<u64> = if latent {
            kc.clone()
        } else {
            bytemuck::pod_collect_to_vec(&self.read(a.ptr(2), rows * 8)?)
        };
        let pos = self.read_u32(a.ptr(if latent { 2 } else { 3 }), rows)?;
        let sinks = match a.ptr(12) {
            0 => None,
            p => Some(self.read_f32(p, nh)?),
        };
        let mut out = vec![0f32; rows * nh * vd];
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
            let ck = widen(kc[r])?;
            let cv = if latent { ck.clone() } else { widen(vc[r])? };
            if splits > 1 {
                // Each split's softmax state over its run of positions, as the kernel writes it.
                let chunk = n.div_ceil(splits);
                for h in 0..nh {
                    let off = h / group * hd;
                    let qh = &q[(r * nh + h) * hd..][..hd];
                    for z in 0..splits {
                        let lo = (z * chunk).min(n);
                        let hi = (lo + chunk).min(n);
                        let part = split_state(qh, &ck, &cv, kvr, off, vd, lo..hi, scale);
                        let at = a.ptr(10) + ((((r * nh + h) * splits) + z) * (vd + 2) * 4) as u64;
                        self.write_f32(at, &part)?;
                    }
                }
                continue;
            }
            for kvh in 0..nkv {
                let qg = &q[r * nh * hd + kvh * group * hd..][..group * hd];
                let o = &mut out[r * nh * vd + kvh * group * vd..][..group * vd];
                cpu::attention::attend_group(
                    qg,
                    group,
                    hd,
                    vd,
                    &ck[kvh * hd..],
                    &cv[kvh * hd..],
                    kvr,
                    n,
                    scale,
                    sinks.as_deref().map(|s| &s[kvh * group..][..group]),
                    o,
                );
            }
        }
        if splits > 1 {
            // With several splits the kernel writes only the states (merged by another launch).
            return Ok(());
        }
        self.write_f32(a.ptr(11), &out)
    }
}

/// The ordering state of the two streams (see the module doc). Sequence numbers count each
/// stream's operations from 1; 0 is "none".
#[derive(Default)]
struct Order {
    compute_seq: u64,
    copy_seq: u64,
    next_event: u64,
    events: HashMap<EventId, (Stream, u64)>,
    /// The copy stream's modelled clock, seconds: each copy advances it by its bytes over
    /// [`MOCK_LINK_BYTES_PER_S`]. Events recorded on the copy stream read it, so timing two of
    /// them gives the modelled transfer time, as events on a real link give the measured one.
    copy_clock_s: f64,
    event_clock_s: HashMap<EventId, f64>,
    /// Copy-stream work that compute-stream work issued from now on comes after.
    copy_visible: u64,
    /// Compute-stream work that copy-stream work issued from now on comes after.
    compute_visible: u64,
    /// Copy-stream work the host has seen complete.
    copy_seen_by_host: u64,
    allocs: HashMap<u64, Uses>,
    /// Pinned buffers by address: real host memory (8-byte words, so the address is the id, as
    /// on the driver), its size in bytes, and the last copy that read it.
    hosts: HashMap<HostId, (Vec<u64>, usize, u64)>,
}

/// The last copy-stream write and compute-stream use of one allocation.
#[derive(Default, Clone, Copy)]
struct Uses {
    copy_write: u64,
    compute_use: u64,
}

impl Order {
    /// The host saw `event` complete: work after it is ordered after its stream's work.
    fn host_saw(&mut self, event: EventId) -> Result<()> {
        let &(stream, seq) = self
            .events
            .get(&event)
            .ok_or_else(|| fault(format!("event {event} does not exist")))?;
        match stream {
            Stream::Copy => {
                self.copy_visible = self.copy_visible.max(seq);
                self.copy_seen_by_host = self.copy_seen_by_host.max(seq);
            }
            Stream::Compute => self.compute_visible = self.compute_visible.max(seq),
        }
        Ok(())
    }
}

/// One split's softmax state `[max, sum, weighted values (vd)]` of query head `q` (as wide as
/// a key) over the cached positions `run` (`k`, `v` rows `kvr` apart, this head's keys and
/// values at `off`, values `vd` wide): the state `attention_decode_*` / `attention_latent_*`
/// write with several splits (max -inf and zeros for an empty run).
#[allow(clippy::too_many_arguments)]
fn split_state(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kvr: usize,
    off: usize,
    vd: usize,
    run: std::ops::Range<usize>,
    scale: f32,
) -> Vec<f32> {
    let hd = q.len();
    let scores: Vec<f32> = run
        .clone()
        .map(|t| {
            let kt = &k[t * kvr + off..][..hd];
            q.iter().zip(kt).map(|(a, b)| a * b).sum::<f32>() * scale
        })
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut state = vec![0f32; vd + 2];
    state[0] = max;
    for (t, s) in run.zip(&scores) {
        let e = (s - max).exp();
        state[1] += e;
        for (o, vt) in state[2..].iter_mut().zip(&v[t * kvr + off..][..vd]) {
            *o += e * vt;
        }
    }
    state
}

/// `attention_merge_f32`: the splits' states of every (row, head) merged in ascending order,
/// then the head's sink (a state of maximum `sink`, sum 1 and no value), if any.
fn merge_states(part: &[f32], splits: usize, hd: usize, sinks: Option<&[f32]>) -> Vec<f32> {
    let mut out = Vec::with_capacity(part.len() / splits / (hd + 2) * hd);
    for (i, states) in part.chunks_exact(splits * (hd + 2)).enumerate() {
        let sink = sinks.map(|s| s[i % s.len()]);
        let mx = states
            .chunks_exact(hd + 2)
            .map(|s| s[0])
            .fold(sink.unwrap_or(f32::NEG_INFINITY), f32::max);
        let mut den = 0f32;
        let mut num = vec![0f32; hd];
        for s in states.chunks_exact(hd + 2) {
            let f = if s[0] == f32::NEG_INFINITY {
                0.0
            } else {
                (s[0] - mx).exp()
            };
            den += s[1] * f;
            for (n, v) in num.iter_mut().zip(&s[2..]) {
                *n += v * f;
            }
        }
        if let Some(sink) = sink {
            den += (sink - mx).exp();
        }
        out.extend(num.iter().map(|n| n / den));
    }
    out
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
        "nf4bf16" => Dtype::Nf4Bf16,
        "nf4f16" => Dtype::Nf4F16,
        "fp4bf16" => Dtype::Fp4Bf16,
        "fp4f16" => Dtype::Fp4F16,
        "mxfp4" => Dtype::Mxfp4,
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
        self.compute_use("a host-to-device copy", &[dst])?;
        self.write(dst, src)
    }

    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        self.compute_use("a device-to-host copy", &[src])?;
        dst.copy_from_slice(&self.read(src, dst.len())?);
        // The copy returns after all compute work before it.
        let mut o = self.order.lock();
        o.compute_visible = o.compute_seq;
        Ok(())
    }

    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<()> {
        self.compute_use("a device-to-device copy", &[dst, src])?;
        let data = self.read(src, bytes)?;
        self.write(dst, &data)
    }

    fn zero(&self, dst: DevPtr, bytes: usize) -> Result<()> {
        self.compute_use("a memset", &[dst])?;
        self.write(dst, &vec![0u8; bytes])
    }

    fn launch(&self, kernel: &'static str, grid: Grid, args: &[KArg]) -> Result<()> {
        let params: Vec<Param> = super::signature::of(kernel)
            .ok_or_else(|| fault(format!("no kernel named `{kernel}`")))?;
        check_args(kernel, &params, args).map_err(fault)?;
        if grid.contains(&0) {
            return Err(fault(format!("{kernel}: empty grid {grid:?}")));
        }
        let ptrs: Vec<DevPtr> = args
            .iter()
            .filter_map(|a| match a {
                KArg::Ptr(p) if *p != 0 => Some(*p),
                _ => None,
            })
            .collect();
        self.compute_use(&format!("kernel {kernel}"), &ptrs)?;
        self.launches.lock().push(kernel);
        self.run_twin(kernel, grid, &Args(args))
    }

    fn synchronize(&self) -> Result<()> {
        let mut o = self.order.lock();
        o.copy_visible = o.copy_seq;
        o.copy_seen_by_host = o.copy_seq;
        o.compute_visible = o.compute_seq;
        Ok(())
    }

    fn gemm(
        &self,
        x: DevPtr,
        w: DevPtr,
        dtype: Dtype,
        out: DevPtr,
        m: usize,
        n: usize,
        k: usize,
        scratch: DevPtr,
        scratch_bytes: usize,
    ) -> Result<()> {
        let mut ptrs = vec![x, w, out];
        if dtype != Dtype::F32 {
            if scratch_bytes < k * 4 {
                return Err(fault(format!(
                    "gemm scratch of {scratch_bytes} bytes holds no row of {k} values"
                )));
            }
            ptrs.push(scratch);
        }
        self.compute_use("gemm", &ptrs)?;
        // The CPU backend's product over the stored weights (bit for bit).
        let xs = self.read_f32(x, m * k)?;
        let words = self.read_typed(w, dtype, n * k)?;
        let wt = weights_of(&words, dtype, n * k);
        let mut y = vec![0f32; m * n];
        cpu::Input::new(&xs, m, k, crate::backend::Activations::F32, &[wt])
            .matmul(wt, n, &mut y, true);
        self.launches.lock().push("gemm");
        self.write_f32(out, &y)
    }

    fn host_alloc(&self, bytes: usize) -> Result<HostId> {
        let words = vec![0u64; bytes.div_ceil(8).max(1)];
        let id = words.as_ptr() as HostId;
        self.order.lock().hosts.insert(id, (words, bytes, 0));
        Ok(id)
    }

    fn host_free(&self, id: HostId) {
        self.order.lock().hosts.remove(&id);
    }

    fn host_write(&self, id: HostId, src: &[u8]) -> Result<()> {
        let mut o = self.order.lock();
        let seen = o.copy_seen_by_host;
        let (words, len, last_copy) = o
            .hosts
            .get_mut(&id)
            .ok_or_else(|| fault(format!("pinned buffer {id:#x} does not exist")))?;
        if *last_copy > seen {
            return Err(fault(format!(
                "pinned buffer {id:#x} rewritten while copy #{last_copy} from it may be in flight"
            )));
        }
        if src.len() > *len {
            return Err(fault(format!(
                "a write of {} bytes to a {len}-byte pinned buffer",
                src.len()
            )));
        }
        bytemuck::cast_slice_mut::<u64, u8>(words)[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn copy_async(&self, dst: DevPtr, src: HostId, bytes: usize) -> Result<()> {
        let base = self
            .base_of(dst)
            .ok_or_else(|| fault(format!("copy to {dst:#x}: no allocation")))?;
        let data = {
            let mut o = self.order.lock();
            let used = o.allocs.get(&base).map_or(0, |a| a.compute_use);
            if used > o.compute_visible {
                return Err(fault(format!(
                    "a copy overwrites memory at {base:#x} that compute operation #{used} uses, \
                     before an event after it was waited for"
                )));
            }
            o.copy_seq += 1;
            let seq = o.copy_seq;
            o.allocs.entry(base).or_default().copy_write = seq;
            let (words, len, last_copy) = o
                .hosts
                .get_mut(&src)
                .ok_or_else(|| fault(format!("pinned buffer {src:#x} does not exist")))?;
            if bytes > *len {
                return Err(fault(format!(
                    "a copy of {bytes} bytes from a {len}-byte pinned buffer"
                )));
            }
            *last_copy = seq;
            let data = bytemuck::cast_slice::<u64, u8>(words)[..bytes].to_vec();
            o.copy_clock_s += bytes as f64 / MOCK_LINK_BYTES_PER_S;
            data
        };
        self.write(dst, &data)
    }

    fn record(&self, stream: Stream) -> Result<EventId> {
        let mut o = self.order.lock();
        o.next_event += 1;
        let id = o.next_event;
        let seq = match stream {
            Stream::Compute => o.compute_seq,
            Stream::Copy => o.copy_seq,
        };
        o.events.insert(id, (stream, seq));
        let clock = match stream {
            Stream::Compute => 0.0,
            Stream::Copy => o.copy_clock_s,
        };
        o.event_clock_s.insert(id, clock);
        Ok(id)
    }

    fn wait_event(&self, stream: Stream, event: EventId) -> Result<()> {
        let mut o = self.order.lock();
        let &(from, seq) = o
            .events
            .get(&event)
            .ok_or_else(|| fault(format!("event {event} does not exist")))?;
        match (stream, from) {
            (Stream::Compute, Stream::Copy) => o.copy_visible = o.copy_visible.max(seq),
            (Stream::Copy, Stream::Compute) => o.compute_visible = o.compute_visible.max(seq),
            _ => {}
        }
        Ok(())
    }

    fn event_done(&self, event: EventId) -> Result<bool> {
        self.order.lock().host_saw(event)?;
        Ok(true)
    }

    fn event_sync(&self, event: EventId) -> Result<()> {
        self.order.lock().host_saw(event)
    }

    /// Modelled time between two copy-stream events; 0 between compute-stream ones (the mock
    /// models no compute time).
    fn elapsed_ms(&self, start: EventId, end: EventId) -> Result<f32> {
        let o = self.order.lock();
        let at = |e: EventId| {
            o.event_clock_s
                .get(&e)
                .copied()
                .ok_or_else(|| fault(format!("event {e} does not exist")))
        };
        Ok(((at(end)? - at(start)?) * 1e3) as f32)
    }

    fn event_free(&self, event: EventId) {
        let mut o = self.order.lock();
        o.events.remove(&event);
        o.event_clock_s.remove(&event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        bytemuck::cast_slice(v).to_vec()
    }

    /// `add_f32(x, y, n)`: a kernel that reads and writes `x` and reads `y`.
    fn add(gpu: &MockGpu, x: DevPtr, y: DevPtr, n: u32) -> Result<()> {
        gpu.launch(
            "add_f32",
            [1, 1, 1],
            &[KArg::Ptr(x), KArg::Ptr(y), KArg::U32(n)],
        )
    }

    #[test]
    fn a_kernel_reading_a_copy_must_wait_for_its_event() {
        let gpu = MockGpu::new();
        let (x, y) = (gpu.alloc(16).unwrap(), gpu.alloc(16).unwrap());
        let h = gpu.host_alloc(16).unwrap();
        gpu.host_write(h, &f32_bytes(&[1.0, 2.0, 3.0, 4.0]))
            .unwrap();
        gpu.copy_async(y, h, 16).unwrap();
        let ready = gpu.record(Stream::Copy).unwrap();
        let e = add(&gpu, x, y, 4).unwrap_err().to_string();
        assert!(
            e.contains("kernel add_f32 uses memory") && e.contains("copy #1"),
            "{e}"
        );
        gpu.wait_event(Stream::Compute, ready).unwrap();
        add(&gpu, x, y, 4).unwrap();
        let mut out = [0u8; 16];
        gpu.dtoh(x, &mut out).unwrap();
        assert_eq!(out.to_vec(), f32_bytes(&[1.0, 2.0, 3.0, 4.0]));
    }

    #[test]
    fn a_copy_over_memory_a_kernel_used_must_wait_for_its_last_use() {
        let gpu = MockGpu::new();
        let (x, y) = (gpu.alloc(16).unwrap(), gpu.alloc(16).unwrap());
        let h = gpu.host_alloc(16).unwrap();
        add(&gpu, x, y, 4).unwrap();
        let e = gpu.copy_async(y, h, 16).unwrap_err().to_string();
        assert!(e.contains("a copy overwrites memory"), "{e}");
        let used = gpu.record(Stream::Compute).unwrap();
        gpu.wait_event(Stream::Copy, used).unwrap();
        gpu.copy_async(y, h, 16).unwrap();
        // Seeing a compute event complete on the host orders later copies after it too.
        add(&gpu, x, x, 4).unwrap();
        let used = gpu.record(Stream::Compute).unwrap();
        assert!(gpu.copy_async(x, h, 16).is_err());
        assert!(gpu.event_done(used).unwrap());
        gpu.copy_async(x, h, 16).unwrap();
    }

    #[test]
    fn a_staging_buffer_is_rewritten_only_after_its_copy_completed() {
        let gpu = MockGpu::new();
        let d = gpu.alloc(8).unwrap();
        let h = gpu.host_alloc(8).unwrap();
        gpu.host_write(h, &[1; 8]).unwrap();
        gpu.copy_async(d, h, 8).unwrap();
        let done = gpu.record(Stream::Copy).unwrap();
        let e = gpu.host_write(h, &[2; 8]).unwrap_err().to_string();
        assert!(e.contains("rewritten while copy #1"), "{e}");
        gpu.event_sync(done).unwrap();
        gpu.host_write(h, &[2; 8]).unwrap();
        // A copy from a buffer larger than it is refused.
        assert!(gpu.copy_async(d, h, 9).is_err());
    }

    #[test]
    fn out_of_bounds_access_and_wrong_argument_lists_are_faults() {
        let gpu = MockGpu::new();
        let (x, y) = (gpu.alloc(16).unwrap(), gpu.alloc(16).unwrap());
        // Five floats from a four-float buffer.
        let e = add(&gpu, x, y, 5).unwrap_err();
        assert!(matches!(e, Error::Device { fatal: true, .. }), "{e}");
        assert!(e.to_string().contains("passes the end"), "{e}");
        let e = gpu
            .launch("add_f32", [1, 1, 1], &[KArg::Ptr(x), KArg::U32(4)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("takes 3 parameters"), "{e}");
        let e = gpu
            .launch("no_such_kernel", [1, 1, 1], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no kernel named"), "{e}");
        gpu.free(x);
        assert!(add(&gpu, x, y, 4).is_err(), "a freed buffer is gone");
    }
}
