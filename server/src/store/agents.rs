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
    /// Whether a stream is open now, at a live instance.
    pub online: bool,
    /// The instance holding the stream while online.
    pub instance: Option<String>,
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

/// Every address, space-separated and lowercased, for search.
fn address_text(meta: &AgentMeta) -> String {
    [
        &meta.intranet_ipv4,
        &meta.extranet_ipv4,
        &meta.intranet_ipv6,
        &meta.extranet_ipv6,
    ]
    .into_iter()
    .flatten()
    .map(|a| a.to_lowercase())
    .collect::<Vec<_>>()
    .join(" ")
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

/// The agent columns, with `online` true only while the holding instance's
/// lease runs past `$1` (the first bind of every query that uses it).
macro_rules! select_agents {
    ($tail:literal) => {
        concat!(
            "SELECT a.id, a.name, a.hostname, a.version, a.product, a.addresses, a.first_seen, a.last_seen, ",
            "CASE WHEN a.online <> 0 AND EXISTS (SELECT 1 FROM instances i WHERE i.id = a.instance ",
            "AND i.lease_until > $1) THEN 1 ELSE 0 END AS live, ",
            "a.instance, a.connected_at, a.last_heartbeat, a.heartbeat FROM agents a",
            $tail
        )
    };
}

/// Which agents a page lists; all filters given must hold.
#[derive(Debug, Clone, Default)]
pub struct AgentQuery {
    /// Only agents that are (not) online.
    pub online: Option<bool>,
    /// Only agents of this version.
    pub version: Option<String>,
    /// Only agents with this tag.
    pub tag: Option<String>,
    /// Only agents whose host name contains this, ignoring ASCII case.
    pub hostname: Option<String>,
    /// Only agents running this plugin.
    pub plugin: Option<String>,
    /// Only agents whose ID, host name, addresses or a tag contain this,
    /// ignoring ASCII case.
    pub search: Option<String>,
    /// Only agents whose ID sorts after this (the cursor).
    pub after: Option<String>,
    /// At most this many.
    pub limit: i64,
}

/// `LIKE` pattern for "contains `s`", with `\` as the escape character.
fn contains_pattern(s: &str) -> String {
    let mut p = String::with_capacity(s.len() + 2);
    p.push('%');
    for c in s.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// The filters of [`AgentQuery`], binds `$2`..`$8` (`$1` is the time).
const AGENT_FILTERS: &str = " WHERE ($2 = '' OR a.id > $2) \
     AND ($3 = '' OR a.version = $3) \
     AND ($4 = '' OR EXISTS (SELECT 1 FROM agent_tags t WHERE t.agent_id = a.id AND t.tag = $4)) \
     AND ($5 = '' OR LOWER(a.hostname) LIKE $5 ESCAPE '\\') \
     AND ($6 = '' OR EXISTS (SELECT 1 FROM agent_plugins p WHERE p.agent_id = a.id AND p.name = $6)) \
     AND ($7 < 0 OR $7 = CASE WHEN a.online <> 0 AND EXISTS (SELECT 1 FROM instances i \
         WHERE i.id = a.instance AND i.lease_until > $1) THEN 1 ELSE 0 END) \
     AND ($8 = '' OR LOWER(a.id) LIKE $8 ESCAPE '\\' OR LOWER(a.hostname) LIKE $8 ESCAPE '\\' \
         OR a.address_text LIKE $8 ESCAPE '\\' \
         OR a.id IN (SELECT t.agent_id FROM agent_tags t WHERE LOWER(t.tag) LIKE $8 ESCAPE '\\'))";

fn from_row(row: &AnyRow) -> Result<AgentRow, StoreError> {
    let addresses: String = row.try_get("addresses")?;
    let a: Addresses = serde_json::from_str(&addresses).unwrap_or(Addresses {
        intranet_ipv4: vec![],
        extranet_ipv4: vec![],
        intranet_ipv6: vec![],
        extranet_ipv6: vec![],
    });
    let heartbeat: String = row.try_get("heartbeat")?;
    let online: i64 = row.try_get("live")?;
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
        instance: if online != 0 { row.try_get("instance")? } else { None },
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

    /// Marks the agent online at `instance` with the header it sent first.
    pub async fn agent_connected(
        &self,
        id: &str,
        meta: &AgentMeta,
        now: i64,
        instance: &str,
    ) -> Result<(), StoreError> {
        self.timed("agent_connected", sqlx::query(
            "INSERT INTO agents (id, hostname, version, product, addresses, first_seen, last_seen, online, connected_at, instance, address_text) \
             VALUES ($1, $2, $3, $4, $5, $6, $6, 1, $6, $7, $8) \
             ON CONFLICT (id) DO UPDATE SET hostname = excluded.hostname, version = excluded.version, \
             product = excluded.product, addresses = excluded.addresses, last_seen = excluded.last_seen, \
             online = 1, connected_at = excluded.connected_at, instance = excluded.instance, address_text = excluded.address_text",
        )
        .bind(id)
        .bind(&meta.hostname)
        .bind(&meta.version)
        .bind(&meta.product)
        .bind(addresses_json(meta))
        .bind(now)
        .bind(instance)
        .bind(address_text(meta))
        .execute(&self.pool))
        .await?;
        // Its streams: any still open ended now (replaced by this one, here or
        // at another instance); this one begins; the oldest beyond the newest
        // 50 go.
        sqlx::query(
            "UPDATE agent_sessions SET disconnected_at = $2 WHERE agent_id = $1 AND disconnected_at IS NULL \
             AND connected_at < $2",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "INSERT INTO agent_sessions (agent_id, connected_at, instance) VALUES ($1, $2, $3) \
             ON CONFLICT (agent_id, connected_at) DO NOTHING",
        )
        .bind(id)
        .bind(now)
        .bind(instance)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "DELETE FROM agent_sessions WHERE agent_id = $1 AND connected_at <= (SELECT connected_at FROM agent_sessions \
             WHERE agent_id = $1 ORDER BY connected_at DESC LIMIT 1 OFFSET $2)",
        )
        .bind(id)
        .bind(super::activity::SESSIONS_PER_AGENT)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores a changed header.
    pub async fn agent_meta(&self, id: &str, meta: &AgentMeta, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agents SET hostname = $2, version = $3, product = $4, addresses = $5, last_seen = $6, \
             address_text = $7 WHERE id = $1",
        )
        .bind(id)
        .bind(&meta.hostname)
        .bind(&meta.version)
        .bind(&meta.product)
        .bind(addresses_json(meta))
        .bind(now)
        .bind(address_text(meta))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Ends the agent's stream that began at `connected_at` at `instance`, and
    /// marks the agent offline if that stream is still the one stored: a stream
    /// that ended late does not undo a reconnection, to another instance or to
    /// this one (whose write may land first). Two streams of one agent cannot
    /// begin in the same millisecond: each needs its own TLS handshake and first
    /// batch.
    pub async fn agent_disconnected(
        &self,
        id: &str,
        now: i64,
        instance: &str,
        connected_at: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agent_sessions SET disconnected_at = $2 WHERE agent_id = $1 AND instance = $3 \
             AND connected_at = $4 AND disconnected_at IS NULL",
        )
        .bind(id)
        .bind(now)
        .bind(instance)
        .bind(connected_at)
        .execute(&self.pool)
        .await?;
        self.timed(
            "agent_disconnected",
            sqlx::query(
                "UPDATE agents SET online = 0, instance = NULL, last_seen = $2 \
                 WHERE id = $1 AND instance = $3 AND connected_at = $4",
            )
            .bind(id)
            .bind(now)
            .bind(instance)
            .bind(connected_at)
            .execute(&self.pool),
        )
        .await?;
        Ok(())
    }

    /// Stores heartbeats, `(agent, fields as JSON, arrival)`, a few hundred rows
    /// to a statement.
    pub async fn agent_heartbeats(&self, beats: &[(String, String, i64)]) -> Result<(), StoreError> {
        for chunk in super::batches(beats) {
            let sql = format!(
                "UPDATE agents SET heartbeat = v.column2, last_heartbeat = v.column3, last_seen = v.column3 \
                 FROM (VALUES {}) AS v WHERE agents.id = v.column1",
                super::tuples(chunk.len(), 3)
            );
            // Only placeholders are generated; the values are bound.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (id, json, at) in chunk {
                q = q.bind(id.clone()).bind(json.clone()).bind(*at);
            }
            self.timed("agent_heartbeats", q.execute(&self.pool)).await?;
        }
        Ok(())
    }

    /// Every agent, by ID.
    pub async fn list_agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        let rows = sqlx::query(select_agents!(" ORDER BY a.id"))
            .bind(keel_common::time::now_ms())
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

    /// One page of agents by ID, and how many match the filters in all.
    pub async fn agents_page(&self, q: &AgentQuery, now: i64) -> Result<(Vec<AgentRow>, i64), StoreError> {
        let online = q.online.map_or(-1_i64, i64::from);
        let hostname = q.hostname.as_deref().map(contains_pattern).unwrap_or_default();
        let text = |o: &Option<String>| o.clone().unwrap_or_default();
        let search = q.search.as_deref().map(contains_pattern).unwrap_or_default();
        let page_sql = format!("{}{AGENT_FILTERS} ORDER BY a.id LIMIT $9", select_agents!(""));
        // Built from constants only; every value is bound.
        let rows = self
            .timed(
                "agents_page",
                sqlx::query(sqlx::AssertSqlSafe(page_sql))
                    .bind(now)
                    .bind(text(&q.after))
                    .bind(text(&q.version))
                    .bind(text(&q.tag))
                    .bind(&hostname)
                    .bind(text(&q.plugin))
                    .bind(online)
                    .bind(&search)
                    .bind(q.limit)
                    .fetch_all(&self.pool),
            )
            .await?;
        let mut agents = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        let count_sql = format!("SELECT COUNT(*) FROM agents a{AGENT_FILTERS}");
        let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count_sql))
            .bind(now)
            .bind("")
            .bind(text(&q.version))
            .bind(text(&q.tag))
            .bind(&hostname)
            .bind(text(&q.plugin))
            .bind(online)
            .bind(&search)
            .fetch_one(&self.pool)
            .await?;
        if let (Some(first), Some(last)) = (agents.first(), agents.last()) {
            let rows = sqlx::query(
                "SELECT agent_id, tag FROM agent_tags WHERE agent_id >= $1 AND agent_id <= $2 ORDER BY tag",
            )
            .bind(&first.id)
            .bind(&last.id)
            .fetch_all(&self.pool)
            .await?;
            let mut tags: HashMap<String, Vec<String>> = HashMap::new();
            for row in rows {
                tags.entry(row.try_get("agent_id")?)
                    .or_default()
                    .push(row.try_get("tag")?);
            }
            for a in &mut agents {
                a.tags = tags.remove(&a.id).unwrap_or_default();
            }
        }
        Ok((agents, total))
    }

    /// How many agents are registered, and how many of them have a stream at a
    /// live instance.
    pub async fn agent_counts(&self, now: i64) -> Result<(i64, i64), StoreError> {
        let row = self
            .timed(
                "agent_counts",
                sqlx::query(
                    "SELECT COUNT(*) AS known, COALESCE(SUM(CASE WHEN a.online <> 0 AND EXISTS (SELECT 1 FROM instances i \
                     WHERE i.id = a.instance AND i.lease_until > $1) THEN 1 ELSE 0 END), 0) AS online FROM agents a",
                )
                .bind(now)
                .fetch_one(&self.pool),
            )
            .await?;
        Ok((row.try_get("known")?, row.try_get("online")?))
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
        const FORGET: [&str; 7] = [
            "DELETE FROM agent_tags WHERE agent_id = $1",
            "DELETE FROM agent_samples WHERE agent_id = $1",
            "DELETE FROM agent_sessions WHERE agent_id = $1",
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
        let Some(row) = sqlx::query(select_agents!(" WHERE a.id = $2"))
            .bind(keel_common::time::now_ms())
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
        let lease = keel_common::time::now_ms() + 60_000;
        store
            .instance_renew(&crate::store::InstanceRow {
                id: "i1".into(),
                started_at: 1,
                lease_until: lease,
                grpc: String::new(),
                http: String::new(),
                agents: 0,
            })
            .await
            .unwrap();
        store.agent_connected("a1", &meta, 1000, "i1").await.unwrap();
        let a = store.get_agent("a1").await.unwrap().unwrap();
        assert!(a.online);
        assert_eq!(a.meta, meta);
        assert_eq!(a.first_seen, 1000);
        store
            .agent_heartbeats(&[
                ("a1".into(), r#"{"cpu":"0.1"}"#.into(), 2000),
                ("nobody".into(), "{}".into(), 2000),
            ])
            .await
            .unwrap();
        store.agent_disconnected("a1", 3000, "i1", 1000).await.unwrap();
        let a = store.get_agent("a1").await.unwrap().unwrap();
        assert!(!a.online);
        assert_eq!(a.last_heartbeat, Some(2000));
        assert_eq!(a.heartbeat["cpu"], "0.1");
        store.agent_connected("a1", &meta, 4000, "i1").await.unwrap();
        // Reconnected to the same instance, the new stream's write landing before
        // the old one's close: the close ends the old stream only.
        store.agent_connected("a1", &meta, 4500, "i1").await.unwrap();
        store.agent_disconnected("a1", 4600, "i1", 4000).await.unwrap();
        let a = store.get_agent("a1").await.unwrap().unwrap();
        assert!(a.online, "the newer stream stays online");
        assert_eq!(a.connected_at, Some(4500));
        let newest = &store.sessions("a1").await.unwrap()[0];
        assert_eq!((newest.connected_at, newest.disconnected_at), (4500, None));
        store.instance_leave("i1", 5000).await.unwrap();
        let all = store.list_agents().await.unwrap();
        assert_eq!(all.len(), 1);
        assert!(!all[0].online);
        assert_eq!(all[0].first_seen, 1000, "reconnect must keep first_seen");
    }

    #[tokio::test]
    async fn pages_follow_the_cursor_and_filters_hold_on_every_page() {
        let (store, _dir) = test_store().await;
        let now = keel_common::time::now_ms();
        store
            .instance_renew(&crate::store::InstanceRow {
                id: "live".into(),
                started_at: 1,
                lease_until: now + 60_000,
                grpc: String::new(),
                http: String::new(),
                agents: 0,
            })
            .await
            .unwrap();
        for i in 0..25 {
            let meta = AgentMeta {
                hostname: if i % 2 == 0 {
                    format!("Web-{i}")
                } else {
                    format!("db_{i}")
                },
                version: if i < 20 { "1.0".into() } else { "2.0".into() },
                intranet_ipv4: if i == 7 { vec!["10.9.8.7".into()] } else { Vec::new() },
                ..Default::default()
            };
            // Odd agents are held by an instance whose lease has passed.
            let instance = if i % 2 == 0 { "live" } else { "dead" };
            store
                .agent_connected(&format!("a{i:02}"), &meta, 1, instance)
                .await
                .unwrap();
        }
        store.set_tags("a04", &["edge".into()]).await.unwrap();
        let page = |q: AgentQuery| {
            let store = store.clone();
            async move { store.agents_page(&q, now).await.unwrap() }
        };
        // Cursor paging: 10, 10, 5, no overlap, total on each.
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (rows, total) = page(AgentQuery {
                after: after.clone(),
                limit: 10,
                ..Default::default()
            })
            .await;
            assert_eq!(total, 25);
            if rows.is_empty() {
                break;
            }
            after = rows.last().map(|a| a.id.clone());
            seen.extend(rows.into_iter().map(|a| a.id));
        }
        assert_eq!(seen.len(), 25);
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "ordered by ID");
        // Online follows the holder's lease.
        let (rows, total) = page(AgentQuery {
            online: Some(true),
            limit: 100,
            ..Default::default()
        })
        .await;
        assert_eq!(total, 13);
        assert!(rows.iter().all(|a| a.online && a.instance.as_deref() == Some("live")));
        let (_, offline) = page(AgentQuery {
            online: Some(false),
            limit: 100,
            ..Default::default()
        })
        .await;
        assert_eq!(offline, 12);
        // Host name contains, ignoring case; LIKE's wildcards are literal.
        let (rows, total) = page(AgentQuery {
            hostname: Some("WEB".into()),
            version: Some("2.0".into()),
            limit: 100,
            ..Default::default()
        })
        .await;
        assert_eq!((total, rows.len()), (3, 3), "Web-20, Web-22, Web-24");
        let (_, underscore) = page(AgentQuery {
            hostname: Some("_".into()),
            limit: 100,
            ..Default::default()
        })
        .await;
        assert_eq!(underscore, 12, "only the db_ hosts have an underscore");
        let (rows, _) = page(AgentQuery {
            tag: Some("edge".into()),
            limit: 100,
            ..Default::default()
        })
        .await;
        assert_eq!(rows.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["a04"]);
        assert_eq!(rows[0].tags, ["edge"]);
        // One search over IDs, host names, addresses and tags, ignoring case.
        let search = |s: &str| {
            let q = AgentQuery {
                search: Some(s.into()),
                limit: 100,
                ..Default::default()
            };
            let page = page(q);
            async move {
                let (rows, total) = page.await;
                assert_eq!(total, rows.len() as i64);
                rows.into_iter().map(|a| a.id).collect::<Vec<_>>()
            }
        };
        assert_eq!(search("A1").await.len(), 10, "a10 to a19 by ID");
        assert_eq!(search("EDG").await, ["a04"], "by tag");
        assert_eq!(search("10.9.8").await, ["a07"], "by address");
        assert_eq!(search("web-2").await, ["a02", "a20", "a22", "a24"], "by host name");
        assert!(search("%").await.is_empty(), "wildcards are literal");
    }
}
