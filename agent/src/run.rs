//! `keel-agent run`: wires the data path, the stream, the heartbeat, renewal and
//! the task dispatcher together, and stops them within the grace period.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::AgentConfig;
use crate::heartbeat::Heartbeat;
use crate::outbox::{BatchLimits, Outbox, Pending, Record, batcher};
use crate::pki::{self, PkiError};
use crate::renew::Renewer;
use crate::tasks::{self, Action, MetadataStore, PRODUCT};
use crate::transport::{Header, Inbound, TransferStats, Transport};
use crate::{host, id};

/// Records the producers may queue before they wait.
const OUTBOX_RECORDS: usize = 8192;
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
    if agent_id != derived {
        warn!(enrolled = %agent_id, derived = %derived, ?source,
            "the host's agent ID changed since enrollment; using the enrolled ID");
    }
    info!(%agent_id, version = keel_common::VERSION, "keel-agent starting");

    let stop = shutdown.child_token();
    let (outbox, records) = Outbox::channel(OUTBOX_RECORDS);
    let pending = Arc::new(Pending::new(config.transfer.pending_max_bytes));
    let identity = Arc::new(RwLock::new(identity));
    let header = Arc::new(RwLock::new(Header {
        agent_id: agent_id.clone(),
        hostname: host::hostname(),
        addresses: host::addresses(),
    }));
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
    // The batcher outlives `stop` so that records produced while stopping (the
    // restart's task result) still get batched; it ends when every producer is gone.
    let batch_stop = CancellationToken::new();
    let batching = tokio::spawn(batcher(records, Arc::clone(&pending), limits, batch_stop.clone()));

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
        pending: Arc::clone(&pending),
        inbound: inbound_tx,
        stats: Arc::clone(&stats),
        connected_signal: Arc::clone(&connected_signal),
        reconnect: Arc::clone(&reconnect),
        connected: Arc::clone(&connected),
        drain: config.agent.shutdown_grace / 2,
    };
    let transport_stop = CancellationToken::new();
    let transport_task = tokio::spawn(transport.run(transport_stop.clone()));

    let heartbeat = Heartbeat {
        host_root: config.agent.host_root.clone(),
        interval: config.agent.heartbeat_interval,
        outbox: outbox.clone(),
        pending: Arc::clone(&pending),
        stats,
        metadata: metadata.clone(),
        header,
        connected: connected_signal,
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
                let msg = format!("no such plugin: {}", task.object_name);
                warn!(token = %task.token, %msg, "task refused");
                outbox.send(tasks::result(&task.token, false, &msg)).await;
            }
            Inbound::Renewal(answer) => renewer.complete(answer),
            Inbound::Configs(configs) => {
                info!(plugins = ?configs, "desired plugin set received; this agent build runs no plugins");
            }
        }
    }

    // Stop producers, let the batcher flush, let the transport drain what it can.
    stop.cancel();
    for (name, task) in [("heartbeat", heartbeat_task), ("renewal", renew_task)] {
        if let Err(e) = task.await {
            error!(task = name, error = %e, "task failed");
        }
    }
    forward.abort();
    drop(outbox);
    drop(renewer);
    batch_stop.cancel();
    let _ = batching.await;
    transport_stop.cancel();
    let _ = transport_task.await;
    info!(?exit, pending = ?pending.stats(), "keel-agent stopped");
    Ok(exit)
}
