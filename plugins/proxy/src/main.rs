//! `proxy`: attaches to the agent (or, with `KEEL_PLUGIN_DEBUG=1`, to
//! stdin/stdout), reads `DETAIL` and runs the plugin.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use keel_plugin_proxy::plugin;
use keel_plugin_sdk::Client;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("proxy {}", keel_plugin_proxy::VERSION);
        return ExitCode::SUCCESS;
    }
    let client = match Client::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("proxy: cannot attach to the agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    keel_plugin_sdk::logging::init(&client, tracing::Level::INFO);
    let detail = keel_plugin_sdk::detail().unwrap_or_default();
    match plugin::run(client, &detail) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
