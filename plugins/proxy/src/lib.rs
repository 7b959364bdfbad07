//! proxy: the Keel plugin that runs the server's audit jobs. A job is a
//! short-lived reverse proxy from the server into one intranet target: the plugin
//! connects to the target, opens a tunnel to the server's tunnel endpoint (port
//! 6753, mutual TLS with the agent's certificate) and relays bytes, so that the
//! server's audit engine can, for example, read the TLS certificate the target
//! presents.
//!
//! Which targets may be reached is decided on the host alone: a local allow list of
//! networks and ports ([`config`]), in a file only root can change, applied to the
//! addresses a target name resolves to, right before connecting ([`job`]).
//!
//! Discovery ([`discover`]) sweeps only what that list permits.
//!
//! Tasks and records are in [`plugin`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod discover;
pub mod job;
pub mod plugin;

/// The version of this build: `BUILD_VERSION` at compile time, else the crate's.
pub const VERSION: &str = match option_env!("BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};
