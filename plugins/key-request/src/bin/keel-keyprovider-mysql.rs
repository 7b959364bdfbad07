//! `keel-keyprovider-mysql`: the MySQL/MariaDB key provider for the key-request
//! plugin; see [`keel_plugin_key_request::mysql_provider`]. Parses the command
//! line, sets up logging to stderr and runs it.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use keel_plugin_key_request::mysql_provider::{self, cli::Cli};
use tracing_subscriber::filter::LevelFilter;

/// The log level's variable: `error`, `warn`, `info`, `debug`, `trace` or `off`.
const ENV_LOG: &str = "KEEL_LOG";
/// The log level when [`ENV_LOG`] is unset or not a level.
const DEFAULT_LOG: LevelFilter = LevelFilter::INFO;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A level, not an EnvFilter: parsing directives compiles regexes, which would
    // be a good part of an exec-mode lookup's CPU time.
    let level = std::env::var(ENV_LOG)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_LOG);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(level)
        .init();
    mysql_provider::run(cli)
}
