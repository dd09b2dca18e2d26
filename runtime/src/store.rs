//! The expert store: the one door through which model code reaches expert weights.
//!
//! Model files never hold expert tensors. A sparse layer hands the store, per expert, the batch of
//! token rows routed to it ([`ExpertBatch`]), and the store adds each expert's weighted output to
//! those rows. Where the expert's bytes live (mmapped file, RAM pool, device slot) and where it is
//! computed is the store's business alone; tiers, slots, LRU and prefetch live behind this trait.
//!
//! Invariants: an expert is addressed by (layer, expert); `compute` adds exactly
//! `weight * ffn_e(x[row])` to `out[row]` for every (row, weight) pair and touches no other row;
//! experts within a call are applied in ascending expert order (the reference's order), so results
//! do not depend on how the store schedules its work.

use crate::error::{Error, Result};
use crate::layers::silu_mul;
use crate::weights::TensorRef;

/// Tokens routed to one expert in one layer.
#[derive(Clone, Debug)]
pub struct ExpertBatch {
    pub expert: usize,
    /// Row indices into the layer's input `[tokens, hidden]`.
    pub rows: Vec<usize>,
    /// Routing weight of each row, same length as `rows`.
    pub weights: Vec<f32>,
}

/// Where experts are kept and computed.
pub trait ExpertStore: Send + Sync {
    /// For every batch: `out[row] += weight * ffn_expert(x[row])`. `x` and `out` are
    /// `[tokens, hidden]`; batches are sorted by expert.
    fn compute(
        &self,
        layer: usize,
        batches: &[ExpertBatch],
        x: &[f32],
        hidden: usize,
        out: &mut [f32],
    ) -> Result<()>;

    /// A hint that `experts` of `layer` will be needed soon (router lookahead). Default: none.
    fn prefetch(&self, _layer: usize, _experts: &[usize]) {}

    /// Number of experts in `layer` (0 for dense layers).
    fn num_experts(&self, layer: usize) -> usize;
}

/// One expert's SwiGLU weights: gate and up `[inter, hidden]`, down `[hidden, inter]`.
#[derive(Clone, Debug)]
pub struct ExpertWeights {
    pub gate: TensorRef,
    pub up: TensorRef,
    pub down: TensorRef,
}

impl ExpertWeights {
    pub fn size_bytes(&self) -> usize {
        self.gate.size_bytes() + self.up.size_bytes() + self.down.size_bytes()
    }

    fn check(&self, hidden: usize, inter: usize) -> Result<()> {
        for (t, shape) in [
            (&self.gate, [inter, hidden]),
            (&self.up, [inter, hidden]),
            (&self.down, [hidden, inter]),
        ] {
            if t.shape != shape {
                return Err(Error::ShapeMismatch {
                    name: t.name.clone(),
                    path: (*t.path).clone(),
                    expected: shape.to_vec(),
                    found: t.shape.clone(),
                });
            }
        }
        Ok(())
    }

    /// `out[r] += w_r * down(silu(gate(x_r)) * up(x_r))` for the given rows of `x`.
    pub fn forward_rows(
        &self,
        rows: &[usize],
        weights: &[f32],
        x: &[f32],
        hidden: usize,
        out: &mut [f32],
    ) {
        let inter = self.gate.shape[0];
        let m = rows.len();
        let mut xs = Vec::with_capacity(m * hidden);
        for &r in rows {
            xs.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
        }
        let mut g = vec![0f32; m * inter];
        let mut u = vec![0f32; m * inter];
        moe_kernels::matmul(&xs, m, hidden, self.gate.weights(), inter, &mut g);
        moe_kernels::matmul(&xs, m, hidden, self.up.weights(), inter, &mut u);
        silu_mul(&g, &mut u);
        let mut y = vec![0f32; m * hidden];
        moe_kernels::matmul(&u, m, inter, self.down.weights(), hidden, &mut y);
        for ((&r, &w), yr) in rows.iter().zip(weights).zip(y.chunks_exact(hidden)) {
            let o = &mut out[r * hidden..(r + 1) * hidden];
            for (o, y) in o.iter_mut().zip(yr) {
                *o += y * w;
            }
        }
    }
}

/// The simplest store: every expert computed on the CPU straight from the mapped files.
pub struct MappedStore {
    /// Per model layer: its experts (empty for dense layers).
    layers: Vec<Vec<ExpertWeights>>,
}

impl MappedStore {
    /// `layers[l]` holds layer l's experts, each checked against `[inter, hidden]` shapes.
    pub fn new(layers: Vec<Vec<ExpertWeights>>, hidden: usize, inter: usize) -> Result<Self> {
        for e in layers.iter().flatten() {
            e.check(hidden, inter)?;
        }
        Ok(MappedStore { layers })
    }

    /// Bytes of all experts.
    pub fn size_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(ExpertWeights::size_bytes)
            .sum()
    }
}

impl ExpertStore for MappedStore {
    fn compute(
        &self,
        layer: usize,
        batches: &[ExpertBatch],
        x: &[f32],
        hidden: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let experts = self.layers.get(layer).map(Vec::as_slice).unwrap_or(&[]);
        for b in batches {
            let e = experts.get(b.expert).ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "expert {} of layer {layer} does not exist ({} experts)",
                    b.expert,
                    experts.len()
                ))
            })?;
            e.forward_rows(&b.rows, &b.weights, x, hidden, out);
        }
        Ok(())
    }

    fn num_experts(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, Vec::len)
    }
}
