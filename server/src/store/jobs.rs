//! Tasks rolled out to many agents ("jobs" in the schema) and their subtasks, one
//! per agent, in the `tasks` table.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError};
use crate::states::{JobState, SubtaskState};

/// A task as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// ID.
    pub id: String,
    /// `sync-config`, `restart-agent` or `plugin-task`.
    pub kind: String,
    /// The request that made it, JSON.
    pub spec: String,
    /// Its state.
    pub state: JobState,
    /// Why it is paused or ended.
    pub reason: String,
    /// Agents per batch.
    pub batch_size: i64,
    /// Fraction of finished subtasks that may fail before it pauses.
    pub failure_threshold: f64,
    /// How long an agent has to answer, ms.
    pub timeout_ms: i64,
    /// Finished and failed subtasks when it was last resumed; the threshold counts from there.
    pub baseline: (i64, i64),
    /// Token ID of its creator.
    pub created_by: String,
    /// Created at, Unix ms.
    pub created_at: i64,
    /// Last state change, Unix ms.
    pub updated_at: i64,
}

/// Subtasks by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct SubtaskCounts {
    /// Not sent yet.
    pub pending: i64,
    /// Sent, no answer yet.
    pub sent: i64,
    /// Answered with success.
    pub succeeded: i64,
    /// Answered with failure, or could not be sent.
    pub failed: i64,
    /// No answer in time.
    pub timed_out: i64,
    /// Not sent because the task was cancelled.
    pub cancelled: i64,
}

impl SubtaskCounts {
    /// Every subtask.
    pub fn total(&self) -> i64 {
        self.pending + self.sent + self.succeeded + self.failed + self.timed_out + self.cancelled
    }

    /// Subtasks that have an outcome.
    pub fn finished(&self) -> i64 {
        self.succeeded + self.failed + self.timed_out
    }

    /// Subtasks that did not succeed.
    pub fn unsuccessful(&self) -> i64 {
        self.failed + self.timed_out
    }
}

/// A subtask to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSubtask {
    /// Correlation token.
    pub token: String,
    /// Target agent.
    pub agent_id: String,
    /// Task data_type.
    pub data_type: i32,
    /// Task object.
    pub object_name: String,
    /// Task data.
    pub data: String,
}

fn job(row: &AnyRow) -> Result<JobRow, StoreError> {
    let threshold: String = row.try_get("failure_threshold")?;
    let state: String = row.try_get("state")?;
    Ok(JobRow {
        id: row.try_get("id")?,
        kind: row.try_get("kind")?,
        spec: row.try_get("spec")?,
        state: state
            .parse()
            .map_err(|e: crate::states::UnknownState| StoreError::Corrupt {
                what: "task state",
                message: e.to_string(),
            })?,
        reason: row.try_get("reason")?,
        batch_size: row.try_get("batch_size")?,
        failure_threshold: threshold.parse().unwrap_or(1.0),
        timeout_ms: row.try_get("timeout_ms")?,
        baseline: (row.try_get("baseline_done")?, row.try_get("baseline_failed")?),
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

macro_rules! select_jobs {
    ($tail:literal) => {
        concat!(
            "SELECT id, kind, spec, state, reason, batch_size, failure_threshold, timeout_ms, baseline_done, ",
            "baseline_failed, created_by, created_at, updated_at FROM jobs",
            $tail
        )
    };
}

impl Store {
    /// Creates a task with one pending subtask per agent, in order.
    pub async fn job_create(&self, j: &JobRow, subtasks: &[PendingSubtask]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO jobs (id, kind, spec, state, reason, batch_size, failure_threshold, timeout_ms, created_by, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)",
        )
        .bind(&j.id)
        .bind(&j.kind)
        .bind(&j.spec)
        .bind(j.state.as_str())
        .bind(&j.reason)
        .bind(j.batch_size)
        .bind(j.failure_threshold.to_string())
        .bind(j.timeout_ms)
        .bind(&j.created_by)
        .bind(j.created_at)
        .execute(&mut *tx)
        .await?;
        for (seq, s) in subtasks.iter().enumerate() {
            sqlx::query(
                "INSERT INTO tasks (token, agent_id, data_type, object_name, data, created_by, created_at, status, job_id, seq) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8, $9)",
            )
            .bind(&s.token)
            .bind(&s.agent_id)
            .bind(i64::from(s.data_type))
            .bind(&s.object_name)
            .bind(&s.data)
            .bind(&j.created_by)
            .bind(j.created_at)
            .bind(&j.id)
            .bind(seq as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// One task.
    pub async fn job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let row = sqlx::query(select_jobs!(" WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job).transpose()
    }

    /// Tasks, newest first; only those in `state` when given.
    pub async fn jobs(&self, state: Option<JobState>, limit: i64) -> Result<Vec<JobRow>, StoreError> {
        let rows = sqlx::query(select_jobs!(
            " WHERE ($1 = '' OR state = $1) ORDER BY created_at DESC, id LIMIT $2"
        ))
        .bind(state.map_or("", JobState::as_str))
        .bind(limit.clamp(1, 10_000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job).collect()
    }

    /// How many tasks are in each state.
    pub async fn jobs_by_state(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = self
            .timed(
                "jobs_by_state",
                sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state ORDER BY state")
                    .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect()
    }

    /// Sets a task's state and why.
    pub async fn job_state(&self, id: &str, state: JobState, reason: &str, now: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE jobs SET state = $2, reason = $3, updated_at = $4 WHERE id = $1")
            .bind(id)
            .bind(state.as_str())
            .bind(reason)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Resumes a paused task, counting failures anew from here.
    pub async fn job_resume(&self, id: &str, counts: &SubtaskCounts, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE jobs SET state = 'running', reason = '', baseline_done = $2, baseline_failed = $3, updated_at = $4 WHERE id = $1",
        )
        .bind(id)
        .bind(counts.finished())
        .bind(counts.unsuccessful())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Subtasks of a task by state.
    pub async fn job_counts(&self, id: &str) -> Result<SubtaskCounts, StoreError> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM tasks WHERE job_id = $1 GROUP BY status")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        let mut c = SubtaskCounts::default();
        for r in rows {
            let status: String = r.try_get("status")?;
            let n: i64 = r.try_get("n")?;
            match status.parse() {
                Ok(SubtaskState::Pending) => c.pending = n,
                Ok(SubtaskState::Sent) => c.sent = n,
                Ok(SubtaskState::Succeeded) => c.succeeded = n,
                Ok(SubtaskState::Failed) => c.failed = n,
                Ok(SubtaskState::TimedOut) => c.timed_out = n,
                Ok(SubtaskState::Cancelled) => c.cancelled = n,
                Err(_) => {}
            }
        }
        Ok(c)
    }

    /// The next `n` pending subtasks of a task, in order.
    pub async fn job_pending(&self, id: &str, n: i64) -> Result<Vec<PendingSubtask>, StoreError> {
        let rows = sqlx::query(
            "SELECT token, agent_id, data_type, object_name, data FROM tasks WHERE job_id = $1 AND status = 'pending' ORDER BY seq LIMIT $2",
        )
        .bind(id)
        .bind(n)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let dt: i64 = r.try_get("data_type")?;
                Ok(PendingSubtask {
                    token: r.try_get("token")?,
                    agent_id: r.try_get("agent_id")?,
                    data_type: i32::try_from(dt).unwrap_or_default(),
                    object_name: r.try_get("object_name")?,
                    data: r.try_get("data")?,
                })
            })
            .collect()
    }

    /// Marks a subtask sent. True for exactly one caller: whoever gets true sends it.
    pub async fn subtask_sent(&self, token: &str, now: i64) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE tasks SET status = 'sent', sent_at = $2 WHERE token = $1 AND status = 'pending'")
            .bind(token)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Takes the lease on running tasks that nobody drives (or whose driver's
    /// lease passed), renews `instance`'s own, and returns the tasks it drives.
    pub async fn jobs_claim(&self, instance: &str, now: i64, until: i64) -> Result<Vec<JobRow>, StoreError> {
        sqlx::query(
            "UPDATE jobs SET driver = $1, driver_until = $2 WHERE state = 'running' \
             AND (driver IS NULL OR driver = $1 OR driver_until < $3)",
        )
        .bind(instance)
        .bind(until)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let rows = sqlx::query(select_jobs!(
            " WHERE state = 'running' AND driver = $1 ORDER BY created_at, id"
        ))
        .bind(instance)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job).collect()
    }

    /// Ends a subtask that got no (or no usable) answer: `failed`, `timed_out` or `cancelled`.
    pub async fn subtask_end(&self, token: &str, status: SubtaskState, msg: &str, now: i64) -> Result<(), StoreError> {
        let result = serde_json::json!({"status": status, "msg": msg, "token": token}).to_string();
        sqlx::query(
            "UPDATE tasks SET status = $2, result = $3, finished_at = $4 WHERE token = $1 AND status IN ('pending', 'sent')",
        )
        .bind(token)
        .bind(status.as_str())
        .bind(result)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The agent's subtasks sent and not answered in tasks of `kind`, with when
    /// each was sent (Unix ms).
    pub async fn sent_subtasks_of_kind(&self, agent_id: &str, kind: &str) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT t.token, t.sent_at FROM tasks t JOIN jobs j ON j.id = t.job_id \
             WHERE t.agent_id = $1 AND t.status = 'sent' AND j.kind = $2 AND t.sent_at IS NOT NULL",
        )
        .bind(agent_id)
        .bind(kind)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Sent subtasks of a task whose answer is overdue.
    pub async fn job_overdue(&self, id: &str, sent_before: i64) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT token FROM tasks WHERE job_id = $1 AND status = 'sent' AND sent_at < $2")
                .bind(id)
                .bind(sent_before)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Cancels every pending subtask of a task.
    pub async fn job_cancel_pending(&self, id: &str, now: i64) -> Result<u64, StoreError> {
        let result = serde_json::json!({"status": SubtaskState::Cancelled, "msg": "task cancelled"}).to_string();
        let done = sqlx::query(
            "UPDATE tasks SET status = 'cancelled', result = $2, finished_at = $3 WHERE job_id = $1 AND status = 'pending'",
        )
        .bind(id)
        .bind(result)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// The subtasks of a task, in order.
    pub async fn job_subtasks(&self, id: &str) -> Result<Vec<super::TaskRow>, StoreError> {
        let tokens: Vec<String> = sqlx::query_scalar("SELECT token FROM tasks WHERE job_id = $1 ORDER BY seq")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(tokens.len());
        for t in tokens {
            if let Some(row) = self.get_task(&t).await? {
                out.push(row);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    #[tokio::test]
    async fn subtasks_move_through_their_states() {
        let (store, _dir) = test_store().await;
        let j = JobRow {
            id: "j1".into(),
            kind: "restart-agent".into(),
            spec: "{}".into(),
            state: JobState::Running,
            reason: String::new(),
            batch_size: 2,
            failure_threshold: 0.5,
            timeout_ms: 1000,
            baseline: (0, 0),
            created_by: "t".into(),
            created_at: 1,
            updated_at: 1,
        };
        let subs: Vec<PendingSubtask> = (0..3)
            .map(|i| PendingSubtask {
                token: format!("s{i}"),
                agent_id: format!("a{i}"),
                data_type: 1060,
                object_name: "keel-agent".into(),
                data: String::new(),
            })
            .collect();
        store.job_create(&j, &subs).await.unwrap();
        assert_eq!(store.job("j1").await.unwrap().unwrap().failure_threshold, 0.5);
        // One driver at a time; another takes over once its lease passed.
        assert_eq!(store.jobs_claim("i1", 100, 200).await.unwrap().len(), 1);
        assert!(store.jobs_claim("i2", 150, 250).await.unwrap().is_empty());
        assert_eq!(store.jobs_claim("i2", 201, 300).await.unwrap().len(), 1);
        assert!(store.jobs_claim("i1", 202, 300).await.unwrap().is_empty());
        let next = store.job_pending("j1", 2).await.unwrap();
        assert_eq!(next.iter().map(|s| s.token.as_str()).collect::<Vec<_>>(), ["s0", "s1"]);
        assert!(store.subtask_sent("s0", 10).await.unwrap());
        assert!(!store.subtask_sent("s0", 11).await.unwrap(), "sent once");
        store.subtask_sent("s1", 20).await.unwrap();
        let ok = std::collections::HashMap::from([("status".to_owned(), "succeeded".to_owned())]);
        assert!(store.task_result("s0", "a0", &ok, 30).await.unwrap());
        assert_eq!(store.job_overdue("j1", 25).await.unwrap(), ["s1"]);
        store
            .subtask_end("s1", SubtaskState::TimedOut, "no answer", 40)
            .await
            .unwrap();
        assert!(
            !store.task_result("s1", "a1", &ok, 50).await.unwrap(),
            "a late answer does not change a timed-out subtask"
        );
        assert_eq!(store.job_cancel_pending("j1", 60).await.unwrap(), 1);
        let c = store.job_counts("j1").await.unwrap();
        assert_eq!((c.succeeded, c.timed_out, c.cancelled, c.total()), (1, 1, 1, 3));
        assert_eq!(store.job_subtasks("j1").await.unwrap().len(), 3);
    }
}
