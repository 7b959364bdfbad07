//! `/api/v1/agents…`: the registry, tags, direct tasks, revocation, effective config.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use keel_common::time::{now_ms, rfc3339_ms};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ErrorBody, Principal};
use crate::connections::{Closing, Outbound, SendError, TaskCommand};
use crate::policy::Effective;
use crate::state::ServerState;
use crate::store::{AgentRow, NewTask, ReportedPlugin, Role};

/// A plugin as the API shows it, from its last heartbeat.
#[derive(Debug, Serialize, ToSchema)]
pub struct PluginView {
    name: String,
    version: String,
    state: String,
    pid: Option<i64>,
    updated_at: String,
    #[schema(value_type = Object)]
    heartbeat: serde_json::Map<String, serde_json::Value>,
}

impl From<ReportedPlugin> for PluginView {
    fn from(p: ReportedPlugin) -> Self {
        Self {
            name: p.name,
            version: p.version,
            state: p.state,
            pid: p.pid,
            updated_at: rfc3339_ms(p.updated_at),
            heartbeat: p.heartbeat,
        }
    }
}

/// An agent as the API shows it; the shape the design fixes.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentView {
    id: String,
    /// The name from the key database, for agents enrolled by key.
    name: String,
    hostname: String,
    version: String,
    product: String,
    online: bool,
    first_seen: String,
    last_seen: String,
    connected_at: Option<String>,
    last_heartbeat: Option<String>,
    intranet_ipv4: Vec<String>,
    extranet_ipv4: Vec<String>,
    intranet_ipv6: Vec<String>,
    extranet_ipv6: Vec<String>,
    plugins: Vec<PluginView>,
    tags: Vec<String>,
    /// Fields of the last heartbeat.
    #[schema(value_type = Object)]
    heartbeat: serde_json::Map<String, serde_json::Value>,
}

impl AgentView {
    fn new(a: AgentRow, online: bool, plugins: Vec<ReportedPlugin>) -> Self {
        Self {
            id: a.id,
            name: a.name,
            hostname: a.meta.hostname,
            version: a.meta.version,
            product: a.meta.product,
            online,
            first_seen: rfc3339_ms(a.first_seen),
            last_seen: rfc3339_ms(a.last_seen),
            connected_at: a.connected_at.map(rfc3339_ms),
            last_heartbeat: a.last_heartbeat.map(rfc3339_ms),
            intranet_ipv4: a.meta.intranet_ipv4,
            extranet_ipv4: a.meta.extranet_ipv4,
            intranet_ipv6: a.meta.intranet_ipv6,
            extranet_ipv6: a.meta.extranet_ipv6,
            plugins: plugins.into_iter().map(PluginView::from).collect(),
            tags: a.tags,
            heartbeat: a.heartbeat,
        }
    }
}

/// Filters of the agent list; all given must hold.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AgentFilter {
    /// Only agents that are (not) online.
    online: Option<bool>,
    /// Only agents of this version.
    version: Option<String>,
    /// Only agents with this tag.
    tag: Option<String>,
    /// Only agents whose host name contains this.
    hostname: Option<String>,
    /// Only agents running this plugin.
    plugin: Option<String>,
}

pub(super) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(t)| t)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {}", e.body_text())))
}

fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
}

/// Every agent, filtered.
#[utoipa::path(get, path = "/agents", tag = "agents", params(AgentFilter),
    responses((status = 200, body = [AgentView]), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    filter: Result<Query<AgentFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AgentView>>, ApiError> {
    who.require(Role::Viewer)?;
    let f = query(filter)?;
    let agents = state.store.list_agents().await?;
    let mut plugins = state.store.reported_plugins(None).await?;
    let mut out = Vec::new();
    for a in agents {
        let online = state.connections.is_online(&a.id);
        let p = plugins.remove(&a.id).unwrap_or_default();
        let keep = f.online.is_none_or(|o| o == online)
            && f.version.as_ref().is_none_or(|v| *v == a.meta.version)
            && f.tag.as_ref().is_none_or(|t| a.tags.contains(t))
            && f.hostname.as_ref().is_none_or(|h| a.meta.hostname.contains(h.as_str()))
            && f.plugin.as_ref().is_none_or(|n| p.iter().any(|x| x.name == *n));
        if keep {
            out.push(AgentView::new(a, online, p));
        }
    }
    Ok(Json(out))
}

pub(super) async fn agent_or_404(state: &ServerState, id: &str) -> Result<AgentRow, ApiError> {
    state
        .store
        .get_agent(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no agent {id}")))
}

/// One agent, with its last heartbeat and its plugins' heartbeats.
#[utoipa::path(get, path = "/agents/{id}", tag = "agents", params(("id" = String, Path)),
    responses((status = 200, body = AgentView), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    who.require(Role::Viewer)?;
    let agent = agent_or_404(&state, &id).await?;
    let online = state.connections.is_online(&id);
    let plugins = state
        .store
        .reported_plugins(Some(&id))
        .await?
        .remove(&id)
        .unwrap_or_default();
    Ok(Json(AgentView::new(agent, online, plugins)))
}

/// Decommissions an agent: revokes its certificates, closes its stream, forgets it.
#[utoipa::path(delete, path = "/agents/{id}", tag = "agents", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    who.require(Role::Operator)?;
    agent_or_404(&state, &id).await?;
    let reason = format!("agent deleted by token {}", who.token_id);
    state.revoke_agent(&id, &reason, None).await?;
    if let Err(SendError::Busy(_)) = state.connections.send(&id, Outbound::Close(Closing::Revoked)) {
        tracing::warn!(agent_id = %id, "stream of a deleted agent was busy; revocation closes it");
    }
    state.store.agent_delete(&id).await?;
    tracing::warn!(agent_id = %id, by = %who.token_id, "agent deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Replaces an agent's tags.
#[utoipa::path(put, path = "/agents/{id}/tags", tag = "agents", params(("id" = String, Path)), request_body = Vec<String>,
    responses((status = 200, body = [String]), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn set_tags(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Json<Vec<String>>, JsonRejection>,
) -> Result<Json<Vec<String>>, ApiError> {
    who.require(Role::Operator)?;
    let tags = json_body(body)?;
    for t in &tags {
        check_tag(t)?;
    }
    agent_or_404(&state, &id).await?;
    state.store.set_tags(&id, &tags).await?;
    Ok(Json(agent_or_404(&state, &id).await?.tags))
}

fn check_tag(t: &str) -> Result<(), ApiError> {
    let ok = !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid tag {t:?}: 1-64 characters of [A-Za-z0-9._:-]"
        )))
    }
}

/// Adds one tag.
#[utoipa::path(put, path = "/agents/{id}/tags/{tag}", tag = "agents", params(("id" = String, Path), ("tag" = String, Path)),
    responses((status = 200, body = [String]), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn add_tag(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path((id, tag)): Path<(String, String)>,
) -> Result<Json<Vec<String>>, ApiError> {
    who.require(Role::Operator)?;
    check_tag(&tag)?;
    let mut tags = agent_or_404(&state, &id).await?.tags;
    if !tags.contains(&tag) {
        tags.push(tag);
        state.store.set_tags(&id, &tags).await?;
    }
    Ok(Json(agent_or_404(&state, &id).await?.tags))
}

/// Removes one tag.
#[utoipa::path(delete, path = "/agents/{id}/tags/{tag}", tag = "agents", params(("id" = String, Path), ("tag" = String, Path)),
    responses((status = 200, body = [String]), (status = 404, body = ErrorBody)))]
pub async fn remove_tag(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path((id, tag)): Path<(String, String)>,
) -> Result<Json<Vec<String>>, ApiError> {
    who.require(Role::Operator)?;
    let tags: Vec<String> = agent_or_404(&state, &id)
        .await?
        .tags
        .into_iter()
        .filter(|t| *t != tag)
        .collect();
    state.store.set_tags(&id, &tags).await?;
    Ok(Json(tags))
}

/// An agent's effective configuration and what chose each entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigView {
    agent_id: String,
    /// Whether the server manages this agent's plugins and version.
    managed: bool,
    components: Vec<Effective>,
}

/// The effective configuration of an agent, computed from the policies and its own set.
#[utoipa::path(get, path = "/agents/{id}/config", tag = "agents", params(("id" = String, Path)),
    responses((status = 200, body = ConfigView), (status = 404, body = ErrorBody)))]
pub async fn config(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<ConfigView>, ApiError> {
    who.require(Role::Viewer)?;
    agent_or_404(&state, &id).await?;
    let effective: Option<BTreeMap<String, Effective>> = state.effective(&id).await?;
    Ok(Json(ConfigView {
        agent_id: id,
        managed: effective.is_some(),
        components: effective.unwrap_or_default().into_values().collect(),
    }))
}

/// Body of `POST /api/v1/agents/{id}/tasks`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    data_type: i32,
    #[serde(default = "default_object")]
    object_name: String,
    #[serde(default)]
    data: String,
}

fn default_object() -> String {
    "keel-agent".into()
}

/// Largest task data accepted.
pub(super) const MAX_TASK_DATA: usize = 64 << 10;

/// Answer to a task creation.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskCreated {
    token: String,
}

/// Sends one task down an agent's stream; its 5100 result is at `/api/v1/tasks/{token}`.
#[utoipa::path(post, path = "/agents/{id}/tasks", tag = "agents", params(("id" = String, Path)), request_body = TaskRequest,
    responses((status = 202, body = TaskCreated), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the agent is offline")))]
pub async fn create_task(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Json<TaskRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<TaskCreated>), ApiError> {
    who.require(Role::Operator)?;
    let req = json_body(body)?;
    if req.object_name.is_empty() || req.object_name.len() > 64 {
        return Err(ApiError::bad_request("object_name must be 1-64 characters"));
    }
    if req.data.len() > MAX_TASK_DATA {
        return Err(ApiError::bad_request(format!(
            "data is larger than {MAX_TASK_DATA} bytes"
        )));
    }
    agent_or_404(&state, &id).await?;
    if !state.connections.is_online(&id) {
        return Err(ApiError::conflict(format!("agent {id} is offline")));
    }
    let token = uuid::Uuid::new_v4().to_string();
    let task = NewTask {
        token: &token,
        agent_id: &id,
        data_type: req.data_type,
        object_name: &req.object_name,
        data: &req.data,
        created_by: &who.token_id,
    };
    state.store.task_sent(&task, now_ms()).await?;
    let cmd = TaskCommand {
        data_type: req.data_type,
        object_name: req.object_name.clone(),
        data: req.data.clone(),
        token: token.clone(),
    };
    if let Err(e) = state.connections.send(&id, Outbound::Task(cmd)) {
        let fields = HashMap::from([
            ("status".to_owned(), "failed".to_owned()),
            ("msg".to_owned(), e.to_string()),
        ]);
        state.store.task_result(&token, &id, &fields, now_ms()).await?;
        let status = match e {
            SendError::Offline(_) => StatusCode::CONFLICT,
            SendError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        return Err(ApiError::new(status, e.to_string()));
    }
    tracing::info!(agent_id = %id, %token, data_type = req.data_type, by = %who.token_id, "task sent");
    Ok((StatusCode::ACCEPTED, Json(TaskCreated { token })))
}

/// Answer to a revocation.
#[derive(Debug, Serialize, ToSchema)]
pub struct Revoked {
    revoked: Vec<String>,
}

/// Revokes every certificate of the agent and closes its stream at once.
#[utoipa::path(post, path = "/agents/{id}/revoke", tag = "agents", params(("id" = String, Path)),
    responses((status = 200, body = Revoked), (status = 404, body = ErrorBody)))]
pub async fn revoke(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Revoked>, ApiError> {
    who.require(Role::Admin)?;
    let reason = format!("revoked through the API by token {}", who.token_id);
    let revoked = state.revoke_agent(&id, &reason, None).await?;
    if revoked.is_empty() {
        return Err(ApiError::not_found(format!("agent {id} has no unrevoked certificate")));
    }
    tracing::warn!(agent_id = %id, by = %who.token_id, count = revoked.len(), "agent certificates revoked");
    Ok(Json(Revoked { revoked }))
}
