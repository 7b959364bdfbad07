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
//! - an instance takes a share by compare and set, writes to it only while it
//!   holds the claim, and keeps the claim by answering parts; a share whose
//!   instance stopped answering for longer than a part's timeout and
//!   [`CLAIM_MARGIN`] goes back to waiting (or is taken over at once when its
//!   agent is online), resuming at the first part not answered, at the start of
//!   an upload cut in pieces;
//! - an agent that went away, or whose stream is busy or unreachable, keeps its
//!   share waiting; a piece the host could not place (it restarted, or dropped
//!   the upload) sends the upload again from its first piece, once; a part
//!   refused whole fails the share; a file refused inside a bundle fails the
//!   share at its end, after the other parts were sent;
//! - at most [`AT_ONCE`] shares are sent at once per instance, each part read
//!   from the store only when it is sent.
//!
//! Every answer updates `file_status`: the version each host holds of each file
//! against the newest pushed, so `keelctl files status` shows who is behind.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use keel_common::time::now_ms;
use keel_proto::data_type::{FILE_DELIVER, FILE_INVENTORY};
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
    /// The agent is not reachable now: offline, its stream's queue full, or the
    /// instance holding it unreachable. Worth trying again later.
    Later,
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
        Err(TaskError::Send(SendError::Offline(_) | SendError::Busy(_) | SendError::Unreachable(..))) => {
            return Err(AskError::Later);
        }
        Err(e) => return Err(AskError::Failed(e.to_string())),
    }
    let answer = tokio::time::timeout(timeout, answers.task_result()).await;
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
        Err(AskError::Later) => out.online = false,
        Err(AskError::Failed(e)) => out.error = Some(e),
        Ok(fields) if fields.get("status").is_none_or(|s| s != "succeeded") => {
            out.error = Some(fields.get("msg").cloned().unwrap_or_default());
        }
        Ok(mut fields) => {
            // What the plugin said is recorded only when it is a list: anything
            // else would mark every file missing.
            let files = match serde_json::from_str::<Vec<Value>>(fields.get("files").map_or("[]", String::as_str)) {
                Ok(f) => f,
                Err(e) => {
                    out.error = Some(format!("agent {agent}: the inventory's files are not a list: {e}"));
                    return out;
                }
            };
            let held: Vec<(String, i64, String)> = files
                .iter()
                .filter_map(|f| {
                    Some((
                        f["name"].as_str()?.to_owned(),
                        f["version"].as_i64()?,
                        f["state"].as_str().unwrap_or_default().to_owned(),
                    ))
                })
                .collect();
            if let Err(e) = state.store.files_held(agent, &held, true, now_ms()).await {
                warn!(agent_id = %agent, error = %e, "cannot record a host's files");
            }
            out.host_key = fields.remove("host_key");
            out.files = Some(Value::Array(files));
        }
    }
    out
}

/// Shares being sent at once by this instance, whichever push they belong to.
static SENDING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(AT_ONCE);

/// Records a push and starts sending every agent's share at once.
pub async fn push(state: &Arc<ServerState>, push: PushRow, agents: Vec<NewPushAgent>) -> Result<(), StoreError> {
    state.store.push_create(&push).await?;
    add(state, &push, agents).await
}

/// Adds agents to a push and starts sending their shares at once (at most
/// [`AT_ONCE`] shares per instance; the rest are taken by [`run`]).
pub async fn add(state: &Arc<ServerState>, push: &PushRow, agents: Vec<NewPushAgent>) -> Result<(), StoreError> {
    state.store.push_add_agents(&push.id, &agents, now_ms()).await?;
    let ids: Vec<String> = agents.into_iter().map(|a| a.agent_id).collect();
    info!(push = %push.id, agents = ids.len(), by = %push.created_by, "file push");
    for agent in ids {
        let Ok(slot) = SENDING.try_acquire() else {
            break;
        };
        let state = Arc::clone(state);
        let push = push.clone();
        tokio::spawn(async move {
            send_share(&state, &push, &agent).await;
            drop(slot);
        });
    }
    Ok(())
}

/// Before this time a claim is stale.
fn stale_before(push: &PushRow, now: i64) -> i64 {
    now - push.part_timeout_ms - i64::try_from(CLAIM_MARGIN.as_millis()).unwrap_or(i64::MAX)
}

/// Sends one agent's share of a push, if this instance can take it.
async fn send_share(state: &ServerState, push: &PushRow, agent: &str) {
    let now = now_ms();
    let instance = state.cluster.instance.as_str();
    let claimed = state
        .store
        .push_claim(&push.id, agent, instance, now, stale_before(push, now))
        .await;
    let claimed = match claimed {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(e) => {
            warn!(push = %push.id, agent_id = %agent, error = %e, "cannot take a push");
            return;
        }
    };
    let mut share = Share {
        state,
        push,
        agent,
        wanted: claimed.files.iter().map(|f| f.name.clone()).collect(),
        results: claimed
            .results
            .into_iter()
            .filter_map(|r| Some((r["name"].as_str()?.to_owned(), r)))
            .collect(),
        count: claimed.part_count,
        refused: None,
    };
    let outcome = share.send(claimed.sent).await;
    let now = now_ms();
    let ended = match outcome {
        Ok(()) => match share.refused.take() {
            None => {
                state
                    .store
                    .push_finish(&push.id, agent, instance, "done", "", now)
                    .await
            }
            Some(msg) => {
                state
                    .store
                    .push_finish(&push.id, agent, instance, "failed", &msg, now)
                    .await
            }
        },
        Err(Stop::Later(at)) => state.store.push_release(&push.id, agent, instance, at, now).await,
        Err(Stop::Failed(msg)) => {
            warn!(push = %push.id, agent_id = %agent, error = %msg, "file push failed");
            state
                .store
                .push_finish(&push.id, agent, instance, "failed", &msg, now)
                .await
        }
        Err(Stop::Lost) => Ok(true),
    };
    match ended {
        Ok(true) => {}
        Ok(false) => warn!(push = %push.id, agent_id = %agent, "another instance took this push's share over"),
        Err(e) => warn!(push = %push.id, agent_id = %agent, error = %e, "cannot record a push's end"),
    }
}

/// Why sending a share stopped before its end.
enum Stop {
    /// The agent is not reachable now; resume at this part when it is.
    Later(usize),
    /// The agent refused a whole part, or did not answer.
    Failed(String),
    /// Another instance holds the share now.
    Lost,
}

/// A share being sent.
struct Share<'a> {
    state: &'a ServerState,
    push: &'a PushRow,
    agent: &'a str,
    /// The files the share names: the host's answers about others are ignored.
    wanted: std::collections::HashSet<String>,
    /// What the host said of each file, last answer first.
    results: std::collections::BTreeMap<String, Value>,
    count: usize,
    /// The first file the host refused.
    refused: Option<String>,
}

impl Share<'_> {
    /// Sends the parts from `from` on, each after the last one's answer.
    async fn send(&mut self, from: usize) -> Result<(), Stop> {
        let timeout = Duration::from_millis(u64::try_from(self.push.part_timeout_ms).unwrap_or(60_000));
        let mut i = from;
        let mut restarted = None;
        while i < self.count {
            let part = match self.state.store.push_part(&self.push.id, self.agent, i).await {
                Ok(Some(p)) => p,
                Ok(None) => return Err(Stop::Failed(format!("part {} of {} is gone", i + 1, self.count))),
                Err(e) => return Err(Stop::Failed(format!("part {}: {e}", i + 1))),
            };
            let piece = piece_index(&part);
            let stored = format!(
                "file-delivery push {}: part {} of {}, {} bytes",
                self.push.id,
                i + 1,
                self.count,
                part.len()
            );
            let answer = ask(
                self.state,
                self.agent,
                FILE_DELIVER,
                (part, &stored),
                timeout,
                &self.push.created_by,
            )
            .await;
            let fields = match answer {
                Ok(f) => f,
                Err(AskError::Later) => return Err(Stop::Later(self.resume_at(i, piece).await)),
                Err(AskError::Failed(e)) => return Err(Stop::Failed(format!("part {} of {}: {e}", i + 1, self.count))),
            };
            let files: Option<Vec<Value>> = fields.get("files").and_then(|f| serde_json::from_str(f).ok());
            let succeeded = fields.get("status").is_some_and(|s| s == "succeeded");
            let msg = fields.get("msg").cloned().unwrap_or_default();
            if !succeeded && files.is_none() {
                // A piece the host could not place (it restarted, or dropped
                // the upload for another): the upload once more from its start.
                if let Some(1..) = piece
                    && restarted != Some(i)
                {
                    restarted = Some(i);
                    i = self.resume_at(i, piece).await;
                    continue;
                }
                return Err(Stop::Failed(format!("part {} of {}: {msg}", i + 1, self.count)));
            }
            for f in files.into_iter().flatten() {
                if let Some(name) = f["name"].as_str().filter(|n| self.wanted.contains(*n)) {
                    self.results.insert(name.to_owned(), f);
                }
            }
            if !succeeded && self.refused.is_none() {
                self.refused = Some(format!("part {} of {}: {msg}", i + 1, self.count));
            }
            record_held(self.state, self.agent, self.results.values()).await;
            let results = Value::Array(self.results.values().cloned().collect());
            match self
                .state
                .store
                .push_part_done(
                    &self.push.id,
                    self.agent,
                    &self.state.cluster.instance,
                    i + 1,
                    &results,
                    now_ms(),
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => return Err(Stop::Lost),
                Err(e) => return Err(Stop::Failed(format!("cannot record part {}: {e}", i + 1))),
            }
            i += 1;
        }
        Ok(())
    }

    /// Where to resume: at part `at`, or at the first piece of the upload it is
    /// in the middle of (the host keeps a half upload only while it runs).
    async fn resume_at(&self, mut at: usize, mut piece: Option<u64>) -> usize {
        while at > 0 && piece.is_some_and(|p| p > 0) {
            at -= 1;
            piece = match self.state.store.push_part(&self.push.id, self.agent, at).await {
                Ok(Some(p)) => piece_index(&p),
                _ => None,
            };
        }
        at
    }
}

/// The files a host says it now holds, from a delivery's answers.
async fn record_held<'v>(state: &ServerState, agent: &str, files: impl Iterator<Item = &'v Value>) {
    let held: Vec<(String, i64, String)> = files
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
    let margin = i64::try_from(CLAIM_MARGIN.as_millis()).unwrap_or(i64::MAX);
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
        if let Err(e) = state.store.push_release_stale(now, margin).await {
            warn!(error = %e, "cannot release file pushes of stopped instances");
        }
        let free = i64::try_from(SENDING.available_permits()).unwrap_or(0);
        if free == 0 {
            continue;
        }
        let due = match state.store.push_due(now, margin, free).await {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot read the file pushes");
                continue;
            }
        };
        for (push_id, agent) in due {
            let Ok(Some(push)) = state.store.push_get(&push_id).await else {
                continue;
            };
            let Ok(slot) = SENDING.try_acquire() else {
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
    /// Whether the agent is online now (a share being sent: yes).
    pub online: bool,
}

/// How often a long poll that saw no change looks whether the push settled.
const SETTLE_EVERY: u32 = 20;

/// The push, once it changed after `since` or settled, or after `wait`. Each
/// [`POLL`] it reads only the newest change; the whole push when that moved,
/// every [`SETTLE_EVERY`] polls, and at the end.
pub async fn progress(
    state: &ServerState,
    id: &str,
    since: i64,
    wait: Duration,
) -> Result<Option<Progress>, StoreError> {
    let start = Instant::now();
    let mut polls = 0_u32;
    loop {
        let revision = state.store.push_revision(id).await?.unwrap_or(0);
        let last = start.elapsed() >= wait;
        if revision > since || last || polls.is_multiple_of(SETTLE_EVERY) {
            let Some(push) = state.store.push_get(id).await? else {
                return Ok(None);
            };
            let shares = state.store.push_agents(id).await?;
            let online = state.store.push_agents_online(id, now_ms()).await?;
            let revision = shares.iter().map(|s| s.updated_at).max().unwrap_or(push.created_at);
            let mut settled = true;
            let agents: Vec<ShareView> = shares
                .into_iter()
                .map(|share| {
                    let on = share.state != "waiting" || online.contains(&share.agent_id);
                    settled &= matches!(share.state.as_str(), "done" | "failed") || (share.state == "waiting" && !on);
                    ShareView { share, online: on }
                })
                .collect();
            if revision > since || settled || last {
                return Ok(Some(Progress {
                    push,
                    agents,
                    revision,
                    settled,
                }));
            }
        }
        polls += 1;
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_told_from_bundles() {
        let piece = |i: u32| {
            format!(
                "{{\"piece\":{{\"upload\":\"{}\",\"index\":{i},\"count\":3,\"data\":\"x\"}}}}",
                "0".repeat(64)
            )
        };
        assert_eq!(piece_index(&piece(0)), Some(0));
        assert_eq!(piece_index(&piece(2)), Some(2));
        assert_eq!(piece_index("{\"bundle\":[]}"), None);
        assert_eq!(piece_index("{\"v\":1}"), None);
    }
}
