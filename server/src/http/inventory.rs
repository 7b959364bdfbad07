//! The TLS inventory: `POST /api/v1/scans` runs audit jobs through an agent's
//! proxy plugin; `GET /api/v1/certificates` lists what they found.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::{Extension, Json};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::agents::{agent_or_404, json_body};
use super::{ApiError, ErrorBody, Principal};
use crate::inventory::{self, ScanResult};
use crate::state::ServerState;
use crate::store::{CertRow, Role};

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
    let max = state.config.tunnel.max_targets;
    if req.targets.is_empty() || req.targets.len() > max {
        return Err(ApiError::bad_request(format!("targets: give 1-{max} targets")));
    }
    for t in &req.targets {
        inventory::check_target(t).map_err(|e| ApiError::bad_request(format!("targets: {e}")))?;
    }
    agent_or_404(&state, &req.agent).await?;
    if !state.is_online(&req.agent).await? {
        return Err(ApiError::conflict(format!("agent {} is offline", req.agent)));
    }
    Ok(Json(
        inventory::scan_all(&state, &req.agent, &req.targets, &who.token_id).await,
    ))
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
    let Query(q) = q.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let before = q
        .expiring_within_days
        .map(|d| keel_common::time::now_ms() + i64::from(d) * 86_400_000);
    Ok(Json(state.store.certificates(q.agent.as_deref(), before).await?))
}
