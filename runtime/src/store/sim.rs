//! `device = "sim"`: the simulated device tier. Slots are host RAM buffers; a copy takes the
//! modelled link time (latency plus bytes over the link bandwidth) and an expert's FFN runs the
//! host kernels over the slot's bytes.
//!
//! Invariants: a slot holds the expert's stored bytes exactly (same dtype, same layout as the RAM
//! tier), so results equal the host's bit for bit; every copy and computation completes before
//! its call returns, so every ticket is complete when handed out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::device::DeviceTier;
use super::{ExpertBatch, ExpertBuf, ExpertParts};
use crate::backend::Activations;
use crate::error::Result;

/// The simulated device: RAM slots behind a modelled link.
pub struct SimTier {
    /// Host-to-device bandwidth, bytes per second.
    link_bytes_per_s: f64,
    /// Fixed cost of each copy.
    copy_latency: Duration,
}

/// Completion of simulated work: always complete (the work ran inside the call).
pub struct SimTicket;

impl SimTier {
    pub fn new(link_bytes_per_s: f64, copy_latency: Duration) -> SimTier {
        SimTier {
            link_bytes_per_s,
            copy_latency,
        }
    }
}

impl super::device::HostRows for SimTier {}

impl DeviceTier for SimTier {
    type Slot = ExpertBuf;
    type Ticket = SimTicket;

    fn alloc(&self, _bytes: usize) -> Result<ExpertBuf> {
        // The copy brings its own buffer; nothing to reserve up front.
        Ok(ExpertBuf::empty())
    }

    fn copy_in(
        &self,
        src: Arc<ExpertBuf>,
        dst: &mut ExpertBuf,
        started: Instant,
    ) -> Result<SimTicket> {
        // A buffer read for this copy alone is moved; one the RAM tier also holds is copied.
        *dst = Arc::try_unwrap(src).unwrap_or_else(|shared| (*shared).clone());
        // The modelled transfer counts from when bringing the expert in began: a real link
        // streams while the source is read.
        let modelled = Duration::from_secs_f64(self.estimated_copy_s(dst.size_bytes()));
        if let Some(rest) = modelled.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
        Ok(SimTicket)
    }

    fn wait(&self, _ticket: &SimTicket) -> Result<()> {
        Ok(())
    }

    fn is_done(&self, _ticket: &SimTicket) -> bool {
        true
    }

    fn ffn(
        &self,
        slot: &ExpertBuf,
        batch: &ExpertBatch,
        x: &[f32],
        hidden: usize,
        act: Activations,
        out: &mut [f32],
    ) -> Result<SimTicket> {
        slot.forward_rows(batch, x, hidden, act, out);
        Ok(SimTicket)
    }

    /// The modelled transfer time: latency plus bytes over the link.
    fn estimated_copy_s(&self, bytes: usize) -> f64 {
        self.copy_latency.as_secs_f64() + bytes as f64 / self.link_bytes_per_s
    }
}
