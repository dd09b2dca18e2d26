//! A bounded pool of expert payloads (device slots of one layer, or the RAM tier) with eviction.
//!
//! The pool is mechanism only and generic over what it holds (`P`): owned host buffers
//! ([`ExpertBuf`], the RAM tier) or a device tier's slots (see [`super::device`]). It knows keys,
//! readiness, use counts and the eviction policy (LRU / LFU / pinned-LRU); it never moves bytes.
//!
//! Entries are filled asynchronously: [`SlotPool::reserve`] inserts a `Loading` slot that a loader
//! thread fills, and computing threads wait on it. Eviction picks, among entries that are ready,
//! not pinned and that the caller says may go ([`SlotPool::reserve_where`]: a device slot whose
//! last use is still pending may not), the one the policy ranks lowest; a payload being computed
//! on stays alive through its `Arc` even if its entry is evicted meanwhile.
//!
//! Invariants: at most `capacity` entries exist; an entry still loading is never evicted, nor one
//! the caller's predicate holds back; when no entry can be evicted, `reserve` says so and the
//! caller computes the expert where it lies; a failed load keeps its cause (the runtime's error,
//! shared) for every waiter, so a disk or checksum failure reaches the caller as itself.
//! Victim choice scans the entries (O(capacity), at most a few hundred per layer): cheap next to
//! the megabytes each miss copies, and it serves every policy with one structure.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use super::ExpertBuf;
use crate::error::Error;

/// Which cached expert gives up its slot when a new one needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvictionPolicy {
    /// Least recently used (`"lru"`).
    #[default]
    Lru,
    /// Least frequently used (`"lfu"`).
    Lfu,
    /// The most used experts stay pinned; LRU among the rest (`"pinned-lru"`).
    PinnedLru,
}

/// What a slot holds.
enum SlotState<P> {
    Loading,
    Ready(Arc<P>),
    Failed(Arc<Error>),
}

/// One pool entry, shared between the loader filling it and the computations waiting on it.
pub struct Slot<P = ExpertBuf> {
    state: Mutex<SlotState<P>>,
    ready: Condvar,
}

impl<P> Slot<P> {
    fn loading() -> Arc<Slot<P>> {
        Arc::new(Slot {
            state: Mutex::new(SlotState::Loading),
            ready: Condvar::new(),
        })
    }

    /// Publishes the load result (the buffer, or why it could not be loaded) and wakes waiters.
    pub fn fill(&self, result: Result<P, Arc<Error>>) {
        let mut st = self.state.lock();
        *st = match result {
            Ok(b) => SlotState::Ready(Arc::new(b)),
            Err(e) => SlotState::Failed(e),
        };
        self.ready.notify_all();
    }

    /// Blocks until the slot is filled; a failed load gives every waiter the same cause.
    pub fn wait(&self) -> Result<Arc<P>, Arc<Error>> {
        let mut st = self.state.lock();
        loop {
            match &*st {
                SlotState::Ready(b) => return Ok(b.clone()),
                SlotState::Failed(e) => return Err(e.clone()),
                SlotState::Loading => self.ready.wait(&mut st),
            }
        }
    }

    /// May this entry go? Never while loading; a failed one always; a ready one if
    /// `may_evict` accepts its payload.
    fn evictable(&self, may_evict: &impl Fn(&Arc<P>) -> bool) -> bool {
        match &*self.state.lock() {
            SlotState::Loading => false,
            SlotState::Failed(_) => true,
            SlotState::Ready(p) => may_evict(p),
        }
    }
}

struct Entry<P> {
    slot: Arc<Slot<P>>,
    last_use: u64,
    uses: u64,
    /// Brought in by prefetch and not used since.
    prefetched_unused: bool,
}

/// Result of a lookup.
pub struct Found<P = ExpertBuf> {
    pub slot: Arc<Slot<P>>,
    /// This use is the first since a prefetch brought the entry in.
    pub prefetch_hit: bool,
}

/// A bounded set of expert payloads keyed by expert id.
pub struct SlotPool<P = ExpertBuf> {
    capacity: usize,
    policy: EvictionPolicy,
    inner: Mutex<Inner<P>>,
}

struct Inner<P> {
    entries: HashMap<usize, Entry<P>>,
    pinned: std::collections::HashSet<usize>,
    tick: u64,
}

/// What `reserve` did.
pub enum Reserved<P = ExpertBuf> {
    /// A new loading slot: the caller must arrange for it to be filled.
    New(Arc<Slot<P>>),
    /// The key was already present (possibly still loading).
    Present(Arc<Slot<P>>),
    /// Full of entries that cannot be evicted now.
    Full,
}

impl<P> SlotPool<P> {
    pub fn new(capacity: usize, policy: EvictionPolicy) -> SlotPool<P> {
        SlotPool {
            capacity,
            policy,
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                pinned: Default::default(),
                tick: 0,
            }),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks keys as never evicted under [`EvictionPolicy::PinnedLru`].
    pub fn pin(&self, keys: impl IntoIterator<Item = usize>) {
        self.inner.lock().pinned.extend(keys);
    }

    /// Finds `key` and records a use.
    pub fn lookup(&self, key: usize) -> Option<Found<P>> {
        let mut inner = self.inner.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let e = inner.entries.get_mut(&key)?;
        e.last_use = tick;
        e.uses += 1;
        let prefetch_hit = std::mem::take(&mut e.prefetched_unused);
        Some(Found {
            slot: e.slot.clone(),
            prefetch_hit,
        })
    }

    /// Is `key` present (no use recorded)?
    pub fn contains(&self, key: usize) -> bool {
        self.inner.lock().entries.contains_key(&key)
    }

    /// Inserts a loading slot for `key`, evicting if full. Returns the evicted entry's
    /// "prefetched but never used" flag through `wasted`.
    pub fn reserve(&self, key: usize, by_prefetch: bool, wasted: &mut bool) -> Reserved<P> {
        self.reserve_where(key, by_prefetch, wasted, |_| true)
    }

    /// [`SlotPool::reserve`], evicting only ready entries whose payload `may_evict` accepts (a
    /// device slot whose last use has not completed is held back).
    pub fn reserve_where(
        &self,
        key: usize,
        by_prefetch: bool,
        wasted: &mut bool,
        may_evict: impl Fn(&Arc<P>) -> bool,
    ) -> Reserved<P> {
        let mut inner = self.inner.lock();
        if let Some(e) = inner.entries.get(&key) {
            return Reserved::Present(e.slot.clone());
        }
        if self.capacity == 0 {
            return Reserved::Full;
        }
        if inner.entries.len() >= self.capacity {
            let pinned = &inner.pinned;
            let victim = inner
                .entries
                .iter()
                .filter(|(k, e)| {
                    let pinned = self.policy == EvictionPolicy::PinnedLru && pinned.contains(k);
                    !pinned && e.slot.evictable(&may_evict)
                })
                .min_by_key(|(_, e)| match self.policy {
                    EvictionPolicy::Lru | EvictionPolicy::PinnedLru => (e.last_use, 0),
                    EvictionPolicy::Lfu => (e.uses, e.last_use),
                })
                .map(|(k, _)| *k);
            match victim {
                Some(v) => {
                    let e = inner.entries.remove(&v).expect("victim exists");
                    *wasted = e.prefetched_unused;
                }
                None => return Reserved::Full,
            }
        }
        inner.tick += 1;
        let tick = inner.tick;
        let slot = Slot::loading();
        inner.entries.insert(
            key,
            Entry {
                slot: slot.clone(),
                last_use: tick,
                uses: u64::from(!by_prefetch),
                prefetched_unused: by_prefetch,
            },
        );
        Reserved::New(slot)
    }

    /// Drops `key` (a failed load).
    pub fn remove(&self, key: usize) {
        self.inner.lock().entries.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf() -> ExpertBuf {
        ExpertBuf::empty()
    }

    fn fill(p: &SlotPool, k: usize) {
        let mut w = false;
        match p.reserve(k, false, &mut w) {
            Reserved::New(s) => s.fill(Ok(buf())),
            _ => panic!("expected a new slot for {k}"),
        }
    }

    #[test]
    fn lru_evicts_least_recent() {
        let p = SlotPool::new(2, EvictionPolicy::Lru);
        fill(&p, 1);
        fill(&p, 2);
        assert!(p.lookup(1).is_some());
        fill(&p, 3); // evicts 2
        assert!(p.contains(1) && p.contains(3) && !p.contains(2));
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn lfu_evicts_least_used() {
        let p = SlotPool::new(2, EvictionPolicy::Lfu);
        fill(&p, 1);
        fill(&p, 2);
        for _ in 0..3 {
            p.lookup(1);
        }
        p.lookup(2);
        fill(&p, 3); // 2 has fewer uses
        assert!(p.contains(1) && !p.contains(2));
    }

    #[test]
    fn pinned_entries_stay_and_loading_is_never_evicted() {
        let p = SlotPool::new(2, EvictionPolicy::PinnedLru);
        p.pin([1]);
        fill(&p, 1);
        fill(&p, 2);
        fill(&p, 3); // 1 pinned: evicts 2
        assert!(p.contains(1) && p.contains(3));
        let mut w = false;
        // 3 ready, 1 pinned; a loading entry 4 replaces 3, then nothing is evictable.
        assert!(matches!(p.reserve(4, true, &mut w), Reserved::New(_)));
        assert!(matches!(p.reserve(5, false, &mut w), Reserved::Full));
        assert!(matches!(p.reserve(4, false, &mut w), Reserved::Present(_)));
    }

    #[test]
    fn prefetch_flags_hits_and_waste() {
        let p = SlotPool::new(1, EvictionPolicy::Lru);
        let mut w = false;
        if let Reserved::New(s) = p.reserve(7, true, &mut w) {
            s.fill(Ok(buf()));
        }
        let f = p.lookup(7).unwrap();
        assert!(f.prefetch_hit);
        assert!(!p.lookup(7).unwrap().prefetch_hit);
        if let Reserved::New(s) = p.reserve(8, true, &mut w) {
            s.fill(Ok(buf()));
        }
        assert!(!w, "7 was used before eviction");
        let _ = p.reserve(9, false, &mut w);
        assert!(w, "8 was prefetched and evicted unused");
    }

    #[test]
    fn entries_the_caller_holds_back_are_not_evicted() {
        // A pool over another payload: the pool is generic over what a slot holds.
        let p: SlotPool<u32> = SlotPool::new(2, EvictionPolicy::Lru);
        let mut w = false;
        for (k, v) in [(1, 10), (2, 20)] {
            match p.reserve(k, false, &mut w) {
                Reserved::New(s) => s.fill(Ok(v)),
                _ => panic!("expected a new slot for {k}"),
            }
        }
        // 1 is least recent, but its payload is held back: 2 goes instead.
        assert!(matches!(
            p.reserve_where(3, false, &mut w, |v| **v != 10),
            Reserved::New(_)
        ));
        assert!(p.contains(1) && !p.contains(2) && p.contains(3));
        // 1 held back and 3 still loading: nothing may go.
        assert!(matches!(
            p.reserve_where(4, false, &mut w, |v| **v != 10),
            Reserved::Full
        ));
        // Unconstrained, the least recent ready entry goes as before.
        assert!(matches!(p.reserve(4, false, &mut w), Reserved::New(_)));
        assert!(!p.contains(1) && p.contains(3) && p.contains(4));
    }

    #[test]
    fn waiters_see_failures() {
        let s = Slot::<ExpertBuf>::loading();
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait());
        let cause = Arc::new(Error::io(
            "/models/x/model-00001.safetensors",
            std::io::Error::other("disk gone"),
        ));
        s.fill(Err(cause.clone()));
        let seen = t.join().unwrap().err().unwrap();
        // The waiter gets the cause itself (its kind and its text), not a copy of the message.
        assert!(Arc::ptr_eq(&seen, &cause));
        assert!(matches!(*seen, Error::Io { .. }), "{seen:?}");
        assert!(matches!(s.wait(), Err(e) if Arc::ptr_eq(&e, &cause)));
    }
}
