//! keel-server as a library: `main.rs` only parses arguments and calls in here, so
//! tests can drive every part.
//!
//! Only [`grpc`] and [`tls`] see prost/tonic types, and only they, [`tunnel`] and
//! [`inventory`] (which speak TLS through agents' tunnels) see rustls ([`tlsprobe`]
//! reads TLS 1.2 and older handshakes itself); the rest
//! works on domain types ([`sink::Record`], [`connections::Outbound`]).
//!
#![forbid(unsafe_code)]

pub mod admin;
pub mod audits;
pub mod certinfo;
pub mod cluster;
pub mod components;
pub mod config;
pub mod connections;
pub mod discovery;
pub mod encoding;
pub mod files;
pub mod findings;
pub mod gaps;
pub mod grpc;
pub mod http;
pub mod inventory;
pub mod keyenroll;
pub mod lease;
pub mod memory;
pub mod metrics;
pub mod ocsp;
pub mod pki;
pub mod plugin_sync;
pub mod policy;
pub mod quickstart;
pub mod release;
pub mod rollout;
pub mod serve;
pub mod sink;
pub mod state;
pub mod states;
pub mod store;
#[cfg(test)]
mod testutil;
pub mod tls;
pub mod tlsprobe;
pub mod tunnel;
pub mod tunnels;
