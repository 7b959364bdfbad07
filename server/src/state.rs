//! What every request handler and stream shares.

use std::collections::BTreeMap;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use keel_common::time::now_ms;
use keel_proto::product::{KEEL_AGENT, Product};

use crate::cluster::Cluster;
use crate::config::ServerConfig;
use crate::connections::{Connections, Outbound, PluginCommand, Revocations, SendError, TaskCommand};
use crate::pki::{self, Ca, CsrError, IssuedCert, PkiError};
use crate::policy::{self, AgentFacts, Effective, Policy};
use crate::release::Release;
use crate::sink::Sink;
use crate::store::{NewTask, Sample, Store, StoreError, StreamMark};

/// The server's shared state.
#[derive(Debug)]
pub struct ServerState {
    /// Configuration, as loaded.
    pub config: ServerConfig,
    /// The registry.
    pub store: Store,
    /// The CA.
    pub ca: Ca,
    /// Where records go.
    pub sink: Arc<dyn Sink>,
    /// Open streams.
    pub connections: Connections,
    /// Revoked certificate serials, shared with the TLS listeners' verifier.
    pub revocations: Arc<Revocations>,
    /// What is written to the store in batches: marks and heartbeats.
    pending: Mutex<Pending>,
    /// This instance among the others.
    pub cluster: Cluster,
    /// The gRPC address actually bound (the configured port may be 0).
    grpc_bound: OnceLock<SocketAddr>,
    /// The HTTP address actually bound.
    http_bound: OnceLock<SocketAddr>,
    /// The tunnel endpoint actually bound.
    tunnel_bound: OnceLock<SocketAddr>,
    /// The release key for signing packages.
    pub release: Release,
    /// The policies, cached; reloaded on every change.
    policies: RwLock<Arc<Vec<Policy>>>,
    /// Woken when a task may be able to move on.
    pub rollout_wake: tokio::sync::Notify,
    /// Enrollments by key in progress on this instance, at most
    /// `key_enrollment.max_pending`; the challenges themselves are in the shared
    /// store, so a host may ask one instance for its challenge and enroll through
    /// another.
    pub key_enrollments: tokio::sync::Semaphore,
    /// Audit jobs waiting for their tunnels.
    pub tunnels: crate::tunnels::Tunnels,
    /// The trust anchors the TLS inventory judges chains against.
    pub inventory_trust: crate::findings::Trust,
    /// This instance's Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// A new stream's mark, and the stored mark with its sources: see
/// [`ServerState::stream_start`].
pub type StreamStart = (Option<(u64, u64)>, Option<(u64, u64, String)>);

/// How often marks and heartbeats are written to the store.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);

/// Presence kept in memory and written to the store in batches, only when changed.
#[derive(Debug, Default)]
struct Pending {
    /// Highest persisted batch per agent connected here, or gone but not yet
    /// written: (epoch, seq).
    marks: HashMap<String, (u64, u64)>,
    /// Marks changed since the last flush, with where the agent's plugins'
    /// record numbering stood at each ([`crate::gaps`]).
    dirty: HashMap<String, (u64, u64, Arc<str>)>,
    /// Agents whose streams ended: their marks leave memory once the store holds
    /// them, so a stream that opens meanwhile starts from the newest one.
    gone: HashSet<String>,
    /// Heartbeats not written yet: fields as JSON, arrival time.
    beats: HashMap<String, (String, i64)>,
    /// Heartbeat samples not written yet ([`SAMPLE_EVERY`]).
    samples: Vec<(String, Sample)>,
    /// When samples older than [`SAMPLES_KEPT`] were last deleted.
    pruned_at: i64,
}

/// Changed marks and heartbeats taken for one write to the store.
type Taken = (HashMap<String, (u64, u64, Arc<str>)>, HashMap<String, (String, i64)>);

impl Pending {
    fn set_mark(&mut self, agent_id: &str, epoch: u64, seq: u64, sources: Arc<str>) {
        self.marks.insert(agent_id.to_owned(), (epoch, seq));
        self.dirty.insert(agent_id.to_owned(), (epoch, seq, sources));
    }

    /// A stream ended: the agent's mark stays until the store holds it.
    fn forget(&mut self, agent_id: &str) {
        self.gone.insert(agent_id.to_owned());
    }

    /// What changed since the last write.
    fn take(&mut self) -> Taken {
        (std::mem::take(&mut self.dirty), std::mem::take(&mut self.beats))
    }

    /// The write of `taken` landed: marks of agents gone and not changed since
    /// are in the store, and leave memory.
    fn written(&mut self) {
        let Pending { marks, dirty, gone, .. } = self;
        gone.retain(|a| {
            if dirty.contains_key(a) {
                return true;
            }
            marks.remove(a);
            false
        });
        keel_common::maps::shrink_sparse(marks);
        keel_common::maps::shrink_sparse(gone);
    }

    /// The write of `taken` failed: it is tried again with the next, under
    /// anything newer.
    fn unwritten(&mut self, (marks, beats): Taken) {
        for (a, m) in marks {
            self.dirty.entry(a).or_insert(m);
        }
        for (a, b) in beats {
            self.beats.entry(a).or_insert(b);
        }
    }
}

/// How often an agent's heartbeats are sampled for its page's charts.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(300);
/// How long samples are kept.
pub const SAMPLES_KEPT: Duration = Duration::from_secs(24 * 3600);
/// How often samples past [`SAMPLES_KEPT`] are deleted.
const PRUNE_EVERY_MS: i64 = 60_000;

/// Why a desired plugin set cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// A version has no package for the agent.
    #[error("component {name} version {version} has no package for {arch}")]
    NoPackage {
        /// Component.
        name: String,
        /// Version.
        version: String,
        /// The agent's architecture.
        arch: String,
    },
    /// The registry failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stream would not take it.
    #[error(transparent)]
    Send(#[from] crate::connections::SendError),
    /// The agent did not say which package manager it has.
    #[error("agent {0} reports no package manager (deb or rpm); it cannot be upgraded")]
    NoPackageManager(String),
}

/// Why a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The CSR was refused.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// Renewal was asked for again too soon.
    #[error("renewal refused: the last certificate was issued {0}s ago")]
    TooSoon(i64),
    /// Signing failed.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// Recording failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A task for a plugin: what goes down the stream, and what the task list keeps
/// of it (never a one-time token, never a bulky or secret payload).
#[derive(Debug)]
pub struct PluginTask<'a> {
    /// The plugin.
    pub object_name: &'a str,
    /// The task's data type.
    pub data_type: i32,
    /// The task's token.
    pub token: &'a str,
    /// The data sent.
    pub sent: String,
    /// The data stored.
    pub stored: &'a str,
    /// How long the agent has to answer.
    pub timeout: Duration,
}

/// Why a task was not sent.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The task list could not record it.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stream could not take it.
    #[error(transparent)]
    Send(#[from] SendError),
}

impl ServerState {
    /// Builds the state from its parts.
    pub fn new(
        config: ServerConfig,
        store: Store,
        ca: Ca,
        sink: Arc<dyn Sink>,
        release: Release,
        cluster: Cluster,
        inventory_trust: crate::findings::Trust,
    ) -> Self {
        // What the sink itself knows it persisted is the newest truth after a crash.
        let recovered = sink.recovered_marks();
        // Where the numbering stood at these marks is not known here: stored as
        // unknown, unless the store holds the same mark with what it knows.
        let unknown: Arc<str> = Arc::from("");
        let pending = Mutex::new(Pending {
            dirty: recovered
                .iter()
                .map(|(a, (e, s))| (a.clone(), (*e, *s, Arc::clone(&unknown))))
                .collect(),
            gone: recovered.keys().cloned().collect(),
            marks: recovered,
            beats: HashMap::new(),
            samples: Vec::new(),
            pruned_at: 0,
        });
        let key_enrollments = tokio::sync::Semaphore::new(config.key_enrollment.max_pending);
        let tunnels = crate::tunnels::Tunnels::new(config.tunnel.max_pending, config.tunnel.jobs_per_agent);
        let metrics = Arc::new(crate::metrics::Metrics::new(&cluster.instance, |r| {
            store.register_metrics(r);
            sink.register_metrics(r);
        }));
        Self {
            config,
            store,
            ca,
            sink,
            connections: Connections::default(),
            revocations: Arc::default(),
            pending,
            cluster,
            grpc_bound: OnceLock::new(),
            http_bound: OnceLock::new(),
            tunnel_bound: OnceLock::new(),
            release,
            policies: RwLock::new(Arc::new(Vec::new())),
            rollout_wake: tokio::sync::Notify::new(),
            key_enrollments,
            tunnels,
            inventory_trust,
            metrics,
        }
    }

    /// Records the bound tunnel endpoint once the listener is up.
    pub fn set_tunnel_bound(&self, addr: SocketAddr) {
        let _ = self.tunnel_bound.set(addr);
    }

    /// The tunnel endpoint actually bound (the configured port may be 0).
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.tunnel_bound.get().copied().unwrap_or(self.config.tunnel.listen)
    }

    /// Records the bound HTTP address once the listener is up.
    pub fn set_http_bound(&self, addr: SocketAddr) {
        let _ = self.http_bound.set(addr);
    }

    /// How agents reach the HTTP endpoint: `http.public_url`, or the bound address.
    pub fn public_url(&self) -> String {
        if let Some(u) = &self.config.http.public_url {
            return u.trim_end_matches('/').to_owned();
        }
        let addr = self.http_bound.get().copied().unwrap_or(self.config.http.listen);
        let scheme = if self.config.http.tls { "https" } else { "http" };
        let host = if addr.ip().is_unspecified() {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        } else {
            match addr.ip() {
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            }
        };
        format!("{scheme}://{host}:{}", addr.port())
    }

    /// Records the bound gRPC address once the listener is up.
    pub fn set_grpc_bound(&self, addr: SocketAddr) {
        let _ = self.grpc_bound.set(addr);
    }

    /// The bound gRPC address, or the configured one before binding.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_bound.get().copied().unwrap_or(self.config.grpc.listen)
    }

    /// The policies, as last loaded.
    pub fn policies(&self) -> Arc<Vec<Policy>> {
        Arc::clone(&self.policies.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reloads the policies after a change.
    pub async fn reload_policies(&self) -> Result<(), StoreError> {
        let p = self.store.policies().await?;
        *self.policies.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(p);
        Ok(())
    }

    /// What policy selection needs to know about an agent, from the registry.
    pub fn facts(agent: &crate::store::AgentRow) -> AgentFacts {
        let hb = |k: &str| {
            agent
                .heartbeat
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        AgentFacts {
            id: agent.id.clone(),
            tags: agent.tags.clone(),
            platform: hb("platform"),
            platform_family: hb("platform_family"),
            arch: hb("arch"),
        }
    }

    /// The effective configuration of an agent, or `None` if the server manages
    /// neither its plugins nor its version.
    pub async fn effective(&self, agent_id: &str) -> Result<Option<BTreeMap<String, Effective>>, StoreError> {
        let Some(agent) = self.store.get_agent(agent_id).await? else {
            return Ok(None);
        };
        let own = self.store.desired(agent_id).await?;
        let entries = policy::effective(&Self::facts(&agent), &self.policies(), own.as_deref());
        Ok((own.is_some() || !entries.is_empty()).then_some(entries))
    }

    /// Resolves an effective configuration into packages for the agent's
    /// architecture (and, for `keel-agent`, its package manager).
    pub async fn resolve(
        &self,
        agent_id: &str,
        entries: &BTreeMap<String, Effective>,
    ) -> Result<Vec<PluginCommand>, PushError> {
        let agent = self.store.get_agent(agent_id).await?;
        let hb = |k: &str| {
            agent
                .as_ref()
                .and_then(|a| a.heartbeat.get(k).and_then(|v| v.as_str()).map(str::to_owned))
                .unwrap_or_default()
        };
        let arch = Some(hb("arch"))
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
        let package_type = hb("package_type");
        let product = Product::of(agent.as_ref().map_or("", |a| a.meta.product.as_str()));
        let running = agent.as_ref().map(|a| a.meta.version.clone()).unwrap_or_default();
        let base = self.public_url();
        let urls = |sha: &str| -> Vec<String> {
            self.config
                .components
                .mirrors
                .iter()
                .map(|m| format!("{}/{sha}", m.trim_end_matches('/')))
                .chain(std::iter::once(format!("{base}/packages/{sha}")))
                .collect()
        };
        let mut out = Vec::with_capacity(entries.len());
        for e in entries.values() {
            if e.component == KEEL_AGENT && product != Product::Keel {
                // Keel's own package (a deb or rpm) is nothing another agent can run.
                continue;
            }
            let missing = |arch: &str| PushError::NoPackage {
                name: e.component.clone(),
                version: e.version.clone(),
                arch: arch.to_owned(),
            };
            let (pkg, detail) = if e.component == KEEL_AGENT {
                if package_type.is_empty() {
                    return Err(PushError::NoPackageManager(agent_id.to_owned()));
                }
                let pkg = self
                    .store
                    .package_for_kind(&e.component, &e.version, &arch, &package_type)
                    .await?
                    .ok_or_else(|| missing(&format!("{arch} ({package_type})")))?;
                // The package of the version running now, for the upgrade watchdog to go back to.
                let rollback = self
                    .store
                    .package_for_kind(&e.component, &running, &arch, &package_type)
                    .await?;
                let detail = match rollback {
                    Some(r) if r.version != e.version => serde_json::json!({"rollback": {
                        "version": r.version, "sha256": r.sha256, "signature": r.signature, "download_urls": urls(&r.sha256)
                    }})
                    .to_string(),
                    _ => String::new(),
                };
                (pkg, detail)
            } else {
                let pkg = self
                    .store
                    .package_for(&e.component, &e.version, &arch)
                    .await?
                    .ok_or_else(|| missing(&arch))?;
                (pkg, e.detail.clone())
            };
            // Elkeid checks the executable it runs against a SHA-256: for an
            // `exec` package that is the package's; a `tar.gz` one it then checks
            // against the package's digest and downloads again at each start.
            let signature = match (product.signature_is_sha256(), pkg.kind.as_str()) {
                (false, _) => pkg.signature,
                (true, "exec") => pkg.sha256.clone(),
                (true, _) => String::new(),
            };
            out.push(PluginCommand {
                name: e.component.clone(),
                kind: pkg.kind,
                version: e.version.clone(),
                download_urls: urls(&pkg.sha256),
                signature,
                sha256: pkg.sha256,
                detail,
            });
        }
        Ok(out)
    }

    /// Sends the agent its effective configuration if the server manages it and the
    /// agent is online; `token` asks for a 5100 answer. Returns whether it was sent.
    pub async fn push_config(&self, agent_id: &str, token: Option<String>) -> Result<bool, PushError> {
        let Some(entries) = self.effective(agent_id).await? else {
            return Ok(false);
        };
        if !self.is_online(agent_id).await? {
            return Ok(false);
        }
        let configs = self.resolve(agent_id, &entries).await?;
        self.send(agent_id, Outbound::Configs(configs, token)).await?;
        Ok(true)
    }

    /// Checks a CSR and issues a certificate for `agent_id`. With `renewal`, a
    /// certificate issued less than a quarter lifetime ago refuses a new one, so a
    /// looping agent cannot make the CA sign without bound.
    pub async fn issue(&self, agent_id: &str, csr_pem: &str, renewal: bool) -> Result<IssuedCert, IssueError> {
        let checked = pki::check_csr(csr_pem, agent_id, &self.config.pki.allowed_key_types)?;
        self.issue_checked(agent_id, &checked, renewal).await
    }

    /// Issues a certificate for `agent_id` from a CSR already checked.
    pub async fn issue_checked(
        &self,
        agent_id: &str,
        checked: &pki::CheckedCsr,
        renewal: bool,
    ) -> Result<IssuedCert, IssueError> {
        let lifetime = self.config.pki.cert_lifetime;
        let now = now_ms();
        if renewal && let Some(last) = self.store.last_cert_issued(agent_id).await? {
            let min_gap = i64::try_from(lifetime.as_millis() / 4).unwrap_or(i64::MAX);
            if now - last < min_gap {
                return Err(IssueError::TooSoon((now - last) / 1000));
            }
        }
        let issued = self.ca.issue_agent(agent_id, checked, lifetime)?;
        self.store
            .cert_issued(&issued.serial, agent_id, now, issued.not_after_ms)
            .await?;
        Ok(issued)
    }

    /// Revokes every certificate of `agent_id` but `keep`, and closes streams using
    /// them at once. Returns the serials revoked.
    pub async fn revoke_agent(
        &self,
        agent_id: &str,
        reason: &str,
        keep: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let serials = self.store.revoke_agent_certs(agent_id, reason, keep, now_ms()).await?;
        self.apply_revocations(serials.iter().cloned());
        Ok(serials)
    }

    /// What the mutual-TLS listeners check client certificates against.
    pub fn tls_trust(&self) -> crate::tls::Trust {
        crate::tls::Trust {
            ca: self.ca.cert_der().clone(),
            revocations: Arc::clone(&self.revocations),
            identity_dir: self.config.pki_dir(),
        }
    }

    /// Adds revoked serials to the handshake check and closes their streams.
    pub fn apply_revocations(&self, serials: impl IntoIterator<Item = String>) {
        let new = self.revocations.add(serials);
        if !new.is_empty() {
            for agent_id in self.connections.close_serials(&new) {
                tracing::warn!(agent_id, "closed the stream of a revoked certificate");
            }
        }
    }

    /// Loads revocations made since `since` (Unix ms), for example by
    /// `keel-server ca revoke` in another process. Returns the newest time seen.
    pub async fn sync_revocations(&self, since: i64) -> Result<i64, StoreError> {
        let revoked = self.store.revoked_since(since).await?;
        let newest = revoked.iter().map(|(_, at)| *at).max().unwrap_or(since);
        self.apply_revocations(revoked.into_iter().map(|(s, _)| s));
        Ok(newest)
    }

    /// Whether the agent's stream is open here or at a live instance.
    pub async fn is_online(&self, agent_id: &str) -> Result<bool, StoreError> {
        if self.connections.is_online(agent_id) {
            return Ok(true);
        }
        Ok(self.store.agent_holder(agent_id, now_ms()).await?.is_some())
    }

    /// Hands a command to the agent's stream, here or at the instance holding it.
    pub async fn send(&self, agent_id: &str, cmd: Outbound) -> Result<(), SendError> {
        if self.connections.is_online(agent_id) {
            return self.connections.send(agent_id, cmd);
        }
        let holder = self
            .store
            .agent_holder(agent_id, now_ms())
            .await
            .map_err(|e| SendError::Unreachable(agent_id.to_owned(), format!("registry: {e}")))?;
        match holder {
            Some(instance) if instance != self.cluster.instance => self.cluster.route(&instance, agent_id, cmd).await,
            // The registry may still name this instance for a stream that just ended.
            _ => Err(SendError::Offline(agent_id.to_owned())),
        }
    }

    /// Records a plugin's task in the task list and hands it to the agent's stream.
    pub async fn send_task(&self, agent_id: &str, task: PluginTask<'_>, by: &str) -> Result<(), TaskError> {
        self.store
            .task_sent(
                &NewTask {
                    token: task.token,
                    agent_id,
                    data_type: task.data_type,
                    object_name: task.object_name,
                    data: task.stored,
                    created_by: by,
                    timeout_ms: i64::try_from(task.timeout.as_millis()).unwrap_or(i64::MAX),
                },
                now_ms(),
            )
            .await?;
        let cmd = TaskCommand {
            data_type: task.data_type,
            object_name: task.object_name.to_owned(),
            data: task.sent,
            token: task.token.to_owned(),
        };
        Ok(self.send(agent_id, Outbound::Task(cmd)).await?)
    }

    /// The gRPC address agents should dial for this instance.
    pub fn advertised_grpc(&self) -> String {
        if let Some(a) = self.config.grpc.advertise.first() {
            return a.clone();
        }
        self.grpc_addr().to_string()
    }

    /// For a new stream, with one read of the store: the agent's highest persisted
    /// batch (from memory, else the store), and the stored mark with where its
    /// plugins' record numbering stood then (`Store::stream_sources`).
    pub async fn stream_start(&self, agent_id: &str) -> Result<StreamStart, StoreError> {
        let stored = self.store.stream_sources(agent_id).await?;
        let pending = self.pending_lock().marks.get(agent_id).copied();
        let mark = pending.or_else(|| stored.as_ref().map(|(e, s, _)| (*e, *s)));
        Ok((mark, stored))
    }

    /// Records a persisted batch, and where the agent's plugins' record numbering
    /// stood after it; both reach the store with the next flush.
    pub fn set_mark(&self, agent_id: &str, epoch: u64, seq: u64, sources: Arc<str>) {
        self.pending_lock().set_mark(agent_id, epoch, seq, sources);
    }

    /// Keeps a heartbeat (its fields as JSON) for the next flush.
    pub fn set_heartbeat(&self, agent_id: &str, json: String, now: i64) {
        self.pending_lock().beats.insert(agent_id.to_owned(), (json, now));
    }

    /// Notes a sample of an agent's heartbeats, written with the next flush.
    pub fn add_sample(&self, agent_id: &str, sample: Sample) {
        self.pending_lock().samples.push((agent_id.to_owned(), sample));
    }

    /// Writes what changed since the last flush: marks and heartbeats, then the
    /// heartbeat samples (deleting those past [`SAMPLES_KEPT`] once a minute).
    /// What could not be written is kept for the next try, but samples: a chart
    /// with a gap is better than a flush that grows.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let now = now_ms();
        // Taken whatever happens next: samples the registry refuses are dropped.
        let (samples, prune) = {
            let mut p = self.pending_lock();
            let prune = now - p.pruned_at >= PRUNE_EVERY_MS;
            if prune {
                p.pruned_at = now;
            }
            (std::mem::take(&mut p.samples), prune)
        };
        let marks = self.flush_marks_and_beats().await;
        let saved = self.store.save_samples(&samples).await;
        if prune {
            let kept = i64::try_from(SAMPLES_KEPT.as_millis()).unwrap_or(i64::MAX);
            self.store.prune_samples(now - kept).await?;
        }
        marks.and(saved)
    }

    async fn flush_marks_and_beats(&self) -> Result<(), StoreError> {
        let (marks, beats) = self.pending_lock().take();
        let marks_rows: Vec<StreamMark> = marks.iter().map(|(a, m)| stream_mark(a, m)).collect();
        let beat_rows: Vec<(String, String, i64)> =
            beats.iter().map(|(a, (j, t))| (a.clone(), j.clone(), *t)).collect();
        let result = async {
            self.store.save_stream_marks(&marks_rows).await?;
            self.store.agent_heartbeats(&beat_rows).await
        }
        .await;
        let mut p = self.pending_lock();
        match result {
            Ok(()) => p.written(),
            Err(_) => p.unwritten((marks, beats)),
        }
        result
    }

    /// A stream ended: its agent's mark and heartbeat go to the store with the
    /// next flush, and the mark leaves memory once the store holds it.
    pub fn forget_agent(&self, agent_id: &str) {
        self.pending_lock().forget(agent_id);
    }

    fn pending_lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn stream_mark(agent_id: &str, (epoch, seq, sources): &(u64, u64, Arc<str>)) -> StreamMark {
    StreamMark {
        agent_id: agent_id.to_owned(),
        epoch: *epoch,
        seq: *seq,
        sources: Arc::clone(sources),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(p: &Pending, agent: &str) -> Option<(u64, u64)> {
        p.marks.get(agent).copied()
    }

    #[test]
    fn a_gone_agents_mark_stays_in_memory_until_the_store_holds_it() {
        let mut p = Pending::default();
        p.set_mark("a", 1, 5, Arc::from(""));
        p.forget("a");
        // A stream opening now must not start from an older stored mark.
        assert_eq!(mark(&p, "a"), Some((1, 5)));
        let taken = p.take();
        assert_eq!(mark(&p, "a"), Some((1, 5)), "taken for the store, not in it yet");
        p.unwritten(taken);
        assert_eq!(mark(&p, "a"), Some((1, 5)), "the write failed");
        assert!(p.dirty.contains_key("a"), "tried again with the next write");
        let _ = p.take();
        p.written();
        assert_eq!(mark(&p, "a"), None, "in the store now");
        assert!(p.gone.is_empty());
    }

    #[test]
    fn a_mark_changed_while_being_written_stays() {
        let mut p = Pending::default();
        p.set_mark("a", 1, 5, Arc::from(""));
        p.forget("a");
        let _ = p.take();
        // The agent came back and moved on while the write was under way.
        p.set_mark("a", 1, 6, Arc::from(""));
        p.written();
        assert_eq!(mark(&p, "a"), Some((1, 6)));
        let (dirty, _) = p.take();
        assert_eq!(dirty.get("a").map(|m| (m.0, m.1)), Some((1, 6)));
        p.written();
        assert_eq!(mark(&p, "a"), None, "gone and written");
    }

    #[test]
    fn a_failed_write_keeps_what_changed_since() {
        let mut p = Pending::default();
        p.set_mark("a", 1, 5, Arc::from(""));
        let taken = p.take();
        p.set_mark("a", 1, 7, Arc::from(""));
        p.unwritten(taken);
        assert_eq!(
            p.dirty.get("a").map(|m| (m.0, m.1)),
            Some((1, 7)),
            "not overwritten by the older mark"
        );
        assert_eq!(mark(&p, "a"), Some((1, 7)), "a connected agent's mark stays");
        p.written();
        assert_eq!(mark(&p, "a"), Some((1, 7)), "not gone");
    }
}
