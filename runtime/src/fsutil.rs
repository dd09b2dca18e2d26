//! Crash-safe file writing shared by everything that writes files (logits dumps, caches, state).
//!
//! Invariants:
//! - A file we write is either absent or complete: bytes go to a temporary file
//!   `.NAME.tmp-PID` in the same folder, which is fsynced, renamed over the target, and the
//!   folder fsynced.
//! - A temporary file does not outlive its writer for long: the writer holds an exclusive flock
//!   on it while writing, and every write into a folder first removes the temporary files there
//!   whose writer is gone (no lock held, not this process's, older than [`ORPHAN_MIN_AGE`]).
//!   A live writer's file is never removed.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};

/// A temporary file younger than this is never removed, even unlocked: it covers the instant
/// between a writer creating its file and locking it (whatever its pid says, which may be of
/// another pid namespace).
pub const ORPHAN_MIN_AGE: Duration = Duration::from_secs(10);

/// What `stat` says of a file: enough that any write or replacement changes it (a write changes
/// mtime and ctime, which user programs cannot set back; a replacement changes the inode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct FileStat {
    pub size_bytes: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
    pub device: u64,
}

impl FileStat {
    pub fn of_metadata(m: &std::fs::Metadata) -> FileStat {
        use std::os::unix::fs::MetadataExt;
        FileStat {
            size_bytes: m.len(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec(),
            ctime_ns: m.ctime().saturating_mul(1_000_000_000) + m.ctime_nsec(),
            inode: m.ino(),
            device: m.dev(),
        }
    }

    pub fn of(path: &Path) -> std::io::Result<FileStat> {
        std::fs::metadata(path).map(|m| FileStat::of_metadata(&m))
    }

    /// The same file (device and inode), whatever its contents.
    pub fn same_inode(&self, other: &FileStat) -> bool {
        self.device == other.device && self.inode == other.inode
    }
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::bad_file(path, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    remove_orphaned_temporaries(&dir);
    let mut tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let create = |p: &Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p)
        };
        let mut f = match create(&tmp) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Another write of this process to the same file (or a leftover of a dead
                // process that had this pid): never truncate it; use a name of our own.
                static NEXT: AtomicU64 = AtomicU64::new(1);
                let seq = NEXT.fetch_add(1, Ordering::Relaxed);
                tmp = dir.join(format!(".{name}.tmp-{}-{seq}", std::process::id()));
                create(&tmp)?
            }
            other => other?,
        };
        // Released when `f` is closed.
        try_lock_exclusive(&f)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        drop(f);
        // Persist the rename itself.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Whether `name` is a temporary file of [`write_atomic`] (`.NAME.tmp-PID` or
/// `.NAME.tmp-PID-SEQ`); returns the pid.
fn temporary_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (target, tail) = rest.rsplit_once(".tmp-")?;
    let (pid, seq) = tail.split_once('-').unwrap_or((tail, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if target.is_empty() || !digits(pid) || !digits(seq) {
        return None;
    }
    pid.parse().ok()
}

/// Takes an exclusive flock on `f` without waiting: an error where another descriptor holds
/// it. The lock is released when `f` is closed.
pub fn try_lock_exclusive(f: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor the caller owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Takes an exclusive flock on `f`, waiting while another descriptor holds it. The lock is
/// released when `f` is closed.
pub fn lock_exclusive(f: &std::fs::File) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor the caller owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes from `dir` the files whose writer is gone; returns how many. `claim` looks at each
/// entry (with its name) and returns `None` to keep it, or what shows its writer gone (a lock
/// taken with [`try_lock_exclusive`]), which is held while the file is removed and then handed
/// to `removed` with the file's path.
pub fn remove_orphans<T>(
    dir: &Path,
    mut claim: impl FnMut(&std::fs::DirEntry, &str) -> Option<T>,
    mut removed: impl FnMut(&Path, T),
) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut count = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(claimed) = claim(&entry, &name) else {
            continue;
        };
        let path = entry.path();
        if std::fs::remove_file(&path).is_ok() {
            count += 1;
            removed(&path, claimed);
        }
    }
    count
}

/// Removes from `dir` the temporary files of [`write_atomic`] whose writer is gone: not this
/// process's, not locked, and older than [`ORPHAN_MIN_AGE`]. Returns how many.
pub fn remove_orphaned_temporaries(dir: &Path) -> usize {
    remove_orphans(
        dir,
        |entry, name| {
            match temporary_pid(name) {
                Some(pid) if pid != std::process::id() => {}
                _ => return None,
            }
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).ok()?;
            let old = meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age >= ORPHAN_MIN_AGE);
            if !meta.file_type().is_file() || !old {
                return None;
            }
            let f = std::fs::OpenOptions::new().read(true).open(&path).ok()?;
            // Its writer is alive where the lock is held; else it is kept until removed.
            try_lock_exclusive(&f).ok()?;
            Some(f)
        },
        |path, _lock| {
            tracing::info!(
                "removed {}, left by a write that did not finish",
                path.display()
            );
        },
    )
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    #[test]
    fn writes_whole_file_and_no_temp_left() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.bin");
        super::write_atomic(&p, b"hello").unwrap();
        super::write_atomic(&p, b"world!").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"world!");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        assert!(super::write_atomic(&d.path().join("no/such/dir/x"), b"1").is_err());
    }

    /// A temporary file `age` old, of a writer with pid `pid`.
    fn temporary(dir: &std::path::Path, name: &str, pid: u32, age: Duration) -> std::path::PathBuf {
        let p = dir.join(format!(".{name}.tmp-{pid}"));
        let f = std::fs::File::create(&p).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
        p
    }

    #[test]
    fn a_write_removes_temporaries_of_dead_writers_and_keeps_live_ones() {
        let d = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        // A writer killed an hour ago, writing another file of this folder.
        let dead = temporary(d.path(), "profile.json", 999_999_999, hour);
        // A writer still writing (it holds the lock), and one that just started.
        let live = temporary(d.path(), "hot.json", 999_999_998, hour);
        let held = std::fs::File::open(&live).unwrap();
        super::lock_exclusive(&held).unwrap();
        let young = temporary(d.path(), "x.json", 999_999_997, Duration::ZERO);
        // Files that only look alike are never touched.
        let mine = d.path().join("notes.tmp-12");
        std::fs::write(&mine, b"a user's file").unwrap();
        super::write_atomic(&d.path().join("out.json"), b"{}").unwrap();
        assert!(!dead.exists(), "a dead writer's temporary file was kept");
        assert!(live.exists(), "a live writer's temporary file was removed");
        assert!(young.exists(), "a temporary file just created was removed");
        assert!(mine.exists());
        drop(held);
        assert_eq!(super::remove_orphaned_temporaries(d.path()), 1);
        assert!(!live.exists());
        assert_eq!(super::temporary_pid(".a.tmp-12"), Some(12));
        assert_eq!(super::temporary_pid("a.tmp-12"), None);
        assert_eq!(super::temporary_pid(".a.tmp-12-3"), Some(12));
        assert_eq!(super::temporary_pid(".a.tmp-1x"), None);
    }
}
