//! The agent streams open right now, one per agent, and the revoked serials.
//!
//! A new stream for an agent replaces the old one: the old stream is told why and
//! closed. Revoking a certificate closes any stream that was opened with it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};

use keel_common::maps::shrink_sparse;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A task to send down a stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaskCommand {
    /// The task's data_type.
    pub data_type: i32,
    /// `keel-agent` or a plugin name.
    pub object_name: String,
    /// Task data.
    pub data: String,
    /// Correlation token.
    pub token: String,
}

/// One plugin of a desired set, as sent to an agent (`grpc.Config`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PluginCommand {
    /// Plugin name.
    pub name: String,
    /// `exec` or `tar.gz`.
    pub kind: String,
    /// Version.
    pub version: String,
    /// Hex SHA-256 of the package.
    pub sha256: String,
    /// Hex Ed25519 signature of the package.
    pub signature: String,
    /// Where to download it.
    pub download_urls: Vec<String>,
    /// Passed as `DETAIL`.
    pub detail: String,
}

/// What the server sends an agent. Converted to `grpc.Command` at the gRPC edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// A task.
    Task(TaskCommand),
    /// Every batch of `epoch` up to `seq` is persisted.
    Ack {
        /// Sequence space.
        epoch: u64,
        /// Highest persisted batch.
        seq: u64,
    },
    /// Answer to a certificate renewal request.
    Renewal(Result<String, String>),
    /// The complete desired configuration, and the token of the task sending it.
    Configs(Vec<PluginCommand>, Option<String>),
    /// End the stream with this reason.
    Close(Closing),
}

/// Why the server ends a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closing {
    /// A newer stream of the same agent took over.
    Replaced,
    /// The certificate of this stream was revoked.
    Revoked,
    /// The agent broke the protocol.
    Refused(String),
    /// A message that does not decode.
    Invalid(String),
    /// A message over the size limit.
    TooLarge(String),
    /// The server could not persist data; the agent should resend later.
    Unavailable(String),
    /// The server is shutting down.
    Shutdown,
}

impl Closing {
    /// The reason as a metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Closing::Replaced => "replaced",
            Closing::Revoked => "revoked",
            Closing::Refused(_) => "refused",
            Closing::Invalid(_) => "invalid",
            Closing::TooLarge(_) => "too_large",
            Closing::Unavailable(_) => "unavailable",
            Closing::Shutdown => "shutdown",
        }
    }
}

/// One open stream.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Distinguishes this stream from earlier and later ones of the same agent.
    pub generation: u64,
    /// Serial of the client certificate.
    pub serial: String,
    /// Remote address.
    pub peer: Option<SocketAddr>,
    /// Commands to the agent. Boxed: the queue's slots cost their size for every
    /// open stream, and most commands are small acknowledgements.
    pub commands: mpsc::Sender<Box<Outbound>>,
    cancel: CancellationToken,
    closing: Arc<OnceLock<Closing>>,
}

impl Connection {
    /// A connection handle for a stream task, with the signal it waits on.
    pub fn new(serial: String, peer: Option<SocketAddr>, commands: mpsc::Sender<Box<Outbound>>) -> Self {
        Self {
            generation: 0,
            serial,
            peer,
            commands,
            cancel: CancellationToken::new(),
            closing: Arc::new(OnceLock::new()),
        }
    }

    /// Asks the stream task to end with `reason`. The first reason wins.
    pub fn close(&self, reason: Closing) {
        let _ = self.closing.set(reason);
        self.cancel.cancel();
    }

    /// Resolves when [`close`](Self::close) was called, with its reason.
    pub async fn closed(&self) -> Closing {
        self.cancel.cancelled().await;
        self.closing.get().cloned().unwrap_or(Closing::Shutdown)
    }
}

/// Why a command could not be handed to a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No stream is open for the agent.
    #[error("agent {0} is offline")]
    Offline(String),
    /// The stream's command queue is full.
    #[error("agent {0} is not reading its commands; try again later")]
    Busy(String),
    /// Another instance holds the stream and could not be reached.
    #[error("agent {0} cannot be reached: {1}")]
    Unreachable(String, String),
}

/// Every open stream, by agent ID.
#[derive(Debug, Default)]
pub struct Connections {
    open: Mutex<HashMap<String, Connection>>,
    next_generation: AtomicU64,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Connection>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a stream. Returns its generation; an older stream of the same agent
    /// is closed as replaced.
    pub fn register(&self, agent_id: &str, mut conn: Connection) -> u64 {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        conn.generation = generation;
        if let Some(old) = self.lock().insert(agent_id.to_owned(), conn) {
            tracing::info!(agent_id, old_peer = ?old.peer, "a new stream replaces the open one");
            old.close(Closing::Replaced);
        }
        generation
    }

    /// Removes a stream if it is still the agent's current one.
    pub fn unregister(&self, agent_id: &str, generation: u64) -> bool {
        let mut open = self.lock();
        if open.get(agent_id).is_some_and(|c| c.generation == generation) {
            open.remove(agent_id);
            shrink_sparse(&mut *open);
            true
        } else {
            false
        }
    }

    /// Whether the agent has an open stream.
    pub fn is_online(&self, agent_id: &str) -> bool {
        self.lock().contains_key(agent_id)
    }

    /// How many streams are open.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no stream is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hands a command to the agent's stream without waiting.
    pub fn send(&self, agent_id: &str, cmd: Outbound) -> Result<(), SendError> {
        let sender = self
            .lock()
            .get(agent_id)
            .map(|c| c.commands.clone())
            .ok_or_else(|| SendError::Offline(agent_id.to_owned()))?;
        sender.try_send(Box::new(cmd)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Busy(agent_id.to_owned()),
            mpsc::error::TrySendError::Closed(_) => SendError::Offline(agent_id.to_owned()),
        })
    }

    /// Closes every stream opened with one of `serials`. Returns the agents affected.
    pub fn close_serials(&self, serials: &HashSet<String>) -> Vec<String> {
        let open = self.lock();
        let mut closed = Vec::new();
        for (agent, conn) in open.iter() {
            if serials.contains(&conn.serial) {
                conn.close(Closing::Revoked);
                closed.push(agent.clone());
            }
        }
        closed
    }

    /// Closes every stream, at shutdown.
    pub fn close_all(&self) {
        for conn in self.lock().values() {
            conn.close(Closing::Shutdown);
        }
    }
}

/// Serials of revoked certificates, consulted during every TLS handshake.
#[derive(Debug, Default)]
pub struct Revocations {
    serials: RwLock<HashSet<String>>,
}

impl Revocations {
    /// Adds serials; returns those that were new.
    pub fn add(&self, serials: impl IntoIterator<Item = String>) -> HashSet<String> {
        let mut set = self.serials.write().unwrap_or_else(|p| p.into_inner());
        serials.into_iter().filter(|s| set.insert(s.clone())).collect()
    }

    /// Whether a serial is revoked.
    pub fn contains(&self, serial: &str) -> bool {
        self.serials.read().unwrap_or_else(|p| p.into_inner()).contains(serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(serial: &str) -> (Connection, mpsc::Receiver<Box<Outbound>>) {
        let (tx, rx) = mpsc::channel(1);
        (Connection::new(serial.into(), None, tx), rx)
    }

    #[test]
    fn a_map_left_by_most_of_its_entries_gives_its_room_back() {
        let mut m: HashMap<u32, u32> = (0..10_000).map(|i| (i, i)).collect();
        let full = m.capacity();
        for i in 0..9_000 {
            m.remove(&i);
            shrink_sparse(&mut m);
        }
        assert_eq!(m.len(), 1_000);
        assert!(m.capacity() <= full / 4, "capacity {} of {full}", m.capacity());
        assert!(m.values().all(|v| *v >= 9_000), "what stays is kept");
        let mut small: HashMap<u32, u32> = (0..10).map(|i| (i, i)).collect();
        let room = small.capacity();
        small.remove(&0);
        shrink_sparse(&mut small);
        assert_eq!(small.capacity(), room, "small maps are left alone");
    }

    #[tokio::test]
    async fn newer_stream_replaces_older() {
        let c = Connections::default();
        let (first, _rx1) = conn("s1");
        let watch = first.clone();
        let g1 = c.register("a", first);
        let (second, mut rx2) = conn("s2");
        let g2 = c.register("a", second);
        assert_eq!(watch.closed().await, Closing::Replaced);
        assert!(!c.unregister("a", g1), "the old stream must not remove the new one");
        c.send("a", Outbound::Ack { epoch: 1, seq: 1 }).unwrap();
        assert_eq!(rx2.recv().await, Some(Box::new(Outbound::Ack { epoch: 1, seq: 1 })));
        assert_eq!(c.send("a", Outbound::Ack { epoch: 1, seq: 2 }), Ok(()));
        assert_eq!(
            c.send("a", Outbound::Ack { epoch: 1, seq: 3 }),
            Err(SendError::Busy("a".into()))
        );
        assert!(c.unregister("a", g2));
        assert_eq!(
            c.send("a", Outbound::Ack { epoch: 1, seq: 4 }),
            Err(SendError::Offline("a".into()))
        );
    }

    #[tokio::test]
    async fn revoking_a_serial_closes_its_stream() {
        let c = Connections::default();
        let (a, _ra) = conn("s1");
        let (b, _rb) = conn("s2");
        let watch = a.clone();
        c.register("a", a);
        c.register("b", b);
        let r = Revocations::default();
        let new = r.add(["s1".to_owned()]);
        assert!(r.add(["s1".to_owned()]).is_empty());
        assert_eq!(c.close_serials(&new), vec!["a".to_owned()]);
        assert_eq!(watch.closed().await, Closing::Revoked);
        assert!(r.contains("s1") && !r.contains("s2"));
    }
}
