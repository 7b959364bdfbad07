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
use crate::store::{AgentQuery, AgentRow, NewTask, ReportedPlugin, Role};

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
    /// Its records the server found missing by a gap in their numbers.
    lost_records: i64,
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
            lost_records: p.lost_records,
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
    /// The server instance holding its stream, while online.
    instance: Option<String>,
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
    fn new(a: AgentRow, plugins: Vec<ReportedPlugin>) -> Self {
        Self {
            id: a.id,
            name: a.name,
            hostname: a.meta.hostname,
            version: a.meta.version,
            product: a.meta.product,
            online: a.online,
            instance: a.instance,
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

/// Filters and paging of the agent list; all filters given must hold.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AgentFilter {
    /// Only agents that are (not) online.
    online: Option<bool>,
    /// Only agents of this version.
    version: Option<String>,
    /// Only agents with this tag.
    tag: Option<String>,
    /// Only agents whose host name contains this (ignoring ASCII case).
    hostname: Option<String>,
    /// Only agents running this plugin.
    plugin: Option<String>,
    /// Only agents whose ID, host name, addresses or a tag contain this
    /// (ignoring ASCII case).
    q: Option<String>,
    /// The page after this agent ID: the `X-Next-Cursor` of the previous page.
    cursor: Option<String>,
    /// Agents per page, 1 to 1000; default 100.
    limit: Option<i64>,
}

/// Agents per page unless `limit` says otherwise.
pub const DEFAULT_PAGE: i64 = 100;
/// The most agents one page holds.
pub const MAX_PAGE: i64 = 1000;

pub(super) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(t)| t)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {}", e.body_text())))
}

/// A query string, or a 400 that says what is wrong with it.
pub(super) fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
}

/// Agents by ID, filtered, a page at a time. The body is the page; the headers
/// say how many match in all (`X-Total-Count`) and where the next page starts
/// (`X-Next-Cursor`, and a `Link` with `rel="next"`), absent on the last page.
#[utoipa::path(get, path = "/agents", tag = "agents", params(AgentFilter),
    responses((status = 200, body = [AgentView], headers(
        ("X-Total-Count" = i64, description = "agents matching the filters"),
        ("X-Next-Cursor" = String, description = "cursor of the next page; absent on the last"),
        ("Link" = String, description = "the next page, rel=\"next\""))),
        (status = 400, body = ErrorBody)))]
pub async fn list(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    uri: axum::extract::OriginalUri,
    filter: Result<Query<AgentFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<(axum::http::HeaderMap, Json<Vec<AgentView>>), ApiError> {
    who.require(Role::Viewer)?;
    let f = query(filter)?;
    let limit = f.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_PAGE}, not {limit}"
        )));
    }
    let q = AgentQuery {
        online: f.online,
        version: f.version,
        tag: f.tag,
        hostname: f.hostname,
        plugin: f.plugin,
        search: f.q,
        after: f.cursor,
        // One more than asked, to know whether a next page exists.
        limit: limit + 1,
    };
    let (mut agents, total) = state.store.agents_page(&q, now_ms()).await?;
    let more = agents.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    agents.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let mut plugins = match (agents.first(), agents.last()) {
        (Some(first), Some(last)) => state.store.reported_plugins_between(&first.id, &last.id).await?,
        _ => HashMap::new(),
    };
    let mut headers = axum::http::HeaderMap::new();
    headers.insert("x-total-count", total.into());
    if more && let Some(last) = agents.last() {
        let next = next_page_link(&uri.0, &last.id);
        // Agent IDs are plain ASCII, so they are valid header values.
        if let (Ok(cursor), Ok(link)) = (last.id.parse(), format!("<{next}>; rel=\"next\"").parse()) {
            headers.insert("x-next-cursor", cursor);
            headers.insert(axum::http::header::LINK, link);
        }
    }
    let out = agents
        .into_iter()
        .map(|a| {
            let p = plugins.remove(&a.id).unwrap_or_default();
            AgentView::new(a, p)
        })
        .collect();
    Ok((headers, Json(out)))
}

/// The request's own path and query with `cursor` set to `after`.
fn next_page_link(uri: &axum::http::Uri, after: &str) -> String {
    let mut pairs: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| k != "cursor")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    pairs.push(("cursor".into(), after.into()));
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    format!("{}?{query}", uri.path())
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
    let plugins = state
        .store
        .reported_plugins(Some(&id))
        .await?
        .remove(&id)
        .unwrap_or_default();
    Ok(Json(AgentView::new(agent, plugins)))
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
    if let Err(SendError::Busy(_)) = state.send(&id, Outbound::Close(Closing::Revoked)).await {
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
    /// Seconds the agent has to answer before the task ends `timed_out` (default
    /// 600, at most 604800).
    #[serde(default)]
    timeout_secs: Option<u64>,
}

fn default_object() -> String {
    keel_proto::product::KEEL_AGENT.into()
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
    let timeout_ms = super::timeout_ms(req.timeout_secs)?;
    agent_or_404(&state, &id).await?;
    if !state.is_online(&id).await? {
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
        timeout_ms,
    };
    state.store.task_sent(&task, now_ms()).await?;
    let cmd = TaskCommand {
        data_type: req.data_type,
        object_name: req.object_name.clone(),
        data: req.data.clone(),
        token: token.clone(),
    };
    if let Err(e) = state.send(&id, Outbound::Task(cmd)).await {
        let fields = HashMap::from([
            ("status".to_owned(), "failed".to_owned()),
            ("msg".to_owned(), e.to_string()),
        ]);
        state.store.task_result(&token, &id, &fields, now_ms()).await?;
        let status = match e {
            SendError::Offline(_) => StatusCode::CONFLICT,
            SendError::Busy(_) | SendError::Unreachable(..) => StatusCode::SERVICE_UNAVAILABLE,
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

/// Hours of samples [`activity`] gives at most.
pub const MAX_ACTIVITY_HOURS: i64 = 24;
/// Tasks [`activity`] lists.
pub const ACTIVITY_TASKS: i64 = 20;

/// How far back an agent's activity goes.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ActivityQuery {
    /// Hours of heartbeat samples, 1 to 24; default 24.
    hours: Option<i64>,
}

/// One of an agent's streams.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    connected_at: String,
    /// Absent while open (or when the instance holding it died).
    disconnected_at: Option<String>,
    instance: String,
}

/// One of an agent's tasks.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentTaskView {
    token: String,
    data_type: i32,
    object_name: String,
    status: String,
    created_at: String,
    finished_at: Option<String>,
    /// The result's `msg`, if it has one.
    message: Option<String>,
}

/// An agent's certificate.
#[derive(Debug, Serialize, ToSchema)]
pub struct CertificateView {
    serial: String,
    issued_at: String,
    not_after: String,
}

/// What an agent's page shows beyond [`AgentView`].
#[derive(Debug, Serialize, ToSchema)]
pub struct ActivityView {
    /// Heartbeat samples, oldest first, one every 5 minutes at most.
    samples: Vec<crate::store::Sample>,
    /// Its streams, newest first (the newest 50).
    sessions: Vec<SessionView>,
    /// Its newest tasks, newest first.
    tasks: Vec<AgentTaskView>,
    /// Its newest certificate that is not revoked.
    certificate: Option<CertificateView>,
}

/// An agent's heartbeat samples, streams, recent tasks and certificate.
#[utoipa::path(get, path = "/agents/{id}/activity", tag = "agents", params(("id" = String, Path), ActivityQuery),
    responses((status = 200, body = ActivityView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn activity(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<ActivityQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ActivityView>, ApiError> {
    who.require(Role::Viewer)?;
    let hours = query(q)?.hours.unwrap_or(MAX_ACTIVITY_HOURS);
    if !(1..=MAX_ACTIVITY_HOURS).contains(&hours) {
        return Err(ApiError::bad_request(format!(
            "hours must be 1 to {MAX_ACTIVITY_HOURS}, not {hours}"
        )));
    }
    agent_or_404(&state, &id).await?;
    let since = now_ms() - hours * 3_600_000;
    let samples = state.store.samples(&id, since).await?;
    let sessions = state
        .store
        .sessions(&id)
        .await?
        .into_iter()
        .map(|s| SessionView {
            connected_at: rfc3339_ms(s.connected_at),
            disconnected_at: s.disconnected_at.map(rfc3339_ms),
            instance: s.instance,
        })
        .collect();
    let tasks = state
        .store
        .agent_tasks(&id, ACTIVITY_TASKS)
        .await?
        .into_iter()
        .map(|t| AgentTaskView {
            message: t.result.as_ref().and_then(|r| r.get("msg").cloned()),
            token: t.token,
            data_type: t.data_type,
            object_name: t.object_name,
            status: t.status.as_str().to_owned(),
            created_at: rfc3339_ms(t.created_at),
            finished_at: t.finished_at.map(rfc3339_ms),
        })
        .collect();
    let certificate = state.store.agent_certificate(&id).await?.map(|c| CertificateView {
        serial: c.serial,
        issued_at: rfc3339_ms(c.issued_at),
        not_after: rfc3339_ms(c.not_after),
    });
    Ok(Json(ActivityView {
        samples,
        sessions,
        tasks,
        certificate,
    }))
}
