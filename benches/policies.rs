//! Expert-cache eviction policies compared offline on one routing trace.
//!
//! Replays a routing trace through one device slot pool per MoE layer, for each policy and each
//! pool capacity, and reports hit rates and misses per token:
//!
//! - `lru`, `lfu`, `pinned-lru` run on the runtime's own pool, [`SlotPool`] (the store keeps one
//!   per layer on the device tier). `pinned-lru` pins, in each layer, the `capacity / 2` experts
//!   most routed to in the first half of the trace, so its second-half columns are the fair
//!   comparison (it was fitted on the first half).
//! - `belady` is the offline optimum (on a miss with a full pool, evict the expert whose next use
//!   is farthest away), modelled in this file: an upper bound on any policy's hit rate.
//!
//! Replay: for each record (one layer, one token), for each routed expert in order: look it up;
//! on a miss, reserve a slot (evicting by the policy) and fill it. `--group-passes` replays as the
//! store sees a forward pass instead: consecutive records of one layer form one batch with one
//! lookup per distinct expert, in ascending expert order (pass boundaries are inferred from layer
//! changes, so this needs at least two MoE layers). `--defer-fill` fills a batch's new slots only
//! after the whole batch is reserved, as the store's loader does: a slot still loading cannot be
//! evicted, and a miss that finds every slot loading or pinned is computed where the expert lies
//! and not cached (column `not cached`). `belady` replays the same lookups but ignores
//! `--defer-fill`: it bounds every policy that caches each miss, not one that may skip caching.
//!
//! The trace is either a file written by `moe-serve run ... --trace FILE` (JSON lines
//! `{"layer": L, "token": T, "experts": [e1, e2, ...]}` in execution order) or a synthetic one:
//! tokens draw `top-k` distinct experts per layer from a Zipf law of exponent `S` over a random
//! per-layer popularity order (deterministic in `--seed`). Real MoE routing is skewed; the
//! random-weight models `moe-serve synth` writes route close to uniformly, which the printed
//! skew line shows.
//!
//! ```text
//! cargo bench --bench policies -- --trace FILE [--experts N] [--capacities 0.1,0.25,0.5]
//! cargo bench --bench policies -- --synthetic zipf:1.1 --layers 8 --experts 64 --top-k 8 \
//!     --tokens 2000 --seed 0 [--capacities 0.1,0.25,0.5]
//! ```
//!
//! Further flags: `--group-passes`, `--defer-fill`. With no trace flag the synthetic defaults
//! above run. Capacities are fractions of the experts per layer (rounded, at least 1 slot).
//!
//! The pool's `Reserved` result type and its `Slot` are not exported by `moe_runtime::store`, and
//! `ExpertBuf` has no public constructor, so this bench gets a new slot through a second
//! `lookup` (which shifts every entry's use count and recency by the same step: the victim order
//! is unchanged) and builds an empty `ExpertBuf` from a zero-row view of a bundled demo tensor.
//! An in-file model of `pool.rs`'s victim rules replays the same trace as a check, and the
//! output says whether both agree on every count.

mod common;
use common::cpu_model;
use std::collections::{BTreeSet, HashMap, HashSet};

use moe_runtime::store::{EvictionPolicy, ExpertBuf, Reserved, SlotPool};

/// Flags that take a value.
const VALUE_FLAGS: [&str; 8] = [
    "--trace",
    "--synthetic",
    "--layers",
    "--experts",
    "--top-k",
    "--tokens",
    "--seed",
    "--capacities",
];
/// Flags without a value (`--bench` is what cargo appends).
const SWITCHES: [&str; 3] = ["--group-passes", "--defer-fill", "--bench"];

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(2)
}

struct Args {
    values: HashMap<String, String>,
    switches: HashSet<String>,
}

impl Args {
    fn parse(raw: &[String]) -> Args {
        let mut values = HashMap::new();
        let mut switches = HashSet::new();
        let mut it = raw.iter();
        while let Some(a) = it.next() {
            if VALUE_FLAGS.contains(&a.as_str()) {
                let v = it
                    .next()
                    .unwrap_or_else(|| fail(format!("{a} needs a value")));
                values.insert(a.clone(), v.clone());
            } else if SWITCHES.contains(&a.as_str()) {
                switches.insert(a.clone());
            } else {
                fail(format!(
                    "unknown argument `{a}` (flags: {}, {})",
                    VALUE_FLAGS.join(", "),
                    SWITCHES[..2].join(", ")
                ));
            }
        }
        Args { values, switches }
    }

    fn get<T: std::str::FromStr>(&self, name: &str) -> Option<T> {
        self.values.get(name).map(|v| {
            v.parse()
                .unwrap_or_else(|_| fail(format!("{name}: cannot parse `{v}`")))
        })
    }

    fn has(&self, name: &str) -> bool {
        self.switches.contains(name)
    }
}

/// Routing of one token in one layer.
struct Record {
    layer: usize,
    token: usize,
    experts: Vec<usize>,
}

struct Trace {
    /// Where the trace came from, for the header.
    source: String,
    /// A caveat about the source, for the header.
    note: &'static str,
    records: Vec<Record>,
    /// Distinct layer ids, ascending; pool `i` serves `layers[i]`.
    layers: Vec<usize>,
    experts: usize,
    top_k: usize,
    /// Distinct token positions, ascending.
    tokens: Vec<usize>,
}

impl Trace {
    fn new(
        source: String,
        note: &'static str,
        records: Vec<Record>,
        experts: Option<usize>,
    ) -> Result<Trace, String> {
        if records.is_empty() {
            return Err(format!("{source}: no records"));
        }
        let max_id = records
            .iter()
            .flat_map(|r| r.experts.iter().copied())
            .max()
            .ok_or_else(|| format!("{source}: no routed experts"))?;
        let experts = match experts {
            Some(n) if n <= max_id => {
                return Err(format!(
                    "--experts {n}: the trace routes to expert {max_id}"
                ))
            }
            Some(n) => n,
            None => max_id + 1,
        };
        let mut layers: Vec<usize> = records.iter().map(|r| r.layer).collect();
        layers.sort_unstable();
        layers.dedup();
        let mut tokens: Vec<usize> = records.iter().map(|r| r.token).collect();
        tokens.sort_unstable();
        tokens.dedup();
        let top_k = records.iter().map(|r| r.experts.len()).max().unwrap_or(0);
        Ok(Trace {
            source,
            note,
            records,
            layers,
            experts,
            top_k,
            tokens,
        })
    }

    /// First token position of the second half.
    fn split_token(&self) -> usize {
        self.tokens[self.tokens.len() / 2]
    }

    fn pool_of(&self, layer: usize) -> usize {
        self.layers.binary_search(&layer).expect("layer is listed")
    }

    /// Per pool and expert: routed tokens among the records selected by `keep`.
    fn popularity(&self, keep: impl Fn(&Record) -> bool) -> Vec<Vec<u64>> {
        let mut counts = vec![vec![0u64; self.experts]; self.layers.len()];
        for r in self.records.iter().filter(|r| keep(r)) {
            let p = self.pool_of(r.layer);
            for &e in &r.experts {
                counts[p][e] += 1;
            }
        }
        counts
    }

    /// Mean share of routed slots that go to the top 10% of each layer's experts, and the share
    /// uniform routing would give.
    fn skew(&self) -> (f64, f64) {
        let top = self.experts.div_ceil(10);
        let mut shares = Vec::new();
        for mut c in self.popularity(|_| true) {
            let total: u64 = c.iter().sum();
            if total == 0 {
                continue;
            }
            c.sort_unstable_by(|a, b| b.cmp(a));
            shares.push(c[..top].iter().sum::<u64>() as f64 / total as f64);
        }
        let mean = shares.iter().sum::<f64>() / shares.len().max(1) as f64;
        (mean, top as f64 / self.experts as f64)
    }
}

fn load_trace(path: &str, experts: Option<usize>) -> Result<Trace, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{path}:{}", i + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{}: {e}", at()))?;
        let field = |name: &str| {
            v.get(name)
                .and_then(serde_json::Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| format!("{}: `{name}` missing or not a count", at()))
        };
        let list = v
            .get("experts")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| format!("{}: `experts` missing or not a list", at()))?;
        let experts = list
            .iter()
            .map(|x| x.as_u64().map(|x| x as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("{}: `experts` holds a non-count", at()))?;
        records.push(Record {
            layer: field("layer")?,
            token: field("token")?,
            experts,
        });
    }
    Trace::new(
        path.to_string(),
        "a random-weight `moe-serve synth` model's router is random, not trained: close to \
         uniform over varied inputs, yet greedy decoding can loop on a few tokens (strong \
         locality); see the skew line, and compare with --synthetic zipf:S (real routing is skewed)",
        records,
        experts,
    )
}

/// SplitMix64: a small deterministic generator (no dependency needed).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize
    }
}

/// A decode-like trace: one token per forward pass, layers ascending within a pass. Each layer
/// ranks its experts by a random permutation; a token draws `top_k` distinct experts, rank `r`
/// (from 1) with weight `r^-s`.
fn synthetic(
    s: f64,
    layers: usize,
    experts: usize,
    top_k: usize,
    tokens: usize,
    seed: u64,
) -> Result<Trace, String> {
    if !(s.is_finite() && s >= 0.0) {
        return Err(format!("zipf exponent {s}: must be finite and at least 0"));
    }
    if layers == 0 || tokens == 0 || top_k == 0 || top_k > experts {
        return Err(format!(
            "need layers, tokens and top-k at least 1 and top-k <= experts \
             (layers {layers}, experts {experts}, top-k {top_k}, tokens {tokens})"
        ));
    }
    let mut rng = Rng(seed);
    let cdf: Vec<f64> = (1..=experts)
        .scan(0.0, |acc, r| {
            *acc += (r as f64).powf(-s);
            Some(*acc)
        })
        .collect();
    let total = cdf[experts - 1];
    let ranking: Vec<Vec<usize>> = (0..layers)
        .map(|_| {
            let mut p: Vec<usize> = (0..experts).collect();
            for i in (1..experts).rev() {
                p.swap(i, rng.below(i + 1));
            }
            p
        })
        .collect();
    let mut records = Vec::with_capacity(layers * tokens);
    for token in 0..tokens {
        for (layer, rank_to_expert) in ranking.iter().enumerate() {
            let mut chosen = Vec::with_capacity(top_k);
            while chosen.len() < top_k {
                let u = rng.unit() * total;
                let rank = cdf.partition_point(|&c| c <= u).min(experts - 1);
                let e = rank_to_expert[rank];
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            records.push(Record {
                layer,
                token,
                experts: chosen,
            });
        }
    }
    Trace::new(
        format!(
            "synthetic zipf s={s}, seed {seed} (per-layer random popularity order, tokens drawn \
             independently)"
        ),
        "tokens are independent draws: no temporal locality, which real routing has",
        records,
        Some(experts),
    )
}

/// What one pool sees at once: the experts one layer needs for one record or one pass.
struct Batch {
    pool: usize,
    second_half: bool,
    experts: Vec<usize>,
}

fn batches(trace: &Trace, group_passes: bool) -> Vec<Batch> {
    let split = trace.split_token();
    let mut out: Vec<Batch> = Vec::new();
    let mut last_layer = None;
    for r in &trace.records {
        let pool = trace.pool_of(r.layer);
        match out.last_mut() {
            Some(b) if group_passes && last_layer == Some(r.layer) => {
                b.experts.extend(&r.experts);
            }
            _ => out.push(Batch {
                pool,
                second_half: r.token >= split,
                experts: r.experts.clone(),
            }),
        }
        last_layer = Some(r.layer);
    }
    if group_passes {
        for b in &mut out {
            b.experts.sort_unstable();
            b.experts.dedup();
        }
    }
    out
}

/// Outcome of one batch.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
struct Outcome {
    hits: u64,
    misses: u64,
    /// Misses that got no slot (every slot loading or pinned).
    uncached: u64,
}

/// Totals over a replay.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
struct Counts {
    all: Outcome,
    second: Outcome,
}

/// One layer's expert cache.
trait Cache {
    fn batch(&mut self, experts: &[usize]) -> Outcome;
}

/// The runtime's pool.
struct RealPool {
    pool: SlotPool,
    buf: ExpertBuf,
    defer_fill: bool,
}

impl Cache for RealPool {
    fn batch(&mut self, experts: &[usize]) -> Outcome {
        let mut o = Outcome::default();
        let mut loading = Vec::new();
        for &e in experts {
            if self.pool.lookup(e).is_some() {
                o.hits += 1;
                continue;
            }
            o.misses += 1;
            let mut wasted = false;
            match self.pool.reserve(e, false, &mut wasted) {
                Reserved::New(slot) | Reserved::Present(slot) if self.defer_fill => {
                    loading.push(slot)
                }
                Reserved::New(slot) | Reserved::Present(slot) => slot.fill(Ok(self.buf.clone())),
                Reserved::Full => o.uncached += 1,
            }
        }
        for slot in loading {
            slot.fill(Ok(self.buf.clone()));
        }
        o
    }
}

/// An in-file model of `pool.rs`'s bookkeeping and victim rules, to check the replay through the
/// real pool.
struct MirrorPool {
    capacity: usize,
    policy: EvictionPolicy,
    /// expert -> (last use, uses, loading)
    entries: HashMap<usize, (u64, u64, bool)>,
    pinned: HashSet<usize>,
    tick: u64,
    defer_fill: bool,
}

impl Cache for MirrorPool {
    fn batch(&mut self, experts: &[usize]) -> Outcome {
        let mut o = Outcome::default();
        let mut loading = Vec::new();
        for &e in experts {
            self.tick += 1;
            if let Some(entry) = self.entries.get_mut(&e) {
                entry.0 = self.tick;
                entry.1 += 1;
                o.hits += 1;
                continue;
            }
            o.misses += 1;
            if self.entries.len() >= self.capacity {
                let victim = self
                    .entries
                    .iter()
                    .filter(|(k, &(_, _, loading))| {
                        let pinned =
                            self.policy == EvictionPolicy::PinnedLru && self.pinned.contains(k);
                        !pinned && !loading
                    })
                    .min_by_key(|(_, &(last_use, uses, _))| match self.policy {
                        EvictionPolicy::Lru | EvictionPolicy::PinnedLru => (last_use, 0),
                        EvictionPolicy::Lfu => (uses, last_use),
                    })
                    .map(|(k, _)| *k);
                match victim {
                    Some(v) => {
                        self.entries.remove(&v);
                    }
                    None => {
                        o.uncached += 1;
                        continue;
                    }
                }
            }
            self.tick += 1;
            self.entries.insert(e, (self.tick, 1, self.defer_fill));
            if self.defer_fill {
                loading.push(e);
            }
        }
        for e in loading {
            if let Some(entry) = self.entries.get_mut(&e) {
                entry.2 = false;
            }
        }
        o
    }
}

/// Belady's offline optimum for one layer: on a miss with a full pool, evict the resident expert
/// whose next use is farthest away (never used again counts as farthest).
struct Belady {
    capacity: usize,
    /// For the i-th access of this layer: the position of the next access to the same expert.
    next_use: Vec<usize>,
    pos: usize,
    resident: HashMap<usize, usize>,
    by_next_use: BTreeSet<(usize, usize)>,
}

impl Belady {
    fn new(capacity: usize, accesses: &[usize]) -> Belady {
        let mut next_use = vec![usize::MAX; accesses.len()];
        let mut seen: HashMap<usize, usize> = HashMap::new();
        for (i, &e) in accesses.iter().enumerate().rev() {
            if let Some(&j) = seen.get(&e) {
                next_use[i] = j;
            }
            seen.insert(e, i);
        }
        Belady {
            capacity,
            next_use,
            pos: 0,
            resident: HashMap::new(),
            by_next_use: BTreeSet::new(),
        }
    }
}

impl Cache for Belady {
    fn batch(&mut self, experts: &[usize]) -> Outcome {
        let mut o = Outcome::default();
        for &e in experts {
            let next = self.next_use[self.pos];
            self.pos += 1;
            if let Some(old) = self.resident.insert(e, next) {
                self.by_next_use.remove(&(old, e));
                o.hits += 1;
            } else {
                o.misses += 1;
                if self.resident.len() > self.capacity {
                    let (_, victim) = self.by_next_use.pop_last().expect("pool is full");
                    self.resident.remove(&victim);
                }
            }
            self.by_next_use.insert((next, e));
        }
        o
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    Lru,
    Lfu,
    PinnedLru,
    Belady,
}

const POLICIES: [Policy; 4] = [Policy::Lru, Policy::Lfu, Policy::PinnedLru, Policy::Belady];

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::Lru => "lru",
            Policy::Lfu => "lfu",
            Policy::PinnedLru => "pinned-lru",
            Policy::Belady => "belady",
        }
    }

    fn pool_policy(self) -> Option<EvictionPolicy> {
        match self {
            Policy::Lru => Some(EvictionPolicy::Lru),
            Policy::Lfu => Some(EvictionPolicy::Lfu),
            Policy::PinnedLru => Some(EvictionPolicy::PinnedLru),
            Policy::Belady => None,
        }
    }
}

fn replay(batches: &[Batch], caches: &mut [Box<dyn Cache>]) -> Counts {
    let mut c = Counts::default();
    for b in batches {
        let o = caches[b.pool].batch(&b.experts);
        for t in [Some(&mut c.all), b.second_half.then_some(&mut c.second)]
            .into_iter()
            .flatten()
        {
            t.hits += o.hits;
            t.misses += o.misses;
            t.uncached += o.uncached;
        }
    }
    c
}

/// An `ExpertBuf` of no bytes: the pool only needs something to fill a slot with.
fn empty_expert_buf() -> Result<ExpertBuf, String> {
    Ok(ExpertBuf::empty())
}

fn pct(num: u64, den: u64) -> String {
    if den == 0 {
        "-".into()
    } else {
        format!("{:.1}", 100.0 * num as f64 / den as f64)
    }
}

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes for test names.
    }
    let args = Args::parse(&raw);
    let trace = match (args.values.get("--trace"), args.values.get("--synthetic")) {
        (Some(_), Some(_)) => fail("give --trace or --synthetic, not both"),
        (Some(path), None) => load_trace(path, args.get("--experts")),
        (None, spec) => {
            let spec = spec.map_or("zipf:1.1", String::as_str);
            let s = spec
                .strip_prefix("zipf:")
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| fail(format!("--synthetic `{spec}`: expected zipf:S")));
            synthetic(
                s,
                args.get("--layers").unwrap_or(8),
                args.get("--experts").unwrap_or(64),
                args.get("--top-k").unwrap_or(8),
                args.get("--tokens").unwrap_or(2000),
                args.get("--seed").unwrap_or(0),
            )
        }
    }
    .unwrap_or_else(|e| fail(e));
    let capacities: Vec<f64> = args
        .values
        .get("--capacities")
        .map_or("0.1,0.25,0.5", String::as_str)
        .split(',')
        .map(|c| match c.trim().parse::<f64>() {
            Ok(f) if f > 0.0 && f <= 1.0 => f,
            _ => fail(format!("--capacities: `{c}` is not a fraction in (0, 1]")),
        })
        .collect();
    let group_passes = args.has("--group-passes");
    let defer_fill = args.has("--defer-fill");
    let buf = empty_expert_buf().unwrap_or_else(|e| fail(format!("empty expert buffer: {e}")));

    let batches = batches(&trace, group_passes);
    let layers = trace.layers.len();
    let mut accesses: Vec<Vec<usize>> = vec![Vec::new(); layers];
    for b in &batches {
        accesses[b.pool].extend(&b.experts);
    }
    let split = trace.split_token();
    let first_half_popularity = trace.popularity(|r| r.token < split);
    let tokens = trace.tokens.len() as f64;
    let second_tokens = (trace.tokens.len() - trace.tokens.len() / 2) as f64;
    let (skew, uniform) = trace.skew();

    println!("policies: expert-cache eviction policies replayed offline on one routing trace");
    println!("machine: {}", cpu_model());
    println!("trace: {}", trace.source);
    println!("  note: {}", trace.note);
    println!(
        "layers: {layers}, experts per layer: {}, top-k: {}, tokens: {} (second half: token >= \
         {split}, {} tokens), records: {}",
        trace.experts,
        trace.top_k,
        trace.tokens.len(),
        second_tokens,
        trace.records.len()
    );
    println!(
        "routing skew: the top 10% of each layer's experts take {:.1}% of routed slots \
         (uniform: {:.1}%)",
        100.0 * skew,
        100.0 * uniform
    );
    println!(
        "replay: {}; {}",
        if group_passes {
            "one lookup per distinct expert per layer per forward pass, ascending"
        } else {
            "one lookup per routed expert per record (layer, token), in trace order"
        },
        if defer_fill {
            "a batch's new slots are filled after the batch (loading slots are not evictable)"
        } else {
            "a miss reserves a slot (evicting) and fills it at once"
        }
    );
    println!(
        "pools: lru, lfu, pinned-lru on moe_runtime::store::SlotPool, one per layer; pinned-lru \
         pins each layer's capacity/2 most routed experts of the first half; belady = offline \
         optimum modelled here (upper bound)"
    );

    let mut mismatches = Vec::new();
    let mut bound_broken = Vec::new();
    let mut rows = Vec::new();
    for &f in &capacities {
        let capacity = ((f * trace.experts as f64).round() as usize).clamp(1, trace.experts);
        let mut lru_second_misses = None;
        let mut belady_misses = 0;
        let mut results = Vec::new();
        for policy in POLICIES {
            let pins = |p: usize| -> Vec<usize> {
                if policy != Policy::PinnedLru {
                    return Vec::new();
                }
                let mut order: Vec<usize> = (0..trace.experts).collect();
                order.sort_by_key(|&e| (std::cmp::Reverse(first_half_popularity[p][e]), e));
                order.truncate(capacity / 2);
                order
            };
            let counts = match policy.pool_policy() {
                Some(pool_policy) => {
                    let mut real: Vec<Box<dyn Cache>> = (0..layers)
                        .map(|p| {
                            let pool = SlotPool::new(capacity, pool_policy);
                            pool.pin(pins(p));
                            Box::new(RealPool {
                                pool,
                                buf: buf.clone(),
                                defer_fill,
                            }) as Box<dyn Cache>
                        })
                        .collect();
                    let mut mirror: Vec<Box<dyn Cache>> = (0..layers)
                        .map(|p| {
                            Box::new(MirrorPool {
                                capacity,
                                policy: pool_policy,
                                entries: HashMap::new(),
                                pinned: pins(p).into_iter().collect(),
                                tick: 0,
                                defer_fill,
                            }) as Box<dyn Cache>
                        })
                        .collect();
                    let counts = replay(&batches, &mut real);
                    if replay(&batches, &mut mirror) != counts {
                        mismatches.push(format!("{} at {capacity} slots", policy.name()));
                    }
                    counts
                }
                None => {
                    let mut opt: Vec<Box<dyn Cache>> = accesses
                        .iter()
                        .map(|a| Box::new(Belady::new(capacity, a)) as Box<dyn Cache>)
                        .collect();
                    replay(&batches, &mut opt)
                }
            };
            if policy == Policy::Lru {
                lru_second_misses = Some(counts.second.misses);
            }
            if policy == Policy::Belady {
                belady_misses = counts.all.misses;
            }
            results.push((policy, counts));
        }
        for (policy, c) in results {
            if c.all.misses < belady_misses {
                bound_broken.push(format!("{} at {capacity} slots", policy.name()));
            }
            let vs_lru = match lru_second_misses {
                Some(l) if l > 0 => format!(
                    "{:+.1}%",
                    100.0 * (c.second.misses as f64 - l as f64) / l as f64
                ),
                _ => "-".into(),
            };
            rows.push(vec![
                format!("{:.0}% ({capacity}/{})", 100.0 * f, trace.experts),
                policy.name().to_string(),
                pct(c.all.hits, c.all.hits + c.all.misses),
                format!("{:.2}", c.all.misses as f64 / tokens),
                pct(c.second.hits, c.second.hits + c.second.misses),
                format!("{:.2}", c.second.misses as f64 / second_tokens),
                vs_lru,
                c.all.uncached.to_string(),
            ]);
        }
    }

    let header = [
        "capacity",
        "policy",
        "hit %",
        "miss/token",
        "2nd-half hit %",
        "2nd-half miss/token",
        "2nd-half misses vs lru",
        "not cached",
    ];
    let shown = if defer_fill { 8 } else { 7 };
    let widths: Vec<usize> = (0..shown)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, &w))| {
                if i < 2 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    println!();
    line(header[..shown].to_vec());
    let mut last_capacity = String::new();
    for r in &rows {
        if r[0] != last_capacity && !last_capacity.is_empty() {
            println!();
        }
        last_capacity = r[0].clone();
        line(r[..shown].iter().map(String::as_str).collect());
    }
    println!();
    println!(
        "miss/token: misses summed over all layers per token. check: an in-file model of \
         pool.rs's victim rules {}",
        if mismatches.is_empty() {
            "reproduces SlotPool's counts exactly".to_string()
        } else {
            format!("DIFFERS from SlotPool for {}", mismatches.join(", "))
        }
    );
    if !bound_broken.is_empty() {
        println!(
            "note: fewer misses than belady for {}: belady is optimal among policies that cache \
             every miss, and with --defer-fill a miss may go uncached",
            bound_broken.join(", ")
        );
    }
}
