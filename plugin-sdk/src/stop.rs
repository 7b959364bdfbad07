//! Stopping without losing records.
//!
//! The agent stops a plugin in three steps: it closes the task pipe (fd 3), keeps
//! reading records until the plugin closes fd 4 by exiting (for at most
//! `plugin_stop_grace`, 5 s by default), then sends SIGTERM, and SIGKILL after
//! `stop_grace`. A plugin built on the SDK answers the first two the same way: it
//! flushes what it buffered and exits.
//!
//! - End of the task pipe: [`Client::serve`](crate::Client::serve) (and
//!   [`Client::next_task`](crate::Client::next_task) returning `None`).
//! - SIGTERM or SIGINT: [`Client::new`](crate::Client::new) blocks both in the
//!   calling thread, so in every thread started after it, and a thread of its
//!   own waits for them: it runs the hook given to
//!   [`Client::on_stop`](crate::Client::on_stop), flushes and exits with status 0.
//!   Create the client first in `main`, before any other thread.

use nix::sys::signal::{SigSet, Signal};

/// Blocks SIGTERM and SIGINT in the calling thread, and so in every thread it
/// starts later; returns the set for [`wait_then`]. Programs the plugin runs start
/// with no signal blocked (the standard library clears the mask in the child).
pub fn block_signals() -> nix::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()?;
    Ok(set)
}

/// Starts a thread that waits for one of `signals` (blocked in every thread by
/// [`block_signals`]), runs `on_signal` and exits the process with status 0.
pub fn wait_then(signals: SigSet, on_signal: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("keel-sdk-stop".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                tracing::info!(signal = %sig, "stopping");
                on_signal();
                std::process::exit(0);
            }
        })?;
    Ok(())
}
