//! `key-request`: attaches to the agent (or, with `KEEL_PLUGIN_DEBUG=1`, to
//! stdin/stdout), reads its configuration from `DETAIL` and runs the plugin.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use keel_plugin_key_request::plugin;
use keel_plugin_sdk::Client;

fn main() -> ExitCode {
    // First, before any thread starts: it blocks the stop signals for its own
    // signal thread, and every later thread inherits the mask.
    let client = match Client::new() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("key-request: cannot attach to the agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    keel_plugin_sdk::logging::init(&client, keel_plugin_key_request::LOG_LEVEL);
    let detail = keel_plugin_sdk::detail().unwrap_or_default();
    match plugin::run(client, &detail) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("key-request: {e}");
            ExitCode::FAILURE
        }
    }
}
