//! Tasks sent to agents and their 5100 results.

use std::collections::HashMap;

use sqlx::Row;

use super::{Store, StoreError, corrupt};
use crate::states::SubtaskState;

/// A task about to be sent.
#[derive(Debug, Clone)]
pub struct NewTask<'a> {
    /// Correlation token, echoed in the 5100 result.
    pub token: &'a str,
    /// Target agent.
    pub agent_id: &'a str,
    /// Task data_type.
    pub data_type: i32,
    /// `keel-agent` or a plugin name.
    pub object_name: &'a str,
    /// Task data, usually JSON.
    pub data: &'a str,
    /// The API token ID that made it.
    pub created_by: &'a str,
    /// How long the agent has to answer; then the task ends `timed_out`.
    pub timeout_ms: i64,
}

/// A task as stored.
#[derive(Debug, Clone)]
pub struct TaskRow {
    /// Correlation token.
    pub token: String,
    /// Target agent.
    pub agent_id: String,
    /// Task data_type.
    pub data_type: i32,
    /// Target object.
    pub object_name: String,
    /// Its state.
    pub status: SubtaskState,
    /// Fields of the 5100 result.
    pub result: Option<HashMap<String, String>>,
    /// Made at, Unix ms.
    pub created_at: i64,
    /// Result arrived at, Unix ms.
    pub finished_at: Option<i64>,
}

fn task_row(row: &sqlx::any::AnyRow) -> Result<TaskRow, StoreError> {
    let result: Option<String> = row.try_get("result")?;
    let data_type: i64 = row.try_get("data_type")?;
    let status: String = row.try_get("status")?;
    Ok(TaskRow {
        token: row.try_get("token")?,
        agent_id: row.try_get("agent_id")?,
        data_type: i32::try_from(data_type).unwrap_or_default(),
        object_name: row.try_get("object_name")?,
        status: status
            .parse()
            .map_err(|e: crate::states::UnknownState| StoreError::Corrupt {
                what: "task status",
                message: e.to_string(),
            })?,
        result: result
            .map(|r| serde_json::from_str(&r))
            .transpose()
            .map_err(corrupt("task result"))?,
        created_at: row.try_get("created_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

impl Store {
    /// Records a task as sent.
    pub async fn task_sent(&self, t: &NewTask<'_>, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tasks (token, agent_id, data_type, object_name, data, created_by, created_at, status, deadline) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'sent', $8)",
        )
        .bind(t.token)
        .bind(t.agent_id)
        .bind(i64::from(t.data_type))
        .bind(t.object_name)
        .bind(t.data)
        .bind(t.created_by)
        .bind(now)
        .bind(now.saturating_add(t.timeout_ms))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends every task sent to one agent whose deadline passed without an answer
    /// (`timed_out`): a plugin that never reads its tasks, an agent that went away.
    /// Returns how many ended.
    pub async fn tasks_expire(&self, now: i64) -> Result<u64, StoreError> {
        let result = serde_json::json!({
            "status": SubtaskState::TimedOut,
            "msg": "no answer before the task's deadline (timeout_secs)",
        })
        .to_string();
        let done = sqlx::query(
            "UPDATE tasks SET status = 'timed_out', result = $1, finished_at = $2 \
             WHERE status = 'sent' AND deadline < $2 AND job_id IS NULL",
        )
        .bind(result)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Stores a 5100 result. Only the agent the task was sent to can complete it;
    /// returns false for an unknown token or another agent's task.
    pub async fn task_result(
        &self,
        token: &str,
        agent_id: &str,
        fields: &HashMap<String, String>,
        now: i64,
    ) -> Result<bool, StoreError> {
        let status = match fields.get("status").map(String::as_str) {
            Some("succeeded") => SubtaskState::Succeeded,
            _ => SubtaskState::Failed,
        };
        let json = serde_json::to_string(fields).map_err(corrupt("task result"))?;
        let done = self
            .timed(
                "task_result",
                sqlx::query(
                    "UPDATE tasks SET status = $1, result = $2, finished_at = $3 \
             WHERE token = $4 AND agent_id = $5 AND status IN ('pending', 'sent')",
                )
                .bind(status.as_str())
                .bind(json)
                .bind(now)
                .bind(token)
                .bind(agent_id)
                .execute(&self.pool),
            )
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// One task by token.
    pub async fn get_task(&self, token: &str) -> Result<Option<TaskRow>, StoreError> {
        let Some(row) = sqlx::query(
            "SELECT token, agent_id, data_type, object_name, status, result, created_at, finished_at FROM tasks WHERE token = $1",
        )
        .bind(token)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        task_row(&row).map(Some)
    }

    /// An agent's newest `limit` tasks (its subtasks of rollouts among them).
    pub async fn agent_tasks(&self, agent_id: &str, limit: i64) -> Result<Vec<TaskRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT token, agent_id, data_type, object_name, status, result, created_at, finished_at FROM tasks \
             WHERE agent_id = $1 ORDER BY created_at DESC, token LIMIT $2",
        )
        .bind(agent_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(task_row).collect()
    }

    /// Where the plugins' record numbering stood at the agent's stored mark:
    /// `(epoch, seq, sources)`, `sources` as [`StreamMark::sources`] has it.
    pub async fn stream_sources(&self, agent_id: &str) -> Result<Option<(u64, u64, String)>, StoreError> {
        let row = sqlx::query("SELECT epoch, seq, sources FROM stream_marks WHERE agent_id = $1")
            .bind(agent_id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let epoch: String = row.try_get("epoch")?;
        let seq: i64 = row.try_get("seq")?;
        let epoch = u64::from_str_radix(&epoch, 16).map_err(|e| StoreError::Corrupt {
            what: "stream epoch",
            message: e.to_string(),
        })?;
        Ok(Some((epoch, u64::try_from(seq).unwrap_or(0), row.try_get("sources")?)))
    }

    /// Stores the highest persisted batch of each agent, with where its plugins'
    /// record numbering stood then, a few hundred rows to a statement. An empty
    /// `sources` (not known) keeps what is stored for the same mark.
    pub async fn save_stream_marks(&self, marks: &[StreamMark]) -> Result<(), StoreError> {
        for chunk in super::batches(marks) {
            let sql = format!(
                "INSERT INTO stream_marks (agent_id, epoch, seq, sources) VALUES {} \
                 ON CONFLICT (agent_id) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq, \
                 sources = CASE WHEN excluded.sources = '' AND stream_marks.epoch = excluded.epoch \
                 AND stream_marks.seq = excluded.seq THEN stream_marks.sources ELSE excluded.sources END",
                super::tuples(chunk.len(), 4)
            );
            // Only placeholders are generated; the values are bound.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for m in chunk {
                q = q
                    .bind(m.agent_id.clone())
                    .bind(format!("{:016x}", m.epoch))
                    .bind(i64::try_from(m.seq).unwrap_or(i64::MAX))
                    .bind(m.sources.to_string());
            }
            self.timed("save_stream_marks", q.execute(&self.pool)).await?;
        }
        Ok(())
    }
}

/// An agent's highest persisted batch, and where its plugins' record numbering
/// stood when it was persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMark {
    /// The agent.
    pub agent_id: String,
    /// Its sequence space.
    pub epoch: u64,
    /// Its highest persisted batch.
    pub seq: u64,
    /// JSON as `gaps` writes it (`{"complete", "runs": {"<plugin>": [instance,
    /// last seq]}}`); empty when not known.
    pub sources: std::sync::Arc<str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    #[tokio::test]
    async fn only_the_target_agent_completes_a_task() {
        let (store, _dir) = test_store().await;
        let t = NewTask {
            token: "t1",
            agent_id: "a1",
            data_type: 1051,
            object_name: "keel-agent",
            data: "{}",
            created_by: "x",
            timeout_ms: 1_000,
        };
        store.task_sent(&t, 1).await.unwrap();
        let fields = HashMap::from([("status".to_owned(), "succeeded".to_owned())]);
        assert!(!store.task_result("t1", "a2", &fields, 2).await.unwrap());
        assert_eq!(store.get_task("t1").await.unwrap().unwrap().status, SubtaskState::Sent);
        assert!(store.task_result("t1", "a1", &fields, 3).await.unwrap());
        let row = store.get_task("t1").await.unwrap().unwrap();
        assert_eq!(row.status, SubtaskState::Succeeded);
        assert_eq!(row.finished_at, Some(3));
    }

    #[tokio::test]
    async fn a_task_without_an_answer_by_its_deadline_times_out() {
        let (store, _dir) = test_store().await;
        for (token, timeout_ms) in [("quick", 100), ("slow", 10_000), ("answered", 100)] {
            let t = NewTask {
                token,
                agent_id: "a1",
                data_type: 6900,
                object_name: "deaf",
                data: "",
                created_by: "x",
                timeout_ms,
            };
            store.task_sent(&t, 1_000).await.unwrap();
        }
        let fields = HashMap::from([("status".to_owned(), "succeeded".to_owned())]);
        assert!(store.task_result("answered", "a1", &fields, 1_050).await.unwrap());
        assert_eq!(store.tasks_expire(1_100).await.unwrap(), 0, "not before the deadline");
        assert_eq!(store.tasks_expire(1_101).await.unwrap(), 1);
        let quick = store.get_task("quick").await.unwrap().unwrap();
        assert_eq!(quick.status, SubtaskState::TimedOut);
        assert_eq!(quick.finished_at, Some(1_101));
        assert_eq!(quick.result.unwrap()["status"], "timed_out");
        assert_eq!(
            store.get_task("slow").await.unwrap().unwrap().status,
            SubtaskState::Sent
        );
        assert_eq!(
            store.get_task("answered").await.unwrap().unwrap().status,
            SubtaskState::Succeeded
        );
        // A late answer does not reopen it.
        assert!(!store.task_result("quick", "a1", &fields, 1_200).await.unwrap());
        assert_eq!(store.tasks_expire(20_000).await.unwrap(), 1, "slow, in its turn");
    }

    #[tokio::test]
    async fn stream_marks_round_trip_full_u64() {
        let (store, _dir) = test_store().await;
        assert_eq!(store.stream_sources("a").await.unwrap(), None);
        let mark = |agent: &str, epoch, seq, sources: &str| StreamMark {
            agent_id: agent.into(),
            epoch,
            seq,
            sources: sources.into(),
        };
        store.save_stream_marks(&[mark("a", u64::MAX, 7, "{}")]).await.unwrap();
        store
            .save_stream_marks(&[mark("a", u64::MAX, 9, r#"{"p":[1,5]}"#)])
            .await
            .unwrap();
        assert_eq!(
            store.stream_sources("a").await.unwrap(),
            Some((u64::MAX, 9, r#"{"p":[1,5]}"#.to_owned()))
        );
        // Not known at the same mark keeps what is stored; at another, it is unknown.
        store.save_stream_marks(&[mark("a", u64::MAX, 9, "")]).await.unwrap();
        assert_eq!(store.stream_sources("a").await.unwrap().unwrap().2, r#"{"p":[1,5]}"#);
        store.save_stream_marks(&[mark("a", u64::MAX, 10, "")]).await.unwrap();
        assert_eq!(store.stream_sources("a").await.unwrap().unwrap().2, "");
        // Many at once, across statements.
        let many: Vec<StreamMark> = (0..700).map(|i| mark(&format!("b{i}"), 1, i, "{}")).collect();
        store.save_stream_marks(&many).await.unwrap();
        assert_eq!(
            store.stream_sources("b699").await.unwrap(),
            Some((1, 699, "{}".to_owned()))
        );
    }
}
