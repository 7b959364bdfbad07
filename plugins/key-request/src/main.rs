//! `key-request`: attaches to the agent (or, with `KEEL_PLUGIN_DEBUG=1`, to
//! stdin/stdout), reads its configuration from `DETAIL` and runs the plugin.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use keel_plugin_key_request::{LOG_LEVEL, plugin};

fn main() -> ExitCode {
    keel_plugin_sdk::run("key-request", LOG_LEVEL, plugin::run)
}
