//! Crash-safe file writing shared by everything that writes files (logits dumps, caches).
//!
//! Invariant: a file we write is either absent or complete: bytes go to a temporary file in the
//! same folder, which is fsynced, renamed over the target, and the folder fsynced.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

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
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
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

#[cfg(test)]
mod tests {
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
}
