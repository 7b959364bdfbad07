//! `/api/v1/tasks…`: tasks rolled out to many agents in batches, and the results
//! of single tasks (by token).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use keel_common::time::{now_ms, rfc3339_ms};
use keel_proto::product::KEEL_AGENT;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::agents::{MAX_TASK_DATA, json_body};
use super::{ApiError, ErrorBody, Principal};
use crate::policy::Target;
use crate::rollout::{PLUGIN_TASK, RESTART_AGENT, SYNC_CONFIG};
use crate::state::ServerState;
use crate::states::JobState;
use crate::store::{JobRow, PendingSubtask, Role, SubtaskCounts, TaskRow};

/// Body of `POST /api/v1/tasks`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    /// `sync-config`, `restart-agent` or `plugin-task`.
    kind: String,
    /// Which agents (resolved now, against the registry).
    target: Target,
    /// Agents per batch (default 50).
    #[serde(default)]
    batch_size: Option<u32>,
    /// Fraction of finished subtasks that may fail before the task pauses (default 0.1).
    #[serde(default)]
    failure_threshold: Option<f64>,
    /// Seconds an agent has to answer (default 600).
    #[serde(default)]
    timeout_secs: Option<u64>,
    /// `plugin-task`: the task's data_type.
    #[serde(default)]
    data_type: Option<i32>,
    /// `plugin-task`: the plugin.
    #[serde(default)]
    object_name: Option<String>,
    /// `plugin-task`: the task's data.
    #[serde(default)]
    data: Option<String>,
}

/// A task as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskView {
    id: String,
    kind: String,
    /// `running`, `paused`, `succeeded`, `failed` or `cancelled`.
    state: String,
    reason: String,
    batch_size: i64,
    failure_threshold: f64,
    timeout_secs: i64,
    counts: SubtaskCounts,
    created_by: String,
    created_at: String,
    updated_at: String,
    /// With `GET /api/v1/tasks/{id}`: one entry per agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    subtasks: Option<Vec<SubtaskView>>,
}

/// One agent's part of a task, or a single task sent with `POST /api/v1/agents/{id}/tasks`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubtaskView {
    token: String,
    agent_id: String,
    data_type: i32,
    object_name: String,
    /// `pending`, `sent`, `succeeded`, `failed`, `timed_out` or `cancelled`.
    status: String,
    created_at: String,
    finished_at: Option<String>,
    /// The 5100 result's fields.
    result: Option<HashMap<String, String>>,
}

impl From<TaskRow> for SubtaskView {
    fn from(t: TaskRow) -> Self {
        Self {
            token: t.token,
            agent_id: t.agent_id,
            data_type: t.data_type,
            object_name: t.object_name,
            status: t.status.as_str().to_owned(),
            created_at: rfc3339_ms(t.created_at),
            finished_at: t.finished_at.map(rfc3339_ms),
            result: t.result,
        }
    }
}

fn view(j: JobRow, counts: SubtaskCounts, subtasks: Option<Vec<SubtaskView>>) -> TaskView {
    TaskView {
        id: j.id,
        kind: j.kind,
        state: j.state.as_str().to_owned(),
        reason: j.reason,
        batch_size: j.batch_size,
        failure_threshold: j.failure_threshold,
        timeout_secs: j.timeout_ms / 1000,
        counts,
        created_by: j.created_by,
        created_at: rfc3339_ms(j.created_at),
        updated_at: rfc3339_ms(j.updated_at),
        subtasks,
    }
}

/// Creates a task: one subtask per targeted agent, rolled out in batches.
#[utoipa::path(post, path = "/tasks", tag = "tasks", request_body = NewTask,
    responses((status = 201, body = TaskView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn create(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    body: Result<Json<NewTask>, JsonRejection>,
) -> Result<(StatusCode, Json<TaskView>), ApiError> {
    who.require(Role::Operator)?;
    let n = json_body(body)?;
    let (data_type, object_name, data) = match n.kind.as_str() {
        SYNC_CONFIG => (0, KEEL_AGENT.to_owned(), String::new()),
        RESTART_AGENT => (
            keel_proto::data_type::RESTART_AGENT,
            KEEL_AGENT.to_owned(),
            String::new(),
        ),
        PLUGIN_TASK => {
            let dt = n
                .data_type
                .ok_or_else(|| ApiError::bad_request("plugin-task needs data_type"))?;
            let object = n
                .object_name
                .clone()
                .filter(|o| !o.is_empty() && o.len() <= 64)
                .ok_or_else(|| ApiError::bad_request("plugin-task needs object_name: the plugin, 1-64 characters"))?;
            let data = n.data.clone().unwrap_or_default();
            if data.len() > MAX_TASK_DATA {
                return Err(ApiError::bad_request(format!(
                    "data is larger than {MAX_TASK_DATA} bytes"
                )));
            }
            (dt, object, data)
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "invalid kind {other:?}: expected sync-config, restart-agent or plugin-task"
            )));
        }
    };
    let batch_size = i64::from(n.batch_size.unwrap_or(50));
    if batch_size == 0 {
        return Err(ApiError::bad_request("batch_size must be at least 1"));
    }
    let threshold = n.failure_threshold.unwrap_or(0.1);
    if !(0.0..=1.0).contains(&threshold) {
        return Err(ApiError::bad_request("failure_threshold must be between 0 and 1"));
    }
    let timeout_ms = super::timeout_ms(n.timeout_secs)?;
    let agents = state.store.list_agents().await?;
    if let Target::Agents(ids) = &n.target
        && let Some(missing) = ids.iter().find(|id| !agents.iter().any(|a| a.id == **id))
    {
        return Err(ApiError::not_found(format!("no agent {missing}")));
    }
    let targets: Vec<String> = agents
        .iter()
        .filter(|a| n.target.matches(&ServerState::facts(a)))
        .map(|a| a.id.clone())
        .collect();
    if targets.is_empty() {
        return Err(ApiError::bad_request(format!(
            "no agent matches {}",
            n.target.describe()
        )));
    }
    let now = now_ms();
    let job = JobRow {
        id: uuid::Uuid::new_v4().to_string(),
        kind: n.kind.clone(),
        spec: serde_json::to_string(&n).unwrap_or_default(),
        state: JobState::Running,
        reason: String::new(),
        batch_size,
        failure_threshold: threshold,
        timeout_ms,
        baseline: (0, 0),
        created_by: who.token_id.clone(),
        created_at: now,
        updated_at: now,
    };
    let subtasks: Vec<PendingSubtask> = targets
        .iter()
        .map(|agent_id| PendingSubtask {
            token: uuid::Uuid::new_v4().to_string(),
            agent_id: agent_id.clone(),
            data_type,
            object_name: object_name.clone(),
            data: data.clone(),
        })
        .collect();
    state.store.job_create(&job, &subtasks).await?;
    state.rollout_wake.notify_one();
    tracing::info!(task = %job.id, kind = %job.kind, agents = subtasks.len(), by = %who.token_id, "task created");
    let counts = state.store.job_counts(&job.id).await?;
    Ok((StatusCode::CREATED, Json(view(job, counts, None))))
}

/// Filter of the task list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TaskQuery {
    /// Only tasks in this state.
    state: Option<String>,
    /// At most this many, newest first (default 100).
    limit: Option<i64>,
}

/// Tasks, newest first.
#[utoipa::path(get, path = "/tasks", tag = "tasks", params(TaskQuery), responses((status = 200, body = [TaskView])))]
pub async fn list(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    q: Result<Query<TaskQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<TaskView>>, ApiError> {
    who.require(Role::Viewer)?;
    let q = super::agents::query(q)?;
    let mut out = Vec::new();
    // A state that names none matches no task, as it always did.
    let filter = match q.state.as_deref().map(str::parse::<JobState>) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(_)) => return Ok(Json(out)),
    };
    for j in state.store.jobs(filter, q.limit.unwrap_or(100)).await? {
        let counts = state.store.job_counts(&j.id).await?;
        out.push(view(j, counts, None));
    }
    Ok(Json(out))
}

/// A task with its subtasks, or (by token) one subtask or single task and its result.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum TaskOrSubtask {
    /// A task.
    Task(TaskView),
    /// A subtask.
    Subtask(SubtaskView),
}

/// A task by ID, or a subtask (or a task sent to one agent) by token.
#[utoipa::path(get, path = "/tasks/{id}", tag = "tasks", params(("id" = String, Path, description = "task ID or subtask token")),
    responses((status = 200, body = TaskOrSubtask), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<TaskOrSubtask>, ApiError> {
    who.require(Role::Viewer)?;
    if let Some(j) = state.store.job(&id).await? {
        let counts = state.store.job_counts(&id).await?;
        let subtasks = state
            .store
            .job_subtasks(&id)
            .await?
            .into_iter()
            .map(SubtaskView::from)
            .collect();
        return Ok(Json(TaskOrSubtask::Task(view(j, counts, Some(subtasks)))));
    }
    let t = state
        .store
        .get_task(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no task {id}")))?;
    Ok(Json(TaskOrSubtask::Subtask(t.into())))
}

async fn job_or_404(state: &ServerState, id: &str) -> Result<JobRow, ApiError> {
    state
        .store
        .job(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no task {id}")))
}

fn refuse(j: &JobRow, action: &str) -> ApiError {
    ApiError::conflict(format!("task {} is {}; it cannot be {action}", j.id, j.state))
}

/// Pauses a running task after its current batch.
#[utoipa::path(post, path = "/tasks/{id}/pause", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, body = TaskView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn pause(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    who.require(Role::Operator)?;
    let j = job_or_404(&state, &id).await?;
    if j.state != JobState::Running {
        return Err(refuse(&j, "paused"));
    }
    state
        .store
        .job_state(
            &id,
            JobState::Paused,
            &format!("paused by token {}", who.token_id),
            now_ms(),
        )
        .await?;
    current(&state, &id).await
}

/// Resumes a paused task; failures count anew for the threshold.
#[utoipa::path(post, path = "/tasks/{id}/resume", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, body = TaskView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn resume(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    who.require(Role::Operator)?;
    let j = job_or_404(&state, &id).await?;
    if j.state != JobState::Paused {
        return Err(refuse(&j, "resumed"));
    }
    let counts = state.store.job_counts(&id).await?;
    state.store.job_resume(&id, &counts, now_ms()).await?;
    state.rollout_wake.notify_one();
    current(&state, &id).await
}

/// Cancels a task: subtasks not sent yet are not sent.
#[utoipa::path(post, path = "/tasks/{id}/cancel", tag = "tasks", params(("id" = String, Path)),
    responses((status = 200, body = TaskView), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    who.require(Role::Operator)?;
    let j = job_or_404(&state, &id).await?;
    if !j.state.is_open() {
        return Err(refuse(&j, "cancelled"));
    }
    let now = now_ms();
    state
        .store
        .job_state(
            &id,
            JobState::Cancelled,
            &format!("cancelled by token {}", who.token_id),
            now,
        )
        .await?;
    state.store.job_cancel_pending(&id, now).await?;
    current(&state, &id).await
}

async fn current(state: &ServerState, id: &str) -> Result<Json<TaskView>, ApiError> {
    let j = job_or_404(state, id).await?;
    let counts = state.store.job_counts(id).await?;
    Ok(Json(view(j, counts, None)))
}
