//! The plugin runtime end to end: the pipe protocol byte for byte, install,
//! upgrade and removal through the server, refusals, faults, limits, no loss.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use keel_tests::{Agent, Api, Server, ServerOptions, eventually, eventually_within, sink_records, test_plugin};
use serde_json::{Value, json};

fn server_opts(extra: &str) -> ServerOptions {
    ServerOptions {
        release_key: true,
        extra_toml: extra.into(),
        ..Default::default()
    }
}

async fn plugin(api: &Api, agent: &str, name: &str) -> Option<Value> {
    let a = api.agent(agent).await?;
    a["plugins"].as_array()?.iter().find(|p| p["name"] == name).cloned()
}

/// Waits for a plugin heartbeat that satisfies `ok`.
async fn plugin_where(api: &Api, agent: &str, name: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    eventually(&format!("plugin {name}: {what}"), || async {
        plugin(api, agent, name).await.filter(|p| ok(p))
    })
    .await
}

async fn install(server: &Server, name: &str, version: &str) {
    let (status, body) = server.upload(name, version, "exec", test_plugin()).await;
    assert_eq!(status, 201, "upload {name} {version}: {body}");
}

/// 5100 results the runtime reported for `plugin`.
fn runtime_results(server: &Server, plugin: &str) -> Vec<Value> {
    sink_records(server, 5100)
        .into_iter()
        .filter(|l| l["fields"]["plugin"] == plugin)
        .map(|l| l["fields"].clone())
        .collect()
}

async fn runtime_result(server: &Server, plugin: &str, contains: &str) -> Value {
    eventually(&format!("a 5100 result for {plugin} saying {contains:?}"), || async {
        runtime_results(server, plugin)
            .into_iter()
            .find(|f| f["msg"].as_str().is_some_and(|m| m.contains(contains)))
    })
    .await
}

async fn task(api: &Api, agent: &str, object: &str, data: &str) -> Value {
    let (status, body) = api
        .post(
            &format!("/api/v1/agents/{agent}/tasks"),
            &json!({"data_type": 6900, "object_name": object, "data": data}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    eventually("the task result", || async {
        let (_, t) = api.get(&format!("/api/v1/tasks/{token}")).await;
        (t["status"] != "sent").then_some(t)
    })
    .await
}

// Hand-built protobuf, as Elkeid's Go (gogo) and Rust (rust-protobuf) libraries emit it.
fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}
fn field_varint(n: u64, v: u64) -> Vec<u8> {
    [varint(n << 3), varint(v)].concat()
}
fn field_bytes(n: u64, b: &[u8]) -> Vec<u8> {
    [varint((n << 3) | 2), varint(b.len() as u64), b.to_vec()].concat()
}
fn payload(pairs: &[(&str, &str)]) -> Vec<u8> {
    pairs
        .iter()
        .flat_map(|(k, v)| {
            field_bytes(
                1,
                &[field_bytes(1, k.as_bytes()), field_bytes(2, v.as_bytes())].concat(),
            )
        })
        .collect()
}
fn frame(body: &[u8]) -> Vec<u8> {
    [(body.len() as u32).to_le_bytes().to_vec(), body.to_vec()].concat()
}

#[tokio::test]
async fn elkeid_frames_pass_through_byte_for_byte() {
    let server = Server::start(server_opts("")).await;
    let mut agent = Agent::enrolled(&server, "pipe-1");
    agent.start();
    let api = server.api();
    api.online("pipe-1").await;

    let p1 = payload(&[("a", "b"), ("c", "d")]);
    let p2 = payload(&[("x", "y")]);
    let p3 = payload(&[("ünï", "cödé"), ("k", "")]);
    let frames = [
        // Fields in order, as gogo's marshaller writes them.
        [
            field_varint(1, 6101),
            field_varint(2, 1_700_000_001),
            field_bytes(3, &p1),
        ]
        .concat(),
        // A zero timestamp is omitted by proto3 encoders.
        [field_varint(1, 6102), field_bytes(3, &p2)].concat(),
        // Another order, with unknown varint and fixed64 fields.
        [
            field_bytes(3, &p3),
            field_varint(15, 150),
            field_varint(2, 1_700_000_003),
            vec![0x49, 1, 2, 3, 4, 5, 6, 7, 8],
            field_varint(1, 6103),
        ]
        .concat(),
        // An empty payload.
        [field_varint(1, 6104), field_varint(2, 1_700_000_004)].concat(),
    ];
    let bytes: Vec<u8> = frames.iter().flat_map(|f| frame(f)).collect();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    install(&server, "elkeid", "1").await;
    let detail = json!({"mode": "raw", "hex": hex}).to_string();
    let (status, body) = server
        .put_plugins("pipe-1", &json!([{"name": "elkeid", "version": "1", "detail": detail}]))
        .await;
    assert_eq!(status, 200, "{body}");

    let expect = [
        (6101, p1, Some(1_700_000_001)),
        (6102, p2, None),
        (6103, p3, Some(1_700_000_003)),
        (6104, vec![], Some(1_700_000_004)),
    ];
    for (dt, payload, ts) in expect {
        let line = eventually(&format!("record {dt} in the sink"), || async {
            sink_records(&server, dt).into_iter().next()
        })
        .await;
        let data = base64::engine::general_purpose::STANDARD
            .decode(line["data"].as_str().unwrap())
            .unwrap();
        assert_eq!(data, payload, "payload of {dt} must arrive byte for byte");
        match ts {
            Some(ts) => assert_eq!(line["timestamp"], ts),
            None => assert!(
                line["timestamp"].as_i64().unwrap() > 1_700_000_000,
                "a missing timestamp is filled in"
            ),
        }
    }
    let p = plugin_where(&api, "pipe-1", "elkeid", "running", |p| p["state"] == "running").await;
    assert_eq!(
        p["heartbeat"]["restarts"], "0",
        "well-formed frames cause no fault: {p}"
    );
}

fn targz(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

#[tokio::test]
async fn install_upgrade_noop_and_remove_through_the_server() {
    let server = Server::start(server_opts("")).await;
    let mut agent = Agent::enrolled(&server, "life-1");
    agent.start();
    let api = server.api();
    api.online("life-1").await;

    install(&server, "p1", "1").await;
    let (status, body) = server
        .put_plugins("life-1", &json!([{"name": "p1", "version": "1"}]))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sent"], true);
    let v1 = plugin_where(&api, "life-1", "p1", "running v1", |p| {
        p["state"] == "running" && p["version"] == "1"
    })
    .await;
    let pid = v1["pid"].as_i64().unwrap();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the reported pid is a live process"
    );
    runtime_result(&server, "p1", "installed").await;
    let t = task(&api, "life-1", "p1", "hello").await;
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(t["result"]["msg"], "echo hello");

    // The same set again changes nothing: same process.
    let received = agent.log().matches("desired configuration received").count();
    server
        .put_plugins("life-1", &json!([{"name": "p1", "version": "1"}]))
        .await;
    eventually("the agent to receive the set again", || async {
        (agent.log().matches("desired configuration received").count() > received).then_some(())
    })
    .await;
    let again = plugin_where(&api, "life-1", "p1", "a fresh heartbeat", |p| {
        p["updated_at"] != v1["updated_at"]
    })
    .await;
    assert_eq!(again["pid"], v1["pid"], "an unchanged plugin is left alone");

    // Upgrade to a tar.gz package.
    let pkg = targz(&[("p1", &test_plugin(), 0o755), ("README", b"p1 v2", 0o644)]);
    let (status, body) = server.upload("p1", "2", "tar.gz", pkg).await;
    assert_eq!(status, 201, "{body}");
    server
        .put_plugins("life-1", &json!([{"name": "p1", "version": "2"}]))
        .await;
    let v2 = plugin_where(&api, "life-1", "p1", "running v2", |p| {
        p["version"] == "2" && p["state"] == "running"
    })
    .await;
    assert_ne!(v2["pid"], v1["pid"]);
    runtime_result(&server, "p1", "upgraded 1 -> 2").await;
    let plugin_dir = agent.state_dir().join("plugins");
    assert_eq!(std::fs::read_to_string(plugin_dir.join("p1/README")).unwrap(), "p1 v2");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the old process is gone");

    // Removal.
    server.put_plugins("life-1", &json!([])).await;
    eventually("p1 to be removed", || async {
        plugin(&api, "life-1", "p1").await.is_none().then_some(())
    })
    .await;
    assert!(!plugin_dir.join("p1").exists(), "the plugin directory is deleted");
    assert_eq!(api.get("/api/v1/agents/life-1/plugins").await.1["managed"], true);
}

#[tokio::test]
async fn bad_packages_are_refused_with_the_failed_check_and_nothing_starts() {
    let server = Server::start(server_opts(
        "[components]\nmirrors = [\"http://127.0.0.1:9/packages\"]\n",
    ))
    .await;
    let mut agent = Agent::enrolled(&server, "refuse-1");
    // An invalid name can only come from a corrupted stored set; the server refuses to send one.
    let stored = json!([{"name": "bad/name", "kind": "exec", "version": "1", "sha256": "00", "signature": "00", "download_urls": [], "detail": ""}]);
    std::fs::create_dir_all(agent.state_dir()).unwrap();
    std::fs::write(agent.state_dir().join("plugins.json"), stored.to_string()).unwrap();
    agent.start();
    let api = server.api();
    api.online("refuse-1").await;
    runtime_result(&server, "bad/name", "invalid plugin name").await;

    // The first URL (a mirror) is unreachable; the server's own URL then works.
    install(&server, "good", "1").await;
    // A package whose stored bytes no longer match their hash. (Its own bytes: the
    // store is content-addressed, and "good" must stay intact.)
    let mut distinct = test_plugin();
    distinct.extend_from_slice(b"\0tampered");
    assert_eq!(server.upload("tampered", "1", "exec", distinct).await.0, 201);
    let (_, pkgs) = api.get("/api/v1/components/tampered").await;
    let sha = pkgs[0]["sha256"].as_str().unwrap().to_owned();
    std::fs::write(server.data_dir().join("packages").join(&sha), b"not the package").unwrap();
    // Archives that would escape the plugin directory.
    let escape = targz(&[("../escape", b"#!/bin/sh\n", 0o755), ("escape", b"#!/bin/sh\n", 0o755)]);
    assert_eq!(server.upload("escape", "1", "tar.gz", escape).await.0, 201);
    let absolute = targz(&[("/tmp/keel-absolute", b"x", 0o644), ("absolute", b"#!/bin/sh\n", 0o755)]);
    assert_eq!(server.upload("absolute", "1", "tar.gz", absolute).await.0, 201);

    let set = json!([
        {"name": "good", "version": "1"},
        {"name": "tampered", "version": "1"},
        {"name": "escape", "version": "1"},
        {"name": "absolute", "version": "1"},
    ]);
    let (status, body) = server.put_plugins("refuse-1", &set).await;
    assert_eq!(status, 200, "{body}");
    plugin_where(&api, "refuse-1", "good", "running after the mirror failed", |p| {
        p["state"] == "running"
    })
    .await;
    assert!(agent.log().contains("download failed; trying the next URL"));
    runtime_result(&server, "tampered", "sha256 mismatch").await;
    runtime_result(&server, "escape", "contains '..'").await;
    runtime_result(&server, "absolute", "absolute path").await;
    assert!(!Path::new("/tmp/keel-absolute").exists());
    for name in ["tampered", "escape", "absolute", "bad/name"] {
        assert!(plugin(&api, "refuse-1", name).await.is_none(), "{name} must not start");
    }

    // An agent that pins another release key refuses the server's signatures.
    let mut other = Agent::enrolled(&server, "refuse-2");
    let text = std::fs::read_to_string(&other.config).unwrap();
    let key = server.release_public.clone().unwrap();
    // The public key of RFC 8032's first test vector: valid, and not the server's.
    let foreign = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    std::fs::write(&other.config, text.replace(&key, foreign)).unwrap();
    other.start();
    api.online("refuse-2").await;
    server
        .put_plugins("refuse-2", &json!([{"name": "good", "version": "1"}]))
        .await;
    runtime_result(&server, "good", "signature check failed").await;
    assert!(plugin(&api, "refuse-2", "good").await.is_none());

    // The server refuses a set naming a version it has no package for.
    let (status, body) = server
        .put_plugins("refuse-1", &json!([{"name": "good", "version": "9"}]))
        .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("has no package"), "{body}");
}

#[tokio::test]
async fn high_priority_records_on_fd_5_pass_a_held_up_fd_4() {
    let server = Server::start(server_opts("")).await;
    let mut agent = Agent::enrolled(&server, "high-1");
    agent.start();
    let api = server.api();
    api.online("high-1").await;
    install(&server, "lanes", "1").await;
    let detail = json!({"mode": "high"}).to_string();
    let set = json!([{"name": "lanes", "version": "1", "detail": detail}]);
    assert_eq!(server.put_plugins("high-1", &set).await.0, 200);
    // fd 4 holds half a frame; the record on fd 5 gets through all the same.
    let high = eventually("the fd 5 record in the sink", || async {
        sink_records(&server, 6951).into_iter().next()
    })
    .await;
    let lane = |line: &Value| {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(line["data"].as_str().unwrap())
            .unwrap();
        keel_proto::payload::decode(&bytes).unwrap()["lane"].clone()
    };
    assert_eq!(lane(&high), "high");
    assert!(
        sink_records(&server, 6950).is_empty(),
        "the fd 4 record is not whole yet"
    );
    // A task lets the plugin finish its fd 4 frame.
    let task = json!({"data_type": 6900, "object_name": "lanes", "data": "go"});
    let (status, body) = api.post("/api/v1/agents/high-1/tasks", &task).await;
    assert_eq!(status, 202, "{body}");
    let normal = eventually("the fd 4 record in the sink", || async {
        sink_records(&server, 6950).into_iter().next()
    })
    .await;
    assert_eq!(lane(&normal), "normal");
    plugin_where(&api, "high-1", "lanes", "running", |p| p["state"] == "running").await;
}

#[tokio::test]
async fn misbehaving_plugins_fault_alone_and_the_agent_carries_on() {
    let server = Server::start(server_opts("")).await;
    let mut agent = Agent::enrolled_with(&server, "faults-1", "task_queue = 4\n");
    agent.start();
    let api = server.api();
    api.online("faults-1").await;
    for name in ["good", "crashy", "garbled", "huge", "cut", "deaf", "forger"] {
        install(&server, name, "1").await;
    }
    // Fifty whole records (data_type 6950), an Elkeid-style plugin log (1010, at
    // timestamp 12345) and a malformed frame, in one write.
    let garbage = format!("{}0600000008f20710b96004000000ffffffff", "0300000008a636".repeat(50));
    // An agent heartbeat (1000) saying `hostname: spoofed`.
    let forged = "1a00000008e8071a150a130a08686f73746e616d65120773706f6f666564";
    let huge = "ffffff7f";
    // A 100-byte frame announced, 4 bytes written, then the plugin exits.
    let cut = "6400000008e80710";
    let set = json!([
        {"name": "good", "version": "1"},
        {"name": "crashy", "version": "1", "detail": json!({"mode": "crash"}).to_string()},
        {"name": "garbled", "version": "1", "detail": json!({"mode": "raw", "hex": garbage}).to_string()},
        {"name": "huge", "version": "1", "detail": json!({"mode": "raw", "hex": huge}).to_string()},
        {"name": "cut", "version": "1", "detail": json!({"mode": "raw", "hex": cut, "exit": true}).to_string()},
        {"name": "deaf", "version": "1", "detail": json!({"mode": "deaf"}).to_string()},
        {"name": "forger", "version": "1", "detail": json!({"mode": "raw", "hex": forged}).to_string()},
    ]);
    assert_eq!(server.put_plugins("faults-1", &set).await.0, 200);

    let crashy = plugin_where(&api, "faults-1", "crashy", "restarted twice", |p| {
        p["heartbeat"]["restarts"]
            .as_str()
            .and_then(|r| r.parse::<u32>().ok())
            .is_some_and(|r| r >= 2)
    })
    .await;
    assert_eq!(crashy["heartbeat"]["last_exit"], "exited with status 3");
    for (name, fault) in [
        ("garbled", "malformed record"),
        ("huge", "exceeds the 4194304-byte limit"),
        ("cut", "stream ended 96 bytes short"),
        ("forger", "data_type 1000 is the agent's own"),
    ] {
        let p = plugin_where(&api, "faults-1", name, "a fault", |p| {
            p["heartbeat"]["last_fault"].as_str().is_some_and(|f| !f.is_empty())
        })
        .await;
        assert!(
            p["heartbeat"]["last_fault"].as_str().unwrap().contains(fault),
            "{name}: {p}"
        );
    }
    runtime_result(&server, "garbled", "stopped for a fault").await;
    // What came whole before the bad frame was kept, at every start.
    eventually("the records before the bad frame in the sink", || async {
        let n = sink_records(&server, 6950)
            .iter()
            .filter(|r| r["agent_id"] == "faults-1")
            .count();
        (n >= 50).then_some(n)
    })
    .await;
    // The plugin's 1010 went on as a plugin log; the agent's own error log is the agent's.
    let from_plugin = |t: i64| {
        sink_records(&server, t)
            .iter()
            .filter(|r| r["agent_id"] == "faults-1" && r["timestamp"] == 12345)
            .count()
    };
    let (as_1011, as_1010) = (from_plugin(1011), from_plugin(1010));
    assert!(
        as_1011 >= 1 && as_1010 == 0,
        "the plugin's 1010 at timestamp 12345: {as_1011} arrived as 1011, {as_1010} as 1010"
    );
    // The forged heartbeat changed nothing.
    assert_ne!(api.agent("faults-1").await.unwrap()["hostname"], "spoofed");

    // A plugin that never reads its tasks: its queue fills, then tasks are refused as busy.
    plugin_where(&api, "faults-1", "deaf", "running", |p| p["state"] == "running").await;
    let mut tokens = Vec::new();
    for i in 0..600 {
        let body = json!({"data_type": 6900, "object_name": "deaf", "data": format!("{i}:{}", "x".repeat(1000)), "timeout_secs": 3});
        let (status, answer) = api.post("/api/v1/agents/faults-1/tasks", &body).await;
        assert_eq!(status, 202, "{answer}");
        tokens.push(answer["token"].as_str().unwrap().to_owned());
    }
    let last = tokens.last().unwrap().clone();
    let busy = eventually("the last task to be refused as busy", || async {
        let (_, t) = api.get(&format!("/api/v1/tasks/{last}")).await;
        (t["status"] == "failed").then_some(t)
    })
    .await;
    assert!(
        busy["result"]["msg"].as_str().unwrap().starts_with("busy: plugin deaf"),
        "{busy}"
    );
    // What waits in the plugin's queue, never read, ends at its deadline.
    let first = tokens[0].clone();
    let overdue = eventually("a task the plugin never read to time out", || async {
        let (_, t) = api.get(&format!("/api/v1/tasks/{first}")).await;
        (t["status"] != "sent").then_some(t)
    })
    .await;
    assert_eq!(overdue["status"], "timed_out", "{overdue}");
    let (_, still) = api.get(&format!("/api/v1/tasks/{last}")).await;
    assert_eq!(still["status"], "failed", "an answered task keeps its answer");
    let (status, body) = api
        .post(
            "/api/v1/agents/faults-1/tasks",
            &json!({"data_type": 6900, "object_name": "deaf", "timeout_secs": 0}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("timeout_secs"), "{body}");

    // The agent and the well-behaved plugin are unaffected.
    let t = task(&api, "faults-1", "good", "still here").await;
    assert_eq!(t["status"], "succeeded");
    let before = api.agent("faults-1").await.unwrap()["last_heartbeat"].clone();
    eventually("another agent heartbeat", || async {
        api.agent("faults-1")
            .await
            .filter(|a| a["last_heartbeat"] != before && a["online"] == true)
    })
    .await;
}

#[tokio::test]
async fn a_plugin_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let server = Server::start(server_opts("")).await;
    let mut agent = Agent::enrolled(&server, "stubborn-1");
    agent.start();
    let api = server.api();
    api.online("stubborn-1").await;
    let script = b"#!/bin/sh\ntrap '' TERM\necho started\nwhile :; do sleep 1; done\n".to_vec();
    assert_eq!(server.upload("stubborn", "1", "exec", script).await.0, 201);
    server
        .put_plugins("stubborn-1", &json!([{"name": "stubborn", "version": "1"}]))
        .await;
    let p = plugin_where(&api, "stubborn-1", "stubborn", "running", |p| p["state"] == "running").await;
    let pid = p["pid"].as_i64().unwrap();
    server.put_plugins("stubborn-1", &json!([])).await;
    eventually("the stubborn plugin to be killed", || async {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    })
    .await;
    assert!(
        agent
            .log()
            .contains("plugin ignored SIGTERM; killing its process group"),
        "{}",
        agent.log()
    );
}

#[tokio::test]
async fn a_memory_hog_is_stopped_by_its_cgroup_limit() {
    let server = Server::start(server_opts("")).await;
    let mut agent = Agent::enrolled_with(&server, "hog-1", "[plugins.limits.hog]\nmemory_max_bytes = 67108864\n");
    agent.start();
    let api = server.api();
    api.online("hog-1").await;
    if agent.log().contains("cgroups unavailable") {
        eprintln!("SKIPPED a_memory_hog_is_stopped_by_its_cgroup_limit: no writable cgroup hierarchy on this machine");
        return;
    }
    install(&server, "hog", "1").await;
    let detail = json!({"mode": "memhog"}).to_string();
    server
        .put_plugins("hog-1", &json!([{"name": "hog", "version": "1", "detail": detail}]))
        .await;
    let p = plugin_where(&api, "hog-1", "hog", "killed by its memory limit", |p| {
        p["heartbeat"]["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("out of memory"))
    })
    .await;
    assert_eq!(p["heartbeat"]["limited"], "true");
    assert!(
        p["heartbeat"]["oom_kills"].as_str().unwrap().parse::<u64>().unwrap() >= 1,
        "{p}"
    );
    runtime_result(&server, "hog", "out of memory").await;
}

#[tokio::test]
async fn agents_sharing_a_cgroup_never_touch_each_other_s_plugins() {
    // Both agents run in this test's cgroup, and each runs a plugin named `twin`:
    // stopping one agent stops (and sweeps the cgroup of) its own twin only.
    let server = Server::start(server_opts("")).await;
    let api = server.api();
    let mut agents = Vec::new();
    for id in ["twin-1", "twin-2"] {
        let mut agent = Agent::enrolled(&server, id);
        agent.start();
        api.online(id).await;
        agents.push(agent);
    }
    if agents[0].log().contains("cgroups unavailable") {
        eprintln!("SKIPPED agents_sharing_a_cgroup_never_touch_each_other_s_plugins: no writable cgroup hierarchy");
        return;
    }
    install(&server, "twin", "1").await;
    let mut pids = Vec::new();
    for id in ["twin-1", "twin-2"] {
        server.put_plugins(id, &json!([{"name": "twin", "version": "1"}])).await;
        let p = plugin_where(&api, id, "twin", "running in its cgroup", |p| {
            p["state"] == "running" && p["heartbeat"]["limited"] == "true"
        })
        .await;
        pids.push(p["pid"].as_i64().unwrap());
    }
    let status = agents[0].stop_within(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "twin-1 stopped cleanly");
    assert!(
        !Path::new(&format!("/proc/{}", pids[0])).exists(),
        "twin-1's plugin stopped with it"
    );
    assert!(
        Path::new(&format!("/proc/{}", pids[1])).exists(),
        "twin-2's plugin was killed by twin-1's cgroup sweep"
    );
    let p = plugin(&api, "twin-2", "twin").await.unwrap();
    assert_eq!(p["pid"], pids[1], "twin-2's plugin was not restarted: {p}");
    assert!(!agents[1].log().contains("killed by"), "{}", agents[1].log());
}

/// Installs the emitting test plugin on `agent_id` with `detail` and waits until
/// it runs.
async fn run_emitter(server: &Server, agent_id: &str, detail: &Value) {
    install(server, "emitter", "1").await;
    let set = json!([{"name": "emitter", "version": "1", "detail": detail.to_string()}]);
    assert_eq!(server.put_plugins(agent_id, &set).await.0, 200);
    plugin_where(&server.api(), agent_id, "emitter", "running", |p| {
        p["state"] == "running"
    })
    .await;
}

/// The `i` fields of the emitted records in the sink.
fn emitted(server: &Server) -> Vec<u64> {
    sink_records(server, 6100)
        .iter()
        .map(|l| {
            let data = base64::engine::general_purpose::STANDARD
                .decode(l["data"].as_str().unwrap())
                .unwrap();
            keel_proto::payload::decode(&data).unwrap()["i"].parse().unwrap()
        })
        .collect()
}

fn exactly_once(got: &[u64], k: u64) {
    let unique: HashSet<u64> = got.iter().copied().collect();
    assert_eq!(unique.len() as u64, k, "every record arrived");
    assert_eq!(got.len() as u64, k, "no record arrived twice");
}

fn records_file_len(server: &Server) -> u64 {
    std::fs::metadata(server.data_dir().join("records/records.jsonl"))
        .map(|m| m.len())
        .unwrap_or(0)
}

#[tokio::test]
async fn nothing_is_lost_or_doubled_when_the_server_is_killed_mid_stream() {
    let mut server = Server::start(server_opts("")).await;
    let mut agent = Agent::enrolled(&server, "loss-1");
    agent.start();
    let api = server.api();
    api.online("loss-1").await;
    const K: u64 = 150_000;
    run_emitter(
        &server,
        "loss-1",
        &json!({"mode": "emit", "count": K, "delay_ms": 2000}),
    )
    .await;
    let before = records_file_len(&server);
    // Kill the server once the emitted records have started to arrive.
    eventually_within(Duration::from_secs(60), "records to start arriving", || async {
        (records_file_len(&server) > before + 200_000).then_some(())
    })
    .await;
    server.kill();
    let at_kill = emitted(&server).len() as u64;
    server.restart().await;
    let got = eventually_within(Duration::from_secs(90), "every record in the sink", || async {
        let got = emitted(&server);
        (got.len() as u64 >= K).then_some(got)
    })
    .await;
    assert!(at_kill < K, "the kill must come mid-stream ({at_kill} of {K} stored)");
    exactly_once(&got, K);
    // Batches the killed server took but had not noted are not taken for lost.
    let a = api.agent("loss-1").await.unwrap();
    let emitter = a["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "emitter")
        .cloned();
    assert_eq!(emitter.map(|p| p["lost_records"].clone()), Some(json!(0)), "{a}");
}

#[tokio::test]
async fn the_spool_keeps_records_across_an_agent_restart_while_the_server_is_down() {
    let mut server = Server::start(server_opts("")).await;
    let mut agent = Agent::enrolled(&server, "spool-1");
    agent.start();
    let api = server.api();
    api.online("spool-1").await;
    const K: u64 = 20_000;
    run_emitter(
        &server,
        "spool-1",
        &json!({"mode": "emit", "count": K, "delay_ms": 3000}),
    )
    .await;
    server.stop();
    let marker = agent.state_dir().join("plugins/emitter/emitted");
    eventually("the plugin to emit everything while the server is down", || async {
        marker.exists().then_some(())
    })
    .await;
    let status = agent.stop_within(Duration::from_secs(15)).expect("graceful stop");
    assert!(status.success());
    let spooled: u64 = std::fs::read_dir(agent.state_dir().join("spool"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(
        spooled > K * 100,
        "the records wait in the spool on disk ({spooled} bytes)"
    );

    // The agent comes back with the server still down; its plugin comes back from the
    // stored set without the server.
    agent.start();
    let plugin_dir = agent.state_dir().join("plugins/emitter");
    eventually("the stored plugin to run again before the server is back", || async {
        std::fs::read_dir("/proc")
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd == plugin_dir))
    })
    .await;
    server.restart().await;
    let got = eventually_within(Duration::from_secs(60), "every spooled record in the sink", || async {
        let got = emitted(&server);
        (got.len() as u64 >= K).then_some(got)
    })
    .await;
    exactly_once(&got, K);
}

#[tokio::test]
async fn the_local_plugin_set_runs_until_the_server_sends_one() {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::start(server_opts("")).await;
    let api = server.api();
    let local = tempfile::tempdir().unwrap();
    std::fs::set_permissions(local.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for (name, mode) in [("echo", 0o755), ("loose", 0o775), ("off", 0o755)] {
        let exe = local.path().join(name);
        std::fs::write(&exe, test_plugin()).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let plugins = format!(
        "local_dir = {:?}\n[plugins.local.echo]\ndetail = \"{{}}\"\n[plugins.local.loose]\n[plugins.local.off]\nenabled = false\n",
        local.path().display().to_string()
    );
    let mut agent = Agent::enrolled_with(&server, "local-1", &plugins);
    agent.start();
    api.online("local-1").await;

    // Packaged plugins run with no server involved, and answer tasks.
    plugin_where(&api, "local-1", "echo", "the local echo running", |p| {
        p["state"] == "running"
    })
    .await;
    let t = task(&api, "local-1", "echo", "hi").await;
    assert_eq!(t["result"]["msg"], "echo hi", "{t}");
    // One that others could have replaced is refused, saying why; a disabled one is not run.
    runtime_result(&server, "loose", "writable by others").await;
    assert!(plugin(&api, "local-1", "loose").await.is_none());
    assert!(plugin(&api, "local-1", "off").await.is_none());
    let listed = || async {
        let a = api.agent("local-1").await.unwrap();
        a["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(listed().await, ["echo"]);

    // A set from the server replaces the local set, also across restarts.
    server.put_plugins("local-1", &json!([])).await;
    eventually("the local echo to be removed", || async {
        plugin(&api, "local-1", "echo").await.is_none().then_some(())
    })
    .await;
    let before = api.agent("local-1").await.unwrap()["connected_at"].clone();
    agent.stop_within(Duration::from_secs(10)).expect("stopped");
    agent.start();
    let a = eventually("a heartbeat after the restart", || async {
        api.agent("local-1").await.filter(|a| {
            a["online"] == true
                && a["connected_at"] != before
                && a["last_heartbeat"].as_str() > a["connected_at"].as_str()
        })
    })
    .await;
    assert_eq!(a["heartbeat"]["plugins"], "", "the local set did not come back: {a}");
}

#[tokio::test]
async fn a_full_disk_loses_only_what_it_counts_and_the_agent_carries_on() {
    let mut server = Server::start(server_opts("")).await;
    let mut agent = Agent::with(&server, "disk-1", "", "[transfer]\nspool_min_free_bytes = 1048576\n");
    let out = agent.enroll(&server, &server.enrollment_token(1, "10m"), Some(&server.fingerprint()));
    assert!(out.status.success());
    // The spool on 6 MB of its own, 1 MB of which it leaves free.
    let _disk = keel_common::testfs::TmpFs::mount(&agent.state_dir().join("spool"), "6m");
    agent.start();
    let api = server.api();
    api.online("disk-1").await;
    // About 25 MB of records while the server is down.
    const K: u64 = 200_000;
    run_emitter(
        &server,
        "disk-1",
        &json!({"mode": "emit", "count": K, "delay_ms": 3000}),
    )
    .await;
    server.stop();
    let marker = agent.state_dir().join("plugins/emitter/emitted");
    eventually_within(Duration::from_secs(60), "the plugin to emit everything", || async {
        marker.exists().then_some(())
    })
    .await;

    // The server returns: the agent sends what it kept and says what it dropped
    // (heartbeats from the outage come first, with the count as it was then).
    server.restart().await;
    let (got, dropped) = eventually_within(Duration::from_secs(60), "every record kept or counted", || async {
        let a = api.agent("disk-1").await?;
        let dropped: u64 = a["heartbeat"]["dropped"].as_str()?.parse().ok()?;
        let got = emitted(&server);
        let unique = got.iter().collect::<HashSet<_>>().len() as u64;
        (a["online"] == true && dropped > 0 && unique > 0 && unique + dropped >= K).then_some((got, dropped))
    })
    .await;
    let unique: HashSet<u64> = got.iter().copied().collect();
    assert_eq!(unique.len(), got.len(), "nothing arrived twice");
    // Every record is either in the sink or counted (the count also holds the
    // agent's own heartbeats and logs from the outage, a few dozen).
    let kept = unique.len() as u64;
    assert!(
        kept + dropped >= K && kept + dropped < K + 1_000,
        "kept {kept} + dropped {dropped} against {K} emitted"
    );
    assert!(kept < K, "the disk was too small to keep everything");
    // The server found the same records missing by their numbers (the emitter's
    // records are numbered 1..=K), and reports them for the plugin.
    let lost = eventually("the server to count the emitter's lost records", || async {
        let a = api.agent("disk-1").await?;
        let p = a["plugins"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "emitter")?
            .clone();
        p["lost_records"].as_u64().filter(|n| *n > 0)
    })
    .await;
    assert_eq!(
        lost,
        K - kept,
        "lost_records is exactly the records missing from the sink"
    );
    assert!(server.log().contains("records of a plugin went missing on the way"));
    // And the agent carries on: heartbeats keep coming.
    let before = api.agent("disk-1").await.unwrap()["last_heartbeat"].clone();
    eventually("another heartbeat", || async {
        api.agent("disk-1").await.filter(|a| a["last_heartbeat"] != before)
    })
    .await;
}

#[tokio::test]
async fn plugins_inherit_only_descriptors_0_to_5() {
    let server = Server::start(server_opts("")).await;
    let mut agent = Agent::enrolled(&server, "fds-1");
    // The agent's parent left descriptor 7 open and inheritable.
    agent.start_with_inherited_fd(7);
    let api = server.api();
    api.online("fds-1").await;
    let agent_pid = agent.pid().unwrap();
    assert!(
        Path::new(&format!("/proc/{agent_pid}/fd/7")).exists(),
        "the agent holds descriptor 7"
    );
    install(&server, "plain", "1").await;
    assert_eq!(
        server
            .put_plugins(
                "fds-1",
                // Deaf: it opens nothing of its own.
                &json!([{"name": "plain", "version": "1", "detail": json!({"mode": "deaf"}).to_string()}])
            )
            .await
            .0,
        200
    );
    let p = plugin_where(&api, "fds-1", "plain", "running", |p| p["state"] == "running").await;
    let pid = p["pid"].as_u64().unwrap();
    let fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    assert!(fds.iter().all(|fd| *fd <= 5), "the plugin's descriptors: {fds:?}");
    assert!(
        fds.contains(&3) && fds.contains(&4) && fds.contains(&5),
        "its three pipes: {fds:?}"
    );
}

/// A plugin run's tag and a number: a record's `i`, or a run's count.
type RunNumber = (String, u64);

/// The `i` fields of the stream plugin's records in the sink, by the `run` tag of
/// their plugin configuration, and the `sent` counts its runs reported, from one
/// reading of the sink.
fn streamed(server: &Server) -> (Vec<RunNumber>, Vec<RunNumber>) {
    let mut records = Vec::new();
    let mut sent = Vec::new();
    for l in server.sink_lines() {
        let data_type = l["data_type"].as_i64();
        if data_type != Some(6100) && data_type != Some(6199) {
            continue;
        }
        let data = base64::engine::general_purpose::STANDARD
            .decode(l["data"].as_str().unwrap())
            .unwrap();
        let f = keel_proto::payload::decode(&data).unwrap();
        if data_type == Some(6100) {
            records.push((f["run"].clone(), f["i"].parse().unwrap()));
        } else {
            sent.push((f["run"].clone(), f["sent"].parse().unwrap()));
        }
    }
    (records, sent)
}

/// Every record a run says it sent arrived, once.
fn every_record_of(records: &[RunNumber], run: &str, sent: u64) {
    let got: Vec<u64> = records.iter().filter(|(r, _)| r == run).map(|(_, i)| *i).collect();
    let unique: HashSet<u64> = got.iter().copied().collect();
    assert_eq!(got.len(), unique.len(), "run {run}: no record twice");
    let mut missing: Vec<u64> = (0..sent).filter(|i| !unique.contains(i)).collect();
    missing.sort_unstable();
    let extra = unique.iter().filter(|i| **i >= sent).count();
    assert!(
        missing.is_empty() && extra == 0,
        "run {run} sent {sent}: {} missing (from {:?}), {extra} beyond",
        missing.len(),
        missing.first()
    );
}

#[tokio::test]
async fn stopping_or_upgrading_a_plugin_loses_nothing_it_had_buffered() {
    let server = Server::start(server_opts("")).await;
    let mut agent = Agent::enrolled(&server, "stop-1");
    agent.start();
    let api = server.api();
    api.online("stop-1").await;
    install(&server, "streamer", "1").await;
    install(&server, "streamer", "2").await;
    // Flushed only every minute (or when 64 KiB wait): at any moment most of what it
    // sent is still in its buffer.
    let detail = |run: &str, deaf: bool| {
        json!({"mode": "stream", "per_second": 2000, "flush_ms": 60_000, "run": run, "deaf": deaf}).to_string()
    };
    let set = |version: &str, run: &str, deaf: bool| json!([{"name": "streamer", "version": version, "detail": detail(run, deaf)}]);
    assert_eq!(server.put_plugins("stop-1", &set("1", "a", false)).await.0, 200);
    eventually("the first run's records to arrive", || async {
        (!streamed(&server).0.is_empty()).then_some(())
    })
    .await;
    // An upgrade stops the running version: it sees its task pipe close, flushes
    // and exits; the new version starts.
    assert_eq!(server.put_plugins("stop-1", &set("2", "b", true)).await.0, 200);
    eventually("the upgraded run's records to arrive", || async {
        streamed(&server)
            .0
            .iter()
            .any(|(r, _)| r.starts_with("b-"))
            .then_some(())
    })
    .await;
    // The new run never reads its tasks: removed, it is asked by the closed pipe,
    // then by SIGTERM, which the SDK answers by flushing and exiting.
    assert_eq!(server.put_plugins("stop-1", &json!([])).await.0, 200);
    let (records, sent) = eventually("both runs to report what they sent", || async {
        let (records, sent) = streamed(&server);
        (sent.len() == 2).then_some((records, sent))
    })
    .await;
    for (run, n) in &sent {
        assert!(*n > 0, "run {run} sent records");
        every_record_of(&records, run, *n);
    }
    let log = agent.log();
    assert!(log.contains("sending SIGTERM"), "the deaf run needed SIGTERM: {log}");
    assert!(!log.contains("plugin ignored SIGTERM"), "{log}");
    // No record of either run went missing by its number.
    let a = api.agent("stop-1").await.unwrap();
    let lost: Vec<&Value> = a["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["lost_records"])
        .collect();
    assert!(lost.iter().all(|n| **n == 0), "{a}");
}

#[tokio::test]
async fn a_killed_agent_loses_at_most_what_was_in_the_pipe() {
    let server = Server::start(server_opts("")).await;
    let mut agent = Agent::enrolled(&server, "kill-1");
    agent.start();
    let api = server.api();
    api.online("kill-1").await;
    install(&server, "streamer", "1").await;
    let sent_dir = tempfile::tempdir().unwrap();
    // Each record goes to the pipe at once (a flush every millisecond), 20,000 a
    // second: what a 100 ms batch interval would hold in memory is 2,000.
    let detail = json!({"mode": "stream", "per_second": 20000, "flush_ms": 1, "run": "k",
        "sent_dir": sent_dir.path()})
    .to_string();
    let set = json!([{"name": "streamer", "version": "1", "detail": detail}]);
    assert_eq!(server.put_plugins("kill-1", &set).await.0, 200);
    eventually("records to flow", || async {
        (streamed(&server).0.len() > 2000).then_some(())
    })
    .await;
    let pid = plugin(&api, "kill-1", "streamer").await.unwrap()["pid"]
        .as_i64()
        .unwrap();
    agent.kill();
    // The plugin finds its pipe broken, writes down how many it sent and exits.
    let count_file = sent_dir.path().join(pid.to_string());
    let sent: u64 = eventually("the orphaned plugin to say how many it sent", || async {
        std::fs::read_to_string(&count_file).ok()?.parse().ok()
    })
    .await;
    // Back up, the agent sends what its spool holds: every record it had read.
    // The streamer it starts again is stopped, so that its spool can run empty.
    agent.start();
    api.online("kill-1").await;
    assert_eq!(server.put_plugins("kill-1", &json!([])).await.0, 200);
    let run = format!("k-{pid}");
    let got: Vec<u64> = eventually("the spool to be sent", || async {
        let a = api.agent("kill-1").await?;
        let records = streamed(&server).0;
        let beat = &a["heartbeat"];
        let drained = beat["plugins"].as_str()?.is_empty() && beat["spool_batches"].as_str()? == "0";
        (a["online"] == true && drained).then(|| records.iter().filter(|(r, _)| *r == run).map(|(_, i)| *i).collect())
    })
    .await;
    let unique: HashSet<u64> = got.iter().copied().collect();
    assert_eq!(unique.len(), got.len(), "no record twice");
    let delivered = unique.len() as u64;
    assert_eq!(
        unique,
        (0..delivered).collect::<HashSet<u64>>(),
        "what arrived is a prefix: no gap"
    );
    // Lost: only the tail still in the pipe (64 KiB) or in the plugin's own buffer
    // when the agent died; a record here is about 40 bytes with its frame.
    assert!(
        sent - delivered <= (128 << 10) / 40,
        "sent {sent}, delivered {delivered}: more lost than the pipe and buffer hold"
    );
}

#[tokio::test]
async fn a_network_cut_loses_nothing() {
    // The agent in a network namespace of its own; the test cuts its one link.
    let net = keel_tests::netns::NetNs::create();
    let server = Server::start(ServerOptions {
        grpc_host: Some(net.host_ip.clone()),
        ..server_opts("")
    })
    .await;
    // The plugin is a local one: the server's package URLs are on 127.0.0.1, out
    // of the namespace's reach.
    let local = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(local.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let exe = local.path().join("streamer");
        std::fs::write(&exe, test_plugin()).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let detail = json!({"mode": "stream", "per_second": 1000, "run": "c"}).to_string();
    let plugins = format!(
        "local_dir = {:?}\n[plugins.local.streamer]\ndetail = {:?}\n",
        local.path().display().to_string(),
        detail
    );
    let agent_config = |agent: &Agent| {
        // The server's certificate names 127.0.0.1, not the link's address.
        let config = std::fs::read_to_string(&agent.config).unwrap();
        std::fs::write(
            &agent.config,
            config.replace("[server]\n", "[server]\nserver_name = \"127.0.0.1\"\n"),
        )
        .unwrap();
    };
    let mut agent = Agent::with(&server, "cut-1", &plugins, "");
    agent_config(&agent);
    let out = agent.enroll(&server, &server.enrollment_token(1, "10m"), Some(&server.fingerprint()));
    assert!(out.status.success(), "{out:?}");
    agent.start_in(&net);
    let api = server.api();
    api.online("cut-1").await;
    eventually("records to flow", || async {
        (streamed(&server).0.len() > 1000).then_some(())
    })
    .await;
    net.cut();
    // What crossed the link before the cut may still be on its way into the sink:
    // wait until the count stands still for half a second.
    let mut during = streamed(&server).0.len();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = streamed(&server).0.len();
        if now == during {
            break;
        }
        during = now;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = streamed(&server).0.len();
    assert!(
        after < during + 100,
        "the cut held: records kept arriving ({during} when the link was cut, {after} 8 s later)"
    );
    net.restore();
    // The flow resumes; then the plugin is stopped and says how many it sent.
    eventually("records to flow again", || async {
        (streamed(&server).0.len() > during + 12_000).then_some(())
    })
    .await;
    assert_eq!(server.put_plugins("cut-1", &json!([])).await.0, 200);
    let (records, sent) = eventually("the run to report what it sent", || async {
        let (records, sent) = streamed(&server);
        (sent.len() == 1).then_some((records, sent))
    })
    .await;
    every_record_of(&records, &sent[0].0, sent[0].1);
    let a = api.agent("cut-1").await.unwrap();
    assert_eq!(a["heartbeat"]["dropped"], "0", "{a}");
    let lost: Vec<&Value> = a["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["lost_records"])
        .collect();
    assert!(lost.iter().all(|n| **n == 0), "{a}");
}
