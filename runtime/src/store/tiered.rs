//! The tiered expert store: device slots (per layer) -> RAM -> mmapped files.
//!
//! - **Host tier**: either every expert mapped from its file (the model fits the RAM budget; pages
//!   come in as the compute touches them), or a bounded RAM pool filled by positioned reads, so
//!   experts beyond the budget never enter this process's resident set through the mapping.
//! - **Device tier** (optional): per-layer slot pools. On `sim` the slots are RAM buffers and each
//!   copy takes the modelled link time; the CUDA backend plugs in the same way.
//! - **Loads** run on loader threads; demand loads go before prefetches, so a computation never
//!   waits behind a copy meant for a later layer.
//! - **Prefetch**: the model predicts a later layer's experts and calls [`ExpertStore::prefetch`];
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
//! buffers computations hold at that moment.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::pool::{Found, Reserved, Slot, SlotPool};
use super::stats::LayerCounters;
use super::{
    EvictionPolicy, ExpertBatch, ExpertBuf, ExpertCheck, ExpertParts, ExpertStore, ExpertWeights,
    StoreStats,
};
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
    pub activations: crate::runconfig::Activations,
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
            activations: crate::runconfig::Activations::F32,
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
}

/// A running estimate of a speed (exponential moving average of samples), lock-free.
#[derive(Default)]
struct Rate(AtomicU64);

impl Rate {
    /// Weight of a new sample: recent behaviour matters, one outlier does not dominate.
    const ALPHA: f64 = 0.2;

    fn record(&self, bytes: usize, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
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
    fn checked(&self, layer: usize, expert: usize, parts: [&[u8]; 3]) -> &Checked {
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
        let parts = [
            original.gate.bytes(),
            original.up.bytes(),
            original.down.bytes(),
        ];
        Self::resolve(self.checked(layer, expert, parts), original)
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
        let read = |w: &ExpertWeights| w.read_owned().map_err(Arc::new);
        let buf = match (&self.check, self.checked[layer][expert].get()) {
            (None, _) => read(original)?,
            (Some(_), Some(outcome)) => read(Self::resolve(outcome, original)?)?,
            (Some(_), None) => {
                let buf = read(original)?;
                let parts = [buf.part_bytes(0), buf.part_bytes(1), buf.part_bytes(2)];
                let w = Self::resolve(self.checked(layer, expert, parts), original)?;
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

/// The store behind every model: see the module docs.
pub struct TieredStore {
    shared: Arc<Shared>,
    /// The device tier's settings and per-layer slot pools (shared with the copy jobs, which
    /// drop a slot whose copy failed).
    device: Option<(DeviceTierConfig, Arc<Vec<SlotPool>>)>,
    loader: Loader,
    config: TieredStoreConfig,
    /// Per layer: the experts last predicted for it, scored when it routes.
    predicted: Mutex<Vec<Option<HashSet<usize>>>>,
}

impl TieredStore {
    /// `experts[l]` are layer l's experts (empty for dense layers), each checked against
    /// `[inter, hidden]`.
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
        for e in experts.iter().flatten() {
            e.check(hidden, inter)?;
        }
        let layers = experts.len();
        let experts_per_layer: Vec<usize> = experts.iter().map(Vec::len).collect();
        let num_experts_max = experts.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let host_pool = match config.host {
            HostTierConfig::Mapped => None,
            HostTierConfig::Pool { experts } => Some(SlotPool::new(experts, config.policy)),
        };
        let device = config.device.clone().map(|d| {
            let pools: Vec<SlotPool> = (0..layers)
                .map(|_| SlotPool::new(d.slots_per_layer, config.policy))
                .collect();
            (d, Arc::new(pools))
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
        });
        if config.policy == EvictionPolicy::PinnedLru {
            if let Some(p) = &shared.host_pool {
                p.pin(config.hot.iter().map(|&(l, e)| shared.key(l, e)));
            }
            if let Some((_, pools)) = &device {
                for &(l, e) in &config.hot {
                    if let Some(p) = pools.get(l) {
                        p.pin([e]);
                    }
                }
            }
        }
        let store = TieredStore {
            loader: Loader::new(config.loader_threads),
            predicted: Mutex::new(vec![None; layers]),
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
    fn device_load(&self, layer: usize, expert: usize, prefetch: bool) -> Option<Arc<Slot>> {
        let (dev, pools) = self.device.as_ref()?;
        let mut wasted = false;
        let slot = match pools[layer].reserve(expert, prefetch, &mut wasted) {
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
        let link = dev.link_bytes_per_s;
        let latency = dev.copy_latency;
        let target = slot.clone();
        let pools = pools.clone();
        let job: Job = Box::new(move || {
            let t0 = Instant::now();
            let src = match host_slot {
                Some(h) => h.wait().map(|b| (*b).clone()),
                None => shared.read_from_file(layer, expert, false),
            };
            if let Ok(b) = &src {
                let bytes = b.size_bytes();
                LayerCounters::add(&shared.counters[layer].bytes_to_device, bytes as u64);
                // The modelled transfer: latency plus bytes over the link.
                let modelled = latency + Duration::from_secs_f64(bytes as f64 / link);
                if let Some(rest) = modelled.checked_sub(t0.elapsed()) {
                    std::thread::sleep(rest);
                }
                shared.copy_rate.record(bytes, t0.elapsed());
            } else {
                // Like the host pool: a failed copy leaves no entry, so a later use tries again
                // (the waiters of this one still get the cause). The entry is still this slot:
                // a loading entry is never evicted.
                pools[layer].remove(expert);
            }
            target.fill(src);
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

    /// Computes one expert on the device tier. `slot` is its device slot when it was resident
    /// or a copy was started for it; None means compute where it lies.
    fn compute_on_device(
        &self,
        layer: usize,
        b: &ExpertBatch,
        slot: Option<Arc<Slot>>,
        x: &[f32],
        hidden: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let c = self.counters(layer);
        match slot {
            Some(slot) => {
                let t0 = Instant::now();
                let buf = slot.wait().map_err(load_failed(layer, b.expert))?;
                LayerCounters::add(&c.stall_ns, t0.elapsed().as_nanos() as u64);
                buf.forward_rows(b, x, hidden, self.config.activations, out);
            }
            None => {
                LayerCounters::add(&c.computed_in_place, 1);
                self.compute_on_host(layer, b, x, hidden, out, false)?;
            }
        }
        Ok(())
    }

    /// Copy or compute in place? Copy unless computing where the expert lies is faster than
    /// copying it, using the speeds measured so far (the configured ones until then).
    fn worth_copying(&self, layer: usize, expert: usize) -> bool {
        let Some((dev, _)) = &self.device else {
            return false;
        };
        let bytes = self.shared.experts[layer][expert].size_bytes() as f64;
        let copy_s = match self.shared.copy_rate.get() {
            Some(rate) => bytes / rate,
            None => dev.copy_latency.as_secs_f64() + bytes / dev.link_bytes_per_s,
        };
        let host_rate = self
            .shared
            .host_rate
            .get()
            .unwrap_or(dev.host_compute_bytes_per_s);
        bytes / host_rate >= copy_s
    }

    /// Starts loading the hottest experts (hottest first) into the fastest tier, up to its
    /// capacity, so a restart begins with the working set of the last run.
    fn warm_up(&self) {
        let hot = self.config.hot.clone();
        if let Some((_, pools)) = &self.device {
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

    fn compute_on_host(
        &self,
        layer: usize,
        b: &ExpertBatch,
        x: &[f32],
        hidden: usize,
        out: &mut [f32],
        count: bool,
    ) -> Result<()> {
        let view = self.host_view(layer, b.expert, count)?;
        let t0 = Instant::now();
        let bytes = match view {
            HostView::Mapped(w) => {
                w.forward_rows(b, x, hidden, self.config.activations, out);
                w.size_bytes()
            }
            HostView::Owned(buf) => {
                buf.forward_rows(b, x, hidden, self.config.activations, out);
                buf.size_bytes()
            }
        };
        self.shared.host_rate.record(bytes, t0.elapsed());
        Ok(())
    }

    /// Decode-sized batches on the host: each expert runs whole on one thread, experts side by
    /// side on the current rayon pool (one fork-join per layer instead of three per expert), and
    /// their outputs are added in ascending expert order, so the sum is the sequential one bit
    /// for bit.
    fn compute_on_host_parallel(
        &self,
        layer: usize,
        batches: &[ExpertBatch],
        x: &[f32],
        hidden: usize,
        out: &mut [f32],
    ) -> Result<()> {
        use rayon::prelude::*;
        let act = self.config.activations;
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
        for (b, y) in batches.iter().zip(ys) {
            let (y, n) = y?;
            bytes += n;
            super::add_weighted_rows(&b.rows, &b.weights, &y, hidden, out);
        }
        self.shared.host_rate.record(bytes, t0.elapsed());
        Ok(())
    }

    /// The configuration this store runs with.
    pub fn config(&self) -> &TieredStoreConfig {
        &self.config
    }
}

/// Whether a layer's batches are better computed expert by expert on separate threads (small
/// batches: each matmul is too short to split well) than one matmul at a time on all threads.
fn experts_side_by_side(batches: &[ExpertBatch]) -> bool {
    batches.len() > 1
        && rayon::current_num_threads() > 1
        && batches
            .iter()
            .all(|b| b.rows.len() <= moe_kernels::MATVEC_MAX_M)
}

impl ExpertStore for TieredStore {
    fn compute(
        &self,
        layer: usize,
        batches: &[ExpertBatch],
        x: &[f32],
        hidden: usize,
        out: &mut [f32],
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
        let Some((_, pools)) = &self.device else {
            if experts_side_by_side(batches) {
                return self.compute_on_host_parallel(layer, batches, x, hidden, out);
            }
            for b in batches {
                self.compute_on_host(layer, b, x, hidden, out, true)?;
            }
            return Ok(());
        };
        // Look every expert up first and start all missing copies at once, so later experts'
        // copies overlap earlier experts' compute. Experts are then computed in ascending order
        // (the reference's summation order).
        let c = self.counters(layer);
        let slots: Vec<Option<Arc<Slot>>> = batches
            .iter()
            .map(|b| match pools[layer].lookup(b.expert) {
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
        for (b, slot) in batches.iter().zip(slots) {
            self.compute_on_device(layer, b, slot, x, hidden, out)?;
        }
        Ok(())
    }

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
            if let Some((_, pools)) = &self.device {
                if !pools[layer].contains(e) {
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
        StoreStats::from_layers(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{Dtype, Storage, TensorRef};

    const HIDDEN: usize = 4;
    const INTER: usize = 2;

    /// An f32 tensor of `shape` holding `value` everywhere, in owned storage.
    fn tensor(name: &str, shape: [usize; 2], value: f32) -> TensorRef {
        let n = shape[0] * shape[1];
        let bytes: Vec<u8> = (0..n).flat_map(|_| value.to_le_bytes()).collect();
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
                    .map(|e| ExpertWeights {
                        gate: tensor(&format!("l{l}.e{e}.gate"), [INTER, HIDDEN], 0.5),
                        up: tensor(&format!("l{l}.e{e}.up"), [INTER, HIDDEN], 0.5),
                        down: tensor(&format!("l{l}.e{e}.down"), [HIDDEN, INTER], 0.5),
                    })
                    .collect()
            })
            .collect()
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
            _parts: [&[u8]; 3],
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

    fn run(s: &TieredStore, layer: usize, expert: usize) -> Result<Vec<f32>> {
        let x = vec![1.0f32; HIDDEN];
        let mut out = vec![0f32; HIDDEN];
        let b = ExpertBatch {
            expert,
            rows: vec![0],
            weights: vec![1.0],
        };
        s.compute(layer, &[b], &x, HIDDEN, &mut out)?;
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
            if let Some((_, pools)) = &s.device {
                assert!(!pools[1].contains(2), "{name}: a failed device slot stayed");
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
}
