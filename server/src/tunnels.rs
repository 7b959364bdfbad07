//! Proxy audit jobs waiting for their tunnels.
//!
//! A job is announced with [`expect`] before its 6100 task is sent: the job ID,
//! the agent it was sent to, the target, the instance waiting, and the SHA-256 of
//! a one-time token that only the task carries, in the shared store. A tunnel
//! endpoint ([`crate::tunnel`]) of any instance [`claim`]s the job for a preface
//! only if it is waiting, the token matches, and the certificate's agent is the
//! job's agent. A job is claimed at most once. A job of this instance gets the
//! stream in process; another instance's job is run where its tunnel landed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::server::TlsStream;
use tracing::warn;

use crate::cluster::Cluster;
use crate::store::{Store, TunnelJobRow};

/// A tunnel: the TLS stream from the agent, now a byte pipe to the target.
pub type Tunnel = BufReader<TlsStream<TcpStream>>;

/// Jobs of this instance waiting for their tunnels, to hand a tunnel that lands
/// here over in process. What a job is (its agent, token and target) is in the
/// shared store, so a tunnel landing on another instance is checked the same way.
#[derive(Debug)]
pub struct Tunnels {
    local: Mutex<HashMap<String, oneshot::Sender<Tunnel>>>,
    max: usize,
    /// Each agent's proxy job slots, while someone holds them.
    slots: Mutex<HashMap<String, std::sync::Weak<tokio::sync::Semaphore>>>,
    per_agent: usize,
}

/// What a waiting job gets: its tunnel here, or the outcome of the job run by
/// the instance its tunnel reached.
#[derive(Debug)]
pub struct TunnelWait {
    /// The tunnel, when it lands on this instance.
    pub local: oneshot::Receiver<Tunnel>,
    /// The outcome published by another instance, in a cluster.
    pub remote: Option<async_nats::Subscriber>,
}

/// Why a tunnel was refused (the text is the `ERR` line and the log's reason).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    /// Not `KEEL-TUNNEL/1 <job> <token>`.
    #[error("not a tunnel preface")]
    Preface,
    /// No such job waiting (unknown, finished or claimed).
    #[error("no job {0} is waiting")]
    Unknown(String),
    /// The token is wrong.
    #[error("wrong token for job {0}")]
    Token(String),
    /// Another agent's certificate.
    #[error("job {job} was sent to agent {expected}, not {got}")]
    Agent {
        /// The job.
        job: String,
        /// The agent it was sent to.
        expected: String,
        /// The certificate's agent.
        got: String,
    },
    /// The job's instance cannot be told its outcome.
    #[error("job {job} belongs to instance {instance}, which this instance cannot reach (cluster.nats_url)")]
    Unroutable {
        /// The job.
        job: String,
        /// The instance waiting for it.
        instance: String,
    },
    /// The registry failed.
    #[error("registry unavailable")]
    Registry,
}

/// A claimed job: handed over here, or run here for another instance.
#[derive(Debug)]
pub(crate) enum Claimed {
    /// A job of this instance: the tunnel goes to it in process.
    Local(oneshot::Sender<Tunnel>),
    /// Another instance's job, run here.
    Remote(TunnelJobRow),
}

fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Tunnels {
    /// An empty registry; each instance has at most `max` jobs waiting, and at
    /// most `per_agent` running on one agent.
    pub fn new(max: usize, per_agent: usize) -> Self {
        Tunnels {
            local: Mutex::new(HashMap::new()),
            max,
            slots: Mutex::new(HashMap::new()),
            per_agent: per_agent.max(1),
        }
    }

    /// Takes one of `agent_id`'s job slots, waiting while all are taken: the
    /// agent's proxy plugin refuses jobs past its `max_jobs`.
    pub async fn job_slot(&self, agent_id: &str) -> tokio::sync::OwnedSemaphorePermit {
        let slots = {
            let mut all = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match all.get(agent_id).and_then(std::sync::Weak::upgrade) {
                Some(s) => s,
                None => {
                    // Agents nobody scans any more are forgotten as new ones come.
                    all.retain(|_, s| s.strong_count() > 0);
                    let s = Arc::new(tokio::sync::Semaphore::new(self.per_agent));
                    all.insert(agent_id.to_owned(), Arc::downgrade(&s));
                    s
                }
            }
        };
        slots
            .acquire_owned()
            .await
            .unwrap_or_else(|_| unreachable!("job slots are never closed"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Tunnel>>> {
        self.local.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A job to announce: where `target` is to be reached through `agent_id`'s
/// tunnel, for the holder of `token`, within `wait`, to ask it `probe`.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a, P> {
    /// The job's ID.
    pub job: &'a str,
    /// The agent whose proxy plugin is to connect.
    pub agent_id: &'a str,
    /// The one-time token only the job's task carries.
    pub token: &'a str,
    /// `host:port` to reach.
    pub target: &'a str,
    /// What the instance that runs the job asks the target.
    pub probe: &'a P,
    /// How long the tunnel may take to come.
    pub wait: Duration,
}

/// Announces a job, in the shared store and to this instance's waiting jobs.
pub async fn expect(
    store: &Store,
    cluster: &Cluster,
    tunnels: &Tunnels,
    job: &Expected<'_, impl serde::Serialize>,
) -> Result<TunnelWait, String> {
    let Expected {
        job,
        agent_id,
        token,
        target,
        probe,
        wait,
    } = *job;
    let remote = match cluster.nats() {
        Some(nats) => Some(
            cluster
                .subscribe(nats, cluster.tunnel_subject(job))
                .await
                .map_err(|e| format!("cannot wait for the job's outcome: {e}"))?,
        ),
        None => None,
    };
    let now = keel_common::time::now_ms();
    let row = TunnelJobRow {
        job: job.to_owned(),
        agent_id: agent_id.to_owned(),
        token_sha256: token_digest(token),
        instance: cluster.instance.clone(),
        target: target.to_owned(),
        probe: serde_json::to_string(probe).map_err(|e| e.to_string())?,
        expires_at: now.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
    };
    let (tx, rx) = oneshot::channel();
    tunnels.lock().insert(job.to_owned(), tx);
    match store.tunnel_job_add(&row, now, tunnels.max).await {
        Ok(true) => Ok(TunnelWait { local: rx, remote }),
        Ok(false) => {
            tunnels.lock().remove(job);
            Err("busy: too many jobs are waiting for their tunnels (tunnel.max_pending)".into())
        }
        Err(e) => {
            tunnels.lock().remove(job);
            Err(format!("registry: {e}"))
        }
    }
}

/// Forgets a job (it ended, or gave up waiting).
pub async fn forget(store: &Store, tunnels: &Tunnels, job: &str) {
    tunnels.lock().remove(job);
    if let Err(e) = store.tunnel_job_take(job).await {
        warn!(%job, error = %e, "cannot forget a tunnel job");
    }
}

/// Takes a waiting job for a preface from `agent_id`'s certificate. A wrong
/// token or agent leaves the job waiting for the right one.
pub(crate) async fn claim(
    store: &Store,
    tunnels: &Tunnels,
    instance: &str,
    routes: bool,
    preface: &str,
    agent_id: &str,
) -> Result<Claimed, Refused> {
    let mut parts = preface.trim_end_matches(['\r', '\n']).split(' ');
    let (Some("KEEL-TUNNEL/1"), Some(job), Some(token), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refused::Preface);
    };
    let registry = |e: crate::store::StoreError| {
        warn!(error = %e, "tunnel claim: registry failed");
        Refused::Registry
    };
    let now = keel_common::time::now_ms();
    let row = store
        .tunnel_job(job, now)
        .await
        .map_err(registry)?
        .ok_or_else(|| Refused::Unknown(job.to_owned()))?;
    // Hashes of a random token: comparing them leaks nothing useful.
    if token_digest(token) != row.token_sha256 {
        return Err(Refused::Token(job.to_owned()));
    }
    if row.agent_id != agent_id {
        return Err(Refused::Agent {
            job: job.to_owned(),
            expected: row.agent_id,
            got: agent_id.to_owned(),
        });
    }
    if row.instance != instance && !routes {
        return Err(Refused::Unroutable {
            job: job.to_owned(),
            instance: row.instance,
        });
    }
    if !store.tunnel_job_take(job).await.map_err(registry)? {
        return Err(Refused::Unknown(job.to_owned()));
    }
    if row.instance == instance {
        return tunnels
            .lock()
            .remove(job)
            .map(Claimed::Local)
            .ok_or_else(|| Refused::Unknown(job.to_owned()));
    }
    Ok(Claimed::Remote(row))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn waiting(store: &Store, tunnels: &Tunnels, job: &str, agent: &str, token: &str, instance: &str) {
        let row = TunnelJobRow {
            job: job.into(),
            agent_id: agent.into(),
            token_sha256: token_digest(token),
            instance: instance.into(),
            target: "db:443".into(),
            probe: r#""handshake""#.into(),
            expires_at: keel_common::time::now_ms() + 60_000,
        };
        assert!(store.tunnel_job_add(&row, 0, 10).await.unwrap());
        let (tx, _rx) = oneshot::channel();
        tunnels.lock().insert(job.into(), tx);
    }

    #[tokio::test]
    async fn a_job_is_claimed_once_with_its_token_by_its_agent() {
        let (store, _dir) = crate::store::test_store().await;
        let t = Tunnels::new(2, 8);
        let token = "ab".repeat(32);
        waiting(&store, &t, "j1", "agent-1", &token, "me").await;
        let claim = |preface: String, agent: &'static str| {
            let (store, t) = (&store, &t);
            async move { claim(store, t, "me", false, &preface, agent).await }
        };
        assert_eq!(claim("hello\n".into(), "agent-1").await.unwrap_err(), Refused::Preface);
        assert_eq!(
            claim("KEEL-TUNNEL/1 j1 tok extra\n".into(), "agent-1")
                .await
                .unwrap_err(),
            Refused::Preface
        );
        assert_eq!(
            claim("KEEL-TUNNEL/1 j2 x\n".into(), "agent-1").await.unwrap_err(),
            Refused::Unknown("j2".into())
        );
        assert_eq!(
            claim(format!("KEEL-TUNNEL/1 j1 {}\n", "cd".repeat(32)), "agent-1")
                .await
                .unwrap_err(),
            Refused::Token("j1".into())
        );
        let e = claim(format!("KEEL-TUNNEL/1 j1 {token}\n"), "agent-2")
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "job j1 was sent to agent agent-1, not agent-2");
        // Still waiting after the refusals; then claimed once.
        assert!(matches!(
            claim(format!("KEEL-TUNNEL/1 j1 {token}\n"), "agent-1").await.unwrap(),
            Claimed::Local(_)
        ));
        assert_eq!(
            claim(format!("KEEL-TUNNEL/1 j1 {token}\n"), "agent-1")
                .await
                .unwrap_err(),
            Refused::Unknown("j1".into())
        );
    }

    #[tokio::test]
    async fn another_instance_s_job_is_run_here_only_when_its_outcome_can_be_routed() {
        let (store, _dir) = crate::store::test_store().await;
        let t = Tunnels::new(2, 8);
        let token = "ef".repeat(32);
        waiting(&store, &t, "j9", "agent-1", &token, "other").await;
        let preface = format!("KEEL-TUNNEL/1 j9 {token}\n");
        let e = claim(&store, &t, "me", false, &preface, "agent-1").await.unwrap_err();
        assert!(e.to_string().contains("instance other"), "{e}");
        match claim(&store, &t, "me", true, &preface, "agent-1").await.unwrap() {
            Claimed::Remote(row) => assert_eq!((row.instance.as_str(), row.target.as_str()), ("other", "db:443")),
            Claimed::Local(_) => panic!("another instance's job is not handed over here"),
        }
    }

    #[tokio::test]
    async fn each_agent_has_its_own_job_slots() {
        let t = Tunnels::new(2, 2);
        let held = [t.job_slot("a1").await, t.job_slot("a1").await];
        let third = tokio::time::timeout(Duration::from_millis(50), t.job_slot("a1")).await;
        assert!(third.is_err(), "a1's third job waits");
        let _other = t.job_slot("a2").await;
        drop(held);
        let _again = t.job_slot("a1").await;
    }
}
