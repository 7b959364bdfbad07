//! `/metrics`: the server's series move when agents connect and records flow,
//! scrapes from outside loopback need a token, and the agent's own endpoint
//! answers only on loopback. Every scrape is read with the Prometheus Python
//! client's OpenMetrics parser.

use std::time::Duration;

use keel_proto::grpc::EncodedRecord;
use keel_tests::metrics::{fetch, scrape};
use keel_tests::{
    Agent, Api, Server, ServerOptions, agent_pair, batch, eventually, foreign_signed, raw_stream, stream_refusal,
};

fn record(n: u8) -> EncodedRecord {
    EncodedRecord {
        data_type: 6100,
        timestamp: 1_700_000_000,
        data: bytes::Bytes::from(vec![n; 4]),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_server_series_move_as_agents_connect_and_records_flow() {
    let server = Server::start(ServerOptions::default()).await;
    let base = server.base_url();
    // From loopback, no token is needed.
    let anonymous = Api::new(&base, "");
    let before = scrape(&anonymous, &base).await;
    assert_eq!(before.value("keel_agents_connected", &[]), 0.0);
    assert_eq!(before.value("keel_records_received_total", &[]), 0.0);
    assert!(
        before
            .samples
            .iter()
            .all(|s| s.labels.get("keel_instance").is_some_and(|i| !i.is_empty())),
        "every series names its instance"
    );
    assert_eq!(before.kind("keel_sink_write_seconds"), Some("histogram"));
    assert_eq!(before.kind("keel_streams_opened"), Some("counter"));

    // A request forwarded by a proxy on this host is not trusted as loopback.
    let (status, _, body) = anonymous
        .send_raw(
            anonymous
                .client()
                .get(format!("{base}/metrics"))
                .header("X-Forwarded-For", "203.0.113.9"),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    // An enrollment that is not even JSON is counted as refused.
    let (status, _) = anonymous.post_raw("/enroll", "{").await;
    assert_eq!(status, 400);

    // A handshake with a certificate from another CA is refused and counted.
    stream_refusal(&server, Some(&foreign_signed("intruder-9")), "intruder-9").await;

    // A real agent, with its own metrics endpoint, and a raw stream sending
    // three records of one type.
    let port = keel_tests::free_port();
    let mut agent = Agent::new(
        &server,
        "metrics-1",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let out = agent.enroll(&server, &server.enrollment_token(1, "10m"), Some(&server.fingerprint()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    agent.start();
    server.api().online("metrics-1").await;
    let raw = Agent::enrolled(&server, "metrics-raw");
    let mut s = raw_stream(&server, Some(&agent_pair(&raw))).await.unwrap();
    s.tx.send(batch("metrics-raw", 1, 0x5eed, vec![record(1), record(2), record(3)]))
        .await
        .unwrap();
    s.rx.message().await.unwrap().unwrap().ack.expect("an ack");
    let (status, _) = server.api().get("/api/v1/agents").await;
    assert_eq!(status, 200);

    let after = eventually("the series to move", || async {
        let m = scrape(&anonymous, &base).await;
        let moved = m.value("keel_agents_connected", &[]) == 2.0
            && m.value("keel_agents_by_version", &[]) == 1.0
            && m.has("keel_http_requests_total", &[("route", "/api/v1/agents")]);
        moved.then_some(m)
    })
    .await;
    let v = |name: &str, labels: &[(&str, &str)]| after.value(name, labels);
    assert_eq!(v("keel_agents_online", &[]), 2.0);
    assert_eq!(v("keel_agents_known", &[]), 2.0);
    assert!(v("keel_streams_opened_total", &[]) >= 2.0);
    assert!(
        v(
            "keel_tls_handshakes_refused_total",
            &[("listener", "grpc"), ("reason", "unknown_issuer")]
        ) >= 1.0
    );
    assert_eq!(
        v(
            "keel_enrollments_total",
            &[("method", "token"), ("outcome", "accepted")]
        ),
        2.0
    );
    assert_eq!(
        v("keel_enrollments_total", &[("method", "token"), ("outcome", "invalid")]),
        1.0
    );
    assert_eq!(v("keel_records_received_total", &[("data_type", "6100")]), 3.0);
    assert_eq!(v("keel_record_bytes_received_total", &[("data_type", "6100")]), 12.0);
    assert!(
        v("keel_records_received_total", &[("data_type", "1000")]) >= 1.0,
        "the agent's heartbeats"
    );
    assert!(v("keel_batches_acknowledged_total", &[]) >= 2.0);
    assert!(v("keel_sink_write_seconds_count", &[]) >= 2.0);
    assert_eq!(v("keel_sink_errors_total", &[]), 0.0);
    assert_eq!(v("keel_records_lost_total", &[]), 0.0);
    assert!(v("keel_store_query_seconds_count", &[("op", "agent_connected")]) >= 2.0);
    assert!(
        v(
            "keel_http_requests_total",
            &[("route", "/api/v1/agents"), ("method", "GET"), ("status", "200")]
        ) >= 1.0
    );
    assert!(v("keel_http_request_seconds_count", &[("route", "/api/v1/agents")]) >= 1.0);
    assert!(after.has("keel_fleet_spool_bytes", &[]));
    assert_eq!(after.value("keel_tasks", &[]), 0.0);

    // A task to every agent shows in the tasks by state once it is done.
    let (status, task) = server
        .api()
        .post(
            "/api/v1/tasks",
            &serde_json::json!({"kind": "sync-config", "target": "all"}),
        )
        .await;
    assert_eq!(status, 201, "{task}");
    eventually("the task to count as ended", || async {
        let m = scrape(&anonymous, &base).await;
        (m.value("keel_tasks", &[]) == 1.0 && !m.has("keel_tasks", &[("state", "running")])).then_some(())
    })
    .await;

    // The raw stream ends: counted, and no longer connected.
    drop(s);
    let gone = eventually("the closed stream to count", || async {
        let m = scrape(&anonymous, &base).await;
        (m.value("keel_agents_connected", &[]) == 1.0).then_some(m)
    })
    .await;
    assert!(gone.value("keel_streams_closed_total", &[("reason", "ended")]) >= 1.0);
    dashboard_reads_only_served_series(&gone);

    // The agent's own endpoint, on loopback.
    let agent_base = format!("http://127.0.0.1:{port}");
    let own = eventually("the agent to count what it sent", || async {
        let m = scrape(&anonymous, &agent_base).await;
        (m.value("keel_agent_records_sent_total", &[]) > 0.0).then_some(m)
    })
    .await;
    assert!(own.value("keel_agent_stream_opens_total", &[]) >= 1.0);
    assert!(own.value("keel_agent_resident_bytes", &[]) > 0.0);
    assert_eq!(own.value("keel_agent_records_dropped_total", &[]), 0.0);
    let (status, _, _) = anonymous
        .send_raw(anonymous.client().get(format!("{agent_base}/other")))
        .await;
    assert_eq!(status, 404);
    let (status, _, _) = anonymous
        .send_raw(anonymous.client().post(format!("{agent_base}/metrics")))
        .await;
    assert_eq!(status, 405);
    agent.stop_within(Duration::from_secs(10));
}

/// Series that have samples only after what this test does not do: a task
/// running at the moment of the scrape, an agent with a spool or with plugins,
/// the NATS sink. The server's unit tests check their names.
const NOT_SEEN_HERE: &[&str] = &[
    "keel_rollout_subtasks",
    "keel_rollout_failure_threshold",
    "keel_agent_spool_bytes",
    "keel_agent_records_dropped",
    "keel_plugins",
    "keel_plugin_restarts",
    "keel_nats_publish_seconds",
];

/// Every series the shipped Grafana dashboard queries is one the server serves.
fn dashboard_reads_only_served_series(scrape: &keel_tests::metrics::Scrape) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/grafana/keel-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("keel_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                queried.push(name);
            }
        }
    }
    assert!(queried.len() > 20, "{queried:?}");
    for name in queried {
        if name == "keel_instance" {
            continue;
        }
        let family = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            scrape.families.iter().any(|f| f == family) || NOT_SEEN_HERE.contains(&family),
            "the dashboard queries {name}, which the server does not serve"
        );
    }
}

#[tokio::test]
async fn scrapes_need_a_token_when_loopback_is_not_trusted() {
    let server = Server::start(ServerOptions {
        http_toml: "open_metrics_on_loopback = false".into(),
        ..Default::default()
    })
    .await;
    let base = server.base_url();
    let (status, _, body) = fetch(&Api::new(&base, ""), &base).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("bearer token"), "{body}");
    let (status, _, body) = fetch(&Api::new(&base, "keel_a_not-a-token"), &base).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unknown, expired or revoked token"), "{body}");
    let viewer = server.cli(&["token", "create", "--role", "viewer"]);
    let m = scrape(&Api::new(&base, &viewer), &base).await;
    assert!(m.has("keel_agents_connected", &[]));
    // The refusals were counted too.
    assert!(m.value("keel_http_requests_total", &[("route", "/metrics"), ("status", "401")]) >= 2.0);
}

#[tokio::test]
async fn the_agent_refuses_a_metrics_address_off_loopback() {
    let server = Server::start(ServerOptions::default()).await;
    let agent = Agent::new(&server, "metrics-2", "[metrics]\nlisten = \"0.0.0.0:9464\"\n");
    let out = agent.cmd(&["run"]).output().expect("run keel-agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("metrics.listen") && err.contains("not a loopback address"),
        "{err}"
    );
}

#[tokio::test]
async fn logs_can_be_json_lines_for_shippers() {
    let server = Server::start(ServerOptions {
        extra_toml: "[log]\nformat = \"json\"\n".into(),
        ..Default::default()
    })
    .await;
    let mut agent = Agent::new(&server, "json-1", "[log]\nformat = \"json\"\n");
    let out = agent.enroll(&server, &server.enrollment_token(1, "10m"), Some(&server.fingerprint()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    agent.start();
    server.api().online("json-1").await;
    agent.stop_within(Duration::from_secs(10));
    let lines = |log: String| -> Vec<serde_json::Value> {
        log.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
            .collect()
    };
    let server_lines = lines(server.log());
    let listening = server_lines
        .iter()
        .find(|l| l["fields"]["message"] == "keel-server listening")
        .expect("the listening line");
    assert_eq!(listening["level"], "INFO");
    assert!(listening["fields"]["instance"].is_string(), "{listening}");
    let online = server_lines
        .iter()
        .find(|l| l["fields"]["message"] == "agent online")
        .expect("the agent online line");
    assert_eq!(
        online["span"]["agent_id"], "json-1",
        "the stream's span names the agent: {online}"
    );
    let agent_lines = lines(agent.log());
    assert!(
        agent_lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["timestamp"].is_string()),
        "{agent_lines:?}"
    );
}
