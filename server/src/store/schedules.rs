//! Scheduled audits and the history of every scan.

use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use super::{Store, StoreError, corrupt};

/// How many scans of one target the history keeps; older ones are dropped.
pub const HISTORY_PER_TARGET: i64 = 200;

/// A scheduled audit.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct ScheduleRow {
    /// Its ID.
    pub id: String,
    /// The agent whose proxy reaches the targets.
    pub agent_id: String,
    /// `host:port` each.
    pub targets: Vec<String>,
    /// Time between runs, ms.
    pub interval_ms: i64,
    /// When it runs next, Unix ms.
    pub next_run: i64,
    /// The token that made it.
    pub created_by: String,
    /// When, Unix ms.
    pub created_at: i64,
    /// When it last ran, Unix ms (0: never).
    pub last_run: i64,
    /// Targets scanned in its last run.
    pub last_ok: i64,
    /// Targets that failed in its last run.
    pub last_failed: i64,
}

/// One scan of one target.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct ScanEvent {
    /// The agent whose proxy reached it.
    pub agent_id: String,
    /// `host:port`.
    pub target: String,
    /// When, Unix ms.
    pub scanned_at: i64,
    /// The leaf's SHA-256, hex; empty when the scan failed.
    pub fingerprint: String,
    /// Why it failed.
    pub error: String,
    /// The certificate differs from the one the scan before saw.
    pub changed: bool,
    /// The codes of its findings.
    pub findings: Vec<String>,
}

impl Store {
    /// Adds a schedule.
    pub async fn schedule_add(&self, s: &ScheduleRow) -> Result<(), StoreError> {
        let targets = serde_json::to_string(&s.targets).map_err(corrupt("schedule targets"))?;
        sqlx::query(
            "INSERT INTO scan_schedules (id, agent_id, targets, interval_ms, next_run, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&s.id)
        .bind(&s.agent_id)
        .bind(targets)
        .bind(s.interval_ms)
        .bind(s.next_run)
        .bind(&s.created_by)
        .bind(s.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every schedule, by next run.
    pub async fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        self.schedules_where("", 0, i64::MAX).await
    }

    /// How many schedules there are.
    pub async fn schedule_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM scan_schedules")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Schedules due at `now`, soonest first, at most `limit`.
    pub async fn schedules_due(&self, now: i64, limit: i64) -> Result<Vec<ScheduleRow>, StoreError> {
        self.schedules_where("WHERE next_run <= $1", now, limit).await
    }

    async fn schedules_where(&self, filter: &str, now: i64, limit: i64) -> Result<Vec<ScheduleRow>, StoreError> {
        let sql = format!(
            "SELECT id, agent_id, targets, interval_ms, next_run, created_by, created_at, last_run, last_ok, \
             last_failed FROM scan_schedules {filter} ORDER BY next_run, id LIMIT {}",
            if filter.is_empty() { "$1" } else { "$2" }
        );
        // Built from constants only; every value is bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        if !filter.is_empty() {
            q = q.bind(now);
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let targets: String = r.try_get("targets")?;
                Ok(ScheduleRow {
                    id: r.try_get("id")?,
                    agent_id: r.try_get("agent_id")?,
                    targets: serde_json::from_str(&targets).map_err(corrupt("schedule targets"))?,
                    interval_ms: r.try_get("interval_ms")?,
                    next_run: r.try_get("next_run")?,
                    created_by: r.try_get("created_by")?,
                    created_at: r.try_get("created_at")?,
                    last_run: r.try_get("last_run")?,
                    last_ok: r.try_get("last_ok")?,
                    last_failed: r.try_get("last_failed")?,
                })
            })
            .collect()
    }

    /// Takes a due run of a schedule: moves its next run from `due` to `next`.
    /// True for exactly one caller, whichever instance it is.
    pub async fn schedule_take(&self, id: &str, due: i64, next: i64) -> Result<bool, StoreError> {
        let r = sqlx::query("UPDATE scan_schedules SET next_run = $1 WHERE id = $2 AND next_run = $3")
            .bind(next)
            .bind(id)
            .bind(due)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Records how a run went.
    pub async fn schedule_ran(&self, id: &str, at: i64, ok: i64, failed: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE scan_schedules SET last_run = $1, last_ok = $2, last_failed = $3 WHERE id = $4")
            .bind(at)
            .bind(ok)
            .bind(failed)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Removes a schedule; false if there was none.
    pub async fn schedule_remove(&self, id: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM scan_schedules WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Adds a scan to the history (`changed` is decided here, from the last
    /// successful scan of the target), keeping the newest
    /// [`HISTORY_PER_TARGET`]. Returns whether the certificate changed.
    pub async fn scan_recorded(
        &self,
        agent_id: &str,
        target: &str,
        at: i64,
        outcome: Result<(&str, &[String]), &str>,
    ) -> Result<bool, StoreError> {
        let last: Option<String> = sqlx::query_scalar(
            "SELECT fingerprint FROM tls_scan_history WHERE agent_id = $1 AND target = $2 AND fingerprint <> '' \
             ORDER BY scanned_at DESC LIMIT 1",
        )
        .bind(agent_id)
        .bind(target)
        .fetch_optional(&self.pool)
        .await?;
        let (fingerprint, error, codes) = match outcome {
            Ok((fp, codes)) => (fp, "", codes),
            Err(e) => ("", e, &[][..]),
        };
        let changed = !fingerprint.is_empty() && last.as_deref().is_some_and(|l| l != fingerprint);
        let findings = serde_json::to_string(codes).map_err(corrupt("scan findings"))?;
        sqlx::query(
            "INSERT INTO tls_scan_history (agent_id, target, scanned_at, fingerprint, error, changed, findings) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(agent_id)
        .bind(target)
        .bind(at)
        .bind(fingerprint)
        .bind(error)
        .bind(i64::from(changed))
        .bind(findings)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "DELETE FROM tls_scan_history WHERE agent_id = $1 AND target = $2 AND scanned_at < \
             (SELECT MIN(scanned_at) FROM (SELECT scanned_at FROM tls_scan_history \
              WHERE agent_id = $1 AND target = $2 ORDER BY scanned_at DESC LIMIT $3) AS newest)",
        )
        .bind(agent_id)
        .bind(target)
        .bind(HISTORY_PER_TARGET)
        .execute(&self.pool)
        .await?;
        Ok(changed)
    }

    /// The history of scans, newest first: of `target` when given, of `agent`'s
    /// targets when given, at most `limit`.
    pub async fn scan_history(
        &self,
        agent: Option<&str>,
        target: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ScanEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT agent_id, target, scanned_at, fingerprint, error, changed, findings FROM tls_scan_history \
             WHERE ($1 = '' OR agent_id = $1) AND ($2 = '' OR target = $2) \
             ORDER BY scanned_at DESC, target LIMIT $3",
        )
        .bind(agent.unwrap_or(""))
        .bind(target.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let changed: i64 = r.try_get("changed")?;
                let findings: String = r.try_get("findings")?;
                Ok(ScanEvent {
                    agent_id: r.try_get("agent_id")?,
                    target: r.try_get("target")?,
                    scanned_at: r.try_get("scanned_at")?,
                    fingerprint: r.try_get("fingerprint")?,
                    error: r.try_get("error")?,
                    changed: changed != 0,
                    findings: serde_json::from_str(&findings).map_err(corrupt("scan findings"))?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::test_store;

    fn schedule(id: &str, next_run: i64) -> ScheduleRow {
        ScheduleRow {
            id: id.into(),
            agent_id: "a1".into(),
            targets: vec!["db:443".into()],
            interval_ms: 60_000,
            next_run,
            created_by: "t".into(),
            created_at: 0,
            last_run: 0,
            last_ok: 0,
            last_failed: 0,
        }
    }

    #[tokio::test]
    async fn a_due_run_is_taken_once() {
        let (store, _dir) = test_store().await;
        store.schedule_add(&schedule("s1", 1_000)).await.unwrap();
        store.schedule_add(&schedule("s2", 5_000)).await.unwrap();
        let due = store.schedules_due(2_000, 10).await.unwrap();
        assert_eq!(due, [schedule("s1", 1_000)]);
        assert!(store.schedule_take("s1", 1_000, 61_000).await.unwrap());
        assert!(
            !store.schedule_take("s1", 1_000, 61_000).await.unwrap(),
            "taken already"
        );
        assert!(store.schedules_due(2_000, 10).await.unwrap().is_empty());
        store.schedule_ran("s1", 2_000, 1, 0).await.unwrap();
        let all = store.schedules().await.unwrap();
        assert_eq!(all.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["s2", "s1"]);
        assert_eq!((all[1].last_run, all[1].last_ok, all[1].next_run), (2_000, 1, 61_000));
        assert_eq!(store.schedule_count().await.unwrap(), 2);
        assert!(store.schedule_remove("s2").await.unwrap());
        assert!(!store.schedule_remove("s2").await.unwrap());
    }

    #[tokio::test]
    async fn history_marks_a_changed_certificate_and_keeps_the_newest() {
        let (store, _dir) = test_store().await;
        let codes = vec!["self_signed".to_owned()];
        assert!(
            !store
                .scan_recorded("a1", "db:443", 1, Ok(("aa", &codes)))
                .await
                .unwrap(),
            "first"
        );
        assert!(!store.scan_recorded("a1", "db:443", 2, Err("refused")).await.unwrap());
        assert!(
            !store
                .scan_recorded("a1", "db:443", 3, Ok(("aa", &codes)))
                .await
                .unwrap(),
            "same"
        );
        assert!(
            store.scan_recorded("a1", "db:443", 4, Ok(("bb", &[]))).await.unwrap(),
            "changed"
        );
        let h = store.scan_history(Some("a1"), Some("db:443"), 10).await.unwrap();
        assert_eq!(
            h.iter().map(|e| (e.scanned_at, e.changed)).collect::<Vec<_>>(),
            [(4, true), (3, false), (2, false), (1, false)]
        );
        assert_eq!(h[1].findings, codes);
        assert_eq!(h[2].error, "refused");
        for at in 5..(5 + HISTORY_PER_TARGET) {
            store.scan_recorded("a1", "db:443", at, Ok(("bb", &[]))).await.unwrap();
        }
        let h = store.scan_history(None, Some("db:443"), 1_000).await.unwrap();
        assert_eq!(h.len(), usize::try_from(HISTORY_PER_TARGET).unwrap());
        assert_eq!(h.last().unwrap().scanned_at, 5, "the oldest dropped");
    }
}
