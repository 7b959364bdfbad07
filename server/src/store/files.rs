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

/// A share taken to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    /// Parts in all.
    pub part_count: usize,
    /// Parts answered before.
    pub sent: usize,
    /// What the parts change.
    pub files: Vec<WantedFile>,
    /// What the host said of them so far.
    pub results: Vec<serde_json::Value>,
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
            let files = serde_json::to_string(&a.files).map_err(corrupt("push files"))?;
            let bytes: usize = a.parts.iter().map(String::len).sum();
            sqlx::query(
                "INSERT INTO file_push_agents (push_id, agent_id, state, part_count, content_bytes, files, \
                 updated_at) VALUES ($1, $2, 'waiting', $3, $4, $5, $6)",
            )
            .bind(push_id)
            .bind(&a.agent_id)
            .bind(i32::try_from(a.parts.len()).unwrap_or(i32::MAX))
            .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
            .bind(files)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            for (i, part) in a.parts.iter().enumerate() {
                sqlx::query("INSERT INTO file_push_parts (push_id, agent_id, idx, data) VALUES ($1, $2, $3, $4)")
                    .bind(push_id)
                    .bind(&a.agent_id)
                    .bind(i32::try_from(i).unwrap_or(i32::MAX))
                    .bind(part)
                    .execute(&mut *tx)
                    .await?;
            }
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

    /// Shares to send whose agent is online now: waiting ones, and sending ones
    /// whose claim is older than their push's part timeout and `margin` (the
    /// instance sending them stopped), of pushes not past their deadline.
    pub async fn push_due(&self, now: i64, margin: i64, limit: i64) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.push_id, s.agent_id FROM file_push_agents s JOIN file_pushes p ON p.id = s.push_id \
             JOIN agents a ON a.id = s.agent_id \
             WHERE p.deadline > $1 AND (s.state = 'waiting' OR \
             (s.state = 'sending' AND s.claimed_at < $1 - p.part_timeout_ms - $2)) \
             AND a.online <> 0 AND EXISTS (SELECT 1 FROM instances i WHERE i.id = a.instance AND i.lease_until > $1) \
             ORDER BY s.updated_at LIMIT $3",
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

    /// Gives shares whose instance stopped sending them back to wait for their
    /// agents (claims older than a part's timeout and `margin`); how many.
    pub async fn push_release_stale(&self, now: i64, margin: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE file_push_agents SET state = 'waiting', claimed_by = '', updated_at = $1 \
             WHERE state = 'sending' AND claimed_at < $1 - $2 - \
             (SELECT p.part_timeout_ms FROM file_pushes p WHERE p.id = file_push_agents.push_id)",
        )
        .bind(now)
        .bind(margin)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Takes a share to send (compare and set), or `None` when another instance
    /// has it or it is over.
    pub async fn push_claim(
        &self,
        push_id: &str,
        agent_id: &str,
        instance: &str,
        now: i64,
        stale: i64,
    ) -> Result<Option<Claimed>, StoreError> {
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
        let row = sqlx::query(
            "SELECT part_count, sent_parts, files, results FROM file_push_agents WHERE push_id = $1 AND agent_id = $2",
        )
        .bind(push_id)
        .bind(agent_id)
        .fetch_one(&self.pool)
        .await?;
        let files: String = row.try_get("files")?;
        let results: String = row.try_get("results")?;
        Ok(Some(Claimed {
            part_count: usize::try_from(row.try_get::<i32, _>("part_count")?).unwrap_or(0),
            sent: usize::try_from(row.try_get::<i32, _>("sent_parts")?).unwrap_or(0),
            files: serde_json::from_str(&files).map_err(corrupt("push files"))?,
            results: serde_json::from_str(&results).map_err(corrupt("push results"))?,
        }))
    }

    /// One part of a share.
    pub async fn push_part(&self, push_id: &str, agent_id: &str, index: usize) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT data FROM file_push_parts WHERE push_id = $1 AND agent_id = $2 AND idx = $3")
                .bind(push_id)
                .bind(agent_id)
                .bind(i32::try_from(index).unwrap_or(i32::MAX))
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Records a part answered by the host, with what it said of the files, and
    /// keeps the claim alive; false when `instance` no longer holds the share.
    pub async fn push_part_done(
        &self,
        push_id: &str,
        agent_id: &str,
        instance: &str,
        sent: usize,
        results: &serde_json::Value,
        now: i64,
    ) -> Result<bool, StoreError> {
        Ok(sqlx::query(
            "UPDATE file_push_agents SET sent_parts = $4, results = $5, claimed_at = $6, updated_at = $6 \
             WHERE push_id = $1 AND agent_id = $2 AND claimed_by = $3 AND state = 'sending'",
        )
        .bind(push_id)
        .bind(agent_id)
        .bind(instance)
        .bind(i32::try_from(sent).unwrap_or(i32::MAX))
        .bind(results.to_string())
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    /// Ends a share `instance` holds: `done` or `failed`; its parts are dropped
    /// (nothing will send them again). False when it no longer holds it.
    pub async fn push_finish(
        &self,
        push_id: &str,
        agent_id: &str,
        instance: &str,
        state: &str,
        detail: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let ended = sqlx::query(
            "UPDATE file_push_agents SET state = $4, detail = $5, updated_at = $6 \
             WHERE push_id = $1 AND agent_id = $2 AND claimed_by = $3 AND state = 'sending'",
        )
        .bind(push_id)
        .bind(agent_id)
        .bind(instance)
        .bind(state)
        .bind(detail)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1;
        if ended {
            sqlx::query("DELETE FROM file_push_parts WHERE push_id = $1 AND agent_id = $2")
                .bind(push_id)
                .bind(agent_id)
                .execute(&self.pool)
                .await?;
        }
        Ok(ended)
    }

    /// Gives a share `instance` holds back to wait for its agent, resuming at
    /// part `resume`. False when it no longer holds it.
    pub async fn push_release(
        &self,
        push_id: &str,
        agent_id: &str,
        instance: &str,
        resume: usize,
        now: i64,
    ) -> Result<bool, StoreError> {
        Ok(sqlx::query(
            "UPDATE file_push_agents SET state = 'waiting', sent_parts = $4, claimed_by = '', updated_at = $5 \
             WHERE push_id = $1 AND agent_id = $2 AND claimed_by = $3 AND state = 'sending'",
        )
        .bind(push_id)
        .bind(agent_id)
        .bind(instance)
        .bind(i32::try_from(resume).unwrap_or(i32::MAX))
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    /// Fails the shares of pushes past their deadline and drops their parts; how
    /// many.
    pub async fn push_expire(&self, now: i64) -> Result<u64, StoreError> {
        let expired = sqlx::query(
            "UPDATE file_push_agents SET state = 'failed', updated_at = $1, \
             detail = 'the agent was not reached before the push''s deadline' \
             WHERE state IN ('waiting', 'sending') AND push_id IN (SELECT id FROM file_pushes WHERE deadline <= $1)",
        )
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if expired > 0 {
            sqlx::query(
                "DELETE FROM file_push_parts WHERE EXISTS (SELECT 1 FROM file_push_agents s \
                 WHERE s.push_id = file_push_parts.push_id AND s.agent_id = file_push_parts.agent_id \
                 AND s.state IN ('done', 'failed'))",
            )
            .execute(&self.pool)
            .await?;
        }
        Ok(expired)
    }

    /// The newest change of a push's shares, Unix ms (`None`: no such push or no
    /// share yet).
    pub async fn push_revision(&self, push_id: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT MAX(updated_at) FROM file_push_agents WHERE push_id = $1")
                .bind(push_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// The agents of a push that are online now, whatever their share's state.
    ///
    /// Read apart from the shares, so not filtered on their state: a share read
    /// as waiting and claimed (no longer waiting) before this read would then
    /// have its online agent counted offline, and a waiter told "queued" for a
    /// push being sent.
    pub async fn push_agents_online(
        &self,
        push_id: &str,
        now: i64,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT s.agent_id FROM file_push_agents s JOIN agents a ON a.id = s.agent_id \
             WHERE s.push_id = $1 AND a.online <> 0 \
             AND EXISTS (SELECT 1 FROM instances i WHERE i.id = a.instance AND i.lease_until > $2)",
        )
        .bind(push_id)
        .bind(now)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect())
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
        // A name said twice counts once, as last said (one statement cannot
        // write a row twice).
        let said: std::collections::BTreeMap<&str, (i64, &str)> =
            held.iter().map(|(n, v, s)| (n.as_str(), (*v, s.as_str()))).collect();
        let mut changed: Vec<(&str, i64, &str)> = said
            .iter()
            .filter(|(name, (version, state))| known.get(**name).is_none_or(|(v, s)| v != version || s != state))
            .map(|(name, (version, state))| (*name, *version, *state))
            .collect();
        if all {
            let named: std::collections::HashSet<&str> = said.keys().copied().collect();
            changed.extend(
                known
                    .iter()
                    // The inventory leaves removed files out: they stay removed.
                    .filter(|(name, (_, state))| {
                        !named.contains(name.as_str()) && state != "missing" && state != "removed"
                    })
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::{AgentMeta, InstanceRow, test_store};

    fn push(id: &str) -> PushRow {
        PushRow {
            id: id.into(),
            created_by: "t".into(),
            created_at: 0,
            deadline: 1_000_000,
            part_timeout_ms: 1_000,
        }
    }

    fn share(agent: &str, parts: usize) -> NewPushAgent {
        NewPushAgent {
            agent_id: agent.into(),
            parts: (0..parts).map(|i| format!("part {i}")).collect(),
            files: vec![WantedFile {
                name: "f".into(),
                version: 7,
                removed: false,
            }],
        }
    }

    #[tokio::test]
    async fn a_share_is_sent_by_one_instance_and_taken_over_only_when_stale() {
        let (store, _dir) = test_store().await;
        for id in ["i1", "i2"] {
            store
                .instance_renew(&InstanceRow {
                    id: id.into(),
                    grpc: String::new(),
                    http: String::new(),
                    started_at: 0,
                    lease_until: 1_000_000,
                    agents: 0,
                })
                .await
                .unwrap();
        }
        store
            .agent_connected("a1", &AgentMeta::default(), 1, "i1")
            .await
            .unwrap();
        store.push_create(&push("p1")).await.unwrap();
        store
            .push_add_agents("p1", &[share("a1", 3), share("off", 1)], 10)
            .await
            .unwrap();
        assert_eq!(
            store.push_due(100, 30_000, 10).await.unwrap(),
            [("p1".to_owned(), "a1".to_owned())],
            "only online agents' shares"
        );

        let online = || store.push_agents_online("p1", 100);
        assert_eq!(online().await.unwrap(), ["a1".to_owned()].into(), "waiting, online");
        let claimed = store.push_claim("p1", "a1", "i1", 100, 0).await.unwrap().unwrap();
        assert_eq!((claimed.part_count, claimed.sent), (3, 0));
        assert_eq!(
            online().await.unwrap(),
            ["a1".to_owned()].into(),
            "claimed since the shares were read: still online"
        );
        assert_eq!(store.push_part("p1", "a1", 2).await.unwrap().as_deref(), Some("part 2"));
        assert!(
            store.push_claim("p1", "a1", "i2", 200, 0).await.unwrap().is_none(),
            "held"
        );
        let r = serde_json::json!([{"name": "f", "version": 7, "action": "written"}]);
        assert!(
            !store.push_part_done("p1", "a1", "i2", 1, &r, 200).await.unwrap(),
            "not the holder"
        );
        assert!(store.push_part_done("p1", "a1", "i1", 1, &r, 200).await.unwrap());

        // i1 stops answering: past the part timeout and the margin, it waits again,
        // and i2 takes it, resuming where i1 was; i1 can no longer write to it.
        assert_eq!(
            store.push_release_stale(200 + 1_000 + 5, 10).await.unwrap(),
            0,
            "not yet stale"
        );
        assert_eq!(store.push_release_stale(200 + 1_000 + 11, 10).await.unwrap(), 1);
        let claimed = store.push_claim("p1", "a1", "i2", 1_300, 0).await.unwrap().unwrap();
        assert_eq!((claimed.sent, claimed.results), (1, r.as_array().unwrap().clone()));
        assert!(!store.push_finish("p1", "a1", "i1", "done", "", 1_400).await.unwrap());
        assert!(store.push_finish("p1", "a1", "i2", "done", "", 1_400).await.unwrap());
        assert_eq!(
            store.push_part("p1", "a1", 0).await.unwrap(),
            None,
            "parts dropped at the end"
        );
        assert_eq!(store.push_revision("p1").await.unwrap(), Some(1_400));
        let rows = store.push_agents("p1").await.unwrap();
        assert_eq!(
            rows.iter().map(|r| r.state.as_str()).collect::<Vec<_>>(),
            ["done", "waiting"]
        );
        assert_eq!(
            store.push_expire(2_000_000).await.unwrap(),
            1,
            "the offline one at the deadline"
        );
    }

    #[tokio::test]
    async fn status_tells_who_is_behind() {
        let (store, _dir) = test_store().await;
        store.push_create(&push("p1")).await.unwrap();
        store.push_add_agents("p1", &[share("a1", 1)], 10).await.unwrap();
        let behind = |rows: Vec<FileStatusRow>| rows.iter().filter(|r| r.behind()).count();
        assert_eq!(
            behind(store.file_status("a1", "").await.unwrap()),
            1,
            "pushed, not held"
        );
        let held = [
            ("f".to_owned(), 7, "ok".to_owned()),
            ("f".to_owned(), 7, "ok".to_owned()),
        ];
        store.files_held("a1", &held, true, 20).await.unwrap();
        assert_eq!(behind(store.file_status("a1", "").await.unwrap()), 0);
        // Removed on the host: the inventory leaves it out, and it stays removed.
        store
            .files_held("a1", &[("f".into(), 8, "removed".into())], false, 30)
            .await
            .unwrap();
        store.files_held("a1", &[], true, 40).await.unwrap();
        let rows = store.file_status("a1", "f").await.unwrap();
        assert_eq!((rows[0].held_version, rows[0].held_state.as_str()), (8, "removed"));
        // Changed by hand on the host: behind until pushed again.
        store
            .files_held("a1", &[("f".into(), 7, "modified".into())], true, 50)
            .await
            .unwrap();
        assert_eq!(behind(store.file_status("a1", "").await.unwrap()), 1);
    }
}
