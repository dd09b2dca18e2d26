//! The device tier's interface: the mechanism a tier supplies, with no policy in it.
//!
//! The store splits into *policy* ([`super::TieredStore`]: hit or miss, prefetch, demand loads
//! before prefetches, copy or compute on the host, counters) and *mechanism*: a [`DeviceTier`]
//! allocates slots in its memory, copies an expert's bytes into one (returning a completion
//! ticket), runs an expert's FFN on the rows routed to it from a slot, and says when queued work
//! has completed. The policy code is the same for every tier; `sim` ([`super::SimTier`], host RAM
//! plus the modelled link time) is one implementation and a CUDA tier (pinned staging, a copy
//! stream, events) is another.
//!
//! Invariants:
//! - a tier computes exactly what the host computes for the same stored bytes (same dtype, same
//!   summation), so where an expert runs never changes a result;
//! - a slot is filled once, by one `copy_in`, before any reader sees it (the pool publishes it
//!   only after the copy's ticket completed);
//! - every `ffn` on a slot records its ticket as the slot's last use ([`Resident::record_use`]);
//!   the pool never evicts a slot whose last use is pending, and a slot's memory is released
//!   only when it has left the pool and its last reader has dropped it, so device memory is
//!   never overwritten or freed before the work that reads it completes.

use std::sync::Arc;

use parking_lot::Mutex;

use super::{ExpertBatch, ExpertBuf};
use crate::backend::Activations;
use crate::error::Result;

/// A device tier: memory for expert slots, a copy engine into it, and compute over it.
pub trait DeviceTier: Send + Sync + 'static {
    /// One expert's bytes in the tier's memory.
    type Slot: Send + Sync + 'static;
    /// Completion of queued work (a copy or an expert's FFN).
    type Ticket: Send + Sync + 'static;

    /// Allocates a slot large enough for an expert of `bytes`.
    fn alloc(&self, bytes: usize) -> Result<Self::Slot>;

    /// Starts copying `src` into `dst`. The tier keeps `src` until the copy has completed (an
    /// asynchronous copy reads it after this returns) and may take its buffer when no one else
    /// holds it. `started` is when bringing the expert in began (reading its source included),
    /// for a tier that models the link's time.
    fn copy_in(
        &self,
        src: Arc<ExpertBuf>,
        dst: &mut Self::Slot,
        started: std::time::Instant,
    ) -> Result<Self::Ticket>;

    /// Blocks until the ticket's work has completed, or says why it failed.
    fn wait(&self, ticket: &Self::Ticket) -> Result<()>;

    /// Has the ticket's work completed (without blocking)?
    fn is_done(&self, ticket: &Self::Ticket) -> bool;

    /// Seconds the link spent on the copy behind a completed `ticket`, timed on the device
    /// (events around the transfer alone); None where the tier does not time its copies, and
    /// the store then times the whole load (reading the source included) on the host clock.
    fn copy_seconds(&self, _ticket: &Self::Ticket) -> Option<f64> {
        None
    }

    /// `out[r] += w_r * ffn(x_r)` for the batch's rows, with the expert held in `slot`. `x` and
    /// `out` are `[tokens, hidden]` host rows; `act` is the `activations` setting.
    fn ffn(
        &self,
        slot: &Self::Slot,
        batch: &ExpertBatch,
        x: &[f32],
        hidden: usize,
        act: Activations,
        out: &mut [f32],
    ) -> Result<Self::Ticket>;

    /// Seconds a copy of `bytes` is expected to take before any copy has been measured.
    fn estimated_copy_s(&self, bytes: usize) -> f64;

    /// Host memory the store should read experts into (the RAM pool and reads for one copy),
    /// so copies from it need no staging: pinned memory on a GPU. Default: the heap.
    fn host_memory(&self) -> Option<Arc<super::cuda::PinnedPool>> {
        None
    }
}

/// A tier whose expert FFN runs on host rows ([`DeviceTier::ffn`] with a [`HostFrame`]): such a
/// store serves any backend through host copies of the activations.
pub trait HostRows {}

/// A layer's expert input and output during one computation, wherever they live: the policy
/// code hands each expert either to the device tier (a slot) or to the host, and the frame adds
/// the expert's weighted output where the output is kept, in the order it is called (ascending
/// expert order).
pub trait Frame<D: DeviceTier> {
    /// The layer's input rows `[tokens, hidden]` on the host (a device frame copies them once).
    fn x_host(&mut self) -> Result<&[f32]>;
    /// `out[rows[i]] += weights[i] * y[i]` for one expert's unweighted host output `y`
    /// (`[rows, hidden]`).
    fn add_host(&mut self, batch: &ExpertBatch, y: &[f32]) -> Result<()>;
    /// Runs the expert held in `slot` on the batch's rows, adding its weighted output.
    fn ffn(&mut self, tier: &D, slot: &D::Slot, batch: &ExpertBatch) -> Result<D::Ticket>;
}

/// A frame on host rows: what every tier whose slots the host can read computes on.
pub struct HostFrame<'a> {
    pub x: &'a [f32],
    pub out: &'a mut [f32],
    pub hidden: usize,
    pub act: Activations,
}

impl<D: DeviceTier> Frame<D> for HostFrame<'_> {
    fn x_host(&mut self) -> Result<&[f32]> {
        Ok(self.x)
    }

    fn add_host(&mut self, batch: &ExpertBatch, y: &[f32]) -> Result<()> {
        super::add_weighted_rows(&batch.rows, &batch.weights, y, self.hidden, self.out);
        Ok(())
    }

    fn ffn(&mut self, tier: &D, slot: &D::Slot, batch: &ExpertBatch) -> Result<D::Ticket> {
        tier.ffn(slot, batch, self.x, self.hidden, self.act, self.out)
    }
}

/// A filled device slot as the pool holds it: the tier's slot plus its last recorded use.
pub struct Resident<D: DeviceTier> {
    pub(crate) slot: D::Slot,
    last_use: Mutex<Option<D::Ticket>>,
}

impl<D: DeviceTier> Resident<D> {
    /// A slot whose copy has completed.
    pub fn new(slot: D::Slot) -> Resident<D> {
        Resident {
            slot,
            last_use: Mutex::new(None),
        }
    }

    /// Records `ticket` (work reading this slot) as its last use.
    pub fn record_use(&self, ticket: D::Ticket) {
        *self.last_use.lock() = Some(ticket);
    }

    /// Whether the slot's last recorded use has completed, so its memory may be reused.
    pub fn idle(&self, tier: &D) -> bool {
        self.last_use
            .lock()
            .as_ref()
            .is_none_or(|t| tier.is_done(t))
    }
}
