//! The control plane: roles and the audit log, policies, batched tasks with pause,
//! resume and cancel, and refusals of bad input.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keel_tests::{Agent, Api, InFlight, Server, ServerOptions, SimAgent, SimBehavior, eventually};
use serde_json::{Value, json};

fn opts(extra: &str) -> ServerOptions {
    ServerOptions {
        release_key: true,
        extra_toml: extra.into(),
        ..Default::default()
    }
}

const SCRIPT: &[u8] = b"#!/bin/sh\nexit 0\n";

async fn upload(server: &Server, name: &str, version: &str) {
    let (status, body) = server.upload(name, version, "exec", SCRIPT.to_vec()).await;
    assert_eq!(status, 201, "{body}");
}

async fn sims(
    server: &Server,
    n: usize,
    behavior: impl Fn(usize) -> SimBehavior,
    inflight: &Arc<InFlight>,
) -> Vec<SimAgent> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(SimAgent::start(server, &format!("sim-{i:02}"), behavior(i), Arc::clone(inflight)).await);
    }
    let api = server.api();
    eventually("every simulated agent registered", || async {
        (api.agents().await.len() >= n).then_some(())
    })
    .await;
    out
}

async fn wait_state(api: &Api, id: &str, want: &str) -> Value {
    api.task_in_state(id, want, std::time::Duration::from_secs(60)).await
}

#[tokio::test]
async fn every_mutating_endpoint_needs_a_token_and_the_role_and_is_audited() {
    let server = Server::start(opts("")).await;
    let base = server.base_url();
    let admin = server.api();
    let viewer_secret = server.cli(&["token", "create", "--role", "viewer"]);
    let viewer = server.api_with(&viewer_secret);
    let operator = server.api_with(&server.cli(&["token", "create", "--role", "operator"]));

    // Every endpoint the OpenAPI document lists.
    let (status, doc) = admin.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(
        Api::new(&base, "").get("/api/v1/openapi.json").await.0,
        401,
        "the document is under /api/v1 too"
    );
    // Every operation documents its errors as the one JSON shape.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in ["get", "put", "post", "delete", "patch"]
            .into_iter()
            .filter_map(|m| Some((m, item.get(m)?)))
        {
            for range in ["4XX", "5XX"] {
                assert_eq!(
                    op["responses"][range]["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{method} {path} {range}"
                );
            }
        }
    }
    assert!(doc["components"]["schemas"]["ErrorBody"]["properties"]["error"].is_object());
    let mut mutating = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in ["post", "put", "delete"] {
            if item.get(method).is_some() {
                mutating.push((
                    method.to_owned(),
                    path.replace("{id}", "x")
                        .replace("{name}", "x")
                        .replace("{version}", "1")
                        .replace("{tag}", "t"),
                ));
            }
        }
    }
    assert!(mutating.len() >= 15, "{mutating:?}");
    let client = reqwest::Client::new();
    let call = |method: &str, path: &str, token: &str| {
        let url = format!("{base}{path}");
        let req = match method {
            "post" => client.post(url),
            "put" => client.put(url),
            _ => client.delete(url),
        };
        let req = req.header("content-type", "application/json").body("{}");
        let req = if token.is_empty() { req } else { req.bearer_auth(token) };
        async move { req.send().await.unwrap().status().as_u16() }
    };
    for (method, path) in &mutating {
        assert_eq!(call(method, path, "").await, 401, "{method} {path} without a token");
        assert_eq!(
            call(method, path, "keel_a_forged").await,
            401,
            "{method} {path} with a wrong token"
        );
        assert_eq!(
            call(method, path, &viewer_secret).await,
            403,
            "{method} {path} as a viewer"
        );
    }
    // Admin-only classes refuse operators.
    for (method, path) in [
        ("post", "/api/v1/tokens"),
        ("delete", "/api/v1/tokens/x"),
        ("post", "/api/v1/agents/x/revoke"),
    ] {
        let (status, body) = match method {
            "post" => operator.post(path, &json!({"role": "viewer"})).await,
            _ => operator.send_delete(path).await,
        };
        assert_eq!(status, 403, "{method} {path} as an operator: {body}");
    }
    // Reading is a viewer's right.
    for path in [
        "/api/v1/agents",
        "/api/v1/policies",
        "/api/v1/tasks",
        "/api/v1/components",
    ] {
        assert_eq!(viewer.get(path).await.0, 200, "{path}");
    }

    // Changes, made and refused, are in the audit log.
    upload(&server, "p", "1").await;
    let (status, _) = admin
        .post(
            "/api/v1/policies",
            &json!({"name": "fleet", "component": "p", "version": "1", "target": "all"}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = viewer
        .post(
            "/api/v1/policies",
            &json!({"name": "nope", "component": "p", "version": "1", "target": "all"}),
        )
        .await;
    assert_eq!(status, 403);
    let (_, log) = admin.get("/api/v1/audit").await;
    let entries = log.as_array().unwrap();
    let find = |action: &str, status: i64| {
        entries
            .iter()
            .find(|e| e["action"] == action && e["status"] == status)
            .cloned()
    };
    let made = find("POST /api/v1/policies", 201).expect("the policy creation is audited");
    assert_eq!(made["outcome"], "ok");
    assert!(made["target"] == "/api/v1/policies" && made["at"].is_string());
    let refused = find("POST /api/v1/policies", 403).expect("the refusal is audited");
    assert!(
        refused["outcome"].as_str().unwrap().contains("needs the operator role"),
        "{refused}"
    );
    assert!(find("POST /api/v1/components/{name}/versions", 201).is_some());
    let anonymous: Vec<_> = entries.iter().filter(|e| e["actor"] == "anonymous").collect();
    assert!(!anonymous.is_empty(), "calls without a token are audited as anonymous");
    // Filters.
    let viewer_id = refused["actor"].as_str().unwrap().to_owned();
    let (_, only) = admin.get(&format!("/api/v1/audit?actor={viewer_id}")).await;
    assert!(
        only.as_array()
            .unwrap()
            .iter()
            .all(|e| e["actor"] == viewer_id.as_str())
    );
    let (status, body) = admin.get("/api/v1/audit?since=yesterday").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("invalid since"), "{body}");
}

#[tokio::test]
async fn a_policy_rolls_out_to_fifty_agents_in_batches_of_ten() {
    let server = Server::start(opts("")).await;
    let api = server.api();
    upload(&server, "p", "1").await;
    upload(&server, "p", "2").await;
    let inflight = Arc::new(InFlight::default());
    let behavior = |_| SimBehavior {
        answer_after: std::time::Duration::from_millis(50),
        ..Default::default()
    };
    let fleet = sims(&server, 50, behavior, &inflight).await;
    for a in &fleet {
        assert_eq!(api.put(&format!("/api/v1/agents/{}/tags/fleet", a.id)).await.0, 200);
    }
    let (status, body) = api
        .post(
            "/api/v1/policies",
            &json!({"name": "p-fleet", "component": "p", "version": "2", "target": {"tags": ["fleet"]}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (_, config) = api.get("/api/v1/agents/sim-07/config").await;
    assert_eq!(config["components"][0]["version"], "2");
    assert_eq!(config["components"][0]["source"]["name"], "p-fleet");

    let (status, task) = api
        .post(
            "/api/v1/tasks",
            &json!({"kind": "sync-config", "target": {"tags": ["fleet"]}, "batch_size": 10, "failure_threshold": 0.1}),
        )
        .await;
    assert_eq!(status, 201, "{task}");
    let done = wait_state(&api, task["id"].as_str().unwrap(), "succeeded").await;
    assert_eq!(done["counts"]["succeeded"], 50, "{done}");
    let max = inflight.max.load(Ordering::SeqCst);
    assert!(
        (2..=10).contains(&max),
        "at most a batch of 10 in flight at once, and really in parallel: {max}"
    );
    for a in &fleet {
        let log = a.log.lock().unwrap();
        assert!(
            log.configs
                .iter()
                .any(|c| c.contains(&("p".to_owned(), "2".to_owned()))),
            "{} got p 2",
            a.id
        );
    }
    assert!(
        done["subtasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "succeeded" && s["result"]["token"] == s["token"])
    );
}

#[tokio::test]
async fn failures_pause_the_rollout_then_resume_continues_and_cancel_stops_it() {
    let server = Server::start(opts("")).await;
    let api = server.api();
    upload(&server, "p", "3").await;
    let inflight = Arc::new(InFlight::default());
    // Three agents in every ten fail to run p.
    let behavior = |i: usize| SimBehavior {
        fail_plugins: if i % 10 < 3 { vec!["p".into()] } else { vec![] },
        ..Default::default()
    };
    let _fleet = sims(&server, 50, behavior, &inflight).await;
    assert_eq!(
        api.post(
            "/api/v1/policies",
            &json!({"name": "p3", "component": "p", "version": "3", "target": "all"})
        )
        .await
        .0,
        201
    );
    let (_, task) = api
        .post(
            "/api/v1/tasks",
            &json!({"kind": "sync-config", "target": "all", "batch_size": 10, "failure_threshold": 0.2}),
        )
        .await;
    let id = task["id"].as_str().unwrap().to_owned();
    let paused = wait_state(&api, &id, "paused").await;
    assert_eq!(
        (
            paused["counts"]["failed"].as_i64(),
            paused["counts"]["pending"].as_i64()
        ),
        (Some(3), Some(40)),
        "{paused}"
    );
    assert!(
        paused["reason"].as_str().unwrap().contains("failure threshold"),
        "{paused}"
    );

    let (status, _) = api.post(&format!("/api/v1/tasks/{id}/resume"), &json!({})).await;
    assert_eq!(status, 200);
    let again = wait_state(&api, &id, "paused").await;
    assert_eq!(
        again["counts"]["pending"], 30,
        "resume sent exactly one more batch: {again}"
    );

    let (status, cancelled) = api.post(&format!("/api/v1/tasks/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(cancelled["state"], "cancelled");
    assert_eq!(
        (
            cancelled["counts"]["cancelled"].as_i64(),
            cancelled["counts"]["pending"].as_i64()
        ),
        (Some(30), Some(0))
    );
    let (status, body) = api.post(&format!("/api/v1/tasks/{id}/resume"), &json!({})).await;
    assert_eq!(status, 409, "a cancelled task stays cancelled: {body}");
    // Nothing more goes out.
    let (_, after) = api.get(&format!("/api/v1/tasks/{id}")).await;
    assert_eq!(
        after["counts"]["succeeded"].as_i64().unwrap() + after["counts"]["failed"].as_i64().unwrap(),
        20
    );
}

#[tokio::test]
async fn a_real_agent_reports_a_plugin_that_will_not_start_as_a_failed_subtask() {
    let server = Server::start(opts("")).await;
    let api = server.api();
    let mut agent = Agent::enrolled(&server, "real-1");
    agent.start();
    api.online("real-1").await;
    assert_eq!(
        server.upload("crashy", "1", "exec", keel_tests::test_plugin()).await.0,
        201
    );
    let detail = json!({"mode": "crash"}).to_string();
    let policy = json!({"name": "crashy", "component": "crashy", "version": "1", "detail": detail, "target": {"agents": ["real-1"]}});
    assert_eq!(api.post("/api/v1/policies", &policy).await.0, 201);
    let (_, task) = api
        .post(
            "/api/v1/tasks",
            &json!({"kind": "sync-config", "target": {"agents": ["real-1"]}}),
        )
        .await;
    let done = wait_state(&api, task["id"].as_str().unwrap(), "failed").await;
    let sub = &done["subtasks"][0];
    assert_eq!(sub["status"], "failed");
    assert!(
        sub["result"]["msg"].as_str().unwrap().contains("does not keep running"),
        "{sub}"
    );
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let server = Server::start(opts("[components]\nmax_package_bytes = 4096\n")).await;
    let api = server.api();
    let _sim = SimAgent::start(&server, "sim-x", SimBehavior::default(), Arc::new(InFlight::default())).await;
    eventually("the agent registered", || async { api.agent("sim-x").await }).await;

    let mut big = SCRIPT.to_vec();
    big.resize(10_000, b'#');
    let (status, body) = server.upload("p", "1", "exec", big).await;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("larger than 4096"), "{body}");

    let url = format!("{}/api/v1/components/p/versions", server.base_url());
    let wrong = "0".repeat(64);
    let (status, body) = api
        .send_request(
            api.client()
                .post(url)
                .query(&[("version", "1"), ("type", "exec"), ("sha256", &wrong)])
                .body(SCRIPT.to_vec()),
        )
        .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("sha256 mismatch"), "{body}");
    let (status, body) = server.upload("p", "1", "tar.gz", SCRIPT.to_vec()).await;
    assert_eq!(status, 400, "a script is not a tar.gz: {body}");
    assert_eq!(api.get("/api/v1/components").await.1, json!([]), "nothing was stored");

    let (status, body) = api
        .post(
            "/api/v1/policies",
            &json!({"name": "p", "component": "p", "version": "9", "target": "all"}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("has no version 9"), "{body}");
    assert_eq!(api.get("/api/v1/policies").await.1, json!([]));

    let (status, body) = api
        .post(
            "/api/v1/tasks",
            &json!({"kind": "restart-agent", "target": {"agents": ["ghost"]}}),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "no agent ghost");
    let (status, body) = api
        .post("/api/v1/tasks", &json!({"kind": "reboot", "target": "all"}))
        .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("invalid kind"), "{body}");
    for path in ["/api/v1/tasks", "/api/v1/policies"] {
        let (status, body) = api.post_raw(path, "{\"kind\": ").await;
        assert_eq!(status, 400, "{path}");
        assert!(
            body["error"].as_str().unwrap().starts_with("invalid request body"),
            "{body}"
        );
    }
    assert_eq!(api.get("/api/v1/tasks").await.1, json!([]), "no task was created");

    // A version a policy uses cannot be deleted, nor changed.
    upload(&server, "p", "1").await;
    assert_eq!(
        api.post(
            "/api/v1/policies",
            &json!({"name": "p1", "component": "p", "version": "1", "target": "all"})
        )
        .await
        .0,
        201
    );
    let (status, body) = api.send_delete("/api/v1/components/p/versions/1").await;
    assert_eq!(status, 409);
    assert!(body["error"].as_str().unwrap().contains("used by policy p1"), "{body}");
    let (status, _) = server.upload("p", "1", "exec", b"#!/bin/sh\nexit 1\n".to_vec()).await;
    assert_eq!(status, 409, "a version in use is immutable");
    // Conflicting policies are refused with an explanation.
    upload(&server, "p", "2").await;
    assert_eq!(api.put("/api/v1/agents/sim-x/tags/a").await.0, 200);
    assert_eq!(api.put("/api/v1/agents/sim-x/tags/b").await.0, 200);
    let p_a = json!({"name": "pa", "component": "p", "version": "1", "target": {"tags": ["a"]}});
    assert_eq!(api.post("/api/v1/policies", &p_a).await.0, 201);
    let p_b = json!({"name": "pb", "component": "p", "version": "2", "target": {"tags": ["b"]}});
    let (status, body) = api.post("/api/v1/policies", &p_b).await;
    assert_eq!(status, 409);
    assert!(body["error"].as_str().unwrap().contains("sim-x"), "{body}");
}

#[tokio::test]
async fn agents_are_filtered_tagged_and_decommissioned() {
    let server = Server::start(opts("")).await;
    let api = server.api();
    let mut a = Agent::enrolled(&server, "keep-1");
    let mut b = Agent::enrolled(&server, "drop-1");
    a.start();
    b.start();
    api.online("keep-1").await;
    api.online("drop-1").await;
    assert_eq!(api.put("/api/v1/agents/keep-1/tags/prod").await.0, 200);
    let ids = |v: Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(api.get("/api/v1/agents?tag=prod").await.1), ["keep-1"]);
    assert_eq!(
        ids(api.get("/api/v1/agents?hostname=nomatch").await.1),
        Vec::<String>::new()
    );
    assert_eq!(ids(api.get("/api/v1/agents?online=true").await.1).len(), 2);
    let (status, body) = api.get("/api/v1/agents?colour=red").await;
    assert_eq!(status, 400, "{body}");
    let (status, tags) = api.send_delete("/api/v1/agents/keep-1/tags/prod").await;
    assert_eq!((status, tags), (200, json!([])));

    let (status, _) = api.send_delete("/api/v1/agents/drop-1").await;
    assert_eq!(status, 204);
    assert!(api.agent("drop-1").await.is_none(), "forgotten");
    eventually("the decommissioned agent to be refused at connect", || async {
        server.log().contains("client certificate is revoked").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_task_carries_on_where_it_was_after_a_server_restart() {
    let mut server = Server::start(opts("")).await;
    let api = server.api();
    let ids = ["re-1", "re-2", "re-3"];
    let mut agents: Vec<Agent> = ids.iter().map(|id| Agent::enrolled(&server, id)).collect();
    for a in &mut agents {
        a.start();
    }
    for id in ids {
        api.online(id).await;
    }
    assert_eq!(
        server.upload("echo", "1", "exec", keel_tests::test_plugin()).await.0,
        201
    );
    let policy = json!({"name": "echo", "component": "echo", "version": "1", "target": "all"});
    assert_eq!(api.post("/api/v1/policies", &policy).await.0, 201);
    let (_, sync) = api
        .post("/api/v1/tasks", &json!({"kind": "sync-config", "target": "all"}))
        .await;
    wait_state(&api, sync["id"].as_str().unwrap(), "succeeded").await;

    // One agent at a time; each takes 1.5 s to answer.
    let (status, task) = api
        .post(
            "/api/v1/tasks",
            &json!({"kind": "plugin-task", "target": "all", "batch_size": 1, "timeout_secs": 60,
                    "data_type": 6900, "object_name": "echo", "data": "sleep:1500"}),
        )
        .await;
    assert_eq!(status, 201, "{task}");
    let id = task["id"].as_str().unwrap().to_owned();
    eventually("the first subtask to be sent", || async {
        let (_, t) = api.get(&format!("/api/v1/tasks/{id}")).await;
        (t["counts"]["sent"] == 1).then_some(())
    })
    .await;

    // SIGKILL mid-batch: the answer in flight reaches the new server from the
    // agent's spool, and the rest of the rollout follows.
    server.restart().await;
    let done = wait_state(&api, &id, "succeeded").await;
    assert_eq!(done["counts"]["succeeded"], 3, "{done}");
    for sub in done["subtasks"].as_array().unwrap() {
        assert_eq!(sub["result"]["msg"], "echo sleep:1500", "{sub}");
    }
    // Each agent ran the task once: no batch was sent twice.
    let echoed = keel_tests::sink_records(&server, 6901);
    for agent_id in ids {
        let n = echoed.iter().filter(|r| r["agent_id"] == agent_id).count();
        assert_eq!(n, 1, "{agent_id} ran the task {n} times: {echoed:?}");
    }
}
