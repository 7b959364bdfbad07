//! Giving back the pages of a process's own code once it has started.
//!
//! A long-running binary maps its executable, and the kernel keeps every page of
//! it that ever ran resident, with its neighbours: each fault on a file mapping
//! maps the 64 KiB around it that sit in the page cache, and each read from disk
//! reads ahead 128 KiB. Start-up (argument and configuration parsing,
//! enrollment, the first handshake, spawning) touches most of the binary once,
//! so an idle process keeps megabytes of code it will not run again.
//! [`release_code`] advises the kernel to page the executable's read-only
//! mappings out (`MADV_PAGEOUT`, Linux 5.4 or later); what the process still
//! runs comes back on its next fault, from the page cache or the disk. Only pages
//! no other process maps are reclaimed, and clean file pages are dropped, never
//! written anywhere.

use std::path::Path;

/// The executable's read-only mappings (code and constant data), as
/// `(start, length)`, from the text of `/proc/self/maps` and the executable's path.
pub fn code_mappings(maps: &str, exe: &Path) -> Vec<(usize, usize)> {
    let exe = exe.to_string_lossy();
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            // offset, device, inode, then the path (which may hold spaces).
            let path = line.splitn(6, char::is_whitespace).nth(5)?.trim_start();
            if path != exe || perms.as_bytes().get(1) != Some(&b'-') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            Some((start, end.checked_sub(start)?))
        })
        .collect()
}

/// Pages this process's own code and constant data out; the bytes advised.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub fn release_code() -> std::io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut advised = 0;
    for (start, len) in code_mappings(&maps, &exe) {
        for (advice, name) in [
            (nix::libc::MADV_RANDOM, "MADV_RANDOM"),
            (nix::libc::MADV_PAGEOUT, "MADV_PAGEOUT (Linux 5.4 or later)"),
        ] {
            // SAFETY: the range is a whole mapping of this process, read from its
            // own maps; neither advice changes content, only how pages are read
            // and where they live.
            let r = unsafe { nix::libc::madvise(start as *mut nix::libc::c_void, len, advice) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("madvise {name} on {} at {start:#x}, {len} bytes: {e}", exe.display()),
                ));
            }
        }
        advised += len;
    }
    // Unmapped now, the pages may still sit in the page cache, and the next
    // fault would map in the cached 64 KiB around it ("fault-around"). Dropped
    // from the cache too, a fault brings back the one page it needs (no
    // read-ahead, MADV_RANDOM). The kernel keeps a large folio while any page of
    // it is mapped: where it caches the binary in large folios, part stays.
    let file = std::fs::File::open(&exe)?;
    nix::fcntl::posix_fadvise(&file, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .map_err(|e| std::io::Error::other(format!("posix_fadvise DONTNEED on {}: {e}", exe.display())))?;
    Ok(advised)
}

/// Elsewhere the kernel decides.
#[cfg(not(target_os = "linux"))]
pub fn release_code() -> std::io::Result<usize> {
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_executables_read_only_mappings_are_taken() {
        let maps = "\
556b2a254000-556b2a4b7000 r--p 00000000 fe:00 5314301                    /opt/keel/bin/keel-agent
556b2a4b8000-556b2ac47000 r-xp 00263000 fe:00 5314301                    /opt/keel/bin/keel-agent
556b2ac88000-556b2ac90000 rw-p 00a32000 fe:00 5314301                    /opt/keel/bin/keel-agent
556b2c000000-556b2c100000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 r-xp 00000000 fe:00 77                         /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000201000 r--p 00000000 fe:00 78                         /opt/keel/bin/keel-agent-old
";
        let got = code_mappings(maps, Path::new("/opt/keel/bin/keel-agent"));
        assert_eq!(
            got,
            [(0x556b_2a25_4000, 0x26_3000), (0x556b_2a4b_8000, 0x78_f000)],
            "the writable data, the heap, libc and another binary stay"
        );
        let spaced = "5000-6000 r-xp 00000000 fe:00 9 /opt/my keel/keel-agent\n";
        assert_eq!(
            code_mappings(spaced, Path::new("/opt/my keel/keel-agent")),
            [(0x5000, 0x1000)]
        );
        assert_eq!(code_mappings("", Path::new("/x")), [], "no maps, nothing");
    }
}
