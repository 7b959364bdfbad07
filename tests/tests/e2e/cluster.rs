//! Several keel-server instances on one PostgreSQL and one NATS, sharing ports:
//! presence, command routing, rollouts, the JetStream sink under faults.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use keel_tests::cluster::{Cluster, ClusterOptions};
use keel_tests::{Agent, InFlight, Server, SimAgent, SimBehavior, eventually, eventually_within, test_plugin};
use serde_json::{Value, json};

/// An enrolled, running agent of the cluster with the test plugin as `name`,
/// `detail` its DETAIL.
async fn agent_with_plugin(cluster: &Cluster, id: &str, name: &str, detail: &Value) -> Agent {
    let first = &cluster.servers[0];
    let (status, body) = first.upload(name, "1", "exec", test_plugin()).await;
    assert!(status == 201 || status == 409, "upload {name}: {status} {body}");
    let mut agent = Agent::enrolled(first, id);
    agent.start();
    first.api().online(id).await;
    let set = json!([{"name": name, "version": "1", "detail": detail.to_string()}]);
    let (status, body) = first.put_plugins(id, &set).await;
    assert_eq!(status, 200, "{body}");
    agent
}

async fn task_status(server: &Server, token: &str) -> Value {
    let (_, t) = server.api().get(&format!("/api/v1/tasks/{token}")).await;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_online_and_reachable_through_every_instance() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let _agent = agent_with_plugin(&cluster, "c-agent-1", "echo", &json!({"mode": "echo"})).await;
    eventually("the echo plugin running", || async {
        let a = cluster.servers[0].api().agent("c-agent-1").await?;
        let p = a["plugins"].as_array()?.iter().find(|p| p["name"] == "echo")?.clone();
        (p["state"] == "running").then_some(())
    })
    .await;
    // Online through all three, held by one of them.
    let mut holders = HashSet::new();
    for s in &cluster.servers {
        let a = s.api().agent("c-agent-1").await.expect("the agent");
        assert_eq!(a["online"], true, "through {}: {a}", s.http);
        holders.insert(a["instance"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(holders.len(), 1, "every instance names the same holder: {holders:?}");
    // A task through each instance reaches it; each result is seen through the others.
    for (k, s) in cluster.servers.iter().enumerate() {
        let data = format!("through-{k}");
        let (status, body) = s
            .api()
            .post(
                "/api/v1/agents/c-agent-1/tasks",
                &json!({"data_type": 6900, "object_name": "echo", "data": data}),
            )
            .await;
        assert_eq!(status, 202, "task through instance {k}: {body}");
        let token = body["token"].as_str().expect("token").to_owned();
        for other in &cluster.servers {
            let t = eventually("the task's result through another instance", || async {
                let t = task_status(other, &token).await;
                (t["status"] == "succeeded").then_some(t)
            })
            .await;
            assert_eq!(t["result"]["msg"], format!("echo {data}"), "{t}");
        }
    }
    // The list through any instance agrees, and pages carry the count.
    for s in &cluster.servers {
        let (status, total, next, body) = s.api().get_page("/api/v1/agents?online=true&limit=1").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!((total, next), (Some(1), None));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_through_one_instance_reaches_agents_on_all_of_them_once() {
    let cluster = Cluster::start(ClusterOptions {
        nats_sink: false,
        ..ClusterOptions::default()
    })
    .await;
    let inflight = Arc::new(InFlight::default());
    let mut sims = Vec::new();
    for i in 0..100 {
        let id = format!("c-sim-{i:03}");
        sims.push(SimAgent::start(&cluster.servers[0], &id, SimBehavior::default(), Arc::clone(&inflight)).await);
    }
    let api = cluster.servers[0].api();
    let agents = eventually("all 100 simulated agents online", || async {
        let all = api.agents().await;
        (all.iter().filter(|a| a["online"] == true).count() == 100).then_some(all)
    })
    .await;
    let mut per_instance: HashMap<String, usize> = HashMap::new();
    for a in &agents {
        *per_instance
            .entry(a["instance"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        per_instance.len(),
        3,
        "the kernel spreads connections to the shared port over every instance: {per_instance:?}"
    );
    let (status, task) = api
        .post(
            "/api/v1/tasks",
            &json!({"kind": "plugin-task", "target": "all", "batch_size": 25, "timeout_secs": 30,
                    "data_type": 6900, "object_name": "echo", "data": "x"}),
        )
        .await;
    assert_eq!(status, 201, "{task}");
    let id = task["id"].as_str().expect("task id");
    let done = api.task_in_state(id, "succeeded", Duration::from_secs(60)).await;
    assert_eq!(done["counts"]["succeeded"], 100, "{done}");
    for sim in &sims {
        let tasks = &sim.log.lock().expect("sim log").tasks;
        assert_eq!(tasks.len(), 1, "{} got its subtask once: {tasks:?}", sim.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_starting_or_stopping_leaves_the_others_agents_online() {
    let mut cluster = Cluster::start(ClusterOptions {
        instances: 1,
        nats_sink: false,
        ..ClusterOptions::default()
    })
    .await;
    let inflight = Arc::new(InFlight::default());
    let mut sims = Vec::new();
    for i in 0..5 {
        sims.push(
            SimAgent::start(
                &cluster.servers[0],
                &format!("c-stay-{i}"),
                SimBehavior::default(),
                Arc::clone(&inflight),
            )
            .await,
        );
    }
    let online = |server: &Server| {
        let api = server.api();
        async move {
            api.agents()
                .await
                .iter()
                .filter(|a| a["online"] == true && a["instance"] == "i1")
                .count()
        }
    };
    eventually("five agents online at i1", || async {
        (online(&cluster.servers[0]).await == 5).then_some(())
    })
    .await;
    cluster.add().await;
    assert_eq!(online(&cluster.servers[0]).await, 5, "a second instance started");
    assert_eq!(
        online(&cluster.servers[1]).await,
        5,
        "the second instance sees them too"
    );
    assert!(cluster.servers[1].stop().is_some_and(|s| s.success()));
    assert_eq!(online(&cluster.servers[0]).await, 5, "the second instance stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_holding_instance_loses_and_repeats_no_record() {
    const COUNT: u64 = 3000;
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let detail = json!({"mode": "emit", "count": COUNT, "data_type": 6150, "per_second": 600, "payload_bytes": 60});
    let agent = agent_with_plugin(&cluster, "c-flow-1", "emitter", &detail).await;
    let holder = eventually("records flowing into JetStream", || async {
        let n = cluster.jetstream_records(6150).await.len() as u64;
        (n > 300 && n < COUNT).then_some(())?;
        cluster.holder(&agent.id).await
    })
    .await;
    cluster.servers[holder].kill();
    let moved = eventually_within(Duration::from_secs(40), "the agent on another instance", || async {
        cluster.holder(&agent.id).await.filter(|h| *h != holder)
    })
    .await;
    assert_ne!(moved, holder);
    let records = eventually_within(Duration::from_secs(60), "every record in JetStream", || async {
        let r = cluster.jetstream_records(6150).await;
        (r.len() as u64 >= COUNT).then_some(r)
    })
    .await;
    let distinct: HashSet<u64> = records
        .iter()
        .filter_map(|r| {
            let data = r["data"].as_str()?;
            let fields = keel_proto::payload::decode(&base64_decode(data)).ok()?;
            fields.get("i")?.parse().ok()
        })
        .collect();
    assert_eq!(records.len() as u64, COUNT, "total: no record stored twice");
    assert_eq!(distinct.len() as u64, COUNT, "distinct: no record lost");
    assert!(records.iter().all(|r| r["agent_id"] == "c-flow-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_for_20_seconds_loses_and_repeats_nothing() {
    const COUNT: u64 = 4000;
    let mut nats = keel_tests::cluster::OwnNats::start();
    let cluster = Cluster::start(ClusterOptions {
        instances: 2,
        nats_url: nats.url(),
        ..ClusterOptions::default()
    })
    .await;
    let detail = json!({"mode": "emit", "count": COUNT, "data_type": 6151, "per_second": 200, "payload_bytes": 60});
    let agent = agent_with_plugin(&cluster, "c-flow-2", "emitter", &detail).await;
    eventually("records flowing into JetStream", || async {
        (cluster.jetstream_records(6151).await.len() > 200).then_some(())
    })
    .await;
    let holder = cluster.holder(&agent.id).await.expect("a holder");
    nats.stop();
    let health = eventually("/healthz degraded", || async {
        let (status, body) = keel_tests::Api::new(&cluster.servers[holder].base_url(), "")
            .get("/healthz")
            .await;
        (status == 503 && body["problems"].to_string().contains("sink nats")).then_some(body)
    })
    .await;
    assert_eq!(health["status"], "degraded", "{health}");
    tokio::time::sleep(Duration::from_secs(20)).await;
    let a = cluster.servers[holder].api().agent(&agent.id).await.expect("the agent");
    assert_eq!(a["online"], true, "agents stay connected while NATS is down: {a}");
    assert_eq!(
        cluster.holder(&agent.id).await,
        Some(holder),
        "and on the same instance"
    );
    nats.start_again();
    eventually_within(Duration::from_secs(40), "/healthz ok again", || async {
        let (status, _) = keel_tests::Api::new(&cluster.servers[holder].base_url(), "")
            .get("/healthz")
            .await;
        (status == 200).then_some(())
    })
    .await;
    let records = eventually_within(Duration::from_secs(60), "every record in JetStream", || async {
        let r = cluster.jetstream_records(6151).await;
        (r.len() as u64 >= COUNT).then_some(r)
    })
    .await;
    let distinct: HashSet<&str> = records.iter().filter_map(|r| r["data"].as_str()).collect();
    assert_eq!(records.len() as u64, COUNT, "total: nothing stored twice");
    assert_eq!(distinct.len() as u64, COUNT, "distinct: nothing lost");
    // The outage shows in the holder's metrics: refused writes, JetStream's
    // acknowledgements timed, every record counted (at least once: a batch
    // resent after a reconnect counts again), the agent's plugin running.
    let base = cluster.servers[holder].base_url();
    let m = keel_tests::metrics::scrape(&keel_tests::Api::new(&base, ""), &base).await;
    assert!(m.value("keel_sink_errors_total", &[]) >= 1.0);
    assert!(m.value("keel_nats_publish_seconds_count", &[]) >= 1.0);
    assert!(m.value("keel_records_received_total", &[("data_type", "6151")]) >= COUNT as f64);
    assert_eq!(
        m.value("keel_plugins", &[("plugin", "emitter"), ("state", "running")]),
        1.0
    );
    assert_eq!(m.value("keel_agents_connected", &[]), 1.0);
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap_or_default()
}

/// Enrollment by key and a TLS scan, each touching three instances: the provider
/// agent's stream on one, the host's requests on others; the audit job started on
/// one instance, its tunnel landing on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_by_key_and_scans_work_wherever_streams_and_requests_land() {
    use keel_tests::mariadb::{AgentRow, KeyDb, key_provider};
    use keel_tests::proxy::{ProxyHost, TlsTarget};
    const KEY: &str = "c-Sup3r-Secret-Seven";
    const KEY8: &str = "c-Sup3r-Secret-Eight";
    let db = KeyDb::create(&[
        AgentRow::new("007", "c-web-7", "127.0.0.0/8", KEY),
        AgentRow::new("008", "c-web-8", "127.0.0.0/8", KEY8),
    ]);
    let cluster = Cluster::start(ClusterOptions {
        nats_sink: false,
        shared_tunnel: false,
        extra_toml: "[key_enrollment]\nenabled = true\nproviders = [\"c-keys-1\"]\nprovider_timeout = \"20s\"\n".into(),
        ..ClusterOptions::default()
    })
    .await;
    let first = &cluster.servers[0];
    let _keys = key_provider(first, &first.api(), "c-keys-1", &db).await;
    let holder = cluster.holder("c-keys-1").await.expect("the provider's instance");
    let others: Vec<usize> = (0..3).filter(|k| *k != holder).collect();

    // A challenge from one instance is spent on another, once.
    let (a, b) = (&cluster.servers[others[0]], &cluster.servers[others[1]]);
    let anon = keel_tests::Api::new(&a.base_url(), "");
    let (status, challenge) = anon.post("/enroll/challenge", &json!({})).await;
    assert_eq!(status, 200, "{challenge}");
    let nonce = challenge["nonce"].as_str().expect("nonce");
    let (status, enrolled) = enroll_by_hand(b, nonce, "007", KEY).await;
    assert_eq!(
        status, 200,
        "enrolled through another instance than the challenge's: {enrolled}"
    );
    let (status, again) = enroll_by_hand(&cluster.servers[holder], nonce, "007", KEY).await;
    assert_eq!(status, 401, "a challenge is spent once, cluster-wide: {again}");
    // And keel-agent enroll --key-file through an instance not holding the provider.
    let host = Agent::new(a, "008", "");
    let out = host.enroll_by_key(a, KEY8);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A scan started on one instance whose tunnel reaches another.
    let target = TlsTarget::start("c-db.internal.test").await;
    let tunnel_at = others[0];
    let scan_at = others[1];
    let px = ProxyHost::start(
        &cluster.servers[tunnel_at],
        "c-px-1",
        &[format!("127.0.0.1/32:{}", target.port)],
    )
    .await;
    let (status, body) = cluster.servers[scan_at]
        .api()
        .post(
            "/api/v1/scans",
            &json!({"agent": px.agent.id, "targets": [format!("127.0.0.1:{}", target.port), "127.0.0.9:1"]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body[0]["status"], "ok", "{body}");
    assert_eq!(body[0]["certificate"]["subject"], "CN=c-db.internal.test", "{body}");
    assert_eq!(body[1]["status"], "failed", "{body}");
    assert!(
        body[1]["error"].as_str().unwrap_or_default().contains("allow list"),
        "the plugin's refusal comes back from the agent's instance: {body}"
    );
    assert!(
        cluster.servers[tunnel_at].log().contains("tunnel open"),
        "the tunnel landed on the instance the test chose"
    );
    let (_, certs) = cluster.servers[holder].api().get("/api/v1/certificates").await;
    assert_eq!(
        certs.as_array().map(Vec::len),
        Some(1),
        "one inventory for all: {certs}"
    );
}

/// `POST /enroll/key` for `id` with `key`'s proof over `nonce`.
async fn enroll_by_hand(server: &Server, nonce: &str, id: &str, key: &str) -> (u16, Value) {
    let body = keel_tests::key_enroll_body(nonce, id, key, "c-host");
    keel_tests::Api::new(&server.base_url(), "")
        .post("/enroll/key", &body)
        .await
}
