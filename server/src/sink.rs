//! Where records go once the server has them. The stream code sees only the
//! [`Sink`] trait, so a new sink (NATS JetStream) needs no change there.
//!
//! A sink's `write` returning `Ok` is the persistence point: the server acknowledges
//! a batch to its agent only after that.

mod file;

use std::collections::HashMap;
use std::fmt::Debug;

use bytes::Bytes;
use futures::future::BoxFuture;

pub use file::FileSink;

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
}
