//! The TLS inventory: `POST /api/v1/scans` runs audit jobs through an agent's
//! proxy plugin, `/api/v1/scans/schedules` runs them every interval;
//! `GET /api/v1/certificates` lists what they found,
//! `GET /api/v1/certificates/findings` what an auditor would flag in it, and
//! `GET /api/v1/certificates/history` every scan.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::agents::{agent_or_404, json_body};
use super::{ApiError, ErrorBody, Principal};
use crate::discovery::{self, Discovery};
use crate::findings::Severity;
use crate::inventory::{self, ScanResult};
use crate::state::ServerState;
use crate::store::{CertRow, Role, ScanEvent, ScheduleRow};

/// A scan: targets reached through one agent's proxy.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScanRequest {
    /// The agent whose proxy plugin reaches the targets.
    agent: String,
    /// `host:port` targets, at most `tunnel.max_targets`.
    targets: Vec<String>,
}

/// Scans targets through an agent's proxy plugin and records their certificates.
/// Answers when every target is done, each with its certificate or its error.
#[utoipa::path(post, path = "/scans", tag = "inventory", request_body = ScanRequest,
    responses((status = 200, body = [ScanResult]), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn scan(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    body: Result<Json<ScanRequest>, JsonRejection>,
) -> Result<Json<Vec<ScanResult>>, ApiError> {
    who.require(Role::Operator)?;
    let req = json_body(body)?;
    check_targets(&state, &req.targets)?;
    agent_or_404(&state, &req.agent).await?;
    if !state.is_online(&req.agent).await? {
        return Err(ApiError::conflict(format!("agent {} is offline", req.agent)));
    }
    Ok(Json(
        inventory::scan_all(&state, &req.agent, &req.targets, &who.token_id).await,
    ))
}

/// Refuses an empty or too long list of targets, or one that is not host:port.
fn check_targets(state: &ServerState, targets: &[String]) -> Result<(), ApiError> {
    let max = state.config.tunnel.max_targets;
    if targets.is_empty() || targets.len() > max {
        return Err(ApiError::bad_request(format!("targets: give 1-{max} targets")));
    }
    for t in targets {
        inventory::check_target(t).map_err(|e| ApiError::bad_request(format!("targets: {e}")))?;
    }
    Ok(())
}

/// Filters of the inventory.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CertQuery {
    /// Only targets scanned through this agent.
    agent: Option<String>,
    /// Only certificates that expire within this many days (0: already expired).
    expiring_within_days: Option<u32>,
}

/// The TLS inventory, soonest expiry first.
#[utoipa::path(get, path = "/certificates", tag = "inventory", params(CertQuery),
    responses((status = 200, body = [CertRow]), (status = 400, body = ErrorBody)))]
pub async fn certificates(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    q: Result<Query<CertQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<CertRow>>, ApiError> {
    who.require(Role::Viewer)?;
    let q = super::agents::query(q)?;
    let before = q
        .expiring_within_days
        .map(|d| keel_common::time::now_ms() + i64::from(d) * 86_400_000);
    Ok(Json(state.store.certificates(q.agent.as_deref(), before).await?))
}

/// Filters of the findings.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FindingQuery {
    /// Only targets scanned through this agent.
    agent: Option<String>,
    /// Only findings this severe or worse: `low`, `medium`, `high`, `critical`.
    min_severity: Option<Severity>,
}

/// One finding, with the target it is about.
#[derive(Debug, Serialize, ToSchema)]
pub struct TargetFinding {
    /// The agent whose proxy reached the target.
    agent_id: String,
    /// `host:port` as scanned.
    target: String,
    /// The leaf's subject.
    subject: String,
    /// The leaf's expiry, Unix ms.
    not_after: i64,
    /// How bad it is.
    severity: Severity,
    /// What it is (`expired`, `weak_key`, `hostname_mismatch`, …).
    code: String,
    /// What exactly.
    message: String,
}

/// What the inventory's last scans found wrong, most severe first.
#[utoipa::path(get, path = "/certificates/findings", tag = "inventory", params(FindingQuery),
    responses((status = 200, body = [TargetFinding]), (status = 400, body = ErrorBody)))]
pub async fn findings(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    q: Result<Query<FindingQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<TargetFinding>>, ApiError> {
    who.require(Role::Viewer)?;
    let q = super::agents::query(q)?;
    let min = q.min_severity.unwrap_or(Severity::Low);
    let mut out: Vec<TargetFinding> = state
        .store
        .certificates(q.agent.as_deref(), None)
        .await?
        .into_iter()
        .flat_map(|c| {
            let CertRow {
                agent_id,
                target,
                subject,
                not_after,
                findings,
                ..
            } = c;
            findings
                .into_iter()
                .filter(|f| f.severity >= min)
                .map(move |f| TargetFinding {
                    agent_id: agent_id.clone(),
                    target: target.clone(),
                    subject: subject.clone(),
                    not_after,
                    severity: f.severity,
                    code: f.code,
                    message: f.message,
                })
        })
        .collect();
    out.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then_with(|| a.not_after.cmp(&b.not_after))
            .then_with(|| a.target.cmp(&b.target))
    });
    Ok(Json(out))
}

/// A scheduled audit to make.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// The agent whose proxy plugin reaches the targets.
    agent: String,
    /// `host:port` targets, at most `tunnel.max_targets`.
    targets: Vec<String>,
    /// How often, e.g. `6h` or `1d`: at least `tunnel.min_audit_interval`, at
    /// most 30 days.
    every: String,
}

/// The longest interval of a scheduled audit.
const MAX_AUDIT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// An audit interval as asked for, checked against the limits.
fn audit_interval(state: &ServerState, every: &str) -> Result<std::time::Duration, ApiError> {
    let interval = humantime::parse_duration(every)
        .map_err(|e| ApiError::bad_request(format!("every: {every:?} is not a duration ({e})")))?;
    let min = state.config.tunnel.min_audit_interval;
    if interval < min || interval > MAX_AUDIT_INTERVAL {
        return Err(ApiError::bad_request(format!(
            "every: {every} is outside {} to {} (tunnel.min_audit_interval)",
            humantime::format_duration(min),
            humantime::format_duration(MAX_AUDIT_INTERVAL)
        )));
    }
    Ok(interval)
}

/// Refuses when `more` schedules would pass `tunnel.max_schedules`.
async fn room_for_schedules(state: &ServerState, more: usize) -> Result<(), ApiError> {
    let count = usize::try_from(state.store.schedule_count().await?).unwrap_or(usize::MAX);
    let limit = state.config.tunnel.max_schedules;
    if count.saturating_add(more) > limit {
        return Err(ApiError::conflict(format!(
            "{count} audits are scheduled already (tunnel.max_schedules = {limit})"
        )));
    }
    Ok(())
}

/// A new schedule of `targets` through `agent`, first due at `next_run`.
fn new_schedule(agent: &str, targets: Vec<String>, every: std::time::Duration, next_run: i64, by: &str) -> ScheduleRow {
    let now = keel_common::time::now_ms();
    ScheduleRow {
        id: uuid::Uuid::new_v4().to_string(),
        agent_id: agent.to_owned(),
        targets,
        interval_ms: i64::try_from(every.as_millis()).unwrap_or(i64::MAX),
        next_run,
        created_by: by.to_owned(),
        created_at: now,
        last_run: 0,
        last_ok: 0,
        last_failed: 0,
    }
}

/// Schedules an audit: the targets are scanned through the agent now and then
/// every interval, each scan kept in the history.
#[utoipa::path(post, path = "/scans/schedules", tag = "inventory", request_body = ScheduleRequest,
    responses((status = 201, body = ScheduleRow), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn schedule(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    body: Result<Json<ScheduleRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<ScheduleRow>), ApiError> {
    who.require(Role::Operator)?;
    let req = json_body(body)?;
    check_targets(&state, &req.targets)?;
    let every = audit_interval(&state, &req.every)?;
    agent_or_404(&state, &req.agent).await?;
    room_for_schedules(&state, 1).await?;
    // The first run is due at once.
    let row = new_schedule(
        &req.agent,
        req.targets,
        every,
        keel_common::time::now_ms(),
        &who.token_id,
    );
    state.store.schedule_add(&row).await?;
    Ok((StatusCode::CREATED, Json(row)))
}

/// The scheduled audits, soonest run first.
#[utoipa::path(get, path = "/scans/schedules", tag = "inventory", responses((status = 200, body = [ScheduleRow])))]
pub async fn schedules(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Vec<ScheduleRow>>, ApiError> {
    who.require(Role::Viewer)?;
    Ok(Json(state.store.schedules().await?))
}

/// Removes a scheduled audit (its history stays).
#[utoipa::path(delete, path = "/scans/schedules/{id}", tag = "inventory", params(("id" = String, Path, description = "schedule ID")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn unschedule(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    who.require(Role::Operator)?;
    if state.store.schedule_remove(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no scheduled audit {id}")))
    }
}

/// Filters of the scan history.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Only scans through this agent.
    agent: Option<String>,
    /// Only scans of this `host:port`.
    target: Option<String>,
    /// At most this many, newest first (default 100, at most 1000).
    limit: Option<u32>,
}

/// Every scan, newest first: its certificate's fingerprint or its error, whether
/// the certificate changed since the scan before, its findings' codes.
#[utoipa::path(get, path = "/certificates/history", tag = "inventory", params(HistoryQuery),
    responses((status = 200, body = [ScanEvent]), (status = 400, body = ErrorBody)))]
pub async fn history(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    q: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<ScanEvent>>, ApiError> {
    who.require(Role::Viewer)?;
    let q = super::agents::query(q)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit: {limit} is outside 1-1000")));
    }
    Ok(Json(
        state
            .store
            .scan_history(q.agent.as_deref(), q.target.as_deref(), i64::from(limit))
            .await?,
    ))
}

/// A discovery to run.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscoverRequest {
    /// The agent whose proxy plugin sweeps its allow list.
    agent: String,
    /// Ports to try where the allow list permits a wide range (default: the
    /// usual TLS ports); at most 256.
    #[serde(default)]
    ports: Vec<u16>,
    /// Schedule the TLS services found, this often (e.g. `1d`).
    every: Option<String>,
}

/// Sweeps what the agent's allow list permits (never beyond it) for endpoints
/// that accept a connection, scans each, and adds those that speak TLS to a new
/// scheduled audit when `every` is given.
#[utoipa::path(post, path = "/scans/discover", tag = "inventory", request_body = DiscoverRequest,
    responses((status = 200, body = Discovery), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 502, body = ErrorBody)))]
pub async fn discover(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    body: Result<Json<DiscoverRequest>, JsonRejection>,
) -> Result<Json<Discovery>, ApiError> {
    who.require(Role::Operator)?;
    let req = json_body(body)?;
    if req.ports.len() > 256 || req.ports.contains(&0) {
        return Err(ApiError::bad_request("ports: give at most 256 ports, each 1-65535"));
    }
    let every = req.every.as_deref().map(|e| audit_interval(&state, e)).transpose()?;
    agent_or_404(&state, &req.agent).await?;
    if !state.is_online(&req.agent).await? {
        return Err(ApiError::conflict(format!("agent {} is offline", req.agent)));
    }
    if every.is_some() {
        room_for_schedules(&state, 1).await?;
    }
    let mut found = discovery::discover(&state, &req.agent, &req.ports, &who.token_id)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e))?;
    if let Some(every) = every {
        let tls: Vec<String> = found
            .scans
            .iter()
            .filter(|s| s.status == "ok")
            .map(|s| s.target.clone())
            .collect();
        let next = keel_common::time::now_ms().saturating_add(i64::try_from(every.as_millis()).unwrap_or(i64::MAX));
        for chunk in tls.chunks(state.config.tunnel.max_targets.max(1)) {
            let row = new_schedule(&req.agent, chunk.to_vec(), every, next, &who.token_id);
            state.store.schedule_add(&row).await?;
            found.schedules.push(row.id);
        }
    }
    Ok(Json(found))
}
