//! key-request: the Keel plugin that looks agent keys up in an external database,
//! with Wazuh authd's key_request semantics, so that a host can enroll by proving
//! it knows its agent key.
//!
//! Tasks: 6000 looks an agent up by ID or IP and answers with its ID, name and IP;
//! 6001 also checks a key proof ([`keel_proto::keyproof`]) against the key. The key
//! itself never leaves the plugin: it is held in a [`key::AgentKey`], which has no
//! way to be printed, and it is used for nothing but the proof.
//!
//! The parts: [`config`] (the `DETAIL` options), [`request`] (tasks, checked before
//! anything runs), [`queue`] (bounded, joining identical lookups), [`provider`]
//! (the socket and the program that know the keys), [`reply`] (their answers,
//! checked field by field) and [`plugin`] (the threads and the answers).
//!
//! [`mysql_provider`] is not part of the plugin: it is the `keel-keyprovider-mysql`
//! binary, a provider that answers lookups from a MySQL or MariaDB table.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod key;
pub mod mysql_provider;
pub mod plugin;
pub mod provider;
pub mod queue;
pub mod reply;
pub mod request;

use tracing::Level;

/// The log level sent to the agent and written to stderr.
pub const LOG_LEVEL: Level = Level::INFO;
