//! The audit log: every change made through the API, who made it and how it ended.

use sqlx::Row;

use super::{Store, StoreError};

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Unique ID.
    pub id: String,
    /// When, Unix ms.
    pub at: i64,
    /// API token ID, or `anonymous`.
    pub actor: String,
    /// `METHOD /route/{param}`.
    pub action: String,
    /// The request path: what was acted on.
    pub target: String,
    /// HTTP status of the answer.
    pub status: i64,
    /// `ok`, or the error message.
    pub outcome: String,
}

/// Which entries to read.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// From, Unix ms.
    pub since: Option<i64>,
    /// Until, Unix ms.
    pub until: Option<i64>,
    /// This actor only.
    pub actor: Option<String>,
    /// Targets containing this text.
    pub target: Option<String>,
    /// At most this many, newest first.
    pub limit: i64,
}

impl Store {
    /// Appends an entry.
    pub async fn audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        self.timed("audit", sqlx::query(
            "INSERT INTO audit (id, at, actor, action, target, status, outcome) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&e.id)
        .bind(e.at)
        .bind(&e.actor)
        .bind(&e.action)
        .bind(&e.target)
        .bind(e.status)
        .bind(&e.outcome)
        .execute(&self.pool))
        .await?;
        Ok(())
    }

    /// Reads entries, newest first.
    pub async fn audit_log(&self, f: &AuditFilter) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, status, outcome FROM audit \
             WHERE at >= $1 AND at <= $2 AND ($3 = '' OR actor = $3) AND ($4 = '' OR target LIKE $5) \
             ORDER BY at DESC, id DESC LIMIT $6",
        )
        .bind(f.since.unwrap_or(0))
        .bind(f.until.unwrap_or(i64::MAX))
        .bind(f.actor.clone().unwrap_or_default())
        .bind(f.target.clone().unwrap_or_default())
        .bind(format!("%{}%", f.target.clone().unwrap_or_default()))
        .bind(f.limit.clamp(1, 10_000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    status: r.try_get("status")?,
                    outcome: r.try_get("outcome")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    #[tokio::test]
    async fn filters_by_time_actor_and_target() {
        let (store, _dir) = test_store().await;
        for (i, (actor, target)) in [
            ("a", "/api/v1/agents/x/tags"),
            ("b", "/api/v1/policies"),
            ("a", "/api/v1/policies"),
        ]
        .iter()
        .enumerate()
        {
            let e = AuditEntry {
                id: format!("{i}"),
                at: 100 + i as i64,
                actor: (*actor).into(),
                action: "POST".into(),
                target: (*target).into(),
                status: 200,
                outcome: "ok".into(),
            };
            store.audit(&e).await.unwrap();
        }
        let all = store
            .audit_log(&AuditFilter {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(all.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["2", "1", "0"]);
        let a = store
            .audit_log(&AuditFilter {
                actor: Some("a".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(a.len(), 2);
        let p = store
            .audit_log(&AuditFilter {
                target: Some("policies".into()),
                since: Some(102),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(p.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["2"]);
    }
}
