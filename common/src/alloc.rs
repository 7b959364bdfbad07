//! The C allocator's knobs, for the long-running binaries.
//!
//! Keel's binaries allocate with glibc's allocator. By default glibc maps a
//! block on its own only from a threshold that rises to the size of every
//! mapped block freed, so after one large transient buffer (a plugin package
//! read whole, a burst of records) later ones of that size are cut from a heap,
//! and a heap other than the main one hands nothing back. [`tune`] fixes the
//! threshold instead; [`limit_arenas`] keeps a small process's threads on few
//! heaps; [`usage`] and [`trim`] serve the server's trimmer. With
//! [`crate::residency`]'s one `madvise`, these four calls into glibc are the
//! crate's only `unsafe`.

/// Blocks of `mmap_from` bytes or more are mapped on their own and go back to the
/// system whole when freed; the threshold no longer moves. Call once, first
/// thing in `main`.
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)]
pub fn tune(mmap_from: usize) {
    let from = nix::libc::c_int::try_from(mmap_from).unwrap_or(nix::libc::c_int::MAX);
    // SAFETY: mallopt only sets a threshold; glibc checks the value.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, from);
    }
}

/// At most `arenas` heaps for all threads. By default glibc gives each new thread
/// its own heap, up to eight per core, and each keeps what its thread freed; a
/// process that allocates little loses nothing to lock contention by sharing.
/// Call once, first thing in `main`, before any thread starts.
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)]
pub fn limit_arenas(arenas: usize) {
    let arenas = nix::libc::c_int::try_from(arenas.max(1)).unwrap_or(nix::libc::c_int::MAX);
    // SAFETY: mallopt only sets a limit; glibc checks the value.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, arenas);
    }
}

/// Bytes free inside the allocator's arenas, and bytes in use.
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)]
pub fn usage() -> (usize, usize) {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { nix::libc::mallinfo2() };
    (info.fordblks, info.uordblks.saturating_add(info.hblkhd))
}

/// Returns every whole free page in the allocator's arenas to the system.
#[cfg(target_env = "gnu")]
#[allow(unsafe_code)]
pub fn trim() {
    // SAFETY: malloc_trim takes the arenas' locks itself and frees nothing in use.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Other C libraries keep their own defaults.
#[cfg(not(target_env = "gnu"))]
pub fn tune(_mmap_from: usize) {}

/// Other C libraries keep their own defaults.
#[cfg(not(target_env = "gnu"))]
pub fn limit_arenas(_arenas: usize) {}

/// Other C libraries return memory on their own terms.
#[cfg(not(target_env = "gnu"))]
pub fn usage() -> (usize, usize) {
    (0, 0)
}

/// Other C libraries return memory on their own terms.
#[cfg(not(target_env = "gnu"))]
pub fn trim() {}

#[cfg(all(test, target_env = "gnu"))]
mod tests {
    use super::*;

    /// Without [`tune`], freeing the 8 MiB block raises glibc's threshold past
    /// 4 MiB: the 4 MiB block is then cut from a heap and stays there, free, once
    /// dropped.
    #[test]
    fn a_large_transient_block_is_not_kept_in_a_heap() {
        // 1 MiB: the other test's 64 KiB blocks must still come from a heap.
        tune(1 << 20);
        drop(std::hint::black_box(vec![1u8; 8 << 20]));
        let (free_before, _) = usage();
        drop(std::hint::black_box(vec![2u8; 4 << 20]));
        let (free_after, _) = usage();
        assert!(
            free_after < free_before + (2 << 20),
            "a freed 4 MiB block stayed in the allocator: {free_before} -> {free_after} bytes free"
        );
    }

    #[test]
    fn a_trim_gives_freed_pages_back() {
        // 64 MiB in 64 KiB blocks (below glibc's mmap threshold, so from the heap),
        // every other one kept so the heap's top cannot shrink by itself.
        let mut blocks: Vec<Vec<u8>> = (0..1024).map(|_| vec![1u8; 64 << 10]).collect();
        let kept: Vec<Vec<u8>> = blocks.iter_mut().step_by(2).map(std::mem::take).collect();
        drop(blocks);
        let before = rss_kb();
        trim();
        let after = rss_kb();
        drop(kept);
        assert!(
            after + (16 << 10) <= before,
            "a trim returned {} KiB of about 32 MiB freed",
            before.saturating_sub(after)
        );
    }

    fn rss_kb() -> usize {
        std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    }
}
