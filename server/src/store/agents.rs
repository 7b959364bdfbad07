//! Agents: identity, addresses, presence and the latest heartbeat.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, corrupt};

/// The agent's self-description from the `PackagedData` header. Stored as JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMeta {
    /// Host name.
    pub hostname: String,
    /// Agent version.
    pub version: String,
    /// Product name, `keel-agent` or `elkeid-agent`.
    pub product: String,
    /// Private IPv4 addresses.
    pub intranet_ipv4: Vec<String>,
    /// Public IPv4 addresses.
    pub extranet_ipv4: Vec<String>,
    /// Private IPv6 addresses.
    pub intranet_ipv6: Vec<String>,
    /// Public IPv6 addresses.
    pub extranet_ipv6: Vec<String>,
}

/// An agent as stored.
#[derive(Debug, Clone)]
pub struct AgentRow {
    /// Agent ID.
    pub id: String,
    /// The name a key database gave it at enrollment by key; empty otherwise.
    pub name: String,
    /// Header fields.
    pub meta: AgentMeta,
    /// First enrollment or connection, Unix ms.
    pub first_seen: i64,
    /// Last sign of life, Unix ms.
    pub last_seen: i64,
    /// Whether a stream is open now.
    pub online: bool,
    /// When the current or last stream opened, Unix ms.
    pub connected_at: Option<i64>,
    /// When the last heartbeat arrived, Unix ms.
    pub last_heartbeat: Option<i64>,
    /// Fields of the last heartbeat (data_type 1000).
    pub heartbeat: serde_json::Map<String, serde_json::Value>,
    /// Operator tags.
    pub tags: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Addresses {
    intranet_ipv4: Vec<String>,
    extranet_ipv4: Vec<String>,
    intranet_ipv6: Vec<String>,
    extranet_ipv6: Vec<String>,
}

fn addresses_json(meta: &AgentMeta) -> String {
    let a = Addresses {
        intranet_ipv4: meta.intranet_ipv4.clone(),
        extranet_ipv4: meta.extranet_ipv4.clone(),
        intranet_ipv6: meta.intranet_ipv6.clone(),
        extranet_ipv6: meta.extranet_ipv6.clone(),
    };
    serde_json::to_string(&a).unwrap_or_else(|_| "{}".into())
}

macro_rules! select_agents {
    ($tail:literal) => {
        concat!(
            "SELECT id, name, hostname, version, product, addresses, first_seen, last_seen, online, ",
            "connected_at, last_heartbeat, heartbeat FROM agents",
            $tail
        )
    };
}

fn from_row(row: &AnyRow) -> Result<AgentRow, StoreError> {
    let addresses: String = row.try_get("addresses")?;
    let a: Addresses = serde_json::from_str(&addresses).unwrap_or(Addresses {
        intranet_ipv4: vec![],
        extranet_ipv4: vec![],
        intranet_ipv6: vec![],
        extranet_ipv6: vec![],
    });
    let heartbeat: String = row.try_get("heartbeat")?;
    let online: i64 = row.try_get("online")?;
    Ok(AgentRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        meta: AgentMeta {
            hostname: row.try_get("hostname")?,
            version: row.try_get("version")?,
            product: row.try_get("product")?,
            intranet_ipv4: a.intranet_ipv4,
            extranet_ipv4: a.extranet_ipv4,
            intranet_ipv6: a.intranet_ipv6,
            extranet_ipv6: a.extranet_ipv6,
        },
        first_seen: row.try_get("first_seen")?,
        last_seen: row.try_get("last_seen")?,
        online: online != 0,
        connected_at: row.try_get("connected_at")?,
        last_heartbeat: row.try_get("last_heartbeat")?,
        heartbeat: serde_json::from_str(&heartbeat).map_err(corrupt("heartbeat"))?,
        tags: Vec::new(),
    })
}

impl Store {
    /// Records an enrollment: the agent exists from now on, offline until it connects.
    pub async fn agent_enrolled(&self, id: &str, hostname: &str, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO agents (id, hostname, first_seen, last_seen) VALUES ($1, $2, $3, $3) \
             ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, last_seen = excluded.last_seen",
        )
        .bind(id)
        .bind(hostname)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Registers an agent enrolled by key, with the ID and name its key database gave.
    pub async fn agent_key_enrolled(&self, id: &str, name: &str, hostname: &str, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO agents (id, name, hostname, first_seen, last_seen) VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (id) DO UPDATE SET name = excluded.name, hostname = excluded.hostname, \
             last_seen = excluded.last_seen",
        )
        .bind(id)
        .bind(name)
        .bind(hostname)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The IDs of agents registered under `name`.
    pub async fn agents_named(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT id FROM agents WHERE name = $1 ORDER BY id")
            .bind(name)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("id")?)).collect()
    }

    /// Marks the agent online with the header it sent first.
    pub async fn agent_connected(&self, id: &str, meta: &AgentMeta, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO agents (id, hostname, version, product, addresses, first_seen, last_seen, online, connected_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6, 1, $6) \
             ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, version = excluded.version, \
             product = excluded.product, addresses = excluded.addresses, last_seen = excluded.last_seen, \
             online = 1, connected_at = excluded.connected_at",
        )
        .bind(id)
        .bind(&meta.hostname)
        .bind(&meta.version)
        .bind(&meta.product)
        .bind(addresses_json(meta))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores a changed header.
    pub async fn agent_meta(&self, id: &str, meta: &AgentMeta, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agents SET hostname = $2, version = $3, product = $4, addresses = $5, last_seen = $6 WHERE id = $1",
        )
        .bind(id)
        .bind(&meta.hostname)
        .bind(&meta.version)
        .bind(&meta.product)
        .bind(addresses_json(meta))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks the agent offline.
    pub async fn agent_disconnected(&self, id: &str, now: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE agents SET online = 0, last_seen = $2 WHERE id = $1")
            .bind(id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Stores the fields of a heartbeat.
    pub async fn agent_heartbeat(
        &self,
        id: &str,
        fields: &HashMap<String, String>,
        now: i64,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(fields).map_err(corrupt("heartbeat"))?;
        sqlx::query("UPDATE agents SET heartbeat = $2, last_heartbeat = $3, last_seen = $3 WHERE id = $1")
            .bind(id)
            .bind(json)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// At start-up: no stream is open yet, whatever the last run left behind.
    pub async fn mark_all_offline(&self) -> Result<(), StoreError> {
        sqlx::query("UPDATE agents SET online = 0 WHERE online <> 0")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every agent, by ID.
    pub async fn list_agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        let rows = sqlx::query(select_agents!(" ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        let mut agents = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        let mut tags: HashMap<String, Vec<String>> = HashMap::new();
        for row in sqlx::query("SELECT agent_id, tag FROM agent_tags ORDER BY tag")
            .fetch_all(&self.pool)
            .await?
        {
            tags.entry(row.try_get("agent_id")?)
                .or_default()
                .push(row.try_get("tag")?);
        }
        for a in &mut agents {
            a.tags = tags.remove(&a.id).unwrap_or_default();
        }
        Ok(agents)
    }

    /// Replaces an agent's tags.
    pub async fn set_tags(&self, id: &str, tags: &[String]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM agent_tags WHERE agent_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let mut seen = std::collections::HashSet::new();
        for t in tags.iter().filter(|t| seen.insert(t.as_str())) {
            sqlx::query("INSERT INTO agent_tags (agent_id, tag) VALUES ($1, $2)")
                .bind(id)
                .bind(t)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Forgets an agent and everything kept about it (its certificates stay, revoked).
    pub async fn agent_delete(&self, id: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        const FORGET: [&str; 5] = [
            "DELETE FROM agent_tags WHERE agent_id = $1",
            "DELETE FROM agent_plugins WHERE agent_id = $1",
            "DELETE FROM agent_plugin_desired WHERE agent_id = $1",
            "DELETE FROM agent_plugin_sets WHERE agent_id = $1",
            "DELETE FROM stream_marks WHERE agent_id = $1",
        ];
        for sql in FORGET {
            sqlx::query(sql).bind(id).execute(&mut *tx).await?;
        }
        sqlx::query("DELETE FROM agents WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// One agent.
    pub async fn get_agent(&self, id: &str) -> Result<Option<AgentRow>, StoreError> {
        let Some(row) = sqlx::query(select_agents!(" WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let mut agent = from_row(&row)?;
        agent.tags = sqlx::query_scalar("SELECT tag FROM agent_tags WHERE agent_id = $1 ORDER BY tag")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        Ok(Some(agent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    #[tokio::test]
    async fn presence_and_heartbeat() {
        let (store, _dir) = test_store().await;
        let meta = AgentMeta {
            hostname: "h1".into(),
            version: "1.0".into(),
            intranet_ipv4: vec!["10.0.0.1".into()],
            ..Default::default()
        };
        store.agent_connected("a1", &meta, 1000).await.unwrap();
        let a = store.get_agent("a1").await.unwrap().unwrap();
        assert!(a.online);
        assert_eq!(a.meta, meta);
        assert_eq!(a.first_seen, 1000);
        store
            .agent_heartbeat("a1", &HashMap::from([("cpu".to_owned(), "0.1".to_owned())]), 2000)
            .await
            .unwrap();
        store.agent_disconnected("a1", 3000).await.unwrap();
        let a = store.get_agent("a1").await.unwrap().unwrap();
        assert!(!a.online);
        assert_eq!(a.last_heartbeat, Some(2000));
        assert_eq!(a.heartbeat["cpu"], "0.1");
        store.agent_connected("a1", &meta, 4000).await.unwrap();
        store.mark_all_offline().await.unwrap();
        let all = store.list_agents().await.unwrap();
        assert_eq!(all.len(), 1);
        assert!(!all[0].online);
        assert_eq!(all[0].first_seen, 1000, "reconnect must keep first_seen");
    }
}
