//! The Keel plugin SDK.
//!
//! A Keel plugin is an executable that `keel-agent` starts as a child process. The
//! agent passes it two pipes: the plugin **reads tasks from fd 3** and **writes
//! records to fd 4**. Each frame is a 4-byte little-endian length followed by a
//! protobuf message ([`Task`] in, [`Record`] out). The same protocol is Elkeid's,
//! so a plugin built with this SDK also runs under an Elkeid agent, and an Elkeid
//! plugin runs under `keel-agent`. `PROTOCOL.md` in this crate describes the
//! protocol for other languages.
//!
//! ```no_run
//! use keel_plugin_sdk::{Client, Error};
//!
//! fn main() -> std::process::ExitCode {
//!     // Attaches, logs to the agent, reads DETAIL, runs this, and exits with its outcome.
//!     keel_plugin_sdk::run("hello", tracing::Level::INFO, |client: Client, detail: &str| {
//!         // Records are buffered and flushed every 100 ms and whenever 64 KiB are waiting.
//!         client.send(20_000, [("event", "started"), ("detail", detail)])?;
//!         // Until the agent stops the plugin; then every buffered record is flushed.
//!         client.serve(|task| {
//!             client.send(20_001, [("echo", task.data.as_str())])?;
//!             client.task_result(&task.token, true, "done")
//!         })
//!     })
//! }
//! # fn _unused(_: Error) {}
//! ```
//!
//! - [`run`] is the whole skeleton: attach, logging, `DETAIL`, the plugin's own
//!   function, exit code.
//! - [`Client::new`] attaches to fds 3 and 4, or, with `KEEL_PLUGIN_DEBUG=1`, to
//!   stdin and stdout as JSON lines, so a plugin can be run and tried by hand.
//! - [`detail`] returns the plugin's configuration string (`DETAIL`).
//! - [`logging::AgentLogLayer`] sends `tracing` events upstream as plugin logs
//!   (data_type 1011).
//! - [`logging::init`] sets both up: events to the agent and to stderr.
//! - [`Client::serve`] is the task loop with stop handling: it returns, with
//!   everything flushed, when the agent stops the plugin; [`Client::next_task`]
//!   is the loop to write by hand; [`Client::refuse_all`] is what a plugin that
//!   cannot work (bad configuration) does instead.
//! - Records are numbered ([`Record::seq`]), so the server counts any that go
//!   missing; [`stop`] says how a plugin stops without losing any.
//! - [`local::check_trusted`] says whether a local file (a plugin's trust
//!   anchors: keys, allow lists) is one that only root can change (the check is
//!   [`trust::check_trusted`], which the agent applies to its packaged plugins
//!   too), and [`local::config_path`] reads which file `DETAIL` names.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod client;
mod fds;
pub mod local;
pub mod logging;
pub mod stop;
pub mod trust;

pub use client::{Client, ClientOptions, Error};
pub use keel_proto::data_type;
pub use keel_proto::grpc::{Payload, Record, Task};

/// The environment variable that switches on the debug mode.
pub const DEBUG_ENV: &str = "KEEL_PLUGIN_DEBUG";
/// The environment variable carrying the plugin's configuration (`Config.detail`).
pub const DETAIL_ENV: &str = "DETAIL";

/// The plugin's configuration string from `DETAIL`, if set.
pub fn detail() -> Option<String> {
    std::env::var(DETAIL_ENV).ok()
}

/// Runs a plugin whole, as its `main` would: attaches to the agent (first, before
/// any thread starts, for the stop handling: see [`stop`]), sends `tracing`
/// events at `level` and above to the agent and to stderr ([`logging::init`]),
/// reads `DETAIL`, and calls `plugin` with the client and the detail. `plugin`
/// returns when the agent stops the plugin ([`Client::serve`] does that) or with
/// an error. The exit code is success, or failure with the error logged: to the
/// agent as a plugin log, and to stderr, which the agent keeps in the plugin's
/// log file.
pub fn run<E: std::fmt::Display>(
    name: &str,
    level: tracing::Level,
    plugin: impl FnOnce(Client, &str) -> Result<(), E>,
) -> std::process::ExitCode {
    let client = match Client::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: cannot attach to the agent: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    logging::init(&client, level);
    let detail = detail().unwrap_or_default();
    let logs = client.clone();
    match plugin(client, &detail) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(plugin = name, "{e}");
            let _ = logs.flush();
            std::process::ExitCode::FAILURE
        }
    }
}
