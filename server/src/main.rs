//! keel-server: parses arguments, loads configuration, calls the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use keel_common::config::{ConfigError, EX_USAGE};
use keel_common::logging::{self, LogFormat, LogOptions};
use keel_server::admin::{self, RevokeTarget};
use keel_server::config::{Overrides, ServerConfig};
use keel_server::store::Role;
use keel_server::{quickstart, serve};

#[derive(Parser)]
#[command(name = "keel-server", version = keel_common::VERSION, about = "The Keel server")]
struct Cli {
    /// Configuration file [default: /etc/keel/server.toml if it exists].
    #[arg(long, global = true, env = "KEEL_CONFIG")]
    config: Option<PathBuf>,
    /// State directory (overrides `data_dir`).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gRPC and HTTP listeners.
    Serve(ServeArgs),
    /// Run a server and a local agent on embedded defaults, until Ctrl-C.
    Quickstart(QuickstartArgs),
    /// Certificate authority.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Enrollment and API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Args)]
struct ServeArgs {
    /// gRPC listen address (overrides `grpc.listen`).
    #[arg(long)]
    grpc_listen: Option<String>,
    /// HTTP listen address (overrides `http.listen`).
    #[arg(long)]
    http_listen: Option<String>,
    /// Write the bound addresses as JSON here once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Args)]
struct QuickstartArgs {
    /// State directory.
    #[arg(long, default_value = ".keel-quickstart")]
    dir: PathBuf,
    /// The keel-agent binary [default: next to keel-server].
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// gRPC port on 127.0.0.1.
    #[arg(long, default_value_t = 6751)]
    grpc_port: u16,
    /// HTTP port on 127.0.0.1.
    #[arg(long, default_value_t = 6752)]
    http_port: u16,
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create the CA and the server certificate.
    Init {
        /// Extra subject alternative names for the server certificate.
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Print the CA fingerprint that agents pin.
    Fingerprint,
    /// Create the Ed25519 release key that signs plugin and agent packages; prints
    /// the public key agents pin.
    ReleaseKey,
    /// Revoke an agent's certificates, or one certificate.
    Revoke {
        /// Every certificate of this agent.
        #[arg(long, conflicts_with = "serial", required_unless_present = "serial")]
        agent: Option<String>,
        /// One certificate, by hex serial.
        #[arg(long)]
        serial: Option<String>,
        /// Recorded with the revocation.
        #[arg(long, default_value = "revoked by keel-server ca revoke")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Make an enrollment token, or an API token with --admin/--role.
    Create {
        /// Lifetime, e.g. 1h or 7d [default: pki.enrollment_token_ttl; API tokens: none].
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Enrollments allowed with this token.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Make an API token with the admin role.
        #[arg(long, conflicts_with = "role")]
        admin: bool,
        /// Make an API token with this role: admin, operator or viewer.
        #[arg(long, value_parser = parse_role)]
        role: Option<Role>,
        /// Free text, shown in listings.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by ID.
    Revoke {
        /// Token ID from `token list`.
        id: String,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("unknown role {s:?}: expected admin, operator or viewer"))
}

fn load(cli: &Cli, serve: Option<&ServeArgs>) -> Result<ServerConfig, ConfigError> {
    let overrides = Overrides {
        data_dir: cli.data_dir.clone(),
        grpc_listen: serve.and_then(|s| s.grpc_listen.clone()),
        http_listen: serve.and_then(|s| s.http_listen.clone()),
    };
    ServerConfig::load(cli.config.as_deref(), &overrides)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match &cli.command {
        Cmd::Quickstart(_) => None,
        Cmd::Serve(args) => Some(load(&cli, Some(args))),
        _ => Some(load(&cli, None)),
    };
    let config = match config.transpose() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keel-server: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE as u8);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keel-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel-server: {e:#}");
            // A log filter that does not parse is a usage error like any other.
            if matches!(e.downcast_ref(), Some(logging::LogError::Filter { .. })) {
                ExitCode::from(EX_USAGE as u8)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// For the long-running commands: what departed streams freed goes back to the
/// system ([`keel_server::memory`]).
fn give_memory_back() {
    keel_common::alloc::tune(keel_server::memory::MMAP_FROM);
    if let Err(e) = keel_server::memory::spawn_trimmer() {
        tracing::warn!(error = %e, "cannot start the memory trimmer; freed memory stays with the process");
    }
}

fn init_logging(config: Option<&ServerConfig>, stderr_filter: &str) -> anyhow::Result<logging::LogGuard> {
    let opts = LogOptions {
        dir: config.and_then(|c| c.log.dir.clone()),
        file_prefix: "keel-server".into(),
        max_files: config.map_or(7, |c| c.log.max_files),
        default_filter: config.map_or_else(|| stderr_filter.to_owned(), |c| c.log.level.clone()),
        stderr: true,
        format: config.map_or(LogFormat::Text, |c| c.log.format),
    };
    Ok(logging::init(&opts, Vec::new())?)
}

async fn run(cli: Cli, config: Option<ServerConfig>) -> anyhow::Result<()> {
    let config = || config.ok_or_else(|| anyhow::anyhow!("no configuration"));
    match cli.command {
        Cmd::Serve(args) => serve_cmd(config()?, args).await,
        Cmd::Quickstart(args) => quickstart_cmd(args).await,
        Cmd::Ca(cmd) => ca_cmd(&config()?, cmd).await,
        Cmd::Token(cmd) => token_cmd(&config()?, cmd).await,
    }
}

/// `serve`: logging to the configured place, then the server until a signal.
async fn serve_cmd(config: ServerConfig, args: ServeArgs) -> anyhow::Result<()> {
    let log = init_logging(Some(&config), "info")?;
    tokio::spawn(log.drop_reporter());
    give_memory_back();
    let shutdown = keel_common::shutdown::on_signal();
    serve::run(config, shutdown, args.ready_file).await
}

/// `quickstart`: a server and one enrolled agent in a directory of their own.
async fn quickstart_cmd(args: QuickstartArgs) -> anyhow::Result<()> {
    let dir = std::path::absolute(&args.dir)?;
    let agent_bin = match args.agent_bin {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("keel-agent"),
    };
    let opts = quickstart::Options {
        dir,
        agent_bin,
        grpc_port: args.grpc_port,
        http_port: args.http_port,
    };
    let config = quickstart::server_config(&opts)?;
    let log = logging::init(
        &LogOptions {
            dir: config.log.dir.clone(),
            file_prefix: "keel-server".into(),
            max_files: config.log.max_files,
            default_filter: "info".into(),
            stderr: false,
            format: config.log.format,
        },
        Vec::new(),
    )?;
    tokio::spawn(log.drop_reporter());
    give_memory_back();
    quickstart::run(opts, keel_common::shutdown::on_signal()).await
}

/// `ca …`: the CA, the release key and revocation.
async fn ca_cmd(config: &ServerConfig, cmd: CaCmd) -> anyhow::Result<()> {
    let _log = init_logging(None, "warn")?;
    match cmd {
        CaCmd::Init { sans } => {
            let fp = admin::ca_init(config, &sans)?;
            println!("CA created in {}", config.pki_dir().display());
            println!("fingerprint: {fp}");
        }
        CaCmd::Fingerprint => println!("{}", admin::ca_fingerprint(config)?),
        CaCmd::ReleaseKey => {
            let public = admin::release_key(config)?;
            eprintln!(
                "release key created in {}; pin this public key in agent.toml:",
                config.pki_dir().display()
            );
            println!("{public}");
        }
        CaCmd::Revoke { agent, serial, reason } => {
            let target = match (agent, serial) {
                (Some(a), _) => RevokeTarget::Agent(a),
                (None, Some(s)) => RevokeTarget::Serial(s),
                (None, None) => anyhow::bail!("give --agent or --serial"),
            };
            let revoked = admin::ca_revoke(config, &target, &reason).await?;
            if revoked.is_empty() {
                anyhow::bail!("nothing to revoke for {target:?}");
            }
            for s in revoked {
                println!("revoked {s}");
            }
        }
    }
    Ok(())
}

/// `token …`: enrollment and API tokens.
async fn token_cmd(config: &ServerConfig, cmd: TokenCmd) -> anyhow::Result<()> {
    let _log = init_logging(None, "warn")?;
    match cmd {
        TokenCmd::Create {
            ttl,
            uses,
            admin: is_admin,
            role,
            description,
        } => {
            let role = if is_admin { Some(Role::Admin) } else { role };
            let t = admin::token_create(config, role, ttl, uses, &description).await?;
            eprintln!("token {} created; the secret is shown once:", t.id);
            println!("{}", t.secret.expose());
        }
        TokenCmd::List => {
            println!(
                "{:<14} {:<11} {:<9} {:<25} description",
                "id", "kind", "uses", "expires"
            );
            for t in admin::token_list(config).await? {
                let uses = t.uses.map(|(u, m)| format!("{u}/{m}")).unwrap_or_default();
                let expires = match (t.revoked_at, t.expires_at) {
                    (Some(_), _) => "revoked".to_owned(),
                    (None, Some(e)) => keel_common::time::rfc3339_ms(e),
                    (None, None) => "never".to_owned(),
                };
                println!(
                    "{:<14} {:<11} {:<9} {:<25} {}",
                    t.id, t.kind, uses, expires, t.description
                );
            }
        }
        TokenCmd::Revoke { id } => {
            if !admin::token_revoke(config, &id).await? {
                anyhow::bail!("no unrevoked token {id}");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}
