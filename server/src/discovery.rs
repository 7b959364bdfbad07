//! Discovery: an agent's proxy plugin sweeps what its own allow list permits for
//! endpoints that accept a connection (a `6102` task; the plugin never goes
//! beyond the list), the server scans each one it found, and those that speak
//! TLS may go into a scheduled audit at once.

use std::sync::Arc;
use std::time::Duration;

use keel_proto::data_type::PROXY_DISCOVER;
use serde::Serialize;
use utoipa::ToSchema;

use crate::inventory::{self, PROXY, ScanResult};
use crate::state::{PluginTask, ServerState};

/// How long a sweep may take: the plugin tries at most 16,384 endpoints, 128 at
/// a time, each for at most a second.
pub const SWEEP_TIMEOUT: Duration = Duration::from_secs(180);

/// What a discovery found.
#[derive(Debug, Serialize, ToSchema)]
pub struct Discovery {
    /// Endpoints the plugin tried.
    pub tried: u64,
    /// What it did not sweep, and why (a network too large, the endpoint cap).
    pub skipped: Vec<String>,
    /// Each endpoint that accepted a connection, scanned: `ok` ones speak TLS.
    pub scans: Vec<ScanResult>,
    /// The scheduled audits the TLS endpoints were added to, when asked for (one
    /// per `tunnel.max_targets` of them).
    pub schedules: Vec<String>,
}

/// Sweeps `agent_id`'s allow list (in wide port ranges, `ports` or the plugin's
/// usual TLS ports) and scans what answered.
pub async fn discover(state: &Arc<ServerState>, agent_id: &str, ports: &[u16], by: &str) -> Result<Discovery, String> {
    // A sweep is a job of the plugin's, like a probe.
    let slot = state.tunnels.job_slot(agent_id).await;
    let token = uuid::Uuid::new_v4().to_string();
    let data = if ports.is_empty() {
        String::new()
    } else {
        serde_json::json!({ "ports": ports }).to_string()
    };
    let mut answers = state.cluster.wait(&token, agent_id).await;
    let stored = data.clone();
    let task = PluginTask {
        object_name: PROXY,
        data_type: PROXY_DISCOVER,
        token: &token,
        stored: &stored,
        sent: data,
        timeout: SWEEP_TIMEOUT,
    };
    state.send_task(agent_id, task, by).await.map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(SWEEP_TIMEOUT, answers.task_result())
        .await
        .map_err(|_| {
            format!(
                "agent {agent_id}'s discovery did not answer within {} s",
                SWEEP_TIMEOUT.as_secs()
            )
        })?
        .ok_or_else(|| "the cluster connection ended".to_owned())?;
    drop(slot);
    let msg = answer.get("msg").map_or("", String::as_str);
    if answer.get("status").is_none_or(|s| s != "succeeded") {
        return Err(format!("agent {agent_id}: {msg}"));
    }
    let found: serde_json::Value =
        serde_json::from_str(msg).map_err(|e| format!("agent {agent_id}'s discovery answer is not JSON: {e}"))?;
    let strings = |key: &str| -> Vec<String> {
        found[key]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let open = strings("open");
    // What the plugin says is checked as any target is.
    let open: Vec<String> = open
        .into_iter()
        .filter(|t| inventory::check_target(t).is_ok())
        .collect();
    let scans = inventory::scan_all(state, agent_id, &open, by).await;
    Ok(Discovery {
        tried: found["tried"].as_u64().unwrap_or(0),
        skipped: strings("skipped"),
        scans,
        schedules: Vec::new(),
    })
}
