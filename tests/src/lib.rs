//! The shared end-to-end harness: real `keel-server` and `keel-agent` processes,
//! listening on 127.0.0.1 with ports the kernel picks, each in its own temporary
//! directory. Tests wait on conditions with [`eventually`], never on fixed sleeps.
//!
//! The binaries are the workspace's own debug builds; `./build.sh test` builds
//! them before running the tests.
// A harness reports failure by panicking, with a message saying what failed.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod cluster;
pub mod filedelivery;
pub mod mariadb;
pub mod metrics;
pub mod netns;
pub mod proxy;

mod agent;
mod api;
mod dpkg;
mod grpc;
mod pki;
mod procs;
mod server;
mod sim;
mod support;

pub use agent::Agent;
pub use api::Api;
pub use dpkg::{deb, dpkg, dpkg_command, packages, run, throwaway_root};
pub use grpc::{RawStream, batch, raw_channel, raw_stream, stream_refusal};
pub use pki::{Pair, agent_pair, ca_signed, foreign_signed, key_enroll_body};
pub use procs::Supervisor;
pub(crate) use server::failure_report;
pub use server::{Server, ServerOptions, postgres_schema, sink_records, test_database};
pub use sim::{InFlight, SimAgent, SimBehavior, SimLog};
pub use support::{
    DEADLINE, bin, eventually, eventually_within, files_under, free_port, log_filter, signal, test_plugin, wait_bounded,
};
pub(crate) use support::{output_ok, toml_path};
