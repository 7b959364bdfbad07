//! keelctl: parses arguments, loads the settings, calls the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use keel_ctl::cli::Cli;
use keel_ctl::config::{self, ProcessEnv};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; everything else is usage (64).
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // Making a keeper key needs no server.
    if let keel_ctl::cli::Command::Files(keel_ctl::cli::FilesCmd::Keygen { out }) = &cli.command {
        return match keel_ctl::files::keygen(out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => keel_ctl::report(&e),
        };
    }
    let settings = match config::load(&cli.conn, &ProcessEnv) {
        Ok(s) => s,
        Err(e) => return keel_ctl::report(&e.into()),
    };
    keel_ctl::run(settings, cli.output, cli.command).await
}
