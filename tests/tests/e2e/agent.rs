//! The agent process: configuration, identity, tasks, reconnects, renewal, stop.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use keel_tests::{Agent, Server, ServerOptions, agent_pair, eventually, eventually_within};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::json;

#[tokio::test]
async fn bad_agent_toml_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[server]\nprivate = [\"127.0.0.1:6751\"]\nprivat = []\n",
            "server.privat",
        ),
        (
            "[agent]\nheartbeat_interval = 60\n[server]\nprivate = [\"127.0.0.1:6751\"]\n",
            "agent.heartbeat_interval",
        ),
        ("[agent]\nstate_dir = \"/tmp/x\"\n", "server.private"),
        ("[server]\nprivate = [\"127.0.0.1\"]\n", "server.private[0]"),
        ("[server\n", "agent.toml"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(keel_tests::bin("keel-agent"))
            .arg("--config")
            .arg(&path)
            .arg("run")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{text:?}: {err}");
        assert!(err.contains(&path.display().to_string()), "names the file: {err}");
        assert!(err.contains(key), "names {key}: {err}");
    }
    // An environment override with a bad value names the variable.
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "[server]\nprivate = [\"127.0.0.1:6751\"]\n").unwrap();
    let out = std::process::Command::new(keel_tests::bin("keel-agent"))
        .args(["--config", path.to_str().unwrap(), "run"])
        .env("KEEL_HEARTBEAT_INTERVAL", "often")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEEL_HEARTBEAT_INTERVAL"));
    // A log filter that does not parse names where it came from, before anything
    // is started or created.
    let run = |config: &str, env: Option<&str>| {
        std::fs::write(&path, config).unwrap();
        let mut cmd = std::process::Command::new(keel_tests::bin("keel-agent"));
        cmd.args(["--config", path.to_str().unwrap(), "run"])
            .env_remove("KEEL_LOG");
        if let Some(v) = env {
            cmd.env("KEEL_LOG", v);
        }
        cmd.output().unwrap()
    };
    let logs = dir.path().join("logs");
    let base = format!(
        "[agent]\nlog_dir = {:?}\n[server]\nprivate = [\"127.0.0.1:6751\"]\n",
        logs.display().to_string()
    );
    let out = run(&base, Some("info,h2=loud"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("KEEL_LOG: \"info,h2=loud\" is not a log filter"), "{err}");
    assert!(!logs.exists(), "nothing was created");
    let out = run(&format!("{base}[log]\nlevel = \"verbose\"\n"), None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("log.level: \"verbose\" is not a log filter"), "{err}");
    assert!(!logs.exists(), "nothing was created");
}

#[tokio::test]
async fn agent_id_is_stable_across_restarts_and_a_lost_id_file() {
    let host = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(host.path().join("etc")).unwrap();
    std::fs::write(host.path().join("etc/machine-id"), "0f1e2d3c4b5a69788796a5b4c3d2e1f0\n").unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = state.path().join("agent.toml");
    let write = |root: &std::path::Path| {
        std::fs::write(
            &config,
            format!(
                "[agent]\nhost_root = {:?}\nstate_dir = {:?}\n",
                root.display().to_string(),
                state.path().join("s").display().to_string()
            ),
        )
        .unwrap()
    };
    let id = |config: &std::path::Path| {
        let out = std::process::Command::new(keel_tests::bin("keel-agent"))
            .arg("--config")
            .arg(config)
            .arg("id")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    write(host.path());
    let first = id(&config);
    assert_eq!(first, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
    assert_eq!(id(&config), first, "same ID on the next start");
    let id_file = state.path().join("s/agent_id");
    assert_eq!(std::fs::metadata(&id_file).unwrap().permissions().mode() & 0o777, 0o600);
    std::fs::remove_file(&id_file).unwrap();
    assert_eq!(
        id(&config),
        first,
        "same ID after the ID file is deleted, from /etc/machine-id"
    );

    // Without machine-id the stored ID carries it.
    let bare = tempfile::tempdir().unwrap();
    write(bare.path());
    assert_eq!(
        id(&config),
        first,
        "the stored ID is used when the host has no better source"
    );
}

/// glibc's heaps other than the main one in `/proc/<pid>/maps`: anonymous
/// mappings that start on a 64 MiB boundary, readable and writable, followed by
/// their inaccessible reserve, 64 MiB in all.
fn thread_heaps(pid: u32) -> usize {
    const HEAP: u64 = 64 << 20;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("the agent's maps");
    let regions: Vec<(u64, u64, String, bool)> = maps
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (start, end) = f.first()?.split_once('-')?;
            let anonymous = f.len() == 5 && f[4] == "0";
            Some((
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
                f.get(1)?.to_string(),
                anonymous,
            ))
        })
        .collect();
    regions
        .iter()
        .enumerate()
        .filter(|(i, (start, end, perms, anonymous))| {
            let reserve_end = regions
                .get(i + 1)
                .filter(|next| next.0 == *end && next.2 == "---p")
                .map_or(*end, |next| next.1);
            *anonymous && perms == "rw-p" && start % HEAP == 0 && reserve_end - start == HEAP
        })
        .count()
}

#[tokio::test]
async fn the_agent_keeps_few_threads_and_one_heap_on_a_host_of_many_cores() {
    let server = Server::start(ServerOptions::default()).await;
    let mut agent = Agent::enrolled(&server, "threads-1");
    // What tokio would otherwise take on a 16-core host.
    agent.start_with_env(&[("TOKIO_WORKER_THREADS", "16")]);
    server.api().online("threads-1").await;
    let pid = agent.pid().expect("the agent runs");
    // Two workers, and at most four threads for blocking work, which share
    // the name.
    let runtime_threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the agent's threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("tokio-r"))
        .count();
    assert!((2..=6).contains(&runtime_threads), "{runtime_threads} runtime threads");
    assert_eq!(thread_heaps(pid), 0, "glibc heaps besides the main one");
}

#[tokio::test]
async fn the_agent_pages_out_its_code_once_started() {
    let server = Server::start(ServerOptions::default()).await;
    let mut agent = Agent::enrolled(&server, "residency-1");
    agent.start_with_env(&[("KEEL_RELEASE_CODE_AFTER", "1s")]);
    server.api().online("residency-1").await;
    let line = eventually("the agent to page out its code", || async {
        agent
            .log()
            .lines()
            .find(|l| l.contains("paged out the agent's code"))
            .map(str::to_owned)
    })
    .await;
    let kib: u64 = line
        .split("kib=")
        .nth(1)
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no size in {line:?}"));
    assert!(kib > 1024, "the agent's code and constants are more than 1 MiB: {line}");
    // It still works: a task round-trips afterwards.
    let api = server.api();
    let body = json!({"data_type": 1051, "object_name": "keel-agent", "data": r#"{"idc":"lab-9"}"#});
    let (status, answer) = api.post("/api/v1/agents/residency-1/tasks", &body).await;
    assert_eq!(status, 202, "{answer}");
    let token = answer["token"].as_str().unwrap().to_owned();
    let t = eventually("the task result", || async {
        let (_, t) = api.get(&format!("/api/v1/tasks/{token}")).await;
        (t["status"] != "sent").then_some(t)
    })
    .await;
    assert_eq!(t["status"], "succeeded", "{t}");
}

#[tokio::test]
async fn tasks_round_trip_with_5100_results() {
    let server = Server::start(ServerOptions::default()).await;
    let mut agent = Agent::enrolled(&server, "tasks-1");
    agent.start();
    let api = server.api();
    api.online("tasks-1").await;

    let run = |data_type: i32, object: &str, data: &str| {
        let api = api.clone();
        let body = json!({"data_type": data_type, "object_name": object, "data": data});
        async move {
            let (status, answer) = api.post("/api/v1/agents/tasks-1/tasks", &body).await;
            assert_eq!(status, 202, "{answer}");
            let token = answer["token"].as_str().unwrap().to_owned();
            eventually("the task result", || async {
                let (_, t) = api.get(&format!("/api/v1/tasks/{token}")).await;
                (t["status"] != "sent").then_some(t)
            })
            .await
        }
    };
    let t = run(1051, "keel-agent", r#"{"idc":"lab-7","region":"eu-1"}"#).await;
    assert_eq!(t["status"], "succeeded", "{t}");
    assert_eq!(t["result"]["msg"], "idc=lab-7 region=eu-1");
    let a = eventually("the heartbeat to carry the idc", || async {
        api.agent("tasks-1").await.filter(|a| a["heartbeat"]["idc"] == "lab-7")
    })
    .await;
    assert_eq!(a["heartbeat"]["region"], "eu-1");

    let t = run(1051, "keel-agent", r#"{"idc":"no spaces"}"#).await;
    assert_eq!(t["status"], "failed");
    assert!(t["result"]["msg"].as_str().unwrap().contains("invalid idc"), "{t}");
    let t = run(1050, "keel-agent", "{}").await;
    assert_eq!(t["result"]["msg"], "unsupported data_type 1050 for keel-agent");
    let t = run(6000, "key-request", "{}").await;
    assert_eq!(t["result"]["msg"], "no such plugin: key-request");

    // 1060 restarts the agent in place (same PID, new process image) and it comes back.
    let before = api.agent("tasks-1").await.unwrap()["connected_at"].clone();
    let t = run(1060, "keel-agent", "").await;
    assert_eq!(t["result"]["msg"], "restarting");
    eventually("the restarted agent to reconnect", || async {
        api.agent("tasks-1")
            .await
            .filter(|a| a["online"] == true && a["connected_at"] != before)
    })
    .await;
    assert!(
        agent.log().matches("keel-agent starting").count() >= 2,
        "{}",
        agent.log()
    );

    // SIGTERM stops it gracefully, well within its 5 s grace.
    let status = agent.stop_within(Duration::from_secs(10)).expect("stopped in time");
    assert!(status.success(), "{status:?}");
    eventually("the stopped agent to be offline", || async {
        api.agent("tasks-1").await.filter(|a| a["online"] == false)
    })
    .await;
}

#[tokio::test]
async fn agent_reconnects_after_the_server_is_killed() {
    let mut server = Server::start(ServerOptions::default()).await;
    let mut agent = Agent::new(&server, "phoenix-1", "");
    let out = agent.enroll(&server, &server.enrollment_token(1, "10m"), Some(&server.fingerprint()));
    assert!(out.status.success());
    // Reconnect no sooner than 1.5 s, so the restarted server is seen with the agent offline.
    let text = std::fs::read_to_string(&agent.config).unwrap().replace(
        "backoff_min = \"200ms\"\nbackoff_max = \"1s\"",
        "backoff_min = \"3s\"\nbackoff_max = \"3s\"",
    );
    std::fs::write(&agent.config, text).unwrap();
    agent.start();
    let api = server.api();
    let first = api.online("phoenix-1").await["connected_at"].clone();

    server.restart().await;
    let a = api.agent("phoenix-1").await.expect("registered");
    assert_eq!(a["online"], false, "a restarted server starts with every agent offline");
    // `online` is the open stream itself; `connected_at` is written just after.
    eventually("the agent to reconnect by itself", || async {
        api.agent("phoenix-1")
            .await
            .filter(|a| a["online"] == true && a["connected_at"] != first)
    })
    .await;
    assert!(
        agent.log().contains("reconnecting"),
        "every reconnect is logged with its reason"
    );
}

#[tokio::test]
async fn agent_renews_its_certificate_before_two_thirds_of_its_lifetime() {
    let server = Server::start(ServerOptions {
        extra_toml: "[pki]
cert_lifetime = \"12s\""
            .into(),
        ..Default::default()
    })
    .await;
    let mut agent = Agent::enrolled(&server, "renew-1");
    let before = agent_pair(&agent);
    agent.start();
    let api = server.api();
    api.online("renew-1").await;
    let after = eventually_within(Duration::from_secs(20), "a renewed certificate", || async {
        let now = agent_pair(&agent);
        (now.cert != before.cert).then_some(now)
    })
    .await;
    assert_ne!(after.key, before.key, "renewal uses a fresh key");
    let validity = |pem: &str| {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        (c.validity().not_before.timestamp(), c.validity().not_after.timestamp())
    };
    let (old_from, old_to) = validity(&before.cert);
    let (new_from, _) = validity(&after.cert);
    // The server back-dates by a tenth of the lifetime, so issue time = not_before + 1.2 s.
    // X.509 times have whole seconds: allow one second of rounding.
    let total = (old_to - old_from) as f64;
    let fraction = (new_from as f64 + 1.2 - old_from as f64) / total;
    assert!(
        fraction < 2.0 / 3.0 + 1.0 / total,
        "renewed at {fraction:.2} of the lifetime"
    );
    assert!(fraction > 0.4, "renewed too early, at {fraction:.2}");
    eventually("the agent online with its renewed certificate", || async {
        agent
            .log()
            .contains("reconnecting with the renewed certificate")
            .then_some(())
    })
    .await;
    api.online("renew-1").await;
}
