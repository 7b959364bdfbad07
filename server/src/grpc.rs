//! The `grpc.Transfer` service: one bidirectional stream per agent.
//!
//! This module and `tls` are the only ones that see prost and tonic types; records
//! become [`sink::Record`]s and commands come in as [`Outbound`]s.
//!
//! The agent's identity is the subject of its verified client certificate. Every
//! `PackagedData.agent_id` must equal it, or the stream is refused and nothing is
//! registered.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use keel_common::time::now_ms;
use keel_proto::data_type;
use keel_proto::grpc::transfer_server::{Transfer, TransferServer};
use keel_proto::grpc::{Ack, CertificateRenewal, Command, Config, PackagedData, Task};
use keel_proto::payload;
use keel_proto::product::{KEEL_AGENT, Product};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::connections::{Closing, Connection, Outbound};
use crate::gaps::{Gaps, Tally};
use crate::metrics::Reason;
use crate::pki::{self, PeerCert};
use crate::plugin_sync::{self, Round};
use crate::sink::{Batch, JsonFields, Record};
use crate::state::ServerState;
use crate::store::AgentMeta;

/// Commands queued per stream before senders see "busy".
const COMMAND_QUEUE: usize = 64;

/// The tonic service.
#[derive(Debug, Clone)]
pub struct TransferService {
    state: Arc<ServerState>,
}

impl TransferService {
    /// The service, ready to add to a tonic server.
    pub fn server(state: Arc<ServerState>) -> TransferServer<Self> {
        let max = state.config.grpc.max_message_bytes;
        // Snappy, Elkeid's, is decoded in front of tonic (`crate::encoding`).
        TransferServer::new(Self { state })
            .max_decoding_message_size(max)
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Zstd)
    }
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<Command, Status>> + Send>>;

#[tonic::async_trait]
impl Transfer for TransferService {
    type TransferStream = CommandStream;

    async fn transfer(
        &self,
        request: Request<Streaming<PackagedData>>,
    ) -> Result<Response<Self::TransferStream>, Status> {
        let info = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().cloned();
        let peer = info.as_ref().and_then(|i| i.get_ref().remote_addr());
        let cert = info
            .and_then(|i| i.peer_certs())
            .and_then(|certs| certs.first().and_then(|c| pki::peer_cert(c)))
            .ok_or_else(|| {
                warn!(?peer, "refused stream: no usable client certificate");
                Status::unauthenticated("no usable client certificate")
            })?;
        // The handshake checked revocation; this catches a revocation since then on
        // a connection that is opening another stream.
        if self.state.revocations.contains(&cert.serial) {
            warn!(?peer, agent_id = %cert.agent_id, serial = %cert.serial, "refused stream: certificate revoked");
            return Err(Status::permission_denied("certificate revoked"));
        }
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let conn = Connection::new(cert.serial.clone(), peer, tx);
        let span = info_span!("stream", agent_id = %cert.agent_id, peer = ?peer);
        // The agent's product, known from its first batch, before anything can
        // be sent to it: tasks for the agent itself are addressed by it.
        let product: Arc<OnceLock<String>> = Arc::default();
        let stream = StreamTask {
            state: Arc::clone(&self.state),
            cert,
            conn,
            session: None,
            product: Arc::clone(&product),
        };
        self.state.metrics.streams_opened.inc();
        tokio::spawn(stream.run(request.into_inner()).instrument(span));
        let out = close_after_error(
            ReceiverStream::new(rx).map(move |o| to_command(*o, product.get().map_or(KEEL_AGENT, String::as_str))),
        );
        Ok(Response::new(Box::pin(out)))
    }
}

/// Ends the stream right after the first error, which carries the close reason.
fn close_after_error(
    s: impl Stream<Item = Result<Command, Status>> + Send + 'static,
) -> impl Stream<Item = Result<Command, Status>> + Send {
    s.scan(false, |ended, item| {
        if *ended {
            return std::future::ready(None);
        }
        *ended = item.is_err();
        std::future::ready(Some(item))
    })
}

/// The command for an agent of `product`.
fn to_command(o: Outbound, product: &str) -> Result<Command, Status> {
    Ok(match o {
        Outbound::Task(t) => Command {
            task: Some(Task {
                data_type: t.data_type,
                // A task for the agent itself goes to the name its product answers to.
                object_name: match keel_proto::product::addressed(&t.object_name, product) {
                    a if a == t.object_name => t.object_name,
                    a => a.to_owned(),
                },
                data: t.data,
                token: t.token,
            }),
            ..Default::default()
        },
        Outbound::Ack { epoch, seq } => Command {
            ack: Some(Ack { epoch, seq }),
            ..Default::default()
        },
        Outbound::Configs(configs, token) => Command {
            config_token: token.unwrap_or_default(),
            configs: configs
                .into_iter()
                .map(|c| Config {
                    name: c.name,
                    r#type: c.kind,
                    version: c.version,
                    sha256: c.sha256,
                    signature: c.signature,
                    download_urls: c.download_urls,
                    detail: c.detail,
                })
                .collect(),
            ..Default::default()
        },
        Outbound::Renewal(r) => Command {
            renewal: Some(match r {
                Ok(certificate_pem) => CertificateRenewal {
                    certificate_pem,
                    error: String::new(),
                },
                Err(error) => CertificateRenewal {
                    certificate_pem: String::new(),
                    error,
                },
            }),
            ..Default::default()
        },
        Outbound::Close(reason) => {
            return Err(match reason {
                Closing::Replaced => Status::aborted("replaced by a newer stream of this agent"),
                Closing::Revoked => Status::permission_denied("certificate revoked"),
                Closing::Refused(why) => Status::permission_denied(why),
                Closing::Invalid(why) => Status::invalid_argument(why),
                Closing::TooLarge(why) => Status::resource_exhausted(why),
                Closing::Unavailable(why) => Status::unavailable(why),
                Closing::Shutdown => Status::unavailable("server shutting down"),
            });
        }
    })
}

/// Whether a failed read is the agent's message rather than the stream going
/// away: tonic reports a message over `grpc.max_message_bytes` as OUT_OF_RANGE (or
/// RESOURCE_EXHAUSTED when decompressed), bytes that do not decode as INTERNAL,
/// and a snappy message that does not decompress as INVALID_ARGUMENT
/// ([`crate::encoding`]).
fn refusal(status: &Status) -> Option<Closing> {
    let message = status.message();
    match status.code() {
        Code::OutOfRange | Code::ResourceExhausted => Some(Closing::TooLarge(message.to_owned())),
        Code::InvalidArgument => Some(Closing::Invalid(message.to_owned())),
        Code::Internal if message.starts_with("failed to decode") || message.starts_with("protocol error") => {
            Some(Closing::Invalid(message.to_owned()))
        }
        _ => None,
    }
}

/// Moves what a batch says about its host out of it (no copies: every batch
/// carries it, and it rarely changes).
fn take_meta(pd: &mut PackagedData) -> AgentMeta {
    AgentMeta {
        hostname: std::mem::take(&mut pd.hostname),
        version: std::mem::take(&mut pd.version),
        product: std::mem::take(&mut pd.product),
        intranet_ipv4: std::mem::take(&mut pd.intranet_ipv4),
        extranet_ipv4: std::mem::take(&mut pd.extranet_ipv4),
        intranet_ipv6: std::mem::take(&mut pd.intranet_ipv6),
        extranet_ipv6: std::mem::take(&mut pd.extranet_ipv6),
    }
}

/// What is known once the first valid batch arrived.
struct Session {
    generation: u64,
    /// When it began, as stored: its close is for this stream only.
    connected_at: i64,
    meta: AgentMeta,
    mark: Option<(u64, u64)>,
    /// The plugin list of the last heartbeat, to write only changes.
    plugins: Option<String>,
    /// The plugins' record numbering, to find records lost on the way.
    gaps: Gaps,
    /// Where that numbering stood after the last batch, as stored with its mark.
    sources: Arc<str>,
    /// For an agent that does not answer sync-config itself, the last round of heartbeats, by which its
    /// sync-config is judged ([`crate::plugin_sync`]), and whether this batch
    /// added to it.
    round: Option<Round>,
    round_changed: bool,
    /// When its heartbeats were last sampled for its page's charts.
    sampled_at: i64,
}

/// The longest pause between tries to write a batch the sink refused.
const SINK_RETRY_MAX: Duration = Duration::from_secs(5);
/// Sink failures are logged at most this often, however many streams see them.
const SINK_WARN_EVERY_MS: i64 = 10_000;
static LAST_SINK_WARNING: AtomicI64 = AtomicI64::new(0);

struct StreamTask {
    state: Arc<ServerState>,
    cert: PeerCert,
    conn: Connection,
    session: Option<Session>,
    /// Shared with the stream of commands ([`to_command`]).
    product: Arc<OnceLock<String>>,
}

enum Step {
    Continue,
    Close(Closing),
}

impl StreamTask {
    async fn run(mut self, mut inbound: Streaming<PackagedData>) {
        let reason = loop {
            let msg = tokio::select! {
                reason = self.conn.closed() => break Some(reason),
                msg = inbound.message() => msg,
            };
            match msg {
                // Boxed: the work on a batch needs far more room than waiting for
                // one, and a stream spends its life waiting.
                Ok(Some(pd)) => match Box::pin(self.handle(Box::new(pd))).await {
                    Step::Continue => {}
                    Step::Close(reason) => break Some(reason),
                },
                Ok(None) => {
                    debug!("agent closed the stream");
                    break None;
                }
                Err(status) => match refusal(&status) {
                    Some(reason) => {
                        warn!(serial = %self.cert.serial, code = ?status.code(), message = status.message(),
                            "refused a message the stream cannot take");
                        break Some(reason);
                    }
                    None => {
                        debug!(code = ?status.code(), message = status.message(), "stream ended");
                        break None;
                    }
                },
            }
        };
        let label = reason.as_ref().map_or("ended", Closing::label);
        self.state
            .metrics
            .streams_closed
            .get_or_create(&Reason { reason: label })
            .inc();
        if let Some(reason) = reason {
            info!(?reason, "closing stream");
            // The receiver may already be gone; then there is nobody to tell.
            let _ = self.conn.commands.try_send(Box::new(Outbound::Close(reason)));
        }
        // Boxed like the work on a batch: closing needs the store, whose futures
        // would otherwise widen every waiting stream's task.
        Box::pin(self.finish()).await;
    }

    async fn finish(self) {
        let Some(session) = self.session else { return };
        let agent_id = &self.cert.agent_id;
        if self.state.connections.unregister(agent_id, session.generation) {
            self.state.metrics.agent_gone(agent_id);
            self.state.forget_agent(agent_id);
            let instance = &self.state.cluster.instance;
            let ended = self
                .state
                .store
                .agent_disconnected(agent_id, now_ms(), instance, session.connected_at);
            if let Err(e) = ended.await {
                warn!(error = %e, "cannot mark agent offline");
            }
            info!("agent offline");
        }
    }

    /// The first valid batch of a stream: registers it, marks the agent online
    /// here, restores where its numbering stood, and sends the desired plugin set.
    async fn open(&mut self, agent_id: &str, meta: AgentMeta, epoch: u64, acked: u64, now: i64) -> Result<(), Step> {
        // Before the stream can be reached: commands are addressed by it.
        let _ = self.product.set(meta.product.clone());
        let generation = self.state.connections.register(agent_id, self.conn.clone());
        let instance = &self.state.cluster.instance;
        if let Err(e) = self.state.store.agent_connected(agent_id, &meta, now, instance).await {
            return Err(unavailable("registry", e));
        }
        let (mark, stored) = self
            .state
            .stream_start(agent_id)
            .await
            .map_err(|e| unavailable("registry", e))?;
        let mut gaps = match stored {
            Some((epoch, seq, sources)) => Gaps::restore(epoch, seq, &sources),
            None => Gaps::default(),
        };
        gaps.resumed(epoch, acked);
        info!(version = %meta.version, hostname = %meta.hostname, "agent online");
        self.session = Some(Session {
            generation,
            connected_at: now,
            round: None,
            round_changed: false,
            sampled_at: 0,
            meta,
            mark,
            plugins: None,
            gaps,
            // Replaced by the first numbered batch's snapshot.
            sources: Arc::from(""),
        });
        // Every (re)connect gets the desired plugin set, if the server manages it,
        // whatever the product.
        if let Err(e) = self.state.push_config(agent_id, None).await {
            warn!(error = %e, "cannot send the desired plugin set");
        }
        Ok(())
    }

    /// The host facts a batch carries changed: stored, then kept for comparison.
    async fn host_changed(&mut self, agent_id: &str, meta: AgentMeta, now: i64) -> Result<(), Step> {
        if let Err(e) = self.state.store.agent_meta(agent_id, &meta, now).await {
            return Err(unavailable("registry", e));
        }
        if let Some(s) = &mut self.session {
            s.meta = meta;
        }
        Ok(())
    }

    /// One batch. The message comes boxed so that the future does not carry a
    /// copy of it: with it, the future would outgrow the allocator's per-thread
    /// cache, and an idle server makes one such future per heartbeat.
    async fn handle(&mut self, mut pd: Box<PackagedData>) -> Step {
        let agent_id = self.cert.agent_id.clone();
        if pd.agent_id != agent_id {
            warn!(claimed = %pd.agent_id, serial = %self.cert.serial,
                "refused PackagedData: agent_id differs from the client certificate");
            return Step::Close(Closing::Refused(format!(
                "agent_id {:?} does not match the client certificate ({agent_id})",
                pd.agent_id
            )));
        }
        let now = now_ms();
        let meta = take_meta(&mut pd);
        // Only these stay; the rest of the message is dropped before any wait.
        let PackagedData {
            records: incoming,
            epoch,
            seq,
            acked,
            ..
        } = *pd;
        // What is rare (the first batch, changed host facts, lost records, store
        // writes for control records) is awaited boxed, so that the future of an
        // ordinary batch stays small enough for the allocator's per-thread cache.
        match &mut self.session {
            None => {
                if let Err(step) = Box::pin(self.open(&agent_id, meta, epoch, acked, now)).await {
                    return step;
                }
            }
            Some(s) if s.meta != meta => {
                if let Err(step) = Box::pin(self.host_changed(&agent_id, meta, now)).await {
                    return step;
                }
            }
            Some(_) => {}
        }
        let numbered = seq > 0;
        let mark = self.session.as_ref().and_then(|s| s.mark);
        if numbered && mark.is_some_and(|(e, s)| e == epoch && seq <= s) {
            debug!(seq, "duplicate batch dropped");
            return self.ack(epoch, seq).await;
        }
        let mut lost: HashMap<String, Tally> = HashMap::new();
        let mut records = Vec::with_capacity(incoming.len());
        if let Some(s) = &mut self.session {
            s.gaps.batch(epoch, seq);
            for r in incoming {
                if let Some(l) = s.gaps.record(&r.plugin, r.instance, r.seq) {
                    lost.entry(l.plugin.clone())
                        .and_modify(|t| t.add(&l))
                        .or_insert_with(|| Tally::new(&l));
                }
                records.push((
                    !r.plugin.is_empty(),
                    Record {
                        data_type: r.data_type,
                        timestamp: r.timestamp,
                        data: r.data,
                    },
                ));
            }
        }
        for (plugin, t) in lost {
            self.state.metrics.records_lost.inc_by(t.records);
            warn!(%plugin, instance = t.instance, gaps = t.gaps, first = t.first, last = t.last,
                records = t.records, "records of a plugin went missing on the way");
            if let Err(e) = Box::pin(self.state.store.plugin_records_lost(&agent_id, &plugin, t.records, now)).await {
                return unavailable("registry", e);
            }
        }
        self.count_received(&records);
        let mut data = Vec::with_capacity(records.len());
        for (from_plugin, r) in records {
            if from_plugin && data_type::agent_only(r.data_type) {
                // The agent refuses these from plugins; a record claiming otherwise
                // is data, not an instruction.
                data.push(r);
                continue;
            }
            match self.control(&r, now).await {
                Ok(true) => data.push(r),
                Ok(false) => {}
                Err(e) => return unavailable("registry", e),
            }
        }
        if !data.is_empty() {
            let batch = Batch {
                agent_id: &agent_id,
                server_time: now,
                records: &data,
                epoch,
                seq,
            };
            if let Err(reason) = self.write(batch).await {
                return Step::Close(reason);
            }
        }
        if let Some(s) = &mut self.session
            && std::mem::take(&mut s.round_changed)
            && let Some(round) = &s.round
            && let Err(e) = Box::pin(plugin_sync::judge(&self.state, &agent_id, round, false, now)).await
        {
            return unavailable("registry", e);
        }
        if numbered {
            if let Some(s) = &mut self.session {
                if let Some(sources) = s.gaps.snapshot() {
                    s.sources = Arc::from(sources);
                }
                s.mark = Some((epoch, seq));
                self.state.set_mark(&agent_id, epoch, seq, Arc::clone(&s.sources));
            }
            return self.ack(epoch, seq).await;
        }
        Step::Continue
    }

    /// Writes a batch to the sink, trying again (and not acknowledging it) while
    /// the sink refuses, for as long as the stream lasts: the agent keeps it in
    /// its spool meanwhile, so an outage of the sink loses nothing.
    async fn write(&self, batch: Batch<'_>) -> Result<(), Closing> {
        let started = std::time::Instant::now();
        let written = self.state.sink.write(batch).await;
        self.state.metrics.sink_write.observe(started.elapsed().as_secs_f64());
        match written {
            Ok(()) => Ok(()),
            // Boxed: the timer and the retries are for outages only.
            Err(e) => Box::pin(self.write_again(batch, e)).await,
        }
    }

    /// Counts a batch's records and payload bytes by data type.
    fn count_received(&self, records: &[(bool, Record)]) {
        let mut by_type: Vec<(i32, u64, u64)> = Vec::new();
        for (_, r) in records {
            let bytes = r.data.len() as u64;
            match by_type.iter_mut().find(|t| t.0 == r.data_type) {
                Some(t) => {
                    t.1 += 1;
                    t.2 += bytes;
                }
                None => by_type.push((r.data_type, 1, bytes)),
            }
        }
        for (data_type, n, bytes) in by_type {
            self.state.metrics.received(data_type, n, bytes);
        }
    }

    async fn write_again(&self, batch: Batch<'_>, mut error: crate::sink::SinkError) -> Result<(), Closing> {
        let mut delay = Duration::from_millis(100);
        loop {
            self.state.metrics.sink_errors.inc();
            let now = now_ms();
            let last = LAST_SINK_WARNING.load(Ordering::Relaxed);
            if now - last >= SINK_WARN_EVERY_MS
                && LAST_SINK_WARNING
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::error!(error = %error, "the sink refused a batch; agents keep their records until it takes them again");
            } else {
                debug!(error = %error, "the sink refused a batch; trying again");
            }
            tokio::select! {
                reason = self.conn.closed() => return Err(reason),
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(SINK_RETRY_MAX);
            let Err(e) = self.state.sink.write(batch).await else {
                return Ok(());
            };
            error = e;
        }
    }

    async fn ack(&self, epoch: u64, seq: u64) -> Step {
        self.state.metrics.batches_acked.inc();
        // Waiting here when the agent does not read its commands stops this stream's
        // reads too: backpressure, not unbounded buffering.
        let ack = match self.conn.commands.try_send(Box::new(Outbound::Ack { epoch, seq })) {
            Ok(()) => return Step::Continue,
            Err(mpsc::error::TrySendError::Full(ack)) => ack,
            Err(mpsc::error::TrySendError::Closed(_)) => return Step::Close(Closing::Shutdown),
        };
        // Boxed: waiting for room is the exception.
        match Box::pin(self.conn.commands.send(ack)).await {
            Ok(()) => Step::Continue,
            Err(_) => Step::Close(Closing::Shutdown),
        }
    }

    /// Applies what the server itself reads from a record. Returns whether the
    /// record also goes to the sink.
    async fn control(&mut self, r: &Record, now: i64) -> Result<bool, crate::store::StoreError> {
        let agent_id = &self.cert.agent_id;
        match r.data_type {
            data_type::AGENT_HEARTBEAT => {
                // Read in place: a heartbeat every minute from every agent is most
                // of what an idle server does.
                let fields = match payload::fields(&r.data) {
                    Ok(f) => f,
                    Err(e) => {
                        warn!(data_type = r.data_type, error = %e, "undecodable payload in a Keel record");
                        return Ok(true);
                    }
                };
                if let Some(s) = &mut self.session {
                    let number = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
                    let spool_bytes = number("spool_bytes");
                    self.state
                        .metrics
                        .agent_heartbeat(agent_id, &s.meta.version, spool_bytes, number("dropped"));
                    let every = i64::try_from(crate::state::SAMPLE_EVERY.as_millis()).unwrap_or(i64::MAX);
                    if now - s.sampled_at >= every {
                        s.sampled_at = now;
                        let real = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0.0);
                        // At the start of its period: a stream that reconnects
                        // within one adds no second sample (the key is agent and time).
                        let sample = crate::store::Sample {
                            at: now - now.rem_euclid(every),
                            cpu: real("cpu"),
                            rss: number("rss"),
                            records_per_s: real("tx_tps"),
                            spool_bytes,
                        };
                        self.state.add_sample(agent_id, sample);
                    }
                }
                let json = serde_json::to_string(&JsonFields(&fields)).unwrap_or_else(|_| "{}".into());
                self.state.set_heartbeat(agent_id, json, now);
                if let Some(s) = &mut self.session
                    && !Product::of(&s.meta.product).answers_config_token()
                {
                    // A new round of heartbeats: the last one is complete.
                    let last = s.round.replace(Round::begin(now));
                    s.round_changed = true;
                    if let Some(last) = last {
                        Box::pin(plugin_sync::judge(&self.state, agent_id, &last, true, now)).await?;
                    }
                }
                if let Some(list) = fields.get("plugins")
                    && self.session.as_ref().is_none_or(|s| s.plugins.as_deref() != Some(list))
                {
                    let present: Vec<&str> = list.split(',').filter(|n| !n.is_empty()).collect();
                    self.state.metrics.plugins_present(agent_id, &present);
                    let names = present.into_iter().map(str::to_owned).collect();
                    Box::pin(self.state.store.plugins_present(agent_id, &names)).await?;
                    if let Some(s) = &mut self.session {
                        s.plugins = Some(list.to_owned());
                    }
                }
                Ok(true)
            }
            data_type::PLUGIN_HEARTBEAT => {
                if let Some(fields) = decode(r) {
                    if let Some(name) = fields.get("name").filter(|n| !n.is_empty()) {
                        let state = fields.get("state").map_or("", String::as_str);
                        let restarts = fields.get("restarts").and_then(|v| v.parse().ok()).unwrap_or(0);
                        self.state.metrics.plugin_heartbeat(agent_id, name, state, restarts);
                    }
                    Box::pin(self.state.store.plugin_heartbeat(agent_id, &fields, now)).await?;
                    if let Some(s) = &mut self.session
                        && let Some(round) = &mut s.round
                    {
                        round.plugin(&fields);
                        s.round_changed = true;
                    }
                }
                Ok(true)
            }
            data_type::TASK_RESULT => {
                if let Some(fields) = decode(r)
                    && let Some(token) = fields.get("token").filter(|t| !t.is_empty()).cloned()
                {
                    let stored = Box::pin(self.state.store.task_result(&token, agent_id, &fields, now)).await?;
                    Box::pin(self.reply(r.data_type, fields)).await;
                    if stored {
                        self.state.rollout_wake.notify_one();
                    } else {
                        debug!(%token, "task result for an unknown or finished task of this agent");
                    }
                }
                Ok(true)
            }
            data_type::CERT_RENEWAL => {
                Box::pin(self.renew(r)).await;
                Ok(false)
            }
            data_type::KEY_PROOF => {
                if let Some(fields) = decode(r) {
                    Box::pin(self.reply(r.data_type, fields)).await;
                }
                Ok(true)
            }
            _ => Ok(true),
        }
    }

    /// Hands an answer to whoever waits for its task, on any instance.
    async fn reply(&self, data_type: i32, fields: HashMap<String, String>) {
        let reply = crate::cluster::Reply {
            agent_id: self.cert.agent_id.clone(),
            data_type,
            fields,
        };
        self.state.cluster.deliver(reply).await;
    }

    async fn renew(&self, r: &Record) {
        let agent_id = &self.cert.agent_id;
        let csr = decode(r).and_then(|mut f| f.remove("csr")).unwrap_or_default();
        let answer = match self.state.issue(agent_id, &csr, true).await {
            Ok(issued) => {
                info!(serial = %issued.serial, "renewed the agent certificate");
                Ok(issued.pem)
            }
            Err(e) => {
                warn!(error = %e, "refused certificate renewal");
                Err(e.to_string())
            }
        };
        if self
            .conn
            .commands
            .send(Box::new(Outbound::Renewal(answer)))
            .await
            .is_err()
        {
            debug!("stream gone before the renewal answer");
        }
    }
}

fn decode(r: &Record) -> Option<HashMap<String, String>> {
    match payload::decode(&r.data) {
        Ok(f) => Some(f),
        Err(e) => {
            warn!(data_type = r.data_type, error = %e, "undecodable payload in a Keel record");
            None
        }
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Step {
    tracing::error!(error = %e, "{what} failed; the batch is not acknowledged");
    Step::Close(Closing::Unavailable(format!("{what} unavailable")))
}
