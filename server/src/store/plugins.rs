//! Component packages, desired plugin sets and reported plugin state.

use std::collections::{HashMap, HashSet};

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, corrupt};
use crate::policy::DesiredPlugin;

/// A stored package of a component version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageRow {
    /// Component name.
    pub name: String,
    /// Version.
    pub version: String,
    /// `x86_64`, `aarch64` or `any`.
    pub arch: String,
    /// `exec` or `tar.gz`.
    pub kind: String,
    /// Hex SHA-256.
    pub sha256: String,
    /// Hex Ed25519 signature.
    pub signature: String,
    /// Bytes.
    pub size: i64,
    /// Uploaded at, Unix ms.
    pub created_at: i64,
    /// Token ID of the uploader.
    pub created_by: String,
}

/// A plugin as its agent last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedPlugin {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// State.
    pub state: String,
    /// PID while running.
    pub pid: Option<i64>,
    /// The heartbeat fields.
    pub heartbeat: serde_json::Map<String, serde_json::Value>,
    /// When, Unix ms.
    pub updated_at: i64,
    /// Its records found missing by a gap in their numbers.
    pub lost_records: i64,
}

fn package(row: &AnyRow) -> Result<PackageRow, StoreError> {
    Ok(PackageRow {
        name: row.try_get("name")?,
        version: row.try_get("version")?,
        arch: row.try_get("arch")?,
        kind: row.try_get("kind")?,
        sha256: row.try_get("sha256")?,
        signature: row.try_get("signature")?,
        size: row.try_get("size")?,
        created_at: row.try_get("created_at")?,
        created_by: row.try_get("created_by")?,
    })
}

impl Store {
    /// Records a package. Returns false if that name/version/arch/kind exists.
    pub async fn package_add(&self, p: &PackageRow) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO component_packages (name, version, arch, kind, sha256, signature, size, created_at, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
        )
        .bind(&p.name)
        .bind(&p.version)
        .bind(&p.arch)
        .bind(&p.kind)
        .bind(&p.sha256)
        .bind(&p.signature)
        .bind(p.size)
        .bind(p.created_at)
        .bind(&p.created_by)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Packages, optionally of one component, newest first.
    pub async fn packages(&self, name: Option<&str>) -> Result<Vec<PackageRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, version, arch, kind, sha256, signature, size, created_at, created_by FROM component_packages \
             WHERE ($1 = '' OR name = $1) ORDER BY name, created_at DESC",
        )
        .bind(name.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(package).collect()
    }

    /// The package of `name` `version` for `arch`: an exact arch first, then `any`.
    pub async fn package_for(&self, name: &str, version: &str, arch: &str) -> Result<Option<PackageRow>, StoreError> {
        self.package_matching(name, version, arch, None).await
    }

    /// The package of `name` `version` of one type for `arch` (exact arch first, then `any`).
    pub async fn package_for_kind(
        &self,
        name: &str,
        version: &str,
        arch: &str,
        kind: &str,
    ) -> Result<Option<PackageRow>, StoreError> {
        self.package_matching(name, version, arch, Some(kind)).await
    }

    /// [`Self::package_for`], of type `kind` if given. A version has a package per
    /// arch and type at most: a handful of rows, filtered here.
    async fn package_matching(
        &self,
        name: &str,
        version: &str,
        arch: &str,
        kind: Option<&str>,
    ) -> Result<Option<PackageRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, version, arch, kind, sha256, signature, size, created_at, created_by FROM component_packages \
             WHERE name = $1 AND version = $2 AND (arch = $3 OR arch = 'any')",
        )
        .bind(name)
        .bind(version)
        .bind(arch)
        .fetch_all(&self.pool)
        .await?;
        let mut found: Vec<PackageRow> = rows.iter().map(package).collect::<Result<_, _>>()?;
        found.retain(|p| kind.is_none_or(|k| p.kind == k));
        found.sort_by_key(|p| p.arch == "any");
        Ok(found.into_iter().next())
    }

    /// Deletes every package of a version; returns their hashes.
    pub async fn version_delete(&self, name: &str, version: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("DELETE FROM component_packages WHERE name = $1 AND version = $2 RETURNING sha256")
            .bind(name)
            .bind(version)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| r.try_get("sha256").map_err(StoreError::from))
            .collect()
    }

    /// Whether any package has this SHA-256 (for serving blobs).
    pub async fn package_sha_known(&self, sha256: &str) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM component_packages WHERE sha256 = $1")
            .bind(sha256)
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// Replaces an agent's desired plugin set (and marks it managed).
    pub async fn set_desired(
        &self,
        agent_id: &str,
        set: &[DesiredPlugin],
        by: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM agent_plugin_desired WHERE agent_id = $1")
            .bind(agent_id)
            .execute(&mut *tx)
            .await?;
        for p in set {
            sqlx::query("INSERT INTO agent_plugin_desired (agent_id, name, version, detail) VALUES ($1, $2, $3, $4)")
                .bind(agent_id)
                .bind(&p.name)
                .bind(&p.version)
                .bind(&p.detail)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO agent_plugin_sets (agent_id, updated_at, updated_by) VALUES ($1, $2, $3) \
             ON CONFLICT (agent_id) DO UPDATE SET updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        )
        .bind(agent_id)
        .bind(now)
        .bind(by)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The agent's desired set, or `None` if the server does not manage its plugins.
    pub async fn desired(&self, agent_id: &str) -> Result<Option<Vec<DesiredPlugin>>, StoreError> {
        let managed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM agent_plugin_sets WHERE agent_id = $1")
            .bind(agent_id)
            .fetch_one(&self.pool)
            .await?;
        if managed == 0 {
            return Ok(None);
        }
        let rows =
            sqlx::query("SELECT name, version, detail FROM agent_plugin_desired WHERE agent_id = $1 ORDER BY name")
                .bind(agent_id)
                .fetch_all(&self.pool)
                .await?;
        let set = rows
            .iter()
            .map(|r| {
                Ok(DesiredPlugin {
                    name: r.try_get("name")?,
                    version: r.try_get("version")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some(set))
    }

    /// Stores a plugin heartbeat.
    pub async fn plugin_heartbeat(
        &self,
        agent_id: &str,
        fields: &HashMap<String, String>,
        now: i64,
    ) -> Result<(), StoreError> {
        let Some(name) = fields.get("name").filter(|n| !n.is_empty()) else {
            return Ok(());
        };
        let json = serde_json::to_string(fields).map_err(corrupt("plugin heartbeat"))?;
        let pid: Option<i64> = fields.get("pid").and_then(|p| p.parse().ok());
        let version = fields
            .get("version")
            .or_else(|| fields.get("pversion"))
            .cloned()
            .unwrap_or_default();
        self.timed("plugin_heartbeat", sqlx::query(
            "INSERT INTO agent_plugins (agent_id, name, version, state, pid, heartbeat, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (agent_id, name) DO UPDATE SET version = excluded.version, state = excluded.state, pid = excluded.pid, \
             heartbeat = excluded.heartbeat, updated_at = excluded.updated_at",
        )
        .bind(agent_id)
        .bind(name)
        .bind(version)
        .bind(fields.get("state").cloned().unwrap_or_default())
        .bind(pid)
        .bind(json)
        .bind(now)
        .execute(&self.pool))
        .await?;
        Ok(())
    }

    /// Adds `lost` to the count of a plugin's records found missing.
    pub async fn plugin_records_lost(&self, agent_id: &str, name: &str, lost: u64, now: i64) -> Result<(), StoreError> {
        let lost = i64::try_from(lost).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO agent_plugins (agent_id, name, updated_at, lost_records) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (agent_id, name) DO UPDATE SET lost_records = agent_plugins.lost_records + excluded.lost_records",
        )
        .bind(agent_id)
        .bind(name)
        .bind(now)
        .bind(lost)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets reported plugins the agent no longer runs.
    pub async fn plugins_present(&self, agent_id: &str, names: &HashSet<String>) -> Result<(), StoreError> {
        let known: Vec<String> = sqlx::query_scalar("SELECT name FROM agent_plugins WHERE agent_id = $1")
            .bind(agent_id)
            .fetch_all(&self.pool)
            .await?;
        for name in known.iter().filter(|n| !names.contains(*n)) {
            sqlx::query("DELETE FROM agent_plugins WHERE agent_id = $1 AND name = $2")
                .bind(agent_id)
                .bind(name)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Reported plugins of one agent, or of every agent, by agent.
    pub async fn reported_plugins(
        &self,
        agent_id: Option<&str>,
    ) -> Result<HashMap<String, Vec<ReportedPlugin>>, StoreError> {
        match agent_id {
            Some(id) => self.reported_plugins_between(id, id).await,
            None => self.reported_plugins_between("", "").await,
        }
    }

    /// Reported plugins of the agents whose IDs lie from `first` to `last` (all
    /// when `first` is empty), by agent.
    pub async fn reported_plugins_between(
        &self,
        first: &str,
        last: &str,
    ) -> Result<HashMap<String, Vec<ReportedPlugin>>, StoreError> {
        let rows = sqlx::query(
            "SELECT agent_id, name, version, state, pid, heartbeat, updated_at, lost_records FROM agent_plugins \
             WHERE $1 = '' OR (agent_id >= $1 AND agent_id <= $2) ORDER BY agent_id, name",
        )
        .bind(first)
        .bind(last)
        .fetch_all(&self.pool)
        .await?;
        let mut out: HashMap<String, Vec<ReportedPlugin>> = HashMap::new();
        for r in rows {
            let heartbeat: String = r.try_get("heartbeat")?;
            out.entry(r.try_get("agent_id")?).or_default().push(ReportedPlugin {
                name: r.try_get("name")?,
                version: r.try_get("version")?,
                state: r.try_get("state")?,
                pid: r.try_get("pid")?,
                heartbeat: serde_json::from_str(&heartbeat).map_err(corrupt("plugin heartbeat"))?,
                updated_at: r.try_get("updated_at")?,
                lost_records: r.try_get("lost_records")?,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    fn pkg(name: &str, version: &str, arch: &str) -> PackageRow {
        PackageRow {
            name: name.into(),
            version: version.into(),
            arch: arch.into(),
            kind: "exec".into(),
            sha256: format!("{name}{version}{arch}"),
            signature: "s".into(),
            size: 1,
            created_at: 1,
            created_by: "t".into(),
        }
    }

    #[tokio::test]
    async fn packages_prefer_the_exact_arch() {
        let (store, _dir) = test_store().await;
        assert!(store.package_add(&pkg("p", "1", "any")).await.unwrap());
        assert!(
            !store.package_add(&pkg("p", "1", "any")).await.unwrap(),
            "duplicates are refused"
        );
        assert!(store.package_add(&pkg("p", "1", "aarch64")).await.unwrap());
        assert_eq!(
            store.package_for("p", "1", "aarch64").await.unwrap().unwrap().arch,
            "aarch64"
        );
        assert_eq!(
            store.package_for("p", "1", "x86_64").await.unwrap().unwrap().arch,
            "any"
        );
        assert!(store.package_for("p", "2", "x86_64").await.unwrap().is_none());
        assert_eq!(store.packages(Some("p")).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn desired_sets_are_managed_only_once_set() {
        let (store, _dir) = test_store().await;
        assert_eq!(store.desired("a").await.unwrap(), None);
        store.set_desired("a", &[], "t", 1).await.unwrap();
        assert_eq!(store.desired("a").await.unwrap(), Some(vec![]));
        let set = vec![DesiredPlugin {
            name: "p".into(),
            version: "1".into(),
            detail: "{}".into(),
        }];
        store.set_desired("a", &set, "t", 2).await.unwrap();
        assert_eq!(store.desired("a").await.unwrap(), Some(set));
    }

    #[tokio::test]
    async fn reported_plugins_follow_the_agent() {
        let (store, _dir) = test_store().await;
        let hb = |name: &str| {
            HashMap::from([
                ("name".to_owned(), name.to_owned()),
                ("pid".to_owned(), "42".to_owned()),
                ("state".to_owned(), "running".to_owned()),
            ])
        };
        store.plugin_heartbeat("a", &hb("p1"), 1).await.unwrap();
        store.plugin_heartbeat("a", &hb("p2"), 1).await.unwrap();
        store
            .plugins_present("a", &HashSet::from(["p2".to_owned()]))
            .await
            .unwrap();
        let r = store.reported_plugins(Some("a")).await.unwrap();
        assert_eq!(r["a"].len(), 1);
        assert_eq!((r["a"][0].name.as_str(), r["a"][0].pid), ("p2", Some(42)));
        // Losses add up, and a later heartbeat keeps the count.
        store.plugin_records_lost("a", "p2", 5, 2).await.unwrap();
        store.plugin_records_lost("a", "p2", 7, 3).await.unwrap();
        store.plugin_heartbeat("a", &hb("p2"), 4).await.unwrap();
        // A plugin not reported yet gets a row for its count.
        store.plugin_records_lost("a", "p3", 1, 4).await.unwrap();
        let r = store.reported_plugins(Some("a")).await.unwrap();
        let lost: Vec<(&str, i64)> = r["a"].iter().map(|p| (p.name.as_str(), p.lost_records)).collect();
        assert_eq!(lost, [("p2", 12), ("p3", 1)]);
    }
}
