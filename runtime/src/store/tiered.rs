//! The tiered expert store: device slots (per layer) -> RAM -> mmapped files.
//!
//! This file is the store's *policy*, generic over the device tier's *mechanism*
//! ([`DeviceTier`]): which tier serves an expert (hit or miss), what to prefetch, demand loads
//! before prefetches, copy or compute on the host, warm-up from the hot set, and every counter.
//! It never moves bytes into device memory or computes there itself; the tier does (`sim` is
//! [`SimTier`]), so a real device tier runs exactly this code, and it is tested against a fake
//! tier without a model.
//!
//! - **Host tier**: either every expert mapped from its file (the model fits the RAM budget; pages
//!   come in as the compute touches them), or a bounded RAM pool filled by positioned reads, so
//!   experts beyond the budget never enter this process's resident set through the mapping.
//! - **Device tier** (optional): per-layer pools ([`SlotPool`]) of the tier's slots. On `sim`
//!   the slots are RAM buffers and each copy takes the modelled link time; another tier
//!   implements [`DeviceTier`] and plugs in through [`TieredStore::with_tier`].
//! - **Loads** run on loader threads; demand loads go before prefetches, so a computation never
//!   waits behind a copy meant for a later layer.
//! - **Prefetch**: the model predicts a later layer's experts and calls [`ExpertSource::prefetch`];
//!   predictions are scored against the experts that layer then uses (precision, recall).
//! - **Miss policy**: a device miss is copied, or computed where the expert lies when the modelled
//!   copy would take longer than computing it there.
//! - **Failures**: an expert that cannot be brought in (I/O error, checksum failure, a file changed
//!   on disk) fails the computation that needs it with [`Error::ExpertLoad`] naming the layer and
//!   expert and carrying the cause; every computation waiting on the same load gets the same cause.
//!
//! Invariants: this is the only code that moves expert bytes between tiers; results do not depend
//! on where an expert is computed (every tier holds the stored dtype and the same kernels run), so
//! parity holds with every tier in play; RAM use is bounded by the pool capacities plus the
//! buffers computations hold at that moment; a device slot is published only after its copy
//! completed, every computation on it records its last use, and eviction skips a slot whose last
//! use is pending, so no copy overwrites a slot before the work reading it has completed.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::device::{DeviceTier, Frame, HostFrame, HostRows, Resident};
use super::pool::{Found, Reserved, Slot, SlotPool};
use super::sim::SimTier;
use super::stats::LayerCounters;
use super::{
    EvictionPolicy, ExpertBatch, ExpertBuf, ExpertCheck, ExpertLayout, ExpertParts, ExpertSource,
    ExpertStore, ExpertWeights, StoreStats,
};
use crate::backend::Backend;
use crate::error::{Error, Result};

/// Host (RAM) tier settings.
#[derive(Clone, Debug, PartialEq)]
pub enum HostTierConfig {
    /// Every expert served from the mapped files.
    Mapped,
    /// At most `experts` experts (across all layers) held in RAM; the rest read on demand.
    Pool { experts: usize },
}

/// Device tier settings (simulated link).
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceTierConfig {
    pub slots_per_layer: usize,
    /// Host-to-device bandwidth, bytes per second.
    pub link_bytes_per_s: f64,
    pub copy_latency: Duration,
    /// Host compute speed used to decide copy vs compute in place, weight bytes per second.
    pub host_compute_bytes_per_s: f64,
}

/// How to build a [`TieredStore`].
#[derive(Clone, Debug, PartialEq)]
pub struct TieredStoreConfig {
    pub host: HostTierConfig,
    pub device: Option<DeviceTierConfig>,
    pub policy: EvictionPolicy,
    pub prefetch: bool,
    pub prefetch_depth: usize,
    /// Loader threads for file reads and device copies.
    pub loader_threads: usize,
    /// Experts to place first (hot set), as (layer, expert), hottest first.
    pub hot: Vec<(usize, usize)>,
    /// How expert inputs meet the expert weights (`activations`).
    pub activations: crate::backend::Activations,
}

impl Default for TieredStoreConfig {
    fn default() -> Self {
        TieredStoreConfig {
            host: HostTierConfig::Mapped,
            device: None,
            policy: EvictionPolicy::Lru,
            prefetch: false,
            prefetch_depth: 1,
            loader_threads: 2,
            hot: Vec::new(),
            activations: crate::backend::Activations::F32,
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Loader threads with two queues; demand work always goes first.
struct Loader {
    demand: Sender<Job>,
    prefetch: Sender<Job>,
    _threads: Vec<std::thread::JoinHandle<()>>,
}

impl Loader {
    fn new(threads: usize) -> Loader {
        let (dtx, drx) = crossbeam_channel::unbounded::<Job>();
        let (ptx, prx) = crossbeam_channel::unbounded::<Job>();
        let handles = (0..threads.max(1))
            .map(|i| {
                let (drx, prx): (Receiver<Job>, Receiver<Job>) = (drx.clone(), prx.clone());
                std::thread::Builder::new()
                    .name(format!("moe-loader-{i}"))
                    .spawn(move || loop {
                        if let Ok(job) = drx.try_recv() {
                            job();
                            continue;
                        }
                        crossbeam_channel::select! {
                            recv(drx) -> j => match j { Ok(job) => job(), Err(_) => return },
                            recv(prx) -> j => match j { Ok(job) => job(), Err(_) => return },
                        }
                    })
                    .expect("spawn loader thread")
            })
            .collect();
        Loader {
            demand: dtx,
            prefetch: ptx,
            _threads: handles,
        }
    }
}

/// Where an expert's bytes are read from for computing or copying.
enum HostView<'a> {
    Mapped(&'a ExpertWeights),
    Owned(Arc<ExpertBuf>),
}

/// The outcome of checking one expert's bytes: intact (`None`), its replacement, or the error.
type Checked = std::result::Result<Option<ExpertWeights>, Arc<Error>>;

/// Why an expert could not be brought in: the runtime's error, shared by every computation
/// waiting on that load (wrapped into [`Error::ExpertLoad`] where a computation fails on it).
type Cause = Arc<Error>;

/// The error a computation fails with when its expert could not be loaded.
fn load_failed(layer: usize, expert: usize) -> impl FnOnce(Cause) -> Error {
    move |source| Error::ExpertLoad {
        layer,
        expert,
        source,
    }
}

struct Shared {
    experts: Vec<Vec<ExpertWeights>>,
    /// Checks experts' bytes on first use (experts mapped from a checksummed cache file).
    check: Option<Arc<dyn ExpertCheck>>,
    /// Per (layer, expert): the check's outcome, once done.
    checked: Vec<Vec<std::sync::OnceLock<Checked>>>,
    host_pool: Option<SlotPool>,
    counters: Vec<LayerCounters>,
    num_experts_max: usize,
    /// Tokens routed to each (layer, expert) since start: the hot set.
    popularity: Vec<Vec<AtomicU64>>,
    /// Measured device copy speed, bytes/s (0 until the first copy).
    copy_rate: Rate,
    /// Measured host compute speed over expert weights, bytes/s (0 until measured).
    host_rate: Rate,
    /// Where owned expert buffers are read into (the device tier's pinned memory, or the heap).
    host_memory: Option<Arc<super::cuda::PinnedPool>>,
}

/// A running estimate of a speed (exponential moving average of samples), lock-free.
#[derive(Default)]
struct Rate(AtomicU64);

impl Rate {
    /// Weight of a new sample: recent behaviour matters, one outlier does not dominate.
    const ALPHA: f64 = 0.2;

    fn record(&self, bytes: usize, elapsed: Duration) {
        self.record_secs(bytes, elapsed.as_secs_f64());
    }

    fn record_secs(&self, bytes: usize, secs: f64) {
        if secs <= 0.0 || bytes == 0 {
            return;
        }
        let sample = bytes as f64 / secs;
        let old = f64::from_bits(self.0.load(Relaxed));
        let new = if old == 0.0 {
            sample
        } else {
            old + Self::ALPHA * (sample - old)
        };
        self.0.store(new.to_bits(), Relaxed);
    }

    fn get(&self) -> Option<f64> {
        let v = f64::from_bits(self.0.load(Relaxed));
        (v > 0.0).then_some(v)
    }
}

impl Shared {
    fn key(&self, layer: usize, expert: usize) -> usize {
        layer * self.num_experts_max + expert
    }

    /// Runs the check on `parts` (the expert's bytes as read) once per expert.
    fn checked(&self, layer: usize, expert: usize, parts: &[&[u8]]) -> &Checked {
        let check = self.check.as_ref().expect("called with a check only");
        self.checked[layer][expert]
            .get_or_init(|| check.check(layer, expert, parts).map_err(Arc::new))
    }

    /// The weights an outcome says to use.
    fn resolve<'a>(
        outcome: &'a Checked,
        original: &'a ExpertWeights,
    ) -> std::result::Result<&'a ExpertWeights, Cause> {
        match outcome {
            Ok(None) => Ok(original),
            Ok(Some(replacement)) => Ok(replacement),
            Err(cause) => Err(cause.clone()),
        }
    }

    /// The expert's weights for computing where they lie (the mapped file): checked on first
    /// use, replaced when damaged.
    fn expert(&self, layer: usize, expert: usize) -> std::result::Result<&ExpertWeights, Cause> {
        let original = &self.experts[layer][expert];
        if self.check.is_none() {
            return Ok(original);
        }
        let parts: Vec<&[u8]> = original.parts.iter().map(|t| t.bytes()).collect();
        Self::resolve(self.checked(layer, expert, &parts), original)
    }

    /// Reads an expert from its file into an owned buffer (checking it on first use). `into_ram`
    /// counts the bytes as moved into the RAM tier (a direct file-to-device copy counts only as
    /// device bytes).
    fn read_from_file(
        &self,
        layer: usize,
        expert: usize,
        into_ram: bool,
    ) -> std::result::Result<ExpertBuf, Cause> {
        let original = &self.experts[layer][expert];
        let read = |w: &ExpertWeights| w.read_owned_in(self.host_memory.as_ref()).map_err(Arc::new);
        let buf = match (&self.check, self.checked[layer][expert].get()) {
            (None, _) => read(original)?,
            (Some(_), Some(outcome)) => read(Self::resolve(outcome, original)?)?,
            (Some(_), None) => {
                let buf = read(original)?;
                let w =
                    Self::resolve(self.checked(layer, expert, &buf.all_part_bytes()), original)?;
                if std::ptr::eq(w, original) {
                    buf
                } else {
                    read(w)?
                }
            }
        };
        if into_ram {
            LayerCounters::add(
                &self.counters[layer].bytes_file_to_ram,
                buf.size_bytes() as u64,
            );
        }
        Ok(buf)
    }
}

/// The device side of a store: the tier (mechanism), its settings and its per-layer slot pools
/// (shared with the copy jobs, which drop a slot whose copy failed).
struct DeviceSide<D: DeviceTier> {
    config: DeviceTierConfig,
    tier: D,
    pools: Vec<SlotPool<Resident<D>>>,
}

/// The store behind every model: see the module docs. `D` is the device tier; the policy here
/// is the same for every tier.
pub struct TieredStore<D: DeviceTier = SimTier> {
    shared: Arc<Shared>,
    /// The layout every expert shares (None when the model has no experts).
    layout: Option<ExpertLayout>,
    device: Option<Arc<DeviceSide<D>>>,
    loader: Loader,
    config: TieredStoreConfig,
    /// Per layer: the experts last predicted for it, scored when it routes.
    predicted: Mutex<Vec<Option<HashSet<usize>>>>,
}

impl TieredStore<SimTier> {
    /// `experts[l]` are layer l's experts (empty for dense layers), all of one layout, each
    /// checked against it with the model's `hidden` and `inter`. The device tier, when
    /// configured, is `sim`.
    pub fn new(
        experts: Vec<Vec<ExpertWeights>>,
        hidden: usize,
        inter: usize,
        config: TieredStoreConfig,
    ) -> Result<TieredStore> {
        Self::with_check(experts, hidden, inter, config, None)
    }

    /// [`TieredStore::new`] over experts whose bytes `check` verifies on first use.
    pub fn with_check(
        experts: Vec<Vec<ExpertWeights>>,
        hidden: usize,
        inter: usize,
        config: TieredStoreConfig,
        check: Option<Arc<dyn ExpertCheck>>,
    ) -> Result<TieredStore> {
        let tier = config
            .device
            .as_ref()
            .map(|d| SimTier::new(d.link_bytes_per_s, d.copy_latency));
        TieredStore::with_tier(experts, hidden, inter, config, check, tier)
    }
}

impl<D: DeviceTier> TieredStore<D> {
    /// [`TieredStore::with_check`] over a given device tier. `tier` is used when
    /// `config.device` is set (its slot count and host compute speed), ignored otherwise.
    pub fn with_tier(
        experts: Vec<Vec<ExpertWeights>>,
        hidden: usize,
        inter: usize,
        config: TieredStoreConfig,
        check: Option<Arc<dyn ExpertCheck>>,
        tier: Option<D>,
    ) -> Result<TieredStore<D>> {
        let layout = experts.iter().flatten().next().map(|e| ExpertLayout {
            hidden,
            inter,
            ..e.layout
        });
        for e in experts.iter().flatten() {
            e.check(hidden, inter)?;
            if Some(e.layout) != layout {
                return Err(Error::Internal(format!(
                    "expert `{}` has layout {:?}, unlike the model's first expert ({:?}): one \
                     model has one expert layout",
                    e.parts.first().map_or("?", |t| t.name.as_str()),
                    e.layout,
                    layout
                )));
            }
        }
        let layers = experts.len();
        let experts_per_layer: Vec<usize> = experts.iter().map(Vec::len).collect();
        let num_experts_max = experts.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let host_pool = match config.host {
            HostTierConfig::Mapped => None,
            HostTierConfig::Pool { experts } => Some(SlotPool::new(experts, config.policy)),
        };
        let device = config.device.clone().zip(tier).map(|(d, tier)| {
            let pools = (0..layers)
                .map(|_| SlotPool::new(d.slots_per_layer, config.policy))
                .collect();
            Arc::new(DeviceSide {
                config: d,
                tier,
                pools,
            })
        });
        let shared = Arc::new(Shared {
            checked: experts
                .iter()
                .map(|l| l.iter().map(|_| std::sync::OnceLock::new()).collect())
                .collect(),
            check,
            experts,
            host_pool,
            counters: (0..layers).map(|_| LayerCounters::default()).collect(),
            num_experts_max,
            popularity: experts_per_layer
                .iter()
                .map(|&n| (0..n).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            copy_rate: Rate::default(),
            host_rate: Rate::default(),
            host_memory: device.as_ref().and_then(|d| d.tier.host_memory()),
        });
        if config.policy == EvictionPolicy::PinnedLru {
            if let Some(p) = &shared.host_pool {
                p.pin(config.hot.iter().map(|&(l, e)| shared.key(l, e)));
            }
            if let Some(dev) = &device {
                for &(l, e) in &config.hot {
                    if let Some(p) = dev.pools.get(l) {
                        p.pin([e]);
                    }
                }
            }
        }
        let store = TieredStore {
            loader: Loader::new(config.loader_threads),
            predicted: Mutex::new(vec![None; layers]),
            layout,
            shared,
            device,
            config,
        };
        store.warm_up();
        Ok(store)
    }

    fn counters(&self, layer: usize) -> &LayerCounters {
        &self.shared.counters[layer]
    }

    /// Ensures `expert` of `layer` is in the host pool (starting a load if needed); returns the
    /// slot to wait on, or None when the pool cannot take it (read directly instead).
    fn host_slot(&self, layer: usize, expert: usize, prefetch: bool) -> Option<(Arc<Slot>, bool)> {
        let pool = self.shared.host_pool.as_ref()?;
        let key = self.shared.key(layer, expert);
        let mut wasted = false;
        match pool.reserve(key, prefetch, &mut wasted) {
            Reserved::Present(s) => Some((s, false)),
            Reserved::New(s) => {
                if wasted {
                    LayerCounters::add(&self.counters(layer).prefetch_wasted, 1);
                }
                let shared = self.shared.clone();
                let slot = s.clone();
                let job: Job = Box::new(move || {
                    let r = shared.read_from_file(layer, expert, true);
                    if r.is_err() {
                        if let Some(p) = &shared.host_pool {
                            p.remove(key);
                        }
                    }
                    slot.fill(r);
                });
                let q = if prefetch {
                    &self.loader.prefetch
                } else {
                    &self.loader.demand
                };
                let _ = q.send(job);
                Some((s, true))
            }
            Reserved::Full => None,
        }
    }

    /// The host-side bytes of an expert for computing on the host, counting hits and misses
    /// when the host is the compute tier.
    fn host_view(&self, layer: usize, expert: usize, count: bool) -> Result<HostView<'_>> {
        let c = self.counters(layer);
        let Some(pool) = &self.shared.host_pool else {
            if count {
                LayerCounters::add(&c.hits, 1);
            }
            let w = self
                .shared
                .expert(layer, expert)
                .map_err(load_failed(layer, expert))?;
            return Ok(HostView::Mapped(w));
        };
        let key = self.shared.key(layer, expert);
        if let Some(Found { slot, prefetch_hit }) = pool.lookup(key) {
            let t0 = Instant::now();
            let buf = slot.wait().map_err(load_failed(layer, expert))?;
            if count {
                LayerCounters::add(&c.hits, 1);
                LayerCounters::add(&c.stall_ns, t0.elapsed().as_nanos() as u64);
                if prefetch_hit {
                    LayerCounters::add(&c.prefetch_hits, 1);
                }
            }
            return Ok(HostView::Owned(buf));
        }
        if count {
            LayerCounters::add(&c.misses, 1);
        }
        let t0 = Instant::now();
        let buf = match self.host_slot(layer, expert, false) {
            Some((slot, _)) => slot.wait(),
            // Pool full of in-flight loads: read once into a transient buffer.
            None => self
                .shared
                .read_from_file(layer, expert, true)
                .map(Arc::new),
        };
        let view = HostView::Owned(buf.map_err(load_failed(layer, expert))?);
        if count {
            LayerCounters::add(&c.stall_ns, t0.elapsed().as_nanos() as u64);
        }
        Ok(view)
    }

    /// Starts copying an expert to its device slot; returns the slot.
    fn device_load(
        &self,
        layer: usize,
        expert: usize,
        prefetch: bool,
    ) -> Option<Arc<Slot<Resident<D>>>> {
        let dev = self.device.as_ref()?;
        let mut wasted = false;
        // A slot whose last use is still pending is never the one overwritten.
        let reserved =
            dev.pools[layer].reserve_where(expert, prefetch, &mut wasted, |r| r.idle(&dev.tier));
        let slot = match reserved {
            Reserved::Present(s) => return Some(s),
            Reserved::Full => return None,
            Reserved::New(s) => s,
        };
        if wasted {
            LayerCounters::add(&self.counters(layer).prefetch_wasted, 1);
        }
        // Source: the host pool when it has (or is loading) the expert, else the file.
        let host_slot = self
            .shared
            .host_pool
            .as_ref()
            .and_then(|_| self.host_slot(layer, expert, prefetch))
            .map(|(s, _)| s);
        let shared = self.shared.clone();
        let target = slot.clone();
        let dev = dev.clone();
        let job: Job = Box::new(move || {
            let t0 = Instant::now();
            let copied = match host_slot {
                Some(h) => h.wait(),
                None => shared.read_from_file(layer, expert, false).map(Arc::new),
            }
            .and_then(|b| {
                let bytes = b.size_bytes();
                LayerCounters::add(&shared.counters[layer].bytes_to_device, bytes as u64);
                let copy = || -> Result<(Resident<D>, Option<f64>)> {
                    let mut s = dev.tier.alloc(bytes)?;
                    let ticket = dev.tier.copy_in(b, &mut s, t0)?;
                    dev.tier.wait(&ticket)?;
                    Ok((Resident::new(s), dev.tier.copy_seconds(&ticket)))
                };
                let (resident, timed) = copy().map_err(Arc::new)?;
                // The link's own time where the device times it: reading the source is paid
                // whether the expert is copied or computed where it lies, so only the transfer
                // weighs in the copy-or-compute choice.
                let took = timed.unwrap_or_else(|| t0.elapsed().as_secs_f64());
                shared.copy_rate.record_secs(bytes, took);
                Ok(resident)
            });
            if copied.is_err() {
                // Like the host pool: a failed copy leaves no entry, so a later use tries again
                // (the waiters of this one still get the cause). The entry is still this slot:
                // a loading entry is never evicted.
                dev.pools[layer].remove(expert);
            }
            target.fill(copied);
        });
        let q = if prefetch {
            &self.loader.prefetch
        } else {
            &self.loader.demand
        };
        let _ = q.send(job);
        Some(slot)
    }

    fn score_prediction(&self, layer: usize, used: &HashSet<usize>) {
        let predicted = self.predicted.lock()[layer].take();
        if let Some(p) = predicted {
            let c = self.counters(layer);
            LayerCounters::add(&c.prefetch_correct, p.intersection(used).count() as u64);
            LayerCounters::add(&c.routed_with_prediction, used.len() as u64);
        }
    }

    /// Copy or compute in place? Copy unless computing where the expert lies is faster than
    /// copying it, using the speeds measured so far (the configured ones until then).
    fn worth_copying(&self, layer: usize, expert: usize) -> bool {
        let Some(dev) = &self.device else {
            return false;
        };
        let size_bytes = self.shared.experts[layer][expert].size_bytes();
        let bytes = size_bytes as f64;
        let copy_s = match self.shared.copy_rate.get() {
            Some(rate) => bytes / rate,
            None => dev.tier.estimated_copy_s(size_bytes),
        };
        let host_rate = self
            .shared
            .host_rate
            .get()
            .unwrap_or(dev.config.host_compute_bytes_per_s);
        bytes / host_rate >= copy_s
    }

    /// Starts loading the hottest experts (hottest first) into the fastest tier, up to its
    /// capacity, so a restart begins with the working set of the last run.
    fn warm_up(&self) {
        let hot = self.config.hot.clone();
        if let Some(dev) = &self.device {
            let pools = &dev.pools;
            let mut per_layer = vec![0usize; pools.len()];
            for (l, e) in hot {
                if l < pools.len() && e < self.num_experts(l) && per_layer[l] < pools[l].capacity()
                {
                    per_layer[l] += 1;
                    let _ = self.device_load(l, e, true);
                }
            }
        } else if let Some(pool) = &self.shared.host_pool {
            for (l, e) in hot.into_iter().take(pool.capacity()) {
                if e < self.num_experts(l) {
                    let _ = self.host_slot(l, e, true);
                }
            }
        }
    }

    fn compute_on_host<D2: DeviceTier>(
        &self,
        layer: usize,
        b: &ExpertBatch,
        frame: &mut dyn Frame<D2>,
        hidden: usize,
        count: bool,
    ) -> Result<()> {
        let view = self.host_view(layer, b.expert, count)?;
        let x = frame.x_host()?;
        let t0 = Instant::now();
        let act = self.config.activations;
        let (y, bytes) = match view {
            HostView::Mapped(w) => (w.ffn_rows(&b.rows, x, hidden, true, act), w.size_bytes()),
            HostView::Owned(buf) => (
                buf.ffn_rows(&b.rows, x, hidden, true, act),
                buf.size_bytes(),
            ),
        };
        self.shared.host_rate.record(bytes, t0.elapsed());
        frame.add_host(b, &y)
    }

    /// Decode-sized batches on the host: each expert runs whole on one thread, experts side by
    /// side on the current rayon pool (one fork-join per layer instead of three per expert), and
    /// their outputs are added in ascending expert order, so the sum is the sequential one bit
    /// for bit.
    fn compute_on_host_parallel<D2: DeviceTier>(
        &self,
        layer: usize,
        batches: &[ExpertBatch],
        frame: &mut dyn Frame<D2>,
        hidden: usize,
    ) -> Result<()> {
        use rayon::prelude::*;
        let act = self.config.activations;
        let x = frame.x_host()?;
        let t0 = Instant::now();
        let ys: Vec<Result<(Vec<f32>, usize)>> = batches
            .par_iter()
            .with_max_len(1)
            .map(|b| {
                Ok(match self.host_view(layer, b.expert, true)? {
                    HostView::Mapped(w) => {
                        (w.ffn_rows(&b.rows, x, hidden, false, act), w.size_bytes())
                    }
                    HostView::Owned(buf) => (
                        buf.ffn_rows(&b.rows, x, hidden, false, act),
                        buf.size_bytes(),
                    ),
                })
            })
            .collect();
        let mut bytes = 0;
        let mut outputs = Vec::with_capacity(batches.len());
        for y in ys {
            let (y, n) = y?;
            bytes += n;
            outputs.push(y);
        }
        self.shared.host_rate.record(bytes, t0.elapsed());
        for (b, y) in batches.iter().zip(&outputs) {
            frame.add_host(b, y)?;
        }
        Ok(())
    }

    /// Starts pool loads (as prefetches: lower priority than demand reads) for the first
    /// [`HOST_READ_AHEAD`] of `next` that the RAM pool does not hold; nothing without a pool.
    fn read_ahead(&self, layer: usize, next: &[ExpertBatch]) {
        let Some(pool) = &self.shared.host_pool else {
            return;
        };
        for b in next.iter().take(HOST_READ_AHEAD) {
            if !pool.contains(self.shared.key(layer, b.expert)) {
                let _ = self.host_slot(layer, b.expert, true);
            }
        }
    }

    /// The layout every expert of the model shares (None when it has no experts).
    pub fn layout(&self) -> Option<&ExpertLayout> {
        self.layout.as_ref()
    }

    /// The configuration this store runs with.
    pub fn config(&self) -> &TieredStoreConfig {
        &self.config
    }
}

/// Experts read ahead of the one being computed on the host: enough reads in flight to keep
/// the loader threads busy, few enough (against a pool of tens of experts at the smallest
/// budgets) that a read-ahead never evicts an expert the layer is about to use.
const HOST_READ_AHEAD: usize = 2;

/// Whether a layer's batches are better computed expert by expert on separate threads (small
/// batches: each matmul is too short to split well) than one matmul at a time on all threads.
fn experts_side_by_side(batches: &[ExpertBatch]) -> bool {
    batches.len() > 1
        && rayon::current_num_threads() > 1
        && batches
            .iter()
            .all(|b| b.rows.len() <= moe_kernels::MATVEC_MAX_M)
}

impl<D: DeviceTier> TieredStore<D> {
    /// For every batch: `out[row] += weight * ffn_expert(x[row])` on host rows (see
    /// [`ExpertStore::compute`]).
    pub fn compute_host(
        &self,
        layer: usize,
        batches: &[ExpertBatch],
        x: &[f32],
        hidden: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let mut frame = HostFrame {
            x,
            out,
            hidden,
            act: self.config.activations,
        };
        self.compute_frame(layer, batches, &mut frame, hidden)
    }

    /// [`TieredStore::compute_host`] over any [`Frame`]: where the layer's input and output
    /// live is the frame's business.
    pub fn compute_frame(
        &self,
        layer: usize,
        batches: &[ExpertBatch],
        frame: &mut dyn Frame<D>,
        hidden: usize,
    ) -> Result<()> {
        let n = self.num_experts(layer);
        if let Some(b) = batches.iter().find(|b| b.expert >= n) {
            // The router picks among the layer's experts: an index past them is a broken
            // invariant of the model code, not something a request can cause.
            return Err(Error::Internal(format!(
                "expert {} of layer {layer} does not exist ({n} experts)",
                b.expert
            )));
        }
        let used: HashSet<usize> = batches.iter().map(|b| b.expert).collect();
        self.score_prediction(layer, &used);
        for b in batches {
            self.shared.popularity[layer][b.expert].fetch_add(b.rows.len() as u64, Relaxed);
        }
        let Some(dev) = &self.device else {
            if experts_side_by_side(batches) {
                return self.compute_on_host_parallel(layer, batches, frame, hidden);
            }
            for (i, b) in batches.iter().enumerate() {
                // Read ahead: the next experts' reads run on the loader threads while this one
                // computes (a prefill chunk under a RAM budget reads most of a layer).
                self.read_ahead(layer, &batches[i + 1..]);
                self.compute_on_host(layer, b, frame, hidden, true)?;
            }
            return Ok(());
        };
        // Look every expert up first and start all missing copies at once, so later experts'
        // copies overlap earlier experts' compute. Experts are then computed in ascending order
        // (the reference's summation order).
        let c = self.counters(layer);
        let slots: Vec<Option<Arc<Slot<Resident<D>>>>> = batches
            .iter()
            .map(|b| match dev.pools[layer].lookup(b.expert) {
                Some(Found { slot, prefetch_hit }) => {
                    LayerCounters::add(&c.hits, 1);
                    if prefetch_hit {
                        LayerCounters::add(&c.prefetch_hits, 1);
                    }
                    Some(slot)
                }
                None => {
                    LayerCounters::add(&c.misses, 1);
                    if self.worth_copying(layer, b.expert) {
                        self.device_load(layer, b.expert, false)
                    } else {
                        None
                    }
                }
            })
            .collect();
        // A device slot (resident, or a copy started for it) computes there; none means
        // compute where the expert lies.
        for (b, slot) in batches.iter().zip(slots) {
            match slot {
                Some(slot) => {
                    let t0 = Instant::now();
                    let resident = slot.wait().map_err(load_failed(layer, b.expert))?;
                    LayerCounters::add(&c.stall_ns, t0.elapsed().as_nanos() as u64);
                    let ticket = frame.ffn(&dev.tier, &resident.slot, b)?;
                    resident.record_use(ticket);
                }
                None => {
                    LayerCounters::add(&c.computed_in_place, 1);
                    self.compute_on_host(layer, b, frame, hidden, false)?;
                }
            }
        }
        Ok(())
    }
}

impl<D: DeviceTier> ExpertSource for TieredStore<D> {
    fn prefetch(&self, layer: usize, experts: &[usize]) {
        if !self.config.prefetch || layer >= self.shared.experts.len() {
            return;
        }
        let n = self.num_experts(layer);
        let set: HashSet<usize> = experts.iter().copied().filter(|&e| e < n).collect();
        LayerCounters::add(&self.counters(layer).prefetch_issued, set.len() as u64);
        let mut sorted: Vec<usize> = set.iter().copied().collect();
        sorted.sort_unstable();
        for &e in &sorted {
            if let Some(dev) = &self.device {
                if !dev.pools[layer].contains(e) {
                    let _ = self.device_load(layer, e, true);
                }
            } else if let Some(pool) = &self.shared.host_pool {
                if !pool.contains(self.shared.key(layer, e)) {
                    let _ = self.host_slot(layer, e, true);
                }
            }
        }
        self.predicted.lock()[layer] = Some(set);
    }

    fn num_experts(&self, layer: usize) -> usize {
        self.shared.experts.get(layer).map_or(0, Vec::len)
    }

    fn wants_prefetch(&self) -> bool {
        self.config.prefetch && (self.device.is_some() || self.shared.host_pool.is_some())
    }

    fn prefetch_depth(&self) -> usize {
        self.config.prefetch_depth
    }

    fn popularity(&self) -> Vec<Vec<u64>> {
        self.shared
            .popularity
            .iter()
            .map(|l| l.iter().map(|c| c.load(Relaxed)).collect())
            .collect()
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            copy_bytes_per_s: self.shared.copy_rate.get(),
            host_compute_bytes_per_s: self.shared.host_rate.get(),
            ..StoreStats::from_layers(
                self.shared
                    .counters
                    .iter()
                    .enumerate()
                    .filter(|(l, _)| !self.shared.experts[*l].is_empty())
                    .map(|(l, c)| c.snapshot(l))
                    .collect(),
            )
        }
    }
}

/// A store whose device tier computes on host rows (`sim`, test tiers) computes where its experts
/// lie (RAM pool, mapped files, its device tier's slots), all on host rows: another backend's
/// activations come to the host for it and the output goes back (`to_host` / `act_from_host`,
/// a borrow and a move on the CPU).
impl<D: DeviceTier + HostRows, B: Backend> ExpertStore<B> for TieredStore<D> {
    fn compute(
        &self,
        b: &B,
        layer: usize,
        batches: &[ExpertBatch],
        x: &B::Act,
        hidden: usize,
    ) -> Result<B::Act> {
        let x = b.to_host(x);
        let mut out = vec![0f32; x.len()];
        self.compute_host(layer, batches, &x, hidden, &mut out)?;
        Ok(b.act_from_host(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{Dtype, Storage, TensorRef};

    const HIDDEN: usize = 4;
    const INTER: usize = 2;

    /// An f32 tensor of `shape` holding `value` everywhere, in owned storage.
    fn tensor(name: &str, shape: [usize; 2], value: f32) -> TensorRef {
        tensor_of(name, &shape, &vec![value; shape[0] * shape[1]])
    }

    /// An f32 tensor of `shape` holding `data`, in owned storage.
    fn tensor_of(name: &str, shape: &[usize], data: &[f32]) -> TensorRef {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        for (w, c) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            *w = u64::from_le_bytes(b);
        }
        let storage = Arc::new(Storage::Words {
            words,
            len: bytes.len(),
        });
        let path = Arc::new(std::path::PathBuf::from("/models/t/experts.safetensors"));
        TensorRef::in_storage(
            name.into(),
            path,
            Dtype::F32,
            shape.to_vec(),
            storage,
            0,
            bytes.len(),
        )
    }

    fn experts(layers: usize, per_layer: usize) -> Vec<Vec<ExpertWeights>> {
        (0..layers)
            .map(|l| {
                (0..per_layer)
                    .map(|e| {
                        ExpertWeights::new(
                            ExpertLayout::swiglu(HIDDEN, INTER),
                            vec![
                                tensor(&format!("l{l}.e{e}.gate"), [INTER, HIDDEN], 0.5),
                                tensor(&format!("l{l}.e{e}.up"), [INTER, HIDDEN], 0.5),
                                tensor(&format!("l{l}.e{e}.down"), [HIDDEN, INTER], 0.5),
                            ],
                        )
                    })
                    .collect()
            })
            .collect()
    }

    /// Every tier computes an expert of another layout (fused interleaved gate_up, biases, the
    /// clamped activation) exactly as the host does from its weights.
    #[test]
    fn every_tier_computes_a_fused_expert_with_biases_as_the_host_does() {
        use crate::backend::Glu;
        use crate::store::GateUp;
        let layout = ExpertLayout {
            hidden: HIDDEN,
            inter: INTER,
            gate_up: GateUp::FusedInterleaved,
            bias: true,
            glu: Glu::ClampedSwiGlu {
                limit: 1.5,
                alpha: 1.702,
            },
        };
        let ramp = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|k| ((k * 7 + seed * 3) % 11) as f32 / 4.0 - 1.2)
                .collect()
        };
        let experts = || -> Vec<Vec<ExpertWeights>> {
            (0..2)
                .map(|l| {
                    (0..4)
                        .map(|e| {
                            let p = format!("l{l}.e{e}");
                            let seed = l * 4 + e;
                            ExpertWeights::new(
                                layout,
                                vec![
                                    tensor_of(
                                        &format!("{p}.gate_up"),
                                        &[2 * INTER, HIDDEN],
                                        &ramp(2 * INTER * HIDDEN, seed),
                                    ),
                                    tensor_of(
                                        &format!("{p}.down"),
                                        &[HIDDEN, INTER],
                                        &ramp(HIDDEN * INTER, seed + 1),
                                    ),
                                    tensor_of(
                                        &format!("{p}.gate_up_bias"),
                                        &[2 * INTER],
                                        &ramp(2 * INTER, seed + 2),
                                    ),
                                    tensor_of(
                                        &format!("{p}.down_bias"),
                                        &[HIDDEN],
                                        &ramp(HIDDEN, seed + 3),
                                    ),
                                ],
                            )
                        })
                        .collect()
                })
                .collect()
        };
        let x = vec![1.0f32; HIDDEN];
        let reference = experts();
        for (name, config) in tiers() {
            let s = TieredStore::new(experts(), HIDDEN, INTER, config).unwrap();
            assert_eq!(s.layout(), Some(&layout), "{name}");
            // Twice: the second pass is served by the tier the first brought the expert into.
            for _ in 0..2 {
                for (l, list) in reference.iter().enumerate() {
                    for (e, w) in list.iter().enumerate() {
                        let want = w.ffn_rows(&[0], &x, HIDDEN, true, Default::default());
                        let got = run(&s, l, e).unwrap_or_else(|err| panic!("{name}: {err}"));
                        assert_eq!(
                            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "{name}: expert {e} of layer {l}"
                        );
                    }
                }
            }
        }
    }

    /// A checksum check that fails for one expert, counting how often it runs.
    struct FailOne {
        layer: usize,
        expert: usize,
        runs: AtomicU64,
    }

    impl ExpertCheck for FailOne {
        fn check(
            &self,
            layer: usize,
            expert: usize,
            _parts: &[&[u8]],
        ) -> Result<Option<ExpertWeights>> {
            self.runs.fetch_add(1, Relaxed);
            if (layer, expert) == (self.layer, self.expert) {
                return Err(Error::Cache {
                    path: "/state/cache/model.moeq".into(),
                    reason: format!("checksum mismatch in expert {expert} of layer {layer}"),
                });
            }
            Ok(None)
        }
    }

    fn store(config: TieredStoreConfig) -> (TieredStore, Arc<FailOne>) {
        let check = Arc::new(FailOne {
            layer: 1,
            expert: 2,
            runs: AtomicU64::new(0),
        });
        let dyn_check: Arc<dyn ExpertCheck> = check.clone();
        let s =
            TieredStore::with_check(experts(2, 4), HIDDEN, INTER, config, Some(dyn_check)).unwrap();
        (s, check)
    }

    fn run<D: DeviceTier>(s: &TieredStore<D>, layer: usize, expert: usize) -> Result<Vec<f32>> {
        let x = vec![1.0f32; HIDDEN];
        let mut out = vec![0f32; HIDDEN];
        let b = ExpertBatch {
            expert,
            rows: vec![0],
            weights: vec![1.0],
        };
        s.compute_host(layer, &[b], &x, HIDDEN, &mut out)?;
        Ok(out)
    }

    /// The failure of expert 2 of layer 1 as the caller sees it: a load error naming the expert
    /// and carrying the checksum failure, never a request error.
    fn assert_load_failure(e: Error) -> Arc<Error> {
        assert!(!e.is_request_error(), "{e}");
        let text = e.to_string();
        let Error::ExpertLoad {
            layer,
            expert,
            source,
        } = e
        else {
            panic!("not an expert load failure: {text}");
        };
        assert_eq!((layer, expert), (1, 2));
        assert!(matches!(*source, Error::Cache { .. }), "{source:?}");
        assert!(
            text.starts_with("expert 2 of layer 1 could not be loaded: ")
                && text.contains("/state/cache/model.moeq")
                && text.contains("checksum mismatch"),
            "{text}"
        );
        source
    }

    fn tiers() -> Vec<(&'static str, TieredStoreConfig)> {
        let pool = TieredStoreConfig {
            host: HostTierConfig::Pool { experts: 3 },
            ..TieredStoreConfig::default()
        };
        let device = TieredStoreConfig {
            host: HostTierConfig::Pool { experts: 3 },
            device: Some(DeviceTierConfig {
                slots_per_layer: 2,
                link_bytes_per_s: 1e12,
                copy_latency: Duration::ZERO,
                // Slow enough that every miss is copied rather than computed in place.
                host_compute_bytes_per_s: 1.0,
            }),
            ..TieredStoreConfig::default()
        };
        let device_from_files = TieredStoreConfig {
            host: HostTierConfig::Mapped,
            ..device.clone()
        };
        vec![
            ("mapped", TieredStoreConfig::default()),
            ("ram pool", pool),
            ("device slots over a ram pool", device),
            ("device slots over the files", device_from_files),
        ]
    }

    #[test]
    fn an_expert_that_fails_to_load_is_a_load_error_with_its_cause_on_every_tier() {
        for (name, config) in tiers() {
            let (s, check) = store(config);
            // The healthy experts compute (0.5 * 4 summed, SiLU-gated, then down-projected).
            let ok = run(&s, 1, 1).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(ok.iter().all(|v| *v > 0.0), "{name}: {ok:?}");
            let first = assert_load_failure(run(&s, 1, 2).unwrap_err());
            // No tier keeps an entry for the failed expert.
            if let Some(dev) = &s.device {
                assert!(
                    !dev.pools[1].contains(2),
                    "{name}: a failed device slot stayed"
                );
            }
            if let Some(p) = &s.shared.host_pool {
                assert!(
                    !p.contains(s.shared.key(1, 2)),
                    "{name}: a failed RAM entry stayed"
                );
            }
            // Asked again (the failed entry was dropped, so this is a new load): the same
            // cause, from the check that ran once.
            let again = assert_load_failure(run(&s, 1, 2).unwrap_err());
            assert!(Arc::ptr_eq(&first, &again), "{name}");
            // The failure does not poison the store: other experts still compute.
            run(&s, 0, 2).unwrap_or_else(|e| panic!("{name}: {e}"));
            run(&s, 1, 3).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(check.runs.load(Relaxed) >= 4, "{name}");
        }
    }

    /// Experts computed one after another from a RAM pool read the next ones ahead: every
    /// expert after the first is found in the pool as a prefetch hit, and the sums equal the
    /// mapped store's.
    #[test]
    fn sequential_host_experts_read_the_next_ones_ahead() {
        let rows = moe_kernels::MATVEC_MAX_M + 1; // too many rows for the side-by-side path
        let x: Vec<f32> = (0..rows * HIDDEN).map(|i| (i % 7) as f32 * 0.1).collect();
        let batches: Vec<ExpertBatch> = (0..4)
            .map(|expert| ExpertBatch {
                expert,
                rows: (0..rows).collect(),
                weights: vec![0.5; rows],
            })
            .collect();
        let pool = TieredStoreConfig {
            host: HostTierConfig::Pool { experts: 8 },
            ..TieredStoreConfig::default()
        };
        let mut want = vec![0f32; rows * HIDDEN];
        let mapped =
            TieredStore::new(experts(1, 4), HIDDEN, INTER, TieredStoreConfig::default()).unwrap();
        mapped
            .compute_host(0, &batches, &x, HIDDEN, &mut want)
            .unwrap();
        let s = TieredStore::new(experts(1, 4), HIDDEN, INTER, pool).unwrap();
        let mut got = vec![0f32; rows * HIDDEN];
        s.compute_host(0, &batches, &x, HIDDEN, &mut got).unwrap();
        assert_eq!(got, want);
        let st = s.stats();
        assert_eq!(st.misses, 1, "{st:?}");
        assert_eq!(st.prefetch_hits, 3, "{st:?}");
    }

    #[test]
    fn prefetching_a_failing_expert_fails_only_the_computation_that_uses_it() {
        for (name, mut config) in tiers().into_iter().skip(1) {
            config.prefetch = true;
            let (s, _) = store(config);
            s.prefetch(1, &[2, 3]);
            run(&s, 1, 3).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_load_failure(run(&s, 1, 2).unwrap_err());
        }
    }

    #[test]
    fn an_expert_index_past_the_layer_is_internal_not_a_request_error() {
        let (s, _) = store(TieredStoreConfig::default());
        let e = run(&s, 0, 9).unwrap_err();
        assert!(matches!(e, Error::Internal(_)), "{e:?}");
        assert!(e.to_string().contains("expert 9 of layer 0"), "{e}");
    }

    /// The policy code against a fake device tier: no model, no modelled sleeps; the fake counts
    /// copies, can hold them at a gate, fail them, or leave its computations pending.
    mod fake_tier {
        use super::*;
        use parking_lot::Condvar;
        use std::sync::atomic::AtomicBool;

        /// What the test controls and observes; shared between the test and the tier it hands
        /// to the store.
        #[derive(Default)]
        struct FakeState {
            /// Experts in the order their copies began.
            copies: Mutex<Vec<usize>>,
            /// While true, copies wait at the gate.
            gate_closed: Mutex<bool>,
            gate: Condvar,
            /// The expert whose copies fail.
            fail: Option<usize>,
            /// Computations report a ticket that stays pending until `release`.
            pending_ffn: AtomicBool,
            pending: Mutex<Vec<Arc<AtomicBool>>>,
            /// What `estimated_copy_s` answers.
            copy_s: f64,
        }

        impl FakeState {
            fn open_gate(&self) {
                *self.gate_closed.lock() = false;
                self.gate.notify_all();
            }

            fn release(&self) {
                for t in self.pending.lock().drain(..) {
                    t.store(true, Relaxed);
                }
            }

            fn copies(&self) -> Vec<usize> {
                self.copies.lock().clone()
            }
        }

        struct Fake(Arc<FakeState>);

        /// The expert a buffer holds: its gate is filled with `expert_value(e)`.
        fn expert_of(buf: &ExpertBuf) -> usize {
            let v = f32::from_le_bytes(buf.part_bytes(0)[..4].try_into().unwrap());
            (v * 10.0).round() as usize - 1
        }

        fn expert_value(e: usize) -> f32 {
            (e + 1) as f32 / 10.0
        }

        impl crate::store::device::HostRows for Fake {}

        impl DeviceTier for Fake {
            type Slot = ExpertBuf;
            type Ticket = Arc<AtomicBool>;

            fn alloc(&self, _bytes: usize) -> Result<ExpertBuf> {
                Ok(ExpertBuf::empty())
            }

            fn copy_in(
                &self,
                src: Arc<ExpertBuf>,
                dst: &mut ExpertBuf,
                _started: Instant,
            ) -> Result<Arc<AtomicBool>> {
                let e = expert_of(&src);
                self.0.copies.lock().push(e);
                let mut closed = self.0.gate_closed.lock();
                while *closed {
                    self.0.gate.wait(&mut closed);
                }
                if self.0.fail == Some(e) {
                    return Err(Error::io(
                        "/dev/fake-device",
                        std::io::Error::other("copy engine fault"),
                    ));
                }
                *dst = (*src).clone();
                Ok(Arc::new(AtomicBool::new(true)))
            }

            fn wait(&self, ticket: &Arc<AtomicBool>) -> Result<()> {
                while !ticket.load(Relaxed) {
                    std::thread::yield_now();
                }
                Ok(())
            }

            fn is_done(&self, ticket: &Arc<AtomicBool>) -> bool {
                ticket.load(Relaxed)
            }

            fn ffn(
                &self,
                slot: &ExpertBuf,
                batch: &ExpertBatch,
                x: &[f32],
                hidden: usize,
                act: crate::backend::Activations,
                out: &mut [f32],
            ) -> Result<Arc<AtomicBool>> {
                slot.forward_rows(batch, x, hidden, act, out);
                let pending = self.0.pending_ffn.load(Relaxed);
                let t = Arc::new(AtomicBool::new(!pending));
                if pending {
                    self.0.pending.lock().push(t.clone());
                }
                Ok(t)
            }

            fn estimated_copy_s(&self, _bytes: usize) -> f64 {
                self.0.copy_s
            }
        }

        /// One layer of `n` experts, expert e's gate and up filled with `expert_value(e)`.
        fn distinct_experts(n: usize) -> Vec<Vec<ExpertWeights>> {
            vec![(0..n)
                .map(|e| {
                    ExpertWeights::new(
                        ExpertLayout::swiglu(HIDDEN, INTER),
                        vec![
                            tensor(&format!("e{e}.gate"), [INTER, HIDDEN], expert_value(e)),
                            tensor(&format!("e{e}.up"), [INTER, HIDDEN], expert_value(e)),
                            tensor(&format!("e{e}.down"), [HIDDEN, INTER], 0.5),
                        ],
                    )
                })
                .collect()]
        }

        /// A store of one 6-expert layer over the files, with `slots` device slots on `state`.
        fn fake_store(
            state: &Arc<FakeState>,
            slots: usize,
            host_compute_bytes_per_s: f64,
        ) -> TieredStore<Fake> {
            let config = TieredStoreConfig {
                device: Some(DeviceTierConfig {
                    slots_per_layer: slots,
                    // Unused by the fake (it answers `estimated_copy_s` itself).
                    link_bytes_per_s: 1.0,
                    copy_latency: Duration::ZERO,
                    host_compute_bytes_per_s,
                }),
                prefetch: true,
                loader_threads: 1,
                ..TieredStoreConfig::default()
            };
            let tier = Fake(state.clone());
            TieredStore::with_tier(distinct_experts(6), HIDDEN, INTER, config, None, Some(tier))
                .unwrap()
        }

        /// Expert e computed on the host straight from its weights: what every tier must give.
        fn reference(e: usize) -> Vec<f32> {
            let s = TieredStore::new(
                distinct_experts(6),
                HIDDEN,
                INTER,
                TieredStoreConfig::default(),
            )
            .unwrap();
            run(&s, 0, e).unwrap()
        }

        fn stats(s: &TieredStore<Fake>) -> LayerStats {
            s.stats().per_layer[0].clone()
        }

        use crate::store::LayerStats;

        #[test]
        fn hits_and_misses_are_counted_and_the_tier_computes_what_the_host_does() {
            let state = Arc::new(FakeState::default());
            let s = fake_store(&state, 4, 1.0);
            assert_eq!(run(&s, 0, 0).unwrap(), reference(0));
            assert_eq!(run(&s, 0, 0).unwrap(), reference(0));
            assert_eq!(run(&s, 0, 1).unwrap(), reference(1));
            s.prefetch(0, &[2]);
            assert_eq!(run(&s, 0, 2).unwrap(), reference(2));
            let st = stats(&s);
            assert_eq!((st.hits, st.misses), (2, 2), "{st:?}");
            assert_eq!(st.prefetch_hits, 1, "{st:?}");
            assert_eq!(st.computed_in_place, 0, "{st:?}");
            assert_eq!(
                state.copies(),
                vec![0, 1, 2],
                "one copy per expert brought in"
            );
            assert!(st.bytes_to_device > 0, "{st:?}");
        }

        #[test]
        fn demand_loads_go_before_queued_prefetches() {
            let state = Arc::new(FakeState::default());
            *state.gate_closed.lock() = true;
            let s = Arc::new(fake_store(&state, 6, 1.0));
            // One loader thread: the copy of 0 holds it at the gate while 1 and 2 queue.
            s.prefetch(0, &[0, 1, 2]);
            while state.copies() != vec![0] {
                std::thread::yield_now();
            }
            let demand = {
                let s = s.clone();
                std::thread::spawn(move || run(&*s, 0, 3))
            };
            // The demand copy is queued right after its slot is reserved.
            while !s.device.as_ref().unwrap().pools[0].contains(3) {
                std::thread::yield_now();
            }
            std::thread::sleep(Duration::from_millis(50));
            state.open_gate();
            assert_eq!(demand.join().unwrap().unwrap(), reference(3));
            for e in [1, 2] {
                assert_eq!(run(&*s, 0, e).unwrap(), reference(e));
            }
            assert_eq!(state.copies(), vec![0, 3, 1, 2]);
        }

        #[test]
        fn a_slot_whose_last_use_is_pending_is_never_evicted() {
            let state = Arc::new(FakeState::default());
            state.pending_ffn.store(true, Relaxed);
            let s = fake_store(&state, 1, 1.0);
            assert_eq!(run(&s, 0, 0).unwrap(), reference(0));
            // Expert 0's computation has not completed: its slot may not be overwritten, so
            // expert 1 is computed where it lies instead of being copied over it.
            assert_eq!(run(&s, 0, 1).unwrap(), reference(1));
            assert_eq!(state.copies(), vec![0]);
            assert_eq!(stats(&s).computed_in_place, 1);
            // Nor does a prefetch copy over it.
            s.prefetch(0, &[2]);
            assert_eq!(state.copies(), vec![0]);
            let pools = &s.device.as_ref().unwrap().pools[0];
            assert!(pools.contains(0) && !pools.contains(2));
            // Once it completes, the slot is reused (a prefetch: the copy-or-compute choice
            // now rests on measured speeds, which this test does not control).
            state.release();
            s.prefetch(0, &[1]);
            assert_eq!(run(&s, 0, 1).unwrap(), reference(1));
            assert_eq!(state.copies(), vec![0, 1]);
            assert!(pools.contains(1) && !pools.contains(0));
            assert_eq!(stats(&s).prefetch_hits, 1);
        }

        #[test]
        fn a_miss_is_copied_or_computed_where_it_lies_by_the_estimated_speeds() {
            // Copying takes far longer than computing on the host: compute in place.
            let slow_link = Arc::new(FakeState {
                copy_s: 1e6,
                ..FakeState::default()
            });
            let s = fake_store(&slow_link, 4, 1e12);
            assert_eq!(run(&s, 0, 0).unwrap(), reference(0));
            assert!(slow_link.copies().is_empty());
            let st = stats(&s);
            assert_eq!((st.misses, st.computed_in_place), (1, 1), "{st:?}");
            // Copying is quicker than the host: copy.
            let fast_link = Arc::new(FakeState::default());
            let s = fake_store(&fast_link, 4, 1.0);
            assert_eq!(run(&s, 0, 0).unwrap(), reference(0));
            assert_eq!(fast_link.copies(), vec![0]);
            let st = stats(&s);
            assert_eq!((st.misses, st.computed_in_place), (1, 0), "{st:?}");
        }

        #[test]
        fn a_failed_copy_is_a_load_error_and_leaves_no_slot() {
            let state = Arc::new(FakeState {
                fail: Some(2),
                ..FakeState::default()
            });
            let s = fake_store(&state, 4, 1.0);
            for _ in 0..2 {
                let e = run(&s, 0, 2).unwrap_err();
                assert!(!e.is_request_error(), "{e}");
                let Error::ExpertLoad {
                    layer,
                    expert,
                    source,
                } = &e
                else {
                    panic!("not an expert load failure: {e}");
                };
                assert_eq!((*layer, *expert), (0, 2));
                assert!(e.to_string().contains("copy engine fault"), "{e}");
                assert!(matches!(**source, Error::Io { .. }), "{source:?}");
                assert!(!s.device.as_ref().unwrap().pools[0].contains(2));
            }
            // Each use tried again; the other experts are unaffected.
            assert_eq!(state.copies(), vec![2, 2]);
            assert_eq!(run(&s, 0, 1).unwrap(), reference(1));
        }
    }
}
