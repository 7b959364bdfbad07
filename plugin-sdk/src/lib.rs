//! The Keel plugin SDK.
//!
//! A Keel plugin is a separate executable that the agent starts with two extra
//! pipes: it reads `Task` frames from fd 3 and writes `Record` frames to fd 4. Each
//! frame is a 4-byte little-endian length followed by protobuf bytes. The message
//! types are re-exported from [`keel_proto::grpc`].
//!
//! This crate is an API boundary. The `Client`, the logging bridge and the debug mode
//! arrive with the plugin runtime; until then it exposes the wire types only.
#![forbid(unsafe_code)]

pub use keel_proto::grpc::{Payload, Record, Task};
