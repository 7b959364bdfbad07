//! [`SimAgent`]: an agent simulated in-process over its own real mTLS stream, for
//! tests and benchmarks that need many agents.

use std::time::Duration;

use crate::{Server, batch, ca_signed, raw_stream};

/// How a [`SimAgent`] answers.
#[derive(Debug, Clone, Default)]
pub struct SimBehavior {
    /// Answer a configuration naming any of these plugins with a failure.
    pub fail_plugins: Vec<String>,
    /// Wait this long before answering a configuration or task.
    pub answer_after: Duration,
    /// Download each configured package from its first URL and check its sha256
    /// before answering, as a real agent does.
    pub download: bool,
}

/// What a [`SimAgent`] saw.
#[derive(Debug, Default)]
pub struct SimLog {
    /// Each configuration received: (name, version) pairs.
    pub configs: Vec<Vec<(String, String)>>,
    /// Each task received: (data_type, object_name, token).
    pub tasks: Vec<(i32, String, String)>,
}

/// Configurations being worked on by all simulated agents right now, and the most
/// there ever were at once: how many agents a rollout had in flight.
#[derive(Debug, Default)]
pub struct InFlight {
    now: std::sync::atomic::AtomicUsize,
    /// The highest `now` seen.
    pub max: std::sync::atomic::AtomicUsize,
}

/// An agent simulated in-process over a real mTLS stream, with a certificate from
/// the server's CA: it registers with a heartbeat, and answers configurations and
/// tasks with 5100 results. For tests and benchmarks that need many agents.
#[derive(Debug)]
pub struct SimAgent {
    /// Agent ID.
    pub id: String,
    /// What it received.
    pub log: std::sync::Arc<std::sync::Mutex<SimLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn payload(fields: &[(&str, &str)]) -> bytes::Bytes {
    keel_proto::payload::encode(fields.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())))
}

fn record(data_type: i32, fields: &[(&str, &str)]) -> keel_proto::grpc::EncodedRecord {
    keel_proto::grpc::EncodedRecord {
        data_type,
        timestamp: 1_700_000_000,
        data: payload(fields),
        ..Default::default()
    }
}

impl SimAgent {
    /// Connects, registers with a heartbeat and starts answering.
    pub async fn start(
        server: &Server,
        id: &str,
        behavior: SimBehavior,
        inflight: std::sync::Arc<InFlight>,
    ) -> SimAgent {
        let now = time::OffsetDateTime::now_utc();
        let pair = ca_signed(
            server,
            id,
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        );
        let mut stream = raw_stream(server, Some(&pair)).await.expect("sim agent stream");
        let heartbeat = record(
            keel_proto::data_type::AGENT_HEARTBEAT,
            &[
                ("arch", "x86_64"),
                ("platform", "debian"),
                ("platform_family", "debian"),
                ("package_type", "deb"),
            ],
        );
        let epoch = 7;
        stream
            .tx
            .send(batch(id, 1, epoch, vec![heartbeat]))
            .await
            .expect("sim heartbeat");
        let log = std::sync::Arc::new(std::sync::Mutex::new(SimLog::default()));
        let agent_id = id.to_owned();
        let shared = std::sync::Arc::clone(&log);
        let task = tokio::spawn(async move {
            let mut seq = 1;
            while let Ok(Some(cmd)) = stream.rx.message().await {
                let working = cmd.task.is_some() || (cmd.ack.is_none() && cmd.renewal.is_none());
                if working {
                    let n = inflight.now.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    inflight.max.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                }
                let answer = if let Some(t) = cmd.task {
                    shared
                        .lock()
                        .unwrap()
                        .tasks
                        .push((t.data_type, t.object_name.clone(), t.token.clone()));
                    Some((t.token, true, "done by a simulated agent".to_owned()))
                } else if cmd.ack.is_none() && cmd.renewal.is_none() {
                    let entries: Vec<(String, String)> = cmd
                        .configs
                        .iter()
                        .map(|c| (c.name.clone(), c.version.clone()))
                        .collect();
                    let mut failure = entries
                        .iter()
                        .find(|(n, _)| behavior.fail_plugins.contains(n))
                        .map(|(n, _)| format!("plugin {n} does not keep running (simulated)"));
                    if behavior.download && failure.is_none() {
                        for c in &cmd.configs {
                            if let Err(e) = sim_download(c).await {
                                failure = Some(format!("cannot download {}: {e}", c.name));
                                break;
                            }
                        }
                    }
                    shared.lock().unwrap().configs.push(entries);
                    let ok = failure.is_none();
                    let msg = failure.unwrap_or_else(|| "configuration applied (simulated)".to_owned());
                    Some((cmd.config_token, ok, msg)).filter(|(t, _, _)| !t.is_empty())
                } else {
                    None
                };
                if answer.is_some() {
                    tokio::time::sleep(behavior.answer_after).await;
                }
                if working {
                    inflight.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }
                let Some((token, ok, msg)) = answer else { continue };
                seq += 1;
                let status = if ok { "succeeded" } else { "failed" };
                let result = record(
                    keel_proto::data_type::TASK_RESULT,
                    &[("token", &token), ("status", status), ("msg", &msg)],
                );
                if stream
                    .tx
                    .send(batch(&agent_id, seq, epoch, vec![result]))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        SimAgent {
            id: id.to_owned(),
            log,
            task,
        }
    }
}

/// Fetches a configured package and checks its sha256.
async fn sim_download(c: &keel_proto::grpc::Config) -> Result<(), String> {
    use sha2::Digest;
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(reqwest::Client::new);
    let url = c.download_urls.first().ok_or("no download URL")?;
    let response = client.get(url).send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("{url}: {}", response.status()));
    }
    let body = response.bytes().await.map_err(|e| e.to_string())?;
    let digest = hex::encode(sha2::Sha256::digest(&body));
    if digest != c.sha256 {
        return Err(format!("{url}: sha256 {digest}, expected {}", c.sha256));
    }
    Ok(())
}
