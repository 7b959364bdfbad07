//! Taking ownership of the two pipe descriptors the agent passes.
//!
//! This is the SDK's only `unsafe`: converting fd numbers 3 and 4 into owned
//! files. It is sound because the agent's protocol reserves those descriptors for
//! the plugin's pipes, [`take`] checks each one is open before taking it, and the
//! `Client` constructor takes each at most once per process.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// The fd the plugin reads tasks from.
pub const TASK_FD: i32 = 3;
/// The fd the plugin writes records to.
pub const RECORD_FD: i32 = 4;

static TAKEN: AtomicBool = AtomicBool::new(false);

/// Opens fds 3 and 4, once per process.
pub fn take() -> std::io::Result<(File, File)> {
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(std::io::Error::other(
            "the plugin pipes are already owned by another Client",
        ));
    }
    for fd in [TASK_FD, RECORD_FD] {
        if std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err() {
            TAKEN.store(false, Ordering::SeqCst);
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("fd {fd} is not open: run the plugin under keel-agent, or set KEEL_PLUGIN_DEBUG=1"),
            ));
        }
    }
    #[allow(unsafe_code)]
    // SAFETY: fds 3 and 4 are open (checked above), belong to this plugin by the
    // protocol, and are taken exactly once (TAKEN), so nothing else owns them.
    let (tasks, records) = unsafe { (OwnedFd::from_raw_fd(TASK_FD), OwnedFd::from_raw_fd(RECORD_FD)) };
    Ok((File::from(tasks), File::from(records)))
}
