//! End-to-end tests: real servers, agents and TLS on 127.0.0.1.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod agent;
mod api;
mod cluster;
mod console;
mod control;
mod elkeid;
mod enrollment;
mod file_delivery;
mod keelctl;
mod key_enrollment;
mod metrics;
mod packaging;
mod plugins;
mod proxy;
mod stream;
mod upgrade;
