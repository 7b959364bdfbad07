//! `/api/v1/policies…`: which version of a component applies to which agents.
//!
//! A policy takes effect when an agent next connects or when a `sync-config` task
//! reaches it; a task rolls it out in batches with a failure threshold.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use keel_common::time::{now_ms, rfc3339_ms};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::agents::json_body;
use super::{ApiError, ErrorBody, Principal};
use crate::policy::{self, Policy, Target};
use crate::state::ServerState;
use crate::store::Role;

/// A policy as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PolicyView {
    id: String,
    name: String,
    component: String,
    version: String,
    detail: String,
    target: Target,
    created_at: String,
}

impl From<Policy> for PolicyView {
    fn from(p: Policy) -> Self {
        Self {
            id: p.id,
            name: p.name,
            component: p.component,
            version: p.version,
            detail: p.detail,
            target: p.target,
            created_at: rfc3339_ms(p.created_at),
        }
    }
}

/// Body of `POST /api/v1/policies`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPolicy {
    /// Unique name, 1-64 characters of `[A-Za-z0-9._-]`.
    name: String,
    /// `keel-agent` or a plugin.
    component: String,
    /// A version the component store has.
    version: String,
    /// Plugin configuration, passed as `DETAIL`.
    #[serde(default)]
    detail: String,
    /// Which agents.
    target: Target,
}

/// Body of `PUT /api/v1/policies/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyChange {
    /// The new version.
    version: String,
    /// The new detail; the current one stays when this is left out.
    #[serde(default)]
    detail: Option<String>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

async fn check(state: &ServerState, p: &Policy, existing: &[Policy]) -> Result<(), ApiError> {
    if p.detail.len() > 64 << 10 {
        return Err(ApiError::bad_request("detail is larger than 65536 bytes"));
    }
    let empty = match &p.target {
        Target::Tags(v) | Target::Agents(v) => v.is_empty() || v.iter().any(String::is_empty),
        Target::Platform(s) => s.is_empty(),
        Target::All => false,
    };
    if empty {
        return Err(ApiError::bad_request("target names no tag, agent or platform"));
    }
    if state
        .store
        .packages(Some(&p.component))
        .await?
        .iter()
        .all(|k| k.version != p.version)
    {
        return Err(ApiError::bad_request(format!(
            "component {} has no version {} in the store; upload it first",
            p.component, p.version
        )));
    }
    let agents: Vec<_> = state
        .store
        .list_agents()
        .await?
        .iter()
        .map(ServerState::facts)
        .collect();
    if let Some(why) = policy::conflict(p, existing, &agents) {
        return Err(ApiError::conflict(format!("conflicting policy: {why}")));
    }
    Ok(())
}

/// Every policy.
#[utoipa::path(get, path = "/policies", tag = "policies", responses((status = 200, body = [PolicyView])))]
pub async fn list(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Vec<PolicyView>>, ApiError> {
    who.require(Role::Viewer)?;
    Ok(Json(
        state
            .store
            .policies()
            .await?
            .into_iter()
            .map(PolicyView::from)
            .collect(),
    ))
}

/// Creates a policy; refused if it names a missing version or conflicts with another.
#[utoipa::path(post, path = "/policies", tag = "policies", request_body = NewPolicy,
    responses((status = 201, body = PolicyView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn create(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    body: Result<Json<NewPolicy>, JsonRejection>,
) -> Result<(StatusCode, Json<PolicyView>), ApiError> {
    who.require(Role::Operator)?;
    let n = json_body(body)?;
    if !valid_name(&n.name) {
        return Err(ApiError::bad_request(format!(
            "invalid policy name {:?}: 1-64 characters of [A-Za-z0-9._-]",
            n.name
        )));
    }
    let p = Policy {
        id: uuid::Uuid::new_v4().to_string(),
        name: n.name,
        component: n.component,
        version: n.version,
        detail: n.detail,
        target: n.target,
        created_at: now_ms(),
    };
    let existing = state.store.policies().await?;
    check(&state, &p, &existing).await?;
    if !state.store.policy_add(&p, &who.token_id).await? {
        return Err(ApiError::conflict(format!("a policy named {:?} exists", p.name)));
    }
    state.reload_policies().await?;
    Ok((StatusCode::CREATED, Json(p.into())))
}

async fn find(state: &ServerState, id: &str) -> Result<(Policy, Vec<Policy>), ApiError> {
    let all = state.store.policies().await?;
    let p = all
        .iter()
        .find(|p| p.id == id || p.name == id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no policy {id}")))?;
    Ok((p, all))
}

/// Changes a policy's version and detail.
#[utoipa::path(put, path = "/policies/{id}", tag = "policies", params(("id" = String, Path, description = "ID or name")),
    request_body = PolicyChange,
    responses((status = 200, body = PolicyView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn update(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Json<PolicyChange>, JsonRejection>,
) -> Result<Json<PolicyView>, ApiError> {
    who.require(Role::Operator)?;
    let change = json_body(body)?;
    let (mut p, all) = find(&state, &id).await?;
    p.version = change.version;
    if let Some(detail) = change.detail {
        p.detail = detail;
    }
    check(&state, &p, &all).await?;
    state.store.policy_update(&p.id, &p.version, &p.detail).await?;
    state.reload_policies().await?;
    Ok(Json(p.into()))
}

/// Deletes a policy.
#[utoipa::path(delete, path = "/policies/{id}", tag = "policies", params(("id" = String, Path, description = "ID or name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    who.require(Role::Operator)?;
    let (p, _) = find(&state, &id).await?;
    state.store.policy_delete(&p.id).await?;
    state.reload_policies().await?;
    Ok(StatusCode::NO_CONTENT)
}
