//! `file-delivery`: attaches to the agent (or, with `KEEL_PLUGIN_DEBUG=1`, to
//! stdin/stdout) and runs the plugin; `file-delivery host-key` prints this host's
//! public key, for an operator to compare with what the keeper pinned.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keel_plugin_file_delivery::{config, plugin};

/// The file-delivery plugin.
#[derive(Debug, Parser)]
#[command(name = "file-delivery", version = keel_plugin_file_delivery::VERSION, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Print this host's public key (made on first use), to check a keeper's pin.
    HostKey {
        /// The plugin's configuration file.
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Some(Cmd::HostKey { config }) => {
            let detail = serde_json::json!({ "config": config }).to_string();
            match plugin::start(&detail) {
                Ok((_, _, host)) => {
                    println!("{}", host.public_hex());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("file-delivery: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => keel_plugin_sdk::run("file-delivery", tracing::Level::INFO, plugin::run),
    }
}
