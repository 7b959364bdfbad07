//! Pieces every Keel binary shares. Nothing here knows about agents, servers or
//! the wire protocol; it may not depend on `keel-proto`.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod fingerprint;
pub mod fsutil;
pub mod ids;
pub mod logging;
pub mod secret;
pub mod shutdown;
pub mod time;
pub mod tls;

/// The version of this build: `BUILD_VERSION` at compile time, or the crate version.
pub const VERSION: &str = match option_env!("BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};
