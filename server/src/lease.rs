//! This instance's lease in the cluster's membership, and its presence.
//!
//! The lease is renewed every `cluster.renew`; marks and heartbeats held in
//! memory are written every [`crate::state::FLUSH_EVERY`], in batches and only
//! when changed; instances whose lease ended long ago are reaped. A stopping
//! instance gives its agents up.

use std::sync::Arc;
use std::time::Duration;

use keel_common::time::now_ms;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::state::ServerState;
use crate::store::InstanceRow;

/// How long a dead instance's row stays before it is reaped.
const REAP_AFTER: Duration = Duration::from_secs(3600);

/// Keeps this instance's lease, writes presence in batches, and reaps dead
/// instances, until `shutdown`; then gives up this instance's agents.
pub async fn run(state: Arc<ServerState>, shutdown: CancellationToken) {
    let cfg = &state.config.cluster;
    let mut renew = tokio::time::interval(cfg.renew);
    let mut flush = tokio::time::interval(crate::state::FLUSH_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = renew.tick() => {
                if let Err(e) = renew_lease(&state).await {
                    warn!(error = %e, "cannot renew this instance's lease");
                }
            }
            _ = flush.tick() => {
                if let Err(e) = state.flush().await {
                    warn!(error = %e, "cannot store stream marks and heartbeats");
                }
            }
        }
    }
    if let Err(e) = state.flush().await {
        warn!(error = %e, "cannot store stream marks and heartbeats at shutdown");
    }
    if let Err(e) = state.store.instance_leave(&state.cluster.instance, now_ms()).await {
        warn!(error = %e, "cannot end this instance's lease at shutdown");
    }
}

/// Registers or renews the lease, and reaps instances long dead.
pub async fn renew_lease(state: &ServerState) -> Result<(), crate::store::StoreError> {
    let now = now_ms();
    let lease = i64::try_from(state.config.cluster.lease.as_millis()).unwrap_or(i64::MAX);
    state
        .store
        .instance_renew(&InstanceRow {
            id: state.cluster.instance.clone(),
            started_at: state.cluster.started_at,
            lease_until: now.saturating_add(lease),
            grpc: state.advertised_grpc(),
            http: state.public_url(),
            agents: i64::try_from(state.connections.len()).unwrap_or(i64::MAX),
        })
        .await?;
    let reap = i64::try_from(REAP_AFTER.as_millis()).unwrap_or(i64::MAX);
    let gone = state.store.instances_reap(now.saturating_sub(reap)).await?;
    if gone > 0 {
        info!(instances = gone, "reaped instances whose lease ended long ago");
    }
    Ok(())
}
