//! The proxy tunnel endpoint (port 6753): where an agent's proxy plugin connects
//! back, over mutual TLS with the agent's certificate, to carry one audit job.
//!
//! A job is announced with [`Tunnels::expect`] before its 6100 task is sent: the
//! job ID, the agent it was sent to, and the SHA-256 of a one-time token that only
//! the task carries. The plugin's first line is `KEEL-TUNNEL/1 <job> <token>\n`.
//! The endpoint answers `OK\n` and hands the stream to the job only if the job is
//! waiting, the token matches, and the certificate's agent is the job's agent;
//! otherwise it answers `ERR <reason>\n`, logs it and closes. A job is claimed at
//! most once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::state::ServerState;

/// ALPN of the tunnel protocol.
pub const ALPN: &[u8] = b"keel-tunnel/1";
/// The longest preface line.
const MAX_PREFACE: u64 = 256;
/// How long a connected plugin has to send its preface.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);

/// A tunnel: the TLS stream from the agent, now a byte pipe to the target.
pub type Tunnel = BufReader<TlsStream<TcpStream>>;

/// A job waiting for its tunnel.
#[derive(Debug)]
struct Pending {
    agent_id: String,
    token_sha256: [u8; 32],
    tx: oneshot::Sender<Tunnel>,
}

/// Jobs waiting for their tunnels.
#[derive(Debug)]
pub struct Tunnels {
    pending: Mutex<HashMap<String, Pending>>,
    max: usize,
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
}

impl Tunnels {
    /// An empty registry holding at most `max` waiting jobs.
    pub fn new(max: usize) -> Self {
        Tunnels {
            pending: Mutex::new(HashMap::new()),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Announces a job; its tunnel arrives on the receiver. `None` when `max` jobs
    /// are waiting already.
    pub fn expect(&self, job: &str, agent_id: &str, token: &str) -> Option<oneshot::Receiver<Tunnel>> {
        let mut pending = self.lock();
        if pending.len() >= self.max {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        pending.insert(
            job.to_owned(),
            Pending {
                agent_id: agent_id.to_owned(),
                token_sha256: Sha256::digest(token.as_bytes()).into(),
                tx,
            },
        );
        Some(rx)
    }

    /// Forgets a job (it ended, or gave up waiting).
    pub fn forget(&self, job: &str) {
        self.lock().remove(job);
    }

    /// Takes a waiting job for a preface from `agent_id`'s certificate. A wrong
    /// token or agent leaves the job waiting for the right one.
    fn claim(&self, preface: &str, agent_id: &str) -> Result<oneshot::Sender<Tunnel>, Refused> {
        let mut parts = preface.trim_end_matches(['\r', '\n']).split(' ');
        let (Some("KEEL-TUNNEL/1"), Some(job), Some(token), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refused::Preface);
        };
        let mut pending = self.lock();
        let p = pending.get(job).ok_or_else(|| Refused::Unknown(job.to_owned()))?;
        let given: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Hashes of a random token: comparing them leaks nothing useful.
        if given != p.token_sha256 {
            return Err(Refused::Token(job.to_owned()));
        }
        if p.agent_id != agent_id {
            return Err(Refused::Agent {
                job: job.to_owned(),
                expected: p.agent_id.clone(),
                got: agent_id.to_owned(),
            });
        }
        pending
            .remove(job)
            .map(|p| p.tx)
            .ok_or_else(|| Refused::Unknown(job.to_owned()))
    }
}

/// Accepts tunnels until `shutdown`.
pub async fn serve(state: Arc<ServerState>, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = crate::tls::tunnel_config(&state)?;
    let mut incoming = crate::tls::accept_loop(
        listener,
        config,
        state.config.grpc.max_handshakes,
        state.config.grpc.handshake_timeout,
        shutdown.clone(),
    );
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            s = incoming.recv() => match s {
                Some(Ok(s)) => s,
                Some(Err(_)) => continue,
                None => return Ok(()),
            },
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move { accept(&state, stream).await });
    }
}

async fn accept(state: &ServerState, stream: TlsStream<TcpStream>) {
    let peer = stream.get_ref().0.peer_addr().ok();
    let agent = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| crate::pki::peer_cert(c.as_ref()));
    let Some(agent) = agent else {
        warn!(?peer, "tunnel refused: no agent certificate");
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let read = tokio::time::timeout(
        PREFACE_TIMEOUT,
        (&mut reader).take(MAX_PREFACE).read_until(b'\n', &mut line),
    )
    .await;
    let preface = match read {
        Ok(Ok(_)) if line.ends_with(b"\n") => String::from_utf8_lossy(&line).into_owned(),
        _ => {
            warn!(?peer, agent_id = %agent.agent_id, "tunnel refused: no preface line");
            return;
        }
    };
    match state.tunnels.claim(&preface, &agent.agent_id) {
        Ok(tx) => {
            let stream = reader.get_mut();
            if stream.write_all(b"OK\n").await.is_err() || stream.flush().await.is_err() {
                return;
            }
            info!(agent_id = %agent.agent_id, ?peer, "tunnel open");
            // The job may have given up in the meantime; then the tunnel just closes.
            let _ = tx.send(reader);
        }
        Err(e) => {
            warn!(agent_id = %agent.agent_id, ?peer, reason = %e, "tunnel refused");
            let _ = reader.get_mut().write_all(format!("ERR {e}\n").as_bytes()).await;
            let _ = reader.get_mut().flush().await;
            let _ = reader.get_mut().shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_job_is_claimed_once_with_its_token_by_its_agent() {
        let t = Tunnels::new(2);
        let token = "ab".repeat(32);
        let _rx = t.expect("j1", "agent-1", &token).unwrap();
        assert_eq!(t.claim("hello\n", "agent-1").unwrap_err(), Refused::Preface);
        assert_eq!(
            t.claim("KEEL-TUNNEL/1 j1 tok extra\n", "agent-1").unwrap_err(),
            Refused::Preface
        );
        assert_eq!(
            t.claim("KEEL-TUNNEL/1 j2 x\n", "agent-1").unwrap_err(),
            Refused::Unknown("j2".into())
        );
        assert_eq!(
            t.claim(&format!("KEEL-TUNNEL/1 j1 {}\n", "cd".repeat(32)), "agent-1")
                .unwrap_err(),
            Refused::Token("j1".into())
        );
        let e = t.claim(&format!("KEEL-TUNNEL/1 j1 {token}\n"), "agent-2").unwrap_err();
        assert_eq!(e.to_string(), "job j1 was sent to agent agent-1, not agent-2");
        // Still waiting after the refusals; then claimed once.
        t.claim(&format!("KEEL-TUNNEL/1 j1 {token}\n"), "agent-1").unwrap();
        assert_eq!(
            t.claim(&format!("KEEL-TUNNEL/1 j1 {token}\n"), "agent-1").unwrap_err(),
            Refused::Unknown("j1".into())
        );
    }

    #[test]
    fn waiting_jobs_are_bounded_and_forgotten() {
        let t = Tunnels::new(1);
        let _a = t.expect("a", "x", "t").unwrap();
        assert!(t.expect("b", "x", "t").is_none());
        t.forget("a");
        assert!(t.expect("b", "x", "t").is_some());
    }
}
