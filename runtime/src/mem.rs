//! Large weight buffers we own (quantized tensors, RAM-pool experts): zeroed `u64` words whose
//! pages the kernel is asked to back with transparent huge pages.
//!
//! Decode streams every active weight once per token, so TLB misses on 4 KiB pages cost real
//! bandwidth; with 2 MiB pages one TLB entry covers 512 times more weights. The advice is only a
//! hint: where huge pages are off or unavailable the buffer is an ordinary one.
//!
//! Invariant: the returned vector is exactly `vec![0u64; n]` (same length, zeroed); only the
//! advice on its pages differs.

/// Buffers below this size are left alone (a huge page would cover little of them).
const HUGE_MIN_BYTES: usize = 4 << 20;

/// `vec![0u64; n]`, advised for transparent huge pages when large.
pub fn zeroed_words(n: usize) -> Vec<u64> {
    let words = vec![0u64; n];
    let bytes = n * 8;
    #[cfg(target_os = "linux")]
    if bytes >= HUGE_MIN_BYTES {
        const HUGE: usize = 2 << 20;
        let start = (words.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (words.as_ptr() as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: [start, end) lies inside the vector's allocation (rounded inwards to
            // page boundaries); MADV_HUGEPAGE only changes how the kernel backs those pages and
            // never their contents, so the vector stays valid and zeroed. Failure is harmless.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (bytes, HUGE_MIN_BYTES);
    words
}
