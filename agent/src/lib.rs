//! keel-agent as a library: `main.rs` only parses arguments and calls in here.
//!
//! Only [`transport`] and [`wire`] see prost and tonic types. Plugins are separate
//! processes; nothing a plugin does may take the agent down.
//!
//! `unsafe` is denied everywhere but `plugin::spawn`, which maps the plugin pipes
//! onto fds 3 and 4 in the forked child and says why that is sound.
#![deny(unsafe_code)]

pub mod config;
pub mod enroll;
pub mod heartbeat;
pub mod host;
pub mod id;
pub mod logging;
pub mod metrics;
pub mod outbox;
pub mod pki;
pub mod plugin;
pub mod record;
pub mod renew;
pub mod run;
pub mod spool;
pub mod tasks;
pub mod transport;
pub mod upgrade;
pub mod wire;
