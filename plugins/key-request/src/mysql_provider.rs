//! `keel-keyprovider-mysql`: agent keys from a MySQL or MariaDB table, for the
//! key-request plugin. The same command line, replies and behaviour as the shipped
//! `providers/mysql_provider.py`, without its costs: no interpreter to start in exec
//! mode, and no GIL in socket mode.
//!
//! - **Exec mode** (`... id 001`, `... ip 10.1.2.3`): checks the value, connects,
//!   runs one prepared query, prints one reply on stdout and exits ([`exec`]).
//! - **Socket mode** (`--serve PATH [--threads N]`): a unix-socket server (mode
//!   0600), one request per connection, a fixed pool of workers with one database
//!   connection and one set of prepared statements each ([`serve`]).
//!
//! The parts: [`cli`] (options and environment), [`db`] (the connection, the
//! queries, the password), [`answer`] (requests and replies on the wire) and
//! [`serve`] (the socket server).
//!
//! The value looked up is always a bound parameter of a prepared statement; the
//! table name, the only other variable part of the SQL, must be a plain
//! identifier. The password is never taken from the command line, and no reply,
//! log line or `Debug` output contains it.

pub mod answer;
pub mod cli;
pub mod db;
pub mod serve;

use std::io::Write;
use std::process::ExitCode;

use answer::Reply;
use cli::{Cli, Mode};
use db::{Database, Settings};

use crate::request::{By, Lookup};

/// The program's name, in messages.
pub const PROGRAM: &str = "keel-keyprovider-mysql";

/// The version of this build: `BUILD_VERSION` at compile time (as for the other
/// binaries in the packages), or the crate version.
pub const VERSION: &str = match option_env!("BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Exec mode: the reply to one lookup of `value` by `by`. A malformed value is
/// refused before any connection is made; database trouble is an error-2 reply,
/// never a failure of the program (as in the Python provider).
pub fn exec(settings: &Settings, by: By, value: &str) -> Reply {
    let lookup = match Lookup::new(by, value) {
        Ok(l) => l,
        Err(e) => return Reply::invalid(e.to_string()),
    };
    let result = Database::connect(settings).and_then(|mut db| db.lookup(&lookup));
    result.unwrap_or_else(|e| Reply::database_error(&e))
}

/// Runs the provider as the command line says; returns the exit code.
pub fn run(cli: Cli) -> ExitCode {
    let (settings, mode) = match cli.into_parts() {
        Ok(parts) => parts,
        Err(e) => e.exit(),
    };
    match mode {
        Mode::Exec { by, value } => {
            let reply = exec(&settings, by, &value).to_json();
            let mut out = std::io::stdout().lock();
            // One write, no newline: the reply is all the output there is.
            match out.write_all(&reply).and_then(|()| out.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "cannot write the reply to stdout");
                    ExitCode::FAILURE
                }
            }
        }
        Mode::Serve { socket, threads } => match serve::run(settings, &socket, threads) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "{PROGRAM} stopped");
                ExitCode::FAILURE
            }
        },
    }
}
