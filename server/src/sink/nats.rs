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
use async_nats::{HeaderMap, HeaderValue};
use futures::future::{BoxFuture, try_join_all};
use tokio::sync::OnceCell;

use super::{Batch, Marks, Sink, SinkError};

/// How long JetStream remembers message IDs on a stream this sink creates.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(20 * 60);

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
        let mut js = jetstream::new(client);
        js.set_timeout(ack_timeout);
        Ok(Self {
            js,
            stream: stream.to_owned(),
            subject_prefix: subject_prefix.to_owned(),
            ack_timeout,
            ready: OnceCell::new(),
            trouble: Mutex::new(None),
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
        self.ensure_stream().await?;
        let numbered = batch.seq > 0;
        let mut acks = Vec::with_capacity(batch.records.len());
        for (index, r) in batch.records.iter().enumerate() {
            let mut headers = HeaderMap::new();
            if numbered {
                let id = format!("{}.{:016x}.{}.{index}", batch.agent_id, batch.epoch, batch.seq);
                headers.insert("Nats-Msg-Id", HeaderValue::from(id.as_str()));
            }
            headers.insert("Keel-Agent-Id", HeaderValue::from(batch.agent_id));
            headers.insert("Keel-Data-Type", HeaderValue::from(r.data_type.to_string().as_str()));
            headers.insert("Keel-Timestamp", HeaderValue::from(r.timestamp.to_string().as_str()));
            let mut body = Vec::with_capacity(r.data.len() * 4 / 3 + 160);
            super::write_json(&batch, r, &mut body);
            let subject = format!("{}.{}", self.subject_prefix, r.data_type);
            let ack = self
                .js
                .publish_with_headers(subject, headers, body.into())
                .await
                .map_err(|e| SinkError::Nats(format!("publish: {e}")))?;
            acks.push(ack.into_future());
        }
        let all = try_join_all(acks);
        match tokio::time::timeout(self.ack_timeout, all).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(SinkError::Nats(format!("not acknowledged: {e}"))),
            Err(_) => Err(SinkError::Nats(format!(
                "not acknowledged within {} s",
                self.ack_timeout.as_secs()
            ))),
        }
    }

    fn set_trouble(&self, t: Option<String>) {
        *self.trouble.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = t;
    }
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
