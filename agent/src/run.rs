//! `keel-agent run`: wires the data path, the stream, the heartbeat, renewal, the
//! plugin runtime and the task dispatcher together, and stops them in order.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::AgentConfig;
use crate::heartbeat::Heartbeat;
use crate::outbox::{BatchLimits, Lanes, Outbox, batcher};
use crate::pki::{self, PkiError};
use crate::plugin::{PluginConfig, Runtime};
use crate::record::{Header, PRODUCT, Record};
use crate::renew::Renewer;
use crate::spool::{Spool, SpoolOptions};
use crate::tasks::{self, Action, MetadataStore};
use crate::transport::{Inbound, TransferStats, Transport};
use crate::{host, id, upgrade};

/// Record chunks the producers may queue before they wait.
const OUTBOX_CHUNKS: usize = 256;
/// How often an unenrolled agent looks for its certificate.
const ENROLL_POLL: Duration = Duration::from_secs(5);

/// How `run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped by a signal.
    Stopped,
    /// A 1060 task asked for a restart.
    Restart,
}

async fn wait_for_enrollment(
    config: &AgentConfig,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<pki::Identity>> {
    let mut told = false;
    loop {
        match pki::load(&config.agent.state_dir) {
            Ok(id) => return Ok(Some(id)),
            Err(PkiError::NotEnrolled(path)) => {
                if !told {
                    warn!(missing = %path.display(), "not enrolled yet; waiting for `keel-agent enroll`");
                    told = true;
                }
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(ENROLL_POLL) => {}
        }
    }
}

/// A desired configuration and the task token to answer.
type Desired = Option<(Vec<PluginConfig>, Option<String>)>;

/// What the reconciler needs.
struct Reconciler {
    runtime: Runtime,
    config: AgentConfig,
    outbox: Outbox,
}

/// Applies the newest desired configuration, one at a time; one that arrives while
/// another is being applied replaces any still waiting. Plugins first; then, if the
/// configuration names another `keel-agent` version, the self-upgrade. A task token
/// gets a 5100: the plugins' outcome, or (after an upgrade) the upgrade's.
async fn reconciler(ctx: Reconciler, mut desired: watch::Receiver<Desired>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = desired.changed() => if changed.is_err() { return },
        }
        let Some((set, token)) = desired.borrow_and_update().clone() else {
            continue;
        };
        let (agent, plugins): (Vec<_>, Vec<_>) = set.into_iter().partition(|c| c.name == upgrade::COMPONENT);
        let outcomes = tokio::select! {
            _ = stop.cancelled() => return,
            o = ctx.runtime.reconcile(plugins, true) => o,
        };
        let failed: Vec<&str> = outcomes.iter().filter(|o| !o.ok).map(|o| o.msg.as_str()).collect();
        let summary = if outcomes.is_empty() {
            "no plugins".to_owned()
        } else if failed.is_empty() {
            format!("{} plugins as desired", outcomes.len())
        } else {
            failed.join("; ")
        };
        let token_str = token.clone().unwrap_or_default();
        if let Some(entry) = agent.into_iter().next().filter(|e| e.version != keel_common::VERSION) {
            if token.is_none()
                && let Some(reason) = upgrade::held_back(&ctx.config.agent.state_dir, &entry)
            {
                info!(to = %entry.version, %reason, "not retrying an upgrade that was rolled back; a sync-config task retries it");
                continue;
            }
            if let Err(e) = upgrade::begin(&ctx.config, ctx.runtime.installer(), &entry, &token_str, &summary).await {
                warn!(to = %entry.version, error = %e, "upgrade refused");
                if token.is_some() {
                    let msg = format!("upgrade to {} refused: {e}", entry.version);
                    ctx.outbox.send(tasks::result(&token_str, false, &msg)).await;
                }
            }
            // On success the watchdog installs the new version and stops this process;
            // the version that runs next reports on the token.
            continue;
        }
        if token.is_some() {
            ctx.outbox
                .send(tasks::result(&token_str, failed.is_empty(), &summary))
                .await;
        }
    }
}

/// Finishes an upgrade found at start-up: the new version reports success once its
/// heartbeat is acknowledged (which the watchdog waits for); a rolled-back version
/// reports the failure.
fn finish_upgrade(
    found: upgrade::Found,
    state_dir: std::path::PathBuf,
    outbox: Outbox,
    spool: Arc<Spool>,
    connected: Arc<AtomicBool>,
) {
    match found {
        upgrade::Found::Upgraded { token, from, plugins } => {
            tokio::spawn(async move {
                // Connected, and everything sent so far (the first heartbeat) acknowledged.
                loop {
                    if connected.load(std::sync::atomic::Ordering::Relaxed)
                        && spool.drained(Duration::from_secs(1)).await
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                if let Err(e) = upgrade::mark_alive(&state_dir) {
                    warn!(error = %e, "cannot tell the upgrade watchdog this version runs");
                    return;
                }
                let msg = format!("upgraded from {from} to {}; {plugins}", keel_common::VERSION);
                info!(%msg, "upgrade confirmed");
                outbox.send(tasks::result(&token, true, &msg)).await;
            });
        }
        upgrade::Found::RolledBack { token, reason } => {
            warn!(%reason, "the last upgrade was rolled back");
            tokio::spawn(async move {
                outbox.send(tasks::result(&token, false, &reason)).await;
            });
        }
        upgrade::Found::InProgress | upgrade::Found::Nothing => {}
    }
}

/// Runs the agent until `shutdown` or a restart task. `upstream_logs` carries error
/// records from the logging layer.
pub async fn run(
    config: AgentConfig,
    shutdown: CancellationToken,
    upstream_logs: mpsc::Receiver<Record>,
) -> anyhow::Result<Exit> {
    let Some(identity) = prepare(&config, &shutdown).await? else {
        return Ok(Exit::Stopped);
    };
    let spool = open_spool(&config)?;
    let stop = shutdown.child_token();
    let (outbox, records) = Outbox::channel(OUTBOX_CHUNKS);
    let header = Arc::new(RwLock::new(Header {
        agent_id: identity.info.agent_id.clone(),
        hostname: host::hostname(),
        addresses: host::addresses(),
    }));
    let plugins = Runtime::new(&config, outbox.clone(), &identity.ca_pem)?;
    let identity = Arc::new(RwLock::new(identity));
    let link = Link::default();
    let metadata = MetadataStore::load(&config.agent.state_dir);
    let (inbound_tx, inbound) = mpsc::channel(64);

    let batching = spawn_batcher(&config, records, &spool, &header);
    let syncing = spawn_spool_sync(&spool, config.transfer.spool_sync_interval, stop.clone());
    let forward = spawn_log_forward(upstream_logs, outbox.clone());
    let transport = spawn_transport(&config, &identity, &header, &spool, inbound_tx, &link);
    start_plugins(&plugins).await;
    finish_upgrade(
        upgrade::on_start(&config.agent.state_dir),
        config.agent.state_dir.clone(),
        outbox.clone(),
        Arc::clone(&spool),
        Arc::clone(&link.connected),
    );
    let (desired, desired_rx) = watch::channel(None);
    let ctx = Reconciler {
        runtime: plugins.clone(),
        config: config.clone(),
        outbox: outbox.clone(),
    };
    let reconciling = tokio::spawn(reconciler(ctx, desired_rx, stop.clone()));
    spawn_metrics(&config, &link, &spool, &outbox, &plugins, &stop).await;
    spawn_code_release(config.agent.release_code_after, &stop);
    let heartbeat = spawn_heartbeat(&config, &link, &spool, &outbox, &plugins, &metadata, header, &stop);
    let renewer = Arc::new(Renewer::new(
        config.agent.state_dir.clone(),
        identity,
        outbox.clone(),
        Arc::clone(&link.connected),
        Arc::clone(&link.reconnect),
    ));
    let renewal = tokio::spawn(Arc::clone(&renewer).run(stop.clone()));

    let parts = Dispatch {
        plugins: &plugins,
        outbox: &outbox,
        metadata: &metadata,
        renewer: &renewer,
        desired: &desired,
        stop: &stop,
    };
    let exit = parts.dispatch(inbound).await;

    let running = Running {
        stop,
        reconciling,
        heartbeat,
        renewal,
        syncing,
        forward,
        batching,
        transport,
    };
    running.stop_in_order(plugins, outbox, renewer, &spool).await;
    info!(?exit, spool = ?spool.stats(), "keel-agent stopped");
    Ok(exit)
}

/// Pages the agent's code out once start-up is over (`agent.release_code_after`).
fn spawn_code_release(after: Duration, stop: &CancellationToken) {
    if after.is_zero() {
        return;
    }
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(after) => match keel_common::residency::release_code() {
                Ok(bytes) => info!(kib = bytes >> 10, "paged out the agent's code; what runs comes back as it runs"),
                Err(e) => warn!(error = %e, "cannot page out the agent's code"),
            },
        }
    });
}

/// Before anything runs: the state directory, the agent's ID, and the identity
/// from enrollment (waited for; `None` if the agent is stopped first).
async fn prepare(config: &AgentConfig, shutdown: &CancellationToken) -> anyhow::Result<Option<pki::Identity>> {
    keel_common::tls::install_crypto_provider();
    let state_dir = &config.agent.state_dir;
    keel_common::fsutil::create_dir(state_dir, 0o700)
        .with_context(|| format!("cannot create state_dir {}", state_dir.display()))?;
    let (derived, source) = id::resolve(&config.agent.id, &config.agent.host_root, state_dir)?;
    let Some(identity) = wait_for_enrollment(config, shutdown).await? else {
        return Ok(None);
    };
    let agent_id = &identity.info.agent_id;
    if *agent_id != derived && !pki::id_assigned(state_dir) {
        warn!(enrolled = %agent_id, derived = %derived, ?source,
            "the host's agent ID changed since enrollment; using the enrolled ID");
    }
    info!(%agent_id, version = keel_common::VERSION, "keel-agent starting");
    Ok(Some(identity))
}

fn open_spool(config: &AgentConfig) -> anyhow::Result<Arc<Spool>> {
    let t = &config.transfer;
    Ok(Arc::new(Spool::open(SpoolOptions {
        dir: config.agent.state_dir.join("spool"),
        max_bytes: t.spool_max_bytes,
        segment_bytes: t.spool_segment_bytes.min(t.spool_max_bytes / 8).max(1 << 16),
        cache_bytes: t.spool_cache_bytes,
        min_free_bytes: t.spool_min_free_bytes,
    })?))
}

/// What the transport shares with the heartbeat, the renewal and the metrics.
#[derive(Default)]
struct Link {
    stats: Arc<TransferStats>,
    connected: Arc<AtomicBool>,
    connected_signal: Arc<Notify>,
    reconnect: Arc<Notify>,
}

/// A task with a stop of its own, stopped after the others.
struct Stoppable {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Stoppable {
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The batcher outlives `stop`: records produced while stopping (the plugins' last
/// words, a restart's task result) still reach the spool.
fn spawn_batcher(config: &AgentConfig, records: Lanes, spool: &Arc<Spool>, header: &Arc<RwLock<Header>>) -> Stoppable {
    let limits = BatchLimits {
        interval: config.transfer.batch_interval,
        max_records: config.transfer.batch_max_records,
        max_bytes: config.transfer.batch_max_bytes,
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(batcher(
        records,
        Arc::clone(spool),
        Arc::clone(header),
        limits,
        stop.clone(),
    ));
    Stoppable { stop, task }
}

/// Written batches are synced at most `every` after the first write since the
/// last sync; with nothing written nothing wakes.
fn spawn_spool_sync(spool: &Arc<Spool>, every: Duration, stop: CancellationToken) -> JoinHandle<()> {
    let spool = Arc::clone(spool);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                () = spool.wait_unsynced() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
            let s = Arc::clone(&spool);
            let _ = tokio::task::spawn_blocking(move || s.sync()).await;
        }
    })
}

/// The logging layer's error records into the outbox.
fn spawn_log_forward(mut upstream_logs: mpsc::Receiver<Record>, outbox: Outbox) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(r) = upstream_logs.recv().await {
            outbox.try_send(r);
        }
    })
}

fn spawn_transport(
    config: &AgentConfig,
    identity: &Arc<RwLock<pki::Identity>>,
    header: &Arc<RwLock<Header>>,
    spool: &Arc<Spool>,
    inbound: mpsc::Sender<Inbound>,
    link: &Link,
) -> Stoppable {
    let transport = Transport {
        server: config.server.clone(),
        identity: Arc::clone(identity),
        header: Arc::clone(header),
        spool: Arc::clone(spool),
        inbound,
        stats: Arc::clone(&link.stats),
        connected_signal: Arc::clone(&link.connected_signal),
        reconnect: Arc::clone(&link.reconnect),
        connected: Arc::clone(&link.connected),
        drain: config.agent.shutdown_grace / 2,
        heartbeat: config.agent.heartbeat_interval,
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(transport.run(stop.clone()));
    Stoppable { stop, task }
}

/// Plugins come back from the stored set before the server is reachable; an
/// agent no server has sent a set to runs its local set.
async fn start_plugins(plugins: &Runtime) {
    let initial = if plugins.managed() {
        plugins.stored()
    } else {
        plugins.local_set()
    };
    if !initial.is_empty() {
        info!(
            plugins = initial.len(),
            managed = plugins.managed(),
            "starting the plugin set"
        );
        plugins.reconcile(initial, false).await;
    }
}

async fn spawn_metrics(
    config: &AgentConfig,
    link: &Link,
    spool: &Arc<Spool>,
    outbox: &Outbox,
    plugins: &Runtime,
    stop: &CancellationToken,
) {
    let Some(addr) = config.metrics.listen else { return };
    let sources = crate::metrics::Sources {
        stats: Arc::clone(&link.stats),
        spool: Arc::clone(spool),
        outbox: outbox.clone(),
        plugins: plugins.clone(),
    };
    match crate::metrics::bind(addr).await {
        Ok(listener) => {
            tokio::spawn(crate::metrics::serve(listener, sources, stop.clone()));
        }
        Err(e) => {
            error!(%addr, error = %e, "cannot listen on metrics.listen; the agent runs without its metrics endpoint")
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_heartbeat(
    config: &AgentConfig,
    link: &Link,
    spool: &Arc<Spool>,
    outbox: &Outbox,
    plugins: &Runtime,
    metadata: &MetadataStore,
    header: Arc<RwLock<Header>>,
    stop: &CancellationToken,
) -> JoinHandle<()> {
    let heartbeat = Heartbeat {
        host_root: config.agent.host_root.clone(),
        interval: config.agent.heartbeat_interval,
        outbox: outbox.clone(),
        spool: Arc::clone(spool),
        stats: Arc::clone(&link.stats),
        metadata: metadata.clone(),
        header,
        connected: Arc::clone(&link.connected_signal),
        plugins: plugins.clone(),
        package_type: upgrade::package_type(config).unwrap_or_default(),
    };
    tokio::spawn(heartbeat.run(stop.clone()))
}

/// What the server's messages are handed to.
struct Dispatch<'a> {
    plugins: &'a Runtime,
    outbox: &'a Outbox,
    metadata: &'a MetadataStore,
    renewer: &'a Renewer,
    desired: &'a watch::Sender<Desired>,
    stop: &'a CancellationToken,
}

impl Dispatch<'_> {
    /// Hands each message from the server to its part until the agent stops or a
    /// task restarts it.
    async fn dispatch(&self, mut inbound: mpsc::Receiver<Inbound>) -> Exit {
        let mut exit = Exit::Stopped;
        loop {
            let msg = tokio::select! {
                _ = self.stop.cancelled() => break,
                m = inbound.recv() => m,
            };
            let Some(msg) = msg else { break };
            match msg {
                Inbound::Task(task) if task.object_name == PRODUCT => {
                    let (reply, action) = tasks::handle(&task, self.metadata);
                    self.outbox.send(reply).await;
                    if action == Action::Restart {
                        info!(token = %task.token, "restart requested by the server");
                        exit = Exit::Restart;
                        self.stop.cancel();
                    }
                }
                Inbound::Task(task) => {
                    let token = task.token.clone();
                    let plugin = crate::plugin::span(&task.object_name);
                    if let Err(msg) = self.plugins.send_task(task) {
                        plugin.in_scope(|| warn!(%token, %msg, "task refused"));
                        self.outbox.send(tasks::result(&token, false, &msg)).await;
                    }
                }
                Inbound::Renewal(answer) => self.renewer.complete(answer),
                Inbound::Configs(configs, token) => {
                    info!(entries = configs.len(), "desired configuration received");
                    self.desired.send_replace(Some((configs, token)));
                }
            }
        }
        exit
    }
}

/// The agent's tasks, to be stopped in order.
struct Running {
    stop: CancellationToken,
    reconciling: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
    renewal: JoinHandle<()>,
    syncing: JoinHandle<()>,
    forward: JoinHandle<()>,
    batching: Stoppable,
    transport: Stoppable,
}

impl Running {
    /// Stops producers and plugins, lets the batcher flush (once every other
    /// holder of the outbox is gone), lets the transport drain, and syncs the spool.
    async fn stop_in_order(self, plugins: Runtime, outbox: Outbox, renewer: Arc<Renewer>, spool: &Spool) {
        self.stop.cancel();
        let _ = self.reconciling.await;
        plugins.shutdown().await;
        for (name, task) in [
            ("heartbeat", self.heartbeat),
            ("renewal", self.renewal),
            ("spool sync", self.syncing),
        ] {
            if let Err(e) = task.await {
                error!(task = name, error = %e, "task failed");
            }
        }
        self.forward.abort();
        drop(outbox);
        drop(renewer);
        drop(plugins);
        self.batching.stop().await;
        self.transport.stop().await;
        spool.sync();
    }
}
