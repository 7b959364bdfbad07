//! The agent upgrades itself from the console: real deb packages, dpkg into a
//! throwaway root, a test supervisor in place of systemd, and the watchdog that
//! rolls back a version that does not come up.

use std::path::Path;
use std::process::Command;

use keel_tests::{
    Agent, Api, Server, ServerOptions, deb, dpkg, dpkg_command, eventually_within, packages, run, throwaway_root,
};
use serde_json::{Value, json};

async fn upload_deb(server: &Server, version: &str, path: &Path) {
    let (status, body) = server
        .upload("keel-agent", version, "deb", std::fs::read(path).unwrap())
        .await;
    assert_eq!(status, 201, "upload keel-agent {version}: {body}");
}

async fn sync(api: &Api, agent: &str, want: &str) -> Value {
    let (status, task) = api
        .post(
            "/api/v1/tasks",
            &json!({"kind": "sync-config", "target": {"agents": [agent]}}),
        )
        .await;
    assert_eq!(status, 201, "{task}");
    let id = task["id"].as_str().unwrap();
    api.task_in_state(id, want, std::time::Duration::from_secs(90)).await
}

/// A keel-agent deb whose "agent" exits at once.
fn broken_deb(dir: &Path, version: &str) -> std::path::PathBuf {
    let tree = dir.join("broken");
    std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
    std::fs::write(
        tree.join("DEBIAN/control"),
        format!("Package: keel-agent\nVersion: {version}\nArchitecture: amd64\nMaintainer: Keel <keel@keel.invalid>\nDescription: broken on purpose\n"),
    )
    .unwrap();
    let exe = tree.join("usr/bin/keel-agent");
    std::fs::write(&exe, "#!/bin/sh\necho 'this build is broken' >&2\nexit 1\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join(format!("keel-agent_{version}_amd64.deb"));
    run(Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&tree)
        .arg(&out));
    out
}

#[tokio::test]
async fn the_agent_upgrades_itself_and_rolls_back_a_version_that_does_not_come_up() {
    let Some(dir) = packages() else { return };
    let root = throwaway_root();
    let r = root.path();
    dpkg(r, &["-i"], &[deb(&dir, "keel-agent", "1.0.0")]);

    let server = Server::start(ServerOptions {
        release_key: true,
        ..Default::default()
    })
    .await;
    let api = server.api();
    upload_deb(&server, "1.0.0", &deb(&dir, "keel-agent", "1.0.0")).await;
    upload_deb(&server, "1.0.1", &deb(&dir, "keel-agent", "1.0.1")).await;

    let install = serde_json::to_string(&[dpkg_command(r), vec!["-i".to_owned()]].concat()).unwrap();
    let upgrade =
        format!("[upgrade]\npackage_type = \"deb\"\ninstall_command = {install}\nwatchdog_window = \"15s\"\n");
    let mut agent = Agent::new(&server, "up-1", &upgrade);
    agent.exe = r.join("usr/bin/keel-agent");
    let out = agent.enroll(&server, &server.enrollment_token(1, "10m"), Some(&server.fingerprint()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let supervisor = agent.supervise();
    let a = api.online("up-1").await;
    assert_eq!(a["version"], "1.0.0");
    assert_eq!(a["heartbeat"]["package_type"], "deb");

    // 1.0.0 -> 1.0.1 through a policy and a sync-config task.
    let policy =
        json!({"name": "agent-version", "component": "keel-agent", "version": "1.0.1", "target": {"agents": ["up-1"]}});
    assert_eq!(api.post("/api/v1/policies", &policy).await.0, 201);
    let done = sync(&api, "up-1", "succeeded").await;
    let result = &done["subtasks"][0]["result"];
    assert!(
        result["msg"]
            .as_str()
            .unwrap()
            .starts_with("upgraded from 1.0.0 to 1.0.1"),
        "{done}"
    );
    assert_eq!(
        run(Command::new(r.join("usr/bin/keel-agent")).arg("--version")).trim(),
        "keel-agent 1.0.1"
    );
    let a = eventually_within(
        std::time::Duration::from_secs(30),
        "the agent to report 1.0.1",
        || async {
            api.agent("up-1")
                .await
                .filter(|a| a["version"] == "1.0.1" && a["online"] == true)
        },
    )
    .await;
    assert_eq!(a["id"], "up-1", "same identity after the upgrade");

    // 1.0.1 -> a 1.0.2 that exits at once: the watchdog puts 1.0.1 back.
    let broken = broken_deb(root.path(), "1.0.2");
    upload_deb(&server, "1.0.2", &broken).await;
    let (status, body) = api
        .put_json("/api/v1/policies/agent-version", &json!({"version": "1.0.2"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let failed = sync(&api, "up-1", "failed").await;
    let msg = failed["subtasks"][0]["result"]["msg"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("1.0.2 did not connect") && msg.contains("rolled back to 1.0.1"),
        "{msg}"
    );
    assert_eq!(
        run(Command::new(r.join("usr/bin/keel-agent")).arg("--version")).trim(),
        "keel-agent 1.0.1"
    );
    let a = api.agent("up-1").await.unwrap();
    assert_eq!(
        (a["version"].as_str(), a["online"].as_bool()),
        (Some("1.0.1"), Some(true))
    );
    assert!(
        agent.log().contains("this build is broken"),
        "the broken version did run and exit"
    );
    // The server repeats the configuration naming 1.0.2 on every connect; the agent
    // does not try that package again by itself.
    eventually_within(
        std::time::Duration::from_secs(30),
        "the agent to hold back the rolled-back version",
        || async {
            agent
                .log()
                .contains("not retrying an upgrade that was rolled back")
                .then_some(())
        },
    )
    .await;
    assert!(
        !agent.state_dir().join("upgrade/pending.json").exists(),
        "no new attempt is under way"
    );
    drop(supervisor);
}
