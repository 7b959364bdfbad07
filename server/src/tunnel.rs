//! The proxy tunnel endpoint (port 6753): where an agent's proxy plugin connects
//! back, over mutual TLS with the agent's certificate, to carry one audit job.
//!
//! The plugin's first line is `KEEL-TUNNEL/1 <job> <token>\n`. The endpoint of
//! any instance answers `OK\n` and takes the job if [`crate::tunnels::claim`]
//! grants it; otherwise it answers `ERR <reason>\n`, logs it and closes. A job of
//! this instance gets the stream in process; another instance's job is run here
//! and its outcome published to the instance waiting (see `inventory::run_for`).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::state::ServerState;
use crate::tunnels::{Claimed, claim};

/// ALPN of the tunnel protocol.
pub const ALPN: &[u8] = b"keel-tunnel/1";
/// The longest preface line.
const MAX_PREFACE: u64 = 256;
/// How long a connected plugin has to send its preface.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts tunnels until `shutdown`.
pub async fn serve(state: Arc<ServerState>, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = crate::tls::mutual_config(&state.tls_trust(), ALPN)?;
    let mut incoming = crate::tls::accept_loop(
        listener,
        config,
        state.config.grpc.max_handshakes,
        state.config.grpc.handshake_timeout,
        crate::tls::Refusals {
            family: state.metrics.handshakes_refused.clone(),
            listener: "tunnel",
        },
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
    let claimed = claim(
        &state.store,
        &state.tunnels,
        &state.cluster.instance,
        state.cluster.routes(),
        &preface,
        &agent.agent_id,
    )
    .await;
    match claimed {
        Ok(claimed) => {
            let stream = reader.get_mut();
            if stream.write_all(b"OK\n").await.is_err() || stream.flush().await.is_err() {
                return;
            }
            info!(agent_id = %agent.agent_id, ?peer, "tunnel open");
            match claimed {
                // The job may have given up in the meantime; then the tunnel just closes.
                Claimed::Local(tx) => {
                    let _ = tx.send(reader);
                }
                Claimed::Remote(row) => crate::inventory::run_for(state, &row, reader).await,
            }
        }
        Err(e) => {
            warn!(agent_id = %agent.agent_id, ?peer, reason = %e, "tunnel refused");
            let _ = reader.get_mut().write_all(format!("ERR {e}\n").as_bytes()).await;
            let _ = reader.get_mut().flush().await;
            let _ = reader.get_mut().shutdown().await;
        }
    }
}
