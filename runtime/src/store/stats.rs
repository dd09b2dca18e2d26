//! Expert-store counters: per layer hits, misses, prefetch outcome, stall time and bytes moved.
//!
//! Invariant: counters only grow; a snapshot ([`StoreStats`]) is a consistent-enough copy for
//! reporting (each counter is read atomically, not the set as a whole).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters of one MoE layer.
#[derive(Default)]
pub(crate) struct LayerCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub prefetch_hits: AtomicU64,
    pub prefetch_wasted: AtomicU64,
    pub prefetch_issued: AtomicU64,
    /// Experts predicted for this layer that it then used.
    pub prefetch_correct: AtomicU64,
    /// Experts this layer used while a prediction existed for it.
    pub routed_with_prediction: AtomicU64,
    pub computed_in_place: AtomicU64,
    pub stall_ns: AtomicU64,
    pub bytes_file_to_ram: AtomicU64,
    pub bytes_to_device: AtomicU64,
}

impl LayerCounters {
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Relaxed);
    }

    pub fn snapshot(&self, layer: usize) -> LayerStats {
        let g = |c: &AtomicU64| c.load(Relaxed);
        LayerStats {
            layer,
            hits: g(&self.hits),
            misses: g(&self.misses),
            prefetch_hits: g(&self.prefetch_hits),
            prefetch_wasted: g(&self.prefetch_wasted),
            prefetch_issued: g(&self.prefetch_issued),
            prefetch_correct: g(&self.prefetch_correct),
            routed_with_prediction: g(&self.routed_with_prediction),
            computed_in_place: g(&self.computed_in_place),
            stall_ms: g(&self.stall_ns) as f64 / 1e6,
            bytes_file_to_ram: g(&self.bytes_file_to_ram),
            bytes_to_device: g(&self.bytes_to_device),
        }
    }
}

/// Counters of one MoE layer at one moment.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct LayerStats {
    pub layer: usize,
    /// Expert found in the fastest tier holding compute for it.
    pub hits: u64,
    /// Expert had to be read or copied (or computed where it lies) on demand.
    pub misses: u64,
    /// Hits on an entry brought in by prefetch and not used before.
    pub prefetch_hits: u64,
    /// Prefetched entries evicted before any use.
    pub prefetch_wasted: u64,
    pub prefetch_issued: u64,
    pub prefetch_correct: u64,
    pub routed_with_prediction: u64,
    /// Misses served by computing where the expert lies instead of copying it.
    pub computed_in_place: u64,
    pub stall_ms: f64,
    pub bytes_file_to_ram: u64,
    pub bytes_to_device: u64,
}

/// All layers' counters plus totals.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct StoreStats {
    pub hits: u64,
    pub misses: u64,
    pub prefetch_hits: u64,
    pub prefetch_wasted: u64,
    pub stall_ms: f64,
    pub bytes_moved: u64,
    /// Share of prefetched experts that were used (None before any prefetch).
    pub prefetch_precision: Option<f64>,
    /// Share of used experts that had been prefetched (None before any prediction).
    pub prefetch_recall: Option<f64>,
    /// Expert copy speed to the device tier as measured so far, bytes/s (on a GPU timed by
    /// events around each transfer); what the copy-or-compute choice uses. None before any
    /// copy, or without a device tier.
    pub copy_bytes_per_s: Option<f64>,
    /// Host compute speed over expert weights as measured so far, bytes/s (None before any
    /// expert ran on the host through the store's measured paths).
    pub host_compute_bytes_per_s: Option<f64>,
    pub per_layer: Vec<LayerStats>,
}

impl StoreStats {
    pub fn from_layers(per_layer: Vec<LayerStats>) -> StoreStats {
        let sum = |f: fn(&LayerStats) -> u64| per_layer.iter().map(f).sum::<u64>();
        let issued = sum(|l| l.prefetch_issued);
        let correct = sum(|l| l.prefetch_correct);
        let routed = sum(|l| l.routed_with_prediction);
        StoreStats {
            hits: sum(|l| l.hits),
            misses: sum(|l| l.misses),
            prefetch_hits: sum(|l| l.prefetch_hits),
            prefetch_wasted: sum(|l| l.prefetch_wasted),
            stall_ms: per_layer.iter().map(|l| l.stall_ms).sum(),
            bytes_moved: sum(|l| l.bytes_file_to_ram + l.bytes_to_device),
            prefetch_precision: (issued > 0).then(|| correct as f64 / issued as f64),
            prefetch_recall: (routed > 0).then(|| correct as f64 / routed as f64),
            copy_bytes_per_s: None,
            host_compute_bytes_per_s: None,
            per_layer,
        }
    }

    /// Share of expert uses served without a miss.
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.hits + self.misses;
        (n > 0).then(|| self.hits as f64 / n as f64)
    }
}
