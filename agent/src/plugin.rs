//! The plugin runtime: plugins are child processes that talk to the agent over two
//! pipes; this module keeps the running set equal to the desired set the server
//! sends, supervises each plugin, routes tasks to it and reports on it.
//!
//! **Invariant:** a plugin crash, hang, flood or malformed frame never takes the
//! agent down; it ends or restarts that one plugin.
//!
//! The desired set is stored in `<state_dir>/plugins.json`, so that after an agent
//! restart the plugins come back before the server is reachable.

pub mod cgroup;
pub mod install;
mod logfile;
mod spawn;
pub mod supervisor;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_common::backoff::Backoff;
use keel_common::ids::valid_plugin_name;
use keel_proto::data_type;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use self::cgroup::Cgroups;
use self::install::{InstallError, Installer};
use self::supervisor::{Status, Supervisor};
use crate::config::AgentConfig;
use crate::outbox::Outbox;
use crate::record::Record;
use crate::tasks::TaskRequest;

/// How long a new plugin must keep running before an upgrade counts as done.
const SETTLE: Duration = Duration::from_secs(3);

/// The span every log line about one plugin is written in: `plugin{name=…}`
/// (its supervisor, installs, upgrades, removal, refused tasks), so that a line
/// names its plugin whatever its own fields say.
pub fn span(name: &str) -> tracing::Span {
    tracing::info_span!("plugin", name = %name)
}

/// How a package is shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PackageKind {
    /// The package is the executable.
    #[serde(rename = "exec")]
    Exec,
    /// A gzipped tar holding the executable at its top.
    #[serde(rename = "tar.gz")]
    TarGz,
}

/// One entry of the desired plugin set (`grpc.Config`). Stored in `plugins.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginConfig {
    /// Plugin name: `^[A-Za-z0-9_-]+$`.
    pub name: String,
    /// `exec` or `tar.gz`; the raw string when unknown.
    #[serde(with = "kind_serde")]
    pub kind: Result<PackageKind, String>,
    /// Version.
    pub version: String,
    /// Hex SHA-256 of the package.
    pub sha256: String,
    /// Hex Ed25519 signature of the package.
    pub signature: String,
    /// Where to download it, tried in order.
    pub download_urls: Vec<String>,
    /// Passed to the plugin as `DETAIL`.
    pub detail: String,
    /// For a plugin of the local set: the packaged executable, trusted for where
    /// it is rather than for a signature. Never set from the server (or from a
    /// stored set): it is not (de)serialized.
    #[serde(skip)]
    pub local: Option<PathBuf>,
}

mod kind_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::{PackageKind, parse_kind};

    pub fn serialize<S: Serializer>(k: &Result<PackageKind, String>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match k {
            Ok(PackageKind::Exec) => "exec",
            Ok(PackageKind::TarGz) => "tar.gz",
            Err(raw) => raw,
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Result<PackageKind, String>, D::Error> {
        Ok(parse_kind(&String::deserialize(d)?))
    }
}

/// Parses `Config.type`.
pub fn parse_kind(s: &str) -> Result<PackageKind, String> {
    match s {
        "exec" => Ok(PackageKind::Exec),
        "tar.gz" => Ok(PackageKind::TarGz),
        other => Err(other.to_owned()),
    }
}

/// What happened to one plugin during a reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The plugin.
    pub plugin: String,
    /// Whether it ended as desired.
    pub ok: bool,
    /// What happened.
    pub msg: String,
}

/// What is recorded next to an installed plugin: which package it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Installed {
    version: String,
    sha256: String,
}

const INSTALLED_MARKER: &str = ".keel-installed.json";

struct Running {
    config: PluginConfig,
    tasks: mpsc::Sender<TaskRequest>,
    status: Arc<Status>,
    stop: CancellationToken,
    join: JoinHandle<()>,
}

struct Shared {
    config: AgentConfig,
    root: PathBuf,
    desired_path: PathBuf,
    outbox: Outbox,
    installer: Installer,
    cgroups: Option<Arc<Cgroups>>,
    running: Mutex<BTreeMap<String, Running>>,
    reconciling: tokio::sync::Mutex<()>,
    cpu: Mutex<BTreeMap<u32, (u64, Instant)>>,
    changed: Arc<Notify>,
}

/// The plugin runtime; cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("root", &self.shared.root)
            .finish_non_exhaustive()
    }
}

fn result(plugin: &PluginConfig, ok: bool, msg: &str) -> Record {
    let status = if ok { "succeeded" } else { "failed" };
    Record::new(
        data_type::TASK_RESULT,
        [
            ("token", ""),
            ("status", status),
            ("msg", msg),
            ("plugin", plugin.name.as_str()),
            ("version", plugin.version.as_str()),
        ],
    )
}

/// What one plugin is doing: [`Runtime::figures`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginFigures {
    /// Name.
    pub name: String,
    /// `starting`, `running`, `backoff`, `crashloop`, `stopping` or `stopped`.
    pub state: &'static str,
    /// Restarts after unexpected exits.
    pub restarts: u64,
    /// OOM kills seen in its cgroup.
    pub oom_kills: u64,
    /// Tasks refused because its queue was full.
    pub refused_tasks: u64,
}

impl Runtime {
    /// Sets up the runtime: the plugin directory, the installer (which trusts
    /// `ca_pem` for HTTPS downloads) and cgroups.
    pub fn new(config: &AgentConfig, outbox: Outbox, ca_pem: &str) -> anyhow::Result<Self> {
        let root = config.plugin_dir();
        keel_common::fsutil::create_dir(&root, 0o700)?;
        let key = if config.plugins.release_public_key.is_empty() {
            warn!("no plugins.release_public_key pinned: plugin packages will be refused");
            None
        } else {
            Some(
                keel_common::keys::ed25519_public(&config.plugins.release_public_key)
                    .map_err(|e| anyhow::anyhow!("plugins.release_public_key: {e}"))?,
            )
        };
        let tls = keel_common::tls::pinned_client(ca_pem.as_bytes())
            .ok()
            .map(|b| b.with_no_client_auth());
        let installer = Installer::new(
            root.clone(),
            key,
            tls,
            config.plugins.download_timeout,
            config.plugins.max_package_bytes,
        )?;
        installer.clean();
        let cgroups = if config.plugins.cgroups {
            match cgroup::detect(&cgroup::instance(&config.agent.state_dir)) {
                Ok(c) => {
                    info!(cgroups = %c.describe(), "plugins run in their own cgroups");
                    Some(Arc::new(c))
                }
                Err(why) => {
                    warn!(reason = %why, "cgroups unavailable: plugins run without resource limits");
                    None
                }
            }
        } else {
            None
        };
        Ok(Self {
            shared: Arc::new(Shared {
                config: config.clone(),
                desired_path: config.agent.state_dir.join("plugins.json"),
                root,
                outbox,
                installer,
                cgroups,
                running: Mutex::new(BTreeMap::new()),
                reconciling: tokio::sync::Mutex::new(()),
                cpu: Mutex::new(BTreeMap::new()),
                changed: Arc::new(Notify::new()),
            }),
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.shared.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a server has sent this agent a plugin set (stored): then the local
    /// set does not apply.
    pub fn managed(&self) -> bool {
        self.shared.desired_path.exists()
    }

    /// The enabled plugins of the local set (`plugins.local`), as configurations of
    /// the packaged executables in `plugins.local_dir`. Their version is the agent's
    /// (they come in its package); a changed file is an upgrade.
    pub fn local_set(&self) -> Vec<PluginConfig> {
        let plugins = &self.shared.config.plugins;
        plugins
            .local
            .iter()
            .filter(|(_, p)| p.enabled)
            .map(|(name, p)| {
                let path = plugins.local_dir.join(name);
                // An unreadable file gets an empty hash; staging then says why.
                let sha256 = std::fs::read(&path)
                    .map(|b| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&b)))
                    .unwrap_or_default();
                PluginConfig {
                    name: name.clone(),
                    kind: Ok(PackageKind::Exec),
                    version: keel_common::VERSION.to_owned(),
                    sha256,
                    signature: String::new(),
                    download_urls: Vec::new(),
                    detail: p.detail.clone(),
                    local: Some(path),
                }
            })
            .collect()
    }

    /// The desired set stored by the last run.
    pub fn stored(&self) -> Vec<PluginConfig> {
        let path = &self.shared.desired_path;
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(file = %path.display(), error = %e, "ignoring an unreadable stored plugin set");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    fn store(&self, desired: &[PluginConfig]) {
        let path = &self.shared.desired_path;
        let write = serde_json::to_vec_pretty(desired)
            .map_err(std::io::Error::other)
            .and_then(|json| keel_common::fsutil::write_private(path, &json));
        if let Err(e) = write {
            warn!(file = %path.display(), error = %e, "cannot store the desired plugin set");
        }
    }

    /// Makes the running set equal to `desired`: installs, upgrades, restarts with a
    /// new detail, removes; leaves unchanged plugins alone. `persist` stores the set.
    /// Returns what happened to each plugin; every failure was also sent as a 5100.
    pub async fn reconcile(&self, desired: Vec<PluginConfig>, persist: bool) -> Vec<Outcome> {
        let _one_at_a_time = self.shared.reconciling.lock().await;
        let mut outcomes = Vec::new();
        let mut wanted: BTreeMap<String, PluginConfig> = BTreeMap::new();
        for cfg in desired {
            if !valid_plugin_name(&cfg.name) {
                let msg = InstallError::Name(cfg.name.clone()).to_string();
                span(&cfg.name).in_scope(|| warn!(%msg, "plugin refused"));
                outcomes.push(self.report(&cfg, false, msg).await);
                continue;
            }
            wanted.insert(cfg.name.clone(), cfg);
        }
        if persist {
            self.store(&wanted.values().cloned().collect::<Vec<_>>());
        }
        let gone: Vec<String> = self
            .running()
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            async {
                self.stop(&name).await;
                self.shared.installer.remove(&name);
                info!("plugin removed");
            }
            .instrument(span(&name))
            .await;
            self.shared.changed.notify_one();
            outcomes.push(Outcome {
                plugin: name.clone(),
                ok: true,
                msg: format!("plugin {name} removed"),
            });
        }
        for cfg in wanted.into_values() {
            let span = span(&cfg.name);
            outcomes.push(self.apply(cfg).instrument(span).await);
        }
        outcomes
    }

    /// Sends a 5100 for a plugin operation (token-less: it belongs to no task) and
    /// returns it as an outcome.
    async fn report(&self, cfg: &PluginConfig, ok: bool, msg: String) -> Outcome {
        self.shared.outbox.send(result(cfg, ok, &msg)).await;
        Outcome {
            plugin: cfg.name.clone(),
            ok,
            msg,
        }
    }

    async fn apply(&self, cfg: PluginConfig) -> Outcome {
        let current = self.running().get(&cfg.name).map(|r| r.config.clone());
        match current {
            Some(cur) if cur.version == cfg.version && cur.sha256.eq_ignore_ascii_case(&cfg.sha256) => {
                if cur.detail != cfg.detail {
                    info!("detail changed; restarting the plugin");
                    self.stop(&cfg.name).await;
                    self.start(&cfg);
                    return self
                        .settled(&cfg, format!("plugin {} restarted with a new detail", cfg.name))
                        .await;
                }
                Outcome {
                    plugin: cfg.name.clone(),
                    ok: true,
                    msg: format!("plugin {} {} unchanged", cfg.name, cfg.version),
                }
            }
            Some(cur) => self.upgrade(cur, cfg).await,
            None if self.installed(&cfg) => {
                self.start(&cfg);
                self.settled(&cfg, format!("plugin {} {} started", cfg.name, cfg.version))
                    .await
            }
            None => self.install(cfg).await,
        }
    }

    /// The outcome of starting `cfg`: success once it kept running for [`SETTLE`].
    async fn settled(&self, cfg: &PluginConfig, success: String) -> Outcome {
        if self.settles(&cfg.name).await {
            return Outcome {
                plugin: cfg.name.clone(),
                ok: true,
                msg: success,
            };
        }
        let how = self
            .running()
            .get(&cfg.name)
            .map(|r| r.status.get().last_exit)
            .unwrap_or_default();
        let msg = format!("plugin {} {} does not keep running ({how})", cfg.name, cfg.version);
        warn!(%msg);
        self.report(cfg, false, msg).await
    }

    fn installed(&self, cfg: &PluginConfig) -> bool {
        let marker = self.shared.installer.dir(&cfg.name).join(INSTALLED_MARKER);
        std::fs::read(marker)
            .ok()
            .and_then(|b| serde_json::from_slice::<Installed>(&b).ok())
            .is_some_and(|i| i.version == cfg.version && i.sha256.eq_ignore_ascii_case(&cfg.sha256))
    }

    async fn stage(&self, cfg: &PluginConfig) -> Result<PathBuf, Outcome> {
        match self.shared.installer.stage(cfg).await {
            Ok(dir) => {
                let marker = Installed {
                    version: cfg.version.clone(),
                    sha256: cfg.sha256.to_ascii_lowercase(),
                };
                if let Ok(json) = serde_json::to_vec(&marker) {
                    let _ = std::fs::write(dir.join(INSTALLED_MARKER), json);
                }
                Ok(dir)
            }
            Err(e) => {
                warn!(version = %cfg.version, check = %e, "plugin package refused");
                Err(self
                    .report(cfg, false, format!("plugin {} {} refused: {e}", cfg.name, cfg.version))
                    .await)
            }
        }
    }

    async fn install(&self, cfg: PluginConfig) -> Outcome {
        let staged = match self.stage(&cfg).await {
            Ok(s) => s,
            Err(outcome) => return outcome,
        };
        if let Err(e) = self.shared.installer.activate(&cfg.name, &staged) {
            let msg = format!("plugin {} {} not installed: {e}", cfg.name, cfg.version);
            warn!(%msg);
            return self.report(&cfg, false, msg).await;
        }
        self.start(&cfg);
        info!(version = %cfg.version, "plugin installed");
        let outcome = self
            .settled(&cfg, format!("plugin {} {} installed", cfg.name, cfg.version))
            .await;
        if outcome.ok {
            self.shared.outbox.send(result(&cfg, true, &outcome.msg)).await;
        }
        outcome
    }

    /// Whether a just-started plugin is still up after [`SETTLE`].
    async fn settles(&self, name: &str) -> bool {
        let Some(status) = self.running().get(name).map(|r| Arc::clone(&r.status)) else {
            return false;
        };
        let deadline = Instant::now() + SETTLE;
        while Instant::now() < deadline {
            let s = status.get();
            if s.restarts > 0 || s.state == "stopped" {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        status.get().restarts == 0
    }

    async fn upgrade(&self, old: PluginConfig, cfg: PluginConfig) -> Outcome {
        // Download and verify before touching the running version.
        let staged = match self.stage(&cfg).await {
            Ok(s) => s,
            Err(outcome) => return outcome,
        };
        self.stop(&cfg.name).await;
        let previous = match self.shared.installer.activate(&cfg.name, &staged) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "upgrade failed; starting the old version again");
                self.start(&old);
                return self.report(&cfg, false, format!("upgrade failed: {e}")).await;
            }
        };
        self.start(&cfg);
        if self.settles(&cfg.name).await {
            if let Some(p) = previous {
                let _ = std::fs::remove_dir_all(p);
            }
            let msg = format!("plugin {} upgraded {} -> {}", cfg.name, old.version, cfg.version);
            info!(from = %old.version, to = %cfg.version, "plugin upgraded");
            return self.report(&cfg, true, msg).await;
        }
        let how = self
            .running()
            .get(&cfg.name)
            .map(|r| r.status.get().last_exit)
            .unwrap_or_default();
        self.stop(&cfg.name).await;
        let msg = format!(
            "plugin {} {} did not keep running ({how}); rolled back to {}",
            cfg.name, cfg.version, old.version
        );
        warn!(%msg);
        if let Some(p) = previous {
            match self.shared.installer.restore(&cfg.name, &p) {
                Ok(()) => self.start(&old),
                Err(e) => warn!(error = %e, "cannot restore the previous version"),
            }
        }
        self.report(&cfg, false, msg).await
    }

    fn start(&self, cfg: &PluginConfig) {
        let p = &self.shared.config.plugins;
        let limits = p.limits.get(&cfg.name).copied().unwrap_or(p.default_limits);
        let (tx, rx) = mpsc::channel(p.task_queue);
        let status = Arc::new(Status::default());
        let stop = CancellationToken::new();
        let sup = Supervisor {
            name: cfg.name.clone(),
            dir: self.shared.installer.dir(&cfg.name),
            version: cfg.version.clone(),
            detail: cfg.detail.clone(),
            max_frame: p.max_frame_bytes,
            stop_wait: p.plugin_stop_grace,
            grace: p.stop_grace,
            backoff: Backoff::new(p.restart_backoff_min, p.restart_backoff_max, 0.5),
            limits,
            cgroups: self.shared.cgroups.clone(),
            outbox: self.shared.outbox.clone(),
            status: Arc::clone(&status),
            tasks: rx,
            stop: stop.clone(),
            changed: Arc::clone(&self.shared.changed),
        };
        let join = tokio::spawn(sup.run());
        self.running().insert(
            cfg.name.clone(),
            Running {
                config: cfg.clone(),
                tasks: tx,
                status,
                stop,
                join,
            },
        );
    }

    async fn stop(&self, name: &str) {
        let Some(r) = self.running().remove(name) else { return };
        r.stop.cancel();
        if let Err(e) = r.join.await {
            span(name).in_scope(|| warn!(error = %e, "plugin supervisor failed"));
        }
    }

    /// Hands a task to its plugin's queue, or says why not.
    pub fn send_task(&self, task: TaskRequest) -> Result<(), String> {
        let running = self.running();
        let Some(r) = running.get(&task.object_name) else {
            return Err(format!("no such plugin: {}", task.object_name));
        };
        r.tasks.try_send(task).map_err(|e| match e {
            mpsc::error::TrySendError::Full(t) => {
                r.status.refused_tasks.fetch_add(1, Ordering::Relaxed);
                format!(
                    "busy: plugin {} has {} tasks queued",
                    t.object_name, self.shared.config.plugins.task_queue
                )
            }
            mpsc::error::TrySendError::Closed(t) => format!("plugin {} is not running", t.object_name),
        })
    }

    /// The installer, for the agent's own packages too.
    pub fn installer(&self) -> &Installer {
        &self.shared.installer
    }

    /// Resolves when a plugin started, stopped, crashed or was removed.
    pub async fn changed(&self) {
        self.shared.changed.notified().await;
    }

    /// What each plugin of the set is doing, for the agent's metrics.
    pub fn figures(&self) -> Vec<PluginFigures> {
        self.running()
            .iter()
            .map(|(name, r)| {
                let s = r.status.get();
                PluginFigures {
                    name: name.clone(),
                    state: s.state,
                    restarts: s.restarts,
                    oom_kills: s.oom_kills,
                    refused_tasks: r.status.refused_tasks.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Names of the plugins in the desired set.
    pub fn names(&self) -> Vec<String> {
        self.running().keys().cloned().collect()
    }

    /// One plugin heartbeat (data_type 1001) per plugin.
    pub fn heartbeats(&self, interval: Duration) -> Vec<Record> {
        let running: Vec<(PluginConfig, Arc<Status>)> = self
            .running()
            .values()
            .map(|r| (r.config.clone(), Arc::clone(&r.status)))
            .collect();
        let secs = interval.as_secs_f64().max(0.001);
        let mut out = Vec::new();
        for (cfg, status) in running {
            let s = status.get();
            let records = status.records.swap(0, Ordering::Relaxed);
            let bytes = status.bytes.swap(0, Ordering::Relaxed);
            let tasks = status.tasks.swap(0, Ordering::Relaxed);
            let mut fields: Vec<(&str, String)> = vec![
                ("name", cfg.name.clone()),
                ("pversion", cfg.version.clone()),
                ("version", cfg.version.clone()),
                ("state", s.state.to_owned()),
                ("pid", s.pid.map(|p| p.to_string()).unwrap_or_default()),
                ("start_time", s.started_at.to_string()),
                ("restarts", s.restarts.to_string()),
                ("last_exit", s.last_exit.clone()),
                ("last_fault", s.last_fault.clone()),
                ("oom_kills", s.oom_kills.to_string()),
                ("limited", s.limited.to_string()),
                ("rx_tps", format!("{:.4}", records as f64 / secs)),
                ("rx_speed", format!("{:.4}", bytes as f64 / secs)),
                ("tx_tps", format!("{:.4}", tasks as f64 / secs)),
                (
                    "refused_tasks",
                    status.refused_tasks.load(Ordering::Relaxed).to_string(),
                ),
                ("dropped", "0".to_owned()),
            ];
            if let Some(pid) = s.pid {
                fields.extend(self.process_fields(pid));
            }
            out.push(Record::new(data_type::PLUGIN_HEARTBEAT, fields));
        }
        out
    }

    fn process_fields(&self, pid: u32) -> Vec<(&'static str, String)> {
        let Ok(proc) = procfs::process::Process::new(pid as i32) else {
            return Vec::new();
        };
        let Ok(stat) = proc.stat() else { return Vec::new() };
        let ticks = stat.utime + stat.stime;
        let now = Instant::now();
        let mut cpu = self.shared.cpu.lock().unwrap_or_else(|p| p.into_inner());
        let usage = match cpu.insert(pid, (ticks, now)) {
            Some((prev, at)) => {
                let secs = now.duration_since(at).as_secs_f64();
                if secs > 0.0 {
                    ticks.saturating_sub(prev) as f64 / procfs::ticks_per_second() as f64 / secs
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        vec![
            ("cpu", format!("{usage:.4}")),
            ("rss", (stat.rss * procfs::page_size()).to_string()),
            ("nfd", proc.fd_count().unwrap_or(0).to_string()),
        ]
    }

    /// Stops every plugin (each within its grace period, all at once).
    pub async fn shutdown(&self) {
        let all: Vec<Running> = std::mem::take(&mut *self.running()).into_values().collect();
        for r in &all {
            r.stop.cancel();
        }
        for r in all {
            let _ = r.join.await;
        }
        if let Some(c) = &self.shared.cgroups {
            c.remove();
        }
    }
}
