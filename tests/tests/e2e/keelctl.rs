//! keelctl, the console CLI, against real servers and agents: every command goes
//! through the binary, with the server's messages and exit codes checked.

use std::path::Path;
use std::process::{Command, Output};

use keel_tests::{Agent, Server, ServerOptions, eventually};
use serde_json::{Value, json};

/// What one keelctl run gave.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// keelctl with a home of its own (no configuration file of the user's) and no
/// `KEEL_*` settings from the caller.
fn ctl(home: &Path) -> Command {
    let mut cmd = Command::new(keel_tests::bin("keelctl"));
    cmd.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env_remove("KEEL_SERVER")
        .env_remove("KEEL_TOKEN")
        .env_remove("KEEL_TOKEN_FILE")
        .env_remove("KEEL_CA_FILE");
    cmd
}

/// `keelctl <args>` against `server` with `token` in the environment.
fn run(server: &Server, token: &str, args: &[&str]) -> Run {
    let home = tempfile::tempdir().unwrap();
    ctl(home.path())
        .env("KEEL_SERVER", server.base_url())
        .env("KEEL_TOKEN", token)
        .args(args)
        .output()
        .unwrap()
        .into()
}

/// Stdout of a run that must succeed.
fn ok(server: &Server, token: &str, args: &[&str]) -> String {
    let r = run(server, token, args);
    assert_eq!(r.code, Some(0), "keelctl {}: {r:?}", args.join(" "));
    r.stdout
}

/// The JSON of a `--json` run that must succeed.
fn json_of(server: &Server, token: &str, args: &[&str]) -> Value {
    let args: Vec<&str> = args.iter().copied().chain(["--json"]).collect();
    let out = ok(server, token, &args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("keelctl {}: not JSON ({e}): {out}", args.join(" ")))
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect()
}

fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn keelctl_drives_agents_components_policies_and_tasks() {
    let server = Server::start(ServerOptions {
        release_key: true,
        ..ServerOptions::default()
    })
    .await;
    let mut agent = Agent::enrolled(&server, "ctl-1");
    agent.start();
    let before = server.api().online("ctl-1").await;
    let admin = server.admin_token.as_str();

    // Agents: list and show, as JSON and as a table.
    let list = json_of(&server, admin, &["agents", "list"]);
    assert_eq!(ids(&list), ["ctl-1"], "{list}");
    assert_eq!(list[0]["online"], true);
    let shown = json_of(&server, admin, &["agents", "show", "ctl-1"]);
    assert_eq!(shown["id"], "ctl-1");
    assert_eq!(shown["hostname"], before["hostname"]);
    assert!(!shown["last_heartbeat"].is_null(), "{shown}");
    let table = ok(&server, admin, &["agents", "list", "--online"]);
    let first_words: Vec<&str> = table.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(first_words, ["ID", "ctl-1"], "{table}");
    assert_eq!(json_of(&server, admin, &["agents", "list", "--offline"]), json!([]));
    let missing = run(&server, admin, &["agents", "show", "nobody"]);
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert!(missing.stderr.contains("404 Not Found: no agent nobody"), "{missing:?}");

    // Tags, then the list filtered by tag.
    let tags = json_of(&server, admin, &["agents", "tag", "ctl-1", "web", "canary"]);
    let mut tags: Vec<&str> = tags.as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    tags.sort_unstable();
    assert_eq!(tags, ["canary", "web"]);
    assert_eq!(
        ids(&json_of(&server, admin, &["agents", "list", "--tag", "web"])),
        ["ctl-1"]
    );
    assert_eq!(json_of(&server, admin, &["agents", "list", "--tag", "db"]), json!([]));
    assert_eq!(
        ids(&json_of(&server, admin, &["agents", "list", "--search", "CANA"])),
        ["ctl-1"],
        "one search over IDs, hosts, addresses and tags"
    );
    assert_eq!(
        json_of(&server, admin, &["agents", "list", "--search", "nowhere"]),
        json!([])
    );
    assert_eq!(
        json_of(&server, admin, &["agents", "untag", "ctl-1", "canary"]),
        json!(["web"])
    );
    assert_eq!(
        ids(&json_of(&server, admin, &["agents", "list", "--tag", "canary"])).len(),
        0
    );
    let bad = run(&server, admin, &["agents", "tag", "ctl-1", "no spaces"]);
    assert_eq!(bad.code, Some(1), "{bad:?}");
    assert!(bad.stderr.contains("400 Bad Request: invalid tag"), "{bad:?}");

    // A package uploaded from a file is listed with that file's SHA-256.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("demo.sh");
    std::fs::write(&file, "#!/bin/sh\nexit 0\n").unwrap();
    let sha = sha256sum(&file);
    let file_arg = file.to_str().unwrap();
    let up = json_of(
        &server,
        admin,
        &["components", "upload", "demo", "1.0.0", file_arg, "--type", "exec"],
    );
    assert_eq!(up["sha256"], sha.as_str(), "{up}");
    let packages = json_of(&server, admin, &["components", "list"]);
    let demo = packages
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "demo" && p["version"] == "1.0.0")
        .unwrap_or_else(|| panic!("demo 1.0.0 is not listed: {packages}"));
    assert_eq!(demo["sha256"], sha.as_str());
    assert_eq!(
        (demo["type"].as_str(), demo["arch"].as_str()),
        (Some("exec"), Some("any"))
    );
    assert!(ok(&server, admin, &["components", "list", "demo"]).contains(&sha));
    let dup = run(
        &server,
        admin,
        &["components", "upload", "demo", "1.0.0", file_arg, "--type", "exec"],
    );
    assert_eq!(dup.code, Some(1), "{dup:?}");
    assert!(dup.stderr.contains("409 Conflict"), "{dup:?}");

    // Policies: created, refused for a missing version with the server's message,
    // updated keeping the detail, and shown in the agent's effective configuration.
    let policy = json_of(
        &server,
        admin,
        &[
            "policies",
            "create",
            "--name",
            "demo-web",
            "--component",
            "demo",
            "--version",
            "1.0.0",
            "--tag",
            "web",
        ],
    );
    assert_eq!(policy["target"], json!({"tags": ["web"]}), "{policy}");
    let refused = run(
        &server,
        admin,
        &[
            "policies",
            "create",
            "--name",
            "demo-next",
            "--component",
            "demo",
            "--version",
            "9.9.9",
            "--all",
        ],
    );
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("400 Bad Request: component demo has no version 9.9.9 in the store"),
        "{refused:?}"
    );
    let updated = json_of(
        &server,
        admin,
        &[
            "policies",
            "update",
            "demo-web",
            "--version",
            "1.0.0",
            "--detail",
            "{\"level\":2}",
        ],
    );
    assert_eq!(updated["detail"], "{\"level\":2}");
    let updated = json_of(
        &server,
        admin,
        &["policies", "update", "demo-web", "--version", "1.0.0"],
    );
    assert_eq!(updated["detail"], "{\"level\":2}", "without --detail the detail stays");
    let policies = json_of(&server, admin, &["policies", "list"]);
    assert_eq!(ids(&policies), [policy["id"].as_str().unwrap()]);
    let config = json_of(&server, admin, &["agents", "config", "ctl-1"]);
    assert_eq!(config["managed"], true, "{config}");
    assert_eq!(config["components"][0]["component"], "demo", "{config}");
    assert_eq!(config["components"][0]["source"]["name"], "demo-web", "{config}");
    let in_use = run(&server, admin, &["components", "delete", "demo", "1.0.0"]);
    assert_eq!(in_use.code, Some(1), "a version a policy uses stays: {in_use:?}");
    assert!(in_use.stderr.contains("409 Conflict"), "{in_use:?}");
    ok(&server, admin, &["policies", "delete", "demo-web"]);
    assert_eq!(json_of(&server, admin, &["policies", "list"]), json!([]));
    ok(&server, admin, &["components", "delete", "demo", "1.0.0"]);
    assert_eq!(json_of(&server, admin, &["components", "list", "demo"]), json!([]));

    // A task the agent fails: watch exits 2 with the state.
    let failing = ok(
        &server,
        admin,
        &[
            "tasks",
            "create",
            "plugin-task",
            "--agent",
            "ctl-1",
            "--data-type",
            "9999",
            "--object",
            "nosuch",
        ],
    );
    let failing = failing.trim();
    assert!(!failing.is_empty());
    let watched = run(&server, admin, &["tasks", "watch", failing, "--interval-ms", "100"]);
    assert_eq!(watched.code, Some(2), "{watched:?}");
    assert!(
        watched.stderr.contains(&format!("task {failing} failed")),
        "{watched:?}"
    );

    // restart-agent: the real agent answers "restarting" and comes back.
    let task = ok(
        &server,
        admin,
        &["tasks", "create", "restart-agent", "--agent", "ctl-1"],
    );
    let task = task.trim();
    let watched = run(&server, admin, &["tasks", "watch", task, "--interval-ms", "100"]);
    assert_eq!(watched.code, Some(0), "{watched:?}");
    assert!(
        watched.stdout.contains(&format!("task {task} succeeded")),
        "{watched:?}"
    );
    assert!(watched.stderr.contains("1/1 finished"), "progress lines: {watched:?}");
    let shown = json_of(&server, admin, &["tasks", "show", task]);
    assert_eq!(shown["state"], "succeeded", "{shown}");
    assert_eq!(shown["subtasks"][0]["agent_id"], "ctl-1");
    assert_eq!(shown["subtasks"][0]["result"]["msg"], "restarting", "{shown}");
    let api = server.api();
    eventually("the agent to reconnect after its restart", || async {
        api.agent("ctl-1")
            .await
            .filter(|a| a["online"] == true && a["connected_at"] != before["connected_at"])
    })
    .await;
    let all = json_of(&server, admin, &["tasks", "list"]);
    let mut listed = ids(&all);
    listed.sort();
    let mut expected = vec![failing.to_owned(), task.to_owned()];
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(
        ids(&json_of(&server, admin, &["tasks", "list", "--state", "failed"])),
        [failing]
    );
    // A finished task cannot be cancelled; the server says why.
    let late = run(&server, admin, &["tasks", "cancel", task]);
    assert_eq!(late.code, Some(1), "{late:?}");
    assert!(late.stderr.contains("409 Conflict"), "{late:?}");

    // The audit log lists the changes, by the admin token.
    let tokens = json_of(&server, admin, &["tokens", "list"]);
    let admin_id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "admin")
        .and_then(|t| t["id"].as_str())
        .unwrap()
        .to_owned();
    let log = json_of(&server, admin, &["audit"]);
    let entries = log.as_array().unwrap();
    let has = |action: &str, target: &str, status: i64| {
        entries.iter().any(|e| {
            e["action"] == action
                && e["target"].as_str().is_some_and(|t| t.ends_with(target))
                && e["status"] == status
                && e["actor"] == admin_id.as_str()
        })
    };
    assert!(
        has("PUT /api/v1/agents/{id}/tags/{tag}", "/agents/ctl-1/tags/web", 200),
        "{log}"
    );
    assert!(
        has(
            "DELETE /api/v1/agents/{id}/tags/{tag}",
            "/agents/ctl-1/tags/canary",
            200
        ),
        "{log}"
    );
    assert!(
        has(
            "POST /api/v1/components/{name}/versions",
            "/components/demo/versions",
            201
        ),
        "{log}"
    );
    assert!(has("POST /api/v1/policies", "/policies", 201), "{log}");
    assert!(
        has("POST /api/v1/policies", "/policies", 400),
        "the refusal is logged too: {log}"
    );
    assert!(has("PUT /api/v1/policies/{id}", "/policies/demo-web", 200), "{log}");
    assert!(has("DELETE /api/v1/policies/{id}", "/policies/demo-web", 204), "{log}");
    assert!(has("POST /api/v1/tasks", "/tasks", 201), "{log}");
    let refusal = entries
        .iter()
        .find(|e| e["action"] == "POST /api/v1/policies" && e["status"] == 400)
        .unwrap();
    assert!(refusal["outcome"].as_str().unwrap().contains("9.9.9"), "{refusal}");
    let filtered = json_of(
        &server,
        admin,
        &["audit", "--target", "ctl-1", "--since", "1h", "--limit", "2"],
    );
    let filtered = filtered.as_array().unwrap();
    assert_eq!(filtered.len(), 2, "{filtered:?}");
    assert!(filtered.iter().all(|e| e["target"].as_str().unwrap().contains("ctl-1")));
    let none = json_of(&server, admin, &["audit", "--until", "2000-01-01T00:00:00Z"]);
    assert_eq!(none, json!([]));
    let table = ok(&server, admin, &["audit", "--limit", "1"]);
    assert_eq!(
        table.lines().next().unwrap().split_whitespace().next(),
        Some("AT"),
        "{table}"
    );
}

#[tokio::test]
async fn keelctl_shows_refusals_with_the_server_message() {
    let server = Server::start(ServerOptions::default()).await;
    let admin = server.admin_token.as_str();

    let made = run(
        &server,
        admin,
        &["tokens", "create", "--role", "viewer", "--description", "ci read-only"],
    );
    assert_eq!(made.code, Some(0), "{made:?}");
    let secret = made.stdout.trim().to_owned();
    let id = made
        .stderr
        .trim()
        .strip_prefix("created viewer token ")
        .unwrap_or_else(|| panic!("the ID goes to stderr: {made:?}"))
        .to_owned();
    assert!(!secret.is_empty() && !secret.contains(char::is_whitespace), "{made:?}");
    let tokens = json_of(&server, admin, &["tokens", "list"]);
    let viewer = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} is not listed: {tokens}"));
    assert_eq!(
        (viewer["kind"].as_str(), viewer["description"].as_str()),
        (Some("viewer"), Some("ci read-only"))
    );

    // The viewer reads, but changes are refused with the server's reason.
    assert_eq!(json_of(&server, &secret, &["agents", "list"]), json!([]));
    for args in [
        &["policies", "delete", "anything"][..],
        &["tasks", "create", "sync-config", "--all"][..],
        &["agents", "tag", "some-agent", "web"][..],
    ] {
        let r = run(&server, &secret, args);
        assert_eq!(r.code, Some(1), "{args:?}: {r:?}");
        assert!(
            r.stderr.contains(&format!(
                "keelctl: 403 Forbidden: this needs the operator role; token {id} has viewer"
            )),
            "{args:?}: {r:?}"
        );
        assert!(
            !r.stderr.contains(&secret) && !r.stdout.contains(&secret),
            "the token is never shown"
        );
    }
    let r = run(&server, &secret, &["tokens", "list"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("needs the admin role"), "{r:?}");

    // A revoked token is refused, with the reason.
    ok(&server, admin, &["tokens", "revoke", &id]);
    let r = run(&server, &secret, &["agents", "list"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(
        r.stderr.contains("401 Unauthorized: unknown, expired or revoked token"),
        "{r:?}"
    );
    let again = run(&server, admin, &["tokens", "revoke", &id]);
    assert_eq!(again.code, Some(1));
    assert!(
        again
            .stderr
            .contains(&format!("404 Not Found: no unrevoked token {id}")),
        "{again:?}"
    );

    // The refusals are in the audit log under the viewer's ID.
    let log = json_of(&server, admin, &["audit", "--actor", &id]);
    let statuses: Vec<i64> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses, [403, 403, 403], "{log}");
}

#[tokio::test]
async fn keelctl_settings_come_from_flags_env_or_file_and_https_trusts_the_keel_ca() {
    let server = Server::start(ServerOptions {
        https: true,
        ..ServerOptions::default()
    })
    .await;
    let admin = server.admin_token.as_str();
    let home = tempfile::tempdir().unwrap();
    let ca = server.pki_dir().join("ca.pem");

    // Without a token or a server: exit 64, saying how to give one.
    let r: Run = ctl(home.path())
        .env("KEEL_SERVER", server.base_url())
        .args(["agents", "list"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(64), "{r:?}");
    assert!(r.stderr.contains("--token") && r.stderr.contains("KEEL_TOKEN"), "{r:?}");
    let r: Run = ctl(home.path())
        .env("KEEL_TOKEN", admin)
        .args(["agents", "list"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(64), "{r:?}");
    assert!(
        r.stderr.contains("--server") && r.stderr.contains("KEEL_SERVER"),
        "{r:?}"
    );
    assert!(!r.stderr.contains(admin), "the token is never shown");

    // HTTPS without the Keel CA fails, pointing at --ca-file; with it, it works.
    let r = run(&server, admin, &["agents", "list"]);
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("--ca-file"), "{r:?}");
    assert_eq!(
        json_of(&server, admin, &["--ca-file", ca.to_str().unwrap(), "agents", "list"]),
        json!([])
    );
    let wrong_ca = home.path().join("other.pem");
    std::fs::write(&wrong_ca, keel_tests::foreign_signed("x").cert).unwrap();
    let r = run(
        &server,
        admin,
        &["--ca-file", wrong_ca.to_str().unwrap(), "agents", "list"],
    );
    assert_eq!(r.code, Some(1), "only the given CA is trusted: {r:?}");

    // Flags, with the token from a file.
    let token_file = home.path().join("token");
    std::fs::write(&token_file, format!("{admin}\n")).unwrap();
    let r: Run = ctl(home.path())
        .args(["agents", "list", "--json", "--server", &server.base_url()])
        .args([
            "--token-file",
            token_file.to_str().unwrap(),
            "--ca-file",
            ca.to_str().unwrap(),
        ])
        .output()
        .unwrap()
        .into();
    assert_eq!((r.code, r.stdout.trim()), (Some(0), "[]"), "{r:?}");

    // The default configuration file.
    let conf_dir = home.path().join("config/keel");
    std::fs::create_dir_all(&conf_dir).unwrap();
    let conf = conf_dir.join("keelctl.toml");
    std::fs::write(
        &conf,
        format!(
            "server = {:?}\ntoken = {admin:?}\nca_file = {:?}\n",
            server.base_url(),
            ca.to_str().unwrap()
        ),
    )
    .unwrap();
    let r: Run = ctl(home.path())
        .args(["tokens", "list", "--json"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(serde_json::from_str::<Value>(&r.stdout).unwrap()[0]["kind"], "admin");
    // The environment overrides the file.
    let r: Run = ctl(home.path())
        .env("KEEL_TOKEN", "keel_wrong")
        .args(["agents", "list"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(1), "{r:?}");
    assert!(r.stderr.contains("401 Unauthorized"), "{r:?}");

    // Unknown keys in the file and bad flags are usage errors.
    std::fs::write(&conf, format!("server = {:?}\ntokn = \"x\"\n", server.base_url())).unwrap();
    let r: Run = ctl(home.path()).args(["agents", "list"]).output().unwrap().into();
    assert_eq!(r.code, Some(64), "{r:?}");
    assert!(
        r.stderr.contains("tokn") && r.stderr.contains(conf.to_str().unwrap()),
        "{r:?}"
    );
    let r: Run = ctl(home.path())
        .args(["agents", "list", "--colour"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(64), "{r:?}");
    let r: Run = ctl(home.path())
        .args(["tasks", "create", "sync-config", "--all", "--tag", "x"])
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, Some(64), "one kind of target: {r:?}");
}
