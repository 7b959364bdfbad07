//! file-delivery pushes, each agent's part of them, and which version of which
//! file each host should have and has.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;
use utoipa::ToSchema;

use super::{Store, StoreError, corrupt};

/// A push.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct PushRow {
    /// Its ID.
    pub id: String,
    /// The token that made it.
    pub created_by: String,
    /// When, Unix ms.
    pub created_at: i64,
    /// An agent not reached by then fails, Unix ms.
    pub deadline: i64,
    /// How long an agent has to answer each part, ms.
    pub part_timeout_ms: i64,
}

/// A file a push changes on a host, as the keeper says (the server cannot read
/// the envelopes).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WantedFile {
    /// The file's name on the host.
    pub name: String,
    /// The version the envelope carries.
    pub version: i64,
    /// A removal rather than a delivery.
    #[serde(default)]
    pub removed: bool,
}

/// One agent's share of a push, as it is added.
#[derive(Debug, Clone)]
pub struct NewPushAgent {
    /// The agent.
    pub agent_id: String,
    /// Each task's data, sent in order.
    pub parts: Vec<String>,
    /// What the parts change.
    pub files: Vec<WantedFile>,
}

/// One agent's share of a push, without its parts.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct PushAgentRow {
    /// The agent.
    pub agent_id: String,
    /// `waiting` (not sent yet: the agent is offline, or about to be sent to),
    /// `sending`, `done` or `failed`.
    pub state: String,
    /// Parts in all.
    pub part_count: i64,
    /// Parts answered.
    pub sent_parts: i64,
    /// Bytes of task data in all.
    pub content_bytes: i64,
    /// What the parts change.
    pub files: Vec<WantedFile>,
    /// Each file's outcome as the host answered:
    /// `[{"name", "version", "action"}]`, with `error` in place of `action` for one
    /// the host refused.
    #[schema(value_type = Object)]
    pub results: serde_json::Value,
    /// Why it failed.
    pub detail: String,
    /// Last change, Unix ms.
    pub updated_at: i64,
}

/// Where one file stands on one host.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct FileStatusRow {
    /// The agent.
    pub agent_id: String,
    /// The file.
    pub name: String,
    /// The newest version pushed (0: none through a push).
    pub wanted_version: i64,
    /// That version removes the file.
    pub wanted_removed: bool,
    /// The version the host holds (0: none), as it last said.
    pub held_version: i64,
    /// How the host last described it: `ok`, `modified`, `missing`, `removed`,
    /// or empty when it never did.
    pub held_state: String,
    /// Last change, Unix ms.
    pub updated_at: i64,
}

impl FileStatusRow {
    /// Whether the host lacks the newest pushed version, or no longer holds it as
    /// delivered.
    pub fn behind(&self) -> bool {
        self.held_version < self.wanted_version
            || (self.held_version == self.wanted_version
                && !self.wanted_removed
                && self.held_state != "ok"
                && self.wanted_version > 0)
    }
}

const AGENT_COLUMNS: &str =
    "agent_id, state, part_count, sent_parts, content_bytes, files, results, detail, updated_at";

fn agent_row(row: &AnyRow) -> Result<PushAgentRow, StoreError> {
    let files: String = row.try_get("files")?;
    let results: String = row.try_get("results")?;
    Ok(PushAgentRow {
        agent_id: row.try_get("agent_id")?,
        state: row.try_get("state")?,
        part_count: row.try_get::<i32, _>("part_count")?.into(),
        sent_parts: row.try_get::<i32, _>("sent_parts")?.into(),
        content_bytes: row.try_get("content_bytes")?,
        files: serde_json::from_str(&files).map_err(corrupt("push files"))?,
        results: serde_json::from_str(&results).map_err(corrupt("push results"))?,
        detail: row.try_get("detail")?,
        updated_at: row.try_get("updated_at")?,
    })
}

impl Store {
    /// Records a push and the files it wants on each host.
    pub async fn push_create(&self, push: &PushRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO file_pushes (id, created_by, created_at, deadline, part_timeout_ms) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&push.id)
        .bind(&push.created_by)
        .bind(push.created_at)
        .bind(push.deadline)
        .bind(push.part_timeout_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Adds agents to a push (all or none); an agent already in it is refused.
    pub async fn push_add_agents(&self, push_id: &str, agents: &[NewPushAgent], now: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for a in agents {
            let parts = serde_json::to_string(&a.parts).map_err(corrupt("push parts"))?;
            let files = serde_json::to_string(&a.files).map_err(corrupt("push files"))?;
            let bytes: usize = a.parts.iter().map(String::len).sum();
            sqlx::query(
                "INSERT INTO file_push_agents (push_id, agent_id, state, parts, part_count, content_bytes, files, \
                 updated_at) VALUES ($1, $2, 'waiting', $3, $4, $5, $6, $7)",
            )
            .bind(push_id)
            .bind(&a.agent_id)
            .bind(parts)
            .bind(i32::try_from(a.parts.len()).unwrap_or(i32::MAX))
            .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
            .bind(files)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            for chunk in super::batches(&a.files) {
                let sql = format!(
                    "INSERT INTO file_status (agent_id, name, wanted_version, wanted_removed, updated_at) VALUES {} \
                     ON CONFLICT (agent_id, name) DO UPDATE SET wanted_version = excluded.wanted_version, \
                     wanted_removed = excluded.wanted_removed, updated_at = excluded.updated_at \
                     WHERE file_status.wanted_version < excluded.wanted_version",
                    super::tuples(chunk.len(), 5)
                );
                // Built from constants only; every value is bound.
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for f in chunk {
                    q = q
                        .bind(&a.agent_id)
                        .bind(&f.name)
                        .bind(f.version)
                        .bind(i32::from(f.removed))
                        .bind(now);
                }
                q.execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// A push.
    pub async fn push_get(&self, id: &str) -> Result<Option<PushRow>, StoreError> {
        let row =
            sqlx::query("SELECT id, created_by, created_at, deadline, part_timeout_ms FROM file_pushes WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| {
            Ok(PushRow {
                id: r.try_get("id")?,
                created_by: r.try_get("created_by")?,
                created_at: r.try_get("created_at")?,
                deadline: r.try_get("deadline")?,
                part_timeout_ms: r.try_get("part_timeout_ms")?,
            })
        })
        .transpose()
    }

    /// Each agent's share of a push, by agent.
    pub async fn push_agents(&self, push_id: &str) -> Result<Vec<PushAgentRow>, StoreError> {
        let sql = format!("SELECT {AGENT_COLUMNS} FROM file_push_agents WHERE push_id = $1 ORDER BY agent_id");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(push_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(agent_row)
            .collect()
    }

    /// Shares to send: waiting ones, and sending ones whose claim is older than
    /// their push's part timeout and `margin` (the instance sending them stopped),
    /// of pushes not past their deadline.
    pub async fn push_due(&self, now: i64, margin: i64, limit: i64) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT a.push_id, a.agent_id FROM file_push_agents a JOIN file_pushes p ON p.id = a.push_id \
             WHERE p.deadline > $1 AND (a.state = 'waiting' OR \
             (a.state = 'sending' AND a.claimed_at < $1 - p.part_timeout_ms - $2)) \
             ORDER BY a.updated_at LIMIT $3",
        )
        .bind(now)
        .bind(margin)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("push_id")?, r.try_get("agent_id")?)))
            .collect()
    }

    /// Takes a share to send (compare and set): its parts, how many were answered
    /// and what the host said of them, or `None` when another instance has it or
    /// it is over.
    pub async fn push_claim(
        &self,
        push_id: &str,
        agent_id: &str,
        instance: &str,
        now: i64,
        stale: i64,
    ) -> Result<Option<(Vec<String>, usize, Vec<serde_json::Value>)>, StoreError> {
        let taken = sqlx::query(
            "UPDATE file_push_agents SET state = 'sending', claimed_by = $3, claimed_at = $4, updated_at = $4 \
             WHERE push_id = $1 AND agent_id = $2 AND (state = 'waiting' OR (state = 'sending' AND claimed_at < $5))",
        )
        .bind(push_id)
        .bind(agent_id)
        .bind(instance)
        .bind(now)
        .bind(stale)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if taken == 0 {
            return Ok(None);
        }
        let row =
            sqlx::query("SELECT parts, sent_parts, results FROM file_push_agents WHERE push_id = $1 AND agent_id = $2")
                .bind(push_id)
                .bind(agent_id)
                .fetch_one(&self.pool)
                .await?;
        let parts: String = row.try_get("parts")?;
        let sent: i32 = row.try_get("sent_parts")?;
        let results: String = row.try_get("results")?;
        let parts: Vec<String> = serde_json::from_str(&parts).map_err(corrupt("push parts"))?;
        let results = serde_json::from_str(&results).map_err(corrupt("push results"))?;
        Ok(Some((parts, usize::try_from(sent).unwrap_or(0), results)))
    }

    /// Records a part answered by the host, with the files it changed, and keeps
    /// the claim alive.
    pub async fn push_part_done(
        &self,
        push_id: &str,
        agent_id: &str,
        sent: usize,
        results: &serde_json::Value,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE file_push_agents SET sent_parts = $3, results = $4, claimed_at = $5, updated_at = $5 \
             WHERE push_id = $1 AND agent_id = $2",
        )
        .bind(push_id)
        .bind(agent_id)
        .bind(i32::try_from(sent).unwrap_or(i32::MAX))
        .bind(results.to_string())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends a share: `done` or `failed`. The parts are dropped (nothing will send
    /// them again).
    pub async fn push_finish(
        &self,
        push_id: &str,
        agent_id: &str,
        state: &str,
        detail: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE file_push_agents SET state = $3, detail = $4, parts = '[]', updated_at = $5 \
             WHERE push_id = $1 AND agent_id = $2",
        )
        .bind(push_id)
        .bind(agent_id)
        .bind(state)
        .bind(detail)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Gives a share back to wait for its agent (offline now), resuming at part
    /// `resume`.
    pub async fn push_release(&self, push_id: &str, agent_id: &str, resume: usize, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE file_push_agents SET state = 'waiting', sent_parts = $3, claimed_by = '', updated_at = $4 \
             WHERE push_id = $1 AND agent_id = $2",
        )
        .bind(push_id)
        .bind(agent_id)
        .bind(i32::try_from(resume).unwrap_or(i32::MAX))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Fails the shares of pushes past their deadline; how many.
    pub async fn push_expire(&self, now: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE file_push_agents SET state = 'failed', parts = '[]', updated_at = $1, \
             detail = 'the agent was not reached before the push''s deadline' \
             WHERE state IN ('waiting', 'sending') AND push_id IN (SELECT id FROM file_pushes WHERE deadline <= $1)",
        )
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Records what a host holds: `(name, version, state)` of files it answered
    /// about. With `all`, it answered with its whole inventory, so a file it did
    /// not name it does not hold. Only what changed is written.
    pub async fn files_held(
        &self,
        agent_id: &str,
        held: &[(String, i64, String)],
        all: bool,
        now: i64,
    ) -> Result<(), StoreError> {
        let known: std::collections::HashMap<String, (i64, String)> =
            sqlx::query("SELECT name, held_version, held_state FROM file_status WHERE agent_id = $1")
                .bind(agent_id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| {
                    Ok((
                        r.try_get("name")?,
                        (r.try_get("held_version")?, r.try_get("held_state")?),
                    ))
                })
                .collect::<Result<_, StoreError>>()?;
        let mut changed: Vec<(&str, i64, &str)> = held
            .iter()
            .filter(|(name, version, state)| known.get(name).is_none_or(|(v, s)| v != version || s != state))
            .map(|(name, version, state)| (name.as_str(), *version, state.as_str()))
            .collect();
        if all {
            let named: std::collections::HashSet<&str> = held.iter().map(|(n, _, _)| n.as_str()).collect();
            changed.extend(
                known
                    .iter()
                    .filter(|(name, (_, state))| !named.contains(name.as_str()) && state != "missing")
                    .map(|(name, _)| (name.as_str(), 0, "missing")),
            );
        }
        if changed.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for chunk in super::batches(&changed) {
            let sql = format!(
                "INSERT INTO file_status (agent_id, name, held_version, held_state, updated_at) VALUES {} \
                 ON CONFLICT (agent_id, name) DO UPDATE SET held_version = excluded.held_version, \
                 held_state = excluded.held_state, updated_at = excluded.updated_at",
                super::tuples(chunk.len(), 5)
            );
            // Built from constants only; every value is bound.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (name, version, state) in chunk {
                q = q.bind(agent_id).bind(*name).bind(*version).bind(*state).bind(now);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Where files stand, by agent and name; only those of `agent` or `name`
    /// when given.
    pub async fn file_status(&self, agent: &str, name: &str) -> Result<Vec<FileStatusRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT agent_id, name, wanted_version, wanted_removed, held_version, held_state, updated_at \
             FROM file_status WHERE ($1 = '' OR agent_id = $1) AND ($2 = '' OR name = $2) ORDER BY agent_id, name",
        )
        .bind(agent)
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(FileStatusRow {
                    agent_id: r.try_get("agent_id")?,
                    name: r.try_get("name")?,
                    wanted_version: r.try_get("wanted_version")?,
                    wanted_removed: r.try_get::<i32, _>("wanted_removed")? != 0,
                    held_version: r.try_get("held_version")?,
                    held_state: r.try_get("held_state")?,
                    updated_at: r.try_get("updated_at")?,
                })
            })
            .collect()
    }
}
