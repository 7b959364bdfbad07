//! `keel-bench scale [agents] [servers]`: idle agents held by several keel-server
//! processes that share one gRPC port (SO_REUSEPORT), on PostgreSQL and NATS
//! JetStream, all on this machine.
//!
//! The agents are simulated over real mTLS gRPC streams, each with its own
//! certificate from the cluster's CA, by child processes (`keel-bench scale-sim`)
//! of at most [`PER_SIM`] agents each (the open-file limit is 20,000 per process),
//! each from its own loopback source address (one address has ~28,000 ephemeral
//! ports to one destination). Each agent sends its first heartbeat, then one
//! every `HEARTBEAT` (spread over the interval), answers tasks with 5100 results,
//! and on request sends numbered record batches.
//!
//! Measured: the time to connect everyone; each server's RSS before and after,
//! per agent; each server's CPU over one idle heartbeat interval; p50/p99 of
//! tasks to 500 random agents through random instances (POST to the result being
//! visible through that instance); records/s into JetStream from 1,000 agents and
//! how many are missing there; RSS 60 s after every agent left. The baseline,
//! in the same run: a bare tonic server with the same TLS settings holding idle
//! streams of the same simulated agents (`keel-bench scale-baseline`), per stream.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keel_proto::grpc::transfer_client::TransferClient;
use keel_proto::grpc::transfer_server::{Transfer, TransferServer};
use keel_proto::grpc::{Ack, Command as GrpcCommand, EncodedRecord, PackagedData};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

/// Agents per simulator process.
const PER_SIM: usize = 14_000;
/// Heartbeat interval of the simulated agents (a real agent's default).
const HEARTBEAT: Duration = Duration::from_secs(60);
/// Agents that send records in the throughput part.
const RECORD_AGENTS: usize = 1000;
/// Batches each of them sends, and records per batch.
const RECORD_BATCHES: u64 = 10;
const RECORDS_PER_BATCH: usize = 20;
/// The data type of those records.
const RECORD_TYPE: i32 = 6999;
/// Tasks sent to random agents.
const TASKS: usize = 500;
/// Agents the baseline server holds.
const BASELINE_STREAMS: usize = 10_000;

/// What one simulator process does.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SimSpec {
    first: usize,
    count: usize,
    source: IpAddr,
    grpc: SocketAddr,
    pki_dir: PathBuf,
    record_agents: usize,
}

fn agent_id(i: usize) -> String {
    format!("scale-{i:05}")
}

/// VmRSS of a process, KiB.
fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS")
}

/// The anonymous part of a process's RSS, KiB: its heap and stacks, without the
/// pages of its binary and libraries.
fn anon_kb(pid: u32) -> u64 {
    status_kb(pid, "RssAnon")
}

/// One `kB` figure of `/proc/<pid>/status`.
pub fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .and_then(|v| v.strip_prefix(':'))
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// How long the idle phase and the wait after everyone left last: one heartbeat
/// interval, or `KEEL_SCALE_IDLE_SECS` for quicker trials.
fn idle_period() -> Duration {
    std::env::var("KEEL_SCALE_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(HEARTBEAT, Duration::from_secs)
}

/// A child simulator: its stdin for orders, its stdout lines as they come.
struct Sim {
    child: Child,
    stdin: ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Sim {
    fn start(spec: &SimSpec) -> Sim {
        let mut child = Command::new(std::env::current_exe().expect("keel-bench path"))
            .arg("scale-sim")
            .arg(serde_json::to_string(spec).expect("spec"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a simulator");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Sim {
            child,
            stdin,
            lines: rx,
        }
    }

    /// Waits for a line starting with `prefix`; returns its rest.
    fn wait_for(&self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_owned();
                    }
                }
                Err(_) => panic!("a simulator did not say {prefix:?} within {limit:?}"),
            }
        }
    }

    fn order(&mut self, what: &str) {
        writeln!(self.stdin, "{what}").expect("order a simulator");
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts simulators for `agents` agents against `grpc`; returns them once every
/// agent has its first batch acknowledged, and how long that took.
fn connect_all(agents: usize, grpc: SocketAddr, pki_dir: &Path, record_agents: usize) -> (Vec<Sim>, Duration) {
    let start = Instant::now();
    let sims: Vec<Sim> = (0..agents.div_ceil(PER_SIM))
        .map(|k| {
            let first = k * PER_SIM;
            Sim::start(&SimSpec {
                first,
                count: PER_SIM.min(agents - first),
                source: IpAddr::from([127, 0, 1, u8::try_from(k + 1).expect("fewer than 255 simulators")]),
                grpc,
                pki_dir: pki_dir.to_owned(),
                record_agents: record_agents.saturating_sub(first).min(PER_SIM),
            })
        })
        .collect();
    for s in &sims {
        s.wait_for("ready", Duration::from_secs(900));
    }
    (sims, start.elapsed())
}

struct Instance {
    child: Child,
    http: SocketAddr,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keel_server(config: &Path, args: &[&str]) -> String {
    let out = Command::new(keel_tests::bin("keel-server"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run keel-server");
    assert!(
        out.status.success(),
        "keel-server {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn start_instance(dir: &Path, config: &Path) -> Instance {
    let ready = dir.join("ready.json");
    let log = std::fs::File::create(dir.join("server.log")).expect("log file");
    let child = Command::new(keel_tests::bin("keel-server"))
        .arg("--config")
        .arg(config)
        .arg("serve")
        .arg("--ready-file")
        .arg(&ready)
        .env("KEEL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start keel-server");
    let deadline = Instant::now() + Duration::from_secs(60);
    let bound: Value = loop {
        if let Some(v) = std::fs::read_to_string(&ready)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "keel-server did not start; see {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    Instance {
        child,
        http: bound["http"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("http address"),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The benchmark.
pub async fn run(agents: usize, servers: usize) {
    keel_common::tls::install_crypto_provider();
    assert!(
        servers >= 1 && agents >= RECORD_AGENTS,
        "at least one server and {RECORD_AGENTS} agents"
    );
    let nats = std::env::var("KEEL_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let database = keel_server::store::fresh_schema(&keel_server::store::test_postgres())
        .await
        .expect("a PostgreSQL schema (KEEL_TEST_POSTGRES, default the local test database)");
    let dir = tempfile::tempdir().expect("tempdir");
    let tag = {
        let mut b = [0u8; 5];
        getrandom::fill(&mut b).expect("random");
        hex::encode(b)
    };
    let (stream, prefix) = (format!("KEEL_SCALE_{tag}"), format!("keel.scale{tag}.records"));
    let (grpc_port, tunnel_port) = (keel_tests::free_port(), keel_tests::free_port());
    let pki_dir = dir.path().join("pki");
    let configs: Vec<PathBuf> = (0..servers)
        .map(|k| {
            let d = dir.path().join(format!("s{k}"));
            std::fs::create_dir_all(&d).expect("server dir");
            let text = format!(
                "data_dir = {:?}\n[grpc]\nlisten = \"127.0.0.1:{grpc_port}\"\nreuse_port = true\n\
                 [tunnel]\nlisten = \"127.0.0.1:{tunnel_port}\"\nreuse_port = true\n\
                 [http]\nlisten = \"127.0.0.1:0\"\ntls = false\n[pki]\ndir = {:?}\n\
                 [database]\nurl = {database:?}\nmax_connections = 8\n\
                 [cluster]\ninstance = \"s{k}\"\nname = \"scale{tag}\"\nnats_url = {nats:?}\n\
                 [sink]\nkind = \"nats\"\nurl = {nats:?}\nstream = {stream:?}\nsubject_prefix = {prefix:?}\n",
                d.join("data").display().to_string(),
                pki_dir.display().to_string(),
            );
            let path = d.join("server.toml");
            std::fs::write(&path, text).expect("server.toml");
            path
        })
        .collect();
    keel_server(&configs[0], &["ca", "init"]);
    let token = keel_server(&configs[0], &["token", "create", "--admin"]);
    let instances: Vec<Instance> = configs
        .iter()
        .map(|c| start_instance(c.parent().expect("dir"), c))
        .collect();
    let pids: Vec<u32> = instances.iter().map(|i| i.child.id()).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before: Vec<u64> = pids.iter().map(|p| rss_kb(*p)).collect();
    let anon_before: Vec<u64> = pids.iter().map(|p| anon_kb(*p)).collect();
    let grpc: SocketAddr = ([127, 0, 0, 1], grpc_port).into();
    println!("scale: {agents} agents, {servers} servers sharing {grpc} (SO_REUSEPORT), PostgreSQL + NATS JetStream");

    // Connect everyone.
    let (mut sims, connect) = connect_all(agents, grpc, &pki_dir, RECORD_AGENTS);
    let api: Vec<keel_tests::Api> = instances
        .iter()
        .map(|i| keel_tests::Api::new(&format!("http://{}", i.http), &token))
        .collect();
    let (_, online, _, _) = api[0].get_page("/api/v1/agents?online=true&limit=1").await;
    println!(
        "connect: {agents} agents in {:.1} s ({:.0}/s); online through the API: {}",
        connect.as_secs_f64(),
        agents as f64 / connect.as_secs_f64(),
        online.unwrap_or(0)
    );

    // Idle: one heartbeat interval.
    let cpu_start: Vec<f64> = pids.iter().map(|p| super::cpu_secs(*p)).collect();
    let idle_start = Instant::now();
    tokio::time::sleep(idle_period()).await;
    let idle_secs = idle_start.elapsed().as_secs_f64();
    // Each instance's count, as of its last lease renewal (every 5 s).
    let (_, discovery) = api[0].get("/discovery").await;
    let held: HashMap<String, i64> = discovery["instances"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|i| {
                    (
                        i["id"].as_str().unwrap_or_default().to_owned(),
                        i["agents"].as_i64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut worst_cpu: f64 = 0.0;
    let mut per_agent = Vec::new();
    for (k, pid) in pids.iter().enumerate() {
        let cpu = (super::cpu_secs(*pid) - cpu_start[k]) / idle_secs * 100.0;
        worst_cpu = worst_cpu.max(cpu);
        let rss = rss_kb(*pid);
        let n = held.get(&format!("s{k}")).copied().unwrap_or(0).max(1);
        let kb = (rss.saturating_sub(rss_before[k])) as f64 / n as f64;
        per_agent.push((kb, n));
        println!(
            "server s{k}: {n} agents, RSS {} -> {} KiB ({kb:.1} KiB per agent), idle CPU {cpu:.1} % of a core",
            rss_before[k], rss
        );
    }
    let total_agents: i64 = per_agent.iter().map(|(_, n)| n).sum();
    let rss_per_agent = per_agent.iter().map(|(kb, n)| kb * *n as f64).sum::<f64>() / total_agents.max(1) as f64;

    // Tasks to random agents through random instances.
    let latencies = tasks(&api, agents).await;
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    println!("tasks: {TASKS} to random agents through random instances: p50 {p50:.1} ms, p99 {p99:.1} ms");

    // Records from 1,000 agents into JetStream.
    let expected = RECORD_AGENTS as u64 * RECORD_BATCHES * RECORDS_PER_BATCH as u64;
    let start = Instant::now();
    for s in &mut sims {
        s.order("records");
    }
    for s in &sims {
        s.wait_for("records_done", Duration::from_secs(900));
    }
    let secs = start.elapsed().as_secs_f64();
    let stored = jetstream_count(&nats, &stream, &format!("{prefix}.{RECORD_TYPE}")).await;
    let lost = expected.saturating_sub(stored);
    let rate = expected as f64 / secs;
    println!(
        "records: {expected} from {RECORD_AGENTS} agents acknowledged in {secs:.1} s ({rate:.0}/s); in JetStream {stored}, lost {lost}"
    );

    // Everyone leaves; memory after 60 s.
    for s in &mut sims {
        s.order("quit");
    }
    drop(sims);
    let left = Instant::now();
    while left.elapsed() < Duration::from_secs(120) {
        let (_, n, _, _) = api[0].get_page("/api/v1/agents?online=true&limit=1").await;
        if n == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(idle_period()).await;
    for (k, pid) in pids.iter().enumerate() {
        let (after, anon) = (rss_kb(*pid), anon_kb(*pid));
        println!(
            "server s{k}: {} s after every agent left: RSS {after} KiB, {:.2}x the RSS before they came; \
             anonymous {anon} KiB, {:.2}x before ({} KiB)",
            idle_period().as_secs(),
            after as f64 / rss_before[k].max(1) as f64,
            anon as f64 / anon_before[k].max(1) as f64,
            anon_before[k],
        );
    }
    drop(instances);

    // Baseline: a bare tonic server holding the same kind of streams.
    let base = if std::env::var("KEEL_SCALE_BASELINE").is_ok_and(|v| v == "0") {
        0.0
    } else {
        baseline(&pki_dir, BASELINE_STREAMS.min(agents)).await
    };
    println!(
        "baseline: a bare tonic mTLS server holding {} idle streams: {base:.1} KiB per stream; keel-server {:.2}x",
        BASELINE_STREAMS.min(agents),
        rss_per_agent / base.max(0.1)
    );
    println!(
        "scale agents={agents} servers={servers} connect_s={:.1} rss_kb_per_agent={rss_per_agent:.1} idle_cpu_pct={worst_cpu:.1} cmd_p99_ms={p99:.1} jetstream_records_per_s={rate:.0} lost={lost}",
        connect.as_secs_f64()
    );
}

/// Latencies (ms) of tasks to random agents through random instances: from the
/// POST to the result being visible through the same instance.
async fn tasks(api: &[keel_tests::Api], agents: usize) -> Vec<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let out = Arc::new(std::sync::Mutex::new(Vec::with_capacity(TASKS)));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (next, out) = (Arc::clone(&next), Arc::clone(&out));
            let api = api.to_vec();
            tokio::spawn(async move {
                let mut seed = 0x9E37_79B9_7F4A_7C15_u64 ^ (w as u64 + 1);
                loop {
                    if next.fetch_add(1, Ordering::Relaxed) >= TASKS {
                        return;
                    }
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let agent = agent_id((seed % agents as u64) as usize);
                    let via = &api[(seed >> 32) as usize % api.len()];
                    let start = Instant::now();
                    let (status, body) = via
                        .post(
                            &format!("/api/v1/agents/{agent}/tasks"),
                            &json!({"data_type": 6998, "object_name": "sim", "data": "x"}),
                        )
                        .await;
                    assert_eq!(status, 202, "task to {agent}: {body}");
                    let token = body["token"].as_str().expect("token").to_owned();
                    loop {
                        let (_, t) = via.get(&format!("/api/v1/tasks/{token}")).await;
                        if t["status"] == "succeeded" {
                            break;
                        }
                        assert!(start.elapsed() < Duration::from_secs(30), "task to {agent}: {t}");
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    out.lock()
                        .expect("latencies")
                        .push(start.elapsed().as_secs_f64() * 1000.0);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("task worker");
    }
    let mut v = std::mem::take(&mut *out.lock().expect("latencies"));
    v.sort_by(f64::total_cmp);
    v
}

/// Messages on `subject` in `stream`.
async fn jetstream_count(url: &str, stream: &str, subject: &str) -> u64 {
    use async_nats::jetstream::consumer;
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(stream).await.expect("the records stream");
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: subject.to_owned(),
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(10),
            ..Default::default()
        })
        .await
        .expect("a consumer");
    let n = consumer.cached_info().num_pending;
    let _ = js.delete_stream(stream.cached_info().config.name.clone()).await;
    n
}

/// KiB of RSS per idle stream of a bare tonic server with client-certificate TLS.
async fn baseline(pki_dir: &Path, streams: usize) -> f64 {
    let port = keel_tests::free_port();
    let mut server = Command::new(std::env::current_exe().expect("keel-bench path"))
        .arg("scale-baseline")
        .arg(pki_dir)
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the baseline server");
    let mut ready = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("baseline ready");
    let pid = server.id();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kb(pid);
    let grpc: SocketAddr = ([127, 0, 0, 1], port).into();
    let (sims, _) = connect_all(streams, grpc, pki_dir, 0);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_kb(pid);
    drop(sims);
    let _ = server.kill();
    let _ = server.wait();
    after.saturating_sub(before) as f64 / streams as f64
}

/// `keel-bench scale-baseline <pki dir> <port>`: the bare tonic server.
pub async fn baseline_server(pki_dir: &Path, port: u16) {
    keel_common::tls::install_crypto_provider();
    let read = |f: &str| std::fs::read_to_string(pki_dir.join(f)).expect("PKI file");
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read("server.pem"), read("server.key")))
        .client_ca_root(Certificate::from_pem(read("ca.pem")));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    println!("ready");
    tonic::transport::Server::builder()
        .tls_config(tls)
        .expect("TLS")
        .add_service(TransferServer::new(Holder))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
        .expect("serve");
}

/// Holds each stream and acknowledges its batches.
#[derive(Debug, Clone, Copy)]
struct Holder;

#[tonic::async_trait]
impl Transfer for Holder {
    type TransferStream = ReceiverStream<Result<GrpcCommand, Status>>;

    async fn transfer(&self, req: Request<Streaming<PackagedData>>) -> Result<Response<Self::TransferStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(pd)) = inbound.message().await {
                let ack = GrpcCommand {
                    ack: Some(Ack {
                        epoch: pd.epoch,
                        seq: pd.seq,
                    }),
                    ..Default::default()
                };
                if tx.send(Ok(ack)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// `keel-bench scale-sim <spec>`: simulates agents until told to quit.
pub async fn sim(spec: &str) {
    keel_common::tls::install_crypto_provider();
    let spec: SimSpec = serde_json::from_str(spec).expect("simulator spec");
    let ca_pem = std::fs::read_to_string(spec.pki_dir.join("ca.pem")).expect("ca.pem");
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(spec.pki_dir.join("ca.key")).expect("ca.key"))
        .expect("CA key");
    let issuer = Arc::new(rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("CA"));
    let (records_tx, records_rx) = watch::channel(false);
    let connected = Arc::new(AtomicUsize::new(0));
    let recorded = Arc::new(AtomicU64::new(0));
    let record_done = Arc::new(AtomicUsize::new(0));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(128));
    let mut agents = Vec::with_capacity(spec.count);
    for i in spec.first..spec.first + spec.count {
        let agent = SimAgent {
            id: agent_id(i),
            records: i - spec.first < spec.record_agents,
        };
        let pair = agent.identity(&issuer);
        let endpoint = Endpoint::from_shared(format!("https://{}", spec.grpc))
            .expect("endpoint")
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&ca_pem))
                    .identity(pair),
            )
            .expect("TLS")
            .local_address(Some(spec.source))
            .connect_timeout(Duration::from_secs(60))
            .http2_keep_alive_interval(keel_proto::keepalive::interval(HEARTBEAT))
            .keep_alive_timeout(keel_proto::keepalive::TIMEOUT)
            .keep_alive_while_idle(true);
        let (connected, handshakes) = (Arc::clone(&connected), Arc::clone(&handshakes));
        let (records, recorded, record_done) = (records_rx.clone(), Arc::clone(&recorded), Arc::clone(&record_done));
        agents.push(tokio::spawn(async move {
            agent
                .run(endpoint, handshakes, connected, records, recorded, record_done)
                .await;
        }));
    }
    let total = spec.count;
    loop {
        let n = connected.load(Ordering::Relaxed);
        if n >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("ready {total}");
    let mut lines = BufReader::new(std::io::stdin()).lines();
    while let Some(Ok(line)) = tokio::task::block_in_place(|| lines.next()) {
        match line.trim() {
            "records" => {
                let _ = records_tx.send(true);
                let mut said = Instant::now();
                while record_done.load(Ordering::Relaxed) < spec.record_agents {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if said.elapsed() > Duration::from_secs(10) {
                        said = Instant::now();
                        eprintln!(
                            "simulator {}: {} of {} agents done, {} records acknowledged",
                            spec.first,
                            record_done.load(Ordering::Relaxed),
                            spec.record_agents,
                            recorded.load(Ordering::Relaxed)
                        );
                    }
                }
                println!("records_done {}", recorded.load(Ordering::Relaxed));
            }
            "quit" => break,
            _ => {}
        }
    }
    for a in agents {
        a.abort();
    }
}

struct SimAgent {
    id: String,
    records: bool,
}

fn fields(pairs: &[(&str, &str)]) -> bytes::Bytes {
    keel_proto::payload::encode(pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())))
}

impl SimAgent {
    fn identity(&self, issuer: &rcgen::Issuer<'_, rcgen::KeyPair>) -> Identity {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, &self.id);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(2);
        let cert = params.signed_by(&key, issuer).expect("sign");
        Identity::from_pem(cert.pem(), key.serialize_pem())
    }

    fn heartbeat(&self) -> EncodedRecord {
        EncodedRecord {
            data_type: keel_proto::data_type::AGENT_HEARTBEAT,
            timestamp: time::OffsetDateTime::now_utc().unix_timestamp(),
            data: fields(&[
                ("arch", "x86_64"),
                ("platform", "debian"),
                ("platform_family", "debian"),
                ("platform_version", "12"),
                ("kernel_version", "6.1.0-13-amd64"),
                ("package_type", "deb"),
                ("cpu", "0.0012"),
                ("rss", "9437184"),
                ("fds", "17"),
                ("threads", "6"),
                ("spool_bytes", "0"),
                ("dropped", "0"),
                ("plugins", ""),
            ]),
            ..Default::default()
        }
    }

    fn batch(&self, seq: u64, records: Vec<EncodedRecord>) -> PackagedData {
        PackagedData {
            records,
            agent_id: self.id.clone(),
            intranet_ipv4: vec!["10.1.2.3".into()],
            hostname: self.id.clone(),
            version: "1.0.0".into(),
            product: "keel-agent".into(),
            seq,
            epoch: 0x5ca1e,
            ..Default::default()
        }
    }

    /// Connects (retrying), then keeps the stream: heartbeats, task answers,
    /// and record batches once `records` turns true.
    async fn run(
        self,
        endpoint: Endpoint,
        handshakes: Arc<tokio::sync::Semaphore>,
        connected: Arc<AtomicUsize>,
        mut records: watch::Receiver<bool>,
        recorded: Arc<AtomicU64>,
        record_done: Arc<AtomicUsize>,
    ) {
        let (tx, mut inbound) = loop {
            let permit = handshakes.acquire().await.expect("semaphore");
            let opened = async {
                let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
                let (tx, rx) = mpsc::channel(4);
                tx.send(self.batch(1, vec![self.heartbeat()]))
                    .await
                    .map_err(|e| e.to_string())?;
                let mut inbound = TransferClient::new(channel)
                    .transfer(ReceiverStream::new(rx))
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                // The first acknowledgement: registered and persisted.
                loop {
                    match inbound.message().await {
                        Ok(Some(cmd)) if cmd.ack.is_some() => break,
                        Ok(Some(_)) => {}
                        Ok(None) => return Err("stream closed".to_owned()),
                        Err(e) => return Err(e.to_string()),
                    }
                }
                Ok::<_, String>((tx, inbound))
            }
            .await;
            drop(permit);
            match opened {
                Ok(pair) => break pair,
                Err(e) => {
                    eprintln!("{}: {e}; retrying", self.id);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        connected.fetch_add(1, Ordering::Relaxed);
        let mut seq = 1;
        // Heartbeats spread over the interval.
        let offset = u64::from(spread(self.id.as_bytes())) % HEARTBEAT.as_millis() as u64;
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_millis(offset), HEARTBEAT);
        let mut sending: Option<u64> = None;
        let mut batches_sent = 0;
        loop {
            tokio::select! {
                cmd = inbound.message() => match cmd {
                    Ok(Some(cmd)) => {
                        if let Some(task) = cmd.task {
                            seq += 1;
                            let result = EncodedRecord {
                                data_type: keel_proto::data_type::TASK_RESULT,
                                timestamp: 0,
                                data: fields(&[("token", &task.token), ("status", "succeeded"), ("msg", "done")]),
                                ..Default::default()
                            };
                            if tx.send(self.batch(seq, vec![result])).await.is_err() {
                                return;
                            }
                        }
                        if let (Some(ack), Some(waiting)) = (cmd.ack, sending)
                            && ack.seq >= waiting
                        {
                            recorded.fetch_add(RECORDS_PER_BATCH as u64, Ordering::Relaxed);
                            batches_sent += 1;
                            if batches_sent == RECORD_BATCHES {
                                sending = None;
                                record_done.fetch_add(1, Ordering::Relaxed);
                            } else {
                                seq += 1;
                                sending = Some(seq);
                                if tx.send(self.batch(seq, self.records(seq))).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    _ => return,
                },
                _ = beat.tick() => {
                    seq += 1;
                    if tx.send(self.batch(seq, vec![self.heartbeat()])).await.is_err() {
                        return;
                    }
                }
                changed = records.changed(), if self.records && sending.is_none() && batches_sent == 0 => {
                    if changed.is_err() || !*records.borrow() {
                        continue;
                    }
                    seq += 1;
                    sending = Some(seq);
                    if tx.send(self.batch(seq, self.records(seq))).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    fn records(&self, seq: u64) -> Vec<EncodedRecord> {
        (0..RECORDS_PER_BATCH)
            .map(|i| EncodedRecord {
                data_type: RECORD_TYPE,
                timestamp: 1_700_000_000,
                data: fields(&[
                    ("seq", &seq.to_string()),
                    ("i", &i.to_string()),
                    ("pad", &"p".repeat(60)),
                ]),
                ..Default::default()
            })
            .collect()
    }
}

/// A stable hash of an agent ID (FNV-1a), to spread heartbeats over the interval.
fn spread(b: &[u8]) -> u32 {
    b.iter()
        .fold(0x811C_9DC5_u32, |h, x| (h ^ u32::from(*x)).wrapping_mul(0x0100_0193))
}
