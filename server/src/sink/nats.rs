//! The scale-out sink: NATS JetStream, one message per record.
//!
//! A record of data type N goes to `<subject_prefix>.N` with the headers
//! `Keel-Agent-Id`, `Keel-Data-Type` and `Keel-Timestamp`, and the same JSON body
//! the file sink writes (payload bytes unchanged, in base64). A batch counts as
//! persisted only when JetStream has acknowledged every record of it.
//!
//! Exactly once: a record of a numbered batch carries `Nats-Msg-Id:
//! <agent>.<epoch>.<seq>.<index>`, so the resend of a batch whose
//! acknowledgement a crash lost is dropped by JetStream's duplicate window
//! (set to [`DUPLICATE_WINDOW`] on a stream this sink creates).
//!
//! While NATS is unreachable `write` fails, the batch is not acknowledged, and
//! the agent keeps it in its spool; [`Sink::trouble`] says so for `/healthz`.

use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, Context};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use futures::future::{BoxFuture, try_join_all};
use tokio::sync::OnceCell;

use super::{Batch, Marks, Sink, SinkError};

/// How long JetStream remembers message IDs on a stream this sink creates.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(20 * 60);
/// Records published and not yet acknowledged, across all streams. A batch takes
/// its share at once (in chunks of at most this), so batches never wait on one
/// another's half-taken shares.
const ACKS_IN_FLIGHT: usize = 8192;

/// JetStream as a sink.
pub struct NatsSink {
    js: Context,
    stream: String,
    subject_prefix: String,
    ack_timeout: Duration,
    /// Set once the stream is known to exist.
    ready: OnceCell<()>,
    /// The last failure, cleared by the next success.
    trouble: Mutex<Option<String>>,
    /// Shares of [`ACKS_IN_FLIGHT`].
    in_flight: tokio::sync::Semaphore,
    /// From publishing a chunk of records to JetStream's last acknowledgement.
    publish_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl std::fmt::Debug for NatsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSink")
            .field("stream", &self.stream)
            .field("subject_prefix", &self.subject_prefix)
            .finish_non_exhaustive()
    }
}

impl NatsSink {
    /// Connects (in the background: a NATS that is down now is retried) and
    /// prepares publishing to `stream`.
    pub async fn open(
        url: &str,
        stream: &str,
        subject_prefix: &str,
        ack_timeout: Duration,
        name: &str,
    ) -> Result<Self, SinkError> {
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .connect(url)
            .await
            .map_err(|e| SinkError::Nats(format!("cannot connect: {e}")))?;
        let js = jetstream::context::ContextBuilder::new()
            .timeout(ack_timeout)
            .max_ack_inflight(ACKS_IN_FLIGHT)
            .build(client);
        Ok(Self {
            js,
            stream: stream.to_owned(),
            subject_prefix: subject_prefix.to_owned(),
            ack_timeout,
            ready: OnceCell::new(),
            trouble: Mutex::new(None),
            in_flight: tokio::sync::Semaphore::new(ACKS_IN_FLIGHT),
            publish_seconds: crate::metrics::latency(),
        })
    }

    async fn ensure_stream(&self) -> Result<(), SinkError> {
        self.ready
            .get_or_try_init(|| async {
                let config = jetstream::stream::Config {
                    name: self.stream.clone(),
                    subjects: vec![format!("{}.>", self.subject_prefix)],
                    duplicate_window: DUPLICATE_WINDOW,
                    ..Default::default()
                };
                self.js
                    .get_or_create_stream(config)
                    .await
                    .map(|_| ())
                    .map_err(|e| SinkError::Nats(format!("stream {}: {e}", self.stream)))
            })
            .await
            .map(|_| ())
    }

    async fn publish(&self, batch: Batch<'_>) -> Result<(), SinkError> {
        // Boxed, and only until the stream exists: creating it is a large future
        // that every later write would otherwise carry.
        if !self.ready.initialized() {
            Box::pin(self.ensure_stream()).await?;
        }
        for (chunk_index, chunk) in batch.records.chunks(ACKS_IN_FLIGHT).enumerate() {
            let first = chunk_index * ACKS_IN_FLIGHT;
            let share = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            // The futures that wait (for permits, for the publish) are boxed: one
            // record a minute from an idle agent is the common case, and a small
            // write future is what keeps it cheap.
            let _permits = match self.in_flight.try_acquire_many(share) {
                Ok(p) => p,
                Err(_) => Box::pin(self.in_flight.acquire_many(share))
                    .await
                    .map_err(|e| SinkError::Nats(e.to_string()))?,
            };
            let started = std::time::Instant::now();
            let mut acks = Vec::with_capacity(chunk.len());
            for (i, r) in chunk.iter().enumerate() {
                let publish =
                    self.js
                        .publish_with_headers(self.subject(r), headers(&batch, r, first + i), body(&batch, r));
                let ack = Box::pin(publish)
                    .await
                    .map_err(|e| SinkError::Nats(format!("publish: {e}")))?;
                acks.push(ack.into_future());
            }
            match tokio::time::timeout(self.ack_timeout, try_join_all(acks)).await {
                Ok(Ok(_)) => self.publish_seconds.observe(started.elapsed().as_secs_f64()),
                Ok(Err(e)) => return Err(SinkError::Nats(format!("not acknowledged: {e}"))),
                Err(_) => {
                    return Err(SinkError::Nats(format!(
                        "not acknowledged within {} s",
                        self.ack_timeout.as_secs()
                    )));
                }
            }
        }
        Ok(())
    }

    fn subject(&self, r: &super::Record) -> String {
        format!("{}.{}", self.subject_prefix, r.data_type)
    }

    fn set_trouble(&self, t: Option<String>) {
        *self.trouble.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = t;
    }
}

/// The header names, made once: a name built from a `&str` is parsed and copied
/// on every record.
const AGENT_ID: HeaderName = HeaderName::from_static("Keel-Agent-Id");
const DATA_TYPE: HeaderName = HeaderName::from_static("Keel-Data-Type");
const TIMESTAMP: HeaderName = HeaderName::from_static("Keel-Timestamp");

/// The headers of record `index` of `batch`.
fn headers(batch: &Batch<'_>, r: &super::Record, index: usize) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if batch.seq > 0 {
        let id = format!("{}.{:016x}.{}.{index}", batch.agent_id, batch.epoch, batch.seq);
        headers.insert(async_nats::header::NATS_MESSAGE_ID, HeaderValue::from(id));
    }
    headers.insert(AGENT_ID, HeaderValue::from(batch.agent_id));
    headers.insert(DATA_TYPE, HeaderValue::from(r.data_type.to_string()));
    headers.insert(TIMESTAMP, HeaderValue::from(r.timestamp.to_string()));
    headers
}

/// The message body: the record as JSON, as the file sink writes it.
fn body(batch: &Batch<'_>, r: &super::Record) -> bytes::Bytes {
    let mut body = Vec::with_capacity(r.data.len() * 4 / 3 + 160);
    super::write_json(batch, r, &mut body);
    body.into()
}

impl Sink for NatsSink {
    fn write<'a>(&'a self, batch: Batch<'a>) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let result = self.publish(batch).await;
            match &result {
                Ok(()) => self.set_trouble(None),
                Err(e) => self.set_trouble(Some(e.to_string())),
            }
            result
        })
    }

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "nats_publish_seconds",
            "From publishing a batch's records to JetStream's last acknowledgement",
            self.publish_seconds.clone(),
        );
    }

    fn recovered_marks(&self) -> Marks {
        // JetStream's duplicate window makes resends harmless; nothing to read back.
        Marks::new()
    }

    fn trouble(&self) -> Option<String> {
        self.trouble
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    use crate::sink::Record;

    fn nats_url() -> String {
        std::env::var("KEEL_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
    }

    /// More records in flight than the acknowledgement window, from many batches
    /// at once (what 1,000 agents sending together do): every batch completes,
    /// each record is stored once, and a resent batch is dropped by JetStream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_batches_beyond_the_ack_window_all_land_once() {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let (stream, prefix) = (format!("KEEL_UNIT_{tag}"), format!("keel.unit{tag}"));
        let sink = Arc::new(
            NatsSink::open(&nats_url(), &stream, &prefix, Duration::from_secs(30), "unit")
                .await
                .unwrap(),
        );
        let records: Vec<Record> = (0..1000)
            .map(|i| Record {
                data_type: 6999,
                timestamp: 1,
                data: bytes::Bytes::from(format!("r{i}")),
            })
            .collect();
        let records = Arc::new(records);
        let writers: Vec<_> = (0..20)
            .map(|a| {
                let (sink, records) = (Arc::clone(&sink), Arc::clone(&records));
                tokio::spawn(async move {
                    let agent = format!("agent-{a}");
                    let batch = Batch {
                        agent_id: &agent,
                        server_time: 1,
                        records: &records,
                        epoch: 1,
                        seq: 1,
                    };
                    sink.write(batch).await.unwrap();
                    // The same batch again, as after a lost acknowledgement.
                    sink.write(batch).await.unwrap();
                })
            })
            .collect();
        for w in writers {
            tokio::time::timeout(Duration::from_secs(60), w).await.unwrap().unwrap();
        }
        let js = jetstream::new(async_nats::connect(nats_url()).await.unwrap());
        let mut info = js.get_stream(&stream).await.unwrap();
        assert_eq!(info.info().await.unwrap().state.messages, 20_000);
        assert!(sink.trouble().is_none());
        js.delete_stream(&stream).await.unwrap();
    }
}
