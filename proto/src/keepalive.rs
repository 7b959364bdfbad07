//! How an agent finds out that its stream is dead: HTTP/2 PINGs, sent only when
//! nothing arrived from the server for [`interval`].
//!
//! Every heartbeat is acknowledged, so while the server answers, an agent reads
//! something at least once per heartbeat interval and never pings; a ping costs the
//! server a wake-up, a read and a write per agent, which at tens of thousands of
//! agents is a good share of its idle CPU. A server that stopped answering is found
//! within `interval + TIMEOUT` of the last thing read from it. Keel's simulated
//! agents (the scale benchmark) follow the same rule.

use std::time::Duration;

/// How far past the heartbeat interval the agent waits before it pings.
pub const SLACK: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the stream counts as dead.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// The agent's ping interval for a heartbeat interval.
pub fn interval(heartbeat: Duration) -> Duration {
    heartbeat.saturating_add(SLACK)
}
