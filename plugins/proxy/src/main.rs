//! `proxy`: attaches to the agent (or, with `KEEL_PLUGIN_DEBUG=1`, to
//! stdin/stdout), reads `DETAIL` and runs the plugin.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use keel_plugin_proxy::plugin;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("proxy {}", keel_plugin_proxy::VERSION);
        return ExitCode::SUCCESS;
    }
    keel_plugin_sdk::run("proxy", tracing::Level::INFO, plugin::run)
}
