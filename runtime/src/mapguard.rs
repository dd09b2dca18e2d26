//! Files changed under their mappings: the SIGBUS guard, the file watcher, and the per-model
//! check that turns either into a clear error.
//!
//! Model shards and cache files are read through read-only mappings. When such a file is
//! truncated in place while mapped (a new model copied over the folder, `rsync --inplace`), the
//! next read of a page past its new end raises SIGBUS, whose default action ends the process
//! and every request in flight without a word. This module owns:
//! - a process-wide SIGBUS handler (installed once, chaining to the disposition it found) and a
//!   lock-free registry of our file mappings. A fault inside a registered mapping maps anonymous
//!   zero pages over the rest of it, so the faulting read resumes and reads zeros, and records
//!   which mapping faulted. Any other SIGBUS goes to the previous handler, or, when that was the
//!   default, ends the process as it would have without this module;
//! - a watcher thread that stats every mapped file every [`WATCH_INTERVAL`]: a file changed in
//!   place (same inode, new size or mtime) has bytes that may be mixed, and is recorded like a
//!   fault; a file replaced by a rename or removed keeps its old, consistent bytes mapped, and
//!   only gets one warning;
//! - [`FileWatch`], the files one model maps: checked (one atomic load when nothing happened)
//!   after every forward step, so a step that read zeros or changed bytes fails instead of
//!   producing tokens, and every later use fails with the same one-line error.
//!
//! Invariants: the signal handler only reads and writes atomics and calls `mmap`, `sigaction`
//! and `raise` (no allocation, lock or formatting); a registry entry is removed before its
//! mapping is unmapped; once a mapping's file is recorded as changed, every model watching that
//! mapping reports [`Error::FileChanged`] from then on, even after the mapping is dropped (a load
//! that converted the file's tensors), while a later, fresh mapping of the same path starts
//! clean; the error line is logged once per mapping.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, Once, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::fsutil::FileStat;

/// Mappings watched at once: a checkpoint has at most a few hundred shards, plus one cache
/// file; more than this (many models in one process) are mapped unguarded, with a warning.
pub const MAX_MAPPINGS: usize = 4096;

/// How often the watcher thread stats every mapped file: a stat costs microseconds, so a few
/// hundred files every two seconds is free, and a change is noticed within two seconds.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Least time between two polls made on behalf of a request ([`FileWatch::check_now`]), so a
/// burst of requests costs at most one round of stats per interval.
pub const ADMISSION_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// One registered mapping; all atomics, as the signal handler reads them.
struct Slot {
    /// Claimed (1) or free (0).
    taken: AtomicU32,
    /// First byte of the mapping; 0 while the slot is not published.
    start: AtomicUsize,
    /// One past its last byte.
    end: AtomicUsize,
    /// Faults the handler answered with zero pages.
    faults: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE_SLOT: Slot = Slot {
    taken: AtomicU32::new(0),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faults: AtomicU32::new(0),
};

static SLOTS: [Slot; MAX_MAPPINGS] = [FREE_SLOT; MAX_MAPPINGS];
/// Slots ever claimed: the handler scans `SLOTS[..USED]`.
static USED: AtomicUsize = AtomicUsize::new(0);
/// Bumped by every fault and every change found: a check that sees it unchanged is done.
static EVENTS: AtomicU64 = AtomicU64::new(0);
static PAGE_BYTES: AtomicUsize = AtomicUsize::new(4096);
/// The SIGBUS disposition found when the handler was installed.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALL: Once = Once::new();
static WATCHER: Once = Once::new();
/// When the last poll ran (ms since `epoch()`), for rate-limited polls.
static LAST_POLL_MS: AtomicU64 = AtomicU64::new(0);

/// What the watcher and the checks know about a registered file (never read by the handler).
struct Meta {
    path: PathBuf,
    /// Registrations are numbered in order, so a model's check covers only its own mappings.
    serial: u64,
    id: FileStat,
    change: Option<Change>,
    /// The error line was logged.
    reported: bool,
    /// The one warning about a file replaced or removed was logged.
    replaced_noted: bool,
}

/// Changed files whose mappings are gone, remembered for the models that read them (a load
/// that converted a file's tensors and dropped its mapping must still fail): the most recent.
const MAX_RETIRED: usize = 256;

struct Registry {
    /// Metadata of every claimed slot, by slot index.
    slots: Vec<Option<Meta>>,
    /// Mappings dropped after their file changed (oldest first).
    retired: VecDeque<Meta>,
}

static META: Mutex<Registry> = Mutex::new(Registry {
    slots: Vec::new(),
    retired: VecDeque::new(),
});
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

fn meta() -> MutexGuard<'static, Registry> {
    // A panic while holding it cannot leave an entry half-written: each is replaced whole.
    META.lock().unwrap_or_else(|e| e.into_inner())
}

impl Meta {
    /// The change recorded, or (after a fault the handler answered) what the file says now.
    fn settle(&mut self, faults: u32) -> Option<Change> {
        if self.change.is_none() && faults > 0 {
            // The handler cannot tell why a page could not be read; the file can.
            self.change = Some(match look(&self.path, &self.id) {
                Seen::Changed(c) => c,
                Seen::Same | Seen::Replaced => Change::Unreadable,
            });
        }
        self.change
    }
}

/// What happened to a mapped file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Shorter than when it was opened.
    Truncated,
    /// Same inode, new size or modification time: its bytes may be mixed.
    Modified,
    /// A read of its mapped pages failed, yet it looks unchanged (an I/O error).
    Unreadable,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Truncated => "truncated",
            Change::Modified => "modified in place",
            Change::Unreadable => "its pages could not be read",
        }
    }
}

/// What a stat of the path says now, against the file that was mapped.
enum Seen {
    Same,
    /// Another file (or none) has the name; the mapped one is intact.
    Replaced,
    Changed(Change),
}

fn look(path: &Path, was: &FileStat) -> Seen {
    let Ok(now) = FileStat::of(path) else {
        return Seen::Replaced;
    };
    if !now.same_inode(was) {
        Seen::Replaced
    } else if now.size_bytes < was.size_bytes {
        Seen::Changed(Change::Truncated)
    } else if now.size_bytes != was.size_bytes || now.mtime_ns != was.mtime_ns {
        Seen::Changed(Change::Modified)
    } else {
        Seen::Same
    }
}

/// The file-kind words of messages: cache files are GGUF, model files safetensors.
fn role(path: &Path) -> &'static str {
    if path.extension().is_some_and(|e| e == "gguf") {
        "quantized weight cache file"
    } else {
        "model file"
    }
}

fn changed_error(path: &Path, change: Change) -> Error {
    Error::FileChanged {
        path: path.to_path_buf(),
        role: role(path),
        change: change.as_str(),
    }
}

/// Keeps one mapping registered; dropping it removes the entry (before the mapping goes, as
/// [`crate::weights::Storage`] declares it first).
pub struct Registration {
    slot: Option<usize>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registration({:?})", self.slot)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(i) = self.slot else { return };
        let s = &SLOTS[i];
        s.start.store(0, Ordering::SeqCst);
        s.end.store(0, Ordering::SeqCst);
        let mut reg = meta();
        if let Some(mut m) = reg.slots[i].take() {
            if m.settle(s.faults.load(Ordering::SeqCst)).is_some() {
                if reg.retired.len() == MAX_RETIRED {
                    reg.retired.pop_front();
                }
                reg.retired.push_back(m);
            }
        }
        drop(reg);
        s.faults.store(0, Ordering::SeqCst);
        s.taken.store(0, Ordering::SeqCst);
    }
}

/// Registers `map`, a read-only mapping of `file` (opened from `path`), so a fault in it is
/// answered with zeros and recorded, and starts the watcher. Returns an inert registration
/// (the mapping stays unguarded, with a warning) when the registry is full or the handler
/// cannot be installed.
pub fn register(map: &[u8], file: &File, path: &Path) -> Registration {
    if map.is_empty() || !install() {
        return Registration { slot: None };
    }
    let id = match file.metadata() {
        Ok(m) => FileStat::of_metadata(&m),
        Err(_) => return Registration { slot: None },
    };
    let Some(i) = claim() else {
        static FULL: Once = Once::new();
        FULL.call_once(|| {
            tracing::warn!(
                "more than {MAX_MAPPINGS} files mapped: {} and later ones are not watched for \
                 changes on disk",
                path.display()
            );
        });
        return Registration { slot: None };
    };
    {
        let mut reg = meta();
        if reg.slots.len() <= i {
            reg.slots.resize_with(i + 1, || None);
        }
        reg.slots[i] = Some(Meta {
            path: path.to_path_buf(),
            serial: NEXT_SERIAL.fetch_add(1, Ordering::SeqCst),
            id,
            change: None,
            reported: false,
            replaced_noted: false,
        });
    }
    let s = &SLOTS[i];
    let start = map.as_ptr() as usize;
    s.faults.store(0, Ordering::SeqCst);
    s.end.store(start + map.len(), Ordering::SeqCst);
    // Published last: the handler ignores slots whose start is 0.
    s.start.store(start, Ordering::SeqCst);
    start_watcher();
    Registration { slot: Some(i) }
}

fn claim() -> Option<usize> {
    for (i, s) in SLOTS.iter().enumerate() {
        if s.taken
            .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            USED.fetch_max(i + 1, Ordering::SeqCst);
            return Some(i);
        }
    }
    None
}

/// Installs the SIGBUS handler once; false when it could not be.
fn install() -> bool {
    static OK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE_BYTES.store(page as usize, Ordering::SeqCst);
        }
        // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags, SIG_DFL);
        // sigaction with a null new action only reads the current one into `old`.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } != 0 {
            return;
        }
        // Set before ours is installed: the handler reads it.
        let _ = PREVIOUS.set(old);
        // SAFETY: as above; the handler has the `SA_SIGINFO` signature and is
        // async-signal-safe (see `on_sigbus`); `sigemptyset` initialises the mask in place.
        let ok = unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) == 0
        };
        OK.store(ok, Ordering::SeqCst);
    });
    OK.load(Ordering::SeqCst)
}

/// The slot whose mapping holds `addr`.
fn slot_of(addr: usize) -> Option<usize> {
    let used = USED.load(Ordering::SeqCst).min(MAX_MAPPINGS);
    (0..used).find(|&i| {
        let s = &SLOTS[i];
        let start = s.start.load(Ordering::SeqCst);
        start != 0 && addr >= start && addr < s.end.load(Ordering::SeqCst)
    })
}

/// The SIGBUS handler. Async-signal-safe: atomics, `mmap`, `sigaction`, `raise` only.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if !info.is_null() {
        // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t for this signal; for
        // SIGBUS, si_addr is the faulting address.
        let (addr, code) = unsafe { ((*info).si_addr() as usize, (*info).si_code) };
        // si_code > 0: raised by the kernel for a memory access (not sent by kill or raise).
        if code > 0 {
            if let Some(i) = slot_of(addr) {
                let s = &SLOTS[i];
                let page = PAGE_BYTES.load(Ordering::SeqCst);
                let from = addr & !(page - 1);
                let to = s.end.load(Ordering::SeqCst).next_multiple_of(page);
                // SAFETY: [from, to) lies inside a live read-only mapping registered by
                // `register` (its registration is dropped before the mapping is unmapped, and
                // the faulting read holds the mapping alive). Every page from the faulting one
                // to the end is past the file's new end, so nothing valid is replaced: they
                // become private zero pages, and the mapping's later munmap covers them.
                let r = unsafe {
                    libc::mmap(
                        from as *mut libc::c_void,
                        to - from,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                if r != libc::MAP_FAILED {
                    s.faults.fetch_add(1, Ordering::SeqCst);
                    EVENTS.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
    chain(sig, info, ctx);
}

/// Hands a SIGBUS that is not ours to the disposition found at install.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let previous = PREVIOUS.get().copied();
    match previous {
        Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO, so this is its
                // signature; it is called as the kernel would have called it.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler, installed without SA_SIGINFO.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // SAFETY: restoring the default disposition (a zeroed sigaction is SIG_DFL with an
            // empty mask). A fault then re-executes and ends the process as it would have
            // without this module; a signal sent by kill or raise is raised again.
            unsafe {
                let dfl: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
                let sent = info.is_null() || (*info).si_code <= 0;
                if sent {
                    libc::raise(sig);
                }
            }
        }
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn start_watcher() {
    WATCHER.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("moe-file-watch".into())
            .spawn(|| loop {
                std::thread::sleep(WATCH_INTERVAL);
                poll();
            });
        if let Err(e) = spawned {
            tracing::warn!(
                "cannot start the thread that watches model files for changes ({e}); they are \
                 checked only when requests arrive"
            );
        }
    });
}

/// Stats every mapped file now: a file changed in place is recorded (every model mapping it
/// fails from then on); a file replaced or removed gets one warning.
pub fn poll() {
    LAST_POLL_MS.store(epoch().elapsed().as_millis() as u64, Ordering::SeqCst);
    let mut reg = meta();
    for meta in reg.slots.iter_mut().flatten() {
        if meta.change.is_some() {
            continue;
        }
        match look(&meta.path, &meta.id) {
            Seen::Same => {}
            Seen::Replaced => {
                if !meta.replaced_noted {
                    meta.replaced_noted = true;
                    tracing::warn!(
                        "the {} {} was replaced or removed on disk; this process keeps serving \
                         the file it opened until it is restarted",
                        role(&meta.path),
                        meta.path.display()
                    );
                }
            }
            Seen::Changed(c) => {
                meta.change = Some(c);
                EVENTS.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// [`poll`], unless one ran less than [`ADMISSION_POLL_INTERVAL`] ago.
pub fn poll_rate_limited() {
    let now = epoch().elapsed().as_millis() as u64;
    let last = LAST_POLL_MS.load(Ordering::SeqCst);
    let due = last == 0 || now.saturating_sub(last) >= ADMISSION_POLL_INTERVAL.as_millis() as u64;
    if due
        && LAST_POLL_MS
            .compare_exchange(last, now.max(1), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    {
        poll();
    }
}

/// Faults answered with zero pages so far (all mappings).
pub fn faults_answered() -> u64 {
    let used = USED.load(Ordering::SeqCst).min(MAX_MAPPINGS);
    SLOTS[..used]
        .iter()
        .map(|s| u64::from(s.faults.load(Ordering::SeqCst)))
        .sum()
}

/// The error for a failed positioned read of `path`: [`Error::FileChanged`] (and the file
/// recorded as changed) when the file was changed in place since it was mapped, else the
/// plain I/O error.
pub fn read_failed(path: &Path, e: std::io::Error) -> Error {
    let mut reg = meta();
    let mut found = None;
    for meta in reg.slots.iter_mut().flatten().filter(|x| x.path == path) {
        let change = match meta.change {
            Some(c) => Some(c),
            None => match look(&meta.path, &meta.id) {
                Seen::Changed(c) => {
                    meta.change = Some(c);
                    EVENTS.fetch_add(1, Ordering::SeqCst);
                    Some(c)
                }
                Seen::Same | Seen::Replaced => None,
            },
        };
        found = found.or(change);
    }
    drop(reg);
    match found {
        Some(c) => changed_error(path, c),
        None => Error::io(path, e),
    }
}

/// The files one model maps, and whether any of them changed under it.
pub struct FileWatch {
    paths: Vec<PathBuf>,
    /// The first registration this watch covers: mappings of these paths made since (or
    /// alive when it was made), so an older, separate mapping of the same path does not count.
    since_serial: u64,
    /// `EVENTS` when last found clean.
    seen: AtomicU64,
    broken: OnceLock<(PathBuf, Change)>,
}

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWatch")
            .field("files", &self.paths.len())
            .field("broken", &self.broken.get())
            .finish()
    }
}

impl FileWatch {
    /// Watches `paths` (as they were mapped; paths never mapped are ignored): their mappings
    /// alive now and any made later. Make it as soon as the files are mapped, so a file that
    /// changes while the model loads is caught even if loading dropped its mapping.
    pub fn new(paths: Vec<PathBuf>) -> FileWatch {
        let reg = meta();
        let since_serial = reg
            .slots
            .iter()
            .flatten()
            .filter(|m| paths.contains(&m.path))
            .map(|m| m.serial)
            .min()
            .unwrap_or_else(|| NEXT_SERIAL.load(Ordering::SeqCst));
        drop(reg);
        FileWatch {
            paths,
            since_serial,
            seen: AtomicU64::new(u64::MAX),
            broken: OnceLock::new(),
        }
    }

    /// Also watches `path` (mapped after this watch was made: the cache file).
    pub fn add(&mut self, path: PathBuf) {
        self.paths.push(path);
    }

    /// `Err(`[`Error::FileChanged`]`)` once any watched file faulted or changed in place;
    /// one atomic load while nothing happened anywhere.
    pub fn check(&self) -> Result<()> {
        if let Some((path, change)) = self.broken.get() {
            return Err(changed_error(path, *change));
        }
        let events = EVENTS.load(Ordering::SeqCst);
        if events == self.seen.load(Ordering::SeqCst) {
            return Ok(());
        }
        if let Some((path, change)) = self.find() {
            let _ = self.broken.set((path, change));
            let (path, change) = self.broken.get().expect("just set");
            return Err(changed_error(path, *change));
        }
        self.seen.store(events, Ordering::SeqCst);
        Ok(())
    }

    /// [`FileWatch::check`] after a stat of the mapped files (rate-limited process-wide): what
    /// a new request or a health check asks, so a change is seen before any read trips on it.
    pub fn check_now(&self) -> Result<()> {
        if self.broken.get().is_none() {
            poll_rate_limited();
        }
        self.check()
    }

    /// The first watched file that faulted or changed, logging its error line once.
    fn find(&self) -> Option<(PathBuf, Change)> {
        let mut reg = meta();
        let Registry { slots, retired } = &mut *reg;
        let live = slots.iter_mut().enumerate().filter_map(|(i, m)| {
            m.as_mut()
                .map(|m| (SLOTS[i].faults.load(Ordering::SeqCst), m))
        });
        let gone = retired.iter_mut().map(|m| (0, m));
        for (faults, meta) in live.chain(gone) {
            if meta.serial < self.since_serial || !self.paths.contains(&meta.path) {
                continue;
            }
            if let Some(c) = meta.settle(faults) {
                if !meta.reported {
                    meta.reported = true;
                    tracing::error!("{}", changed_error(&meta.path, c));
                }
                return Some((meta.path.clone(), c));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(bytes: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.safetensors");
        let mut f = File::create(&path).unwrap();
        let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8 + 1).collect();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        (dir, path)
    }

    fn map(path: &Path) -> (File, memmap2::Mmap) {
        let file = File::open(path).unwrap();
        // SAFETY: a test file only this test writes; it is truncated deliberately, with the
        // mapping registered so the fault is answered.
        let map = unsafe { memmap2::MmapOptions::new().map(&file) }.unwrap();
        (file, map)
    }

    #[test]
    fn a_read_past_a_truncated_end_reads_zeros_and_is_recorded_for_its_file() {
        let page = 4096 * 4;
        let (_dir, path) = temp_file(page * 8);
        let (file, map) = map(&path);
        let reg = register(&map, &file, &path);
        assert!(reg.slot.is_some(), "registered");
        let watch = FileWatch::new(vec![path.clone()]);
        let other = FileWatch::new(vec![path.with_file_name("other.safetensors")]);
        assert_eq!(map[page * 6], ((page * 6) % 251) as u8 + 1);
        watch.check().unwrap();

        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(page as u64)
            .unwrap();
        let before = faults_answered();
        // A read of a page past the new end: SIGBUS without the guard.
        let tail = &map[page * 2..];
        let sum: u64 = tail.iter().map(|&b| u64::from(b)).sum();
        assert_eq!(sum, 0, "pages past the new end read as zeros");
        assert!(faults_answered() > before, "the fault was recorded");
        // Bytes before the new end are intact.
        assert_eq!(map[10], 11);

        let err = watch.check().unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("truncated"),
            "{err}"
        );
        assert!(err.contains("restart"), "{err}");
        // Stays failed; a model that does not map the file is not affected.
        assert!(watch.check().is_err());
        other.check().unwrap();
        drop(reg);
        drop(map);
    }

    #[test]
    fn a_fault_outlives_its_mapping_for_the_watch_that_covered_it_only() {
        let (_dir, path) = temp_file(4096 * 8);
        let (file, map) = map(&path);
        let reg = register(&map, &file, &path);
        // As a load does: watch, read (here past a truncated end), drop the mapping.
        let watch = FileWatch::new(vec![path.clone()]);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        assert_eq!(map[4096 * 5], 0);
        drop(reg);
        drop(map);
        drop(file);
        let err = watch.check().unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        // The file opened again, as it is now, is a new mapping with no past.
        let (file, map) = super::tests::map(&path);
        let _reg = register(&map, &file, &path);
        let fresh = FileWatch::new(vec![path.clone()]);
        fresh.check().unwrap();
        assert_eq!(map[10], 11);
    }

    #[test]
    fn a_file_changed_in_place_is_recorded_and_a_replaced_one_is_not() {
        let (_dir, path) = temp_file(8192);
        let (file, map) = map(&path);
        let _reg = register(&map, &file, &path);
        let watch = FileWatch::new(vec![path.clone()]);
        poll();
        watch.check().unwrap();

        // Replaced by a rename: the mapped inode is intact, serving goes on.
        let (dir2, path2) = temp_file(8192);
        let (file2, map2) = super::tests::map(&path2);
        let _reg2 = register(&map2, &file2, &path2);
        let watch2 = FileWatch::new(vec![path2.clone()]);
        let new = dir2.path().join("new");
        std::fs::write(&new, vec![7u8; 100]).unwrap();
        std::fs::rename(&new, &path2).unwrap();
        poll();
        watch2.check().unwrap();
        assert_eq!(map2[100], 101);

        // Written in place, same size: the bytes may be mixed.
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(b"changed").unwrap();
        f.sync_all().unwrap();
        // Some filesystems keep coarse mtimes: make the change visible whatever the clock.
        let later = std::time::SystemTime::now() + Duration::from_secs(5);
        f.set_modified(later).unwrap();
        poll();
        let err = watch.check().unwrap_err().to_string();
        assert!(err.contains("modified in place"), "{err}");
    }

    #[test]
    fn a_positioned_read_of_a_truncated_file_names_it() {
        // What the RAM-budget tier does: copy a tensor out with positioned reads.
        let (_dir, path) = temp_file(8192);
        let storage = std::sync::Arc::new(crate::weights::map_path(&path).unwrap());
        let t = crate::weights::TensorRef::in_storage(
            "w".into(),
            std::sync::Arc::new(path.clone()),
            crate::weights::Dtype::U8,
            vec![1000],
            storage,
            4000,
            5000,
        );
        let mut buf = vec![0u8; 1000];
        t.read_into(&mut buf).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(100)
            .unwrap();
        let err = t.read_into(&mut buf).unwrap_err().to_string();
        assert!(
            err.contains("truncated")
                && err.contains("restart")
                && err.contains(&path.display().to_string()),
            "{err}"
        );
    }
}
