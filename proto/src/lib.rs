//! Keel's wire formats. This crate is an API boundary: plugin authors, Elkeid peers
//! and every Keel component depend on what it defines.
//!
//! - [`grpc`]: the generated messages of `proto/grpc.proto` (package `grpc`), and with
//!   the `transport` feature the tonic client and server of `grpc.Transfer`.
//! - [`data_type`]: the one table of every `data_type` Keel knows.
//! - [`payload`]: encoding and decoding of `Payload` bytes, for the few records the
//!   agent and server produce or read themselves. Plugin payloads are never decoded
//!   on the data path.
//! - `keyproof` (with the `keyproof` feature): the proof of key possession in
//!   enrollment by key.
//! - [`keepalive`]: when an agent pings the server to find a dead stream.
//! - [`product`]: agent products and what the server does differently for each.
//! - `codec` (with `transport`): the generated client's and server's codec.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// Generated from `proto/grpc.proto`; the comments there are the field docs. The
/// code is committed (`src/generated/`, checked by `tests/generated.rs`), so a
/// plugin's build compiles no protobuf compiler.
#[cfg(not(feature = "transport"))]
#[allow(missing_debug_implementations, missing_docs, clippy::all)]
pub mod grpc {
    include!("generated/grpc.rs");
}

/// Generated from `proto/grpc.proto`, with the tonic client and server of
/// `grpc.Transfer`; the comments there are the field docs.
#[cfg(feature = "transport")]
#[allow(missing_debug_implementations, missing_docs, clippy::all)]
pub mod grpc {
    include!("generated/grpc_transport.rs");
}

#[cfg(feature = "transport")]
pub mod codec;
pub mod data_type;
pub mod frame;
pub mod keepalive;
#[cfg(feature = "keyproof")]
pub mod keyproof;
pub mod payload;
pub mod product;
