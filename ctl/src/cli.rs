//! The command line of `keelctl`, as clap derive types. Operators' scripts depend
//! on these command and flag names: change them only by adding.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use keel_common::secret::Secret;

/// The help heading of the options every command takes.
const GLOBAL: &str = "Global options";

/// `keelctl`: the Keel console on the command line.
#[derive(Debug, Parser)]
#[command(
    name = "keelctl",
    version = keel_common::VERSION,
    about = "The Keel console on the command line",
    after_help = "The server and token come from --server/--token, else KEEL_SERVER/KEEL_TOKEN, else the \
                  configuration file ($XDG_CONFIG_HOME/keel/keelctl.toml or ~/.config/keel/keelctl.toml: \
                  keys server, token, token_file, ca_file)."
)]
pub struct Cli {
    /// Where the server is and how to reach it.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Output options.
    #[command(flatten)]
    pub output: OutputArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The server, the token and the CA to trust.
#[derive(Debug, Default, Clone, Args)]
pub struct ConnArgs {
    /// Server URL, e.g. https://keel.example:6752 [env: KEEL_SERVER].
    #[arg(long, global = true, value_name = "URL", help_heading = GLOBAL)]
    pub server: Option<String>,
    /// API token [env: KEEL_TOKEN]. Prefer --token-file: a flag shows in the process list.
    #[arg(long, global = true, value_name = "TOKEN", conflicts_with = "token_file", help_heading = GLOBAL)]
    pub token: Option<Secret>,
    /// File holding the API token [env: KEEL_TOKEN_FILE].
    #[arg(long, global = true, value_name = "PATH", help_heading = GLOBAL)]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA to trust for an HTTPS server (only that CA) [env: KEEL_CA_FILE].
    #[arg(long, global = true, value_name = "PEM", help_heading = GLOBAL)]
    pub ca_file: Option<PathBuf>,
    /// Configuration file [default: $XDG_CONFIG_HOME/keel/keelctl.toml or ~/.config/keel/keelctl.toml].
    #[arg(long, global = true, value_name = "PATH", help_heading = GLOBAL)]
    pub config: Option<PathBuf>,
}

/// How results are printed.
#[derive(Debug, Default, Clone, Copy, Args)]
pub struct OutputArgs {
    /// Print the server's JSON (pretty) instead of tables.
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Agents: list, show, tag, delete, revoke, effective configuration.
    #[command(subcommand)]
    Agents(AgentsCmd),
    /// The component store: packages of plugins and of keel-agent.
    #[command(subcommand)]
    Components(ComponentsCmd),
    /// Which version of a component applies to which agents.
    #[command(subcommand)]
    Policies(PoliciesCmd),
    /// Tasks rolled out to many agents in batches.
    #[command(subcommand)]
    Tasks(TasksCmd),
    /// The audit log of changes made through the API, newest first.
    Audit(AuditArgs),
    /// API and enrollment tokens (admin only).
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// The keeper of file-delivery: secret files sealed to each host, sent only when changed.
    #[command(subcommand)]
    Files(FilesCmd),
    /// The TLS inventory: certificates of intranet services, scanned through agents' proxy plugins.
    #[command(subcommand)]
    Certs(CertsCmd),
}

/// `keelctl certs …`
#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Scan targets through an agent's proxy plugin and record their certificates;
    /// exits 2 if any target failed (the host's allow list decides what it reaches).
    Scan {
        /// The agent whose proxy reaches the targets.
        #[arg(long, value_name = "ID")]
        agent: String,
        /// `host:port` targets.
        #[arg(required = true, value_name = "HOST:PORT")]
        targets: Vec<String>,
    },
    /// The inventory, soonest expiry first.
    List {
        /// Only targets scanned through this agent.
        #[arg(long, value_name = "ID")]
        agent: Option<String>,
        /// Only certificates that expire within this many days.
        #[arg(long, value_name = "DAYS")]
        expiring_within: Option<u32>,
    },
    /// What the last scans found wrong (expired, weak key, hostname mismatch,
    /// untrusted root, …), most severe first; exits 2 if any is high or critical.
    Findings {
        /// Only targets scanned through this agent.
        #[arg(long, value_name = "ID")]
        agent: Option<String>,
        /// Only findings this severe or worse.
        #[arg(long, value_name = "SEVERITY", value_parser = ["low", "medium", "high", "critical"])]
        min_severity: Option<String>,
    },
    /// Scan targets through an agent now and then every interval, keeping each
    /// scan in the history; prints the schedule's ID.
    Schedule {
        /// The agent whose proxy reaches the targets.
        #[arg(long, value_name = "ID")]
        agent: String,
        /// How often, e.g. `6h`, `1d`.
        #[arg(long, value_name = "DURATION")]
        every: String,
        /// `host:port` targets.
        #[arg(required = true, value_name = "HOST:PORT")]
        targets: Vec<String>,
    },
    /// The scheduled audits, soonest run first.
    Schedules,
    /// Stop a scheduled audit (its history stays).
    Unschedule {
        /// The schedule's ID.
        id: String,
    },
    /// Sweep what the agent's allow list permits (never beyond it) for services,
    /// scan each, and with --every schedule those that speak TLS.
    Discover {
        /// The agent whose proxy sweeps.
        #[arg(long, value_name = "ID")]
        agent: String,
        /// Ports to try where the allow list permits a wide range (default: the
        /// usual TLS ports).
        #[arg(long = "port", value_name = "PORT")]
        ports: Vec<u16>,
        /// Schedule the TLS services found, this often (e.g. `1d`).
        #[arg(long, value_name = "DURATION")]
        every: Option<String>,
    },
    /// Every scan, newest first, and whether the certificate changed.
    History {
        /// Only scans through this agent.
        #[arg(long, value_name = "ID")]
        agent: Option<String>,
        /// Only scans of this target.
        #[arg(long, value_name = "HOST:PORT")]
        target: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// `keelctl files …`
#[derive(Debug, Subcommand)]
pub enum FilesCmd {
    /// Make a keeper key: writes its secret to PATH (0600), prints the public key for
    /// the hosts' keeper_keys. Needs no server.
    Keygen {
        /// Where to write the keeper's secret key; must not exist.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
    /// The files an agent holds, with their versions and states (ok, modified, missing).
    List(FilesTarget),
    /// Seal files to each agent's host key, sign them and send those that are missing or changed.
    Push(FilesPushArgs),
    /// Remove files from agents (a signed removal).
    Remove(FilesRemoveArgs),
    /// Which version of which file each host holds, against the newest pushed, and
    /// which hosts are behind.
    Status(FilesStatusArgs),
}

/// `keelctl files status …`
#[derive(Debug, Args)]
pub struct FilesStatusArgs {
    /// Only this agent.
    #[arg(long, value_name = "ID")]
    pub agent: Option<String>,
    /// Only this file.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Only files a host is behind on.
    #[arg(long)]
    pub behind: bool,
}

/// The agents and how their host keys are trusted.
#[derive(Debug, Clone, Args)]
pub struct FilesTarget {
    /// Agent IDs.
    #[arg(long = "agent", value_name = "ID")]
    pub agents: Vec<String>,
    /// Every agent with this tag that runs file-delivery.
    #[arg(long, value_name = "TAG", conflicts_with = "agents")]
    pub tag: Option<String>,
    /// Every agent that runs file-delivery.
    #[arg(long, conflicts_with_all = ["agents", "tag"])]
    pub all: bool,
    /// The pinned host keys [default: $XDG_CONFIG_HOME/keel/file-hosts.json or ~/.config/keel/file-hosts.json].
    #[arg(long, value_name = "PATH")]
    pub known_hosts: Option<PathBuf>,
    /// Pin this host key (from `file-delivery host-key` on the host) for the one agent given.
    #[arg(long, value_name = "HEX")]
    pub accept_host_key: Option<String>,
    /// Pin the host key of agents seen for the first time without checking it (trust on first use).
    #[arg(long)]
    pub trust_new_hosts: bool,
    /// How long each agent has to answer an inventory or a part of a push, in seconds.
    #[arg(long, value_name = "S", default_value_t = 30)]
    pub timeout: u64,
}

/// `keelctl files push …`
#[derive(Debug, Args)]
pub struct FilesPushArgs {
    /// The agents.
    #[command(flatten)]
    pub target: FilesTarget,
    /// The keeper's secret key (from `files keygen`).
    #[arg(long, value_name = "PATH")]
    pub keeper_key: PathBuf,
    /// Permission bits of the delivered files (at most 0644).
    #[arg(long, value_name = "OCTAL", default_value = "0600")]
    pub mode: String,
    /// A local user allowed to fetch the files from the host's file server (repeat for more).
    #[arg(long = "reader", value_name = "USER")]
    pub readers: Vec<String>,
    /// Files as NAME=PATH: NAME on the host, PATH here.
    #[arg(required = true, value_name = "NAME=PATH")]
    pub files: Vec<String>,
}

/// `keelctl files remove …`
#[derive(Debug, Args)]
pub struct FilesRemoveArgs {
    /// The agents.
    #[command(flatten)]
    pub target: FilesTarget,
    /// The keeper's secret key.
    #[arg(long, value_name = "PATH")]
    pub keeper_key: PathBuf,
    /// Names to remove.
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

/// `keelctl agents …`
#[derive(Debug, Subcommand)]
pub enum AgentsCmd {
    /// List agents; every filter given must hold.
    List(AgentFilter),
    /// One agent with its heartbeat and plugins.
    Show {
        /// Agent ID.
        id: String,
    },
    /// Add tags to an agent.
    Tag {
        /// Agent ID.
        id: String,
        /// Tags to add: 1-64 characters of [A-Za-z0-9._:-].
        #[arg(required = true)]
        tags: Vec<String>,
    },
    /// Remove tags from an agent.
    Untag {
        /// Agent ID.
        id: String,
        /// Tags to remove.
        #[arg(required = true)]
        tags: Vec<String>,
    },
    /// Decommission an agent: revoke its certificates, close its stream, forget it.
    Delete {
        /// Agent ID.
        id: String,
    },
    /// The agent's effective configuration and what chose each entry.
    Config {
        /// Agent ID.
        id: String,
    },
    /// Revoke every certificate of the agent and close its stream (admin).
    Revoke {
        /// Agent ID.
        id: String,
    },
}

/// Filters of `agents list`.
#[derive(Debug, Default, Clone, Args)]
pub struct AgentFilter {
    /// Only agents that are online.
    #[arg(long, conflicts_with = "offline")]
    pub online: bool,
    /// Only agents that are offline.
    #[arg(long)]
    pub offline: bool,
    /// Only agents of this version.
    #[arg(long, value_name = "V")]
    pub version: Option<String>,
    /// Only agents with this tag.
    #[arg(long, value_name = "T")]
    pub tag: Option<String>,
    /// Only agents whose host name contains this.
    #[arg(long, value_name = "SUBSTR")]
    pub hostname: Option<String>,
    /// Only agents running this plugin.
    #[arg(long, value_name = "NAME")]
    pub plugin: Option<String>,
    /// Only agents whose ID, host name, addresses or a tag contain this
    /// (ignoring case).
    #[arg(long, value_name = "TEXT")]
    pub search: Option<String>,
    /// At most this many agents (by ID); default: every page.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

/// `keelctl components …`
#[derive(Debug, Subcommand)]
pub enum ComponentsCmd {
    /// List packages, of every component or of one.
    List {
        /// Only this component.
        name: Option<String>,
    },
    /// Upload a package of a component version, streaming FILE.
    Upload(UploadArgs),
    /// Delete a version (all its packages); refused while a policy uses it.
    Delete {
        /// Component.
        name: String,
        /// Version.
        version: String,
    },
}

/// `keelctl components upload …`
#[derive(Debug, Clone, Args)]
pub struct UploadArgs {
    /// Component: `keel-agent` or a plugin name.
    pub name: String,
    /// Version, 1-64 characters of [A-Za-z0-9._+-].
    pub version: String,
    /// The package file.
    pub file: PathBuf,
    /// Architecture the package runs on.
    #[arg(long, value_enum, default_value_t = Arch::Any)]
    pub arch: Arch,
    /// Package type: exec or tar.gz for plugins, deb or rpm for keel-agent.
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    pub kind: PackageType,
    /// Hex Ed25519 signature of the package; without it the server signs.
    #[arg(long, value_name = "HEX")]
    pub signature: Option<String>,
}

/// A package architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Arch {
    /// Any architecture.
    #[value(name = "any")]
    Any,
    /// x86-64.
    #[value(name = "x86_64")]
    X86_64,
    /// 64-bit ARM.
    #[value(name = "aarch64")]
    Aarch64,
}

impl Arch {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Any => "any",
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

/// A package type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PackageType {
    /// A single executable (ELF or script).
    #[value(name = "exec")]
    Exec,
    /// A gzipped tar archive.
    #[value(name = "tar.gz")]
    TarGz,
    /// A Debian package (keel-agent).
    #[value(name = "deb")]
    Deb,
    /// An RPM package (keel-agent).
    #[value(name = "rpm")]
    Rpm,
}

impl PackageType {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            PackageType::Exec => "exec",
            PackageType::TarGz => "tar.gz",
            PackageType::Deb => "deb",
            PackageType::Rpm => "rpm",
        }
    }
}

/// Which agents a policy or a task is for: exactly one of these.
#[derive(Debug, Clone, Default, Args)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// Every agent.
    #[arg(long)]
    pub all: bool,
    /// Agents with any of these tags (repeat, or separate with commas).
    #[arg(long = "tag", value_name = "T", num_args = 1.., value_delimiter = ',')]
    pub tags: Vec<String>,
    /// These agents (repeat, or separate with commas).
    #[arg(long = "agent", value_name = "ID", num_args = 1.., value_delimiter = ',')]
    pub agents: Vec<String>,
    /// Agents whose platform, platform family or architecture is this.
    #[arg(long, value_name = "P")]
    pub platform: Option<String>,
}

/// `keelctl policies …`
#[derive(Debug, Subcommand)]
pub enum PoliciesCmd {
    /// List policies.
    List,
    /// Create a policy; refused if it names a missing version or conflicts with another.
    Create(PolicyCreateArgs),
    /// Change a policy's version (and detail; without --detail the current detail is kept).
    Update {
        /// Policy ID or name.
        id: String,
        /// The new version.
        #[arg(long, value_name = "V")]
        version: String,
        /// The new plugin detail.
        #[arg(long, value_name = "D")]
        detail: Option<String>,
    },
    /// Delete a policy.
    Delete {
        /// Policy ID or name.
        id: String,
    },
}

/// `keelctl policies create …`
#[derive(Debug, Clone, Args)]
pub struct PolicyCreateArgs {
    /// Unique name, 1-64 characters of [A-Za-z0-9._-].
    #[arg(long, value_name = "N")]
    pub name: String,
    /// `keel-agent` or a plugin.
    #[arg(long, value_name = "C")]
    pub component: String,
    /// A version the component store has.
    #[arg(long, value_name = "V")]
    pub version: String,
    /// Plugin configuration, passed to it as DETAIL.
    #[arg(long, value_name = "D")]
    pub detail: Option<String>,
    /// Which agents.
    #[command(flatten)]
    pub target: TargetArgs,
}

/// `keelctl tasks …`
#[derive(Debug, Subcommand)]
pub enum TasksCmd {
    /// Create a task and print its ID.
    Create(TaskCreateArgs),
    /// List tasks, newest first.
    List {
        /// Only tasks in this state: running, paused, succeeded, failed or cancelled.
        #[arg(long, value_name = "S")]
        state: Option<String>,
        /// At most this many.
        #[arg(long, value_name = "N")]
        limit: Option<i64>,
    },
    /// A task with its subtasks, or a single task by token.
    Show {
        /// Task ID or subtask token.
        id: String,
    },
    /// Pause a running task after its current batch.
    Pause {
        /// Task ID.
        id: String,
    },
    /// Resume a paused task.
    Resume {
        /// Task ID.
        id: String,
    },
    /// Cancel a task: subtasks not sent yet are not sent.
    Cancel {
        /// Task ID.
        id: String,
    },
    /// Follow a task until it is no longer running; exit 0 if it succeeded, 2 if not.
    Watch {
        /// Task ID (or a single task's token).
        id: String,
        /// How often to poll, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..))]
        interval_ms: u64,
    },
}

/// A task kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskKind {
    /// Send each agent its effective configuration.
    #[value(name = "sync-config")]
    SyncConfig,
    /// Restart the agents.
    #[value(name = "restart-agent")]
    RestartAgent,
    /// Send a task to a plugin (needs --data-type and --object).
    #[value(name = "plugin-task")]
    PluginTask,
}

impl TaskKind {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::SyncConfig => "sync-config",
            TaskKind::RestartAgent => "restart-agent",
            TaskKind::PluginTask => "plugin-task",
        }
    }
}

/// `keelctl tasks create …`
#[derive(Debug, Clone, Args)]
pub struct TaskCreateArgs {
    /// What the task does.
    #[arg(value_enum)]
    pub kind: TaskKind,
    /// Which agents (resolved now).
    #[command(flatten)]
    pub target: TargetArgs,
    /// Agents per batch [server default: 50].
    #[arg(long, value_name = "N")]
    pub batch_size: Option<u32>,
    /// Fraction (0-1) of finished subtasks that may fail before the task pauses [server default: 0.1].
    #[arg(long, value_name = "F")]
    pub failure_threshold: Option<f64>,
    /// Time an agent has to answer: seconds, or a duration such as 5m [server default: 600].
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<u64>,
    /// plugin-task: the task's data_type.
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        required_if_eq("kind", "plugin-task")
    )]
    pub data_type: Option<i32>,
    /// plugin-task: the plugin.
    #[arg(long, value_name = "NAME", required_if_eq("kind", "plugin-task"))]
    pub object: Option<String>,
    /// plugin-task: the task's data.
    #[arg(long, value_name = "STR")]
    pub data: Option<String>,
}

/// `keelctl audit …`
#[derive(Debug, Clone, Default, Args)]
pub struct AuditArgs {
    /// From this time: RFC 3339, or a duration ago such as 2h.
    #[arg(long, value_name = "RFC3339")]
    pub since: Option<String>,
    /// Until this time: RFC 3339, or a duration ago such as 30m.
    #[arg(long, value_name = "RFC3339")]
    pub until: Option<String>,
    /// Only this token ID (or `anonymous`).
    #[arg(long, value_name = "ID")]
    pub actor: Option<String>,
    /// Only targets containing this text.
    #[arg(long, value_name = "TEXT")]
    pub target: Option<String>,
    /// At most this many entries [server default: 1000].
    #[arg(long, value_name = "N")]
    pub limit: Option<i64>,
}

/// `keelctl tokens …`
#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Make a token: the secret goes to stdout (shown this once), the ID to stderr.
    Create {
        /// The token's role; `enrollment` makes an enrollment token.
        #[arg(long, value_enum)]
        role: TokenRole,
        /// Lifetime: seconds, or a duration such as 12h. API tokens without one do not expire.
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        ttl: Option<u64>,
        /// Enrollments allowed (enrollment tokens) [server default: 1].
        #[arg(long, value_name = "N")]
        uses: Option<u32>,
        /// What the token is for.
        #[arg(long, value_name = "D")]
        description: Option<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token.
    Revoke {
        /// Token ID.
        id: String,
    },
}

/// A token role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenRole {
    /// Everything, including tokens and revocation.
    Admin,
    /// Changes: tags, packages, policies, tasks.
    Operator,
    /// Read only.
    Viewer,
    /// An enrollment token for agents.
    Enrollment,
}

impl TokenRole {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Admin => "admin",
            TokenRole::Operator => "operator",
            TokenRole::Viewer => "viewer",
            TokenRole::Enrollment => "enrollment",
        }
    }
}

/// Whole seconds from `600` or a duration such as `10m`.
pub fn parse_secs(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    humantime::parse_duration(s)
        .map(|d| d.as_secs())
        .map_err(|e| format!("{e}; expected seconds or a duration such as 90s, 10m, 12h"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("keelctl").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn targets_take_exactly_one_kind() {
        let cli = parse(&[
            "policies",
            "create",
            "--name",
            "p",
            "--component",
            "c",
            "--version",
            "1",
            "--tag",
            "a,b",
            "--tag",
            "c",
        ])
        .unwrap();
        let Command::Policies(PoliciesCmd::Create(a)) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!(a.target.tags, ["a", "b", "c"]);
        assert!(
            parse(&["tasks", "create", "sync-config"]).is_err(),
            "a target is required"
        );
        assert!(parse(&["tasks", "create", "sync-config", "--all", "--tag", "x"]).is_err());
        assert!(
            parse(&[
                "tasks",
                "create",
                "sync-config",
                "--agent",
                "a",
                "b",
                "--batch-size",
                "2"
            ])
            .is_ok()
        );
    }

    #[test]
    fn plugin_tasks_need_a_data_type_and_an_object() {
        assert!(parse(&["tasks", "create", "plugin-task", "--all"]).is_err());
        assert!(
            parse(&[
                "tasks",
                "create",
                "plugin-task",
                "--all",
                "--data-type",
                "7",
                "--object",
                "p"
            ])
            .is_ok()
        );
        assert!(parse(&["tasks", "create", "restart-agent", "--all"]).is_ok());
    }

    #[test]
    fn global_flags_go_anywhere_and_tokens_are_not_shown() {
        let cli = parse(&[
            "agents", "list", "--online", "--json", "--token", "s3cret", "--server", "http://x",
        ])
        .unwrap();
        assert!(cli.output.json);
        assert!(!format!("{cli:?}").contains("s3cret"));
        assert!(parse(&["agents", "list", "--online", "--offline"]).is_err());
        assert!(parse(&["agents", "list", "--token", "a", "--token-file", "/f"]).is_err());
    }

    #[test]
    fn upload_flags() {
        let cli = parse(&[
            "components",
            "upload",
            "p",
            "1.0",
            "f",
            "--type",
            "tar.gz",
            "--arch",
            "x86_64",
        ])
        .unwrap();
        let Command::Components(ComponentsCmd::Upload(u)) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!((u.kind, u.arch), (PackageType::TarGz, Arch::X86_64));
        assert!(
            parse(&["components", "upload", "p", "1.0", "f"]).is_err(),
            "--type is required"
        );
    }

    #[test]
    fn seconds_or_durations() {
        assert_eq!(parse_secs("90"), Ok(90));
        assert_eq!(parse_secs("10m"), Ok(600));
        assert!(parse_secs("soon").is_err());
    }
}
