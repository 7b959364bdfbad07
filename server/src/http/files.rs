//! file-delivery as fleet operations ([`crate::files`]):
//! `POST /api/v1/files/inventories` asks many agents at once for their host keys
//! and files, `POST /api/v1/files/pushes` hands the server one push of sealed
//! parts to fan out, `GET /api/v1/files/pushes/{id}` waits for its progress, and
//! `GET /api/v1/files/status` says which host holds which version.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use keel_common::time::now_ms;
use keel_proto::data_type::FILE_PART_MAX_BYTES;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::agents::{json_body, query};
use super::{ApiError, ErrorBody, Principal};
use crate::files::{self, HostInventory, MAX_AGENTS, Progress, Target};
use crate::state::ServerState;
use crate::store::{FileStatusRow, NewPushAgent, PushRow, Role, WantedFile};

/// The largest push request: keelctl sends a large push in several.
pub const MAX_PUSH_REQUEST: usize = 64 << 20;
/// The most parts one agent's share has: a few bundles and the pieces of a few
/// large files.
pub const MAX_PARTS: usize = 1024;
/// The most files one agent's share names.
pub const MAX_FILES: usize = 10_000;
/// The longest a long poll waits.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Which agents: exactly one of `agents`, `tag` or `all`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InventoryRequest {
    /// These agents.
    #[serde(default)]
    agents: Vec<String>,
    /// Agents with this tag that run file-delivery.
    tag: Option<String>,
    /// Every agent that runs file-delivery.
    #[serde(default)]
    all: bool,
    /// Seconds each agent has to answer (default 30).
    timeout_secs: Option<u64>,
}

fn target(req: &InventoryRequest) -> Result<Target, ApiError> {
    match (req.agents.is_empty(), &req.tag, req.all) {
        (false, None, false) => {
            if req.agents.len() > MAX_AGENTS {
                return Err(ApiError::bad_request(format!("agents: at most {MAX_AGENTS}")));
            }
            if let Some(bad) = req.agents.iter().find(|a| !keel_common::ids::valid_agent_id(a)) {
                return Err(ApiError::bad_request(format!("agents: {bad:?} is not an agent ID")));
            }
            Ok(Target::Agents(req.agents.clone()))
        }
        (true, Some(tag), false) if !tag.is_empty() => Ok(Target::Tag(tag.clone())),
        (true, None, true) => Ok(Target::All),
        _ => Err(ApiError::bad_request("give exactly one of agents, tag or all")),
    }
}

fn secs(given: Option<u64>, default: u64, max: u64, what: &str) -> Result<Duration, ApiError> {
    match given.unwrap_or(default) {
        s @ 1.. if s <= max => Ok(Duration::from_secs(s)),
        _ => Err(ApiError::bad_request(format!("{what} must be between 1 and {max}"))),
    }
}

/// Asks each agent's file-delivery plugin for its host key and files, all at
/// once; an offline agent is listed as such.
#[utoipa::path(post, path = "/files/inventories", tag = "files", request_body = InventoryRequest,
    responses((status = 200, body = [HostInventory]), (status = 400, body = ErrorBody)))]
pub async fn inventories(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    body: Result<Json<InventoryRequest>, JsonRejection>,
) -> Result<Json<Vec<HostInventory>>, ApiError> {
    who.require(Role::Operator)?;
    let req = json_body(body)?;
    let target = target(&req)?;
    let timeout = secs(req.timeout_secs, 30, 600, "timeout_secs")?;
    let agents = files::resolve(&state, &target).await.map_err(ApiError::bad_request)?;
    Ok(Json(files::inventories(&state, &agents, timeout, &who.token_id).await))
}

/// One agent's share of a push.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShareRequest {
    /// The agent.
    agent: String,
    /// Each 6200 task's data, sent in order: envelopes, bundles, pieces, sealed
    /// and signed by the keeper.
    parts: Vec<String>,
    /// The files the parts change, with their versions.
    files: Vec<WantedFile>,
}

/// A push: every agent's share.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    /// The shares.
    agents: Vec<ShareRequest>,
    /// Seconds an agent has to answer each part (default 60).
    part_timeout_secs: Option<u64>,
    /// Seconds an offline agent's share waits for it (default one day).
    deadline_secs: Option<u64>,
}

/// More shares for a push.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoreShares {
    /// The shares.
    agents: Vec<ShareRequest>,
}

/// A push made.
#[derive(Debug, Serialize, ToSchema)]
pub struct PushCreated {
    /// Its ID.
    id: String,
}

async fn shares(state: &ServerState, given: Vec<ShareRequest>) -> Result<Vec<NewPushAgent>, ApiError> {
    if given.is_empty() || given.len() > MAX_AGENTS {
        return Err(ApiError::bad_request(format!("agents: give 1-{MAX_AGENTS} shares")));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(given.len());
    for s in given {
        if !seen.insert(s.agent.clone()) {
            return Err(ApiError::bad_request(format!("agents: {} is named twice", s.agent)));
        }
        if state.store.get_agent(&s.agent).await?.is_none() {
            return Err(ApiError::bad_request(format!("agents: no agent {}", s.agent)));
        }
        if s.parts.is_empty() || s.parts.len() > MAX_PARTS {
            return Err(ApiError::bad_request(format!(
                "agent {}: give 1-{MAX_PARTS} parts",
                s.agent
            )));
        }
        if let Some((i, p)) = s.parts.iter().enumerate().find(|(_, p)| p.len() > FILE_PART_MAX_BYTES) {
            return Err(ApiError::bad_request(format!(
                "agent {}: part {} is {} bytes; a part is at most {FILE_PART_MAX_BYTES}",
                s.agent,
                i + 1,
                p.len()
            )));
        }
        if s.files.len() > MAX_FILES || s.files.iter().any(|f| f.name.is_empty() || f.name.len() > 1024) {
            return Err(ApiError::bad_request(format!(
                "agent {}: files: at most {MAX_FILES}, each named in 1-1024 bytes",
                s.agent
            )));
        }
        let mut names = HashSet::new();
        if let Some(f) = s.files.iter().find(|f| !names.insert(f.name.as_str())) {
            return Err(ApiError::bad_request(format!(
                "agent {}: files: {} is named twice",
                s.agent, f.name
            )));
        }
        out.push(NewPushAgent {
            agent_id: s.agent,
            parts: s.parts,
            files: s.files,
        });
    }
    Ok(out)
}

/// Records a push and sends every agent's share at once; an agent offline now
/// gets its share when it comes back, until the deadline.
#[utoipa::path(post, path = "/files/pushes", tag = "files", request_body = PushRequest,
    responses((status = 201, body = PushCreated), (status = 400, body = ErrorBody)))]
pub async fn create_push(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    body: Result<Json<PushRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<PushCreated>), ApiError> {
    who.require(Role::Operator)?;
    let req = json_body(body)?;
    let part_timeout = secs(req.part_timeout_secs, 60, 3600, "part_timeout_secs")?;
    let deadline = secs(req.deadline_secs, 86_400, 30 * 86_400, "deadline_secs")?;
    let id = uuid::Uuid::new_v4().to_string();
    let agents = shares(&state, req.agents).await?;
    let now = now_ms();
    let push = PushRow {
        id: id.clone(),
        created_by: who.token_id.clone(),
        created_at: now,
        deadline: now + i64::try_from(deadline.as_millis()).unwrap_or(i64::MAX),
        part_timeout_ms: i64::try_from(part_timeout.as_millis()).unwrap_or(i64::MAX),
    };
    files::push(&state, push, agents).await?;
    Ok((StatusCode::CREATED, Json(PushCreated { id })))
}

/// Adds shares to a push (a push too large for one request comes in several).
#[utoipa::path(post, path = "/files/pushes/{id}/agents", tag = "files", params(("id" = String, Path)),
    request_body = MoreShares, responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn add_shares(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Json<MoreShares>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    who.require(Role::Operator)?;
    let req = json_body(body)?;
    let push = state
        .store
        .push_get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no push {id}")))?;
    if push.created_by != who.token_id {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("push {id} was made with another token"),
        ));
    }
    let agents = shares(&state, req.agents).await?;
    let existing: HashSet<String> = state
        .store
        .push_agents(&id)
        .await?
        .into_iter()
        .map(|a| a.agent_id)
        .collect();
    if let Some(dup) = agents.iter().find(|a| existing.contains(&a.agent_id)) {
        return Err(ApiError::bad_request(format!(
            "agents: {} is in push {id} already",
            dup.agent_id
        )));
    }
    files::add(&state, &push, agents).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// How to wait for a push.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ProgressQuery {
    /// Answer once something changed after this revision (Unix ms).
    #[serde(default)]
    since: i64,
    /// Seconds to wait for a change, at most 30 (default 0: answer at once).
    #[serde(default)]
    wait_secs: u64,
}

/// A push's progress, per agent. With `wait_secs`, answers when something
/// changed after `since`, when the push settled, or when the wait ends.
#[utoipa::path(get, path = "/files/pushes/{id}", tag = "files", params(("id" = String, Path), ProgressQuery),
    responses((status = 200, body = Progress), (status = 404, body = ErrorBody)))]
pub async fn show_push(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    q: Result<Query<ProgressQuery>, QueryRejection>,
) -> Result<Json<Progress>, ApiError> {
    who.require(Role::Viewer)?;
    let q = query(q)?;
    let wait = Duration::from_secs(q.wait_secs).min(MAX_WAIT);
    files::progress(&state, &id, q.since, wait)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no push {id}")))
}

/// Filters of the file status.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    /// Only this agent's files.
    agent: Option<String>,
    /// Only this file.
    name: Option<String>,
    /// Only files a host is behind on.
    #[serde(default)]
    behind: bool,
}

/// One file on one host, and whether the host is behind.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusView {
    /// The file on the host.
    #[serde(flatten)]
    pub row: FileStatusRow,
    /// The host lacks the newest version pushed, or no longer holds it intact.
    pub behind: bool,
}

/// Which version of which file each host holds, against the newest pushed.
#[utoipa::path(get, path = "/files/status", tag = "files", params(StatusQuery),
    responses((status = 200, body = [StatusView]), (status = 400, body = ErrorBody)))]
pub async fn status(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    q: Result<Query<StatusQuery>, QueryRejection>,
) -> Result<Json<Vec<StatusView>>, ApiError> {
    who.require(Role::Viewer)?;
    let q = query(q)?;
    let rows = state
        .store
        .file_status(q.agent.as_deref().unwrap_or(""), q.name.as_deref().unwrap_or(""))
        .await?;
    Ok(Json(
        rows.into_iter()
            .map(|row| StatusView {
                behind: row.behind(),
                row,
            })
            .filter(|v| !q.behind || v.behind)
            .collect(),
    ))
}
