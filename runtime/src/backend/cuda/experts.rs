//! Experts on the device: a layer's experts, with their matrices in VRAM slots or their outputs
//! computed on the host, added into the layer's output in ascending expert order
//! ([`Cuda::experts_add`]). A decode step (every device expert at most 8 rows) runs as one
//! gather, one grouped matvec per matrix and weight type (`matvec_grouped_*`, a table of
//! weight / input / output addresses), one activation and one ordered sum over all experts
//! (`moe_sum_rows_f32`); larger batches run expert after expert ([`Cuda::expert_ffn_add`],
//! [`Cuda::add_weighted_host_rows`]).
//!
//! Invariants: the FFN is the host's (`store::expert_ffn_rows`): the same products in the same
//! order, so it equals the host's bit for bit on the mock device; every output element
//! receives its experts' terms in the order given, one rounded multiply and add each, never
//! with atomics; routed rows are checked against the layer's row count first.

use super::{col_blocks, u32_of, Cuda, DevBuf, DevPtr, KArg};
use crate::backend::{Backend, Glu};
use crate::weights::Dtype;

/// One expert's matrices in a device slot, for [`Cuda::expert_ffn_add`].
#[derive(Clone, Copy, Debug)]
pub struct DeviceExpert {
    /// Gate `[inter, hidden]`, or with `up` None the fused gate_up `[2 inter, hidden]` (the
    /// gate rows, then the up rows; or alternating gate and up rows when `interleaved`).
    pub gate: (DevPtr, Dtype),
    pub up: Option<(DevPtr, Dtype)>,
    /// Down `[hidden, inter]`.
    pub down: (DevPtr, Dtype),
    pub inter: usize,
    pub glu: Glu,
    /// The fused gate_up's rows alternate gate, up (gpt-oss).
    pub interleaved: bool,
    /// Bias vectors in their stored dtype (f32, bf16 or f16), added after their matmul: gate
    /// (or gate_up when fused), up, down.
    pub bias: [Option<(DevPtr, Dtype)>; 3],
}

impl DeviceExpert {
    /// Whether two experts of one layer run the same kernels (shapes, fusing, biases).
    fn same_form(&self, o: &DeviceExpert) -> bool {
        self.inter == o.inter
            && self.up.is_some() == o.up.is_some()
            && self.interleaved == o.interleaved
            && self.bias.map(|b| b.is_some()) == o.bias.map(|b| b.is_some())
    }
}

impl Cuda {
    /// `x[r] += b` for `rows` rows of `width` values at `x`, `b` a bias vector in a slot in its
    /// stored dtype (widened exactly first when it is 2-byte), as the host adds it.
    fn add_slot_bias(&self, x: DevPtr, rows: usize, width: usize, b: (DevPtr, Dtype)) {
        if rows == 0 || width == 0 {
            return;
        }
        let widened;
        let bias = match b.1 {
            Dtype::F32 => b.0,
            Dtype::Bf16 | Dtype::F16 => {
                widened = self.f32_buf(width);
                let kernel = if b.1 == Dtype::Bf16 {
                    "dequant_bf16"
                } else {
                    "dequant_f16"
                };
                self.launch(
                    kernel,
                    [super::stride_blocks(width), 1, 1],
                    &[KArg::Ptr(b.0), KArg::U64(width as u64), widened.arg()],
                );
                widened.ptr()
            }
            other => {
                self.refuse(format!(
                    "an expert bias stored as {}: biases are f32, bf16 or f16",
                    other.name()
                ));
                return;
            }
        };
        self.launch(
            "add_rows_f32",
            [u32_of(rows), col_blocks(width), 1],
            &[
                KArg::Ptr(x),
                KArg::Ptr(bias),
                KArg::U32(u32_of(rows)),
                KArg::U32(u32_of(width)),
            ],
        );
    }

    /// Splits `[blocks, 2d]` rows in two `[blocks, d]` buffers with `kernel`:
    /// `split_halves_f32` (first and last d values) or `split_pairs_f32` (even and odd values,
    /// an interleaved gate_up's gate and up).
    pub(super) fn split_blocks(
        &self,
        kernel: &'static str,
        x: &DevBuf,
        d: usize,
    ) -> (DevBuf, DevBuf) {
        let n = Self::n_f32(x);
        let (a, b) = (self.f32_buf(n / 2), self.f32_buf(n / 2));
        let blocks = n / (2 * d).max(1);
        if blocks > 0 {
            self.launch(
                kernel,
                [u32_of(blocks), col_blocks(d), 1],
                &[
                    x.arg(),
                    a.arg(),
                    b.arg(),
                    KArg::U32(u32_of(blocks)),
                    KArg::U32(u32_of(d)),
                ],
            );
        }
        (a, b)
    }

    /// The fused gate_up output `[m, 2 inter]` split into gate and up as `e` stores them.
    fn split_gate_up(&self, gu: &DevBuf, e: &DeviceExpert) -> (DevBuf, DevBuf) {
        if e.interleaved {
            self.split_blocks("split_pairs_f32", gu, e.inter)
        } else {
            self.split_halves(gu, e.inter)
        }
    }

    /// `out[rows[i]] += weights[i] * y[i]` for `[rows.len(), hidden]` rows `y`, on the device
    /// (the deterministic expert sum: call it expert after expert in ascending order).
    fn moe_sum(&self, out: &DevBuf, rows: &DevBuf, weights: &[f32], y: &DevBuf, hidden: usize) {
        let n = weights.len();
        if n == 0 {
            return;
        }
        let w = self.upload(weights);
        self.launch(
            "moe_sum_f32",
            [col_blocks(hidden), u32_of(n.min(65535)), 1],
            &[
                out.arg(),
                rows.arg(),
                w.arg(),
                y.arg(),
                KArg::U32(u32_of(n)),
                KArg::U32(u32_of(hidden)),
            ],
        );
    }

    fn row_indices(&self, rows: &[usize], x: &DevBuf, hidden: usize) -> Option<DevBuf> {
        let total = Self::n_f32(x) / hidden.max(1);
        if let Some(&r) = rows.iter().find(|&&r| r >= total) {
            self.refuse(format!(
                "routed row {r} is past the {total} rows of the layer"
            ));
            return None;
        }
        let idx: Vec<u32> = rows.iter().map(|&r| u32_of(r)).collect();
        Some(self.upload(&idx))
    }

    /// `out[r] += w_r * y_i` for an expert's unweighted output computed on the host (`y` is
    /// `[rows.len(), hidden]`).
    pub fn add_weighted_host_rows(
        &self,
        out: &DevBuf,
        rows: &[usize],
        weights: &[f32],
        y: &[f32],
        hidden: usize,
    ) {
        let Some(idx) = self.row_indices(rows, out, hidden) else {
            return;
        };
        let y = self.upload(y);
        self.moe_sum(out, &idx, weights, &y, hidden);
    }

    /// `out[r] += w_r * ffn(x_r)` for the routed `rows` of `x` (`[tokens, hidden]`), with the
    /// expert's matrices in device memory: the rows gathered, gate and up (or the fused
    /// gate_up, split in halves), the gated activation, down, then the weighted sum into `out`.
    /// The same products in the same order as the host's expert FFN.
    pub fn expert_ffn_add(
        &self,
        x: &DevBuf,
        hidden: usize,
        rows: &[usize],
        weights: &[f32],
        e: &DeviceExpert,
        out: &DevBuf,
    ) {
        let m = rows.len();
        if m == 0 {
            return;
        }
        let Some(idx) = self.row_indices(rows, x, hidden) else {
            return;
        };
        let xs = self.f32_buf(m * hidden);
        self.launch(
            "gather_rows_f32",
            [u32_of(m), col_blocks(hidden), 1],
            &[
                x.arg(),
                idx.arg(),
                KArg::U32(u32_of(m)),
                KArg::U32(u32_of(hidden)),
                xs.arg(),
            ],
        );
        let inter = e.inter;
        let (g, mut u) = match e.up {
            Some(up) => {
                let g = self.matvec(&xs, m, e.gate.0, e.gate.1, hidden, inter);
                let u = self.matvec(&xs, m, up.0, up.1, hidden, inter);
                for (y, b) in [(&g, e.bias[0]), (&u, e.bias[1])] {
                    if let Some(b) = b {
                        self.add_slot_bias(y.ptr(), m, inter, b);
                    }
                }
                (g, u)
            }
            None => {
                let gu = self.matvec(&xs, m, e.gate.0, e.gate.1, hidden, 2 * inter);
                if let Some(b) = e.bias[0] {
                    self.add_slot_bias(gu.ptr(), m, 2 * inter, b);
                }
                self.split_gate_up(&gu, e)
            }
        };
        self.glu(&g, &mut u, e.glu);
        let y = self.matvec(&u, m, e.down.0, e.down.1, inter, hidden);
        if let Some(b) = e.bias[2] {
            self.add_slot_bias(y.ptr(), m, hidden, b);
        }
        self.moe_sum(out, &idx, weights, &y, hidden);
    }
}

/// One expert of a layer for [`Cuda::experts_add`], in the order its output is to be added.
pub enum ExpertWork<'a> {
    /// Computed here from its matrices in VRAM.
    Device {
        expert: DeviceExpert,
        rows: &'a [usize],
        weights: &'a [f32],
    },
    /// Computed on the host: its unweighted output `[rows, hidden]`.
    Host {
        y: &'a [f32],
        rows: &'a [usize],
        weights: &'a [f32],
    },
}

/// Rows one grouped matvec entry covers (the kernels' `MV_MAX_ROWS`).
const GROUP_ROWS: usize = 8;

impl Cuda {
    /// `out[r] += w_r * ffn_e(x_r)` for every expert of a layer, added in the order given
    /// (ascending expert order). With every device expert at most 8 rows (decode), the layer
    /// runs as one gather, one grouped matvec per matrix and weight type, one activation and
    /// one ordered sum for all experts; otherwise expert after expert.
    pub fn experts_add(&self, x: &DevBuf, hidden: usize, work: &[ExpertWork<'_>], out: &DevBuf) {
        let grouped = work.iter().all(|w| match w {
            ExpertWork::Device { rows, .. } => rows.len() <= GROUP_ROWS,
            ExpertWork::Host { .. } => true,
        });
        if !grouped {
            for w in work {
                match w {
                    ExpertWork::Device {
                        expert,
                        rows,
                        weights,
                    } => self.expert_ffn_add(x, hidden, rows, weights, expert, out),
                    ExpertWork::Host { y, rows, weights } => {
                        self.add_weighted_host_rows(out, rows, weights, y, hidden)
                    }
                }
            }
            return;
        }
        self.experts_grouped(x, hidden, work, out);
    }

    fn experts_grouped(&self, x: &DevBuf, hidden: usize, work: &[ExpertWork<'_>], out: &DevBuf) {
        let dev: Vec<(&DeviceExpert, &[usize])> = work
            .iter()
            .filter_map(|w| match w {
                ExpertWork::Device { expert, rows, .. } => Some((expert, *rows)),
                ExpertWork::Host { .. } => None,
            })
            .collect();
        let dev_rows: usize = dev.iter().map(|(_, r)| r.len()).sum();
        let host_rows: usize = work
            .iter()
            .map(|w| match w {
                ExpertWork::Host { rows, .. } => rows.len(),
                ExpertWork::Device { .. } => 0,
            })
            .sum();
        // Every expert's output rows, device ones first, then the host ones, in work order.
        let y = self.f32_buf((dev_rows + host_rows) * hidden);
        if let Some(&(first, _)) = dev.first() {
            let inter = first.inter;
            if dev.iter().any(|(e, _)| !e.same_form(first)) {
                self.refuse("the experts of one layer differ in shape".into());
                return;
            }
            let all_rows: Vec<usize> = dev.iter().flat_map(|(_, r)| r.iter().copied()).collect();
            let Some(idx) = self.row_indices(&all_rows, x, hidden) else {
                return;
            };
            let xs = self.f32_buf(dev_rows * hidden);
            self.launch(
                "gather_rows_f32",
                [u32_of(dev_rows), col_blocks(hidden), 1],
                &[
                    x.arg(),
                    idx.arg(),
                    KArg::U32(u32_of(dev_rows)),
                    KArg::U32(u32_of(hidden)),
                    xs.arg(),
                ],
            );
            // The table entries of one matrix of every expert: (weight, input row, output row,
            // rows), up to 8 rows an entry.
            let entries = |pick: &dyn Fn(&DeviceExpert) -> (DevPtr, Dtype),
                           input: &DevBuf,
                           k: usize,
                           output: &DevBuf,
                           n: usize| {
                let mut at = 0;
                let mut list: Vec<(Dtype, [u64; 4])> = Vec::new();
                for (e, rows) in &dev {
                    let (w, dtype) = pick(e);
                    for r0 in (0..rows.len()).step_by(GROUP_ROWS) {
                        let m = (rows.len() - r0).min(GROUP_ROWS);
                        list.push((
                            dtype,
                            [
                                w,
                                input.at((at + r0) * k * 4),
                                output.at((at + r0) * n * 4),
                                m as u64,
                            ],
                        ));
                    }
                    at += rows.len();
                }
                list
            };
            let (g, mut u) = match first.up {
                Some(_) => {
                    let (g, u) = (
                        self.f32_buf(dev_rows * inter),
                        self.f32_buf(dev_rows * inter),
                    );
                    // Gate and up share their shape: one launch for both.
                    let mut both = entries(&|e| e.gate, &xs, hidden, &g, inter);
                    both.extend(entries(
                        &|e| e.up.expect("checked above"),
                        &xs,
                        hidden,
                        &u,
                        inter,
                    ));
                    self.grouped_matvec(&both, &xs, &g, inter, hidden);
                    self.add_biases(&dev, 0, &g, inter);
                    self.add_biases(&dev, 1, &u, inter);
                    (g, u)
                }
                None => {
                    let gu = self.f32_buf(dev_rows * 2 * inter);
                    let list = entries(&|e| e.gate, &xs, hidden, &gu, 2 * inter);
                    self.grouped_matvec(&list, &xs, &gu, 2 * inter, hidden);
                    self.add_biases(&dev, 0, &gu, 2 * inter);
                    self.split_gate_up(&gu, first)
                }
            };
            self.glu(&g, &mut u, first.glu);
            let list = entries(&|e| e.down, &u, inter, &y, hidden);
            self.grouped_matvec(&list, &u, &y, hidden, inter);
            self.add_biases(&dev, 2, &y, hidden);
        }
        // The host experts' outputs after the device ones.
        let host_y: Vec<f32> = work
            .iter()
            .filter_map(|w| match w {
                ExpertWork::Host { y, .. } => Some(*y),
                ExpertWork::Device { .. } => None,
            })
            .flatten()
            .copied()
            .collect();
        if !host_y.is_empty() && !self.faulted() {
            let r = self
                .gpu
                .htod(y.at(dev_rows * hidden * 4), bytemuck::cast_slice(&host_y));
            self.ok(r);
        }
        // Per token row, its entries in work order (ascending expert order).
        let tokens = Self::n_f32(out) / hidden.max(1);
        let mut lists: Vec<Vec<u32>> = vec![Vec::new(); tokens];
        let mut w_all = vec![0f32; dev_rows + host_rows];
        let (mut at_dev, mut at_host) = (0usize, dev_rows);
        for w in work {
            let (rows, weights, base) = match w {
                ExpertWork::Device { rows, weights, .. } => {
                    at_dev += rows.len();
                    (rows, weights, at_dev - rows.len())
                }
                ExpertWork::Host { rows, weights, .. } => {
                    at_host += rows.len();
                    (rows, weights, at_host - rows.len())
                }
            };
            for (i, (&r, &wt)) in rows.iter().zip(weights.iter()).enumerate() {
                if r >= tokens {
                    self.refuse(format!(
                        "routed row {r} is past the {tokens} rows of the layer"
                    ));
                    return;
                }
                lists[r].push(u32_of(base + i));
                w_all[base + i] = wt;
            }
        }
        let mut start = Vec::with_capacity(tokens + 1);
        let mut entries = Vec::with_capacity(w_all.len());
        start.push(0u32);
        for l in &lists {
            entries.extend_from_slice(l);
            start.push(u32_of(entries.len()));
        }
        if entries.is_empty() {
            return;
        }
        let (start, entries, w_all) = (
            self.upload(&start),
            self.upload(&entries),
            self.upload(&w_all),
        );
        self.launch(
            "moe_sum_rows_f32",
            [u32_of(tokens), col_blocks(hidden), 1],
            &[
                out.arg(),
                start.arg(),
                entries.arg(),
                w_all.arg(),
                y.arg(),
                KArg::U32(u32_of(tokens)),
                KArg::U32(u32_of(hidden)),
            ],
        );
    }

    /// Adds bias `which` of every device expert to its rows of `y` (`width` values a row, the
    /// experts' rows one after another in `dev`'s order).
    fn add_biases(
        &self,
        dev: &[(&DeviceExpert, &[usize])],
        which: usize,
        y: &DevBuf,
        width: usize,
    ) {
        let mut at = 0;
        for (e, rows) in dev {
            if let Some(b) = e.bias[which] {
                self.add_slot_bias(y.at(at * width * 4), rows.len(), width, b);
            }
            at += rows.len();
        }
    }

    /// One grouped matvec launch per weight type over `entries` (weight, input row, output
    /// row, rows), `k` wide in and `n` wide out; `input` and `output` name the buffers the
    /// entries point into (the first output buffer where several are written).
    pub(super) fn grouped_matvec(
        &self,
        entries: &[(Dtype, [u64; 4])],
        input: &DevBuf,
        output: &DevBuf,
        n: usize,
        k: usize,
    ) {
        let mut dtypes: Vec<Dtype> = entries.iter().map(|(d, _)| *d).collect();
        dtypes.sort_by_key(|d| d.name());
        dtypes.dedup();
        for dtype in dtypes {
            if let Some((block, _)) = dtype.block() {
                if !k.is_multiple_of(block) {
                    self.refuse(format!(
                        "a {} weight with rows of {k} values: not whole {block}-value blocks",
                        dtype.name()
                    ));
                    return;
                }
            }
            let table: Vec<u64> = entries
                .iter()
                .filter(|(d, _)| *d == dtype)
                .flat_map(|(_, e)| e.iter().copied())
                .collect();
            for chunk in table.chunks(4 * MAX_GROUP_ENTRIES) {
                let t = self.upload(chunk);
                self.launch(
                    grouped_kernel(dtype),
                    [u32_of(n.div_ceil(8)), u32_of(chunk.len() / 4), 1],
                    &[
                        t.arg(),
                        input.arg(),
                        output.arg(),
                        KArg::U32(u32_of(n)),
                        KArg::U32(u32_of(k)),
                    ],
                );
            }
        }
    }
}

/// Entries one grouped launch takes (the grid's y limit).
const MAX_GROUP_ENTRIES: usize = 65535;

fn grouped_kernel(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "matvec_grouped_f32",
        Dtype::Bf16 => "matvec_grouped_bf16",
        Dtype::F16 => "matvec_grouped_f16",
        Dtype::Q8_0 => "matvec_grouped_q8_0",
        Dtype::Q4K => "matvec_grouped_q4_k",
        Dtype::F8B128 => "matvec_grouped_f8",
        Dtype::Nf4 => "matvec_grouped_nf4",
        Dtype::Nf4Bf16 => "matvec_grouped_nf4bf16",
        Dtype::Nf4F16 => "matvec_grouped_nf4f16",
        Dtype::Fp4Bf16 => "matvec_grouped_fp4bf16",
        Dtype::Fp4F16 => "matvec_grouped_fp4f16",
        Dtype::Mxfp4 => "matvec_grouped_mxfp4",
        _ => "matvec_grouped_fp4",
    }
}
