//! A bounded pool of expert buffers (device slots of one layer, or the RAM tier) with eviction.
//!
//! Entries are filled asynchronously: [`SlotPool::reserve`] inserts a `Loading` slot that a loader
//! thread fills, and computing threads wait on it. Eviction picks, among entries that are ready and
//! not pinned, the one the policy ranks lowest; a buffer being computed on stays alive through its
//! `Arc` even if its entry is evicted meanwhile.
//!
//! Invariants: at most `capacity` entries exist; an entry still loading is never evicted; when no
//! entry can be evicted, `reserve` says so and the caller computes the expert where it lies; a
//! failed load keeps its cause (the runtime's error, shared) for every waiter, so a disk or
//! checksum failure reaches the caller as itself.
//! Victim choice scans the entries (O(capacity), at most a few hundred per layer): cheap next to
//! the megabytes each miss copies, and it serves every policy with one structure.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::ExpertBuf;
use crate::error::Error;

pub use crate::runconfig::EvictionPolicy;

/// What a slot holds.
enum SlotState {
    Loading,
    Ready(Arc<ExpertBuf>),
    Failed(Arc<Error>),
}

/// One pool entry, shared between the loader filling it and the computations waiting on it.
pub struct Slot {
    state: Mutex<SlotState>,
    ready: Condvar,
}

impl Slot {
    fn loading() -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(SlotState::Loading),
            ready: Condvar::new(),
        })
    }

    /// Publishes the load result (the buffer, or why it could not be loaded) and wakes waiters.
    pub fn fill(&self, result: Result<ExpertBuf, Arc<Error>>) {
        let mut st = self.state.lock();
        *st = match result {
            Ok(b) => SlotState::Ready(Arc::new(b)),
            Err(e) => SlotState::Failed(e),
        };
        self.ready.notify_all();
    }

    /// Blocks until the slot is filled; a failed load gives every waiter the same cause.
    pub fn wait(&self) -> Result<Arc<ExpertBuf>, Arc<Error>> {
        let mut st = self.state.lock();
        loop {
            match &*st {
                SlotState::Ready(b) => return Ok(b.clone()),
                SlotState::Failed(e) => return Err(e.clone()),
                SlotState::Loading => self.ready.wait(&mut st),
            }
        }
    }

    fn is_loading(&self) -> bool {
        matches!(*self.state.lock(), SlotState::Loading)
    }
}

struct Entry {
    slot: Arc<Slot>,
    last_use: u64,
    uses: u64,
    /// Brought in by prefetch and not used since.
    prefetched_unused: bool,
}

/// Result of a lookup.
pub struct Found {
    pub slot: Arc<Slot>,
    /// This use is the first since a prefetch brought the entry in.
    pub prefetch_hit: bool,
}

/// A bounded set of expert buffers keyed by expert id.
pub struct SlotPool {
    capacity: usize,
    policy: EvictionPolicy,
    inner: Mutex<Inner>,
}

struct Inner {
    entries: HashMap<usize, Entry>,
    pinned: std::collections::HashSet<usize>,
    tick: u64,
}

/// What `reserve` did.
pub enum Reserved {
    /// A new loading slot: the caller must arrange for it to be filled.
    New(Arc<Slot>),
    /// The key was already present (possibly still loading).
    Present(Arc<Slot>),
    /// Full of entries that cannot be evicted now.
    Full,
}

impl SlotPool {
    pub fn new(capacity: usize, policy: EvictionPolicy) -> SlotPool {
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
    pub fn lookup(&self, key: usize) -> Option<Found> {
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
    pub fn reserve(&self, key: usize, by_prefetch: bool, wasted: &mut bool) -> Reserved {
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
                    !pinned && !e.slot.is_loading()
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
    fn waiters_see_failures() {
        let s = Slot::loading();
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
