//! `keelctl`, the Keel console on the command line: a client of the server's
//! `/api/v1` for agents, components, policies, tasks, the audit log and tokens,
//! the TLS inventory (`certs`) and the keeper of file-delivery (`files`).
//!
//! The binary only parses arguments and loads the [`config::Settings`]; [`run`]
//! does the rest. Exit codes: 0 done, 1 failed (the server's message is shown),
//! 2 a watched task or a file push did not succeed, 64 unusable configuration or usage.
#![forbid(unsafe_code)]

pub mod agents;
pub mod audit;
pub mod certs;
pub mod cli;
pub mod client;
pub mod components;
pub mod config;
pub mod files;
pub mod output;
pub mod policies;
pub mod tasks;
pub mod tokens;
pub mod watch;

use std::process::ExitCode;

use keel_common::config::EX_USAGE;

use crate::cli::{Command, OutputArgs};
use crate::client::Client;
use crate::config::{Settings, UsageError};

/// Exit code of `tasks watch` when the task ended without succeeding.
pub const EXIT_TASK_UNSUCCESSFUL: u8 = 2;

/// What every command works with: the API client and the output choice.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The API client.
    pub client: Client,
    /// Print the server's JSON instead of tables.
    pub json: bool,
}

/// A usage error inside a command, e.g. flags that do not go together.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError(message.into()).into()
}

/// The exit code for a failure: 64 for usage, 1 for the rest.
pub fn exit_code(e: &anyhow::Error) -> ExitCode {
    if e.chain().any(|c| c.is::<UsageError>()) {
        ExitCode::from(u8::try_from(EX_USAGE).unwrap_or(64))
    } else {
        ExitCode::FAILURE
    }
}

/// Prints a failure as `keelctl: …` on stderr and returns its exit code.
pub fn report(e: &anyhow::Error) -> ExitCode {
    eprintln!("keelctl: {e:#}");
    exit_code(e)
}

/// Runs one command against the server in `settings`; prints its result, or
/// reports its failure, and returns the exit code.
pub async fn run(settings: Settings, output: OutputArgs, command: Command) -> ExitCode {
    let ctx = match Client::new(&settings) {
        Ok(client) => Ctx {
            client,
            json: output.json,
        },
        Err(e) => return report(&e),
    };
    match dispatch(&ctx, command).await {
        Ok(code) => code,
        Err(e) => report(&e),
    }
}

async fn dispatch(ctx: &Ctx, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Agents(c) => agents::run(ctx, c).await?,
        Command::Components(c) => components::run(ctx, c).await?,
        Command::Policies(c) => policies::run(ctx, c).await?,
        Command::Tasks(c) => return tasks::run(ctx, c).await,
        Command::Audit(a) => audit::run(ctx, &a).await?,
        Command::Tokens(c) => tokens::run(ctx, c).await?,
        Command::Files(c) => return files::run(ctx, c).await,
        Command::Certs(c) => return certs::run(ctx, c).await,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_exit_64_and_others_1() {
        assert_eq!(exit_code(&usage("bad flags")), ExitCode::from(64));
        let e = anyhow::Error::from(client::ApiError {
            status: reqwest::StatusCode::FORBIDDEN,
            message: "no".into(),
        });
        assert_eq!(exit_code(&e), ExitCode::FAILURE);
        assert_eq!(format!("{e:#}"), "403 Forbidden: no");
    }
}
