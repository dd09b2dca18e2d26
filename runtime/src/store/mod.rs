//! The expert store: the one door through which model code reaches expert weights.
//!
//! Model files never hold expert tensors. A sparse layer hands the store, per expert, the batch of
//! token rows routed to it ([`ExpertBatch`]), and the store adds each expert's weighted output to
//! those rows. Where the expert's bytes live (mmapped file, RAM pool, device slot) and where it is
//! computed is the store's business alone; tiers, slots, LRU and prefetch live behind this trait.
//!
//! Inside, mechanism and policy are split: `pool.rs` is the slot pool (LRU / LFU / pinned-LRU),
//! generic over what a slot holds; `device.rs` the device-tier interface (allocate a slot, copy an
//! expert in with a completion ticket, run its FFN in a slot, record a slot's last use); `sim.rs`
//! the simulated tier (`device = "sim"`); `tiered.rs` the policy shared by every tier (hit or
//! miss, prefetch, demand before prefetch, copy or compute on the host); `stats.rs` the counters.
//!
//! Invariants: an expert is addressed by (layer, expert); `compute` adds exactly
//! `weight * ffn_e(x[row])` to `out[row]` for every (row, weight) pair and touches no other row;
//! experts within a call are applied in ascending expert order (the reference's order), so results
//! do not depend on how the store schedules its work.

mod device;
mod pool;
mod sim;
mod stats;
mod tiered;

pub use device::DeviceTier;
pub use pool::{EvictionPolicy, Found, Reserved, Slot, SlotPool};
pub use sim::{SimTicket, SimTier};
pub use stats::{LayerStats, StoreStats};
pub use tiered::{DeviceTierConfig, HostTierConfig, TieredStore, TieredStoreConfig};

use moe_kernels::Weights;

use crate::error::{Error, Result};
use crate::layers::{silu_mul, Input};
use crate::runconfig::Activations;
use crate::weights::{Dtype, TensorRef};

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

    /// Whether [`ExpertStore::prefetch`] does anything (the model skips the lookahead if not).
    fn wants_prefetch(&self) -> bool {
        false
    }

    /// How many layers ahead the model should predict.
    fn prefetch_depth(&self) -> usize {
        0
    }

    /// Counters since the store was built.
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }

    /// Tokens routed to each expert since the store was built, per layer (the hot set).
    fn popularity(&self) -> Vec<Vec<u64>> {
        Vec::new()
    }
}

/// Checks expert bytes the first time they are used, for experts mapped from a checksummed file
/// (the quantized weight cache), and supplies a replacement for a damaged one.
pub trait ExpertCheck: Send + Sync {
    /// `parts` are the bytes of gate, up and down as read. `Ok(None)`: intact. `Ok(Some(w))`:
    /// damaged, `w` is rebuilt from the source and used instead. `Err`: damaged, no replacement.
    fn check(
        &self,
        layer: usize,
        expert: usize,
        parts: [&[u8]; 3],
    ) -> Result<Option<ExpertWeights>>;
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

    pub(crate) fn check(&self, hidden: usize, inter: usize) -> Result<()> {
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

    /// Copies the expert into one owned buffer (positioned reads for mapped files).
    pub fn read_owned(&self) -> Result<ExpertBuf> {
        let parts = [&self.gate, &self.up, &self.down];
        let mut offsets = [0usize; 4];
        for (i, t) in parts.iter().enumerate() {
            // Each part starts 8-byte aligned inside the buffer.
            offsets[i + 1] = offsets[i] + t.size_bytes().div_ceil(8) * 8;
        }
        let mut words = crate::mem::zeroed_words(offsets[3] / 8);
        let bytes = bytemuck::cast_slice_mut::<u64, u8>(&mut words);
        for (i, t) in parts.iter().enumerate() {
            t.read_into(&mut bytes[offsets[i]..offsets[i] + t.size_bytes()])?;
        }
        Ok(ExpertBuf {
            words,
            parts: [0, 1, 2].map(|i| (offsets[i], parts[i].numel(), parts[i].dtype)),
            inter: self.gate.shape[0],
        })
    }
}

/// An expert copied out of its file into memory we own (a RAM pool entry or a device slot).
#[derive(Clone)]
pub struct ExpertBuf {
    words: Vec<u64>,
    /// (byte offset, element count, dtype) of gate, up and down.
    parts: [(usize, usize, Dtype); 3],
    inter: usize,
}

impl ExpertBuf {
    pub fn size_bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// The stored bytes of part `i` (0 gate, 1 up, 2 down).
    pub fn part_bytes(&self, i: usize) -> &[u8] {
        let (off, n, dtype) = self.parts[i];
        // `read_owned` placed part i at [off, off + len).
        &bytemuck::cast_slice::<u64, u8>(&self.words)[off..off + dtype.bytes_for(n)]
    }

    fn part(&self, i: usize) -> Weights<'_> {
        // Each part starts 8-byte aligned (see `read_owned`), enough for every compute dtype.
        crate::weights::typed_weights(self.part_bytes(i), self.parts[i].2)
    }
}

/// An expert's three projections as kernel weights, wherever its bytes live (mapped file or
/// owned buffer); the SwiGLU computation is written once, here.
pub trait ExpertParts {
    /// gate `[inter, hidden]`, up `[inter, hidden]`, down `[hidden, inter]`.
    fn parts(&self) -> [Weights<'_>; 3];
    fn inter(&self) -> usize;

    /// Unweighted expert output for the gathered rows (see [`expert_ffn_rows`]).
    fn ffn_rows(
        &self,
        rows: &[usize],
        x: &[f32],
        hidden: usize,
        parallel: bool,
        act: Activations,
    ) -> Vec<f32> {
        expert_ffn_rows(self.parts(), self.inter(), rows, x, hidden, parallel, act)
    }

    /// `out[r] += w_r * down(silu(gate(x_r)) * up(x_r))` for the batch's rows of `x`, each
    /// matmul split over the current rayon pool.
    fn forward_rows(
        &self,
        b: &ExpertBatch,
        x: &[f32],
        hidden: usize,
        act: Activations,
        out: &mut [f32],
    ) {
        let y = self.ffn_rows(&b.rows, x, hidden, true, act);
        add_weighted_rows(&b.rows, &b.weights, &y, hidden, out);
    }
}

impl ExpertParts for ExpertWeights {
    fn parts(&self) -> [Weights<'_>; 3] {
        [self.gate.weights(), self.up.weights(), self.down.weights()]
    }
    fn inter(&self) -> usize {
        self.gate.shape[0]
    }
}

impl ExpertParts for ExpertBuf {
    fn parts(&self) -> [Weights<'_>; 3] {
        [self.part(0), self.part(1), self.part(2)]
    }
    fn inter(&self) -> usize {
        self.inter
    }
}

/// `down(silu(gate x_r) * up x_r)` for the gathered rows, `[rows.len(), hidden]`, unweighted.
/// `parallel` splits each matmul over the current rayon pool; the result is the same bit for
/// bit either way (the kernels' contract), so callers may run several experts side by side
/// with `parallel = false` instead. `act` is the `activations` setting (see
/// [`crate::layers::Input`]).
pub fn expert_ffn_rows(
    [gate, up, down]: [Weights<'_>; 3],
    inter: usize,
    rows: &[usize],
    x: &[f32],
    hidden: usize,
    parallel: bool,
    act: Activations,
) -> Vec<f32> {
    let m = rows.len();
    let mut xs = Vec::with_capacity(m * hidden);
    for &r in rows {
        xs.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
    }
    // Gate and up share one prepared input (quantized once on the q8 path).
    let xin = Input::new(&xs, m, hidden, act, &[gate, up]);
    let mut g = vec![0f32; m * inter];
    let mut u = vec![0f32; m * inter];
    xin.matmul(gate, inter, &mut g, parallel);
    xin.matmul(up, inter, &mut u, parallel);
    silu_mul(&g, &mut u);
    let mut y = vec![0f32; m * hidden];
    Input::new(&u, m, inter, act, &[down]).matmul(down, hidden, &mut y, parallel);
    y
}

/// `out[r] += w_r * y_i` for the i-th of `rows` (one rounded multiply, one rounded add).
pub fn add_weighted_rows(
    rows: &[usize],
    weights: &[f32],
    y: &[f32],
    hidden: usize,
    out: &mut [f32],
) {
    for ((&r, &w), yr) in rows.iter().zip(weights).zip(y.chunks_exact(hidden)) {
        let o = &mut out[r * hidden..(r + 1) * hidden];
        for (o, y) in o.iter_mut().zip(yr) {
            *o += y * w;
        }
    }
}

impl ExpertBuf {
    /// A buffer holding no expert (for pool bookkeeping in tests and replays).
    pub fn empty() -> ExpertBuf {
        ExpertBuf {
            words: Vec::new(),
            parts: [(0, 0, Dtype::F32); 3],
            inter: 0,
        }
    }
}
