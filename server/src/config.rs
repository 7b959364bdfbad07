//! `server.toml`: parsed once at start-up into typed structs.
//!
//! Layers: the file (default `/etc/keel/server.toml`), then `KEEL_*` environment
//! variables, then flags. Invalid configuration exits with code 64 and names the key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use keel_common::config::{ConfigError, EnvBinding, EnvKind, Layers};
use serde::Deserialize;

/// Where the server looks for its configuration unless `--config` says otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/keel/server.toml";

/// Environment overrides, all with the `KEEL_` prefix.
pub const ENV: &[EnvBinding] = &[
    ("KEEL_DATA_DIR", "data_dir", EnvKind::Str),
    ("KEEL_GRPC_LISTEN", "grpc.listen", EnvKind::Str),
    ("KEEL_HTTP_LISTEN", "http.listen", EnvKind::Str),
    ("KEEL_HTTP_TLS", "http.tls", EnvKind::Bool),
    ("KEEL_DATABASE_URL", "database.url", EnvKind::Str),
    ("KEEL_CLUSTER_INSTANCE", "cluster.instance", EnvKind::Str),
    ("KEEL_CLUSTER_NATS_URL", "cluster.nats_url", EnvKind::Str),
    ("KEEL_CERT_LIFETIME", "pki.cert_lifetime", EnvKind::Str),
    ("KEEL_SERVER_SANS", "pki.server_sans", EnvKind::List),
];

/// The whole server configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// State directory: database, PKI and record files live under it.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The agents' gRPC endpoint.
    #[serde(default)]
    pub grpc: GrpcConfig,
    /// The console, API and enrollment endpoint.
    #[serde(default)]
    pub http: HttpConfig,
    /// Certificate authority and issuing.
    #[serde(default)]
    pub pki: PkiConfig,
    /// Registry storage.
    #[serde(default)]
    pub database: DatabaseConfig,
    /// Where records go.
    #[serde(default)]
    pub sink: SinkConfig,
    /// Signing of plugin and agent packages.
    #[serde(default)]
    pub release: ReleaseConfig,
    /// The component store.
    #[serde(default)]
    pub components: ComponentsConfig,
    /// Enrollment by key, checked by key-request plugins.
    #[serde(default)]
    pub key_enrollment: KeyEnrollmentConfig,
    /// The proxy tunnel endpoint and the TLS inventory that uses it.
    #[serde(default)]
    pub tunnel: TunnelConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Several instances on one database: leases, presence and command routing.
    #[serde(default)]
    pub cluster: ClusterConfig,
}

/// The instance in a cluster of keel-servers sharing one database (PostgreSQL)
/// and one NATS. A lone server is a cluster of one and needs none of this.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This instance's ID (letters, digits, `-`, `_`). Default: the host name and
    /// a random suffix, new at every start.
    #[serde(default)]
    pub instance: Option<String>,
    /// The cluster's name, the second token of its NATS subjects.
    #[serde(default = "default_cluster_name")]
    pub name: String,
    /// NATS for routing commands to the instance that holds an agent's stream.
    /// Unset: commands reach only agents connected to this instance.
    #[serde(default)]
    pub nats_url: Option<String>,
    /// How long an instance's lease lasts without renewal; its agents show offline
    /// once it has expired.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// How often the lease is renewed.
    #[serde(default = "default_lease_renew", with = "humantime_serde")]
    pub renew: Duration,
    /// How long a command routed to another instance may take to be handed over.
    #[serde(default = "default_route_timeout", with = "humantime_serde")]
    pub route_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            instance: None,
            name: default_cluster_name(),
            nats_url: None,
            lease: default_lease(),
            renew: default_lease_renew(),
            route_timeout: default_route_timeout(),
        }
    }
}

fn default_cluster_name() -> String {
    "keel".into()
}
fn default_lease() -> Duration {
    Duration::from_secs(15)
}
fn default_lease_renew() -> Duration {
    Duration::from_secs(5)
}
fn default_route_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Whether `s` may stand as one token of a NATS subject and as an instance ID.
pub fn subject_token(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Enrollment by key: a host proves it knows the key a key database holds for it;
/// agents running the key-request plugin check the proof.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEnrollmentConfig {
    /// Off unless turned on.
    #[serde(default)]
    pub enabled: bool,
    /// The agents trusted to check key proofs (each running key-request), tried
    /// in this order. Their answer decides who gets a certificate.
    #[serde(default)]
    pub providers: Vec<String>,
    /// How long one provider has to answer.
    #[serde(default = "default_provider_timeout", with = "humantime_serde")]
    pub provider_timeout: Duration,
    /// Replace an agent already registered with the same ID or name (revoking its
    /// certificates) instead of refusing.
    #[serde(default)]
    pub replace: bool,
    /// Key enrollments checked at once; more get 503.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// Challenges outstanding at once; more get 503.
    #[serde(default = "default_max_challenges")]
    pub max_challenges: usize,
    /// How long a challenge nonce stays valid.
    #[serde(default = "default_challenge_ttl", with = "humantime_serde")]
    pub challenge_ttl: Duration,
    /// Proxies in front of the HTTP endpoint (addresses or networks) whose
    /// `X-Forwarded-For` is believed for the source address of an enrollment by
    /// key. Empty: the connection's own address, whatever a header says.
    #[serde(default, deserialize_with = "networks")]
    pub trusted_proxies: Vec<IpNet>,
}

/// A list of addresses (`10.0.0.5`) or networks (`10.0.0.0/8`).
fn networks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    raw.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an IP address or network")))
        })
        .collect()
}

impl Default for KeyEnrollmentConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            providers: Vec::new(),
            provider_timeout: default_provider_timeout(),
            replace: false,
            max_pending: default_max_pending(),
            max_challenges: default_max_challenges(),
            challenge_ttl: default_challenge_ttl(),
            trusted_proxies: Vec::new(),
        }
    }
}

fn default_provider_timeout() -> Duration {
    Duration::from_secs(75)
}
fn default_max_pending() -> usize {
    64
}
fn default_max_challenges() -> usize {
    10_000
}
fn default_challenge_ttl() -> Duration {
    Duration::from_secs(120)
}

/// Signing of packages. Agents pin the matching public key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseConfig {
    /// Ed25519 signing key file (`keel-server ca release-key` makes one). Default
    /// `<pki dir>/release.key` when it exists. Uploads without a signature are
    /// signed with it.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// Hex Ed25519 public key that uploaded signatures must verify against, when the
    /// server holds no signing key.
    #[serde(default)]
    pub public_key: String,
}

/// The component store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentsConfig {
    /// Largest package accepted by an upload.
    #[serde(default = "default_package_bytes")]
    pub max_package_bytes: u64,
    /// Base URLs that also serve packages by SHA-256 (`<base>/<sha256>`), tried by
    /// agents before this server's own `/packages`.
    #[serde(default)]
    pub mirrors: Vec<String>,
}

/// The proxy tunnel endpoint (mTLS), where agents' proxy plugins connect back for
/// audit jobs, and the limits of the TLS inventory that runs through it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// Listen address.
    #[serde(default = "default_tunnel_listen")]
    pub listen: SocketAddr,
    /// How long a job waits for the agent's proxy to connect back.
    #[serde(default = "default_tunnel_wait", with = "humantime_serde")]
    pub wait: Duration,
    /// Jobs waiting for their tunnel at once; more are refused.
    #[serde(default = "default_tunnel_pending")]
    pub max_pending: usize,
    /// Targets in one scan request.
    #[serde(default = "default_scan_targets")]
    pub max_targets: usize,
    /// Targets of one request scanned at once.
    #[serde(default = "default_scan_concurrency")]
    pub scan_concurrency: usize,
    /// Proxy jobs (scan probes, sweeps) this instance has running on one agent
    /// at once; the rest wait. At most the proxy plugin's `max_jobs`, which
    /// refuses more.
    #[serde(default = "default_jobs_per_agent")]
    pub jobs_per_agent: usize,
    /// Set SO_REUSEPORT, so several processes on one host share the port.
    #[serde(default)]
    pub reuse_port: bool,
    /// Whether scanned chains are judged against the system's trust bundle.
    #[serde(default = "default_true")]
    pub inventory_system_roots: bool,
    /// A private CA bundle (PEM) scanned chains may also lead to.
    #[serde(default)]
    pub inventory_ca_bundle: Option<PathBuf>,
    /// The shortest interval a scheduled audit may have.
    #[serde(default = "default_min_audit_interval", with = "humantime_serde")]
    pub min_audit_interval: Duration,
    /// Scheduled audits at most.
    #[serde(default = "default_max_schedules")]
    pub max_schedules: usize,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            listen: default_tunnel_listen(),
            wait: default_tunnel_wait(),
            max_pending: default_tunnel_pending(),
            max_targets: default_scan_targets(),
            scan_concurrency: default_scan_concurrency(),
            jobs_per_agent: default_jobs_per_agent(),
            reuse_port: false,
            inventory_system_roots: true,
            inventory_ca_bundle: None,
            min_audit_interval: default_min_audit_interval(),
            max_schedules: default_max_schedules(),
        }
    }
}

fn default_tunnel_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 6753))
}
fn default_tunnel_wait() -> Duration {
    Duration::from_secs(20)
}
fn default_tunnel_pending() -> usize {
    256
}
fn default_scan_targets() -> usize {
    64
}
fn default_scan_concurrency() -> usize {
    8
}
fn default_jobs_per_agent() -> usize {
    8
}
fn default_min_audit_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_max_schedules() -> usize {
    1000
}

/// gRPC transfer listener (mTLS).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// Listen address.
    #[serde(default = "default_grpc_listen")]
    pub listen: SocketAddr,
    /// Addresses agents should dial, served by service discovery. Empty: `listen`.
    #[serde(default)]
    pub advertise: Vec<String>,
    /// TLS handshakes allowed in flight at once; further connections wait.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// A handshake not finished by then is dropped.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// HTTP/2 keepalive ping interval (and how long an answer may take); a peer
    /// that does not answer is dropped. Agents send heartbeats and ping when the
    /// server falls silent (`keel_proto::keepalive`); the server's own pings only
    /// find agents that vanished, and at tens of thousands of streams each ping
    /// costs CPU.
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    pub keepalive: Duration,
    /// Largest `PackagedData` accepted, in bytes.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Set SO_REUSEPORT, so several processes on one host share the port.
    #[serde(default)]
    pub reuse_port: bool,
}

/// HTTP listener: console, API, enrollment and discovery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// Serve HTTPS with the server certificate. `false` is allowed only on a loopback address.
    #[serde(default = "default_true")]
    pub tls: bool,
    /// How agents reach this endpoint, for package download URLs, e.g.
    /// `https://keel.example.com:6752`. Default: the listen address (the host name
    /// when listening on all addresses).
    #[serde(default)]
    pub public_url: Option<String>,
    /// Set SO_REUSEPORT, so several processes on one host share the port.
    #[serde(default)]
    pub reuse_port: bool,
    /// Serve `/metrics` without a token to loopback addresses. Off, every scrape
    /// needs an API token (any role).
    #[serde(default = "default_true")]
    pub open_metrics_on_loopback: bool,
}

/// Key types an agent may enroll with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    /// ECDSA on NIST P-256 with SHA-256.
    EcdsaP256,
    /// ECDSA on NIST P-384 with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

impl KeyType {
    /// The configuration spelling.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Ed25519 => "ed25519",
        }
    }
}

/// Certificate authority settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PkiConfig {
    /// Directory of `ca.pem`, `ca.key`, `server.pem`, `server.key`. Default `<data_dir>/pki`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Lifetime of agent certificates. Agents renew before two thirds of it has passed.
    #[serde(default = "default_cert_lifetime", with = "humantime_serde")]
    pub cert_lifetime: Duration,
    /// Subject alternative names of the server certificate made by `ca init`.
    #[serde(default = "default_sans")]
    pub server_sans: Vec<String>,
    /// Key types accepted in enrollment and renewal CSRs.
    #[serde(default = "default_key_types")]
    pub allowed_key_types: Vec<KeyType>,
    /// Lifetime of enrollment tokens made without `--ttl`.
    #[serde(default = "default_token_ttl", with = "humantime_serde")]
    pub enrollment_token_ttl: Duration,
}

/// Registry storage.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` or `postgres://…`. Default: SQLite at `<data_dir>/keel.db`.
    #[serde(default)]
    pub url: Option<String>,
    /// Connections the registry keeps open at most. Default 4 on SQLite, 16 on
    /// PostgreSQL (mind the database's `max_connections` across instances).
    #[serde(default)]
    pub max_connections: Option<u32>,
}

/// Record sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Sink kind; `file` is the embedded default.
    #[serde(default = "default_sink_kind")]
    pub kind: SinkKind,
    /// Directory of the record files. Default `<data_dir>/records`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// A record file is rotated once it reaches this size.
    #[serde(default = "default_sink_file_bytes")]
    pub max_file_bytes: u64,
    /// Rotated files kept; older ones are deleted.
    #[serde(default = "default_sink_files")]
    pub max_files: usize,
    /// `nats`: the server, e.g. `nats://127.0.0.1:4222`.
    #[serde(default)]
    pub url: Option<String>,
    /// `nats`: the JetStream stream, created (subjects `<subject_prefix>.>`) if missing.
    #[serde(default = "default_sink_stream")]
    pub stream: String,
    /// `nats`: records of data type N go to `<subject_prefix>.N`.
    #[serde(default = "default_sink_subject_prefix")]
    pub subject_prefix: String,
    /// `nats`: how long JetStream has to acknowledge a batch before the agent is
    /// told to resend it later.
    #[serde(default = "default_sink_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
}

fn default_sink_stream() -> String {
    "KEEL_RECORDS".into()
}
fn default_sink_subject_prefix() -> String {
    "keel.records".into()
}
fn default_sink_ack_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The available sinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// JSON lines in rotating files.
    File,
    /// NATS JetStream, one message per record.
    Nats,
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Directory of the rotating log file; unset logs to stderr only.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Filter when `KEEL_LOG` is unset.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// Rotated files kept.
    #[serde(default = "default_log_files")]
    pub max_files: usize,
    /// `text` (the default) or `json`: one JSON object per line, for log shippers.
    #[serde(default)]
    pub format: keel_common::logging::LogFormat,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/keel-server")
}
fn default_grpc_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 6751))
}
fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 6752))
}
fn default_max_handshakes() -> usize {
    1024
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_keepalive() -> Duration {
    Duration::from_secs(120)
}
fn default_max_message() -> usize {
    16 << 20
}
fn default_true() -> bool {
    true
}
fn default_cert_lifetime() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}
fn default_sans() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}
fn default_key_types() -> Vec<KeyType> {
    vec![KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Ed25519]
}
fn default_token_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_sink_kind() -> SinkKind {
    SinkKind::File
}
fn default_sink_file_bytes() -> u64 {
    128 << 20
}
fn default_sink_files() -> usize {
    16
}
fn default_package_bytes() -> u64 {
    256 << 20
}
fn default_log_level() -> String {
    "info".into()
}
fn default_log_files() -> usize {
    7
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            listen: default_grpc_listen(),
            advertise: Vec::new(),
            max_handshakes: default_max_handshakes(),
            handshake_timeout: default_handshake_timeout(),
            keepalive: default_keepalive(),
            max_message_bytes: default_max_message(),
            reuse_port: false,
        }
    }
}
impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_http_listen(),
            tls: true,
            public_url: None,
            reuse_port: false,
            open_metrics_on_loopback: true,
        }
    }
}
impl Default for PkiConfig {
    fn default() -> Self {
        Self {
            dir: None,
            cert_lifetime: default_cert_lifetime(),
            server_sans: default_sans(),
            allowed_key_types: default_key_types(),
            enrollment_token_ttl: default_token_ttl(),
        }
    }
}
impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            kind: default_sink_kind(),
            dir: None,
            max_file_bytes: default_sink_file_bytes(),
            max_files: default_sink_files(),
            url: None,
            stream: default_sink_stream(),
            subject_prefix: default_sink_subject_prefix(),
            ack_timeout: default_sink_ack_timeout(),
        }
    }
}
impl Default for ComponentsConfig {
    fn default() -> Self {
        Self {
            max_package_bytes: default_package_bytes(),
            mirrors: Vec::new(),
        }
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        Self {
            dir: None,
            level: default_log_level(),
            max_files: default_log_files(),
            format: keel_common::logging::LogFormat::Text,
        }
    }
}

/// Flag overrides, the last layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--grpc-listen`.
    pub grpc_listen: Option<String>,
    /// `--http-listen`.
    pub http_listen: Option<String>,
}

impl ServerConfig {
    /// Loads the layers. `path` is `--config`; when it is `None` the default path is
    /// read if it exists.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let (file, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let mut layers = Layers::from_file(&file, required)?.env(ENV)?;
        layers.set_opt(
            "data_dir",
            overrides.data_dir.as_ref().map(|p| p.display().to_string()),
            "--data-dir",
        );
        layers.set_opt("grpc.listen", overrides.grpc_listen.clone(), "--grpc-listen");
        layers.set_opt("http.listen", overrides.http_listen.clone(), "--http-listen");
        let source = layers.file_name().to_owned();
        let config: ServerConfig = layers.build()?;
        config.validate(&source)?;
        Ok(config)
    }

    /// Parses a configuration from TOML text alone, for tests and the quickstart.
    pub fn from_toml(name: &str, text: &str) -> Result<Self, ConfigError> {
        let config: ServerConfig = Layers::from_str(name, text)?.build()?;
        config.validate(name)?;
        Ok(config)
    }

    fn validate(&self, source: &str) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            source: source.to_owned(),
            key: key.into(),
            message,
        };
        if !self.http.tls && !self.http.listen.ip().is_loopback() {
            return Err(err(
                "http.tls",
                format!(
                    "plain HTTP is allowed only on a loopback address, not {}",
                    self.http.listen
                ),
            ));
        }
        if self.pki.allowed_key_types.is_empty() {
            return Err(err("pki.allowed_key_types", "must allow at least one key type".into()));
        }
        if self.pki.cert_lifetime < Duration::from_secs(5) {
            return Err(err("pki.cert_lifetime", "must be at least 5s".into()));
        }
        for (key, value) in [
            ("tunnel.max_pending", self.tunnel.max_pending),
            ("tunnel.max_targets", self.tunnel.max_targets),
            ("tunnel.scan_concurrency", self.tunnel.scan_concurrency),
            ("tunnel.jobs_per_agent", self.tunnel.jobs_per_agent),
        ] {
            if value == 0 {
                return Err(err(key, "must be at least 1".into()));
            }
        }
        if self.grpc.max_handshakes == 0 {
            return Err(err("grpc.max_handshakes", "must be at least 1".into()));
        }
        if let Some(u) = &self.http.public_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(err("http.public_url", format!("{u:?} is not an http(s) URL")));
        }
        let key = &self.release.public_key;
        if !key.is_empty() && !keel_common::fingerprint::is_hex(key, 32) {
            return Err(err(
                "release.public_key",
                "must be 64 hex digits (an Ed25519 public key)".into(),
            ));
        }
        if self.database.max_connections == Some(0) {
            return Err(err("database.max_connections", "must be at least 1".into()));
        }
        if self.sink.max_files == 0 {
            return Err(err("sink.max_files", "must be at least 1".into()));
        }
        if self.sink.kind == SinkKind::Nats {
            if self.sink.url.as_deref().is_none_or(str::is_empty) {
                return Err(err("sink.url", "kind = \"nats\" needs the NATS server URL".into()));
            }
            if !subject_token(&self.sink.stream) {
                return Err(err(
                    "sink.stream",
                    format!("{:?} is not a stream name (letters, digits, - and _)", self.sink.stream),
                ));
            }
            if self.sink.subject_prefix.is_empty() || !self.sink.subject_prefix.split('.').all(subject_token) {
                return Err(err(
                    "sink.subject_prefix",
                    format!(
                        "{:?} is not a NATS subject (dot-separated tokens of letters, digits, - and _)",
                        self.sink.subject_prefix
                    ),
                ));
            }
        }
        let c = &self.cluster;
        if let Some(i) = &c.instance
            && !subject_token(i)
        {
            return Err(err("cluster.instance", format!("{i:?}: 1-64 letters, digits, - and _")));
        }
        if !subject_token(&c.name) {
            return Err(err(
                "cluster.name",
                format!("{:?}: 1-64 letters, digits, - and _", c.name),
            ));
        }
        if c.renew.is_zero() || c.lease < c.renew * 2 {
            return Err(err(
                "cluster.lease",
                format!(
                    "must be at least twice cluster.renew ({}), so one late renewal does not end it",
                    humantime::format_duration(c.renew)
                ),
            ));
        }
        let k = &self.key_enrollment;
        if k.enabled && k.providers.is_empty() {
            return Err(err(
                "key_enrollment.providers",
                "name at least one agent running key-request when key_enrollment.enabled is true".into(),
            ));
        }
        if let Some(bad) = k.providers.iter().find(|p| !keel_common::ids::valid_agent_id(p)) {
            return Err(err("key_enrollment.providers", format!("{bad:?} is not an agent ID")));
        }
        if k.max_pending == 0 || k.max_challenges == 0 {
            return Err(err(
                if k.max_pending == 0 {
                    "key_enrollment.max_pending"
                } else {
                    "key_enrollment.max_challenges"
                },
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The PKI directory.
    pub fn pki_dir(&self) -> PathBuf {
        self.pki.dir.clone().unwrap_or_else(|| self.data_dir.join("pki"))
    }

    /// The database URL.
    pub fn database_url(&self) -> String {
        self.database
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("keel.db").display()))
    }

    /// The record directory of the file sink.
    pub fn sink_dir(&self) -> PathBuf {
        self.sink.dir.clone().unwrap_or_else(|| self.data_dir.join("records"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ports() {
        let c = ServerConfig::from_toml("t", "").unwrap();
        assert_eq!(c.grpc.listen.port(), 6751);
        assert_eq!(c.http.listen.port(), 6752);
        assert!(c.http.tls);
        assert_eq!(c.pki.cert_lifetime, Duration::from_secs(30 * 86400));
    }

    #[test]
    fn plain_http_only_on_loopback() {
        let e = ServerConfig::from_toml("t", "[http]\ntls = false\n").unwrap_err();
        assert_eq!(e.key, "http.tls");
        let c = ServerConfig::from_toml("t", "[http]\ntls = false\nlisten = \"127.0.0.1:6752\"\n").unwrap();
        assert!(!c.http.tls);
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = ServerConfig::from_toml("t", "[pki]\nallowed_key_types = [\"rsa\"]\n").unwrap_err();
        assert_eq!(e.key, "pki.allowed_key_types[0]");
        let e = ServerConfig::from_toml("t", "[pki]\ncert_lifetime = \"soon\"\n").unwrap_err();
        assert_eq!(e.key, "pki.cert_lifetime");
        let e = ServerConfig::from_toml("t", "colour = 1\n").unwrap_err();
        assert_eq!(e.key, "colour");
    }

    #[test]
    fn trusted_proxies_are_addresses_or_networks() {
        let c = ServerConfig::from_toml(
            "t",
            "[key_enrollment]\ntrusted_proxies = [\"10.0.0.5\", \"fd00::/8\"]\n",
        )
        .unwrap();
        let nets: Vec<String> = c
            .key_enrollment
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["10.0.0.5/32", "fd00::/8"]);
        let e = ServerConfig::from_toml("t", "[key_enrollment]\ntrusted_proxies = [\"lb.example\"]\n").unwrap_err();
        assert!(e.key.starts_with("key_enrollment.trusted_proxies"), "{}", e.key);
        assert!(
            e.to_string().contains("\"lb.example\" is not an IP address or network"),
            "{e}"
        );
    }
}
