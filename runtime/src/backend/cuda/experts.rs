//! Experts on the device: one expert's FFN over the rows routed to it, with its matrices in a
//! VRAM slot ([`Cuda::expert_ffn_add`]), and the ordered sum of expert outputs into the layer's
//! output, for experts computed there or on the host ([`Cuda::add_weighted_host_rows`]).
//!
//! Invariants: the FFN is the host's (`store::expert_ffn_rows`): the same products in the same
//! order, so it equals the host's bit for bit on the mock device; outputs are added by
//! `moe_sum_f32`, launched once per expert in the order the store calls (ascending expert
//! order), never with atomics; routed rows are checked against the layer's row count first.

use super::{col_blocks, u32_of, Cuda, DevBuf, DevPtr, KArg};
use crate::backend::{Backend, Glu};
use crate::weights::Dtype;

/// One expert's matrices in a device slot, for [`Cuda::expert_ffn_add`].
#[derive(Clone, Copy, Debug)]
pub struct DeviceExpert {
    /// Gate `[inter, hidden]`, or with `up` None the fused gate_up `[2 inter, hidden]` (the
    /// gate rows, then the up rows).
    pub gate: (DevPtr, Dtype),
    pub up: Option<(DevPtr, Dtype)>,
    /// Down `[hidden, inter]`.
    pub down: (DevPtr, Dtype),
    pub inter: usize,
    pub glu: Glu,
}

impl Cuda {
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
            Some(up) => (
                self.matvec(&xs, m, e.gate.0, e.gate.1, hidden, inter),
                self.matvec(&xs, m, up.0, up.1, hidden, inter),
            ),
            None => {
                let gu = self.matvec(&xs, m, e.gate.0, e.gate.1, hidden, 2 * inter);
                self.split_halves(&gu, inter)
            }
        };
        self.glu(&g, &mut u, e.glu);
        let y = self.matvec(&u, m, e.down.0, e.down.1, inter, hidden);
        self.moe_sum(out, &idx, weights, &y, hidden);
    }
}
