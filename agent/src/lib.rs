//! keel-agent as a library: `main.rs` only parses arguments and calls in here.
//!
//! Only [`transport`] sees prost and tonic types. Plugins are separate processes;
//! nothing a plugin does may take the agent down.
#![forbid(unsafe_code)]

pub mod config;
pub mod enroll;
pub mod heartbeat;
pub mod host;
pub mod id;
pub mod logging;
pub mod outbox;
pub mod pki;
pub mod renew;
pub mod run;
pub mod tasks;
pub mod transport;
