//! The one bidirectional gRPC stream to the server, over mutual TLS.
//!
//! Only this module sees prost and tonic types. It connects (service discovery,
//! then the private hosts, then the public ones), sends pending batches, applies
//! acknowledgements, hands everything else the server sends to the dispatcher,
//! and reconnects with jittered exponential backoff, forever, until shutdown.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use keel_common::backoff::Backoff;
use keel_proto::grpc::Command;
use keel_proto::keepalive;
use prost::Message;
use serde::Deserialize;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};
use tonic_prost::ProstDecoder;
use tracing::{debug, info, warn};

use crate::config::ServerSection;
use crate::pki::Identity;
use crate::plugin::PluginConfig;
use crate::record::Header;
use crate::spool::Spool;
use crate::tasks::TaskRequest;

/// Largest command accepted from the server.
const MAX_COMMAND_BYTES: usize = 16 << 20;
/// A stream that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(30);

/// What the server sent that someone other than the transport handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A task.
    Task(TaskRequest),
    /// The answer to a renewal request: a certificate PEM or an error.
    Renewal(Result<String, String>),
    /// The desired configuration (plugins, and `keel-agent` for the agent's own
    /// version), and the token of the task that sent it.
    Configs(Vec<PluginConfig>, Option<String>),
}

/// Counters behind the heartbeat's transfer rates.
#[derive(Debug, Default)]
pub struct TransferStats {
    /// Encoded bytes sent.
    pub tx_bytes: AtomicU64,
    /// Encoded bytes received.
    pub rx_bytes: AtomicU64,
    /// Records sent.
    pub tx_records: AtomicU64,
    /// Commands received.
    pub rx_commands: AtomicU64,
    /// Streams opened.
    pub connects: AtomicU64,
}

/// Everything the transport needs.
#[derive(Debug, Clone)]
pub struct Transport {
    /// How to reach the server.
    pub server: ServerSection,
    /// Current certificate and key; replaced by renewals.
    pub identity: Arc<RwLock<Identity>>,
    /// Header fields, refreshed by the heartbeat.
    pub header: Arc<RwLock<Header>>,
    /// Batches to send, already encoded.
    pub spool: Arc<Spool>,
    /// Where commands go.
    pub inbound: mpsc::Sender<Inbound>,
    /// Counters.
    pub stats: Arc<TransferStats>,
    /// Notified on each new stream, so a heartbeat goes out at once.
    pub connected_signal: Arc<Notify>,
    /// Notified to end the current stream and connect again (after a renewal).
    pub reconnect: Arc<Notify>,
    /// Whether a stream is open.
    pub connected: Arc<AtomicBool>,
    /// How long to keep sending after shutdown to drain pending batches.
    pub drain: Duration,
    /// The heartbeat interval, which sets when to ping (`keel_proto::keepalive`).
    pub heartbeat: Duration,
}

/// Why a stream ended.
#[derive(Debug)]
enum End {
    Shutdown,
    Reconnect,
    Server(String),
}

#[derive(Deserialize)]
struct Discovered {
    grpc: Vec<String>,
}

impl Transport {
    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.server.backoff_min, self.server.backoff_max, 0.5);
        loop {
            let mut reason = String::from("no server address reachable");
            for addr in self.endpoints().await {
                if shutdown.is_cancelled() {
                    return;
                }
                let channel = match self.connect(&addr).await {
                    Ok(c) => c,
                    Err(e) => {
                        let why = keel_common::error_chain(e.as_ref());
                        warn!(server = %addr, error = %why, "cannot connect");
                        reason = format!("cannot connect to {addr}: {why}");
                        continue;
                    }
                };
                let started = Instant::now();
                info!(server = %addr, "connected");
                let end = self.stream(channel, &shutdown).await;
                self.connected.store(false, Ordering::Relaxed);
                self.spool.set_connected(false);
                if started.elapsed() >= STABLE {
                    backoff.reset();
                }
                match end {
                    End::Shutdown => return,
                    End::Reconnect => {
                        info!(server = %addr, "reconnecting with the renewed certificate");
                        backoff.reset();
                        reason = "certificate renewed".into();
                    }
                    End::Server(why) => reason = format!("stream to {addr} ended: {why}"),
                }
                break;
            }
            let delay = if reason == "certificate renewed" {
                Duration::ZERO
            } else {
                backoff.next_delay()
            };
            info!(%reason, retry_in = ?delay, "reconnecting");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Discovery first, then private, then public addresses.
    async fn endpoints(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.server.discovery_url.is_empty() {
            match self.discover().await {
                Ok(list) => out.extend(list),
                Err(e) => {
                    warn!(url = %self.server.discovery_url, error = %e, "service discovery failed")
                }
            }
        }
        out.extend(self.server.private.iter().cloned());
        out.extend(self.server.public.iter().cloned());
        out.dedup();
        out
    }

    async fn discover(&self) -> anyhow::Result<Vec<String>> {
        let ca = self.identity.read().unwrap_or_else(|p| p.into_inner()).ca_pem.clone();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(keel_common::tls::pinned_client(ca.as_bytes())?.with_no_client_auth())
            .timeout(self.server.connect_timeout)
            .no_proxy()
            .build()?;
        let d: Discovered = client
            .get(&self.server.discovery_url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(d.grpc)
    }

    async fn connect(&self, addr: &str) -> anyhow::Result<Channel> {
        let identity = self.identity.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&identity.ca_pem))
            .identity(TlsIdentity::from_pem(&identity.cert_pem, identity.key_pem.expose()));
        if !self.server.server_name.is_empty() {
            tls = tls.domain_name(self.server.server_name.clone());
        }
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect_timeout(self.server.connect_timeout)
            .http2_keep_alive_interval(keepalive::interval(self.heartbeat))
            .keep_alive_timeout(keepalive::TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        Ok(endpoint.connect().await?)
    }

    async fn stream(&self, channel: Channel, shutdown: &CancellationToken) -> End {
        let (tx, rx) = mpsc::channel::<Bytes>(2);
        self.spool.rewind();
        let mut inbound = match open_stream(channel, rx).await {
            Ok(s) => s,
            Err(status) => return End::Server(describe(&status)),
        };
        self.connected.store(true, Ordering::Relaxed);
        self.spool.set_connected(true);
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        self.connected_signal.notify_one();

        let send = async {
            let mut first = true;
            loop {
                let (batch, records) = match self.spool.next().await {
                    Ok(b) => b,
                    Err(e) => return End::Server(format!("cannot read the spool: {e}")),
                };
                // The first batch tells the server how far this agent saw acknowledgements.
                let batch = if std::mem::take(&mut first) {
                    with_acked(&batch, self.spool.acked())
                } else {
                    batch
                };
                self.stats.tx_bytes.fetch_add(batch.len() as u64, Ordering::Relaxed);
                self.stats.tx_records.fetch_add(u64::from(records), Ordering::Relaxed);
                if tx.send(batch).await.is_err() {
                    return End::Server("send side closed".into());
                }
            }
        };
        let receive = async {
            loop {
                match inbound.message().await {
                    Ok(Some(cmd)) => self.on_command(cmd).await,
                    Ok(None) => return End::Server("closed by the server".into()),
                    Err(status) => return End::Server(describe(&status)),
                }
            }
        };
        tokio::pin!(send, receive);
        tokio::select! {
            end = &mut receive => end,
            end = &mut send => end,
            _ = self.reconnect.notified() => End::Reconnect,
            _ = shutdown.cancelled() => {
                // Keep the stream up briefly so queued records and their acks go through.
                let drained = tokio::select! {
                    d = self.spool.drained(self.drain) => d,
                    _ = &mut receive => false,
                    _ = &mut send => false,
                };
                debug!(drained, "stream closed for shutdown");
                End::Shutdown
            }
        }
    }

    async fn on_command(&self, cmd: Command) {
        self.stats
            .rx_bytes
            .fetch_add(cmd.encoded_len() as u64, Ordering::Relaxed);
        self.stats.rx_commands.fetch_add(1, Ordering::Relaxed);
        let keel_extension = cmd.ack.is_some() || cmd.renewal.is_some();
        if let Some(ack) = cmd.ack {
            self.spool.ack(ack.epoch, ack.seq);
        }
        let mut forward = Vec::new();
        if let Some(r) = cmd.renewal {
            forward.push(Inbound::Renewal(if r.error.is_empty() {
                Ok(r.certificate_pem)
            } else {
                Err(r.error)
            }));
        }
        if let Some(t) = cmd.task {
            forward.push(Inbound::Task(TaskRequest {
                data_type: t.data_type,
                object_name: t.object_name,
                data: t.data,
                token: t.token,
            }));
        } else if !keel_extension {
            // Elkeid semantics: a command without a task is the full desired config.
            let configs = cmd
                .configs
                .into_iter()
                .map(|c| PluginConfig {
                    kind: crate::plugin::parse_kind(&c.r#type),
                    name: c.name,
                    version: c.version,
                    sha256: c.sha256,
                    signature: c.signature,
                    download_urls: c.download_urls,
                    detail: c.detail,
                    local: None,
                })
                .collect();
            let token = Some(cmd.config_token).filter(|t| !t.is_empty());
            forward.push(Inbound::Configs(configs, token));
        }
        for msg in forward {
            if self.inbound.send(msg).await.is_err() {
                debug!("dispatcher gone; command dropped during shutdown");
            }
        }
    }
}

/// The first batch of a stream: `batch` with `PackagedData.acked` (field 102).
fn with_acked(batch: &[u8], acked: u64) -> Bytes {
    let mut buf = bytes::BytesMut::with_capacity(batch.len() + 11);
    buf.extend_from_slice(batch);
    prost::encoding::uint64::encode(102, &acked, &mut buf);
    buf.freeze()
}

fn describe(status: &tonic::Status) -> String {
    match std::error::Error::source(status) {
        Some(source) => format!(
            "{:?}: {}: {}",
            status.code(),
            status.message(),
            keel_common::error_chain(source)
        ),
        None => format!("{:?}: {}", status.code(), status.message()),
    }
}

/// Sends already-encoded `PackagedData` bytes from the spool as they are, and
/// decodes `Command`s with prost.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Command;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<Command>;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

/// Opens `grpc.Transfer/Transfer` with the raw codec.
async fn open_stream(channel: Channel, rx: mpsc::Receiver<Bytes>) -> Result<tonic::Streaming<Command>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_COMMAND_BYTES);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/grpc.Transfer/Transfer");
    let response = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
        .await?;
    Ok(response.into_inner())
}

#[cfg(test)]
mod tests {
    use keel_proto::grpc::PackagedData;
    use prost::Message;

    use super::*;

    #[test]
    fn the_first_batch_of_a_stream_carries_the_acknowledged_point() {
        let batch = PackagedData {
            agent_id: "a".into(),
            seq: 8,
            epoch: 3,
            ..Default::default()
        }
        .encode_to_vec();
        let first = PackagedData::decode(with_acked(&batch, 7)).unwrap();
        assert_eq!(
            (first.agent_id.as_str(), first.seq, first.epoch, first.acked),
            ("a", 8, 3, 7)
        );
    }
}
