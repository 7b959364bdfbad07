//! What the agent sends up: a record, where it came from, and the header that
//! names the agent on every batch. A leaf: the producers, the outbox, the
//! encoder (`wire`) and the transport all share these types, and import nothing
//! of each other for them.

use std::sync::Arc;

use bytes::Bytes;
use keel_common::time::now_secs;
use keel_proto::payload;

use crate::host::Addresses;

/// The object_name of tasks for the agent, and its product name.
pub const PRODUCT: &str = keel_proto::product::KEEL_AGENT;

/// The `PackagedData` header: who this agent is.
#[derive(Debug, Clone, Default)]
pub struct Header {
    /// Agent ID (the certificate's).
    pub agent_id: String,
    /// Host name.
    pub hostname: String,
    /// Interface addresses.
    pub addresses: Addresses,
}

/// A record on its way up; `data` is an encoded `Payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record type.
    pub data_type: i32,
    /// Unix seconds.
    pub timestamp: i64,
    /// Encoded `Payload`, never decoded on the way.
    pub data: Bytes,
    /// The plugin run that wrote it; `None` for the agent's own records.
    pub source: Option<Source>,
}

/// Where a plugin's record comes from, so the server can count gaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The plugin's name.
    pub plugin: Arc<str>,
    /// Names this run of the plugin; the agent picks it at each start.
    pub instance: u32,
    /// The record's number in the run (`Record.seq`); 0 when not numbered.
    pub seq: u64,
}

impl Record {
    /// A record the agent produces itself, stamped now.
    pub fn new<K: Into<String>, V: Into<String>>(data_type: i32, fields: impl IntoIterator<Item = (K, V)>) -> Self {
        Self {
            data_type,
            timestamp: now_secs(),
            data: payload::encode(fields),
            source: None,
        }
    }
}
