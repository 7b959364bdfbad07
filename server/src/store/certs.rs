//! Issued agent certificates and their revocation.

use sqlx::Row;

use super::{Store, StoreError};

impl Store {
    /// Records an issued certificate.
    pub async fn cert_issued(
        &self,
        serial: &str,
        agent_id: &str,
        issued_at: i64,
        not_after: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO certificates (serial, agent_id, issued_at, not_after) VALUES ($1, $2, $3, $4)")
            .bind(serial)
            .bind(agent_id)
            .bind(issued_at)
            .bind(not_after)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// When the agent's newest certificate was issued.
    pub async fn last_cert_issued(&self, agent_id: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT MAX(issued_at) FROM certificates WHERE agent_id = $1")
                .bind(agent_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Revokes every unrevoked certificate of `agent_id` except `keep`. Returns the
    /// serials revoked.
    pub async fn revoke_agent_certs(
        &self,
        agent_id: &str,
        reason: &str,
        keep: Option<&str>,
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "UPDATE certificates SET revoked_at = $1, revoke_reason = $2 \
             WHERE agent_id = $3 AND revoked_at IS NULL AND serial <> $4 RETURNING serial",
        )
        .bind(now)
        .bind(reason)
        .bind(agent_id)
        .bind(keep.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get("serial").map_err(StoreError::from))
            .collect()
    }

    /// Revokes one certificate by serial. Returns its agent if it was unrevoked.
    pub async fn revoke_serial(&self, serial: &str, reason: &str, now: i64) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(
            "UPDATE certificates SET revoked_at = $1, revoke_reason = $2 WHERE serial = $3 AND revoked_at IS NULL \
             RETURNING agent_id",
        )
        .bind(now)
        .bind(reason)
        .bind(serial)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.try_get("agent_id")).transpose().map_err(StoreError::from)
    }

    /// Serials revoked at or after `since` (Unix ms), with their revocation time.
    pub async fn revoked_since(&self, since: i64) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT serial, revoked_at FROM certificates WHERE revoked_at IS NOT NULL AND revoked_at >= $1",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("serial")?, r.try_get("revoked_at")?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::store::test_store;

    #[tokio::test]
    async fn revocation_is_listed_once_made() {
        let (store, _dir) = test_store().await;
        store.cert_issued("01", "a1", 10, 100).await.unwrap();
        store.cert_issued("02", "a1", 20, 200).await.unwrap();
        store.cert_issued("03", "a2", 20, 200).await.unwrap();
        assert_eq!(store.last_cert_issued("a1").await.unwrap(), Some(20));
        assert_eq!(
            store
                .revoke_agent_certs("a1", "re-enrolled", Some("02"), 50)
                .await
                .unwrap(),
            vec!["01"]
        );
        assert_eq!(
            store.revoke_serial("03", "operator", 60).await.unwrap().as_deref(),
            Some("a2")
        );
        assert_eq!(store.revoke_serial("03", "operator", 61).await.unwrap(), None);
        let mut revoked = store.revoked_since(0).await.unwrap();
        revoked.sort();
        assert_eq!(revoked, vec![("01".to_owned(), 50), ("03".to_owned(), 60)]);
        assert_eq!(store.revoked_since(55).await.unwrap().len(), 1);
    }
}
