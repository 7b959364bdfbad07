//! Where records go once the server has them. The stream code sees only the
//! [`Sink`] trait, so a new sink (NATS JetStream) needs no change there.
//!
//! A sink's `write` returning `Ok` is the persistence point: the server acknowledges
//! a batch to its agent only after that.

mod file;
mod nats;

use std::collections::HashMap;
use std::fmt::Debug;

use base64::Engine;
use bytes::Bytes;
use futures::future::BoxFuture;
use keel_proto::{data_type, payload};
use serde::Serialize;

pub use file::FileSink;
pub use nats::NatsSink;

/// A record as the server handles it; `data` holds the payload bytes as the
/// plugin wrote them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's data_type.
    pub data_type: i32,
    /// Producer timestamp, Unix seconds.
    pub timestamp: i64,
    /// Encoded `Payload`.
    pub data: Bytes,
}

/// One agent's batch.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// The agent, as its certificate names it.
    pub agent_id: &'a str,
    /// Arrival time, Unix ms.
    pub server_time: i64,
    /// The records, in the agent's order.
    pub records: &'a [Record],
    /// The batch's sequence space; with `seq`, identifies a numbered batch.
    pub epoch: u64,
    /// The batch number; 0 for an unnumbered batch.
    pub seq: u64,
}

/// A sink could not persist a batch; the batch is not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Writing failed.
    #[error("sink {sink}: {source}")]
    Io {
        /// Which sink.
        sink: String,
        /// Why.
        source: std::io::Error,
    },
    /// NATS JetStream did not take a record.
    #[error("sink nats: {0}")]
    Nats(String),
}

/// The highest persisted batch per agent: `(epoch, seq)`.
pub type Marks = HashMap<String, (u64, u64)>;

/// A destination for records.
pub trait Sink: Send + Sync + Debug {
    /// Persists a batch. `Ok` means it will survive a server crash.
    fn write<'a>(&'a self, batch: Batch<'a>) -> BoxFuture<'a, Result<(), SinkError>>;

    /// What the sink knew it had persisted when it was opened, read back from its
    /// own data, so a resend after a crash is recognised even if the server died
    /// between a write and noting it elsewhere.
    fn recovered_marks(&self) -> Marks;

    /// Why the sink cannot take records now, if it knows; `None` while healthy.
    fn trouble(&self) -> Option<String> {
        None
    }

    /// Adds the sink's own series to the server's metrics.
    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}
}

/// A record as JSON, the same in every sink: `agent_id`, `data_type`,
/// `timestamp`, `server_time`, for numbered batches `epoch` (hex) and `seq`, and
/// either `fields` (Keel's own record types, decoded) or `data` (base64 of the
/// payload bytes exactly as the plugin wrote them).
#[derive(Serialize)]
struct Line<'a> {
    agent_id: &'a str,
    data_type: i32,
    timestamp: i64,
    server_time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fields: Option<JsonFields<'a, 'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<String>,
}

/// A payload's fields as one JSON object, in key order, written from the borrowed
/// strings.
pub(crate) struct JsonFields<'f, 'a>(pub &'f payload::Fields<'a>);

impl Serialize for JsonFields<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter())
    }
}

/// Appends `r` of `batch` to `out` as one JSON object (no newline).
fn write_json(batch: &Batch<'_>, r: &Record, out: &mut Vec<u8>) {
    let numbered = batch.seq > 0;
    let fields = if data_type::is_keel_payload(r.data_type) {
        payload::fields(&r.data).ok()
    } else {
        None
    };
    let data = match fields {
        Some(_) => None,
        None => Some(base64::engine::general_purpose::STANDARD.encode(&r.data)),
    };
    let line = Line {
        agent_id: batch.agent_id,
        data_type: r.data_type,
        timestamp: r.timestamp,
        server_time: batch.server_time,
        epoch: numbered.then(|| format!("{:016x}", batch.epoch)),
        seq: numbered.then_some(batch.seq),
        fields: fields.as_ref().map(JsonFields),
        data,
    };
    // Serialising plain strings and integers into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &line);
}
