//! Giving freed memory back to the system.
//!
//! keel-server allocates with glibc's allocator. Once thousands of streams have
//! closed (or a burst of records has passed), their memory is free inside the
//! allocator's arenas, but glibc hands back only the top of each heap by itself.
//! A thread looks every [`CHECK_EVERY`] at how much sits free; when that grew by
//! [`TRIM_STEP`], or an eighth of what is in use if that is more, since the last
//! trim, `malloc_trim(0)` returns every whole free page to the system. A trim
//! walks every free block with the arenas locked, so ordinary churn in a large
//! heap must not trigger one; each is logged at debug with its duration.
//!
//! Blocks of [`MMAP_FROM`] and more are mapped on their own
//! (`keel_common::alloc::tune`): a stream's 16 KiB HTTP/2 write buffer is then
//! resident only as far as it was ever written (about a page for an idle agent),
//! and goes back whole when it is freed.

use std::time::Duration;

/// How often the free memory is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);
/// How much more must sit free than after the last trim before trimming again,
/// at least.
pub const TRIM_STEP: usize = 16 << 20;

/// Blocks this large or larger are mapped on their own, not cut from a heap.
pub const MMAP_FROM: usize = 16 << 10;

/// Decides when to trim from how much the allocator holds free.
#[derive(Debug, Default)]
pub struct Trimmer {
    /// Free bytes right after the last trim, or the lowest seen since.
    floor: usize,
}

impl Trimmer {
    /// Whether to trim now, with `free` bytes free in the allocator and `used`
    /// in use.
    pub fn due(&mut self, free: usize, used: usize) -> bool {
        if free < self.floor {
            // Reused since: what is freed from here on counts again.
            self.floor = free;
        }
        free >= self.floor.saturating_add(TRIM_STEP.max(used / 8))
    }

    /// Records a trim done with `free` bytes free.
    pub fn trimmed(&mut self, free: usize) {
        self.floor = free;
    }
}

/// Starts the thread that trims; it runs for the life of the process.
pub fn spawn_trimmer() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("keel-trim".into())
        .stack_size(64 << 10)
        .spawn(|| {
            let mut trimmer = Trimmer::default();
            loop {
                std::thread::sleep(CHECK_EVERY);
                let (free, used) = keel_common::alloc::usage();
                if trimmer.due(free, used) {
                    let start = std::time::Instant::now();
                    keel_common::alloc::trim();
                    tracing::debug!(
                        free_mib = free >> 20,
                        used_mib = used >> 20,
                        ms = start.elapsed().as_millis(),
                        "returned free memory to the system"
                    );
                    trimmer.trimmed(free);
                }
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_per_step_of_newly_freed_memory() {
        let mut t = Trimmer::default();
        assert!(!t.due(TRIM_STEP - 1, 0), "less than a step free");
        assert!(t.due(TRIM_STEP, 0), "a step free");
        t.trimmed(TRIM_STEP);
        assert!(!t.due(TRIM_STEP, 0), "nothing new since the trim");
        assert!(!t.due(2 * TRIM_STEP - 1, 0));
        // Memory reused, then freed again: counted from the low point.
        assert!(!t.due(1 << 20, 0));
        assert!(t.due((1 << 20) + TRIM_STEP, 0));
    }

    #[test]
    fn a_large_heap_trims_only_for_an_eighth_of_its_use() {
        let mut t = Trimmer::default();
        let used = 800 << 20;
        assert!(!t.due(99 << 20, used), "churn under an eighth");
        assert!(t.due(100 << 20, used), "an eighth freed");
        t.trimmed(100 << 20);
        // Everyone left: most of it free, little in use.
        assert!(t.due(780 << 20, 20 << 20));
    }
}
