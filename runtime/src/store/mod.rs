//! The expert store: the one door through which model code reaches expert weights.
//!
//! Model files never hold expert tensors. A sparse layer hands the store, per expert, the batch of
//! token rows routed to it ([`ExpertBatch`]), and the store returns the sum of the experts'
//! weighted outputs for those rows. Where the expert's bytes live (mmapped file, RAM pool, device
//! slot) and where it is computed is the store's business alone; tiers, slots, LRU and prefetch
//! live behind this trait. The trait is generic over the decoder's backend (activations come in
//! and go out as that backend's); the tiered store computes on host rows for any backend.
//!
//! Inside, mechanism and policy are split: `pool.rs` is the slot pool (LRU / LFU / pinned-LRU),
//! generic over what a slot holds; `device.rs` the device-tier interface (allocate a slot, copy an
//! expert in with a completion ticket, run its FFN in a slot, record a slot's last use); `sim.rs`
//! the simulated tier (`device = "sim"`); `tiered.rs` the policy shared by every tier (hit or
//! miss, prefetch, demand before prefetch, copy or compute on the host); `stats.rs` the counters;
//! `layout.rs` the expert layout as data (which parts, fused or not, biases, the gated
//! activation), and [`expert_ffn_rows`] here the one FFN every tier runs through it.
//!
//! Invariants: an expert is addressed by (layer, expert); `compute` returns, per row, exactly the
//! sum of `weight * ffn_e(x[row])` over that row's (expert, weight) pairs (zero for other rows);
//! experts within a call are applied in ascending expert order (the reference's order), so results
//! do not depend on how the store schedules its work.

mod cuda;
mod device;
mod layout;
mod pool;
mod sim;
mod stats;
mod tiered;

pub use cuda::{CudaTier, PinnedPool};
pub use device::{DeviceTier, Frame, HostFrame, HostRows};
pub use layout::{ExpertLayout, GateUp, PartRole};
pub use pool::{EvictionPolicy, Found, Reserved, Slot, SlotPool};
pub use sim::{SimTicket, SimTier};
pub use stats::{LayerStats, StoreStats};
pub use tiered::{DeviceTierConfig, HostTierConfig, TieredStore, TieredStoreConfig};

use std::sync::Arc;

use moe_kernels::Weights;

use crate::backend::cpu::{glu, Input};
use crate::backend::{Activations, Backend, Cpu};
use crate::error::Result;
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

/// Where experts are kept, whatever backend computes with them: lookahead, counters, the hot
/// set (the side of a store that never touches activations).
pub trait ExpertSource: Send + Sync {
    /// A hint that `experts` of `layer` will be needed soon (router lookahead). Default: none.
    fn prefetch(&self, _layer: usize, _experts: &[usize]) {}

    /// Number of experts in `layer` (0 for dense layers).
    fn num_experts(&self, layer: usize) -> usize;

    /// Whether [`ExpertSource::prefetch`] does anything (the model skips the lookahead if not).
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

/// Where experts are kept and computed, for a decoder on backend `B`.
pub trait ExpertStore<B: Backend = Cpu>: ExpertSource {
    /// `y[row] = sum of weight * ffn_expert(x[row])` over the batches that hold `row`, added in
    /// ascending expert order (zero for a row no batch holds). `x` and `y` are `[tokens,
    /// hidden]` on the backend; batches are sorted by expert.
    fn compute(
        &self,
        b: &B,
        layer: usize,
        batches: &[ExpertBatch],
        x: &B::Act,
        hidden: usize,
    ) -> Result<B::Act>;
}

/// Checks expert bytes the first time they are used, for experts mapped from a checksummed file
/// (the quantized weight cache), and supplies a replacement for a damaged one.
pub trait ExpertCheck: Send + Sync {
    /// `parts` are the bytes of the expert's parts as read, in its layout's order (see
    /// [`ExpertLayout::roles`]). `Ok(None)`: intact. `Ok(Some(w))`: damaged, `w` is rebuilt
    /// from the source and used instead. `Err`: damaged, no replacement.
    fn check(&self, layer: usize, expert: usize, parts: &[&[u8]]) -> Result<Option<ExpertWeights>>;
}

/// One expert's weights: its parts in its layout's order (see [`ExpertLayout::roles`]), e.g.
/// gate and up `[inter, hidden]` and down `[hidden, inter]` for the separate SwiGLU layout.
#[derive(Clone, Debug)]
pub struct ExpertWeights {
    pub layout: ExpertLayout,
    pub parts: Vec<TensorRef>,
}

impl ExpertWeights {
    /// An expert of `layout` made of `parts` (in the layout's order; checked by the store).
    pub fn new(layout: ExpertLayout, parts: Vec<TensorRef>) -> ExpertWeights {
        ExpertWeights { layout, parts }
    }

    pub fn size_bytes(&self) -> usize {
        self.parts.iter().map(TensorRef::size_bytes).sum()
    }

    /// Every part with its role, in the layout's order.
    pub fn with_roles(&self) -> impl Iterator<Item = (PartRole, &TensorRef)> {
        self.layout.roles().iter().copied().zip(&self.parts)
    }

    /// [`ExpertWeights::with_roles`], mutably (quantization and the cache swap parts).
    pub fn with_roles_mut(&mut self) -> impl Iterator<Item = (PartRole, &mut TensorRef)> {
        self.layout.roles().iter().copied().zip(&mut self.parts)
    }

    /// The first matrix part (gate, or gate_up): its dtype is the expert's compute dtype.
    pub fn first_matrix(&self) -> &TensorRef {
        &self.parts[0]
    }

    /// Checks the expert against its layout with the model's `hidden` and `inter`: the number
    /// of parts, each part's shape (naming the tensor) and each bias's dtype.
    pub(crate) fn check(&self, hidden: usize, inter: usize) -> Result<()> {
        ExpertLayout {
            hidden,
            inter,
            ..self.layout
        }
        .check(&self.parts)
    }

    /// Copies the expert into one owned buffer (positioned reads for mapped files).
    pub fn read_owned(&self) -> Result<ExpertBuf> {
        self.read_owned_in(None)
    }

    /// [`ExpertWeights::read_owned`] into pinned host memory from `pinned` when given (the
    /// positioned reads land there directly), else on the heap.
    pub fn read_owned_in(&self, pinned: Option<&Arc<cuda::PinnedPool>>) -> Result<ExpertBuf> {
        let mut parts = Vec::with_capacity(self.parts.len());
        let mut end = 0usize;
        for t in &self.parts {
            parts.push((end, t.numel(), t.dtype));
            // Each part starts 8-byte aligned inside the buffer.
            end += t.size_bytes().div_ceil(8) * 8;
        }
        let mut words = match pinned.map(|pool| pool.alloc(end / 8)) {
            Some(Ok(p)) => Words::Pinned(p),
            // No pinned memory left: the heap (copies then go through the staging ring).
            Some(Err(e)) => {
                tracing::debug!("expert buffer on the heap: {e}");
                Words::Heap(crate::mem::zeroed_words(end / 8))
            }
            None => Words::Heap(crate::mem::zeroed_words(end / 8)),
        };
        let bytes = bytemuck::cast_slice_mut::<u64, u8>(words.as_mut_slice());
        for (t, &(off, _, _)) in self.parts.iter().zip(&parts) {
            t.read_into(&mut bytes[off..off + t.size_bytes()])?;
        }
        Ok(ExpertBuf {
            words,
            parts,
            layout: self.layout,
        })
    }
}

/// Where an owned expert buffer's words live.
enum Words {
    Heap(Vec<u64>),
    /// Pinned host memory (a device tier's pool): copied to the device without staging.
    Pinned(cuda::PinnedWords),
}

impl Words {
    fn as_slice(&self) -> &[u64] {
        match self {
            Words::Heap(v) => v,
            Words::Pinned(p) => p.words(),
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u64] {
        match self {
            Words::Heap(v) => v,
            Words::Pinned(p) => p.words_mut(),
        }
    }
}

/// An expert copied out of its file into memory we own (a RAM pool entry or a device slot).
pub struct ExpertBuf {
    words: Words,
    /// (byte offset, element count, dtype) of each part, in the layout's order.
    parts: Vec<(usize, usize, Dtype)>,
    layout: ExpertLayout,
}

/// A copy on the heap (a pinned buffer's clone is not pinned).
impl Clone for ExpertBuf {
    fn clone(&self) -> Self {
        ExpertBuf {
            words: Words::Heap(self.words.as_slice().to_vec()),
            parts: self.parts.clone(),
            layout: self.layout,
        }
    }
}

impl ExpertBuf {
    pub fn size_bytes(&self) -> usize {
        self.words.as_slice().len() * 8
    }

    /// The whole buffer (every part at its offset; see [`ExpertBuf::part`]): what a device slot
    /// holds, byte for byte.
    pub fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self.words.as_slice())
    }

    /// The pinned host buffer holding this expert, when it lives in one (a device copy can read
    /// it directly).
    pub fn pinned(&self) -> Option<crate::backend::cuda::gpu::HostId> {
        match &self.words {
            Words::Pinned(p) => Some(p.id()),
            Words::Heap(_) => None,
        }
    }

    /// Byte offset, element count and dtype of part `i` (in the layout's order) within
    /// [`ExpertBuf::bytes`].
    pub fn part(&self, i: usize) -> (usize, usize, Dtype) {
        self.parts[i]
    }

    /// The expert's layout.
    pub fn layout(&self) -> &ExpertLayout {
        &self.layout
    }

    /// Number of parts held (the layout's).
    pub fn num_parts(&self) -> usize {
        self.parts.len()
    }

    /// The stored bytes of part `i` (in the layout's order; for the separate layout 0 gate,
    /// 1 up, 2 down).
    pub fn part_bytes(&self, i: usize) -> &[u8] {
        let (off, n, dtype) = self.parts[i];
        // `read_owned` placed part i at [off, off + len).
        &bytemuck::cast_slice::<u64, u8>(self.words.as_slice())[off..off + dtype.bytes_for(n)]
    }

    /// The bytes of every part, in the layout's order (what [`ExpertCheck::check`] takes).
    pub fn all_part_bytes(&self) -> Vec<&[u8]> {
        (0..self.parts.len()).map(|i| self.part_bytes(i)).collect()
    }

    /// A buffer holding no expert (for pool bookkeeping in tests and replays).
    pub fn empty() -> ExpertBuf {
        ExpertBuf {
            words: Words::Heap(Vec::new()),
            parts: Vec::new(),
            layout: ExpertLayout::swiglu(0, 0),
        }
    }
}

/// An expert's parts as kernel weights, wherever its bytes live (mapped file or owned buffer);
/// the FFN is written once, in [`expert_ffn_rows`].
pub trait ExpertParts {
    fn layout(&self) -> &ExpertLayout;
    /// Part `i` (in the layout's order) as kernel weights.
    fn part_weights(&self, i: usize) -> Weights<'_>;

    /// Unweighted expert output for the gathered rows (see [`expert_ffn_rows`]).
    fn ffn_rows(
        &self,
        rows: &[usize],
        x: &[f32],
        hidden: usize,
        parallel: bool,
        act: Activations,
    ) -> Vec<f32> {
        let parts: Vec<Weights<'_>> = (0..self.layout().roles().len())
            .map(|i| self.part_weights(i))
            .collect();
        expert_ffn_rows(self.layout(), &parts, rows, x, hidden, parallel, act)
    }

    /// `out[r] += w_r * ffn(x_r)` for the batch's rows of `x`, each matmul split over the
    /// current rayon pool.
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
    fn layout(&self) -> &ExpertLayout {
        &self.layout
    }
    fn part_weights(&self, i: usize) -> Weights<'_> {
        self.parts[i].weights()
    }
}

impl ExpertParts for ExpertBuf {
    fn layout(&self) -> &ExpertLayout {
        &self.layout
    }
    fn part_weights(&self, i: usize) -> Weights<'_> {
        // Each part starts 8-byte aligned (see `read_owned`), enough for every compute dtype.
        crate::weights::typed_weights(self.part_bytes(i), self.parts[i].2)
    }
}

/// The expert's FFN for the gathered rows, `[rows.len(), hidden]`, unweighted, following
/// `layout` (`parts` in its order):
/// - separate: gate and up share one prepared input (quantized once on the q8 path), one
///   matmul each;
/// - fused: one matmul over gate_up `[2I, H]`, then gate and up are its halves (`Fused`) or its
///   even and odd values (`FusedInterleaved`), the same dot products as the separate layout;
/// - biases (f32 sums) added after each matmul; then `up = glu(gate, up)`, then down (+ bias).
///
/// `parallel` splits each matmul over the current rayon pool; the result is the same bit for
/// bit either way (the kernels' contract), so callers may run several experts side by side
/// with `parallel = false` instead. `act` is the `activations` setting (see
/// [`crate::backend::cpu::Input`]).
pub fn expert_ffn_rows(
    layout: &ExpertLayout,
    parts: &[Weights<'_>],
    rows: &[usize],
    x: &[f32],
    hidden: usize,
    parallel: bool,
    act: Activations,
) -> Vec<f32> {
    let inter = layout.inter;
    let m = rows.len();
    let mut xs = Vec::with_capacity(m * hidden);
    for &r in rows {
        xs.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
    }
    let bias = |role: PartRole| layout.index_of(role).map(|i| parts[i]);
    let (g, mut u) = match layout.gate_up {
        GateUp::Separate => {
            let (gate, up) = (parts[0], parts[1]);
            // Gate and up share one prepared input (quantized once on the q8 path).
            let xin = Input::new(&xs, m, hidden, act, &[gate, up]);
            let mut g = vec![0f32; m * inter];
            let mut u = vec![0f32; m * inter];
            xin.matmul(gate, inter, &mut g, parallel);
            xin.matmul(up, inter, &mut u, parallel);
            if let Some(b) = bias(PartRole::GateBias) {
                add_bias_rows(&mut g, b);
            }
            if let Some(b) = bias(PartRole::UpBias) {
                add_bias_rows(&mut u, b);
            }
            (g, u)
        }
        GateUp::Fused | GateUp::FusedInterleaved => {
            let gate_up = parts[0];
            let mut gu = vec![0f32; m * 2 * inter];
            Input::new(&xs, m, hidden, act, &[gate_up]).matmul(
                gate_up,
                2 * inter,
                &mut gu,
                parallel,
            );
            if let Some(b) = bias(PartRole::GateUpBias) {
                add_bias_rows(&mut gu, b);
            }
            let mut g = Vec::with_capacity(m * inter);
            let mut u = Vec::with_capacity(m * inter);
            for row in gu.chunks_exact(2 * inter) {
                if layout.gate_up == GateUp::Fused {
                    let (gr, ur) = row.split_at(inter);
                    g.extend_from_slice(gr);
                    u.extend_from_slice(ur);
                } else {
                    for pair in row.chunks_exact(2) {
                        g.push(pair[0]);
                        u.push(pair[1]);
                    }
                }
            }
            (g, u)
        }
    };
    glu(&g, &mut u, layout.glu);
    let down = parts[layout.down_index()];
    let mut y = vec![0f32; m * hidden];
    Input::new(&u, m, inter, act, &[down]).matmul(down, hidden, &mut y, parallel);
    if let Some(b) = bias(PartRole::DownBias) {
        add_bias_rows(&mut y, b);
    }
    y
}

/// Adds the bias vector `b` (f32, bf16 or f16, as [`ExpertLayout::check`] allows) to every
/// `b.len()`-wide row of `y`, in f32.
fn add_bias_rows(y: &mut [f32], b: Weights<'_>) {
    let b: Vec<f32> = match b {
        Weights::F32(b) => b.to_vec(),
        Weights::Bf16(b) => b.iter().map(|v| v.to_f32()).collect(),
        Weights::F16(b) => b.iter().map(|v| v.to_f32()).collect(),
        // The layout check refuses any other bias dtype when the store is built.
        _ => unreachable!("an expert bias is f32, bf16 or f16 (checked by the layout)"),
    };
    for row in y.chunks_exact_mut(b.len()) {
        for (v, b) in row.iter_mut().zip(&b) {
            *v += b;
        }
    }
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
