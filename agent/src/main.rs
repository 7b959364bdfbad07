//! keel-agent: parses arguments, loads configuration, calls the library.
#![forbid(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use keel_agent::config::{AgentConfig, Overrides, Purpose};
use keel_agent::enroll::{self, Credential, EnrollOptions};
use keel_agent::logging::UpstreamErrors;
use keel_agent::run::{self, Exit};
use keel_common::config::EX_USAGE;
use keel_common::logging::{self, LogFormat, LogOptions};
use keel_common::secret::Secret;

#[derive(Parser)]
#[command(name = "keel-agent", version = keel_common::VERSION, about = "The Keel host agent")]
struct Cli {
    /// Configuration file [default: /etc/keel/agent.toml if it exists].
    #[arg(long, global = true, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
    /// State directory (overrides `agent.state_dir`).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Agent ID (overrides `agent.id`).
    #[arg(long, global = true)]
    id: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect to the server and run until stopped.
    Run(RunArgs),
    /// Enroll with a server: make a key, send a CSR, store the certificate.
    Enroll(EnrollArgs),
    /// Print the agent ID.
    Id,
    /// Install an upgrade and roll it back unless the new version proves itself
    /// (started by the agent itself; see ARCHITECTURE.md).
    #[command(hide = true)]
    UpgradeWatchdog {
        /// The agent's state directory.
        #[arg(long)]
        state_dir: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Log directory (overrides `agent.log_dir`).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Server gRPC address host:port; repeat for more (replaces `server.private`).
    #[arg(long = "server")]
    servers: Vec<String>,
}

#[derive(Args)]
struct EnrollArgs {
    /// The server's HTTP endpoint, e.g. https://keel.example:6752.
    #[arg(long)]
    server: String,
    /// Enrollment token; prefer KEEL_ENROLL_TOKEN or --token-file, which `ps` cannot see.
    #[arg(
        long,
        env = "KEEL_ENROLL_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// File holding the enrollment token.
    #[arg(long, conflicts_with = "key_file")]
    token_file: Option<PathBuf>,
    /// Enroll by key instead of a token: the file holding the agent key a key
    /// database has for this host (never sent; a proof is). With --id, the
    /// database's ID for it; without, the server looks it up by this host's address.
    #[arg(long, conflicts_with = "token")]
    key_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the server's CA (`keel-server ca fingerprint`).
    #[arg(long)]
    ca_fingerprint: Option<String>,
    /// Accept the server's CA without a fingerprint, printing it.
    #[arg(long)]
    trust_on_first_use: bool,
}

/// Blocks this large or larger are mapped on their own and go back whole when
/// freed (a plugin package is read whole to check it; see `keel_common::alloc`).
/// Batches (1 MiB at most by default) stay below it: mapping each anew cost a
/// quarter more CPU per record in `keel-bench dataflow`.
const MMAP_FROM: usize = 1 << 20;
/// The runtime's worker threads, whatever the host's core count: the agent relays
/// and waits, and two threads carry `keel-bench dataflow`'s rate; each further
/// one would cost a stack and, in glibc, a heap of its own on a large host.
const WORKERS: usize = 2;
/// Threads for blocking work (spool writes and reads, a key pair at renewal),
/// each awaited by the stream that asked for it.
const BLOCKING: usize = 4;
/// glibc heaps shared by all of the agent's threads (`keel_common::alloc`).
const ARENAS: usize = 1;

fn main() -> ExitCode {
    keel_common::alloc::tune(MMAP_FROM);
    keel_common::alloc::limit_arenas(ARENAS);
    let cli = Cli::parse();
    if let Cmd::UpgradeWatchdog { state_dir } = &cli.command {
        // Runs without the agent's configuration: everything it needs is in pending.json.
        return match keel_agent::upgrade::watchdog(state_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keel-agent upgrade-watchdog: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let (purpose, log_dir, servers) = match &cli.command {
        Cmd::Run(a) => (Purpose::Run, a.log_dir.clone(), a.servers.clone()),
        _ => (Purpose::Other, None, Vec::new()),
    };
    let overrides = Overrides {
        id: cli.id.clone(),
        state_dir: cli.state_dir.clone(),
        log_dir,
        servers,
    };
    let config = match AgentConfig::load(cli.config.as_deref(), &overrides, purpose) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keel-agent: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE as u8);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .max_blocking_threads(BLOCKING)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keel-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Cmd::Id => match keel_agent::pki::load(&config.agent.state_dir) {
            // Enrolled: the ID in the certificate is the one the agent uses.
            Ok(identity) => {
                println!("{}", identity.info.agent_id);
                ExitCode::SUCCESS
            }
            Err(_) => print_derived_id(&config),
        },
        Cmd::Enroll(args) => {
            let _log = logging::init(&stderr_only("warn"), Vec::new());
            let credential = match (args.token, args.token_file, args.key_file) {
                (_, _, Some(f)) => match enroll::read_agent_key(&f) {
                    Ok(k) => Credential::Key(k),
                    Err(e) => {
                        eprintln!("keel-agent: {e:#}");
                        return ExitCode::from(EX_USAGE as u8);
                    }
                },
                (Some(t), _, None) => Credential::Token(Secret::new(t)),
                (None, Some(f), None) => match std::fs::read_to_string(&f) {
                    Ok(t) => Credential::Token(Secret::new(t.trim().to_owned())),
                    Err(e) => {
                        eprintln!("keel-agent: cannot read --token-file {}: {e}", f.display());
                        return ExitCode::from(EX_USAGE as u8);
                    }
                },
                (None, None, None) => {
                    eprintln!(
                        "keel-agent: enroll needs a token (--token, KEEL_ENROLL_TOKEN or --token-file) or --key-file"
                    );
                    return ExitCode::from(EX_USAGE as u8);
                }
            };
            let opts = EnrollOptions {
                server: args.server,
                credential,
                ca_fingerprint: args.ca_fingerprint,
                trust_on_first_use: args.trust_on_first_use,
            };
            match runtime.block_on(enroll::enroll(&config, &opts)) {
                Ok(id) => {
                    println!("{id}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keel-agent: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run(_) => run_agent(runtime, config),
        Cmd::UpgradeWatchdog { .. } => ExitCode::SUCCESS,
    }
}

/// The ID an agent not enrolled yet would enroll with.
fn print_derived_id(config: &AgentConfig) -> ExitCode {
    match keel_agent::id::resolve(&config.agent.id, &config.agent.host_root, &config.agent.state_dir) {
        Ok((id, _)) => {
            println!("{id}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keel-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn stderr_only(filter: &str) -> LogOptions {
    LogOptions {
        dir: None,
        file_prefix: "keel-agent".into(),
        max_files: 1,
        default_filter: filter.into(),
        stderr: true,
        format: LogFormat::Text,
    }
}

fn run_agent(runtime: tokio::runtime::Runtime, config: AgentConfig) -> ExitCode {
    let (upstream, logs) = UpstreamErrors::new();
    let opts = LogOptions {
        dir: Some(config.agent.log_dir.clone()),
        file_prefix: "keel-agent".into(),
        max_files: config.log.max_files,
        default_filter: config.log.level.clone(),
        stderr: true,
        format: config.log.format,
    };
    let log = match logging::init(&opts, vec![Box::new(upstream)]) {
        Ok(g) => g,
        Err(e @ logging::LogError::Filter { .. }) => {
            eprintln!("keel-agent: {e}");
            return ExitCode::from(EX_USAGE as u8);
        }
        Err(e) => {
            eprintln!("keel-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.spawn(log.drop_reporter());
    let grace = config.agent.shutdown_grace;
    let result = runtime.block_on(async move {
        let shutdown = keel_common::shutdown::on_signal();
        let run = run::run(config, shutdown.clone(), logs);
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => r,
            _ = shutdown.cancelled() => match tokio::time::timeout(grace, &mut run).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(?grace, "graceful stop took longer than the grace period; exiting");
                    Ok(Exit::Stopped)
                }
            },
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(Exit::Stopped) => ExitCode::SUCCESS,
        Ok(Exit::Restart) => {
            drop(log);
            // Replace this process with a fresh copy of itself, same arguments.
            let args: Vec<_> = std::env::args_os().collect();
            let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from(&args[0]));
            let err = std::process::Command::new(exe).args(&args[1..]).exec();
            eprintln!("keel-agent: restart failed: {err}");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "keel-agent failed");
            eprintln!("keel-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
