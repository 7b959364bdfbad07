//! `/api/v1/agents…` and `/api/v1/tasks…`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use keel_common::time::{now_ms, rfc3339_ms};
use serde::{Deserialize, Serialize};

use super::{ApiError, Principal};
use crate::connections::{Outbound, SendError, TaskCommand};
use crate::state::ServerState;
use crate::store::{AgentRow, NewTask, ReportedPlugin, Role};

/// A plugin as the API shows it, from its last heartbeat.
#[derive(Debug, Serialize)]
pub struct PluginView {
    name: String,
    version: String,
    state: String,
    pid: Option<i64>,
    updated_at: String,
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

/// An agent as the API shows it; the shape DESIGN.md fixes.
#[derive(Debug, Serialize)]
pub struct AgentView {
    id: String,
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
    heartbeat: serde_json::Map<String, serde_json::Value>,
}

impl AgentView {
    fn new(a: AgentRow, online: bool, plugins: Vec<ReportedPlugin>) -> Self {
        Self {
            id: a.id,
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

/// `GET /api/v1/agents`
pub async fn list(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Vec<AgentView>>, ApiError> {
    who.require(Role::Viewer)?;
    let agents = state.store.list_agents().await?;
    let mut plugins = state.store.reported_plugins(None).await?;
    Ok(Json(
        agents
            .into_iter()
            .map(|a| {
                let online = state.connections.is_online(&a.id);
                let p = plugins.remove(&a.id).unwrap_or_default();
                AgentView::new(a, online, p)
            })
            .collect(),
    ))
}

/// `GET /api/v1/agents/{id}`
pub async fn show(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    who.require(Role::Viewer)?;
    let agent = state
        .store
        .get_agent(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no agent {id}")))?;
    let online = state.connections.is_online(&id);
    let plugins = state
        .store
        .reported_plugins(Some(&id))
        .await?
        .remove(&id)
        .unwrap_or_default();
    Ok(Json(AgentView::new(agent, online, plugins)))
}

/// Body of `POST /api/v1/agents/{id}/tasks`.
#[derive(Debug, Deserialize)]
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
const MAX_TASK_DATA: usize = 64 << 10;

/// Answer to a task creation.
#[derive(Debug, Serialize)]
pub struct TaskCreated {
    token: String,
}

pub(super) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(t)| t)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {}", e.body_text())))
}

/// `POST /api/v1/agents/{id}/tasks`: sends a task down the agent's stream.
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
    if state.store.get_agent(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("no agent {id}")));
    }
    if !state.connections.is_online(&id) {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("agent {id} is offline")));
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

/// A task and its result.
#[derive(Debug, Serialize)]
pub struct TaskView {
    token: String,
    agent_id: String,
    data_type: i32,
    object_name: String,
    status: String,
    created_at: String,
    finished_at: Option<String>,
    result: Option<HashMap<String, String>>,
}

/// `GET /api/v1/tasks/{token}`
pub async fn show_task(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(token): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    who.require(Role::Viewer)?;
    let t = state
        .store
        .get_task(&token)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no task {token}")))?;
    Ok(Json(TaskView {
        token: t.token,
        agent_id: t.agent_id,
        data_type: t.data_type,
        object_name: t.object_name,
        status: t.status,
        created_at: rfc3339_ms(t.created_at),
        finished_at: t.finished_at.map(rfc3339_ms),
        result: t.result,
    }))
}

/// Answer to a revocation.
#[derive(Debug, Serialize)]
pub struct Revoked {
    revoked: Vec<String>,
}

/// `POST /api/v1/agents/{id}/revoke`: revokes every certificate of the agent and
/// closes its stream at once.
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
