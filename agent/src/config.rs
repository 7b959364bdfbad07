//! `agent.toml`: parsed once at start-up into typed structs.
//!
//! Layers: the file (default `/etc/keel/agent.toml`), then `KEEL_*` environment
//! variables, then flags. Invalid configuration exits with code 64 and names the
//! file (or variable, or flag), the key and what is wrong.

use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_common::config::{ConfigError, EnvBinding, EnvKind, Layers};
use serde::Deserialize;

/// Where the agent looks for its configuration unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/keel/agent.toml";

/// Environment overrides, all with the `KEEL_` prefix.
pub const ENV: &[EnvBinding] = &[
    ("KEEL_AGENT_ID", "agent.id", EnvKind::Str),
    ("KEEL_STATE_DIR", "agent.state_dir", EnvKind::Str),
    ("KEEL_LOG_DIR", "agent.log_dir", EnvKind::Str),
    ("KEEL_HEARTBEAT_INTERVAL", "agent.heartbeat_interval", EnvKind::Str),
    ("KEEL_RELEASE_CODE_AFTER", "agent.release_code_after", EnvKind::Str),
    ("KEEL_SERVER_PRIVATE", "server.private", EnvKind::List),
    ("KEEL_SERVER_PUBLIC", "server.public", EnvKind::List),
    ("KEEL_DISCOVERY_URL", "server.discovery_url", EnvKind::Str),
];

/// The whole agent configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Identity, directories and timing.
    #[serde(default)]
    pub agent: AgentSection,
    /// How to reach the server.
    #[serde(default)]
    pub server: ServerSection,
    /// Batching and buffering of records.
    #[serde(default)]
    pub transfer: TransferSection,
    /// The plugin runtime.
    #[serde(default)]
    pub plugins: PluginsSection,
    /// Self-upgrade with the system package manager.
    #[serde(default)]
    pub upgrade: UpgradeSection,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
    /// The agent's own Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsSection,
}

/// The agent's own Prometheus endpoint: off unless `listen` is set, and only on
/// a loopback address, since it has no authentication.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Where `GET /metrics` answers, e.g. `127.0.0.1:9464`.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// Identity, directories and timing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Explicit agent ID. Empty: derived from the host (cloud instance-id, DMI
    /// product_uuid and MAC; then /etc/machine-id; then the stored ID; then random).
    #[serde(default)]
    pub id: String,
    /// Root of the host filesystem for identity and platform facts. Set it when the
    /// agent runs in a container with the host mounted elsewhere.
    #[serde(default = "default_host_root")]
    pub host_root: PathBuf,
    /// State: ID, certificates, metadata, spool, plugins.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Rotating log files.
    #[serde(default = "default_log_dir")]
    pub log_dir: PathBuf,
    /// Heartbeat period.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Bound on a graceful stop after SIGTERM.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long after start the agent pages out its own code
    /// (`keel_common::residency`): what start-up alone ran leaves memory, and
    /// what runs later comes back as it runs. 0 never does.
    #[serde(default = "default_release_code_after", with = "humantime_serde")]
    pub release_code_after: Duration,
}

/// How to reach the server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Private gRPC addresses, `host:port`, tried after discovery.
    #[serde(default)]
    pub private: Vec<String>,
    /// Public gRPC addresses, tried last.
    #[serde(default)]
    pub public: Vec<String>,
    /// Service discovery URL (a keel-server's `/discovery`), tried first.
    #[serde(default)]
    pub discovery_url: String,
    /// Name to verify in the server certificate. Empty: the host of each address.
    #[serde(default)]
    pub server_name: String,
    /// Connect (TCP and TLS) timeout.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// First reconnect delay.
    #[serde(default = "default_backoff_min", with = "humantime_serde")]
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
}

/// Batching and buffering of records.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferSection {
    /// How long a batch may gather records in memory before it goes to the spool.
    /// 0 (the default): records are spooled as soon as they are read, in batches of
    /// whatever arrived meanwhile, so a kill -9 of the agent loses nothing it had
    /// read. Longer makes fewer, larger batches, and widens that window.
    #[serde(default = "default_batch_interval", with = "humantime_serde")]
    pub batch_interval: Duration,
    /// A batch is sent once it holds this many records.
    #[serde(default = "default_batch_records")]
    pub batch_max_records: usize,
    /// A batch is sent once it holds this many payload bytes.
    #[serde(default = "default_batch_bytes")]
    pub batch_max_bytes: usize,
    /// Bound on the disk spool of unacknowledged batches. While connected a full
    /// spool holds producers back; while disconnected the oldest data is evicted and
    /// counted in the heartbeat.
    #[serde(default = "default_spool_bytes")]
    pub spool_max_bytes: u64,
    /// Spool segment size; eviction and deletion work a segment at a time.
    #[serde(default = "default_segment_bytes")]
    pub spool_segment_bytes: u64,
    /// Recent batches also kept in memory, so sending rarely reads the disk.
    #[serde(default = "default_spool_cache")]
    pub spool_cache_bytes: u64,
    /// Free space the spool leaves on its file system: a fuller disk counts as
    /// a full spool.
    #[serde(default = "default_spool_min_free")]
    pub spool_min_free_bytes: u64,
    /// How long after the first write since the last sync the spool is flushed
    /// to stable storage; an idle spool is not synced.
    #[serde(default = "default_spool_sync", with = "humantime_serde")]
    pub spool_sync_interval: Duration,
}

/// Resource limits of one plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    /// Memory limit, bytes (cgroup memory.max / memory.limit_in_bytes).
    #[serde(default = "default_plugin_memory")]
    pub memory_max_bytes: u64,
    /// CPU limit in percent of one CPU (cgroup cpu.max / cfs quota).
    #[serde(default = "default_plugin_cpu")]
    pub cpu_max_percent: u32,
    /// Process limit, against fork bombs (cgroup pids.max).
    #[serde(default = "default_plugin_pids")]
    pub pids_max: u64,
}

/// The plugin runtime.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsSection {
    /// Where plugins are installed. Default `<state_dir>/plugins`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Hex Ed25519 public key that every plugin package must be signed with.
    /// Without it nothing is installed.
    #[serde(default)]
    pub release_public_key: String,
    /// Largest record frame a plugin may write.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// Tasks queued per plugin; beyond it a task is refused as busy.
    #[serde(default = "default_task_queue")]
    pub task_queue: usize,
    /// When stopping a plugin: how long after closing its task pipe (fd 3) it may
    /// keep writing records and exit on its own before it gets SIGTERM.
    #[serde(default = "default_plugin_stop_grace", with = "humantime_serde")]
    pub plugin_stop_grace: Duration,
    /// Between SIGTERM and SIGKILL when stopping a plugin.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub stop_grace: Duration,
    /// First restart delay after a crash.
    #[serde(default = "default_restart_min", with = "humantime_serde")]
    pub restart_backoff_min: Duration,
    /// Longest restart delay.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// Per-URL download limit.
    #[serde(default = "default_download_timeout", with = "humantime_serde")]
    pub download_timeout: Duration,
    /// Largest package accepted, and largest unpacked tar.gz.
    #[serde(default = "default_max_package")]
    pub max_package_bytes: u64,
    /// Put each plugin in its own cgroup with its limits, where cgroups are writable.
    #[serde(default = "default_true")]
    pub cgroups: bool,
    /// Limits for every plugin without its own entry in `limits`.
    #[serde(default)]
    pub default_limits: PluginLimits,
    /// Limits by plugin name.
    #[serde(default)]
    pub limits: std::collections::BTreeMap<String, PluginLimits>,
    /// Where the plugins shipped with the agent package are: `<local_dir>/<name>`.
    #[serde(default = "default_local_dir")]
    pub local_dir: PathBuf,
    /// The local plugin set: packaged plugins to run, by name, until a server sends
    /// this agent a plugin set of its own.
    #[serde(default)]
    pub local: std::collections::BTreeMap<String, LocalPlugin>,
}

/// A plugin of the local set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalPlugin {
    /// Run it.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Passed to the plugin as `DETAIL`.
    #[serde(default)]
    pub detail: String,
}

fn default_local_dir() -> PathBuf {
    PathBuf::from("/usr/lib/keel-agent/plugins")
}

/// Self-upgrade with the system package manager.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeSection {
    /// `deb` or `rpm`; empty: detected from the package manager present.
    #[serde(default)]
    pub package_type: String,
    /// The command that installs a package file (appended as the last argument).
    /// Empty: `dpkg -i` or `rpm -U --oldpackage --replacepkgs`.
    #[serde(default)]
    pub install_command: Vec<String>,
    /// How long a new version has to connect and send a heartbeat before the
    /// previous package is reinstalled.
    #[serde(default = "default_upgrade_window", with = "humantime_serde")]
    pub watchdog_window: Duration,
}

impl Default for UpgradeSection {
    fn default() -> Self {
        Self {
            package_type: String::new(),
            install_command: Vec::new(),
            watchdog_window: default_upgrade_window(),
        }
    }
}

fn default_upgrade_window() -> Duration {
    Duration::from_secs(300)
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// Filter when `KEEL_LOG` is unset.
    #[serde(default = "default_level")]
    pub level: String,
    /// Rotated files kept.
    #[serde(default = "default_log_files")]
    pub max_files: usize,
    /// `text` (the default) or `json`: one JSON object per line, for log shippers.
    #[serde(default)]
    pub format: keel_common::logging::LogFormat,
}

fn default_host_root() -> PathBuf {
    PathBuf::from("/")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/keel-agent")
}
fn default_log_dir() -> PathBuf {
    PathBuf::from("/var/log/keel-agent")
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(60)
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_release_code_after() -> Duration {
    Duration::from_secs(30)
}
fn default_plugin_stop_grace() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_backoff_min() -> Duration {
    Duration::from_secs(1)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}
fn default_batch_interval() -> Duration {
    Duration::ZERO
}
fn default_batch_records() -> usize {
    4096
}
fn default_batch_bytes() -> usize {
    1 << 20
}
fn default_spool_bytes() -> u64 {
    256 << 20
}
fn default_segment_bytes() -> u64 {
    16 << 20
}
fn default_spool_min_free() -> u64 {
    64 << 20
}
fn default_spool_cache() -> u64 {
    32 << 20
}
fn default_spool_sync() -> Duration {
    Duration::from_secs(1)
}
fn default_plugin_memory() -> u64 {
    256 << 20
}
fn default_plugin_cpu() -> u32 {
    100
}
fn default_plugin_pids() -> u64 {
    256
}
fn default_max_frame() -> usize {
    keel_proto::frame::DEFAULT_MAX_FRAME
}
fn default_task_queue() -> usize {
    64
}
fn default_restart_min() -> Duration {
    Duration::from_millis(500)
}
fn default_download_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_max_package() -> u64 {
    256 << 20
}
fn default_true() -> bool {
    true
}
fn default_level() -> String {
    "info".into()
}
fn default_log_files() -> usize {
    7
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            id: String::new(),
            host_root: default_host_root(),
            state_dir: default_state_dir(),
            log_dir: default_log_dir(),
            heartbeat_interval: default_heartbeat(),
            shutdown_grace: default_grace(),
            release_code_after: default_release_code_after(),
        }
    }
}
impl Default for ServerSection {
    fn default() -> Self {
        Self {
            private: Vec::new(),
            public: Vec::new(),
            discovery_url: String::new(),
            server_name: String::new(),
            connect_timeout: default_connect_timeout(),
            backoff_min: default_backoff_min(),
            backoff_max: default_backoff_max(),
        }
    }
}
impl Default for TransferSection {
    fn default() -> Self {
        Self {
            batch_interval: default_batch_interval(),
            batch_max_records: default_batch_records(),
            batch_max_bytes: default_batch_bytes(),
            spool_max_bytes: default_spool_bytes(),
            spool_segment_bytes: default_segment_bytes(),
            spool_cache_bytes: default_spool_cache(),
            spool_min_free_bytes: default_spool_min_free(),
            spool_sync_interval: default_spool_sync(),
        }
    }
}
impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory_max_bytes: default_plugin_memory(),
            cpu_max_percent: default_plugin_cpu(),
            pids_max: default_plugin_pids(),
        }
    }
}
impl Default for PluginsSection {
    fn default() -> Self {
        Self {
            dir: None,
            release_public_key: String::new(),
            max_frame_bytes: default_max_frame(),
            task_queue: default_task_queue(),
            plugin_stop_grace: default_plugin_stop_grace(),
            stop_grace: default_grace(),
            restart_backoff_min: default_restart_min(),
            restart_backoff_max: default_backoff_max(),
            download_timeout: default_download_timeout(),
            max_package_bytes: default_max_package(),
            cgroups: true,
            default_limits: PluginLimits::default(),
            limits: Default::default(),
            local_dir: default_local_dir(),
            local: Default::default(),
        }
    }
}
impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: default_level(),
            max_files: default_log_files(),
            format: keel_common::logging::LogFormat::Text,
        }
    }
}

/// Flag overrides, the last layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--id`.
    pub id: Option<String>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--log-dir`.
    pub log_dir: Option<PathBuf>,
    /// `--server` (repeatable): replaces `server.private`.
    pub servers: Vec<String>,
}

/// What the configuration is loaded for: `run` needs a server address, `id` and
/// `enroll` do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `keel-agent run`.
    Run,
    /// Everything else.
    Other,
}

impl AgentConfig {
    /// The plugin directory.
    pub fn plugin_dir(&self) -> PathBuf {
        self.plugins
            .dir
            .clone()
            .unwrap_or_else(|| self.agent.state_dir.join("plugins"))
    }

    /// Loads the layers. `path` is `--config`; when `None`, the default path is read
    /// if it exists.
    pub fn load(path: Option<&Path>, overrides: &Overrides, purpose: Purpose) -> Result<Self, ConfigError> {
        let (file, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let layers = Layers::from_file(&file, required)?.env(ENV)?;
        Self::from_layers(layers, overrides, purpose)
    }

    /// Parses TOML text alone (tests).
    pub fn from_toml(name: &str, text: &str, purpose: Purpose) -> Result<Self, ConfigError> {
        Self::from_layers(Layers::from_str(name, text)?, &Overrides::default(), purpose)
    }

    fn from_layers(mut layers: Layers, o: &Overrides, purpose: Purpose) -> Result<Self, ConfigError> {
        layers.set_opt("agent.id", o.id.clone(), "--id");
        layers.set_opt(
            "agent.state_dir",
            o.state_dir.as_ref().map(|p| p.display().to_string()),
            "--state-dir",
        );
        layers.set_opt(
            "agent.log_dir",
            o.log_dir.as_ref().map(|p| p.display().to_string()),
            "--log-dir",
        );
        if !o.servers.is_empty() {
            let list = o.servers.iter().map(|s| toml::Value::String(s.clone())).collect();
            layers.set("server.private", toml::Value::Array(list), "--server");
        }
        let source = layers.file_name().to_owned();
        let config: AgentConfig = layers.build()?;
        config.validate(&source, purpose)?;
        Ok(config)
    }

    fn validate(&self, source: &str, purpose: Purpose) -> Result<(), ConfigError> {
        let err = |key: String, message: String| ConfigError {
            source: source.to_owned(),
            key,
            message,
        };
        if !self.agent.id.is_empty() && !keel_common::ids::valid_agent_id(&self.agent.id) {
            return Err(err(
                "agent.id".into(),
                "must be 1-64 characters of [A-Za-z0-9._-]".into(),
            ));
        }
        for (list, name) in [
            (&self.server.private, "server.private"),
            (&self.server.public, "server.public"),
        ] {
            for (i, addr) in list.iter().enumerate() {
                if let Err(why) = check_host_port(addr) {
                    return Err(err(format!("{name}[{i}]"), why));
                }
            }
        }
        let d = &self.server.discovery_url;
        if !(d.is_empty() || d.starts_with("https://") || d.starts_with("http://")) {
            return Err(err(
                "server.discovery_url".into(),
                format!("{d:?} is not an http(s) URL"),
            ));
        }
        if purpose == Purpose::Run
            && self.server.private.is_empty()
            && self.server.public.is_empty()
            && self.server.discovery_url.is_empty()
        {
            return Err(err(
                "server.private".into(),
                "no server address: set server.private, server.public or server.discovery_url".into(),
            ));
        }
        if let Some(addr) = self.metrics.listen
            && !addr.ip().is_loopback()
        {
            return Err(err(
                "metrics.listen".into(),
                format!(
                    "{addr} is not a loopback address: the agent's metrics endpoint has no authentication, so it listens only on 127.0.0.0/8 or ::1"
                ),
            ));
        }
        if self.agent.heartbeat_interval < Duration::from_secs(1) {
            return Err(err("agent.heartbeat_interval".into(), "must be at least 1s".into()));
        }
        if self.server.backoff_min.is_zero() || self.server.backoff_max < self.server.backoff_min {
            return Err(err(
                "server.backoff_max".into(),
                "backoff_min must be > 0 and <= backoff_max".into(),
            ));
        }
        if self.transfer.batch_max_records == 0 {
            return Err(err("transfer.batch_max_records".into(), "must be at least 1".into()));
        }
        if self.transfer.spool_max_bytes < 4 * self.transfer.batch_max_bytes as u64 {
            return Err(err(
                "transfer.spool_max_bytes".into(),
                "must hold at least four maximal batches".into(),
            ));
        }
        let key = &self.plugins.release_public_key;
        if !key.is_empty() && !keel_common::fingerprint::is_hex(key, 32) {
            return Err(err(
                "plugins.release_public_key".into(),
                "must be 64 hex digits (an Ed25519 public key)".into(),
            ));
        }
        if self.plugins.max_frame_bytes < 64 {
            return Err(err("plugins.max_frame_bytes".into(), "must be at least 64".into()));
        }
        if !matches!(self.upgrade.package_type.as_str(), "" | "deb" | "rpm") {
            return Err(err(
                "upgrade.package_type".into(),
                format!("{:?} is not deb or rpm", self.upgrade.package_type),
            ));
        }
        if self.plugins.task_queue == 0 {
            return Err(err("plugins.task_queue".into(), "must be at least 1".into()));
        }
        if let Some(name) = self
            .plugins
            .local
            .keys()
            .find(|n| !keel_common::ids::valid_plugin_name(n))
        {
            return Err(err(
                format!("plugins.local.{name}"),
                "a plugin name must match ^[A-Za-z0-9_-]+$".into(),
            ));
        }
        for (name, limits) in std::iter::once(("default_limits".to_owned(), &self.plugins.default_limits))
            .chain(self.plugins.limits.iter().map(|(n, l)| (format!("limits.{n}"), l)))
        {
            if limits.memory_max_bytes < (4 << 20) || limits.cpu_max_percent == 0 || limits.pids_max == 0 {
                return Err(err(
                    format!("plugins.{name}"),
                    "memory_max_bytes must be >= 4 MiB, cpu_max_percent and pids_max >= 1".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Checks `host:port` (IPv6 in brackets).
fn check_host_port(addr: &str) -> Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} is not host:port"))?;
    if host.is_empty() {
        return Err(format!("{addr:?} has no host"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!("{addr:?}: put an IPv6 address in brackets, [addr]:port"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{addr:?} has no valid port")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_run_config() {
        let c = AgentConfig::from_toml("a.toml", "[server]\nprivate = [\"10.0.0.1:6751\"]\n", Purpose::Run).unwrap();
        assert_eq!(c.agent.heartbeat_interval, Duration::from_secs(60));
        assert_eq!(c.server.backoff_max, Duration::from_secs(60));
        assert_eq!(c.transfer.batch_interval, Duration::ZERO);
        assert_eq!(c.agent.release_code_after, Duration::from_secs(30));
        let never = "[agent]\nrelease_code_after = \"0s\"\n[server]\nprivate = [\"a:1\"]\n";
        let c = AgentConfig::from_toml("a.toml", never, Purpose::Run).unwrap();
        assert_eq!(c.agent.release_code_after, Duration::ZERO);
    }

    #[test]
    fn refusals_name_the_key() {
        let cases = [
            ("[server]\nprivate = [\"a:1\"]\nbogus = 1\n", "server.bogus"),
            ("[server]\nprivate = \"a:1\"\n", "server.private"),
            (
                "[agent]\nheartbeat_interval = 5\n[server]\nprivate = [\"a:1\"]\n",
                "agent.heartbeat_interval",
            ),
            ("", "server.private"),
            ("[server]\nprivate = [\"nohost\"]\n", "server.private[0]"),
            ("[server]\npublic = [\"::1:80\"]\n", "server.public[0]"),
            ("[agent]\nid = \"a/b\"\n[server]\nprivate = [\"a:1\"]\n", "agent.id"),
            (
                "[agent]\nrelease_code_after = \"soon\"\n[server]\nprivate = [\"a:1\"]\n",
                "agent.release_code_after",
            ),
        ];
        for (text, key) in cases {
            let e = AgentConfig::from_toml("a.toml", text, Purpose::Run).unwrap_err();
            assert_eq!(e.key, key, "{text:?}: {e}");
            assert_eq!(e.source, "a.toml");
        }
    }

    #[test]
    fn no_server_needed_outside_run() {
        assert!(AgentConfig::from_toml("a.toml", "", Purpose::Other).is_ok());
        assert!(AgentConfig::from_toml("a.toml", "[server]\nprivate = [\"[::1]:6751\"]\n", Purpose::Run).is_ok());
    }
}
