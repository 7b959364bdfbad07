//! Several keel-server instances on one database and one NATS.
//!
//! - **Membership.** Each instance has an ID and a lease in `instances`, renewed
//!   every `cluster.renew` (`crate::lease`). An agent's row names the instance holding its
//!   stream; the agent is online while that instance's lease runs. A stopping
//!   instance gives its agents up; a dead one's agents show offline when its lease
//!   passes, and any instance reaps it later.
//! - **Routing.** A command for an agent whose stream another instance holds goes
//!   to that instance over NATS request/reply on `keel.<cluster>.instance.<id>.cmd`
//!   ([`Cluster::route`], [`serve_commands`]), which hands it to the stream.
//! - **Replies.** Whoever waits for a task's answer (enrollment by key, audit jobs)
//!   registers its token ([`Cluster::wait`]); the instance that receives the answer
//!   hands it over in process, or publishes it on `keel.<cluster>.reply.<token>`.
//!
//! Without `cluster.nats_url` an instance still keeps its lease and presence in
//! the database, but reaches only the agents connected to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use keel_common::time::now_ms;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::{ClusterConfig, subject_token};
use crate::connections::{Closing, Connections, Outbound, PluginCommand, SendError, TaskCommand};

/// Answers kept per waiting token; more from a flooding agent are dropped.
const REPLY_QUEUE: usize = 8;

/// An answer to a task: a 5100 result or a plugin's own answer record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The agent that sent it, as its certificate names it.
    pub agent_id: String,
    /// The record's data type.
    pub data_type: i32,
    /// The record's fields.
    pub fields: HashMap<String, String>,
}

type Waiting = HashMap<String, (String, mpsc::Sender<Reply>)>;

/// This instance, and its way to the others.
pub struct Cluster {
    /// This instance's ID.
    pub instance: String,
    /// The cluster's name in NATS subjects.
    pub name: String,
    /// When this instance started, Unix ms.
    pub started_at: i64,
    nats: Option<async_nats::Client>,
    route_timeout: Duration,
    waiting: Arc<Mutex<Waiting>>,
    /// Held while this process runs: one instance per data directory.
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The NATS URL may carry credentials: it is not shown.
        f.debug_struct("Cluster")
            .field("instance", &self.instance)
            .field("name", &self.name)
            .field("routing", &self.nats.is_some())
            .finish_non_exhaustive()
    }
}

/// A command as it travels to another instance.
#[derive(Debug, Serialize, Deserialize)]
struct Routed {
    agent_id: String,
    command: RoutedCommand,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RoutedCommand {
    Task(TaskCommand),
    Configs {
        configs: Vec<PluginCommand>,
        token: Option<String>,
    },
    Revoked,
}

/// The holding instance's answer to a routed command.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RouteAnswer {
    Sent,
    Offline,
    Busy,
    Refused(String),
}

fn lock(w: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    w.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The instance ID kept in `<data_dir>/instance-id`, made (host name and a random
/// suffix) on first start: a restarted server is the same instance, so what its
/// crashed predecessor held is released at once instead of when its lease passes.
fn stored_instance(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = data_dir.join("instance-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if subject_token(id.trim()) => return Ok(id.trim().to_owned()),
        Ok(_) => anyhow::bail!(
            "{} does not hold an instance ID; delete it to make a new one",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
    let id = new_instance_id();
    keel_common::fsutil::write_private(&path, id.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(id)
}

/// Locks `<data_dir>/instance.lock`, so two processes never run as one instance.
fn lock_data_dir(data_dir: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = data_dir.join("instance.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another keel-server runs on data_dir {} ({e}); give each instance its own data_dir",
            data_dir.display()
        )
    })
}

/// A new instance ID: the host name (as a subject token) and a random suffix.
fn new_instance_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "keel".into());
    let host: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .take(48)
        .collect();
    let mut suffix = [0u8; 3];
    // A failed random source leaves the suffix zero; the host name still tells.
    let _ = getrandom::fill(&mut suffix);
    format!("{host}-{}", hex::encode(suffix))
}

impl Cluster {
    /// This instance of `data_dir`, connected to NATS when configured (a NATS
    /// that is down now is retried in the background).
    pub async fn open(cfg: &ClusterConfig, data_dir: &std::path::Path) -> anyhow::Result<Self> {
        let lock = lock_data_dir(data_dir)?;
        let instance = match &cfg.instance {
            Some(id) => id.clone(),
            None => stored_instance(data_dir)?,
        };
        Self::connect(cfg, instance, Some(lock)).await
    }

    async fn connect(
        cfg: &ClusterConfig,
        instance: String,
        lock: Option<nix::fcntl::Flock<std::fs::File>>,
    ) -> anyhow::Result<Self> {
        let nats = match &cfg.nats_url {
            Some(url) if !url.is_empty() => Some(
                async_nats::ConnectOptions::new()
                    .name(format!("keel-server {instance}"))
                    .retry_on_initial_connect()
                    .connect(url.as_str())
                    .await
                    .map_err(|e| anyhow::anyhow!("cluster.nats_url: cannot connect: {e}"))?,
            ),
            _ => None,
        };
        Ok(Self {
            instance,
            name: cfg.name.clone(),
            started_at: now_ms(),
            nats,
            route_timeout: cfg.route_timeout,
            waiting: Arc::new(Mutex::new(HashMap::new())),
            _lock: lock,
        })
    }

    /// Whether commands can be routed to other instances.
    pub fn routes(&self) -> bool {
        self.nats.is_some()
    }

    /// The NATS client of the cluster, when configured.
    pub fn nats(&self) -> Option<&async_nats::Client> {
        self.nats.as_ref()
    }

    fn subject(&self, kind: &str, id: &str) -> String {
        format!("keel.{}.{kind}.{id}", self.name)
    }

    fn command_subject(&self, instance: &str) -> String {
        format!("{}.cmd", self.subject("instance", instance))
    }

    /// The subject an audit job's outcome is published on.
    pub fn tunnel_subject(&self, job: &str) -> String {
        self.subject("tunnel", job)
    }

    /// Hands `cmd` for `agent_id` to `instance`, which holds its stream.
    pub async fn route(&self, instance: &str, agent_id: &str, cmd: Outbound) -> Result<(), SendError> {
        let unreachable = |why: String| SendError::Unreachable(agent_id.to_owned(), why);
        let Some(nats) = &self.nats else {
            return Err(unreachable(format!(
                "its stream is held by instance {instance}, and this instance has no cluster.nats_url to reach it"
            )));
        };
        let command = match cmd {
            Outbound::Task(t) => RoutedCommand::Task(t),
            Outbound::Configs(configs, token) => RoutedCommand::Configs { configs, token },
            Outbound::Close(Closing::Revoked) => RoutedCommand::Revoked,
            other => return Err(unreachable(format!("{other:?} is not routed"))),
        };
        let body = serde_json::to_vec(&Routed {
            agent_id: agent_id.to_owned(),
            command,
        })
        .map_err(|e| unreachable(e.to_string()))?;
        let request = nats.request(self.command_subject(instance), body.into());
        let answer = match tokio::time::timeout(self.route_timeout, request).await {
            Ok(Ok(msg)) => serde_json::from_slice::<RouteAnswer>(&msg.payload)
                .map_err(|e| unreachable(format!("instance {instance} answered garbage: {e}")))?,
            Ok(Err(e)) => return Err(unreachable(format!("instance {instance}: {e}"))),
            Err(_) => {
                return Err(unreachable(format!(
                    "instance {instance} did not answer within {} ms",
                    self.route_timeout.as_millis()
                )));
            }
        };
        match answer {
            RouteAnswer::Sent => Ok(()),
            RouteAnswer::Offline => Err(SendError::Offline(agent_id.to_owned())),
            RouteAnswer::Busy => Err(SendError::Busy(agent_id.to_owned())),
            RouteAnswer::Refused(why) => Err(unreachable(why)),
        }
    }

    /// Waits for answers to task `token` from `agent_id`, wherever they arrive.
    pub async fn wait(&self, token: &str, agent_id: &str) -> ReplyWait {
        let (tx, rx) = mpsc::channel(REPLY_QUEUE);
        lock(&self.waiting).insert(token.to_owned(), (agent_id.to_owned(), tx.clone()));
        let mut forwarder = None;
        if let Some(nats) = &self.nats
            && subject_token(token)
        {
            match self.subscribe(nats, self.subject("reply", token)).await {
                Ok(mut sub) => {
                    let agent = agent_id.to_owned();
                    forwarder = Some(tokio::spawn(async move {
                        while let Some(msg) = sub.next().await {
                            match serde_json::from_slice::<Reply>(&msg.payload) {
                                Ok(r) if r.agent_id == agent => {
                                    let _ = tx.try_send(r);
                                }
                                Ok(r) => warn!(agent_id = %r.agent_id, expected = %agent,
                                    "answer from an agent the task was not sent to; ignored"),
                                Err(e) => warn!(error = %e, "undecodable routed answer; ignored"),
                            }
                        }
                    }));
                }
                Err(e) => warn!(error = %e, "cannot wait for answers from other instances"),
            }
        }
        ReplyWait {
            token: token.to_owned(),
            rx,
            waiting: Arc::clone(&self.waiting),
            forwarder,
        }
    }

    /// Subscribes to `subject` and returns once NATS has taken the subscription
    /// in, so that nothing published after this returns is missed. Flushing alone
    /// only empties the client's write buffer; a request nobody answers comes back
    /// "no responders" only after the server has read what preceded it on the
    /// connection.
    pub async fn subscribe(
        &self,
        nats: &async_nats::Client,
        subject: String,
    ) -> Result<async_nats::Subscriber, async_nats::SubscribeError> {
        let sub = nats.subscribe(subject).await?;
        let barrier = async_nats::Request::new().timeout(Some(self.route_timeout));
        match nats
            .send_request(self.subject("barrier", &self.instance), barrier)
            .await
        {
            Ok(_) => {}
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
            Err(e) => warn!(error = %e, "NATS did not confirm a subscription; what is published at once may be missed"),
        }
        Ok(sub)
    }

    /// An answer arrived on this instance: to its waiter here, or to the instance
    /// waiting for it. Only the agent the task went to counts.
    pub async fn deliver(&self, reply: Reply) {
        let Some(token) = reply.fields.get("token").filter(|t| !t.is_empty()).cloned() else {
            return;
        };
        {
            let waiting = lock(&self.waiting);
            match waiting.get(&token) {
                Some((agent, tx)) if *agent == reply.agent_id => {
                    let _ = tx.try_send(reply);
                    return;
                }
                Some((agent, _)) => {
                    warn!(agent_id = %reply.agent_id, expected = %agent,
                        "answer from an agent the task was not sent to; ignored");
                    return;
                }
                None => {}
            }
        }
        if let Some(nats) = &self.nats
            && subject_token(&token)
            && let Ok(body) = serde_json::to_vec(&reply)
            && let Err(e) = nats.publish(self.subject("reply", &token), body.into()).await
        {
            warn!(agent_id = %reply.agent_id, error = %e,
                "cannot publish a task answer for the instance waiting for it");
        }
    }
}

/// Answers to one task, for as long as this lives.
#[derive(Debug)]
pub struct ReplyWait {
    token: String,
    rx: mpsc::Receiver<Reply>,
    waiting: Arc<Mutex<Waiting>>,
    forwarder: Option<tokio::task::JoinHandle<()>>,
}

impl ReplyWait {
    /// The next answer.
    pub async fn recv(&mut self) -> Option<Reply> {
        self.rx.recv().await
    }

    /// The task's 5100 result's fields, skipping other answers; `None` when the
    /// answers ended first.
    pub async fn task_result(&mut self) -> Option<HashMap<String, String>> {
        while let Some(reply) = self.rx.recv().await {
            if reply.data_type == keel_proto::data_type::TASK_RESULT {
                return Some(reply.fields);
            }
        }
        None
    }
}

impl Drop for ReplyWait {
    fn drop(&mut self) {
        lock(&self.waiting).remove(&self.token);
        if let Some(f) = self.forwarder.take() {
            f.abort();
        }
    }
}

/// Answers commands routed to this instance until `shutdown`.
pub async fn serve_commands(cluster: &Cluster, connections: &Connections, shutdown: CancellationToken) {
    let Some(nats) = cluster.nats().cloned() else {
        return;
    };
    let subject = cluster.command_subject(&cluster.instance);
    let mut sub = match cluster.subscribe(&nats, subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%subject, error = %e, "cannot take routed commands; agents here are reachable only through this instance");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = sub.next() => match m {
                Some(m) => m,
                None => {
                    warn!(%subject, "routed commands stopped: the NATS subscription ended");
                    return;
                }
            },
        };
        let answer = match serde_json::from_slice::<Routed>(&msg.payload) {
            Ok(r) => {
                let cmd = match r.command {
                    RoutedCommand::Task(t) => Outbound::Task(t),
                    RoutedCommand::Configs { configs, token } => Outbound::Configs(configs, token),
                    RoutedCommand::Revoked => Outbound::Close(Closing::Revoked),
                };
                match connections.send(&r.agent_id, cmd) {
                    Ok(()) => RouteAnswer::Sent,
                    Err(SendError::Busy(_)) => RouteAnswer::Busy,
                    Err(_) => RouteAnswer::Offline,
                }
            }
            Err(e) => RouteAnswer::Refused(format!("undecodable routed command: {e}")),
        };
        if let Some(reply) = msg.reply
            && let Ok(body) = serde_json::to_vec(&answer)
            && let Err(e) = nats.publish(reply, body.into()).await
        {
            debug!(error = %e, "cannot answer a routed command");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn reply(agent: &str, token: &str) -> Reply {
        Reply {
            agent_id: agent.into(),
            data_type: keel_proto::data_type::KEY_PROOF,
            fields: HashMap::from([("token".to_owned(), token.to_owned())]),
        }
    }

    #[tokio::test]
    async fn a_data_dir_is_one_instance_whose_id_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ClusterConfig::default();
        let first = Cluster::open(&cfg, dir.path()).await.unwrap();
        let e = Cluster::open(&cfg, dir.path()).await.unwrap_err().to_string();
        assert!(e.contains("another keel-server runs on data_dir"), "{e}");
        let id = first.instance.clone();
        drop(first);
        let again = Cluster::open(&cfg, dir.path()).await.unwrap();
        assert_eq!(again.instance, id);
        assert!(subject_token(&id) && id.len() > 7, "{id}");
    }

    #[tokio::test]
    async fn only_the_agent_a_task_went_to_can_answer_it() {
        let c = Cluster::connect(&ClusterConfig::default(), "me".into(), None)
            .await
            .unwrap();
        let mut w = c.wait("t1", "db-1").await;
        c.deliver(reply("intruder", "t1")).await;
        assert!(w.rx.try_recv().is_err(), "an answer from another agent is ignored");
        c.deliver(reply("db-1", "t1")).await;
        assert_eq!(w.recv().await.unwrap().agent_id, "db-1");
        drop(w);
        assert!(lock(&c.waiting).is_empty(), "a dropped wait is forgotten");
    }

    /// Two instances on the real NATS (`KEEL_TEST_NATS`, default the local one).
    #[tokio::test]
    async fn an_answer_reaches_the_instance_waiting_for_it_through_nats() {
        let url = std::env::var("KEEL_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let cfg = |instance: &str| ClusterConfig {
            instance: Some(instance.into()),
            name: format!("u{}", uuid::Uuid::new_v4().simple()),
            nats_url: Some(url.clone()),
            ..ClusterConfig::default()
        };
        let a_cfg = cfg("a");
        let b_cfg = ClusterConfig {
            name: a_cfg.name.clone(),
            ..cfg("b")
        };
        let a = Cluster::connect(&a_cfg, "a".into(), None).await.unwrap();
        let b = Cluster::connect(&b_cfg, "b".into(), None).await.unwrap();
        let token = uuid::Uuid::new_v4().to_string();
        let mut w = a.wait(&token, "db-1").await;
        b.deliver(reply("intruder", &token)).await;
        b.deliver(reply("db-1", &token)).await;
        b.nats().unwrap().flush().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(30), w.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            got.agent_id, "db-1",
            "the intruder's answer was dropped, the provider's arrived"
        );
    }
}
