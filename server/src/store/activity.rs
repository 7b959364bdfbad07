//! What an agent's page shows beyond its last heartbeat: a day of heartbeat
//! samples, its recent streams, its certificate.

use sqlx::Row;

use super::{Store, StoreError};

/// Streams kept per agent in `agent_sessions`.
pub const SESSIONS_PER_AGENT: i64 = 50;

/// One sample of an agent's heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Sample {
    /// When, Unix ms.
    pub at: i64,
    /// CPU, percent of one core.
    pub cpu: f64,
    /// Resident memory, bytes.
    pub rss: i64,
    /// Records sent per second.
    pub records_per_s: f64,
    /// Spool on disk, bytes.
    pub spool_bytes: i64,
}

/// One stream of an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// Opened at, Unix ms.
    pub connected_at: i64,
    /// Closed at, Unix ms; `None` while open, or when its instance died.
    pub disconnected_at: Option<i64>,
    /// The instance that held it.
    pub instance: String,
}

/// An agent's newest unrevoked certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRow {
    /// Serial, hex.
    pub serial: String,
    /// Issued at, Unix ms.
    pub issued_at: i64,
    /// Valid until, Unix ms.
    pub not_after: i64,
}

// Integer columns on both engines: hundredths and thousandths.
fn centi(v: f64) -> i64 {
    (v * 100.0).round() as i64
}
fn milli(v: f64) -> i64 {
    (v * 1000.0).round() as i64
}

impl Store {
    /// Stores samples, `(agent, sample)`, a few hundred to a statement; a sample
    /// an agent already has at the same time is kept.
    pub async fn save_samples(&self, samples: &[(String, Sample)]) -> Result<(), StoreError> {
        for chunk in super::batches(samples) {
            let sql = format!(
                "INSERT INTO agent_samples (agent_id, at, cpu_centi, rss, records_milli, spool_bytes) VALUES {} \
                 ON CONFLICT (agent_id, at) DO NOTHING",
                super::tuples(chunk.len(), 6)
            );
            // Only placeholders are generated; the values are bound.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (agent, s) in chunk {
                q = q
                    .bind(agent.clone())
                    .bind(s.at)
                    .bind(centi(s.cpu))
                    .bind(s.rss)
                    .bind(milli(s.records_per_s))
                    .bind(s.spool_bytes);
            }
            self.timed("save_samples", q.execute(&self.pool)).await?;
        }
        Ok(())
    }

    /// Deletes samples taken before `before`; returns how many.
    pub async fn prune_samples(&self, before: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM agent_samples WHERE at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// An agent's samples since `since`, oldest first.
    pub async fn samples(&self, agent_id: &str, since: i64) -> Result<Vec<Sample>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, cpu_centi, rss, records_milli, spool_bytes FROM agent_samples \
             WHERE agent_id = $1 AND at >= $2 ORDER BY at",
        )
        .bind(agent_id)
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let cpu: i64 = r.try_get("cpu_centi")?;
                let records: i64 = r.try_get("records_milli")?;
                Ok(Sample {
                    at: r.try_get("at")?,
                    cpu: cpu as f64 / 100.0,
                    rss: r.try_get("rss")?,
                    records_per_s: records as f64 / 1000.0,
                    spool_bytes: r.try_get("spool_bytes")?,
                })
            })
            .collect()
    }

    /// An agent's streams, newest first.
    pub async fn sessions(&self, agent_id: &str) -> Result<Vec<SessionRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT connected_at, disconnected_at, instance FROM agent_sessions WHERE agent_id = $1 \
             ORDER BY connected_at DESC LIMIT $2",
        )
        .bind(agent_id)
        .bind(SESSIONS_PER_AGENT)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SessionRow {
                    connected_at: r.try_get("connected_at")?,
                    disconnected_at: r.try_get("disconnected_at")?,
                    instance: r.try_get("instance")?,
                })
            })
            .collect()
    }

    /// An agent's newest certificate that is not revoked.
    pub async fn agent_certificate(&self, agent_id: &str) -> Result<Option<CertificateRow>, StoreError> {
        let row = sqlx::query(
            "SELECT serial, issued_at, not_after FROM certificates WHERE agent_id = $1 AND revoked_at IS NULL \
             ORDER BY issued_at DESC LIMIT 1",
        )
        .bind(agent_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(CertificateRow {
                serial: r.try_get("serial")?,
                issued_at: r.try_get("issued_at")?,
                not_after: r.try_get("not_after")?,
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AgentMeta;

    #[tokio::test]
    async fn samples_sessions_and_the_certificate_of_an_agent() {
        let (store, _dir) = crate::store::test_store().await;
        let s = |at: i64, cpu: f64| Sample {
            at,
            cpu,
            rss: 1 << 20,
            records_per_s: 2.5,
            spool_bytes: 4096,
        };
        let rows: Vec<(String, Sample)> = (0..300).map(|i| ("a".to_owned(), s(i * 1000, 1.25))).collect();
        store.save_samples(&rows).await.unwrap();
        // The same time again is kept as it was.
        store.save_samples(&[("a".into(), s(0, 99.0))]).await.unwrap();
        let got = store.samples("a", 100_000).await.unwrap();
        assert_eq!(got.len(), 200);
        assert_eq!(got[0], s(100_000, 1.25));
        assert_eq!(store.samples("a", 0).await.unwrap()[0].cpu, 1.25);
        assert_eq!(store.prune_samples(250_000).await.unwrap(), 250);
        assert_eq!(store.samples("a", 0).await.unwrap().len(), 50);

        // Streams: the newest 50 are kept; a new stream ends the one before it,
        // here or at another instance; a stream closes at its own instance only.
        let meta = AgentMeta::default();
        for i in 0..(SESSIONS_PER_AGENT + 5) {
            let instance = if i % 2 == 0 { "i1" } else { "i2" };
            store.agent_connected("a", &meta, 1000 + i, instance).await.unwrap();
        }
        let sessions = store.sessions("a").await.unwrap();
        assert_eq!(sessions.len() as i64, SESSIONS_PER_AGENT);
        let newest = 1000 + SESSIONS_PER_AGENT + 4;
        assert_eq!(
            (sessions[0].connected_at, sessions[0].instance.as_str()),
            (newest, "i1")
        );
        assert_eq!(sessions[0].disconnected_at, None);
        assert_eq!(
            sessions[1].disconnected_at,
            Some(newest),
            "replaced at the other instance"
        );
        store.agent_disconnected("a", 5000, "i2", newest - 1).await.unwrap();
        let open = store.sessions("a").await.unwrap()[0].disconnected_at;
        assert_eq!(open, None, "another instance's close does not end it");
        store.agent_disconnected("a", 6000, "i1", newest).await.unwrap();
        let sessions = store.sessions("a").await.unwrap();
        assert_eq!(sessions[0].disconnected_at, Some(6000));
        assert!(sessions.iter().all(|s| s.disconnected_at.is_some()));

        assert_eq!(store.agent_certificate("a").await.unwrap(), None);
        store.cert_issued("01", "a", 10, 100).await.unwrap();
        store.cert_issued("02", "a", 20, 200).await.unwrap();
        let cert = store.agent_certificate("a").await.unwrap().unwrap();
        assert_eq!((cert.serial.as_str(), cert.not_after), ("02", 200));
        store.agent_delete("a").await.unwrap();
        assert!(
            store.sessions("a").await.unwrap().is_empty(),
            "a deleted agent's streams go with it"
        );
        assert!(store.samples("a", 0).await.unwrap().is_empty(), "and its samples");
    }
}
