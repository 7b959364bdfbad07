//! The agent's own Prometheus endpoint (`[metrics] listen`, off by default): the
//! stream, the spool and the plugins, as the agent sees them.
//!
//! It listens only on a loopback address (the configuration refuses others)
//! and has no authentication. Requests are bounded: at most
//! [`MAX_CONNECTIONS`] at once, a request head of at most [`MAX_REQUEST_BYTES`],
//! read within [`REQUEST_TIMEOUT`], the whole exchange within
//! [`EXCHANGE_TIMEOUT`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::outbox::Outbox;
use crate::plugin::Runtime;
use crate::spool::Spool;
use crate::transport::TransferStats;

/// Scrapes served at once; more wait for their turn in the listen queue.
pub const MAX_CONNECTIONS: usize = 4;
/// The longest request head read.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// How long a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole exchange may take, the answer's sending included.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the endpoint reads.
#[derive(Debug, Clone)]
pub struct Sources {
    /// Stream counters.
    pub stats: Arc<TransferStats>,
    /// Spool counters.
    pub spool: Arc<Spool>,
    /// Records dropped before the spool.
    pub outbox: Outbox,
    /// The plugins.
    pub plugins: Runtime,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PluginState {
    plugin: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PluginLabel {
    plugin: String,
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let g: Gauge = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    registry.register(name, help, g);
}

/// The text of one scrape, read from `sources` now.
pub fn render(sources: &Sources) -> String {
    let mut r = Registry::with_prefix("keel_agent");
    let stats = &sources.stats;
    let spool = sources.spool.stats();
    counter(
        &mut r,
        "stream_opens",
        "Streams opened to a server",
        stats.connects.load(Ordering::Relaxed),
    );
    counter(
        &mut r,
        "sent_bytes",
        "Encoded bytes sent to the server",
        stats.tx_bytes.load(Ordering::Relaxed),
    );
    counter(
        &mut r,
        "received_bytes",
        "Encoded bytes received from the server",
        stats.rx_bytes.load(Ordering::Relaxed),
    );
    counter(
        &mut r,
        "records_sent",
        "Records sent to the server",
        stats.tx_records.load(Ordering::Relaxed),
    );
    counter(
        &mut r,
        "commands_received",
        "Commands received from the server",
        stats.rx_commands.load(Ordering::Relaxed),
    );
    gauge(&mut r, "spool_bytes", "Bytes in the spool on disk", spool.bytes);
    gauge(
        &mut r,
        "spool_batches",
        "Batches waiting for the server's acknowledgement",
        spool.batches as u64,
    );
    counter(
        &mut r,
        "records_dropped",
        "Records lost on this host: the spool's bound hit while disconnected, no space, I/O errors, or the queue before the spool full",
        spool.dropped_records + sources.outbox.dropped(),
    );
    counter(
        &mut r,
        "batches_resent",
        "Batches sent more than once",
        spool.resent_batches,
    );
    let resident = procfs::process::Process::myself()
        .and_then(|p| p.statm())
        .map(|m| m.resident * procfs::page_size())
        .unwrap_or(0);
    gauge(
        &mut r,
        "resident_bytes",
        "Resident memory of the agent process",
        resident,
    );
    let up: Family<PluginState, Gauge> = Family::default();
    let restarts: Family<PluginLabel, Counter> = Family::default();
    let oom: Family<PluginLabel, Counter> = Family::default();
    let refused: Family<PluginLabel, Counter> = Family::default();
    for p in sources.plugins.figures() {
        up.get_or_create(&PluginState {
            plugin: p.name.clone(),
            state: p.state,
        })
        .set(1);
        let label = PluginLabel { plugin: p.name };
        restarts.get_or_create(&label).inc_by(p.restarts);
        oom.get_or_create(&label).inc_by(p.oom_kills);
        refused.get_or_create(&label).inc_by(p.refused_tasks);
    }
    r.register(
        "plugin_state",
        "Each plugin of the set, labelled with its state (always 1)",
        up,
    );
    r.register("plugin_restarts", "Plugin restarts after unexpected exits", restarts);
    r.register("plugin_oom_kills", "OOM kills in a plugin's cgroup", oom);
    r.register(
        "plugin_refused_tasks",
        "Tasks refused because a plugin's queue was full",
        refused,
    );
    let mut text = String::new();
    // Writing to a String does not fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &r);
    text
}

/// Binds `addr` (the configuration made sure it is loopback).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, sources: Sources, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "agent metrics at http://{addr}/metrics");
    }
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let (conn, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // The whole exchange within the limit: a client that does not read
            // its answer gives its turn up.
            match tokio::time::timeout(EXCHANGE_TIMEOUT, answer(conn, &sources)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics endpoint: request failed"),
                Err(_) => debug!(%peer, "metrics endpoint: the exchange took too long"),
            }
        });
    }
}

async fn answer(mut conn: TcpStream, sources: &Sources) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0_u8; 512];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_REQUEST_BYTES {
                return Ok(false);
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(true)
    })
    .await;
    let (status, kind, body) = match read {
        Ok(Ok(true)) => {
            let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
            let mut parts = line.split(|b| *b == b' ');
            match (parts.next(), parts.next()) {
                (Some(b"GET"), Some(b"/metrics")) => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    render(sources),
                ),
                (Some(b"GET"), _) => (
                    "404 Not Found",
                    "text/plain",
                    "only /metrics is served here\n".to_owned(),
                ),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "only GET is served here\n".to_owned(),
                ),
            }
        }
        Ok(Ok(false)) => (
            "400 Bad Request",
            "text/plain",
            format!("a request head of at most {MAX_REQUEST_BYTES} bytes\n"),
        ),
        Ok(Err(e)) => return Err(e),
        Err(_) => (
            "408 Request Timeout",
            "text/plain",
            "request head not received in time\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}
