//! file-delivery as fleet operations: inventories asked of many agents at once,
//! pushes fanned out to them, and where each host's files stand.
//!
//! The server reads none of it. The keeper (`keelctl files push`) asks for the
//! inventories ([`inventories`]: a `6201` task to each agent, [`AT_ONCE`] at a
//! time), seals each host's changed files and packs them into parts (bundles of
//! envelopes, pieces of large ones), and hands the server one push: every
//! agent's parts, and which file versions they carry. Each agent's share is a row
//! of its own ([`crate::store::PushAgentRow`]):
//! - it is sent at once, all agents in parallel, each agent's parts in order, each
//!   after the last one's answer (a `6200` task whose `5100` result names every
//!   file's outcome);
//! - an agent offline now keeps its share `waiting`; every instance looks every
//!   [`TICK`] for shares whose agent is online and sends them, so an agent gets
//!   its files when it reconnects, until the push's deadline;
//! - an instance takes a share by compare and set, and keeps it by answering
//!   parts; a share whose instance stopped answering for longer than a part's
//!   timeout and [`CLAIM_MARGIN`] is taken by another, which resumes at the first
//!   part not answered (at the start of an upload cut in pieces).
//!
//! Every answer updates `file_status`: the version each host holds of each file
//! against the newest pushed, so `keelctl files status` shows who is behind.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use keel_common::time::now_ms;
use keel_proto::data_type::{FILE_DELIVER, FILE_INVENTORY, TASK_RESULT};
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use utoipa::ToSchema;

use crate::connections::SendError;
use crate::state::{PluginTask, ServerState, TaskError};
use crate::store::{AgentQuery, NewPushAgent, PushAgentRow, PushRow, StoreError};

/// The plugin's name.
pub const PLUGIN: &str = "file-delivery";
/// Agents asked or sent to at once, per operation and per instance.
pub const AT_ONCE: usize = 256;
/// The most agents one inventory or push names.
pub const MAX_AGENTS: usize = 10_000;
/// How often every instance looks for shares to send.
pub const TICK: Duration = Duration::from_secs(1);
/// How long past a part's timeout a share's claim holds.
pub const CLAIM_MARGIN: Duration = Duration::from_secs(30);
/// How often a long poll looks at a push again.
const POLL: Duration = Duration::from_millis(25);

/// Which agents an operation is for.
#[derive(Debug, Clone)]
pub enum Target {
    /// These agents.
    Agents(Vec<String>),
    /// Agents with this tag that run file-delivery.
    Tag(String),
    /// Every agent that runs file-delivery.
    All,
}

/// The agents a target names, by ID.
pub async fn resolve(state: &ServerState, target: &Target) -> Result<Vec<String>, String> {
    let tag = match target {
        Target::Agents(ids) => return Ok(ids.clone()),
        Target::Tag(t) => Some(t.clone()),
        Target::All => None,
    };
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let q = AgentQuery {
            tag: tag.clone(),
            plugin: Some(PLUGIN.into()),
            after: after.take(),
            limit: 1000,
            ..AgentQuery::default()
        };
        let (page, _) = state.store.agents_page(&q, now_ms()).await.map_err(|e| e.to_string())?;
        let Some(last) = page.last().map(|a| a.id.clone()) else {
            break;
        };
        out.extend(page.into_iter().map(|a| a.id));
        if out.len() > MAX_AGENTS {
            return Err(format!("the target names more than {MAX_AGENTS} agents; narrow it"));
        }
        after = Some(last);
    }
    Ok(out)
}

/// One agent's answer to an inventory.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct HostInventory {
    /// The agent.
    pub agent: String,
    /// Whether its stream is open (the inventory is asked only then).
    pub online: bool,
    /// The host's X25519 key, hex, as the plugin reports it (the keeper checks it
    /// against its pin: the server could have made it up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// Every delivered file: name, version, keyed digest, mode, readers, state.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub files: Option<Value>,
    /// Why it did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why a task got no answer.
#[derive(Debug)]
enum AskError {
    /// The agent is not connected anywhere.
    Offline,
    /// Anything else, said.
    Failed(String),
}

/// Sends one task to an agent's file-delivery plugin and waits for its 5100
/// result, within `timeout`.
async fn ask(
    state: &ServerState,
    agent: &str,
    data_type: i32,
    (sent, stored): (String, &str),
    timeout: Duration,
    by: &str,
) -> Result<HashMap<String, String>, AskError> {
    let token = uuid::Uuid::new_v4().to_string();
    let mut answers = state.cluster.wait(&token, agent).await;
    let task = PluginTask {
        object_name: PLUGIN,
        data_type,
        token: &token,
        sent,
        stored,
        timeout,
    };
    match state.send_task(agent, task, by).await {
        Ok(()) => {}
        Err(TaskError::Send(SendError::Offline(_))) => return Err(AskError::Offline),
        Err(e) => return Err(AskError::Failed(e.to_string())),
    }
    let answer = tokio::time::timeout(timeout, async {
        while let Some(reply) = answers.recv().await {
            if reply.data_type == TASK_RESULT {
                return Some(reply.fields);
            }
        }
        None
    })
    .await;
    match answer {
        Ok(Some(fields)) => Ok(fields),
        Ok(None) => Err(AskError::Failed("the cluster connection ended".into())),
        Err(_) => Err(AskError::Failed(format!(
            "agent {agent} did not answer within {} s",
            timeout.as_secs()
        ))),
    }
}

/// Asks each agent's plugin for its host key and files, [`AT_ONCE`] at a time,
/// and records what each holds.
pub async fn inventories(state: &ServerState, agents: &[String], timeout: Duration, by: &str) -> Vec<HostInventory> {
    futures::stream::iter(agents.to_vec())
        .map(|agent| async move { inventory(state, &agent, timeout, by).await })
        .buffered(AT_ONCE)
        .collect()
        .await
}

async fn inventory(state: &ServerState, agent: &str, timeout: Duration, by: &str) -> HostInventory {
    let mut out = HostInventory {
        agent: agent.to_owned(),
        online: true,
        host_key: None,
        files: None,
        error: None,
    };
    match ask(state, agent, FILE_INVENTORY, ("{}".into(), "{}"), timeout, by).await {
        Err(AskError::Offline) => out.online = false,
        Err(AskError::Failed(e)) => out.error = Some(e),
        Ok(fields) if fields.get("status").is_none_or(|s| s != "succeeded") => {
            out.error = Some(fields.get("msg").cloned().unwrap_or_default());
        }
        Ok(mut fields) => {
            let files: Value = serde_json::from_str(fields.get("files").map_or("[]", String::as_str))
                .unwrap_or_else(|_| Value::Array(Vec::new()));
            let held: Vec<(String, i64, String)> = files
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|f| {
                            Some((
                                f["name"].as_str()?.to_owned(),
                                f["version"].as_i64()?,
                                f["state"].as_str().unwrap_or_default().to_owned(),
                            ))
                        })
                        .collect()
                })
                .unwrap_or_default();
            if let Err(e) = state.store.files_held(agent, &held, true, now_ms()).await {
                warn!(agent_id = %agent, error = %e, "cannot record a host's files");
            }
            out.host_key = fields.remove("host_key");
            out.files = Some(files);
        }
    }
    out
}

/// Records a push and starts sending every agent's share at once.
pub async fn push(state: &Arc<ServerState>, push: PushRow, agents: Vec<NewPushAgent>) -> Result<(), StoreError> {
    state.store.push_create(&push).await?;
    add(state, &push, agents).await
}

/// Adds agents to a push and starts sending their shares at once.
pub async fn add(state: &Arc<ServerState>, push: &PushRow, agents: Vec<NewPushAgent>) -> Result<(), StoreError> {
    state.store.push_add_agents(&push.id, &agents, now_ms()).await?;
    let ids: Vec<String> = agents.into_iter().map(|a| a.agent_id).collect();
    info!(push = %push.id, agents = ids.len(), by = %push.created_by, "file push");
    let state = Arc::clone(state);
    let push = push.clone();
    tokio::spawn(async move {
        futures::stream::iter(ids)
            .for_each_concurrent(AT_ONCE, |agent| {
                let state = Arc::clone(&state);
                let push = push.clone();
                async move { send_share(&state, &push, &agent).await }
            })
            .await;
    });
    Ok(())
}

/// Before this time a claim is stale.
fn stale_before(push: &PushRow, now: i64) -> i64 {
    now - push.part_timeout_ms - i64::try_from(CLAIM_MARGIN.as_millis()).unwrap_or(i64::MAX)
}

/// Sends one agent's share of a push, if this instance can take it.
async fn send_share(state: &ServerState, push: &PushRow, agent: &str) {
    let now = now_ms();
    let instance = &state.cluster.instance;
    let claimed = state
        .store
        .push_claim(&push.id, agent, instance, now, stale_before(push, now))
        .await;
    let (parts, answered, mut results) = match claimed {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(e) => {
            warn!(push = %push.id, agent_id = %agent, error = %e, "cannot take a push");
            return;
        }
    };
    let outcome = send_parts(state, push, agent, &parts, resume_at(&parts, answered), &mut results).await;
    let now = now_ms();
    let ended = match outcome {
        Ok(()) => state.store.push_finish(&push.id, agent, "done", "", now).await,
        Err(Stop::Offline(at)) => state.store.push_release(&push.id, agent, at, now).await,
        Err(Stop::Failed(msg)) => {
            warn!(push = %push.id, agent_id = %agent, error = %msg, "file push failed");
            state.store.push_finish(&push.id, agent, "failed", &msg, now).await
        }
    };
    if let Err(e) = ended {
        warn!(push = %push.id, agent_id = %agent, error = %e, "cannot record a push's end");
    }
}

/// Why sending a share stopped.
enum Stop {
    /// The agent went offline; resume at this part.
    Offline(usize),
    /// The agent refused, or did not answer.
    Failed(String),
}

async fn send_parts(
    state: &ServerState,
    push: &PushRow,
    agent: &str,
    parts: &[String],
    from: usize,
    results: &mut Vec<Value>,
) -> Result<(), Stop> {
    let timeout = Duration::from_millis(u64::try_from(push.part_timeout_ms).unwrap_or(60_000));
    for (i, part) in parts.iter().enumerate().skip(from) {
        let stored = format!(
            "file-delivery push {}: part {} of {}, {} bytes",
            push.id,
            i + 1,
            parts.len(),
            part.len()
        );
        let answer = ask(
            state,
            agent,
            FILE_DELIVER,
            (part.clone(), &stored),
            timeout,
            &push.created_by,
        )
        .await;
        let fields = match answer {
            Ok(f) => f,
            Err(AskError::Offline) => return Err(Stop::Offline(resume_at(parts, i))),
            Err(AskError::Failed(e)) => return Err(Stop::Failed(format!("part {} of {}: {e}", i + 1, parts.len()))),
        };
        let files: Vec<Value> = fields
            .get("files")
            .and_then(|f| serde_json::from_str(f).ok())
            .unwrap_or_default();
        record_held(state, agent, &files).await;
        results.extend(files);
        let now = now_ms();
        if let Err(e) = state
            .store
            .push_part_done(&push.id, agent, i + 1, &Value::Array(results.clone()), now)
            .await
        {
            warn!(push = %push.id, agent_id = %agent, error = %e, "cannot record a push's progress");
        }
        if fields.get("status").is_none_or(|s| s != "succeeded") {
            let msg = fields.get("msg").cloned().unwrap_or_default();
            return Err(Stop::Failed(format!("part {} of {}: {msg}", i + 1, parts.len())));
        }
    }
    Ok(())
}

/// The files a host says it now holds, from a delivery's answer.
async fn record_held(state: &ServerState, agent: &str, files: &[Value]) {
    let held: Vec<(String, i64, String)> = files
        .iter()
        .filter_map(|f| {
            let state = match f["action"].as_str()? {
                "written" | "unchanged" => "ok",
                "removed" | "absent" => "removed",
                _ => return None,
            };
            Some((f["name"].as_str()?.to_owned(), f["version"].as_i64()?, state.to_owned()))
        })
        .collect();
    if held.is_empty() {
        return;
    }
    if let Err(e) = state.store.files_held(agent, &held, false, now_ms()).await {
        warn!(agent_id = %agent, error = %e, "cannot record a host's files");
    }
}

/// Where to resume sending: at `at`, or at the first piece of the upload `at`
/// is in the middle of (the host keeps a half upload only while it runs).
fn resume_at(parts: &[String], at: usize) -> usize {
    let mut at = at.min(parts.len());
    while at > 0 && at < parts.len() && piece_index(&parts[at]).is_some_and(|i| i > 0) {
        at -= 1;
    }
    at
}

/// A piece's place in its upload; `None` for a bundle or an envelope.
fn piece_index(part: &str) -> Option<u64> {
    if !part.starts_with("{\"piece\"") {
        return None;
    }
    serde_json::from_str::<Value>(part).ok()?["piece"]["index"].as_u64()
}

/// Runs until `shutdown`: sends the shares of agents that came online, takes over
/// those of instances that stopped, and fails those past their push's deadline.
pub async fn run(state: Arc<ServerState>, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
        }
        let now = now_ms();
        match state.store.push_expire(now).await {
            Ok(0) => {}
            Ok(n) => warn!(
                agents = n,
                "file pushes passed their deadline before reaching these agents"
            ),
            Err(e) => warn!(error = %e, "cannot expire file pushes"),
        }
        let margin = i64::try_from(CLAIM_MARGIN.as_millis()).unwrap_or(i64::MAX);
        let free = i64::try_from(slots.available_permits()).unwrap_or(0);
        let due = match state.store.push_due(now, margin, free).await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot read the file pushes");
                continue;
            }
        };
        for (push_id, agent) in due {
            if !state.is_online(&agent).await.unwrap_or(false) {
                continue;
            }
            let Ok(Some(push)) = state.store.push_get(&push_id).await else {
                continue;
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                break;
            };
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                send_share(&state, &push, &agent).await;
                drop(slot);
            });
        }
    }
}

/// A push as it stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct Progress {
    /// The push.
    pub push: PushRow,
    /// Each agent's share.
    pub agents: Vec<ShareView>,
    /// The newest change, Unix ms: ask again with `since` set to it to wait for
    /// the next.
    pub revision: i64,
    /// Nothing more will happen until an offline agent comes back: every share is
    /// done, failed, or waiting for its agent.
    pub settled: bool,
}

/// One agent's share, and whether the agent is online.
#[derive(Debug, Serialize, ToSchema)]
pub struct ShareView {
    /// The share.
    #[serde(flatten)]
    pub share: PushAgentRow,
    /// Whether the agent is online now.
    pub online: bool,
}

/// The push, once it changed after `since` or settled, or after `wait`.
pub async fn progress(
    state: &ServerState,
    id: &str,
    since: i64,
    wait: Duration,
) -> Result<Option<Progress>, StoreError> {
    let start = Instant::now();
    loop {
        let Some(push) = state.store.push_get(id).await? else {
            return Ok(None);
        };
        let shares = state.store.push_agents(id).await?;
        let revision = shares.iter().map(|s| s.updated_at).max().unwrap_or(push.created_at);
        let mut agents = Vec::with_capacity(shares.len());
        let mut settled = true;
        for share in shares {
            // Only a waiting share's agent may be offline for all it tells.
            let online = share.state != "waiting" || state.is_online(&share.agent_id).await?;
            settled &= matches!(share.state.as_str(), "done" | "failed") || (share.state == "waiting" && !online);
            agents.push(ShareView { share, online });
        }
        if revision > since || settled || start.elapsed() >= wait {
            return Ok(Some(Progress {
                push,
                agents,
                revision,
                settled,
            }));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_starts_an_upload_again() {
        let piece = |i: u32| {
            format!(
                "{{\"piece\":{{\"upload\":\"{}\",\"index\":{i},\"count\":3,\"data\":\"x\"}}}}",
                "0".repeat(64)
            )
        };
        let parts = vec![
            "{\"bundle\":[]}".to_owned(),
            piece(0),
            piece(1),
            piece(2),
            "{\"bundle\":[]}".to_owned(),
        ];
        assert_eq!(resume_at(&parts, 0), 0);
        assert_eq!(resume_at(&parts, 1), 1);
        assert_eq!(resume_at(&parts, 3), 1, "mid-upload: from its first piece");
        assert_eq!(resume_at(&parts, 4), 4);
        assert_eq!(resume_at(&parts, 5), 5, "all answered");
    }
}
