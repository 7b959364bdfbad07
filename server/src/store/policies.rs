//! Policies as stored.

use sqlx::Row;

use super::{Store, StoreError, corrupt};
use crate::policy::{Policy, Target};

impl Store {
    /// Every policy, oldest first.
    pub async fn policies(&self) -> Result<Vec<Policy>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, component, version, detail, target, created_at FROM policies ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let target: String = r.try_get("target")?;
                Ok(Policy {
                    id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    component: r.try_get("component")?,
                    version: r.try_get("version")?,
                    detail: r.try_get("detail")?,
                    target: serde_json::from_str::<Target>(&target).map_err(corrupt("policy target"))?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Adds a policy. Returns false if its name is taken.
    pub async fn policy_add(&self, p: &Policy, by: &str) -> Result<bool, StoreError> {
        let target = serde_json::to_string(&p.target).map_err(corrupt("policy target"))?;
        let done = sqlx::query(
            "INSERT INTO policies (id, name, component, version, detail, target, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
        )
        .bind(&p.id)
        .bind(&p.name)
        .bind(&p.component)
        .bind(&p.version)
        .bind(&p.detail)
        .bind(target)
        .bind(by)
        .bind(p.created_at)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Changes a policy's version and detail. Returns false if there is no such policy.
    pub async fn policy_update(&self, id: &str, version: &str, detail: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE policies SET version = $2, detail = $3 WHERE id = $1")
            .bind(id)
            .bind(version)
            .bind(detail)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes a policy. Returns false if there was none.
    pub async fn policy_delete(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM policies WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Policies that name `component` `version`.
    pub async fn policies_using(&self, component: &str, version: &str) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT name FROM policies WHERE component = $1 AND version = $2 ORDER BY name")
                .bind(component)
                .bind(version)
                .fetch_all(&self.pool)
                .await?,
        )
    }
}
