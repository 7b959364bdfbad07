//! file-delivery: the Keel plugin that writes secret files pushed from an
//! operator's vault, only when a file is missing or has changed.
//!
//! The operator's keeper (`keelctl files push`) seals each file to the host's own
//! X25519 key with HPKE and signs it with the keeper's Ed25519 key
//! ([`envelope`]). The server only relays tasks it cannot read. The plugin
//! believes only keeper keys from its local, root-owned configuration ([`config`]),
//! refuses anything older than what it holds, and writes atomically beneath its
//! files directory without following links ([`store`]). A local file server on a
//! loopback address hands each file to the users its delivery names ([`server`]).
//!
//! Tasks (6200 deliver, 6201 inventory, 6202 remove) and records are in
//! [`plugin`].
//!
//! Without the default `plugin` feature the crate is [`envelope`] and [`bundle`]
//! alone: what a keeper needs to seal, sign, compare digests and pack one host's
//! changes into tasks.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bundle;
pub mod envelope;

#[cfg(feature = "plugin")]
pub mod config;
#[cfg(feature = "plugin")]
pub mod plugin;
#[cfg(feature = "plugin")]
pub mod server;
#[cfg(feature = "plugin")]
pub mod store;
#[cfg(feature = "plugin")]
pub mod uploads;

/// The version of this build: `BUILD_VERSION` at compile time, else the crate's.
pub const VERSION: &str = match option_env!("BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};
