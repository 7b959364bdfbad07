//! Instances and their leases, which instance holds which agent's stream, the
//! challenges of enrollment by key and the audit jobs waiting for tunnels: what
//! several keel-server processes on one database share.

use sqlx::Row;

use super::{Store, StoreError};

/// A live instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRow {
    /// Instance ID.
    pub id: String,
    /// When it started, Unix ms.
    pub started_at: i64,
    /// Its lease runs until then, Unix ms.
    pub lease_until: i64,
    /// Where agents reach its gRPC endpoint.
    pub grpc: String,
    /// Its HTTP endpoint.
    pub http: String,
    /// Streams it holds, as of its last renewal.
    pub agents: i64,
}

/// An audit job waiting for its tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelJobRow {
    /// The job.
    pub job: String,
    /// The agent it was sent to.
    pub agent_id: String,
    /// Hex SHA-256 of its one-time token.
    pub token_sha256: String,
    /// The instance waiting for the outcome.
    pub instance: String,
    /// `host:port`.
    pub target: String,
    /// What the tunnel carries: an `inventory::Probe`, as JSON.
    pub probe: String,
    /// Unix ms after which nobody waits.
    pub expires_at: i64,
}

impl Store {
    /// Registers or renews an instance's lease.
    pub async fn instance_renew(&self, row: &InstanceRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO instances (id, started_at, lease_until, grpc, http, agents) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET lease_until = excluded.lease_until, grpc = excluded.grpc, \
             http = excluded.http, agents = excluded.agents",
        )
        .bind(&row.id)
        .bind(row.started_at)
        .bind(row.lease_until)
        .bind(&row.grpc)
        .bind(&row.http)
        .bind(row.agents)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// An instance stops: its lease ends and its agents are offline.
    pub async fn instance_leave(&self, id: &str, now: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE agent_sessions SET disconnected_at = $2 WHERE instance = $1 AND disconnected_at IS NULL")
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE agents SET online = 0, instance = NULL, last_seen = $2 WHERE instance = $1")
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM tunnel_jobs WHERE instance = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forgets instances whose lease ended before `before`, and sets the agents
    /// they held offline. Returns how many went.
    pub async fn instances_reap(&self, before: i64) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE agents SET online = 0, instance = NULL WHERE instance IN \
             (SELECT id FROM instances WHERE lease_until < $1)",
        )
        .bind(before)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM tunnel_jobs WHERE instance IN (SELECT id FROM instances WHERE lease_until < $1)")
            .bind(before)
            .execute(&mut *tx)
            .await?;
        let gone = sqlx::query("DELETE FROM instances WHERE lease_until < $1")
            .bind(before)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(gone)
    }

    /// Instances whose lease runs past `now`, those holding the fewest agents first.
    pub async fn live_instances(&self, now: i64) -> Result<Vec<InstanceRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, started_at, lease_until, grpc, http, agents FROM instances \
             WHERE lease_until > $1 ORDER BY agents, id",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(InstanceRow {
                    id: r.try_get("id")?,
                    started_at: r.try_get("started_at")?,
                    lease_until: r.try_get("lease_until")?,
                    grpc: r.try_get("grpc")?,
                    http: r.try_get("http")?,
                    agents: r.try_get("agents")?,
                })
            })
            .collect()
    }

    /// The live instance holding the agent's stream, if any.
    pub async fn agent_holder(&self, agent_id: &str, now: i64) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT a.instance FROM agents a JOIN instances i ON i.id = a.instance \
             WHERE a.id = $1 AND a.online <> 0 AND i.lease_until > $2",
        )
        .bind(agent_id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Stores a challenge nonce's hash, unless `max` are outstanding. Expired ones
    /// are dropped first. Returns whether it was stored.
    pub async fn challenge_add(
        &self,
        nonce_sha256: &str,
        expires_at: i64,
        now: i64,
        max: usize,
    ) -> Result<bool, StoreError> {
        sqlx::query("DELETE FROM enroll_challenges WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        let outstanding: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM enroll_challenges")
            .fetch_one(&self.pool)
            .await?;
        if usize::try_from(outstanding).unwrap_or(usize::MAX) >= max {
            return Ok(false);
        }
        sqlx::query("INSERT INTO enroll_challenges (nonce_sha256, expires_at) VALUES ($1, $2)")
            .bind(nonce_sha256)
            .bind(expires_at)
            .execute(&self.pool)
            .await?;
        Ok(true)
    }

    /// Spends a challenge: true once, while it has not expired, on any instance.
    pub async fn challenge_spend(&self, nonce_sha256: &str, now: i64) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM enroll_challenges WHERE nonce_sha256 = $1 AND expires_at > $2")
            .bind(nonce_sha256)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Announces an audit job, unless `max` of this instance's are waiting.
    pub async fn tunnel_job_add(&self, j: &TunnelJobRow, now: i64, max: usize) -> Result<bool, StoreError> {
        sqlx::query("DELETE FROM tunnel_jobs WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        let waiting: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tunnel_jobs WHERE instance = $1")
            .bind(&j.instance)
            .fetch_one(&self.pool)
            .await?;
        if usize::try_from(waiting).unwrap_or(usize::MAX) >= max {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO tunnel_jobs (job, agent_id, token_sha256, instance, target, probe, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&j.job)
        .bind(&j.agent_id)
        .bind(&j.token_sha256)
        .bind(&j.instance)
        .bind(&j.target)
        .bind(&j.probe)
        .bind(j.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(true)
    }

    /// A waiting job, if it has not expired.
    pub async fn tunnel_job(&self, job: &str, now: i64) -> Result<Option<TunnelJobRow>, StoreError> {
        let row = sqlx::query(
            "SELECT job, agent_id, token_sha256, instance, target, probe, expires_at FROM tunnel_jobs \
             WHERE job = $1 AND expires_at > $2",
        )
        .bind(job)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(TunnelJobRow {
                job: r.try_get("job")?,
                agent_id: r.try_get("agent_id")?,
                token_sha256: r.try_get("token_sha256")?,
                instance: r.try_get("instance")?,
                target: r.try_get("target")?,
                probe: r.try_get("probe")?,
                expires_at: r.try_get("expires_at")?,
            })
        })
        .transpose()
    }

    /// Takes a waiting job: true for exactly one caller.
    pub async fn tunnel_job_take(&self, job: &str) -> Result<bool, StoreError> {
        let r = sqlx::query("DELETE FROM tunnel_jobs WHERE job = $1")
            .bind(job)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AgentMeta, test_store};

    fn instance(id: &str, lease_until: i64, agents: i64) -> InstanceRow {
        InstanceRow {
            id: id.into(),
            started_at: 1,
            lease_until,
            grpc: format!("{id}:6751"),
            http: String::new(),
            agents,
        }
    }

    #[tokio::test]
    async fn an_agent_is_held_only_while_its_instance_has_a_lease() {
        let (store, _dir) = test_store().await;
        store.instance_renew(&instance("i1", 10_000, 5)).await.unwrap();
        store.instance_renew(&instance("i2", 10_000, 1)).await.unwrap();
        store
            .agent_connected("a1", &AgentMeta::default(), 100, "i1")
            .await
            .unwrap();
        assert_eq!(store.agent_holder("a1", 5_000).await.unwrap().as_deref(), Some("i1"));
        assert_eq!(store.agent_holder("a1", 10_001).await.unwrap(), None, "lease passed");
        let live: Vec<_> = store
            .live_instances(5_000)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(live, ["i2", "i1"], "fewest agents first");
        // Reconnected elsewhere: the old instance's disconnect changes nothing.
        store
            .agent_connected("a1", &AgentMeta::default(), 200, "i2")
            .await
            .unwrap();
        store.agent_disconnected("a1", 300, "i1", 100).await.unwrap();
        assert_eq!(store.agent_holder("a1", 5_000).await.unwrap().as_deref(), Some("i2"));
        // i1 leaves: i2's agent stays; i2 reaped: offline.
        store.instance_leave("i1", 400).await.unwrap();
        assert_eq!(store.agent_holder("a1", 5_000).await.unwrap().as_deref(), Some("i2"));
        assert_eq!(store.instances_reap(10_001).await.unwrap(), 1);
        let a = store.get_agent("a1").await.unwrap().unwrap();
        assert!(!a.online);
    }

    #[tokio::test]
    async fn challenges_are_spent_once_and_bounded() {
        let (store, _dir) = test_store().await;
        assert!(store.challenge_add("n1", 1_000, 0, 2).await.unwrap());
        assert!(store.challenge_add("n2", 1_000, 0, 2).await.unwrap());
        assert!(!store.challenge_add("n3", 1_000, 0, 2).await.unwrap(), "bounded");
        assert!(store.challenge_spend("n1", 10).await.unwrap());
        assert!(!store.challenge_spend("n1", 10).await.unwrap(), "spent once");
        assert!(!store.challenge_spend("n2", 1_000).await.unwrap(), "expired");
        assert!(
            store.challenge_add("n3", 3_000, 2_000, 2).await.unwrap(),
            "expired ones make room"
        );
    }

    #[tokio::test]
    async fn a_tunnel_job_is_taken_once() {
        let (store, _dir) = test_store().await;
        let j = TunnelJobRow {
            job: "j1".into(),
            agent_id: "a1".into(),
            token_sha256: "00".into(),
            instance: "i1".into(),
            target: "db:443".into(),
            probe: r#""handshake""#.into(),
            expires_at: 1_000,
        };
        assert!(store.tunnel_job_add(&j, 0, 1).await.unwrap());
        let other = TunnelJobRow {
            job: "j2".into(),
            ..j.clone()
        };
        assert!(
            !store.tunnel_job_add(&other, 0, 1).await.unwrap(),
            "bounded per instance"
        );
        assert_eq!(store.tunnel_job("j1", 10).await.unwrap(), Some(j));
        assert_eq!(store.tunnel_job("j1", 1_000).await.unwrap(), None, "expired");
        assert!(store.tunnel_job_take("j1").await.unwrap());
        assert!(!store.tunnel_job_take("j1").await.unwrap());
    }
}
