//! Keel's benchmarks. Each prints its figures with ratios against a baseline
//! measured in the same run, and ends with one machine-readable summary line.
//!
//! `keel-bench dataflow [records]`: an SDK plugin emits records of a 100-byte
//! payload as fast as it can, through a real agent, over real mTLS, to a real
//! server and its file sink. The baseline is raw tonic bidi streaming over mTLS on
//! loopback, with the same batches.
//!
//! `keel-bench rollout [agents] [batch]`: a plugin version rolled out by a
//! `sync-config` task to agents simulated in-process, each over its own mTLS
//! connection, each downloading the package from the server and checking its
//! sha256 before it answers. Timed once in one batch of every agent (the baseline:
//! no batching) and once in batches of `batch`.
//!
//! `keel-bench keyrequest [socket_lookups] [exec_lookups]`: lookups per second
//! through the key-request plugin (debug mode: tasks on stdin, records on stdout)
//! against both shipped MariaDB-backed providers, Python (`mysql_provider.py`) and
//! Rust (`keel-keyprovider-mysql`), by socket and by exec, with 1 and 8 lookup
//! threads, every lookup for a different agent so that nothing is joined. The
//! counts are the Python runs'; the Rust runs make 4 (socket) and 10 (exec) times
//! as many. The baselines are the same lookups made straight to the provider: 8
//! threads of unix-socket requests, and 8 provider processes at a time. Each run
//! reports the CPU per lookup of the plugin, the provider, mariadbd and keel-bench.
//! Two ceilings that leave the providers and MariaDB out (an in-memory socket
//! server, a shell `printf` program) show what the plugin itself costs. The summary
//! line has the best figures through the plugin, and the line before it says which
//! provider gave them.
//!
//! `keel-bench filedelivery [agents] [files] [bytes]`: `keelctl files push` to
//! real agents through a real server, fresh, unchanged and with one file changed,
//! and what one delivery costs on the host (parse, verify, open, compare, atomic
//! write) against the bare atomic write of the same bytes; see
//! `keel_bench/filedelivery.rs`.
//!
//! `keel-bench proxy [scans]`: TLS inventory scans through a real agent's proxy
//! plugin and the tunnel endpoint, against the same handshakes made directly; see
//! `keel_bench/proxy.rs`.
//!
//! `keel-bench console [agents]`: what the console asks of the API against a
//! registry of 50,000 agents on PostgreSQL, against the same at 500; see
//! `keel_bench/console.rs`.
//!
//! `keel-bench footprint [settle_secs] [measure_secs]`: the memory and CPU of an
//! idle agent and its three plugins, run by a quickstart, against a process that
//! only starts a tokio runtime; see `keel_bench/footprint.rs`.
//!
//! `keel-bench scale [agents] [servers]`: idle agents held by keel-server
//! processes sharing one port, on PostgreSQL and NATS, against a bare tonic
//! server holding the same streams; see `keel_bench/scale.rs`.
#![forbid(unsafe_code)]
// A benchmark reports failure by panicking, with a message saying what failed.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Seek, SeekFrom};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_proto::grpc::transfer_client::TransferClient;
use keel_proto::grpc::transfer_server::{Transfer, TransferServer};
use keel_proto::grpc::{Command, EncodedRecord, PackagedData, Payload};
use keel_tests::{Agent, Api, InFlight, Server, ServerOptions, SimAgent, SimBehavior, eventually_within};
use prost::Message;
use serde_json::json;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

// The key-request benchmark lives beside this file (a file directly in src/bin/
// would be taken for a binary of its own).
#[path = "keel_bench/console.rs"]
mod console;
#[path = "keel_bench/filedelivery.rs"]
mod filedelivery;
#[path = "keel_bench/footprint.rs"]
mod footprint;
#[path = "keel_bench/keyrequest.rs"]
mod keyrequest;
#[path = "keel_bench/proxy.rs"]
mod proxy;
#[path = "keel_bench/scale.rs"]
mod scale;

const PAYLOAD_BYTES: usize = 100;
const BATCH: usize = 4096;

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_default();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    match which.as_str() {
        "dataflow" => {
            let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2_000_000);
            runtime.block_on(dataflow(n));
        }
        "rollout" => {
            let agents: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
            let batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
            runtime.block_on(rollout(agents, batch));
        }
        "keyrequest" => {
            let socket_lookups: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
            let exec_lookups: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
            keyrequest::run(socket_lookups, exec_lookups);
        }
        "proxy" => {
            let scans: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
            runtime.block_on(proxy::run(scans));
        }
        "filedelivery" => {
            let agents: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
            let files: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
            let bytes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4096);
            runtime.block_on(filedelivery::run(agents, files, bytes));
        }
        "console" => {
            let agents: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50_000);
            runtime.block_on(console::run(agents));
        }
        "scale" => {
            let agents: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50_000);
            let servers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
            runtime.block_on(scale::run(agents, servers));
        }
        "footprint" => {
            let settle: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(30);
            let measure: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(120);
            footprint::run(Duration::from_secs(settle), Duration::from_secs(measure));
        }
        // The footprint benchmark's baseline process.
        "footprint-floor" => footprint::floor(),
        // The scale benchmark's child processes.
        "scale-sim" => runtime.block_on(scale::sim(&args.next().unwrap_or_default())),
        "scale-baseline" => {
            let dir = std::path::PathBuf::from(args.next().unwrap_or_default());
            let port: u16 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
            runtime.block_on(scale::baseline_server(&dir, port));
        }
        _ => {
            eprintln!(
                "usage: keel-bench dataflow [records] | rollout [agents] [batch] | keyrequest [socket_lookups] [exec_lookups] | filedelivery [agents] [files] [bytes] | proxy [scans] | console [agents] | footprint [settle_secs] [measure_secs] | scale [agents] [servers]"
            );
            std::process::exit(64);
        }
    }
}

/// A payload of about `PAYLOAD_BYTES`, encoded as the SDK would.
fn payload(i: u64) -> Bytes {
    let pad = "p".repeat(PAYLOAD_BYTES - 30);
    let p = Payload {
        fields: [("i".to_owned(), i.to_string()), ("pad".to_owned(), pad)].into(),
    };
    Bytes::from(p.encode_to_vec())
}

#[derive(Debug, Default)]
struct Counter {
    records: AtomicU64,
}

#[derive(Debug, Clone)]
struct Sinkhole(Arc<Counter>);

#[tonic::async_trait]
impl Transfer for Sinkhole {
    type TransferStream = Pin<Box<dyn Stream<Item = Result<Command, Status>> + Send>>;

    async fn transfer(&self, req: Request<Streaming<PackagedData>>) -> Result<Response<Self::TransferStream>, Status> {
        let mut inbound = req.into_inner();
        let counter = Arc::clone(&self.0);
        let out = async_stream(move |tx| async move {
            while let Ok(Some(pd)) = inbound.message().await {
                counter.records.fetch_add(pd.records.len() as u64, Ordering::Relaxed);
                let _ = tx.send(Ok(Command::default())).await;
            }
        });
        Ok(Response::new(Box::pin(out)))
    }
}

fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Command, Status>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Command, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Raw tonic bidi streaming over mTLS on loopback: records per second.
async fn baseline(n: u64) -> f64 {
    keel_common::tls::install_crypto_provider();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let client_cert = rcgen::CertificateParams::new(vec!["client".into()])
        .unwrap()
        .signed_by(&client_key, &issuer)
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = Arc::new(Counter::default());
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(server_cert.pem(), server_key.serialize_pem()))
        .client_ca_root(Certificate::from_pem(ca_cert.pem()));
    let service = TransferServer::new(Sinkhole(Arc::clone(&counter))).max_decoding_message_size(64 << 20);
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client_tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_cert.pem()))
        .identity(Identity::from_pem(client_cert.pem(), client_key.serialize_pem()))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(client_tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let records: Vec<EncodedRecord> = (0..BATCH as u64)
        .map(|i| EncodedRecord {
            data_type: 6100,
            timestamp: 1_700_000_000,
            data: payload(i),
            ..Default::default()
        })
        .collect();
    let batch = PackagedData {
        records,
        agent_id: "bench".into(),
        hostname: "bench".into(),
        ..Default::default()
    };
    let batches = n.div_ceil(BATCH as u64);
    let outbound = tokio_stream::iter((0..batches).map(move |seq| PackagedData {
        seq: seq + 1,
        ..batch.clone()
    }));
    let start = Instant::now();
    let mut inbound = TransferClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .transfer(outbound)
        .await
        .unwrap()
        .into_inner();
    let mut acked = 0;
    while acked < batches {
        if inbound.next().await.is_none() {
            break;
        }
        acked += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    counter.records.load(Ordering::Relaxed) as f64 / secs
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Peak resident set, KiB.
fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// Counts newlines appended to `path` since `offset`.
fn count_new_lines(path: &std::path::Path, offset: &mut u64, lines: &mut u64) {
    let Ok(mut f) = std::fs::File::open(path) else { return };
    if f.seek(SeekFrom::Start(*offset)).is_err() {
        return;
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_ok() {
        let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        *lines += buf[..complete].iter().filter(|b| **b == b'\n').count() as u64;
        *offset += complete as u64;
    }
}

async fn dataflow(n: u64) {
    println!("dataflow: {n} records of a {PAYLOAD_BYTES}-byte payload");
    let base = baseline(n.min(4_000_000)).await;
    println!("  baseline (raw tonic bidi stream, mTLS, loopback): {base:.0} records/s");

    let server = Server::start(ServerOptions {
        release_key: true,
        extra_toml: "[sink]\nmax_file_bytes = 17179869184\n".into(),
        ..Default::default()
    })
    .await;
    let mut agent = Agent::enrolled(&server, "bench-1");
    agent.start();
    let api = server.api();
    api.online("bench-1").await;
    let pid = agent.pid().expect("agent pid");
    let plugin = std::fs::read(keel_tests::bin("keel-test-plugin")).unwrap();
    assert_eq!(server.upload("emitter", "1", "exec", plugin).await.0, 201);
    let records = server.data_dir().join("records/records.jsonl");
    let (mut offset, mut lines) = (0u64, 0u64);
    count_new_lines(&records, &mut offset, &mut lines);
    let before_lines = lines;
    let detail = json!({"mode": "emit", "count": n, "payload_bytes": PAYLOAD_BYTES, "delay_ms": 500}).to_string();
    assert_eq!(
        server
            .put_plugins(
                "bench-1",
                &json!([{"name": "emitter", "version": "1", "detail": detail}])
            )
            .await
            .0,
        200
    );

    // Wait for the first emitted record, then measure until the last one is stored.
    eventually_within(Duration::from_secs(60), "the first emitted record", || {
        count_new_lines(&records, &mut offset, &mut lines);
        std::future::ready((lines > before_lines + 10).then_some(()))
    })
    .await;
    let cpu_start = cpu_secs(pid);
    let start = Instant::now();
    let start_lines = lines;
    let deadline = Duration::from_secs(600);
    while lines < before_lines + n && start.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        count_new_lines(&records, &mut offset, &mut lines);
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_secs(pid) - cpu_start;
    let rss = peak_rss_kb(pid);
    let measured = lines.saturating_sub(start_lines);
    let text = std::fs::read_to_string(&records).unwrap_or_default();
    let stored = text.matches("\"data_type\":6100,").count() as u64;
    let lost = n.saturating_sub(stored);
    let rate = measured as f64 / secs;
    let mb = rate * PAYLOAD_BYTES as f64 / 1e6;
    let ratio = rate / base;
    let cpu_per_m = cpu / (measured.max(1) as f64 / 1e6);
    println!(
        "  keel end to end (plugin -> agent -> mTLS -> server -> file sink): {rate:.0} records/s, {mb:.1} MB/s payload"
    );
    println!("  ratio to baseline: {ratio:.3}");
    println!("  agent CPU: {cpu_per_m:.2} s per million records; peak agent RSS: {rss} KiB");
    println!("  stored {stored} of {n}; lost {lost}");
    println!(
        "dataflow records_per_s={rate:.0} mb_per_s={mb:.1} ratio={ratio:.3} agent_cpu_s_per_m={cpu_per_m:.2} agent_rss_kb={rss} lost={lost}"
    );
}

/// Raises the soft open-files limit to the hard one: each simulated agent holds a
/// connection.
fn raise_nofile(need: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    }
    assert!(
        hard >= need,
        "{need} open files are needed and the hard limit is {hard}; raise it (ulimit -Hn)"
    );
}

/// Rolls `version` of the plugin out with a policy change and a sync-config task
/// in batches of `batch`; returns the seconds until the task finished and the task.
async fn timed_rollout(api: &Api, version: &str, batch: usize) -> (f64, serde_json::Value) {
    let (status, body) = api
        .put_json("/api/v1/policies/bench", &json!({"version": version}))
        .await;
    assert_eq!(status, 200, "policy update: {body}");
    let start = Instant::now();
    let (status, task) = api
        .post(
            "/api/v1/tasks",
            &json!({"kind": "sync-config", "target": "all", "batch_size": batch, "timeout_secs": 120}),
        )
        .await;
    assert_eq!(status, 201, "{task}");
    let id = task["id"].as_str().expect("task id").to_owned();
    let done = eventually_within(Duration::from_secs(600), "the rollout to finish", || async {
        let (_, t) = api.get(&format!("/api/v1/tasks/{id}")).await;
        matches!(
            t["state"].as_str(),
            Some("succeeded" | "failed" | "paused" | "cancelled")
        )
        .then_some(t)
    })
    .await;
    (start.elapsed().as_secs_f64(), done)
}

async fn rollout(n: usize, batch: usize) {
    println!("rollout: a plugin version to {n} simulated agents over mTLS, batches of {batch}");
    raise_nofile(n as u64 + 256);
    let server = Server::start(ServerOptions {
        release_key: true,
        ..Default::default()
    })
    .await;
    let pid = server.pid().expect("server pid");
    let api = server.api();
    // A small package: what is measured is the control plane, not the copy.
    let plugin = b"#!/bin/sh\nexec sleep 3600\n".to_vec();
    for v in ["1", "2", "3"] {
        let mut p = plugin.clone();
        p.extend_from_slice(format!("# {v}\n").as_bytes());
        assert_eq!(server.upload("bench", v, "exec", p).await.0, 201);
    }
    let policy = json!({"name": "bench", "component": "bench", "version": "1", "target": "all"});
    assert_eq!(api.post("/api/v1/policies", &policy).await.0, 201);

    let start = Instant::now();
    let inflight = Arc::new(InFlight::default());
    let behavior = SimBehavior {
        download: true,
        ..Default::default()
    };
    let server = Arc::new(server);
    let mut agents = Vec::with_capacity(n);
    let mut starting = tokio::task::JoinSet::new();
    for i in 0..n {
        let (server, behavior, inflight) = (Arc::clone(&server), behavior.clone(), Arc::clone(&inflight));
        starting.spawn(async move { SimAgent::start(&server, &format!("sim-{i:05}"), behavior, inflight).await });
        // A bounded number of handshakes at once, as agents coming back after an
        // outage would be spread by their backoff.
        if starting.len() >= 64 {
            agents.push(
                starting
                    .join_next()
                    .await
                    .expect("a starting agent")
                    .expect("sim agent"),
            );
        }
    }
    while let Some(a) = starting.join_next().await {
        agents.push(a.expect("sim agent"));
    }
    eventually_within(Duration::from_secs(300), "every agent online", || async {
        let (_, list) = api.get("/api/v1/agents?online=true").await;
        (list.as_array().map_or(0, Vec::len) == n).then_some(())
    })
    .await;
    let connect = start.elapsed().as_secs_f64();
    println!("  {n} agents connected and registered in {connect:.1} s");

    let cpu0 = cpu_secs(pid);
    let (base, t) = timed_rollout(&api, "2", n).await;
    let base_cpu = cpu_secs(pid) - cpu0;
    let base_failed = t["counts"]["failed"].as_u64().unwrap_or(0) + t["counts"]["timed_out"].as_u64().unwrap_or(0);
    assert_eq!(t["state"], "succeeded", "the unbatched rollout: {t}");
    println!("  baseline, no batching ({n} at once): {base:.2} s, server CPU {base_cpu:.2} s");

    inflight.max.store(0, Ordering::SeqCst);
    let cpu1 = cpu_secs(pid);
    let (secs, t) = timed_rollout(&api, "3", batch).await;
    let cpu = cpu_secs(pid) - cpu1;
    let failed = t["counts"]["failed"].as_u64().unwrap_or(0) + t["counts"]["timed_out"].as_u64().unwrap_or(0);
    let succeeded = t["counts"]["succeeded"].as_u64().unwrap_or(0);
    let batches = n.div_ceil(batch);
    println!(
        "  batched ({batches} batches of {batch}): {secs:.2} s, server CPU {cpu:.2} s; {succeeded} succeeded, {failed} failed"
    );
    println!("  ratio batched / no batching: {:.2}", secs / base);
    let on_v3 = agents
        .iter()
        .filter(|a| {
            a.log
                .lock()
                .unwrap()
                .configs
                .last()
                .is_some_and(|c| c.contains(&("bench".to_owned(), "3".to_owned())))
        })
        .count();
    println!("  agents whose last configuration names version 3: {on_v3} of {n}");
    let rss = peak_rss_kb(pid);
    println!(
        "  server peak RSS: {rss} KiB; most agents applying at once when batched: {}",
        inflight.max.load(Ordering::SeqCst)
    );
    println!(
        "rollout agents={n} seconds={secs:.2} server_rss_kb={rss} failed={}",
        failed + base_failed
    );
}
