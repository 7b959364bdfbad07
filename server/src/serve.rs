//! `keel-server serve`: the gRPC and HTTP listeners and the background work.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::net::{TcpListener, TcpSocket};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{ServerConfig, SinkKind};
use crate::grpc::TransferService;
use crate::pki::Ca;
use crate::release::Release;
use crate::sink::{FileSink, NatsSink, Sink};
use crate::state::ServerState;
use crate::store::Store;
use crate::{http, tls};

/// How often revocations made by other processes are picked up.
const REVOCATION_POLL: Duration = Duration::from_secs(1);
/// Connections waiting to be accepted, per listener.
const BACKLOG: u32 = 4096;

/// The addresses actually bound, written to `--ready-file` once both listen.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Bound {
    /// gRPC transfer address.
    pub grpc: SocketAddr,
    /// HTTP(S) address.
    pub http: SocketAddr,
    /// Proxy tunnel endpoint.
    pub tunnel: SocketAddr,
}

/// Opens the store, CA and sink that a server runs on.
pub async fn open_state(config: ServerConfig) -> anyhow::Result<Arc<ServerState>> {
    keel_common::tls::install_crypto_provider();
    keel_common::fsutil::create_dir(&config.data_dir, 0o700)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let pki_dir = config.pki_dir();
    if !pki_dir.join(crate::pki::CA_KEY).exists() {
        anyhow::bail!("no CA in {}: run `keel-server ca init` first", pki_dir.display());
    }
    let ca = Ca::load(&pki_dir)?;
    let store = Store::open_with(&config.database_url(), config.database.max_connections)
        .await
        .context("opening the registry")?;
    let cluster = crate::cluster::Cluster::open(&config.cluster, &config.data_dir).await?;
    let sink: Arc<dyn Sink> = match config.sink.kind {
        SinkKind::File => Arc::new(FileSink::open(
            &config.sink_dir(),
            config.sink.max_file_bytes,
            config.sink.max_files,
        )?),
        SinkKind::Nats => Arc::new(
            NatsSink::open(
                config.sink.url.as_deref().unwrap_or_default(),
                &config.sink.stream,
                &config.sink.subject_prefix,
                config.sink.ack_timeout,
                &format!("keel-server {} sink", cluster.instance),
            )
            .await?,
        ),
    };
    let release = Release::load(&config)?;
    let trust = crate::findings::Trust::load(
        config.tunnel.inventory_system_roots,
        config.tunnel.inventory_ca_bundle.as_deref(),
    )
    .map_err(|e| anyhow::anyhow!("tunnel.inventory_ca_bundle: {e}"))?;
    if trust.is_empty() {
        // Every scanned chain would then be an untrusted root: say so once.
        tracing::warn!(
            tried = ?crate::findings::SYSTEM_BUNDLES,
            "no trust anchors for the TLS inventory: no system bundle found and no tunnel.inventory_ca_bundle"
        );
    } else {
        tracing::info!(anchors = trust.len(), sources = ?trust.sources(), "TLS inventory trust anchors loaded");
    }
    Ok(Arc::new(ServerState::new(
        config, store, ca, sink, release, cluster, trust,
    )))
}

/// Runs the server until `shutdown`, then drains. `ready` receives the bound
/// addresses as JSON once both listeners accept.
pub async fn run(config: ServerConfig, shutdown: CancellationToken, ready: Option<PathBuf>) -> anyhow::Result<()> {
    let state = open_state(config).await?;
    run_with_state(state, shutdown, ready).await
}

/// Runs a server on already-opened state.
pub async fn run_with_state(
    state: Arc<ServerState>,
    shutdown: CancellationToken,
    ready: Option<PathBuf>,
) -> anyhow::Result<()> {
    let open_files = raise_open_file_limit();
    let mut newest_revocation = take_over(&state).await?;
    let (listeners, bound) = bind(&state).await?;
    let grpc = grpc_server(&state, listeners.grpc, shutdown.clone())?;
    let http = http_server(&state, listeners.http, shutdown.clone())?;
    let scheme = if state.config.http.tls { "https" } else { "http" };
    info!(instance = %state.cluster.instance, open_files, grpc = %bound.grpc, tunnel = %bound.tunnel, http = %format!("{scheme}://{}", bound.http), ca_fingerprint = %state.ca.fingerprint(), "keel-server listening");
    if let Some(path) = ready {
        write_ready(&path, &bound)?;
    }
    let loops = Loops::spawn(&state, listeners.tunnel, &shutdown);
    let background = background(Arc::clone(&state), shutdown.clone(), &mut newest_revocation);
    let drain = async {
        shutdown.cancelled().await;
        state.connections.close_all();
    };
    let (grpc_result, http_result, (), ()) = tokio::join!(grpc, http, background, drain);
    loops.wait().await;
    grpc_result.context("gRPC server")?;
    http_result.context("HTTP server")?;
    info!("keel-server stopped");
    Ok(())
}

/// Takes this instance's place: what an earlier process with its ID held is
/// given up (other instances' agents are theirs), and the policies and
/// revocations are loaded. Returns the newest revocation's time.
async fn take_over(state: &ServerState) -> anyhow::Result<i64> {
    // A fixed instance ID may have been this process before a crash: what that
    // one held is gone.
    state
        .store
        .instance_leave(&state.cluster.instance, keel_common::time::now_ms())
        .await?;
    state.reload_policies().await?;
    Ok(state.sync_revocations(0).await?)
}

/// The three listening sockets.
struct Listeners {
    grpc: TcpListener,
    http: std::net::TcpListener,
    tunnel: TcpListener,
}

/// Binds the listeners, records their addresses, and announces this instance
/// with its first lease.
async fn bind(state: &ServerState) -> anyhow::Result<(Listeners, Bound)> {
    let config = &state.config;
    let listeners = Listeners {
        grpc: listen(config.grpc.listen, config.grpc.reuse_port, "grpc")?,
        http: listen(config.http.listen, config.http.reuse_port, "http")?.into_std()?,
        tunnel: listen(config.tunnel.listen, config.tunnel.reuse_port, "tunnel")?,
    };
    let bound = Bound {
        grpc: listeners.grpc.local_addr()?,
        http: listeners.http.local_addr()?,
        tunnel: listeners.tunnel.local_addr()?,
    };
    state.set_grpc_bound(bound.grpc);
    state.set_http_bound(bound.http);
    state.set_tunnel_bound(bound.tunnel);
    crate::lease::renew_lease(state).await?;
    Ok((listeners, bound))
}

/// The gRPC transfer service behind the mutual-TLS accept loop, until `shutdown`.
fn grpc_server(
    state: &Arc<ServerState>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = Result<(), tonic::transport::Error>> + use<>> {
    let config = &state.config.grpc;
    let incoming = tls::accept_loop(
        listener,
        tls::grpc_config(&state.tls_trust())?,
        config.max_handshakes,
        config.handshake_timeout,
        tls::Refusals {
            family: state.metrics.handshakes_refused.clone(),
            listener: "grpc",
        },
        shutdown.clone(),
    );
    Ok(tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.keepalive))
        .http2_keepalive_timeout(Some(config.keepalive))
        .tcp_keepalive(Some(config.keepalive))
        .layer(crate::encoding::EncodingsLayer {
            max_message_bytes: config.max_message_bytes,
        })
        .add_service(TransferService::server(Arc::clone(state)))
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), async move { shutdown.cancelled().await }))
}

/// The HTTP(S) API, console and enrollment, until `shutdown` (then five
/// seconds for requests under way).
fn http_server(
    state: &Arc<ServerState>,
    listener: std::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>> + use<>> {
    let app = http::router(Arc::clone(state)).into_make_service_with_connect_info::<SocketAddr>();
    let tls = if state.config.http.tls {
        Some(tls::http_config(&state.config.pki_dir())?)
    } else {
        None
    };
    Ok(async move {
        if let Some(tls) = tls {
            let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls));
            let handle = axum_server::Handle::new();
            let h = handle.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                h.graceful_shutdown(Some(Duration::from_secs(5)));
            });
            axum_server::from_tcp_rustls(listener, tls)?
                .handle(handle)
                .serve(app)
                .await?;
        } else {
            axum::serve(TcpListener::from_std(listener)?, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await?;
        }
        anyhow::Ok(())
    })
}

/// The instance's loops, each a task of its own until `shutdown`.
struct Loops {
    tunnels: tokio::task::JoinHandle<anyhow::Result<()>>,
    others: Vec<tokio::task::JoinHandle<()>>,
    membership: tokio::task::JoinHandle<()>,
}

impl Loops {
    /// Starts the tunnel endpoint, the rollouts, the scheduled audits, the file
    /// pushes, the routed commands and the lease.
    fn spawn(state: &Arc<ServerState>, tunnel: TcpListener, shutdown: &CancellationToken) -> Loops {
        let s = || Arc::clone(state);
        let commands = {
            let (state, shutdown) = (s(), shutdown.clone());
            async move { crate::cluster::serve_commands(&state.cluster, &state.connections, shutdown).await }
        };
        Loops {
            tunnels: tokio::spawn(crate::tunnel::serve(s(), tunnel, shutdown.clone())),
            others: vec![
                tokio::spawn(crate::rollout::run(s(), shutdown.clone())),
                tokio::spawn(crate::audits::run(s(), shutdown.clone())),
                tokio::spawn(crate::files::run(s(), shutdown.clone())),
                tokio::spawn(commands),
            ],
            membership: tokio::spawn(crate::lease::run(s(), shutdown.clone())),
        }
    }

    /// Waits for every loop to end; the lease last, since it flushes what is
    /// pending and gives this instance's agents up.
    async fn wait(self) {
        for task in self.others {
            let _ = task.await;
        }
        match self.tunnels.await {
            Ok(Err(e)) => warn!(error = %e, "tunnel endpoint failed"),
            Err(e) => warn!(error = %e, "tunnel endpoint panicked"),
            Ok(Ok(())) => {}
        }
        let _ = self.membership.await;
    }
}

/// Raises the soft open-file limit to the hard one: each agent's stream is a
/// file. Returns the limit in force.
fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                warn!(soft, hard, error = %e, "cannot raise the open-file limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}

/// A listener on `addr`, sharing the port with other processes when `reuse_port`.
fn listen(addr: SocketAddr, reuse_port: bool, key: &str) -> anyhow::Result<TcpListener> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if reuse_port {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        socket.listen(BACKLOG)
    };
    bind().with_context(|| format!("cannot listen on {key}.listen {addr}"))
}

fn write_ready(path: &Path, bound: &Bound) -> anyhow::Result<()> {
    let json = serde_json::to_vec(bound)?;
    keel_common::fsutil::write_public(path, &json).with_context(|| format!("cannot write {}", path.display()))
}

async fn background(state: Arc<ServerState>, shutdown: CancellationToken, newest: &mut i64) {
    let mut revocations = tokio::time::interval(REVOCATION_POLL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = revocations.tick() => {
                // Re-read a little overlap: two revocations may share a millisecond.
                match state.sync_revocations(newest.saturating_sub(1)).await {
                    Ok(n) => *newest = n,
                    Err(e) => error!(error = %e, "cannot read revocations"),
                }
            }
        }
    }
}
