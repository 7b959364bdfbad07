//! `keel-agent run`: wires the data path, the stream, the heartbeat, renewal, the
//! plugin runtime and the task dispatcher together, and stops them in order.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::AgentConfig;
use crate::heartbeat::Heartbeat;
use crate::outbox::{BatchLimits, Outbox, batcher};
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
    mut upstream_logs: mpsc::Receiver<Record>,
) -> anyhow::Result<Exit> {
    keel_common::tls::install_crypto_provider();
    let state_dir = config.agent.state_dir.clone();
    keel_common::fsutil::create_dir(&state_dir, 0o700)
        .with_context(|| format!("cannot create state_dir {}", state_dir.display()))?;
    let (derived, source) = id::resolve(&config.agent.id, &config.agent.host_root, &state_dir)?;
    let Some(identity) = wait_for_enrollment(&config, &shutdown).await? else {
        return Ok(Exit::Stopped);
    };
    let agent_id = identity.info.agent_id.clone();
    if agent_id != derived && !pki::id_assigned(&config.agent.state_dir) {
        warn!(enrolled = %agent_id, derived = %derived, ?source,
            "the host's agent ID changed since enrollment; using the enrolled ID");
    }
    info!(%agent_id, version = keel_common::VERSION, "keel-agent starting");

    let spool = Arc::new(Spool::open(SpoolOptions {
        dir: state_dir.join("spool"),
        max_bytes: config.transfer.spool_max_bytes,
        segment_bytes: config
            .transfer
            .spool_segment_bytes
            .min(config.transfer.spool_max_bytes / 8)
            .max(1 << 16),
        cache_bytes: config.transfer.spool_cache_bytes,
        min_free_bytes: config.transfer.spool_min_free_bytes,
    })?);

    let stop = shutdown.child_token();
    let (outbox, records) = Outbox::channel(OUTBOX_CHUNKS);
    let header = Arc::new(RwLock::new(Header {
        agent_id: agent_id.clone(),
        hostname: host::hostname(),
        addresses: host::addresses(),
    }));
    let plugins = Runtime::new(&config, outbox.clone(), &identity.ca_pem)?;
    let identity = Arc::new(RwLock::new(identity));
    let stats = Arc::new(TransferStats::default());
    let connected = Arc::new(AtomicBool::new(false));
    let connected_signal = Arc::new(Notify::new());
    let reconnect = Arc::new(Notify::new());
    let metadata = MetadataStore::load(&state_dir);
    let (inbound_tx, mut inbound) = mpsc::channel(64);

    let limits = BatchLimits {
        interval: config.transfer.batch_interval,
        max_records: config.transfer.batch_max_records,
        max_bytes: config.transfer.batch_max_bytes,
    };
    // The batcher outlives `stop`: records produced while stopping (the plugins' last
    // words, a restart's task result) still reach the spool.
    let batch_stop = CancellationToken::new();
    let batching = tokio::spawn(batcher(
        records,
        Arc::clone(&spool),
        Arc::clone(&header),
        limits,
        batch_stop.clone(),
    ));

    let sync_spool = Arc::clone(&spool);
    let sync_every = config.transfer.spool_sync_interval;
    let sync_stop = stop.clone();
    // Written batches are synced at most `spool_sync_interval` after the first
    // write since the last sync; with nothing written nothing wakes.
    let syncing = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = sync_stop.cancelled() => break,
                () = sync_spool.wait_unsynced() => {}
            }
            tokio::select! {
                _ = sync_stop.cancelled() => break,
                () = tokio::time::sleep(sync_every) => {}
            }
            let s = Arc::clone(&sync_spool);
            let _ = tokio::task::spawn_blocking(move || s.sync()).await;
        }
    });

    let forward_outbox = outbox.clone();
    let forward = tokio::spawn(async move {
        while let Some(r) = upstream_logs.recv().await {
            forward_outbox.try_send(r);
        }
    });

    let transport = Transport {
        server: config.server.clone(),
        identity: Arc::clone(&identity),
        header: Arc::clone(&header),
        spool: Arc::clone(&spool),
        inbound: inbound_tx,
        stats: Arc::clone(&stats),
        connected_signal: Arc::clone(&connected_signal),
        reconnect: Arc::clone(&reconnect),
        connected: Arc::clone(&connected),
        drain: config.agent.shutdown_grace / 2,
        heartbeat: config.agent.heartbeat_interval,
    };
    let transport_stop = CancellationToken::new();
    let transport_task = tokio::spawn(transport.run(transport_stop.clone()));

    // Plugins come back from the stored set before the server is reachable; an
    // agent no server has sent a set to runs its local set.
    let (desired_tx, desired_rx) = watch::channel(None);
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
    finish_upgrade(
        upgrade::on_start(&state_dir),
        state_dir.clone(),
        outbox.clone(),
        Arc::clone(&spool),
        Arc::clone(&connected),
    );
    let ctx = Reconciler {
        runtime: plugins.clone(),
        config: config.clone(),
        outbox: outbox.clone(),
    };
    let reconciling = tokio::spawn(reconciler(ctx, desired_rx, stop.clone()));

    if let Some(addr) = config.metrics.listen {
        let sources = crate::metrics::Sources {
            stats: Arc::clone(&stats),
            spool: Arc::clone(&spool),
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
    let heartbeat = Heartbeat {
        host_root: config.agent.host_root.clone(),
        interval: config.agent.heartbeat_interval,
        outbox: outbox.clone(),
        spool: Arc::clone(&spool),
        stats,
        metadata: metadata.clone(),
        header,
        connected: connected_signal,
        plugins: plugins.clone(),
        package_type: upgrade::package_type(&config).unwrap_or_default(),
    };
    let heartbeat_task = tokio::spawn(heartbeat.run(stop.clone()));
    let renewer = Arc::new(Renewer::new(
        state_dir.clone(),
        identity,
        outbox.clone(),
        connected,
        reconnect,
    ));
    let renew_task = tokio::spawn(Arc::clone(&renewer).run(stop.clone()));

    let mut exit = Exit::Stopped;
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = inbound.recv() => m,
        };
        let Some(msg) = msg else { break };
        match msg {
            Inbound::Task(task) if task.object_name == PRODUCT => {
                let (reply, action) = tasks::handle(&task, &metadata);
                outbox.send(reply).await;
                if action == Action::Restart {
                    info!(token = %task.token, "restart requested by the server");
                    exit = Exit::Restart;
                    stop.cancel();
                }
            }
            Inbound::Task(task) => {
                let token = task.token.clone();
                let plugin = crate::plugin::span(&task.object_name);
                if let Err(msg) = plugins.send_task(task) {
                    plugin.in_scope(|| warn!(%token, %msg, "task refused"));
                    outbox.send(tasks::result(&token, false, &msg)).await;
                }
            }
            Inbound::Renewal(answer) => renewer.complete(answer),
            Inbound::Configs(configs, token) => {
                info!(entries = configs.len(), "desired configuration received");
                desired_tx.send_replace(Some((configs, token)));
            }
        }
    }

    // Stop producers and plugins, let the batcher flush, let the transport drain.
    stop.cancel();
    let _ = reconciling.await;
    plugins.shutdown().await;
    for (name, task) in [
        ("heartbeat", heartbeat_task),
        ("renewal", renew_task),
        ("spool sync", syncing),
    ] {
        if let Err(e) = task.await {
            error!(task = name, error = %e, "task failed");
        }
    }
    forward.abort();
    drop(outbox);
    drop(renewer);
    drop(plugins);
    batch_stop.cancel();
    let _ = batching.await;
    transport_stop.cancel();
    let _ = transport_task.await;
    spool.sync();
    info!(?exit, spool = ?spool.stats(), "keel-agent stopped");
    Ok(exit)
}
